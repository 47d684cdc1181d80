"""A faster acceptor for pynetdicom 3.0: the same protocol code, without its polling.

pynetdicom 3.0 polls with 1 ms sleeps in both threads of an association, copies each PDU
several times, and goes through pydicom for every C-STORE command and response; at a
scanner's pace that is most of the time per instance (benchmarks/ingest.py). The classes
here override exactly those steps, each saying what it replaces and why; the state
machine, negotiation, timeouts and everything the event handlers see stay upstream's.
Anything unusual (a handler bound to raw PDU or DIMSE events, an error comment, a
C-STORE from a C-MOVE) takes upstream's path. :func:`use_acceptor` switches them on
(``node.fast_transport``, the default) only for the pynetdicom series they were written
against; either way each connection gets the network timeout as its read timeout.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

import pynetdicom
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.pdu_primitives import (
    A_ABORT,
    A_ASSOCIATE,
    A_P_ABORT,
    A_RELEASE,
    P_DATA,
)
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

__all__ = ["use_acceptor"]

logger = logging.getLogger(__name__)

# The pynetdicom release the overrides below were written against and checked with.
_PYNETDICOM_SERIES = "3.0."

# pynetdicom's reactors check their timers and queues once per loop, and sleep this long
# between loops when idle; ours wait at most this long, for data or a message.
_DUL_IDLE_SECONDS = 0.001
_REACTOR_IDLE_SECONDS = 0.001
# The server attribute holding what to call, with the client's address and the reason,
# when a TLS handshake fails.
_ON_TLS_REFUSED = "pacsnode_on_tls_refused"
# What a PDU's buffer starts at (the largest PDUs dcmtk and pynetdicom send by default
# fit); it grows as more arrives.
_FIRST_BUFFER_BYTES = 4 * 1024 * 1024
# Our copy of the association loop logs where upstream's does.
_PYNETDICOM_LOGGER = logging.getLogger("pynetdicom.association")


# A P-DATA-TF PDU, and the state machine event for receiving one (PS3.8 9.3.5, 9.2).
_P_DATA_TF_TYPE = 0x04
_P_DATA_TF_EVENT = "Evt10"

_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


class _AssociationSocket(AssociationSocket):
    """pynetdicom's socket, reading a PDU with as few system calls as the kernel allows.

    Upstream ``recv`` reads 4 KiB at a time into a growing bytearray: 32 calls and
    copies for each 128 KiB PDU that dcmtk sends. Here one buffer takes the whole PDU,
    allocated up to :data:`_FIRST_BUFFER_BYTES` and doubled only as the bytes arrive:
    the length in a PDU's header is the peer's word, and a header claiming 4 GiB must
    not make the node allocate 4 GiB.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(min(nr_bytes, _FIRST_BUFFER_BYTES))
        nr_read = 0
        while nr_read < nr_bytes:
            if nr_read == len(buffer):
                buffer.extend(bytes(min(len(buffer), nr_bytes - len(buffer))))
            with memoryview(buffer) as view:
                count = sock.recv_into(view[nr_read:])
            if not count:  # connection closed: return what we have, as upstream does
                break
            nr_read += count
        if nr_read < len(buffer):
            del buffer[nr_read:]
        return buffer


class _WakeableDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, waiting on its socket instead of sleeping 1 ms.

    Upstream sleeps ``_run_loop_delay`` (1 ms) whenever its event queue is empty: each
    PDU that arrives, and each response our C-STORE handler queues, waits for the sleep
    to end. That is about half of the time per instance when a scanner sends a series.
    Here the loop's own sleep is zero and the idle wait happens in
    :meth:`_is_transport_event` instead, in ``select()`` on the peer socket and on a
    socket pair that :meth:`send_pdu` writes to, for at most the same 1 ms, so the
    ARTIM and idle timers are checked as often as before. The state machine, PDU
    decoding and everything else are upstream's.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._run_loop_delay = 0.0
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._wake_lock = threading.Lock()
        self._wake_closed = False

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, struct.error) as exc:
            # pynetdicom's decoder chokes on a malformed message (a command set without
            # its Command Field, say) in this thread: the association ends here, as it
            # would upstream, with one line instead of a traceback on stderr.
            peer = self.assoc.requestor.address
            logger.warning(
                "association from %s ended: malformed data (%s: %s)", peer, type(exc).__name__, exc,
                extra={"peer_host": peer},
            )  # fmt: skip
        finally:
            with self._wake_lock:
                self._wake_closed = True
                self._wake_reader.close()
                self._wake_writer.close()

    def send_pdu(self, primitive: A_ASSOCIATE | A_RELEASE | A_ABORT | A_P_ABORT | P_DATA) -> None:
        super().send_pdu(primitive)
        with self._wake_lock:
            if not self._wake_closed:
                # Full of wake-ups already: the reactor will look anyway.
                with contextlib.suppress(BlockingIOError):
                    self._wake_writer.send(b"\0")

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """Decode a P-DATA-TF PDU without copying its values; others as upstream does.

        Upstream copies each 128 KiB PDU four times on its way to the DIMSE provider
        (``bytes()``, two slices, the PDV value); here the PDV values are views of the
        received buffer, which the DIMSE provider copies once into the message. Handlers
        bound to the raw-PDU events, and any PDU that does not parse, get upstream's path.
        """
        if (
            bytestream[0] != _P_DATA_TF_TYPE
            or self.assoc.get_handlers(evt.EVT_DATA_RECV)
            or self.assoc.get_handlers(evt.EVT_PDU_RECV)
        ):
            return cast(tuple[Any, str], super()._decode_pdu(bytestream))
        pdu = P_DATA_TF()
        view = memoryview(bytestream)
        offset = 6  # PDU type, reserved, PDU length (PS3.8 9.3.5)
        end = len(bytestream)
        while offset < end:
            if offset + 5 > end:
                return cast(tuple[Any, str], super()._decode_pdu(bytestream))
            (item_length,) = struct.unpack_from(">I", bytestream, offset)
            if item_length < 2 or offset + 4 + item_length > end:
                return cast(tuple[Any, str], super()._decode_pdu(bytestream))
            item = PresentationDataValueItem()
            item.presentation_context_id = bytestream[offset + 4]
            # Message control header and fragment (PS3.8 9.3.5.1, E.2), not copied.
            value: Any = view[offset + 5 : offset + 4 + item_length]
            item.presentation_data_value = value
            pdu.presentation_data_value_items.append(item)
            offset += 4 + item_length
        return pdu, _P_DATA_TF_EVENT

    def _is_transport_event(self) -> bool:
        if (
            self.event_queue.empty()
            and self.to_provider_queue.empty()
            and self.state_machine.current_state != "Sta13"
            and self._wait_for_peer_or_user(_DUL_IDLE_SECONDS)
        ):
            # Upstream's check for this case, without asking select() a second time.
            self._read_pdu_data()
            return True
        return bool(super()._is_transport_event())

    def _wait_for_peer_or_user(self, timeout: float) -> bool:
        """Wait until the peer sent data or the user queued a primitive; True for the peer."""
        readers: list[socket.socket] = [self._wake_reader]
        peer = self.socket.socket if self.socket is not None else None
        if peer is not None:
            readers.append(peer)
        try:
            ready, _, _ = select.select(readers, [], [], timeout)
        except (OSError, ValueError):
            return False  # the peer socket closed under us; upstream's check reports it
        if self._wake_reader in ready:
            with contextlib.suppress(BlockingIOError):
                while self._wake_reader.recv(4096):
                    pass
        return peer is not None and peer in ready


def _implicit_element(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element (PS3.5 7.1.3), as command sets are encoded."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _implicit_uid(tag: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    return _implicit_element(tag, value + b"\0" if len(value) % 2 else value)


def _encode_c_store_rsp(
    sop_class_uid: str | None, message_id: int, status: int, sop_instance_uid: str | None
) -> bytes:
    """A C-STORE-RSP command set without Offending Element or Error Comment (PS3.7 9.3.1.2).

    Byte for byte what pynetdicom encodes for the same response.
    """
    elements = b"".join(
        (
            _implicit_uid(0x00000002, sop_class_uid) if sop_class_uid else b"",
            _implicit_element(0x00000100, struct.pack("<H", 0x8001)),  # C-STORE-RSP
            _implicit_element(0x00000120, struct.pack("<H", message_id)),
            _implicit_element(0x00000800, struct.pack("<H", 0x0101)),  # no data set
            _implicit_element(0x00000900, struct.pack("<H", status)),
            _implicit_uid(0x00001000, sop_instance_uid) if sop_instance_uid else b"",
        )
    )
    return _implicit_element(0x00000000, struct.pack("<I", len(elements))) + elements


# The command set of a plain C-STORE-RQ (PS3.7 9.3.1.1): group length, Affected SOP Class
# UID, Command Field, Message ID, Priority, Command Data Set Type, Affected SOP Instance
# UID. One from a C-MOVE adds the Move Originator elements and takes upstream's path.
_C_STORE_RQ_TAGS = frozenset((0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000))


def _command_elements(encoded: bytes) -> dict[int, bytes] | None:
    """The elements of an Implicit VR Little Endian command set, by element number."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset < len(encoded):
        if offset + 8 > len(encoded):
            return None
        group, element, length = struct.unpack_from("<HHI", encoded, offset)
        offset += 8
        if group != 0x0000 or element in elements or offset + length > len(encoded):
            return None
        elements[element] = encoded[offset : offset + length]
        offset += length
    return elements


def _command_uid(value: bytes) -> UID | None:
    """A UI value as pydicom decodes it (trailing NULs and spaces dropped); None if odd."""
    if b"\\" in value or not value.isascii():
        return None
    uid = value.decode("ascii").rstrip("\0 ")
    return UID(uid) if uid else None


def _message_to_primitive(message: DIMSEMessage) -> Any:
    """``message.message_to_primitive()``, without pydicom for a plain C-STORE-RQ.

    Upstream converts every command element through pydicom, about 0.2 ms per instance
    while the association waits. A C-STORE-RQ with exactly the plain elements, each of
    the expected length, is read from its encoded command set here and set through the
    same primitive setters (and their validation); any other message goes to upstream.
    """
    if type(message) is C_STORE_RQ and message._data_set_path is None:
        elements = _command_elements(message.encoded_command_set.getvalue())
        if (
            elements is not None
            and elements.keys() == _C_STORE_RQ_TAGS
            and all(len(elements[e]) == 2 for e in (0x0100, 0x0110, 0x0700, 0x0800))
        ):
            sop_class_uid = _command_uid(elements[0x0002])
            sop_instance_uid = _command_uid(elements[0x1000])
            if sop_class_uid is not None and sop_instance_uid is not None:
                primitive = C_STORE()
                primitive.AffectedSOPClassUID = sop_class_uid
                (primitive.MessageID,) = struct.unpack("<H", elements[0x0110])
                (primitive.Priority,) = struct.unpack("<H", elements[0x0700])
                primitive.AffectedSOPInstanceUID = sop_instance_uid
                primitive.DataSet = message.data_set
                primitive._context_id = message.context_id
                primitive._dataset_path = message._data_set_path
                primitive._dataset_file = message._data_set_file
                return primitive
    return type(message).message_to_primitive(message)


class _DIMSEServiceProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, converting plain C-STORE messages without pydicom.

    Requests: see :func:`_message_to_primitive`. Responses: upstream builds each one as
    a pydicom dataset of every C-STORE-RSP element, fills it, and encodes it once to
    learn its length and again to send it, about as much CPU as receiving the instance.
    A response with only the usual elements, one fragment long, is encoded here
    directly; anything else (an error comment, a handler bound to EVT_DIMSE_SENT, a tiny
    peer PDU) goes through upstream.
    """

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:
            # Upstream fills this message and then calls its message_to_primitive();
            # this instance attribute takes precedence over that method.
            message = DIMSEMessage()
            message.message_to_primitive = functools.partial(  # type: ignore[method-assign]
                _message_to_primitive, message
            )
            self.message = message
        super().receive_primitive(primitive)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.OffendingElement is None
            and primitive.ErrorComment is None
            and primitive.Status is not None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = _encode_c_store_rsp(
                primitive.AffectedSOPClassUID,
                primitive.MessageIDBeingRespondedTo,
                primitive.Status,
                primitive.AffectedSOPInstanceUID,
            )
            max_pdu = self.maximum_pdu_size
            if not max_pdu or len(command) <= max_pdu - 6:
                pdata = P_DATA()
                # Message control header 0x03: command, last fragment (PS3.8 E.2).
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


class _Association(Association):
    """An acceptor association that waits for messages instead of polling every 1 ms.

    Its DUL is a :class:`_WakeableDUL`, and :meth:`_run_reactor` is upstream's loop
    with its ``time.sleep(0.001)`` replaced by a wait on the DIMSE message queue, for at
    most the same 1 ms, so a C-STORE request is served as soon as its last PDU arrives.
    """

    def __init__(self, ae: AE, mode: str) -> None:
        super().__init__(ae, mode)
        # Replace upstream's providers, which nothing has used yet.
        self.dul = _WakeableDUL(self)
        self.dimse = _DIMSEServiceProvider(self)
        # The setter gives the new DUL's idle timer the network timeout (upstream set
        # it on the DUL just replaced; the new one would wait its default 60 s).
        self.network_timeout = ae.network_timeout

    def _wait_for_msg(self, timeout: float) -> None:
        """Return once a DIMSE message is queued, or after `timeout`; take nothing."""
        messages = self.dimse.msg_queue
        with messages.not_empty:  # the Condition that Queue.put notifies
            if not messages.queue:
                messages.not_empty.wait(timeout)

    def _run_reactor(self) -> None:
        # pynetdicom 3.0 Association._run_reactor; only the first line of the loop differs.
        self._is_paused = False
        while not self._kill:
            self._wait_for_msg(_REACTOR_IDLE_SECONDS)

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                _PYNETDICOM_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                _PYNETDICOM_LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                _PYNETDICOM_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class _TimedRequestHandler(RequestHandler):
    """Upstream's handler, with a read timeout on the connection's socket.

    pynetdicom reads a PDU once its first bytes arrived, blocking until the rest has: a
    peer that sends a header and then nothing held the association's thread forever.
    With the network timeout on the socket, that read fails after it, and the
    association closes (upstream's path for a connection lost mid-PDU).
    """

    def handle(self) -> None:
        connection = cast(socket.socket, self.request)
        connection.settimeout(self.ae.network_timeout)
        if isinstance(connection, ssl.SSLSocket):
            # Here, on the association's own thread (see _accept_without_handshake).
            try:
                connection.do_handshake()
            except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
                # Closed before a word of TLS: a port check (a load balancer, a probe).
                logger.debug("connection from %s closed before TLS", self.client_address[0])
                return
            except (OSError, ssl.SSLError) as exc:
                host, reason = self.client_address[0], str(getattr(exc, "reason", None) or exc)
                logger.warning(
                    "refused a TLS connection from %s: %s", host, reason,
                    extra={"peer_host": host},
                )  # fmt: skip
                on_refused = getattr(self.server, _ON_TLS_REFUSED, None)
                if on_refused is not None:
                    on_refused(host, reason)
                return
        super().handle()


def _accept_without_handshake(
    server: ThreadedAssociationServer,
) -> tuple[socket.socket, tuple[str, int]]:
    """``ThreadedAssociationServer.get_request``, leaving the TLS handshake to the
    association's thread: upstream shakes hands in the one thread that accepts every
    connection, so one client that connects and says nothing stopped the SCP."""
    connection, address = cast(socket.socket, server.socket).accept()
    if server.ssl_context:
        connection = server.ssl_context.wrap_socket(
            connection, server_side=True, do_handshake_on_connect=False
        )
    return connection, address


class _RequestHandler(_TimedRequestHandler):
    """Upstream's ``_create_association``, with our association and socket classes."""

    def _create_association(self) -> Association:
        server = self.server
        assoc = _Association(self.ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(_AssociationSocket(assoc, client_socket=cast(socket.socket, self.request)))

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        # Upstream deep-copies these (about 16 ms for our ~170 contexts) in case the AE's
        # contexts change while the association runs; ours never change after start_scp,
        # and negotiation only reads them.
        assoc.acceptor.supported_contexts = list(server.contexts)
        assoc.requestor.address_info = self.remote

        for event in server._handlers:
            if event.is_intervention and server._handlers[event]:
                assoc.bind(event, *server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in server._handlers[event]:
                    handler = cast(Any, handler)
                    assoc.bind(event, handler[0], handler[1])
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            # Upstream binds these to every association; they format each PDU and DIMSE
            # message for DEBUG lines that would be dropped.
            for event, handler in _STANDARD_LOG_HANDLERS:
                assoc.unbind(event, handler)
        return assoc


def _no_forced_collection() -> None:
    """In place of upstream's ``service_actions``: it ran a full ``gc.collect()`` every
    60 turns of the accept loop (every 30 s), a quarter of a second of a core each time
    in the node's process, most of an idle node's CPU. Python's own collector frees the
    reference cycles of ended associations."""


def use_acceptor(
    server: ThreadedAssociationServer,
    *,
    fast: bool,
    on_tls_refused: Callable[[str, str], object] | None = None,
) -> bool:
    """Serve new associations of ``server`` with the classes above (``fast``), or with
    pynetdicom's own with only the read timeout and the deferred TLS handshake added;
    True if the fast ones serve. ``on_tls_refused(host, reason)`` hears of each failed
    TLS handshake.

    For any pynetdicom other than the series they were written against, the fast
    classes are not used (and a warning says so).
    """
    # socketserver builds one handler per connection from this class.
    server.RequestHandlerClass = _TimedRequestHandler
    server.service_actions = _no_forced_collection  # type: ignore[method-assign]
    setattr(server, _ON_TLS_REFUSED, on_tls_refused)
    server.get_request = functools.partial(_accept_without_handshake, server)  # type: ignore[method-assign]
    if not fast:
        return False
    if not pynetdicom.__version__.startswith(_PYNETDICOM_SERIES):
        logger.warning(
            "pynetdicom %s: the SCP runs without the ingest speed-ups written for %sx",
            pynetdicom.__version__,
            _PYNETDICOM_SERIES,
        )
        return False
    server.RequestHandlerClass = _RequestHandler
    return True
