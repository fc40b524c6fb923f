"""`compress`: the library's recipe in one call, the one the CLI and the recipes run.

1. Calibrate: the input covariance of every target layer over the first training batches.
2. Factor every target at full rank in whitened coordinates (`svd_factorize_(..., calibration=)`), so `s_i^2` is
   the output error of dropping triplet `i`.
3. One `SVDTrainer` run, one learning-rate schedule: distillation from the dense model (logits and hidden states),
   gradual pruning to the budget by the greedy loss-per-parameter allocation from `prune_start` to `prune_end` of
   the steps, then the pruned model trains on to the last step.
4. Truncate: the model that comes back holds only the kept singular triplets.

docs/benchmarks.md measures each part (the ladder) against truncated SVD, ASVD and whitened SVD with fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .calibration import CalibrationData
from .config import SVDConfig
from .factorize import svd_factorize_
from .pruning import truncate_
from .trainer import SVDTrainer, SVDTrainingArguments


@dataclass
class CompressionArguments:
    """What `compress` does beyond the training loop (which `SVDTrainingArguments` sets).

    Args:
        budget (`float`, defaults to 0.5): Fraction of the target layers' dense parameters kept, in (0, 1).
        calibration_batches (`int`, defaults to 64): Training batches whose inputs set the whitened factors.
        prune_start (`float`, defaults to 0.2): Fraction of the steps where gradual pruning starts.
        prune_end (`float`, defaults to 0.6): Fraction of the steps where it reaches the budget; the pruned model
            trains for the rest (with one schedule, no restart).
        distill_alpha (`float`, defaults to 0.5): Weight of the logit distillation from the dense model (0: no
            teacher; the teacher is a frozen copy of the dense model, one model's memory more).
        distill_hidden_weight (`float`, defaults to 1.0): Weight of the hidden-state distillation.
    """

    budget: float = field(default=0.5, metadata={"help": "Fraction of the target layers' parameters kept."})
    calibration_batches: int = field(
        default=64, metadata={"help": "Training batches whose inputs set the whitened factors."}
    )
    prune_start: float = field(default=0.2, metadata={"help": "Fraction of the steps where gradual pruning starts."})
    prune_end: float = field(default=0.6, metadata={"help": "Fraction of the steps where the budget is reached."})
    distill_alpha: float = field(default=0.5, metadata={"help": "Logit distillation weight from the dense model."})
    distill_hidden_weight: float = field(default=1.0, metadata={"help": "Hidden-state distillation weight."})

    def __post_init__(self) -> None:
        _check_number("budget", self.budget, 0, 1, closed_right=False)
        if not (isinstance(self.calibration_batches, int) and self.calibration_batches >= 1):
            raise ValueError(f"calibration_batches={self.calibration_batches!r}: must be a positive integer.")
        _check_number("prune_start", self.prune_start, 0, 1, closed_left=True)
        _check_number("prune_end", self.prune_end, 0, 1)
        if not self.prune_start < self.prune_end:
            raise ValueError(
                f"prune_start={self.prune_start} must be below prune_end={self.prune_end}: pruning runs from the "
                "first to the second fraction of the steps."
            )
        _check_number("distill_alpha", self.distill_alpha, 0, 1, closed_left=True)
        _check_number("distill_hidden_weight", self.distill_hidden_weight, 0, float("inf"), closed_left=True)

    def pruning_steps(self, steps: int) -> tuple[int, int]:
        """`(prune_start_step, prune_at_step)` of a run of `steps` optimizer steps."""
        at = max(2, round(self.prune_end * steps))
        return min(at - 1, round(self.prune_start * steps)), at


def compress(
    model: nn.Module,
    train_dataset: Any,
    args: SVDTrainingArguments,
    compression: CompressionArguments | None = None,
    config: SVDConfig | None = None,
    data_collator: Callable | None = None,
    **trainer_kwargs: Any,
) -> nn.Module:
    """Compress `model` to `compression.budget` of its target layers' parameters, in place, and return it.

    Args:
        model (`nn.Module`): A dense task model (fine-tuned on the task, or not); it is factored, trained, pruned
            and truncated in place.
        train_dataset: The training examples (their first batches also calibrate the factors).
        args (`SVDTrainingArguments`): The training loop: `max_steps` (at least 10), learning rate, batch size,
            output_dir, seed. Its pruning and distillation fields are set from `compression`; its regularizer
            fields (`orth_weight`, `sparsity`) apply as in `SVDTrainer`.
        compression (`CompressionArguments`, *optional*): Budget, calibration, pruning schedule, distillation.
        config (`SVDConfig`, *optional*): The targets and regularizers; defaults to `compress_config()`.
        data_collator (`Callable`, *optional*): Batches examples (the padding collator of a text task).
        **trainer_kwargs: Passed to `SVDTrainer` (`eval_dataset`, `processing_class`, `compute_metrics`, ...).

    Returns:
        The compressed model (`SVDLinear` layers truncated to their kept ranks); save it with `save_compressed`.

    Raises:
        `ValueError`: bad arguments, no calibration data, or batches the model does not accept, before the model
            is changed.
    """
    compression = compression or CompressionArguments()
    config = config or compress_config()
    if not (isinstance(args.max_steps, int) and args.max_steps >= 10):
        raise ValueError(
            f"compress needs args.max_steps >= 10 (got {args.max_steps}): it prunes gradually over the run; e.g. 150."
        )
    if len(train_dataset) == 0:
        raise ValueError("compress got an empty train_dataset: it trains and calibrates on it.")
    start, at = compression.pruning_steps(args.max_steps)
    run_args = dataclasses.replace(
        args,
        prune_start_step=start,
        prune_at_step=at,
        prune_budget=compression.budget,
        prune_energy=None,
        distill_alpha=compression.distill_alpha,
        distill_hidden_weight=compression.distill_hidden_weight,
    )
    teacher = copy.deepcopy(model).eval() if compression.distill_alpha or compression.distill_hidden_weight else None
    batch = args.per_device_train_batch_size
    calibration = CalibrationData(train_dataset, data_collator, batch, compression.calibration_batches)
    svd_factorize_(model, config, calibration=calibration)
    trainer = SVDTrainer(
        model=model,
        args=run_args,
        train_dataset=train_dataset,
        data_collator=data_collator,
        teacher_model=teacher,
        **trainer_kwargs,
    )
    trainer.train()
    truncate_(model)
    return model


def compress_config(**overrides: Any) -> SVDConfig:
    """The `SVDConfig` of `compress`: per-architecture targets, greedy allocation, no regularizer terms.

    The orthogonality and sparsity terms are off: the ablation in docs/benchmarks.md measured neither helping at
    these step counts (orthogonality is also the costliest part of a step). Turn them on with `orth_weight` and
    `sparsity` here or in `SVDTrainingArguments`.
    """
    settings = {"orth_weight": 0.0, "sparsity": None, "prune_allocation": "greedy", **overrides}
    return SVDConfig(**settings)


def _check_number(
    name: str, value: Any, low: float, high: float, closed_left: bool = False, closed_right: bool = True
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (value >= low if closed_left else value > low) and (value <= high if closed_right else value < high)
    if not ok or value != value or value == float("inf"):
        left, right = "[" if closed_left else "(", "]" if closed_right else ")"
        raise ValueError(
            f"CompressionArguments.{name}={value!r}: must be a finite number in {left}{low}, {high}{right}."
        )
