"""A few steps of SVDTrainer with `prune_at_step` on a tiny factored BERT; every process dumps what it holds.

    python tests/scripts/train_prune_ddp.py --per_device_batch 8 --out OUT            # the single-process reference
    python -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no tests/scripts/train_prune_ddp.py --per_device_batch 4 --out OUT   # DDP, 2 gloo processes

FSDP cannot go through the Trainer on the CPU (accelerate keeps a gloo run as DDP): `dist_fsdp_train_prune.py`
repeats this run with FSDP1 and FSDP2 in a hand-written loop around `SVDTrainer.compute_loss`. The dataset holds
exactly `total batch x steps` examples and the first token of example `i` is `i`, so each process records which
examples every optimizer step used; the test checks that a 2 x 4 run and a 1 x 8 run saw the same examples in the
same steps before comparing weights. Each process writes `rank{i}.safetensors` (its whole parameters and masks,
gathered under FSDP) and `rank{i}.json` (ranks, examples per step, logs, a float64 checksum); rank 0 alone writes
`compressed/`. Plain SGD with momentum, no weight decay and no clipping keep the updates comparable to float
precision.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from hf_svd_compress import SVDConfig, SVDTrainer, SVDTrainingArguments, current_ranks, save_compressed, svd_factorize_
from hf_svd_compress.pipeline import end_processes

TOTAL_BATCH, STEPS, PRUNE_AT, PRUNE_ENERGY, LEARNING_RATE = 8, 6, 3, 0.8, 0.05
SEQ_LEN, VOCAB = 12, 100
FSDP_PREFIX = "_fsdp_wrapped_module."


def tiny_factored_bert() -> BertForSequenceClassification:
    """Two BERT layers of width 32, dropout 0 (so every process computes the same function), fully factored."""
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    model = BertForSequenceClassification(config)
    return svd_factorize_(model, SVDConfig(orth_weight=1.0, sparsity="hoyer", sparsity_weight=0.05))


def training_data() -> Dataset:
    """`TOTAL_BATCH x STEPS` examples, one epoch; the first token is the example's index (its id in the logs)."""
    g = torch.Generator().manual_seed(1)
    n = TOTAL_BATCH * STEPS
    ids = torch.randint(STEPS * TOTAL_BATCH, VOCAB, (n, SEQ_LEN), generator=g)
    ids[:, 0] = torch.arange(n)
    labels = (ids[:, 1] % 3).tolist()
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels})


class RecordingTrainer(SVDTrainer):
    """`SVDTrainer` that remembers which examples each optimizer step used on this process."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.examples: dict[int, list[int]] = {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step + 1  # the optimizer step this micro-batch counts towards
        self.examples.setdefault(step, []).extend(inputs["input_ids"][:, 0].tolist())
        return super().training_step(model, inputs, num_items_in_batch)


def training_arguments(out: Path, per_device_batch: int, optim: str = "sgd") -> SVDTrainingArguments:
    """The run's settings; no weight decay or clipping, so a hand-written FSDP loop can repeat the exact update."""
    return SVDTrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=per_device_batch,
        dataloader_drop_last=True,
        seed=0,
        data_seed=0,
        optim=optim,
        optim_args="momentum=0.9" if optim == "sgd" else None,
        learning_rate=LEARNING_RATE if optim == "sgd" else 1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        prune_at_step=PRUNE_AT,
        prune_energy=PRUNE_ENERGY,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
    )


def whole_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model`, whole on each process (FSDP1 and FSDP2 gather their shards)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    fsdp1 = any(isinstance(m, FSDP) for m in model.modules())
    with FSDP.summon_full_params(model, writeback=False) if fsdp1 else contextlib.nullcontext():
        state = {}
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if hasattr(tensor, "full_tensor"):  # an FSDP2 DTensor shard
                tensor = tensor.full_tensor()
            state[clean_name(name)] = tensor.detach().cpu().clone().contiguous()
        return state


def clean_name(name: str) -> str:
    """The module name without DDP/FSDP wrapper prefixes, as in the unwrapped model."""
    return name.replace(FSDP_PREFIX, "").removeprefix("module.")


def dump(out: Path, rank: int, world_size: int, state: dict, ranks: dict, examples: dict, logs: list) -> None:
    """What this process holds: `rank{rank}.safetensors` (whole state) and `rank{rank}.json` (the rest)."""
    save_file(state, str(out / f"rank{rank}.safetensors"))
    record = {
        "world_size": world_size,
        "ranks": {clean_name(k): v for k, v in ranks.items()},
        "examples": examples,
        "logs": logs,
        "checksum": sum(t.double().sum().item() for t in state.values() if t.is_floating_point()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per_device_batch", type=int, required=True)
    # SGD with momentum by default: Adam's first steps are ~lr * sign(grad), which turns float noise in gradients
    # that are ~0 (e.g. of attention keys) into lr-sized differences between otherwise equal runs.
    parser.add_argument("--optim", default="sgd", choices=["sgd", "adamw_torch"])
    parser.add_argument("--out", required=True)
    cli = parser.parse_args()
    out = Path(cli.out)

    model = tiny_factored_bert()
    args = training_arguments(out, cli.per_device_batch, cli.optim)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=training_data())
    trainer.train()

    state = whole_state(trainer.model)
    rank, world_size = trainer.args.process_index, trainer.args.world_size
    dump(out, rank, world_size, state, current_ranks(model), trainer.examples, trainer.state.log_history)
    if trainer.is_world_process_zero():  # saving happens once, on the main process, as in the pipeline
        save_compressed(trainer.model, out / "compressed")
    del trainer  # its DDP wrapper holds the process group: end_processes frees both
    end_processes()


if __name__ == "__main__":
    main()
