"""Hostile and broken traffic on the SCP, against both acceptors (pacsnode's fast one and
pynetdicom's own, ``node.fast_transport``): each bad association ends on its own, the
node's memory stays bounded, and the node goes on serving C-ECHO and C-STORE. Every
case is bounded in count and time, on loopback."""

from __future__ import annotations

import random
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association

from tests.integration.conftest import make_phantom_series
from tests.node_process import NODE_AE_TITLE, NodeProcess, node_config, rss_kib
from tests.peers import dcmtk_env, run_storescu, wait_for

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
NETWORK_TIMEOUT = 2.0


def _associate(node: NodeProcess, calling: str = "SCANNER") -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CT_IMAGE)
    ae.acse_timeout = 10
    return ae.associate("127.0.0.1", node.port, ae_title=NODE_AE_TITLE)


def _send_raw(assoc: Association, data: bytes) -> None:
    """Bytes straight onto an established association's connection."""
    assert assoc.is_established
    assoc.dul.socket.socket.sendall(data)  # type: ignore[union-attr]


def _echo(node: NodeProcess) -> None:
    echo = subprocess.run(
        ["/usr/bin/echoscu", "-aet", "SCANNER", "-aec", NODE_AE_TITLE, "127.0.0.1", str(node.port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert echo.returncode == 0, echo.stdout + echo.stderr


@pytest.fixture(params=[True, False], ids=["fast-transport", "pynetdicom-transport"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NodeProcess]:
    config = node_config(
        tmp_path / "data", port=0,
        peers=[{"ae_title": "SCANNER", "host": "127.0.0.1"},
               {"ae_title": "LIMITED", "host": "127.0.0.1", "max_associations": 1}],
    )  # fmt: skip
    del config["node"]["port"]
    config["node"].update(network_timeout_seconds=NETWORK_TIMEOUT, fast_transport=request.param)
    with NodeProcess(tmp_path, config) as process:
        yield process


def test_broken_and_hostile_pdus_end_their_association_only(
    node: NodeProcess, tmp_path: Path
) -> None:
    assert node.process is not None
    pid = node.process.pid
    _echo(node)
    before = rss_kib(pid)

    # A P-DATA-TF header claiming 1 GB, then silence: nothing near 1 GB is allocated,
    # and the connection closes once the network timeout passes.
    liar = _associate(node)
    _send_raw(liar, struct.pack(">BBL", 0x04, 0, 1_000_000_000) + b"\0" * 64)
    start = time.monotonic()
    wait_for(lambda: not liar.is_established, 5 * NETWORK_TIMEOUT, "the liar's association to end")
    assert time.monotonic() - start < 4 * NETWORK_TIMEOUT
    assert rss_kib(pid) - before < 64 * 1024, "the node allocated what the header claimed"

    # An association that says nothing is ended by the network timeout.
    idle = _associate(node)
    wait_for(lambda: not idle.is_established, 5 * NETWORK_TIMEOUT, "the idle association to end")

    # Unknown PDU types, P-DATA items whose lengths do not add up, and random bytes in
    # PDUs of the right length: each association ends, the node serves on.
    rng = random.Random(20261130)
    cases = [struct.pack(">BBL", 0x09, 0, 4) + b"junk"]
    cases.append(struct.pack(">BBLL", 0x04, 0, 8, 0xFFFFFF00) + b"\x01\x03\0\0")
    for _ in range(20):
        body = rng.randbytes(rng.randrange(0, 300))
        cases.append(struct.pack(">BBL", rng.choice([1, 2, 3, 4, 5, 6, 7]), 0, len(body)) + body)
    for case in cases:
        assoc = _associate(node)
        _send_raw(assoc, case)
        wait_for(
            lambda a=assoc: not a.is_established or a.is_aborted,  # type: ignore[misc]
            5 * NETWORK_TIMEOUT,
            f"the association to end after {case[:16].hex()}",
        )
        if assoc.is_established:
            assoc.abort()
    assert rss_kib(pid) - before < 64 * 1024

    # The node still receives a study.
    _echo(node)
    series = make_phantom_series(tmp_path / "ct", "HOSTILE1")
    sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", series)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert len(list((node.data_dir / "spool").glob("*/*/*.dcm"))) == len(list(series.glob("*.dcm")))


def test_a_peer_beyond_its_max_associations_is_rejected_and_others_are_not(
    node: NodeProcess,
) -> None:
    first = _associate(node, "LIMITED")
    assert first.is_established
    second = _associate(node, "LIMITED")
    assert second.is_rejected
    other = _associate(node, "SCANNER")  # another peer is not limited by LIMITED's count
    assert other.is_established
    assert (
        "rejected association from LIMITED at 127.0.0.1: more than its max_associations (1)"
        in node.log()
    )
    first.release()
    other.release()
    wait_for(lambda: _associate(node, "LIMITED").is_established, 10, "LIMITED accepted again")
