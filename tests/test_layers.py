"""`SVDLinear`: exact factoring, both forward paths, masking (outputs and gradients), truncation, Conv1D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import linear_with_spectrum, relative_error
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_svd_compress import SVDLinear
from hf_svd_compress.layers import svd as layers_module


def _dense(out_features=24, in_features=12, bias=True, dtype=torch.float32) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


def _composed(layer: SVDLinear) -> torch.Tensor:
    """Reference weight from the live factors, written out independently of the layer's own code."""
    U, s, V = layer.U.detach().double(), layer.s.detach().double(), layer.V.detach().double()
    keep = layer.mask.numpy()
    return (U[:, keep] * s[keep]) @ V[:, keep].T


@pytest.fixture
def force_path(monkeypatch):
    def force(composed: bool) -> None:
        monkeypatch.setattr(SVDLinear, "use_composed", lambda self, num_tokens: composed)

    return force


# ----------------------------------------------------------------------------------------------- construction


@pytest.mark.parametrize("out_features, in_features", [(24, 12), (12, 24), (16, 16)])
def test_shapes(out_features, in_features):
    layer = SVDLinear.from_linear(_dense(out_features, in_features))
    r = min(out_features, in_features)
    assert layer.U.shape == (out_features, r)
    assert layer.s.shape == (r,)
    assert layer.V.shape == (in_features, r)
    assert layer.bias.shape == (out_features,)
    assert layer.mask.shape == (r,) and layer.mask.dtype == torch.bool and bool(layer.mask.all())
    assert (layer.in_features, layer.out_features) == (in_features, out_features)
    assert layer.rank == layer.full_rank == r
    # U, s, V are trainable parameters, the mask is a buffer (saved, not trained).
    assert {n for n, _ in layer.named_parameters()} == {"U", "s", "V", "bias"}
    assert "mask" in dict(layer.named_buffers())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("out_features, in_features", [(24, 12), (12, 24)], ids=["tall", "wide"])
def test_from_linear_is_exact(out_features, in_features, dtype):
    dense = _dense(out_features, in_features, dtype=dtype)
    layer = SVDLinear.from_linear(dense)
    assert layer.U.dtype == layer.s.dtype == layer.V.dtype == layer.bias.dtype == dtype
    W = dense.weight.detach().double().numpy()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(_composed(layer).numpy(), W, atol=tol * np.abs(W).max())
    np.testing.assert_allclose(layer.s.detach().double().numpy(), np.linalg.svd(W, compute_uv=False), rtol=tol)
    r = layer.full_rank
    eye = np.eye(r)
    np.testing.assert_allclose(layer.U.detach().double().numpy().T @ layer.U.detach().double().numpy(), eye, atol=tol)
    np.testing.assert_allclose(layer.V.detach().double().numpy().T @ layer.V.detach().double().numpy(), eye, atol=tol)
    assert torch.equal(layer.bias, dense.bias)
    x = torch.randn(5, in_features, dtype=dtype)
    assert relative_error(layer(x), dense(x)) < tol


def test_from_linear_without_bias():
    dense = _dense(bias=False)
    layer = SVDLinear.from_linear(dense)
    assert layer.bias is None
    x = torch.randn(3, 12)
    assert relative_error(layer(x), dense(x)) < 1e-5


def test_bf16_keeps_dtype_but_decomposes_in_float32():
    dense = _dense(24, 12).to(torch.bfloat16)
    layer = SVDLinear.from_linear(dense)
    for p in (layer.U, layer.s, layer.V, layer.bias):
        assert p.dtype == torch.bfloat16
    assert layer.mask.dtype == torch.bool
    # Reference: the float32 SVD of the (bf16-valued) weight, rounded to bf16 at the end only.
    W32 = dense.weight.detach().float()
    s_ref = torch.linalg.svdvals(W32)
    np.testing.assert_allclose(layer.s.detach().float().numpy(), s_ref.numpy(), rtol=2**-8, atol=0)
    W_back = _composed(layer)
    assert relative_error(W_back, W32) < 1e-2


def test_to_linear_merges_back(force_path):
    dense = _dense(12, 24)
    layer = SVDLinear.from_linear(dense)
    merged = layer.to_linear()
    assert type(merged) is nn.Linear
    assert merged.weight.shape == dense.weight.shape
    assert relative_error(merged.weight, dense.weight) < 1e-5
    assert torch.equal(merged.bias, dense.bias)
    x = torch.randn(4, 24)
    assert relative_error(merged(x), dense(x)) < 1e-5
    # With masked singular values the merged layer computes the masked function.
    layer.mask[[0, 3]] = False
    merged = layer.to_linear()
    np.testing.assert_allclose(merged.weight.detach().double().numpy(), _composed(layer).numpy(), atol=1e-5)
    force_path(False)
    assert relative_error(merged(x), layer(x)) < 1e-5


def test_rank_and_full_rank():
    layer = SVDLinear.from_linear(_dense(24, 12))
    assert (layer.rank, layer.full_rank) == (12, 12)
    layer.mask[[1, 5, 7]] = False
    assert (layer.rank, layer.full_rank) == (9, 12)
    assert "rank=9/12" in repr(layer)


# ---------------------------------------------------------------------------------------------- forward paths


@pytest.mark.parametrize(
    "m, n, r, tokens",
    [(32, 32, 32, 1), (32, 32, 32, 31), (32, 32, 32, 32), (32, 32, 32, 1000), (64, 32, 4, 10**6), (768, 3072, 768, 8)]
    + [(768, 3072, 768, 4096), (16, 64, 16, 20), (16, 64, 16, 22)],
)
def test_use_composed_follows_op_count(m, n, r, tokens):
    layer = SVDLinear(n, m, r)
    composed_cost = m * n * r + tokens * m * n
    factored_cost = tokens * r * (m + n)
    assert layer.use_composed(tokens) == (composed_cost <= factored_cost)


@pytest.mark.parametrize("composed", [True, False], ids=["composed", "factored"])
@pytest.mark.parametrize("shape", [(7,), (3, 5)], ids=["2d", "3d"])
def test_forward_paths_match_dense(force_path, composed, shape):
    dense = _dense(20, 16)
    layer = SVDLinear.from_linear(dense)
    force_path(composed)
    x = torch.randn(*shape, 16)
    y = layer(x)
    assert y.shape == (*shape, 20)
    assert relative_error(y, dense(x)) < 1e-5
    # Against an independent float64 reference too.
    ref = x.double() @ dense.weight.detach().double().T + dense.bias.detach().double()
    assert relative_error(y, ref) < 1e-5


@pytest.mark.parametrize("shape", [(4,), (2, 3)], ids=["2d", "3d"])
def test_forward_paths_agree_with_masks(force_path, shape):
    layer = SVDLinear.from_linear(_dense(20, 16))
    layer.mask[[0, 2, 9]] = False
    x = torch.randn(*shape, 16)
    force_path(True)
    y_composed = layer(x)
    force_path(False)
    y_factored = layer(x)
    ref = x.double() @ _composed(layer).T + layer.bias.detach().double()
    assert relative_error(y_composed, ref) < 1e-5
    assert relative_error(y_factored, ref) < 1e-5
    assert relative_error(y_composed, y_factored) < 1e-5


def test_forward_picks_path_by_input_size(monkeypatch):
    """Without forcing: a square full-rank layer composes W for many tokens and uses two thin matmuls for few."""
    calls = []
    real_linear = F.linear

    def spy(x, w, b=None):
        calls.append(tuple(w.shape))
        return real_linear(x, w, b)

    dense = _dense(32, 32)
    layer = SVDLinear.from_linear(dense)
    monkeypatch.setattr(layers_module.F, "linear", spy)
    few = torch.randn(2, 3, 32)  # 6 tokens < 32: factored (two F.linear calls with rank-wide weights)
    y = layer(few)
    assert len(calls) == 2
    assert relative_error(y, few @ dense.weight.T + dense.bias) < 1e-5
    calls.clear()
    many = torch.randn(4, 16, 32)  # 64 tokens >= 32: composed (one F.linear)
    y = layer(many)
    assert len(calls) == 1
    assert relative_error(y, many @ dense.weight.T + dense.bias) < 1e-5
    calls.clear()
    # A low-rank layer stays factored even for many tokens.
    small = SVDLinear.from_linear(dense, max_rank=4)
    small(many)
    assert len(calls) == 2 and calls[0] == (4, 32) and calls[1] == (32, 4)


# ------------------------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("composed", [True, False], ids=["composed", "factored"])
def test_masked_values_contribute_nothing_and_get_no_gradient(force_path, composed):
    force_path(composed)
    layer = SVDLinear.from_linear(_dense(20, 16))
    masked = [1, 4, 15]
    live = [i for i in range(16) if i not in masked]
    layer.mask[masked] = False
    x = torch.randn(3, 2, 16)
    y = layer(x)
    ref = x.double() @ _composed(layer).T + layer.bias.detach().double()
    assert relative_error(y, ref) < 1e-5
    # Changing masked parameters does not change the output.
    with torch.no_grad():
        layer.s[masked] = 123.0
        layer.U[:, masked] = 7.0
        layer.V[:, masked] = -3.0
    assert relative_error(layer(x), y) < 1e-6
    (layer(x).square().sum()).backward()
    assert torch.all(layer.s.grad[masked] == 0)
    assert torch.all(layer.U.grad[:, masked] == 0)
    assert torch.all(layer.V.grad[:, masked] == 0)
    assert torch.all(layer.s.grad[live] != 0)
    assert torch.all(layer.U.grad[:, live].abs().sum(0) > 0)
    assert torch.all(layer.V.grad[:, live].abs().sum(0) > 0)


def test_masked_gradient_with_regularizers_recorded():
    layer = SVDLinear.from_linear(_dense(20, 16)).train()
    layer.orth_enabled, layer.sparsity_kind = True, "hoyer"
    masked = [0, 6]
    layer.mask[masked] = False
    with torch.no_grad():
        layer.U.add_(0.1 * torch.randn_like(layer.U))  # make the orthogonality loss non-trivial
    y = layer(torch.randn(5, 16))
    ((orth, sparsity),) = layer.regularizer_terms
    (y.sum() + orth + sparsity).backward()
    assert torch.all(layer.s.grad[masked] == 0)
    assert torch.all(layer.U.grad[:, masked] == 0)
    assert torch.all(layer.V.grad[:, masked] == 0)


# ----------------------------------------------------------------------------------------- truncate, live factors


def test_live_factors_sorted_by_magnitude():
    layer = SVDLinear(6, 5, 5)
    with torch.no_grad():
        layer.U.copy_(torch.randn(5, 5))
        layer.V.copy_(torch.randn(6, 5))
        layer.s.copy_(torch.tensor([0.5, -3.0, 2.0, -0.125, 1.0]))
        layer.bias.zero_()
    layer.mask[2] = False
    U, s, V = layer.live_factors()
    assert s.tolist() == [-3.0, 1.0, 0.5, -0.125]
    order = [1, 4, 0, 3]
    assert torch.equal(U, layer.U[:, order])
    assert torch.equal(V, layer.V[:, order])


@pytest.mark.parametrize("out_features, in_features", [(24, 12), (12, 24)])
def test_truncate_gives_smaller_layer_with_same_outputs(force_path, out_features, in_features):
    layer = SVDLinear.from_linear(_dense(out_features, in_features))
    layer.mask[[0, 3, 4, 10]] = False
    x = torch.randn(3, 4, in_features)
    force_path(False)
    before = layer(x).detach()
    expected_s = sorted(layer.s[layer.mask].tolist(), key=abs, reverse=True)
    layer.truncate_()
    assert layer.U.shape == (out_features, 8)
    assert layer.V.shape == (in_features, 8)
    assert layer.s.shape == layer.mask.shape == (8,)
    assert bool(layer.mask.all()) and layer.rank == layer.full_rank == 8
    assert layer.s.tolist() == pytest.approx(expected_s)
    assert all(p.requires_grad for p in layer.parameters())
    for composed in (True, False):
        force_path(composed)
        assert relative_error(layer(x), before) < 1e-5


def test_truncate_to_max_rank_matches_numpy_best_approximation():
    # A layer with a known spectrum: keeping r values leaves exactly the tail energy.
    sv = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    dense = linear_with_spectrum(10, 8, sv)
    layer = SVDLinear.from_linear(dense)
    layer.mask[3:] = False
    layer.truncate_()
    err = np.linalg.norm(_composed(layer).numpy() - dense.weight.detach().double().numpy())
    assert err == pytest.approx(np.sqrt(1.0**2 + 0.5**2 + 0.25**2), rel=1e-5)


# --------------------------------------------------------------------------------------------------- Conv1D


@pytest.mark.parametrize("nf, nx", [(24, 12), (12, 24)], ids=["tall", "wide"])
def test_conv1d_factors_exactly(force_path, nf, nx):
    conv = Conv1D(nf, nx)  # weight is (nx, nf) = (in, out)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    layer = SVDLinear.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (nx, nf)
    np.testing.assert_allclose(_composed(layer).numpy(), conv.weight.detach().double().numpy().T, atol=1e-5)
    x = torch.randn(2, 3, nx)
    for composed in (True, False):
        force_path(composed)
        assert relative_error(layer(x), conv(x)) < 1e-5
    merged = layer.to_linear()
    assert relative_error(merged(x), conv(x)) < 1e-5


def test_dense_weight_rejects_other_layers():
    with pytest.raises(TypeError, match="Conv2d"):
        SVDLinear.from_linear(nn.Conv2d(3, 4, 3))


# ------------------------------------------------------------------------------------------- truncated starts


def test_from_linear_energy_keeps_numpy_energy_rank():
    sv = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1])
    dense = linear_with_spectrum(12, 8, sv)
    for energy in (0.5, 0.8, 0.9, 0.97, 0.999, 1.0):
        cum = np.cumsum(sv**2) / np.sum(sv**2)
        expected = int(np.argmax(cum >= energy - 1e-12)) + 1
        layer = SVDLinear.from_linear(dense, energy=energy)
        assert layer.full_rank == expected, energy
        np.testing.assert_allclose(layer.s.detach().numpy(), sv[:expected], rtol=1e-5)


def test_from_linear_max_rank_uses_lowrank_and_is_accurate(monkeypatch):
    calls = []
    real = torch.svd_lowrank

    def spy(*args, **kwargs):
        calls.append(kwargs.get("q"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", spy)
    sv = 10.0 * 0.7 ** np.arange(48)
    dense = linear_with_spectrum(48, 64, sv)
    layer = SVDLinear.from_linear(dense, max_rank=5)
    assert calls, "a small rank cap should use the randomized SVD"
    assert layer.full_rank == 5
    np.testing.assert_allclose(layer.s.detach().numpy(), sv[:5], rtol=1e-3)
    err = np.linalg.norm(_composed(layer).numpy() - dense.weight.detach().double().numpy())
    best = np.sqrt(np.sum(sv[5:] ** 2))  # Eckart-Young: the error of the best rank-5 approximation
    assert err <= 1.01 * best
