"""pydicom's strict validation for tests that build and read DICOM objects."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom import config

__all__ = ["enforce_valid_values"]


@pytest.fixture(autouse=True)
def enforce_valid_values() -> Iterator[None]:
    """Build and read under pydicom's strict validation (highdicom tests/conftest.py);
    import it into a test module to apply it there."""
    reading, writing = (
        config.settings.reading_validation_mode,
        config.settings.writing_validation_mode,
    )
    config.settings.reading_validation_mode = config.RAISE
    config.settings.writing_validation_mode = config.RAISE
    yield
    config.settings.reading_validation_mode = reading
    config.settings.writing_validation_mode = writing
