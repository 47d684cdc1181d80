"""The web console in the node process: pages, a JSON API, health checks and metrics.

A Starlette app served by uvicorn on its own thread (:class:`ConsoleServer`), on
127.0.0.1 unless ``http.bind_address`` says otherwise. Pages are rendered on the server
(Jinja2), no build step. Reading needs nothing; the actions (retry or cancel a job,
re-send a delivery) need the bearer token from ``http.token_file``, sent as
``Authorization: Bearer …`` or as the ``token`` field of a form, and each is logged with
the client's address.

Routes: ``/`` dashboard, ``/studies`` (search, pages), ``/studies/{uid}``, ``/failures``,
``/jobs/{id}/preview.png``; ``/api/summary``, ``/api/studies``, ``/api/studies/{uid}``,
``/api/jobs/{id}``, ``/api/failures``, ``POST /api/jobs/{id}/retry``,
``POST /api/jobs/{id}/cancel``, ``POST /api/deliveries/{id}/resend``; ``/healthz``,
``/readyz``, ``/metrics``.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import numpy as np
import uvicorn
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route

from node import overview
from node.audit import MINOR_FAILURE, SECURITY_ALERT, AuditLog, Participant
from node.config import Config
from node.disk_guard import DiskGuard, format_bytes
from node.health import BrokerProbe, readiness
from node.state import IN_PROGRESS_JOB_STATES, StateDB

__all__ = ["Console", "ConsoleServer", "read_or_create_token"]

logger = logging.getLogger(__name__)


def read_or_create_token(path: Path) -> str:
    """The console's bearer token: read from ``path``, or made (random, 256 bits) and
    written there with mode 0600 if the file does not exist."""
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(token + "\n")
        logger.info("console token written to %s (mode 600)", path)
        return token
    if not token:
        raise ValueError(f"{path} is empty; delete it and a new token is made at start")
    return token


@dataclass
class Console:
    """What the console reads and acts on.

    ``db`` is the node's own connection (actions write through it); ``reader`` a
    read-only one for the pages, so a slow page never holds up the SCP. ``wake_sender``
    is called after a re-send, ``revoke`` with a cancelled job's Celery task id.
    """

    config: Config
    db: StateDB
    reader: StateDB
    disk_guard: DiskGuard
    probe: BrokerProbe
    registry: CollectorRegistry
    token: str
    scp_listening: Callable[[], bool]
    wake_sender: Callable[[], None]
    revoke: Callable[[str], object]
    audit: AuditLog | None = None

    # -- helpers ---------------------------------------------------------------------

    def _page(self, name: str, request: Request, **context: Any) -> HTMLResponse:
        template = _TEMPLATES.get_template(name)
        html = template.render(request=request, node=self.config.node.ae_title, **context)
        return HTMLResponse(html)

    def _banner(self) -> str | None:
        space = self.disk_guard.status()
        return f"New instances are refused: {space.describe()}" if space.low else None

    async def _authorised(self, request: Request) -> tuple[Response | None, dict[str, str]]:
        """(a 401/403 response or None, the form fields)."""
        fields: dict[str, str] = {}
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            body = (await request.body()).decode("utf-8", errors="replace")
            fields = {key: values[0] for key, values in parse_qs(body).items()}
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        given = given or fields.get("token", "")
        if not given:
            error = "this action needs the console token (Authorization: Bearer)"
            return _refusal(error, 401, fields.get("next")), fields
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            client = request.client.host if request.client else "?"
            logger.warning("console: refused %s from %s: wrong token", request.url.path, client)
            if self.audit is not None:
                self.audit.record(
                    SECURITY_ALERT, outcome=MINOR_FAILURE,
                    description=f"console action {request.url.path} refused: wrong token",
                    participants=[Participant("console", client, requestor=True)],
                )  # fmt: skip
            return _refusal("wrong token", 403, fields.get("next")), fields
        return None, fields

    async def _act(
        self, request: Request, what: str, action: Callable[[], tuple[str, str]]
    ) -> Response:
        """Run an authorised action (it returns what it did and the study's UID); a form
        gets redirected back, a client JSON. Done actions go to the audit trail."""
        refused, fields = await self._authorised(request)
        if refused is not None:
            return refused
        client = request.client.host if request.client else "?"
        try:
            done, study_uid = await run_in_threadpool(action)
        except KeyError as exc:
            return JSONResponse({"error": exc.args[0]}, status_code=404)
        except ValueError as exc:
            return JSONResponse({"error": exc.args[0]}, status_code=409)
        logger.warning("console: %s by %s: %s", what, client, done)
        if self.audit is not None:
            self.audit.action(f"{what}: {done}", study_uid, user="console", address=client)
        if "next" in fields and fields["next"].startswith("/"):
            return RedirectResponse(
                fields["next"] + "?" + urlencode({"done": done}), status_code=303
            )
        return JSONResponse({"ok": True, "done": done})

    def _note(self, request: Request, what: str) -> str:
        client = request.client.host if request.client else "?"
        return f"{what} from the console by {client} at {datetime.now():%Y-%m-%d %H:%M:%S}"

    # -- pages -----------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        figures = overview.dashboard(self.reader)
        view = self.probe.view
        space = self.disk_guard.status()
        return {
            **figures,
            "disk": {
                "free_bytes": space.free_bytes,
                "total_bytes": space.total_bytes,
                "threshold_bytes": space.threshold_bytes,
                "refusing": space.low,
            },
            "queues": view.queue_depth,
            "workers_alive": view.workers_alive(),
            "broker_error": view.broker_error,
        }

    async def dashboard(self, request: Request) -> Response:
        summary = await run_in_threadpool(self.summary)
        space = summary["disk"]
        banner = self._banner() if space["refusing"] else None
        return self._page("dashboard.html", request, s=summary, banner=banner)

    async def studies_page(self, request: Request) -> Response:
        found = await run_in_threadpool(self._studies, request)
        query = dict(request.query_params)
        return self._page(
            "studies.html", request, found=found, q=query.get("q", ""), date=query.get("date", "")
        )

    def _studies(self, request: Request) -> dict[str, Any]:
        query = request.query_params
        try:
            page = int(query.get("page", "1"))
        except ValueError:
            page = 1
        return overview.studies(
            self.reader, text=query.get("q", ""), study_date=query.get("date", ""), page=page
        )

    async def study_page(self, request: Request) -> Response:
        uid = request.path_params["uid"]
        study = await run_in_threadpool(overview.study_detail, self.reader, uid)
        if study is None:
            return HTMLResponse(f"no study {uid} on this node", status_code=404)
        moving = any(j["state"] in IN_PROGRESS_JOB_STATES for j in study["jobs"])
        return self._page(
            "study.html", request, study=study, moving=moving, done=request.query_params.get("done")
        )

    async def failures_page(self, request: Request) -> Response:
        found = await run_in_threadpool(overview.failures, self.reader)
        return self._page(
            "failures.html", request, f=found, done=request.query_params.get("done"),
            banner=self._banner(),
        )  # fmt: skip

    async def preview(self, request: Request) -> Response:
        job_id = int(request.path_params["job_id"])
        try:
            path = await run_in_threadpool(self._preview, job_id)
        except LookupError as exc:
            return PlainTextResponse(str(exc), status_code=404)
        return FileResponse(path, media_type="image/png")

    def _preview(self, job_id: int) -> Path:
        """The job's overlay key images side by side in one PNG (``pacsnode render``'s
        pictures), made on first request and kept beside the job's results."""
        from node.dispatch import results_dir
        from workers.render import RenderError, render_job

        job = self.reader.job(job_id)
        if job is None:
            raise LookupError(f"there is no job {job_id}")
        folder = results_dir(self.config.node.data_dir, job.id)
        target = folder / "preview.png"
        if target.is_file():
            return target
        pictures = folder / "preview"
        try:
            files = render_job(job.source_paths, folder, pictures, self.config.results.notice)
        except (RenderError, OSError, ValueError) as exc:
            raise LookupError(f"job {job_id} has no preview: {exc}") from exc
        images = [np.asarray(Image.open(path).convert("RGB")) for path in files]
        height = max(image.shape[0] for image in images)
        padded = [np.pad(i, ((0, height - i.shape[0]), (0, 4), (0, 0))) for i in images]
        Image.fromarray(np.concatenate(padded, axis=1)).save(target)
        return target

    # -- API -------------------------------------------------------------------------

    async def api_summary(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self.summary))

    async def api_studies(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self._studies, request))

    async def api_study(self, request: Request) -> Response:
        uid = request.path_params["uid"]
        study = await run_in_threadpool(overview.study_detail, self.reader, uid)
        if study is None:
            return JSONResponse({"error": f"there is no study {uid}"}, status_code=404)
        return JSONResponse(study)

    async def api_job(self, request: Request) -> Response:
        job_id = int(request.path_params["job_id"])
        job = await run_in_threadpool(overview.job_detail, self.reader, job_id)
        if job is None:
            return JSONResponse({"error": f"there is no job {job_id}"}, status_code=404)
        return JSONResponse(job)

    async def api_failures(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(overview.failures, self.reader))

    async def retry(self, request: Request) -> Response:
        job_id = int(request.path_params["job_id"])

        def action() -> tuple[str, str]:
            job = self.db.retry_job(job_id)
            return f"job {job.id} ({job.model}) will run again", job.study_instance_uid

        return await self._act(request, "retry", action)

    async def cancel(self, request: Request) -> Response:
        job_id = int(request.path_params["job_id"])
        note = self._note(request, "cancelled")

        def action() -> tuple[str, str]:
            before = self.db.job(job_id)
            job = self.db.cancel_job(job_id, note)
            if before is not None and before.task_id:
                self.revoke(before.task_id)
            return f"job {job.id} ({job.model}) cancelled", job.study_instance_uid

        return await self._act(request, "cancel", action)

    async def resend(self, request: Request) -> Response:
        delivery_id = int(request.path_params["delivery_id"])
        note = self._note(request, "re-send requested")

        def action() -> tuple[str, str]:
            delivery = self.db.resend_delivery(delivery_id, note)
            self.wake_sender()
            job = self.db.job(delivery.job_id)
            done = f"delivery {delivery.id} ({delivery.path.name} to {delivery.destination}) sent again"
            return done, job.study_instance_uid if job is not None else ""

        return await self._act(request, "re-send", action)

    # -- probes ----------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(self, request: Request) -> Response:
        checks = await run_in_threadpool(
            readiness,
            scp_listening=self.scp_listening,
            probe=self.probe,
            disk_guard=self.disk_guard,
            db=self.db,
        )
        failing = sorted(name for name, check in checks.items() if not check["ok"])
        body = {"ready": not failing, "failing": failing, "checks": checks}
        return JSONResponse(body, status_code=503 if failing else 200)

    async def metrics(self, request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, self.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def app(self) -> Starlette:
        int_id = "{job_id:int}"
        return Starlette(
            routes=[
                Route("/", self.dashboard),
                Route("/studies", self.studies_page),
                Route("/studies/{uid}", self.study_page),
                Route("/failures", self.failures_page),
                Route(f"/jobs/{int_id}/preview.png", self.preview),
                Route("/api/summary", self.api_summary),
                Route("/api/studies", self.api_studies),
                Route("/api/studies/{uid}", self.api_study),
                Route(f"/api/jobs/{int_id}", self.api_job),
                Route("/api/failures", self.api_failures),
                Route(f"/api/jobs/{int_id}/retry", self.retry, methods=["POST"]),
                Route(f"/api/jobs/{int_id}/cancel", self.cancel, methods=["POST"]),
                Route("/api/deliveries/{delivery_id:int}/resend", self.resend, methods=["POST"]),
                Route("/healthz", self.healthz),
                Route("/readyz", self.readyz),
                Route("/metrics", self.metrics),
            ]
        )


def _refusal(error: str, status: int, back: str | None) -> Response:
    """A refused action: JSON for a client, a page for a button (which forgets the
    token it kept, so the next press asks again)."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if back is None or not back.startswith("/"):
        return JSONResponse({"error": error}, status_code=status, headers=headers)
    html = _TEMPLATES.get_template("refused.html").render(error=error, back=back)
    return HTMLResponse(html, status_code=status, headers=headers)


def _when(epoch: float | None) -> str:
    return "" if epoch is None else datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 60:
        return f"{value:.2f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


_TEMPLATES = Environment(loader=PackageLoader("node", "templates"), autoescape=select_autoescape())
_TEMPLATES.filters.update(when=_when, seconds=_seconds, size=format_bytes)
_TEMPLATES.globals["now"] = time.time


class ConsoleServer:
    """uvicorn serving the console on its own thread.

    The socket is bound here, before the thread starts, so a port already in use is an
    ``OSError`` for the caller (the node logs it and goes on receiving).
    """

    def __init__(self, app: Starlette, bind_address: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in bind_address else socket.AF_INET
        # IPPROTO_TCP named, so that asyncio sets TCP_NODELAY on each connection (it
        # checks the protocol): without it a kept-alive connection waits 40 ms for the
        # client's delayed ACK between a response's head and its body.
        self.socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((bind_address, port))
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="console", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.socket.close()
