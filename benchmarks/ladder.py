"""The accuracy ladder: what a user would do instead of SVD training, rung by rung, against the library's defaults.

    python benchmarks/ladder.py --task minilm --budgets 0.5 0.3 --seeds 42 43 44      # runs what is missing
    python benchmarks/ladder.py --task minilm --table                                  # the table from the files
    python benchmarks/ladder.py --task tiny --results_dir /tmp/r --cache_dir /tmp/c    # the CI smoke run

Every rung starts from the same dense fine-tuned model (`quality_lib`'s dense stage: MiniLM on BBC News, or
DINOv2-S on Fashion-MNIST) and trains the same number of steps (`--steps`, default 150: the CLI's default) with
the same optimizer, learning rate, schedule, batch size and data order per seed (the Trainer's seed), in one
learning-rate schedule:

- `svd_ft` truncated SVD (one energy threshold for all layers, `allocation="threshold"`) + fine-tuning;
- `asvd_ft` ASVD (`W diag(mean|x|^0.5)`, same allocation, unit-norm columns) + fine-tuning;
- `svd_ft_kd` truncated SVD + fine-tuning with distillation from the dense model (logits and hidden states, the
  same losses and weights as the defaults; Ben Noach & Goldberg 2020);
- `whitened_ft` whitened SVD (SVD-LLM: `svd_factorize_(..., calibration=)`), the same rank fraction in every layer,
  + fine-tuning;
- `whitened_global_ft` the same with the greedy loss-per-parameter budget (`allocation="greedy"`);
- `whitened_global_kd` + distillation; `whitened_threshold_kd` / `whitened_uniform_kd` the same with one energy
  threshold for all layers / the same rank fraction per layer;
- `default` the library's defaults: `compress(model, train, args, budget=b)` (whitened, one energy threshold, cut
  right after factoring, fine-tuning of the factors with distillation);
- `gradual_greedy_kd` (ablation) the first design of the defaults: greedy budget, pruned gradually while training
  (from 20% to 60% of the steps), distillation;
- `default_reg` (ablation) SVD training proper: pruned gradually while training with the regularizers
  (orthogonality 0.1, Hoyer 1e-2 with `s` at 100x the learning rate until the budget is reached), distillation.

Each finished run writes one JSON file, `<results_dir>/<task>/<steps>/<method>@<budget>@seed<seed>.json`, with `task`,
`method`, `role` (`dense`, `baseline`, `ablation` or `default`), `budget`, `seed`, `steps`, `test_accuracy` (percent)
and more; runs whose file exists are skipped, so a sweep resumes where it stopped. Commit the files as they appear.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from quality_lib.asvd import asvd_factorize_, normalize_columns_
from quality_lib.core import evaluate, factored_stats
from quality_lib.settings import Settings, preset
from quality_lib.stages import Bench
from transformers import PrinterCallback, TrainerCallback

from hf_svd_compress import (
    CalibrationData,
    SVDConfig,
    SVDTrainer,
    SVDTrainingArguments,
    activation_scales,
    compress,
    compress_config,
    input_covariances,
    prune_,
    svd_factorize_,
    truncate_,
)

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache" / "ladder"
ROLES = {
    "svd_ft": "baseline",
    "asvd_ft": "baseline",
    "svd_ft_kd": "baseline",
    "whitened_ft": "baseline",
    "whitened_global_ft": "ablation",
    "whitened_global_kd": "ablation",
    "default": "default",
    "default_reg": "ablation",
    "whitened_threshold_kd": "ablation",
    "whitened_uniform_kd": "ablation",
    "gradual_greedy_kd": "ablation",
}
LABELS = {
    "dense": "dense fine-tuned (reference)",
    "svd_ft": "truncated SVD + FT",
    "asvd_ft": "ASVD + FT",
    "svd_ft_kd": "truncated SVD + FT + distillation",
    "whitened_ft": "whitened SVD (SVD-LLM), uniform ranks + FT",
    "whitened_global_ft": "whitened SVD, greedy global budget + FT",
    "whitened_global_kd": "whitened SVD, greedy global budget + FT + distillation",
    "default": "**defaults: `compress()`** (whitened, one energy threshold, cut at the start, FT + distillation)",
    "default_reg": "SVD training: gradual pruning while training + orthogonality / Hoyer, whitened, distillation",
    "whitened_threshold_kd": "whitened SVD, one energy threshold + FT + distillation",
    "whitened_uniform_kd": "whitened SVD, uniform ranks + FT + distillation",
    "gradual_greedy_kd": "first design: whitened, greedy s^2/(m+n), gradual pruning while training, distillation",
}
BASELINE = SVDConfig(orth_weight=0.0, sparsity=None)
DISTILL = {"distill_alpha": 0.5, "distill_hidden_weight": 1.0}


def training_args(settings: Settings, steps: int, seed: int, **extra: Any) -> SVDTrainingArguments:
    """The one training loop of every rung (the quality benchmark's: AdamW, linear schedule, 10% warm-up)."""
    return SVDTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="ladder_"),
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_ratio,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        **{"orth_weight": 0.0, "sparsity": "none", **extra},
    )


class Ladder:
    """One task's runs: the dense model and data from `quality_lib.Bench`, a result file per run."""

    def __init__(self, settings: Settings, steps: int, results: Path, cache: Path) -> None:
        self.settings, self.steps = settings, steps
        self.bench = Bench(settings, cache / settings.task)
        self.folder = results / settings.task / str(steps)
        self._covariances: dict[str, torch.Tensor] | None = None
        self._scales: dict[str, torch.Tensor] | None = None

    def path(self, method: str, budget: float, seed: int) -> Path:
        return self.folder / f"{method}@{budget:g}@seed{seed}.json"

    def run(self, method: str, budget: float, seed: int) -> dict[str, Any] | None:
        path = self.path(method, budget, seed)
        if path.is_file():
            return None
        start = time.perf_counter()
        model, training = getattr(self, f"_{method}")(budget, seed)
        setup, batch = self.bench.setup(), self.settings.eval_batch_size
        test = evaluate(model, setup.test_dataset, setup, batch)
        val = evaluate(model, setup.eval_dataset, setup, batch)  # for choosing a config without the test split
        result = {
            "task": self.settings.task,
            "method": method,
            "role": ROLES[method],
            "budget": budget,
            "seed": seed,
            "steps": self.steps,
            "test_accuracy": round(100 * test["accuracy"], 3),
            "test_loss": test["loss"],
            "test_n": test["n"],
            "val_accuracy": round(100 * val["accuracy"], 3),
            "val_loss": val["loss"],
            **factored_stats(model),
            "train_loss": training.get("train_loss"),
            "wall_s": round(time.perf_counter() - start, 1),
            "machine": machine(),
            "commit": commit(),
        }
        self.write(path, result)
        return result

    def run_dense(self) -> dict[str, Any]:
        """The dense reference (trained once, `Settings.seed`), as a result file of its own."""
        dense = self.bench.run_dense()
        path = self.folder / "dense.json"
        result = {
            "task": self.settings.task,
            "method": "dense",
            "role": "dense",
            "budget": 1.0,
            "seed": self.settings.seed,
            "steps": self.settings.dense_steps,
            "test_accuracy": round(100 * dense["test"]["accuracy"], 3),
            "test_n": dense["test"]["n"],
            "machine": machine(),
        }
        if not path.is_file():
            self.write(path, result)
        return result

    @staticmethod
    def write(path: Path, result: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)

    # ------------------------------------------------------------------------------------------------- rungs

    def _train(self, model: torch.nn.Module, seed: int, distill: bool = False) -> dict[str, Any]:
        extra = dict(DISTILL) if distill else {}
        teacher = self.bench.fresh_dense() if distill else None
        setup = self.bench.setup()
        args = training_args(self.settings, self.steps, seed, **extra)
        trainer = SVDTrainer(
            model=model,
            args=args,
            train_dataset=setup.train_dataset,
            data_collator=setup.data_collator,
            teacher_model=teacher,
        )
        trainer.remove_callback(PrinterCallback)
        return {"train_loss": trainer.train().training_loss}

    def _cut_and_train(self, model: torch.nn.Module, seed: int, distill: bool = False) -> tuple:
        truncate_(model)
        return model, self._train(model, seed, distill)

    def _svd_ft(self, budget: float, seed: int, distill: bool = False) -> tuple:
        model = svd_factorize_(self.bench.fresh_dense(), BASELINE)
        prune_(model, budget=budget, rank_multiple=BASELINE.prune_rank_multiple, allocation="threshold")
        return self._cut_and_train(model, seed, distill)

    def _svd_ft_kd(self, budget: float, seed: int) -> tuple:
        return self._svd_ft(budget, seed, distill=True)

    def _asvd_ft(self, budget: float, seed: int) -> tuple:
        model = asvd_factorize_(self.bench.fresh_dense(), BASELINE, self.scales(), self.settings.asvd_alpha)
        prune_(model, budget=budget, rank_multiple=BASELINE.prune_rank_multiple, allocation="threshold")
        truncate_(model)
        normalize_columns_(model)
        return model, self._train(model, seed)

    def scales(self) -> dict[str, torch.Tensor]:
        """The dense model's mean |input| per channel over the calibration batches (once per process, every seed)."""
        if self._scales is None:
            setup, s = self.bench.setup(), self.settings
            self._scales = activation_scales(
                setup.model, setup.train_dataset, BASELINE, setup.data_collator, s.batch_size, s.calib_batches, 1.0
            )
        return self._scales

    def covariances(self) -> dict[str, torch.Tensor]:
        """The dense model's input covariances over the calibration batches (the same for every seed)."""
        if self._covariances is None:
            setup, s = self.bench.setup(), self.settings
            data = CalibrationData(setup.train_dataset, setup.data_collator, s.batch_size, s.calib_batches)
            self._covariances = input_covariances(setup.model, data, BASELINE)
        return self._covariances

    def _whitened(self) -> torch.nn.Module:
        return svd_factorize_(self.bench.fresh_dense(), compress_config(), calibration=self.covariances())

    def _whitened_ft(self, budget: float, seed: int) -> tuple:
        model = self._whitened()
        prune_(model, budget=budget, rank_multiple=BASELINE.prune_rank_multiple, allocation="uniform")
        return self._cut_and_train(model, seed)

    def _whitened_global_ft(self, budget: float, seed: int, distill: bool = False) -> tuple:
        model = self._whitened()
        prune_(model, budget=budget, rank_multiple=BASELINE.prune_rank_multiple, allocation="greedy")
        return self._cut_and_train(model, seed, distill)

    def _whitened_global_kd(self, budget: float, seed: int) -> tuple:
        return self._whitened_global_ft(budget, seed, distill=True)

    def _whitened_threshold_kd(self, budget: float, seed: int) -> tuple:
        model = self._whitened()
        prune_(model, budget=budget, rank_multiple=BASELINE.prune_rank_multiple, allocation="threshold")
        return self._cut_and_train(model, seed, distill=True)

    def _whitened_uniform_kd(self, budget: float, seed: int) -> tuple:
        model = self._whitened()
        prune_(model, budget=budget, rank_multiple=BASELINE.prune_rank_multiple, allocation="uniform")
        return self._cut_and_train(model, seed, distill=True)

    def _gradual_greedy_kd(self, budget: float, seed: int) -> tuple:
        return self._default(budget, seed, compress_config(prune_allocation="greedy"), schedule="gradual")

    def _default(
        self, budget: float, seed: int, config: SVDConfig | None = None, schedule: str = "at_start", **extra: Any
    ) -> tuple:
        setup, s = self.bench.setup(), self.settings
        model = self.bench.fresh_dense()
        args = training_args(s, self.steps, seed, **extra)
        # compress reads the regularizer settings from the config (the training arguments' are unset).
        args.orth_weight, args.sparsity = None, None
        losses: dict[str, Any] = {}
        data = setup.train_dataset
        compress(
            model,
            data,
            args,
            budget,
            config,
            setup.data_collator,
            calibration_batches=s.calib_batches,
            schedule=schedule,
            callbacks=[_Loss(losses)],
        )
        return model, losses

    def _default_reg(self, budget: float, seed: int) -> tuple:
        config = compress_config(orth_weight=0.1, sparsity="hoyer", sparsity_weight=1e-2)
        return self._default(budget, seed, config, schedule="gradual", singular_value_lr_scale=100.0)


class _Loss(TrainerCallback):
    """Keeps the final training loss of a `compress` run (its trainer is internal) and prints nothing."""

    def __init__(self, store: dict[str, Any]) -> None:
        self.store = store

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_loss" in logs:
            self.store["train_loss"] = logs["train_loss"]


def commit() -> str:
    """The commit the benchmark runs at (results name the code that made them)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


# ------------------------------------------------------------------------------------------------- the table


def load_results(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: mean ± sd over seeds per (method, budget); the defaults minus the best baseline, paired by seed."""
    dense = next((r for r in results if r["method"] == "dense"), None)
    budgets = sorted({r["budget"] for r in results if r["method"] != "dense"}, reverse=True)
    by: dict[tuple[str, float], dict[int, float]] = {}
    for r in results:
        if r["method"] != "dense":
            by.setdefault((r["method"], r["budget"]), {})[r["seed"]] = r["test_accuracy"]
    lines = ["| method | role | " + " | ".join(f"{b:.0%}" for b in budgets) + " |"]
    lines.append("|---|---|" + "---:|" * len(budgets))
    if dense:
        lines.append(
            f"| {LABELS['dense']} | dense | " + " | ".join(f"{dense['test_accuracy']:.1f}" for _ in budgets) + " |"
        )
    for method in ROLES:
        cells = [_cell(by.get((method, b), {})) for b in budgets]
        if any(c != "" for c in cells):
            lines.append(f"| {LABELS[method]} | {ROLES[method]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| budget | best baseline | defaults - best baseline (paired, mean ± se) | seeds |",
        "|---|---|---:|---:|",
    ]
    for b in budgets:
        ours = by.get(("default", b), {})
        baselines = {m: by.get((m, b), {}) for m, role in ROLES.items() if role == "baseline"}
        baselines = {m: v for m, v in baselines.items() if v}
        if not ours or not baselines:
            continue
        best = max(baselines, key=lambda m: sum(baselines[m].values()) / len(baselines[m]))
        seeds = sorted(set(ours) & set(baselines[best]))
        diffs = [ours[s] - baselines[best][s] for s in seeds]
        lines.append(f"| {b:.0%} | {LABELS[best]} | {_mean_se(diffs)} | {len(seeds)} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (mean over seeds) against the kept fraction of the factored layers' parameters, one line per rung."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for method in ROLES:
        points: dict[float, list[tuple[float, float]]] = {}
        for r in results:
            if r["method"] == method:
                points.setdefault(r["budget"], []).append((r["budget_realized"], r["test_accuracy"]))
        if points:
            xs = [sum(p[0] for p in v) / len(v) for _, v in sorted(points.items())]
            ys = [sum(p[1] for p in v) / len(v) for _, v in sorted(points.items())]
            style = {"linewidth": 2.5, "color": "black"} if method == "default" else {"linestyle": "--"}
            ax.plot(xs, ys, marker="o", label=LABELS[method].replace("**", "").replace("`", ""), **style)
    dense = next((r for r in results if r["method"] == "dense"), None)
    if dense:
        ax.axhline(dense["test_accuracy"], color="grey", linewidth=1, label="dense")
    ax.set_xlabel("parameters kept (fraction of the factored layers')")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=6.5, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")


def _cell(values: dict[int, float]) -> str:
    if not values:
        return ""
    v = list(values.values())
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f} (n={len(v)})"


def _mean_se(diffs: list[float]) -> str:
    if not diffs:
        return ""
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return f"{mean:+.1f}"
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    return f"{mean:+.1f} ± {sd / math.sqrt(len(diffs)):.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("minilm", "dinov2", "tiny"), default="minilm")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--methods", nargs="+", choices=tuple(ROLES), default=list(ROLES))
    parser.add_argument("--steps", type=int, default=None, help="Training steps of every rung (default: 150).")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results_dir", type=Path, default=RESULTS)
    parser.add_argument("--cache_dir", type=Path, default=CACHE)
    parser.add_argument("--table", action="store_true", help="Print the table from the result files and stop.")
    parser.add_argument("--plot", type=Path, default=None, help="With --table: also write the accuracy plot here.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = preset(args.task)
    steps = args.steps or (10 if args.task == "tiny" else 150)
    ladder = Ladder(settings, steps, args.results_dir, args.cache_dir)
    if args.table:
        print(table(load_results(ladder.folder)))
        if args.plot:
            plot(load_results(ladder.folder), args.plot)
        return 0
    print(f"dense: {ladder.run_dense()['test_accuracy']:.1f}%", flush=True)
    for seed in args.seeds:  # seed by seed, so that every method has a paired result as early as possible
        for budget in args.budgets:
            for method in args.methods:
                result = ladder.run(method, budget, seed)
                if result is not None:
                    print(
                        f"{method}@{budget:g} seed {seed}: {result['test_accuracy']:.1f}% ({result['wall_s']} s)",
                        flush=True,
                    )
    print(table(load_results(ladder.folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
