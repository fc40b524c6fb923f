"""CUR decomposition (Cai et al. 2023): layers, leverage selection, approximation term, rank enumeration, training,
truncation and export."""

from __future__ import annotations

import pytest
import torch
from builders import make_bert, token_dataset
from conftest import linear_with_spectrum, relative_error
from torch import nn
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification
from transformers.pytorch_utils import Conv1D

from hf_svd_compress import (
    SVDConfig,
    SVDLinear,
    SVDTrainer,
    SVDTrainingArguments,
    current_ranks,
    load_compressed,
    prune_,
    save_compressed,
    svd_factorize_,
    truncate_,
)
from hf_svd_compress.layers.base import RegularizerSettings
from hf_svd_compress.layers.cur import (
    CompactCURLinear,
    CURLinear,
    approximation_loss,
    break_even_rank,
    cur_layers,
    cur_profile,
    exported_params,
    leverage_orders,
    optimal_core,
    prune_cur_,
    refresh_cur_selection_,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add synchronization on a busy machine
    yield
    torch.set_num_threads(threads)


def low_rank_linear(m: int, n: int, rank: int, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n, m)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank)
    return layer


def direct_error(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> float:
    """`||W - C C^+ W R^+ R||^2 / ||W||^2` in float64, straight from the definition."""
    w = weight.detach().double()
    C, R = w[:, cols], w[rows]
    approx = C @ torch.linalg.pinv(C) @ w @ torch.linalg.pinv(R) @ R
    return ((w - approx).square().sum() / w.square().sum()).item()


def tiny_bert() -> BertForSequenceClassification:
    return make_bert(num_attention_heads=2)


def train_args(tmp_path, **kw) -> SVDTrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return SVDTrainingArguments(**{**base, **kw})


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 100, (2, 7), generator=g), "attention_mask": torch.ones(2, 7).long()}


# ---- the layer ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_full_rank_is_the_dense_layer(shape):
    dense = nn.Linear(shape[1], shape[0])
    layer = CURLinear.from_linear(dense)
    x = torch.randn(3, shape[1])
    assert layer.rank == layer.full_rank == min(shape)
    assert layer.approximating and layer.approx_rank == max(1, break_even_rank(*shape) // 2)
    torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=0)
    torch.testing.assert_close(layer.to_linear()(x), dense(x), rtol=0, atol=0)


def test_conv1d_is_wrapped_in_linear_layout():
    conv = Conv1D(10, 6)  # GPT-2 style: weight [in, out]
    layer = CURLinear.from_linear(conv)
    x = torch.randn(4, 6)
    assert (layer.out_features, layer.in_features) == (10, 6)
    torch.testing.assert_close(layer(x), conv(x))


def test_leverage_scores_pick_the_columns_and_rows_carrying_the_top_subspace():
    # A rank-2 block on rows {1, 5} x columns {3, 7, 8}, plus small noise: leverage at rank 2 is ~1 on exactly
    # those rows and ~2/3 on those columns, ~0 elsewhere.
    g = torch.Generator().manual_seed(0)
    w = 1e-3 * torch.randn(9, 11, generator=g)
    rows, cols = torch.tensor([1, 5]), torch.tensor([3, 7, 8])
    w[rows[:, None], cols] += 10 * torch.randn(2, 3, generator=g)
    U, _, Vh = torch.linalg.svd(w, full_matrices=False)
    row_order, col_order = leverage_orders(U, Vh, 2)
    assert set(row_order[:2].tolist()) == {1, 5}
    assert set(col_order[:3].tolist()) == {3, 7, 8}
    layer = nn.Linear(11, 9)
    layer.weight.data.copy_(w)
    cur = CURLinear.from_linear(layer, approx_rank=2)
    assert set(cur.row_order[:2].tolist()) == {1, 5} and cur.leverage_rank == 2


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_cur_of_an_exactly_rank_k_matrix_is_exact(shape):
    dense = low_rank_linear(*shape, rank=4)
    layer = CURLinear.from_linear(dense, approx_rank=4)
    layer.select_(4, rank=4)
    x = torch.randn(5, shape[1])
    assert relative_error(layer(x), dense(x)) < 1e-5
    assert approximation_loss(layer.weight, layer.row_order[:4], layer.col_order[:4]).item() < 1e-9
    assert cur_profile(layer.weight, 6).errors[3:].max().item() < 1e-9  # rank >= 4: exact (Pythagoras form too)


def test_profile_errors_match_the_definition():
    dense = linear_with_spectrum(20, 14, torch.linspace(3, 0.1, 14).tolist())
    profile = cur_profile(dense.weight, 7)
    for k in (1, 3, 7):
        rows, cols, _ = profile.selection(k)
        assert profile.errors[k - 1].item() == pytest.approx(direct_error(dense.weight, rows[:k], cols[:k]), abs=1e-5)
    assert torch.all(profile.errors[1:] <= profile.errors[:-1] + 1e-12)  # nested selections: never worse with rank


def test_optimal_core_is_the_least_squares_core():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 8, generator=g, dtype=torch.float64)
    C, R = w[:, [0, 2, 5]], w[[1, 4, 6]]
    core = optimal_core(C, w, R)
    residual = w - C @ core @ R
    # Normal equations of min_U ||W - C U R||: C^T (W - C U R) R^T = 0.
    assert (C.T @ residual @ R.T).abs().max().item() < 1e-10


def test_approximation_term_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 7, generator=g, dtype=torch.float64, requires_grad=True)
    rows, cols = torch.tensor([0, 3, 5]), torch.tensor([1, 2, 6])
    loss = approximation_loss(w, rows, cols)
    loss.backward()

    # Reference: the pseudo-inverses differentiated through (the envelope theorem says the gradient is the same).
    ref_w = w.detach().clone().requires_grad_(True)
    C, R = ref_w[:, cols], ref_w[rows]
    approx = C @ torch.linalg.pinv(C) @ ref_w @ torch.linalg.pinv(R) @ R
    ref = (ref_w - approx).square().sum() / ref_w.square().sum()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-7, atol=1e-10)
    assert 0 < loss.item() < 1


def test_approximation_gradient_is_finite_when_columns_are_dependent():
    w = low_rank_linear(12, 10, rank=2).weight.detach().clone().requires_grad_(True)
    loss = approximation_loss(w, torch.arange(5), torch.arange(5))  # 5 columns of a rank-2 matrix
    loss.backward()
    assert loss.item() < 1e-6 and torch.isfinite(w.grad).all()


def test_pruned_forward_matches_compact_layer_and_keeps_shapes():
    dense = linear_with_spectrum(24, 16, torch.logspace(0, -2, 16).tolist())
    layer = CURLinear.from_linear(dense)
    shapes = {k: v.shape for k, v in layer.state_dict().items()}
    prune_cur_({"x": layer}, budget=0.5)
    assert {k: v.shape for k, v in layer.state_dict().items()} == shapes  # DDP-safe: buffers change values only
    assert layer.rank < layer.full_rank
    x = torch.randn(6, 16, dtype=torch.float32)
    compact = layer.to_compact()
    assert isinstance(compact, CompactCURLinear) and compact.rank == layer.rank
    assert sorted(n for n, _ in compact.named_parameters()) == ["C", "R", "U", "bias"]
    torch.testing.assert_close(compact(x), layer(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compact.C, layer.weight[:, layer.col_order[: layer.rank]])  # actual columns
    torch.testing.assert_close(compact.R, layer.weight[layer.row_order[: layer.rank]])  # and rows
    down, up = compact.low_rank_factors()
    torch.testing.assert_close(up @ down, layer.composed_weight().detach(), rtol=1e-5, atol=1e-6)


def test_pruned_forward_is_differentiable_through_the_core():
    dense = linear_with_spectrum(12, 10, torch.linspace(2, 0.5, 10).tolist())
    layer = CURLinear.from_linear(dense, approx_rank=4)
    layer.select_(4, rank=4)
    layer(torch.randn(3, 10)).square().sum().backward()
    # Rows and columns outside C and R still get gradient: they enter through U = C^+ W R^+.
    outside_rows = torch.ones(12, dtype=torch.bool)
    outside_rows[layer.row_order[:4]] = False
    outside = layer.weight.grad[outside_rows][:, layer.col_order[4:]]
    assert outside.abs().max() > 0


def test_bf16_layer_keeps_its_dtype():
    dense = linear_with_spectrum(16, 12, torch.linspace(2, 0.5, 12).tolist()).to(torch.bfloat16)
    layer = CURLinear.from_linear(dense)
    layer.select_(3, rank=3)
    assert layer(torch.randn(2, 12, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert layer.to_compact().C.dtype == torch.bfloat16


def test_state_dict_round_trip_restores_ranks():
    layer = CURLinear.from_linear(linear_with_spectrum(16, 12, torch.linspace(2, 0.5, 12).tolist()))
    layer.select_(2, approx_rank=3, rank=5)
    fresh = CURLinear(12, 16)
    fresh.load_state_dict(layer.state_dict())
    assert (fresh.rank, fresh.approx_rank, fresh.leverage_rank) == (5, 3, 2)
    x = torch.randn(2, 12)
    torch.testing.assert_close(fresh(x), layer(x))


def test_refresh_recomputes_the_order_from_the_current_weight():
    model = nn.Sequential(CURLinear.from_linear(nn.Linear(12, 10), approx_rank=3))
    layer = model[0]
    with torch.no_grad():  # make columns 9, 10, 11 carry nearly all the weight
        layer.weight[:, 9:] *= 100
    assert refresh_cur_selection_(model) == {"0": 3}
    assert set(layer.col_order[:3].tolist()) == {9, 10, 11}


# ---- rank selection -----------------------------------------------------------------------------------------------


def two_spectra_layers() -> dict[str, CURLinear]:
    steep = linear_with_spectrum(48, 48, [5, 3] + [1e-3] * 46, seed=1)  # rank ~2
    flat = linear_with_spectrum(48, 48, [1.0] * 10 + [1e-3] * 38, seed=2)  # rank ~10, flat
    return {"steep": CURLinear.from_linear(steep), "flat": CURLinear.from_linear(flat)}


def total_error(layers: dict[str, CURLinear]) -> float:
    return sum(
        approximation_loss(layer.weight, layer.row_order[: layer.rank], layer.col_order[: layer.rank]).item()
        if layer.rank < layer.full_rank
        else 0.0
        for layer in layers.values()
    )


def test_budget_enumeration_meets_the_budget_and_beats_uniform_ranks():
    layers, budget = two_spectra_layers(), 0.25
    ranks = prune_cur_(layers, budget=budget)
    dense = sum(layer.out_features * layer.in_features for layer in layers.values())
    assert sum(exported_params(48, 48, r) for r in ranks.values()) <= budget * dense
    assert ranks["steep"] < ranks["flat"]  # the steep spectrum needs few columns; the rest go to the flat one
    greedy = total_error(layers)

    uniform_rank = int(budget * 48 * 48 // 96)  # same budget split evenly
    uniform = two_spectra_layers()
    for layer in uniform.values():
        rows, cols, leverage = cur_profile(layer.weight, uniform_rank).selection(uniform_rank)
        layer.select_(leverage, rank=uniform_rank, orders=(rows, cols))
    assert greedy < 0.01 < 0.2 < total_error(uniform)  # 2 + 10 columns are exact; 6 + 6 are not


def test_energy_keeps_the_smallest_rank_within_the_error():
    layers = two_spectra_layers()
    ranks = prune_cur_(layers, energy=0.9)
    for name, layer in layers.items():
        errors = cur_profile(layer.weight, break_even_rank(48, 48)).errors
        k = ranks[name]
        assert errors[k - 1] <= 0.1 + 1e-6 and (k == 1 or errors[k - 2] > 0.1)
        assert approximation_loss(layer.weight, layer.row_order[:k], layer.col_order[:k]).item() <= 0.1 + 1e-5


def test_energy_that_no_saving_rank_meets_keeps_the_layer_dense():
    full = linear_with_spectrum(48, 48, torch.linspace(1.0, 0.5, 48).tolist())
    layers = {"flat": CURLinear.from_linear(full)}
    assert prune_cur_(layers, energy=0.99) == {"flat": 48}
    assert layers["flat"].rank == layers["flat"].full_rank


def test_rank_multiple_and_pruning_again_only_lowers_ranks():
    layers = two_spectra_layers()
    first = prune_cur_(layers, budget=0.4, rank_multiple=8)
    assert all(r % 8 == 0 or r == 48 for r in first.values())
    second = prune_cur_(layers, budget=0.2)
    assert all(second[n] <= first[n] for n in first)


def test_tiny_budget_keeps_the_smallest_ranks():
    layers = two_spectra_layers()
    assert prune_cur_(layers, budget=0.001, rank_multiple=8) == {"steep": 1, "flat": 1}


# ---- the model API ------------------------------------------------------------------------------------------------


def test_factorize_prune_truncate_on_a_model():
    model = tiny_bert()
    expected = model(**inputs()).logits
    svd_factorize_(model, SVDConfig(parameterization="cur"))
    layers = cur_layers(model)
    assert len(layers) == 12 and all(isinstance(m, CURLinear) for m in layers.values())
    torch.testing.assert_close(model(**inputs()).logits, expected, rtol=0, atol=0)
    svd_factorize_(model, SVDConfig(parameterization="cur"))  # again: already factored layers are left alone
    assert cur_layers(model) == layers

    ranks = prune_(model, budget=0.5, rank_multiple=1)
    assert ranks == current_ranks(model)
    dense = sum(m.out_features * m.in_features for m in layers.values())
    kept = sum(exported_params(m.out_features, m.in_features, m.rank) for m in layers.values())
    assert kept <= 0.5 * dense and any(r < 32 for r in ranks.values())
    pruned = model(**inputs()).logits
    assert truncate_(model) == ranks
    compact = [n for n, m in cur_layers(model).items() if isinstance(m, CompactCURLinear)]
    assert sorted(compact) == sorted(n for n, r in ranks.items() if r < layers[n].full_rank)
    torch.testing.assert_close(model(**inputs()).logits, pruned, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="truncated CUR layers"):
        prune_(model, budget=0.3)
    assert current_ranks(model) == ranks  # refused before any change


def test_init_ranks_start_below_full_rank():
    model = svd_factorize_(tiny_bert(), SVDConfig(parameterization="cur", init_max_rank=4))
    assert set(current_ranks(model).values()) == {4}
    assert all(not m.approximating and m.approx_rank == 4 for m in cur_layers(model).values())
    model = svd_factorize_(tiny_bert(), SVDConfig(parameterization="cur", init_energy=0.05))
    for layer in cur_layers(model).values():
        assert layer.rank < layer.full_rank
        rows, cols = layer.row_order[: layer.rank], layer.col_order[: layer.rank]
        assert approximation_loss(layer.weight, rows, cols).item() <= 0.95 + 1e-6


def test_working_rank_follows_the_pruning_settings():
    layer = svd_factorize_(tiny_bert(), SVDConfig(parameterization="cur", prune_budget=0.25, prune_rank_multiple=1))
    query = layer.bert.encoder.layer[0].attention.self.query
    assert query.approx_rank == int(0.25 * 32 * 32 // 64)
    model = svd_factorize_(tiny_bert(), SVDConfig(parameterization="cur", prune_energy=0.2, prune_rank_multiple=4))
    assert all(m.approx_rank % 4 == 0 for m in cur_layers(model).values())


# ---- training -----------------------------------------------------------------------------------------------------


def test_trainer_adds_the_weighted_term_and_logs_it_falling(tmp_path):
    model = svd_factorize_(tiny_bert(), SVDConfig(parameterization="cur", approx_weight=2.0))
    trainer = SVDTrainer(
        model=model, args=train_args(tmp_path, max_steps=6, learning_rate=5e-3), train_dataset=token_dataset()
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    loss = trainer.compute_loss(model, batch)
    layers = [m for m in cur_layers(model).values()]
    approx = sum(
        approximation_loss(m.weight, m.row_order[: m.approx_rank], m.col_order[: m.approx_rank]) for m in layers
    )
    torch.testing.assert_close(loss, model(**batch).loss + 2.0 * approx, rtol=1e-5, atol=1e-6)

    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("approx_loss" in entry and "orth_loss" not in entry for entry in logs)
    assert logs[-1]["approx_loss"] < 0.9 * logs[0]["approx_loss"]
    assert logs[0]["approx_loss"] == pytest.approx(approx.item(), rel=1e-4)
    assert logs[-1]["rank_fraction"] == 1.0


def test_approx_weight_argument_overrides_and_zero_disables(tmp_path):
    model = svd_factorize_(tiny_bert(), SVDConfig(parameterization="cur"))
    trainer = SVDTrainer(
        model=model, args=train_args(tmp_path, max_steps=1, approx_weight=0.0), train_dataset=token_dataset()
    )
    trainer.train()
    assert "approx_loss" not in trainer.state.log_history[0]
    assert all(not m.approx_terms for m in cur_layers(model).values())
    with pytest.raises(ValueError, match="approx_weight"):
        train_args(tmp_path, approx_weight=-1.0)


def test_prune_at_step_ends_the_term_and_trains_the_cur_function(tmp_path):
    model = svd_factorize_(tiny_bert(), SVDConfig(parameterization="cur"))
    kw = dict(max_steps=4, prune_at_step=2, prune_budget=0.5, prune_rank_multiple=1)
    trainer = SVDTrainer(model=model, args=train_args(tmp_path, **kw), train_dataset=token_dataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("approx_loss" in entry for entry in logs if entry["step"] <= 2)
    assert all("approx_loss" not in entry for entry in logs if entry["step"] > 2)
    assert logs[-1]["rank_fraction"] < 1.0
    pruned = [m for m in cur_layers(model).values() if m.rank < m.full_rank]
    assert pruned and all(torch.isfinite(m.weight).all() for m in pruned)


def test_gradient_checkpointing_does_not_count_the_term_twice(tmp_path):
    losses = []
    for checkpointing in (False, True):
        model = svd_factorize_(tiny_bert(), SVDConfig(parameterization="cur"))
        args = train_args(tmp_path, max_steps=1, gradient_checkpointing=checkpointing)
        trainer = SVDTrainer(model=model, args=args, train_dataset=token_dataset())
        trainer.train()
        losses.append((trainer.state.log_history[0]["loss"], trainer.state.log_history[0]["approx_loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def one_sgd_update(tmp_path, batch: int, accumulation: int, approx_weight: float) -> dict[str, torch.Tensor]:
    model = svd_factorize_(tiny_bert(), SVDConfig(parameterization="cur", approx_weight=approx_weight))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw = dict(max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
    args = train_args(tmp_path, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", **kw)
    SVDTrainer(model=model, args=args, train_dataset=token_dataset(8)).train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_term_is_scaled_like_the_task_loss_under_gradient_accumulation(tmp_path):
    reference = one_sgd_update(tmp_path, 8, 1, approx_weight=5.0)
    accumulated = one_sgd_update(tmp_path, 4, 2, approx_weight=5.0)
    task_only = one_sgd_update(tmp_path, 8, 1, approx_weight=0.0)
    scale = max(t.abs().max().item() for t in reference.values())

    def diff(update):
        return max((update[n] - reference[n]).abs().max().item() for n in reference) / scale

    assert diff(task_only) > 0.1  # the term moves the step by far more than the tolerance
    assert diff(accumulated) < 1e-4


def test_the_approximation_term_is_recorded_in_forward_only_when_asked():
    layer = CURLinear.from_linear(nn.Linear(8, 8), approx_rank=2).train()
    assert layer.configure_regularizers(RegularizerSettings(approx=True))
    assert layer.pop_terms() == {}  # nothing before a forward pass
    layer(torch.randn(3, 8))
    terms = layer.pop_terms()
    assert (
        set(terms) == {"approx_loss"} and 0 < float(terms["approx_loss"]) <= 1 and terms["approx_loss"].requires_grad
    )
    assert layer.pop_terms() == {}  # popped
    assert not layer.configure_regularizers(RegularizerSettings(orth=True, sparsity="l1"))  # not CUR terms
    layer(torch.randn(3, 8))
    assert layer.pop_terms() == {}


def test_prune_truncate_fine_tune_export_reload(tmp_path):
    model = svd_factorize_(tiny_bert(), SVDConfig(parameterization="cur"))
    SVDTrainer(model=model, args=train_args(tmp_path / "a", max_steps=2), train_dataset=token_dataset()).train()
    prune_(model, budget=0.5, rank_multiple=1)
    truncate_(model)
    assert any(isinstance(m, CompactCURLinear) for m in cur_layers(model).values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SVDTrainer(model=model, args=train_args(tmp_path / "b", max_steps=2), train_dataset=token_dataset())
    trainer.train()
    compact = next(n for n, m in cur_layers(model).items() if isinstance(m, CompactCURLinear))
    assert not torch.equal(before[f"{compact}.U"], model.get_submodule(compact).U)  # the core trains too
    model.eval()
    expected = model(**inputs()).logits

    path = save_compressed(model, tmp_path / "cur-export")
    ours = load_compressed(path, trainable=True)
    assert current_ranks(ours) == current_ranks(model)
    assert all(isinstance(m, SVDLinear) for m in (ours.get_submodule(n) for n in current_ranks(model)))
    torch.testing.assert_close(ours(**inputs()).logits, expected, rtol=1e-4, atol=1e-5)
    remote = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
    torch.testing.assert_close(remote(**inputs()).logits, expected, rtol=1e-4, atol=1e-5)


def test_exported_factors_are_columns_and_core_times_rows(tmp_path):
    model = svd_factorize_(tiny_bert(), SVDConfig(parameterization="cur"))
    prune_(model, budget=0.3, rank_multiple=1)
    name, layer = next((n, m) for n, m in cur_layers(model).items() if m.rank < m.full_rank)
    columns = layer.weight[:, layer.col_order[: layer.rank]].detach()
    from safetensors.torch import load_file

    tensors = load_file(save_compressed(model, tmp_path / "x") / "model.safetensors")
    up = tensors[f"{name}.up.weight"]
    # The same columns, up to the order export sorts them in.
    assert sorted(map(tuple, up.T.tolist())) == sorted(map(tuple, columns.T.tolist()))


# ---- errors -------------------------------------------------------------------------------------------------------


def test_bad_ranks_and_full_rank_truncation_are_refused():
    layer = CURLinear.from_linear(nn.Linear(8, 6))
    with pytest.raises(ValueError, match=r"approx_rank=7 must be an integer in \[1, 6\]"):
        CURLinear.from_linear(nn.Linear(8, 6), approx_rank=7)
    with pytest.raises(ValueError, match="rank=0"):
        layer.select_(2, rank=0)
    with pytest.raises(ValueError, match="prune_"):
        layer.to_compact()


def test_convs_are_refused_for_cur():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="only 'svd'"):
        svd_factorize_(model, SVDConfig(target_modules=["0"], parameterization="cur"))


def test_trainer_refuses_a_model_without_factored_layers(tmp_path):
    with pytest.raises(ValueError, match="SVDLinear or CURLinear"):
        SVDTrainer(model=tiny_bert(), args=train_args(tmp_path), train_dataset=token_dataset())


def test_merge_to_dense_merges_cur_layers_before_and_after_truncation():
    from hf_svd_compress import merge_to_dense_

    for truncate in (False, True):
        torch.manual_seed(0)
        model = svd_factorize_(tiny_bert(), SVDConfig(target_modules="all-linear", parameterization="cur"))
        prune_(model, budget=0.5)
        if truncate:
            truncate_(model)
        inputs = {"input_ids": torch.randint(0, 100, (2, 7))}
        expected = model(**inputs).logits
        merge_to_dense_(model)
        assert not cur_layers(model) and not hasattr(model.config, "svd_training")
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=1e-4)
