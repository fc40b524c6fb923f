"""`SVDConfig`: what to factor, how to regularize it and how to prune it."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from hf_svd_compress.hub.templates.modeling_svd_compressed import METADATA_KEY as METADATA_KEY  # the export's key
from hf_svd_compress.layers.conv import CONV_MODES
from hf_svd_compress.layers.registry import method_fields, parameterization_names
from hf_svd_compress.validation import COUNT, FRACTION, NON_NEGATIVE, OPEN_FRACTION, check_fields, choice

CONFIG_FORMAT_VERSION = 1
# Where a factored model's config records its `SVDConfig` and layers (survives save_pretrained and checkpoints).
CONFIG_KEY = "svd_training"

SPARSITY_KINDS = ("l1", "hoyer", "hoyer_square")
# How a factored layer is parameterized: the registered names (`layers.registry`). Built in: the regularized SVD (the
# default), Householder-orthonormal factors (SVDP), their tensor-train form (STTP), and CUR (columns and rows).
PARAMETERIZATIONS = parameterization_names()
# How `prune_(budget=)` shares a budget across layers (`pruning.greedy_ranks`, `budget_ranks`, `uniform_ranks`).
ALLOCATIONS = ("greedy", "threshold", "uniform")

# Every linear layer of a BERT / ViT / DINOv2 block; never the pooler or the task head.
_ENCODER_BLOCK_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
# ViT and DINOv2 in recent transformers (5.x) name their block layers like decoders: attention.{q,k,v,o}_proj and
# mlp.fc1 / mlp.fc2. Both spellings are listed so the defaults match either version.
_PROJ_BLOCK_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc1", "mlp.fc2"]
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "bert": _ENCODER_BLOCK_TARGETS,
    "roberta": _ENCODER_BLOCK_TARGETS,
    "vit": [*_ENCODER_BLOCK_TARGETS, *_PROJ_BLOCK_TARGETS],
    "dinov2": ["query", "key", "value", "attention.output.dense", *_PROJ_BLOCK_TARGETS],
}

# How each numeric field is checked (`validation.number`).
FIELD_RULES: dict[str, dict] = {
    "orth_weight": {**NON_NEGATIVE, "hint": "0 disables the term"},
    "sparsity_weight": {**NON_NEGATIVE, "hint": "0 disables the term"},
    "approx_weight": {**NON_NEGATIVE, "hint": "0 disables the term"},
    "whitening_ridge": {**FRACTION, "hint": "e.g. 1e-3"},
    "prune_energy": {**FRACTION, "hint": "e.g. 0.9"},
    "init_energy": {**FRACTION, "optional": True, "hint": "e.g. 0.99"},
    "prune_budget": {**OPEN_FRACTION, "optional": True, "hint": "e.g. 0.5"},
    "orth_probes": {**NON_NEGATIVE, "integer": True, "hint": "0: exact orthogonality loss"},
    "prune_rank_multiple": {**COUNT, "hint": "1: no rounding"},
    "init_max_rank": {**COUNT, "optional": True},
    "tt_max_rank": {**COUNT, "optional": True},
}


@dataclass
class SVDConfig:
    """Configuration of SVD training: which layers to factor, the regularizers and the pruning.

    Args:
        target_modules (`list[str]` or `str`, *optional*):
            Which `nn.Linear` layers to factor, with peft's matching rules: a list matches module names exactly or
            by `.suffix`; a string is a regex that must match the full module name; `"all-linear"` selects every
            linear layer inside the repeated transformer blocks (never the pooler or the task head). `None` picks the
            default for the model's `model_type` (see `DEFAULT_TARGET_MODULES`), else `"all-linear"`.
        exclude_modules (`list[str]` or `str`, *optional*):
            Modules never factored, with the same matching rules.
        orth_weight (`float`, defaults to 0.1):
            lambda_o, weight of the orthogonality loss `sum ||U^T U - I||_F^2 / r^2 + ||V^T V - I||_F^2 / r^2`.
        orth_probes (`int`, defaults to 0):
            0 computes the orthogonality loss exactly (`r^2 (m + n)` multiply-adds per layer); `p > 0` estimates it
            without bias from `p` random probe vectors (Hutchinson, `2 p r (m + n)`), e.g. 16 at r = 384 or 768.
        sparsity (`str`, *optional*, defaults to `"hoyer"`):
            Singular-value sparsity regularizer: `"l1"`, `"hoyer"`, `"hoyer_square"` or `None`.
        sparsity_weight (`float`, defaults to 1e-3):
            lambda_s, weight of the sparsity regularizer (summed over layers).
        prune_energy (`float`, defaults to 0.95):
            Fraction of each layer's spectral energy (sum of s^2) kept by energy pruning, in (0, 1].
        prune_budget (`float`, *optional*):
            If set, prune to this global fraction of the factored layers' parameters instead, in (0, 1).
        prune_allocation (`str`, defaults to `"threshold"`):
            How a budget is shared across layers: `"greedy"` keeps the singular triplets of highest
            `s_i^2 / (m + n)` (output error per parameter with whitened factors), `"threshold"` the same energy
            fraction in every layer, `"uniform"` the same fraction of every layer's own weights (SVD-LLM).
        prune_rank_multiple (`int`, defaults to 8):
            Round each pruned rank up to a multiple of this: GEMMs with an inner size that is a multiple of 8 run
            35-50% faster on CPUs (MKL) and use GPU tensor cores. 1 keeps the exact energy / budget ranks.
        init_energy (`float`, *optional*):
            Start below full rank: keep this fraction of each layer's energy at factoring time.
        init_max_rank (`int`, *optional*):
            Start below full rank: cap every factored layer's rank at this value.
        parameterization (`str`, defaults to `"svd"`):
            How factored layers are parameterized: `"svd"` (`U diag(s) V^T` with the orthogonality loss),
            `"householder"` (U and V products of Householder reflections, orthonormal by construction, SVDP),
            `"sttp"` (the same factors in tensor-train form) or `"cur"` (columns and rows of the weight).
        conv_mode (`str`, defaults to `"channel"`):
            How a targeted `nn.Conv2d` is factored: `"channel"` (a kh x kw conv to rank r, then a 1x1 conv) or
            `"spatial"` (a kh x 1 conv, then a 1 x kw conv).
        approx_weight (`float`, defaults to 1.0):
            For `parameterization="cur"`: weight of the distance between each weight and its CUR approximation.
        whitening_ridge (`float`, defaults to 1e-3):
            For whitened factors (`svd_factorize_(..., calibration=)`): `whitening_ridge * mean(diag C)` is added to
            each input covariance `C` before its eigendecomposition, so singular or ill-conditioned `C` stay finite.
        tt_max_rank (`int`, *optional*):
            For `parameterization="sttp"`: cap on the tensor-train ranks of U and V. `None` keeps the exact TT-SVD of
            the pretrained factors (the layer computes the dense function at the start); a cap approximates them
            with fewer degrees of freedom, `O(tt_max_rank^2 log(m n))` per layer.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (exact or .suffix), a full-name regex, or 'all-linear'. None: per model_type."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never factored (same matching rules as target_modules)."}
    )
    orth_weight: float = field(default=0.1, metadata={"help": "lambda_o: weight of the orthogonality loss."})
    orth_probes: int = field(
        default=0, metadata={"help": "0: exact orthogonality loss; p > 0: unbiased estimate from p random probes."}
    )
    sparsity: str | None = field(
        default="hoyer", metadata={"help": "Singular-value regularizer: 'l1', 'hoyer', 'hoyer_square' or None."}
    )
    sparsity_weight: float = field(default=1e-3, metadata={"help": "lambda_s: weight of the sparsity regularizer."})
    prune_energy: float = field(
        default=0.95, metadata={"help": "Energy (sum of s^2) each layer keeps when pruning, in (0, 1]."}
    )
    prune_budget: float | None = field(
        default=None, metadata={"help": "Global fraction of factored-layer parameters kept, in (0, 1)."}
    )
    prune_allocation: str = field(
        default="threshold",
        metadata={"help": "How a budget is shared: 'greedy' (best s^2 / (m + n)), 'threshold' or 'uniform'."},
    )
    prune_rank_multiple: int = field(
        default=8, metadata={"help": "Round pruned ranks up to a multiple of this (1: no rounding)."}
    )
    init_energy: float | None = field(
        default=None, metadata={"help": "Keep this energy fraction at factoring time (start below full rank)."}
    )
    init_max_rank: int | None = field(default=None, metadata={"help": "Cap each layer's rank at factoring time."})
    parameterization: str = field(
        default="svd", metadata={"help": "Factored layer form: 'svd', 'householder', 'sttp' or 'cur'."}
    )
    conv_mode: str = field(
        default="channel", metadata={"help": "How targeted nn.Conv2d layers are factored: 'channel' or 'spatial'."}
    )
    approx_weight: float = field(
        default=1.0, metadata={"help": "CUR only: weight of ||W - C U R||_F^2 / ||W||_F^2 in the loss."}
    )
    whitening_ridge: float = field(
        default=1e-3,
        metadata={"help": "Whitened factors: ridge added to each input covariance, as a fraction of mean(diag C)."},
    )
    tt_max_rank: int | None = field(
        default=None, metadata={"help": "STTP only: cap on the tensor-train ranks of U and V (None: exact TT-SVD)."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple | set):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, tuple | set):
            self.exclude_modules = sorted(self.exclude_modules)
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)
        self.sparsity = choice("SVDConfig.sparsity", self.sparsity, SPARSITY_KINDS, optional=True)
        self.parameterization = choice("SVDConfig.parameterization", self.parameterization, parameterization_names())
        self.prune_allocation = choice("SVDConfig.prune_allocation", self.prune_allocation, ALLOCATIONS)
        self.conv_mode = choice("SVDConfig.conv_mode", self.conv_mode, CONV_MODES)
        check_fields(self, FIELD_RULES, "SVDConfig.")
        self._check_method_fields()

    def _check_method_fields(self) -> None:
        """Refuse a field one parameterization owns (`Parameterization.fields`) set away from its default."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, owners in method_fields().items():
            value = getattr(self, name)
            if value != defaults[name] and self.parameterization not in owners:
                wanted = " or ".join(repr(owner) for owner in owners)
                raise ValueError(
                    f"SVDConfig.{name}={value!r} only applies to parameterization={wanted} (got "
                    f"{self.parameterization!r}): set parameterization={owners[0]!r} or leave {name}="
                    f"{defaults[name]!r}."
                )

    def resolved_targets(self, model_type: str | None) -> list[str] | str:
        """The target_modules to match for a model of `model_type` (the per-architecture default when unset)."""
        if self.target_modules is not None:
            return self.target_modules
        return DEFAULT_TARGET_MODULES.get(model_type or "", "all-linear")

    def to_dict(self) -> dict[str, Any]:
        """Serializable dict with a `format_version`, the inverse of `from_dict`."""
        return {"format_version": CONFIG_FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SVDConfig:
        """Rebuild a config written by `to_dict`, refusing unknown versions and fields."""
        data = dict(data)
        version = data.pop("format_version", CONFIG_FORMAT_VERSION)
        if version != CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"SVDConfig format_version {version} is not supported by this version of hf_svd_compress "
                f"(it reads version {CONFIG_FORMAT_VERSION}); upgrade hf_svd_compress."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SVDConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)


def _check_targets(name: str, value: Any) -> None:
    ok = (
        value is None
        or isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(v, str) and v for v in value))
    )
    if not ok or value == [] or value == "":
        raise ValueError(
            f"SVDConfig.{name}={value!r} is invalid: give a non-empty list of module names, a regex string, "
            "'all-linear', or None."
        )
    if isinstance(value, str) and value != "all-linear":
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(
                f"SVDConfig.{name}={value!r} is not a valid regex ({err}): a string must be a regex matching the "
                "full module name, e.g. r'.*\\.(query|value)'; use a list for plain names."
            ) from None
