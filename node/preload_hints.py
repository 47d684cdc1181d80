"""Hints that let a worker decode a series while its quiet period runs.

A series' job is created when no instance has arrived for ``completion.quiet_seconds``;
the worker would only then read and decode the series. Once a series has been silent
for :func:`lull_seconds` (a quarter of the quiet period, at most 0.25 s), the node sends
the queue of each model a rule would give it a hint (``workers.contract.PRELOAD``)
naming the instances it has, and the worker loads them then (:mod:`workers.inputs`).
The hint expires with the quiet period's end plus a margin, so a busy worker drops it
rather than doing work its job no longer needs.

A series that keeps arriving in bursts is hinted again only once it has at least
doubled since its last hint, so its preloads add up to at most about twice one load of
the whole series.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import redis
from celery import Celery
from kombu.exceptions import KombuError

from models.base import InputKindValues
from models.registry import get_model_class
from node.config import Config
from node.routing import candidate_from_paths
from node.rules import route_series
from node.state import SeriesRecord, SeriesStateValues, StateDB
from workers.contract import PRELOAD

__all__ = ["PreloadHints", "lull_seconds"]

logger = logging.getLogger(__name__)

#: The longest lull before a hint, whatever the quiet period.
_MAX_LULL_SECONDS = 0.25


def lull_seconds(quiet_seconds: float) -> float:
    """How long a series must be silent before its hint goes."""
    return min(_MAX_LULL_SECONDS, quiet_seconds / 4)


class PreloadHints:
    """Sends each receiving series' hint once it falls silent (the node's main loop
    calls :meth:`send_due` every tick and sleeps no longer than :meth:`next_due`)."""

    def __init__(self, db: StateDB, celery_app: Celery) -> None:
        self.db = db
        self.app = celery_app
        #: Series -> how many instances its last hint named.
        self._hinted: dict[str, int] = {}
        #: Series -> its last instance's arrival when it was last considered.
        self._considered: dict[str, float] = {}

    def _due(self, config: Config) -> list[SeriesRecord]:
        """Receiving series with instances not considered yet (forgetting the others)."""
        receiving = self.db.series_in_state(SeriesStateValues.RECEIVING)
        uids = {s.series_instance_uid for s in receiving}
        self._hinted = {uid: n for uid, n in self._hinted.items() if uid in uids}
        self._considered = {uid: t for uid, t in self._considered.items() if uid in uids}
        if not config.worker.preload:
            return []
        return [
            s for s in receiving if self._considered.get(s.series_instance_uid) != s.last_received
        ]

    def send_due(self, config: Config, now: float | None = None) -> int:
        """Hint every series silent for the lull and grown since its last hint (to at
        least twice as many instances); returns how many hints went."""
        now = time.time() if now is None else now
        quiet = config.completion.quiet_seconds
        sent = 0
        for series in self._due(config):
            uid = series.series_instance_uid
            if now - series.last_received < lull_seconds(quiet):
                continue
            self._considered[uid] = series.last_received
            manifest = self.db.manifest(uid)
            count = 0 if manifest is None else len(manifest.instances)
            if manifest is None or count < 2 or count < 2 * self._hinted.get(uid, 0):
                continue
            self._hinted[uid] = count
            queues = _queues(config, Path(manifest.instances[0].path), count)
            instances = [i.model_dump(mode="json") for i in manifest.instances]
            expires_at = series.last_received + quiet + max(quiet, 1.0)
            for queue in queues:
                try:
                    self.app.send_task(
                        PRELOAD,
                        kwargs={"instances": instances},
                        queue=queue,
                        expires=datetime.fromtimestamp(expires_at, tz=UTC),
                        retry=False,  # a hint is not worth holding up the main loop
                    )
                except (redis.RedisError, KombuError, OSError) as exc:  # broker away
                    logger.debug("series %s not hinted: %s", uid, exc)
                    continue
                sent += 1
            if queues:
                logger.debug("series %s (%d instances) hinted to %s", uid, count, queues)
        return sent

    def next_due(self, config: Config) -> float | None:
        """When the next hint may be due (epoch seconds): the first receiving series
        with instances not considered yet falling silent for the lull; None if none."""
        lull = lull_seconds(config.completion.quiet_seconds)
        return min((s.last_received + lull for s in self._due(config)), default=None)


def _queues(config: Config, first: Path, count: int) -> list[str]:
    """The queues of the volume models a rule would give the series of ``first`` with
    ``count`` instances now."""
    candidate = candidate_from_paths("", [first])
    if candidate.header is None:
        return []
    queues: list[str] = []
    for routed in route_series(config.rules, candidate.header, count):
        try:
            model = get_model_class(routed.model)
        except KeyError:
            continue
        if model.input_kind != InputKindValues.IMAGE and model.queue not in queues:
            queues.append(model.queue)
    return queues
