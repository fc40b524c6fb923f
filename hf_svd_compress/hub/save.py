"""`save_compressed`: write a factored model in the Hub format (truncated factors, remote code, model card), and
`push_compressed_to_hub`, which saves then uploads."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitInfo, HfApi, save_torch_state_dict
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from hf_svd_compress.config import METADATA_KEY
from hf_svd_compress.core.factorize import stored_svd_config
from hf_svd_compress.hub.convert import export_layers
from hf_svd_compress.hub.format import (
    FORMAT_VERSION,
    MODEL_TYPE_PREFIX,
    MODELING_FILE,
    SPEED_BREAK_EVEN,
    WEIGHTS_NAME,
    auto_classes,
    base_class,
    base_config_dict,
    file_checksums,
    modeling_source,
    write_json,
)
from hf_svd_compress.hub.model_card import render_model_card
from hf_svd_compress.hub.push import upload_folder_to_hub
from hf_svd_compress.hub.staging import check_target, staging
from hf_svd_compress.hub.templates.modeling_svd_compressed import guard_tensors
from hf_svd_compress.layers.base import FactoredLayer

logger = logging.getLogger(__name__)

_HUB_KWARGS = {"private", "token", "commit_message", "revision", "create_pr", "api"}


def save_compressed(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    rank_selection: dict[str, Any] | None = None,
    training_settings: dict[str, Any] | None = None,
    processing_class: Any | None = None,
    base_model: str | None = None,
    dense: bool = False,
    speed_break_even: float = SPEED_BREAK_EVEN,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    push_to_hub: bool = False,
    repo_id: str | None = None,
    **hub_kwargs: Any,
) -> Path:
    """Write a factored model in the Hub format (truncated factors, remote code, model card); the model is untouched.

    Args:
        model (`PreTrainedModel`): A transformers model with `SVDLinear` layers (masked values are dropped).
        save_directory (`str` or `os.PathLike`): The folder to write, built in a temporary sibling then moved.
        rank_selection (`dict`, *optional*): How the ranks were chosen, e.g. `{"method": "energy", "energy": 0.95}`.
        training_settings (`dict`, *optional*): Settings that produced the model, shown in the model card.
        processing_class (*optional*): Tokenizer or image processor; its `save_pretrained` writes into the folder.
        base_model (`str`, *optional*): Hub id of the model before compression (default: `config.name_or_path`).
        dense (`bool`, defaults to `False`): Write a plain dense checkpoint of the base architecture instead.
        speed_break_even (`float`, defaults to `SPEED_BREAK_EVEN` = 0.9): In (0, 1]; a layer is stored as factors
            only if they hold fewer than this fraction of its dense weights, `r (m + n) < speed_break_even * m n`,
            else dense (listed in `dense_modules`), since near the parameter break-even the factored layer runs
            slower than the dense one. 1.0 keeps every layer that saves parameters factored.
        overwrite (`bool`, defaults to `False`): Replace a folder that already holds a model (once the new one is
            complete); without it such a folder raises `FileExistsError` before anything is written.
        max_shard_size (`int` or `str`, defaults to `"5GB"`): Larger weights are written as shards plus
            `model.safetensors.index.json` (`huggingface_hub.save_torch_state_dict`).
        push_to_hub (`bool`, defaults to `False`): Then upload the folder with `push_compressed_to_hub`.
        repo_id (`str`, *optional*): Repository to push to (default: the folder name).
        hub_kwargs: `private`, `token`, `commit_message`, `revision`, `create_pr`, `api` of `push_compressed_to_hub`.

    Returns:
        `Path` of the written folder.
    """
    target = Path(save_directory)
    unknown = sorted(set(hub_kwargs) - _HUB_KWARGS)
    if unknown:
        raise TypeError(f"save_compressed got unexpected arguments {unknown}; hub ones: {sorted(_HUB_KWARGS)}.")
    check_target(target, overwrite)
    if not (isinstance(speed_break_even, int | float) and 0 < speed_break_even <= 1):
        raise ValueError(
            f"save_compressed(speed_break_even={speed_break_even!r}): it must be in (0, 1], e.g. 0.9 stores dense "
            "the layers whose factors keep 90% or more of the dense weights; 1.0 only those that save nothing."
        )
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"save_compressed needs a transformers PreTrainedModel, got {type(model).__name__} (merge a peft model "
            "with merge_and_unload() first)."
        )
    layers = export_layers(model)
    if not layers and not dense:
        raise ValueError("The model has no SVDLinear layer: factor it with svd_factorize_ first, or pass dense=True.")
    arch, meta = base_class(type(model)), _metadata(model, layers, rank_selection, speed_break_even)
    tensors = _export_tensors(model, layers, meta, dense)
    with staging(target) as tmp:
        files = _write_weights(tmp, tensors, dense, max_shard_size)
        if not dense:
            meta["checksums"] = file_checksums(tmp, files)
        write_json(tmp / "config.json", _export_config(model, arch, None if dense else meta))
        if not dense:
            (tmp / MODELING_FILE).write_text(modeling_source(meta))
        if model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if processing_class is not None:
            processing_class.save_pretrained(tmp)
        card = render_model_card(
            meta,
            tensors,
            [tmp / f for f in files],
            model,
            dense,
            base_model,
            training_settings,
            repo_id or target.name,
        )
        (tmp / "README.md").write_text(card)
    logger.info("Wrote %s (%d factored layers, dense=%s).", target, len(layers), dense)
    if push_to_hub:
        push_compressed_to_hub(target, repo_id or target.name, **hub_kwargs)
    return target


def _metadata(
    model: PreTrainedModel, layers: dict[str, FactoredLayer], rank_selection: dict | None, speed_break_even: float
) -> dict[str, Any]:
    config_cls, arch = base_class(type(model.config)), base_class(type(model))
    dense = [n for n, layer in layers.items() if not _faster_factored(layer, speed_break_even)]
    slower = [n for n in dense if _faster_factored(layers[n], 1.0)]
    if slower:
        logger.info("%d layer(s) would run slower factored than dense and are stored dense: %s", len(slower), slower)
    return {
        "format_version": FORMAT_VERSION,
        "ranks": {n: layer.rank for n, layer in layers.items()},
        "dense_modules": dense,
        "speed_break_even": speed_break_even,
        "full_ranks": {n: min(layer.out_features, layer.in_features) for n, layer in layers.items()},
        "shapes": {n: [layer.out_features, layer.in_features] for n, layer in layers.items()},
        "rank_selection": rank_selection,
        "base_model_type": config_cls.model_type,
        "base_architecture": arch.__name__,
        "base_config_class": config_cls.__name__,
        "base_model_class": base_class(type(model.base_model)).__name__,
        "svd_config": stored_svd_config(model).to_dict() if layers else None,
        **_layer_metadata(layers),
    }


def _layer_metadata(layers: dict[str, FactoredLayer]) -> dict[str, Any]:
    """The layers' own metadata entries (`export_metadata`, e.g. `convs`), merged; absent when none has any."""
    merged: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        for key, entries in layer.export_metadata(name).items():
            merged.setdefault(key, {}).update(entries)
    return merged


def _faster_factored(layer: FactoredLayer, speed_break_even: float) -> bool:
    """Whether the live rank keeps fewer than `speed_break_even` of the dense weights (see `SPEED_BREAK_EVEN`)."""
    m, n = layer.out_features, layer.in_features
    return layer.rank * (m + n) < speed_break_even * m * n


@torch.no_grad()
def _export_tensors(
    model: PreTrainedModel, layers: dict[str, FactoredLayer], meta: dict, dense: bool
) -> dict[str, torch.Tensor]:
    """The tensors to write: the model's own state minus the factored modules, plus their exported form."""
    prefixes = tuple(n + "." for n in layers)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    state = remove_tied_weights_from_state_dict(state, model)
    for name, layer in layers.items():
        state.update(layer.export_tensors(name, dense or name in meta["dense_modules"]))
    return state


def _write_weights(
    folder: Path, tensors: dict[str, torch.Tensor], dense: bool, max_shard_size: int | str
) -> list[str]:
    """Write the tensors as `model.safetensors`, or shards and their index past `max_shard_size` (as transformers
    does, which `load_compressed` and the remote code read back); returns the weight files written."""
    tensors = {k: v.detach() for k, v in tensors.items()}
    metadata = {"format": "pt"}
    low_rank = sorted(k.removesuffix(".down.weight") for k in tensors if k.endswith(".down.weight"))
    if not dense and low_rank:
        # A plain `BaseClass.from_pretrained(path)` (which never reads our config) fails on the zero-size weight
        # instead of silently random-initializing, and lists GUARD_KEY, which says how to load.
        tensors.update(guard_tensors(low_rank, tensors[f"{low_rank[0]}.down.weight"]))
        metadata[METADATA_KEY] = "Load with trust_remote_code=True or hf_svd_compress.load_compressed."
    save_torch_state_dict(tensors, folder, max_shard_size=max_shard_size, metadata=metadata)
    return sorted(p.name for p in folder.glob("*.safetensors"))


def _export_config(model: PreTrainedModel, arch: type, meta: dict | None) -> dict[str, Any]:
    config_cls = base_class(type(model.config))
    config = base_config_dict(model.config.to_dict(), {"base_model_type": config_cls.model_type})
    config.update(architectures=[arch.__name__], dtype=str(model.dtype).removeprefix("torch."))
    if meta is None:
        return config
    module = MODELING_FILE.removesuffix(".py")
    auto_map = {"AutoConfig": f"{module}.SVDCompressedConfig", "AutoModel": f"{module}.SVDCompressedBaseModel"}
    auto_map.update({auto: f"{module}.SVDCompressedModel" for auto in auto_classes(config_cls.model_type, arch)})
    config.update(
        model_type=MODEL_TYPE_PREFIX + config_cls.model_type,
        architectures=["SVDCompressedModel"],
        auto_map=auto_map,
        **{METADATA_KEY: meta},
    )
    return config


def export_file_names(processing_class: Any | None = None) -> list[str]:
    """The names of the files `save_compressed` writes into a folder (with this tokenizer or image processor)."""
    names = {WEIGHTS_NAME, "config.json", MODELING_FILE, "README.md", "generation_config.json"}
    if processing_class is not None:
        with tempfile.TemporaryDirectory() as scratch:
            processing_class.save_pretrained(scratch)
            names.update(p.name for p in Path(scratch).iterdir())
    return sorted(names)


def push_compressed_to_hub(
    folder_or_model: str | os.PathLike | nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    api: HfApi | None = None,
    **save_kwargs: Any,
) -> CommitInfo:
    """Upload a `save_compressed` folder, or save a model to a temporary folder and upload that.

    Args:
        folder_or_model (`str`, `os.PathLike` or `PreTrainedModel`): A folder written by `save_compressed`, or a model.
        repo_id (`str`): The Hub repository, e.g. `"user/bert-svd"`; created if missing (`exist_ok=True`).
        private (`bool`, *optional*): Visibility of a newly created repository (default: the account's default).
        token (`str` or `bool`, *optional*): Hub token; `None` lets huggingface_hub find it (`HF_TOKEN`, login).
        commit_message (`str`, *optional*): The commit message.
        revision (`str`, *optional*): Branch to commit to, created if missing.
        create_pr (`bool`, defaults to `False`): Open a pull request instead of committing to the branch.
        api (`HfApi`, *optional*): The client to use (tests pass a fake one).
        save_kwargs: Passed to `save_compressed` when a model is given (e.g. `rank_selection`, `processing_class`).

    Returns:
        The `CommitInfo` of the upload.
    """
    hub = {"private": private, "token": token, "commit_message": commit_message, "revision": revision}
    hub.update(create_pr=create_pr, api=api)
    if isinstance(folder_or_model, nn.Module):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / repo_id.rpartition("/")[2]
            save_compressed(folder_or_model, folder, repo_id=repo_id, **save_kwargs)
            return upload_folder_to_hub(folder, repo_id, **hub)
    if save_kwargs:
        raise TypeError(f"Arguments {sorted(save_kwargs)} apply only when pushing a model, not a folder.")
    return upload_folder_to_hub(folder_or_model, repo_id, **hub)
