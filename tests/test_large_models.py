"""What factoring a large model needs: one dense layer freed before the next SVD, the SVD on the weight's device,
thin factors only, and starting below full rank (`init_energy`, `init_max_rank`) to cut memory.

Peak memory itself is measured by `benchmarks/memory.py` (fresh processes, RSS high-water mark); here the
mechanisms behind it are checked exactly: torch's CPU allocations are invisible to tracemalloc, so the tests follow
object lifetimes with weakrefs instead.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from builders import bert_inputs, make_bert
from conftest import linear_with_spectrum, relative_error
from torch import nn

from hf_svd_compress import SVDConfig, SVDLinear, svd_factorize_, svd_layers


def spy_on_from_linear(monkeypatch, refs: dict[str, weakref.ref]) -> list[int]:
    """Make `SVDLinear.from_linear` record how many of the dense layers in `refs` are still alive at each call."""
    alive_at_call = []
    real = SVDLinear.from_linear.__func__

    def spy(cls, linear, *args, **kwargs):
        alive_at_call.append(sum(ref() is not None for ref in refs.values()))
        return real(cls, linear, *args, **kwargs)

    monkeypatch.setattr(SVDLinear, "from_linear", classmethod(spy))
    return alive_at_call


def test_each_dense_layer_is_freed_before_the_next_svd(monkeypatch):
    model = make_bert()
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layer." in n]
    layer_refs = {n: weakref.ref(model.get_submodule(n)) for n in targets}
    weight_refs = {n: weakref.ref(model.get_submodule(n).weight) for n in targets}
    alive_at_call = spy_on_from_linear(monkeypatch, layer_refs)
    gc.disable()  # freed by reference counting, the moment it is swapped out; not by a later garbage collection
    try:
        svd_factorize_(model, SVDConfig())
        # At the k-th SVD only the k layers not yet factored (this one included) exist: the dense model shrinks as
        # the factored one grows, so the two are never held whole at once.
        assert alive_at_call == list(range(len(targets), 0, -1))
        assert all(ref() is None for ref in [*layer_refs.values(), *weight_refs.values()])
    finally:
        gc.enable()
    assert len(svd_layers(model)) == len(targets)


def test_a_filter_fn_does_not_keep_dense_layers_alive(monkeypatch):
    model = make_bert()
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(("query", "value"))]
    refs = {n: weakref.ref(model.get_submodule(n)) for n in kept}
    alive_at_call = spy_on_from_linear(monkeypatch, refs)
    svd_factorize_(model, SVDConfig(), filter_fn=lambda module, name: name in kept)
    assert alive_at_call == list(range(len(kept), 0, -1))


@pytest.mark.parametrize("kwargs", [{}, {"max_rank": 3}])
def test_svd_runs_on_the_weights_device_and_keeps_thin_factors(kwargs, monkeypatch):
    # A meta-device weight stands in for a GPU one: any copy to the CPU would fail ("no data"), so the SVD and the
    # new parameters never leave the weight's device. Thin factors only: U is m x r, never m x m.
    thin, randomized = [], []
    real_svd, real_lowrank = torch.linalg.svd, torch.svd_lowrank

    def svd_spy(A, *args, **kw):
        thin.append(kw.get("full_matrices", True) is False)
        return real_svd(A, *args, **kw)

    monkeypatch.setattr(torch.linalg, "svd", svd_spy)
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **k: randomized.append(1) or real_lowrank(*a, **k))
    dense = nn.Linear(64, 40, device="meta")
    layer = SVDLinear.from_linear(dense, **kwargs)
    rank = kwargs.get("max_rank", 40)
    assert {p.device.type for p in layer.parameters()} == {"meta"}
    assert (layer.U.shape, layer.s.shape, layer.V.shape) == ((40, rank), (rank,), (64, rank))
    assert thin and all(thin)
    assert bool(randomized) == bool(kwargs)  # a small cap takes the randomized SVD


@pytest.mark.parametrize("cap,randomized", [(10, True), (11, False), (40, False)])
def test_randomized_svd_only_below_a_quarter_of_full_rank(cap, randomized, monkeypatch):
    calls = []
    real = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **k: calls.append(1) or real(*a, **k))
    sv = 10.0 * 0.8 ** np.arange(40)
    dense = linear_with_spectrum(40, 56, sv)
    layer = SVDLinear.from_linear(dense, max_rank=cap)
    assert bool(calls) == randomized
    assert layer.full_rank == cap
    # Either way, the Eckart-Young best error at that rank (within 1%, plus float32 rounding).
    W = dense.weight.detach().double().numpy()
    error = np.linalg.norm(layer.composed_weight().detach().double().numpy() - W)
    assert error <= 1.01 * np.sqrt(np.sum(sv[cap:] ** 2)) + 1e-5 * np.linalg.norm(W)


def decaying_bert() -> nn.Module:
    """The tiny BERT with every block layer's spectrum replaced by a decaying one (pretrained-like, not flat)."""
    model = make_bert()
    for i, (name, module) in enumerate(list(model.named_modules())):
        if isinstance(module, nn.Linear) and ".layer." in name:
            out_features, in_features = module.weight.shape
            sv = 3.0 * 0.75 ** np.arange(min(out_features, in_features))
            module.weight.data.copy_(linear_with_spectrum(out_features, in_features, sv, seed=i).weight)
    return model


@pytest.mark.parametrize("energy", [0.999, 0.99, 0.9])
def test_init_energy_starts_smaller_with_a_bounded_error(energy):
    model = decaying_bert()
    inputs = bert_inputs()
    dense_params = sum(p.numel() for p in model.parameters())
    weights = {n: m.weight.detach().double().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        dense_logits = model(**inputs).logits
    svd_factorize_(model, SVDConfig(init_energy=energy))
    layers = svd_layers(model)
    for name, layer in layers.items():
        assert layer.full_rank < min(layer.in_features, layer.out_features)
        # Eckart-Young: dropping the tail leaves at most (1 - energy) of ||W||_F^2.
        W = weights[name]
        assert (layer.composed_weight().detach().double() - W).norm() ** 2 <= (1 - energy) * W.norm() ** 2 * 1.001
    factored_params = sum(p.numel() for p in model.parameters())
    assert factored_params < dense_params  # full rank would add parameters; this start removes some
    with torch.no_grad():
        assert relative_error(model(**inputs).logits, dense_logits) < 10 * (1 - energy) ** 0.5


def test_full_rank_start_costs_more_parameters_than_dense():
    # Why the options exist: a full-rank square layer stores U and V, twice the dense weight.
    model = make_bert()
    dense = sum(p.numel() for p in model.parameters())
    svd_factorize_(model, SVDConfig())
    assert sum(p.numel() for p in model.parameters()) > dense
    capped = svd_factorize_(make_bert(), SVDConfig(init_max_rank=4))
    assert sum(p.numel() for p in capped.parameters()) < dense
