"""torch.compile of a method's networks without changing what checkpoints hold."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["compile_in_place"]


def compile_in_place(*modules: nn.Module, **compile_kwargs: Any) -> None:
    """Compiles each module's forward in place (``nn.Module.compile``); already compiled ones are skipped.

    Unlike ``torch.compile(module)``, which wraps the module, this keeps parameter names, state-dict
    keys and hooks as they are: checkpoints, the EMA teacher and export see the same modules.
    """
    for module in modules:
        if getattr(module, "_compiled_call_impl", None) is None:
            module.compile(**compile_kwargs)
