"""Model registry: models register themselves by decorator and are looked up by name.

Built in: the Python models of ``_BUILTIN_MODULES`` and the demonstration network models
shipped in ``models/bundles/``. Beside them, what the configured models folder holds
(config.yaml ``models_dir``, :func:`use_models_dir`): every model folder (a MONAI bundle,
or a TorchScript or ONNX file with a ``pacsnode.yaml``, :mod:`models.network`; or a
``model.py`` whose ``@register_model`` classes become models). The folder is read once,
on first use, and again only on :func:`reload_models` (``SIGHUP`` to the node, or a
restart); a lookup never lists folders.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from models.base import Model, SegmentationModel

__all__ = [
    "ModelEntry",
    "available_models",
    "checkpoint",
    "get_model",
    "get_model_class",
    "get_segmentation_model",
    "model_entries",
    "model_fingerprints",
    "refused_folders",
    "register_model",
    "reload_models",
    "rollback",
    "use_models_dir",
]

logger = logging.getLogger(__name__)

_ModelT = TypeVar("_ModelT", bound=type[Model])

_MODEL_CLASSES: dict[str, type[Model]] = {}
_INSTANCES: dict[str, Model] = {}

# Modules that define the built-in models; importing them registers them.
_BUILTIN_MODULES = ("models.ct_tissue", "models.mr_brain_mask")


@dataclass(frozen=True)
class ModelEntry:
    """A model as ``pacsnode models`` lists it: its class, where it comes from, and what
    keeps it from running here (None when nothing does)."""

    cls: type[Model]
    source: str
    problem: str | None


class _Folders:
    """The models folder and what was found there: discovered once, on demand."""

    models_dir: Path | None = None
    discovered = False
    #: Model name -> the folder or Python file it came from (shipped bundles and
    #: ``models_dir``).
    origins: dict[str, Path] = {}
    #: Folders and Python files that could not be registered, and why (a name taken by
    #: another model, a file that does not import).
    refused: dict[Path, str] = {}


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


def use_models_dir(path: Path | None) -> None:
    """Take models from ``path`` besides the built-in ones (config.yaml ``models_dir``);
    they are discovered on first use."""
    if path != _Folders.models_dir:
        _Folders.models_dir = path
        _forget_folders()


def _forget_folders() -> None:
    from models.network import forget_network_models

    forget_network_models()
    for name, cls in list(_MODEL_CLASSES.items()):
        if name in _Folders.origins or hasattr(cls, "model_dir"):  # made from a folder
            del _MODEL_CLASSES[name]
            _INSTANCES.pop(name, None)
    _Folders.origins = {}
    _Folders.refused = {}
    _Folders.discovered = False


def _import_builtins() -> None:
    """Import the built-in models' modules (each registers its model once)."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def _discover() -> None:
    from models.network import BUNDLES_DIR, discover_network_models

    _import_builtins()
    if _Folders.discovered:
        return
    folders = [BUNDLES_DIR]
    if _Folders.models_dir is not None and _Folders.models_dir.resolve() != BUNDLES_DIR:
        folders.append(_Folders.models_dir)
    if _Folders.models_dir is not None:
        _import_python_models(_Folders.models_dir)
    for folder in folders:
        for cls in discover_network_models(folder):
            path = cls.model_dir
            if cls.name in _MODEL_CLASSES and _MODEL_CLASSES[cls.name] is not cls:
                where = _Folders.origins.get(cls.name)
                taken = f"the model in {where}" if where else "a built-in model"
                _Folders.refused[path] = f"{path}: the name {cls.name!r} is taken by {taken}"
                logger.error("%s; folder not used", _Folders.refused[path])
                continue
            register_model(cls)
            _Folders.origins[cls.name] = path
    _Folders.discovered = True


PYTHON_MODEL_FILE = "model.py"


def _import_python_models(folder: Path) -> None:
    """Run the ``model.py`` of each model folder as a module of its own; the classes it
    registers are models from that file. A file that fails to import, or registers a
    name already taken, is refused with the reason (its other classes are dropped)."""
    try:
        files = sorted(p.resolve() for p in folder.glob(f"*/{PYTHON_MODEL_FILE}") if p.is_file())
    except OSError:
        return  # discover_network_models reports an unreadable folder
    for path in files:
        before = dict(_MODEL_CLASSES)
        module_name = f"pacsnode_models.{path.parent.name}"
        try:
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise ImportError("not a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # dataclasses and pickling look it up
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - any error in an admin's file is its problem
            sys.modules.pop(module_name, None)
            for name in set(_MODEL_CLASSES) - set(before):
                del _MODEL_CLASSES[name]
            _Folders.refused[path] = f"{path}: cannot be imported: {type(exc).__name__}: {exc}"
            logger.error("%s; file not used", _Folders.refused[path])
            continue
        for name in set(_MODEL_CLASSES) - set(before):
            _Folders.origins[name] = path


def model_fingerprints() -> dict[str, str]:
    """Model name -> :meth:`models.base.Model.fingerprint`, for noticing changed files
    (for a model from a Python file, the file's digest too)."""
    fingerprints = {}
    for name, cls in available_models().items():
        fingerprints[name] = cls.fingerprint()
        origin = _Folders.origins.get(name)
        if origin is not None and origin.name == PYTHON_MODEL_FILE:
            try:
                digest = hashlib.sha256(origin.read_bytes()).hexdigest()
            except OSError:
                digest = "unreadable"
            fingerprints[name] += f" file:{digest}"
    return fingerprints


def checkpoint() -> tuple[object, ...]:
    """The registry as it is, for :func:`rollback` (a reload that is refused)."""
    from models import network

    # Built-in models are in it even if nothing asked for one yet: a module registers
    # its model only when first imported, so a rollback must not drop it.
    _import_builtins()
    return (
        dict(_MODEL_CLASSES),
        dict(_INSTANCES),
        _Folders.models_dir,
        _Folders.discovered,
        dict(_Folders.origins),
        dict(_Folders.refused),
        dict(network._CLASSES),
    )


def rollback(state: tuple[object, ...]) -> None:
    """Put the registry back as :func:`checkpoint` found it."""
    from models import network

    classes, instances, models_dir, discovered, origins, refused, folders = state
    _MODEL_CLASSES.clear()
    _MODEL_CLASSES.update(classes)  # type: ignore[call-overload]
    _INSTANCES.clear()
    _INSTANCES.update(instances)  # type: ignore[call-overload]
    _Folders.models_dir = models_dir  # type: ignore[assignment]
    _Folders.discovered = bool(discovered)
    _Folders.origins = dict(origins)  # type: ignore[call-overload]
    _Folders.refused = dict(refused)  # type: ignore[call-overload]
    network._CLASSES.clear()
    network._CLASSES.update(folders)  # type: ignore[call-overload]


def reload_models() -> list[str]:
    """Discover the model folders again (a folder added, changed or removed); returns
    the names of the models now available. Loaded instances of folder models are
    dropped, so the next job loads the new files."""
    _forget_folders()
    return sorted(available_models())


def available_models() -> dict[str, type[Model]]:
    """All registered model classes by name: built-in, shipped and ``models_dir``."""
    _discover()
    return dict(_MODEL_CLASSES)


def model_entries() -> list[ModelEntry]:
    """Every model, by name, and every model folder that could not be registered."""
    entries = []
    for name, cls in sorted(available_models().items()):
        origin = _Folders.origins.get(name)
        source = str(origin) if origin is not None else f"built in ({cls.__module__})"
        entries.append(ModelEntry(cls, source, cls.missing_requirements()))
    return entries


def refused_folders() -> dict[Path, str]:
    """Model folders not registered (their name is taken), with the reason."""
    _discover()
    return dict(_Folders.refused)


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
        logger.info("loaded model %s %s", instance.name, instance.algorithm_version())
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
