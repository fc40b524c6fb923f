"""Whitened data-aware factors: `input_covariances`, `svd_factorize_(..., calibration=...)`, the greedy budget."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import forward, make_bert, make_vit, vit_inputs
from conftest import relative_error
from test_calibration import text_examples
from torch import nn

from hf_svd_compress import (
    CalibrationData,
    SVDConfig,
    input_covariances,
    load_factored_checkpoint,
    prune_,
    svd_factorize_,
    svd_layers,
)
from hf_svd_compress.layers.linalg import whitening
from hf_svd_compress.layers.regularizers import regularizer_totals
from hf_svd_compress.layers.svd import SVDLinear

QUERY = "bert.encoder.layer.0.attention.self.query"
FFN_OUT = "bert.encoder.layer.1.output.dense"


def batch_of(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in ("input_ids", "attention_mask")}


def layer_inputs(model: nn.Module, examples: list[dict], name: str) -> torch.Tensor:
    """The unpadded input rows of layer `name`, one example at a time (no batching), in float64."""
    rows = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: rows.append(args[0][0]))
    with torch.no_grad():
        for ex in examples:
            model(input_ids=ex["input_ids"][None], attention_mask=ex["attention_mask"][None])
    handle.remove()
    return torch.cat([r[ex["attention_mask"].bool()] for r, ex in zip(rows, examples)]).double()


def test_covariances_are_the_mean_second_moment_without_padding_and_shared_by_one_input():
    model, examples = make_bert(), text_examples(8)
    covariances = input_covariances(model, CalibrationData(examples, batch_size=3))
    assert list(covariances) == list(svd_layers(svd_factorize_(make_bert())))  # the layers it would factor
    for name in (QUERY, FFN_OUT):
        x = layer_inputs(make_bert(), examples, name)
        assert covariances[name].dtype == torch.float64
        assert torch.allclose(covariances[name], x.T @ x / x.shape[0], rtol=1e-6, atol=1e-9), name
    # query, key and value read one tensor: one matrix, not three
    key = QUERY.replace("query", "key")
    assert covariances[QUERY] is covariances[key] is covariances[QUERY.replace("query", "value")]
    assert covariances[QUERY] is not covariances["bert.encoder.layer.0.attention.output.dense"]


def test_whitened_factors_compute_the_dense_function_and_s_squared_is_the_output_error():
    dense, examples = make_bert(), text_examples(12)
    config = SVDConfig(whitening_ridge=1e-6)
    covariances = input_covariances(dense, CalibrationData(examples, batch_size=4))
    model = svd_factorize_(copy.deepcopy(dense), config, calibration=covariances)
    with torch.no_grad():
        assert relative_error(forward(model, batch_of(examples)), forward(dense, batch_of(examples))) < 1e-5
    layer = svd_layers(model)[FFN_OUT]
    assert layer.whitened and layer.rank == layer.full_rank
    x = layer_inputs(dense, examples, FFN_OUT)
    with torch.no_grad():
        U, s, V = layer.U.double(), layer.s.double(), layer.V.double()
        assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-5)
        # Dropping triplet i changes every output row by s_i (x . v_i) u_i: its mean squared norm is s_i^2.
        for i in (0, 5, U.shape[1] - 1):
            error = (s[i] * (x @ V[:, i])).square().mean()
            assert error.item() == pytest.approx(s[i].item() ** 2, rel=1e-3), i


def test_streamed_calibration_gives_the_same_factors_as_one_pass():
    examples = text_examples(8)
    data = CalibrationData(examples, batch_size=4)
    one = svd_factorize_(make_bert(), calibration=input_covariances(make_bert(), data))
    # 9 KB: one 32 x 32 float64 covariance per chunk, so one calibration pass per layer input.
    streamed = svd_factorize_(make_bert(), calibration=data, max_calibration_bytes=9000)
    for name, layer in svd_layers(one).items():
        other = svd_layers(streamed)[name]
        assert other.whitened
        with torch.no_grad():
            assert relative_error(other.composed_weight(), layer.composed_weight()) < 1e-5, name
            assert torch.allclose(other.s, layer.s, rtol=1e-4), name


def test_singular_covariances_fall_back_to_the_ridge_never_nan():
    weight = torch.randn(6, 8)
    cases = {
        "rank one": torch.ones(8, 8),
        "all zero": torch.zeros(8, 8),
        "one dead channel": torch.diag(torch.tensor([1.0] * 7 + [0.0])),
        "ill-conditioned": torch.diag(torch.logspace(0, -14, 8)),
    }
    for case, c in cases.items():
        Q, L = whitening(c.double())
        assert bool(torch.isfinite(L).all()) and float(L.min()) > 0, case
        linear = nn.Linear(8, 6)
        linear.weight.data.copy_(weight)
        layer = SVDLinear.from_linear(linear, covariance=c)
        assert all(bool(torch.isfinite(p).all()) for p in layer.parameters()), case
        assert relative_error(layer.composed_weight(), weight) < 1e-5, case
    with pytest.raises(ValueError, match="NaN or inf"):
        whitening(torch.full((4, 4), float("nan")))


def test_greedy_budget_on_whitened_factors_beats_the_raw_spectrum_on_the_calibration_data():
    """At one budget, the whitened cut changes the calibration outputs less than the raw truncated SVD does."""
    examples = text_examples(12)
    dense = make_bert()
    with torch.no_grad():
        reference = forward(dense, batch_of(examples))
    covariances = input_covariances(dense, CalibrationData(examples, batch_size=4))
    errors = {}
    for kind in ("raw", "whitened"):
        model = svd_factorize_(make_bert(), calibration=covariances if kind == "whitened" else None)
        prune_(model, budget=0.3, rank_multiple=1, allocation="greedy" if kind == "whitened" else "threshold")
        with torch.no_grad():
            errors[kind] = relative_error(forward(model, batch_of(examples)), reference)
    assert errors["whitened"] < errors["raw"]


def test_orthogonality_covers_u_alone_for_whitened_layers_and_survives_a_checkpoint(tmp_path):
    examples = text_examples()
    model = svd_factorize_(make_bert(), calibration=CalibrationData(examples, batch_size=3))
    orth, _ = regularizer_totals(svd_layers(model).values(), None)
    assert orth.item() < 1e-8  # U orthonormal; V (C-orthonormal) is not counted
    model.save_pretrained(tmp_path / "factored")
    loaded = load_factored_checkpoint(tmp_path / "factored")
    assert all(layer.whitened for layer in svd_layers(loaded).values())
    orth, _ = regularizer_totals(svd_layers(loaded).values(), None)
    assert orth.item() < 1e-8


def test_refusals_name_the_fix_and_leave_the_model_unchanged():
    examples = text_examples()
    covariances = input_covariances(make_bert(), CalibrationData(examples, batch_size=3))
    missing = {k: v for k, v in covariances.items() if k != FFN_OUT}
    cases = [
        (SVDConfig(parameterization="householder"), covariances, 'parameterization="svd"'),
        (SVDConfig(init_energy=0.9), covariances, "init_energy"),
        (SVDConfig(), missing, "targets changed since calibration"),
        (SVDConfig(), {**covariances, FFN_OUT: torch.eye(5)}, "expected a finite 64 x 64"),
        (SVDConfig(), CalibrationData([{"pixel_values": torch.zeros(3, 8, 8)}]), "does not accept"),
    ]
    for config, calibration, message in cases:
        model = make_bert()
        with pytest.raises(ValueError, match=message):
            svd_factorize_(model, config, calibration=calibration)
        assert not svd_layers(model), message  # nothing swapped
    with pytest.raises(ValueError, match="empty dataset"):
        CalibrationData([])
    with pytest.raises(ValueError, match="exactly one of"):
        CalibrationData()
    with pytest.raises(ValueError, match="not both"):
        svd_factorize_(make_bert(), input_scales={}, calibration=covariances)
    with pytest.raises(ValueError, match="whitening_ridge"):
        SVDConfig(whitening_ridge=0.0)


def test_vit_and_run_model_calibration():
    inputs = vit_inputs(4)
    examples = [{"pixel_values": x, "labels": 0} for x in inputs["pixel_values"]]
    data = CalibrationData(examples, batch_size=2)
    from_examples = input_covariances(make_vit(), data)

    def run_model(model: nn.Module) -> None:
        model(pixel_values=inputs["pixel_values"])

    from_callable = input_covariances(make_vit(), CalibrationData(run_model=run_model))
    for name, c in from_examples.items():
        assert torch.allclose(c, from_callable[name], rtol=1e-4, atol=1e-8), name  # batches of 2 vs 4: float32
    model = svd_factorize_(make_vit(), calibration=from_examples)
    with torch.no_grad():
        assert relative_error(forward(model, inputs), forward(make_vit(), inputs)) < 1e-5
