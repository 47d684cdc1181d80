"""The audit trail: who sent and received what, who was refused, who acted.

One JSON object per line, appended to ``<data_dir>/audit/audit.jsonl`` (and, with
``audit.syslog``, sent as RFC 5424 messages over UDP or TCP). Each record uses the
DICOM audit message vocabulary (PS3.15 A.5: ``EventID``, ``EventActionCode``,
``EventOutcomeIndicator``, ``ActiveParticipant``, ``ParticipantObjectIdentification``)
so that a SIEM can map it:

======================================  =====================  ==============================
what                                    EventID (DCM)          EventTypeCode / action
======================================  =====================  ==============================
start, stop (with the config's digest)  110100 Application     110120 Start, 110121 Stop
                                        Activity
association accepted or rejected        110114 User            110122 Login
                                        Authentication
TLS handshake refused                   110113 Security Alert  110127 Node Authentication
study received                          110104 DICOM           action C (create)
                                        Instances Transferred
result sent or failed                   110104                 action R (read, sent out)
console or CLI action (retry, cancel,   110103 DICOM           action U (update); D (delete)
re-send), retention removal             Instances Accessed     for a removal
======================================  =====================  ==============================

Each record is one ``write()`` on a file opened for appending, so it is in the kernel's
hands (and survives a SIGKILL of the node) as soon as the call returns; the file is
fsynced before it is rotated (``audit.max_bytes``, ``audit.keep_files``). Other
processes (``pacsnode retry``, ``cleanup``) append to the same file; only the node
rotates it. ``pacsnode audit --study UID`` prints a study's trail.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from node.config import AuditSettings

__all__ = ["AuditLog", "Participant", "StudyObject", "read_trail"]

logger = logging.getLogger(__name__)

#: (code, meaning) of the events pacsnode records (DCM coding scheme).
APPLICATION_ACTIVITY = ("110100", "Application Activity")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
SECURITY_ALERT = ("110113", "Security Alert")
USER_AUTHENTICATION = ("110114", "User Authentication")
APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
LOGIN = ("110122", "Login")
NODE_AUTHENTICATION = ("110127", "Node Authentication")
#: EventOutcomeIndicator: success, minor failure, serious failure (PS3.15 A.5.1).
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8

_FILE_NAME = "audit.jsonl"


def _code(code: tuple[str, str]) -> dict[str, str]:
    return {"csd-code": code[0], "codeSystemName": "DCM", "originalText": code[1]}


def Participant(
    user_id: str,
    address: str | None = None,
    *,
    requestor: bool,
    role: str | None = None,
    user_name: str | None = None,
) -> dict[str, Any]:
    """An ActiveParticipant: an AE title (or a console client), its address, and its
    TLS certificate's subject as UserName when it has one."""
    participant: dict[str, Any] = {"UserID": user_id, "UserIsRequestor": requestor}
    if user_name:
        participant["UserName"] = user_name
    if address:
        participant["NetworkAccessPointID"] = address
        participant["NetworkAccessPointTypeCode"] = 2  # IP address
    if role:
        participant["RoleIDCode"] = role
    return participant


def StudyObject(study_instance_uid: str, **detail: Any) -> dict[str, Any]:
    """A ParticipantObjectIdentification for a study (type 2 system object, role 3
    report), with details such as the number of instances or SOP Instance UIDs."""
    item: dict[str, Any] = {
        "ParticipantObjectID": study_instance_uid,
        "ParticipantObjectTypeCode": 2,
        "ParticipantObjectTypeCodeRole": 3,
        "ParticipantObjectIDTypeCode": {"csd-code": "110180", "codeSystemName": "DCM",
                                        "originalText": "Study Instance UID"},
    }  # fmt: skip
    if detail:
        item["ParticipantObjectDetail"] = detail
    return item


class AuditLog:
    """Appends audit records; thread-safe.

    Parameters
    ----------
    folder
        Where ``audit.jsonl`` and its rotated copies live (created).
    settings
        Rotation and syslog.
    rotate
        Whether this process rotates the file (the node does; CLI commands only append).
    """

    def __init__(self, folder: Path, settings: AuditSettings, *, rotate: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / _FILE_NAME
        self.settings = settings
        self.rotate = rotate
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._syslog = _Syslog(settings.syslog) if settings.syslog else None
        self.host = socket.gethostname()

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)
            if self._syslog is not None:
                self._syslog.close()

    def record(
        self,
        event: tuple[str, str],
        *,
        action: str = "E",
        outcome: int = SUCCESS,
        description: str | None = None,
        event_type: tuple[str, str] | None = None,
        participants: Sequence[dict[str, Any]] = (),
        objects: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Append one record (and send it to syslog). A failure to write is logged,
        never raised: auditing must not stop the node."""
        entry: dict[str, Any] = {
            "EventDateTime": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "EventID": _code(event),
            "EventActionCode": action,
            "EventOutcomeIndicator": outcome,
        }
        if event_type is not None:
            entry["EventTypeCode"] = [_code(event_type)]
        if description:
            entry["EventOutcomeDescription"] = description
        entry["ActiveParticipant"] = list(participants)
        entry["AuditSourceIdentification"] = {"AuditSourceID": f"pacsnode@{self.host}"}
        if objects:
            entry["ParticipantObjectIdentification"] = list(objects)
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
        try:
            with self._lock:
                self._rotate_if_full(len(line))
                os.write(self._fd, line.encode("utf-8"))
        except OSError as exc:
            logger.error("cannot write the audit trail %s: %s", self.path, exc)
        if self._syslog is not None:
            self._syslog.send(line.rstrip("\n"), outcome)

    # -- the events pacsnode records ------------------------------------------------

    def application(self, *, started: bool, ae_title: str, config_path: Path) -> None:
        """The node started or stopped, with the SHA-256 of its config.yaml."""
        try:
            digest = hashlib.sha256(config_path.read_bytes()).hexdigest()
        except OSError:
            digest = "(unreadable)"
        self.record(
            APPLICATION_ACTIVITY,
            event_type=APPLICATION_START if started else APPLICATION_STOP,
            participants=[Participant(ae_title, requestor=False, role="Application")],
            objects=[{"ParticipantObjectID": str(config_path), "ParticipantObjectTypeCode": 2,
                      "ParticipantObjectDetail": {"ConfigurationSHA256": digest}}],
        )  # fmt: skip

    def study_received(
        self, study_instance_uid: str, *, ae_title: str, senders: Sequence[str], instances: int
    ) -> None:
        """A study was received whole (it is routed now)."""
        self.record(
            INSTANCES_TRANSFERRED, action="C",
            participants=[*(Participant(ae, requestor=True, role="Source") for ae in senders),
                          Participant(ae_title, requestor=False, role="Destination")],
            objects=[StudyObject(study_instance_uid, NumberOfInstances=instances)],
        )  # fmt: skip

    def result_sent(
        self,
        study_instance_uid: str,
        sop_instance_uid: str,
        *,
        ae_title: str,
        destination: str,
        address: str,
        failure: str | None = None,
    ) -> None:
        """A result file was acknowledged by a destination, or failed for good."""
        self.record(
            INSTANCES_TRANSFERRED, action="R",
            outcome=SUCCESS if failure is None else SERIOUS_FAILURE, description=failure,
            participants=[Participant(ae_title, requestor=True, role="Source"),
                          Participant(destination, address, requestor=False, role="Destination")],
            objects=[StudyObject(study_instance_uid, SOPInstanceUID=sop_instance_uid)],
        )  # fmt: skip

    def action(
        self,
        what: str,
        study_instance_uid: str,
        *,
        user: str,
        address: str | None = None,
        removal: bool = False,
        failure: str | None = None,
    ) -> None:
        """An admin's action on a study's data (retry, cancel, re-send) or a removal by
        retention; ``user`` names who (``console``, ``cli``, ``retention``)."""
        self.record(
            INSTANCES_ACCESSED, action="D" if removal else "U",
            outcome=SUCCESS if failure is None else MINOR_FAILURE,
            description=what if failure is None else f"{what}: {failure}",
            participants=[Participant(user, address, requestor=True)],
            objects=[StudyObject(study_instance_uid)],
        )  # fmt: skip

    def _rotate_if_full(self, incoming: int) -> None:
        if not self.rotate or os.fstat(self._fd).st_size + incoming <= self.settings.max_bytes:
            return
        os.fsync(self._fd)
        os.close(self._fd)
        for number in range(self.settings.keep_files - 1, 0, -1):
            older = self.path.with_name(f"{_FILE_NAME}.{number}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{_FILE_NAME}.{number + 1}"))
        os.replace(self.path, self.path.with_name(f"{_FILE_NAME}.1"))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


class _Syslog:
    """RFC 5424 messages over UDP, or TCP with octet counting (RFC 6587)."""

    _FACILITY_AUDIT = 13  # log audit

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.tcp = parts.scheme == "tcp"
        self.address = (parts.hostname or "127.0.0.1", parts.port or 514)
        self.sock: socket.socket | None = None
        self.host = socket.gethostname()

    def _connect(self) -> socket.socket:
        if self.sock is None:
            if self.tcp:
                self.sock = socket.create_connection(self.address, timeout=5)
            else:
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        return self.sock

    def send(self, message: str, outcome: int) -> None:
        severity = 5 if outcome == SUCCESS else 4  # notice, warning
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        payload = (
            f"<{self._FACILITY_AUDIT * 8 + severity}>1 {stamp} {self.host} pacsnode "
            f"{os.getpid()} DICOM+RFC3881 - {message}"
        ).encode()
        try:
            sock = self._connect()
            if self.tcp:
                sock.sendall(f"{len(payload)} ".encode() + payload)
            else:
                sock.sendto(payload, self.address)
        except OSError as exc:
            logger.warning("cannot send an audit record to syslog %s: %s", self.address, exc)
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def read_trail(folder: Path, study_instance_uid: str) -> Iterator[dict[str, Any]]:
    """Every record naming the study, oldest first, from the rotated files on."""
    files = sorted(
        folder.glob(f"{_FILE_NAME}.*"),
        key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
    )
    for path in [*files, folder / _FILE_NAME]:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            objects = entry.get("ParticipantObjectIdentification", [])
            if any(o.get("ParticipantObjectID") == study_instance_uid for o in objects):
                yield entry
