"""The fast acceptor decodes requests exactly as pynetdicom does.

``node/transport.py`` decodes P-DATA-TF PDUs without copying and reads plain C-STORE
command sets without pydicom. Here the PDUs that real senders send — dcmtk's storescu
and echoscu, Orthanc and pynetdicom — are captured as received (a pynetdicom SCP
keeping every PDU), both whole (the SCP takes any PDU size) and fragmented (it takes
4 KiB PDUs); each association's PDUs then go through pynetdicom's decoding and through
the fast acceptor's, and every request must come out the same: its type, every command
field and the data set's bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA

from node.transport import _Association
from tests.integration.conftest import make_phantom_series
from tests.peers import Orthanc, free_port, run_storescu, wait_for
from tests.peers import dcmtk_env as _dcmtk_env

VERIFICATION = "1.2.840.10008.1.1"
P_DATA_TF = 0x04
#: Command fields compared (every one a C-STORE-RQ or C-ECHO-RQ may carry).
FIELDS = (
    "MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
    "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID",
)  # fmt: skip


class CaptureSCP:
    """A plain pynetdicom SCP that keeps every PDU each association received."""

    def __init__(self, max_pdu: int) -> None:
        self.ae = AE(ae_title="CAPTURE")
        self.ae.maximum_pdu_size = max_pdu
        self.ae.add_supported_context(VERIFICATION)
        for context in StoragePresentationContexts:
            assert context.abstract_syntax is not None
            self.ae.add_supported_context(context.abstract_syntax)
        self.port = free_port()
        #: Association (kept, so that no other takes its id) -> its PDUs.
        self.pdus: dict[Association, list[bytes]] = {}
        self._lock = threading.Lock()
        handlers: list[Any] = [
            (evt.EVT_DATA_RECV, self._keep),
            (evt.EVT_C_STORE, lambda event: 0x0000),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
        ]
        server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        assert server is not None  # always returned when block=False
        self.server = server

    def _keep(self, event: evt.Event) -> None:  # EVT_DATA_RECV: one whole PDU
        with self._lock:
            self.pdus.setdefault(event.assoc, []).append(bytes(event.data))

    def streams(self) -> list[list[bytes]]:
        with self._lock:
            return [list(pdus) for pdus in self.pdus.values()]

    def close(self) -> None:
        self.server.shutdown()


def _requests(pdus: list[bytes], fast: bool) -> list[dict[str, Any]]:
    """The requests one association's PDUs decode to, by pynetdicom's acceptor or by the
    fast one."""
    ae = AE(ae_title="DECODER")
    assoc: Association = _Association(ae, MODE_ACCEPTOR) if fast else Association(ae, MODE_ACCEPTOR)
    found = []
    for raw in pdus:
        if raw[0] != P_DATA_TF:
            continue
        pdu, event = assoc.dul._decode_pdu(bytearray(raw))
        assert event == "Evt10"
        primitive = pdu.to_primitive()
        assert isinstance(primitive, P_DATA)
        assoc.dimse.receive_primitive(primitive)
        while True:
            context_id, request = assoc.dimse.get_msg(block=False)
            if request is None:
                break
            fields = {name: getattr(request, name, None) for name in FIELDS}
            dataset = request.DataSet if isinstance(request, C_STORE) else None
            data = dataset.getvalue() if dataset is not None else None
            found.append({"type": type(request).__name__, "context": context_id, **fields,
                          "data": data})  # fmt: skip
    return found


@pytest.fixture(params=[0, 4096], ids=["whole", "fragmented"])
def capture(request: pytest.FixtureRequest) -> Iterator[CaptureSCP]:
    scp = CaptureSCP(request.param)
    try:
        yield scp
    finally:
        scp.close()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = make_phantom_series(tmp_path_factory.mktemp("decoding"), "DECODE1")
    return sorted(folder.glob("*.dcm"))[:4]


def test_requests_from_real_senders_decode_as_pynetdicom_decodes_them(
    capture: CaptureSCP, series: list[Path]
) -> None:
    import subprocess

    from pydicom import dcmread

    sent = run_storescu("127.0.0.1", capture.port, "CAPTURE", "STORESCU", series)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    echo = subprocess.run(
        ["/usr/bin/echoscu", "-aet", "ECHOSCU", "-aec", "CAPTURE", "127.0.0.1", str(capture.port)],
        env=_dcmtk_env(), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert echo.returncode == 0, echo.stderr

    sender = AE(ae_title="PYNETDICOM")
    sender.add_requested_context(VERIFICATION)
    datasets = [dcmread(path) for path in series]
    for ds in datasets[:1]:
        sender.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = sender.associate("127.0.0.1", capture.port, ae_title="CAPTURE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    for ds in datasets:
        assert assoc.send_c_store(ds, msg_id=7).Status == 0
    assoc.release()

    with Orthanc(modalities={"capture": ("CAPTURE", "127.0.0.1", capture.port)}) as orthanc:
        ids = [orthanc.upload(path)["ID"] for path in series]
        answer = orthanc.send_to_modality("capture", ids)
        assert answer.get("FailedInstancesCount", 0) == 0, answer

    wait_for(lambda: len(capture.streams()) >= 4, 30, "four captured associations")
    stores = echoes = 0
    for pdus in capture.streams():
        reference = _requests(pdus, fast=False)
        assert _requests(pdus, fast=True) == reference
        stores += sum(r["type"] == C_STORE.__name__ for r in reference)
        echoes += sum(r["type"] == C_ECHO.__name__ for r in reference)
    assert stores == 3 * len(series)  # storescu, pynetdicom and Orthanc each sent them all
    assert echoes >= 2  # echoscu and pynetdicom (Orthanc may echo first, too)
    if capture.ae.maximum_pdu_size:
        # Fragmented: every data set came in several PDUs.
        assert all(
            sum(p[0] == P_DATA_TF for p in pdus) > 2 for pdus in capture.streams() if len(pdus) > 4
        )
