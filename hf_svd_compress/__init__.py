"""hf_svd_compress: compress Hugging Face Transformers models by SVD training."""

from .config import DEFAULT_TARGET_MODULES, SVDConfig
from .factorize import svd_factorize_, svd_layers
from .layers import SVDLinear
from .matching import NoTargetModulesError
from .pruning import current_ranks, prune_, truncate_, worth_factoring
from .regularizers import orthogonality_loss, sparsity_loss
from .trainer import SVDPruningCallback, SVDTrainer, SVDTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "NoTargetModulesError",
    "SVDConfig",
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
