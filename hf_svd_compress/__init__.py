"""hf_svd_compress: compress Hugging Face Transformers models by SVD training."""

from .calibration import CalibrationData, activation_scales, input_covariances
from .compress import compress, compress_config
from .config import DEFAULT_TARGET_MODULES, SVDConfig
from .conv import SVDConv2d
from .cur import CompactCURLinear, CURLinear, cur_layers
from .export import (
    CompressedFormatError,
    load_compressed,
    load_factored_checkpoint,
    lowrank_to_svd_,
    merge_to_dense_,
    save_compressed,
    svd_to_lowrank_,
)
from .factorize import svd_factorize_, svd_layers
from .householder import HouseholderSVDLinear, to_householder_
from .hub import push_compressed_to_hub
from .layers import SVDLinear
from .matching import NoTargetModulesError
from .pruning import current_ranks, prune_, truncate_, worth_factoring
from .regularizers import orthogonality_loss, sparsity_loss
from .trainer import SVDPruningCallback, SVDTrainer, SVDTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "activation_scales",
    "CalibrationData",
    "input_covariances",
    "compress",
    "compress_config",
    "CompressedFormatError",
    "load_compressed",
    "load_factored_checkpoint",
    "lowrank_to_svd_",
    "merge_to_dense_",
    "push_compressed_to_hub",
    "save_compressed",
    "svd_to_lowrank_",
    "DEFAULT_TARGET_MODULES",
    "NoTargetModulesError",
    "SVDConfig",
    "SVDConv2d",
    "CURLinear",
    "CompactCURLinear",
    "cur_layers",
    "HouseholderSVDLinear",
    "to_householder_",
    "SVDLinear",
    "SVDPruningCallback",
    "SVDTrainer",
    "SVDTrainingArguments",
    "current_ranks",
    "prune_",
    "truncate_",
    "worth_factoring",
    "orthogonality_loss",
    "sparsity_loss",
    "svd_factorize_",
    "svd_layers",
]
