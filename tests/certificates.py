"""Certificates for TLS tests, made with ``cryptography``: a CA and the certificates it
issues, written as PEM files."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

__all__ = ["Issued", "make_ca"]


@dataclass(frozen=True)
class Issued:
    """A certificate and its key on disk; ``issue`` makes more from it (if a CA)."""

    name: str
    certificate: Path
    private_key: Path
    _key: rsa.RSAPrivateKey
    _cert: x509.Certificate

    def issue(self, name: str, folder: Path, *, days: float = 30, start_days: float = -1) -> Issued:
        """A certificate for ``name`` signed by this one, valid from ``start_days`` to
        ``days`` from now (negative ``days``: already expired)."""
        return _write(name, folder, self, days=days, start_days=start_days, is_ca=False)


def _write(
    name: str, folder: Path, issuer: Issued | None, *, days: float, start_days: float, is_ca: bool
) -> Issued:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer._cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=start_days))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    cert = builder.sign(issuer._key if issuer else key, hashes.SHA256())
    folder.mkdir(parents=True, exist_ok=True)
    certificate = folder / f"{name}.pem"
    private_key = folder / f"{name}.key"
    certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    private_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    private_key.chmod(0o600)
    return Issued(name, certificate, private_key, key, cert)


def make_ca(name: str, folder: Path) -> Issued:
    """A self-signed certificate authority, valid for a year."""
    return _write(name, folder, None, days=365, start_days=-1, is_ca=True)
