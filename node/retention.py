"""Retention: nothing stays on the node longer than it is needed.

Patient data must not stay on an AI node for months, and a node that keeps everything
fills its disk. A cleanup pass (every ``retention.interval_minutes`` in ``pacsnode run``,
or ``pacsnode cleanup``) looks at each study that is idle — no series still receiving
or waiting for routing, no job waiting, queued, running or with results not yet sent,
no delivery pending — and, counted from its last activity (an instance received, a job
or a delivery settled):

- removes its **inputs** (its spool folder, copies replaced by a re-send with other
  bytes included) after ``inputs_days`` when its jobs
  were delivered, after ``failed_days`` when a job failed or was cancelled or no model
  ran on it (ignored, skipped);
- removes each job's **results** folder after ``results_days`` (``failed_days`` for a
  failed study);
- removes its **records** (every DB row of the study) after ``records_days``, with any
  file still left.

A study that is not idle keeps everything, whatever its age. Files go first, inside the
state DB transaction that then drops their rows (:meth:`node.state.StateDB.remove_study_data`),
so an instance of the study arriving meanwhile waits, and a crash half-way leaves rows
whose files are gone, which the next pass removes again. Each removal is logged by
study. A study sent again after its inputs went is stored and routed anew; a job whose
input is unchanged is not run again.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from node.audit import AuditLog
from node.config import RetentionSettings
from node.dispatch import results_dir
from node.spool import Spool
from node.state import StateDB

__all__ = ["Removal", "apply_removal", "plan_cleanup", "run_cleanup"]

logger = logging.getLogger(__name__)

_DAY = 86400.0


@dataclass(frozen=True)
class Removal:
    """One thing the cleanup pass removes from one study, and why."""

    study_instance_uid: str
    what: Literal["inputs", "results", "records"]
    outcome: str  # delivered, failed or ignored (StudyActivity.outcome)
    idle_since: float
    job_ids: tuple[int, ...] = ()  # whose results folders go ("results")

    def describe(self, now: float) -> str:
        idle = (now - self.idle_since) / _DAY
        what = {
            "inputs": "inputs (spooled instances)",
            "results": f"results of job{'s' if len(self.job_ids) > 1 else ''} "
            + ", ".join(str(i) for i in self.job_ids),
            "records": "records (every row of the study in the state DB)",
        }[self.what]
        return f"study {self.study_instance_uid}: {what}; {self.outcome}, idle {idle:.1f} days"


def _expired(days: float | None, idle_since: float, now: float) -> bool:
    return days is not None and now - idle_since >= days * _DAY


def plan_cleanup(
    db: StateDB, settings: RetentionSettings, data_dir: Path, now: float | None = None
) -> list[Removal]:
    """What a cleanup pass at ``now`` removes (nothing is changed)."""
    now = time.time() if now is None else now
    removals = []
    for study in db.study_activity():
        if study.busy:
            continue
        delivered = study.outcome == "delivered"
        if _expired(settings.records_days, study.idle_since, now):
            removals.append(
                Removal(study.study_instance_uid, "records", study.outcome, study.idle_since)
            )
            continue
        files_days = settings.inputs_days if delivered else settings.failed_days
        if study.has_inputs and _expired(files_days, study.idle_since, now):
            removals.append(
                Removal(study.study_instance_uid, "inputs", study.outcome, study.idle_since)
            )
        results_days = settings.results_days if delivered else settings.failed_days
        kept = tuple(j for j in study.job_ids if results_dir(data_dir, j).exists())
        if kept and _expired(results_days, study.idle_since, now):
            removals.append(
                Removal(study.study_instance_uid, "results", study.outcome, study.idle_since, kept)
            )
    return removals


def apply_removal(db: StateDB, spool: Spool, data_dir: Path, removal: Removal) -> bool:
    """Remove what ``removal`` names; False (nothing removed) if the study was active
    again since it was planned."""
    if removal.what == "results":
        if not db.study_idle_since(removal.study_instance_uid, removal.idle_since):
            return False
        for job_id in removal.job_ids:
            shutil.rmtree(results_dir(data_dir, job_id), ignore_errors=True)
        return True

    def remove_files() -> None:
        spool.remove_study(removal.study_instance_uid)
        if removal.what == "records":
            for job_id in db.job_ids_of_study(removal.study_instance_uid):
                shutil.rmtree(results_dir(data_dir, job_id), ignore_errors=True)

    return db.remove_study_data(
        removal.study_instance_uid,
        removal.idle_since,
        remove_files,
        records=removal.what == "records",
    )


def run_cleanup(
    db: StateDB,
    spool: Spool,
    data_dir: Path,
    settings: RetentionSettings,
    *,
    now: float | None = None,
    dry_run: bool = False,
    audit: AuditLog | None = None,
) -> list[Removal]:
    """One cleanup pass; returns what was (with ``dry_run``: would be) removed, each
    removal recorded in ``audit``."""
    now = time.time() if now is None else now
    done = []
    for removal in plan_cleanup(db, settings, data_dir, now):
        if dry_run:
            done.append(removal)
        elif apply_removal(db, spool, data_dir, removal):
            logger.info("retention removed %s", removal.describe(now))
            if audit is not None:
                audit.action(
                    f"retention removed the study's {removal.what}",
                    removal.study_instance_uid, user="retention", removal=True,
                )  # fmt: skip
            done.append(removal)
    return done
