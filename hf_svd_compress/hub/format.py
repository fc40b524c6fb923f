"""The Hub format of a compressed model (version 1): names, metadata, and the checks every loader runs.

On disk, a factored module `name` of rank `r` is two linear layers, `{name}.down.weight = (V diag(s))^T` [r, in] and
`{name}.up.weight = U` [out, r] with `{name}.up.bias` the bias; a module whose rank saves no parameters keeps its
dense `{name}.weight` (Conv1D layout for GPT-2 style layers). `config.json` is the base config with its own
`model_type`, an `auto_map` to the generated modeling file, and the `svd_compression` metadata. A factored
`nn.Conv2d` is two conv kernels instead (`SVDConv2d.factored_kernels`, dense: the conv's own `weight`), its geometry
in `svd_compression["convs"]` (an optional entry: files without convs lack it).
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.models.auto import modeling_auto

from hf_svd_compress.config import CONFIG_KEY, METADATA_KEY
from hf_svd_compress.hub.templates.modeling_svd_compressed import (  # the format's constants: one home, both loaders
    FORMAT_VERSION,
    checksum_problem,
    dense_rank_problem,
    file_sha256,
    unlisted_factors_problem,
)
from hf_svd_compress.layers.allocation import BREAK_EVEN
from hf_svd_compress.layers.conv import GEOMETRY_KEYS, conv_tensor_shapes

MODEL_TYPE_PREFIX = "svd_compressed_"


WEIGHTS_NAME = "model.safetensors"


MODELING_FILE = "modeling_svd_compressed.py"


_REQUIRED_METADATA = ("ranks", "shapes", "base_architecture", "base_config_class", "base_model_type")


# A layer stays dense unless its factors hold fewer than `BREAK_EVEN` (0.9) of its dense weights: the one rule that
# pruning, export, report and model card share (see `pruning.BREAK_EVEN` for the measurement).
SPEED_BREAK_EVEN = BREAK_EVEN


class CompressedFormatError(ValueError):
    """A folder that is not a loadable compressed model: metadata missing, unknown or not matching the tensors."""


def check_metadata(config_dict: dict[str, Any], folder: Path) -> dict[str, Any]:
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


def check_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor], file: Path) -> None:
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


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / f"{WEIGHTS_NAME}.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else [WEIGHTS_NAME]
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


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CompressedFormatError(f"{path} is not valid JSON: {err}") from err


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def tensor_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)


def file_checksums(folder: Path, names: list[str]) -> dict[str, str]:
    """`{file name: "sha256:<hex>"}` of the files `names` in `folder`, for `svd_compression["checksums"]`."""
    return {name: file_sha256(folder / name) for name in names}


def verify_checksums(folder: Path, meta: dict[str, Any]) -> None:
    """Refuse tensor files whose bytes changed since the export (exports without checksums, older ones, pass)."""
    if problem := checksum_problem(meta, lambda name: str(folder / name)):
        raise CompressedFormatError(problem)


def check_ranks_complete(meta: dict[str, Any], tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Refuse factors in the file for a module that `ranks` does not list (it would load randomly initialized)."""
    if problem := unlisted_factors_problem(meta, tensors):
        raise CompressedFormatError(f"{file}: {problem}")


def check_dense_ranks(meta: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Refuse a rank in `ranks` below the actual rank of a dense-stored layer (loading would truncate it)."""
    if problem := dense_rank_problem(meta, lambda name: tensors.get(f"{name}.weight")):
        raise CompressedFormatError(f"{folder / 'config.json'}: {problem}")


def base_config_dict(config_dict: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """A saved config as the base architecture's: without our keys and with the base `model_type`."""
    skip = {"auto_map", METADATA_KEY, CONFIG_KEY, "_name_or_path"}
    return {**{k: v for k, v in config_dict.items() if k not in skip}, "model_type": meta["base_model_type"]}


def base_class(cls: type) -> type:
    """The first class of `cls`'s MRO that transformers exports (our and remote-code subclasses resolve to it)."""
    for base in cls.__mro__:
        if getattr(transformers, base.__name__, None) is base:
            if base.__name__ in ("PreTrainedModel", "PreTrainedConfig", "PretrainedConfig"):
                break
            return base
    raise TypeError(f"{cls.__name__} is not built on a transformers architecture; save_compressed cannot export it.")


def transformers_class(name: str) -> type:
    cls = getattr(transformers, name, None) if name else None
    if not isinstance(cls, type):
        raise CompressedFormatError(f"transformers {transformers.__version__} has no class {name!r} to rebuild.")
    return cls


def modeling_source(meta: dict[str, Any]) -> str:
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
def auto_classes(model_type: str, arch: type) -> tuple[str, ...]:
    """The transformers auto classes (`AutoModelFor...`) whose mapping sends `model_type` to `arch`."""
    names = []
    for attr, auto_class in sorted(vars(modeling_auto).items()):
        mapping = getattr(auto_class, "_model_mapping", None) if attr.startswith("AutoModel") else None
        value = getattr(mapping, "_model_mapping", {}).get(model_type)
        if arch.__name__ in (value if isinstance(value, list | tuple) else [value]):
            names.append(attr)
    return tuple(names)
