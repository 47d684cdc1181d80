"""Model specs: ``pacsnode.yaml`` beside a network, and what pacsnode resolves from it.

A network model lives in a folder under ``models/bundles/``: either a MONAI Model Zoo
bundle (:mod:`models.bundle`) or a TorchScript or ONNX file (:mod:`models.exported`). Both
carry a ``pacsnode.yaml`` (:class:`ModelSpec`) for what their own files do not say:
the SNOMED CT codes and colours of the labels, the coded findings of the classes, what
input the model takes, and how to run it. Each reader turns a folder into one
:class:`NetworkInfo`, which :mod:`models.network` runs. Every error names the file and
the field at fault.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.base import (
    Accepts,
    ClassSpec,
    Code,
    InputKindValues,
    LabelSpec,
    OrientationValues,
    Queue,
)

__all__ = [
    "SPEC_FILE",
    "AcceptsSpec",
    "ClassEntry",
    "CodeSpec",
    "InferenceSpec",
    "IntensitySpec",
    "LabelEntry",
    "ModelSpec",
    "ModelSpecError",
    "NetworkInfo",
    "PreprocessingSpec",
    "read_spec",
]

SPEC_FILE = "pacsnode.yaml"

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
Channel = Annotated[int, Field(ge=0, le=255)]


class ModelSpecError(Exception):
    """A model folder cannot be used; the message names the file (and field) at fault."""


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
    """How one output channel appears in the SEG; a bundle's channel_def names it when
    ``name`` is left out."""

    name: str | None = None
    category: CodeSpec
    property_type: CodeSpec
    color_rgb: tuple[Channel, Channel, Channel] = (255, 0, 0)


class ClassEntry(_Strict):
    """One output of a classifier, in output order, and the finding the SR reports."""

    name: str = Field(min_length=1)
    finding: CodeSpec

    def to_class_spec(self) -> ClassSpec:
        return ClassSpec(name=self.name, finding=self.finding.to_code())


class AcceptsSpec(_Strict):
    """What input the model takes (:class:`models.base.Accepts`); empty lists accept all."""

    modalities: list[str] = Field(default_factory=list)
    orientations: list[OrientationValues] = Field(default_factory=list)
    min_slices: int = Field(default=1, ge=1)

    def to_accepts(self) -> Accepts:
        return Accepts(
            modalities=tuple(self.modalities),
            orientations=tuple(self.orientations),
            min_slices=self.min_slices,
        )


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
    """What the network expects of its input, applied in this order on the device.

    ``axcodes``: voxel axes permuted and flipped (no resampling) to run along e.g. R, A,
    S, as MONAI's ``Orientationd`` does. ``spacing_mm``: trilinear resampling to that
    spacing. ``intensity``: a window (``ScaleIntensityRanged``). ``normalize``: per-image
    ``zscore`` (``NormalizeIntensityd``) or ``minmax`` to [0, 1] (``ScaleIntensityd``).
    ``input_size`` (classifiers): the image or volume resized to this many pixels
    (rows, columns) or voxels (slices, rows, columns); left out, the network gets the
    full resolution (e.g. a mammogram as acquired).
    """

    axcodes: str | None = None
    spacing_mm: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = None
    intensity: IntensitySpec | None = None
    normalize: Literal["zscore", "minmax"] | None = None
    input_size: tuple[PositiveInt, PositiveInt] | tuple[PositiveInt, PositiveInt, PositiveInt] | None = None  # fmt: skip

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
    """How the network runs.

    ``roi_size``, ``overlap`` (segmentation): the sliding window. ``sw_batch_size``:
    windows per forward pass; left out, 4 on a CPU and 16 on a GPU (a bundle's own
    ``inferer`` value counts as the CPU one). ``precision``: ``bf16`` runs under bf16
    autocast on a GPU (the CPU always computes in fp32). ``chain`` (bundles): ``auto``
    runs pacsnode's fast path where it reproduces the bundle's transforms and the
    bundle's own chain otherwise; ``bundle`` always runs the bundle's own chain;
    ``fast`` refuses a bundle the fast path does not reproduce.
    """

    roi_size: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None
    sw_batch_size: int | None = Field(default=None, ge=1)
    overlap: float | None = Field(default=None, ge=0.0, lt=1.0)
    precision: Literal["fp32", "bf16"] = "fp32"
    chain: Literal["auto", "bundle", "fast"] = "auto"


class InputEntry(_Strict):
    """One named input of a multi-series model: which series of the study it takes.

    ``match`` holds conditions on series attributes in the rules' syntax (a value, or
    ``{regex: ...}``, ``{contains: ...}``, ``{min: ..., max: ...}``); the node checks
    them (:func:`node.rules.input_conditions`).
    """

    match: dict[str, Any] = Field(min_length=1)


class ModelSpec(_Strict):
    """``pacsnode.yaml``: a network model's declaration.

    Segmentation models give ``labels`` (channel -> codes, colour); classifiers give
    ``classes`` (one per output, in order), the ``activation`` that turns outputs into
    probabilities (``softmax``: one class of several; ``sigmoid``: each class on its own)
    and the ``threshold`` at which a class counts as present.
    """

    version: str | None = Field(default=None, min_length=1)
    task: Literal["segmentation", "classification"] = "segmentation"
    input: InputKindValues = InputKindValues.VOLUME
    queue: Queue = "gpu"
    accepts: AcceptsSpec = Field(default_factory=AcceptsSpec)
    preprocessing: PreprocessingSpec = Field(default_factory=PreprocessingSpec)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    labels: dict[int, LabelEntry] = Field(default_factory=dict)
    classes: list[ClassEntry] = Field(default_factory=list)
    activation: Literal["softmax", "sigmoid"] = "softmax"
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    description: str | None = None
    #: Multi-series models: named inputs in channel order, and the one whose grid the
    #: others are resampled to and the SEG refers to.
    inputs: dict[str, InputEntry] = Field(default_factory=dict)
    reference: str | None = None
    #: ``channels``: output channel c is label value c (channel_def names them);
    #: ``declared``: the bundle's own postprocessing writes label values itself (e.g.
    #: BraTS: 1, 2, 4), and ``labels`` names each value.
    label_values: Literal["channels", "declared"] = "channels"

    @model_validator(mode="after")
    def _check_inputs(self) -> ModelSpec:
        if not self.inputs:
            if self.reference is not None:
                raise ValueError("reference names one of inputs; there are no inputs")
            return self
        if len(self.inputs) < 2:
            raise ValueError("inputs are for models of two series or more")
        if self.reference not in self.inputs:
            raise ValueError(
                f"reference must name one of the inputs ({', '.join(self.inputs)}). "
                f"Found {self.reference!r}."
            )
        if self.task != "segmentation" or self.input != InputKindValues.VOLUME:
            raise ValueError("inputs are for segmentation models of volumes")
        return self

    @model_validator(mode="after")
    def _check_task(self) -> ModelSpec:
        if self.task == "classification":
            if not self.classes:
                raise ValueError("a classification model must list its classes")
            if self.labels:
                raise ValueError("labels are for segmentation models; a classifier has classes")
            if self.activation == "softmax" and len(self.classes) < 2:
                raise ValueError(
                    "softmax needs two classes or more; use activation: sigmoid for one"
                )
        else:
            if self.classes:
                raise ValueError("classes are for classification models; set task: classification")
            if self.input == InputKindValues.IMAGE:
                raise ValueError("input: image is for classification models")
            if self.preprocessing.input_size is not None:
                raise ValueError(
                    "preprocessing.input_size is for classification models; a segmentation "
                    "network runs on the (resampled) volume by sliding window"
                )
        if self.input == InputKindValues.IMAGE and (
            self.preprocessing.axcodes is not None or self.preprocessing.spacing_mm is not None
        ):
            raise ValueError("axcodes and spacing_mm need input: volume")
        size = self.preprocessing.input_size
        if size is not None and len(size) != (2 if self.input == InputKindValues.IMAGE else 3):
            raise ValueError(
                f"preprocessing.input_size needs {2 if self.input == 'image' else 3} numbers "
                f"for input: {self.input}. Found {list(size)}."
            )
        return self


def read_spec(path: Path) -> ModelSpec:
    """Read and check a ``pacsnode.yaml``; a missing file is an empty spec.

    Raises
    ------
    ModelSpecError
        If the file is not YAML or a field is wrong; the message names both.
    """
    if not path.is_file():
        return ModelSpec()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ModelSpecError(f"{path} is not readable YAML: {e}") from e
    try:
        return ModelSpec.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in e.errors()
        )
        raise ModelSpecError(f"{path}: {problems}") from e


class NetworkInfo(BaseModel):
    """Everything pacsnode needs to run a network model, checked; weights not loaded.

    ``state_dict_network`` is the bundle's ``inference.json`` when ``weights`` is a state
    dict for its ``network_def``; None when ``weights`` is a TorchScript file.
    ``default_sw_batch_size`` is the bundle's own ``inferer`` value, if any.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    name: str
    version: str
    description: str
    spec: ModelSpec
    labels: tuple[LabelSpec, ...] = ()
    classes: tuple[ClassSpec, ...] = ()
    weights: Path
    state_dict_network: Path | None = None
    preprocessing: PreprocessingSpec
    roi_size: tuple[int, int, int] | None = None
    overlap: float = 0.25
    default_sw_batch_size: int | None = None
    #: How overlapping windows are blended (MONAI's ``constant`` or ``gaussian``), the
    #: gaussian's ``sigma_scale``, and how windows past the edge are padded.
    window_mode: Literal["constant", "gaussian"] = "constant"
    sigma_scale: float = 0.125
    padding_mode: Literal["constant", "reflect", "replicate", "circular"] = "constant"
    #: How a bundle runs: pacsnode's ``fast`` path, or the ``bundle``'s own chain
    #: (:mod:`models.bundle_chain`); ``fast_path_refusal`` says why not the fast one.
    chain: Literal["fast", "bundle"] = "fast"
    fast_path_refusal: str | None = None
    #: The bundle's ``inputs.image.num_channels``: a grey series is repeated into that
    #: many channels for its own chain.
    input_channels: int = 1

    @property
    def task(self) -> Literal["segmentation", "classification"]:
        return self.spec.task

    @property
    def torchscript(self) -> bool:
        return self.state_dict_network is None and self.weights.suffix != ".onnx"

    @property
    def model_format(self) -> Literal["bundle", "torchscript", "onnx"]:
        """How the model came: a Model Zoo bundle (whatever its weights file), or a
        TorchScript or ONNX file with a pacsnode.yaml."""
        if (self.path / "configs").is_dir():
            return "bundle"
        return "onnx" if self.weights.suffix == ".onnx" else "torchscript"
