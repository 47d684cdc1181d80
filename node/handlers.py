"""SCP event handlers: who may associate, C-ECHO and C-STORE.

A C-STORE handler only validates, writes the received bytes to the spool and records
them; it never decodes pixel data and never runs a model (STYLE.md "Architecture").
A peer flagged ``complete_on_release`` completes every series it sent when it releases
the association (:class:`CompletionOnRelease`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import sqlite3
import struct
import threading
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any, NamedTuple, cast

from pydicom import DataElement, Dataset
from pydicom.charset import decode_element
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.events import Event

from node.audit import (
    LOGIN,
    MINOR_FAILURE,
    NODE_AUTHENTICATION,
    SECURITY_ALERT,
    USER_AUTHENTICATION,
    AuditLog,
    Participant,
)
from node.completeness import encode_geometry, geometry_of
from node.config import Config, Peer
from node.disk_guard import DiskGuard
from node.metrics import ReceiveCounters
from node.spool import InvalidUIDError, Spool, check_uid
from node.state import ReceiptValues, StateDB, StudyInfo
from node.tls import certificate_mismatch, peer_certificate, subject_of
from workers.dicom_encoding import LONG_LENGTH_VRS

__all__ = [
    "CANNOT_UNDERSTAND",
    "OUT_OF_RESOURCES",
    "SUCCESS",
    "CompletionOnRelease",
    "ScpReports",
    "handle_association_request",
    "handle_echo",
    "handle_store",
]

logger = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 Annex B.2.3); named so a slip between similar codes shows.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected permanent, by the service user, calling AE title
# not recognised; rejected transient, by the service provider (presentation), local
# limit exceeded (as pynetdicom answers one association more than its maximum).
_REJECT_PERMANENT = 0x01
_SOURCE_SERVICE_USER = 0x01
_CALLING_AE_NOT_RECOGNISED = 0x03
_REJECT_TRANSIENT = 0x02
_SOURCE_PROVIDER_PRESENTATION = 0x03
_LOCAL_LIMIT_EXCEEDED = 0x02

_SERIES_INSTANCE_UID = Tag(0x0020, 0x000E)


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def _calling_ae_title(event: Event) -> str:
    requestor = event.assoc.requestor
    primitive = requestor.primitive
    calling_ae = primitive.calling_ae_title.strip() if primitive is not None else ""
    return calling_ae or str(requestor.ae_title).strip()


def _tls_subject(event: Event) -> str | None:
    """The subject of the requestor's TLS certificate (RFC 4514), for the audit trail."""
    return subject_of(peer_certificate(event.assoc))


def _calling_peer(event: Event, config: Config) -> tuple[str, str, Peer | None]:
    """The calling AE title, its address, and the peer entry that both match."""
    calling_ae = _calling_ae_title(event)
    host = event.assoc.requestor.address
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for peer in config.peers:
        if peer.ae_title == calling_ae and address == ipaddress.ip_address(peer.host):
            return calling_ae, host, peer
    return calling_ae, host, None


@dataclass
class ScpReports:
    """Where the SCP reports what happened: the counters of ``/metrics`` and the audit
    trail (either may be absent)."""

    ae_title: str
    counters: ReceiveCounters | None = None
    audit: AuditLog | None = None

    def _participants(
        self, calling_ae: str, host: str, tls_subject: str | None
    ) -> list[dict[str, object]]:
        return [
            Participant(calling_ae, host, requestor=True, user_name=tls_subject),
            Participant(self.ae_title, requestor=False),
        ]

    def accepted(self, calling_ae: str, host: str, tls_subject: str | None = None) -> None:
        if self.counters is not None:
            self.counters.associations.labels(calling_ae, "accepted").inc()
        if self.audit is not None:
            self.audit.record(
                USER_AUTHENTICATION, event_type=LOGIN,
                participants=self._participants(calling_ae, host, tls_subject),
            )  # fmt: skip

    def rejected(
        self, calling_ae: str, host: str, reason: str, tls_subject: str | None = None
    ) -> None:
        if self.counters is not None:
            self.counters.associations.labels(calling_ae, "rejected").inc()
        if self.audit is not None:
            self.audit.record(
                USER_AUTHENTICATION, event_type=LOGIN, outcome=MINOR_FAILURE,
                description=f"association rejected: {reason}",
                participants=self._participants(calling_ae, host, tls_subject),
            )  # fmt: skip

    def tls_refused(self, host: str, reason: str) -> None:
        """A TLS handshake failed (no certificate, an untrusted one, plain DICOM)."""
        if self.audit is not None:
            self.audit.record(
                SECURITY_ALERT, event_type=NODE_AUTHENTICATION, outcome=MINOR_FAILURE,
                description=f"TLS connection refused: {reason}",
                participants=[Participant("(unknown)", host, requestor=True),
                              Participant(self.ae_title, requestor=False)],
            )  # fmt: skip

    def stored(self, calling_ae: str, size: int) -> None:
        if self.counters is not None:
            self.counters.instances.labels(calling_ae).inc()
            self.counters.bytes.labels(calling_ae).inc(size)


class CompletionOnRelease:
    """Completes the series a ``complete_on_release`` peer sent when it releases the
    association normally; an aborted association completes nothing (its series
    complete by the quiet period, as any other).

    Parameters
    ----------
    config
        The peers and which of them are flagged.
    db
        Where series are marked complete.
    """

    def __init__(self, config: Config, db: StateDB) -> None:
        self.config = config
        self.db = db
        self._lock = threading.Lock()
        self._carried: dict[int, set[str]] = {}

    def watch(self, event: Event, reports: ScpReports | None = None) -> None:
        """EVT_ACCEPTED: report it, and start collecting the series of a flagged peer's
        association."""
        calling_ae, host, peer = _calling_peer(event, self.config)
        if reports is not None:
            reports.accepted(calling_ae, host, _tls_subject(event))
        if peer is not None and peer.complete_on_release:
            with self._lock:
                self._carried[id(event.assoc)] = set()

    def carried(self, event: Event, series_instance_uid: str) -> None:
        """After a C-STORE was recorded: its series belongs to this association."""
        with self._lock:
            series = self._carried.get(id(event.assoc))
            if series is not None:
                series.add(series_instance_uid)

    def released(self, event: Event) -> None:
        """EVT_RELEASED: the peer said it is done; its series are complete."""
        with self._lock:
            series = self._carried.pop(id(event.assoc), set())
        ae_title = event.assoc.requestor.ae_title.strip()
        for uid in sorted(series):
            if self.db.mark_series_complete(uid):
                logger.info(
                    "series %s complete: %s released its association",
                    uid,
                    ae_title,
                    extra={"series_instance_uid": uid},
                )

    def ended(self, event: Event) -> None:
        """EVT_ABORTED or EVT_CONN_CLOSE: forget the association; series it carried and
        that a release did not complete wait for the quiet period."""
        with self._lock:
            series = self._carried.pop(id(event.assoc), None)
        if series:
            logger.warning(
                "association from %s ended without a release; its %d series complete "
                "by the quiet period",
                event.assoc.requestor.ae_title.strip(),
                len(series),
            )


def report_rejection(event: Event, reports: ScpReports) -> None:
    """EVT_REJECTED: pynetdicom refused an association (wrong called AE title, too many
    associations)."""
    reason = "refused by the SCP (a called AE title not ours, or too many associations)"
    reports.rejected(
        _calling_ae_title(event), event.assoc.requestor.address, reason, _tls_subject(event)
    )


def _open_associations(event: Event, peer: Peer) -> int:
    """Associations of ``peer`` (AE title and address) this SCP serves now, the one
    being requested included."""
    address = ipaddress.ip_address(peer.host)
    count = 0
    for assoc in event.assoc.ae.active_associations:
        if not assoc.is_acceptor or assoc.is_aborted or assoc.is_released:
            continue
        primitive = assoc.requestor.primitive
        calling = primitive.calling_ae_title.strip() if primitive is not None else ""
        with contextlib.suppress(ValueError):
            if (
                calling == peer.ae_title
                and ipaddress.ip_address(assoc.requestor.address) == address
            ):
                count += 1
    return count


def handle_association_request(
    event: Event, config: Config, reports: ScpReports | None = None
) -> None:
    """Reject associations from peers that config.yaml does not list (AE title + host),
    whose TLS certificate is not the one their entry pins, and one more than a peer's
    ``max_associations``."""
    calling_ae, host, peer = _calling_peer(event, config)
    if peer is None and config.accept_unknown_peers:
        return
    certificate = peer_certificate(event.assoc)
    if peer is None:
        reason = "unknown peer"
        rejection = (_REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLING_AE_NOT_RECOGNISED)
    elif (mismatch := certificate_mismatch(certificate, peer)) is not None:
        reason = mismatch
        rejection = (_REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLING_AE_NOT_RECOGNISED)
    elif peer.max_associations is not None and (
        _open_associations(event, peer) > peer.max_associations
    ):
        reason = f"more than its max_associations ({peer.max_associations}) at once"
        rejection = (_REJECT_TRANSIENT, _SOURCE_PROVIDER_PRESENTATION, _LOCAL_LIMIT_EXCEEDED)
    else:
        return
    if reports is not None:
        reports.rejected(calling_ae, host, reason, subject_of(certificate))
    assoc = event.assoc
    logger.warning(
        "rejected association from %s at %s: %s",
        calling_ae,
        host,
        reason,
        extra={"calling_ae_title": calling_ae, "peer_host": host},
    )
    assoc.acse.send_reject(*rejection)
    # As pynetdicom's own rejections do: wait until the A-ASSOCIATE-RJ is out and the
    # peer has closed, or the socket is shut before the peer reads the rejection.
    assoc.kill()


def handle_echo(event: Event) -> int:
    return SUCCESS


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a 2-byte length (PS3.5 7.1.2)."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _uid_value(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


# File meta elements that are the same in every file we write: (0002,0001) OB, whose
# length field is 4 bytes after two reserved ones, then (0002,0012) and (0002,0013).
_META_VERSION = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
_META_IMPLEMENTATION = _element(
    0x00020012, b"UI", _uid_value(PYNETDICOM_IMPLEMENTATION_UID)
) + _element(
    0x00020013,
    b"SH",
    PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    + b" " * (len(PYNETDICOM_IMPLEMENTATION_VERSION) % 2),
)


def _encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """The File Meta Information group (PS3.10 7.1) for one received instance.

    The same elements pynetdicom's ``Event.file_meta`` holds, encoded as
    ``pynetdicom.dsutils.encode_file_meta`` does, byte for byte, without building a
    pydicom dataset per instance. The UIDs must already be checked.
    """
    elements = b"".join(
        (
            _META_VERSION,
            _element(0x00020002, b"UI", _uid_value(sop_class_uid)),
            _element(0x00020003, b"UI", _uid_value(sop_instance_uid)),
            _element(0x00020010, b"UI", _uid_value(transfer_syntax_uid)),
            _META_IMPLEMENTATION,
        )
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(elements))
    return group_length + elements


def _stop_after_frames(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag > _NUMBER_OF_FRAMES)


_STUDY_INSTANCE_UID = 0x0020000D
_IMAGE_POSITION = 0x00200032
_IMAGE_ORIENTATION = 0x00200037
_NUMBER_OF_FRAMES = 0x00280008
_SPECIFIC_CHARACTER_SET = 0x00080005
#: What the console lists a study by (:class:`node.state.StudyInfo`, in its order).
_STUDY_TAGS = {
    0x00100020: ("PatientID", "LO"),
    0x00100010: ("PatientName", "PN"),
    0x00080050: ("AccessionNumber", "SH"),
    0x00080020: ("StudyDate", "DA"),
    0x00081030: ("StudyDescription", "LO"),
}
_SCANNED = frozenset(
    (
        _STUDY_INSTANCE_UID,
        _SERIES_INSTANCE_UID,
        _IMAGE_POSITION,
        _IMAGE_ORIENTATION,
        _NUMBER_OF_FRAMES,
        _SPECIFIC_CHARACTER_SET,
        *_STUDY_TAGS,
    )
)
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
_UNDEFINED_LENGTH = 0xFFFFFFFF


class ReceivedHeader(NamedTuple):
    """What the node records of an instance from its header as received."""

    study_instance_uid: str
    series_instance_uid: str
    geometry: str  # node.completeness.encode_geometry
    study: StudyInfo


def _ascii(value: bytes | None) -> str | None:
    return None if value is None else value.decode("ascii", errors="replace").rstrip("\0 ")


def _study_info(values: dict[int, bytes]) -> StudyInfo:
    """The study's listing details, decoded in the instance's character set."""
    charsets = (_ascii(values.get(_SPECIFIC_CHARACTER_SET)) or "").split("\\")
    texts = []
    for tag, (_, vr) in _STUDY_TAGS.items():
        element = DataElement(tag, vr, values.get(tag, b""), is_undefined_length=False)
        try:
            decode_element(element, charsets)
        except (LookupError, ValueError):
            element.value = _ascii(values.get(tag, b""))
        texts.append(str(element.value or "").strip())
    return StudyInfo(*texts)


def _header(values: dict[int, bytes]) -> ReceivedHeader:
    return ReceivedHeader(
        _ascii(values.get(_STUDY_INSTANCE_UID)) or "",
        _ascii(values.get(_SERIES_INSTANCE_UID)) or "",
        encode_geometry(
            _ascii(values.get(_IMAGE_POSITION)),
            _ascii(values.get(_IMAGE_ORIENTATION)),
            _ascii(values.get(_NUMBER_OF_FRAMES)),
        ),
        _study_info(values),
    )


def _scan_header(data: memoryview, implicit_vr: bool) -> ReceivedHeader | None:
    """Study and Series Instance UIDs and the slice geometry from a Little Endian
    dataset, by skipping elements.

    Walks the top-level elements up to (0028,0008) by their lengths alone. Returns None
    where that is not enough (an undefined length, an unknown VR, data that ends early),
    and the caller lets pydicom read the header instead.
    """
    values: dict[int, bytes] = {}
    offset = 0
    end = len(data)
    while offset + 8 <= end:
        group, element = struct.unpack_from("<HH", data, offset)
        tag = group << 16 | element
        if tag > _NUMBER_OF_FRAMES:
            return _header(values)
        if implicit_vr:
            (length,) = struct.unpack_from("<I", data, offset + 4)
            offset += 8
        else:
            vr = bytes(data[offset + 4 : offset + 6])
            if vr in LONG_LENGTH_VRS:
                if offset + 12 > end:
                    return None
                (length,) = struct.unpack_from("<I", data, offset + 8)
                offset += 12
            elif vr in _SHORT_VRS:
                (length,) = struct.unpack_from("<H", data, offset + 6)
                offset += 8
            else:
                return None
        if length == _UNDEFINED_LENGTH or offset + length > end:
            return None
        if tag in _SCANNED:
            values[tag] = bytes(data[offset : offset + length])
        offset += length
    # The data ended: fine only if it ended exactly after an element.
    return _header(values) if offset == end else None


def _read_header(event: Event) -> ReceivedHeader:
    """UIDs and geometry, read from the received bytes without decoding the rest."""
    request = cast(Any, event.request)
    stream = cast(BytesIO, request.DataSet)
    transfer_syntax = UID(event.context.transfer_syntax)
    if transfer_syntax.is_little_endian and not transfer_syntax.is_deflated:
        with stream.getbuffer() as data:
            found = _scan_header(data, transfer_syntax.is_implicit_VR)
        if found is not None:
            return found
    if transfer_syntax.is_deflated:
        stream = BytesIO(zlib.decompress(stream.getvalue(), -zlib.MAX_WBITS))
    stream.seek(0)
    header = read_dataset(
        stream,
        transfer_syntax.is_implicit_VR,
        transfer_syntax.is_little_endian,
        stop_when=_stop_after_frames,
    )
    return ReceivedHeader(
        str(header.get("StudyInstanceUID", "")),
        str(header.get("SeriesInstanceUID", "")),
        geometry_of(header),
        StudyInfo(*(str(header.get(name) or "").strip() for name, _ in _STUDY_TAGS.values())),
    )


def handle_store(
    event: Event,
    spool: Spool,
    db: StateDB,
    config: Config,
    completion: CompletionOnRelease,
    disk_guard: DiskGuard,
    reports: ScpReports | None = None,
) -> int | Dataset:
    """Write the instance as received, record it, and only then answer Success.

    Below the disk guard's free space, and on any write failure (disk full included),
    the answer is Out of Resources; a dataset whose UIDs are missing or malformed answers
    Cannot Understand. Neither affects other instances.
    An identical re-send answers Success and changes nothing; a re-send with other bytes
    replaces the stored instance (and, once its series was processed, re-opens it).
    """
    request = cast(Any, event.request)
    calling_ae = event.assoc.requestor.ae_title.strip()
    try:
        sop_instance_uid = check_uid(str(request.AffectedSOPInstanceUID), "SOPInstanceUID")
        sop_class_uid = check_uid(str(request.AffectedSOPClassUID), "SOPClassUID")
        study_uid, series_uid, geometry, study = _read_header(event)
        spool.check_uids(study_uid, series_uid, sop_instance_uid)
    except (InvalidUIDError, ValueError, EOFError, OSError, zlib.error) as exc:
        logger.warning("refused an instance from %s: %s", calling_ae, exc)
        return _status(CANNOT_UNDERSTAND, str(exc))

    received = cast(BytesIO, request.DataSet).getbuffer()
    refusal = disk_guard.refusal(received.nbytes, event.assoc)
    if refusal is not None:
        return _status(OUT_OF_RESOURCES, refusal)
    try:
        # Preamble + file meta + the dataset bytes as sent: no decode, no re-encode.
        written = spool.write(
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_instance_uid,
            file_meta=_encode_file_meta(
                sop_class_uid, sop_instance_uid, str(event.context.transfer_syntax)
            ),
            dataset=received,
        )
        receipt = db.record_instance(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            series_instance_uid=series_uid,
            study_instance_uid=study_uid,
            calling_ae_title=calling_ae,
            path=written.path,
            size=written.size,
            sha256=written.sha256,
            geometry=geometry,
            study=study,
            rerun_late=config.completion.late == "rerun",
        )
    except (OSError, sqlite3.Error) as exc:
        logger.error("could not store %s: %s", sop_instance_uid, exc)
        return _status(OUT_OF_RESOURCES, f"cannot store: {exc}")
    completion.carried(event, series_uid)
    if reports is not None and receipt.kind != ReceiptValues.DUPLICATE:
        reports.stored(calling_ae, written.size)
    context = {"sop_instance_uid": sop_instance_uid, "calling_ae_title": calling_ae}
    if receipt.kind == ReceiptValues.DUPLICATE:
        logger.info(
            "%s re-sent instance %s unchanged; nothing to do", calling_ae, sop_instance_uid,
            extra=context,
        )  # fmt: skip
    elif receipt.kind == ReceiptValues.CHANGED:
        logger.warning(
            "%s re-sent instance %s with other content; the stored one is replaced",
            calling_ae,
            sop_instance_uid,
            extra=context,
        )
    if receipt.reopened:
        logger.warning(
            "instance %s from %s arrived after series %s was complete; the study will be "
            "routed again and changed jobs run as new versions",
            sop_instance_uid,
            calling_ae,
            series_uid,
            extra=context,
        )
    elif receipt.late:
        logger.warning(
            "instance %s from %s arrived after series %s was complete; kept, not processed "
            "(completion.late: keep)",
            sop_instance_uid,
            calling_ae,
            series_uid,
            extra=context,
        )
    return SUCCESS
