"""Throughput of one worker: studies per hour, and how much of the time the model ran,
for the serial worker (``worker.overlap: false``) and the overlapping one (the default).

Usage::

    python benchmarks/throughput.py [--studies 20] [--slices 150] [--size 512]
                                    [--standin-seconds 0.3] [--models standin,ct-tissue]

``--studies`` chest phantoms (each its own study) are sent by dcmtk's storescu in one
association from a peer flagged ``complete_on_release``, so every job is queued at once
when it releases; the node (embedded Redis and worker) sends the results to a storescp.
The model is the stand-in (:mod:`tests.standin`: it sleeps ``--standin-seconds`` like a
network on a GPU, then thresholds) or ct-tissue. Times come from each job's stage
timeline in its outcome: the wall time runs from the first job's load to the last job's
end; the model is busy while a job holds the model stage.

The bar (issue #10): with the stand-in, the overlapping worker's studies/hour at least
1.5x the serial worker's on the same machine, and the model busy at least 80 % of the
time on a machine with 8 or more cores. Not a test: figures swing between machines.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from node.state import Job, JobStateValues
from tests.dicom_factory import chest_phantom, write_ct_series
from tests.integration.conftest import CT_RULE, ct_node_config
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, run_storescu
from tests.standin import STANDIN_MODEL, install_standin

FINISHED = {JobStateValues.DELIVERED, JobStateValues.FAILED}


def make_studies(root: Path, count: int, slices: int, size: int) -> list[Path]:
    """``count`` copies of one chest phantom, each with its own study and series UIDs."""
    spacing = (1.0, 358.4 / size, 358.4 / size)
    phantom = chest_phantom((slices, size, size), spacing_mm=spacing)
    folders = []
    for number in range(count):
        folder = root / f"study{number:02d}"
        write_ct_series(phantom.hu, folder, spacing_mm=spacing, patient_id=f"TPUT{number:02d}")
        folders.append(folder)
    return folders


def one_run(work: Path, studies: list[Path], model: str, overlap: bool,
            standin_seconds: float) -> dict[str, float]:  # fmt: skip
    """All studies through one node; the worker's figures."""
    models_dir = work / "models"
    install_standin(models_dir, standin_seconds)
    with StoreSCP(ae_title="DESTPACS") as destination:
        config = ct_node_config(
            work / "data",
            destination,
            models_dir=str(models_dir),
            # Only the release completes the series: with a short quiet period each
            # study would complete while the next is sent, and the jobs would come at
            # the rate storescu sends studies, not all at once.
            quiet_seconds=3600,
            worker={"overlap": overlap},
            peers=[{"ae_title": "SCANNER", "host": "127.0.0.1", "complete_on_release": True}],
        )
        config["rules"] = [dict(CT_RULE, models=[model])]
        with NodeProcess(work / "node", config) as node:
            files = [path for folder in studies for path in sorted(folder.glob("*.dcm"))]
            sent = run_storescu(
                "127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", files, timeout=3600
            )
            assert sent.returncode == 0, sent.stderr
            jobs = node.wait_for_jobs(len(studies), FINISHED, timeout=3600)
    failed = [f"job {j.id}: {j.reason}" for j in jobs if j.state != JobStateValues.DELIVERED]
    assert not failed, failed
    return figures(jobs)


def figures(jobs: list[Job]) -> dict[str, float]:
    outcomes = [job.result for job in jobs if job.result is not None]
    timelines = [outcome.stages_at for outcome in outcomes]
    wall = max(t["done"] for t in timelines) - min(t["load"] for t in timelines)
    busy = sum(outcome.timings_s["inference"] for outcome in outcomes)
    return {
        "studies/hour": len(timelines) / wall * 3600,
        "model busy": busy / wall,
        "wall": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--standin-seconds", type=float, default=0.3)
    parser.add_argument("--models", default=f"{STANDIN_MODEL},ct-tissue")
    args = parser.parse_args()
    os.environ.setdefault("TCP_NODELAY", "1")  # dcmtk stalls ~44 ms per C-STORE without it
    results: dict[tuple[str, bool], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="throughput-bench-") as tmp:
        root = Path(tmp)
        started = time.monotonic()
        studies = make_studies(root / "studies", args.studies, args.slices, args.size)
        print(f"wrote {args.studies} studies in {time.monotonic() - started:.0f} s", flush=True)
        for model in args.models.split(","):
            for overlap in (False, True):
                work = root / f"{model}-{'overlap' if overlap else 'serial'}"
                results[model, overlap] = one_run(
                    work, studies, model, overlap, args.standin_seconds
                )
                print(f"{model} {'overlapping' if overlap else 'serial'}: "
                      f"{results[model, overlap]}", flush=True)  # fmt: skip
    print(f"{platform.node()}: {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"{args.studies} studies of {args.slices}x{args.size}x{args.size} CT queued at once; "
          f"stand-in {args.standin_seconds} s")  # fmt: skip
    print(f"  {'model':<12} {'worker':<12} {'studies/h':>10} {'ratio':>6} {'model busy':>11} "
          f"{'wall':>8}")  # fmt: skip
    for (model, overlap), row in results.items():
        serial = results[model, False]["studies/hour"]
        print(f"  {model:<12} {'overlapping' if overlap else 'serial':<12} "
              f"{row['studies/hour']:>10.0f} {row['studies/hour'] / serial:>5.2f}x "
              f"{row['model busy']:>10.0%} {row['wall']:>7.1f}s")  # fmt: skip
    print("  bar: stand-in overlapping >= 1.5x serial; model busy >= 80 % with >= 8 cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
