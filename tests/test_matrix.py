"""The model x parameterization x operation matrix, in the style of peft's `tests/testing_common.py`.

One list of cases (`CASES`: a tiny model builder, a parameterization, its settings) crossed with one shared check
per operation of the user path: factor exactly, train a step, prune, truncate, export and reload (our loader, lean
and trainable, and transformers' remote code), merge to dense, and reload a `save_pretrained` checkpoint saved while
factored (before and after truncation). Every check compares outputs with the model it came from.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from builders import BY_NAME, Arch, loss_inputs, outputs

from hf_svd_compress import (
    SVDConfig,
    current_ranks,
    load_compressed,
    load_factored_checkpoint,
    merge_to_dense_,
    prune_,
    save_compressed,
    svd_factorize_,
    truncate_,
)
from hf_svd_compress.layers.base import FactoredLayer, RegularizerSettings, factored_modules


@dataclass(frozen=True)
class Case:
    """One row of the matrix: an architecture, a parameterization and the settings it is factored with."""

    arch: str
    parameterization: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        extra = "-".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return "-".join(filter(None, (self.arch, self.parameterization, extra)))

    def model(self) -> torch.nn.Module:
        return BY_NAME[self.arch].build()

    def config(self) -> SVDConfig:
        return SVDConfig(parameterization=self.parameterization, **self.settings)


# BERT (nn.Linear), GPT-2 (transformers Conv1D, tied head), Llama (no biases) and ViT; ViT also with its patch
# embedding conv factored.
CASES = [
    *(Case(arch, kind) for arch in ("bert", "gpt2", "llama", "vit") for kind in ("svd", "householder", "sttp", "cur")),
    Case("bert", "sttp", {"tt_max_rank": 4}),
    Case("vit", "svd", {"target_modules": ["query", "value", "patch_embeddings.projection"]}),
    Case("vit", "svd", {"target_modules": ["query", "patch_embeddings.projection"], "conv_mode": "spatial"}),
]
EXACT = {"sttp-tt_max_rank=4"}  # cases whose factors approximate the dense layers on purpose
ATOL = 1e-4
matrix = pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])


def arch_of(case: Case) -> Arch:
    return BY_NAME[case.arch]


def factored(case: Case) -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = case.model()
    return dense, svd_factorize_(copy.deepcopy(dense), case.config())


def pruned(case: Case) -> torch.nn.Module:
    _, model = factored(case)
    prune_(model, budget=0.5, rank_multiple=1)
    return model


def assert_same_outputs(model: torch.nn.Module, reference: torch.nn.Module, case: Case, atol: float = ATOL) -> None:
    inputs = arch_of(case).inputs()
    torch.testing.assert_close(outputs(model.eval(), inputs), outputs(reference.eval(), inputs), atol=atol, rtol=1e-4)


# ---- checks ----------------------------------------------------------------------------------------------------


@matrix
def test_factor_is_exact_at_full_rank(case):
    dense, model = factored(case)
    layers = factored_modules(model)
    assert layers and all(layer.parameterization == case.parameterization for layer in layers.values())
    if not any(case.id.endswith(tag) for tag in EXACT):
        assert_same_outputs(model, dense, case)


@matrix
def test_train_step_records_regularizers_and_moves_weights(case):
    _, model = factored(case)
    model.train()
    settings = RegularizerSettings(orth=True, sparsity="hoyer", approx=True)
    recording = [layer for layer in factored_modules(model).values() if layer.configure_regularizers(settings)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = model(**loss_inputs(arch_of(case), arch_of(case).inputs())).loss
    terms = [term for layer in recording for term in layer.pop_terms().values()]
    assert recording and terms, "every parameterization records a term when all are on"
    (loss + 1e-3 * torch.stack(terms).sum()).backward()
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    moved = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert moved and torch.isfinite(loss)


@matrix
def test_prune_lowers_ranks_without_changing_shapes(case):
    _, model = factored(case)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    full = {name: layer.full_rank for name, layer in factored_modules(model).items()}
    ranks = prune_(model, budget=0.5, rank_multiple=1)
    assert ranks == current_ranks(model) and set(ranks) == set(full)
    assert any(ranks[name] < full[name] for name in full)
    assert {name: p.shape for name, p in model.named_parameters()} == shapes  # masks only: DDP-safe


@matrix
def test_truncate_keeps_the_function(case):
    model = pruned(case)
    reference = copy.deepcopy(model)
    ranks = current_ranks(model)
    assert truncate_(model) == ranks
    assert all(layer.full_rank == layer.rank for layer in factored_modules(model).values())
    assert_same_outputs(model, reference, case)


@matrix
@pytest.mark.parametrize("trainable", [False, True], ids=["lean", "trainable"])
def test_export_round_trip_with_our_loader(case, trainable, tmp_path):
    model = pruned(case)
    save_compressed(model, tmp_path / "export")
    loaded = load_compressed(tmp_path / "export", trainable=trainable)
    assert_same_outputs(loaded, model, case)
    if trainable:
        assert all(isinstance(m, FactoredLayer) for m in factored_modules(loaded).values())
        assert set(factored_modules(loaded)) == set(factored_modules(model))


@matrix
def test_export_round_trip_with_remote_code(case, tmp_path):
    model = pruned(case)
    save_compressed(model, tmp_path / "export")
    loaded = arch_of(case).auto.from_pretrained(tmp_path / "export", trust_remote_code=True)
    assert_same_outputs(loaded, model, case)
    # With labels, the loss is the task's (transformers picks it by class name, which ours does not carry).
    inputs = loss_inputs(arch_of(case), arch_of(case).inputs())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).loss, model.eval()(**inputs).loss, atol=1e-4, rtol=1e-4)


@matrix
def test_merge_to_dense_restores_the_original_types(case):
    dense, _ = factored(case)
    model = pruned(case)
    merged = merge_to_dense_(copy.deepcopy(model))
    assert not factored_modules(merged)
    types = {name: type(module) for name, module in dense.named_modules()}
    assert {name: type(module) for name, module in merged.named_modules()} == types
    assert_same_outputs(merged, model, case)


@matrix
@pytest.mark.parametrize("truncate", [False, True], ids=["masked", "truncated"])
def test_save_pretrained_checkpoint_reloads_factored(case, truncate, tmp_path):
    model = pruned(case)
    if truncate:
        truncate_(model)
    model.save_pretrained(tmp_path / "checkpoint")
    loaded = load_factored_checkpoint(tmp_path / "checkpoint")
    assert {n: type(m) for n, m in factored_modules(loaded).items()} == {
        n: type(m) for n, m in factored_modules(model).items()
    }
    assert current_ranks(loaded) == current_ranks(model)
    assert_same_outputs(loaded, model, case)
