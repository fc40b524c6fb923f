"""`SVDTrainer`: the HF `Trainer` plus the regularizers of SVD training and optional distillation."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import Trainer

from hf_svd_compress.config import SVDConfig
from hf_svd_compress.core.factorize import stored_svd_config
from hf_svd_compress.layers.base import FactoredLayer, RegularizerSettings, factored_modules
from hf_svd_compress.training.arguments import effective_config
from hf_svd_compress.training.callbacks import SVDPruningCallback
from hf_svd_compress.training.distillation import distillation_loss, hidden_state_loss
from hf_svd_compress.training.optimizer import scale_singular_value_lr


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
        self._layers = list(factored_modules(self.model).values())
        if not self._layers:
            raise ValueError(
                "SVDTrainer got a model without factored layers (SVDLinear or CURLinear, ...): call "
                "svd_factorize_(model, SVDConfig(...)) before building the trainer (and before accelerator.prepare)."
            )
        # The one source of the SVD settings: the model's config with the arguments' overrides.
        self.svd_config = effective_config(svd_config or stored_svd_config(self.model), self.args)
        # A BERT head accepts **kwargs but returns a plain mean loss: the Trainer would then skip the division by
        # the accumulation steps (and scale by the process count). Treat such a loss as a per-batch mean.
        self.model_accepts_loss_kwargs = self.model_accepts_loss_kwargs and _loss_uses_num_items(self.model)
        self._metrics: dict[str, list[torch.Tensor]] = {
            name: [] for name in ("orth_loss", "sparsity_loss", "approx_loss", "distill_loss", "distill_hidden_loss")
        }
        self._add_pruning_callback()

    def _add_pruning_callback(self) -> None:
        prune_at = getattr(self.args, "prune_at_step", None)
        start = getattr(self.args, "prune_start_step", None)
        if start is not None and not prune_at:
            raise ValueError(
                "--prune_start_step is set without --prune_at_step: set prune_at_step (the step where gradual "
                "pruning reaches its target) or unset prune_start_step."
            )
        if prune_at:
            cfg = self.svd_config
            energy = None if cfg.prune_budget else cfg.prune_energy
            pruning = SVDPruningCallback(
                prune_at, energy, cfg.prune_budget, cfg.prune_rank_multiple, start, cfg.prune_allocation
            )
            self.add_callback(pruning)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the singular values in their own groups at a scaled learning rate."""
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        scale = getattr(self.args, "singular_value_lr_scale", 1.0)
        if created and scale != 1.0:
            ids = {id(p) for layer in self._layers for p in layer.spectral_parameters()}
            scale_singular_value_lr(optimizer, ids, scale)
        return optimizer

    def regularizer_weights(self) -> tuple[float, str | None, float]:
        """`(orth_weight, sparsity_kind, sparsity_weight)` in force at the current step."""
        cfg = self.svd_config
        kind, weight = cfg.sparsity, cfg.sparsity_weight
        prune_at = getattr(self.args, "prune_at_step", None)
        if kind is None or not weight or (prune_at and self.state.global_step >= prune_at):
            kind, weight = None, 0.0
        return float(cfg.orth_weight), kind, float(weight)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        interval = getattr(self.args, "regularizer_interval", 1)
        weights, recording = self._configure_regularizers(model.training and self.state.global_step % interval == 0)
        distill = bool(model.training and self.teacher_model is not None and self.distill_alpha)
        hidden_w = float(getattr(self.args, "distill_hidden_weight", 0.0)) if distill else 0.0
        labels, mask = inputs.get("labels"), inputs.get("attention_mask")
        teacher = self._teacher_outputs(inputs, bool(hidden_w)) if distill else None  # before labels may be popped
        if hidden_w:
            inputs = {**inputs, "output_hidden_states": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        scale = self._regularizer_scale(num_items_in_batch) if distill or recording else 1.0
        if distill:
            temperature = getattr(self.args, "distill_temperature", 2.0)
            kd = distillation_loss(_logits(outputs), _logits(teacher), temperature, labels)
            loss = (1 - self.distill_alpha) * loss + (self.distill_alpha * scale * kd).to(loss.dtype)
            self._metrics["distill_loss"].append(kd.detach())
        if hidden_w:
            hidden = hidden_state_loss(outputs["hidden_states"], teacher["hidden_states"], mask)
            loss = loss + (hidden_w * scale * hidden).to(loss.dtype)
            self._metrics["distill_hidden_loss"].append(hidden.detach())
        if recording:  # a training step with regularizers
            terms = self._collect_terms(recording)
            penalty = sum(weights[name] * term for name, term in terms.items())
            loss = loss + (interval * scale * penalty).to(loss.dtype)
            for name, term in terms.items():
                self._metrics[name].append(term.detach())
        return (loss, outputs) if return_outputs else loss

    def _configure_regularizers(self, on_step: bool) -> tuple[dict[str, float], list[FactoredLayer]]:
        """Tell every layer which terms to record in this forward pass; returns the weights, the recording layers."""
        cfg = self.svd_config
        orth_w, kind, sparsity_w = self.regularizer_weights()
        spectral = on_step and bool(orth_w or sparsity_w)
        settings = RegularizerSettings(
            orth=bool(spectral and orth_w),
            orth_probes=cfg.orth_probes,
            sparsity=kind if spectral else None,
            approx=bool(on_step and cfg.approx_weight),
        )
        recording = [layer for layer in self._layers if layer.configure_regularizers(settings)]
        weights = {"orth_loss": orth_w, "sparsity_loss": sparsity_w, "approx_loss": float(cfg.approx_weight)}
        return weights, recording

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the terms averaged since the last one
            for key, values in self._metrics.items():
                if values:
                    logs[key] = torch.stack(values).mean().item()
                values.clear()
            logs["rank_fraction"] = _rank_fraction(self._layers)
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

    def _collect_terms(self, recording: list[FactoredLayer]) -> dict[str, torch.Tensor]:
        """The terms the recording layers computed in the forward pass, summed per name; clears them."""
        totals: dict[str, list[torch.Tensor]] = {}
        for layer in recording:
            for name, term in layer.pop_terms().items():
                totals.setdefault(name, []).append(term)
        if not totals:
            raise RuntimeError(
                "No factored layer recorded its regularizer terms in the forward pass. torch.nn.DataParallel and "
                "reentrant gradient checkpointing are not supported: launch with `accelerate launch` (DDP) and use "
                "gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
        return {name: torch.stack(terms).sum() for name, terms in totals.items()}

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


def _logits(outputs) -> torch.Tensor:
    """The `logits` of a model output (a `ModelOutput`: where they sit in a plain tuple depends on the labels)."""
    if not isinstance(outputs, dict) or "logits" not in outputs:
        found = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        raise ValueError(
            f"Distillation needs the models' logits in a ModelOutput, got {found}: use task models "
            "(AutoModelFor...) with return_dict=True (the default) as student and teacher."
        )
    return outputs["logits"]


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
