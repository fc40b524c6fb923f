"""`SVDTrainingArguments`: `TrainingArguments` plus the SVD-training loop settings, and the one rule for how its
fields override the model's `SVDConfig` (`effective_config`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from hf_svd_compress.config import FIELD_RULES, SPARSITY_KINDS, SVDConfig
from hf_svd_compress.validation import COUNT, NON_NEGATIVE, POSITIVE, check_fields, choice

DISABLED = "none"


# The SVDConfig fields an `SVDTrainingArguments` field of the same name overrides when set (`effective_config`).
OVERRIDES = (
    "orth_weight",
    "orth_probes",
    "sparsity",
    "sparsity_weight",
    "approx_weight",
    "prune_energy",
    "prune_budget",
    "prune_rank_multiple",
)
# How each numeric field is checked (`validation.number`): the overrides by their SVDConfig rule (unset allowed),
# the training-loop fields here.
_RULES: dict[str, dict] = {
    **{name: {**FIELD_RULES[name], "optional": True} for name in OVERRIDES if name in FIELD_RULES},
    "singular_value_lr_scale": {**POSITIVE, "hint": "1 = no change"},
    "distill_alpha": {**NON_NEGATIVE, "maximum": 1, "optional": True, "hint": "e.g. 0.5 (0: none)"},
    "distill_hidden_weight": NON_NEGATIVE,
    "distill_temperature": {**POSITIVE, "hint": "e.g. 2.0"},
    "regularizer_interval": COUNT,
    # Step 0 ends no optimizer step: prune_at_step=0 would silently never prune.
    "prune_at_step": {**COUNT, "optional": True},
    "prune_start_step": {**NON_NEGATIVE, "integer": True, "optional": True},
}


@dataclass
class SVDTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the SVD-training fields; unset (`None`) fields defer to the model's `SVDConfig`."""

    orth_weight: float | None = field(
        default=None,
        metadata={
            "help": "lambda_o, weight of the orthogonality loss. Unset: the model's SVDConfig (compress, the CLI and "
            "the recipes: 0, off)."
        },
    )
    orth_probes: int | None = field(
        default=None,
        metadata={"help": "0: exact orthogonality loss; p > 0: estimate from p random probes. Unset: the SVDConfig."},
    )
    sparsity: str | None = field(
        default=None,
        metadata={
            "help": "Sparsity regularizer: 'l1', 'hoyer', 'hoyer_square' or 'none'. Unset: the SVDConfig (compress, "
            "the CLI and the recipes: none)."
        },
    )
    sparsity_weight: float | None = field(
        default=None, metadata={"help": "lambda_s, weight of the sparsity regularizer. Unset: the SVDConfig."}
    )
    approx_weight: float | None = field(
        default=None,
        metadata={"help": "CUR layers: weight of ||W - C U R||^2 / ||W||^2 in the loss. Unset: the SVDConfig."},
    )
    singular_value_lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "Learning rate of the singular values s, as a multiple of learning_rate. Adam moves every "
            "parameter by about the learning rate per step, so at fine-tuning rates the spectrum barely moves "
            "and the sparsity regularizer has no effect; ~1000 lets it reshape s in a few hundred steps. From "
            "prune_at_step on, where the sparsity term stops, s trains at learning_rate."
        },
    )
    regularizer_interval: int = field(
        default=1,
        metadata={"help": "Add the regularizers every k optimizer steps, weighted by k (cheaper, same mean)."},
    )
    distill_alpha: float | None = field(
        default=None,
        metadata={
            "help": "With a teacher model: loss = (1 - alpha) task loss + alpha T^2 KL(teacher || student). Unset: "
            "0.5 when SVDTrainer gets a teacher_model; the CLI and recipes use the dense model as teacher when set."
        },
    )
    distill_hidden_weight: float = field(
        default=1.0,
        metadata={
            "help": "With a teacher model: weight of the hidden-state loss, the mean over layers of "
            "||h_student - h_teacher||^2 / ||h_teacher||^2 (TinyBERT-style), added to the loss. 0: logits only."
        },
    )
    distill_temperature: float = field(
        default=2.0, metadata={"help": "Temperature T of the distillation loss (softens both distributions)."}
    )
    prune_at_step: int | None = field(
        default=None,
        metadata={
            "help": "Prune at this optimizer step, then fine-tune with the sparsity regularizer off. In the CLI and "
            "recipes (with --schedule gradual): a step of the SVD stage (default: 60% of it), where pruning reaches "
            "its target."
        },
    )
    prune_start_step: int | None = field(
        default=None,
        metadata={
            "help": "Prune gradually from this step to prune_at_step: the kept fraction falls on a cubic schedule "
            "(Zhu & Gupta 2017, AdaLoRA) so the model adapts to each cut. Unset: one cut at prune_at_step. In the "
            "CLI and recipes (with --schedule gradual): a step of the SVD stage (default: 20% of it)."
        },
    )
    prune_energy: float | None = field(
        default=None, metadata={"help": "Energy each layer keeps when pruning at prune_at_step, in (0, 1]."}
    )
    prune_budget: float | None = field(
        default=None, metadata={"help": "Global parameter fraction kept when pruning at prune_at_step, in (0, 1)."}
    )
    prune_rank_multiple: int | None = field(
        default=None,
        metadata={"help": "Round pruned ranks up to a multiple of this (8: faster GEMMs). Unset: the SVDConfig."},
    )

    def __post_init__(self) -> None:
        if not self.use_cpu and launched_on_cpus_only():
            # `accelerate launch --multi_gpu --num_processes N` without an accelerator starts N gloo processes, but
            # TrainingArguments only joins them as DDP with use_cpu (PartialState(cpu=True)); otherwise every process
            # would train alone and each would export.
            self.use_cpu = True
        super().__post_init__()
        self.sparsity = choice("--sparsity", self.sparsity, (*SPARSITY_KINDS, DISABLED), optional=True)
        check_fields(self, _RULES, "--")
        if self.prune_start_step is not None and self.prune_at_step is not None:
            if self.prune_start_step >= self.prune_at_step:
                raise ValueError(
                    f"--prune_start_step {self.prune_start_step}: must be below --prune_at_step "
                    f"{self.prune_at_step}; gradual pruning runs from the start step to prune_at_step."
                )
        if self.prune_energy is not None and self.prune_budget is not None:
            raise ValueError("Set only one of --prune_energy and --prune_budget.")
        if self.gradient_checkpointing and self.gradient_checkpointing_kwargs is None:
            # Reentrant checkpointing runs the first forward without grad, where no regularizer can be recorded.
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}


def launched_on_cpus_only() -> bool:
    """Whether this process is one of several (`WORLD_SIZE` > 1) on a machine without GPU or other accelerator."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def effective_config(config: SVDConfig, args: TrainingArguments) -> SVDConfig:
    """`config` with every `OVERRIDES` field that `args` sets (not `None`) replaced: the one precedence rule.

    `--sparsity none` turns the term off (`None`); a pruning target set in `args` (energy or budget) replaces both
    of the config's, since a budget would otherwise win over an energy.
    """
    changes = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name, None) is not None}
    if changes.get("sparsity") == DISABLED:
        changes["sparsity"] = None
    if "prune_energy" in changes or "prune_budget" in changes:
        changes.setdefault("prune_budget", None)
        changes.setdefault("prune_energy", config.prune_energy)
    return dataclasses.replace(config, **changes) if changes else config
