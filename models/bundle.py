"""MONAI bundles as pacsnode models: one :class:`SegmentationModel` subclass per bundle.

A bundle is a folder in MONAI Model Zoo layout::

    <name>/configs/metadata.json    version, network_data_format (outputs.pred.channel_def)
    <name>/configs/inference.json   network_def (needed with model.pt), preprocessing, inferer
    <name>/models/model.pt          state dict for network_def, or
    <name>/models/model.ts          TorchScript module (used when there is no model.pt)
    <name>/pacsnode.yaml            pacsnode's settings, :class:`BundleSpec`

Every folder under ``models/bundles/`` is registered by :func:`models.registry.available_models`
under its folder name; a broken bundle is still registered, and its
:meth:`BundleModel.missing_requirements` says what is wrong, naming the file and field.
Only the metadata, the configs and the spec are read then; torch, MONAI and the weights
are loaded when a worker creates the model (once per process).

Parsing ``network_def`` goes through :class:`monai.bundle.ConfigParser`, which may
evaluate ``$`` expressions and import ``_target_`` components: a bundle is code, and is
trusted like any model module in this repository.

Preprocessing. pacsnode does not run the bundle's own ``preprocessing`` Compose (it starts
from files via LoadImaged); it applies the steps below, from ``pacsnode.yaml``
``preprocessing`` where given, else read from the literal arguments of the matching
transform in ``inference.json`` ``preprocessing#transforms``:

1. orientation (``axcodes``, from ``Orientation(d)``): the voxel axes are permuted and
   flipped (no resampling) to run along e.g. R, A, S, as MONAI's ``Orientationd`` does on
   a NIfTI. Without it the network sees our array order (slice, row, column).
2. spacing (``spacing_mm``, from ``Spacing(d)`` ``pixdim``): trilinear resampling to that
   spacing; the logits are resampled back to the original grid before the argmax.
3. intensity (``intensity``, from ``ScaleIntensityRange(d)``): ``clip`` to
   [``a_min``, ``a_max``] and scale linearly to [``b_min``, ``b_max``]. Without it the
   network gets the rescaled values (HU for CT) as they are.

Other transforms are ignored. Inference is ``monai.inferers.sliding_window_inference``
(``inference.roi_size``, ``sw_batch_size``, ``overlap``; defaults from the bundle's
``inferer``) on CUDA if available, else the CPU, under bf16 autocast when ``precision`` is
``bf16`` and the device is CUDA; then the argmax over channels is the label map.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
import yaml
from nibabel import orientations
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.base import (
    Accepts,
    Code,
    LabelSpec,
    ModelError,
    OrientationValues,
    SegmentationModel,
    Volume,
)

__all__ = [
    "BUNDLES_DIR",
    "SPEC_FILE",
    "BundleError",
    "BundleModel",
    "BundleSpec",
    "argmax_channels",
    "bundle_model_class",
    "discover_bundles",
    "read_bundle",
]

logger = logging.getLogger(__name__)

#: Where shipped bundles live; every sub-folder is one model.
BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
SPEC_FILE = "pacsnode.yaml"
METADATA_FILE = Path("configs") / "metadata.json"
INFERENCE_FILE = Path("configs") / "inference.json"
WEIGHTS_FILE = Path("models") / "model.pt"
TORCHSCRIPT_FILE = Path("models") / "model.ts"

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class BundleError(Exception):
    """A bundle cannot be used; the message names the file (and field) at fault."""


# --- pacsnode.yaml --------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    """A coded concept, e.g. ``{value: "272673000", meaning: Bone}`` (scheme SCT)."""

    value: str = Field(min_length=1)
    scheme_designator: str = "SCT"
    meaning: str = Field(min_length=1)

    def to_code(self) -> Code:
        return Code(self.value, self.scheme_designator, self.meaning)


class LabelEntry(_Strict):
    """How one output channel appears in the SEG; ``name`` defaults to the channel_def name."""

    name: str | None = None
    category: CodeSpec
    property_type: CodeSpec
    color_rgb: tuple[
        Annotated[int, Field(ge=0, le=255)],
        Annotated[int, Field(ge=0, le=255)],
        Annotated[int, Field(ge=0, le=255)],
    ] = (255, 0, 0)


class AcceptsSpec(_Strict):
    """What input the model takes (:class:`models.base.Accepts`); empty lists accept all."""

    modalities: list[str] = Field(default_factory=list)
    orientations: list[OrientationValues] = Field(default_factory=list)
    min_slices: int = Field(default=1, ge=1)


class IntensitySpec(_Strict):
    """Clip to [a_min, a_max] (when ``clip``) and scale linearly to [b_min, b_max]."""

    a_min: float
    a_max: float
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True

    @model_validator(mode="after")
    def _check_range(self) -> IntensitySpec:
        if self.a_max <= self.a_min:
            raise ValueError(f"a_max must exceed a_min. Found {self.a_min} and {self.a_max}.")
        return self


class PreprocessingSpec(_Strict):
    """Overrides for what is read from the bundle's ``preprocessing`` transforms."""

    intensity: IntensitySpec | None = None
    #: Three letters, one of each of L/R, P/A, I/S, e.g. "RAS" (MONAI's Orientationd).
    axcodes: str | None = None
    spacing_mm: (
        tuple[
            Annotated[float, Field(gt=0)],
            Annotated[float, Field(gt=0)],
            Annotated[float, Field(gt=0)],
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _check_axcodes(self) -> PreprocessingSpec:
        codes = self.axcodes
        if codes is not None and (
            len(codes) != 3
            or sorted(
                next((i for i, pair in enumerate(_RAS_LABELS) if c in pair), -1) for c in codes
            )
            != [0, 1, 2]
        ):
            raise ValueError(
                f"axcodes must be one letter of each of L/R, P/A, I/S, e.g. 'RAS'. Found {codes!r}."
            )
        return self


class InferenceSpec(_Strict):
    """Sliding-window settings; unset ones come from the bundle's ``inferer``."""

    roi_size: (
        tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
        | None
    ) = None
    sw_batch_size: int | None = Field(default=None, ge=1)
    overlap: float | None = Field(default=None, ge=0.0, lt=1.0)
    precision: Literal["fp32", "bf16"] = "fp32"


class BundleSpec(_Strict):
    """``pacsnode.yaml``: what pacsnode needs beyond the bundle's own files.

    ``labels`` maps each non-zero channel of ``channel_def`` to its SNOMED CT codes.
    """

    queue: Literal["gpu", "cpu"] = "gpu"
    accepts: AcceptsSpec = Field(default_factory=AcceptsSpec)
    preprocessing: PreprocessingSpec = Field(default_factory=PreprocessingSpec)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    labels: dict[int, LabelEntry] = Field(default_factory=dict)
    description: str | None = None


# --- reading a bundle -----------------------------------------------------------------


class BundleInfo(BaseModel):
    """Everything pacsnode reads from a bundle folder, checked; weights not loaded."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    name: str
    version: str
    description: str
    spec: BundleSpec
    labels: tuple[LabelSpec, ...]
    out_channels: int
    weights: Path
    torchscript: bool
    intensity: IntensitySpec | None
    axcodes: str | None
    spacing_mm: tuple[float, float, float] | None
    roi_size: tuple[int, int, int]
    sw_batch_size: int
    overlap: float


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object")
    return data


def _read_spec(path: Path) -> BundleSpec:
    if not path.is_file():
        return BundleSpec()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise BundleError(f"{path} is not readable YAML: {e}") from e
    try:
        return BundleSpec.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in e.errors()
        )
        raise BundleError(f"{path}: {problems}") from e


def _transform_args(inference: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Literal arguments of the first preprocessing transform whose ``_target_`` is in
    ``names``; arguments given as ``$``/``@`` expressions are left out."""
    preprocessing = inference.get("preprocessing")
    transforms = preprocessing.get("transforms") if isinstance(preprocessing, dict) else None
    if not isinstance(transforms, list):
        return {}
    for transform in transforms:
        if not isinstance(transform, dict):
            continue
        target = str(transform.get("_target_", "")).rsplit(".", 1)[-1]
        if target in names:
            return {
                key: value
                for key, value in transform.items()
                if not key.startswith("_")
                and not (isinstance(value, str) and value[:1] in ("$", "@"))
            }
    return {}


def _literal(value: Any) -> bool:
    return not (isinstance(value, str) and value[:1] in ("$", "@"))


def read_bundle(path: Path) -> BundleInfo:
    """Read and check a bundle folder without loading torch or the weights.

    Parameters
    ----------
    path
        The bundle folder (``configs/``, ``models/``, optional ``pacsnode.yaml``).

    Returns
    -------
    BundleInfo
        Name, version, labels and the inference settings.

    Raises
    ------
    BundleError
        If a file is missing or a field is wrong; the message names the file and field.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle folder {path} does not exist")
    spec_path = path / SPEC_FILE
    spec = _read_spec(spec_path)
    metadata_path = path / METADATA_FILE
    metadata = _read_json(metadata_path)
    inference_path = path / INFERENCE_FILE
    inference = _read_json(inference_path) if inference_path.is_file() else {}

    version = metadata.get("version")
    if not isinstance(version, str) or not version:
        raise BundleError(f"{metadata_path}: field 'version' is missing or not a string")
    try:
        channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        channels = {int(key): str(value) for key, value in dict(channel_def).items()}
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(
            f"{metadata_path}: field 'network_data_format.outputs.pred.channel_def' is missing "
            f"or not a mapping of channel numbers to names ({e!r})"
        ) from e
    if sorted(channels) != list(range(len(channels))) or len(channels) < 2:
        raise BundleError(
            f"{metadata_path}: 'network_data_format.outputs.pred.channel_def' must number its "
            f"channels 0, 1, ... with 0 as background. Found {sorted(channels)}."
        )
    if len(channels) > 256:
        raise BundleError(f"{metadata_path}: {len(channels)} channels; pacsnode takes 256 at most")

    missing_codes = [c for c in channels if c > 0 and c not in spec.labels]
    if missing_codes:
        raise BundleError(
            f"{spec_path}: field 'labels' must give SNOMED CT codes (category, property_type) "
            f"for channel(s) {', '.join(f'{c} ({channels[c]!r})' for c in missing_codes)} of "
            f"{metadata_path} channel_def"
        )
    extra = [c for c in spec.labels if c not in channels or c == 0]
    if extra:
        raise BundleError(
            f"{spec_path}: field 'labels' names channel(s) {extra} that are not foreground "
            f"channels of {metadata_path} channel_def"
        )
    labels = tuple(
        LabelSpec(
            value=c,
            name=entry.name or channels[c].replace("_", " ").capitalize(),
            category=entry.category.to_code(),
            property_type=entry.property_type.to_code(),
            color_rgb=entry.color_rgb,
        )
        for c, entry in sorted(spec.labels.items())
    )

    if (path / WEIGHTS_FILE).is_file():
        weights, torchscript = path / WEIGHTS_FILE, False
        if "network_def" not in inference:
            raise BundleError(
                f"{inference_path}: field 'network_def' is needed to load {weights}"
                + ("" if inference_path.is_file() else " (the file is missing)")
            )
    elif (path / TORCHSCRIPT_FILE).is_file():
        weights, torchscript = path / TORCHSCRIPT_FILE, True
    else:
        raise BundleError(
            f"bundle {path} has no weights: {path / WEIGHTS_FILE} (state dict) or "
            f"{path / TORCHSCRIPT_FILE} (TorchScript) is missing"
        )

    pre = spec.preprocessing
    intensity = pre.intensity
    if intensity is None:
        args = _transform_args(inference, ("ScaleIntensityRanged", "ScaleIntensityRange"))
        if {"a_min", "a_max"} <= args.keys():
            try:
                intensity = IntensitySpec.model_validate(
                    {k: args[k] for k in ("a_min", "a_max", "b_min", "b_max", "clip") if k in args}
                )
            except ValidationError as e:
                raise BundleError(
                    f"{inference_path}: ScaleIntensityRanged arguments are not usable ({e}); "
                    f"set preprocessing.intensity in {spec_path}"
                ) from e
    axcodes = pre.axcodes
    if axcodes is None:
        value = _transform_args(inference, ("Orientationd", "Orientation")).get("axcodes")
        axcodes = str(value) if value is not None else None
    spacing = pre.spacing_mm
    if spacing is None:
        pixdim = _transform_args(inference, ("Spacingd", "Spacing")).get("pixdim")
        if pixdim is not None:
            try:
                spacing = PreprocessingSpec(spacing_mm=tuple(pixdim)).spacing_mm
            except (ValidationError, TypeError) as e:
                raise BundleError(
                    f"{inference_path}: Spacingd pixdim {pixdim!r} is not 3 positive numbers; "
                    f"set preprocessing.spacing_mm in {spec_path}"
                ) from e
    if axcodes is not None:
        try:
            PreprocessingSpec(axcodes=axcodes)
        except ValidationError as e:
            raise BundleError(f"{inference_path}: Orientationd axcodes {axcodes!r} invalid") from e

    inferer_config = inference.get("inferer")
    inferer: dict[str, Any] = inferer_config if isinstance(inferer_config, dict) else {}
    settings = spec.inference
    roi = settings.roi_size
    if roi is None and _literal(inferer.get("roi_size")) and inferer.get("roi_size") is not None:
        try:
            roi = InferenceSpec(roi_size=tuple(inferer["roi_size"])).roi_size
        except (ValidationError, TypeError):
            roi = None
    if roi is None:
        raise BundleError(
            f"{spec_path}: field 'inference.roi_size' is needed (the bundle's {inference_path} "
            f"inferer gives no literal roi_size)"
        )
    sw_batch_size = settings.sw_batch_size
    if sw_batch_size is None:
        value = inferer.get("sw_batch_size", 1)
        sw_batch_size = int(value) if isinstance(value, int) and value >= 1 else 1
    overlap = settings.overlap
    if overlap is None:
        value = inferer.get("overlap", 0.25)
        overlap = float(value) if isinstance(value, int | float) and 0 <= value < 1 else 0.25

    meta_name = str(metadata.get("name", path.name))
    meta_description = str(metadata.get("description", "")).strip()
    description = spec.description or f"MONAI bundle {meta_name} {version}: {meta_description}"
    return BundleInfo(
        path=path,
        name=path.name,
        version=version,
        description=description,
        spec=spec,
        labels=labels,
        out_channels=len(channels),
        weights=weights,
        torchscript=torchscript,
        intensity=intensity,
        axcodes=axcodes,
        spacing_mm=spacing,
        roi_size=roi,
        sw_batch_size=sw_batch_size,
        overlap=overlap,
    )


# --- the model ------------------------------------------------------------------------


class BundleModel(SegmentationModel):
    """A MONAI bundle; :func:`bundle_model_class` makes one subclass per bundle folder."""

    bundle_dir: ClassVar[Path]

    @classmethod
    def missing_requirements(cls) -> str | None:
        """The first problem :func:`read_bundle` finds in this bundle, or None."""
        try:
            read_bundle(cls.bundle_dir)
        except BundleError as e:
            return str(e)
        return None

    def __init__(self) -> None:
        """Load the network once, on CUDA if available, else on the CPU.

        Raises
        ------
        BundleError
            If the bundle is incomplete or its weights do not fit its ``network_def``.
        """
        import torch
        from monai.bundle import ConfigParser

        info = read_bundle(self.bundle_dir)
        self._info = info
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        net: torch.nn.Module
        if info.torchscript:
            # Plain torch.jit.load: monai.data.load_net_with_metadata insists on the
            # metadata.json extra file that ckpt_export adds and a plain jit.save lacks.
            net = torch.jit.load(str(info.weights), map_location=self._device)
        else:
            parser = ConfigParser()
            parser.read_meta(info.path / METADATA_FILE)
            parser.read_config(info.path / INFERENCE_FILE)
            net = parser.get_parsed_content("network_def")
            state = torch.load(info.weights, map_location=self._device, weights_only=True)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # a training checkpoint {"model": ..., "optimizer": ...}
            try:
                net.load_state_dict(state)
            except RuntimeError as e:
                raise BundleError(
                    f"{info.weights} does not fit network_def of {info.path / INFERENCE_FILE}: {e}"
                ) from e
        self._net = net.to(self._device).eval()
        self._autocast = info.spec.inference.precision == "bf16" and self._device.type == "cuda"
        # BatchNorm and friends are stateless in eval(), but keep one job at a time per model.
        self._lock = threading.Lock()
        logger.info(
            "bundle %s %s: %s on %s%s",
            info.name,
            info.version,
            info.weights,
            self._device,
            " (bf16)" if self._autocast else "",
        )

    def _prepare(
        self, volume: Volume
    ) -> tuple[npt.NDArray[np.float32], tuple[float, float, float], npt.NDArray[np.float64] | None]:
        """The network's input array, its voxel spacing and the orientation transform back
        to the volume's axes (None when the array order is kept)."""
        info = self._info
        voxels = np.asarray(volume.voxels, dtype=np.float32)
        spacing = volume.spacing_mm
        back = None
        if info.axcodes is not None:
            current = orientations.io_orientation(volume.ras_affine)
            target = orientations.axcodes2ornt(tuple(info.axcodes), labels=_RAS_LABELS)
            to_net = orientations.ornt_transform(current, target)
            voxels = np.asarray(orientations.apply_orientation(voxels, to_net), dtype=np.float32)
            net_spacing = [0.0, 0.0, 0.0]
            for axis, (new_axis, _) in enumerate(to_net):
                net_spacing[int(new_axis)] = volume.spacing_mm[axis]
            spacing = (net_spacing[0], net_spacing[1], net_spacing[2])
            back = orientations.ornt_transform(target, current)
        if info.intensity is not None:
            w = info.intensity
            if w.clip:
                voxels = np.clip(voxels, w.a_min, w.a_max)
            voxels = (voxels - w.a_min) / (w.a_max - w.a_min) * (w.b_max - w.b_min) + w.b_min
        return np.ascontiguousarray(voxels, dtype=np.float32), spacing, back

    def predict(self, volume: Volume) -> npt.NDArray[np.uint8]:
        """Label map of the bundle's channels (argmax; channel ``c`` gets value ``c``).

        Parameters
        ----------
        volume
            The input series, any orientation.

        Returns
        -------
        numpy.ndarray
            uint8 label map with ``volume.voxels.shape``.

        Raises
        ------
        ModelError
            If the volume is not 3-D or holds non-finite values.
        """
        import torch
        import torch.nn.functional as F
        from monai.inferers import sliding_window_inference

        info = self._info
        if volume.voxels.ndim != 3:
            raise ModelError(f"{info.name} needs a 3-D volume; found shape {volume.voxels.shape}.")
        if not np.isfinite(volume.voxels).all():
            raise ModelError(f"{info.name}: the volume holds non-finite values.")
        image, spacing, back = self._prepare(volume)
        shape = image.shape
        with self._lock, torch.inference_mode():
            x = torch.from_numpy(image)[None, None].to(self._device)
            if info.spacing_mm is not None:
                size = [
                    max(1, round(n * s / t))
                    for n, s, t in zip(shape, spacing, info.spacing_mm, strict=True)
                ]
                x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
            with torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=self._autocast):
                logits = sliding_window_inference(
                    x,
                    info.roi_size,
                    info.sw_batch_size,
                    self._net,
                    overlap=info.overlap,
                )
            logits = torch.as_tensor(logits).float()
            if tuple(logits.shape[2:]) != shape:
                logits = F.interpolate(logits, size=shape, mode="trilinear", align_corners=False)
            labels = argmax_channels(logits[0]).cpu().numpy()
        if back is not None:
            labels = orientations.apply_orientation(labels, back)
        labels = np.ascontiguousarray(labels, dtype=np.uint8)
        logger.info(
            "%s: %s",
            info.name,
            ", ".join(
                f"{spec.name} {float(np.count_nonzero(labels == spec.value)) * volume.voxel_volume_ml:.1f} mL"
                for spec in info.labels
            ),
        )
        return labels


def argmax_channels(logits: Any) -> Any:
    """``torch.argmax(logits, dim=0)`` as uint8, for (channels, *spatial) logits.

    One pass per channel over contiguous memory instead of a reduction across the
    strided channel axis, which takes torch about a second on a 2 x 64 x 512 x 512 CPU
    tensor. Ties go to the lower channel, as with ``torch.argmax``.
    """
    import torch

    best = logits[0].clone()
    labels = torch.zeros(best.shape, dtype=torch.uint8, device=logits.device)
    for channel in range(1, logits.shape[0]):
        higher = logits[channel] > best
        best = torch.where(higher, logits[channel], best)
        labels[higher] = channel
    return labels


def bundle_model_class(path: Path) -> type[BundleModel]:
    """A :class:`BundleModel` subclass for the bundle at ``path``, named after the folder.

    The class is made even when the bundle is broken (so ``pacsnode check-config`` can
    report it through ``missing_requirements``); creating an instance then raises.
    """
    path = Path(path).resolve()
    class_name = "Bundle_" + "".join(c if c.isalnum() else "_" for c in path.name)
    attributes: dict[str, Any] = {
        "bundle_dir": path,
        "name": path.name,
        "__module__": __name__,
        "__qualname__": class_name,
    }
    try:
        info = read_bundle(path)
    except BundleError as e:
        logger.warning("bundle %s cannot be used: %s", path.name, e)
        attributes.update(version="unknown", labels=(), description=f"broken bundle: {e}")
    else:
        spec = info.spec
        attributes.update(
            version=info.version,
            queue=spec.queue,
            labels=info.labels,
            accepts=Accepts(
                modalities=tuple(spec.accepts.modalities),
                orientations=tuple(spec.accepts.orientations),
                min_slices=spec.accepts.min_slices,
            ),
            description=info.description,
        )
    return type(class_name, (BundleModel,), attributes)


_CLASSES: dict[Path, type[BundleModel]] = {}


def discover_bundles(folder: Path = BUNDLES_DIR) -> list[type[BundleModel]]:
    """One class per bundle folder in ``folder`` (a folder holding ``configs/``), made
    once per process and path."""
    if not folder.is_dir():
        return []
    classes = []
    for path in sorted(p.resolve() for p in folder.iterdir() if (p / "configs").is_dir()):
        if path not in _CLASSES:
            _CLASSES[path] = bundle_model_class(path)
        classes.append(_CLASSES[path])
    return classes
