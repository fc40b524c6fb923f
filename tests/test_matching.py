"""Target matching: peft's rules (regex = full name, list = exact or `.suffix`) and `"all-linear"` in blocks only."""

from __future__ import annotations

import pytest
from conftest import MODEL_CASES
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_svd_compress import NoTargetModulesError, SVDConfig
from hf_svd_compress.core.matching import block_module_names, find_targets, matches


@pytest.mark.parametrize(
    "name, pattern, expected",
    [
        ("bert.encoder.layer.0.attention.self.query", ["query"], True),
        ("bert.encoder.layer.0.attention.self.query", ["self.query"], True),
        ("bert.encoder.layer.0.attention.self.query", ["bert.encoder.layer.0.attention.self.query"], True),
        ("bert.encoder.layer.0.attention.self.query", ["uery"], False),  # suffix must start at a dot
        ("bert.encoder.layer.0.attention.self.query", ["f.query"], False),
        ("bert.encoder.layer.0.attention.self.query", ["attention"], False),  # a parent name is not a match
        ("bert.encoder.layer.0.attention.output.dense", ["output.dense"], True),
        ("bert.encoder.layer.0.attention.output.dense", ["dense", "query"], True),
        ("query", ["query"], True),
        ("bert.encoder.layer.0.attention.self.query", "query", False),  # regex must match the full name
        ("bert.encoder.layer.0.attention.self.query", r".*query", True),
        ("bert.encoder.layer.0.attention.self.query", r".*layer\.1\..*", False),
        ("bert.encoder.layer.1.attention.self.query", r".*layer\.1\..*", True),
        ("bert.encoder.layer.1.attention.self.query", r"bert", False),
    ],
)
def test_matches(name, pattern, expected):
    assert matches(name, pattern) is expected


def test_block_module_names_excludes_embeddings_pooler_and_head(bert):
    inside = block_module_names(bert)
    assert "bert.encoder.layer.0.attention.self.query" in inside
    assert "bert.encoder.layer.1.output.dense" in inside
    for outside in ("bert.pooler.dense", "classifier", "bert.embeddings.word_embeddings", "bert.encoder", ""):
        assert outside not in inside


@pytest.mark.parametrize("case", ["bert", "vit", "gpt2", "mlp"])
def test_all_linear_selects_block_linears_only(case):
    c = MODEL_CASES[case]
    model = c.build()
    names = find_targets(model, "all-linear", layer_types=(nn.Linear, Conv1D))
    assert names == c.targets  # model order, and never a head or pooler
    for never in c.never:
        assert never not in names


def test_all_linear_respects_layer_types(gpt2):
    # GPT-2's block layers are Conv1D: with only nn.Linear accepted nothing in the blocks matches.
    with pytest.raises(NoTargetModulesError):
        find_targets(gpt2, "all-linear", layer_types=(nn.Linear,))


@pytest.mark.parametrize("case", ["bert", "vit"])
def test_default_targets_match_every_block_linear(case):
    c = MODEL_CASES[case]
    model = c.build()
    targets = SVDConfig().resolved_targets(model.config.model_type)
    assert find_targets(model, targets) == c.targets


def test_list_targets_and_exclude(bert):
    names = find_targets(bert, ["query", "value"], exclude_modules=["bert.encoder.layer.1.attention.self.value"])
    assert names == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.attention.self.query",
    ]


def test_regex_targets_and_regex_exclude(bert):
    names = find_targets(bert, r".*\.(query|key)", exclude_modules=r".*layer\.0\..*")
    assert names == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"]


def test_list_targets_may_match_non_linear_modules(bert):
    # find_targets only matches names; rejecting non-linear matches is svd_factorize_'s job (tested there).
    assert find_targets(bert, ["attention"]) == ["bert.encoder.layer.0.attention", "bert.encoder.layer.1.attention"]


@pytest.mark.parametrize(
    "targets, exclude",
    [(["does_not_exist"], None), (r"nothing\..*", None), (["query"], ["query"]), ("all-linear", r".*")],
)
def test_nothing_matched_raises_typed_error_listing_targets(bert, targets, exclude):
    with pytest.raises(NoTargetModulesError) as info:
        find_targets(bert, targets, exclude_modules=exclude)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert repr(targets) in message
    assert "BertForSequenceClassification" in message


def test_all_linear_without_blocks_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(NoTargetModulesError, match="all-linear"):
        find_targets(model, "all-linear")
