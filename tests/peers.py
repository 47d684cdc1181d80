"""Real DICOM peers for integration tests and benchmarks.

dcmtk's ``storescp``/``storescu`` play the scanner and a plain PACS, Orthanc a full PACS
and dicom3tools' ``dciodvfy`` the validator (DESIGN.md, "Tests against real peers").
Every peer listens on a free loopback port and is stopped in teardown.

dcmtk 3.6.7 and Orthanc stall about 44 ms per C-STORE on loopback (Nagle's algorithm)
unless ``TCP_NODELAY=1`` is in their environment; every process started here gets it.
dcmtk is always called by its full path: the virtualenv's ``bin`` holds pynetdicom's
scripts of the same names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import pydicom
import requests
from pydicom.errors import InvalidDicomError

__all__ = [
    "DCIODVFY",
    "ORTHANC",
    "STORESCP",
    "STORESCU",
    "Orthanc",
    "StoreSCP",
    "acknowledged_files",
    "build_storescu_command",
    "dciodvfy_errors",
    "dcmtk_env",
    "free_port",
    "run_storescu",
    "wait_for",
    "wait_for_port",
]

logger = logging.getLogger(__name__)

STORESCP = "/usr/bin/storescp"
STORESCU = "/usr/bin/storescu"
ORTHANC = "/usr/sbin/Orthanc"
DCIODVFY = "/usr/bin/dciodvfy"

LOCALHOST = "127.0.0.1"
_POLL_SECONDS = 0.05
_STOP_SECONDS = 10.0

# Explicit VR Little Endian and Implicit VR Little Endian: every SCP accepts these.
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
_UNCOMPRESSED_ALL = (*_UNCOMPRESSED, "1.2.840.10008.1.2.2")
# An association holds at most 128 presentation contexts (IDs 1..255, odd).
_MAX_PRESENTATION_CONTEXTS = 128

T = TypeVar("T")


def dcmtk_env() -> dict[str, str]:
    """Return the environment for a dcmtk or Orthanc child process.

    Returns
    -------
    dict[str, str]
        A copy of ``os.environ`` with ``TCP_NODELAY=1``, without which dcmtk 3.6.7 and
        Orthanc wait about 44 ms per C-STORE on loopback.
    """
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port that is free on `host` right now.

    Parameters
    ----------
    host
        Interface to probe.

    Returns
    -------
    int
        A port the kernel handed out for an ephemeral bind; another process may take
        it before the caller binds it, which is unlikely but possible.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def _port_open(port: int, host: str) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], T | None], timeout: float, message: str) -> T:
    """Poll `predicate` until it returns a truthy value.

    Parameters
    ----------
    predicate
        Called every 50 ms without arguments.
    timeout
        Seconds to wait before giving up.
    message
        What is being waited for, e.g. ``"3 files in /tmp/x"``; used in the error.

    Returns
    -------
    T
        The first truthy value `predicate` returned.

    Raises
    ------
    TimeoutError
        If `predicate` returned no truthy value within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"Timed out after {timeout:g} s waiting for {message}.")
        time.sleep(_POLL_SECONDS)


def wait_for_port(
    port: int,
    host: str = LOCALHOST,
    timeout: float = 10.0,
    *,
    what: str = "a listener",
    process: subprocess.Popen[Any] | None = None,
) -> None:
    """Wait until a TCP connection to `host`:`port` succeeds.

    Parameters
    ----------
    port
        TCP port to connect to.
    host
        Host to connect to.
    timeout
        Seconds to wait before giving up.
    what
        What should be listening, e.g. ``"storescp STORESCP"``; used in the errors.
    process
        The process that should open the port; if it exits first, waiting stops at once.

    Raises
    ------
    RuntimeError
        If `process` exited before the port opened.
    TimeoutError
        If the port did not open within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while not _port_open(port, host):
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with status {process.returncode} before listening on {host}:{port}."
            )
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"Timed out after {timeout:g} s waiting for {what} to listen on {host}:{port}."
            )
        time.sleep(_POLL_SECONDS)


def _stop_process(process: subprocess.Popen[Any], timeout: float = _STOP_SECONDS) -> None:
    """Terminate `process`, and kill it if it has not exited after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("Process %d ignored SIGTERM for %g s; killing it", process.pid, timeout)
            process.kill()
            process.wait()


def _tail(path: Path, n_chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return ""


class StoreSCP:
    """dcmtk ``storescp`` on a free loopback port, as a context manager.

    It accepts every storage SOP class dcmtk knows (SEG and Comprehensive 3D SR
    included) and, with ``-pm``, unknown ones too; with ``+xa`` it accepts every
    transfer syntax dcmtk knows (JPEG, JPEG 2000, JPEG-LS, RLE, deflated), and writes each
    instance as received to ``folder/<modality prefix>.<SOP Instance UID>`` (``-uf``; a
    second copy of an instance overwrites the first).

    Parameters
    ----------
    ae_title
        Called AE title to answer to (``-aet``).
    folder
        Existing folder to write received files into (``-od``); by default a new
        temporary folder, removed on exit.
    port
        Port to listen on; by default a free one. The port is kept across
        :meth:`stop` and :meth:`start`.
    extra_args
        Further storescp options, e.g. ``["--refuse"]`` or ``["--sleep-during", "2"]``.

    Raises
    ------
    ValueError
        If `ae_title` is empty or longer than 16 characters.
    """

    def __init__(
        self,
        ae_title: str = "STORESCP",
        folder: Path | str | None = None,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if not 0 < len(ae_title) <= 16:
            raise ValueError(f"ae_title must have 1 to 16 characters. Found {ae_title!r}.")
        self.ae_title = ae_title
        self.port = port if port is not None else free_port()
        self._workdir = Path(tempfile.mkdtemp(prefix="storescp-"))
        if folder is None:
            self.folder = self._workdir / "received"
            self.folder.mkdir()
        else:
            self.folder = Path(folder)
        self.log_path = self._workdir / "storescp.log"
        self._extra_args = list(extra_args)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether storescp is running."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start storescp and wait until it listens.

        Parameters
        ----------
        timeout
            Seconds to wait for the port to open.

        Raises
        ------
        RuntimeError
            If storescp is already running, or exits before listening.
        TimeoutError
            If storescp does not listen within `timeout` seconds.
        """
        if self.running:
            raise RuntimeError(f"storescp {self.ae_title} is already running on port {self.port}.")
        command = [
            STORESCP,
            "-aet",
            self.ae_title,
            "-od",
            str(self.folder),
            "+xa",  # accept all transfer syntaxes, compressed ones included
            "-pm",  # accept unknown storage SOP classes
            "-uf",  # name files <modality>.<SOP Instance UID>
            *self._extra_args,
            str(self.port),
        ]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port(
                self.port,
                timeout=timeout,
                what=f"storescp {self.ae_title}",
                process=self._process,
            )
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise type(e)(f"{e} Log:\n{_tail(self.log_path)}") from e

    def stop(self) -> None:
        """Stop storescp; received files stay in :attr:`folder`."""
        if self._process is not None:
            _stop_process(self._process)
            self._process = None

    def received(self) -> list[Path]:
        """Return the files received so far, sorted by name.

        Returns
        -------
        list[Path]
            Files in :attr:`folder`.
        """
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def wait_for_files(self, count: int, timeout: float = 30.0) -> list[Path]:
        """Wait until at least ``count`` files were received; return them all."""

        def enough() -> list[Path] | None:
            files = self.received()
            return files if len(files) >= count else None

        return wait_for(enough, timeout, f"{count} files at storescp {self.ae_title}")

    def log_text(self) -> str:
        """Return what storescp wrote to stdout and stderr so far."""
        return _tail(self.log_path, n_chars=1_000_000)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)


class Orthanc:
    """Orthanc on free loopback ports with a private, throw-away configuration.

    The generated configuration loads no plugins (the Debian package loads them only
    through its own ``/etc/orthanc`` configuration, which is not read), allows REST
    access from localhost only, turns authentication off, stores files uncompressed
    under a temporary folder, and knows the given DICOM modalities.

    Parameters
    ----------
    aet
        Orthanc's own AE title (``DicomAet``).
    modalities
        Known DICOM peers as ``{name: (ae_title, host, port)}`` (``DicomModalities``).
    workdir
        Existing folder for the configuration, storage, index and log; by default a new
        temporary folder, removed on exit.
    extra_config
        Further configuration keys; they override the generated ones.

    Raises
    ------
    ValueError
        If `aet` is empty or longer than 16 characters.
    """

    def __init__(
        self,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        *,
        workdir: Path | str | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        if not 0 < len(aet) <= 16:
            raise ValueError(f"aet must have 1 to 16 characters. Found {aet!r}.")
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="orthanc-") if workdir is None else workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.url = f"http://{LOCALHOST}:{self.http_port}"
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        config: dict[str, Any] = {
            "Name": f"pacsnode-test-{aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpProxy": "",
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {
                name: [ae_title, host, port]
                for name, (ae_title, host, port) in (modalities or {}).items()
            },
            "DicomModalitiesInDatabase": False,
            "OrthancPeers": {},
            # Close outgoing associations right after a job, so a peer can be stopped.
            "DicomAssociationCloseDelay": 0,
            "SaveJobs": False,
            "MetricsEnabled": False,
        }
        config.update(extra_config or {})
        self._config = config
        self._process: subprocess.Popen[bytes] | None = None
        self._session = requests.Session()

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start Orthanc and wait until it answers.

        Parameters
        ----------
        timeout
            Seconds to wait for the REST API and the DICOM port.

        Raises
        ------
        RuntimeError
            If Orthanc is already running, or exits before answering.
        TimeoutError
            If Orthanc does not answer within `timeout` seconds.
        """
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError(f"Orthanc {self.aet} is already running.")
        self.config_path.write_text(json.dumps(self._config, indent=2))
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [ORTHANC, str(self.config_path)],
                env=dcmtk_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        process = self._process

        def rest_answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc {self.aet} exited with status {process.returncode} before "
                    f"answering on {self.url}. Log:\n{_tail(self.log_path)}"
                )
            try:
                return self._session.get(f"{self.url}/system", timeout=1).ok
            except requests.RequestException:
                return False

        try:
            wait_for(rest_answers, timeout, f"Orthanc {self.aet} REST API at {self.url}/system")
            wait_for_port(
                self.dicom_port, timeout=timeout, what=f"Orthanc {self.aet}", process=process
            )
        except (RuntimeError, TimeoutError):
            self.stop()
            raise

    def stop(self) -> None:
        """Stop Orthanc; its storage stays in :attr:`workdir`."""
        if self._process is not None:
            _stop_process(self._process, timeout=30.0)
            self._process = None

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._session.request(
            method, f"{self.url}{path}", timeout=kwargs.pop("timeout", 60), **kwargs
        )
        if not response.ok:
            raise RuntimeError(
                f"Orthanc {method} {path} answered {response.status_code}: {response.text}"
            )
        return response.json() if response.content else None

    def upload(self, path: Path | str) -> dict[str, Any]:
        """Store one DICOM file through ``POST /instances``.

        Parameters
        ----------
        path
            The DICOM file.

        Returns
        -------
        dict[str, Any]
            Orthanc's answer, with ``ID`` (the instance id) and ``Status``.

        Raises
        ------
        RuntimeError
            If Orthanc refuses the file.
        """
        answer: dict[str, Any] = self._request("POST", "/instances", data=Path(path).read_bytes())
        return answer

    def instances(self) -> list[str]:
        """Return the ids of all stored instances (``GET /instances``).

        Raises
        ------
        RuntimeError
            If Orthanc answers with an error.
        """
        ids: list[str] = self._request("GET", "/instances")
        return ids

    def series(self) -> list[dict[str, Any]]:
        """Return all series with their tags and instance ids (``GET /series?expand``).

        Raises
        ------
        RuntimeError
            If Orthanc answers with an error.
        """
        series: list[dict[str, Any]] = self._request("GET", "/series?expand")
        return series

    def find_instances_by_sop_class(self, sop_class_uid: str) -> list[dict[str, Any]]:
        """Return the stored instances of one SOP class.

        Parameters
        ----------
        sop_class_uid
            e.g. ``"1.2.840.10008.5.1.4.1.1.66.4"`` for Segmentation Storage.

        Returns
        -------
        list[dict[str, Any]]
            Expanded instance resources (``ID``, ``MainDicomTags``, ``ParentSeries``...).

        Raises
        ------
        RuntimeError
            If Orthanc answers with an error.
        """
        found: list[dict[str, Any]] = []
        for instance_id in self.instances():
            sop_class = self._session.get(
                f"{self.url}/instances/{instance_id}/metadata/SopClassUid", timeout=60
            )
            if sop_class.ok and sop_class.text.strip() == sop_class_uid:
                found.append(self._request("GET", f"/instances/{instance_id}"))
        return found

    def send_to_modality(
        self, modality_name: str, resource_ids: Iterable[str], timeout: float = 120.0
    ) -> dict[str, Any]:
        """C-STORE resources to a known modality and wait for the job to end.

        Parameters
        ----------
        modality_name
            A key of the `modalities` given to the constructor or :meth:`add_modality`.
        resource_ids
            Orthanc ids of patients, studies, series or instances.
        timeout
            Seconds to wait for the job.

        Returns
        -------
        dict[str, Any]
            The job's answer (``FailedInstancesCount``, ``InstancesCount``...).

        Raises
        ------
        RuntimeError
            If the job fails, e.g. because the modality refuses the association.
        """
        answer: dict[str, Any] = self._request(
            "POST",
            f"/modalities/{modality_name}/store",
            json={"Resources": list(resource_ids), "Synchronous": True},
            timeout=timeout,
        )
        return answer

    def add_modality(self, name: str, ae_title: str, host: str, port: int) -> None:
        """Add or replace a known DICOM modality while Orthanc runs.

        Parameters
        ----------
        name
            Name for :meth:`send_to_modality`.
        ae_title
            The modality's AE title.
        host
            The modality's host.
        port
            The modality's port.

        Raises
        ------
        RuntimeError
            If Orthanc answers with an error.
        """
        self._request(
            "PUT", f"/modalities/{name}", json={"AET": ae_title, "Host": host, "Port": port}
        )

    def get_file(self, instance_id: str) -> bytes:
        """Return the stored DICOM file of one instance (``GET /instances/{id}/file``).

        Raises
        ------
        RuntimeError
            If Orthanc answers with an error, e.g. for an unknown id.
        """
        response = self._session.get(f"{self.url}/instances/{instance_id}/file", timeout=60)
        if not response.ok:
            raise RuntimeError(
                f"Orthanc GET /instances/{instance_id}/file answered {response.status_code}: "
                f"{response.text}"
            )
        return response.content

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._session.close()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _dicom_files(paths_or_dir: Path | str | Sequence[Path | str]) -> tuple[list[Path], bool]:
    """Return the files to send and whether a folder was given."""
    if isinstance(paths_or_dir, str | Path):
        root = Path(paths_or_dir)
        if root.is_dir():
            return sorted(p for p in root.rglob("*") if p.is_file()), True
        return [root], False
    return [Path(p) for p in paths_or_dir], False


def _presentation_contexts(files: Iterable[Path]) -> list[tuple[str, tuple[str, ...]]]:
    """Return (SOP class, transfer syntaxes) contexts that can carry `files` unchanged.

    Each file's own transfer syntax gets a context; each SOP class with a compressed
    file also gets an uncompressed fallback, so storescu may decompress what it can.
    Files pydicom cannot read are left to storescu, which reports them.
    """
    syntaxes: dict[str, set[str]] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError) as e:
            logger.debug("Not proposing a context for %s, storescu will skip it: %s", path, e)
            continue
        meta = getattr(ds, "file_meta", None)
        sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
        syntax = str(getattr(meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
        if sop_class:
            syntaxes.setdefault(sop_class, set()).add(syntax)
    contexts: list[tuple[str, tuple[str, ...]]] = []
    for sop_class in sorted(syntaxes):
        compressed = False
        for syntax in sorted(syntaxes[sop_class]):
            if syntax in _UNCOMPRESSED_ALL:
                rest = tuple(s for s in _UNCOMPRESSED if s != syntax)
                contexts.append((sop_class, (syntax, *rest)))
            else:
                compressed = True
                contexts.append((sop_class, (syntax,)))
        if compressed:
            contexts.append((sop_class, _UNCOMPRESSED))
    return contexts


def _write_storescu_profile(contexts: Sequence[tuple[str, tuple[str, ...]]], path: Path) -> str:
    """Write an association negotiation profile for ``storescu -xf`` and return its name."""
    syntax_names: dict[tuple[str, ...], str] = {}
    for _, syntaxes in contexts:
        syntax_names.setdefault(syntaxes, f"TS{len(syntax_names) + 1}")
    lines = ["[[TransferSyntaxes]]"]
    for syntaxes, name in syntax_names.items():
        lines.append(f"[{name}]")
        lines.extend(f"TransferSyntax{i} = {uid}" for i, uid in enumerate(syntaxes, 1))
    lines += ["[[PresentationContexts]]", "[Files]"]
    lines.extend(
        f"PresentationContext{i} = {sop_class}\\{syntax_names[syntaxes]}"
        for i, (sop_class, syntaxes) in enumerate(contexts, 1)
    )
    lines += ["[[Profiles]]", "[Files]", "PresentationContexts = Files", ""]
    path.write_text("\n".join(lines))
    return "Files"


def build_storescu_command(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    paths_or_dir: Path | str | Sequence[Path | str],
    *,
    config_dir: Path,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """Return a ``storescu`` command that sends files unchanged over one association.

    storescu proposes only uncompressed transfer syntaxes unless told otherwise, and its
    ``-xv``/``-xr``/``-xs`` options each add a single compressed one, so a folder that
    mixes e.g. JPEG 2000 and RLE files cannot be sent with options alone. This function
    reads the SOP class and transfer syntax of each file and writes an association
    negotiation profile (``-xf``) that proposes exactly those, with an uncompressed
    fallback.

    Parameters
    ----------
    host
        Peer host.
    port
        Peer port.
    called_ae
        Peer AE title (``-aec``).
    calling_ae
        Our AE title (``-aet``).
    paths_or_dir
        A folder (sent recursively with ``+sd +r``), one file, or a list of files.
    config_dir
        Existing folder for the profile file; it must exist while the command runs.
    extra_args
        Further storescu options, e.g. ``["-nh"]`` to go on after a failed store.

    Returns
    -------
    list[str]
        The command line.

    Raises
    ------
    ValueError
        If there are no DICOM files to send, or they need more than 128 presentation
        contexts.
    """
    files, is_dir = _dicom_files(paths_or_dir)
    contexts = _presentation_contexts(files)
    if not contexts:
        raise ValueError(f"paths_or_dir must hold DICOM files. Found none in {paths_or_dir}.")
    if len(contexts) > _MAX_PRESENTATION_CONTEXTS:
        raise ValueError(
            f"paths_or_dir needs {len(contexts)} presentation contexts; one association "
            f"holds at most {_MAX_PRESENTATION_CONTEXTS}. Send the files in smaller groups."
        )
    profile_path = config_dir / "storescu-profile.cfg"
    profile = _write_storescu_profile(contexts, profile_path)
    command = [
        STORESCU,
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "-xf",
        str(profile_path),
        profile,
        *extra_args,
    ]
    if is_dir:
        command += ["+sd", "+r", host, str(port), str(paths_or_dir)]
    else:
        command += [host, str(port), *(str(p) for p in files)]
    return command


def run_storescu(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    paths_or_dir: Path | str | Sequence[Path | str],
    timeout: float = 120.0,
    *,
    extra_args: Sequence[str] = (),
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Send DICOM files with dcmtk ``storescu`` over one association.

    Each file goes in its own transfer syntax (see :func:`build_storescu_command`).
    storescu stops at the first failed store with a non-zero exit status; with
    ``extra_args=["-nh"]`` it goes on and exits 0 even when stores failed.

    Parameters
    ----------
    host
        Peer host.
    port
        Peer port.
    called_ae
        Peer AE title.
    calling_ae
        Our AE title.
    paths_or_dir
        A folder (sent recursively), one file, or a list of files.
    timeout
        Seconds before storescu is killed.
    extra_args
        Further storescu options.
    check
        Raise if storescu exits with a non-zero status.

    Returns
    -------
    subprocess.CompletedProcess[str]
        With ``returncode``, ``stdout`` and ``stderr`` (storescu logs to stderr).

    Raises
    ------
    ValueError
        If there are no DICOM files to send, or they need too many presentation contexts.
    subprocess.TimeoutExpired
        If storescu runs longer than `timeout` seconds.
    subprocess.CalledProcessError
        If `check` is true and storescu fails.
    """
    with tempfile.TemporaryDirectory(prefix="storescu-") as config_dir:
        command = build_storescu_command(
            host,
            port,
            called_ae,
            calling_ae,
            paths_or_dir,
            config_dir=Path(config_dir),
            extra_args=extra_args,
        )
        return subprocess.run(
            command,
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )


def acknowledged_files(storescu_log: str) -> list[Path]:
    """Files ``storescu -v`` reports as stored with a Success response, in order."""
    acknowledged: list[Path] = []
    current: Path | None = None
    for line in storescu_log.splitlines():
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            current = None
    return acknowledged


def dciodvfy_errors(path: Path | str) -> list[str]:
    """Validate a DICOM file with dicom3tools' ``dciodvfy`` and return its errors.

    Parameters
    ----------
    path
        The DICOM file.

    Returns
    -------
    list[str]
        The lines that start with ``Error`` (warnings are dropped); empty if valid.

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path must be an existing DICOM file. Found {path}.")
    result = subprocess.run(
        [DCIODVFY, str(path)], capture_output=True, text=True, errors="replace", check=False
    )
    output = result.stderr + result.stdout
    return [line for line in output.splitlines() if line.startswith("Error")]
