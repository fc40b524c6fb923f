"""Fashion-MNIST loader (`load_fashion_mnist`) and its `with_transform` function; reads local IDX files only."""

from __future__ import annotations

import gzip
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import BitImageProcessorPil

from hf_svd_compress.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    fashion_mnist_transform,
    load_fashion_mnist,
)

SIZES = {"train": 64, "validation": 32, "test": 16}
FILES = [f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]

needs_data = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")


def _load(**kwargs) -> datasets.DatasetDict:
    sizes = {"train_size": SIZES["train"], "eval_size": SIZES["validation"], "test_size": SIZES["test"]}
    return load_fashion_mnist(**{**sizes, **kwargs})


@pytest.fixture(scope="module")
def small() -> datasets.DatasetDict:
    return _load()


def _rows(ds: datasets.Dataset) -> set[tuple[bytes, int]]:
    """Each example as (raw pixel bytes, label): compares splits without relying on their order."""
    return {(np.asarray(ex["image"]).tobytes(), ex["label"]) for ex in ds}


def _raw_rows(prefix: str) -> set[tuple[bytes, int]]:
    """The IDX files read independently of the loader (fixed 16- and 8-byte headers of the MNIST format)."""
    with gzip.open(Path(FASHION_MNIST_DIR) / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28 * 28)
    with gzip.open(Path(FASHION_MNIST_DIR) / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return {(image.tobytes(), int(label)) for image, label in zip(images, labels)}


@needs_data
def test_splits_sizes_and_features(small):
    assert {name: len(ds) for name, ds in small.items()} == SIZES
    for ds in small.values():
        assert ds.column_names == ["image", "label"]
        assert isinstance(ds.features["image"], datasets.Image)
        assert ds.features["label"].names == list(FASHION_MNIST_LABELS)
        assert ds.features["label"].num_classes == 10
        image = ds[0]["image"]
        assert image.mode == "L" and image.size == (28, 28)
        assert set(ds["label"]) <= set(range(10))


@needs_data
def test_examples_come_from_the_right_files(small):
    train_rows = _raw_rows("train")
    assert _rows(small["train"]) <= train_rows
    assert _rows(small["validation"]) <= train_rows
    assert _rows(small["test"]) <= _raw_rows("t10k")


@needs_data
def test_split_is_reproducible_and_disjoint(small):
    again = _load()
    for name in SIZES:
        assert again[name]["label"] == small[name]["label"]
        assert _rows(again[name]) == _rows(small[name])
    assert not _rows(small["train"]) & _rows(small["validation"])
    other = _load(seed=0)
    assert _rows(other["train"]) != _rows(small["train"])


@needs_data
def test_subsamples_are_nested(small):
    smaller = _load(train_size=16, eval_size=8, test_size=4)
    for name in SIZES:
        assert _rows(smaller[name]) <= _rows(small[name])


@needs_data
def test_size_too_large_raises():
    with pytest.raises(ValueError, match="test_size"):
        load_fashion_mnist(train_size=1, eval_size=1, test_size=10_001)


def test_missing_dir_raises_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path / "nowhere")
    assert "train-images-idx3-ubyte.gz" in str(info.value)


@needs_data
def test_missing_file_is_named(tmp_path):
    for name in FILES[:-1]:
        (tmp_path / name).symlink_to(Path(FASHION_MNIST_DIR) / name)
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(tmp_path, train_size=1, eval_size=1, test_size=1)


def test_not_an_idx_file_raises(tmp_path):
    for name in FILES:
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"not an idx file at all")
    with pytest.raises(ValueError, match="IDX"):
        load_fashion_mnist(tmp_path)


@needs_data
def test_transform_gives_three_channel_pixel_values_and_labels(small):
    processor = BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    ds = small["train"].with_transform(fashion_mnist_transform(processor))
    batch = ds[:4]
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["pixel_values"].dtype == torch.float32
    # Grayscale replicated to RGB, then normalized per channel: undo the normalization to compare channels.
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    rgb = batch["pixel_values"] * std + mean
    torch.testing.assert_close(rgb[:, 0], rgb[:, 1], atol=1e-5, rtol=0)
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == small["train"]["label"][:4]
    assert ds[0]["pixel_values"].shape == (3, 32, 32)
