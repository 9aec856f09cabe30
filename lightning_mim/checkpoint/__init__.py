"""Checkpoints: safe reading, atomic writing, what lightning-mim records in them, and encoder weights.

Nothing here imports a method module: methods, ``export`` and the evaluation protocols build on it.

* :mod:`~lightning_mim.checkpoint.files`: ``load_checkpoint`` (``weights_only=True``, errors naming the file).
* :mod:`~lightning_mim.checkpoint.io`: ``AtomicCheckpointIO``, the Trainer plugin ``lightning-mim fit`` uses.
* :mod:`~lightning_mim.checkpoint.meta`: the ``lightning_mim`` entry (method, random streams, encoders).
* :mod:`~lightning_mim.checkpoint.weights`: ``load_encoder``, a timm model from an export or a checkpoint.
"""

from typing import TYPE_CHECKING

from lightning_mim._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_mim.checkpoint.files import load_checkpoint
    from lightning_mim.checkpoint.io import AtomicCheckpointIO
    from lightning_mim.checkpoint.meta import EncoderSpec, encoder_state
    from lightning_mim.checkpoint.weights import load_encoder

_EXPORTS = {
    "AtomicCheckpointIO": "lightning_mim.checkpoint.io",
    "EncoderSpec": "lightning_mim.checkpoint.meta",
    "encoder_state": "lightning_mim.checkpoint.meta",
    "load_checkpoint": "lightning_mim.checkpoint.files",
    "load_encoder": "lightning_mim.checkpoint.weights",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["AtomicCheckpointIO", "EncoderSpec", "encoder_state", "load_checkpoint", "load_encoder"]
