"""Shared fixtures: the tiny models of `builders.py`, the targets each must get, and reference helpers.

The expected target names are written out by hand (not computed with the package's matching code) so the tests can
catch a wrong default or a wrong matching rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from builders import (
    ToyMLP,
    bert_inputs,
    gpt2_inputs,
    make_bert,
    make_gpt2,
    make_mlp,
    make_vit,
    mlp_inputs,
    seed_everything,
    vit_inputs,
)
from torch import nn
from transformers import BertForSequenceClassification, GPT2LMHeadModel, ViTForImageClassification

# Fixtures of the CLI and recipe tests: a tiny BERT with a real tokenizer, a tiny csv.
pytest_plugins = ["text_fixtures"]


@pytest.fixture(autouse=True)
def _fixed_seed():
    seed_everything()
    yield


# ------------------------------------------------------------------------------------------- expected targets

_BERT_BLOCK = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]
_VIT_BLOCK = ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"]
_GPT2_BLOCK = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


@dataclass
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    targets: list[str]  # what svd_factorize_ with the default config must factor, in model order
    never: list[str]  # heads / poolers that must stay dense


MODEL_CASES = {
    "bert": ModelCase(
        "bert",
        make_bert,
        bert_inputs,
        [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in _BERT_BLOCK],
        ["bert.pooler.dense", "classifier"],
    ),
    "vit": ModelCase(
        "vit", make_vit, vit_inputs, [f"vit.layers.{i}.{s}" for i in range(2) for s in _VIT_BLOCK], ["classifier"]
    ),
    "gpt2": ModelCase(
        "gpt2", make_gpt2, gpt2_inputs, [f"transformer.h.{i}.{s}" for i in range(2) for s in _GPT2_BLOCK], ["lm_head"]
    ),
    "mlp": ModelCase("mlp", make_mlp, mlp_inputs, [f"blocks.{i}.{j}" for i in range(2) for j in (0, 2)], ["head"]),
}


@pytest.fixture(params=list(MODEL_CASES))
def model_case(request) -> ModelCase:
    return MODEL_CASES[request.param]


@pytest.fixture
def bert() -> BertForSequenceClassification:
    return make_bert()


@pytest.fixture
def vit() -> ViTForImageClassification:
    return make_vit()


@pytest.fixture
def gpt2() -> GPT2LMHeadModel:
    return make_gpt2()


@pytest.fixture
def mlp() -> ToyMLP:
    return make_mlp()


# ------------------------------------------------------------------------------------------------ references


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def linear_with_spectrum(
    out_features: int, in_features: int, singular_values, bias: bool = True, dtype=torch.float32, seed: int = 0
) -> nn.Linear:
    """An `nn.Linear` whose weight is `Q1 diag(singular_values) Q2^T` with random orthonormal Q1, Q2 (numpy)."""
    rng = np.random.default_rng(seed)
    r = min(out_features, in_features)
    sv = np.zeros(r)
    sv[: len(singular_values)] = singular_values
    q1, _ = np.linalg.qr(rng.standard_normal((out_features, r)))
    q2, _ = np.linalg.qr(rng.standard_normal((in_features, r)))
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy((q1 * sv) @ q2.T))
        if bias:
            layer.bias.copy_(torch.from_numpy(rng.standard_normal(out_features)))
    return layer
