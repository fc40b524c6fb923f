"""The run of `train_prune_ddp.py` with the model sharded by FSDP1 or FSDP2, on CPU processes talking over gloo.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no tests/scripts/dist_fsdp_train_prune.py --fsdp_versions 1 2 --out OUT

writes `OUT/fsdp{version}/rank{i}.*` for each version, one after the other in the same processes.

accelerate 1.15 keeps a CPU (gloo) run as DDP even with `--use_fsdp` (`AcceleratorState` switches to FSDP only for
GPU-like devices), so the Trainer cannot shard here. This script shards the factored model itself (each `BertLayer`,
then the root) and runs the same steps by hand: the batches come from the same `SVDTrainer`'s train dataloader (this
process's share of each step, as under DDP), the loss from `SVDTrainer.compute_loss` (task loss plus the regularizer
terms each layer records inside its forward, where FSDP has gathered its parameters), the update from the same SGD
with momentum, and pruning from `SVDPruningCallback` at the same step, outside forward where parameters are sharded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from train_prune_ddp import (
    PRUNE_AT,
    STEPS,
    RecordingTrainer,
    dump,
    tiny_factored_bert,
    training_arguments,
    training_data,
    whole_state,
)
from transformers import TrainerControl
from transformers.models.bert.modeling_bert import BertLayer

from hf_svd_compress import current_ranks
from hf_svd_compress.pipeline import end_processes
from hf_svd_compress.training.callbacks import SVDPruningCallback


def shard(model: nn.Module, version: int) -> nn.Module:
    """Shard every `BertLayer` and the rest of the model (full sharding) with FSDP `version`, on the CPU."""
    if version == 2:
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        return fully_shard(model)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = ModuleWrapPolicy({BertLayer})
    return FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))


def train_sharded(version: int, out: Path) -> None:
    """The run of `train_prune_ddp.py` with the model sharded by FSDP `version`; dumps what this process holds."""
    model = tiny_factored_bert()
    args = training_arguments(out, per_device_batch=4)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=training_data())  # sets up gloo
    loader = trainer.get_train_dataloader()
    sharded = shard(model, version)
    sharded.train()
    optimizer = torch.optim.SGD(sharded.parameters(), lr=args.learning_rate, momentum=0.9)
    # The rank rounding SVDTrainer applies for prune_at_step (SVDConfig.prune_rank_multiple).
    multiple = model.svd_config.prune_rank_multiple
    pruning = SVDPruningCallback(PRUNE_AT, energy=args.prune_energy, rank_multiple=multiple)
    logs = []
    for step, batch in zip(range(STEPS), loader):
        trainer.state.global_step = step
        trainer.examples[step + 1] = batch["input_ids"][:, 0].tolist()
        loss = trainer.compute_loss(sharded, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trainer.state.global_step = step + 1
        pruning.on_step_end(args, trainer.state, TrainerControl(), model=model)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # the Trainer logs the mean over processes
        logs.append({"step": step + 1, "loss": mean_loss.item() / dist.get_world_size()})

    state = whole_state(sharded)
    dump(out, dist.get_rank(), dist.get_world_size(), state, current_ranks(model), trainer.examples, logs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fsdp_versions", type=int, nargs="+", choices=[1, 2], required=True)
    parser.add_argument("--out", required=True)
    cli = parser.parse_args()
    for version in cli.fsdp_versions:
        out = Path(cli.out) / f"fsdp{version}"
        out.mkdir(parents=True, exist_ok=True)
        train_sharded(version, out)
    end_processes()


if __name__ == "__main__":
    main()
