"""Retention with an injected clock: a real state DB, real spool and result files."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from node.cli import main
from node.config import RetentionSettings, StorageSettings
from node.disk_guard import DiskGuard
from node.dispatch import results_dir
from node.health import BrokerProbe
from node.metrics import NodeCollector
from node.retention import apply_removal, plan_cleanup, run_cleanup
from node.spool import Spool
from node.state import JobStateValues, PlannedJob, StateDB
from workers.contract import JobOutcome, JobRequest, Manifest, ManifestInstance

DAY = 86400.0
SETTINGS = RetentionSettings()  # 7 / 30 / 14 / 90 days
CT = "1.2.840.10008.5.1.4.1.1.2"


class Node:
    """A data folder with a state DB and a spool, as ``pacsnode run`` keeps them."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.db = StateDB(data_dir / "state.db")
        self.spool = Spool(data_dir / "spool")

    def receive(
        self, study: str, sop: str, content: bytes = b"", *, rerun_late: bool = True
    ) -> Path:
        series = f"{study}.1"
        written = self.spool.write(
            study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop,
            file_meta=b"", dataset=sop.encode() * 64 + content,
        )  # fmt: skip
        self.db.record_instance(
            sop_instance_uid=sop, sop_class_uid=CT, series_instance_uid=series,
            study_instance_uid=study, calling_ae_title="SCANNER", path=written.path,
            size=written.size, sha256=written.sha256, rerun_late=rerun_late,
        )  # fmt: skip
        return written.path

    def study(self, study: str, ending: str) -> int | None:
        """Two instances of ``study`` received and routed; its job left ``ending``."""
        for n in (1, 2):
            self.receive(study, f"{study}.1.{n}")
        series = f"{study}.1"
        self.db.mark_series_complete(series)
        if ending == "ignored":
            self.db.route_series(series, [], reason="no rule matches")
            return None
        (job_id,) = self.db.route_series(
            series, [PlannedJob("ct-tissue", "r", ["pacs"], lineage=study)]
        )
        manifest = Manifest(
            series_instance_uid=series,
            instances=(ManifestInstance(sop_instance_uid="1", path="/x", size=0, sha256="0" * 64),),
        )
        request = JobRequest(job_id=job_id, model="ct-tissue", manifest=manifest, output_dir="/o")
        self.db.mark_job_queued(job_id, f"task-{job_id}", request)
        self.db.mark_job_running(job_id)
        if ending == "running":
            return job_id
        result = results_dir(self.data_dir, job_id) / "sr.dcm"
        result.parent.mkdir(parents=True)
        result.write_bytes(b"SR")
        self.db.record_results(job_id, JobOutcome(status="ok"), {"pacs": [result]})
        (delivery,) = self.db.deliveries(job_id)
        if ending == "delivered":
            self.db.mark_delivery_done(delivery.id)
        elif ending == "failed":
            self.db.mark_delivery_failed(delivery.id, "gave up")
        return job_id

    def spooled(self, study: str) -> int:
        return len(list((self.spool.root / study).glob("*/*.dcm")))

    def rows(self, study: str) -> dict[str, int]:
        of_study = "study_instance_uid = ?"
        series = f"series_instance_uid IN (SELECT series_instance_uid FROM series WHERE {of_study})"
        jobs = f"job_id IN (SELECT id FROM jobs WHERE {of_study})"
        counts = {}
        for table, where in (
            ("studies", of_study),
            ("series", of_study),
            ("jobs", of_study),
            ("instances", series),
            ("deliveries", jobs),
        ):
            counts[table] = self.db.select(f"SELECT COUNT(*) FROM {table} WHERE {where}", (study,))[
                0
            ][0]
        return counts


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path / "data")


def test_retention_removes_inputs_results_and_records_by_age_and_keeps_busy_studies(
    node: Node,
) -> None:
    jobs = {
        study: node.study(study, study_ending)
        for study, study_ending in (
            ("1.1", "delivered"), ("1.2", "failed"), ("1.3", "ignored"),
            ("1.4", "results_ready"), ("1.5", "running"),
        )
    }  # fmt: skip
    # Sent again with other bytes (completion.late: keep): the first file is replaced.
    replaced = node.spool.root / "1.1" / "1.1.1"
    node.receive("1.1", "1.1.1.1", content=b"other", rerun_late=False)
    assert len(list(replaced.glob("1.1.1.1_*.dcm"))) == 2
    start = time.time()

    def run(days: float, dry_run: bool = False) -> list[tuple[str, str]]:
        done = run_cleanup(
            node.db, node.spool, node.data_dir, SETTINGS, now=start + days * DAY, dry_run=dry_run
        )
        return [(r.study_instance_uid, r.what) for r in done]

    def results_kept(study: str) -> bool:
        return results_dir(node.data_dir, jobs[study] or 0).exists()

    assert run(6.9) == []
    assert run(8) == [("1.1", "inputs")]
    assert node.spooled("1.1") == 0
    assert node.rows("1.1")["instances"] == 0
    assert node.rows("1.1")["jobs"] == 1  # the history stays
    assert results_kept("1.1")
    assert not (node.spool.root / "1.1").exists()  # the replaced copy and the folders too

    # A dry run lists what a pass would remove and removes nothing.
    later = [("1.2", "inputs"), ("1.2", "results"), ("1.3", "inputs")]
    assert sorted(run(15, dry_run=True)) == later
    assert (node.spooled("1.2"), node.spooled("1.3")) == (2, 2)
    assert results_kept("1.2")
    assert sorted(run(15)) == later
    assert (node.spooled("1.2"), node.spooled("1.3")) == (0, 0)
    assert not results_kept("1.2")

    assert run(31) == [("1.1", "results")]
    assert not results_kept("1.1")

    assert sorted(run(91)) == [("1.1", "records"), ("1.2", "records"), ("1.3", "records")]
    gone = {"studies": 0, "series": 0, "jobs": 0, "instances": 0, "deliveries": 0}
    for study in ("1.1", "1.2", "1.3"):
        assert node.rows(study) == gone
    # Their delivery attempts went with their deliveries; 1.4 has not tried yet.
    assert node.db.select("SELECT COUNT(*) FROM delivery_attempts")[0][0] == 0

    # A study with a delivery pending or a job running keeps everything, however old.
    assert run(1000) == []
    for study in ("1.4", "1.5"):
        assert node.spooled(study) == 2
        assert node.rows(study)["instances"] == 2
    assert results_kept("1.4")
    job = node.db.job(jobs["1.5"] or 0)
    assert job is not None
    assert job.state == JobStateValues.RUNNING

    # The spool still writes into folders retention removed (its cached folders).
    path = node.receive("1.1", "1.1.1.9")
    assert path.is_file()


def _counters(registry: CollectorRegistry) -> dict[tuple[str, tuple[str, ...]], float]:
    """The job and delivery counters and the stage histograms' counts, by labels."""
    wanted = {
        "pacsnode_jobs_total",
        "pacsnode_delivery_attempts_total",
        "pacsnode_stage_seconds_count",
    }
    return {
        (sample.name, tuple(sorted(sample.labels.values()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if sample.name in wanted
    }


def test_metrics_counters_do_not_go_down_when_retention_removes_records(node: Node) -> None:
    """Prometheus reads a counter that goes down as a restart; retention's removals are
    kept in the state DB (jobs, delivery attempts) and the histogram keeps what it saw."""
    node.study("1.1", "delivered")
    node.study("1.2", "failed")
    registry = CollectorRegistry()
    collector = NodeCollector(
        node.db, DiskGuard(node.data_dir, StorageSettings()),
        BrokerProbe(None, "redis://127.0.0.1:1/0"), {},
    )  # fmt: skip
    registry.register(collector)
    before = _counters(registry)
    assert before[("pacsnode_jobs_total", ("ct-tissue", "delivered"))] == 1
    assert before[("pacsnode_jobs_total", ("ct-tissue", "failed"))] == 1
    assert before[("pacsnode_delivery_attempts_total", ("failed", "pacs"))] == 1
    assert before[("pacsnode_stage_seconds_count", ("ct-tissue", "end_to_end"))] == 1
    assert before[("pacsnode_stage_seconds_count", ("ct-tissue", "queue_wait"))] == 2

    done = run_cleanup(node.db, node.spool, node.data_dir, SETTINGS, now=time.time() + 91 * DAY)
    assert {r.what for r in done} >= {"records"}
    assert node.db.select("SELECT COUNT(*) FROM jobs")[0][0] == 0
    assert _counters(registry) == before
    # A new study's job counts on top.
    node.study("1.3", "delivered")
    after = _counters(registry)
    assert after[("pacsnode_jobs_total", ("ct-tissue", "delivered"))] == 2
    assert after[("pacsnode_stage_seconds_count", ("ct-tissue", "end_to_end"))] == 2
    # After a restart the counters still hold the removed jobs and attempts.
    restarted = CollectorRegistry()
    restarted.register(NodeCollector(node.db, collector.disk_guard, collector.probe, {}))
    again = _counters(restarted)
    assert again[("pacsnode_jobs_total", ("ct-tissue", "failed"))] == 1
    assert again[("pacsnode_delivery_attempts_total", ("failed", "pacs"))] == 1


def test_a_study_active_again_after_planning_is_not_touched(node: Node) -> None:
    node.study("2.1", "delivered")
    (removal,) = plan_cleanup(node.db, SETTINGS, node.data_dir, time.time() + 8 * DAY)
    node.receive("2.1", "2.1.1.3")  # sent again: the series is receiving again
    assert not apply_removal(node.db, node.spool, node.data_dir, removal)
    assert node.spooled("2.1") == 3


def test_null_keeps_forever(node: Node) -> None:
    node.study("3.1", "delivered")
    keep = RetentionSettings(inputs_days=None, results_days=None, records_days=None)
    assert plan_cleanup(node.db, keep, node.data_dir, time.time() + 10_000 * DAY) == []


def test_pacsnode_cleanup_dry_run_prints_and_removes_nothing(
    node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node.study("4.1", "delivered")
    node.db.close()
    config = tmp_path / "config.yaml"
    config.write_text(f"node: {{data_dir: {node.data_dir}}}\n")
    week = time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() + 8 * DAY))
    assert main(["cleanup", "--config", str(config), "--dry-run", "--as-of", week]) == 0
    out = capsys.readouterr().out
    assert "would remove study 4.1: inputs (spooled instances); delivered, idle 8.0 days" in out
    assert "1 removals (dry run: nothing was removed)" in out
    assert node.spooled("4.1") == 2
    assert main(["cleanup", "--config", str(config), "--as-of", week]) == 0
    assert "removed study 4.1: inputs" in capsys.readouterr().out
    assert node.spooled("4.1") == 0
    with sqlite3.connect(node.data_dir / "state.db") as db:
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
