"""How to add a parameterization (docs/concepts.md, "Adding a parameterization"), tested end to end.

`PlainLowRank` stores `W = A B` with unconstrained `A` (out x r) and `B` (r x in), ranks components by
`||A_i|| ||B_i||` and is exported through `svd_form()`. Implementing the `FactoredLayer` protocol and registering a
builder is all it takes: factoring, `SVDTrainer`, pruning, truncation, export (our loader and remote code), merge and
`save_pretrained` checkpoints then work without a change to the package.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from builders import BY_NAME, loss_inputs, outputs
from datasets import Dataset
from torch import nn

from hf_svd_compress import (
    SVDConfig,
    SVDLinear,
    SVDTrainer,
    SVDTrainingArguments,
    current_ranks,
    load_compressed,
    load_factored_checkpoint,
    merge_to_dense_,
    prune_,
    save_compressed,
    svd_factorize_,
    truncate_,
)
from hf_svd_compress.layers.base import FactoredLayer, dense_module, dense_type_of
from hf_svd_compress.layers.linalg import FACTORABLE_TYPES, dense_weight, thin_svd
from hf_svd_compress.layers.registry import Parameterization, register_parameterization, unregister_parameterization


class PlainLowRank(FactoredLayer):
    """`y = x (A diag(mask) B)^T + bias`; the example parameterization "plain"."""

    parameterization = "plain"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.A = nn.Parameter(torch.empty(out_features, rank, dtype=dtype))
        self.B = nn.Parameter(torch.empty(rank, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.register_buffer("mask", torch.ones(rank, dtype=torch.bool))

    @classmethod
    def from_linear(cls, linear: nn.Module) -> PlainLowRank:
        weight = dense_weight(linear)
        U, s, V = thin_svd(weight, min(weight.shape))
        layer = cls(weight.shape[1], weight.shape[0], s.numel(), linear.bias is not None, weight.dtype)
        with torch.no_grad():
            layer.A.copy_(U * s.sqrt())
            layer.B.copy_((V * s.sqrt()).T)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.dense_type = dense_type_of(linear)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, (self.A * self.mask) @ self.B, self.bias)

    @property
    def rank(self) -> int:
        return int(self.mask.sum())

    @property
    def full_rank(self) -> int:
        return self.mask.numel()

    def spectrum(self) -> torch.Tensor:  # the default allocation ranks these across layers
        return (self.A.norm(dim=0) * self.B.norm(dim=1)).detach()[self.mask]

    @torch.no_grad()
    def keep_(self, rank: int) -> None:
        scores = torch.where(self.mask, self.A.norm(dim=0) * self.B.norm(dim=1), -1.0)
        self.mask.copy_(torch.zeros_like(self.mask).scatter(0, scores.argsort(descending=True)[:rank], True))

    @torch.no_grad()
    def truncate_(self) -> PlainLowRank:
        self.A, self.B = nn.Parameter(self.A[:, self.mask].clone()), nn.Parameter(self.B[self.mask].clone())
        self.mask = torch.ones(self.A.shape[1], dtype=torch.bool)
        return self

    def svd_form(self) -> SVDLinear:
        layer = SVDLinear.from_low_rank_factors(self.B[self.mask], self.A[:, self.mask], self.bias, orthonormal=True)
        layer.dense_type = self.dense_type
        return layer

    def to_dense(self) -> nn.Module:
        return dense_module(((self.A * self.mask) @ self.B).detach(), self.bias, self.dense_type)

    @classmethod
    def from_state(cls, state: dict, prefix: str, dense: nn.Module, record: dict[str, Any]) -> PlainLowRank:
        out_features, in_features = dense_weight(dense).shape
        rank, dtype = state[f"{prefix}A"].shape[1], state[f"{prefix}A"].dtype
        layer = cls(in_features, out_features, rank, f"{prefix}bias" in state, dtype)
        layer.dense_type = dense_type_of(dense)
        return layer


@pytest.fixture
def plain():
    register_parameterization(
        Parameterization(
            "plain", FACTORABLE_TYPES, build=lambda linear, config, scale, cov: PlainLowRank.from_linear(linear)
        )
    )
    yield
    unregister_parameterization("plain")


def test_a_registered_parameterization_goes_through_the_whole_user_path(plain, tmp_path):
    arch = BY_NAME["bert"]
    dense, inputs = arch.build(), arch.inputs()
    model = svd_factorize_(copy.deepcopy(dense), SVDConfig(parameterization="plain"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PlainLowRank)}
    assert len(layers) == 12
    torch.testing.assert_close(outputs(model, inputs), outputs(dense, inputs), atol=1e-4, rtol=1e-4)

    rows = [{k: v[i] for k, v in loss_inputs(arch, inputs).items()} for i in range(2)]
    args = SVDTrainingArguments(
        tmp_path / "run", max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True
    )
    SVDTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows * 2).with_format("torch")).train()

    ranks = prune_(model, budget=0.5, rank_multiple=1)
    assert set(ranks) == set(layers) and any(r < layers[n].full_rank for n, r in ranks.items())
    pruned = copy.deepcopy(model).eval()
    assert truncate_(model) == ranks
    torch.testing.assert_close(outputs(model.eval(), inputs), outputs(pruned, inputs), atol=1e-4, rtol=1e-4)

    save_compressed(model, tmp_path / "export")
    for loaded in (
        load_compressed(tmp_path / "export"),
        load_compressed(tmp_path / "export", trainable=True),
        arch.auto.from_pretrained(tmp_path / "export", trust_remote_code=True),
    ):
        torch.testing.assert_close(outputs(loaded, inputs), outputs(model, inputs), atol=1e-4, rtol=1e-4)

    model.save_pretrained(tmp_path / "checkpoint")
    reloaded = load_factored_checkpoint(tmp_path / "checkpoint").eval()
    assert current_ranks(reloaded) == ranks
    torch.testing.assert_close(outputs(reloaded, inputs), outputs(model, inputs), atol=1e-5, rtol=1e-5)

    merged = merge_to_dense_(model)
    assert type(merged.get_submodule(next(iter(layers)))) is nn.Linear
    torch.testing.assert_close(outputs(merged, inputs), outputs(pruned, inputs), atol=1e-4, rtol=1e-4)


def test_an_unregistered_name_is_refused_with_the_registered_ones():
    with pytest.raises(ValueError, match="plain.*one of"):
        SVDConfig(parameterization="plain")
