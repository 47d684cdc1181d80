"""Overlay key images: for PACS that cannot show SEG, the outline burned into the image.

For each segment, the slice where it has its largest cross-section is windowed to grey
(the source's own window, else a soft-tissue window for CT, else the 1st-99th
percentile), the segment's outline is drawn in its colour, and a legend names it with
its volume (and the configured notice). Each becomes a Secondary Capture image
(highdicom) in a new series of the same study, referencing its source instance, or a
PNG for ``pacsnode render``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from workers.dicom_encoding import keep_source_charset
from workers.label_passes import slice_areas
from workers.seg import MANUFACTURER, SegmentInfo, pacsnode_version
from workers.series import LoadedSeries
from workers.uids import ResultUids

__all__ = ["KeyImage", "build_overlay_images", "key_images"]

logger = logging.getLogger(__name__)

#: Soft-tissue window (center, width) for CT without a window in its header.
CT_WINDOW = (40.0, 400.0)
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class KeyImage:
    """One segment's key slice: which slice, the RGB picture with the outline, and the
    (rows, columns) the legend box covers at the top left."""

    segment: SegmentInfo
    slice_index: int
    rgb: npt.NDArray[np.uint8]
    legend_size: tuple[int, int]


def _window(ds: Dataset, pixels: npt.NDArray[np.float32], modality: str) -> tuple[float, float]:
    """(center, width): the instance's first window, else a CT window, else percentiles."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    try:
        c = float(center[0] if isinstance(center, Sequence) else center)
        w = float(width[0] if isinstance(width, Sequence) else width)
        if w > 0:
            return c, w
    except (TypeError, ValueError, IndexError):
        pass
    if modality.upper() == "CT":
        return CT_WINDOW
    low, high = (float(v) for v in np.percentile(pixels, [1, 99]))
    return (low + high) / 2, max(high - low, 1.0)


def _legend(image: Image.Image, lines: list[tuple[str, tuple[int, int, int]]]) -> tuple[int, int]:
    """A dark box at the top left holding one coloured line per entry; its (rows, columns)."""
    size = max(12, image.height // 40)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(image)
    margin = size // 2
    widths = [draw.textlength(text, font=font) for text, _ in lines]
    box = (0, 0, int(max(widths)) + 2 * margin, len(lines) * (size + margin) + margin)
    draw.rectangle(box, fill=(0, 0, 0))
    for row, (text, colour) in enumerate(lines):
        draw.text((margin, margin + row * (size + margin)), text, fill=colour, font=font)
    return box[3] + 1, box[2] + 1


def _draw(
    series: LoadedSeries,
    label_map: npt.NDArray[np.integer],
    segment: SegmentInfo,
    k: int,
    volume_ml: float | None,
    notice: str,
) -> KeyImage:
    """Slice ``k`` windowed to grey, the segment's outline in its colour, the legend."""
    pixels = series.volume.voxels[k]
    center, width = _window(series.datasets[k], pixels, series.volume.modality)
    grey = np.clip((pixels - (center - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    # A line about 1/256 of the image wide, so it shows on a 512 matrix and on a 3000 one.
    thickness = max(1, round(max(pixels.shape) / 256))
    inside = label_map[k] == segment.label_value
    outline = inside & ~ndimage.binary_erosion(inside, iterations=thickness, border_value=0)
    rgb[outline] = segment.label.color_rgb
    image = Image.fromarray(rgb)
    text = segment.name if volume_ml is None else f"{segment.name}  {volume_ml:.1f} mL"
    lines = [(text, segment.label.color_rgb)]
    if notice:
        lines.append((notice, (255, 255, 255)))
    legend_size = _legend(image, lines)
    return KeyImage(
        segment=segment,
        slice_index=k,
        rgb=np.asarray(image, dtype=np.uint8),
        legend_size=legend_size,
    )


def key_images(
    series: LoadedSeries,
    label_map: npt.NDArray[np.integer],
    segments: Sequence[SegmentInfo],
    volumes_ml: dict[int, float] | None = None,
    notice: str = "",
) -> list[KeyImage]:
    """One :class:`KeyImage` per segment present in ``label_map``, in segment order."""
    areas = slice_areas(label_map, [info.label_value for info in segments])
    return [
        _draw(
            series,
            label_map,
            info,
            int(np.argmax(areas[info.label_value])),
            (volumes_ml or {}).get(info.label_value),
            notice,
        )
        for info in segments
        if areas[info.label_value].any()
    ]


def _patient_orientation(series: LoadedSeries) -> tuple[str, str]:
    """PatientOrientation: the patient direction (L/R, P/A, H/F) closest to the rows'
    and to the columns' direction, as DICOM names them for LPS patient space."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    volume = series.volume
    result = []
    for direction in (volume.row_direction, volume.column_direction):
        axis = int(np.argmax(np.abs(direction)))
        result.append(letters[axis][0 if direction[axis] > 0 else 1])
    return result[0], result[1]


def build_overlay_images(
    series: LoadedSeries,
    images: Sequence[KeyImage],
    uids: ResultUids,
    *,
    series_number: int,
    series_description: str,
    notice: str = "",
) -> list[hd.sc.SCImage]:
    """Secondary Capture images of ``images``, a new series of the source study.

    Each keeps the source slice's patient and study, its patient orientation letters and
    pixel spacing (so a viewer labels the sides and measures right), and references that
    slice.
    """
    result = []
    series_uid = uids.derive("overlay-series")
    for number, key in enumerate(images, start=1):
        source = series.datasets[key.slice_index]
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=key.rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=uids.derive("overlay", str(key.segment.label_value)),
            instance_number=number,
            manufacturer=MANUFACTURER,
            pixel_spacing=tuple(float(v) for v in source.PixelSpacing),  # type: ignore[arg-type]
            patient_orientation=_patient_orientation(series),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description[:64],
            manufacturer_model_name=MANUFACTURER,
            software_versions=pacsnode_version(),
            specific_character_set=None,  # set by keep_source_charset
        )
        keep_source_charset(sc, source)
        sc.ImageType = ["DERIVED", "SECONDARY", "OVERLAY"]
        # Type 2C in General Series; dciodvfy wants it whenever the body part may be
        # paired: the source's value, else present and empty (unknown).
        sc.Laterality = source.get("Laterality", "")
        sc.DerivationDescription = f"{key.segment.name} outline burned in by {MANUFACTURER}"[:1024]
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        sc.SourceImageSequence = [reference]
        if notice:
            sc.ImageComments = notice
        result.append(sc)
    logger.info("built %d overlay images", len(result))
    return result
