"""lightning-mim: masked-image-modeling pre-training of vision encoders with PyTorch Lightning.

The method modules are imported on first use (``lightning_mim.ConMIMModule``), so importing a part
(``lightning_mim.losses``, ``lightning_mim.masking``) loads only what that part needs.
"""

from typing import TYPE_CHECKING

from lightning_mim._lazy import lazy_exports
from lightning_mim.methods import _EXPORTS

__version__ = "0.3.0"

if TYPE_CHECKING:
    from lightning_mim.methods import *  # noqa: F403 - the method modules, for type checkers

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [*_EXPORTS, "__version__"]
