"""Model registry: models register themselves by decorator and are looked up by name.

Network models in ``models/bundles/<name>/`` (MONAI bundles and TorchScript files with
a spec) are registered too, one model per folder (:mod:`models.network`), each time
:func:`available_models` runs.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import TypeVar

from models.base import Model, SegmentationModel

__all__ = [
    "available_models",
    "get_model",
    "get_model_class",
    "get_segmentation_model",
    "register_model",
]

logger = logging.getLogger(__name__)

_ModelT = TypeVar("_ModelT", bound=type[Model])

_MODEL_CLASSES: dict[str, type[Model]] = {}
_INSTANCES: dict[str, Model] = {}

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


def _load_network_models() -> None:
    from models.network import discover_network_models

    for cls in discover_network_models():
        register_model(cls)


def available_models() -> dict[str, type[Model]]:
    """All registered model classes by name, those in ``models/bundles/`` included.

    Raises
    ------
    ValueError
        If a model folder has the name of another model.
    """
    _load_builtins()
    _load_network_models()
    return dict(_MODEL_CLASSES)


def get_model_class(name: str) -> type[Model]:
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


def get_model(name: str, factory: Callable[[], Model] | None = None) -> Model:
    """The process-wide instance of model ``name``, created on first use and kept."""
    instance = _INSTANCES.get(name)
    if instance is None:
        instance = factory() if factory is not None else get_model_class(name)()
        logger.info("loaded model %s %s", instance.name, instance.version)
        _INSTANCES[name] = instance
    return instance


def get_segmentation_model(name: str) -> SegmentationModel:
    """:func:`get_model` for callers that need a segmentation model.

    Raises
    ------
    TypeError
        If ``name`` is a model of another task.
    """
    model = get_model(name)
    if not isinstance(model, SegmentationModel):
        raise TypeError(f"model {name!r} is a {model.task} model, not a segmentation model")
    return model
