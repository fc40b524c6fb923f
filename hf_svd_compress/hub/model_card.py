"""The `README.md` model card that `save_compressed` writes: what was compressed, how, and what it saved."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from hf_svd_compress.hub.format import auto_classes, transformers_class

# The measured reference (benchmarks/inference.py, docs/benchmarks.md), stated in every card of a factored model.
ONNX_SPEEDUP = (
    "For reference, on the all-MiniLM-L6-v2 shape at 50% of the parameters (sequence 128, one CPU thread), the "
    "compressed graph ran 1.65x (batch 1) and 1.62x (batch 32) as fast as the dense graph in onnxruntime."
)
# Pipeline tag of the Hub widget, by the auto class that loads the architecture.
_PIPELINE_TAGS = {
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForImageClassification": "image-classification",
}


def render_model_card(
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    weight_files: list[Path],
    model: nn.Module,
    dense: bool,
    base_model: str | None,
    training_settings: dict[str, Any] | None,
    name: str,
) -> str:
    """The card's Markdown: YAML header, how to load, size summary, rank table, rank selection, training settings."""
    base_model = base_model or getattr(getattr(model, "config", None), "name_or_path", "") or None
    auto_class = _auto_class(meta["base_model_type"], meta["base_architecture"])
    before, after = _dense_params(meta, tensors), sum(t.numel() for t in tensors.values())
    itemsize = next(iter(tensors.values())).element_size() if tensors else 4
    on_disk = sum(f.stat().st_size for f in weight_files)
    sections = [
        f"---\n{_card_data(base_model, _PIPELINE_TAGS.get(auto_class)).to_yaml()}\n---",
        f"# {name}\n\n{_summary(meta, base_model, dense)}",
        _how_to_load(auto_class, name, dense),
        *([] if dense else [_deployment(name)]),
        "## Size\n\n| | parameters | weights file |\n|---|---:|---:|\n"
        f"| dense base model | {before:,} | {_mb(before * itemsize)} (estimated) |\n"
        f"| this model | {after:,} ({after / max(before, 1):.1%}) | {_mb(on_disk)} |",
        _rank_table(meta),
        "## How the ranks were chosen\n\n" + _json_block(meta.get("rank_selection")),
        "## SVD training configuration\n\n" + _json_block(meta.get("svd_config")),
        "## Training settings\n\n" + _json_block(training_settings),
    ]
    return str(ModelCard("\n\n".join(sections) + "\n"))  # parses the metadata: a malformed header raises here


def _card_data(base_model: str | None, pipeline_tag: str | None) -> ModelCardData:
    # Only a Hub id is valid metadata: a local path would make the Hub reject the card.
    hub_id = base_model and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base_model) and not os.path.exists(base_model)
    return ModelCardData(
        library_name="transformers",
        tags=["hf_svd_compress", "svd", "low-rank"],
        base_model=base_model if hub_id else None,
        pipeline_tag=pipeline_tag,
    )


def _summary(meta: dict[str, Any], base_model: str | None, dense: bool) -> str:
    what = "merged back into dense layers" if dense else "stored as truncated SVD factors"
    source = f" from `{base_model}`" if base_model else ""
    return (
        f"`{meta['base_architecture']}` ({meta['base_model_type']}){source}, compressed by SVD training with "
        f"`hf_svd_compress`: {len(meta['ranks'])} linear layers {what}."
    )


def _how_to_load(auto_class: str | None, name: str, dense: bool) -> str:
    auto_class = auto_class or "AutoModel"
    if dense:
        code = f'from transformers import {auto_class}\n\nmodel = {auto_class}.from_pretrained("{name}")'
    else:
        code = (
            f"from transformers import {auto_class}\n\n"
            f'model = {auto_class}.from_pretrained("{name}", trust_remote_code=True)\n\n'
            "# With hf_svd_compress installed: the same lean model (no remote code runs), or SVDLinear layers\n"
            "# to train or prune further:\n"
            "from hf_svd_compress import load_compressed\n\n"
            f'model = load_compressed("{name}")\n'
            f'model = load_compressed("{name}", trainable=True)'
        )
    return f"## How to load\n\n```python\n{code}\n```"


def _deployment(name: str) -> str:
    return (
        "## Deploy with onnxruntime\n\n"
        "`hf-svd-compress export-onnx FOLDER` (a local copy of this model, e.g. from `huggingface-cli download "
        f"{name} --local-dir FOLDER`) writes `FOLDER/onnx/model.onnx` (dynamic batch and sequence axes, "
        "each factored layer as two MatMuls, onnxruntime's graph optimizations applied) and prints its largest "
        f"difference to PyTorch. {ONNX_SPEEDUP}"
    )


def _rank_table(meta: dict[str, Any]) -> str:
    dense = set(meta.get("dense_modules", []))
    rows = ["| module | shape (out x in) | full rank | kept rank | stored as |", "|---|---|---:|---:|---|"]
    for name, rank in meta["ranks"].items():
        out_features, in_features = meta["shapes"][name]
        stored = "dense" if name in dense else "factors"
        rows.append(f"| `{name}` | {out_features} x {in_features} | {meta['full_ranks'][name]} | {rank} | {stored} |")
    return "## Ranks\n\n" + "\n".join(rows)


def _dense_params(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> int:
    """Parameters of the dense base model: the written tensors with each factored pair counted as a full matrix."""
    total = 0
    for key, tensor in tensors.items():
        module, _, leaf = key.rpartition(".")
        if module.endswith((".down", ".up")) and module.rpartition(".")[0] in meta["ranks"]:
            if leaf == "weight" and module.endswith(".up"):
                out_features, in_features = meta["shapes"][module.rpartition(".")[0]]
                total += out_features * in_features
            elif leaf == "bias":
                total += tensor.numel()
        elif tensor.numel():
            total += tensor.numel()
    return total


def _auto_class(model_type: str, architecture: str) -> str | None:
    names = [n for n in auto_classes(model_type, transformers_class(architecture)) if n != "AutoModel"]
    return next((n for n in names if n in _PIPELINE_TAGS), names[0] if names else None)


def _json_block(value: Any) -> str:
    if not value:
        return "Not recorded."
    return "```json\n" + json.dumps(value, indent=2, sort_keys=True, default=str) + "\n```"


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"
