"""Real MONAI Model Zoo configurations (``tests/data/model_zoo``), made runnable offline,
and MONAI's own run of them for the conformance tests.

The configurations are copied unchanged from github.com/Project-MONAI/model-zoo (see
``tests/data/model_zoo/README.md``); their weights are not reachable here. A test
bundle is the configuration plus a small network of the same input and output channels
(``network_def`` replaced, in both runs), initialised with a fixed seed and trained for
a few dozen steps towards intensity classes of the bundle's own preprocessed image, so
that several labels cover real regions instead of noise; and a ``pacsnode.yaml``.

:func:`monai_reference` is the reference: ``monai.bundle.run`` on the bundle's
configuration with its own preprocessing, inferer, postprocessing, checkpoint loading
and ``SaveImaged``; only the data list, the output folder, the loader's reader
(``ITKReader``, MONAI's reader for a DICOM series) and the worker count are set.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

ZOO = Path(__file__).resolve().parent / "data" / "model_zoo"
#: A label must cover this many voxels in MONAI's run to count as a real region.
REGION_VOXELS = 1000

#: SNOMED CT codes good enough for a test label (any anatomical structure).
_TISSUE = {"category": {"value": "91723000", "meaning": "Anatomical Structure"},
           "property_type": {"value": "85756007", "meaning": "Tissue"}}  # fmt: skip


def config_file(bundle: Path) -> Path:
    """The bundle's inference configuration, JSON or YAML."""
    for name in ("inference.json", "inference.yaml"):
        if (bundle / "configs" / name).is_file():
            return bundle / "configs" / name
    raise FileNotFoundError(f"{bundle}/configs has no inference.json or inference.yaml")


def read_config(bundle: Path) -> dict[str, Any]:
    path = config_file(bundle)
    text = path.read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return data


def small_network(spatial_dims: int, in_channels: int, out_channels: int) -> dict[str, Any]:
    """A UNet of two levels: the same channels in and out as the bundle's network."""
    return {
        "_target_": "UNet",
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "channels": [8, 16],
        "strides": [2],
        "num_res_units": 0,
    }


def small_classifier(in_shape: Sequence[int], classes: int) -> dict[str, Any]:
    return {
        "_target_": "Classifier",
        "in_shape": list(in_shape),
        "classes": classes,
        "channels": [4, 8],
        "strides": [4, 4],
    }


def make_bundle(
    name: str,
    dest: Path,
    network_def: dict[str, Any],
    *,
    spec: dict[str, Any],
    weights: Sequence[str] = ("models/model.pt",),
    edit: dict[str, Any] | None = None,
) -> Path:
    """Copy a Model Zoo configuration to ``dest`` as an installable bundle.

    ``network_def`` replaces the bundle's network; ``edit`` sets top-level fields of
    the configuration (what an admin would change, e.g. ``displayable_configs``); the
    configuration is written as ``configs/inference.json`` (pacsnode's bundle file).
    Weights are saved later by :func:`train_and_save` to each path in ``weights``.
    """
    shutil.copytree(ZOO / name, dest)
    config = read_config(dest)
    config["network_def"] = network_def
    config.update(edit or {})
    for old in (dest / "configs").glob("inference.*"):
        old.unlink()
    (dest / "configs" / "inference.json").write_text(json.dumps(config, indent=1))
    (dest / "pacsnode.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (dest / "models").mkdir(exist_ok=True)
    (dest / ".weights").write_text("\n".join(weights))
    return dest


def segmentation_spec(channels: int, **extra: Any) -> dict[str, Any]:
    """``pacsnode.yaml`` for a segmentation bundle: a code for every foreground channel."""
    return {
        "queue": "cpu",
        "labels": {c: dict(_TISSUE, name=f"Class {c}") for c in range(1, channels)},
        **extra,
    }


def preprocessed(bundle: Path, data: Any, reader: str | None = "ITKReader") -> Any:
    """The bundle's own preprocessing of one data item, by MONAI."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(read_config(bundle))
    parser["bundle_root"] = str(bundle)
    if reader is not None:
        _set_reader(parser, reader)
    return parser.get_parsed_content("preprocessing")(data)


def train_and_save(
    bundle: Path,
    image: Any,
    *,
    classes: int = 3,
    steps: int = 30,
    slices: bool = False,
    multilabel: bool = False,
) -> None:
    """Initialise the bundle's (small) network with seed 0, train it ``steps`` steps to
    label ``classes`` intensity bands of ``image`` (a preprocessed (C, *spatial) tensor;
    with ``slices``, a 2-D network on its slices along the last axis), and save the
    state dict where the bundle and pacsnode load it. With ``multilabel``, ``classes``
    sigmoid channels learn nested regions instead (channel c: above the c-th band edge,
    the last the brightest), as BraTS's tumour regions nest."""
    import torch
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    parser = ConfigParser(read_config(bundle))
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def")
    x = torch.Tensor(torch.as_tensor(image).float())[None]  # plain: MetaTensor is slow
    if slices:  # (1, C, X, Y, Z) -> (Z, C, X, Y): each slice one sample
        x = x[0].permute(3, 0, 1, 2)
    grey = x[:, :1]
    # Bands by quantiles of the values inside the range, so that clipped air and bone
    # (a window's 0 and 1) do not make two edges equal and a class empty.
    values = grey.flatten()[:: max(1, grey.numel() // 100000)]
    inside = values[(values > values.min()) & (values < values.max())]
    edges = torch.quantile(inside if inside.numel() else values,
                           torch.linspace(0, 1, classes + 1)[1:-1])  # fmt: skip
    target = torch.bucketize(grey, edges)[:, 0]
    if multilabel:
        edges = torch.quantile(inside if inside.numel() else values,
                               torch.linspace(0.3, 0.9, classes))  # fmt: skip
        target = torch.cat([(grey > edge).float() for edge in edges], dim=1)
    optimiser = torch.optim.Adam(net.parameters(), lr=0.01)
    crop = [min(48, s) for s in x.shape[2:]]
    batch = slice(None) if not slices else slice(0, None, max(1, x.shape[0] // 8))
    rng = np.random.default_rng(0)
    net.train()
    for _ in range(steps):
        start = [int(rng.integers(0, s - c + 1)) for s, c in zip(x.shape[2:], crop, strict=True)]
        window = tuple(slice(a, a + c) for a, c in zip(start, crop, strict=True))
        output = net(x[(batch, slice(None), *window)])
        if multilabel:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                output, target[(batch, slice(None), *window)]
            )
        else:
            loss = torch.nn.functional.cross_entropy(output, target[(batch, *window)])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval()
    state = net.state_dict()
    for relative in (bundle / ".weights").read_text().split():
        torch.save(state, bundle / relative)


def save_seeded(bundle: Path) -> None:
    """Save the bundle's network as initialised with seed 0 (for a classifier)."""
    import torch
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    parser = ConfigParser(read_config(bundle))
    net = parser.get_parsed_content("network_def")
    for relative in (bundle / ".weights").read_text().split():
        torch.save(net.state_dict(), bundle / relative)


def _set_reader(parser: Any, reader: str = "ITKReader") -> None:
    transforms = parser["preprocessing"]["transforms"]
    for index, transform in enumerate(transforms):
        if str(transform.get("_target_", "")).endswith("LoadImaged"):
            parser[f"preprocessing#transforms#{index}#reader"] = reader
            return
    raise AssertionError("no LoadImaged in the bundle's preprocessing")


def monai_reference(
    bundle: Path,
    data: dict[str, Any],
    output_dir: Path,
    *,
    reader: str | None = "ITKReader",
    run_id: str = "run",
) -> Path:
    """``monai.bundle.run`` on one item; returns the output folder it wrote to. With no
    ``reader``, LoadImaged picks one by the file names (NIfTI: nibabel)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_meta(bundle / "configs" / "metadata.json")
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(bundle)
    parser["output_dir"] = str(output_dir)
    parser["dataset#data"] = [data]
    parser["dataset#_target_"] = "Dataset"
    for key in ("cache_rate", "num_workers"):
        if key in parser["dataset"]:
            del parser["dataset"][key]
    parser["dataloader#num_workers"] = 0
    if reader is not None:
        _set_reader(parser, reader)
    for handler in parser.get("handlers", []) or []:
        if str(handler.get("_target_", "")).endswith("ClassificationSaver"):
            handler["output_dir"] = str(output_dir)
    sys.path.insert(0, str(bundle))  # a bundle's ``scripts`` package, as monai.bundle does
    try:
        for section in ("initialize", run_id):
            for index in range(len(parser.get(section, []) or [])):
                parser.get_parsed_content(f"{section}#{index}")
    finally:
        sys.path.remove(str(bundle))
    return output_dir


def saved_labels(output_dir: Path) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The one label image SaveImaged wrote: (array in the loaded axes, affine)."""
    import nibabel as nib

    files = sorted(output_dir.rglob("*.nii.gz"))
    assert len(files) == 1, files
    image = nib.load(files[0])
    assert isinstance(image, nib.Nifti1Image)
    return np.rint(np.asarray(image.dataobj)).astype(np.int64), np.asarray(image.affine)


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def on_reference_grid(series_dirs: Sequence[Path], reference: int, out_dir: Path) -> list[str]:
    """Each DICOM series read by MONAI (ITKReader) and resampled onto the ``reference``
    one's grid by MONAI's ``ResampleToMatch`` (bilinear, zeros outside), saved as NIfTI:
    the input a multi-channel bundle expects, made without pacsnode's code."""
    import nibabel as nib
    from monai.transforms import LoadImage, ResampleToMatch

    load = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)
    images = [load(str(folder)) for folder in series_dirs]
    target = images[reference]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for number, image in enumerate(images):
        if number != reference:
            image = ResampleToMatch(mode="bilinear", padding_mode="zeros")(image, target)
        path = out_dir / f"input{number}.nii.gz"
        affine = np.asarray(target.affine, dtype=np.float64)
        nib.Nifti1Image(np.asarray(image[0], dtype=np.float32), affine).to_filename(path)
        files.append(str(path))
    return files
