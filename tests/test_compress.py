"""`compress(...)`: the library's recipe in one call, on a tiny BERT (the CLI runs it end to end in test_cli)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import make_bert, token_dataset
from test_trainer import args

from hf_svd_compress import compress, compress_config, current_ranks, svd_layers
from hf_svd_compress.layers.allocation import layer_params


def kept_fraction(model: torch.nn.Module) -> float:
    layers = svd_layers(model).values()
    kept = sum(layer_params(m.out_features, m.in_features, m.rank) for m in layers)
    return kept / sum(m.out_features * m.in_features for m in layers)


def tokens(n: int = 32):
    return token_dataset(n).map(lambda e: {"attention_mask": [1] * len(e["input_ids"])})


@pytest.mark.parametrize("schedule", ["gradual", "at_start"])
def test_compress_returns_a_truncated_model_within_the_budget(tmp_path, schedule):
    model = make_bert().train()
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if "classifier" in n}
    out = compress(model, tokens(), args(tmp_path, max_steps=10), budget=0.4, schedule=schedule)
    assert out is model
    layers = svd_layers(model)
    assert len(layers) == 12 and all(layer.whitened for layer in layers.values())
    assert all(layer.rank == layer.full_rank < min(layer.in_features, layer.out_features) for layer in layers.values())
    assert kept_fraction(model) <= 0.4
    assert any(not torch.equal(p, dense[n]) for n, p in model.named_parameters() if n in dense)  # it trained


def test_compress_can_leave_the_cut_as_masks_and_start_from_other_factors(tmp_path):
    model = compress(
        make_bert(), tokens(), args(tmp_path, max_steps=10), init="asvd", truncate=False, schedule="gradual"
    )
    layers = svd_layers(model).values()
    assert all(layer.input_scale is not None and layer.rank < layer.full_rank for layer in layers)
    assert kept_fraction(model) <= 0.5  # the default budget
    plain = compress(make_bert(), tokens(), args(tmp_path, max_steps=10, distill_alpha=0.0), init="svd")
    assert not any(layer.whitened or layer.input_scale is not None for layer in svd_layers(plain).values())


def test_the_default_config_has_the_regularizer_terms_off():
    config = compress_config()
    assert (config.orth_weight, config.sparsity) == (0.0, None)
    assert compress_config(orth_weight=0.1).orth_weight == 0.1


@pytest.mark.parametrize(
    ("kwargs", "training", "message"),
    [
        ({"budget": 1.5}, {}, "budget=1.5"),
        ({"budget": True}, {}, "budget=True"),
        ({"init": "pca"}, {}, "init='pca'"),
        ({"schedule": "later"}, {}, "schedule='later'"),
        ({"schedule": "at_start"}, {"prune_at_step": 5}, "unset prune_at_step"),
        ({}, {"max_steps": 5}, "max_steps=5: must be an integer >= 10"),
        ({"budget": np.float32(0.4)}, {"max_steps": 3}, "max_steps=3"),  # a numpy budget is a budget
        ({}, {"prune_energy": 0.9}, "not to an energy"),
    ],
)
def test_bad_arguments_are_refused_before_the_model_changes(tmp_path, kwargs, training, message):
    model = make_bert()
    with pytest.raises(ValueError, match=message):
        compress(model, tokens(), args(tmp_path, **{"max_steps": 10, **training}), **kwargs)
    assert not svd_layers(model) and not current_ranks(model)


def test_no_training_data_and_batches_the_model_refuses(tmp_path):
    model = make_bert()
    with pytest.raises(ValueError, match="no training examples"):
        compress(model, [], args(tmp_path, max_steps=10))
    images = [{"pixel_values": torch.zeros(3, 8, 8), "labels": 0}] * 4
    with pytest.raises(ValueError, match="does not accept the calibration batches"):
        compress(model, images, args(tmp_path, max_steps=10))
    assert not svd_layers(model)
