"""Generated hostile input against a running node, for both acceptors (the fast one and
pynetdicom's own): at least 200 seeded cases built from a real C-STORE's PDUs — bytes
flipped, PDUs cut short, lengths wrong or huge, a PDU written one byte at a time, an
abort mid-dataset, element lengths past the end, deeply nested sequences, data in
another transfer syntax than negotiated, UIDs missing, malformed, with ``../`` or NUL.
After each case the node answers C-ECHO within a second and stores a good instance; at
the end a study goes through end to end, every instance acknowledged is there, and no
temporary file is left in the spool."""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from node.state import JobStateValues
from tests.integration.conftest import ct_node_config, make_phantom_series
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, run_storescu, wait_for

pytestmark = pytest.mark.integration

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
CASES = 210
NETWORK_TIMEOUT = 1.5


def _dataset(sop_uid: str, *, study: str, series: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.PatientID = "FUZZ"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(128)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _encode(ds: Dataset, implicit: bool = False) -> bytes:
    encoded = encode(ds, implicit, True)
    assert encoded is not None
    return encoded


def _pdus(context_id: int, sop_uid: str, data: bytes, max_pdu: int = 256) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE-RQ carrying ``data`` (fragments of ``max_pdu``)."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CT_IMAGE
    # Past pynetdicom's check: a hostile sender's UID may be malformed or too long.
    request._affected_sop_instance_uid = UID(sop_uid)
    request.Priority = 2
    request.DataSet = BytesIO(data)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    encoded = []
    for primitive in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        encoded.append(pdu.encode())
    return encoded


def _nested(depth: int) -> bytes:
    """A Referenced Series Sequence (0008,1115) nested ``depth`` deep, each sequence and
    item of undefined length (encoded by hand: pydicom itself recurses on such data)."""
    opening = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (opening + item) * depth + closing * depth


Case = Callable[[Association, int, random.Random], None]


def _socket(assoc: Association) -> socket.socket:
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    assert sock is not None
    return sock


def _send(assoc: Association, pdus: list[bytes]) -> None:
    sock = _socket(assoc)
    for pdu in pdus:
        sock.sendall(pdu)


def _cases(study: str, series: str) -> Iterator[tuple[str, Case]]:
    """The generated cases: name and what it does on an established association."""

    def good(rng: random.Random) -> tuple[str, bytes]:
        uid = generate_uid()
        return uid, _encode(_dataset(uid, study=study, series=series))

    def flipped(assoc: Association, cid: int, rng: random.Random) -> None:
        uid, data = good(rng)
        pdus = [bytearray(p) for p in _pdus(cid, uid, data)]
        for _ in range(rng.randrange(1, 6)):
            pdu = rng.choice(pdus)
            pdu[rng.randrange(len(pdu))] ^= 1 << rng.randrange(8)
        _send(assoc, [bytes(p) for p in pdus])

    def truncated(assoc: Association, cid: int, rng: random.Random) -> None:
        uid, data = good(rng)
        pdus = _pdus(cid, uid, data)
        cut = rng.randrange(len(pdus))
        pdus[cut] = pdus[cut][: rng.randrange(1, len(pdus[cut]))]
        _send(assoc, pdus[: cut + 1])

    def wrong_length(assoc: Association, cid: int, rng: random.Random) -> None:
        uid, data = good(rng)
        pdus = _pdus(cid, uid, data)
        k = rng.randrange(len(pdus))
        length = rng.choice([0, 1, 5, len(pdus[k]) * 3, 0xFFFFFFFF, rng.randrange(1 << 32)])
        pdus[k] = pdus[k][:2] + struct.pack(">L", length) + pdus[k][6:]
        _send(assoc, pdus[: k + 1])

    def byte_by_byte(assoc: Association, cid: int, rng: random.Random) -> None:
        uid, data = good(rng)
        sock = _socket(assoc)
        for pdu in _pdus(cid, uid, data, max_pdu=512)[:2]:
            for byte in pdu:
                sock.sendall(bytes([byte]))

    def abort_mid_dataset(assoc: Association, cid: int, rng: random.Random) -> None:
        uid, data = good(rng)
        pdus = _pdus(cid, uid, data)
        _send(assoc, pdus[: max(2, len(pdus) // 2)])
        assoc.abort()

    def bad_element_length(assoc: Association, cid: int, rng: random.Random) -> None:
        uid, data = good(rng)
        broken = bytearray(data)
        offset = broken.find(b"\x08\x00\x60\x00")  # Modality: its 2-byte length
        broken[offset + 6 : offset + 8] = struct.pack("<H", rng.choice([0xFFFF, 0x7FFF, 999]))
        _send(assoc, _pdus(cid, uid, bytes(broken)))

    def nested(assoc: Association, cid: int, rng: random.Random) -> None:
        uid, data = good(rng)
        at = data.find(b"\x10\x00\x20\x00")  # PatientID: the sequence goes before it
        deep = data[:at] + _nested(rng.choice([50, 200, 1000, 5000])) + data[at:]
        _send(assoc, _pdus(cid, uid, deep, max_pdu=16384))

    def other_syntax(assoc: Association, cid: int, rng: random.Random) -> None:
        uid = generate_uid()
        data = _encode(_dataset(uid, study=study, series=series), implicit=True)
        _send(assoc, _pdus(cid, uid, data))

    def bad_uid(assoc: Association, cid: int, rng: random.Random) -> None:
        uid = rng.choice(["", "../../etc/passwd", "1.2.3\x00.4", "1.2.a", "1." * 40, "0..1",
                          "1.2.3/../4", "1.02.3"])  # fmt: skip
        which = rng.choice(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
        ds = _dataset(generate_uid(), study=study, series=series)
        setattr(ds, which, uid)
        if which == "SOPInstanceUID":
            data = _encode(ds)
            _send(assoc, _pdus(cid, uid or "1.2", data))
        else:
            _send(assoc, _pdus(cid, str(ds.SOPInstanceUID), _encode(ds)))

    def silent(assoc: Association, cid: int, rng: random.Random) -> None:
        pass  # slowloris: the association is left open without a word

    kinds: list[tuple[str, Case]] = [
        ("flip", flipped), ("truncate", truncated), ("length", wrong_length),
        ("bytewise", byte_by_byte), ("abort", abort_mid_dataset), ("vr-length", bad_element_length),
        ("nested", nested), ("syntax", other_syntax), ("uid", bad_uid), ("silent", silent),
    ]  # fmt: skip
    rng = random.Random(20261130)
    for n in range(CASES):
        name, case = kinds[n % len(kinds)] if n < len(kinds) else rng.choice(kinds)
        yield f"{n}-{name}", case


@pytest.fixture(params=[True, False], ids=["fast-transport", "pynetdicom-transport"])
def node(
    request: pytest.FixtureRequest, tmp_path: Path, destination: StoreSCP
) -> Iterator[NodeProcess]:
    config = ct_node_config(tmp_path / "data", destination)
    config["node"].update(
        network_timeout_seconds=NETWORK_TIMEOUT, acse_timeout_seconds=NETWORK_TIMEOUT,
        fast_transport=request.param,
    )  # fmt: skip
    with NodeProcess(tmp_path / "node", config) as process:
        yield process


def test_generated_hostile_input_leaves_the_node_serving(
    node: NodeProcess, destination: StoreSCP, tmp_path: Path
) -> None:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CT_IMAGE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    study, series = generate_uid(), generate_uid()
    acknowledged = []
    rng = random.Random(7)
    for name, case in _cases(study, series):
        attacker = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE_TITLE)
        assert attacker.is_established, name
        context = next(c for c in attacker.accepted_contexts if c.abstract_syntax == CT_IMAGE)
        case(attacker, int(context.context_id or 1), rng)
        # The node answers others at once, whatever this association is doing.
        good = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE_TITLE)
        assert good.is_established, name
        start = time.monotonic()
        assert good.send_c_echo().Status == 0, name
        assert time.monotonic() - start < 1.0, name
        uid = generate_uid()
        status = good.send_c_store(_dataset(uid, study=study, series=series))
        assert status.Status == 0, name
        acknowledged.append(uid)
        good.release()
        if attacker.is_established:
            attacker.abort()

    # A real study goes through end to end; nothing acknowledged is missing.
    folder = make_phantom_series(tmp_path / "ct", "FUZZSTUDY")
    sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", folder)
    assert sent.returncode == 0, sent.stderr
    jobs = wait_for(
        lambda: [j for j in node.jobs() if j.state == JobStateValues.DELIVERED] or None,
        180, "the study delivered",
    )  # fmt: skip
    assert len(jobs) == 1
    spooled = {p.name.split("_")[0] for p in (node.data_dir / "spool").rglob("*.dcm")}
    assert set(acknowledged) <= spooled
    assert {str(dcmread(p).SOPInstanceUID) for p in folder.glob("*.dcm")} <= spooled
    assert not list((node.data_dir / "spool" / ".incoming").iterdir())
    assert node.process is not None
    assert node.process.poll() is None  # still the same node
    if node.config["node"]["fast_transport"]:
        # A message pynetdicom's decoder chokes on ends its association in one log line.
        assert "Exception in thread" not in node.log()
