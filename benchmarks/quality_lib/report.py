"""The Markdown tables, the JSON summary and the accuracy-vs-parameters plot of the quality benchmark.

Every method that trains after the dense model is run once per training seed; a table cell aggregates those runs
(`Cell`): mean test accuracy and its sample standard deviation over the seeds. Comparisons use the means.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import GRADUAL_START, METHOD_LABELS, RegConfig, Settings

TASK_TITLES = {
    "minilm": "all-MiniLM-L6-v2 on BBC News (deduplicated)",
    "tiny": "tiny random BERT on a 60-article BBC News subset (smoke run)",
    "dinov2": "DINOv2-S/14 on Fashion-MNIST",
}
# Ours in the other parameterizations (`--stage parameterizations`, first training seed only).
VARIANT_METHODS = ("ours_householder", "ours_sttp", "ours_cur")
TABLE_METHODS = (
    "dense",
    "dense_ft",
    "svd",
    "svd_ft",
    "asvd",
    "asvd_ft",
    "ours_pruned",
    "ours",
    "ours_gradual",
    "ours_asvd",
)
TABLE_METHODS += VARIANT_METHODS
DENSE_METHODS = ("dense", "dense_ft")
# Results that depend on the training seed (ours_pruned through its regularized S stage).
TRAINED_METHODS = (
    "dense_ft",
    "svd_ft",
    "asvd_ft",
    "ours_pruned",
    "ours",
    "ours_gradual",
    "ours_asvd",
    *VARIANT_METHODS,
)
BASELINES = ("svd", "svd_ft", "asvd", "asvd_ft")
GOAL_BUDGET = 0.5  # "within 1 point of dense" is asked at this budget
GOAL_GAP = 0.01
TOLERANCE = 1e-9  # means of the same accuracies computed over different seed counts differ by rounding


def label(method: str) -> str:
    return METHOD_LABELS[method]


@dataclass
class Cell:
    """The results of one method at one budget, one per training seed (one in all for the untrained methods).

    Args:
        method (`str`): Method key (`svd_ft`, `ours`, ...).
        budget (`float`): Kept parameter fraction (1.0 for the dense rows).
        rows (`list[dict]`): The stored results, each with its `seed` (None when it does not train).
    """

    method: str
    budget: float
    rows: list[dict[str, Any]]

    @property
    def accuracies(self) -> list[float]:
        return [r["test"]["accuracy"] for r in self.rows]

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float | None:
        """Sample standard deviation of the test accuracy over the seeds; None below two runs."""
        return statistics.stdev(self.accuracies) if self.n > 1 else None

    @property
    def sem(self) -> float | None:
        """Standard error of the mean; None below two runs."""
        return None if self.std is None else self.std / math.sqrt(self.n)

    @property
    def params(self) -> float:
        return statistics.fmean(r["params_total"] for r in self.rows)

    @property
    def file_bytes(self) -> float:
        return statistics.fmean(r["file_bytes"] for r in self.rows)

    def accuracy_text(self, seeds: int) -> str:
        """`92.1 ± 1.2%` (mean ± std over the seeds), `(n=2)` appended when fewer than `seeds` runs are stored."""
        text = f"{100 * self.mean:.1f}%"
        if self.method in TRAINED_METHODS:
            text = text if self.std is None else f"{100 * self.mean:.1f} ± {100 * self.std:.1f}%"
            text += f" (n={self.n})" if self.n < seeds else ""
        return text

    def summary(self) -> dict[str, Any]:
        """The cell for the JSON summary, with the per-seed values."""
        return {
            "method": self.method,
            "label": label(self.method),
            "budget": self.budget,
            "seeds": [r["seed"] for r in self.rows],
            "test_accuracy": self.accuracies,
            "mean": self.mean,
            "std": self.std,
            "n": self.n,
            "params_total": self.params,
            "file_bytes": self.file_bytes,
        }


def cells(rows: list[dict[str, Any]]) -> dict[tuple[str, float], Cell]:
    """The rows grouped by (method, budget), in table order."""
    grouped: dict[tuple[str, float], Cell] = {}
    for r in rows:
        grouped.setdefault((r["method"], r["budget"]), Cell(r["method"], r["budget"], [])).rows.append(r)
    order = {m: i for i, m in enumerate(TABLE_METHODS)}
    return dict(sorted(grouped.items(), key=lambda item: (order[item[0][0]], -item[0][1])))


def header(settings: Settings, rows: list[dict[str, Any]], config: RegConfig | None, chosen_by: str) -> list[str]:
    """Title, settings, seeds and step counts of the table."""
    s = settings
    dense = next((r for r in rows if r["method"] == "dense"), None)
    sizes = ""
    if dense is not None:
        sizes = f" ({dense['val']['n']} validation / {dense['test']['n']} test examples)"
    seeds = ", ".join(str(seed) for seed in s.seeds)
    lines = [
        f"## Quality vs size: {TASK_TITLES.get(s.task, s.task)}{sizes}",
        "",
        f"- Steps (batch {s.batch_size}, max_length {s.max_length}): dense fine-tuning {s.dense_steps} "
        f"(lr {s.dense_learning_rate:g}); every method that trains after it trains **{s.compressed_steps}** steps "
        f"(lr {s.learning_rate:g}, linear decay, {s.warmup_ratio:.0%} warm-up): methods 3 and 4 fine-tune "
        f"{s.compressed_steps} steps after truncation; ours trains S = {s.svd_steps} regularized steps from full "
        f"rank, prunes (at once after S, or gradually during S), then fine-tunes F = {s.finetune_steps} steps "
        "(sparsity off, orthogonality kept); with one schedule its S stage has all "
        f"{s.compressed_steps} steps (the budget reached within it) and there is no F stage (5a = 5).",
        f"- Seeds: every method that trains after the dense model runs once per training seed ({seeds}: batch order "
        "and dropout; for ours both the S and the F stage, so 5a depends on it too); its cells show the mean test "
        "accuracy ± the sample standard deviation over the seeds, and the comparisons below use the means. The dense "
        f"model (seed {s.seed}, which also fixes the data split) and the untrained rows 2 and 4a do not depend on it.",
    ]
    if config is not None:
        lines.append(
            f"- Ours: {config.label}, {chosen_by}. `s lr xK`: during the S stage the singular values train at K "
            "times the learning rate (their own AdamW group); F uses one rate for all. `kd a`: distillation from "
            "the dense model with weight a (temperature 2) in S and F. `gradual`: the S stage prunes from "
            f"{GRADUAL_START:.0%} of its steps to its last one on a cubic schedule (`prune_start_step`), or to the "
            "fraction of S that `budget at` says (`prune_at_step`), the rest of S training the pruned model."
        )
    if dense is not None:
        n = dense["test"]["n"]
        lines.append(
            f"- Noise: {n} test examples, one example = {100 / n:.2f} points; the dense control (1b) shows how far "
            "S + F more steps alone move the score."
        )
    lines += [
        "- Budget: fraction of the factored layers' dense parameters kept, counted `min(r (m + n), m n)` per layer, "
        "one global energy threshold for all layers (`prune_(model, budget=b)`), the same rule for every method "
        "(ASVD applies it to its activation-scaled spectra).",
        "- Params: every parameter stored in the exported `model.safetensors` (`save_compressed`, "
        "`speed_break_even=1.0`, float32; mean over the seeds); size: that file's bytes.",
        "- Ours trains its regularized model once per config and seed and prunes a copy of it to each budget (with "
        "gradual pruning: once per config, seed and budget).",
        f"- ASVD: mean |x| per input channel over {s.calib_batches} calibration batches, alpha {s.asvd_alpha:g}; "
        "V columns renormalized after truncation.",
        "",
    ]
    return lines


def pivot_table(table: dict[tuple[str, float], Cell], budgets: tuple[float, ...], seeds: int) -> list[str]:
    """Method x budget: test accuracy (mean ± std over the seeds), total parameters and file size."""
    lines = [
        "| method | " + " | ".join(f"{b:.0%} budget" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for method in DENSE_METHODS:
        if (method, 1.0) in table:
            cell = _cell(table[method, 1.0], seeds)
            lines.append(f"| {label(method)} | {cell} (100%) |" + " |" * (len(budgets) - 1))
    for method in TABLE_METHODS[2:]:
        found = [table.get((method, b)) for b in budgets]
        if any(found):
            lines.append(f"| {label(method)} | " + " | ".join(_cell(c, seeds) if c else "-" for c in found) + " |")
    return lines


def per_seed_table(table: dict[tuple[str, float], Cell], seeds: tuple[int, ...]) -> list[str]:
    """Test accuracy of every trained cell at each seed, with the mean and standard deviation."""
    lines = [
        "| method | budget | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean | std |",
        "|---|---|" + "---|" * (len(seeds) + 2),
    ]
    for (method, budget), cell in table.items():
        if method not in TRAINED_METHODS:
            continue
        by_seed = {r["seed"]: r["test"]["accuracy"] for r in cell.rows}
        values = " | ".join(f"{100 * by_seed[seed]:.1f}" if seed in by_seed else "-" for seed in seeds)
        std = "-" if cell.std is None else f"{100 * cell.std:.1f}"
        lines.append(f"| {method} | {budget:.0%} | {values} | {100 * cell.mean:.1f} | {std} |")
    return lines


def detail_table(rows: list[dict[str, Any]]) -> list[str]:
    """One row per result and seed: accuracy, realized budget, parameters, bytes, ranks, energy, steps, compute."""
    lines = [
        "| method | budget | seed | test acc | realized budget | params | factored params | safetensors bytes | "
        "mean rank | energy kept | train steps | compute s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        energy = f"{r['energy_kept']:.3f}" if r.get("energy_kept") is not None else "-"
        rank = f"{r['rank_mean']:.1f}" if r.get("rank_mean") is not None else "full"
        steps = r["train"]["steps"]
        compute = r["train"]["wall_s"] + r.get("eval_export_s", 0.0)
        if "regularized" in r:  # ours, in any parameterization
            steps = f"{r['regularized']['train']['steps']} (shared) + {steps}"
            compute = f"{compute:.0f} + {r['regularized']['train']['wall_s']:.0f} (shared)"
        else:
            compute = f"{compute:.0f}"
        seed = "-" if r.get("seed") is None else r["seed"]
        lines.append(
            f"| {r['method']} | {r['budget']:.0%} | {seed} | {r['test']['accuracy']:.4f} | "
            f"{r['budget_realized']:.3f} | {r['params_total']:,} | {r['params_factored']:,} | {r['file_bytes']:,} | "
            f"{rank} | {energy} | {steps} | {compute} |"
        )
    return lines


def goals(
    table: dict[tuple[str, float], Cell], budgets: tuple[float, ...], method: str = "ours"
) -> list[dict[str, Any]]:
    """Ours (5, or another row of ours: `method`) against the strongest baseline at each budget, and against dense,
    on the mean test accuracies.

    Returns:
        `list[dict]`: Per budget with a result of ours: its mean, the strongest baseline (highest mean of rows 2-4),
        the difference of the means with its standard error (`None` unless both sides have two or more seeds),
        whether ours is at least as accurate as every baseline, and (at `GOAL_BUDGET`) whether it is within
        `GOAL_GAP` of dense.
    """
    dense = table.get(("dense", 1.0))
    found = []
    for budget in budgets:
        ours = table.get((method, budget))
        baselines = [table[m, budget] for m in BASELINES if (m, budget) in table]
        if ours is None or not baselines:
            continue
        best = max(baselines, key=lambda c: c.mean)
        sems = (ours.sem, best.sem)
        entry = {
            "budget": budget,
            "ours_mean": ours.mean,
            "best_baseline": best.method,
            "best_baseline_mean": best.mean,
            "difference": ours.mean - best.mean,
            "difference_se": None if None in sems else math.hypot(*sems),
            "beats_every_baseline": ours.mean >= best.mean - TOLERANCE,
        }
        if dense is not None and math.isclose(budget, GOAL_BUDGET):
            entry["gap_to_dense"] = dense.mean - ours.mean
            entry["within_1_point_of_dense"] = dense.mean - ours.mean <= GOAL_GAP + TOLERANCE
        found.append(entry)
    return found


def goals_table(found: list[dict[str, Any]], seeds: int, row: str = "5") -> list[str]:
    """The goals of `goals` (for the row `row` of ours) as Markdown."""
    if not found:
        return []
    lines = [
        f"### Goals of ours ({row}), on the mean test accuracy over {seeds} seed(s)",
        "",
        f"| budget | ours ({row}) | strongest baseline | ours - baseline (± s.e.) | >= every baseline | "
        "within 1 point of dense |",
        "|---|---|---|---|---|---|",
    ]
    for g in found:
        se = "" if g["difference_se"] is None else f" ± {100 * g['difference_se']:.1f}"
        dense = "-"
        if "gap_to_dense" in g:
            dense = f"{_yes(g['within_1_point_of_dense'])} ({_signed(-g['gap_to_dense'])})"
        lines.append(
            f"| {g['budget']:.0%} | {100 * g['ours_mean']:.1f}% | {label(g['best_baseline'])}: "
            f"{100 * g['best_baseline_mean']:.1f}% | {_signed(g['difference'])}{se} | "
            f"{_yes(g['beats_every_baseline'])} | {dense} |"
        )
    lines += [
        "",
        "s.e.: standard error of the difference of the two means, sqrt(sd_a^2 / n_a + sd_b^2 / n_b); a difference "
        "within about two of them is not distinguishable from the seed noise.",
        "",
    ]
    return lines


def summary(
    settings: Settings,
    table: dict[tuple[str, float], Cell],
    found: list[dict[str, Any]],
    config: RegConfig | None,
) -> dict[str, Any]:
    """The JSON summary: settings, seeds, ours' config, every cell with its per-seed values, the goals."""
    return {
        "task": settings.task,
        "seed": settings.seed,
        "seeds": list(settings.seeds),
        "budgets": list(settings.budgets),
        "config": config,
        "cells": [cell.summary() for cell in table.values()],
        "goals": found,
    }


def sweep_table(
    results: list[dict[str, Any]],
    best: RegConfig | None,
    budget: float,
    seed: int,
    finalists: dict[RegConfig, dict[str, float]] | None = None,
    seeds: int = 1,
) -> list[str]:
    """One row per regularizer config of the sweep at `budget`: the screen (training seed `seed`) and, for the
    finalists, the mean validation accuracy over all `seeds` seeds that chose ours' config."""
    if not results:
        return []
    finalists = finalists or {}
    lines = [
        f"### Sweep of the regularizer weights (ours at {budget:.0%}; screen: training seed {seed}, ranked on "
        f"validation accuracy, then loss; the {len(finalists)} best (finalists) run at all {seeds} seeds, and the "
        "best mean validation accuracy among them is chosen)",
        "",
        "| init | orth_weight | sparsity_weight | s lr x | distillation | pruning | F lr x | val acc | val loss | "
        f"test acc | pruned test acc | energy kept | S-stage s | finalist: mean val acc ({seeds} seeds) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (-r["val"]["accuracy"], r["val"]["loss"])):
        c: RegConfig = r["config"]
        mark = " **(chosen)**" if c == best else ""
        pruned = r["pruned"]["test"]["accuracy"] if r.get("pruned") else float("nan")
        final = f"{finalists[c]['accuracy']:.4f}{mark}" if c in finalists else ""
        lines.append(
            f"| {c.init} | {c.orth_weight:g} | {c.sparsity} {c.sparsity_weight:g} | {c.s_lr_scale:g} | "
            f"{c.distill_alpha:g} | "
            f"{pruning_label(c)} | {'no F' if c.one_schedule else f'{c.ft_lr_scale:g}'} | {r['val']['accuracy']:.4f}"
            f"{'' if final else mark} | {r['val']['loss']:.4f} | "
            f"{r['test']['accuracy']:.4f} | {pruned:.4f} | {r['energy_kept']:.3f} | "
            f"{r['regularized']['train']['wall_s']:.0f} | {final} |"
        )
    return [*lines, ""]


def pruning_label(config: RegConfig) -> str:
    """How `config` prunes: `after S`, `gradual` (to S's last step) or e.g. `gradual to 60% of S`, and `, one
    schedule (S + F)` when S has the F steps too."""
    if not config.gradual:
        return "after S"
    label = "gradual" if config.prune_end == 1 else f"gradual to {config.prune_end:.0%} of S"
    return label + (", one schedule (S + F)" if config.one_schedule else "")


def compute_summary(rows: list[dict[str, Any]], sweep: list[dict[str, Any]]) -> list[str]:
    """Total compute (wall seconds of training, evaluation and export) behind the table and the sweep."""
    shared = {r["regularized"]["name"]: r["regularized"]["train"]["wall_s"] for r in rows if "regularized" in r}
    table = sum(r["train"]["wall_s"] + r.get("eval_export_s", 0.0) for r in rows) + sum(shared.values())
    lines = [f"- Compute behind the table: {table / 60:.1f} min (wall time of training, evaluation and export)."]
    if sweep:
        total = sum(
            r["train"]["wall_s"] + r.get("eval_export_s", 0.0) + r["regularized"]["train"]["wall_s"] for r in sweep
        )
        lines.append(f"- Sweep ({len(sweep)} configs at one budget and seed): {total / 60:.1f} min.")
    return lines


PLOT_STYLES = {
    "svd": ("tab:gray", "o", ":"),
    "svd_ft": ("tab:blue", "o", "-"),
    "asvd": ("tab:orange", "s", ":"),
    "asvd_ft": ("tab:orange", "s", "-"),
    "ours_pruned": ("tab:green", "^", ":"),
    "ours": ("tab:green", "^", "-"),
    "ours_gradual": ("tab:olive", "*", "-"),
    "ours_asvd": ("tab:cyan", "P", "-"),
    "ours_householder": ("tab:purple", "D", "-"),
    "ours_sttp": ("tab:brown", "v", "-"),
    "ours_cur": ("tab:red", "P", "-"),
}
# Horizontal shift (millions of parameters) of the methods with error bars, so that bars at one budget stay apart.
PLOT_DODGE = {
    "svd_ft": -0.16,
    "asvd_ft": -0.08,
    "ours_pruned": 0.0,
    "ours": 0.08,
    "ours_gradual": 0.16,
    "ours_asvd": 0.24,
}
PLOT_TRAINED = ("svd_ft", "asvd_ft", "ours", "ours_gradual", "ours_asvd", *VARIANT_METHODS, "dense", "dense_ft")


def plot(table: dict[tuple[str, float], Cell], path: Path, title: str) -> Path:
    """Mean test accuracy vs total parameters, one line per method over the budgets (error bars: the standard
    deviation over the seeds), dense as a reference.

    Left: every result; right: zoomed on the methods that train (untrained truncation can fall far below).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax in axes:
        _plot_methods(ax, table)
        ax.set_xlabel("parameters stored (millions)")
        ax.set_ylabel("test accuracy (%): mean over the seeds, bars ± std")
        ax.grid(alpha=0.3)
    trained = [c for c in table.values() if c.method in PLOT_TRAINED]
    if trained:
        low = min(100 * (c.mean - (c.std or 0.0)) for c in trained)
        high = max(100 * (c.mean + (c.std or 0.0)) for c in trained)
        axes[1].set_ylim(low - 2, high + 1)
    axes[0].set_title(title, fontsize=10)
    axes[1].set_title("zoom on the methods that train", fontsize=10)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_methods(ax: Any, table: dict[tuple[str, float], Cell]) -> None:
    for method, (color, marker, line) in PLOT_STYLES.items():
        dodge = PLOT_DODGE.get(method, 0.0)
        points = sorted(
            (c.params / 1e6 + dodge, 100 * c.mean, 100 * (c.std or 0.0)) for c in table.values() if c.method == method
        )
        if not points:
            continue
        xs, ys, errs = zip(*points)
        ax.errorbar(xs, ys, yerr=errs, marker=marker, linestyle=line, color=color, capsize=3, label=label(method))
    for x, b in sorted({(c.params / 1e6, c.budget) for c in table.values() if c.method == "svd_ft"}):
        ax.annotate(
            f"{b:.0%} budget",
            (x, 1),
            xycoords=("data", "axes fraction"),
            xytext=(0, -12),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color="dimgray",
        )
    for method, fill in (("dense", "black"), ("dense_ft", "none")):
        cell = table.get((method, 1.0))
        if cell is None:
            continue
        x, y = cell.params / 1e6, 100 * cell.mean
        if method == "dense":
            ax.axhline(y, color="black", linestyle="--", linewidth=0.8)
        ax.errorbar(
            [x],
            [y],
            yerr=[100 * (cell.std or 0.0)],
            marker="*",
            markersize=14,
            color="black",
            mfc=fill,
            linestyle="none",
            capsize=3,
            label=label(method),
        )


def _cell(cell: Cell, seeds: int) -> str:
    return f"{cell.accuracy_text(seeds)} · {cell.params / 1e6:.2f} M · {cell.file_bytes / 1e6:.1f} MB"


def _signed(fraction: float) -> str:
    """A difference of accuracies in points, signed, without a negative zero."""
    points = round(100 * fraction, 1) + 0.0
    return f"{points:+.1f}"


def _yes(value: bool) -> str:
    return "yes" if value else "no"
