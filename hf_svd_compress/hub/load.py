"""Loading: `load_compressed` (an export, lean or trainable) and `load_factored_checkpoint` (a `save_pretrained` or
`Trainer` checkpoint saved while factored)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import transformers
from huggingface_hub import snapshot_download
from torch import nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.utils import HF_MODULES_CACHE

from hf_svd_compress.config import CONFIG_KEY, SVDConfig
from hf_svd_compress.core.factorize import attach_svd_config
from hf_svd_compress.hub.format import (
    MODELING_FILE,
    WEIGHTS_NAME,
    CompressedFormatError,
    base_config_dict,
    check_dense_ranks,
    check_metadata,
    check_ranks_complete,
    check_tensors,
    modeling_source,
    read_json,
    read_weights,
    tensor_dtype,
    transformers_class,
    verify_checksums,
)
from hf_svd_compress.hub.templates.modeling_svd_compressed import GUARD_KEY, guard_tensors
from hf_svd_compress.layers.base import FactoredLayer, dense_type_of
from hf_svd_compress.layers.conv import SVDConv2d
from hf_svd_compress.layers.svd import SVDLinear


def load_compressed(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    device: torch.device | str | None = None,
    trainable: bool = False,
) -> PreTrainedModel:
    """Load a model written by `save_compressed`: the lean inference form, or `SVDLinear` layers to train further.

    Args:
        path_or_repo_id (`str` or `os.PathLike`): A local folder or a Hub repository id.
        revision, token, cache_dir, local_files_only: Passed to `huggingface_hub.snapshot_download` for a repo id.
        device (`torch.device` or `str`, *optional*): Where to put the model (default: CPU).
        trainable (`bool`, defaults to `False`): Without it, the model of the exported modeling file (what
            `trust_remote_code=True` loads, generated from this package's template, never the folder's copy): each
            factored layer a `LowRankLinear`, two matmuls with `s` folded in, no mask. With it, the base
            architecture with `SVDLinear` layers of the saved ranks, ready for `SVDTrainer`, `prune_` or re-export;
            its config carries `svd_training` like a model factored by `svd_factorize_`.

    Returns:
        The model in eval mode.

    Raises:
        `CompressedFormatError`: missing or unknown `svd_compression` metadata, tensors not matching it (the message
        names the module), or an unreadable weights file (the message names the file).
    """
    folder = _resolve_folder(path_or_repo_id, revision, token, cache_dir, local_files_only)
    config_dict = read_json(folder / "config.json")
    meta = check_metadata(config_dict, folder)
    tensors = read_weights(folder)
    check_tensors(meta, tensors, folder / WEIGHTS_NAME)
    check_ranks_complete(meta, tensors, folder / WEIGHTS_NAME)
    check_dense_ranks(meta, tensors, folder)
    verify_checksums(folder, meta)  # after the checks that name the module or say the file is unreadable
    if trainable:
        model = _trainable_model(meta, config_dict, tensors, folder)
    else:
        model = _inference_model(meta, config_dict, tensors, folder)
    return model.to(device).eval() if device is not None else model.eval()


def _inference_model(
    meta: dict[str, Any], config_dict: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path
) -> PreTrainedModel:
    """The exported modeling file's model (`LowRankLinear` layers), loaded from the checked tensors."""
    module = runtime_module(meta)
    config = module.SVDCompressedConfig.from_dict(config_dict)
    model = module.SVDCompressedModel(config).to(tensor_dtype(tensors))
    low_rank = [n for n in meta["ranks"] if n not in set(meta.get("dense_modules", []))]
    markers = guard_tensors(low_rank, next(iter(tensors.values()))) if low_rank else {}
    _load_strict(model, {k: v for k, v in tensors.items() if k not in markers}, folder)
    return model


def _trainable_model(
    meta: dict[str, Any], config_dict: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path
) -> PreTrainedModel:
    """The base architecture with `SVDLinear` layers (`SVDConv2d` for convs) of the saved ranks."""
    arch = transformers_class(meta["base_architecture"])
    config = transformers_class(meta["base_config_class"]).from_dict(base_config_dict(config_dict, meta))
    model = arch._from_config(config, dtype=tensor_dtype(tensors))
    dense = set(meta.get("dense_modules", []))
    low_rank = {n: int(r) for n, r in meta["ranks"].items() if n not in dense}
    convs = meta.get("convs", {})  # factored nn.Conv2d geometry; absent from files without convs
    dtype = tensor_dtype(tensors)
    for name, rank in low_rank.items():
        module, bias = model.get_submodule(name), f"{name}.up.bias" in tensors
        if name in convs:
            layer = SVDConv2d.from_geometry(convs[name], rank, bias, dtype=dtype)
        else:
            out_features, in_features = meta["shapes"][name]
            layer = SVDLinear(in_features, out_features, rank, bias, dtype=dtype)
        layer.dense_type = dense_type_of(module)
        model.set_submodule(name, layer)
    _load_strict(model, _svd_state_dict(tensors, low_rank, convs), folder)
    for name in dense:  # stored dense: refactor at the saved rank (the weight has that rank)
        module, rank = model.get_submodule(name), int(meta["ranks"][name])
        if name in convs:
            model.set_submodule(name, SVDConv2d.from_conv(module, convs[name]["mode"], max_rank=rank))
        else:
            model.set_submodule(name, SVDLinear.from_linear(module, max_rank=rank))
    svd_config = meta.get("svd_config")
    attach_svd_config(model, SVDConfig.from_dict(svd_config) if svd_config else SVDConfig(sorted(meta["ranks"])))
    return model


def runtime_module(meta: dict[str, Any]) -> ModuleType:
    """The modeling file `save_compressed` writes for `meta`, imported from this package's template.

    The source is written once under `HF_MODULES_CACHE/hf_svd_compress/` (a real file, so `save_pretrained` of the
    model can copy it next to the weights) and imported under a name derived from its hash.
    """
    source = modeling_source(meta)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    name = f"hf_svd_compress_runtime_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(HF_MODULES_CACHE) / "hf_svd_compress" / digest / MODELING_FILE
    if not path.is_file() or path.read_text() != source:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(source)
        os.replace(tmp, path)  # atomic: concurrent processes never import a half-written file
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_factored_checkpoint(path: str | os.PathLike, device: torch.device | str | None = None) -> PreTrainedModel:
    """Rebuild a model saved by `save_pretrained` (or a `Trainer` checkpoint) while factored, masks included.

    The config carries `svd_training = {"config": SVDConfig.to_dict(), "ranks": {name: stored_rank}, "layers":
    {name: checkpoint_record}}`, written by `svd_factorize_` (and `truncate_`); each layer is rebuilt by its class's
    `FactoredLayer.from_state` (any parameterization, CUR included; checkpoints without `layers` are read as SVD
    layers), then the weights load strictly. Use it to prune again (`prune_`) or export (`save_compressed`) without
    training. The model is returned as transformers builds it (training mode).
    """
    folder = Path(path)
    config_dict = read_json(folder / "config.json")
    stored = config_dict.get(CONFIG_KEY)
    if not isinstance(stored, dict) or "ranks" not in stored:
        raise CompressedFormatError(
            f"{folder / 'config.json'} has no `{CONFIG_KEY}` entry: it was not saved while factored. Load a dense "
            "model with AutoModelFor...from_pretrained and factor it with svd_factorize_, or a save_compressed "
            "folder with load_compressed."
        )
    config = transformers.AutoConfig.from_pretrained(folder)
    arch = transformers_class((config.architectures or [""])[0])
    tensors = read_weights(folder)
    model = arch._from_config(config, dtype=tensor_dtype(tensors))
    tensors = _renamed_to_model_keys(model, tensors, list(stored["ranks"]))
    modules = dict(model.named_modules())
    for name in stored["ranks"]:
        if name not in modules or not any(key.startswith(f"{name}.") for key in tensors):
            raise CompressedFormatError(
                f"{folder}: module {name!r} of svd_training is missing from the model or file."
            )
        record = stored.get("layers", {}).get(name) or _legacy_record(name, stored, tensors)
        layer_class = FactoredLayer.classes.get(record.get("class"))
        if layer_class is None:
            raise CompressedFormatError(
                f"{folder}: module {name!r} is a {record.get('class')!r}, which this hf_svd_compress does not know "
                f"(it knows {sorted(FactoredLayer.classes)}); upgrade hf_svd_compress or import the package that "
                "defines it."
            )
        model.set_submodule(name, layer_class.from_state(tensors, f"{name}.", modules[name], record))
    _load_strict(model, tensors, folder)
    model.svd_config = SVDConfig.from_dict(stored["config"])
    return model.to(device) if device is not None else model


def _legacy_record(name: str, stored: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The `checkpoint_record` of a layer in a checkpoint written before `svd_training` listed `layers`."""
    if name in stored.get("convs", {}):
        return {"class": "SVDConv2d", "geometry": stored["convs"][name]}
    if f"{name}.u_factor.reflectors" in tensors or f"{name}.u_factor.cores.0.reflectors" in tensors:
        return {"class": "HouseholderSVDLinear", "tt_max_rank": stored["config"].get("tt_max_rank")}
    return {"class": "SVDLinear", "whitened": name in stored.get("whitened", [])}


def _resolve_folder(path_or_repo_id, revision, token, cache_dir, local_files_only) -> Path:
    if os.path.isdir(path_or_repo_id):
        return Path(path_or_repo_id)
    if os.path.isabs(path_or_repo_id) or str(path_or_repo_id).startswith((".", "~")):
        raise FileNotFoundError(f"{path_or_repo_id} is not a folder (nor a Hub repository id).")
    folder = snapshot_download(
        str(path_or_repo_id),
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"],
    )
    return Path(folder)


def _svd_state_dict(
    tensors: dict[str, torch.Tensor], low_rank: dict[str, int], convs: dict[str, dict] | None = None
) -> dict[str, torch.Tensor]:
    """The file's tensors with each `down`/`up` pair turned into `U`, `s`, `V`, `bias`, `mask` (markers dropped)."""
    prefixes = tuple(n + "." for n in low_rank)
    state = {k: v for k, v in tensors.items() if k != GUARD_KEY and not k.startswith(prefixes)}
    convs = convs or {}
    for name in low_rank:
        down, up = tensors[f"{name}.down.weight"], tensors[f"{name}.up.weight"]
        if name in convs:
            layer = SVDConv2d.from_kernels(down, up, None, convs[name])
        else:
            layer = SVDLinear.from_low_rank_factors(down, up, None)
        state.update({f"{name}.{k}": v for k, v in layer.state_dict().items() if k != "bias"})
        if f"{name}.up.bias" in tensors:
            state[f"{name}.bias"] = tensors[f"{name}.up.bias"]
    return state


def _renamed_to_model_keys(
    model: PreTrainedModel, tensors: dict[str, torch.Tensor], factored: list[str]
) -> dict[str, torch.Tensor]:
    """The checkpoint's keys under the model's module names.

    transformers 5 saves some architectures under legacy names (DINOv2 / ViT `attention.q_proj` is written as
    `attention.attention.query`) and renames them in `from_pretrained`; this applies the same renamings. A renamed
    key is taken when its module exists in `model`, or lies inside a `factored` module (whose sublayers, such as a
    Householder layer's `u_factor`, the dense model does not have).
    """
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    modules = {name for name, _ in model.named_modules()}
    inside = tuple(f"{name}." for name in factored)
    renamed = {}
    for key, value in tensors.items():
        new = key
        for renaming in renamings:
            new = renaming.rename_source_key(new)[0]
        renamed[new if new.rpartition(".")[0] in modules or new.startswith(inside) else key] = value
    return renamed


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """`load_state_dict`, failing on any key missing or unexpected, except the tied copies of loaded weights."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CompressedFormatError(f"The weights in {folder} do not fit {type(model).__name__}: {err}") from err
    params = model.state_dict(keep_vars=True)
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in missing if id(params[k]) not in loaded]
    if missing or unexpected:
        raise CompressedFormatError(
            f"The weights in {folder} do not fit {type(model).__name__}: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}."
        )
