"""End-to-end latency per stage: a CT sent by dcmtk's storescu to ``pacsnode run``, its
results received by dcmtk's storescp.

Usage::

    python benchmarks/e2e.py [--slices 300] [--size 512] [--repeat 2] [--quiet 1.0]
                             [--models ct-tissue,standin] [--standin-seconds 0.3]

A chest phantom of ``--slices`` x ``--size`` x ``--size`` is written once per run (a new
study each time) and sent to a node (embedded Redis and worker, rule: CT -> the model ->
the storescp), for ct-tissue and for the stand-in (:mod:`tests.standin`, a model that
takes a set time like a network on a GPU). Times come from the node's state DB (when the series' last instance
arrived, when the job was created and dispatched, when its results were collected), the
worker's own stage times in the job's outcome, storescu's end and the storescp's files.

The overhead is what pacsnode adds: last instance acknowledged (storescu returns) ->
last result file at the destination, minus the quiet period and the model's inference.
The bar (issue #10) is 1 s. Not a test: figures swing between machines.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pydicom import dcmread

from node.state import Job, JobStateValues, StateDB
from tests.dicom_factory import chest_phantom, write_ct_series
from tests.integration.conftest import CT_RULE, ct_node_config
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, run_storescu, wait_for
from tests.standin import STANDIN_MODEL, install_standin

STAGES = (
    "quiet period (last instance -> job created)",
    "dispatch (job created -> queued)",
    "queue wait + collection",
    "worker: load (read, check against the manifest, decode)",
    "worker: inference",
    "worker: results (SEG, check, SR)",
    "delivery (collected -> last file at destination)",
)
TOTAL = "total (last instance acknowledged -> last result at destination)"


def one_run(node: NodeProcess, destination: StoreSCP, folder: Path, slices: int, size: int,
            patient: str) -> dict[str, float]:  # fmt: skip
    """Send one study and measure its way through, stage by stage (seconds)."""
    spacing = (1.0, 358.4 / size, 358.4 / size)
    phantom = chest_phantom((slices, size, size), spacing_mm=spacing)
    write_ct_series(phantom.hu, folder, spacing_mm=spacing, patient_id=patient)
    study = str(dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    before = set(destination.received())
    sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", folder)
    acknowledged = time.time()
    assert sent.returncode == 0, sent.stderr

    def delivered() -> Job | None:
        done = [j for j in node.jobs() if j.study_instance_uid == study
                and j.state in (JobStateValues.DELIVERED, JobStateValues.FAILED)]  # fmt: skip
        return done[-1] if done else None

    job = wait_for(delivered, 600, f"study {study} delivered")
    assert job.state == JobStateValues.DELIVERED, job.reason
    db = StateDB(node.data_dir / "state.db")
    try:
        (series,) = db.series_of_study(study)
        deliveries = db.deliveries(job.id)
    finally:
        db.close()
    assert job.result is not None
    assert job.dispatched_at is not None
    new = [p for p in destination.wait_for_files(len(before) + len(deliveries)) if p not in before]
    arrived = max(p.stat().st_mtime for p in new)
    timings = job.result.timings_s
    collected = min(d.created_at for d in deliveries)
    worker = timings["total"]
    return {
        STAGES[0]: job.created_at - series.last_received,
        STAGES[1]: job.dispatched_at - job.created_at,
        STAGES[2]: collected - job.dispatched_at - worker,
        STAGES[3]: timings["load"],
        STAGES[4]: timings["inference"],
        STAGES[5]: timings["results"],
        STAGES[6]: arrived - collected,
        TOTAL: arrived - acknowledged,
        "inference": timings["inference"],
    }


def model_runs(
    work: Path, dest: StoreSCP, model: str, args: argparse.Namespace
) -> list[dict[str, float]]:
    """``--repeat`` studies through a node running ``model``, after one to warm it up."""
    install_standin(work / "models", args.standin_seconds)
    config = ct_node_config(
        work / "data", dest, quiet_seconds=args.quiet, models_dir=str(work / "models")
    )
    config["rules"] = [dict(CT_RULE, models=[model])]
    runs = []
    with NodeProcess(work / "node", config) as node:
        for run in range(args.repeat + 1):  # the first warms the worker up
            figures = one_run(node, dest, work / f"ct{run}", args.slices, args.size, f"E2E{run}")
            if run:
                runs.append(figures)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--quiet", type=float, default=1.0, help="completion.quiet_seconds")
    parser.add_argument("--models", default=f"ct-tissue,{STANDIN_MODEL}")
    parser.add_argument("--standin-seconds", type=float, default=0.3)
    args = parser.parse_args()
    os.environ.setdefault("TCP_NODELAY", "1")  # dcmtk stalls ~44 ms per C-STORE without it
    by_model = {}
    with (
        tempfile.TemporaryDirectory(prefix="e2e-bench-") as tmp,
        StoreSCP(ae_title="DESTPACS") as dest,
    ):
        for model in args.models.split(","):
            by_model[model] = model_runs(Path(tmp) / model, dest, model, args)
    print(f"{platform.node()}: {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"{args.slices}x{args.size}x{args.size} CT, quiet period {args.quiet} s, stand-in "
          f"{args.standin_seconds} s; median of {args.repeat} runs after a warm-up")  # fmt: skip
    models = list(by_model)
    print(f"  {'stage':<66} " + " ".join(f"{m:>10}" for m in models))
    for name in by_model[models[0]][0]:
        if name == "inference":
            continue
        cells = [statistics.median(r[name] for r in by_model[m]) for m in models]
        print(f"  {name:<66} " + " ".join(f"{c:>8.2f} s" for c in cells))
    overheads = [
        statistics.median(r[TOTAL] - args.quiet - r["inference"] for r in by_model[m])
        for m in models
    ]
    print(f"  {'overhead (total - quiet period - inference); bar 1 s':<66} "
          + " ".join(f"{c:>8.2f} s" for c in overheads))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
