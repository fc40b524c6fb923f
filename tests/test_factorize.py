"""`svd_factorize_` on the tiny model matrix: targets, exactness, errors before any change, idempotence, options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import bert_inputs, forward
from conftest import MODEL_CASES, linear_with_spectrum, relative_error
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_svd_compress import NoTargetModulesError, SVDConfig, SVDLinear, svd_factorize_, svd_layers
from hf_svd_compress.config import CONFIG_KEY


def _module_ids(model: nn.Module) -> dict[str, int]:
    return {name: id(m) for name, m in model.named_modules()}


def _dense_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """Dense (out x in) weights of every linear / Conv1D layer, for independent references."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = m.weight.detach().double().numpy().copy()
        elif isinstance(m, Conv1D):
            out[name] = m.weight.detach().double().numpy().T.copy()
    return out


def test_default_targets_and_exact_outputs(model_case):
    model = model_case.build()
    inputs = model_case.inputs()
    with torch.no_grad():
        dense_out = forward(model, inputs)
    returned = svd_factorize_(model)  # no config: per-architecture defaults, "all-linear" for GPT-2 and the MLP
    assert returned is model
    layers = svd_layers(model)
    assert list(layers) == model_case.targets
    modules = dict(model.named_modules())
    for name in model_case.never:
        assert not isinstance(modules[name], SVDLinear), f"{name} must never be factored by default"
    with torch.no_grad():
        factored_out = forward(model, inputs)
    assert relative_error(factored_out, dense_out) < 1e-4
    for layer in layers.values():
        assert layer.rank == layer.full_rank == min(layer.in_features, layer.out_features)


def test_all_linear_on_gpt2_and_mlp_replaces_every_block_layer():
    for case in ("gpt2", "mlp"):
        c = MODEL_CASES[case]
        model = c.build()
        svd_factorize_(model, SVDConfig(target_modules="all-linear"))
        assert list(svd_layers(model)) == c.targets
        remaining = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)]
        assert remaining == c.never


def test_factored_weights_equal_dense_weights(model_case):
    model = model_case.build()
    weights = _dense_weights(model)
    svd_factorize_(model, SVDConfig())
    for name, layer in svd_layers(model).items():
        W = weights[name]
        U, s, V = (t.detach().double().numpy() for t in (layer.U, layer.s, layer.V))
        np.testing.assert_allclose((U * s) @ V.T, W, atol=1e-5 * np.abs(W).max())


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "config",
    [
        SVDConfig(target_modules=["nonexistent"]),
        SVDConfig(target_modules=r".*\.nothing"),
        SVDConfig(exclude_modules=r".*"),
    ],
)
def test_no_match_raises_before_changing_anything(bert, config):
    before = _module_ids(bert)
    with pytest.raises(NoTargetModulesError) as info:
        svd_factorize_(bert, config)
    assert isinstance(info.value, ValueError)
    asked = config.target_modules if config.target_modules is not None else config.resolved_targets("bert")
    assert repr(asked) in str(info.value)
    assert _module_ids(bert) == before
    assert not svd_layers(bert)
    assert not hasattr(bert, "svd_config")
    assert not hasattr(bert.config, CONFIG_KEY)


@pytest.mark.parametrize(
    "case, targets",
    [
        ("bert", ["attention"]),
        ("bert", ["query", "intermediate"]),  # one linear match does not make the non-linear one acceptable
        ("vit", ["attention"]),
        ("gpt2", ["attn"]),
        ("mlp", r"blocks\.\d"),  # the Sequential blocks themselves
    ],
)
def test_non_linear_target_raises_type_error_before_changing_anything(case, targets):
    model = MODEL_CASES[case].build()
    before = _module_ids(model)
    with pytest.raises(TypeError, match="not nn.Linear"):
        svd_factorize_(model, SVDConfig(target_modules=targets))
    assert _module_ids(model) == before
    assert not svd_layers(model)
    assert not hasattr(model, "svd_config")


def test_type_error_names_offending_module(bert):
    with pytest.raises(TypeError, match=r"bert\.encoder\.layer\.0\.attention \(BertAttention\)"):
        svd_factorize_(bert, SVDConfig(target_modules=["attention"]))


# ------------------------------------------------------------------------------------------- idempotence, options


def test_calling_twice_does_not_factor_twice(model_case):
    model = model_case.build()
    config = SVDConfig()
    svd_factorize_(model, config)
    first = svd_layers(model)
    ids = {n: id(m) for n, m in first.items()}
    params = {n: (m.U.data_ptr(), m.s.data_ptr(), m.V.data_ptr()) for n, m in first.items()}
    svd_factorize_(model, config)
    second = svd_layers(model)
    assert {n: id(m) for n, m in second.items()} == ids
    assert {n: (m.U.data_ptr(), m.s.data_ptr(), m.V.data_ptr()) for n, m in second.items()} == params
    assert not any(isinstance(c, SVDLinear) for m in second.values() for c in m.children())


def test_second_call_with_more_targets_only_adds(bert):
    svd_factorize_(bert, SVDConfig(target_modules=["query"]))
    queries = {n: id(m) for n, m in svd_layers(bert).items()}
    assert len(queries) == 2
    svd_factorize_(bert, SVDConfig(target_modules=["query", "value"]))
    layers = svd_layers(bert)
    assert len(layers) == 4
    assert {n: id(layers[n]) for n in queries} == queries


def test_exclude_modules(bert):
    svd_factorize_(bert, SVDConfig(exclude_modules=["query", "bert.encoder.layer.1.output.dense"]))
    names = set(svd_layers(bert))
    expected = set(MODEL_CASES["bert"].targets) - {
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.output.dense",
    }
    assert names == expected
    assert isinstance(bert.bert.encoder.layer[0].attention.self.query, nn.Linear)


def test_regex_targets(vit):
    svd_factorize_(vit, SVDConfig(target_modules=r"vit\.layers\.1\..*_proj"))
    assert list(svd_layers(vit)) == [f"vit.layers.1.attention.{p}_proj" for p in "qkvo"]


def test_filter_fn(bert):
    seen = []

    def only_wide(module: nn.Module, name: str) -> bool:
        seen.append(name)
        return module.out_features > 32

    svd_factorize_(bert, SVDConfig(), filter_fn=only_wide)
    assert list(svd_layers(bert)) == [
        "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.1.intermediate.dense",
    ]
    assert seen == MODEL_CASES["bert"].targets


def test_filter_fn_rejecting_everything_is_refused(bert):
    with pytest.raises(NoTargetModulesError, match="filter_fn rejected all 12 modules"):
        svd_factorize_(bert, SVDConfig(), filter_fn=lambda module, name: False)
    assert not svd_layers(bert)


def test_filter_fn_on_conv1d(gpt2):
    svd_factorize_(gpt2, filter_fn=lambda m, n: ".mlp." in n)
    assert list(svd_layers(gpt2)) == [f"transformer.h.{i}.mlp.{p}" for i in range(2) for p in ("c_fc", "c_proj")]


# ------------------------------------------------------------------------------------------- truncated starts


def test_init_max_rank_caps_every_layer(model_case):
    model = model_case.build()
    inputs = model_case.inputs()
    with torch.no_grad():
        dense_out = forward(model, inputs)
    svd_factorize_(model, SVDConfig(init_max_rank=4))
    layers = svd_layers(model)
    assert layers and all(layer.full_rank == layer.rank == 4 for layer in layers.values())
    with torch.no_grad():
        assert relative_error(forward(model, inputs), dense_out) < 1.0  # approximate, but finite and related


def test_init_energy_matches_numpy_energy_rank(model_case):
    model = model_case.build()
    weights = _dense_weights(model)
    energy = 0.8
    svd_factorize_(model, SVDConfig(init_energy=energy))
    for name, layer in svd_layers(model).items():
        sv = np.linalg.svd(weights[name], compute_uv=False)
        cum = np.cumsum(sv**2) / np.sum(sv**2)
        expected = int(np.argmax(cum >= energy)) + 1
        assert layer.full_rank == expected < len(sv), name
        np.testing.assert_allclose(layer.s.detach().numpy(), sv[:expected], rtol=1e-4)


def test_init_energy_and_max_rank_combined(bert):
    svd_factorize_(bert, SVDConfig(init_energy=0.99, init_max_rank=6))
    assert all(layer.full_rank <= 6 for layer in svd_layers(bert).values())


def test_small_rank_cap_uses_randomized_svd_with_good_approximation(monkeypatch):
    calls = []
    real = torch.svd_lowrank

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", spy)
    sv = 5.0 * 0.6 ** np.arange(40)
    model = nn.Module()
    model.blocks = nn.ModuleList([linear_with_spectrum(40, 56, sv, seed=1), linear_with_spectrum(56, 40, sv, seed=2)])
    weights = [m.weight.detach().double().numpy().copy() for m in model.blocks]
    svd_factorize_(model, SVDConfig(target_modules="all-linear", init_max_rank=6))
    assert len(calls) == 2
    best = np.sqrt(np.sum(sv[6:] ** 2))  # Eckart-Young optimum for rank 6
    for layer, W in zip(model.blocks, weights):
        assert isinstance(layer, SVDLinear) and layer.full_rank == 6
        U, s, V = (t.detach().double().numpy() for t in (layer.U, layer.s, layer.V))
        assert np.linalg.norm((U * s) @ V.T - W) <= 1.01 * best


# ------------------------------------------------------------------------------------------------- metadata


def test_config_recorded_on_model(bert):
    config = SVDConfig(target_modules=["query", "value"], orth_weight=0.5)
    svd_factorize_(bert, config)
    assert bert.svd_config is config
    recorded = getattr(bert.config, CONFIG_KEY)
    assert recorded["config"] == config.to_dict()
    assert recorded["ranks"] == {n: 32 for n in svd_layers(bert)}
    assert len(recorded["ranks"]) == 4
    json.dumps(bert.config.to_dict())  # survives save_pretrained (JSON serializable)


def test_model_without_hf_config(mlp):
    svd_factorize_(mlp, SVDConfig())
    assert isinstance(mlp.svd_config, SVDConfig)
    assert not hasattr(mlp, "config")


def test_default_config_is_used_when_none(bert):
    svd_factorize_(bert)
    assert bert.svd_config == SVDConfig()


def test_factored_model_trains(bert):
    svd_factorize_(bert)
    bert.train()
    out = bert(**bert_inputs(), labels=torch.tensor([0, 1]))
    out.loss.backward()
    for layer in svd_layers(bert).values():
        assert layer.U.grad is not None and torch.isfinite(layer.s.grad).all()
