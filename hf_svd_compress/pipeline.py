"""The whole compression pipeline: dense fine-tune, factor, train with regularizers, prune, fine-tune, export.

Shared by the `hf-svd-compress compress` command and the recipes; the task-specific part (model, data, collator,
metrics) comes in as a `TaskSetup`.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import Trainer, TrainingArguments

from .calibration import activation_scales
from .config import SVDConfig
from .export import _holds_model, save_compressed
from .factorize import svd_factorize_, svd_layers
from .pruning import prune_, truncate_
from .trainer import SVDTrainer, SVDTrainingArguments

SUMMARY_FILE = "compression_summary.json"
_ON = ("1", "true", "yes")


@dataclass
class PipelineArguments:
    """Stages of the pipeline and what to factor; the training settings come from `SVDTrainingArguments`."""

    dense_steps: int = field(default=0, metadata={"help": "Dense fine-tuning steps before factoring (0 skips)."})
    svd_steps: int = field(default=100, metadata={"help": "Steps of SVD training with the regularizers."})
    finetune_steps: int = field(default=50, metadata={"help": "Fine-tuning steps after pruning (sparsity off)."})
    target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names (exact or .suffix), 're:<regex>' for a full-name regex, or "
            "'all-linear'. Unset: the default for the model type."
        },
    )
    export_dir: str | None = field(
        default=None, metadata={"help": "Where the compressed model is written. Default: <output_dir>/compressed."}
    )
    overwrite_export: bool = field(
        default=False, metadata={"help": "Replace a model already in export_dir (refused otherwise)."}
    )
    data_aware_init: bool = field(
        default=False,
        metadata={
            "help": "Start SVD training from data-aware factors (ASVD's basis, from the inputs of "
            "calibration_batches training batches) instead of the plain SVD."
        },
    )
    calibration_batches: int = field(
        default=64, metadata={"help": "Training batches whose inputs set the data-aware factors."}
    )
    finetune_lr_scale: float = field(
        default=1.0,
        metadata={"help": "Learning rate of the fine-tuning stage, as a multiple of --learning_rate."},
    )

    def __post_init__(self) -> None:
        for name in ("dense_steps", "svd_steps", "finetune_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} {getattr(self, name)}: must be >= 0.")
        if self.calibration_batches < 1:
            raise ValueError(f"--calibration_batches {self.calibration_batches}: must be >= 1.")
        if not self.finetune_lr_scale > 0:
            raise ValueError(f"--finetune_lr_scale {self.finetune_lr_scale}: must be > 0.")

    def svd_config(self, args: SVDTrainingArguments) -> SVDConfig:
        """The `SVDConfig` for these targets and the regularizer/pruning settings in `args`."""
        targets: list[str] | str | None = self.target_modules
        if targets and targets.startswith("re:"):
            targets = targets[3:]
        elif targets and targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        settings = {
            "orth_weight": args.orth_weight,
            "orth_probes": args.orth_probes,
            "sparsity": None if args.sparsity == "none" else args.sparsity,
            "sparsity_weight": args.sparsity_weight,
            "prune_energy": args.prune_energy,
            "prune_budget": args.prune_budget,
            "prune_rank_multiple": args.prune_rank_multiple,
        }
        defaults = dataclasses.asdict(SVDConfig())
        return SVDConfig(
            target_modules=targets,
            **{k: (defaults[k] if v is None and k != "sparsity" else v) for k, v in settings.items()},
        )


@dataclass
class TaskSetup:
    """What a task hands to the pipeline: a model (dense), data, and how to batch and score it."""

    model: torch.nn.Module
    train_dataset: Any
    eval_dataset: Any
    test_dataset: Any = None
    data_collator: Any = None
    processing_class: Any = None
    compute_metrics: Any = None
    task: str = "classification"
    base_model: str = ""


def stage(message: str, args: TrainingArguments) -> None:
    """One short progress line per stage, printed by the main process only."""
    if args.process_index == 0:
        print(f"[hf-svd-compress] {message}", flush=True)


def check_export_dir(pipeline_args: PipelineArguments, args: TrainingArguments) -> Path:
    """Refuse, before any training, an export folder that already holds a model (unless overwriting)."""
    export_dir = Path(pipeline_args.export_dir or Path(args.output_dir) / "compressed")
    if _holds_model(export_dir) and not pipeline_args.overwrite_export:
        raise FileExistsError(
            f"{export_dir} already holds a model. Choose another --export_dir (or --output_dir), or pass "
            "--overwrite_export to replace it."
        )
    return export_dir


def end_processes() -> None:
    """Shut the process group down at the end of a job run with several processes (a no-op in one process).

    Call it last in a script, once no trainer is referenced any more. A gloo group left to interpreter exit, or to
    the release of a DDP-wrapped model that still holds it, joins its worker threads while holding the GIL, and a
    worker that needs the GIL to free a finished collective then hangs or aborts the process (SIGABRT, "terminate
    called without an active exception"; pytorch/pytorch#179291). Destroyed here, after the unreachable trainers
    are collected, the group is freed while its workers are idle.
    """
    gc.collect()  # a Trainer sits in reference cycles: collect it, and its DDP wrapper's hold on the group, first
    PartialState().destroy_process_group()


def check_unsharded(args: TrainingArguments) -> None:
    """Refuse FSDP and DeepSpeed before any training: the pipeline truncates the model between stages in place.

    Both wrap the model's modules in place (FSDP1 auto-wrap, FSDP2 `fully_shard`, ZeRO partitions), so slicing
    `U`, `s`, `V` between two Trainers would corrupt the sharded state. `SVDTrainer` itself supports them.
    """
    from_env = [v for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED") if os.environ.get(v, "").lower() in _ON]
    if args.fsdp or args.deepspeed or from_env:
        raise ValueError(
            "The compression pipeline (hf-svd-compress compress, recipes/) runs under DDP or in one process, not "
            f"under FSDP or DeepSpeed (found: {from_env or 'fsdp/deepspeed in the training arguments'}): it prunes "
            "and truncates the model between stages. Launch it with recipes/accelerate_configs/multi_gpu.yaml, or "
            "use SVDTrainer with prune_at_step in your own script for sharded training (docs/howto.md)."
        )


def check_gradual(pipeline_args: PipelineArguments, args: SVDTrainingArguments, config: SVDConfig) -> None:
    """Refuse, before any training, a gradual-pruning start or a pruning step outside the SVD stage, or gradual
    pruning without a budget."""
    start, at, steps = args.prune_start_step, args.prune_at_step, pipeline_args.svd_steps
    if at is not None and not 1 <= at <= steps:
        raise ValueError(
            f"--prune_at_step {at}: in the pipeline it is a step of the SVD stage ({steps} steps, --svd_steps), "
            f"where pruning reaches its target; use 1 to {steps}, e.g. {max(1, 3 * steps // 5)}."
        )
    if start is not None and not config.prune_budget:
        raise ValueError(
            f"--prune_start_step {start} prunes gradually, which needs a budget target: add --prune_budget (e.g. "
            "0.5); an energy target would compound over the cuts."
        )
    if start is not None and not start < steps:
        raise ValueError(
            f"--prune_start_step {start}: the SVD stage has {steps} steps (--svd_steps) and prunes gradually from "
            f"prune_start_step to --prune_at_step (default: its last step); use a start below {steps}, e.g. "
            f"{steps // 5}."
        )


def run_compression(setup: TaskSetup, pipeline_args: PipelineArguments, args: SVDTrainingArguments) -> dict:
    """Run every stage and export; returns (and writes next to the export) a summary of what happened."""
    check_unsharded(args)
    export_dir = check_export_dir(pipeline_args, args)
    config = pipeline_args.svd_config(args)
    check_gradual(pipeline_args, args, config)
    model, summary = setup.model, {"accuracy": {}, "base_model": setup.base_model, "task": setup.task}
    start = time.perf_counter()

    if pipeline_args.dense_steps:
        stage(f"1/5 dense fine-tuning for {pipeline_args.dense_steps} steps", args)
        _train(Trainer, setup, _stage_args(args, pipeline_args.dense_steps, "dense"))
    eval_args = _stage_args(args, args.max_steps, "eval")  # no pruning fields: evaluation only
    summary["accuracy"]["dense"] = _evaluate(Trainer, setup, eval_args)
    summary["parameters_dense"] = sum(p.numel() for p in model.parameters())
    # With distillation the dense model, as it is now, teaches the factored one in the SVD and fine-tuning stages.
    teacher = copy.deepcopy(model).eval() if args.distill_alpha else None

    scales = None
    if pipeline_args.data_aware_init:  # the same first batches on every process: the same factors everywhere
        batch = args.per_device_train_batch_size
        scales = activation_scales(
            model, setup.train_dataset, config, setup.data_collator, batch, pipeline_args.calibration_batches
        )
    stage(f"2/5 factoring the target layers (full-rank {'data-aware ' if scales else ''}SVD)", args)
    svd_factorize_(model, config, input_scales=scales)
    summary["spectra_initial"] = _spectra(model)

    how = {"method": "budget", "budget": config.prune_budget} if config.prune_budget else None
    how = how or {"method": "energy", "energy": config.prune_energy}
    if config.prune_rank_multiple > 1:
        how["rank_multiple"] = config.prune_rank_multiple
    # The SVD stage itself prunes (gradually from prune_start_step, or once) up to prune_at_step, by default its
    # last step; after that step it trains the pruned model with the sparsity term off.
    in_svd_stage = args.prune_start_step is not None or args.prune_at_step is not None
    if args.prune_start_step is not None:
        how["gradual_from_step"] = args.prune_start_step
    if args.prune_at_step is not None:
        how["at_svd_step"] = args.prune_at_step
    svd_overrides = _svd_stage_pruning(args, pipeline_args, config) if in_svd_stage else {}
    stage(f"3/5 SVD training with regularizers for {pipeline_args.svd_steps} steps", args)
    _train(SVDTrainer, setup, _stage_args(args, pipeline_args.svd_steps, "svd", **svd_overrides), teacher)
    summary["spectra_trained"] = _spectra(model)
    _save_factored(setup, Path(args.output_dir) / "factored", args)
    summary["accuracy"]["factored"] = _evaluate(SVDTrainer, setup, eval_args, teacher)

    stage(f"4/5 pruning singular values ({how}) and fine-tuning {pipeline_args.finetune_steps} steps", args)
    if not in_svd_stage:  # a second energy cut would prune the already pruned spectra further
        prune_(
            model,
            energy=how.get("energy"),
            budget=how.get("budget"),
            rank_multiple=config.prune_rank_multiple,
            allocation=config.prune_allocation,
        )
    summary["ranks"] = truncate_(model)
    summary["accuracy"]["pruned"] = _evaluate(SVDTrainer, setup, eval_args, teacher)
    if pipeline_args.finetune_steps:
        ft_args = _stage_args(
            args,
            pipeline_args.finetune_steps,
            "finetune",
            sparsity="none",
            singular_value_lr_scale=1.0,
            learning_rate=args.learning_rate * pipeline_args.finetune_lr_scale,
        )
        _train(SVDTrainer, setup, ft_args, teacher)
    summary["accuracy"]["compressed"] = _evaluate(SVDTrainer, setup, eval_args, teacher)
    summary["wall_time_s"] = round(time.perf_counter() - start, 1)

    stage(f"5/5 exporting to {export_dir}", args)
    if args.process_index == 0:
        save_compressed(
            model,
            export_dir,
            processing_class=setup.processing_class,
            rank_selection=how,
            training_settings=_training_settings(pipeline_args, args),
            overwrite=pipeline_args.overwrite_export,
        )
        (export_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        _print_result(summary, export_dir)
    return summary


def _svd_stage_pruning(args: SVDTrainingArguments, pipeline_args: PipelineArguments, config: SVDConfig) -> dict:
    """Stage-3 arguments that prune (gradually from `args.prune_start_step`, or once) up to `args.prune_at_step`,
    by default the SVD stage's last step."""
    return {
        "prune_start_step": args.prune_start_step,
        "prune_at_step": args.prune_at_step or pipeline_args.svd_steps,
        "prune_energy": None if config.prune_budget else config.prune_energy,
        "prune_budget": config.prune_budget,
        "prune_rank_multiple": config.prune_rank_multiple,
    }


def _save_factored(setup: TaskSetup, folder: Path, args: TrainingArguments) -> None:
    """The regularized, unpruned model, for `hf-svd-compress prune` to re-prune at another energy or budget."""
    if args.process_index == 0:
        setup.model.save_pretrained(folder)
        if setup.processing_class is not None:
            setup.processing_class.save_pretrained(folder)


def _stage_args(args: SVDTrainingArguments, steps: int, name: str, **overrides) -> SVDTrainingArguments:
    """A copy of the user's arguments for one stage: its own step count and output subfolder."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    # The pipeline prunes between stages itself, so no stage prunes during training.
    values.update(max_steps=steps, output_dir=str(Path(args.output_dir) / name), prune_at_step=None)
    values.update({"prune_start_step": None, **overrides})
    return type(args)(**values)


def _train(trainer_cls, setup: TaskSetup, args: TrainingArguments, teacher: torch.nn.Module | None = None) -> None:
    trainer = _trainer(trainer_cls, setup, args, teacher)
    trainer.train()


def _trainer(
    trainer_cls, setup: TaskSetup, args: TrainingArguments, teacher: torch.nn.Module | None = None
) -> Trainer:
    extra = {"teacher_model": teacher} if trainer_cls is SVDTrainer else {}
    return trainer_cls(
        model=setup.model,
        args=args,
        train_dataset=setup.train_dataset,
        eval_dataset=setup.eval_dataset,
        data_collator=setup.data_collator,
        processing_class=setup.processing_class,
        compute_metrics=setup.compute_metrics,
        **extra,
    )


def _evaluate(
    trainer_cls, setup: TaskSetup, args: TrainingArguments, teacher: torch.nn.Module | None = None
) -> dict[str, float]:
    """Validation (and test, if given) metrics of the model as it is now (a teacher only satisfies the trainer's
    distillation check: evaluation reports the task loss)."""
    trainer = _trainer(trainer_cls, setup, args, teacher)
    results = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items() if "accuracy" in k or "f1" in k}
    if setup.test_dataset is not None:
        test = trainer.evaluate(setup.test_dataset, metric_key_prefix="test")
        results.update({k: v for k, v in test.items() if "accuracy" in k or "f1" in k})
    return results


def _spectra(model: torch.nn.Module) -> dict[str, list[float]]:
    layers = svd_layers(model).items()
    return {name: layer.s.detach().float().abs().sort(descending=True).values.tolist() for name, layer in layers}


def _training_settings(pipeline_args: PipelineArguments, args: SVDTrainingArguments) -> dict[str, Any]:
    keys = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "orth_weight")
    keys += ("sparsity", "sparsity_weight", "singular_value_lr_scale", "distill_alpha", "distill_temperature", "seed")
    return {**dataclasses.asdict(pipeline_args), **{k: getattr(args, k) for k in keys}}


def _print_result(summary: dict, export_dir: Path) -> None:
    acc = summary["accuracy"]
    line = ", ".join(f"{stage}: {m.get('accuracy', float('nan')):.4f}" for stage, m in acc.items())
    print(f"[hf-svd-compress] validation accuracy - {line}")
    if "test_accuracy" in acc["compressed"]:
        print(
            f"[hf-svd-compress] test accuracy - dense {acc['dense']['test_accuracy']:.4f}, "
            f"compressed {acc['compressed']['test_accuracy']:.4f}"
        )
    ranks = summary["ranks"]
    mean_rank = sum(ranks.values()) / max(1, len(ranks))
    print(f"[hf-svd-compress] {len(ranks)} factored layers, mean rank {mean_rank:.1f}; wrote {export_dir}")
