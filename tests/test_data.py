"""Data: bundled sample, robust image folder, view recipes, data modules (the kernels: test_kernels.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_mim.data import (
    ConMIMViews,
    EvalView,
    ImageFolderDataset,
    ImageNetDataModule,
    SampleDataModule,
    TensorImageDataset,
    decode_rgb,
    load_sample,
    normalize,
)
from lightning_mim.data.datamodule import SAMPLE_FILE


def test_bundled_sample_is_small_balanced_and_real() -> None:
    assert SAMPLE_FILE.stat().st_size < 10 * 2**20
    images, labels, classes = load_sample("train")
    assert images.shape == (9000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(torch.bincount(labels), torch.full((10,), 900))
    assert classes[0] == "airplane" and len(classes) == 10
    test_images, test_labels, _ = load_sample("test")
    assert test_images.shape[0] == 1000 and torch.equal(torch.bincount(test_labels), torch.full((10,), 100))
    assert 60 < images.float().mean() < 200 and images.float().std() > 30  # natural images, not noise or blanks


def write_images(folder: Path) -> None:
    rng = torch.Generator().manual_seed(0)
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()

    def arr(h: int, w: int, c: int) -> Image.Image:
        data = torch.randint(0, 256, (h, w, c), dtype=torch.uint8, generator=rng).numpy()
        return Image.fromarray(data.squeeze(-1) if c == 1 else data)

    arr(40, 50, 3).save(folder / "a" / "rgb.jpg")
    arr(40, 40, 1).save(folder / "a" / "gray.png")
    arr(30, 30, 4).save(folder / "b" / "rgba.png")
    arr(30, 30, 3).convert("CMYK").save(folder / "b" / "cmyk.jpg")
    arr(7, 7, 3).save(folder / "b" / "tiny.bmp")
    (folder / "b" / "empty.jpg").write_bytes(b"")
    (folder / "b" / "broken.jpg").write_bytes((folder / "a" / "rgb.jpg").read_bytes()[:100])
    (folder / "b" / "notes.txt").write_text("not an image")


def test_decode_converts_modes(tmp_path: Path) -> None:
    write_images(tmp_path)
    for name in ("a/rgb.jpg", "a/gray.png", "b/rgba.png", "b/cmyk.jpg", "b/tiny.bmp"):
        image = decode_rgb(tmp_path / name)
        assert image.dtype == torch.uint8 and image.shape[0] == 3, name


def test_bad_files_are_skipped_named_and_counted(tmp_path: Path) -> None:
    write_images(tmp_path)
    dataset = ImageFolderDataset(tmp_path, EvalView(16, crop_fraction=1.0))
    assert dataset.classes == ["a", "b"]
    assert len(dataset) == 7  # the .txt file is not an image
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(len(dataset))]
        items += [dataset[i] for i in range(len(dataset))]  # a second pass names nothing again
    named = [str(w.message) for w in caught if "skipping unreadable image" in str(w.message)]
    assert len(named) == 2 and any("empty.jpg" in m for m in named) and any("broken.jpg" in m for m in named)
    assert dataset.num_skipped == 2  # two bad files, each counted once however often met
    assert all(item["images"].shape == (3, 16, 16) for item in items)


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere", EvalView(16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", EvalView(16))


def test_conmim_views_share_geometry() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    views = ConMIMViews(size=32, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=1.0)
    out = views(image)
    assert out["images"].dtype == torch.uint8 and out["images"].shape == (3, 32, 32)
    # with only solarisation in the strong pipeline, the teacher view is exactly the solarised crop
    weak = out["images"]
    assert torch.equal(out["teacher_images"], torch.where(weak >= 128, 255 - weak, weak))


def test_normalize_on_device() -> None:
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.dtype == torch.float32 and torch.allclose(out, torch.ones_like(out))


def test_image_folder_module_without_split_dirs(tmp_path: Path) -> None:
    write_images(tmp_path)
    dm = ImageNetDataModule(tmp_path, batch_size=2, num_workers=0, train_views=ConMIMViews(16), eval_views=EvalView(16))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 3, 16, 16) and batch["teacher_images"].dtype == torch.uint8
    assert dm.val_dataloader() == [] and dm.knn_datasets() is None
    with pytest.raises(FileNotFoundError, match="data root not found"):
        ImageNetDataModule(tmp_path / "missing", train_views=ConMIMViews(16), eval_views=EvalView(16)).setup("fit")


def test_sample_module_subsets_are_balanced() -> None:
    dm = SampleDataModule(
        batch_size=4,
        num_workers=0,
        train_size=100,
        val_size=20,
        train_views=ConMIMViews(32),
        eval_views=EvalView(32, 1.0),
    )
    dm.setup("fit")
    train_set, val_set = dm.train_set, dm.val_set
    assert isinstance(train_set, TensorImageDataset) and isinstance(val_set, TensorImageDataset)
    assert len(train_set) == 100 and len(val_set) == 20
    labels = torch.stack([val_set[i]["labels"] for i in range(20)])
    assert torch.equal(torch.bincount(labels), torch.full((10,), 2))
    knn_sets = dm.knn_datasets()
    assert knn_sets is not None
    bank, _ = knn_sets
    assert bank[0]["images"].shape == (3, 32, 32) and "teacher_images" not in bank[0]
