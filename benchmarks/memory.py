"""Peak CPU memory of factoring a model and of a training step: SVD training vs dense fine-tuning.

    python benchmarks/memory.py                  # BERT-base shape (hidden 768, 12 heads, intermediate 3072), 12 layers
    python benchmarks/memory.py --layers 4       # fewer layers, faster
    python benchmarks/memory.py --tiny           # the CI smoke run (< 30 s)

Each measurement runs in a fresh Python process (this script with `--child`), so no allocation of an earlier one
is counted. The process imports everything, records its resident memory (`VmRSS`) as the baseline, builds the model,
resets the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`), runs the operation and reads `VmHWM`:
"peak" is `VmHWM - baseline`, so it includes the model itself. `MALLOC_MMAP_THRESHOLD_` is fixed at 128 KiB so that
every tensor is its own mapping, returned to the kernel when freed (glibc would otherwise keep freed heap pages and
hide later peaks). Goals: factoring peak <= 1.2 x the model it starts from or produces (the larger one: a full-rank
factored BERT-base holds 1.39 x the dense parameters, since a square layer keeps both U and V, so only a start below
full rank can stay under 1.2 x the dense model), and a full-rank SVD training step <= 2 x the dense step.

Weights: random init (`random`) has a flat (Marchenko-Pastur) spectrum, where `init_energy` keeps nearly every
singular value; `decaying` gives every factored layer `s_i = exp(-i / (0.2 min(m, n)))` in random orthonormal bases
(energy 0.99 keeps 46% of the rank, 0.999 keeps 69%), closer to pretrained weights. `init_max_rank` caps the rank
whatever the spectrum (and takes the randomized SVD when the cap is at most a quarter of the full rank).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

# Fixed threshold: every allocation above 128 KiB is mmapped and unmapped on free, so RSS follows live tensors.
MMAP_THRESHOLD = "131072"
MB = 2**20

SHAPES = {
    "bert-base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_attention_heads=4, intermediate_size=256),
}
# (label, operation, weights, SVDConfig options)
CASES = [
    ("factor, full rank", "factor", "random", {}),
    ("factor, init_energy 0.999", "factor", "random", {"init_energy": 0.999}),
    ("factor, init_energy 0.99", "factor", "random", {"init_energy": 0.99}),
    ("factor, init_energy 0.999", "factor", "decaying", {"init_energy": 0.999}),
    ("factor, init_energy 0.99", "factor", "decaying", {"init_energy": 0.99}),
    ("factor, init_max_rank 1/4", "factor", "random", {"init_max_rank": "quarter"}),
    # compress()'s start: input covariances over 16 batches of 8 x seq tokens, whitened factors, streamed in chunks
    # of at most a quarter of the model's bytes of float64 covariances.
    ("calibrate + factor, whitened", "calibrate", "random", {"orth_weight": 0.0, "sparsity": None}),
    ("train step, dense", "train_dense", "random", None),
    ("train step, SVD full rank", "train_svd", "random", {}),
    ("train step, SVD init_energy 0.99", "train_svd", "decaying", {"init_energy": 0.99}),
]


# ---- inside a child process ----------------------------------------------------------------------------------------


def rss_kib(field: str = "VmRSS") -> int:
    """`VmRSS` (now) or `VmHWM` (peak since the last reset) of this process, in KiB."""
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1))


def settle() -> None:
    """Free what can be freed, so the next reading shows live memory only."""
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def build_model(shape: str, layers: int, weights: str):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, num_hidden_layers=layers, num_labels=2, **SHAPES[shape])
    model = BertForSequenceClassification(config)
    if weights == "decaying":
        give_decaying_spectra(model)
    return model


def give_decaying_spectra(model) -> None:
    """Replace each encoder linear weight by `Q1 diag(s) Q2^T` with exponentially decaying `s`.

    One pair of random orthonormal bases per shape, with fresh random column signs per layer (still orthonormal),
    keeps the set-up to a few QR factorizations.
    """
    import torch

    bases: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    g = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layer." in name:
            m, n = module.weight.shape
            r = min(m, n)
            if (m, n) not in bases:
                bases[m, n] = (
                    torch.linalg.qr(torch.randn(m, r, generator=g))[0],
                    torch.linalg.qr(torch.randn(n, r, generator=g))[0],
                )
            q1, q2 = bases[m, n]
            signs = torch.randint(0, 2, (r,), generator=g).float() * 2 - 1
            s = 0.5 * torch.exp(-torch.arange(r) / (0.2 * r))
            with torch.no_grad():
                module.weight.copy_((q1 * (s * signs)) @ q2.T)


def svd_config(options: dict, hidden: int):
    from hf_svd_compress import SVDConfig

    options = {"sparsity": "hoyer", "sparsity_weight": 1e-3, **options}
    if options.get("init_max_rank") == "quarter":
        options["init_max_rank"] = hidden // 4
    return SVDConfig(**options)


def train_two_steps(model, svd: bool, batch: int, seq: int) -> None:
    """Two AdamW steps with the (SVD)Trainer: the second has the optimizer state, the first the step's peak."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_svd_compress import SVDTrainer, SVDTrainingArguments

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (batch * 2, seq), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})
    common = dict(
        output_dir=tempfile.mkdtemp(),
        max_steps=2,
        per_device_train_batch_size=batch,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    if svd:
        SVDTrainer(model=model, args=SVDTrainingArguments(**common), train_dataset=data).train()
    else:
        Trainer(model=model, args=TrainingArguments(**common), train_dataset=data).train()


def calibration_data(model, spec: dict):
    """16 batches of 8 random token sequences (`spec["seq"]` long), as `CalibrationData`."""
    import torch
    from datasets import Dataset

    from hf_svd_compress import CalibrationData

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (8 * 16, spec["seq"]), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    return CalibrationData(data, batch_size=8, max_batches=16)


def child(spec: dict) -> dict:
    """Run one measurement in this (fresh) process; returns MB figures."""
    import torch

    from hf_svd_compress import svd_factorize_, svd_layers

    torch.set_num_threads(spec["threads"])
    settle()
    baseline = rss_kib()
    model = build_model(spec["shape"], spec["layers"], spec["weights"])
    settle()
    result = {"model_rss_mb": (rss_kib() - baseline) / 1024, "dense_params_mb": param_mb(model)}
    hidden = model.config.hidden_size
    if spec["op"] == "train_svd":
        svd_factorize_(model, svd_config(spec["options"], hidden))
        settle()
    result["start_rss_mb"] = (rss_kib() - baseline) / 1024
    result["start_params_mb"] = param_mb(model)
    reset_peak()
    start = time.perf_counter()
    if spec["op"] == "factor":
        svd_factorize_(model, svd_config(spec["options"], hidden))
    elif spec["op"] == "calibrate":
        svd_factorize_(model, svd_config(spec["options"], hidden), calibration=calibration_data(model, spec))
    elif spec["op"].startswith("train"):
        train_two_steps(model, spec["op"] == "train_svd", spec["batch"], spec["seq"])
    result["seconds"] = time.perf_counter() - start
    result["peak_mb"] = (rss_kib("VmHWM") - baseline) / 1024
    settle()
    result["end_params_mb"] = param_mb(model)
    layers = svd_layers(model).values()
    if layers:
        result["rank_fraction"] = sum(m.full_rank for m in layers) / sum(
            min(m.in_features, m.out_features) for m in layers
        )
    return result


def param_mb(model) -> float:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / MB


# ---- the parent: run the children, print the table -----------------------------------------------------------------


def measure(specs: list[dict], threads: int) -> list[dict]:
    """Run `specs` in one fresh process, one after the other; returns their results."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", json.dumps(specs)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {specs} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(label: str, weights: str, r: dict, dense_mb: float, dense_step_mb: float | None) -> str:
    """One table row; factoring is compared to the larger of the model it starts from and the one it produces."""
    held = max(r["start_params_mb"], r["end_params_mb"])
    step = f"{r['peak_mb'] / dense_step_mb:.2f}" if dense_step_mb and label.startswith("train") else ""
    rank = f"{r['rank_fraction']:.2f}" if "rank_fraction" in r else "-"
    return (
        f"| {label} | {weights} | {rank} | {r['start_params_mb']:.0f} -> {r['end_params_mb']:.0f} | "
        f"{r['peak_mb']:.0f} | {r['peak_mb'] / dense_mb:.2f} | {r['peak_mb'] / held:.2f} | {step} | "
        f"{r['seconds']:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="encoder layers of the BERT-base-shaped model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each measurement")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few cases: the CI smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.child:
        print(json.dumps([child(spec) for spec in json.loads(cli.child)]))
        return

    shape, layers, batch, seq = ("tiny", 2, 4, 32) if cli.tiny else ("bert-base", cli.layers, cli.batch, cli.seq)
    cases = [c for c in CASES if not cli.tiny or c[3] == {} or c[1] in ("train_dense", "calibrate")]
    specs = [
        dict(shape=shape, layers=layers, weights=w, op=op, options=o or {}, batch=batch, seq=seq, threads=cli.threads)
        for _, op, w, o in cases
    ]
    import torch

    print(
        f"{shape} shape, {layers} layers; train step: batch {batch} x seq {seq}, AdamW; torch {torch.__version__}, "
        f"{cli.threads} threads, {platform.machine()}, {os.cpu_count()} CPUs"
        + (" (--tiny: one process for all cases, figures not isolated)" if cli.tiny else "")
    )
    # --tiny runs every case in one process (fast); otherwise each case gets a fresh one and its row comes at once.
    results = iter(measure(specs, cli.threads)) if cli.tiny else (measure([spec], cli.threads)[0] for spec in specs)
    dense_mb = dense_step_mb = None
    for (label, op, weights, _), r in zip(cases, results):
        if dense_mb is None:
            dense_mb = r["model_rss_mb"]
            print(f"dense model: {r['dense_params_mb']:.0f} MB of parameters and buffers, {dense_mb:.0f} MB RSS")
            header = "| case | weights | rank kept | params MB (start -> end) | peak MB | peak / dense model | "
            print(header + "peak / max(start, end) | step / dense step | s |")
            print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        if op == "train_dense":
            dense_step_mb = r["peak_mb"]
        print(row(label, weights, r, dense_mb, dense_step_mb), flush=True)


if __name__ == "__main__":
    main()
