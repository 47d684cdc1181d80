"""The sender: deliver result files from the durable outbox (the deliveries table).

One association per destination and round. Transient failures (refused connection,
timeout, abort, Out of Resources) are retried with exponential backoff until
``delivery.give_up_after_seconds``; permanent ones (association rejected, SOP class or
transfer syntax refused, a failure status) fail the delivery at once with the reason.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association

from node.audit import AuditLog
from node.config import Config, Destination
from node.state import Delivery, StateDB
from node.tls import client_context

__all__ = ["Sender", "echo"]

logger = logging.getLogger(__name__)

_VERIFICATION = "1.2.840.10008.1.1"
_SUCCESS_OR_WARNING = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}
_OUT_OF_RESOURCES_MASK = 0xFF00
_OUT_OF_RESOURCES = 0xA700


# send_c_store(path) streams the file's dataset as written, in chunks, instead of
# decoding it and encoding it again (a 300-slice SEG is tens of MB): see _store.
_config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class _Outcome:
    transient: bool
    reason: str


def _associate(
    config: Config, destination: Destination, contexts: set[tuple[str, str]]
) -> Association:
    ae = AE(ae_title=config.node.ae_title)
    timeout = config.delivery.network_timeout_seconds
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class, transfer_syntax in sorted(contexts):
        syntaxes = list(
            dict.fromkeys([transfer_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        )
        ae.add_requested_context(sop_class, syntaxes)
    tls = None
    if destination.tls is not None:
        tls = (client_context(destination.tls), destination.host)
    return ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls
    )


def _association_failure(assoc: Association, destination: Destination) -> _Outcome:
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        result = getattr(primitive, "result", None)
        diagnostic = getattr(primitive, "diagnostic", None)
        transient = result == 0x02
        kind = "transiently" if transient else "permanently"
        return _Outcome(
            transient, f"association {kind} rejected by {where} (diagnostic {diagnostic})"
        )
    # pynetdicom reports a refused connection as an abort too; either way, try again later.
    return _Outcome(
        True, f"could not associate with {where} (connection refused, timed out or aborted)"
    )


class Sender:
    """Works off due deliveries; call :meth:`tick` periodically from one thread."""

    def __init__(self, config: Config, db: StateDB, audit: AuditLog | None = None) -> None:
        self.config = config
        self.db = db
        self.audit = audit

    def _audit(self, header: Dataset, name: str, failure: str | None = None) -> None:
        """A result acknowledged by destination ``name``, or failed for good."""
        destination = self.config.destinations.get(name)
        if self.audit is None or destination is None:
            return
        self.audit.result_sent(
            str(header.get("StudyInstanceUID", "")),
            str(header.get("SOPInstanceUID", "")),
            ae_title=self.config.node.ae_title,
            destination=destination.ae_title,
            address=destination.host,
            failure=failure,
        )

    def tick(self, now: float | None = None) -> int:
        """Attempt every due delivery; returns how many were delivered."""
        now = time.time() if now is None else now
        by_destination: dict[str, list[Delivery]] = defaultdict(list)
        for delivery in self.db.due_deliveries(now):
            by_destination[delivery.destination].append(delivery)
        delivered = 0
        for name, deliveries in by_destination.items():
            delivered += self._send_to(name, deliveries)
        return delivered

    def _send_to(self, name: str, deliveries: list[Delivery]) -> int:
        destination = self.config.destinations.get(name)
        if destination is None:
            for delivery in deliveries:
                self.db.mark_delivery_failed(
                    delivery.id, f"destination {name!r} is no longer in config.yaml"
                )
            return 0
        headers = {}
        for delivery in deliveries:
            try:
                headers[delivery.id] = dcmread(delivery.path, stop_before_pixels=True)
            except (OSError, ValueError, EOFError) as exc:
                self.db.mark_delivery_failed(delivery.id, f"cannot read {delivery.path}: {exc}")
        deliveries = [d for d in deliveries if d.id in headers]
        if not deliveries:
            return 0
        contexts = {
            (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in headers.values()
        }
        assoc = _associate(self.config, destination, contexts)
        if not assoc.is_established:
            outcome = _association_failure(assoc, destination)
            for delivery in deliveries:
                self._settle(delivery, outcome, headers[delivery.id])
            return 0
        delivered = 0
        try:
            for index, delivery in enumerate(deliveries):
                self.db.begin_sending(delivery.id)
                failure = self._store(assoc, delivery.path, headers[delivery.id])
                if failure is None:
                    self.db.mark_delivery_done(delivery.id)
                    self._audit(headers[delivery.id], name)
                    delivered += 1
                    logger.info(
                        "delivered %s to %s",
                        delivery.path.name,
                        name,
                        extra={"job_id": delivery.job_id, "destination": name},
                    )
                else:
                    self._settle(delivery, failure, headers[delivery.id])
                if not assoc.is_established:
                    lost = _Outcome(
                        True, f"association with {name} ended before all files were sent"
                    )
                    for remaining in deliveries[index + 1 :]:
                        self._settle(remaining, lost, headers[remaining.id])
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        return delivered

    def _store(self, assoc: Association, path: Path, header: Dataset) -> _Outcome | None:
        """C-STORE one file: as written when the destination accepted its transfer
        syntax, else decoded for pynetdicom to convert (e.g. to Implicit VR)."""
        syntax = header.file_meta.TransferSyntaxUID
        as_written = any(
            context.abstract_syntax == header.SOPClassUID and context.transfer_syntax == [syntax]
            for context in assoc.accepted_contexts
        )
        try:
            status = assoc.send_c_store(path if as_written else dcmread(path))
        except ValueError as exc:  # no accepted presentation context for this SOP class
            return _Outcome(False, f"refused: {exc}")
        if "Status" not in status:
            return _Outcome(True, "no response to C-STORE (timeout or abort)")
        code = int(status.Status)
        if code in _SUCCESS_OR_WARNING:
            return None
        comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
        transient = code & _OUT_OF_RESOURCES_MASK == _OUT_OF_RESOURCES
        return _Outcome(transient, f"C-STORE failed with status 0x{code:04X}{comment}")

    def _settle(self, delivery: Delivery, outcome: _Outcome, header: Dataset) -> None:
        now = time.time()
        give_up = now - delivery.created_at >= self.config.delivery.give_up_after_seconds
        if outcome.transient and not give_up:
            delay = min(
                self.config.delivery.first_retry_seconds * 2**delivery.attempts,
                self.config.delivery.max_retry_interval_seconds,
            )
            self.db.postpone_delivery(delivery.id, now + delay, outcome.reason)
            logger.warning(
                "delivery of %s to %s will be retried in %.0f s: %s",
                delivery.path.name,
                delivery.destination,
                delay,
                outcome.reason,
            )
            return
        reason = outcome.reason
        if outcome.transient:
            reason = f"gave up after {delivery.attempts + 1} attempts; last: {reason}"
        self.db.mark_delivery_failed(delivery.id, reason)
        self._audit(header, delivery.destination, reason)
        logger.error(
            "delivery of %s to %s failed: %s", delivery.path.name, delivery.destination, reason
        )


def echo(config: Config, name: str) -> str | None:
    """C-ECHO a configured destination; returns None on success, else the reason.

    Raises
    ------
    KeyError
        If ``name`` is not a configured destination.
    """
    destination = config.destinations.get(name)
    if destination is None:
        known = ", ".join(sorted(config.destinations)) or "none"
        raise KeyError(f"no destination named {name!r} in config.yaml (defined: {known})")
    ae = AE(ae_title=config.node.ae_title)
    ae.add_requested_context(_VERIFICATION)
    timeout = config.delivery.network_timeout_seconds
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return _association_failure(assoc, destination).reason
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        return "no response to C-ECHO"
    if int(status.Status) != 0:
        return f"C-ECHO failed with status 0x{int(status.Status):04X}"
    return None
