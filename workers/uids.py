"""Deterministic UIDs for result objects.

A job that runs twice (Celery redelivery, a restart) must produce the same SEG and SR
UIDs so the PACS de-duplicates them, and a run on different input must never reuse
them. Every UID is therefore derived from the job's inputs: the source series, the
model name and version, and the job's input key
(:attr:`workers.contract.JobRequest.result_key`: the manifest's digest, which instances
with which bytes, the result version and what to write).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from pydicom.uid import UID

__all__ = ["ResultUids", "derive_uid"]

# Fixed namespace for pacsnode's name-based UUIDs; never change it, or every derived
# UID changes and re-runs stop de-duplicating.
_NAMESPACE = uuid.UUID("6d1f6f0e-3c55-5b8e-9a51-706163736e6f")


def derive_uid(*parts: str) -> UID:
    """A DICOM UID that depends only on ``parts``.

    The UID is ``2.25.<integer of a name-based UUID>`` (PS3.5 B.2). pydicom's
    ``generate_uid(prefix=None, entropy_srcs=...)`` ignores ``entropy_srcs`` and returns
    a random UID, so the UUID is derived here with :func:`uuid.uuid5` instead.

    Parameters
    ----------
    parts
        Strings identifying the object, e.g. (source series UID, model name, model
        version, "seg-series"). The sequence is encoded unambiguously, so
        ``("a", "bc")`` and ``("ab", "c")`` give different UIDs.

    Returns
    -------
    pydicom.uid.UID
        A UID of at most 44 characters.

    Raises
    ------
    ValueError
        If no parts are given.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part to derive the UID from.")
    name = json.dumps(list(parts), ensure_ascii=False)
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")


@dataclass(frozen=True)
class ResultUids:
    """The UIDs of the SEG and SR produced by one job."""

    seg_series_instance_uid: UID
    seg_sop_instance_uid: UID
    sr_series_instance_uid: UID
    sr_sop_instance_uid: UID

    @classmethod
    def for_job(
        cls,
        source_series_instance_uid: str,
        model_name: str,
        model_version: str,
        input_key: str,
    ) -> ResultUids:
        """The result UIDs for running ``model_name`` ``model_version`` on a series.

        Parameters
        ----------
        source_series_instance_uid
            SeriesInstanceUID of the series the model ran on.
        model_name
            Registered name of the model.
        model_version
            Version of the model with its weights' digest
            (:meth:`models.base.Model.algorithm_version`); new weights give new objects.
        input_key
            :attr:`workers.contract.JobRequest.result_key` of the job; other instances,
            other bytes or another version give new objects.

        Returns
        -------
        ResultUids
            The same values for the same arguments, on any machine.
        """
        job = (source_series_instance_uid, model_name, model_version, input_key)
        return cls(
            seg_series_instance_uid=derive_uid(*job, "seg-series"),
            seg_sop_instance_uid=derive_uid(*job, "seg-instance"),
            sr_series_instance_uid=derive_uid(*job, "sr-series"),
            sr_sop_instance_uid=derive_uid(*job, "sr-instance"),
        )

    def derive(self, *parts: str) -> UID:
        """A further UID for this job (e.g. a segment tracking UID), from ``parts``."""
        return derive_uid(self.seg_sop_instance_uid, *parts)
