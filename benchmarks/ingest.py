"""Ingest throughput: one CT series over one association into storescp, Orthanc, pacsnode.

Usage::

    python benchmarks/ingest.py [--slices 300] [--size 512] [--repeat 3]

The series (int16, Explicit VR Little Endian, one file per slice) is generated once.
dcmtk's ``storescu +sd`` sends it over one association to each receiver in turn:

- dcmtk ``storescp`` writing every instance to disk,
- Orthanc (storage uncompressed, its default fsync per file),
- ``pacsnode run`` (its SCP: fsync + rename + state DB record per instance).

Each measurement runs from storescu's start to its exit, against a fresh receiver with
empty storage (Orthanc would otherwise skip instances it already holds), and checks that
every instance arrived. Each receiver is measured ``--repeat`` times and the best run is
reported. Every dcmtk and Orthanc process runs with ``TCP_NODELAY=1``.

pacsnode opens its port while its embedded Celery worker is still importing (a few
seconds of both cores here), so the series is sent once the whole pacsnode process group
has been idle for a second, as when a study arrives at a running node; ``--no-settle``
sends as soon as the port opens.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.dicom_factory import write_ct_series
from tests.peers import (
    Orthanc,
    StoreSCP,
    build_storescu_command,
    dcmtk_env,
    free_port,
    wait_for,
    wait_for_port,
)

logger = logging.getLogger("benchmarks.ingest")

CALLING_AE = "SCANNER"
STORESCU_TIMEOUT_SECONDS = 600.0
PACSNODE_START_SECONDS = 120.0
PACSNODE_STOP_SECONDS = 30.0
PACSNODE_SETTLE_SECONDS = 120.0
# pacsnode counts as settled after two windows in a row below this much CPU.
SETTLE_WINDOW_SECONDS = 0.5
SETTLE_MAX_CPU_FRACTION = 0.05


class ReceiverUnavailableError(RuntimeError):
    """A receiver could not be started; the benchmark reports it and goes on."""


@dataclass(frozen=True)
class Receiver:
    """A running receiver: where to send, and how many instances it holds."""

    host: str
    port: int
    ae_title: str
    count: Callable[[], int]


@dataclass(frozen=True)
class Result:
    """The best of several runs for one tool."""

    tool: str
    seconds: float | None
    images: int
    note: str = ""

    @property
    def images_per_second(self) -> float | None:
        """Throughput of the best run, or None if the tool was not measured."""
        return None if self.seconds is None else self.images / self.seconds


def generate_series(out_dir: Path, slices: int, size: int) -> list[Path]:
    """Write a `slices` x `size` x `size` int16 CT series, uncompressed.

    Parameters
    ----------
    out_dir
        Folder for the files.
    slices
        Number of slices (files).
    size
        Rows and columns per slice.

    Returns
    -------
    list[Path]
        The written files.
    """
    rng = np.random.default_rng(20240601)
    hu = rng.integers(-1024, 3000, size=(slices, size, size), dtype=np.int16)
    return write_ct_series(hu, out_dir, spacing_mm=(1.0, 0.7, 0.7))


@contextmanager
def storescp_receiver() -> Iterator[Receiver]:
    """Run dcmtk storescp, writing to a temporary folder."""
    with StoreSCP("STORESCP") as scp:
        yield Receiver("127.0.0.1", scp.port, scp.ae_title, lambda: len(scp.received()))


@contextmanager
def orthanc_receiver() -> Iterator[Receiver]:
    """Run Orthanc with empty, temporary storage."""
    with Orthanc("ORTHANC") as orthanc:
        yield Receiver(
            "127.0.0.1", orthanc.dicom_port, orthanc.aet, lambda: len(orthanc.instances())
        )


def _pacsnode_command(config_path: Path) -> list[str]:
    """``pacsnode run`` from this interpreter's environment, else ``python -m node.cli``."""
    script = Path(sys.executable).parent / "pacsnode"
    if script.exists():
        return [str(script), "run", "--config", str(config_path)]
    return [sys.executable, "-m", "node.cli", "run", "--config", str(config_path)]


def _spooled_files(data_dir: Path) -> int:
    """Instances pacsnode stored: ``*.dcm`` under ``data_dir/spool``, not in dot folders."""
    spool = data_dir / "spool"
    if not spool.is_dir():
        return 0
    return sum(
        1
        for path in spool.rglob("*.dcm")
        if not any(part.startswith(".") for part in path.relative_to(spool).parts)
    )


def _last_lines(path: Path, n: int = 3) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def _stop_pacsnode(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM pacsnode; if it hangs, SIGKILL its process group (its broker and worker)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=PACSNODE_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            logger.warning("pacsnode ignored SIGTERM; killing its process group")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # children left behind, if any
    process.wait()


def _process_group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) used so far by the live processes of group `pgid`."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the parenthesised command name: state, ppid, pgrp, ... (proc(5)).
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process exited meanwhile
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_until_idle(pgid: int, timeout: float, what: str) -> float:
    """Wait until process group `pgid` is idle; returns the seconds waited.

    Idle means below ``SETTLE_MAX_CPU_FRACTION`` of one core for two
    ``SETTLE_WINDOW_SECONDS`` windows in a row.

    Raises
    ------
    TimeoutError
        If it is still busy after `timeout` seconds.
    """
    start = time.monotonic()
    quiet_windows = 0
    used = _process_group_cpu_seconds(pgid)
    while quiet_windows < 2:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"Timed out after {timeout:g} s waiting for {what} to be idle.")
        time.sleep(SETTLE_WINDOW_SECONDS)
        now = _process_group_cpu_seconds(pgid)
        busy = (now - used) / SETTLE_WINDOW_SECONDS > SETTLE_MAX_CPU_FRACTION
        quiet_windows = 0 if busy else quiet_windows + 1
        used = now
    return time.monotonic() - start


@contextmanager
def pacsnode_receiver(settle: bool = True) -> Iterator[Receiver]:
    """Run ``pacsnode run`` with a generated config.yaml and an empty data folder.

    Parameters
    ----------
    settle
        Wait until pacsnode and its children are idle (its worker has started) before
        handing it out; otherwise as soon as it listens.

    Raises
    ------
    ReceiverUnavailableError
        If pacsnode exits, does not listen within two minutes, or is still busy two
        minutes later.
    """
    with tempfile.TemporaryDirectory(prefix="pacsnode-bench-") as tmp:
        workdir = Path(tmp)
        data_dir = workdir / "data"
        port = free_port()
        config_path = workdir / "config.yaml"
        config_path.write_text(
            "node:\n"
            "  ae_title: PACSNODE\n"
            f"  port: {port}\n"
            f"  data_dir: {data_dir}\n"
            "peers: []\n"
            "accept_unknown_peers: true\n"
            "destinations: {}\n"
            "completion:\n"
            "  quiet_seconds: 10\n"
            "rules: []\n"
            "broker: embedded\n"
        )
        log_path = workdir / "pacsnode.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                _pacsnode_command(config_path),
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            try:
                wait_for_port(
                    port, timeout=PACSNODE_START_SECONDS, what="pacsnode", process=process
                )
                if settle:
                    waited = wait_until_idle(process.pid, PACSNODE_SETTLE_SECONDS, "pacsnode")
                    logger.info("pacsnode settled %.1f s after it started listening", waited)
            except (RuntimeError, TimeoutError) as e:
                raise ReceiverUnavailableError(f"{e} {_last_lines(log_path)}".strip()) from e
            yield Receiver("127.0.0.1", port, "PACSNODE", lambda: _spooled_files(data_dir))
        finally:
            _stop_pacsnode(process)


def send_once(series_dir: Path, receiver: Receiver, expected: int) -> float:
    """Send the series with one storescu run and return its wall time in seconds.

    Raises
    ------
    RuntimeError
        If storescu fails or not every instance arrived.
    """
    with tempfile.TemporaryDirectory(prefix="storescu-") as config_dir:
        command = build_storescu_command(
            receiver.host,
            receiver.port,
            receiver.ae_title,
            CALLING_AE,
            series_dir,
            config_dir=Path(config_dir),
        )
        start = time.perf_counter()
        result = subprocess.run(
            command,
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=STORESCU_TIMEOUT_SECONDS,
            check=False,
        )
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f"storescu exited with status {result.returncode}: {result.stderr.strip()[-500:]}"
        )
    try:
        wait_for(lambda: receiver.count() >= expected, 10.0, f"{expected} stored instances")
    except TimeoutError as e:
        raise RuntimeError(f"only {receiver.count()} of {expected} instances arrived") from e
    return seconds


def measure(
    tool: str,
    start_receiver: Callable[[], AbstractContextManager[Receiver]],
    series_dir: Path,
    expected: int,
    repeat: int,
) -> Result:
    """Best of `repeat` runs, each against a freshly started receiver."""
    best: float | None = None
    for run in range(1, repeat + 1):
        try:
            with start_receiver() as receiver:
                seconds = send_once(series_dir, receiver, expected)
        except ReceiverUnavailableError as e:
            return Result(tool, None, expected, f"not available ({e})")
        except RuntimeError as e:
            return Result(tool, None, expected, f"failed ({e})")
        logger.info(
            "%s run %d/%d: %.3f s, %.1f images/s", tool, run, repeat, seconds, expected / seconds
        )
        best = seconds if best is None else min(best, seconds)
    return Result(tool, best, expected)


def format_table(results: list[Result], title: str) -> str:
    """The results as a text table, with pacsnode's throughput relative to each tool."""
    pacsnode = next((r for r in results if r.tool == "pacsnode"), None)
    pacsnode_rate = pacsnode.images_per_second if pacsnode else None
    lines = [
        title,
        f"{'tool':<10} {'seconds':>9} {'images/s':>10} {'pacsnode vs tool':>17}",
    ]
    for r in results:
        rate = r.images_per_second
        if r.seconds is None or rate is None:
            lines.append(f"{r.tool}: {r.note}")
            continue
        ratio = f"{pacsnode_rate / rate:.2f}x" if pacsnode_rate is not None else "-"
        lines.append(f"{r.tool:<10} {r.seconds:>9.3f} {rate:>10.1f} {ratio:>17}")
    lines.append(
        "pacsnode vs tool: pacsnode's images/s divided by the tool's (above 1: pacsnode is faster)."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the table to stdout.

    Parameters
    ----------
    argv
        Command line arguments; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        The exit status: 0, or 1 if storescp or Orthanc could not be measured.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=300, help="slices (files) in the series")
    parser.add_argument("--size", type=int, default=512, help="rows and columns per slice")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool; the best counts")
    parser.add_argument(
        "--tools",
        default="storescp,orthanc,pacsnode",
        help="comma-separated subset of storescp, orthanc, pacsnode",
    )
    parser.add_argument(
        "--no-settle",
        action="store_true",
        help="send to pacsnode as soon as it listens, while its worker may still be starting",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    receivers: dict[str, Callable[[], AbstractContextManager[Receiver]]] = {
        "storescp": storescp_receiver,
        "orthanc": orthanc_receiver,
        "pacsnode": functools.partial(pacsnode_receiver, settle=not args.no_settle),
    }
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(tools) - set(receivers))
    if unknown:
        parser.error(f"--tools must name storescp, orthanc or pacsnode. Found {unknown}.")

    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        series_dir = Path(tmp) / "series"
        start = time.perf_counter()
        files = generate_series(series_dir, args.slices, args.size)
        megabytes = sum(p.stat().st_size for p in files) / 2**20
        logger.info(
            "Generated %d files (%.1f MiB) in %.1f s",
            len(files),
            megabytes,
            time.perf_counter() - start,
        )
        results = [
            measure(tool, receivers[tool], series_dir, len(files), args.repeat) for tool in tools
        ]

    title = (
        f"{len(files)} CT images of {args.size}x{args.size} int16 ({megabytes:.1f} MiB), "
        f"storescu over one association, best of {args.repeat} runs"
    )
    sys.stdout.write(format_table(results, title))
    failed = [r for r in results if r.seconds is None and r.tool != "pacsnode"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
