"""Data: image-folder and bundled-sample data modules, robust datasets, view transforms."""

from lightning_mim.data.datamodule import ImageNetDataModule, SampleDataModule, load_sample
from lightning_mim.data.folder import ImageFolderDataset, TensorImageDataset, decode_rgb
from lightning_mim.data.sampling import ResumableSampler
from lightning_mim.data.views import (
    ClassificationViews,
    CMAEViews,
    ColorJitter,
    ConMIMViews,
    EvalView,
    GaussianBlur,
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
    "load_sample",
    "normalize",
]
