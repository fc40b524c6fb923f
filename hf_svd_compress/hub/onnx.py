"""ONNX export of a compressed (or dense) model for onnxruntime: dynamic batch and sequence axes, optimized graph.

`optimum`'s exporter (optimum-onnx 0.1) requires transformers < 4.58, so the export calls `torch.onnx.export`
(TorchScript exporter) directly on the lean inference form of `load_compressed`, where every factored layer is two
`nn.Linear` and so two ONNX `MatMul`s. onnxruntime then applies its extended graph optimizations (constant folding,
GELU / LayerNorm / MatMul+Add fusions) offline and writes the optimized graph.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from hf_svd_compress.config import METADATA_KEY
from hf_svd_compress.hub.load import load_compressed
from hf_svd_compress.hub.staging import staging

logger = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
DEFAULT_OPSET = 17
INSTALL_HINT = 'pip install "hf_svd_compress[onnx]" (onnx and onnxruntime)'
# Files of the folder copied next to the graph: the config (labels) and the tokenizer or image processor.
_ASSETS = ("*.json", "*.txt", "*.model")
_SKIPPED = ("model.safetensors.index.json",)


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote and how closely the graph matches PyTorch."""

    path: Path
    input_names: tuple[str, ...]
    output_name: str
    max_abs_diff: float


class _FirstOutput(nn.Module):
    """The model called with keyword inputs in a fixed order, returning its first output (logits or hidden states)."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs)), return_dict=True)[0]


def check_onnx_installed() -> None:
    """Raise `ImportError` with the install command when onnx or onnxruntime is missing."""
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {' and '.join(missing)}: {INSTALL_HINT}.")


def export_onnx(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    optimize: bool = True,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> OnnxExport:
    """Write `model.onnx` for onnxruntime from a folder of `save_compressed` (or a dense transformers checkpoint).

    Args:
        model_dir (`str` or `os.PathLike`): The exported folder.
        output_dir (`str` or `os.PathLike`, *optional*): Where to write (default: `<model_dir>/onnx`); the config and
            tokenizer / image-processor files are copied next to the graph.
        opset (`int`, defaults to 17): ONNX opset.
        optimize (`bool`, defaults to `True`): Save onnxruntime's extended-level optimized graph.
        atol (`float`, defaults to 1e-4): Largest absolute difference to PyTorch accepted on the check inputs.
        overwrite (`bool`, defaults to `False`): Replace an `output_dir` that already holds a `model.onnx`.

    Returns:
        `OnnxExport` with the path, the input names (dynamic axes 0 = batch, 1 = sequence for token inputs), the
        output name and the max abs difference to PyTorch on inputs of another batch size and length than the export's.

    Raises:
        `ImportError` when onnx or onnxruntime is missing; `FileExistsError` for an existing graph without
        `overwrite`; `ValueError` when the graph's outputs differ from PyTorch's by more than `atol`. Nothing is
        written in these cases.
    """
    check_onnx_installed()
    source = Path(model_dir)
    target = Path(output_dir) if output_dir is not None else source / "onnx"
    if (target / ONNX_NAME).exists() and not overwrite:
        raise FileExistsError(f"{target / ONNX_NAME} exists: pass overwrite=True (--overwrite) or another output_dir.")
    if any(target.glob("*.safetensors")):  # staging swaps a folder holding a model: never the weights' own
        raise FileExistsError(f"{target} holds model weights: write the ONNX graph to another output_dir.")
    model = load_model(source)
    input_names = _input_names(model)
    with staging(target) as tmp:
        output_name = _export(model, input_names, tmp / ONNX_NAME, opset, optimize)
        diff = max_abs_diff(model, tmp / ONNX_NAME, input_names)
        if not diff <= atol:
            raise ValueError(f"The ONNX graph differs from PyTorch by {diff:.3g} (> atol={atol:g}); nothing written.")
        _copy_assets(source, tmp)
    logger.info("Wrote %s (max abs diff to PyTorch %.3g).", target / ONNX_NAME, diff)
    return OnnxExport(target / ONNX_NAME, input_names, output_name, diff)


def load_model(folder: Path) -> nn.Module:
    """The folder's model for inference: `load_compressed` for a compressed folder, else its transformers class."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: pass a folder written by save_compressed or save_pretrained."
        )
    config = json.loads(config_path.read_text())
    if METADATA_KEY in config:
        return load_compressed(folder)
    arch = getattr(transformers, (config.get("architectures") or [""])[0], None)
    if arch is None:
        raise ValueError(f"{config_path} names no transformers architecture to load ({config.get('architectures')}).")
    return arch.from_pretrained(folder).eval()


def example_inputs(model: nn.Module, batch: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    """Inputs for `model`: token ids (with a padded row) and their attention mask, or images of the config's size."""
    config = model.config
    vision = getattr(config, "vision_config", None) or config
    if model.main_input_name == "pixel_values":
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        return {"pixel_values": torch.randn(batch, getattr(vision, "num_channels", 3), size, size)}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, config.vocab_size, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, length // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def max_abs_diff(model: nn.Module, path: Path, input_names: tuple[str, ...]) -> float:
    """Largest absolute difference between PyTorch and onnxruntime outputs, at 3 examples of 24 tokens."""
    import onnxruntime

    inputs = {k: v for k, v in example_inputs(model, batch=3, length=24).items() if k in input_names}
    with torch.inference_mode():
        expected = _FirstOutput(model, input_names)(*inputs.values())
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    return float((torch.from_numpy(got) - expected).abs().max())


def _input_names(model: nn.Module) -> tuple[str, ...]:
    accepted = inspect.signature(model.forward).parameters
    names = [name for name in example_inputs(model) if name in accepted]
    if not names:
        raise ValueError(f"{type(model).__name__} takes none of input_ids / pixel_values: it cannot be exported.")
    return tuple(names)


def _export(model: nn.Module, input_names: tuple[str, ...], path: Path, opset: int, optimize: bool) -> str:
    """Write the graph (optimized in place when asked); returns the output's name."""
    inputs = example_inputs(model)
    with torch.inference_mode():
        out = model(**{k: inputs[k] for k in input_names}, return_dict=True)
    output_name = next(iter(out.keys()))
    axes = {name: {0: "batch", 1: "sequence"} if name != "pixel_values" else {0: "batch"} for name in input_names}
    axes[output_name] = {0: "batch"} if out[output_name].dim() == 2 else {0: "batch", 1: "sequence"}
    raw = path.with_name("raw.onnx") if optimize else path
    torch.onnx.export(
        _FirstOutput(model, input_names).eval(),
        tuple(inputs[k] for k in input_names),
        str(raw),
        input_names=list(input_names),
        output_names=[output_name],
        dynamic_axes=axes,
        opset_version=opset,
        dynamo=False,
    )
    if optimize:
        _optimize(raw, path)
        raw.unlink()
    return output_name


def _optimize(raw: Path, path: Path) -> None:
    """onnxruntime's extended optimizations, saved: portable across machines, unlike the layout-level ones."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path)
    onnxruntime.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])


def _copy_assets(source: Path, target: Path) -> None:
    for pattern in _ASSETS:
        for file in source.glob(pattern):
            if file.is_file() and file.name not in _SKIPPED:
                shutil.copyfile(file, target / file.name)
