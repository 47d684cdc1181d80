"""The Storage SCP: C-ECHO and C-STORE for every storage SOP class.

pynetdicom's SCP, served by the faster acceptor of :mod:`node.transport`.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from node.config import Config
from node.disk_guard import DiskGuard
from node.handlers import (
    CompletionOnRelease,
    ScpReports,
    handle_association_request,
    handle_echo,
    handle_store,
    report_rejection,
)
from node.spool import Spool
from node.state import StateDB
from node.tls import server_context
from node.transport import use_acceptor

__all__ = ["ACCEPTED_TRANSFER_SYNTAXES", "start_scp"]

_VERIFICATION = "1.2.840.10008.1.1"

logger = logging.getLogger(__name__)

# Accepted as sent: we store the bytes and decode only in the worker.
ACCEPTED_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old devices)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
]


def start_scp(
    config: Config,
    spool: Spool,
    db: StateDB,
    disk_guard: DiskGuard,
    reports: ScpReports | None = None,
) -> list[ThreadedAssociationServer]:
    """Start listening on the configured port, with TLS if ``node.tls`` says so, and on
    its ``plain_port`` without (non-blocking); returns the servers. ``reports`` takes
    associations, refusals and instances for ``/metrics`` and the audit trail."""
    reports = reports or ScpReports(config.node.ae_title)
    ae = AE(ae_title=config.node.ae_title)
    ae.maximum_pdu_size = config.node.max_pdu_bytes
    ae.require_called_aet = True
    ae.network_timeout = config.node.network_timeout_seconds
    ae.acse_timeout = config.node.acse_timeout_seconds
    ae.dimse_timeout = config.node.dimse_timeout_seconds
    ae.maximum_associations = config.node.max_associations
    ae.add_supported_context(_VERIFICATION)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    completion = CompletionOnRelease(config, db)
    handlers: list[Any] = [
        (evt.EVT_REQUESTED, handle_association_request, [config, reports]),
        (evt.EVT_ACCEPTED, completion.watch, [reports]),
        (evt.EVT_REJECTED, report_rejection, [reports]),
        (evt.EVT_RELEASED, completion.released),
        (evt.EVT_ABORTED, completion.ended),
        (evt.EVT_CONN_CLOSE, completion.ended),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [spool, db, config, completion, disk_guard, reports]),
    ]
    tls = config.node.tls
    ports = [(config.node.port, server_context(tls) if tls is not None else None)]
    if tls is not None and tls.plain_port is not None:
        ports.append((tls.plain_port, None))
    servers = []
    for port, ssl_context in ports:
        server = ae.start_server(
            (config.node.bind_address, port),
            block=False,
            evt_handlers=handlers,
            ssl_context=ssl_context,
        )
        assert server is not None  # always returned when block=False
        use_acceptor(server, fast=config.node.fast_transport, on_tls_refused=reports.tls_refused)
        logger.info(
            "SCP %s listening on %s:%d%s",
            config.node.ae_title,
            config.node.bind_address,
            port,
            " (DICOM over TLS)" if ssl_context is not None else "",
        )
        servers.append(server)
    return servers
