"""DICOM over TLS with dcmtk as the scanner and the PACS: certificates made by the test
(tests/certificates.py), a study in by ``storescu +tls`` and the SEG and SR out to a
``storescp +tls``, both ways with client certificates (mutual TLS); clients without a
certificate, with an untrusted one, or speaking plain DICOM to the TLS port are refused
and logged, while a plain port, when configured, still serves plain DICOM."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from node.state import JobStateValues
from tests.certificates import Issued, make_ca
from tests.integration.conftest import CT_RULE, ct_node_config
from tests.integration.test_orthanc import COMPREHENSIVE_3D_SR, SEG_SOP_CLASS
from tests.node_process import NODE_AE_TITLE, NodeProcess, node_config
from tests.peers import Orthanc, StoreSCP, dcmtk_env, free_port, run_storescu, wait_for

FINISHED = {JobStateValues.DELIVERED, JobStateValues.FAILED}


def _tls_args(party: Issued | None, ca: Issued) -> list[str]:
    """dcmtk's options for TLS with ``party``'s certificate (None: anonymous TLS)."""
    identity = ["+tls", str(party.private_key), str(party.certificate)] if party else ["+tla"]
    return [*identity, "+cf", str(ca.certificate)]


def _echo(
    port: int, extra: list[str], calling_ae: str = "SCANNER"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/usr/bin/echoscu", "-aet", calling_ae, "-aec", NODE_AE_TITLE, *extra, "127.0.0.1", str(port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_study_goes_in_and_results_go_out_over_mutual_tls(
    tmp_path: Path, phantom_dir: Path
) -> None:
    certs = tmp_path / "certs"
    ca = make_ca("hospital-ca", certs)
    node_cert = ca.issue("pacsnode", certs)
    scanner = ca.issue("scanner", certs)
    pacs = ca.issue("pacs", certs)
    stranger = make_ca("stranger-ca", certs).issue("stranger", certs)

    pacs_args = ["+tls", str(pacs.private_key), str(pacs.certificate), "+cf", str(ca.certificate)]
    with StoreSCP(ae_title="DESTPACS", extra_args=pacs_args) as destination:
        config = ct_node_config(tmp_path / "data", destination)
        plain_port = free_port()
        config["node"]["tls"] = {
            "certificate": str(node_cert.certificate),
            "private_key": str(node_cert.private_key),
            "ca_certificates": str(ca.certificate),
            "plain_port": plain_port,
        }
        # SCANNER must show its own certificate; PINNED pins another one's fingerprint.
        config["peers"] = [
            {"ae_title": "SCANNER", "host": "127.0.0.1", "certificate_subject": "CN=scanner"},
            {"ae_title": "PINNED", "host": "127.0.0.1", "certificate_sha256": _sha256(pacs)},
            {"ae_title": "LEGACY", "host": "127.0.0.1"},
        ]
        config["destinations"]["pacs"]["tls"] = {
            "ca_certificates": str(ca.certificate),
            "certificate": str(node_cert.certificate),
            "private_key": str(node_cert.private_key),
        }
        with NodeProcess(tmp_path / "node", config) as node:
            sent = run_storescu(
                "127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", phantom_dir,
                extra_args=_tls_args(scanner, ca),
            )  # fmt: skip
            assert sent.returncode == 0, sent.stdout + sent.stderr
            (job,) = node.wait_for_jobs(1, FINISHED)
            assert job.state == JobStateValues.DELIVERED, job.reason
            received = destination.wait_for_files(2)
            assert sorted(p.name.split(".")[0] for p in received) == ["SG", "SR3"]

            # Refused: no certificate, an untrusted one, plain DICOM on the TLS port.
            refused = {
                "anonymous": _echo(node.port, _tls_args(None, ca)),
                "untrusted": _echo(node.port, _tls_args(stranger, ca)),
                "plain": _echo(node.port, []),
            }
            for name, echo in refused.items():
                assert echo.returncode != 0, (name, echo.stdout + echo.stderr)
            log = node.log()
            assert log.count("refused a TLS connection from 127.0.0.1") >= 3, log[-3000:]
            alerts = [json.loads(line) for line in _audit(node) if '"110113"' in line]
            assert len(alerts) >= 3
            assert all(
                a["EventTypeCode"][0]["originalText"] == "Node Authentication" for a in alerts
            )
            assert all(
                a["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1" for a in alerts
            )
            # Trusted clients, and plain DICOM on the plain port, are served, even while
            # a client that connected to the TLS port says nothing.
            with socket.create_connection(("127.0.0.1", node.port)):
                assert _echo(node.port, _tls_args(scanner, ca)).returncode == 0
            assert _echo(plain_port, [], "LEGACY").returncode == 0

            # Pins: a trusted certificate that is not the pinned one, and a pinned peer
            # on the plain port, are rejected as unknown, naming why.
            assert _echo(node.port, _tls_args(scanner, ca), "PINNED").returncode != 0
            assert _echo(plain_port, []).returncode != 0
            assert _echo(node.port, _tls_args(pacs, ca), "PINNED").returncode == 0
            log = node.log()
            assert re.search(
                r"rejected association from PINNED at 127\.0\.0\.1: TLS certificate SHA-256 "
                r"fingerprint [0-9a-f]{64} is not the pinned one",
                log,
            ), log[-3000:]
            assert "rejected association from SCANNER at 127.0.0.1: no TLS certificate" in log
            logins = [json.loads(line) for line in _audit(node) if '"110122"' in line]
            by_outcome = {
                (entry["EventOutcomeIndicator"], entry["ActiveParticipant"][0]["UserID"],
                 entry["ActiveParticipant"][0].get("UserName"))
                for entry in logins
            }  # fmt: skip
            assert {(0, "SCANNER", "CN=scanner"), (4, "PINNED", "CN=scanner"),
                    (4, "SCANNER", None), (0, "PINNED", "CN=pacs"),
                    (0, "LEGACY", None)} <= by_outcome  # fmt: skip


def _sha256(party: Issued) -> str:
    """The certificate's SHA-256 fingerprint as openssl prints it (colons, upper case)."""
    der = party.certificate.read_text()
    digest = x509.load_pem_x509_certificate(der.encode()).fingerprint(hashes.SHA256())
    return ":".join(f"{byte:02X}" for byte in digest)


def _audit(node: NodeProcess) -> list[str]:
    return (node.data_dir / "audit" / "audit.jsonl").read_text().splitlines()


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("expired", r"node\.tls\.certificate: .*pacsnode\.pem: expired on "),
        ("mismatched", r"node\.tls\.private_key: .*other\.key does not go with .*pacsnode\.pem"),
        ("missing", r"node\.tls\.ca_certificates: .*missing\.pem: not a readable PEM certificate"),
    ],
)
def test_check_config_names_bad_tls_files(tmp_path: Path, problem: str, expected: str) -> None:
    certs = tmp_path / "certs"
    ca = make_ca("hospital-ca", certs)
    node_cert = ca.issue("pacsnode", certs, days=-1 if problem == "expired" else 30, start_days=-10)
    other = ca.issue("other", certs)
    tls = {
        "certificate": str(node_cert.certificate),
        "private_key": str(other.private_key if problem == "mismatched" else node_cert.private_key),
        "ca_certificates": str(certs / "missing.pem" if problem == "missing" else ca.certificate),
    }
    config = tmp_path / "config.yaml"
    config.write_text(f"node: {{tls: {tls}}}\n")
    check = subprocess.run(
        [str(Path(sys.executable).parent / "pacsnode"), "check-config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 2, check.stdout + check.stderr
    assert re.search(expected, check.stdout + check.stderr), check.stdout + check.stderr


def test_orthanc_as_the_pacs_round_trip_over_tls(tmp_path: Path, phantom_dir: Path) -> None:
    """Orthanc with DicomTlsEnabled sends a study to pacsnode and receives the SEG and
    SR back, both associations over mutual TLS."""
    certs = tmp_path / "certs"
    ca = make_ca("hospital-ca", certs)
    node_cert = ca.issue("pacsnode", certs)
    orthanc_cert = ca.issue("orthanc", certs)
    node_port = free_port()
    orthanc_config = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(orthanc_cert.certificate),
        "DicomTlsPrivateKey": str(orthanc_cert.private_key),
        "DicomTlsTrustedCertificates": str(ca.certificate),
        "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {
            "pacsnode": {"AET": NODE_AE_TITLE, "Host": "127.0.0.1", "Port": node_port,
                         "UseDicomTls": True},
        },
    }  # fmt: skip
    with Orthanc(workdir=tmp_path / "orthanc", extra_config=orthanc_config) as orthanc:
        tls = {"certificate": str(node_cert.certificate), "private_key": str(node_cert.private_key),
               "ca_certificates": str(ca.certificate)}  # fmt: skip
        config = node_config(
            tmp_path / "data", port=node_port,
            peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}],
            destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                   "port": orthanc.dicom_port, "tls": tls}},
            rules=[CT_RULE],
        )  # fmt: skip
        config["node"]["tls"] = tls
        for path in sorted(phantom_dir.glob("*.dcm")):
            orthanc.upload(path)
        with NodeProcess(tmp_path / "node", config) as node:
            orthanc.send_to_modality("pacsnode", [s["ID"] for s in orthanc.series()])
            (job,) = node.wait_for_jobs(1, FINISHED)
            assert job.state == JobStateValues.DELIVERED, job.reason
            assert "refused a TLS connection" not in node.log()
        segs = wait_for(
            lambda: orthanc.find_instances_by_sop_class(SEG_SOP_CLASS), 10, "the SEG in Orthanc"
        )
        srs = orthanc.find_instances_by_sop_class(COMPREHENSIVE_3D_SR)
        assert (len(segs), len(srs)) == (1, 1)
        seg = dcmread(DicomBytesIO(orthanc.get_file(segs[0]["ID"])))
        assert seg.StudyInstanceUID == dcmread(min(phantom_dir.glob("*.dcm"))).StudyInstanceUID
