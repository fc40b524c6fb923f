"""The Markdown tables and the accuracy-vs-parameters plot of the quality benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .settings import METHOD_LABELS, RegConfig, Settings

TASK_TITLES = {
    "minilm": "all-MiniLM-L6-v2 on BBC News (deduplicated)",
    "tiny": "tiny random BERT on a 60-article BBC News subset (smoke run)",
    "dinov2": "DINOv2-S/14 on Fashion-MNIST",
}
TABLE_METHODS = ("dense", "dense_ft", "svd", "svd_ft", "asvd", "asvd_ft", "ours_pruned", "ours")
DENSE_METHODS = ("dense", "dense_ft")


def label(method: str) -> str:
    return METHOD_LABELS[method]


def header(settings: Settings, rows: list[dict[str, Any]], config: RegConfig | None, chosen_by: str) -> list[str]:
    """Title, settings and step counts of the table."""
    s = settings
    dense = next((r for r in rows if r["method"] == "dense"), None)
    sizes = ""
    if dense is not None:
        sizes = f" ({dense['val']['n']} validation / {dense['test']['n']} test examples)"
    lines = [
        f"## Quality vs size: {TASK_TITLES.get(s.task, s.task)}{sizes}",
        "",
        f"- Steps (batch {s.batch_size}, max_length {s.max_length}): dense fine-tuning {s.dense_steps} "
        f"(lr {s.dense_learning_rate:g}); every method that trains after it trains **{s.compressed_steps}** steps "
        f"(lr {s.learning_rate:g}, linear decay, {s.warmup_ratio:.0%} warm-up): methods 3 and 4 fine-tune "
        f"{s.compressed_steps} steps after truncation; ours trains S = {s.svd_steps} regularized steps at full rank, "
        f"prunes, then fine-tunes F = {s.finetune_steps} steps (sparsity off, orthogonality kept).",
    ]
    if config is not None:
        lines.append(
            f"- Ours: {config.label}, {chosen_by}. `s lr xK`: during the S stage the singular values train at K "
            "times the learning rate (their own AdamW group); F uses one rate for all."
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
        "`speed_break_even=1.0`, float32); size: that file's bytes.",
        "- Ours trains its regularized model once per config and prunes a copy of it to each budget.",
        f"- ASVD: mean |x| per input channel over {s.calib_batches} calibration batches, alpha {s.asvd_alpha:g}; "
        "V columns renormalized after truncation.",
        "",
    ]
    return lines


def pivot_table(rows: list[dict[str, Any]], budgets: tuple[float, ...]) -> list[str]:
    """Method x budget: test accuracy, total parameters and file size."""
    cells = {(r["method"], r["budget"]): r for r in rows}
    lines = [
        "| method | " + " | ".join(f"{b:.0%} budget" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for method in DENSE_METHODS:
        if (method, 1.0) in cells:
            lines.append(f"| {label(method)} | {_cell(cells[method, 1.0])} (100%) |" + " |" * (len(budgets) - 1))
    for method in TABLE_METHODS[2:]:
        found = [cells.get((method, b)) for b in budgets]
        if any(found):
            lines.append(f"| {label(method)} | " + " | ".join(_cell(r) if r else "-" for r in found) + " |")
    return lines


def detail_table(rows: list[dict[str, Any]]) -> list[str]:
    """One row per result: accuracy, realized budget, parameters, bytes, ranks, energy kept, steps, compute time."""
    lines = [
        "| method | budget | test acc | realized budget | params | factored params | safetensors bytes | "
        "mean rank | energy kept | train steps | compute s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        energy = f"{r['energy_kept']:.3f}" if r.get("energy_kept") is not None else "-"
        rank = f"{r['rank_mean']:.1f}" if r.get("rank_mean") is not None else "full"
        steps = r["train"]["steps"]
        compute = r["train"]["wall_s"] + r.get("eval_export_s", 0.0)
        if r["method"] in ("ours", "ours_pruned"):
            steps = f"{r['regularized']['train']['steps']} (shared) + {steps}"
            compute = f"{compute:.0f} + {r['regularized']['train']['wall_s']:.0f} (shared)"
        else:
            compute = f"{compute:.0f}"
        lines.append(
            f"| {r['method']} | {r['budget']:.0%} | {r['test']['accuracy']:.4f} | {r['budget_realized']:.3f} | "
            f"{r['params_total']:,} | {r['params_factored']:,} | {r['file_bytes']:,} | "
            f"{rank} | {energy} | {steps} | {compute} |"
        )
    return lines


def sweep_table(results: list[dict[str, Any]], best: RegConfig | None, budget: float) -> list[str]:
    """One row per regularizer config of the sweep at `budget`."""
    if not results:
        return []
    lines = [
        f"### Sweep of the regularizer weights (ours at {budget:.0%}; chosen on validation accuracy, then loss)",
        "",
        "| orth_weight | sparsity_weight | s lr x | val acc | val loss | test acc | pruned test acc | energy kept | "
        "S-stage s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (-r["val"]["accuracy"], r["val"]["loss"])):
        c: RegConfig = r["config"]
        mark = " **(chosen)**" if c == best else ""
        pruned = r["pruned"]["test"]["accuracy"] if r.get("pruned") else float("nan")
        lines.append(
            f"| {c.orth_weight:g} | {c.sparsity} {c.sparsity_weight:g} | {c.s_lr_scale:g} | "
            f"{r['val']['accuracy']:.4f}{mark} | {r['val']['loss']:.4f} | {r['test']['accuracy']:.4f} | "
            f"{pruned:.4f} | {r['energy_kept']:.3f} | {r['regularized']['train']['wall_s']:.0f} |"
        )
    return [*lines, ""]


def compute_summary(rows: list[dict[str, Any]], sweep: list[dict[str, Any]]) -> list[str]:
    """Total compute (wall seconds of training, evaluation and export) behind the table and the sweep."""
    shared = {r["regularized"]["name"]: r["regularized"]["train"]["wall_s"] for r in rows if "regularized" in r}
    table = sum(r["train"]["wall_s"] + r.get("eval_export_s", 0.0) for r in rows) + sum(shared.values())
    lines = [f"- Compute behind the table: {table / 60:.1f} min (wall time of training, evaluation and export)."]
    if sweep:
        total = sum(
            r["train"]["wall_s"] + r.get("eval_export_s", 0.0) + r["regularized"]["train"]["wall_s"] for r in sweep
        )
        lines.append(f"- Sweep ({len(sweep)} configs at one budget): {total / 60:.1f} min.")
    return lines


PLOT_STYLES = {
    "svd": ("tab:gray", "o", ":"),
    "svd_ft": ("tab:blue", "o", "-"),
    "asvd": ("tab:orange", "s", ":"),
    "asvd_ft": ("tab:orange", "s", "-"),
    "ours_pruned": ("tab:green", "^", ":"),
    "ours": ("tab:green", "^", "-"),
}


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Test accuracy vs total parameters, one line per method over the budgets, dense as a reference.

    Left: every result; right: zoomed on the methods that train (untrained truncation can fall far below).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax in axes:
        _plot_methods(ax, rows)
        ax.set_xlabel("parameters stored (millions)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    trained = [100 * r["test"]["accuracy"] for r in rows if r["method"] in ("svd_ft", "asvd_ft", "ours", "dense")]
    trained += [100 * r["test"]["accuracy"] for r in rows if r["method"] == "dense_ft"]
    if trained:
        axes[1].set_ylim(min(trained) - 2, max(trained) + 1)
    axes[0].set_title(title, fontsize=10)
    axes[1].set_title("zoom on the methods that train", fontsize=10)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_methods(ax: Any, rows: list[dict[str, Any]]) -> None:
    for method, (color, marker, line) in PLOT_STYLES.items():
        points = sorted(
            (r["params_total"] / 1e6, 100 * r["test"]["accuracy"], r["budget"]) for r in rows if r["method"] == method
        )
        if not points:
            continue
        xs, ys, _ = zip(*points)
        ax.plot(xs, ys, marker=marker, linestyle=line, color=color, label=label(method))
    for x, b in sorted({(r["params_total"] / 1e6, r["budget"]) for r in rows if r["method"] == "svd_ft"}):
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
        dense = next((r for r in rows if r["method"] == method), None)
        if dense is None:
            continue
        x, y = dense["params_total"] / 1e6, 100 * dense["test"]["accuracy"]
        if method == "dense":
            ax.axhline(y, color="black", linestyle="--", linewidth=0.8)
        ax.plot([x], [y], marker="*", markersize=14, color="black", mfc=fill, linestyle="none", label=label(method))


def _cell(r: dict[str, Any]) -> str:
    return f"{100 * r['test']['accuracy']:.1f}% · {r['params_total'] / 1e6:.2f} M · {r['file_bytes'] / 1e6:.1f} MB"
