"""hf_svd_compress: compress Hugging Face Transformers models by SVD training.

The names below load on first use (PEP 562), so `import hf_svd_compress.report` or the CLI start without the
training stack. The package's layers, from the bottom: `config` / `validation`; `layers/` (the `FactoredLayer`
protocol, the parameterization registry, one module per parameterization); `core/` (matching, calibration,
factorize, pruning); `training/` (arguments, trainer, callbacks, distillation, `compress`); `hub/` (the Hub format:
save, load, convert, push, model card, ONNX); `app/` (pipeline, tasks, data, metrics, report, CLI).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# {module: public names it provides at the top level}
_EXPORTS: dict[str, tuple[str, ...]] = {
    "config": ("DEFAULT_TARGET_MODULES", "SVDConfig"),
    "core.calibration": ("activation_scales", "CalibrationData", "input_covariances"),
    "core.factorize": ("svd_factorize_", "target_names", "to_householder_"),
    "core.matching": ("NoTargetModulesError",),
    "core.pruning": ("current_ranks", "prune_", "truncate_", "worth_factoring"),
    "hub.convert": ("lowrank_to_svd_", "merge_to_dense_", "svd_to_lowrank_"),
    "hub.format": ("CompressedFormatError",),
    "hub.load": ("load_compressed", "load_factored_checkpoint"),
    "hub.save": ("push_compressed_to_hub", "save_compressed"),
    "layers.base": ("FactoredLayer",),
    "layers.conv": ("SVDConv2d",),
    "layers.cur": ("CompactCURLinear", "cur_layers", "CURLinear"),
    "layers.householder": ("HouseholderSVDLinear",),
    "layers.registry": ("Parameterization", "register_parameterization"),
    "layers.regularizers": ("orthogonality_loss", "sparsity_loss"),
    "layers.svd": ("svd_layers", "SVDLinear"),
    "training.arguments": ("SVDTrainingArguments",),
    "training.callbacks": ("SVDPruningCallback",),
    "training.compress": ("compress", "compress_config"),
    "training.trainer": ("SVDTrainer",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE, key=str.lower)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'hf_svd_compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hf_svd_compress.{_WHERE[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
