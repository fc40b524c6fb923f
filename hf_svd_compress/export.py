"""The Hub format of a compressed model: `save_compressed`, `load_compressed`, dense merge and factored checkpoints.

On disk (format version 1), a factored module `name` of rank `r` is two linear layers, `{name}.down.weight =
(V diag(s))^T` [r, in] and `{name}.up.weight = U` [out, r] with `{name}.up.bias` the bias; a module whose rank saves
no parameters keeps its dense `{name}.weight` (Conv1D layout for GPT-2 style layers). `config.json` is the base
config with its own `model_type`, an `auto_map` to the generated modeling file, and the `svd_compression` metadata.
A factored `nn.Conv2d` is two conv kernels instead (`SVDConv2d.factored_kernels`, dense: the conv's own `weight`),
its geometry in `svd_compression["convs"]` (an optional entry: files without convs lack it).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import transformers
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import remove_tied_weights_from_state_dict
from transformers.models.auto import modeling_auto
from transformers.pytorch_utils import Conv1D
from transformers.utils import HF_MODULES_CACHE

from .config import SVDConfig
from .conv import GEOMETRY_KEYS, SVDConv2d, conv_tensor_shapes
from .cur import CUR_TYPES, cur_layers
from .factorize import CONFIG_KEY, _record_on_config, _replace, svd_layers
from .householder import HouseholderSVDLinear
from .hub import push_compressed_to_hub
from .layers import SVDLinear, dense_weight
from .model_card import render_model_card
from .pruning import BREAK_EVEN
from .templates.modeling_svd_compressed import (
    GUARD_KEY,
    LowRankLinear,
    checksum_problem,
    dense_rank_problem,
    file_sha256,
    guard_tensors,
    unlisted_factors_problem,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CompressedFormatError",
    "load_compressed",
    "load_factored_checkpoint",
    "lowrank_to_svd_",
    "merge_to_dense_",
    "push_compressed_to_hub",
    "save_compressed",
    "svd_to_lowrank_",
]

FORMAT_VERSION = 1
METADATA_KEY = "svd_compression"
MODEL_TYPE_PREFIX = "svd_compressed_"
WEIGHTS_NAME = "model.safetensors"
MODELING_FILE = "modeling_svd_compressed.py"
_MODEL_FILE_PATTERNS = ("config.json", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.gguf", "*.onnx")
_HUB_KWARGS = {"private", "token", "commit_message", "revision", "create_pr", "api"}
_REQUIRED_METADATA = ("ranks", "shapes", "base_architecture", "base_config_class", "base_model_type")
# A layer stays dense unless its factors hold fewer than `BREAK_EVEN` (0.9) of its dense weights: the one rule that
# pruning, export, report and model card share (see `pruning.BREAK_EVEN` for the measurement).
SPEED_BREAK_EVEN = BREAK_EVEN


class CompressedFormatError(ValueError):
    """A folder that is not a loadable compressed model: metadata missing, unknown or not matching the tensors."""


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
    _check_target(target, overwrite)
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
    layers = factored_layers(model)
    if not layers and not dense:
        raise ValueError("The model has no SVDLinear layer: factor it with svd_factorize_ first, or pass dense=True.")
    arch, meta = _base_class(type(model)), _metadata(model, layers, rank_selection, speed_break_even)
    types = _original_types(model, list(layers))
    tensors = _export_tensors(model, layers, meta, types, dense)
    with _staging(target) as tmp:
        _write_weights(tmp / WEIGHTS_NAME, tensors, dense)
        if not dense:
            meta["checksums"] = file_checksums(tmp, [WEIGHTS_NAME])
        _write_json(tmp / "config.json", _export_config(model, arch, None if dense else meta))
        if not dense:
            (tmp / MODELING_FILE).write_text(_modeling_source(meta))
        if model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if processing_class is not None:
            processing_class.save_pretrained(tmp)
        card = render_model_card(
            meta, tensors, tmp / WEIGHTS_NAME, model, dense, base_model, training_settings, repo_id or target.name
        )
        (tmp / "README.md").write_text(card)
    logger.info("Wrote %s (%d factored layers, dense=%s).", target, len(layers), dense)
    if push_to_hub:
        push_compressed_to_hub(target, repo_id or target.name, **hub_kwargs)
    return target


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
    config_dict = _read_json(folder / "config.json")
    meta = _check_metadata(config_dict, folder)
    tensors = _read_weights(folder)
    _check_tensors(meta, tensors, folder / WEIGHTS_NAME)
    _check_ranks_complete(meta, tensors, folder / WEIGHTS_NAME)
    _check_dense_ranks(meta, tensors, folder)
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
    model = module.SVDCompressedModel(config).to(_tensor_dtype(tensors))
    low_rank = [n for n in meta["ranks"] if n not in set(meta.get("dense_modules", []))]
    markers = guard_tensors(low_rank, next(iter(tensors.values()))) if low_rank else {}
    _load_strict(model, {k: v for k, v in tensors.items() if k not in markers}, folder)
    return model


def _trainable_model(
    meta: dict[str, Any], config_dict: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path
) -> PreTrainedModel:
    """The base architecture with `SVDLinear` layers (`SVDConv2d` for convs) of the saved ranks."""
    arch = _transformers_class(meta["base_architecture"])
    config = _transformers_class(meta["base_config_class"]).from_dict(_base_config_dict(config_dict, meta))
    model = arch._from_config(config, dtype=_tensor_dtype(tensors))
    dense = set(meta.get("dense_modules", []))
    low_rank = {n: int(r) for n, r in meta["ranks"].items() if n not in dense}
    convs = meta.get("convs", {})  # factored nn.Conv2d geometry; absent from files without convs
    for name, rank in low_rank.items():
        out_features, in_features = meta["shapes"][name]
        bias, dtype = f"{name}.up.bias" in tensors, _tensor_dtype(tensors)
        if name in convs:
            _replace(model, name, SVDConv2d.from_geometry(convs[name], rank, bias, dtype=dtype))
        else:
            _replace(model, name, SVDLinear(in_features, out_features, rank, bias, dtype=dtype))
    _load_strict(model, _svd_state_dict(tensors, low_rank, convs), folder)
    for name in dense:  # stored dense: refactor at the saved rank (the weight has that rank)
        module, rank = model.get_submodule(name), int(meta["ranks"][name])
        if name in convs:
            _replace(model, name, SVDConv2d.from_conv(module, convs[name]["mode"], max_rank=rank))
        else:
            _replace(model, name, SVDLinear.from_linear(module, max_rank=rank))
    svd_config = meta.get("svd_config")
    _attach_svd_config(model, SVDConfig.from_dict(svd_config) if svd_config else SVDConfig(sorted(meta["ranks"])))
    return model


def runtime_module(meta: dict[str, Any]) -> ModuleType:
    """The modeling file `save_compressed` writes for `meta`, imported from this package's template.

    The source is written once under `HF_MODULES_CACHE/hf_svd_compress/` (a real file, so `save_pretrained` of the
    model can copy it next to the weights) and imported under a name derived from its hash.
    """
    source = _modeling_source(meta)
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

    The config carries `svd_training = {"config": SVDConfig.to_dict(), "ranks": {name: stored_rank}}`, written by
    `svd_factorize_`; the weights hold each module's `U`, `s`, `V`, `bias` and `mask`. Use it to prune again
    (`prune_`) or export (`save_compressed`) without training.
    """
    folder = Path(path)
    config_dict = _read_json(folder / "config.json")
    stored = config_dict.get(CONFIG_KEY)
    if not isinstance(stored, dict) or "ranks" not in stored:
        raise CompressedFormatError(
            f"{folder / 'config.json'} has no `{CONFIG_KEY}` entry: it was not saved while factored. Load a dense "
            "model with AutoModelFor...from_pretrained and factor it with svd_factorize_, or a save_compressed "
            "folder with load_compressed."
        )
    config = transformers.AutoConfig.from_pretrained(folder)
    arch = _transformers_class((config.architectures or [""])[0])
    tensors = _read_weights(folder)
    model = arch._from_config(config, dtype=_tensor_dtype(tensors))
    tensors = _renamed_to_model_keys(model, tensors)
    modules = dict(model.named_modules())
    for name in stored["ranks"]:
        if name not in modules or f"{name}.s" not in tensors:
            raise CompressedFormatError(
                f"{folder}: module {name!r} of svd_training is missing from the model or file."
            )
        rank = tensors[f"{name}.s"].shape[0]  # the file's, in case the layer was truncated after factoring
        bias, geometry = modules[name].bias is not None, stored.get("convs", {}).get(name)
        if geometry is not None:
            layer = SVDConv2d.from_geometry(geometry, rank, bias, dtype=model.dtype)
        else:
            out_features, in_features = dense_weight(modules[name]).shape
            if f"{name}.u_factor.reflectors" in tensors or f"{name}.u_factor.cores.0.reflectors" in tensors:
                cap = stored["config"].get("tt_max_rank")  # Householder / STTP: shapes read off the stored tensors
                layer = HouseholderSVDLinear.from_state_shapes(
                    tensors, f"{name}.", in_features, out_features, bias, cap, dtype=model.dtype
                )
            else:
                layer = SVDLinear(in_features, out_features, rank, bias, dtype=model.dtype)
                if f"{name}.input_scale" in tensors:  # a data-aware layer: its buffer is filled by the load below
                    layer.input_scale = torch.empty(in_features, dtype=model.dtype)
        _replace(model, name, layer)
    _load_strict(model, tensors, folder)
    for name in stored.get("whitened", []):
        model.get_submodule(name).whitened = True
    model.svd_config = SVDConfig.from_dict(stored["config"])
    return model.to(device) if device is not None else model


@torch.no_grad()
def merge_to_dense_(model: nn.Module) -> nn.Module:
    """Merge every factored layer (`SVDLinear`, `SVDConv2d`, CUR) back into its original dense type, in place.

    Masked singular values are dropped. Removes `config.svd_training` and `model.svd_config`, so `save_pretrained`
    then writes a plain checkpoint of the base architecture. Returns the model.
    """
    layers = {**svd_layers(model), **cur_layers(model)}
    types = _original_types(model, list(layers))
    for name, layer in layers.items():
        _replace(model, name, _dense_layer(layer, types[name]))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    if hasattr(model, "svd_config"):
        del model.svd_config
    return model


def svd_to_lowrank_(model: nn.Module) -> nn.Module:
    """Swap every `SVDLinear` for a `LowRankLinear` (`up(down(x))`, the exported layout), in place; returns the model.

    peft has no LoRA layer for `SVDLinear`; on `LowRankLinear`, `LoraConfig(target_modules=["down", "up"])` works.
    After `merge_and_unload()`, `lowrank_to_svd_` turns the merged layers back into `SVDLinear`.
    """
    for name, layer in svd_layers(model).items():
        if isinstance(layer, SVDConv2d):  # a LowRankConv2d: peft's LoRA wraps its down/up nn.Conv2d
            _replace(model, name, layer.to_low_rank())
            continue
        U, s, V = (t.detach().to(_work_dtype(t)) for t in layer.live_factors())
        low_rank = LowRankLinear(layer.in_features, layer.out_features, s.shape[0], layer.bias is not None)
        low_rank.to(device=layer.s.device, dtype=layer.s.dtype)
        low_rank.down.weight.data.copy_((V * s).T)
        low_rank.up.weight.data.copy_(U)
        if layer.bias is not None:
            low_rank.up.bias.data.copy_(layer.bias)
        _replace(model, name, low_rank)
    return model


def lowrank_to_svd_(model: nn.Module) -> nn.Module:
    """Swap every `LowRankLinear` (ours or remote code's) for an `SVDLinear` with orthonormal `U`, `V`, in place.

    Exact up to float error, also after LoRA merged into `down`/`up`; records `svd_training` on the config so
    `SVDTrainer` and `save_compressed` accept the model. Returns the model.
    """
    converted = [name for name, module in model.named_modules() if _is_low_rank(module) or _is_low_rank_conv(module)]
    for name, layer in factored_layers(model).items():
        if name in converted:
            _replace(model, name, layer)
    if converted:
        _attach_svd_config(model, _stored_svd_config(model))
    return model


def factored_layers(model: nn.Module) -> dict[str, SVDLinear]:
    """The model's `SVDLinear`s, plus its `LowRankLinear`s (remote code, peft-merged) and CUR layers as new ones.

    A CUR layer keeps its layout: `up = C`, `down = U R` (`svd_from_low_rank` without re-orthonormalizing).
    """
    layers: dict[str, SVDLinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, SVDLinear):
            layers[name] = module
        elif isinstance(module, CUR_TYPES):
            layers[name] = svd_from_low_rank(*module.low_rank_factors(), module.bias)
        elif _is_low_rank(module):
            layers[name] = svd_from_low_rank(module.down.weight, module.up.weight, module.up.bias, orthonormal=True)
        elif _is_low_rank_conv(module):
            layers[name] = SVDConv2d.from_low_rank(module, orthonormal=True)
    return layers


def svd_from_low_rank(
    down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, orthonormal: bool = False
) -> SVDLinear:
    """An `SVDLinear` computing `up @ down` (+ bias) at rank `r`, from `down` [r, in] and `up` [out, r].

    Without `orthonormal`, the exported layout is inverted as saved (`U = up`, `s` = row norms of `down`); with it,
    a QR of each factor and an r x r SVD give orthonormal `U`, `V` (needed after LoRA merged into the factors).
    """
    work = torch.float64 if down.dtype == torch.float64 else torch.float32
    d, u = down.detach().to(work), up.detach().to(work)
    if orthonormal:
        q_u, r_u = torch.linalg.qr(u)
        q_d, r_d = torch.linalg.qr(d.T)
        small_u, s, small_vh = torch.linalg.svd(r_u @ r_d.T)
        U, V = q_u @ small_u, q_d @ small_vh.T
    else:
        s = d.norm(dim=1)
        U, V = u, (d / torch.where(s > 0, s, torch.ones_like(s))[:, None]).T
    layer = SVDLinear(d.shape[1], u.shape[0], s.shape[0], bias is not None, device=down.device, dtype=down.dtype)
    for param, value in ((layer.U, U), (layer.s, s), (layer.V, V), (layer.bias, bias)):
        if param is not None:
            param.data.copy_(value)
    return layer


def _is_low_rank_conv(module: nn.Module) -> bool:
    return type(module).__name__ == "LowRankConv2d" and hasattr(module, "down") and hasattr(module, "up")


def _is_low_rank(module: nn.Module) -> bool:
    # Duck-typed: the remote-code class lives in a module transformers generates, not in this package.
    return type(module).__name__ == "LowRankLinear" and hasattr(module, "down") and hasattr(module, "up")


def _stored_svd_config(model: nn.Module) -> SVDConfig:
    """The model's `SVDConfig`: attached, in the config (factored or exported), else one targeting its layers."""
    if getattr(model, "svd_config", None) is not None:
        return model.svd_config
    config = getattr(model, "config", None)
    stored = (getattr(config, CONFIG_KEY, None) or {}).get("config") or (
        getattr(config, METADATA_KEY, None) or {}
    ).get("svd_config")
    return SVDConfig.from_dict(stored) if stored else SVDConfig(sorted(svd_layers(model)))


def _attach_svd_config(model: nn.Module, config: SVDConfig) -> None:
    model.svd_config = config
    _record_on_config(model, config)


# ---- export -------------------------------------------------------------------------------------------------------


def _metadata(
    model: PreTrainedModel, layers: dict[str, SVDLinear], rank_selection: dict | None, speed_break_even: float
) -> dict[str, Any]:
    config_cls, arch = _base_class(type(model.config)), _base_class(type(model))
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
        "base_model_class": _base_class(type(model.base_model)).__name__,
        "svd_config": _stored_svd_config(model).to_dict() if layers else None,
        **_conv_metadata(layers),
    }


def _conv_metadata(layers: dict[str, SVDLinear]) -> dict[str, Any]:
    """`{"convs": {name: geometry}}` for the factored convs (nothing when there are none: files stay as before)."""
    convs = {n: layer.geometry() for n, layer in layers.items() if isinstance(layer, SVDConv2d)}
    return {"convs": convs} if convs else {}


def _faster_factored(layer: SVDLinear, speed_break_even: float) -> bool:
    """Whether the live rank keeps fewer than `speed_break_even` of the dense weights (see `SPEED_BREAK_EVEN`)."""
    m, n = layer.out_features, layer.in_features
    return layer.rank * (m + n) < speed_break_even * m * n


@torch.no_grad()
def _export_tensors(
    model: PreTrainedModel, layers: dict[str, SVDLinear], meta: dict, types: dict[str, type], dense: bool
) -> dict[str, torch.Tensor]:
    """The tensors to write: the model's own state minus the factored modules, plus their exported form."""
    prefixes = tuple(n + "." for n in layers)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    state = remove_tied_weights_from_state_dict(state, model)
    for name, layer in layers.items():
        if isinstance(layer, SVDConv2d):
            state.update(_conv_tensors(name, layer, dense or name in meta["dense_modules"]))
            continue
        U, s, V = (t.detach().to(_work_dtype(t)) for t in layer.live_factors())
        bias = None if layer.bias is None else layer.bias.detach().clone()
        if dense or name in meta["dense_modules"]:
            weight = ((U * s) @ V.T).to(layer.s.dtype)
            state[f"{name}.weight"] = weight.T.contiguous() if types[name] is Conv1D else weight
            prefix = f"{name}."
        else:
            state[f"{name}.down.weight"] = (V * s).T.contiguous().to(layer.s.dtype)
            state[f"{name}.up.weight"] = U.contiguous().to(layer.s.dtype)
            prefix = f"{name}.up."
        if bias is not None:
            state[prefix + "bias"] = bias
    return state


def _conv_tensors(name: str, layer: SVDConv2d, dense: bool) -> dict[str, torch.Tensor]:
    """A factored conv as two conv kernels `{name}.down.weight`, `{name}.up.weight` (+ `up.bias`), or dense."""
    if dense:
        tensors, prefix = {f"{name}.weight": layer.merged_kernel()}, f"{name}."
    else:
        down, up = layer.factored_kernels()
        tensors, prefix = {f"{name}.down.weight": down, f"{name}.up.weight": up}, f"{name}.up."
    if layer.bias is not None:
        tensors[prefix + "bias"] = layer.bias.detach().clone()
    return tensors


def _write_weights(path: Path, tensors: dict[str, torch.Tensor], dense: bool) -> None:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt"}
    low_rank = sorted(k.removesuffix(".down.weight") for k in tensors if k.endswith(".down.weight"))
    if not dense and low_rank:
        # A plain `BaseClass.from_pretrained(path)` (which never reads our config) fails on the zero-size weight
        # instead of silently random-initializing, and lists GUARD_KEY, which says how to load.
        tensors.update(guard_tensors(low_rank, tensors[f"{low_rank[0]}.down.weight"]))
        metadata[METADATA_KEY] = "Load with trust_remote_code=True or hf_svd_compress.load_compressed."
    save_file(tensors, path, metadata=metadata)


def _export_config(model: PreTrainedModel, arch: type, meta: dict | None) -> dict[str, Any]:
    config_cls = _base_class(type(model.config))
    config = _base_config_dict(model.config.to_dict(), {"base_model_type": config_cls.model_type})
    config.update(architectures=[arch.__name__], dtype=str(model.dtype).removeprefix("torch."))
    if meta is None:
        return config
    module = MODELING_FILE.removesuffix(".py")
    auto_map = {"AutoConfig": f"{module}.SVDCompressedConfig", "AutoModel": f"{module}.SVDCompressedBaseModel"}
    auto_map.update({auto: f"{module}.SVDCompressedModel" for auto in _auto_classes(config_cls.model_type, arch)})
    config.update(
        model_type=MODEL_TYPE_PREFIX + config_cls.model_type,
        architectures=["SVDCompressedModel"],
        auto_map=auto_map,
        **{METADATA_KEY: meta},
    )
    return config


def _modeling_source(meta: dict[str, Any]) -> str:
    source = (resources.files(__package__) / "templates" / MODELING_FILE).read_text()
    constants = {
        "BASE_CONFIG_CLASS": meta["base_config_class"],
        "BASE_MODEL_CLASS": meta["base_model_class"],
        "TASK_MODEL_CLASS": meta["base_architecture"],
        "MODEL_TYPE": MODEL_TYPE_PREFIX + meta["base_model_type"],
    }
    for key, value in constants.items():
        source, count = re.subn(rf'^{key} = ".*"$', f'{key} = "{value}"', source, flags=re.MULTILINE)
        if count != 1:
            raise RuntimeError(f"The modeling template has no `{key} = ...` line to fill in.")
    return source


@functools.cache
def _auto_classes(model_type: str, arch: type) -> tuple[str, ...]:
    """The transformers auto classes (`AutoModelFor...`) whose mapping sends `model_type` to `arch`."""
    names = []
    for attr, auto_class in sorted(vars(modeling_auto).items()):
        mapping = getattr(auto_class, "_model_mapping", None) if attr.startswith("AutoModel") else None
        value = getattr(mapping, "_model_mapping", {}).get(model_type)
        if arch.__name__ in (value if isinstance(value, list | tuple) else [value]):
            names.append(attr)
    return tuple(names)


def _original_types(model: nn.Module, names: list[str]) -> dict[str, type]:
    """Whether each factored module was an `nn.Linear` or a `Conv1D`, from a meta-device copy of the architecture."""
    if not names or not isinstance(model, PreTrainedModel):
        return dict.fromkeys(names, nn.Linear)
    config_cls = _base_class(type(model.config))
    config_dict = _base_config_dict(model.config.to_dict(), {"base_model_type": config_cls.model_type})
    with torch.device("meta"):
        skeleton = _base_class(type(model))(config_cls.from_dict(config_dict))
    return {n: Conv1D if isinstance(skeleton.get_submodule(n), Conv1D) else nn.Linear for n in names}


def _dense_layer(layer: SVDLinear, layer_type: type) -> nn.Module:
    if isinstance(layer, SVDConv2d):
        return layer.to_conv()
    linear = layer.to_linear()
    if layer_type is not Conv1D:
        return linear
    conv = Conv1D(layer.out_features, layer.in_features).to(device=linear.weight.device, dtype=linear.weight.dtype)
    conv.weight.data.copy_(linear.weight.T)
    conv.bias.data.copy_(linear.bias if linear.bias is not None else torch.zeros_like(conv.bias))
    return conv


def _base_config_dict(config_dict: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """A saved config as the base architecture's: without our keys and with the base `model_type`."""
    skip = {"auto_map", METADATA_KEY, CONFIG_KEY, "_name_or_path"}
    return {**{k: v for k, v in config_dict.items() if k not in skip}, "model_type": meta["base_model_type"]}


def _base_class(cls: type) -> type:
    """The first class of `cls`'s MRO that transformers exports (our and remote-code subclasses resolve to it)."""
    for base in cls.__mro__:
        if getattr(transformers, base.__name__, None) is base:
            if base.__name__ in ("PreTrainedModel", "PreTrainedConfig", "PretrainedConfig"):
                break
            return base
    raise TypeError(f"{cls.__name__} is not built on a transformers architecture; save_compressed cannot export it.")


def _transformers_class(name: str) -> type:
    cls = getattr(transformers, name, None) if name else None
    if not isinstance(cls, type):
        raise CompressedFormatError(f"transformers {transformers.__version__} has no class {name!r} to rebuild.")
    return cls


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---- loading ------------------------------------------------------------------------------------------------------


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


def _check_metadata(config_dict: dict[str, Any], folder: Path) -> dict[str, Any]:
    meta = config_dict.get(METADATA_KEY)
    if not isinstance(meta, dict):
        hint = " It was saved while factored: use load_factored_checkpoint." if CONFIG_KEY in config_dict else ""
        raise CompressedFormatError(
            f"{folder / 'config.json'} has no `{METADATA_KEY}` metadata: not a compressed model (a dense model loads "
            f"with AutoModelFor...from_pretrained).{hint}"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CompressedFormatError(
            f"{folder / 'config.json'}: `{METADATA_KEY}` format_version {meta.get('format_version')!r} is not "
            f"supported (this hf_svd_compress reads version {FORMAT_VERSION}); upgrade hf_svd_compress."
        )
    missing = [key for key in _REQUIRED_METADATA if key not in meta]
    missing += [f"shapes[{name!r}]" for name in meta.get("ranks", {}) if name not in meta.get("shapes", {})]
    convs = meta.get("convs", {})
    missing += [f"convs[{n!r}][{k!r}]" for n, geometry in convs.items() for k in GEOMETRY_KEYS if k not in geometry]
    if missing:
        raise CompressedFormatError(f"{folder / 'config.json'}: `{METADATA_KEY}` lacks {', '.join(missing)}.")
    return meta


def _check_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Every module of the metadata has tensors of the recorded rank and shape; errors name the module."""
    dense = set(meta.get("dense_modules", []))
    problems = []
    for name, rank in meta["ranks"].items():
        out_features, in_features = meta["shapes"][name]
        if name in meta.get("convs", {}):
            conv = conv_tensor_shapes(meta["convs"][name], rank)
            parts = {"weight": "dense"} if name in dense else {"down.weight": "down", "up.weight": "up"}
            expected = {f"{name}.{key}": [conv[part]] for key, part in parts.items()}
        elif name in dense:
            expected = {f"{name}.weight": [(out_features, in_features), (in_features, out_features)]}
        else:
            expected = {f"{name}.down.weight": [(rank, in_features)], f"{name}.up.weight": [(out_features, rank)]}
        for key, shapes in expected.items():
            found = tuple(tensors[key].shape) if key in tensors else None
            if found not in shapes:
                problems.append(f"module {name!r}: {key} should have shape {list(shapes[0])}, found {found}")
    if problems:
        raise CompressedFormatError(f"{file} does not match its `{METADATA_KEY}` metadata: " + "; ".join(problems))


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
            layer = svd_from_low_rank(down, up, None)
        state.update({f"{name}.{k}": v for k, v in layer.state_dict().items() if k != "bias"})
        if f"{name}.up.bias" in tensors:
            state[f"{name}.bias"] = tensors[f"{name}.up.bias"]
    return state


def _renamed_to_model_keys(model: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's keys under the model's module names.

    transformers 5 saves some architectures under legacy names (DINOv2 / ViT `attention.q_proj` is written as
    `attention.attention.query`) and renames them in `from_pretrained`; this applies the same renamings. A renamed
    key is taken when its module exists in `model` (factored keys such as `.U` and `.s` belong to a module too).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    modules = {name for name, _ in model.named_modules()}
    renamed = {}
    for key, value in tensors.items():
        new = key
        for renaming in renamings:
            new = renaming.rename_source_key(new)[0]
        renamed[new if new.rpartition(".")[0] in modules else key] = value
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


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / f"{WEIGHTS_NAME}.index.json"
    files = sorted(set(_read_json(index)["weight_map"].values())) if index.is_file() else [WEIGHTS_NAME]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the folder holds no safetensors weights (pickle is not read).")
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CompressedFormatError(
                f"{path} is not a readable safetensors file (corrupt or truncated?): {err}"
            ) from err
    return tensors


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CompressedFormatError(f"{path} is not valid JSON: {err}") from err


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _tensor_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)


# ---- integrity: checksums and ranks (checks shared with the remote-code loader, in the template) -------------------


def file_checksums(folder: Path, names: list[str]) -> dict[str, str]:
    """`{file name: "sha256:<hex>"}` of the files `names` in `folder`, for `svd_compression["checksums"]`."""
    return {name: file_sha256(folder / name) for name in names}


def verify_checksums(folder: Path, meta: dict[str, Any]) -> None:
    """Refuse tensor files whose bytes changed since the export (exports without checksums, older ones, pass)."""
    if problem := checksum_problem(meta, lambda name: str(folder / name)):
        raise CompressedFormatError(problem)


def _check_ranks_complete(meta: dict[str, Any], tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Refuse factors in the file for a module that `ranks` does not list (it would load randomly initialized)."""
    if problem := unlisted_factors_problem(meta, tensors):
        raise CompressedFormatError(f"{file}: {problem}")


def _check_dense_ranks(meta: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Refuse a rank in `ranks` below the actual rank of a dense-stored layer (loading would truncate it)."""
    if problem := dense_rank_problem(meta, lambda name: tensors.get(f"{name}.weight")):
        raise CompressedFormatError(f"{folder / 'config.json'}: {problem}")


# ---- writing a folder safely --------------------------------------------------------------------------------------


def _holds_model(folder: Path) -> bool:
    return folder.is_dir() and any(any(folder.glob(pattern)) for pattern in _MODEL_FILE_PATTERNS)


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder.")
    if _holds_model(target) and not overwrite:
        raise FileExistsError(
            f"{target} already holds a model (config.json or weights): pass overwrite=True to replace it, or choose "
            "another folder."
        )


def export_file_names(processing_class: Any | None = None) -> list[str]:
    """The names of the files `save_compressed` writes into a folder (with this tokenizer or image processor)."""
    names = {WEIGHTS_NAME, "config.json", MODELING_FILE, "README.md", "generation_config.json"}
    if processing_class is not None:
        with tempfile.TemporaryDirectory() as scratch:
            processing_class.save_pretrained(scratch)
            names.update(p.name for p in Path(scratch).iterdir())
    return sorted(names)


def check_no_foreign_files(target: Path, names: list[str], what: str | None = None) -> None:
    """Refuse an export into a folder without a model where it would replace files of the user's (`names`).

    A folder holding a model is replaced whole, with `overwrite`; one without is written into, and what is not
    ours in it (logs, notes) stays, but a file of the same name as ours (a README.md, say) is never replaced.
    """
    if _holds_model(target) or not target.is_dir():
        return
    clashes = sorted(name for name in names if (target / name).exists())
    if clashes:
        raise FileExistsError(
            f"{what or target}: the folder holds {clashes}, not part of a compressed model, which an export would "
            "replace; move them elsewhere, or choose another folder."
        )


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A temporary sibling of `target` to write into, moved into place only if the block completes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()  # not mkdtemp: its 0700 mode would become the folder's once moved into place
    try:
        yield tmp
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sibling(target: Path, kind: str) -> Path:
    # The writer's pid in the name tells a killed run's leftover from a folder another process is writing.
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _remove_leftovers(target: Path) -> None:
    """Remove the staging folders of earlier writes of `target` killed before their cleanup (SIGTERM, SIGKILL).

    A `.old-` folder is the previous model during a swap: it is removed only once `target` holds a model again.
    """
    for kind in ("tmp", "old"):
        prefix = f".{target.name}.{kind}-"
        for entry in target.parent.iterdir():
            if not entry.name.startswith(prefix) or _writer_alive(entry.name[len(prefix) :]):
                continue
            if kind == "tmp" or _holds_model(target):
                logger.info("Removing %s, left by an interrupted export.", entry)
                shutil.rmtree(entry, ignore_errors=True)


def _writer_alive(suffix: str) -> bool:
    pid = suffix.split("-")[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False  # an older name without a pid, or this process's own earlier (finished or failed) write
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        tmp.rename(target)
    elif _holds_model(target):  # overwrite was checked: swap, then drop the old folder
        old = _sibling(target, "old")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:  # a folder without a model (e.g. logs): add our files, config.json last so no half model is visible
        check_no_foreign_files(target, [entry.name for entry in tmp.iterdir()])
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            os.replace(entry, target / entry.name)
