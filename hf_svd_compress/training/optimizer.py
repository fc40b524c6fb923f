"""The singular values' own optimizer groups: a scaled learning rate while the sparsity term reshapes the spectrum,
put back to the base rate when pruning ends it."""

from __future__ import annotations

import torch

# Marks the optimizer groups of the singular values with their learning-rate multiple.
_S_LR_KEY = "singular_value_lr_scale"


def scale_singular_value_lr(optimizer: torch.optim.Optimizer, ids: set[int], scale: float) -> None:
    """Move the parameters in `ids` out of each group into a copy of that group with `lr * scale`."""
    for group in list(optimizer.param_groups):
        singular = [p for p in group["params"] if id(p) in ids]
        if singular:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
            settings = {k: v for k, v in group.items() if k != "params"}
            optimizer.add_param_group({**settings, "params": singular, "lr": group["lr"] * scale, _S_LR_KEY: scale})


def unscale_singular_value_lr(optimizer: torch.optim.Optimizer, lr_scheduler=None) -> None:
    """Put the groups `scale_singular_value_lr` made back at the base learning rate, in the optimizer and in the
    scheduler's base rates (which a `LambdaLR`, the Trainer's schedules, multiplies at every step)."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps it
    for index, group in enumerate(optimizer.param_groups):
        scale = group.pop(_S_LR_KEY, None)  # popped: a second call (or a resumed run) changes nothing
        if not scale:
            continue
        group["lr"] /= scale
        if "initial_lr" in group:
            group["initial_lr"] /= scale
        if scheduler is not None:
            scheduler.base_lrs[index] /= scale
