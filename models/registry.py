"""Model registry: models register themselves by decorator and are looked up by name.

MONAI bundles in ``models/bundles/<name>/`` are registered too, one model per folder
(:mod:`models.bundle`), each time :func:`available_models` runs.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import TypeVar

from models.base import SegmentationModel

__all__ = ["available_models", "get_model", "get_model_class", "register_model"]

logger = logging.getLogger(__name__)

_ModelT = TypeVar("_ModelT", bound=type[SegmentationModel])

_MODEL_CLASSES: dict[str, type[SegmentationModel]] = {}
_INSTANCES: dict[str, SegmentationModel] = {}

# Modules that define the built-in models; importing them registers them.
_BUILTIN_MODULES = ("models.ct_tissue", "models.mr_brain_mask")


def register_model(cls: _ModelT) -> _ModelT:
    """Class decorator that makes a model available under ``cls.name``.

    Raises
    ------
    ValueError
        If another class already registered the same name.
    """
    existing = _MODEL_CLASSES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"model name {cls.name!r} is already registered by {existing!r}")
    _MODEL_CLASSES[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def _load_bundles() -> None:
    from models.bundle import discover_bundles

    for cls in discover_bundles():
        register_model(cls)


def available_models() -> dict[str, type[SegmentationModel]]:
    """All registered model classes by name, the bundles in ``models/bundles/`` included.

    Raises
    ------
    ValueError
        If a bundle folder has the name of another model.
    """
    _load_builtins()
    _load_bundles()
    return dict(_MODEL_CLASSES)


def get_model_class(name: str) -> type[SegmentationModel]:
    """The registered class for ``name``.

    Raises
    ------
    KeyError
        If no model of that name is registered.
    """
    models = available_models()
    if name not in models:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(sorted(models))}")
    return models[name]


def get_model(
    name: str, factory: Callable[[], SegmentationModel] | None = None
) -> SegmentationModel:
    """The process-wide instance of model ``name``, created on first use and kept."""
    instance = _INSTANCES.get(name)
    if instance is None:
        instance = factory() if factory is not None else get_model_class(name)()
        logger.info("loaded model %s %s", instance.name, instance.version)
        _INSTANCES[name] = instance
    return instance
