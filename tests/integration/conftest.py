"""Fixtures shared by the integration tests: test series on disk and a running node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from models.base import SegmentationModel
from tests.dicom_factory import chest_phantom, cranium_hu, write_ct_series
from tests.node_process import NodeProcess, node_config
from tests.peers import StoreSCP

PHANTOM_SHAPE = (24, 96, 96)
PHANTOM_SPACING = (5.0, 2.0, 2.0)


def make_phantom_series(
    folder: Path, patient_id: str, transfer_syntax: str = ExplicitVRLittleEndian
) -> Path:
    """A synthetic chest CT series (ORIGINAL/PRIMARY/AXIAL, new study and series UIDs),
    one file per slice, in ``folder``."""
    phantom = chest_phantom(PHANTOM_SHAPE, PHANTOM_SPACING)
    write_ct_series(
        phantom.hu,
        folder,
        spacing_mm=phantom.spacing_mm,
        patient_id=patient_id,
        patient_name=f"Phantom^{patient_id}",
        series_description="Synthetic chest phantom",
        transfer_syntax=transfer_syntax,
    )
    return folder


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_series(tmp_path_factory.mktemp("phantom"), "PHANTOM1")


@pytest.fixture(scope="session")
def phantom_jpeg2000_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chest phantom compressed as JPEG 2000 Lossless."""
    return make_phantom_series(tmp_path_factory.mktemp("phantom-j2k"), "PHANTOM2", JPEG2000Lossless)


@pytest.fixture(scope="session")
def cranium_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real head CT from Debian's invesalius-examples as a DICOM CT series."""
    hu, spacing = cranium_hu()
    folder = tmp_path_factory.mktemp("cranium")
    write_ct_series(
        hu,
        folder,
        spacing_mm=spacing,
        patient_id="CRANIUM",
        patient_name="Invesalius^Cranium",
        series_description="Head CT (invesalius-examples)",
    )
    return folder


CT_RULE: dict[str, Any] = {
    "name": "ct-tissue",
    "match": {"Modality": "CT", "ImageType": {"contains": "AXIAL"}, "min_instances": 10},
    "models": ["ct-tissue"],
    "send_to": ["pacs"],
}


@pytest.fixture
def destination() -> Iterator[StoreSCP]:
    """dcmtk storescp as the PACS that receives results."""
    with StoreSCP(ae_title="DESTPACS") as scp:
        yield scp


def ct_node_config(data_dir: Path, destination: StoreSCP, **settings: Any) -> dict[str, Any]:
    """A node config with the CT rule sending to ``destination`` (as ``pacs``) on a free
    port; ``settings`` go to :func:`tests.node_process.node_config`."""
    config = node_config(
        data_dir,
        port=0,
        destinations={
            "pacs": {
                "ae_title": destination.ae_title,
                "host": "127.0.0.1",
                "port": destination.port,
            }
        },
        rules=[dict(CT_RULE)],  # a copy: a test may change its rule
        **settings,
    )
    del config["node"]["port"]  # NodeProcess picks a free one
    return config


@pytest.fixture
def node(tmp_path: Path, destination: StoreSCP) -> Iterator[NodeProcess]:
    """``pacsnode run`` with one CT rule sending to ``destination``."""
    config = ct_node_config(tmp_path / "data", destination)
    with NodeProcess(tmp_path, config) as process:
        yield process


def seg_label_map(
    seg_path: Path, source: list[Dataset], model: SegmentationModel
) -> npt.NDArray[np.uint8]:
    """Read a SEG back (highdicom) as a label map in the order of ``source``, using the
    model's label values (segments are matched by label name)."""
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in source],
        combine_segments=True,
        relabel=False,
    )
    result = np.zeros(pixels.shape, dtype=np.uint8)
    by_name = {spec.name: spec.value for spec in model.labels}
    for item in seg.SegmentSequence:
        result[pixels == int(item.SegmentNumber)] = by_name[str(item.SegmentLabel)]
    return result


def received_by_modality(files: list[Path]) -> dict[str, Dataset]:
    """The received files keyed by Modality (SEG, SR); fails on duplicates of a kind."""
    by_modality: dict[str, Dataset] = {}
    for path in files:
        ds = dcmread(path)
        assert ds.Modality not in by_modality, f"two {ds.Modality} objects received"
        by_modality[str(ds.Modality)] = ds
    return by_modality
