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

Two ways to run. The fast path reproduces these transforms on the device, taking
their arguments from ``inference.json`` ``preprocessing#transforms`` unless
``pacsnode.yaml`` ``preprocessing`` sets them: ``Orientation(d)`` ``axcodes``,
``Spacing(d)`` ``pixdim`` (bilinear, border: the same grid as MONAI's), then
``ScaleIntensityRange(d)`` (the window), ``NormalizeIntensity(d)`` (``zscore``) or
``ScaleIntensity(d)`` (``minmax``), then ``Resize(d)`` ``spatial_size`` (a classifier's
``input_size``); transforms that only load, add a channel or change the type are
pass-through; the sliding window follows the bundle's ``inferer`` (roi, overlap, batch,
``mode``, ``sigma_scale``, ``padding_mode``). It is used only where :func:`check_chain`
finds nothing it does not reproduce: any other transform, these in another order, an
argument it does not reproduce, a ``$`` expression, postprocessing other than
activation, argmax and inversion, or another inferer sends the bundle to its own chain
(:mod:`models.bundle_chain`: MONAI runs the bundle's transforms, inferer and
postprocessing), and ``pacsnode.yaml`` ``inference.chain`` may ask for either. What
can run neither way is refused with the file, the transform and the reason. An
``@name`` argument takes the literal value of ``name`` in ``inference.json``.

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
from models.bundle_chain import chain_problems
from models.spec import (
    SPEC_FILE,
    ModelSpec,
    ModelSpecError,
    NetworkInfo,
    PreprocessingSpec,
    read_spec,
)

__all__ = ["INFERENCE_FILE", "METADATA_FILE", "check_chain", "is_bundle", "read_bundle"]

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


#: Transforms that change nothing pacsnode's in-memory path depends on.
_PASS_THROUGH = frozenset(
    {"LoadImage", "EnsureChannelFirst", "AddChannel", "AsChannelFirst", "EnsureType",
     "ToTensor", "ToDevice", "Identity", "DataStats", "SaveImage", "CopyItems"}
)  # fmt: skip
#: Preprocessing pacsnode reproduces, by the order it applies it in.
_REPRODUCED_RANK = {
    "Orientation": 0,
    "Spacing": 1,
    "ScaleIntensityRange": 2,
    "NormalizeIntensity": 3,
    "ScaleIntensity": 3,
    "Resize": 4,
}
#: Postprocessing pacsnode does itself: activation, argmax, inversion to the source grid.
_POSTPROCESSING_DONE = frozenset({"Activations", "AsDiscrete", "Invert"})
#: Arguments of reproduced transforms that pacsnode reproduces only at these values.
_FIXED_ARGUMENTS: dict[str, dict[str, tuple[Any, ...]]] = {
    "Spacing": {"mode": ("bilinear", None), "padding_mode": ("border", None),
                "diagonal": (False, None), "scale_extent": (False, None),
                "recompute_affine": (False, None), "align_corners": (False, None),
                "min_pixdim": (None,), "max_pixdim": (None,)},
    "Resize": {"mode": ("trilinear", "bilinear"), "align_corners": (None, False),
               "size_mode": ("all", None), "anti_aliasing": (False, None)},
    "AsDiscrete": {"threshold": (None,), "rounding": (None,)},
}  # fmt: skip


def _transform_name(transform: dict[str, Any]) -> str:
    """``monai.transforms.Spacingd`` -> ``Spacing``: the array transform's name."""
    name = str(transform.get("_target_", "")).rsplit(".", 1)[-1]
    known = _PASS_THROUGH | _POSTPROCESSING_DONE | set(_REPRODUCED_RANK)
    return name[:-1] if name.endswith("d") and name[:-1] in known else name


def _transforms(inference: dict[str, Any], section: str) -> list[dict[str, Any]]:
    config = inference.get(section)
    transforms = config.get("transforms") if isinstance(config, dict) else None
    return [t for t in transforms if isinstance(t, dict)] if isinstance(transforms, list) else []


def _unlisted(inference: dict[str, Any], section: str) -> str | None:
    """The section's transforms when they are not a literal list (e.g. an expression)."""
    config = inference.get(section)
    if config is None:
        return None
    transforms = config.get("transforms") if isinstance(config, dict) else config
    return None if isinstance(transforms, list) else repr(transforms)


def _resolve(inference: dict[str, Any], where: str, key: str, value: Any) -> Any:
    """An argument's value: ``@name`` is ``name``'s literal value in inference.json.

    Raises
    ------
    ModelSpecError
        For a ``$`` expression, or an ``@`` reference to something that is not literal.
    """
    if isinstance(value, str) and value.startswith("@"):
        target = inference.get(value[1:].split("#", 1)[0])
        if "#" not in value and target is not None and _literal(target):
            return target
        raise ModelSpecError(
            f"{where}: argument {key!r} is {value!r}, which is not a literal value in the file"
        )
    if isinstance(value, str) and value.startswith("$"):
        raise ModelSpecError(
            f"{where}: argument {key!r} is the expression {value!r}, which pacsnode does not "
            "evaluate"
        )
    return value


def _transform_args(inference: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any] | None:
    """Arguments of the first preprocessing transform whose ``_target_`` is in ``names``
    (None if there is none), ``@`` references resolved; structural keys (``keys`` and
    the like) are left out."""
    for transform in _transforms(inference, "preprocessing"):
        target = str(transform.get("_target_", "")).rsplit(".", 1)[-1]
        if target in names:
            return {
                key: _resolve(inference, target, key, value)
                for key, value in transform.items()
                if not key.startswith("_") and key not in ("keys", "allow_missing_keys")
            }
    return None


def check_chain(inference: dict[str, Any], inference_path: Path, task: str) -> None:
    """Refuse a bundle whose transforms or inferer pacsnode would not reproduce.

    Raises
    ------
    ModelSpecError
        Naming the file, the transform (``preprocessing#transforms#2 CropForegroundd``)
        and why.
    """
    previous: tuple[int, str] | None = None
    seen: set[int] = set()
    for section in ("preprocessing", "postprocessing"):
        if (unlisted := _unlisted(inference, section)) is not None:
            raise ModelSpecError(
                f"{inference_path}: {section} transforms are {unlisted[:80]}, not a list "
                "pacsnode's fast path can check"
            )
        for index, transform in enumerate(_transforms(inference, section)):
            name = _transform_name(transform)
            where = f"{inference_path}: {section}#transforms#{index} {transform.get('_target_')}"
            allowed = _PASS_THROUGH | (
                set(_REPRODUCED_RANK) if section == "preprocessing" else _POSTPROCESSING_DONE
            )
            if name == "Resize" and task != "classification":
                allowed = allowed - {"Resize"}
            if name not in allowed:
                raise ModelSpecError(
                    f"{where}: pacsnode's fast path does not reproduce this transform"
                )
            if name in _PASS_THROUGH:
                continue  # their arguments (file names, dtypes) do not change the numbers
            for key, accepted in _FIXED_ARGUMENTS.get(name, {}).items():
                value = _resolve(inference, where, key, transform.get(key))
                if value not in accepted:
                    raise ModelSpecError(
                        f"{where}: {key}={value!r} is not reproduced (pacsnode uses "
                        f"{accepted[0]!r})"
                    )
            for key, value in transform.items():
                if not key.startswith("_") and key != "keys":
                    _resolve(inference, where, key, value)
            rank = _REPRODUCED_RANK.get(name) if section == "preprocessing" else None
            if rank is not None:
                if previous is not None and rank < previous[0]:
                    raise ModelSpecError(
                        f"{where}: comes after {previous[1]}; pacsnode applies orientation, "
                        "spacing, intensity, then resizing, so the results would differ"
                    )
                if rank in seen:
                    raise ModelSpecError(
                        f"{where}: a second intensity, spacing, orientation or resizing "
                        "transform; pacsnode reproduces one of each"
                    )
                if name == "Spacing" and 0 not in seen:
                    raise ModelSpecError(
                        f"{where}: Spacing without an Orientation before it; pacsnode's "
                        "array axes are not MONAI's loaded ones, so pixdim would apply to "
                        "other axes"
                    )
                seen.add(rank)
                previous = (rank, name)
    inferer = inference.get("inferer")
    if task == "segmentation" and isinstance(inferer, dict):
        target = str(inferer.get("_target_", "SlidingWindowInferer")).rsplit(".", 1)[-1]
        if target != "SlidingWindowInferer":
            raise ModelSpecError(
                f"{inference_path}: inferer {target} is not reproduced (pacsnode runs a "
                "sliding window over the volume)"
            )
        for key, accepted in (("cval", (0, 0.0, None)), ("roi_weight_map", (None,))):
            if inferer.get(key) not in accepted:
                raise ModelSpecError(
                    f"{inference_path}: inferer {key}={inferer[key]!r} is not reproduced"
                )
        overlap = inferer.get("overlap", 0.25)
        if not isinstance(overlap, int | float):
            raise ModelSpecError(
                f"{inference_path}: inferer overlap={overlap!r} is not reproduced (one number)"
            )


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
    """``outputs.pred.channel_def`` (or ``label_def``, which some bundles use instead) as
    {channel: name}; None when absent or malformed."""
    try:
        pred = metadata["network_data_format"]["outputs"]["pred"]
        channel_def = pred["channel_def"] if "channel_def" in pred else pred["label_def"]
        return {int(key): str(value) for key, value in dict(channel_def).items()}
    except (KeyError, TypeError, ValueError):
        return None


def _declared_labels(spec: ModelSpec, spec_path: Path) -> tuple[LabelSpec, ...]:
    """``label_values: declared``: the labels as pacsnode.yaml lists them, each named."""
    unnamed = [value for value, entry in spec.labels.items() if not entry.name]
    if not spec.labels or unnamed:
        raise ModelSpecError(
            f"{spec_path}: with label_values: declared, field 'labels' must list every "
            f"label value the bundle writes, each with a name (unnamed: {unnamed})"
        )
    if max(spec.labels) > 255:
        raise ModelSpecError(f"{spec_path}: label values go up to 255; found {max(spec.labels)}")
    return tuple(
        LabelSpec(
            value=value,
            name=str(entry.name),
            category=entry.category.to_code(),
            property_type=entry.property_type.to_code(),
            color_rgb=entry.color_rgb,
        )
        for value, entry in sorted(spec.labels.items())
    )


def _input_channels(metadata: dict[str, Any]) -> int:
    """``network_data_format.inputs.image.num_channels`` (1 when absent)."""
    try:
        return int(metadata["network_data_format"]["inputs"]["image"]["num_channels"])
    except (KeyError, TypeError, ValueError):
        return 1


def _labels(
    spec: ModelSpec, channels: dict[int, str] | None, metadata_path: Path, spec_path: Path
) -> tuple[LabelSpec, ...]:
    if spec.label_values == "declared":
        return _declared_labels(spec, spec_path)
    if channels is None:
        raise ModelSpecError(
            f"{metadata_path}: field 'network_data_format.outputs.pred.channel_def' (or "
            "'label_def') is missing or not a mapping of channel numbers to names"
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

    meta_name = str(metadata.get("name", path.name))
    meta_description = str(metadata.get("description", "")).strip()
    common: dict[str, Any] = {
        "path": path,
        "name": path.name,
        "version": version,
        "description": spec.description
        or f"MONAI bundle {meta_name} {version}: {meta_description}",
        "spec": spec,
        "labels": labels,
        "classes": tuple(entry.to_class_spec() for entry in spec.classes),
        "weights": weights,
        "state_dict_network": network,
        "input_channels": _input_channels(metadata),
    }
    refusal: str | None = None
    if spec.label_values == "declared":
        if spec.inference.chain == "fast":
            raise ModelSpecError(
                f"{spec_path}: label_values: declared needs the bundle's own chain (its "
                "postprocessing writes the values); inference.chain is fast"
            )
        refusal = "the bundle's postprocessing writes its label values (label_values: declared)"
    elif spec.inference.chain == "bundle":
        refusal = "pacsnode.yaml asks for the bundle's own chain (inference.chain: bundle)"
    else:
        try:
            check_chain(inference, inference_path, spec.task)
            fast = _fast_path(spec, inference, inference_path, spec_path)
        except ModelSpecError as e:
            if spec.inference.chain == "fast":
                raise
            refusal = str(e)
        else:
            return NetworkInfo(**common, **fast)
    if (problem := chain_problems(inference, inference_path)) is not None:
        raise ModelSpecError(f"{refusal}; and the bundle's own chain cannot run: {problem}")
    fast_only = [
        f"preprocessing.{key}" for key in spec.preprocessing.model_dump(exclude_none=True)
    ] + [
        f"inference.{key}"
        for key in ("roi_size", "overlap", "sw_batch_size")
        if getattr(spec.inference, key) is not None
    ]
    if fast_only:
        raise ModelSpecError(
            f"{spec_path}: {', '.join(fast_only)} set, but the bundle runs its own chain "
            f"(because {refusal}), which takes them from {inference_path} only; remove them"
        )
    return NetworkInfo(
        **common,
        preprocessing=PreprocessingSpec(),
        chain="bundle",
        fast_path_refusal=refusal,
    )


def _fast_path(
    spec: ModelSpec, inference: dict[str, Any], inference_path: Path, spec_path: Path
) -> dict[str, Any]:
    """The fast path's settings: preprocessing and sliding window, from ``pacsnode.yaml``
    completed by the bundle's transforms and inferer."""
    inferer_config = inference.get("inferer")
    inferer: dict[str, Any] = inferer_config if isinstance(inferer_config, dict) else {}
    window = {
        key: _resolve(inference, f"{inference_path}: inferer", key, value)
        for key, value in inferer.items()
        if not key.startswith("_")
    }
    for key, accepted in (
        ("mode", ("constant", "gaussian")),
        ("padding_mode", ("constant", "reflect", "replicate", "circular")),
    ):
        if window.get(key, accepted[0]) not in accepted:
            raise ModelSpecError(
                f"{inference_path}: inferer {key}={window[key]!r} is not one of {accepted}"
            )
    settings = spec.inference
    roi = settings.roi_size
    if roi is None and spec.task == "segmentation":
        value = window.get("roi_size")
        if isinstance(value, list) and len(value) == 3:
            roi = (int(value[0]), int(value[1]), int(value[2]))
        else:
            raise ModelSpecError(
                f"{spec_path}: field 'inference.roi_size' is needed (the bundle's "
                f"{inference_path} inferer gives no literal roi_size)"
            )
    overlap = settings.overlap
    if overlap is None:
        value = window.get("overlap", 0.25)
        overlap = float(value) if isinstance(value, int | float) and 0 <= value < 1 else 0.25
    value = window.get("sw_batch_size")
    default_sw_batch_size = value if isinstance(value, int) and value >= 1 else None

    return {
        "preprocessing": _preprocessing(spec, inference, inference_path, spec_path),
        "roi_size": roi,
        "overlap": overlap,
        "default_sw_batch_size": default_sw_batch_size,
        "window_mode": window.get("mode", "constant"),
        "sigma_scale": float(window.get("sigma_scale", 0.125)),
        "padding_mode": window.get("padding_mode", "constant"),
    }
