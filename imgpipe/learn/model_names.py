"""Which ``model.name`` values exist, checked without building a model.

Kept apart from :mod:`imgpipe.learn.models` (which imports PyTorch Lightning) so that
Snakemake's start-up can check a name cheaply: torchvision and timm are imported
only for names that need their registry, a factory's module only for a factory.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys

from imgpipe.core.errors import DataError

FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
FACTORY_ARGS = ("num_classes", "in_channels", "image_size")


def torchvision_names() -> list[str]:
    """Every torchvision classification model name."""
    from torchvision import models as tvm

    return tvm.list_models(module=tvm)


def unknown_name(name: str) -> DataError:
    """The error for a model name that is no smallcnn, torchvision, timm/ or factory name."""
    close = difflib.get_close_matches(name, ["smallcnn", *torchvision_names()], n=5, cutoff=0.5)
    hint = f"; close: {', '.join(close)}" if close else ""
    try:
        import timm

        if timm.is_model(name):
            hint += f"; timm has it: timm/{name}"
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return DataError(
        f"model.name: unknown model {name!r} (smallcnn, a torchvision classification model, "
        f"timm/<name> or package.module:factory{hint})"
    )


def timm_name_error(name: str) -> DataError | None:
    """None when timm has the model ``name`` (without the ``timm/`` prefix), else the error."""
    import timm

    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" (close: {', '.join('timm/' + c for c in close)})" if close else ""
    return DataError(f"model.name: timm has no model {name!r}{hint}")


def factory_name_error(name: str) -> DataError | None:
    """None when ``package.module:factory`` imports and is a callable taking the three arguments.

    A module of Python's standard library is refused (``os:system`` is callable,
    not a model factory); the module is imported, as training would import it.
    """
    module_name, _, attr = name.partition(":")
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return DataError(
            f"model.name: {name} names Python's standard library, not a model factory "
            "(give package.module:factory of your own package)"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        return DataError(f"model.name: cannot import {name} ({err})")
    if not callable(factory):
        return DataError(f"model.name: {name} is a {type(factory).__name__}, not a callable")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to inspect (some C callables): training tells
        return None
    try:
        signature.bind(*FACTORY_ARGS)
    except TypeError:
        return DataError(
            f"model.name: {name} cannot be called as {attr}({', '.join(FACTORY_ARGS)})"
        )
    return None


def model_name_error(name: str) -> DataError | None:
    """None when ``model.name`` names a model that can be built, else the error naming the key."""
    if name == "smallcnn":
        return None
    if name.startswith("timm/"):
        return timm_name_error(name.removeprefix("timm/"))
    if FACTORY_RE.match(name):
        return factory_name_error(name)
    if name in torchvision_names():
        return None
    return unknown_name(name)
