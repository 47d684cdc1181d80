"""MONAI bundles: a folder in Model Zoo layout read into a :class:`NetworkInfo`.

::

    <name>/configs/metadata.json    version, network_data_format (outputs.pred)
    <name>/configs/inference.json   network_def (needed with model.pt), preprocessing, inferer
    <name>/models/model.pt          state dict for network_def, or
    <name>/models/model.ts          TorchScript module (used when there is no model.pt)
    <name>/pacsnode.yaml            pacsnode's settings, :class:`models.spec.ModelSpec`

Only the metadata, the configs and the spec are read here; torch, MONAI and the weights
are loaded when a worker creates the model (:mod:`models.network`). Segmentation label
names come from ``outputs.pred.channel_def``; their codes and colours from
``pacsnode.yaml`` ``labels``. A classifier (``task: classification``) lists its classes
in ``pacsnode.yaml``, and their number must match the bundle's output channels.

Preprocessing. pacsnode does not run the bundle's own ``preprocessing`` Compose (it
starts from files via LoadImaged); it reads the literal arguments of these transforms
from ``inference.json`` ``preprocessing#transforms`` unless ``pacsnode.yaml``
``preprocessing`` sets them: ``Orientation(d)`` ``axcodes``, ``Spacing(d)`` ``pixdim``,
``ScaleIntensityRange(d)`` (the window), ``NormalizeIntensity(d)`` (``zscore``),
``ScaleIntensity(d)`` (``minmax``) and ``Resize(d)`` ``spatial_size`` (a classifier's
``input_size``). Other transforms are ignored. Sliding-window settings default to the
bundle's ``inferer``.

Parsing ``network_def`` goes through :class:`monai.bundle.ConfigParser`, which may
evaluate ``$`` expressions and import ``_target_`` components: a bundle is code, and is
trusted like any model module in this repository.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from models.base import LabelSpec
from models.spec import (
    SPEC_FILE,
    ModelSpec,
    ModelSpecError,
    NetworkInfo,
    PreprocessingSpec,
    read_spec,
)

__all__ = ["INFERENCE_FILE", "METADATA_FILE", "is_bundle", "read_bundle"]

METADATA_FILE = Path("configs") / "metadata.json"
INFERENCE_FILE = Path("configs") / "inference.json"
WEIGHTS_FILE = Path("models") / "model.pt"
TORCHSCRIPT_FILE = Path("models") / "model.ts"


def is_bundle(path: Path) -> bool:
    """True for a folder in Model Zoo layout (it has ``configs/``)."""
    return (path / "configs").is_dir()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelSpecError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelSpecError(f"{path} must hold a JSON object")
    return data


def _literal(value: Any) -> bool:
    return not (isinstance(value, str) and value[:1] in ("$", "@"))


def _transform_args(inference: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any] | None:
    """Literal arguments of the first preprocessing transform whose ``_target_`` is in
    ``names`` (None if there is none); ``$``/``@`` expressions are left out."""
    preprocessing = inference.get("preprocessing")
    transforms = preprocessing.get("transforms") if isinstance(preprocessing, dict) else None
    if not isinstance(transforms, list):
        return None
    for transform in transforms:
        if not isinstance(transform, dict):
            continue
        target = str(transform.get("_target_", "")).rsplit(".", 1)[-1]
        if target in names:
            return {
                key: value
                for key, value in transform.items()
                if not key.startswith("_") and _literal(value)
            }
    return None


def _preprocessing(
    spec: ModelSpec, inference: dict[str, Any], inference_path: Path, spec_path: Path
) -> PreprocessingSpec:
    """``pacsnode.yaml`` preprocessing, completed from the bundle's transforms."""
    pre = spec.preprocessing
    found: dict[str, Any] = {}
    if pre.intensity is None:
        args = _transform_args(inference, ("ScaleIntensityRanged", "ScaleIntensityRange"))
        if args is not None and {"a_min", "a_max"} <= args.keys():
            keys = ("a_min", "a_max", "b_min", "b_max", "clip")
            found["intensity"] = {k: args[k] for k in keys if k in args}
    if pre.normalize is None:
        zscore = _transform_args(inference, ("NormalizeIntensityd", "NormalizeIntensity"))
        minmax = _transform_args(inference, ("ScaleIntensityd", "ScaleIntensity"))
        # Only the plain forms are reproduced; others must be set in pacsnode.yaml.
        unsupported = {
            "NormalizeIntensity": {
                k: v
                for k, v in (zscore or {}).items()
                if k in ("subtrahend", "divisor", "nonzero", "channel_wise")
                and v not in (None, False)
            },
            "ScaleIntensity": {
                k: v
                for k, v in (minmax or {}).items()
                if (k, v) not in (("minv", 0.0), ("maxv", 1.0), ("minv", 0), ("maxv", 1))
                and k in ("minv", "maxv", "factor", "channel_wise")
                and v not in (None, False)
            },
        }
        for name, arguments in unsupported.items():
            if arguments:
                raise ModelSpecError(
                    f"{inference_path}: {name} with {arguments} is not reproduced by pacsnode; "
                    f"set preprocessing.normalize (or intensity) in {spec_path}"
                )
        if zscore is not None:
            found["normalize"] = "zscore"
        elif minmax is not None:
            found["normalize"] = "minmax"
    if pre.axcodes is None:
        args = _transform_args(inference, ("Orientationd", "Orientation")) or {}
        if args.get("axcodes") is not None:
            found["axcodes"] = str(args["axcodes"])
    if pre.spacing_mm is None:
        args = _transform_args(inference, ("Spacingd", "Spacing")) or {}
        if args.get("pixdim") is not None:
            found["spacing_mm"] = args["pixdim"]
    if pre.input_size is None and spec.task == "classification":
        args = _transform_args(inference, ("Resized", "Resize")) or {}
        if args.get("spatial_size") is not None:
            found["input_size"] = args["spatial_size"]
    if not found:
        return pre
    try:
        return PreprocessingSpec.model_validate({**pre.model_dump(exclude_none=True), **found})
    except (ValidationError, TypeError) as e:
        raise ModelSpecError(
            f"{inference_path}: preprocessing arguments {found} are not usable ({e}); set "
            f"preprocessing in {spec_path}"
        ) from e


def _channel_names(metadata: dict[str, Any]) -> dict[int, str] | None:
    """``outputs.pred.channel_def`` as {channel: name}; None when absent or malformed."""
    try:
        channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        return {int(key): str(value) for key, value in dict(channel_def).items()}
    except (KeyError, TypeError, ValueError):
        return None


def _labels(
    spec: ModelSpec, channels: dict[int, str] | None, metadata_path: Path, spec_path: Path
) -> tuple[LabelSpec, ...]:
    if channels is None:
        raise ModelSpecError(
            f"{metadata_path}: field 'network_data_format.outputs.pred.channel_def' is missing "
            "or not a mapping of channel numbers to names"
        )
    if sorted(channels) != list(range(len(channels))) or len(channels) < 2:
        raise ModelSpecError(
            f"{metadata_path}: 'network_data_format.outputs.pred.channel_def' must number its "
            f"channels 0, 1, ... with 0 as background. Found {sorted(channels)}."
        )
    if len(channels) > 256:
        raise ModelSpecError(
            f"{metadata_path}: {len(channels)} channels; pacsnode takes 256 at most"
        )
    missing_codes = [c for c in channels if c > 0 and c not in spec.labels]
    if missing_codes:
        raise ModelSpecError(
            f"{spec_path}: field 'labels' must give SNOMED CT codes (category, property_type) "
            f"for channel(s) {', '.join(f'{c} ({channels[c]!r})' for c in missing_codes)} of "
            f"{metadata_path} channel_def"
        )
    extra = [c for c in spec.labels if c not in channels or c == 0]
    if extra:
        raise ModelSpecError(
            f"{spec_path}: field 'labels' names channel(s) {extra} that are not foreground "
            f"channels of {metadata_path} channel_def"
        )
    return tuple(
        LabelSpec(
            value=c,
            name=entry.name or channels[c].replace("_", " ").capitalize(),
            category=entry.category.to_code(),
            property_type=entry.property_type.to_code(),
            color_rgb=entry.color_rgb,
        )
        for c, entry in sorted(spec.labels.items())
    )


def read_bundle(path: Path) -> NetworkInfo:
    """Read and check a bundle folder without loading torch or the weights.

    Raises
    ------
    ModelSpecError
        If a file is missing or a field is wrong; the message names the file and field.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelSpecError(f"bundle folder {path} does not exist")
    spec_path = path / SPEC_FILE
    spec = read_spec(spec_path)
    metadata_path = path / METADATA_FILE
    metadata = _read_json(metadata_path)
    inference_path = path / INFERENCE_FILE
    inference = _read_json(inference_path) if inference_path.is_file() else {}

    version = metadata.get("version")
    if not isinstance(version, str) or not version:
        raise ModelSpecError(f"{metadata_path}: field 'version' is missing or not a string")
    channels = _channel_names(metadata)
    labels: tuple[LabelSpec, ...] = ()
    if spec.task == "segmentation":
        labels = _labels(spec, channels, metadata_path, spec_path)
    elif channels is not None and len(channels) != len(spec.classes):
        raise ModelSpecError(
            f"{spec_path}: field 'classes' lists {len(spec.classes)} classes but "
            f"{metadata_path} channel_def has {len(channels)} outputs"
        )

    if (path / WEIGHTS_FILE).is_file():
        weights, network = path / WEIGHTS_FILE, inference_path
        if "network_def" not in inference:
            raise ModelSpecError(
                f"{inference_path}: field 'network_def' is needed to load {weights}"
                + ("" if inference_path.is_file() else " (the file is missing)")
            )
    elif (path / TORCHSCRIPT_FILE).is_file():
        weights, network = path / TORCHSCRIPT_FILE, None
    else:
        raise ModelSpecError(
            f"bundle {path} has no weights: {path / WEIGHTS_FILE} (state dict) or "
            f"{path / TORCHSCRIPT_FILE} (TorchScript) is missing"
        )

    inferer_config = inference.get("inferer")
    inferer: dict[str, Any] = inferer_config if isinstance(inferer_config, dict) else {}
    settings = spec.inference
    roi = settings.roi_size
    if roi is None and spec.task == "segmentation":
        value = inferer.get("roi_size")
        if value is not None and _literal(value) and isinstance(value, list) and len(value) == 3:
            roi = (int(value[0]), int(value[1]), int(value[2]))
        else:
            raise ModelSpecError(
                f"{spec_path}: field 'inference.roi_size' is needed (the bundle's "
                f"{inference_path} inferer gives no literal roi_size)"
            )
    overlap = settings.overlap
    if overlap is None:
        value = inferer.get("overlap", 0.25)
        overlap = float(value) if isinstance(value, int | float) and 0 <= value < 1 else 0.25
    value = inferer.get("sw_batch_size")
    default_sw_batch_size = value if isinstance(value, int) and value >= 1 else None

    meta_name = str(metadata.get("name", path.name))
    meta_description = str(metadata.get("description", "")).strip()
    return NetworkInfo(
        path=path,
        name=path.name,
        version=version,
        description=spec.description or f"MONAI bundle {meta_name} {version}: {meta_description}",
        spec=spec,
        labels=labels,
        classes=tuple(entry.to_class_spec() for entry in spec.classes),
        weights=weights,
        state_dict_network=network,
        preprocessing=_preprocessing(spec, inference, inference_path, spec_path),
        roi_size=roi,
        overlap=overlap,
        default_sw_batch_size=default_sw_batch_size,
    )
