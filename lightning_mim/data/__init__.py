"""Data: image-folder, streaming and bundled-sample data modules, robust datasets, view transforms.

Every name is imported on first use; the streaming ones (``StreamingDataModule``,
``StreamingImageDataset``, ``prepare_streaming_data``, ``PreparedSplit``) need litdata, the
``streaming`` extra.
"""

from typing import TYPE_CHECKING

from lightning_mim._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_mim.data.datamodule import ImageNetDataModule, SampleDataModule, load_sample
    from lightning_mim.data.folder import ImageFolderDataset, TensorImageDataset, decode_rgb, decode_rgb_bytes
    from lightning_mim.data.kernels import ColorJitter, GaussianBlur
    from lightning_mim.data.sampling import ResumableSampler
    from lightning_mim.data.streaming import StreamingDataModule, StreamingImageDataset
    from lightning_mim.data.views import (
        ClassificationViews,
        CMAEViews,
        ConMIMViews,
        EvalView,
        MAEViews,
        TwoCropViews,
        normalize,
    )
    from lightning_mim.data.writer import PreparedSplit, prepare_streaming_data

_EXPORTS = {
    "ImageNetDataModule": "lightning_mim.data.datamodule",
    "SampleDataModule": "lightning_mim.data.datamodule",
    "load_sample": "lightning_mim.data.datamodule",
    "ImageFolderDataset": "lightning_mim.data.folder",
    "TensorImageDataset": "lightning_mim.data.folder",
    "decode_rgb": "lightning_mim.data.folder",
    "decode_rgb_bytes": "lightning_mim.data.folder",
    "ColorJitter": "lightning_mim.data.kernels",
    "GaussianBlur": "lightning_mim.data.kernels",
    "ResumableSampler": "lightning_mim.data.sampling",
    "ClassificationViews": "lightning_mim.data.views",
    "CMAEViews": "lightning_mim.data.views",
    "ConMIMViews": "lightning_mim.data.views",
    "EvalView": "lightning_mim.data.views",
    "MAEViews": "lightning_mim.data.views",
    "TwoCropViews": "lightning_mim.data.views",
    "normalize": "lightning_mim.data.views",
    "StreamingDataModule": "lightning_mim.data.streaming",
    "StreamingImageDataset": "lightning_mim.data.streaming",
    "prepare_streaming_data": "lightning_mim.data.writer",
    "PreparedSplit": "lightning_mim.data.writer",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
    "PreparedSplit",
    "ResumableSampler",
    "SampleDataModule",
    "StreamingDataModule",
    "StreamingImageDataset",
    "TensorImageDataset",
    "TwoCropViews",
    "decode_rgb",
    "decode_rgb_bytes",
    "load_sample",
    "normalize",
    "prepare_streaming_data",
]
