"""Activation statistics for a data-aware start of SVD training (the input scaling of ASVD, Yuan et al. 2023)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from transformers import default_data_collator

from .config import SVDConfig
from .layers import FACTORABLE_TYPES, dense_weight
from .matching import find_targets


@torch.inference_mode()
def activation_scales(
    model: nn.Module,
    dataset: Any,
    config: SVDConfig | None = None,
    data_collator: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
    batch_size: int = 16,
    max_batches: int = 64,
    alpha: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Per-input-channel scales `a = mean|x| ** alpha` of every linear layer `svd_factorize_(model, config)` would
    factor, for `svd_factorize_(model, config, input_scales=a)`.

    The inputs are those of the first `max_batches * batch_size` examples of `dataset`, in order (so every process
    of a multi-process run computes the same scales); positions that `attention_mask` marks as padding are left
    out.

    Args:
        model (`nn.Module`): The dense model, before factoring.
        dataset: Examples the model's forward accepts once collated (the training set, say); labels are dropped.
        config (`SVDConfig`, *optional*): The targets; defaults to `SVDConfig()`.
        data_collator (`Callable`, *optional*): Batches examples; defaults to transformers' `default_data_collator`
            (pass the padding collator of a text task).
        batch_size (`int`, defaults to 16): Examples per forward pass.
        max_batches (`int`, defaults to 64): Forward passes at most.
        alpha (`float`, defaults to 0.5): The exponent; ASVD found 0.5 best.

    Returns:
        `dict[str, torch.Tensor]`: Layer name -> float32 scales of its `in_features`, on the CPU.

    Raises:
        `ValueError`: a target is not a linear layer (a convolution's input channels are not its weight's columns),
            or `dataset` is empty.
    """
    config = config or SVDConfig()
    targets = config.resolved_targets(getattr(getattr(model, "config", None), "model_type", None))
    modules = dict(model.named_modules())
    names = find_targets(model, targets, config.exclude_modules, (*FACTORABLE_TYPES, nn.Conv2d))
    convs = [n for n in names if isinstance(modules[n], nn.Conv2d)]
    if convs:
        raise ValueError(
            f"Data-aware factors are for linear layers only; the targets include convolutions {convs[:3]}: "
            "leave them out with exclude_modules."
        )
    count = min(len(dataset), max_batches * batch_size)
    if count == 0:
        raise ValueError("activation_scales needs at least one example: the dataset is empty.")
    sums = {n: torch.zeros(dense_weight(modules[n]).shape[1], dtype=torch.float64) for n in names}
    rows_seen = dict.fromkeys(names, 0)
    mask: dict[str, torch.Tensor | None] = {"now": None}

    def record(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            x, pad = args[0], mask["now"]
            rows = x[pad.bool()] if pad is not None and x.shape[:2] == pad.shape else x.reshape(-1, x.shape[-1])
            sums[name] += rows.abs().double().sum(0).cpu()
            rows_seen[name] += rows.shape[0]

        return hook

    was_training = model.training
    model.eval()
    handles = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    device = next(model.parameters()).device
    try:  # a lazy subset: only one batch of (say, image) examples is in memory at a time
        first = Subset(dataset, range(count))
        loader = DataLoader(first, batch_size=batch_size, collate_fn=data_collator or default_data_collator)
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "label")}
            mask["now"] = batch.get("attention_mask")
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {n: (sums[n] / max(1, rows_seen[n])).pow(alpha).float() for n in names}
