"""DICOM over TLS (PS3.15 Annex B, the BCP 195 profile), with Python's ``ssl``.

The SCP's context (:func:`server_context`) and a destination's (:func:`client_context`)
allow TLS 1.2 and 1.3 only, and for TLS 1.2 only the BCP 195 recommended suites
(ECDHE or DHE key exchange, AES-GCM or ChaCha20-Poly1305); TLS 1.3's suites are all
AEAD already. Peers are authenticated by the configured trust anchors
(``ca_certificates``), not by host name: hospital peers are configured by IP address.
After the handshake a peer is still checked against ``peers:`` by AE title and address,
and against the certificate subject or fingerprint its entry pins
(:func:`certificate_mismatch`).
:func:`tls_problems` is what ``pacsnode check-config`` reports of the files.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from pynetdicom.association import Association

from node.config import ClientTls, NodeTls, Peer

__all__ = [
    "certificate_mismatch",
    "client_context",
    "peer_certificate",
    "server_context",
    "subject_of",
    "tls_problems",
]

#: BCP 195 (RFC 9325) recommended TLS 1.2 cipher suites, in OpenSSL's names.
_BCP195_TLS12_SUITES = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
)
BCP195_CIPHERS = ":".join(_BCP195_TLS12_SUITES)


def _context(purpose: ssl.Purpose) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    return context


def server_context(settings: NodeTls) -> ssl.SSLContext:
    """The SCP's context: its certificate, the peers' trust anchors, and (by default)
    a client certificate required.

    Raises
    ------
    OSError, ssl.SSLError
        If a file cannot be read, or the key does not match the certificate.
    """
    context = _context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.certificate, settings.private_key)
    context.load_verify_locations(cafile=settings.ca_certificates)
    context.verify_mode = (
        ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
    )
    return context


def client_context(settings: ClientTls) -> ssl.SSLContext:
    """A destination's context: its trust anchors, and our certificate if it asks for
    one (mutual TLS).

    Raises
    ------
    OSError, ssl.SSLError
        If a file cannot be read, or the key does not match the certificate.
    """
    context = _context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False  # peers are configured by address; the CA decides
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=settings.ca_certificates)
    if settings.certificate is not None and settings.private_key is not None:
        context.load_cert_chain(settings.certificate, settings.private_key)
    return context


def peer_certificate(assoc: Association) -> x509.Certificate | None:
    """The certificate the requestor of ``assoc`` presented; None over plain DICOM or
    when it sent none (``require_client_certificate: false``)."""
    connection = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if not isinstance(connection, ssl.SSLSocket):
        return None
    der = connection.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def subject_of(certificate: x509.Certificate | None) -> str | None:
    """The certificate's subject in RFC 4514 form (``CN=ct1,O=Hospital``), as pins and
    the audit trail write it."""
    return None if certificate is None else certificate.subject.rfc4514_string()


def certificate_mismatch(certificate: x509.Certificate | None, peer: Peer) -> str | None:
    """Why ``certificate`` is not the one ``peer`` pins (subject, SHA-256 fingerprint);
    None when it is, or when the entry pins nothing."""
    if not peer.pins_certificate:
        return None
    if certificate is None:
        return "no TLS certificate, and its peer entry pins one"
    subject = subject_of(certificate)
    if peer.certificate_subject is not None and subject != peer.certificate_subject:
        return f"TLS certificate subject {subject!r} is not the pinned {peer.certificate_subject!r}"
    fingerprint = certificate.fingerprint(hashes.SHA256()).hex()
    if peer.certificate_sha256 is not None and fingerprint != peer.certificate_sha256:
        return f"TLS certificate SHA-256 fingerprint {fingerprint} is not the pinned one"
    return None


def _certificate_problem(path: Path, now: datetime.datetime) -> str | None:
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        return f"{path}: not a readable PEM certificate ({exc})"
    if certificate.not_valid_after_utc < now:
        return f"{path}: expired on {certificate.not_valid_after_utc:%Y-%m-%d}"
    if certificate.not_valid_before_utc > now:
        return f"{path}: not valid before {certificate.not_valid_before_utc:%Y-%m-%d}"
    return None


def tls_problems(where: str, settings: NodeTls | ClientTls) -> list[str]:
    """What is wrong with a TLS setting's files, one line each starting with ``where``:
    unreadable files, a certificate expired or not yet valid, a private key that does
    not match its certificate."""
    now = datetime.datetime.now(datetime.UTC)
    problems = []
    files = {"ca_certificates": settings.ca_certificates}
    if settings.certificate is not None:
        files["certificate"] = settings.certificate
    for key, path in files.items():
        problem = _certificate_problem(path, now)
        if problem is not None:
            problems.append(f"{where}.{key}: {problem}")
    if settings.certificate is not None and settings.private_key is not None and not problems:
        try:
            ssl.create_default_context().load_cert_chain(settings.certificate, settings.private_key)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            problems.append(
                f"{where}.private_key: {settings.private_key} does not go with "
                f"{settings.certificate} ({reason})"
            )
    return problems
