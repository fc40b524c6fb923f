"""Every tiny model the tests build, from configs in milliseconds: the BERT / ViT / GPT-2 / MLP builders most tests
use, their inputs, and the registry of every architecture family the package supports (`ARCHITECTURES`).

Each `Arch` names the transformers task class its export is loaded with and builds matching inputs. The families:
text encoders (BERT and its relatives, ModernBERT), vision encoders (ViT, DeiT, BEiT, Swin, CLIP vision, DINOv2),
decoders (GPT-2, Llama, Qwen2) and an encoder-decoder (T5).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers
from datasets import Dataset
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
)

SEQ, IMAGE = 8, 32
SEED = 0


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------- models


def bert_config(**overrides: Any) -> BertConfig:
    """The tiny BERT config every BERT test builds on: 2 layers, hidden 32, 4 heads, no dropout."""
    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertConfig(**{**base, **overrides})


def make_bert(seed: int = SEED, task_class: type = BertForSequenceClassification, **config: Any) -> torch.nn.Module:
    """A tiny BERT (`bert_config(**config)`) of `task_class`, weights drawn from `seed`, in eval mode."""
    seed_everything(seed)
    return task_class(bert_config(**config)).eval()


def vit_config(**overrides: Any) -> ViTConfig:
    """The tiny ViT config: 2 layers, hidden 32, 16 x 16 images in 8 x 8 patches, 3 labels, no dropout."""
    base = dict(
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
    return ViTConfig(**{**base, **overrides})


def make_vit(**config: Any) -> ViTForImageClassification:
    """A tiny ViT (`vit_config(**config)`), weights drawn from `SEED`, in eval mode."""
    seed_everything()
    return ViTForImageClassification(vit_config(**config)).eval()


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


def token_dataset(n: int = 32, vocab: int = 100, length: int = 10) -> Dataset:
    """`n` random token sequences labelled by the parity of their first token (a learnable two-class task)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})


# ------------------------------------------------------------------------------------ the architecture registry


@dataclass(frozen=True)
class Arch:
    """One architecture: its config, the task class to build and load it with, and its inputs' kind."""

    name: str
    config_class: str
    task_class: str
    config: dict[str, Any]
    kind: str = "text"  # "text", "image", "causal" or "seq2seq"
    auto_class: str = ""  # default: the auto class of `kind`
    sentence_transformers: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, seed: int = 0) -> torch.nn.Module:
        """The model in eval mode, with weights drawn from `seed`."""
        torch.manual_seed(seed)
        config = getattr(transformers, self.config_class)(**self.config)
        return getattr(transformers, self.task_class)(config).eval()

    @property
    def auto(self) -> type:
        """The `AutoModelFor...` class an export of this architecture is loaded with."""
        return getattr(transformers, self.auto_class or _AUTO_CLASSES[self.kind])

    def inputs(self, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
        """A batch of model inputs (token ids with some padding, or images)."""
        generator = torch.Generator().manual_seed(seed)
        if self.kind == "image":
            channels = self.config.get("num_channels", 3)
            return {"pixel_values": torch.randn(batch, channels, IMAGE, IMAGE, generator=generator)}
        vocab = self.config.get("vocab_size", 99)
        ids = torch.randint(4, vocab, (batch, SEQ), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # padding on one row: the attention mask matters
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "seq2seq":
            inputs["decoder_input_ids"] = torch.randint(4, vocab, (batch, 4), generator=generator)
        return inputs


_AUTO_CLASSES = {
    "text": "AutoModelForSequenceClassification",
    "image": "AutoModelForImageClassification",
    "causal": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
}
_TEXT = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
_TEXT_FULL = {**_TEXT, "intermediate_size": 64, "max_position_embeddings": 64}
_IMAGE = {
    "image_size": IMAGE,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "num_labels": 3,
}
_DECODER = {**_TEXT_FULL, "num_key_value_heads": 2, "pad_token_id": 0}

ARCHITECTURES: list[Arch] = [
    Arch("bert", "BertConfig", "BertForSequenceClassification", _TEXT_FULL, sentence_transformers=True),
    Arch("roberta", "RobertaConfig", "RobertaForSequenceClassification", {**_TEXT_FULL, "pad_token_id": 1}),
    Arch(
        "distilbert",
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        {"vocab_size": 99, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "max_position_embeddings": 64},
    ),
    Arch(
        "albert",
        "AlbertConfig",
        "AlbertForSequenceClassification",
        {**_TEXT_FULL, "embedding_size": 16},
    ),
    Arch("electra", "ElectraConfig", "ElectraForSequenceClassification", {**_TEXT_FULL, "embedding_size": 16}),
    Arch("deberta-v2", "DebertaV2Config", "DebertaV2ForSequenceClassification", _TEXT_FULL),
    Arch("mpnet", "MPNetConfig", "MPNetForSequenceClassification", _TEXT_FULL),
    Arch("xlm-roberta", "XLMRobertaConfig", "XLMRobertaForSequenceClassification", {**_TEXT_FULL, "pad_token_id": 1}),
    Arch(
        "modernbert",
        "ModernBertConfig",
        "ModernBertForSequenceClassification",
        {
            **_TEXT_FULL,
            "num_hidden_layers": 3,
            "global_attn_every_n_layers": 2,
            "local_attention": 4,
            **{f"{t}_token_id": i for i, t in enumerate(("pad", "bos", "eos", "cls", "sep"))},
        },
    ),
    Arch("vit", "ViTConfig", "ViTForImageClassification", _IMAGE, kind="image"),
    Arch("deit", "DeiTConfig", "DeiTForImageClassification", _IMAGE, kind="image"),
    Arch("beit", "BeitConfig", "BeitForImageClassification", _IMAGE, kind="image"),
    Arch(
        "swin",
        "SwinConfig",
        "SwinForImageClassification",
        {
            "image_size": IMAGE,
            "patch_size": 4,
            "embed_dim": 16,
            "depths": [1, 1],
            "num_heads": [2, 2],
            "window_size": 4,
            "num_labels": 3,
        },
        kind="image",
    ),
    Arch(
        "clip-vision",
        "CLIPConfig",
        "CLIPForImageClassification",
        {"vision_config": {k: v for k, v in _IMAGE.items() if k != "num_labels"}, "num_labels": 3},
        kind="image",
    ),
    Arch("dinov2", "Dinov2Config", "Dinov2ForImageClassification", _IMAGE, kind="image"),
    Arch(
        "gpt2",
        "GPT2Config",
        "GPT2LMHeadModel",
        {"vocab_size": 99, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
        kind="causal",
    ),
    Arch("llama", "LlamaConfig", "LlamaForCausalLM", _DECODER, kind="causal"),
    Arch("qwen2", "Qwen2Config", "Qwen2ForCausalLM", _DECODER, kind="causal"),
    Arch(
        "t5",
        "T5Config",
        "T5ForConditionalGeneration",
        {
            "vocab_size": 99,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 2,
            "num_heads": 4,
            "decoder_start_token_id": 0,
        },
        kind="seq2seq",
    ),
]

BY_NAME: dict[str, Arch] = {arch.name: arch for arch in ARCHITECTURES}


def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits (or last hidden state), without gradients."""
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def loss_inputs(arch: Arch, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`inputs` with labels the task class computes a loss from."""
    batch = next(iter(inputs.values())).shape[0]
    if arch.kind in ("causal",):
        return {**inputs, "labels": inputs["input_ids"]}
    if arch.kind == "seq2seq":
        return {**inputs, "labels": inputs["decoder_input_ids"]}
    return {**inputs, "labels": torch.arange(batch) % 2}


def example_inputs(arch: Arch) -> Callable[[], dict[str, torch.Tensor]]:
    """A zero-argument builder of `arch`'s inputs (for parametrized tests)."""
    return lambda: arch.inputs()
