"""Conversions between forms: merge to dense, the peft bridge (`LowRankLinear` layers and back), and the SVD view of
every factored or exported layer that export writes."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from hf_svd_compress.config import CONFIG_KEY
from hf_svd_compress.core.factorize import attach_svd_config, stored_svd_config
from hf_svd_compress.hub.format import base_class, base_config_dict
from hf_svd_compress.layers.base import FactoredLayer, dense_type_of, factored_modules
from hf_svd_compress.layers.conv import SVDConv2d
from hf_svd_compress.layers.svd import SVDLinear

# The exported two-factor classes (ours from the template, or the remote code's copy, matched by name since that
# one lives in a module transformers generates), and the SVD layer each turns back into.
_LOW_RANK_FORMS: dict[str, type[SVDLinear]] = {"LowRankLinear": SVDLinear, "LowRankConv2d": SVDConv2d}


@torch.no_grad()
def merge_to_dense_(model: nn.Module) -> nn.Module:
    """Merge every factored layer back into its original dense type (`FactoredLayer.to_dense`), in place.

    Masked singular values are dropped. Removes `config.svd_training` and `model.svd_config`, so `save_pretrained`
    then writes a plain checkpoint of the base architecture. Returns the model.
    """
    for name, layer in factored_modules(model).items():
        model.set_submodule(name, layer.to_dense())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    if hasattr(model, "svd_config"):
        del model.svd_config
    return model


def svd_to_lowrank_(model: nn.Module) -> nn.Module:
    """Swap every factored layer for its exported form (`LowRankLinear`, `up(down(x))`), in place; returns the model.

    peft has no LoRA layer for `SVDLinear`; on `LowRankLinear`, `LoraConfig(target_modules=["down", "up"])` works
    (a conv becomes a `LowRankConv2d`, whose `down` / `up` are `nn.Conv2d`). After `merge_and_unload()`,
    `lowrank_to_svd_` turns the merged layers back into `SVDLinear`.
    """
    for name, layer in factored_modules(model).items():
        model.set_submodule(name, layer.to_low_rank())
    return model


def lowrank_to_svd_(model: nn.Module) -> nn.Module:
    """Swap every `LowRankLinear` (ours or remote code's) for an `SVDLinear` with orthonormal `U`, `V`, in place.

    Exact up to float error, also after LoRA merged into `down`/`up`; records `svd_training` on the config so
    `SVDTrainer` and `save_compressed` accept the model. Returns the model.
    """
    converted = low_rank_layers(model)
    for name, layer in converted.items():
        model.set_submodule(name, layer)
    if converted:
        attach_svd_config(model, stored_svd_config(model))
    return model


def export_layers(model: nn.Module) -> dict[str, FactoredLayer]:
    """What export writes: each factored layer's `svd_form()`, and each `LowRankLinear` (remote code, peft-merged)
    as a new `SVDLinear` (`SVDConv2d` for a `LowRankConv2d`), in model order."""
    low_rank = low_rank_layers(model)
    return {
        name: low_rank[name] if name in low_rank else module.svd_form()
        for name, module in model.named_modules()
        if name in low_rank or isinstance(module, FactoredLayer)
    }


def low_rank_layers(model: nn.Module) -> dict[str, SVDLinear]:
    """The model's exported two-factor layers as SVD layers (orthonormal factors), remembering their dense type."""
    names = [name for name, module in model.named_modules() if _low_rank_form(module) is not None]
    types = _original_types(model, names)
    layers = {}
    for name in names:
        module = model.get_submodule(name)
        layers[name] = _low_rank_form(module).from_low_rank(module, orthonormal=True)
        layers[name].dense_type = types[name]
    return layers


def _low_rank_form(module: nn.Module) -> type[SVDLinear] | None:
    form = _LOW_RANK_FORMS.get(type(module).__name__)
    return form if form is not None and hasattr(module, "down") and hasattr(module, "up") else None


def _original_types(model: nn.Module, names: list[str]) -> dict[str, type[nn.Module]]:
    """The dense type each module `names` had (Linear, `Conv1D`, Conv2d), from a meta-device copy of the base
    architecture: an exported layer does not remember it."""
    if not names or not isinstance(model, PreTrainedModel):
        return {n: _low_rank_form(model.get_submodule(n)).dense_type for n in names}
    config_cls = base_class(type(model.config))
    config_dict = base_config_dict(model.config.to_dict(), {"base_model_type": config_cls.model_type})
    with torch.device("meta"):
        skeleton = base_class(type(model))(config_cls.from_dict(config_dict))
    return {n: dense_type_of(skeleton.get_submodule(n)) for n in names}
