"""Writing result files so a reader never sees a partial one.

Every result object goes through :func:`write_dataset_atomic`: write a temporary file in
the target folder, fsync it, rename it over the target and fsync the folder. A crash
leaves either the old file, the new file or a stray temporary file, never a torn one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from pydicom import Dataset

__all__ = ["write_dataset_atomic"]

logger = logging.getLogger(__name__)


def write_dataset_atomic(ds: Dataset, path: Path | str) -> Path:
    """Write ``ds`` as a DICOM file (with file meta) to ``path`` atomically.

    Parameters
    ----------
    ds
        The dataset; it must carry ``file_meta`` with a TransferSyntaxUID (highdicom
        objects do).
    path
        Target file; its folder is created if missing. An existing file is replaced.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    OSError
        If the folder cannot be created or the file cannot be written; the temporary
        file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)
    logger.debug("wrote %s", target)
    return target


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
