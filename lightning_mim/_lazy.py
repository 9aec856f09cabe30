"""Lazy package exports: a name is imported from its module on first use.

``import lightning_mim.losses`` then loads the losses and torch, not every method with Lightning, timm
and wandb behind it; ``lightning_mim.ConMIMModule`` still works, importing its module when first read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose public names live in submodules.

    Args:
        package: The package's ``__name__`` (for error messages).
        exports: Public name -> module that defines it.

    Example::

        __getattr__, __dir__ = lazy_exports(__name__, {"EMATeacher": "lightning_mim.callbacks.ema"})
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
