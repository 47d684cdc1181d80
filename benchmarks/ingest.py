"""Ingest throughput of one CT series into storescp, Orthanc and pacsnode: plain, TLS, concurrent.

Usage::

    python benchmarks/ingest.py [--slices 300] [--size 512] [--repeat 3]
        [--only plain,tls,concurrent] [--associations 4]

The series (int16, Explicit VR Little Endian, one file per slice) is generated once and
sent by dcmtk's ``storescu`` to each receiver in turn, in three cases:

``plain``
    ``storescu +sd`` over one association to dcmtk ``storescp`` writing every instance
    to disk, Orthanc (storage uncompressed, its default fsync per file), and
    ``pacsnode run`` (its SCP: fsync + rename + state DB record per instance).
``tls``
    The same over DICOM TLS with client certificates on both sides (mutual TLS):
    ``storescu +tls`` to ``storescp +tls`` and to pacsnode configured with ``node.tls``
    (``require_client_certificate: true``). A CA and the certificates it signs are made
    with ``tests/certificates.py``; dcmtk gets them as in ``tests/integration/test_tls.py``
    (``+tls key certificate +cf ca``, its default BCP 195 profile).
``concurrent``
    ``--associations`` (4) storescu processes started at once, each sending its own
    contiguous part of the one series (a quarter each with 4) over its own association,
    timed from the first start to the last exit, to ``storescp --fork`` (a child process
    per association; without it storescp serves associations one after another),
    Orthanc (its default 4 DICOM threads) and pacsnode.

Each measurement runs against a fresh receiver with empty storage (Orthanc would
otherwise skip instances it already holds), and checks that every instance arrived.
Each receiver is measured ``--repeat`` times per case and the best run is reported,
with pacsnode's throughput relative to each receiver in the same case. Every dcmtk and
Orthanc process runs with ``TCP_NODELAY=1``.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.certificates import Issued, make_ca
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
# pacsnode counts as settled after two windows in a row below this much CPU: its worker
# imports on a whole core; idle, the node, Redis and the worker use about a tenth of one
# (the broker probe's pings, the accept and event loops).
SETTLE_WINDOW_SECONDS = 0.5
SETTLE_MAX_CPU_FRACTION = 0.25
CASES = ("plain", "tls", "concurrent")
TOOLS = ("storescp", "orthanc", "pacsnode")


class ReceiverUnavailableError(RuntimeError):
    """A receiver could not be started; the benchmark reports it and goes on."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for mutual TLS: the CA, the receiver's identity and the sender's."""

    ca: Issued
    receiver: Issued
    sender: Issued

    @classmethod
    def make(cls, folder: Path) -> TlsFiles:
        """Make a CA and a receiver and a sender certificate it signs, under `folder`."""
        ca = make_ca("bench-ca", folder)
        return cls(ca, ca.issue("receiver", folder), ca.issue("sender", folder))

    def dcmtk_args(self, party: Issued) -> list[str]:
        """dcmtk's options for TLS as `party`, trusting the CA (peer certificate required)."""
        return [
            "+tls",
            str(party.private_key),
            str(party.certificate),
            "+cf",
            str(self.ca.certificate),
        ]


@dataclass(frozen=True)
class Receiver:
    """A running receiver: where to send, how, and how many instances it holds."""

    host: str
    port: int
    ae_title: str
    count: Callable[[], int]
    storescu_args: tuple[str, ...] = ()
    """Further storescu options to reach it, e.g. for TLS."""


@dataclass(frozen=True)
class Case:
    """One way of sending the series, and the receivers measured that way."""

    name: str
    description: str
    receivers: Mapping[str, Callable[[], AbstractContextManager[Receiver]]]
    parts: Sequence[Path | Sequence[Path]]
    """What each storescu sends, all started at once: a folder or a list of files."""


@dataclass(frozen=True)
class Result:
    """The best of several runs for one tool in one case."""

    case: str
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
        The written files, in InstanceNumber order.
    """
    rng = np.random.default_rng(20240601)
    hu = rng.integers(-1024, 3000, size=(slices, size, size), dtype=np.int16)
    return write_ct_series(hu, out_dir, spacing_mm=(1.0, 0.7, 0.7))


def split_series(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """`files` in `parts` contiguous runs of (nearly) equal length, none empty.

    Raises
    ------
    ValueError
        If `parts` is below 1 or above the number of files.
    """
    if not 1 <= parts <= len(files):
        raise ValueError(f"parts must be between 1 and {len(files)}. Found {parts}.")
    bounds = [len(files) * i // parts for i in range(parts + 1)]
    return [list(files[bounds[i] : bounds[i + 1]]) for i in range(parts)]


@contextmanager
def storescp_receiver(tls: TlsFiles | None = None, fork: bool = False) -> Iterator[Receiver]:
    """Run dcmtk storescp, writing to a temporary folder.

    Parameters
    ----------
    tls
        Listen with TLS (``+tls``), requiring a certificate the CA signed; None: plain.
    fork
        Serve each association in a child process (``--fork``), several at once.
    """
    extra_args = [*(tls.dcmtk_args(tls.receiver) if tls else []), *(["--fork"] if fork else [])]
    with StoreSCP("STORESCP", extra_args=extra_args) as scp:
        yield Receiver(
            "127.0.0.1",
            scp.port,
            scp.ae_title,
            lambda: len(scp.received()),
            tuple(tls.dcmtk_args(tls.sender)) if tls else (),
        )


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
def pacsnode_receiver(settle: bool = True, tls: TlsFiles | None = None) -> Iterator[Receiver]:
    """Run ``pacsnode run`` with a generated config.yaml and an empty data folder.

    Parameters
    ----------
    settle
        Wait until pacsnode and its children are idle (its worker has started) before
        handing it out; otherwise as soon as it listens.
    tls
        Serve DICOM over TLS (``node.tls``), requiring a client certificate the CA
        signed; None: plain DICOM.

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
        tls_config = (
            "  tls:\n"
            f"    certificate: {tls.receiver.certificate}\n"
            f"    private_key: {tls.receiver.private_key}\n"
            f"    ca_certificates: {tls.ca.certificate}\n"
            "    require_client_certificate: true\n"
            if tls
            else ""
        )
        config_path.write_text(
            "node:\n"
            "  ae_title: PACSNODE\n"
            f"  port: {port}\n"
            f"  data_dir: {data_dir}\n"
            f"{tls_config}"
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
            yield Receiver(
                "127.0.0.1",
                port,
                "PACSNODE",
                lambda: _spooled_files(data_dir),
                tuple(tls.dcmtk_args(tls.sender)) if tls else (),
            )
        finally:
            _stop_pacsnode(process)


def _stop_all(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def send_once(parts: Sequence[Path | Sequence[Path]], receiver: Receiver, expected: int) -> float:
    """Start one storescu per part at once; return the seconds from the first start to
    the last exit.

    Parameters
    ----------
    parts
        What each storescu sends over its own association: a folder (``+sd +r``) or a
        list of files.
    receiver
        Where to send.
    expected
        Instances the receiver must hold afterwards.

    Raises
    ------
    RuntimeError
        If a storescu fails or runs too long, or not every instance arrived.
    """
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp, contextlib.ExitStack() as stack:
        commands: list[list[str]] = []
        logs: list[Path] = []
        for i, part in enumerate(parts):
            config_dir = Path(tmp) / f"sender-{i}"
            config_dir.mkdir()
            commands.append(
                build_storescu_command(
                    receiver.host,
                    receiver.port,
                    receiver.ae_title,
                    CALLING_AE,
                    part,
                    config_dir=config_dir,
                    extra_args=receiver.storescu_args,
                )
            )
            logs.append(config_dir / "storescu.log")
        outputs = [stack.enter_context(log.open("wb")) for log in logs]
        env = dcmtk_env()
        processes: list[subprocess.Popen[bytes]] = []
        stack.callback(_stop_all, processes)
        start = time.perf_counter()
        for command, output in zip(commands, outputs, strict=True):
            processes.append(
                subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
            )
        try:
            for process in processes:
                process.wait(
                    timeout=max(0.0, start + STORESCU_TIMEOUT_SECONDS - time.perf_counter())
                )
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"storescu ran past {STORESCU_TIMEOUT_SECONDS:g} s") from e
        seconds = time.perf_counter() - start
        for process, log in zip(processes, logs, strict=True):
            if process.returncode != 0:
                raise RuntimeError(
                    f"storescu exited with status {process.returncode}: "
                    f"{log.read_text(errors='replace').strip()[-500:]}"
                )
    try:
        wait_for(lambda: receiver.count() >= expected, 10.0, f"{expected} stored instances")
    except TimeoutError as e:
        raise RuntimeError(f"only {receiver.count()} of {expected} instances arrived") from e
    return seconds


def measure(
    case: Case,
    tool: str,
    expected: int,
    repeat: int,
) -> Result:
    """Best of `repeat` runs of `case` for `tool`, each against a freshly started receiver."""
    best: float | None = None
    for run in range(1, repeat + 1):
        try:
            with case.receivers[tool]() as receiver:
                seconds = send_once(case.parts, receiver, expected)
        except ReceiverUnavailableError as e:
            return Result(case.name, tool, None, expected, f"not available ({e})")
        except RuntimeError as e:
            return Result(case.name, tool, None, expected, f"failed ({e})")
        logger.info(
            "%s %s run %d/%d: %.3f s, %.1f images/s",
            case.name,
            tool,
            run,
            repeat,
            seconds,
            expected / seconds,
        )
        best = seconds if best is None else min(best, seconds)
    return Result(case.name, tool, best, expected)


def format_table(results: list[Result], cases: Sequence[Case], title: str) -> str:
    """The results as a text table, with pacsnode's throughput relative to each tool in
    the same case, and a legend of the cases."""
    lines = [
        title,
        f"{'case':<11} {'tool':<10} {'seconds':>9} {'images/s':>10} {'pacsnode vs tool':>17}",
    ]
    for case in cases:
        in_case = [r for r in results if r.case == case.name]
        pacsnode = next((r for r in in_case if r.tool == "pacsnode"), None)
        pacsnode_rate = pacsnode.images_per_second if pacsnode else None
        for r in in_case:
            rate = r.images_per_second
            if r.seconds is None or rate is None:
                lines.append(f"{r.case:<11} {r.tool}: {r.note}")
                continue
            ratio = f"{pacsnode_rate / rate:.2f}x" if pacsnode_rate is not None else "-"
            lines.append(f"{r.case:<11} {r.tool:<10} {r.seconds:>9.3f} {rate:>10.1f} {ratio:>17}")
    lines.append(
        "pacsnode vs tool: pacsnode's images/s divided by the tool's in the same case "
        "(above 1: pacsnode is faster)."
    )
    lines.extend(f"{case.name}: {case.description}" for case in cases)
    return "\n".join(lines) + "\n"


def build_cases(
    names: Sequence[str],
    series_dir: Path,
    files: Sequence[Path],
    *,
    tls: TlsFiles | None,
    associations: int,
    settle: bool,
) -> list[Case]:
    """The cases called `names`, in the order of :data:`CASES`.

    Raises
    ------
    ValueError
        If ``tls`` is among `names` but `tls` is None, or `associations` does not fit
        the series.
    """
    cases: list[Case] = []
    if "plain" in names:
        cases.append(
            Case(
                "plain",
                "storescu +sd over one association",
                {
                    "storescp": storescp_receiver,
                    "orthanc": orthanc_receiver,
                    "pacsnode": functools.partial(pacsnode_receiver, settle=settle),
                },
                [series_dir],
            )
        )
    if "tls" in names:
        if tls is None:
            raise ValueError("tls must be given for the tls case.")
        cases.append(
            Case(
                "tls",
                "storescu +sd +tls over one association, mutual TLS (storescp +tls, "
                "pacsnode node.tls; Orthanc not measured)",
                {
                    "storescp": functools.partial(storescp_receiver, tls=tls),
                    "pacsnode": functools.partial(pacsnode_receiver, settle=settle, tls=tls),
                },
                [series_dir],
            )
        )
    if "concurrent" in names:
        cases.append(
            Case(
                "concurrent",
                f"{associations} storescu at once, each its own contiguous part of the series "
                "over its own association, first start to last exit (storescp --fork)",
                {
                    "storescp": functools.partial(storescp_receiver, fork=True),
                    "orthanc": orthanc_receiver,
                    "pacsnode": functools.partial(pacsnode_receiver, settle=settle),
                },
                split_series(files, associations),
            )
        )
    return cases


def _names(
    value: str, known: Sequence[str], flag: str, parser: argparse.ArgumentParser
) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        parser.error(f"{flag} must name some of {', '.join(known)}. Found {unknown or value!r}.")
    return names


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the table to stdout.

    Parameters
    ----------
    argv
        Command line arguments; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        The exit status: 0, or 1 if storescp or Orthanc could not be measured in a case.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=300, help="slices (files) in the series")
    parser.add_argument("--size", type=int, default=512, help="rows and columns per slice")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool; the best counts")
    parser.add_argument(
        "--tools",
        default=",".join(TOOLS),
        help="comma-separated subset of storescp, orthanc, pacsnode (Orthanc is not "
        "measured over TLS)",
    )
    parser.add_argument(
        "--only",
        default=",".join(CASES),
        help="comma-separated subset of the cases plain, tls, concurrent (default: all)",
    )
    parser.add_argument(
        "--associations",
        type=int,
        default=4,
        help="storescu processes (associations) at once in the concurrent case",
    )
    parser.add_argument(
        "--no-settle",
        action="store_true",
        help="send to pacsnode as soon as it listens, while its worker may still be starting",
    )
    args = parser.parse_args(argv)
    tools = _names(args.tools, TOOLS, "--tools", parser)
    case_names = _names(args.only, CASES, "--only", parser)
    if not 1 <= args.associations <= args.slices:
        parser.error(f"--associations must be between 1 and --slices. Found {args.associations}.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

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
        tls = TlsFiles.make(Path(tmp) / "certificates") if "tls" in case_names else None
        cases = build_cases(
            case_names,
            series_dir,
            files,
            tls=tls,
            associations=args.associations,
            settle=not args.no_settle,
        )
        results = [
            measure(case, tool, len(files), args.repeat)
            for case in cases
            for tool in tools
            if tool in case.receivers
        ]

    title = (
        f"{len(files)} CT images of {args.size}x{args.size} int16 ({megabytes:.1f} MiB), "
        f"best of {args.repeat} runs"
    )
    sys.stdout.write(format_table(results, cases, title))
    failed = [r for r in results if r.seconds is None and r.tool != "pacsnode"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
