"""Bad and unusual image files: decoded or skipped, each bad one named once and counted, clear setup errors."""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from PIL import Image

from lightning_mim.data import (
    ClassificationViews,
    CMAEViews,
    ConMIMViews,
    EvalView,
    ImageFolderDataset,
    ImageNetDataModule,
    MAEViews,
    TwoCropViews,
    decode_rgb,
)
from tests.helpers import cpu_trainer, tiny_method

BAD = ("00_empty.jpg", "01_truncated.jpg", "08_text.jpg", "09_noise.png")  # two before the first readable file


def _pixels(shape: tuple[int, ...], seed: int, dtype: Any = np.uint8, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


def write_folder(root: Path) -> dict[str, np.ndarray]:
    """16 files directly in ``root``: the four :data:`BAD` ones and 12 valid but unusual ones.

    Returns the valid files' expected RGB content, (H, W, 3) uint8.
    """
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, np.ndarray] = {}

    def save(name: str, image: Image.Image, rgb: np.ndarray, **kwargs: Any) -> None:
        image.save(root / name, **kwargs)
        expected[name] = rgb

    gray = _pixels((10, 20), 1)
    save("02_gray.png", Image.fromarray(gray), np.repeat(gray[..., None], 3, axis=2))
    gray_alpha = _pixels((9, 11, 2), 2)
    save("03_la.png", Image.fromarray(gray_alpha), np.repeat(gray_alpha[..., :1], 3, axis=2))
    rgba = _pixels((12, 8, 4), 3)  # random alpha: the colour channels are kept, the alpha dropped
    save("04_rgba.png", Image.fromarray(rgba), rgba[..., :3])
    # C=0 M=255 Y=255 K=64 is RGB (191, 0, 0) under every CMYK -> RGB convention
    save("05_cmyk.jpg", Image.new("CMYK", (16, 24), (0, 255, 255, 64)), np.full((24, 16, 3), (191, 0, 0), np.uint8))
    palette = Image.new("P", (6, 4))
    palette.putpalette([255, 0, 0, 0, 128, 255] + [0] * 762)
    palette.putdata([(x + y) % 2 for y in range(4) for x in range(6)])
    colours = np.array([[255, 0, 0], [0, 128, 255]], np.uint8)
    save("06_palette.png", palette, colours[np.add.outer(np.arange(4), np.arange(6)) % 2])
    deep = _pixels((5, 7), 4, np.uint16, 65536)
    save("07_16bit.png", Image.fromarray(deep), np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=2))
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    save(
        "10_animated.gif", frames[0], np.full((6, 8, 3), (255, 0, 0), np.uint8), save_all=True, append_images=frames[1:]
    )
    for name, shape in (("11_tiny.png", (7, 7, 3)), ("12_wide.png", (1, 400, 3)), ("13_tall.png", (400, 1, 3))):
        pixels = _pixels(shape, len(expected))
        save(name, Image.fromarray(pixels), pixels)
    for name, shape in (("14_photo.jpg", (40, 50, 3)), ("15_photo.jpg", (50, 40, 3))):
        Image.fromarray(_pixels(shape, len(expected))).save(root / name, quality=90)
        with Image.open(root / name) as photo:  # lossy: Pillow's decoding is the reference
            expected[name] = np.array(photo.convert("RGB"))

    buffer = io.BytesIO()
    Image.fromarray(_pixels((64, 64, 3), 5)).save(buffer, "JPEG", quality=90)
    (root / "00_empty.jpg").write_bytes(b"")
    (root / "01_truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "08_text.jpg").write_text("not an image, whatever the extension says\n")
    (root / "09_noise.png").write_bytes(_pixels((300,), 6).tobytes())
    return expected


def test_decode_unusual_files_to_rgb(tmp_path: Path) -> None:
    expected = write_folder(tmp_path)
    for name, rgb in expected.items():
        image = decode_rgb(tmp_path / name)
        assert image.dtype == torch.uint8 and image.shape == (3, *rgb.shape[:2]), name
        error = (image.permute(1, 2, 0).int() - torch.from_numpy(rgb).int()).abs().max().item()
        assert error <= (2 if name.endswith(".jpg") else 0), name  # JPEG: decoders may round differently
    for name in BAD:
        with pytest.raises((ValueError, OSError)):
            decode_rgb(tmp_path / name)


VIEWS: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {
    "conmim": ConMIMViews(32),
    "cmae": CMAEViews(32, shift=4),
    "mae": MAEViews(32),
    "two_crop": TwoCropViews(32),
    "classification": ClassificationViews(32),
    "eval": EvalView(32, crop_fraction=1.0),
    "eval_224": EvalView(224),
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_every_view_takes_unusual_images(tmp_path: Path, name: str) -> None:
    expected = write_folder(tmp_path)
    size = 224 if name == "eval_224" else 32
    for seed, file in enumerate(expected):
        image = decode_rgb(tmp_path / file)
        torch.manual_seed(seed)
        for key, view in VIEWS[name](image).items():
            assert view.dtype == torch.uint8 and view.shape == (3, size, size), (file, key)
    strip = decode_rgb(tmp_path / "12_wide.png")
    view = EvalView(32, crop_fraction=1.0)(strip)["images"]
    assert torch.equal(view[:, 0], view[:, -1])  # a 1-px-high strip resized: every row the same


class _Metrics(Logger):
    """Keeps what the trainer logs."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))


def _to_stderr(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """Prints a warning to stderr, in the test process and in forked loader workers alike (for capfd)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
    sys.stderr.flush()


def test_fit_names_each_bad_file_once_and_logs_the_count(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    write_folder(tmp_path)
    module, _ = tiny_method("conmim")  # 32-px views from its train_views()
    data = ImageNetDataModule(tmp_path, batch_size=4, num_workers=2)
    metrics = _Metrics()
    trainer = cpu_trainer(max_epochs=2, limit_val_batches=0, logger=metrics, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision's decoders, on every call
        warnings.simplefilter("always", RuntimeWarning)  # no per-process de-duplication by the warnings module
        warnings.showwarning = _to_stderr
        trainer.fit(module, data)
    err = capfd.readouterr().err

    assert trainer.global_step == 8 and trainer.current_epoch == 2  # 16 keys / 4 per batch, 2 epochs
    named = [line for line in err.splitlines() if "skipping unreadable image" in line]
    assert len(named) == len(BAD)
    for bad in BAD:
        assert sum(f"skipping unreadable image {tmp_path / bad}:" in line for line in named) == 1, (bad, err)
    assert data.num_skipped == len(BAD)  # flags set in the workers, read in this process
    counts = [m["data/skipped_images"] for _, m in metrics.logged if "data/skipped_images" in m]
    assert counts[-1] == len(BAD) and counts == sorted(set(counts))  # logged only when it changed
    assert f"{len(BAD)} unreadable image files under {tmp_path} were skipped" in err  # the end-of-training summary


def test_unreadable_files_are_counted_once(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    write_folder(tmp_path)
    dataset = ImageFolderDataset(tmp_path, EvalView(16, crop_fraction=1.0))
    assert dataset.num_skipped == 2  # setup stopped at the first readable file, after the first two bad ones
    for _ in range(3):
        for key in range(len(dataset)):
            assert dataset[(key, key)]["images"].shape == (3, 16, 16)
    assert dataset.num_skipped == len(BAD)
    named = [str(w.message) for w in recwarn if "skipping unreadable image" in str(w.message)]
    assert sorted(m.split(":")[0].rsplit("/", 1)[1] for m in named) == sorted(BAD)
    # a bad file is replaced by the next readable one
    assert torch.equal(dataset[0]["images"], dataset[2]["images"])
    assert torch.equal(dataset[8]["images"], dataset[10]["images"])


def test_folder_without_a_readable_image_fails_at_setup(tmp_path: Path) -> None:
    write_folder(tmp_path / "all")
    bad_only = tmp_path / "bad"
    bad_only.mkdir()
    for name in BAD:
        (bad_only / name).write_bytes((tmp_path / "all" / name).read_bytes())
    data = ImageNetDataModule(bad_only, num_workers=0, train_views=MAEViews(32), eval_views=EvalView(32))
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"), pytest.raises(ValueError) as failure:
        data.setup("fit")
    assert str(failure.value) == (
        f"no readable image under {bad_only}: tried all 4 image files and none decodes "
        "(each is named in a warning above)"
    )

    # a validation folder without a readable image fails too, naming the folder
    (tmp_path / "split" / "train" / "a").mkdir(parents=True)
    (tmp_path / "split" / "val" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "split" / "train" / "a" / "ok.png")
    (tmp_path / "split" / "val" / "a" / "empty.jpg").write_bytes(b"")
    data = ImageNetDataModule(tmp_path / "split", num_workers=0, train_views=MAEViews(32), eval_views=EvalView(32))
    with pytest.warns(RuntimeWarning, match="empty file"), pytest.raises(ValueError, match="tried all 1 image files"):
        data.setup("fit")

    (tmp_path / "text_only").mkdir()
    (tmp_path / "text_only" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"no images .* found under {tmp_path / 'text_only'}"):
        ImageNetDataModule(tmp_path / "text_only", train_views=MAEViews(32), eval_views=EvalView(32)).setup("fit")


def test_missing_root_names_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no" / "such" / "folder"
    data = ImageNetDataModule(missing, train_views=MAEViews(32), eval_views=EvalView(32))
    with pytest.raises(FileNotFoundError) as failure:
        data.setup("fit")
    assert str(failure.value) == f"data root not found: {missing}"
    with pytest.raises(FileNotFoundError) as failure:
        ImageFolderDataset(missing, EvalView(32))
    assert str(failure.value) == f"image folder not found: {missing}"
    monkeypatch.chdir(tmp_path)  # a relative root is named as given and as an absolute path
    with pytest.raises(FileNotFoundError) as failure:
        ImageNetDataModule("data/imagenet", train_views=MAEViews(32), eval_views=EvalView(32)).setup("fit")
    assert str(failure.value) == f"data root not found: data/imagenet (absolute: {tmp_path / 'data' / 'imagenet'})"
