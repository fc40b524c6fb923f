"""A report a person can read for an exported compressed model: size, compute, accuracy, ranks and spectra.

`write_report(model_dir)` reads what the export and the pipeline wrote (`config.json` with its `svd_compression`
metadata, the header of `model.safetensors`, and `compression_summary.json` when there is one) and writes
`report.json`, `report.md`, `ranks.png` and, when the summary recorded singular value spectra, `spectra.png`.
Nothing here loads the model: the report of a large model takes as long as reading its JSON files.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open

__all__ = [
    "build_report",
    "plot_ranks",
    "plot_spectra",
    "render_markdown",
    "representative_layers",
    "short_names",
    "write_report",
]

# Spelled out, not imported from `export`/`pipeline`: those import transformers, which the report has no use for.
METADATA_KEY = "svd_compression"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SUMMARY_FILE = "compression_summary.json"
REPORT_JSON, REPORT_MD, RANKS_PNG, SPECTRA_PNG = "report.json", "report.md", "ranks.png", "spectra.png"

# Bytes per element of the safetensors dtype names.
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_BLUE, _ORANGE, _GREY, _RED = "#4c72b0", "#dd8452", "#dcdcdc", "#c44e52"
_STAGES = ("dense", "factored", "pruned", "compressed")
_NOT_RECORDED = "not recorded"


def write_report(model_dir: str | Path, output_dir: str | Path | None = None) -> Path:
    """Write `report.json`, `report.md`, `ranks.png` and (if spectra were recorded) `spectra.png` for an export.

    Args:
        model_dir (`str` or `Path`):
            A folder written by `save_compressed` (or the `compress` pipeline): `config.json` with the
            `svd_compression` metadata and `model.safetensors`; `compression_summary.json` is optional.
        output_dir (`str` or `Path`, *optional*):
            Where to write the report, created if needed. Defaults to `<model_dir>/report`.

    Returns:
        `Path`: the folder holding the report.

    Raises:
        `ValueError`: the folder's `config.json` has no `svd_compression` metadata (not a compressed model).
        `FileNotFoundError`: `config.json` or the safetensors weights are missing.
        `ImportError`: matplotlib is not installed (it draws the plots).
    """
    _require_matplotlib()  # fail before writing anything rather than leave a report without its plots
    model_dir = Path(model_dir)
    out = Path(output_dir) if output_dir is not None else model_dir / "report"
    summary = read_json(model_dir / SUMMARY_FILE) or {}
    report = _build_report(model_dir, summary)  # refuses a folder that is not an export, before `out` exists
    out.mkdir(parents=True, exist_ok=True)
    initial, trained = summary.get("spectra_initial") or {}, summary.get("spectra_trained") or {}
    report["plots"] = [RANKS_PNG] + ([SPECTRA_PNG] if initial or trained else [])

    plot_ranks(report["layers"], out / RANKS_PNG)
    if initial or trained:
        ranks = {layer["name"]: layer["kept_rank"] for layer in report["layers"]}
        plot_spectra(initial, trained, ranks, out / SPECTRA_PNG)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out / REPORT_MD).write_text(render_markdown(report))
    return out


# ---- numbers ------------------------------------------------------------------------------------------------------


def build_report(model_dir: str | Path) -> dict[str, Any]:
    """The numbers of the report (the content of `report.json`), read from the folder without loading the model.

    Args:
        model_dir (`str` or `Path`): An exported compressed model folder (see `write_report`).

    Returns:
        `dict` with `model`, `rank_selection`, `parameters`, `target_layers`, `macs_per_token`, `size`,
        `accuracy`, `wall_time_s` and `layers` (one entry per factored module). Values that the folder does not
        record are `None`.
    """
    model_dir = Path(model_dir)
    return _build_report(model_dir, read_json(model_dir / SUMMARY_FILE) or {})


def _build_report(model_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    meta = _read_metadata(model_dir)
    weights = _read_weights_header(model_dir)
    layers = _layer_rows(meta)
    layers_kept = sum(row["parameters_kept"] for row in layers)
    layers_dense = sum(row["parameters_dense"] for row in layers)
    # Biases and every other tensor are the same in both models, so the dense count differs only by the layers.
    recorded = summary.get("parameters_dense")
    dense_total = int(recorded) if recorded is not None else weights["parameters"] - layers_kept + layers_dense
    return {
        "model": {
            "folder": str(model_dir),
            "base_model": summary.get("base_model"),
            "task": summary.get("task"),
            **{key: meta.get(key) for key in ("base_architecture", "base_model_type", "format_version")},
        },
        "rank_selection": meta.get("rank_selection"),
        "parameters": {
            "compressed": weights["parameters"],
            "dense": dense_total,
            "dense_source": SUMMARY_FILE if recorded is not None else "computed from the ranks",
            "fraction": _ratio(weights["parameters"], dense_total),
        },
        "target_layers": _target_layers(layers, layers_kept, layers_dense),
        # A linear layer does one multiply-accumulate per weight per token, so these equal the weight counts.
        "macs_per_token": {
            "dense": layers_dense,
            "compressed": layers_kept,
            "fraction": _ratio(layers_kept, layers_dense),
            "reduction": _ratio(layers_dense, layers_kept),
        },
        "size": _size(weights, dense_total),
        "accuracy": _accuracy(summary.get("accuracy")),
        "wall_time_s": summary.get("wall_time_s"),
        "layers": layers,
    }


def _target_layers(layers: list[dict[str, Any]], kept: int, dense: int) -> dict[str, Any]:
    return {
        "count": len(layers),
        "stored_factored": sum(row["stored_as"] == "factored" for row in layers),
        "stored_dense": sum(row["stored_as"] == "dense" for row in layers),
        "parameters_dense": dense,
        "parameters_kept": kept,
        "fraction": _ratio(kept, dense),
    }


def _size(weights: dict[str, Any], dense_total: int) -> dict[str, Any]:
    bytes_per_param = _DTYPE_BYTES.get(weights["dtype"], 4)
    return {
        "files": weights["files"],
        "bytes": weights["bytes"],
        "mb": weights["bytes"] / 1e6,
        "dtype": weights["dtype"],
        "bytes_per_param": bytes_per_param,
        "estimated_dense_bytes": dense_total * bytes_per_param,
        "estimated_dense_mb": dense_total * bytes_per_param / 1e6,
    }


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_metadata(model_dir: Path) -> dict[str, Any]:
    config = read_json(model_dir / "config.json")
    if config is None:
        raise FileNotFoundError(f"{model_dir} has no config.json: pass the folder of an exported compressed model.")
    meta = config.get(METADATA_KEY)
    if not isinstance(meta, dict):
        raise ValueError(
            f"{model_dir} is not a compressed model; its config.json has no `{METADATA_KEY}` metadata. Pass the "
            "folder written by `save_compressed` or `hf-svd-compress compress` (not a dense or merged export)."
        )
    missing = [key for key in ("ranks", "shapes") if key not in meta]
    missing += [f"shapes[{name!r}]" for name in meta.get("ranks", {}) if name not in meta.get("shapes", {})]
    if missing:
        raise ValueError(f"{model_dir}/config.json: the `{METADATA_KEY}` metadata lacks {', '.join(missing)}.")
    return meta


def _read_weights_header(model_dir: Path) -> dict[str, Any]:
    """Parameter count, bytes on disk and main dtype of the weights, from the safetensors headers only."""
    index = read_json(model_dir / WEIGHTS_INDEX_NAME)
    names = sorted(set(index["weight_map"].values())) if index else [WEIGHTS_NAME]
    files = [model_dir / name for name in names]
    if not all(path.is_file() for path in files):
        raise FileNotFoundError(f"{model_dir} has no {WEIGHTS_NAME} (nor a sharded {WEIGHTS_INDEX_NAME}).")
    numel_by_dtype: dict[str, int] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                dtype = tensor.get_dtype()
                numel_by_dtype[dtype] = numel_by_dtype.get(dtype, 0) + math.prod(tensor.get_shape())
    return {
        "files": names,
        "parameters": sum(numel_by_dtype.values()),
        "bytes": sum(path.stat().st_size for path in files),
        # The dtype holding most elements is the one a dense copy would be stored in.
        "dtype": max(numel_by_dtype, key=numel_by_dtype.get) if numel_by_dtype else "F32",
    }


def _layer_rows(meta: dict[str, Any]) -> list[dict[str, Any]]:
    dense = set(meta.get("dense_modules") or [])
    full_ranks = meta.get("full_ranks") or {}
    # The export's own rule: factors are stored while r (m + n) < speed_break_even m n (exports that predate the
    # field stored every layer that saved parameters, a break-even of 1).
    break_even = float(meta.get("speed_break_even") or 1.0)
    rows = []
    for name, rank in meta["ranks"].items():
        out_features, in_features = (int(d) for d in meta["shapes"][name])
        full = int(full_ranks.get(name, min(out_features, in_features)))
        stored = "dense" if name in dense else "factored"
        kept = out_features * in_features if stored == "dense" else int(rank) * (out_features + in_features)
        rows.append(
            {
                "name": name,
                "shape": [out_features, in_features],
                "full_rank": full,
                "kept_rank": int(rank),
                "kept_fraction": _ratio(int(rank), full),
                "break_even_rank": break_even * out_features * in_features / (out_features + in_features),
                "stored_as": stored,
                "parameters_dense": out_features * in_features,
                "parameters_kept": kept,
            }
        )
    return rows


def _accuracy(recorded: dict[str, dict[str, float]] | None) -> dict[str, Any] | None:
    """Every recorded metric per stage, and for each metric the change from the dense to the compressed model."""
    if not recorded:
        return None
    stages = [s for s in _STAGES if s in recorded] + [s for s in recorded if s not in _STAGES]
    metrics = list(dict.fromkeys(m for s in stages for m in recorded[s]))
    before, after = recorded.get("dense", {}), recorded.get("compressed", {})
    # Rounded so that 0.957 - 0.962 reads -0.005 in report.json, not -0.0050000000000000044.
    change = {m: round(after[m] - before[m], 10) for m in metrics if m in before and m in after}
    return {"stages": {s: recorded[s] for s in stages}, "metrics": metrics, "change": change}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


# ---- Markdown -----------------------------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any]) -> str:
    """`report.md`: a headline summary, then size and compute, accuracy, rank selection, plots, and the layer table.

    Args:
        report (`dict`): The output of `build_report` (with `plots` listing the image files, if any).

    Returns:
        `str`: the Markdown text.
    """
    sections = [
        f"# Compression report: {Path(report['model']['folder']).name}",
        _intro(report),
        _headline(report),
        _size_table(report),
        _accuracy_section(report["accuracy"]),
        "## Rank selection\n\n" + _describe_selection(report["rank_selection"]) + ".",
        _plots_section(report.get("plots") or []),
        _layer_table(report["layers"]),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _intro(report: dict[str, Any]) -> str:
    model = report["model"]
    arch = f"`{model['base_architecture']}` ({model['base_model_type']})" if model["base_architecture"] else "A model"
    source = f" from `{model['base_model']}`" if model["base_model"] else ""
    task = f", task `{model['task']}`" if model["task"] else ""
    time = f" The compression run took {_duration(report['wall_time_s'])}." if report["wall_time_s"] else ""
    return f"{arch}{source}{task}, compressed by SVD training with `hf_svd_compress`.{time}"


def _headline(report: dict[str, Any]) -> str:
    params, layers = report["parameters"], report["target_layers"]
    macs, size = report["macs_per_token"], report["size"]
    lines = [
        f"- **Parameters:** {_short(params['compressed'])} of {_short(params['dense'])} "
        f"({_pct(params['fraction'])} of the dense model)",
        f"- **{layers['count']} target layers:** {_short(layers['parameters_kept'])} of "
        f"{_short(layers['parameters_dense'])} parameters kept ({_pct(layers['fraction'])}); "
        f"{layers['stored_factored']} stored as factors, {layers['stored_dense']} dense",
        f"- **Multiply-accumulates per token** in those layers: {_short(macs['compressed'])} instead of "
        f"{_short(macs['dense'])} ({_times(macs['reduction'])} fewer)",
        f"- **Weights file:** {size['mb']:.1f} MB instead of about {size['estimated_dense_mb']:.1f} MB dense "
        f"({size['dtype']})",
        f"- **Accuracy:** {_accuracy_headline(report['accuracy'])}",
        f"- **Ranks chosen by:** {_describe_selection(report['rank_selection'])}",
    ]
    return "## Summary\n\n" + "\n".join(lines)


def _size_table(report: dict[str, Any]) -> str:
    params, layers = report["parameters"], report["target_layers"]
    macs, size = report["macs_per_token"], report["size"]
    rows = [
        ("parameters, whole model", params["dense"], params["compressed"], params["fraction"]),
        (f"parameters, the {layers['count']} target layers", layers["parameters_dense"], layers["parameters_kept"],
         layers["fraction"]),
        ("multiply-accumulates per token, target layers", macs["dense"], macs["compressed"], macs["fraction"]),
    ]  # fmt: skip
    lines = ["| | dense | compressed | compressed / dense |", "|---|---:|---:|---:|"]
    lines += [f"| {what} | {dense:,} | {kept:,} | {_pct(fraction)} |" for what, dense, kept, fraction in rows]
    files = ", ".join(f"`{name}`" for name in size["files"])
    lines.append(
        f"| {files} ({size['dtype']}) | {size['estimated_dense_mb']:.1f} MB (estimated) | {size['mb']:.1f} MB | "
        f"{_pct(_ratio(size['bytes'], size['estimated_dense_bytes']))} |"
    )
    source = f"recorded in `{SUMMARY_FILE}`" if params["dense_source"] == SUMMARY_FILE else params["dense_source"]
    note = f"The dense parameter count is {source}; the dense file size is that count times "
    note += f"{size['bytes_per_param']} bytes per parameter."
    return "## Size and compute\n\n" + "\n".join(lines) + "\n\n" + note


def _accuracy_section(accuracy: dict[str, Any] | None) -> str:
    if accuracy is None:
        return f"## Accuracy\n\nAccuracy was {_NOT_RECORDED} (no `{SUMMARY_FILE}` with an `accuracy` entry)."
    stages = list(accuracy["stages"])
    lines = ["| metric | " + " | ".join(stages) + " | change (compressed - dense) |"]
    lines.append("|---|" + "---:|" * (len(stages) + 1))
    for metric in accuracy["metrics"]:
        values = [_number(accuracy["stages"][s].get(metric)) for s in stages]
        change = accuracy["change"].get(metric)
        lines.append(f"| {metric} | " + " | ".join(values) + f" | {'' if change is None else f'{change:+.4f}'} |")
    legend = (
        "Stages: *dense* before compression, *factored* after SVD training at full rank, *pruned* right after "
        "truncating the ranks, *compressed* after fine-tuning (the exported model). Metrics without a prefix are "
        "on the validation split."
    )
    return "## Accuracy\n\n" + "\n".join(lines) + "\n\n" + legend


def _plots_section(plots: Sequence[str]) -> str:
    captions = {
        RANKS_PNG: "Kept rank against full rank, per layer",
        SPECTRA_PNG: "Singular values before and after SVD training, representative layers",
    }
    return "## Plots\n\n" + "\n\n".join(f"![{captions.get(p, p)}]({p})" for p in plots) if plots else ""


def _layer_table(layers: list[dict[str, Any]]) -> str:
    lines = [
        "| layer | shape (out x in) | full rank | kept rank | kept % | stored as |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in layers:
        out_features, in_features = row["shape"]
        lines.append(
            f"| `{row['name']}` | {out_features} x {in_features} | {row['full_rank']} | {row['kept_rank']} | "
            f"{_pct(row['kept_fraction'])} | {row['stored_as']} |"
        )
    note = "A layer whose kept rank would not save parameters (r x (out + in) >= out x in) is stored dense."
    return "## Per-layer ranks\n\n" + note + "\n\n" + "\n".join(lines)


def _accuracy_headline(accuracy: dict[str, Any] | None) -> str:
    if accuracy is None or not accuracy["change"]:
        return _NOT_RECORDED
    dense, compressed = accuracy["stages"]["dense"], accuracy["stages"]["compressed"]
    # Prefer the accuracy of each split; fall back to whatever metrics both stages have (e.g. f1 only).
    metrics = [m for m in accuracy["change"] if m.endswith("accuracy")] or list(accuracy["change"])
    return "; ".join(
        f"{_split_name(m)} {dense[m]:.4f} dense -> {compressed[m]:.4f} compressed ({accuracy['change'][m]:+.4f})"
        for m in metrics
    )


def _split_name(metric: str) -> str:
    split, _, name = metric.rpartition("_")
    return f"{split or 'validation'} {name}"


def _describe_selection(selection: dict[str, Any] | None) -> str:
    if not selection:
        return _NOT_RECORDED
    method, multiple = selection.get("method"), selection.get("rank_multiple", 1)
    rounding = f", ranks rounded up to multiples of {multiple}" if multiple > 1 else ""
    if method == "energy" and selection.get("energy") is not None:
        energy = selection["energy"]
        return f"energy: each layer keeps the fewest singular values holding {energy:.4g} of its energy{rounding}"
    if method == "budget" and selection.get("budget") is not None:
        return (
            f"global budget: one energy threshold chosen so the target layers keep {selection['budget']:.4g} of "
            f"their dense parameters{rounding}"
        )
    return "`" + json.dumps(selection, sort_keys=True) + "`"


def _pct(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction:.1%}"


def _times(factor: float | None) -> str:
    return "n/a" if factor is None else f"{factor:.2f}x"


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else ""


def _short(count: int) -> str:
    """`22,713,216` -> `22.71M`, for the headline; the tables keep exact counts."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{suffix}"
    return str(count)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ---- plots --------------------------------------------------------------------------------------------------------


def _require_matplotlib() -> None:
    """Raise a clear ImportError when matplotlib (a requirement of the report only) is missing."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "`hf-svd-compress report` draws its plots with matplotlib, which is not installed: pip install matplotlib"
        ) from err


def _figure(width: float, height: float) -> Any:
    # A bare Figure on an Agg canvas, not pyplot: no global backend switch, no figure registry to leak into, so
    # nothing stays open after saving, also when called from a notebook with another backend.
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def short_names(names: Sequence[str]) -> list[str]:
    """Layer names shortened for plot labels, keeping at least the last part of each.

    The dotted prefix all names share is dropped, and so is the path to the repeated blocks when all blocks sit
    under one path: `bert.encoder.layer.0.attention.self.query` -> `0.attention.self.query`, also next to
    `bert.pooler.dense` or `classifier` (which keep their names).
    """
    parts = [name.split(".") for name in names]
    common = 0
    if parts:
        limit = min(len(p) for p in parts) - 1
        while common < limit and all(p[common] == parts[0][common] for p in parts):
            common += 1
    short = [".".join(p[common:]) for p in parts]
    block_paths = {name[: _block_start(name)] for name in short if _block_start(name) is not None}
    if len(block_paths) == 1:
        short = [name[_block_start(name) :] if _block_start(name) is not None else name for name in short]
    return short


def _block_start(name: str) -> int | None:
    """Where the block index of a module name starts (`encoder.layer.3.fc` -> 14), or None without one."""
    match = re.search(r"(?:^|\.)(\d+)\.", name)
    return match.start(1) if match else None


def _block_and_kind(name: str) -> tuple[int | None, str]:
    """The first integer part of a module name (its block index) and the part after it (its layer kind)."""
    match = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def plot_ranks(layers: list[dict[str, Any]], path: str | Path) -> Path:
    """Horizontal bars per layer: full rank (light), kept rank (solid; orange when stored dense), break-even tick.

    Args:
        layers (`list[dict]`): The `layers` rows of `build_report`.
        path (`str` or `Path`): The PNG to write.

    Returns:
        `Path` of the PNG.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(layers)
    # About a quarter inch per layer keeps 8-point labels apart for any layer count.
    figure = _figure(9.0, min(2.1 + 0.24 * max(n, 1), 300.0))
    ax = figure.add_subplot()
    y = list(range(n))
    full = [row["full_rank"] for row in layers]
    kept = [row["kept_rank"] for row in layers]
    dense = [row["stored_as"] == "dense" for row in layers]
    ax.barh(y, full, height=0.8, color=_GREY)
    ax.barh(y, kept, height=0.55, color=[_ORANGE if d else _BLUE for d in dense])
    # From the break-even rank on (speed_break_even m n / (m + n)) the export stores the layer dense.
    even = [row.get("break_even_rank", row["shape"][0] * row["shape"][1] / sum(row["shape"])) for row in layers]
    ax.scatter(even, y, marker="|", s=90, color="black", linewidths=1.2, zorder=3)
    for i, row in enumerate(layers):
        text = f"{row['kept_rank']}/{row['full_rank']} ({row['kept_fraction']:.0%})" if row["full_rank"] else ""
        ax.text(row["full_rank"], i, " " + text, va="center", fontsize=7)
    _block_separators(ax, [row["name"] for row in layers])
    ax.set_yticks(y, short_names([row["name"] for row in layers]), fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)  # first layer on top, as in the tables
    ax.set_xlim(0, max(full, default=1) * 1.22)  # room for the labels right of the bars
    ax.set_xlabel("rank (number of singular values)")
    ax.grid(axis="x", alpha=0.3)
    # Legend above the bars (built by hand: a bar list of mixed colours would show only its first colour), so it
    # never hides the last rows.
    handles = [Patch(color=_GREY, label="full rank"), Patch(color=_BLUE, label="kept rank, stored as factors")]
    if any(dense):
        handles.append(Patch(color=_ORANGE, label="kept rank, stored dense (factors would not save)"))
    handles.append(Line2D([], [], marker="|", linestyle="", color="black", markersize=9, label="dense from this rank"))
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, fontsize=8, frameon=False)
    # The title gets its own strip: tight_layout alone lets a tall figure's title run into the legend.
    height = figure.get_size_inches()[1]
    figure.suptitle(f"Kept rank per layer ({n} layers)", fontsize=11, y=1 - 0.1 / height, va="top")
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / height), pad=0.6)
    figure.savefig(path)
    return Path(path)


def _block_separators(ax: Any, names: Sequence[str]) -> None:
    """A thin line between consecutive blocks (`layer.0.*`, `layer.1.*`, ...) so a long chart reads per block."""
    blocks = [_block_and_kind(name)[0] for name in names]
    for i in range(1, len(blocks)):
        if blocks[i] != blocks[i - 1]:
            ax.axhline(i - 0.5, color="grey", linewidth=0.6, alpha=0.6)


def representative_layers(names: Sequence[str], depths: int = 3, kinds: int = 6) -> list[list[str]]:
    """A grid of layers to show: rows are the first, middle and last blocks, columns the layer kinds.

    Without repeated blocks (no integer in the names), one row of up to `2 * depths` layers from first to last.

    Args:
        names (`Sequence[str]`): Module names, in model order.
        depths (`int`, defaults to 3): At most this many rows.
        kinds (`int`, defaults to 6): At most this many columns (spread over the kinds when there are more).

    Returns:
        `list[list[str]]`: rows of module names (a row may be shorter when a block lacks a kind).
    """
    by_block: dict[int, dict[str, str]] = {}
    for name in names:
        block, kind = _block_and_kind(name)
        if block is not None:
            by_block.setdefault(block, {})[kind] = name
    if len(by_block) < 2:
        return [[names[i] for i in _spread(len(names), depths * 2)]] if names else []
    blocks = sorted(by_block)
    all_kinds = list(dict.fromkeys(kind for b in blocks for kind in by_block[b]))
    chosen_kinds = [all_kinds[i] for i in _spread(len(all_kinds), kinds)]
    rows = [
        [by_block[blocks[i]][k] for k in chosen_kinds if k in by_block[blocks[i]]]
        for i in _spread(len(blocks), depths)
    ]
    return [row for row in rows if row]


def _spread(count: int, at_most: int) -> list[int]:
    """Up to `at_most` indices into `count` items, evenly spread and including the first and the last."""
    if count <= at_most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (at_most - 1)) for i in range(at_most)}) if at_most > 1 else [0]


def plot_spectra(
    initial: dict[str, list[float]], trained: dict[str, list[float]], ranks: dict[str, int], path: str | Path
) -> Path:
    """Singular values of representative layers before and after SVD training, log scale, kept rank marked.

    Args:
        initial (`dict[str, list[float]]`): Per module, the spectrum right after factoring (pretrained weights).
        trained (`dict[str, list[float]]`): Per module, the spectrum after SVD training, before pruning.
        ranks (`dict[str, int]`): Kept rank per module (drawn as a vertical line).
        path (`str` or `Path`): The PNG to write.

    Returns:
        `Path` of the PNG.
    """
    names = list(dict.fromkeys([*initial, *trained]))
    grid = representative_layers(names)
    rows, cols = len(grid), max(len(row) for row in grid)
    figure = _figure(2.9 * cols + 0.4, 2.3 * rows + 0.9)
    axes = figure.subplots(rows, cols, squeeze=False)
    labels = dict(zip(names, short_names(names), strict=True))
    for r, row in enumerate(grid):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.set_visible(False)
                continue
            _spectrum_panel(ax, labels[row[c]], initial.get(row[c]), trained.get(row[c]), ranks.get(row[c]))
            ax.set_xlabel("index" if r == rows - 1 else "")
            ax.set_ylabel("singular value" if c == 0 else "")
    figure.legend(handles=_spectra_legend(bool(initial), bool(trained), bool(ranks)), loc="upper right", ncol=3,
                  fontsize=8, frameon=False)  # fmt: skip
    figure.suptitle("Singular value spectra (log scale)", x=0.01, ha="left", fontsize=11)
    # Fixed margins in inches: tight_layout measures every tick label of every log axis and takes seconds.
    width, height = figure.get_size_inches()
    figure.subplots_adjust(
        left=0.75 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.7 / height, wspace=0.3, hspace=0.5
    )
    figure.savefig(path)
    return Path(path)


def _spectra_legend(initial: bool, trained: bool, ranks: bool) -> list[Any]:
    # Built by hand: the first panel may lack a line that others have.
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.55", linestyle="--", label="initial")] if initial else []
    handles += [Line2D([], [], color=_BLUE, label="after SVD training")] if trained else []
    return handles + ([Line2D([], [], color=_RED, linestyle=":", label="kept rank")] if ranks else [])


def _spectrum_panel(
    ax: Any, label: str, initial: list[float] | None, trained: list[float] | None, rank: int | None
) -> None:
    from matplotlib.ticker import NullLocator

    values = [v for s in (initial, trained) if s for v in s if v > 0]
    if initial:
        ax.plot(range(1, len(initial) + 1), initial, color="0.55", linestyle="--", linewidth=1.2)
    if trained:
        ax.plot(range(1, len(trained) + 1), trained, color=_BLUE, linewidth=1.4)
    if rank is not None:
        ax.axvline(rank, color=_RED, linestyle=":", linewidth=1.4)
        ax.text(rank, 1.0, f" r={rank}", transform=ax.get_xaxis_transform(), va="top", fontsize=7, color=_RED)
    if values:
        ax.set_yscale("log", nonpositive="mask")
        # Values driven to ~0 by the sparsity term would stretch the axis over many decades; clip the view.
        # At least a decade shown, so that the axis has a labelled major tick.
        top, bottom = max(values) * 1.5, max(min(values), max(values) * 1e-5) / 1.5
        ax.set_ylim(min(bottom, top / 12), top)
        # Minor log ticks add nothing at this size and cost most of the drawing time.
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_title(label, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, which="major")
