"""The writer: prepare_streaming_data writes an image folder as litdata chunks of encoded bytes, labels and ids.

The images are tests.helpers.write_sample_folder's bundled sample JPEGs (32 px): 200 training images
in 10 classes (plus one broken file) and 50 validation images; ``prepared`` (tests/conftest.py) is
that folder written once by ``lightning-mim prepare-data``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("litdata")

import litdata

from lightning_mim.data import StreamingDataModule, prepare_streaming_data
from tests.helpers import FOLDER_TRAIN, LinearOnCrops, write_sample_folder


def test_prepare_data_writes_encoded_bytes_labels_and_ids(prepared: tuple[Path, Path, str]) -> None:
    src, dst, _ = prepared
    chunks = json.loads((dst / "train" / "index.json").read_text())["chunks"]
    assert len(chunks) > 5 and sum(c["chunk_size"] for c in chunks) == FOLDER_TRAIN  # ~20 KB chunks of ~1 KB JPEGs

    # the raw items: the file's bytes as they are, the sorted class index, the position in the scan
    raw = litdata.StreamingDataset(str(dst / "train"))
    items = [raw[i] for i in range(len(raw))]
    files = sorted(p for p in (src / "train").rglob("*.jpg") if p.name != "broken.jpg")
    classes = sorted(d.name for d in (src / "train").iterdir())
    scan = sorted([*files, src / "train" / "airplane" / "broken.jpg"], key=lambda p: (p.parent.name, p.name))
    by_id = {item["id"]: item for item in items}
    assert sorted(by_id) == [i for i, p in enumerate(scan) if p.name != "broken.jpg"]
    for index, path in enumerate(scan):
        if path.name != "broken.jpg":
            assert bytes(by_id[index]["image"]) == path.read_bytes()
            assert by_id[index]["label"] == classes.index(path.parent.name)


def test_prepare_data_flat_folder_has_no_labels_and_no_val(tmp_path: Path) -> None:
    write_sample_folder(tmp_path / "src")
    crop = LinearOnCrops.crop  # random 16-px crops and flips
    flat = tmp_path / "src" / "train" / "bird"  # images directly in the folder
    summary = prepare_streaming_data(flat, str(tmp_path / "dst"), num_workers=1)
    assert list(summary) == ["train"] and summary["train"].images == 20 and summary["train"].classes == 0
    data = StreamingDataModule(str(tmp_path / "dst"), batch_size=4, num_workers=0, train_views=crop, eval_views=crop)
    data.setup("fit")
    assert data.val_set is None and data.knn_datasets() is None
    assert {int(batch["labels"].unique()) for batch in data.train_dataloader()} == {-1}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        prepare_streaming_data(tmp_path / "empty", str(tmp_path / "dst_empty"))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        prepare_streaming_data(tmp_path / "missing", str(tmp_path / "dst2"))


def test_writer_names_stay_importable_from_streaming() -> None:
    from lightning_mim.data import PreparedSplit, streaming

    assert (streaming.prepare_streaming_data, streaming.PreparedSplit) == (prepare_streaming_data, PreparedSplit)
