"""The whole compression pipeline: dense fine-tune, `compress` (whitened factors cut to the budget, then trained with
distillation; or pruned gradually while training), an optional extra fine-tuning stage, export.

Shared by the `hf-svd-compress compress` command and the recipes; the task-specific part (model, data, collator,
metrics) comes in as a `TaskSetup`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_svd_compress.config import SVDConfig
from hf_svd_compress.core.factorize import target_names
from hf_svd_compress.core.pruning import truncate_
from hf_svd_compress.hub.save import export_file_names, save_compressed
from hf_svd_compress.hub.staging import check_no_foreign_files, holds_model
from hf_svd_compress.layers.svd import svd_layers
from hf_svd_compress.training.arguments import SVDTrainingArguments
from hf_svd_compress.training.compress import (
    DEFAULT_BUDGET,
    INITS,
    MIN_SVD_STEPS,
    SCHEDULES,
    compress,
    compress_config,
)
from hf_svd_compress.training.trainer import SVDTrainer
from hf_svd_compress.validation import COUNT, NON_NEGATIVE, POSITIVE, check_fields, choice, refuse

SUMMARY_FILE = "compression_summary.json"
_ON = ("1", "true", "yes")

# How each numeric pipeline field is checked (`validation.number`).
_RULES: dict[str, dict] = {
    "dense_steps": {**NON_NEGATIVE, "integer": True, "hint": "0 skips the stage"},
    "svd_steps": {"minimum": MIN_SVD_STEPS, "integer": True, "hint": "e.g. 150"},
    "finetune_steps": {**NON_NEGATIVE, "integer": True, "hint": "0: none"},
    "calibration_batches": {**COUNT, "hint": "e.g. 64"},
    "finetune_lr_scale": {**POSITIVE, "hint": "e.g. 1.0"},
}


@dataclass
class PipelineArguments:
    """Stages of the pipeline and what to factor; the training settings come from `SVDTrainingArguments`."""

    dense_steps: int = field(default=0, metadata={"help": "Dense fine-tuning steps before factoring (0 skips)."})
    svd_steps: int = field(
        default=150,
        metadata={
            "help": "Steps of SVD training (compress): the whitened factors, cut to the budget (--schedule), train "
            "with distillation from the dense model, in one learning-rate schedule."
        },
    )
    finetune_steps: int = field(
        default=0, metadata={"help": "Extra fine-tuning steps after compress, in a new schedule (0: none)."}
    )
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
    init: str = field(
        default="whitened",
        metadata={
            "help": "Factors SVD training starts from: 'whitened' (SVD-LLM, from the input covariances of "
            "calibration_batches training batches), 'asvd' (ASVD's activation scales) or 'svd' (plain SVD)."
        },
    )
    calibration_batches: int = field(
        default=64, metadata={"help": "Training batches whose inputs set the data-aware factors."}
    )
    schedule: str = field(
        default="at_start",
        metadata={
            "help": "'at_start': cut to the budget right after factoring, then train the truncated factors; "
            "'gradual': prune while training (--prune_start_step to --prune_at_step, default 20% to 60%)."
        },
    )
    finetune_lr_scale: float = field(
        default=1.0,
        metadata={"help": "Learning rate of the extra fine-tuning stage, as a multiple of --learning_rate."},
    )

    def __post_init__(self) -> None:
        check_fields(self, _RULES, "--")
        self.init = choice("--init", self.init, INITS)
        self.schedule = choice("--schedule", self.schedule, SCHEDULES)
        targets = self.targets()
        if isinstance(targets, str) and targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as err:
                raise refuse(
                    "--target_modules", self.target_modules, f"not a valid regex ({err}); e.g. 're:.*\\.(query|value)'"
                ) from None
        if targets == []:
            raise refuse("--target_modules", self.target_modules, "name at least one module, e.g. query,value")

    def targets(self) -> list[str] | str | None:
        """`--target_modules` as `SVDConfig.target_modules`: a list of names, a regex (`re:` prefix) or a keyword."""
        if not self.target_modules or self.target_modules == "all-linear":
            return self.target_modules
        if self.target_modules.startswith("re:"):
            return self.target_modules[3:]
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    def svd_config(self, args: SVDTrainingArguments) -> SVDConfig:
        """The `SVDConfig` for these targets and the regularizer/pruning settings in `args`."""
        targets = self.targets()
        settings = {
            "orth_weight": args.orth_weight,
            "orth_probes": args.orth_probes,
            "sparsity": None if args.sparsity == "none" else args.sparsity,
            "sparsity_weight": args.sparsity_weight,
            "prune_budget": args.prune_budget or DEFAULT_BUDGET,
            "prune_rank_multiple": args.prune_rank_multiple,
        }
        return compress_config(target_modules=targets, **{k: v for k, v in settings.items() if v is not None})


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
    if args.process_index == 0:  # once per run: PartialState().print prints once per node
        print(f"[hf-svd-compress] {message}", flush=True)


def export_path(pipeline_args: PipelineArguments, args: TrainingArguments) -> Path:
    """`--export_dir`, by default `<output_dir>/compressed`."""
    return Path(pipeline_args.export_dir or Path(args.output_dir) / "compressed")


def check_export_dir(pipeline_args: PipelineArguments, args: TrainingArguments, processing_class: Any = None) -> Path:
    """Refuse, before any training, an export folder the export would fail on or lose a file in.

    That is a folder already holding a model (unless `--overwrite_export`), files of the user's that the export
    would replace (a README.md, say), or a folder that cannot be written (nor `--output_dir`).
    """
    export_dir = export_path(pipeline_args, args)
    if holds_model(export_dir) and not pipeline_args.overwrite_export:
        raise FileExistsError(
            f"{export_dir} already holds a model. Choose another --export_dir (or --output_dir), or pass "
            "--overwrite_export to replace it."
        )
    names = [*export_file_names(processing_class), SUMMARY_FILE]
    check_no_foreign_files(export_dir, names, what=f"--export_dir {export_dir}")
    check_writable(Path(args.output_dir), "--output_dir")
    check_writable(export_dir, "--export_dir")
    return export_dir


def check_writable(folder: Path, flag: str) -> None:
    """Refuse a folder that cannot be created or written in, without creating it."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {folder}: {existing} is a file, not a folder; choose another {flag}.")
    try:  # a real write: permission bits say nothing for root, nor for read-only mounts
        tempfile.TemporaryDirectory(dir=existing, prefix=".hf-svd-compress-check-").cleanup()
    except OSError as err:
        raise PermissionError(
            f"{flag} {folder}: cannot write in {existing} ({err.strerror}); choose a writable {flag}."
        ) from None


def check_arguments(pipeline_args: PipelineArguments, args: SVDTrainingArguments) -> SVDConfig:
    """The checks that need no model: launcher, schedule, folders; returns the SVD stage's `SVDConfig`."""
    check_unsharded(args)
    check_resume(args)
    check_schedule(pipeline_args, args)
    check_export_dir(pipeline_args, args)
    return pipeline_args.svd_config(args)


def check_resume(args: TrainingArguments) -> None:
    """Refuse `--resume_from_checkpoint`, which the Trainer leaves to the caller and the pipeline cannot honor.

    A stage's checkpoint does not hold what the stages before it made (the dense teacher, the calibration, the
    cut), so a resumed stage would not be the interrupted one; silently restarting from step 0 would be worse.
    """
    if args.resume_from_checkpoint is not None:
        raise refuse(
            "--resume_from_checkpoint",
            args.resume_from_checkpoint,
            "the pipeline cannot resume a stage (it factors, cuts and truncates the model between stages); run it "
            "again without this flag, or resume SVD training in your own script with "
            "SVDTrainer(...).train(resume_from_checkpoint=...) on the same factored model (docs/howto.md)",
        )


def preflight(setup: TaskSetup, pipeline_args: PipelineArguments, args: SVDTrainingArguments) -> SVDConfig:
    """Every check that can run before training: `check_arguments`, then the targets on the model and the export
    folder against the files its tokenizer or image processor writes.

    Returns:
        The `SVDConfig` of the SVD stage.

    Raises:
        `ValueError` / `OSError`: what is wrong and how to fix it, before any stage runs.
    """
    config = check_arguments(pipeline_args, args)
    check_export_dir(pipeline_args, args, setup.processing_class)
    target_names(setup.model, config)  # raises when the targets match nothing of this model
    return config


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


def check_schedule(pipeline_args: PipelineArguments, args: SVDTrainingArguments) -> None:
    """Refuse, before any training, pruning steps outside the SVD stage or an energy target."""
    start, at, steps = args.prune_start_step, args.prune_at_step, pipeline_args.svd_steps
    if args.prune_energy is not None:
        raise ValueError(
            f"--prune_energy {args.prune_energy}: the pipeline prunes to a parameter budget (--prune_budget, default "
            f"{DEFAULT_BUDGET}); to prune by energy, run `hf-svd-compress prune <output_dir>/factored --energy "
            f"{args.prune_energy}` on its factored model."
        )
    if pipeline_args.schedule == "at_start" and (start is not None or at is not None):
        raise ValueError(
            "--prune_start_step / --prune_at_step prune while training: add --schedule gradual (the default, "
            "at_start, cuts to the budget before training)."
        )
    if at is not None and not 1 <= at <= steps:
        raise ValueError(
            f"--prune_at_step {at}: in the pipeline it is a step of the SVD stage ({steps} steps, --svd_steps), "
            f"where pruning reaches its target; use 1 to {steps}, e.g. {max(1, 3 * steps // 5)}."
        )
    last = at if at is not None else max(2, round(0.6 * steps))
    if start is not None and not start < last:
        raise ValueError(
            f"--prune_start_step {start}: gradual pruning runs from prune_start_step to --prune_at_step ({last}); use "
            f"a start below {last}, e.g. {steps // 5}."
        )


def run_compression(setup: TaskSetup, pipeline_args: PipelineArguments, args: SVDTrainingArguments) -> dict:
    """Run every stage and export; returns (and writes next to the export) a summary of what happened."""
    config = preflight(setup, pipeline_args, args)
    export_dir = export_path(pipeline_args, args)
    summary = {"accuracy": {}, "base_model": setup.base_model, "task": setup.task}
    eval_args = _stage_args(args, args.max_steps, "eval")  # no pruning fields: evaluation only
    start = time.perf_counter()
    _dense_stage(setup, pipeline_args, args, eval_args, summary)
    _svd_stage(setup, pipeline_args, args, config, eval_args, summary)
    _finetune_stage(setup, pipeline_args, args, eval_args, summary)
    summary["wall_time_s"] = round(time.perf_counter() - start, 1)
    stage(f"4/4 exporting to {export_dir}", args)
    if args.process_index == 0:
        how = {"method": "budget", "budget": config.prune_budget, "allocation": config.prune_allocation}
        if config.prune_rank_multiple > 1:
            how["rank_multiple"] = config.prune_rank_multiple
        save_compressed(
            setup.model,
            export_dir,
            processing_class=setup.processing_class,
            rank_selection=how,
            training_settings=_training_settings(pipeline_args, args),
            overwrite=pipeline_args.overwrite_export,
        )
        (export_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        _print_result(summary, export_dir)
    return summary


def _dense_stage(setup: TaskSetup, pipeline_args: PipelineArguments, args, eval_args, summary: dict) -> None:
    """Stage 1: fine-tune the dense model (if asked), then record its accuracy and size."""
    if pipeline_args.dense_steps:
        stage(f"1/4 dense fine-tuning for {pipeline_args.dense_steps} steps", args)
        _train(Trainer, setup, _stage_args(args, pipeline_args.dense_steps, "dense"))
    summary["accuracy"]["dense"] = _evaluate(Trainer, setup, eval_args)
    summary["parameters_dense"] = sum(p.numel() for p in setup.model.parameters())


def _svd_stage(
    setup: TaskSetup, pipeline_args: PipelineArguments, args, config: SVDConfig, eval_args, summary: dict
) -> None:
    """Stage 2: factor, SVD-train while pruning to the budget (`compress`), save the factored model, truncate."""
    steps, budget = pipeline_args.svd_steps, config.prune_budget
    cut = "cut to" if pipeline_args.schedule == "at_start" else "pruning gradually to"
    stage(f"2/4 SVD training from {pipeline_args.init} factors, {cut} {budget:g}, for {steps} steps", args)
    spectra = _Spectra()
    pruning = {"prune_at_step": args.prune_at_step, "prune_start_step": args.prune_start_step}
    compress(
        setup.model,
        setup.train_dataset,
        _stage_args(args, steps, "svd", distill_alpha=args.distill_alpha, **pruning),
        config=config,
        data_collator=setup.data_collator,
        init=pipeline_args.init,
        calibration_batches=pipeline_args.calibration_batches,
        truncate=False,
        schedule=pipeline_args.schedule,
        eval_dataset=setup.eval_dataset,
        processing_class=setup.processing_class,
        compute_metrics=setup.compute_metrics,
        callbacks=[spectra],
    )
    summary["spectra_initial"], summary["spectra_trained"] = spectra.initial, _spectra(setup.model)
    _save_factored(setup, Path(args.output_dir) / "factored", args)
    summary["accuracy"]["factored"] = _evaluate(SVDTrainer, setup, eval_args)
    summary["ranks"] = truncate_(setup.model)
    summary["accuracy"]["pruned"] = summary["accuracy"]["factored"]  # the masks were the cut: the same function


def _finetune_stage(setup: TaskSetup, pipeline_args: PipelineArguments, args, eval_args, summary: dict) -> None:
    """Stage 3: fine-tune the truncated model without the sparsity term, at `finetune_lr_scale` of the rate."""
    stage(f"3/4 fine-tuning for {pipeline_args.finetune_steps} more steps", args)
    summary["accuracy"]["compressed"] = summary["accuracy"]["pruned"]
    if pipeline_args.finetune_steps:
        ft_args = _stage_args(
            args,
            pipeline_args.finetune_steps,
            "finetune",
            sparsity="none",
            singular_value_lr_scale=1.0,
            learning_rate=args.learning_rate * pipeline_args.finetune_lr_scale,
        )
        _train(SVDTrainer, setup, ft_args)
        summary["accuracy"]["compressed"] = _evaluate(SVDTrainer, setup, eval_args)


class _Spectra(TrainerCallback):
    """The singular values of the factored model as training starts (with `--schedule at_start`: after the cut)."""

    def __init__(self) -> None:
        self.initial: dict[str, list[float]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.initial = _spectra(model)


def _save_factored(setup: TaskSetup, folder: Path, args: TrainingArguments) -> None:
    """The trained factored model (truncated with `--schedule at_start`, masked with `gradual`), for
    `hf-svd-compress prune` to cut further at another energy or a smaller budget."""
    if args.process_index == 0:
        setup.model.save_pretrained(folder)
        if setup.processing_class is not None:
            setup.processing_class.save_pretrained(folder)


def _stage_args(args: SVDTrainingArguments, steps: int, name: str, **overrides) -> SVDTrainingArguments:
    """A copy of the user's arguments for one stage: its own step count and output subfolder."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    # The pipeline prunes between stages itself, so no stage prunes during training.
    values.update(max_steps=steps, output_dir=str(Path(args.output_dir) / name), prune_at_step=None)
    values.update({"prune_start_step": None, "distill_alpha": 0.0, **overrides})
    return type(args)(**values)


def _train(trainer_cls, setup: TaskSetup, args: TrainingArguments) -> None:
    _trainer(trainer_cls, setup, args).train()


def _trainer(trainer_cls, setup: TaskSetup, args: TrainingArguments) -> Trainer:
    return trainer_cls(
        model=setup.model,
        args=args,
        train_dataset=setup.train_dataset,
        eval_dataset=setup.eval_dataset,
        data_collator=setup.data_collator,
        processing_class=setup.processing_class,
        compute_metrics=setup.compute_metrics,
    )


def _evaluate(trainer_cls, setup: TaskSetup, args: TrainingArguments) -> dict[str, float]:
    """Validation (and test, if given) metrics of the model as it is now."""
    trainer = _trainer(trainer_cls, setup, args)
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
