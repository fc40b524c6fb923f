"""`compress`: the library's recipe in one call, the one the CLI and the recipes run.

1. Calibrate: the input covariance of every target layer over the first training batches.
2. Factor every target at full rank in whitened coordinates (`svd_factorize_(..., calibration=)`), so `s_i^2` is
   the output error of dropping triplet `i`.
3. Cut to the budget (one energy threshold for every layer, in whitened coordinates) and truncate.
4. One `SVDTrainer` run, one learning-rate schedule: the factors `U`, `s`, `V` of the truncated model train with
   distillation from the dense model (logits and hidden states).

`schedule="gradual"` instead prunes while training (SVD training proper: from 20% to 60% of the steps, then the
pruned model trains on); `prune_allocation="greedy"` ranks triplets by `s_i^2 / (m + n)` across layers. The ladder
measured both below the defaults (docs/benchmarks.md).

docs/benchmarks.md measures each part (the ladder) against truncated SVD, ASVD and whitened SVD with fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from hf_svd_compress.config import FIELD_RULES, SVDConfig
from hf_svd_compress.core.calibration import CalibrationData, activation_scales
from hf_svd_compress.core.factorize import svd_factorize_
from hf_svd_compress.core.pruning import prune_, truncate_
from hf_svd_compress.training.arguments import SVDTrainingArguments
from hf_svd_compress.training.trainer import SVDTrainer
from hf_svd_compress.validation import choice, number

INITS = ("whitened", "asvd", "svd")
# When the budget is reached: "gradual" prunes while training (SVD training, from 20% to 60% of the steps by
# default); "at_start" cuts to the budget right after factoring and trains the truncated model for every step.
SCHEDULES = ("gradual", "at_start")
# Where gradual pruning starts and reaches the budget, as fractions of the run, unless the arguments set the steps.
PRUNE_START, PRUNE_END = 0.2, 0.6
DEFAULT_BUDGET = 0.5
# Fewest training steps compress accepts: it trains (and, gradually, prunes) the factors over them.
MIN_SVD_STEPS = 10


def compress(
    model: nn.Module,
    train_dataset: Any,
    args: SVDTrainingArguments,
    budget: float | None = None,
    config: SVDConfig | None = None,
    data_collator: Callable | None = None,
    init: str = "whitened",
    calibration_batches: int = 64,
    truncate: bool = True,
    schedule: str = "at_start",
    **trainer_kwargs: Any,
) -> nn.Module:
    """Compress `model` to `budget` of its target layers' parameters, in place, and return it.

    Args:
        model (`nn.Module`): A dense task model (fine-tuned on the task, or not); it is factored, trained, pruned
            and truncated in place.
        train_dataset: The training examples (their first batches also calibrate the factors).
        args (`SVDTrainingArguments`): The training loop: `max_steps` (at least 10), learning rate, batch size,
            output_dir, seed. With `schedule="gradual"`, unless set, pruning runs from 20% (`prune_start_step`) to
            60% of the steps (`prune_at_step`), where it reaches the budget. `distill_alpha` 0 turns the teacher
            off (default 0.5, with `distill_hidden_weight` 1.0); the regularizer fields override `config`'s, as in
            `SVDTrainer`.
        budget (`float`, *optional*): Fraction of the target layers' dense parameters kept, in (0, 1); default
            `args.prune_budget`, else 0.5.
        config (`SVDConfig`, *optional*): The targets and regularizers; defaults to `compress_config()`.
        data_collator (`Callable`, *optional*): Batches examples (the padding collator of a text task).
        init (`str`, defaults to `"whitened"`): The factors training starts from: `"whitened"` (SVD-LLM, from the
            input covariances of `calibration_batches` training batches), `"asvd"` (ASVD's activation scales) or
            `"svd"` (the plain SVD of the weights).
        calibration_batches (`int`, defaults to 64): Training batches of `args.per_device_train_batch_size` that
            calibrate a data-aware `init`.
        truncate (`bool`, defaults to `True`): Slice the pruned triplets off at the end; `False` leaves them masked
            with `schedule="gradual"` (`"at_start"` truncates before training, which makes its steps cheaper).
        schedule (`str`, defaults to `"at_start"`): `"at_start"` cuts to the budget right after factoring
            (`config.prune_allocation`) and trains the truncated model for every step (cheaper steps;
            `prune_start_step` / `prune_at_step` must be unset); `"gradual"` prunes while training (see `args`).
        **trainer_kwargs: Passed to `SVDTrainer` (`eval_dataset`, `processing_class`, `compute_metrics`, ...).

    Returns:
        The compressed model (`SVDLinear` layers at their kept ranks); save it with `save_compressed`.

    Raises:
        `ValueError`: bad arguments, no training data, or calibration batches the model does not accept, all before
            the model is changed.
    """
    config = config or compress_config()
    budget = number("budget", _first_set(budget, args.prune_budget, DEFAULT_BUDGET), **FIELD_RULES["prune_budget"])
    choice("init", init, INITS)
    choice("schedule", schedule, SCHEDULES)
    if schedule == "at_start" and (args.prune_at_step is not None or args.prune_start_step is not None):
        raise ValueError(
            "compress(schedule='at_start') cuts before training: unset prune_at_step / prune_start_step, or use "
            "schedule='gradual'."
        )
    number(
        "args.max_steps",
        args.max_steps,
        minimum=MIN_SVD_STEPS,
        integer=True,
        hint="it trains the factors over them, e.g. 150",
    )
    if train_dataset is None or len(train_dataset) == 0:
        raise ValueError("compress got no training examples: it trains (and calibrates) on train_dataset.")
    if args.prune_energy is not None:
        raise ValueError(
            f"compress prunes to a budget, not to an energy (prune_energy={args.prune_energy}): set budget (or "
            "prune_budget), or prune a saved factored model by energy with `hf-svd-compress prune --energy`."
        )
    pruning = _schedule(args) if schedule == "gradual" else {}
    run_args = dataclasses.replace(args, prune_budget=budget if pruning else None, **pruning)
    teacher = copy.deepcopy(model).eval() if run_args.distill_alpha != 0 else None
    if init == "whitened":
        data = CalibrationData(train_dataset, data_collator, args.per_device_train_batch_size, calibration_batches)
        svd_factorize_(model, config, calibration=data)
    elif init == "asvd":
        batch = args.per_device_train_batch_size
        scales = activation_scales(model, train_dataset, config, data_collator, batch, calibration_batches)
        svd_factorize_(model, config, input_scales=scales)
    else:
        svd_factorize_(model, config)
    if schedule == "at_start":
        prune_(model, budget=budget, rank_multiple=config.prune_rank_multiple, allocation=config.prune_allocation)
        truncate_(model)
    trainer = SVDTrainer(
        model=model,
        args=run_args,
        train_dataset=train_dataset,
        data_collator=data_collator,
        teacher_model=teacher,
        **trainer_kwargs,
    )
    trainer.train()
    if truncate:
        truncate_(model)
    return model


def _schedule(args: SVDTrainingArguments) -> dict[str, Any]:
    """The pruning steps: the arguments' own, else gradual from `PRUNE_START` to `PRUNE_END` of the run."""
    if args.prune_at_step is not None:
        return {}
    at = max(2, round(PRUNE_END * args.max_steps))
    start = args.prune_start_step if args.prune_start_step is not None else round(PRUNE_START * args.max_steps)
    return {"prune_at_step": at, "prune_start_step": min(start, at - 1)}


def _first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def compress_config(**overrides: Any) -> SVDConfig:
    """The `SVDConfig` of `compress`: per-architecture targets, one energy threshold, no regularizer terms.

    The orthogonality and sparsity terms are off: the ablation in docs/benchmarks.md measured neither helping at
    these step counts (orthogonality is also the costliest part of a step). Turn them on with `orth_weight` and
    `sparsity` here or in `SVDTrainingArguments`.
    """
    settings = {"orth_weight": 0.0, "sparsity": None, "prune_allocation": "threshold", **overrides}
    return SVDConfig(**settings)
