"""`SVDTrainer`: the HF `Trainer` plus the orthogonality and sparsity regularizers of SVD training."""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .config import SPARSITY_KINDS, SVDConfig
from .cur import CURLinear, approximation_total, cur_layers
from .distillation import distillation_loss, hidden_state_loss
from .factorize import CONFIG_KEY, svd_layers
from .pruning import prune_
from .validation import COUNT, FRACTION, NON_NEGATIVE, OPEN_FRACTION, POSITIVE, check_fields, choice

logger = logging.getLogger(__name__)

DISABLED = "none"
# How each numeric SVD-training field is checked (`validation.number`); `None` defers to the model's SVDConfig.
_RULES: dict[str, dict] = {
    "orth_weight": {**NON_NEGATIVE, "optional": True, "hint": "0 disables the term"},
    "sparsity_weight": {**NON_NEGATIVE, "optional": True, "hint": "0 disables the term"},
    "approx_weight": {**NON_NEGATIVE, "optional": True, "hint": "0: none"},
    "orth_probes": {**NON_NEGATIVE, "integer": True, "optional": True, "hint": "0: exact loss"},
    "singular_value_lr_scale": {**POSITIVE, "hint": "1 = no change"},
    "distill_alpha": {**NON_NEGATIVE, "maximum": 1, "optional": True, "hint": "e.g. 0.5 (0: none)"},
    "distill_hidden_weight": NON_NEGATIVE,
    "distill_temperature": {**POSITIVE, "hint": "e.g. 2.0"},
    "regularizer_interval": COUNT,
    "prune_energy": {**FRACTION, "optional": True, "hint": "e.g. 0.95"},
    "prune_budget": {**OPEN_FRACTION, "optional": True, "hint": "e.g. 0.5"},
    "prune_rank_multiple": {**COUNT, "optional": True, "hint": "1: no rounding"},
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


class SVDPruningCallback(TrainerCallback):
    """Prune singular values (masks only, DDP-safe) at the end of optimizer step `at_step`, or gradually.

    With `start_step` (and a `budget`), every step from `start_step` to `at_step` masks a little more: the pruned
    part `1 - budget` is reached as `1 - (1 - p)^3` of it with the progress `p` from 0 to 1, the cubic schedule of
    gradual magnitude pruning (Zhu & Gupta 2017) and AdaLoRA. Masked values stay masked, so each cut only removes
    values; the last one is exactly the `at_step` budget. An energy target cannot be split this way (each cut would
    keep a fraction of what the previous ones left), so gradual pruning needs a budget.

    Args:
        at_step (`int`): The optimizer step after which the target is reached.
        energy (`float`, *optional*): Energy each layer keeps (see `prune_`).
        budget (`float`, *optional*): Global parameter fraction kept (see `prune_`).
        rank_multiple (`int`, defaults to 1): Round the ranks up to a multiple of this (see `prune_`).
        start_step (`int`, *optional*): First step of gradual pruning (below `at_step`); unset: one cut.
        allocation (`str`, defaults to `"threshold"`): How a budget is shared across layers (see `prune_`).
    """

    def __init__(
        self,
        at_step: int,
        energy: float | None = None,
        budget: float | None = None,
        rank_multiple: int = 1,
        start_step: int | None = None,
        allocation: str = "threshold",
    ) -> None:
        if start_step is not None and not 0 <= start_step < at_step:
            raise ValueError(f"start_step={start_step}: must be in [0, at_step={at_step}) for gradual pruning.")
        if start_step is not None and budget is None:
            raise ValueError(
                "Gradual pruning (start_step / --prune_start_step) needs a budget target (--prune_budget, e.g. 0.5): "
                "energy cuts would compound, each keeping a fraction of what the previous ones left."
            )
        self.at_step, self.energy, self.budget, self.rank_multiple = at_step, energy, budget, rank_multiple
        self.start_step, self.allocation = start_step, allocation
        self.ranks: dict[str, int] | None = None

    def target(self, step: int) -> tuple[float | None, float | None]:
        """`(energy, budget)` to prune to after optimizer step `step`; `(None, None)` for no cut."""
        if step == self.at_step:
            return self.energy, self.budget
        if self.start_step is None or not self.start_step <= step < self.at_step:
            return None, None
        pruned = 1 - (1 - (step - self.start_step) / (self.at_step - self.start_step)) ** 3
        budget = 1 - (1 - self.budget) * pruned
        return (None, None) if budget >= 1 else (None, budget)  # the schedule's first step cuts nothing

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        energy, budget = self.target(state.global_step)
        if model is not None and (energy is not None or budget is not None):
            self.ranks = prune_(
                model, energy=energy, budget=budget, rank_multiple=self.rank_multiple, allocation=self.allocation
            )
            logger.info("Pruned at step %d: ranks %s", state.global_step, self.ranks)
            control.should_log = True
        if state.global_step == self.at_step and optimizer is not None:
            # The sparsity term is off from here on: a faster rate for s would only make the spectrum drift.
            _unscale_singular_value_lr(optimizer, lr_scheduler)
        return control


class SVDTrainer(Trainer):
    """`Trainer` that adds `orth_weight * orth + sparsity_weight * sparsity` to the task loss.

    The model must be factored with `svd_factorize_` before the trainer is built. Works with
    `SVDTrainingArguments` (set fields override the model's `SVDConfig`) or a plain `TrainingArguments`.
    Each factored layer computes its terms inside its own forward (whole parameters under FSDP/ZeRO-3, no
    parameter used outside forward under DDP); `compute_loss` sums them, scales them like the task loss under
    gradient accumulation and several processes, and logs them unweighted as `orth_loss` and `sparsity_loss`.
    CUR layers (`parameterization="cur"`) that still compute their dense function add
    `approx_weight * sum ||W - C U R||^2 / ||W||^2` the same way, logged as `approx_loss`.

    With a `teacher_model` (typically the dense model the student was factored from), training steps use
    `(1 - distill_alpha) * task_loss + distill_alpha * T^2 KL(teacher || student)` on the logits, scaled like the
    regularizers and logged unweighted as `distill_loss`; evaluation reports the task loss alone.

    Args:
        svd_config (`SVDConfig`, *optional*): Overrides the config stored on the model by `svd_factorize_`.
        teacher_model (`nn.Module`, *optional*): A task model with the student's head, kept frozen in eval mode on
            the training device (one replica per process, not sharded). It must not share parameters with the
            student: pass a copy made before `svd_factorize_` (`copy.deepcopy(model)`).
        Other arguments are those of `Trainer`.
    """

    def __init__(
        self, *args, svd_config: SVDConfig | None = None, teacher_model: nn.Module | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher_model, self.distill_alpha = self._prepare_teacher(teacher_model)
        self._svd_layers = list(svd_layers(self.model).values())
        self._cur_layers = list(cur_layers(self.model).values())
        if not self._svd_layers and not self._cur_layers:
            raise ValueError(
                "SVDTrainer got a model without SVDLinear or CURLinear layers: call svd_factorize_(model, "
                "SVDConfig(...)) before building the trainer (and before accelerator.prepare)."
            )
        self.svd_config = svd_config or _stored_config(self.model)
        # A BERT head accepts **kwargs but returns a plain mean loss: the Trainer would then skip the division by
        # the accumulation steps (and scale by the process count). Treat such a loss as a per-batch mean.
        self.model_accepts_loss_kwargs = self.model_accepts_loss_kwargs and _loss_uses_num_items(self.model)
        self._metrics: dict[str, list[torch.Tensor]] = {
            name: [] for name in ("orth_loss", "sparsity_loss", "approx_loss", "distill_loss", "distill_hidden_loss")
        }
        prune_at = getattr(self.args, "prune_at_step", None)
        if getattr(self.args, "prune_start_step", None) is not None and not prune_at:
            raise ValueError(
                "--prune_start_step is set without --prune_at_step: set prune_at_step (the step where gradual "
                "pruning reaches its target) or unset prune_start_step."
            )
        if prune_at:
            energy, budget = self._pruning_target()
            multiple = _first_set(getattr(self.args, "prune_rank_multiple", None), self.svd_config.prune_rank_multiple)
            start = getattr(self.args, "prune_start_step", None)
            allocation = self.svd_config.prune_allocation
            pruning = SVDPruningCallback(prune_at, energy, budget, multiple, start, allocation)
            self.add_callback(pruning)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the singular values in their own groups at a scaled learning rate."""
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        scale = getattr(self.args, "singular_value_lr_scale", 1.0)
        if created and scale != 1.0:
            _scale_singular_value_lr(optimizer, {id(layer.s) for layer in self._svd_layers}, scale)
        return optimizer

    def regularizer_weights(self) -> tuple[float, str | None, float]:
        """`(orth_weight, sparsity_kind, sparsity_weight)` in force at the current step."""
        cfg, args = self.svd_config, self.args
        orth = _first_set(getattr(args, "orth_weight", None), cfg.orth_weight)
        kind = _first_set(getattr(args, "sparsity", None), cfg.sparsity)
        weight = _first_set(getattr(args, "sparsity_weight", None), cfg.sparsity_weight)
        prune_at = getattr(args, "prune_at_step", None)
        if kind in (None, DISABLED) or not weight or (prune_at and self.state.global_step >= prune_at):
            kind, weight = None, 0.0
        return float(orth), kind, float(weight)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        orth_w, kind, sparsity_w = self.regularizer_weights()
        interval = getattr(self.args, "regularizer_interval", 1)
        on_step = model.training and self.state.global_step % interval == 0
        record = on_step and (orth_w or sparsity_w) and bool(self._svd_layers)
        approx_w = float(_first_set(getattr(self.args, "approx_weight", None), self.svd_config.approx_weight))
        approx_layers = self._set_approximation(bool(on_step and approx_w))
        probes = _first_set(getattr(self.args, "orth_probes", None), self.svd_config.orth_probes)
        for layer in self._svd_layers:
            layer.regularizer_terms.clear()
            layer.orth_enabled = bool(record and orth_w)
            layer.orth_probes = probes
            layer.sparsity_kind = kind if record else None
        distill = bool(model.training and self.teacher_model is not None and self.distill_alpha)
        hidden_w = float(getattr(self.args, "distill_hidden_weight", 0.0)) if distill else 0.0
        labels, mask = inputs.get("labels"), inputs.get("attention_mask")
        teacher = self._teacher_outputs(inputs, bool(hidden_w)) if distill else None  # before labels may be popped
        if hidden_w:
            inputs = {**inputs, "output_hidden_states": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if distill:
            temperature = getattr(self.args, "distill_temperature", 2.0)
            kd = distillation_loss(_logits(outputs), _logits(teacher), temperature, labels)
            kd_scale = self.distill_alpha * self._regularizer_scale(num_items_in_batch)
            loss = (1 - self.distill_alpha) * loss + (kd_scale * kd).to(loss.dtype)
            self._metrics["distill_loss"].append(kd.detach())
        if hidden_w:
            hidden = hidden_state_loss(outputs["hidden_states"], teacher["hidden_states"], mask)
            loss = loss + (hidden_w * self._regularizer_scale(num_items_in_batch) * hidden).to(loss.dtype)
            self._metrics["distill_hidden_loss"].append(hidden.detach())
        if not (approx_layers or record):  # evaluation, or a step without regularizers
            return (loss, outputs) if return_outputs else loss
        scale = interval * self._regularizer_scale(num_items_in_batch)
        if approx_layers:
            approx = approximation_total(approx_layers)
            loss = loss + (scale * approx_w * approx).to(loss.dtype)
            self._metrics["approx_loss"].append(approx.detach())
        if record:
            orth, sparsity = self._collect_terms()
            loss = loss + (scale * (orth_w * orth + sparsity_w * sparsity)).to(loss.dtype)
            self._metrics["orth_loss"].append(orth.detach())
            if kind:
                self._metrics["sparsity_loss"].append(sparsity.detach())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the terms averaged since the last one
            for key, values in self._metrics.items():
                if values:
                    logs[key] = torch.stack(values).mean().item()
                values.clear()
            logs["rank_fraction"] = _rank_fraction([*self._svd_layers, *self._cur_layers])
        super().log(logs, start_time)

    def _prepare_teacher(self, teacher: nn.Module | None) -> tuple[nn.Module | None, float]:
        """The frozen teacher on the training device and the distillation weight in force (checked up front)."""
        alpha = getattr(self.args, "distill_alpha", None)
        if teacher is None:
            if alpha:
                raise ValueError(
                    f"distill_alpha={alpha} but SVDTrainer got no teacher_model: pass "
                    "SVDTrainer(teacher_model=dense_model, ...) or leave distill_alpha unset."
                )
            return None, 0.0
        student = {id(p) for p in self.model.parameters()}
        if teacher is self.model or any(id(p) in student for p in teacher.parameters()):
            raise ValueError(
                "teacher_model shares parameters with the model being trained: pass a frozen copy made before "
                "svd_factorize_, e.g. teacher = copy.deepcopy(model)."
            )
        teacher.eval()
        return teacher.to(self.args.device), 0.5 if alpha is None else float(alpha)

    @torch.no_grad()
    def _teacher_outputs(self, inputs: dict, hidden: bool) -> dict:
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if hidden:
            teacher_inputs["output_hidden_states"] = True
        return self.teacher_model(**teacher_inputs)

    def _set_approximation(self, enabled: bool) -> list[CURLinear]:
        """Switch the CUR approximation term on (for layers still computing their dense function) or off."""
        layers = [layer for layer in self._cur_layers if isinstance(layer, CURLinear)]
        for layer in layers:
            layer.approx_terms.clear()
            layer.approx_enabled = enabled and layer.approximating
        return [layer for layer in layers if layer.approx_enabled]

    def _collect_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        terms = [t for layer in self._svd_layers for t in layer.regularizer_terms]
        for layer in self._svd_layers:
            layer.regularizer_terms.clear()
        if not terms:
            raise RuntimeError(
                "No factored layer recorded its regularizer terms in the forward pass. torch.nn.DataParallel and "
                "reentrant gradient checkpointing are not supported: launch with `accelerate launch` (DDP) and use "
                "gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
        orth = torch.stack([o for o, _ in terms]).sum()
        sparsity = torch.stack([s for _, s in terms]).sum()
        return orth, sparsity

    def _regularizer_scale(self, num_items_in_batch) -> float:
        """1 when `training_step` divides the loss by the accumulation steps, else 1 / steps.

        Mirrors `Trainer.training_step`. DDP averages gradients over processes, so a term added once per process
        counts once, as in a single-process run.
        """
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        return 1.0 / self.current_gradient_accumulation_steps if scaled else 1.0

    def _pruning_target(self) -> tuple[float | None, float | None]:
        energy, budget = getattr(self.args, "prune_energy", None), getattr(self.args, "prune_budget", None)
        if energy is None and budget is None:
            budget = self.svd_config.prune_budget
            energy = None if budget else self.svd_config.prune_energy
        return energy, budget


# Marks the optimizer groups of the singular values with their learning-rate multiple.
_S_LR_KEY = "singular_value_lr_scale"


def _scale_singular_value_lr(optimizer: torch.optim.Optimizer, ids: set[int], scale: float) -> None:
    """Move the parameters in `ids` out of each group into a copy of that group with `lr * scale`."""
    for group in list(optimizer.param_groups):
        singular = [p for p in group["params"] if id(p) in ids]
        if singular:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
            settings = {k: v for k, v in group.items() if k != "params"}
            optimizer.add_param_group({**settings, "params": singular, "lr": group["lr"] * scale, _S_LR_KEY: scale})


def _unscale_singular_value_lr(optimizer: torch.optim.Optimizer, lr_scheduler=None) -> None:
    """Put the groups `_scale_singular_value_lr` made back at the base learning rate, in the optimizer and in the
    scheduler's base rates (which a `LambdaLR`, the Trainer's schedules, multiplies at every step)."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps it
    for index, group in enumerate(optimizer.param_groups):
        scale = group.pop(_S_LR_KEY, None)  # popped: a second call (or a resumed run) changes nothing
        if not scale:
            continue
        group["lr"] /= scale
        if "initial_lr" in group:
            group["initial_lr"] /= scale
        if scheduler is not None:
            scheduler.base_lrs[index] /= scale


def _logits(outputs) -> torch.Tensor:
    """The `logits` of a model output (a `ModelOutput`: where they sit in a plain tuple depends on the labels)."""
    if not isinstance(outputs, dict) or "logits" not in outputs:
        found = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        raise ValueError(
            f"Distillation needs the models' logits in a ModelOutput, got {found}: use task models "
            "(AutoModelFor...) with return_dict=True (the default) as student and teacher."
        )
    return outputs["logits"]


def _first_set(*values):
    return next((v for v in values if v is not None), None)


def _stored_config(model: nn.Module) -> SVDConfig:
    config = getattr(model, "svd_config", None)
    if config is not None:
        return config
    stored = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    return SVDConfig.from_dict(stored["config"]) if stored else SVDConfig()


def _loss_uses_num_items(model: nn.Module) -> bool:
    """Whether the model's loss is normalized by `num_items_in_batch` (transformers' `self.loss_function`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "accepts_loss_kwargs"):
        return bool(base.accepts_loss_kwargs)
    try:
        return "loss_function" in inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return True  # cannot tell: keep the Trainer's own decision


def _rank_fraction(layers) -> float:
    """Live singular values over stored ones, across all factored layers."""
    live = sum(layer.rank for layer in layers)
    return live / max(1, sum(layer.full_rank for layer in layers))
