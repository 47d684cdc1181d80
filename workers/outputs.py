"""What a job writes and which destination receives which file.

Each destination in config.yaml has an :class:`OutputProfile` (SEG as BINARY or
LABELMAP or not at all, with or without empty frames, SR, overlay images). A job writes
the union of what its destinations want, one file per variant, named so that the node
can tell them apart (:attr:`SegVariant.file_name`, :attr:`SegVariant.sr_file_name`,
:data:`OVERLAY_PREFIX`); the node then gives each destination the files its profile
selects (:meth:`OutputProfile.select`).

An SR references the SEG whose segments it measures, so each destination gets the SR
that references the very SEG it receives: one SR per SEG variant sent. A destination
without SEG gets the SR of the default BINARY SEG (:data:`DEFAULT_SEG`), which is then
built for the reference even if nobody receives it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DEFAULT_SEG",
    "OVERLAY_PREFIX",
    "SR_FILE",
    "OutputProfile",
    "OutputRequest",
    "SegVariant",
]

SR_FILE = "sr.dcm"
OVERLAY_PREFIX = "overlay-"

SegType = Literal["binary", "labelmap"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SegVariant(_Frozen):
    """One SEG encoding: its type and whether frames without the segment are left out."""

    seg_type: SegType
    omit_empty_frames: bool

    @property
    def name(self) -> str:
        """``binary``, ``binary-all-frames``, ``labelmap``, ``labelmap-all-frames``."""
        return f"{self.seg_type}{'' if self.omit_empty_frames else '-all-frames'}"

    @property
    def file_name(self) -> str:
        """``seg-binary.dcm``, ``seg-labelmap-all-frames.dcm``, ..."""
        return f"seg-{self.name}.dcm"

    @property
    def instance_number(self) -> int:
        """InstanceNumber of this encoding's SEG, and of the SR that references it, in
        their series (one series each per job)."""
        return 1 + 2 * (self.seg_type == "labelmap") + (not self.omit_empty_frames)

    @property
    def sr_file_name(self) -> str:
        """The SR that references this SEG: ``sr.dcm`` for :data:`DEFAULT_SEG`, else
        e.g. ``sr-labelmap.dcm``."""
        return SR_FILE if self == DEFAULT_SEG else f"sr-{self.name}.dcm"


DEFAULT_SEG = SegVariant(seg_type="binary", omit_empty_frames=True)


class OutputProfile(_Frozen):
    """What one destination receives.

    ``seg``: ``binary`` (every viewer that shows SEG), ``labelmap`` (the DICOM label-map
    segmentation, one frame per slice; newer viewers) or ``none`` (PACS that cannot show
    SEG). ``omit_empty_frames``: leave out frames where a segment is absent (smaller,
    the usual choice). ``send_empty_seg``: when the model found nothing, send a SEG with
    empty segments anyway (the SR says "no findings" either way). ``sr``: the TID 1500
    report. ``overlays``: key images with the outlines burned in, as Secondary Capture.
    """

    seg: Literal["binary", "labelmap", "none"] = "binary"
    omit_empty_frames: bool = True
    send_empty_seg: bool = False
    sr: bool = True
    overlays: bool = False

    @property
    def seg_variant(self) -> SegVariant | None:
        if self.seg == "none":
            return None
        return SegVariant(seg_type=self.seg, omit_empty_frames=self.omit_empty_frames)

    def select(self, file_names: list[str], *, empty_result: bool) -> list[str]:
        """The result files, of those a job wrote, that this destination receives."""
        chosen = []
        variant = self.seg_variant
        if variant is not None and (self.send_empty_seg or not empty_result):
            chosen += [name for name in file_names if name == variant.file_name]
        if self.sr:
            preferred = (variant or DEFAULT_SEG).sr_file_name
            # A classification writes one SR, sr.dcm, whatever the SEG settings.
            chosen.append(preferred if preferred in file_names else SR_FILE)
            chosen = [name for name in chosen if name in file_names]
        if self.overlays:
            chosen += [name for name in file_names if name.startswith(OVERLAY_PREFIX)]
        return chosen


class OutputRequest(_Frozen):
    """What the worker writes for one job: the union over its destinations' profiles,
    plus the settings every result object shares (config.yaml ``results``)."""

    #: What each destination of the job receives, as config.yaml said at dispatch.
    destinations: dict[str, OutputProfile] = Field(default_factory=dict)
    seg_variants: tuple[SegVariant, ...] = (DEFAULT_SEG,)
    #: The SEG each SR written references (one SR per entry); empty: no SR.
    sr_references: tuple[SegVariant, ...] = (DEFAULT_SEG,)
    overlays: bool = False
    series_description: str = "{model} {kind}"
    notice: str = ""
    seg_series_number: int = Field(default=901, ge=1)
    sr_series_number: int = Field(default=902, ge=1)
    overlay_series_number: int = Field(default=903, ge=1)
    rejection_series_number: int = Field(default=904, ge=1)

    @classmethod
    def for_destinations(
        cls, destinations: dict[str, OutputProfile], **settings: object
    ) -> OutputRequest:
        """What to write for these destinations (a BINARY SEG and its SR when there are
        none, so the job's results exist for ``pacsnode render``)."""
        profiles = list(destinations.values()) or [OutputProfile()]
        request = cls.for_profiles(profiles, **settings)
        return request.model_copy(update={"destinations": dict(destinations)})

    @classmethod
    def for_profiles(cls, profiles: list[OutputProfile], **settings: object) -> OutputRequest:
        """The union of ``profiles``; ``settings`` are the shared ``results`` settings."""
        variants: list[SegVariant] = []
        references: list[SegVariant] = []
        for profile in profiles:
            variant = profile.seg_variant
            if variant is not None and variant not in variants:
                variants.append(variant)
            reference = variant or DEFAULT_SEG
            if profile.sr and reference not in references:
                references.append(reference)
        return cls.model_validate(
            {
                "seg_variants": tuple(variants),
                "sr_references": tuple(references),
                "overlays": any(p.overlays for p in profiles),
                **settings,
            }
        )

    def describe(self, model: str, kind: str, revision: int = 1) -> str:
        """SeriesDescription of a result series (at most 64 characters), e.g.
        ``ct-tissue SEG (rev 2) - NOT FOR CLINICAL USE``; the revision and the notice
        are kept whole, the description shortened to make room for them."""
        text = self.series_description.format(model=model, kind=kind)
        suffix = (f" (rev {revision})" if revision > 1 else "") + (
            f" - {self.notice}" if self.notice else ""
        )
        return text[: 64 - len(suffix)] + suffix
