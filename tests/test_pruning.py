"""Pruning: energy and budget rank selection against numpy references, validation before changes, truncation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import forward
from conftest import MODEL_CASES, linear_with_spectrum, relative_error
from torch import nn

from hf_svd_compress import SVDConfig, SVDLinear, current_ranks, prune_, svd_factorize_, svd_layers, truncate_
from hf_svd_compress.core.pruning import worth_factoring
from hf_svd_compress.layers.allocation import layer_params

SPECTRUM = np.array([6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1, 0.05])


def np_energy_rank(sv: np.ndarray, energy: float) -> int:
    """Fewest largest values whose squared sum is >= energy of the total."""
    e = np.sort(np.asarray(sv, dtype=np.float64) ** 2)[::-1]
    cum = np.cumsum(e) / e.sum()
    return int(np.argmax(cum >= energy - 1e-12)) + 1


def spectrum_model(spectra: list[np.ndarray], shapes: list[tuple[int, int]]) -> nn.Module:
    """A model whose blocks are linear layers with known spectra, factored."""
    model = nn.Module()
    model.blocks = nn.ModuleList(
        linear_with_spectrum(m, n, sv, seed=i) for i, ((m, n), sv) in enumerate(zip(shapes, spectra))
    )
    return svd_factorize_(model, SVDConfig(target_modules="all-linear"))


def factored(case: str) -> tuple[nn.Module, dict]:
    c = MODEL_CASES[case]
    model = c.build()
    svd_factorize_(model)
    return model, c.inputs()


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.mask.clone() for n, m in svd_layers(model).items()}


# ---------------------------------------------------------------------------------------------------- energy


@pytest.mark.parametrize("energy", [0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.9999, 1.0])
def test_energy_keeps_fewest_values_reaching_energy(energy):
    model = spectrum_model([SPECTRUM], [(16, 12)])
    layer = model.blocks[0]
    np.testing.assert_allclose(layer.s.detach().numpy(), SPECTRUM, rtol=1e-5)  # the known spectrum
    ranks = prune_(model, energy=energy)
    k = np_energy_rank(SPECTRUM, energy)
    assert ranks == {"blocks.0": k} and layer.rank == k
    # The largest k are the ones kept.
    assert layer.mask.tolist() == [True] * k + [False] * (12 - k)
    kept = np.sum(SPECTRUM[:k] ** 2) / np.sum(SPECTRUM**2)
    assert kept >= energy - 1e-9
    if k > 1:
        assert np.sum(SPECTRUM[: k - 1] ** 2) / np.sum(SPECTRUM**2) < energy


def test_energy_exact_threshold():
    # s^2 = [16, 9, 0, ...]: 16/25 = 0.64 exactly reaches 0.64 with one value.
    model = spectrum_model([np.array([4.0, 3.0])], [(6, 5)])
    assert prune_(model, energy=0.64) == {"blocks.0": 1}


def test_energy_one_keeps_all_nonzero_values():
    sv = np.array([3.0, 2.0, 1.0, 1e-3, 1e-5, 0.0, 0.0, 0.0])
    model = spectrum_model([sv], [(10, 8)])
    layer = model.blocks[0]
    with torch.no_grad():  # exact zeros and tiny values (from the SVD they are only ~1e-7)
        layer.s.copy_(torch.tensor(sv, dtype=torch.float32))
    assert prune_(model, energy=1.0) == {"blocks.0": 5}
    assert layer.mask.tolist() == [True] * 5 + [False] * 3


def test_energy_one_on_many_values_keeps_all_nonzero():
    g = torch.Generator().manual_seed(5)
    layer = SVDLinear(700, 600, 600)
    with torch.no_grad():
        s = torch.rand(600, generator=g) * torch.logspace(0, -4, 600)
        s[450:] = 0.0
        layer.s.copy_(s[torch.randperm(600, generator=g)])
    model = nn.Module()
    model.blocks = nn.ModuleList([layer])
    assert prune_(model, energy=1.0) == {"blocks.0": 450}


def test_energy_per_layer_on_several_layers():
    spectra = [SPECTRUM, np.array([9.0, 1.0, 1.0, 1.0, 1.0, 1.0]), np.linspace(3, 1, 10)]
    model = spectrum_model(spectra, [(16, 12), (6, 8), (10, 20)])
    ranks = prune_(model, energy=0.9)
    assert ranks == {f"blocks.{i}": np_energy_rank(sv, 0.9) for i, sv in enumerate(spectra)}


@pytest.mark.parametrize("case", ["bert", "vit", "gpt2", "mlp"])
def test_energy_on_model_matrix(case):
    model, _ = factored(case)
    spectra = {n: m.s.detach().double().numpy().copy() for n, m in svd_layers(model).items()}
    ranks = prune_(model, energy=0.7)
    assert ranks == {n: np_energy_rank(sv, 0.7) for n, sv in spectra.items()}
    assert ranks == current_ranks(model)


# ---------------------------------------------------------------------------------------------------- budget


def kept_fraction(model: nn.Module) -> float:
    layers = svd_layers(model).values()
    # Independent count: factored r(m+n), or dense mn where the rank saves nothing.
    kept = sum(min(m.rank * (m.in_features + m.out_features), m.in_features * m.out_features) for m in layers)
    return kept / sum(m.in_features * m.out_features for m in layers)


@pytest.mark.parametrize("case", ["bert", "vit", "gpt2", "mlp"])
@pytest.mark.parametrize("budget", [0.25, 0.5, 0.8])
def test_budget_keeps_at_most_and_close_to_budget(case, budget):
    model, _ = factored(case)
    ranks = prune_(model, budget=budget)
    assert ranks == current_ranks(model)
    fraction = kept_fraction(model)
    assert fraction <= budget + 1e-12
    # Close: within one rank step of the largest layer (the MLP's layers are few and small, so coarser).
    tolerance = 0.15 if case == "mlp" else 0.05
    assert fraction >= budget - tolerance, fraction


def test_budget_prefers_layers_with_more_energy():
    # Layer 0 has a flat spectrum, layer 1 a steep one: a global budget takes more rank from the steep layer.
    flat = np.ones(16)
    steep = 10.0 * 0.5 ** np.arange(16)
    model = spectrum_model([flat, steep], [(16, 16), (16, 16)])
    ranks = prune_(model, budget=0.4, allocation="threshold")
    assert ranks["blocks.0"] > ranks["blocks.1"]


def test_greedy_budget_keeps_the_largest_errors_per_parameter():
    # Greedy: the steep layer's values 10, 5, 2.5, 1.25 cost more output error (s^2) than any flat value (1).
    flat, steep = np.ones(16), 10.0 * 0.5 ** np.arange(16)
    model = spectrum_model([flat, steep], [(16, 16), (16, 16)])
    ranks = prune_(model, budget=0.4, allocation="greedy")  # 204.8 of 512 parameters: 6 triplets of 32
    assert ranks == {"blocks.0": 2, "blocks.1": 4}
    # The same spectra in a layer of twice the cost per triplet: its triplets are worth half as much.
    wide = spectrum_model([flat, np.full(16, 1.2)], [(16, 16), (48, 16)])
    assert prune_(wide, budget=0.3, allocation="greedy")["blocks.0"] > 1
    assert kept_fraction(model) <= 0.4


def test_budget_counts_dense_layers_as_dense():
    # BREAK_EVEN 0.9: factors are kept below 0.9 * 1024 = 921.6 weights.
    assert layer_params(32, 32, 14) == 14 * 64
    assert layer_params(32, 32, 15) == 1024  # 960 factor weights: past the break-even
    assert layer_params(32, 32, 32) == 1024
    assert layer_params(64, 32, 30) == 64 * 32
    assert layer_params(32, 32, 15, break_even=1.0) == 15 * 64


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"energy": 0}, "energy"),
        ({"energy": 0.0}, "energy"),
        ({"energy": 1.5}, "energy"),
        ({"energy": -0.2}, "energy"),
        ({"energy": float("nan")}, "energy"),
        ({"energy": "0.9"}, "energy"),
        ({"energy": True}, "not a bool"),  # True would be 1.0: keep everything
        ({"budget": True}, "not a bool"),
        ({"budget": 0}, "budget"),
        ({"budget": 1}, "budget"),
        ({"budget": 1.0}, "budget"),
        ({"budget": 2.0}, "budget"),
        ({"energy": 0.9, "budget": 0.5}, "exactly one"),
        ({}, "exactly one"),
    ],
)
def test_bad_values_raise_before_changing_masks(kwargs, match):
    model, _ = factored("bert")
    prune_(model, energy=0.95)
    before = masks(model)
    with pytest.raises(ValueError, match=match) as info:
        prune_(model, **kwargs)
    for value in kwargs.values():
        if len(kwargs) == 1:
            assert repr(value) in str(info.value)
    after = masks(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("budget", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5)])
def test_numpy_and_torch_scalars_are_numbers(budget):
    model, _ = factored("bert")
    ranks = prune_(model, budget=budget)
    assert ranks == prune_(factored("bert")[0], budget=0.5)


def test_no_svd_layers_raises(bert):
    with pytest.raises(ValueError, match="SVDLinear"):
        prune_(bert, energy=0.9)


# ------------------------------------------------------------------------------------------ masks, truncation


@pytest.mark.parametrize("mode", [{"energy": 0.8}, {"budget": 0.3}])
def test_prune_only_masks(mode):
    model, inputs = factored("bert")
    layers = svd_layers(model)
    snapshot = {
        n: (id(m.U), m.U.detach().clone(), m.s.detach().clone(), m.V.detach().clone()) for n, m in layers.items()
    }
    prune_(model, **mode)
    for name, layer in svd_layers(model).items():
        pid, U, s, V = snapshot[name]
        assert id(layer.U) == pid
        assert torch.equal(layer.U, U) and torch.equal(layer.s, s) and torch.equal(layer.V, V)
        assert layer.full_rank == s.shape[0]
    assert any(layer.rank < layer.full_rank for layer in layers.values())


def test_pruned_outputs_follow_masks():
    model, inputs = factored("vit")
    prune_(model, energy=0.9)
    # The dense reference built from the live triplets only.
    for layer in svd_layers(model).values():
        keep = layer.mask
        W = (layer.U[:, keep] * layer.s[keep]) @ layer.V[:, keep].T
        x = torch.randn(3, layer.in_features)
        assert relative_error(layer(x), x @ W.T + layer.bias) < 1e-5


@pytest.mark.parametrize("case", ["bert", "vit", "gpt2", "mlp"])
def test_truncate_slices_shapes_and_preserves_outputs(case):
    model, inputs = factored(case)
    ranks = prune_(model, energy=0.8)
    with torch.no_grad():
        before = forward(model, inputs)
    truncated = truncate_(model)
    assert truncated == ranks
    for name, layer in svd_layers(model).items():
        r = ranks[name]
        assert layer.U.shape == (layer.out_features, r)
        assert layer.V.shape == (layer.in_features, r)
        assert layer.s.shape == layer.mask.shape == (r,)
        assert bool(layer.mask.all())
    with torch.no_grad():
        after = forward(model, inputs)
    assert relative_error(after, before) < 1e-4


def test_worth_factoring():
    layer = SVDLinear.from_linear(nn.Linear(32, 32))
    assert not worth_factoring(layer)  # full rank 32: 32 * 64 > 1024
    assert worth_factoring(layer, rank=14)  # 896 < 0.9 * 1024
    assert not worth_factoring(layer, rank=15)  # 960 >= 921.6: past the break-even (BREAK_EVEN 0.9)
    layer.mask[14:] = False
    assert worth_factoring(layer)
    layer.mask[13] = False
    layer.mask[14] = True
    assert worth_factoring(layer)
    layer.mask[15] = True
    assert not worth_factoring(layer)
    tall = SVDLinear.from_linear(nn.Linear(16, 64))
    assert worth_factoring(tall, rank=11) and not worth_factoring(tall, rank=12)  # 11*80=880 < 921.6 <= 12*80


# ------------------------------------------------------------------------------------------------- repeats


def test_repeated_pruning_only_removes_more():
    model, _ = factored("bert")
    prune_(model, energy=0.9)
    first = masks(model)
    prune_(model, energy=0.9)  # relative to what is live: removes more
    second = masks(model)
    prune_(model, energy=1.0)  # never brings masked values back
    third = masks(model)
    prune_(model, budget=0.2)
    fourth = masks(model)
    for n in first:
        assert not torch.any(second[n] & ~first[n])
        assert torch.equal(third[n], second[n])
        assert not torch.any(fourth[n] & ~third[n])
    assert sum(int(m.sum()) for m in second.values()) < sum(int(m.sum()) for m in first.values())


def test_pruning_keeps_largest_live_values_after_manual_masking():
    model = spectrum_model([SPECTRUM], [(16, 12)])
    layer = model.blocks[0]
    layer.mask[0] = False  # the largest value is already gone
    ranks = prune_(model, energy=0.9)
    live = SPECTRUM[1:]
    k = np_energy_rank(live, 0.9)
    assert ranks == {"blocks.0": k}
    assert layer.mask.tolist() == [False] + [True] * k + [False] * (11 - k)


def _toy_factored(spectra: list[list[float]], dim: int = 40) -> nn.Module:
    """A model of one SVDLinear per spectrum, with exactly that singular spectrum."""
    model = nn.ModuleDict()
    for i, values in enumerate(spectra):
        layer = SVDLinear(dim, dim, len(values))
        with torch.no_grad():
            layer.U.copy_(torch.linalg.qr(torch.randn(dim, len(values))).Q)
            layer.V.copy_(torch.linalg.qr(torch.randn(dim, len(values))).Q)
            layer.s.copy_(torch.tensor(values))
        model[f"l{i}"] = layer
    return model


def test_rank_multiple_rounds_energy_ranks_up():
    torch.manual_seed(0)
    values = [float(40 - i) for i in range(40)]
    exact = prune_(_toy_factored([values]), energy=0.5)
    rounded = prune_(_toy_factored([values]), energy=0.5, rank_multiple=8)
    assert rounded["l0"] % 8 == 0 and exact["l0"] <= rounded["l0"] < exact["l0"] + 8


def test_rank_multiple_keeps_the_budget():
    torch.manual_seed(0)
    model = _toy_factored([[2.0**-i for i in range(40)], [1.0] * 40, [float(40 - i) for i in range(40)]])
    ranks = prune_(model, budget=0.4, rank_multiple=8)
    assert all(r % 8 == 0 for r in ranks.values())
    kept = sum(layer_params(40, 40, r) for r in ranks.values())
    assert kept <= 0.4 * 3 * 40 * 40


def test_rank_multiple_is_capped_by_the_live_count():
    model = _toy_factored([[1.0] * 12])
    assert prune_(model, energy=1.0, rank_multiple=8) == {"l0": 12}


@pytest.mark.parametrize("bad", [0, -8, 2.5, True])
def test_rank_multiple_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="rank_multiple"):
        prune_(_toy_factored([[1.0] * 4]), energy=0.9, rank_multiple=bad)


def test_rank_multiple_falls_back_to_exact_ranks_when_rounding_cannot_fit():
    torch.manual_seed(0)
    model = _toy_factored([[float(40 - i) for i in range(40)]] * 2)
    ranks = prune_(model, budget=0.05, rank_multiple=8)  # rank 8 alone would keep 40% of a 40 x 40 layer
    assert sum(layer_params(40, 40, r) for r in ranks.values()) <= 0.05 * 2 * 40 * 40


def test_uniform_budget_keeps_the_same_fraction_of_every_layer():
    flat, steep = np.ones(16), 10.0 * 0.5 ** np.arange(16)
    model = spectrum_model([flat, steep, flat], [(16, 16), (16, 16), (48, 16)])
    ranks = prune_(model, budget=0.5, allocation="uniform")
    assert ranks == {"blocks.0": 4, "blocks.1": 4, "blocks.2": 6}  # 0.5 m n / (m + n), rounded down
    assert prune_(spectrum_model([flat], [(16, 16)]), budget=0.5, rank_multiple=8, allocation="uniform") == {
        "blocks.0": 8  # at least one block
    }
