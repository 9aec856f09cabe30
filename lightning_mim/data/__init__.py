"""Data: image-folder, streaming and bundled-sample data modules, robust datasets, view transforms.

The streaming names (``StreamingDataModule``, ``StreamingImageDataset`` from ``streaming``;
``prepare_streaming_data``, ``PreparedSplit`` from ``writer``) are imported on first use: they need
litdata, the ``streaming`` extra.
"""

import importlib
from typing import Any

from lightning_mim.data.datamodule import ImageNetDataModule, SampleDataModule, load_sample
from lightning_mim.data.folder import ImageFolderDataset, TensorImageDataset, decode_rgb, decode_rgb_bytes
from lightning_mim.data.kernels import ColorJitter, GaussianBlur
from lightning_mim.data.sampling import ResumableSampler
from lightning_mim.data.views import (
    ClassificationViews,
    CMAEViews,
    ConMIMViews,
    EvalView,
    MAEViews,
    TwoCropViews,
    normalize,
)

__all__ = [
    "CMAEViews",
    "ClassificationViews",
    "ColorJitter",
    "ConMIMViews",
    "EvalView",
    "GaussianBlur",
    "ImageFolderDataset",
    "ImageNetDataModule",
    "MAEViews",
    "ResumableSampler",
    "SampleDataModule",
    "TensorImageDataset",
    "TwoCropViews",
    "decode_rgb",
    "decode_rgb_bytes",
    "load_sample",
    "normalize",
]

_STREAMING = {  # name -> the module under lightning_mim.data that defines it
    "PreparedSplit": "writer",
    "StreamingDataModule": "streaming",
    "StreamingImageDataset": "streaming",
    "prepare_streaming_data": "writer",
}


def __getattr__(name: str) -> Any:
    if name in _STREAMING:
        return getattr(importlib.import_module(f"{__name__}.{_STREAMING[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
