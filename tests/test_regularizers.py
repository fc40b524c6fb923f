"""Regularizers: float32 pure functions checked against numpy, masking, the zero case, and in-forward recording."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import bert_inputs, make_bert

from hf_svd_compress import SVDConfig, SVDLinear, svd_factorize_, svd_layers
from hf_svd_compress.layers.regularizers import (
    gram_deviation,
    gram_deviation_estimate,
    hoyer,
    hoyer_square,
    l1,
    orthogonality_loss,
    regularizer_totals,
    sparsity_loss,
)


def np_orth(A: np.ndarray) -> float:
    r = A.shape[1]
    return float(np.sum((A.T @ A - np.eye(r)) ** 2) / r**2)


NP_SPARSITY = {
    "l1": lambda s: float(np.sum(np.abs(s))),
    "hoyer": lambda s: float(np.sum(np.abs(s)) / np.sqrt(np.sum(s**2))),
    "hoyer_square": lambda s: float(np.sum(np.abs(s)) ** 2 / np.sum(s**2)),
}
TORCH_SPARSITY = {"l1": l1, "hoyer": hoyer, "hoyer_square": hoyer_square}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _grad_or_zero(loss: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Gradient of `loss` w.r.t. `t`; zeros when the loss does not depend on `t` (a constant is fine)."""
    if not loss.requires_grad:
        return torch.zeros_like(t)
    (g,) = torch.autograd.grad(loss, t, allow_unused=True)
    return torch.zeros_like(t) if g is None else g


# -------------------------------------------------------------------------------------------- orthogonality


def test_orthogonality_zero_for_orthonormal():
    U, _ = torch.linalg.qr(torch.randn(20, 8))
    V, _ = torch.linalg.qr(torch.randn(12, 8))
    assert float(orthogonality_loss(U, V)) < 1e-10
    assert float(gram_deviation(U)) < 1e-10


@pytest.mark.parametrize("d, r", [(10, 4), (6, 6), (30, 3)])
def test_gram_deviation_matches_numpy(d, r):
    A = torch.randn(d, r)
    assert float(gram_deviation(A)) == pytest.approx(np_orth(_np(A)), rel=1e-5)


def test_orthogonality_is_sum_of_both_factors():
    U, V = torch.randn(9, 5), torch.randn(7, 5)
    expected = np_orth(_np(U)) + np_orth(_np(V))
    assert float(orthogonality_loss(U, V)) == pytest.approx(expected, rel=1e-5)


def test_orthogonality_masked_equals_sliced():
    U, V = torch.randn(9, 6), torch.randn(7, 6)
    mask = torch.tensor([True, False, True, True, False, True])
    keep = mask.numpy()
    expected = np_orth(_np(U)[:, keep]) + np_orth(_np(V)[:, keep])
    assert float(orthogonality_loss(U, V, mask)) == pytest.approx(expected, rel=1e-5)
    assert float(orthogonality_loss(U, V, mask)) == pytest.approx(float(orthogonality_loss(U[:, keep], V[:, keep])))
    # Garbage in masked columns changes nothing.
    U2, V2 = U.clone(), V.clone()
    U2[:, ~mask] = 100.0
    V2[:, ~mask] = -5.0
    assert float(orthogonality_loss(U2, V2, mask)) == pytest.approx(expected, rel=1e-5)


def test_orthogonality_all_masked_is_zero():
    U = torch.randn(5, 3, requires_grad=True)
    loss = orthogonality_loss(U, torch.randn(4, 3), torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0
    assert torch.isfinite(_grad_or_zero(loss, U)).all()


def test_orthogonality_gradient_flows_to_live_columns_only():
    U = torch.randn(8, 4, requires_grad=True)
    V = torch.randn(6, 4, requires_grad=True)
    mask = torch.tensor([True, True, False, True])
    orthogonality_loss(U, V, mask).backward()
    assert torch.all(U.grad[:, 2] == 0) and torch.all(V.grad[:, 2] == 0)
    assert U.grad[:, mask].abs().sum() > 0 and V.grad[:, mask].abs().sum() > 0


# ------------------------------------------------------------------------------------------------- sparsity


@pytest.mark.parametrize("kind", ["l1", "hoyer", "hoyer_square"])
def test_sparsity_matches_numpy(kind):
    s = torch.randn(11)
    assert float(TORCH_SPARSITY[kind](s)) == pytest.approx(NP_SPARSITY[kind](_np(s)), rel=1e-5)
    assert float(sparsity_loss(s, kind)) == pytest.approx(NP_SPARSITY[kind](_np(s)), rel=1e-5)


@pytest.mark.parametrize("kind", ["l1", "hoyer", "hoyer_square"])
def test_sparsity_masked_equals_live_values(kind):
    s = torch.randn(9)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    expected = NP_SPARSITY[kind](_np(s)[mask.numpy()])
    assert float(sparsity_loss(s, kind, mask)) == pytest.approx(expected, rel=1e-5)


def test_known_sparsity_values():
    s = torch.tensor([3.0, -4.0, 0.0])
    assert float(l1(s)) == 7.0
    assert float(hoyer(s)) == pytest.approx(7.0 / 5.0)
    assert float(hoyer_square(s)) == pytest.approx(49.0 / 25.0)
    one_hot = torch.tensor([0.0, 2.0, 0.0, 0.0])
    assert float(hoyer(one_hot)) == pytest.approx(1.0)  # the sparsest vector has the minimal Hoyer value
    assert float(hoyer_square(torch.ones(4))) == pytest.approx(4.0)  # and a flat one the maximal


@pytest.mark.parametrize("kind", ["hoyer", "hoyer_square", "l1"])
def test_all_zero_s_gives_zero_and_finite_gradient(kind):
    s = torch.zeros(6, requires_grad=True)
    loss = sparsity_loss(s, kind)
    assert loss.item() == 0.0
    assert torch.isfinite(_grad_or_zero(loss, s)).all()
    # Same when the values are non-zero but all masked.
    s = torch.randn(6, requires_grad=True)
    loss = sparsity_loss(s, kind, torch.zeros(6, dtype=torch.bool))
    assert loss.item() == 0.0
    assert torch.isfinite(_grad_or_zero(loss, s)).all()


@pytest.mark.parametrize("kind", ["hoyer", "hoyer_square"])
def test_partially_zero_s_has_finite_gradient(kind):
    s = torch.tensor([0.0, 2.0, 0.0, -1.0], requires_grad=True)
    sparsity_loss(s, kind).backward()
    assert torch.isfinite(s.grad).all()


def test_unknown_sparsity_kind():
    with pytest.raises(ValueError, match="l2"):
        sparsity_loss(torch.ones(3), "l2")


@pytest.mark.parametrize("kind", ["l1", "hoyer", "hoyer_square"])
def test_bf16_inputs_computed_in_float32(kind):
    s = torch.randn(64).to(torch.bfloat16)
    U = torch.randn(40, 16).to(torch.bfloat16)
    V = torch.randn(24, 16).to(torch.bfloat16)
    sp = sparsity_loss(s, kind)
    orth = orthogonality_loss(U, V)
    assert sp.dtype == torch.float32 and orth.dtype == torch.float32
    # Compared with float64 numpy on the same (bf16-valued) inputs: far tighter than bf16 arithmetic allows.
    assert sp.item() == pytest.approx(NP_SPARSITY[kind](_np(s)), rel=1e-5)
    assert orth.item() == pytest.approx(np_orth(_np(U)) + np_orth(_np(V)), rel=1e-5)


# ----------------------------------------------------------------------------------------- totals, recording


def _factored_bert():
    model = make_bert()
    svd_factorize_(model, SVDConfig())
    with torch.no_grad():  # perturb so the orthogonality terms are not ~0
        for layer in svd_layers(model).values():
            layer.U.add_(0.05 * torch.randn_like(layer.U))
            layer.V.add_(0.05 * torch.randn_like(layer.V))
    first = next(iter(svd_layers(model).values()))
    first.mask[:5] = False
    return model


@pytest.mark.parametrize("kind", ["l1", "hoyer", "hoyer_square", None])
def test_regularizer_totals_sum_over_layers(kind):
    model = _factored_bert()
    layers = list(svd_layers(model).values())
    orth, sp = regularizer_totals(layers, kind)
    expected_orth = 0.0
    expected_sp = 0.0
    for layer in layers:
        keep = layer.mask.numpy()
        expected_orth += np_orth(_np(layer.U)[:, keep]) + np_orth(_np(layer.V)[:, keep])
        if kind:
            expected_sp += NP_SPARSITY[kind](_np(layer.s)[keep])
    assert orth.item() == pytest.approx(expected_orth, rel=1e-4)
    assert sp.item() == pytest.approx(expected_sp, rel=1e-5)
    assert expected_orth > 1e-3


@pytest.mark.parametrize("kind", ["l1", "hoyer", "hoyer_square"])
def test_forward_records_same_values_as_totals(kind):
    model = _factored_bert().train()
    layers = list(svd_layers(model).values())
    for layer in layers:
        layer.orth_enabled, layer.sparsity_kind = True, kind
        layer.regularizer_terms.clear()
    model(**bert_inputs())
    assert all(len(layer.regularizer_terms) == 1 for layer in layers)
    orth = sum(layer.regularizer_terms[0][0] for layer in layers)
    sp = sum(layer.regularizer_terms[0][1] for layer in layers)
    ref_orth, ref_sp = regularizer_totals(layers, kind)
    assert orth.item() == pytest.approx(ref_orth.item(), rel=1e-6)
    assert sp.item() == pytest.approx(ref_sp.item(), rel=1e-6)
    # The recorded terms are differentiable w.r.t. the factors.
    (orth + sp).backward()
    assert all(layer.U.grad is not None and layer.s.grad is not None for layer in layers)


def test_single_layer_records_per_forward():
    layer = SVDLinear.from_linear(torch.nn.Linear(8, 6)).train()
    layer.orth_enabled, layer.sparsity_kind = True, "l1"
    layer(torch.randn(2, 8))
    layer(torch.randn(3, 8))
    assert len(layer.regularizer_terms) == 2
    orth, sp = layer.regularizer_terms[0]
    assert orth.dtype == sp.dtype == torch.float32
    assert sp.item() == pytest.approx(NP_SPARSITY["l1"](_np(layer.s)), rel=1e-6)
    assert orth.item() == pytest.approx(np_orth(_np(layer.U)) + np_orth(_np(layer.V)), abs=1e-6)


def test_only_enabled_terms_recorded():
    layer = SVDLinear.from_linear(torch.nn.Linear(8, 6)).train()
    with torch.no_grad():
        layer.U.mul_(2.0)
    layer.orth_enabled, layer.sparsity_kind = True, None
    layer(torch.randn(2, 8))
    ((orth, sp),) = layer.regularizer_terms
    assert orth.item() > 0 and sp.item() == 0.0
    layer.regularizer_terms.clear()
    layer.orth_enabled, layer.sparsity_kind = False, "hoyer"
    layer(torch.randn(2, 8))
    ((orth, sp),) = layer.regularizer_terms
    assert orth.item() == 0.0 and sp.item() == pytest.approx(NP_SPARSITY["hoyer"](_np(layer.s)), rel=1e-6)


def test_nothing_recorded_in_eval_under_no_grad_or_when_disabled():
    layer = SVDLinear.from_linear(torch.nn.Linear(8, 6))
    x = torch.randn(2, 8)
    layer.orth_enabled, layer.sparsity_kind = True, "hoyer"
    layer.eval()
    layer(x)
    assert layer.regularizer_terms == []
    layer.train()
    with torch.no_grad():
        layer(x)
    with torch.inference_mode():
        layer(x)
    assert layer.regularizer_terms == []
    layer.orth_enabled, layer.sparsity_kind = False, None
    layer(x)
    assert layer.regularizer_terms == []


def test_bf16_layer_records_float32_terms():
    layer = SVDLinear.from_linear(torch.nn.Linear(8, 6).to(torch.bfloat16)).train()
    layer.orth_enabled, layer.sparsity_kind = True, "hoyer_square"
    layer(torch.randn(2, 8, dtype=torch.bfloat16))
    ((orth, sp),) = layer.regularizer_terms
    assert orth.dtype == sp.dtype == torch.float32
    assert sp.item() == pytest.approx(NP_SPARSITY["hoyer_square"](_np(layer.s)), rel=1e-5)


# ---- randomized (Hutchinson) orthogonality estimate -----------------------------------------------------------


def _near_orthonormal(d: int, r: int, noise: float = 0.05) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, r)).Q + noise * torch.randn(d, r)


def test_orthogonality_estimate_is_unbiased():
    torch.manual_seed(0)
    A = _near_orthonormal(64, 48)
    mask = torch.rand(48) > 0.3
    for m in (None, mask):
        exact = gram_deviation(A, m)
        estimates = torch.stack([gram_deviation_estimate(A, 4, m) for _ in range(2000)])
        assert abs(estimates.mean() - exact) < 0.03 * exact
        assert estimates.std() > 0.01 * exact  # a real random estimate, not the exact value in disguise


def test_orthogonality_estimate_gradient_is_unbiased():
    torch.manual_seed(0)
    A = _near_orthonormal(40, 32).requires_grad_()
    (exact,) = torch.autograd.grad(gram_deviation(A), A)
    total = torch.zeros_like(A)
    for _ in range(2000):
        total += torch.autograd.grad(gram_deviation_estimate(A, 4), A)[0]
    mean = total / 2000
    assert (mean - exact).norm() < 0.05 * exact.norm()


def test_orthogonality_estimate_zero_for_orthonormal_and_ignores_masked_columns():
    torch.manual_seed(0)
    A = torch.linalg.qr(torch.randn(30, 20)).Q
    assert gram_deviation_estimate(A, 3) < 1e-10
    mask = torch.ones(20, dtype=torch.bool)
    mask[5:] = False
    B = A.clone()
    B[:, 5:] = torch.randn(30, 15)  # garbage in the masked columns
    assert gram_deviation_estimate(B, 3, mask) < 1e-10


def test_orthogonality_loss_uses_the_estimate_only_when_cheaper():
    torch.manual_seed(0)
    U, V = _near_orthonormal(64, 32), _near_orthonormal(48, 32)
    exact = orthogonality_loss(U, V)
    assert orthogonality_loss(U, V, probes=16) == exact  # 2 p >= r: the exact value
    assert orthogonality_loss(U, V, probes=4) != exact


def test_trainer_with_orth_probes_logs_an_estimate_near_the_exact_value(tmp_path):
    from hf_svd_compress import SVDTrainer, SVDTrainingArguments

    torch.manual_seed(0)
    model = svd_factorize_(make_bert(), SVDConfig(target_modules="all-linear", orth_probes=2))
    for layer in svd_layers(model).values():
        with torch.no_grad():
            layer.U.add_(0.05 * torch.randn_like(layer.U))
    exact = regularizer_totals(svd_layers(model).values(), None)[0].item()
    args = SVDTrainingArguments(
        tmp_path, max_steps=1, learning_rate=0.0, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no"
    )
    batch = bert_inputs(batch=4)
    data = [{**{k: v[i] for k, v in batch.items()}, "labels": i % 2} for i in range(4)]
    trainer = SVDTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logged = next(e["orth_loss"] for e in trainer.state.log_history if "orth_loss" in e)
    assert logged != pytest.approx(exact, rel=1e-6) and logged == pytest.approx(exact, rel=0.7)
