"""Shared fixtures: tiny random BERT / ViT / GPT-2 models built from configs, a toy MLP, and their inputs.

Every model is small enough that building it and running a forward pass takes milliseconds on one CPU core. The
expected target names are written out by hand (not computed with the package's matching code) so the tests can
catch a wrong default or a wrong matching rule.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
)

SEED = 0

# Fixtures of the CLI and recipe tests: a tiny BERT with a real tokenizer, a tiny csv.
pytest_plugins = ["text_fixtures"]


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _fixed_seed():
    seed_everything()
    yield


# ----------------------------------------------------------------------------------------------------- models


def make_bert() -> BertForSequenceClassification:
    seed_everything()
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def make_vit() -> ViTForImageClassification:
    seed_everything()
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config).eval()


def make_gpt2() -> GPT2LMHeadModel:
    seed_everything()
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


class ToyMLP(nn.Module):
    """Two residual blocks, each an `nn.Sequential` of Linear layers (tall 12->24 and wide 24->12), plus a head."""

    def __init__(self, width: int = 12, hidden: int = 24, num_blocks: int = 2, num_classes: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width)) for _ in range(num_blocks)
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def make_mlp() -> ToyMLP:
    seed_everything()
    return ToyMLP().eval()


# ----------------------------------------------------------------------------------------------------- inputs


def bert_inputs(batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": torch.randint(0, 100, (batch, seq), generator=g), "attention_mask": mask}


def vit_inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}


def gpt2_inputs(batch: int = 2, seq: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, 100, (batch, seq), generator=g)}


def mlp_inputs(batch: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return {"x": torch.randn(batch, 12, generator=g)}


def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output tensor (logits for the Transformers models)."""
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


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
