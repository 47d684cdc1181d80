"""``pacsnode run``: the node process, which owns the state DB and drives every stage.

Stages run in order on each tick of the main loop (complete -> route -> dispatch ->
collect); the SCP and the sender run on their own threads because they wait on the
network. No stage waits for a fixed tick: the loop wakes when the first receiving series
falls quiet, polls the result backend often while jobs are in flight, and wakes the
sender as soon as a job's results are recorded. Start-up first reconciles: it records
spooled files the DB missed, requeues unfinished jobs, and lets completeness re-check
every series still receiving. SIGHUP reads the model folders and config.yaml again
(:meth:`Node._reload`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom.transport import ThreadedAssociationServer

from models.registry import checkpoint, model_fingerprints, reload_models, rollback
from node.audit import AuditLog
from node.completeness import geometry_of, mark_quiet_series_complete
from node.config import Config, ConfigError, folder_problems, load_config
from node.console import Console, ConsoleServer, read_or_create_token
from node.disk_guard import DiskGuard
from node.dispatch import Dispatcher
from node.handlers import ScpReports
from node.health import BrokerProbe
from node.metrics import NodeCollector, ReceiveCounters
from node.preload_hints import PreloadHints
from node.retention import run_cleanup
from node.routing import route_complete_studies
from node.scp import start_scp
from node.sender import Sender
from node.services import EmbeddedRedis, WorkerProcess, broker_url
from node.spool import Spool
from node.state import StateDB
from workers.celery_app import app as celery_app
from workers.celery_app import configure as configure_celery
from workers.contract import file_digest

__all__ = ["Node", "recover_spool"]

logger = logging.getLogger(__name__)

#: The longest the main loop and the sender sleep (a retry coming due, a reload).
_TICK_SECONDS = 0.5
#: How often the main loop asks the result backend while jobs are queued or running.
_COLLECT_SECONDS = 0.05
#: Settings the SCP and the child processes start with: SIGHUP leaves them for a restart.
_RESTART_KEYS = ("node", "http", "peers", "accept_unknown_peers", "completion", "broker", "worker",
                 "models_dir")  # fmt: skip
_RECOVERED_FROM = "(recovered)"
#: The first retention pass waits this long after start (recovery first).
_FIRST_CLEANUP_SECONDS = 60.0


def recover_spool(spool: Spool, db: StateDB, *, rerun_late: bool = True) -> int:
    """Record instances that reached the spool but not the DB (a crash between the two).

    Their peers got no Success and may send them again; keeping them is harmless (an
    identical re-send is then a duplicate). A file of an instance the DB already knows is
    an older or a not-yet-recorded copy (a re-send with other bytes); the DB's record
    stands, and the peer, which got no Success for the newer one, sends it again.
    """
    spool.clean_incoming()
    known = db.known_sop_instance_uids()
    recovered = 0
    for instance in spool.scan():
        if instance.sop_instance_uid in known:
            continue
        try:
            header = dcmread(instance.path, stop_before_pixels=True)
            sop_class_uid = str(header.SOPClassUID)
            size, sha256 = file_digest(instance.path)
        except (OSError, ValueError, EOFError, AttributeError, InvalidDicomError) as exc:
            logger.warning("spooled file %s is unreadable: %s", instance.path, exc)
            continue
        db.record_instance(
            sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=sop_class_uid,
            series_instance_uid=instance.series_instance_uid,
            study_instance_uid=instance.study_instance_uid,
            calling_ae_title=_RECOVERED_FROM,
            path=instance.path,
            size=size,
            sha256=sha256,
            geometry=geometry_of(header),
            rerun_late=rerun_late,
        )
        known.add(instance.sop_instance_uid)
        recovered += 1
    if recovered:
        logger.warning("recorded %d spooled instances the state DB had missed", recovered)
    return recovered


class Node:
    """The running node.

    Parameters
    ----------
    config
        The validated configuration.
    config_path
        The file it came from (handed to the embedded worker).
    """

    def __init__(self, config: Config, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path.resolve()
        self.stopping = threading.Event()
        self.reload_requested = threading.Event()
        #: The models' fingerprints as the worker loaded them (at start, or last reload).
        self.fingerprints: dict[str, str] = {}
        self.rerun_late = config.completion.late == "rerun"
        data_dir = config.node.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.db = StateDB(data_dir / "state.db")
        self.spool = Spool(data_dir / "spool")
        self.disk_guard = DiskGuard(self.spool.root, config.storage)
        self.redis = EmbeddedRedis(data_dir) if config.embedded_broker else None
        self.worker = WorkerProcess(self.config_path) if config.embedded_broker else None
        configure_celery(
            broker_url(config),
            job_timeout_seconds=config.worker.job_timeout_seconds,
            lease_seconds=config.worker.lease_seconds,
        )
        self.dispatcher = Dispatcher(config, self.db, celery_app)
        self.preload_hints = PreloadHints(self.db, celery_app)
        self.audit = AuditLog(data_dir / "audit", config.audit)
        self.sender = Sender(config, self.db, self.audit)
        #: Set when deliveries may have come due (results recorded), or to stop.
        self.wake_sender = threading.Event()
        self.registry = CollectorRegistry()
        self.counters = ReceiveCounters(self.registry)
        self.scp_reports = ScpReports(config.node.ae_title, self.counters, self.audit)
        self.probe = BrokerProbe(celery_app, broker_url(config))

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested.set()

    def _reload(self) -> None:
        """SIGHUP: read the model folders and config.yaml again, without a restart.

        The rules, destinations, results, delivery and storage settings take effect for
        the next job, delivery and instance (a rule switched from shadow to live, a new destination); jobs
        already created keep what they were dispatched with. Settings the SCP and the
        processes were started with (node, peers, completion, broker, worker,
        models_dir) need a restart; a change to them is logged and left for then. The
        embedded worker is restarted only when a model's files changed (their
        fingerprints at start or at the last reload). An invalid file is refused and the
        running configuration and models are kept.
        """
        state = checkpoint()
        names = reload_models()
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            rollback(state)
            logger.error(
                "%s not reloaded, the running configuration and models stay: %s",
                self.config_path,
                "; ".join(exc.errors),
            )
            return
        pending = [
            key for key in _RESTART_KEYS if getattr(config, key) != getattr(self.config, key)
        ]
        if pending:
            logger.warning(
                "%s changed in %s; restart pacsnode run to apply",
                ", ".join(pending),
                self.config_path,
            )
        if config.models_dir != self.config.models_dir:
            rollback(state)  # the running models folder stays until the restart
            names = reload_models()
        for problem in folder_problems(config):
            logger.warning("%s (the other models run)", problem)
        logger.info("models reloaded: %s", ", ".join(names))
        applied = config.model_copy(update={key: getattr(self.config, key) for key in pending})
        self.config = self.dispatcher.config = self.sender.config = applied
        self.disk_guard.settings = applied.storage
        logger.info("configuration reloaded from %s", self.config_path)
        fingerprints = model_fingerprints()
        if fingerprints != self.fingerprints and self.worker is not None:
            logger.info("model files changed: restarting the worker")
            pid = self.worker.pid
            self.worker.stop()
            self.worker.start()
            self._worker_replaced(pid)
        self.fingerprints = fingerprints

    def _worker_replaced(self, pid: int | None) -> None:
        """The embedded worker ``pid`` died or was restarted: it no longer counts as
        alive (readiness waits for its successor's answer), and its jobs go back in line."""
        if pid is not None:
            self.probe.forget_worker(pid)
        self.dispatcher.requeue_unfinished("requeued after the worker was restarted")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        self.stopping.set()

    def run(self) -> None:
        """Start everything, serve until SIGINT/SIGTERM, then stop children cleanly."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_reload)
        logger.info("effective configuration: %s", self.config.redacted())
        self.audit.application(
            started=True, ae_title=self.config.node.ae_title, config_path=self.config_path
        )
        for problem in folder_problems(self.config):
            logger.warning("%s (the other models run)", problem)
        self.fingerprints = model_fingerprints()
        recover_spool(self.spool, self.db, rerun_late=self.rerun_late)
        for delivery in self.db.settle_interrupted_deliveries():
            logger.warning(
                "the node stopped while sending %s to %s; sending it again (the destination "
                "may receive this SOP Instance twice)",
                delivery.path.name,
                delivery.destination,
                extra={"job_id": delivery.job_id, "destination": delivery.destination},
            )
        if self.redis is not None:
            self.redis.start()
        if self.worker is not None:
            self.worker.start()
        requeued = self.dispatcher.requeue_unfinished("requeued after the node restarted")
        if requeued:
            logger.warning("requeued %d unfinished jobs", requeued)
        servers = start_scp(self.config, self.spool, self.db, self.disk_guard, self.scp_reports)
        sender_thread = threading.Thread(target=self._send_loop, name="sender", daemon=True)
        sender_thread.start()
        console = self._start_console(servers)
        cleanup = threading.Thread(target=self._cleanup_loop, name="retention", daemon=True)
        cleanup.start()
        try:
            while not self.stopping.wait(self._next_tick_in()):
                self._tick()
        finally:
            if console is not None:
                console.stop()
            self.probe.stop()
            logger.info("stopping: SCP")
            for server in servers:
                server.shutdown()
            self.wake_sender.set()
            sender_thread.join(timeout=self.config.delivery.network_timeout_seconds + 5)
            if self.worker is not None:
                self.worker.stop()
            if self.redis is not None:
                self.redis.stop()
            self.db.close()
            self.audit.application(
                started=False, ae_title=self.config.node.ae_title, config_path=self.config_path
            )
            self.audit.close()
            logger.info("stopped")

    def _start_console(self, scp: list[ThreadedAssociationServer]) -> ConsoleServer | None:
        """The web console, API, health checks and metrics (``http:``); a port in use is
        logged and the node goes on receiving without them."""
        settings = self.config.http
        if not settings.enabled:
            return None
        assert settings.token_file is not None  # load_config fills it in
        reader = StateDB(self.db.path, read_only=True)
        folders = {"spool": self.spool.root, "results": self.config.node.data_dir / "results"}
        self.registry.register(NodeCollector(reader, self.disk_guard, self.probe, folders))
        console = Console(
            config=self.config,
            db=self.db,
            reader=reader,
            disk_guard=self.disk_guard,
            probe=self.probe,
            registry=self.registry,
            token=read_or_create_token(settings.token_file),
            scp_listening=lambda: all(s.socket is not None and s.socket.fileno() >= 0 for s in scp),
            wake_sender=self.wake_sender.set,
            revoke=lambda task_id: celery_app.control.revoke(task_id),
            audit=self.audit,
        )
        try:
            server = ConsoleServer(console.app(), settings.bind_address, settings.port)
        except OSError as exc:
            logger.error(
                "console not started on %s:%d: %s (DICOM goes on)",
                settings.bind_address,
                settings.port,
                exc,
            )
            return None
        server.start()
        self.probe.start()
        logger.info("console on http://%s:%d/", settings.bind_address, server.port)
        return server

    def _tick(self) -> None:
        try:
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self._reload()
            mark_quiet_series_complete(self.db, self.config.completion.quiet_seconds)
            route_complete_studies(
                self.db, self.config.rules, rerun_late=self.rerun_late, on_routed=self._received
            )
            if self.worker is not None:
                pid = self.worker.pid
                if self.worker.check():
                    self._worker_replaced(pid)
            self.dispatcher.dispatch_pending()
            if self.dispatcher.collect():
                self.wake_sender.set()
            self.preload_hints.send_due(self.config)
        except Exception:
            # A broker outage or a DB hiccup must not stop the SCP; the next tick retries.
            logger.exception("pipeline tick failed; retrying")
            time.sleep(_TICK_SECONDS)

    def _received(self, study_instance_uid: str) -> None:
        """A study was received whole and routed: the audit trail records it."""
        series = self.db.series_of_study(study_instance_uid)
        self.audit.study_received(
            study_instance_uid,
            ae_title=self.config.node.ae_title,
            senders=sorted({s.calling_ae_title for s in series}),
            instances=sum(self.db.instance_count(s.series_instance_uid) for s in series),
        )

    def _next_tick_in(self) -> float:
        """Seconds until the main loop has work: soon while jobs are in flight, else when
        the first receiving series falls quiet or is due a preload hint (at most
        :data:`_TICK_SECONDS`)."""
        try:
            if self.db.jobs_in_flight():
                return _COLLECT_SECONDS
            deadlines = [
                self.db.next_quiet_deadline(self.config.completion.quiet_seconds),
                self.preload_hints.next_due(self.config),
            ]
        except Exception:
            logger.exception("cannot read the state DB; retrying")
            return _TICK_SECONDS
        deadline = min((d for d in deadlines if d is not None), default=None)
        if deadline is None:
            return _TICK_SECONDS
        return min(_TICK_SECONDS, max(deadline - time.time() + 0.001, 0.0))

    def _cleanup_loop(self) -> None:
        """Retention (:mod:`node.retention`): a pass a minute after start, then every
        ``retention.interval_minutes`` (as configured now: SIGHUP applies)."""
        wait = _FIRST_CLEANUP_SECONDS
        while not self.stopping.wait(wait):
            try:
                run_cleanup(
                    self.db, self.spool, self.config.node.data_dir, self.config.retention,
                    audit=self.audit,
                )  # fmt: skip
            except Exception:
                logger.exception("retention pass failed; trying again at the next one")
            wait = self.config.retention.interval_minutes * 60

    def _send_loop(self) -> None:
        while not self.stopping.is_set():
            self.wake_sender.wait(_TICK_SECONDS)
            self.wake_sender.clear()
            if self.stopping.is_set():
                return
            try:
                self.sender.tick()
            except Exception:
                logger.exception("sender tick failed; retrying")
