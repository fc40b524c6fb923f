"""Householder (SVDP) and tensor-train (STTP) layers: exactness, orthonormality in training, pruning, export."""

from __future__ import annotations

import math

import pytest
import torch
from builders import make_bert
from conftest import relative_error
from datasets import Dataset
from torch import nn
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification
from transformers.pytorch_utils import Conv1D

from hf_svd_compress import (
    HouseholderSVDLinear,
    SVDConfig,
    SVDTrainer,
    SVDTrainingArguments,
    load_compressed,
    load_factored_checkpoint,
    merge_to_dense_,
    prune_,
    save_compressed,
    svd_factorize_,
    svd_layers,
    to_householder_,
    truncate_,
)
from hf_svd_compress.layers.householder import (
    HouseholderFactor,
    TTHouseholderFactor,
    householder_columns,
    prime_factors,
    tt_ranks,
)
from hf_svd_compress.layers.registry import factored_layer

KINDS = ["householder", "sttp"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def orth_error(A: torch.Tensor) -> float:
    A = A.detach()
    return float((A.T @ A - torch.eye(A.shape[1], dtype=A.dtype)).norm())


def random_orthonormal(d: int, r: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, r, dtype=torch.float64))[0]


def tiny_bert(config: SVDConfig) -> BertForSequenceClassification:
    return svd_factorize_(make_bert(num_attention_heads=2), config)


def bert_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 100, (2, 7), generator=g)}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**bert_batch()).logits


# ---- the building blocks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("d, r", [(7, 3), (6, 6), (12, 1)])
def test_householder_columns_matches_torch_householder_product(d, r):
    reflectors = torch.randn(d, r, dtype=torch.float64)
    Y = reflectors.tril(-1) + torch.eye(d, r, dtype=torch.float64)
    expected = torch.linalg.householder_product(Y, 2 / Y.square().sum(0))
    torch.testing.assert_close(householder_columns(reflectors), expected)


@pytest.mark.parametrize(
    "q",
    [
        random_orthonormal(9, 4),
        random_orthonormal(5, 5),  # square: LAPACK's last tau is 0
        torch.eye(6, 3, dtype=torch.float64),  # every LAPACK tau is 0
        -torch.eye(4, dtype=torch.float64),
    ],
    ids=["random", "square", "identity", "minus-identity"],
)
def test_factor_reproduces_the_orthonormal_matrix_with_signs(q):
    factor = HouseholderFactor(*q.shape, dtype=torch.float64)
    factor.load_orthonormal_(q)
    torch.testing.assert_close(factor.matrix(), q, atol=1e-12, rtol=0)
    assert factor.dof == q.shape[0] * q.shape[1] - q.shape[1] * (q.shape[1] + 1) // 2


def test_prime_factors_and_exact_tt_ranks():
    assert prime_factors(384) == [2] * 7 + [3]
    assert prime_factors(1) == [1] and prime_factors(13) == [13]
    assert tt_ranks([2] * 7 + [3], 64) == [1, 2, 4, 8, 16, 32, 64, 128, 64]
    assert tt_ranks([2] * 7 + [3], 64, max_rank=16) == [1, 2, 4, 8, 16, 16, 16, 22, 64]
    # The cap never goes below what r orthonormal columns need: r_{D-1} * m_D >= r.
    ranks = tt_ranks([2] * 7 + [3], 384, max_rank=8)
    assert ranks[-2] * 3 >= 384


@pytest.mark.parametrize("d, r", [(24, 5), (12, 12), (30, 7), (13, 4)])
def test_tt_factor_is_exact_and_orthonormal(d, r):
    q = random_orthonormal(d, r)
    factor = TTHouseholderFactor(d, r, dtype=torch.float64)
    factor.load_orthonormal_(q)
    torch.testing.assert_close(factor.matrix(), q, atol=1e-12, rtol=0)


def test_tt_factor_refuses_ranks_that_cannot_be_orthonormal():
    with pytest.raises(ValueError, match="r_k <= r_\\(k-1\\) \\* m_k"):
        TTHouseholderFactor(8, 4, ranks=[1, 4, 4, 4])
    with pytest.raises(ValueError, match="end at 4"):
        TTHouseholderFactor(8, 4, ranks=[1, 2, 4, 3])


# ---- the layer ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out_features, in_features", [(24, 12), (12, 24), (32, 32)])
@pytest.mark.parametrize("composed", [False, True])
def test_from_linear_is_exact(kind, out_features, in_features, composed, monkeypatch):
    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features)
    layer = HouseholderSVDLinear.from_linear(dense, parameterization=kind)
    monkeypatch.setattr(HouseholderSVDLinear, "use_composed", lambda self, tokens: composed)
    x = torch.randn(3, 5, in_features)
    assert relative_error(layer(x), dense(x)) < 1e-5
    assert orth_error(layer.U) < 1e-5 and orth_error(layer.V) < 1e-5
    assert (layer.s.detach() > 0).all()  # the signs live in the factors' buffers, not in s


@pytest.mark.parametrize("kind", KINDS)
def test_conv1d_and_factored_layer_dispatch(kind):
    torch.manual_seed(0)
    conv1d = Conv1D(20, 12)  # GPT-2 layout: weight [in, out]
    layer = factored_layer(conv1d, SVDConfig(parameterization=kind, init_max_rank=6))
    assert isinstance(layer, HouseholderSVDLinear) and layer.parameterization == kind and layer.full_rank == 6
    full = factored_layer(conv1d, SVDConfig(parameterization=kind))
    x = torch.randn(4, 12)
    assert relative_error(full(x), conv1d(x)) < 1e-5


def test_factored_layer_refuses_conv2d_for_householder():
    with pytest.raises(ValueError, match="only 'svd' factors convolutions"):
        factored_layer(nn.Conv2d(3, 4, 3), SVDConfig(parameterization="householder", target_modules=["x"]))


def test_dof_of_a_384_layer():
    svdp = HouseholderSVDLinear(384, 384, 384)
    assert svdp.dof == 384 * 384  # two full Stiefel manifolds plus the spectrum: exactly the dense count
    sttp = HouseholderSVDLinear(384, 384, 64, parameterization="sttp", tt_max_rank=16)
    assert sttp.dof < HouseholderSVDLinear(384, 384, 64).dof / 5


def test_tt_rank_cap_stays_orthonormal_with_the_best_singular_values():
    torch.manual_seed(0)
    dense = nn.Linear(24, 48)
    capped = HouseholderSVDLinear.from_linear(dense, max_rank=8, parameterization="sttp", tt_max_rank=2)
    exact = HouseholderSVDLinear.from_linear(dense, max_rank=8, parameterization="sttp")
    assert capped.dof < exact.dof
    assert orth_error(capped.U) < 1e-5 and orth_error(capped.V) < 1e-5
    # s is the least-squares diagonal for the capped U, V: no other s gets closer to the rank-8 weight.
    U, V, target = capped.U.double(), capped.V.double(), exact.composed_weight().double()
    design = torch.stack([torch.outer(U[:, i], V[:, i]).flatten() for i in range(8)], 1)
    best = torch.linalg.lstsq(design, target.flatten()).solution
    torch.testing.assert_close(capped.s.detach().double(), best, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("composed", [False, True])
def test_gradients_reach_reflectors_and_s(kind, composed, monkeypatch):
    torch.manual_seed(0)
    layer = HouseholderSVDLinear.from_linear(nn.Linear(12, 24), parameterization=kind)
    monkeypatch.setattr(HouseholderSVDLinear, "use_composed", lambda self, tokens: composed)
    layer.sparsity_kind = "hoyer"
    layer.train()
    layer(torch.randn(5, 12)).square().sum().backward()
    reflectors = [p for n, p in layer.named_parameters() if n.endswith("reflectors")]
    assert len(reflectors) == (2 if kind == "householder" else len(prime_factors(24)) + len(prime_factors(12)))
    # Every core with a free entry (strictly-lower part non-empty) gets a gradient there.
    for p in reflectors:
        free = torch.ones_like(p, dtype=torch.bool).tril(-1)
        assert not free.any() or p.grad[free].abs().sum() > 0
    assert all(p.grad[~torch.ones_like(p, dtype=torch.bool).tril(-1)].abs().sum() == 0 for p in reflectors)
    assert layer.s.grad.abs().min() > 0
    orth, sparsity = layer.regularizer_terms[0]
    assert orth.item() == 0 and sparsity.item() > 0


def test_factors_are_built_in_float32_under_autocast():
    torch.manual_seed(0)
    layer = HouseholderSVDLinear.from_linear(nn.Linear(16, 32), parameterization="sttp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        U = layer.U
        y = layer(torch.randn(3, 16))
    assert U.dtype == torch.float32 and orth_error(U) < 1e-5
    assert y.dtype == torch.bfloat16


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="rank=40"):
        HouseholderSVDLinear(32, 64, 40)
    with pytest.raises(ValueError, match="parameterization='qr'"):
        HouseholderSVDLinear(32, 64, 8, parameterization="qr")
    with pytest.raises(ValueError, match="tt_max_rank=4"):
        HouseholderSVDLinear(32, 64, 8, parameterization="householder", tt_max_rank=4)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"parameterization": "sttp", "tt_max_rank": 0}, "tt_max_rank=0"),
        ({"parameterization": "sttp", "tt_max_rank": 2.5}, "tt_max_rank=2.5"),
        ({"parameterization": "sttp", "tt_max_rank": True}, "tt_max_rank=True"),
        ({"parameterization": "householder", "tt_max_rank": 8}, "only applies to parameterization='sttp'"),
        ({"tt_max_rank": 8}, "only applies to parameterization='sttp'"),
    ],
)
def test_bad_config_values_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", "\\(").replace(")", "\\)")):
        SVDConfig(**kwargs)


def test_config_round_trips_tt_max_rank():
    config = SVDConfig(parameterization="sttp", tt_max_rank=8)
    assert SVDConfig.from_dict(config.to_dict()) == config


# ---- pruning and truncation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_prune_and_truncate_keep_the_function_of_the_live_part(kind):
    model = tiny_bert(SVDConfig(parameterization=kind))
    with torch.no_grad():  # move the spectrum off the SVD's order, so the live columns are not a prefix
        for layer in svd_layers(model).values():
            layer.s.mul_(torch.rand_like(layer.s) + 0.5)
    ranks = prune_(model, energy=0.7)
    before = logits(model)
    tt_before = {n: list(layer.u_factor.ranks) for n, layer in svd_layers(model).items() if kind == "sttp"}
    truncate_(model)
    for name, layer in svd_layers(model).items():
        assert isinstance(layer, HouseholderSVDLinear) and layer.full_rank == layer.rank == ranks[name]
        assert orth_error(layer.U) < 1e-5 and orth_error(layer.V) < 1e-5
        if kind == "sttp":
            assert all(a <= b for a, b in zip(layer.u_factor.ranks[:-1], tt_before[name]))
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-4)


# ---- training ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_training_keeps_factors_orthonormal_without_orthogonality_loss(kind, tmp_path):
    model = tiny_bert(SVDConfig(parameterization=kind, sparsity="hoyer", sparsity_weight=0.01))
    start = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("reflectors")}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (32, 10), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})
    args = SVDTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        singular_value_lr_scale=10.0,
    )
    trainer = SVDTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    moved = [k for k, v in model.state_dict().items() if k in start and not torch.equal(v, start[k])]
    assert len(moved) > len(start) / 2  # the optimizer changed the reflectors
    for layer in svd_layers(model).values():
        assert orth_error(layer.U) < 1e-5 and orth_error(layer.V) < 1e-5
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["orth_loss"] == 0 and entry["sparsity_loss"] > 0 for entry in logs)


# ---- checkpoints and export ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_export_round_trip_with_both_loaders(kind, tmp_path):
    model = tiny_bert(SVDConfig(parameterization=kind))
    prune_(model, energy=0.8, rank_multiple=1)
    expected = logits(model)
    save_compressed(model, tmp_path / "export")
    ours = load_compressed(tmp_path / "export", trainable=True)
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=1e-4)
    remote = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export", trust_remote_code=True).eval()
    torch.testing.assert_close(logits(remote), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_to_householder_converts_a_loaded_export_exactly(kind, tmp_path):
    model = tiny_bert(SVDConfig(target_modules="all-linear"))  # plain SVD, then drifted off orthonormality
    with torch.no_grad():
        for layer in svd_layers(model).values():
            layer.U.add_(0.05 * torch.randn_like(layer.U))
    prune_(model, energy=0.9, rank_multiple=1)
    save_compressed(model, tmp_path / "export")
    loaded = load_compressed(tmp_path / "export", trainable=True)
    expected = logits(model)
    to_householder_(loaded, kind)
    assert loaded.svd_config.parameterization == kind
    assert loaded.config.svd_training["config"]["parameterization"] == kind
    for layer in svd_layers(loaded).values():
        assert isinstance(layer, HouseholderSVDLinear) and orth_error(layer.U) < 1e-5
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no plain SVDLinear"):
        to_householder_(loaded)


def test_to_householder_refuses_other_parameterizations_before_changing_anything():
    model = tiny_bert(SVDConfig())
    with pytest.raises(ValueError, match="parameterization='cur'"):
        to_householder_(model, "cur")
    with pytest.raises(ValueError, match="tt_max_rank=4"):
        to_householder_(model, "householder", tt_max_rank=4)
    assert not any(isinstance(m, HouseholderSVDLinear) for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
def test_merge_to_dense_gives_the_same_function(kind):
    model = tiny_bert(SVDConfig(parameterization=kind))
    prune_(model, energy=0.9, rank_multiple=1)
    expected = logits(model)
    merge_to_dense_(model)
    assert not svd_layers(model)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_load_factored_checkpoint_rebuilds_householder_layers(kind, tmp_path):
    cap = {"tt_max_rank": 4} if kind == "sttp" else {}
    model = tiny_bert(SVDConfig(parameterization=kind, **cap))
    prune_(model, energy=0.8, rank_multiple=1)
    truncate_(model)  # lowers the STTP TT-ranks: they must be read off the file, not recomputed from the config
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_factored_checkpoint(tmp_path / "ckpt")
    for name, layer in svd_layers(loaded).items():
        assert isinstance(layer, HouseholderSVDLinear) and layer.parameterization == kind
        assert layer.full_rank == svd_layers(model)[name].full_rank
    assert loaded.svd_config == model.svd_config
    torch.testing.assert_close(logits(loaded), logits(model))


def test_dof_counts_only_free_entries():
    layer = HouseholderSVDLinear(12, 24, 5, parameterization="sttp")
    expected = sum(
        core.reflectors.shape[0] * core.reflectors.shape[1] - math.comb(core.reflectors.shape[1] + 1, 2)
        for factor in (layer.u_factor, layer.v_factor)
        for core in factor.cores
    )
    assert layer.dof == expected + 5
