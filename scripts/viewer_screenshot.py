"""The README's picture: ct-tissue's LABELMAP SEG of the real head CT (invesalius-examples)
rendered by cornerstone3D 5.14.0 in headless chromium (tests/viewer/render.js).

    python scripts/viewer_screenshot.py docs/viewer-example.png [--slice 60]

Needs what `make test` installs (chromium, nodejs, the npm packages in tests/viewer).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.dicom_factory import cranium_hu, write_ct_series
from tests.job_requests import job_request
from workers.outputs import OutputRequest, SegVariant
from workers.pipeline import run_job
from workers.series import load_series

VIEWER = REPO_ROOT / "tests" / "viewer"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--slice", type=int, default=60, help="slice of the 108 to show")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="viewer-shot-") as tmp:
        work = Path(tmp)
        hu, spacing = cranium_hu()
        write_ct_series(hu, work / "ct", spacing_mm=spacing, patient_id="HEAD",
                        series_description="Head CT (invesalius-examples)")  # fmt: skip
        labelmap = SegVariant(seg_type="labelmap", omit_empty_frames=True)
        outputs = OutputRequest(seg_variants=(labelmap,), sr_references=())
        outcome = run_job(job_request(work / "ct", "ct-tissue", work / "out", outputs=outputs))
        if outcome.status != "ok":
            raise SystemExit(f"ct-tissue failed: {outcome.reason}")
        sources = sorted((work / "ct").glob("*.dcm"))
        series = load_series(sources)
        job = {
            "sources": [str(p) for p in sources],
            "seg": outcome.files[0].path,
            "slice": str(series.datasets[args.slice].SOPInstanceUID),
            "voi": [-160, 240],
        }
        (work / "job.json").write_text(json.dumps(job))
        bundle = work / "render.js"
        subprocess.run(["node", "build.mjs", "cs-5.14.0", str(bundle), "render.js"],
                       cwd=VIEWER, check=True)  # fmt: skip
        run = subprocess.run(
            ["node", "screenshot.mjs", str(bundle), str(work / "job.json"), str(args.out.resolve())],
            cwd=VIEWER, check=True, capture_output=True, text=True,
        )  # fmt: skip
        shown = json.loads(run.stdout)
        if shown["errors"]:
            raise SystemExit(f"the viewer reported: {shown['errors']}")
        print(f"{args.out}: slice {args.slice}, segments {shown['labels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
