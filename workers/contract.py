"""The node <-> worker contract: the task's name, what a job is asked to do and what it
reports back, as pydantic models both sides import.

A job's input is its manifest: the exact instances (SOP Instance UID, spool path, size,
SHA-256 of the file) the node recorded when it created the job. The worker reads those
files and nothing else, and refuses a file whose bytes no longer match (the instance
was re-sent with other content after the job was created). This module imports nothing
heavy, so the node can send tasks without loading the pipeline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from workers.outputs import OutputRequest

__all__ = [
    "PRELOAD",
    "RUN_MODEL",
    "InputSeries",
    "JobOutcome",
    "JobRequest",
    "Manifest",
    "ManifestInstance",
    "Predecessor",
    "ResultInstance",
    "file_digest",
]

#: The Celery task that runs one job (:func:`workers.tasks.run_model`).
RUN_MODEL = "pacsnode.run_model"
#: The Celery task that decodes a series during its quiet period, ahead of its job
#: (:func:`workers.tasks.preload_series`, :mod:`workers.inputs`).
PRELOAD = "pacsnode.preload_series"


_SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def file_digest(path: Path) -> tuple[int, str]:
    """Size and SHA-256 (hex) of a whole file: how a manifest identifies an instance.

    Raises
    ------
    OSError
        If the file cannot be read.
    """
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256")
        return fh.tell(), digest.hexdigest()


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManifestInstance(_Frozen):
    """One input instance as the spool holds it."""

    sop_instance_uid: str
    path: str
    size: int = Field(ge=0)
    #: SHA-256 (hex) of the whole file as stored: preamble, file meta and dataset.
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class InputSeries(_Frozen):
    """One more named input of a multi-series model: a series' instances."""

    name: str
    series_instance_uid: str
    instances: tuple[ManifestInstance, ...] = Field(min_length=1)


class Manifest(_Frozen):
    """The exact input of a job: one series' instances when the job was created.

    For a multi-series model that series is its ``reference`` input (named
    ``reference_input``: the grid the others are resampled to and the SEG refers to),
    and ``other_inputs`` hold the other inputs' series.
    """

    series_instance_uid: str
    instances: tuple[ManifestInstance, ...] = Field(min_length=1)
    reference_input: str | None = None
    other_inputs: tuple[InputSeries, ...] = ()

    @property
    def all_instances(self) -> tuple[ManifestInstance, ...]:
        """Every input instance: the reference series', then the other inputs'."""
        return self.instances + tuple(i for s in self.other_inputs for i in s.instances)

    @classmethod
    def of_files(cls, series_instance_uid: str, paths: Iterable[Path]) -> Manifest:
        """A manifest of files on disk, each named by its file stem as the spool names
        instances (for tools and tests; the node builds manifests from its state DB).

        Raises
        ------
        OSError
            If a file cannot be read.
        """
        instances = []
        for path in sorted(paths):
            size, sha256 = file_digest(path)
            instances.append(
                ManifestInstance(
                    sop_instance_uid=path.stem, path=str(path), size=size, sha256=sha256
                )
            )
        return cls(series_instance_uid=series_instance_uid, instances=tuple(instances))

    @property
    def digest(self) -> str:
        """SHA-256 (hex) over the instances' UIDs and file digests, in UID order: equal
        for the same content whatever the paths or the order of arrival."""
        pairs = sorted((i.sop_instance_uid, i.sha256) for i in self.instances)
        content: list[Any] = [self.series_instance_uid, pairs]
        for other in sorted(self.other_inputs, key=lambda s: s.name):
            others = sorted((i.sop_instance_uid, i.sha256) for i in other.instances)
            content.append([other.name, other.series_instance_uid, others])
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()


class ResultInstance(_Frozen):
    """A DICOM object a job wrote: its file and the UIDs a reference to it needs."""

    path: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    @property
    def name(self) -> str:
        """The file name (``seg-binary.dcm``, ``sr.dcm``, ...), which says what it is."""
        return self.path.rsplit("/", 1)[-1]


class Predecessor(_Frozen):
    """The version a job's results replace: the SRs it wrote, which the new SRs list
    in their Predecessor Documents Sequence."""

    job_id: int
    revision: int = Field(ge=1)
    reports: tuple[ResultInstance, ...] = ()


class JobRequest(_Frozen):
    """Everything a worker needs for one job; the node stores it when it dispatches."""

    job_id: int
    model: str
    manifest: Manifest
    output_dir: str
    outputs: OutputRequest = Field(default_factory=OutputRequest)
    #: 1 for the first results of this model on this study; each new version adds one.
    revision: int = Field(default=1, ge=1)
    predecessor: Predecessor | None = None
    #: Destination -> the earlier version's objects it holds, to be withdrawn by an IHE
    #: IOCM rejection note (config.yaml ``supersede: rejection_note``).
    rejections: dict[str, tuple[ResultInstance, ...]] = Field(default_factory=dict)
    #: When the node made the request (epoch seconds): the results' creation and content
    #: time, so that running the request again writes the same bytes.
    created_at: float | None = None

    @property
    def result_key(self) -> str:
        """SHA-256 (hex) of what decides the content of the results besides the model:
        the manifest, the revision and the output request. Result UIDs derive from it,
        so the same request always writes the same objects, and input seen again in a
        later version (A, then B, then A) never reuses the first version's UIDs."""
        parts = [self.manifest.digest, self.revision, self.outputs.model_dump(mode="json")]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class JobOutcome(_Frozen):
    """What a worker reports: the files written, or why the job failed."""

    status: Literal["ok", "failed"]
    reason: str | None = None
    files: tuple[ResultInstance, ...] = ()
    #: The model found none of its labels (the SR says so).
    empty: bool = False
    measurements: tuple[dict[str, Any], ...] = ()
    findings: tuple[dict[str, Any], ...] = ()
    timings_s: dict[str, float] = Field(default_factory=dict)
    #: Stage (``load``, ``model``, ``write``, :mod:`workers.stages`) -> when the job
    #: took it, and ``done``: when it finished (epoch seconds; a job's timeline).
    stages_at: dict[str, float] = Field(default_factory=dict)
    #: Destination -> the rejection note written for it (a file in ``files`` too).
    rejection_notes: dict[str, str] = Field(default_factory=dict)
    #: The series was decoded during its quiet period, before the job came
    #: (:mod:`workers.inputs`).
    preloaded: bool = False

    @classmethod
    def failed(cls, reason: str) -> JobOutcome:
        return cls(status="failed", reason=reason)

    @property
    def reports(self) -> tuple[ResultInstance, ...]:
        """The SRs written (a later version names them as its predecessors); rejection
        notes, Key Object Selection documents of the SR family, are not reports."""
        notes = set(self.rejection_notes.values())
        return tuple(
            f
            for f in self.files
            if f.sop_class_uid.startswith(_SR_CLASS_PREFIX) and f.name not in notes
        )
