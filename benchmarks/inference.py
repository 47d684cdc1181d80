"""Inference time: MONAI's stock recipe against pacsnode's worker path, same network, same CT.

Usage::

    python benchmarks/inference.py [--slices 64] [--size 512] [--repeat 2]

A chest phantom (``tests.dicom_factory.chest_phantom``, ``--slices`` x ``--size`` x
``--size``) is written as a CT series and decoded once with ``workers.series.load_series``.
Two networks then segment that volume, each in two ways:

- ``ct-bone-demo``: the shipped bundle. pacsnode loads it with
  ``models.registry.get_segmentation_model``; the stock recipe builds ``network_def`` from the bundle's
  ``configs/inference.json`` with ``monai.bundle.ConfigParser`` and loads ``models/model.pt``.
- ``unet``: a MONAI UNet, channels (16, 32, 64, 128, 256), strides (2, 2, 2, 2),
  ``num_res_units=2``, 1 in / 2 out, random (seeded) weights. For pacsnode it is written as
  a temporary bundle folder (configs, ``models/model.pt``, ``pacsnode.yaml``) and loaded by
  ``models.bundle``'s loader, so pacsnode's own code runs it; the stock recipe builds the
  same UNet and loads the same weights.

The stock recipe: ``ScaleIntensityRange`` on the CPU, then
``monai.inferers.sliding_window_inference`` in fp32 with ``sw_batch_size=1`` and the same
``roi_size`` and ``overlap``, the model in ``eval()`` under ``torch.inference_mode()``, then
the argmax. pacsnode's path is ``model.predict(volume)``: its preprocessing, sliding window
with the bundle's ``sw_batch_size`` and precision, and argmax. Both are timed from the
decoded float32 volume to the uint8 label map on the CPU, on CUDA if available, else on the
CPU. Model loading is not timed.

Last, the whole worker job (``workers.pipeline.run_job``) runs on the series files with
``ct-bone-demo``; its ``timings_s`` (load, inference, results, total) are reported, with
its ``inference`` split into preprocess, sliding window and postprocess by timestamps
taken around ``monai.inferers.sliding_window_inference`` (wrapped for the purpose; pacsnode
exposes no public preprocessing step).

Then the faithfulness table: the Model Zoo ``spleen_ct_segmentation`` configuration
(``tests/data/model_zoo``, its own UNet with seeded weights) on the same volume by
pacsnode's fast path (``inference.chain: auto``, which reproduces its transforms) and by
the bundle's own chain (``inference.chain: bundle``: MONAI runs its preprocessing,
SupervisedEvaluator and postprocessing with ``Invertd``), beside ``monai.bundle``'s own
run of the configuration on the DICOM files (ITKReader; its time includes reading the
files, which pacsnode's paths do not), with how far their label maps agree.

Every measurement runs once as a warm-up and then ``--repeat`` times; the best counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import numpy.typing as npt
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import monai.inferers
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.networks.nets import UNet
from monai.transforms import ScaleIntensityRange

from models.base import SegmentationModel, Volume
from models.bundle import INFERENCE_FILE, METADATA_FILE, WEIGHTS_FILE, read_bundle
from models.network import BUNDLES_DIR, network_model_class, window_batch_size
from models.registry import get_segmentation_model
from models.spec import SPEC_FILE, ModelSpec
from tests import model_zoo
from tests.dicom_factory import chest_phantom, write_ct_series
from tests.job_requests import job_request
from workers.pipeline import run_job
from workers.series import load_series

logger = logging.getLogger("benchmarks.inference")

BUNDLE_NAME = "ct-bone-demo"
UNET_NAME = "unet-bench"
UNET_CHANNELS = (16, 32, 64, 128, 256)
UNET_STRIDES = (2, 2, 2, 2)
UNET_SEED = 20240601
SLICE_SPACING_MM = 1.0
#: Field of view across rows and columns; pixel spacing is this over ``--size``.
FIELD_OF_VIEW_MM = 358.4

# The stock recipe's own functions, kept before any wrapping below.
_SLIDING_WINDOW_INFERENCE: Callable[..., Any] = monai.inferers.sliding_window_inference


@dataclass(frozen=True)
class Settings:
    """Sliding-window settings of one network; the stock recipe keeps sw_batch_size 1, fp32."""

    roi_size: tuple[int, int, int]
    overlap: float
    sw_batch_size: int
    precision: str
    a_min: float
    a_max: float
    b_min: float
    b_max: float


@dataclass(frozen=True)
class Timing:
    """One run from float32 volume to uint8 label map."""

    seconds: float
    sliding_window_seconds: float


@dataclass(frozen=True)
class Row:
    """The best run of one recipe on one network."""

    network: str
    tool: str
    best: Timing


@dataclass
class SlidingWindowClock:
    """Entry and exit times of each wrapped ``sliding_window_inference`` call."""

    device: torch.device
    spans: list[tuple[float, float]] = field(default_factory=list)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = _SLIDING_WINDOW_INFERENCE(*args, **kwargs)
        synchronize(self.device)
        self.spans.append((start, time.perf_counter()))
        return result


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so time stamps mean what they say."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def clocked_sliding_window(device: torch.device) -> Iterator[SlidingWindowClock]:
    """Wrap ``monai.inferers.sliding_window_inference`` (which ``NetworkRunner.sliding_window``
    imports at call time) with a clock."""
    clock = SlidingWindowClock(device)
    with mock.patch("monai.inferers.sliding_window_inference", new=clock):
        yield clock


# --- the networks ---------------------------------------------------------------------


def bundle_settings(path: Path, device: torch.device) -> Settings:
    """What pacsnode's loader reads from a bundle folder, for this device."""
    info = read_bundle(path)
    window = info.preprocessing.intensity
    if window is None or info.roi_size is None:
        raise ValueError(f"{path}: the benchmark needs a segmentation bundle with a window.")
    return Settings(
        roi_size=info.roi_size,
        overlap=info.overlap,
        sw_batch_size=window_batch_size(info, device.type),
        precision=info.spec.inference.precision,
        a_min=window.a_min,
        a_max=window.a_max,
        b_min=window.b_min,
        b_max=window.b_max,
    )


def stock_bundle_network(path: Path, device: torch.device) -> torch.nn.Module:
    """``network_def`` of a bundle with its ``models/model.pt``, as a MONAI user builds it."""
    parser = ConfigParser()
    parser.read_meta(path / METADATA_FILE)
    parser.read_config(path / INFERENCE_FILE)
    net: torch.nn.Module = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(path / WEIGHTS_FILE, map_location=device, weights_only=True))
    return net.to(device).eval()


def unet_network_def() -> dict[str, Any]:
    """The benchmark UNet as a bundle ``network_def``."""
    return {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": list(UNET_CHANNELS),
        "strides": list(UNET_STRIDES),
        "num_res_units": 2,
    }


def write_unet_bundle(
    folder: Path,
    *,
    roi_size: tuple[int, int, int],
    sw_batch_size: int,
    overlap: float,
    precision: str,
) -> Path:
    """Write the seeded UNet as a bundle folder that ``models.bundle`` can load.

    The intensity window and label codes are copied from the shipped ``ct-bone-demo``.

    Returns
    -------
    Path
        The bundle folder ``folder / UNET_NAME``.
    """
    shipped = read_bundle(BUNDLES_DIR / BUNDLE_NAME)
    path = folder / UNET_NAME
    (path / "configs").mkdir(parents=True)
    (path / "models").mkdir()
    metadata = {
        "version": "0.0.1",
        "name": "benchmark UNet (random weights)",
        "description": "Random weights, for timing only.",
        "network_data_format": {
            "outputs": {"pred": {"channel_def": {"0": "background", "1": "foreground"}}}
        },
    }
    (path / METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    inference = {
        "network_def": unet_network_def(),
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(roi_size),
            "sw_batch_size": sw_batch_size,
            "overlap": overlap,
        },
    }
    (path / INFERENCE_FILE).write_text(json.dumps(inference, indent=2), encoding="utf-8")
    shipped_spec = shipped.spec
    spec = ModelSpec.model_validate(
        {
            "queue": "gpu",
            "accepts": {"modalities": ["CT"], "min_slices": 2},
            "preprocessing": {
                "intensity": shipped.preprocessing.intensity.model_dump()
                if shipped.preprocessing.intensity
                else None
            },
            "inference": {
                "roi_size": list(roi_size),
                "sw_batch_size": sw_batch_size,
                "overlap": overlap,
                "precision": precision,
            },
            "labels": {1: shipped_spec.labels[1].model_dump()},
        }
    )
    (path / SPEC_FILE).write_text(
        yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True)), encoding="utf-8"
    )
    torch.manual_seed(UNET_SEED)
    arguments = {k: v for k, v in unet_network_def().items() if k != "_target_"}
    torch.save(UNet(**arguments).state_dict(), path / WEIGHTS_FILE)
    return path


# --- the two recipes ------------------------------------------------------------------


def stock_predict(
    net: torch.nn.Module,
    voxels: npt.NDArray[np.float32],
    settings: Settings,
    device: torch.device,
) -> tuple[npt.NDArray[np.uint8], Timing]:
    """MONAI's stock recipe: CPU intensity scaling, fp32 sliding window, batch 1, argmax."""
    start = time.perf_counter()
    scale = ScaleIntensityRange(
        a_min=settings.a_min,
        a_max=settings.a_max,
        b_min=settings.b_min,
        b_max=settings.b_max,
        clip=True,
    )
    with torch.inference_mode():
        scaled = scale(torch.from_numpy(voxels))
        image = scaled.as_tensor() if isinstance(scaled, MetaTensor) else torch.as_tensor(scaled)
        x = image.to(torch.float32)[None, None].to(device)
        synchronize(device)
        window_start = time.perf_counter()
        logits = _SLIDING_WINDOW_INFERENCE(x, settings.roi_size, 1, net, overlap=settings.overlap)
        synchronize(device)
        window_seconds = time.perf_counter() - window_start
        labels = torch.argmax(logits, dim=1)[0].to(torch.uint8).cpu().numpy()
    seconds = time.perf_counter() - start
    return np.ascontiguousarray(labels, dtype=np.uint8), Timing(seconds, window_seconds)


def pacsnode_predict(
    model: SegmentationModel, volume: Volume, device: torch.device
) -> tuple[npt.NDArray[np.uint8], Timing]:
    """pacsnode's path: ``model.predict`` as the worker calls it."""
    with clocked_sliding_window(device) as clock:
        start = time.perf_counter()
        labels = model.predict(volume)
        seconds = time.perf_counter() - start
    window_seconds = sum(end - begin for begin, end in clock.spans)
    return labels, Timing(seconds, window_seconds)


def best_of(run: Callable[[], Timing], repeat: int, what: str) -> Timing:
    """The fastest of `repeat` runs (the caller has warmed up)."""
    best: Timing | None = None
    for i in range(1, repeat + 1):
        timing = run()
        logger.info(
            "%s run %d/%d: %.3f s (sliding window %.3f s)",
            what,
            i,
            repeat,
            timing.seconds,
            timing.sliding_window_seconds,
        )
        if best is None or timing.seconds < best.seconds:
            best = timing
    assert best is not None
    return best


def compare(
    network: str,
    stock_net: torch.nn.Module,
    model: SegmentationModel,
    volume: Volume,
    settings: Settings,
    device: torch.device,
    repeat: int,
) -> tuple[list[Row], float]:
    """Both recipes on one network, each warmed up once; returns the rows and the fraction
    of voxels where the two label maps agree."""
    # The warm-up runs, whose label maps are compared.
    stock_labels, stock_warm = stock_predict(stock_net, volume.voxels, settings, device)
    pacsnode_labels, pacsnode_warm = pacsnode_predict(model, volume, device)
    logger.info(
        "%s warm-up: stock %.3f s, pacsnode %.3f s",
        network,
        stock_warm.seconds,
        pacsnode_warm.seconds,
    )
    agreement = float(np.mean(stock_labels == pacsnode_labels))
    stock = best_of(
        lambda: stock_predict(stock_net, volume.voxels, settings, device)[1],
        repeat,
        f"{network} stock",
    )
    pacsnode = best_of(
        lambda: pacsnode_predict(model, volume, device)[1], repeat, f"{network} pacsnode"
    )
    return [Row(network, "MONAI stock", stock), Row(network, "pacsnode", pacsnode)], agreement


# --- the whole worker job -------------------------------------------------------------


@dataclass(frozen=True)
class JobSplit:
    """One ``run_job``: its own ``timings_s`` and the split of its ``inference``."""

    timings: dict[str, float]
    preprocess: float
    sliding_window: float
    postprocess: float


def job_split(
    model: SegmentationModel, series_dir: Path, output_dir: Path, device: torch.device
) -> JobSplit:
    """Run ``workers.pipeline.run_job`` once, with clocks around predict and the sliding window."""
    marks: dict[str, float] = {}
    predict = model.predict

    def timed_predict(volume: Volume) -> npt.NDArray[np.uint8]:
        marks["start"] = time.perf_counter()
        labels = predict(volume)
        marks["end"] = time.perf_counter()
        return labels

    with (
        clocked_sliding_window(device) as clock,
        mock.patch.object(model, "predict", new=timed_predict),
    ):
        result = run_job(job_request(series_dir, BUNDLE_NAME, output_dir))
    if result.status != "ok":
        raise RuntimeError(f"run_job failed: {result.reason}")
    first, last = clock.spans[0][0], clock.spans[-1][1]
    return JobSplit(
        timings=dict(result.timings_s),
        preprocess=first - marks["start"],
        sliding_window=sum(end - begin for begin, end in clock.spans),
        postprocess=marks["end"] - last,
    )


def best_job(
    model: SegmentationModel,
    series_dir: Path,
    output_dir: Path,
    device: torch.device,
    repeat: int,
) -> JobSplit:
    """One warm-up, then the run_job with the lowest total of `repeat`."""
    job_split(model, series_dir, output_dir, device)
    best: JobSplit | None = None
    for i in range(1, repeat + 1):
        split = job_split(model, series_dir, output_dir, device)
        logger.info("run_job run %d/%d: %s", i, repeat, split.timings)
        if best is None or split.timings["total"] < best.timings["total"]:
            best = split
    assert best is not None
    return best


# --- output ---------------------------------------------------------------------------


def format_table(rows: list[Row], title: str) -> str:
    """The comparison as a text table, pacsnode's speed relative to each recipe."""
    lines = [
        title,
        (
            f"{'network':<14} {'tool':<12} {'seconds':>9} {'sliding window s':>17} "
            f"{'pacsnode vs tool':>17}"
        ),
    ]
    for row in rows:
        pacsnode = next(r for r in rows if r.network == row.network and r.tool == "pacsnode")
        ratio = row.best.seconds / pacsnode.best.seconds
        lines.append(
            f"{row.network:<14} {row.tool:<12} {row.best.seconds:>9.3f} "
            f"{row.best.sliding_window_seconds:>17.3f} {ratio:>16.2f}x"
        )
    lines.append(
        "pacsnode vs tool: the tool's seconds divided by pacsnode's (above 1: pacsnode is "
        "faster). seconds: float32 volume in memory to uint8 label map on the CPU."
    )
    return "\n".join(lines) + "\n"


def format_job(split: JobSplit, title: str) -> str:
    """The per-stage split of one worker job."""
    t = split.timings
    other = t["total"] - t["load"] - t["inference"] - t["results"]
    stages = [
        ("decode (load_series)", t["load"]),
        ("preprocess", split.preprocess),
        ("inference (sliding window)", split.sliding_window),
        ("postprocess (argmax, volumes)", split.postprocess),
        ("results (SEG + SR, written)", t["results"]),
        ("other (get_segmentation_model, checks)", other),
        ("total", t["total"]),
    ]
    lines = [title, f"{'stage':<30} {'seconds':>9} {'share':>7}"]
    for name, seconds in stages:
        lines.append(f"{name:<30} {seconds:>9.3f} {100.0 * seconds / t['total']:>6.1f}%")
    lines.append(
        "run_job's timings_s: "
        + ", ".join(f"{key} {value:.3f}" for key, value in t.items())
        + "; preprocess, sliding window and postprocess split its 'inference' by "
        "timestamps around monai's sliding_window_inference."
    )
    return "\n".join(lines) + "\n"


def machine_line(device: torch.device) -> str:
    """Where the benchmark ran."""
    where = f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs"
    if device.type == "cuda":
        where += f", {torch.cuda.get_device_name(device)}"
    return (
        f"device {device.type}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"monai {monai.__version__}; python {platform.python_version()}; {where}\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the tables to stdout.

    Parameters
    ----------
    argv
        Command line arguments; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=64, help="slices in the CT series")
    parser.add_argument("--size", type=int, default=512, help="rows and columns per slice")
    parser.add_argument("--repeat", type=int, default=2, help="runs after a warm-up; best counts")
    parser.add_argument(
        "--unet-precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="pacsnode.yaml precision of the UNet bundle (bf16 applies on CUDA only)",
    )
    parser.add_argument(
        "--no-unet", action="store_true", help="skip the UNet (only ct-bone-demo and run_job)"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be 1 or more. Found {args.repeat}.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="inference-bench-") as tmp:
        workdir = Path(tmp)
        series_dir = workdir / "series"
        pixel_mm = FIELD_OF_VIEW_MM / args.size
        spacing_mm = (SLICE_SPACING_MM, pixel_mm, pixel_mm)
        phantom = chest_phantom((args.slices, args.size, args.size), spacing_mm=spacing_mm)
        files = write_ct_series(phantom.hu, series_dir, spacing_mm=spacing_mm)
        volume = load_series(files).volume
        logger.info(
            "Wrote and decoded %d slices in %.1f s", len(files), time.perf_counter() - started
        )

        rows: list[Row] = []
        notes: list[str] = []

        bundle_path = BUNDLES_DIR / BUNDLE_NAME
        settings = bundle_settings(bundle_path, device)
        model = get_segmentation_model(BUNDLE_NAME)
        stock_net = stock_bundle_network(bundle_path, device)
        bundle_rows, agreement = compare(
            BUNDLE_NAME, stock_net, model, volume, settings, device, args.repeat
        )
        rows += bundle_rows
        notes.append(describe(BUNDLE_NAME, settings, agreement, device))

        if not args.no_unet:
            unet_path = write_unet_bundle(
                workdir,
                roi_size=settings.roi_size,
                sw_batch_size=settings.sw_batch_size,
                overlap=settings.overlap,
                precision=args.unet_precision,
            )
            unet_settings = bundle_settings(unet_path, device)
            unet_class = network_model_class(unet_path)
            unet_model = unet_class()
            assert isinstance(unet_model, SegmentationModel)
            unet_stock = stock_bundle_network(unet_path, device)
            unet_rows, unet_agreement = compare(
                "unet", unet_stock, unet_model, volume, unet_settings, device, args.repeat
            )
            rows += unet_rows
            notes.append(describe("unet", unet_settings, unet_agreement, device))

        split = best_job(model, series_dir, workdir / "out", device, args.repeat)
        spleen = spleen_paths(volume, series_dir, workdir, args.repeat)

    shape = "x".join(str(n) for n in volume.voxels.shape)
    sys.stdout.write(machine_line(device))
    sys.stdout.write(
        format_table(
            rows,
            f"CT chest phantom {shape} (slices x rows x columns), best of {args.repeat} runs "
            f"after 1 warm-up each",
        )
    )
    for note in notes:
        sys.stdout.write(note)
    sys.stdout.write(
        format_job(
            split,
            f"pacsnode worker job (workers.pipeline.run_job, {BUNDLE_NAME}, {len(files)} files), "
            f"best total of {args.repeat} runs after 1 warm-up",
        )
    )
    sys.stdout.write(spleen)
    logger.info("Benchmark took %.1f s", time.perf_counter() - started)
    return 0


def spleen_paths(volume: Volume, series_dir: Path, workdir: Path, repeat: int) -> str:
    """Seconds per study for the spleen configuration: fast path, the bundle's own chain,
    and monai.bundle's own run; a table with the agreement of their label maps."""
    config = model_zoo.read_config(model_zoo.ZOO / "spleen_ct_segmentation")
    times: dict[str, float] = {}
    labels: dict[str, npt.NDArray[np.uint8]] = {}
    variants = {"fast path": {"chain": "auto"}, "bundle's own chain": {"chain": "bundle"}}
    if torch.cuda.is_available():  # bf16 applies on CUDA only; the chain uses the bundle's amp
        variants["fast path, bf16"] = {"chain": "auto", "precision": "bf16"}
    for number, (name, inference) in enumerate(variants.items()):
        bundle = model_zoo.make_bundle(
            "spleen_ct_segmentation",
            workdir / f"spleen-{number}",
            config["network_def"],
            spec=model_zoo.segmentation_spec(2, inference=inference),
        )
        model_zoo.save_seeded(bundle)
        model = network_model_class(bundle)()
        assert isinstance(model, SegmentationModel)
        assert (model.runner.info.chain == "bundle") == (inference["chain"] == "bundle")
        model.predict(volume)  # warm-up
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            labels[name] = model.predict(volume)
            best = min(best, time.perf_counter() - start)
        times[name] = best
    reference_name = "fast path"
    if importlib.util.find_spec("itk") is not None:  # the GPU machine has no ITK
        best = float("inf")
        for run in range(repeat + 1):
            start = time.perf_counter()
            out = model_zoo.monai_reference(bundle, {"image": str(series_dir)}, workdir / f"m{run}")
            if run:
                best = min(best, time.perf_counter() - start)
        reference, _ = model_zoo.saved_labels(out)
        reference_name = "monai.bundle run"
        labels[reference_name] = reference.transpose(2, 1, 0).astype(np.uint8)
        times[reference_name] = best
    fast = times["fast path"]
    lines = [
        "\nspleen_ct_segmentation (Model Zoo config, UNet 16-256, seeded weights), "
        + f"best of {repeat} after 1 warm-up\n",
        f"{'path':<22}{'s/study':>9}{'vs fast':>9}{'equal to ' + reference_name:>27}\n",
    ]
    for name, seconds in times.items():
        equal = float((labels[name] == labels[reference_name]).mean())
        lines.append(f"{name:<22}{seconds:>9.2f}{seconds / fast:>8.2f}x{100 * equal:>26.4f}%\n")
    return "".join(lines)


def describe(network: str, settings: Settings, agreement: float, device: torch.device) -> str:
    """The settings of one network's two recipes, and how far their label maps agree."""
    autocast = settings.precision == "bf16" and device.type == "cuda"
    return (
        f"{network}: roi {settings.roi_size}, overlap {settings.overlap}; stock sw_batch_size 1 "
        f"fp32; pacsnode sw_batch_size {settings.sw_batch_size} "
        f"{'bf16 autocast' if autocast else 'fp32'}; equal labels {100.0 * agreement:.4f}%\n"
    )


if __name__ == "__main__":
    sys.exit(main())
