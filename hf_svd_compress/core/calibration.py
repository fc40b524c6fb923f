"""Calibration statistics of the inputs of the target layers, for a data-aware start of SVD training.

Two statistics, each collected by one pass of calibration batches through the dense model:

- `input_covariances`: the second moment `C = mean x x^T` of every target layer's inputs (float64), for the
  truncation-aware whitening of SVD-LLM (Wang et al. 2025) / DRONE (Chen et al. 2021): factored with it, dropping
  singular value `i` of a layer costs exactly `s_i^2` of mean squared output error on the calibration data.
- `activation_scales`: ASVD's per-input-channel scales `mean|x| ** alpha` (Yuan et al. 2023).

Positions that `attention_mask` marks as padding are left out. Under several processes each process runs its share
of the calibration examples and the sums are all-reduced, so every process builds identical factors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import DataLoader, Subset
from transformers import default_data_collator

from hf_svd_compress.config import SVDConfig
from hf_svd_compress.core.matching import find_targets
from hf_svd_compress.layers.linalg import FACTORABLE_TYPES, dense_weight


@dataclass
class CalibrationData:
    """Where calibration inputs come from, for `input_covariances` and `svd_factorize_(..., calibration=...)`.

    Args:
        dataset: Examples the model's forward accepts once collated (the training set, say); labels are dropped.
            Its first `max_batches * batch_size` examples are used, in order.
        data_collator (`Callable`, *optional*): Batches examples; defaults to transformers' `default_data_collator`
            (pass the padding collator of a text task).
        batch_size (`int`, defaults to 16): Examples per forward pass.
        max_batches (`int`, defaults to 64): Forward passes at most (in all, over the processes).
        run_model (`Callable[[nn.Module], None]`, *optional*): Instead of `dataset`: a function that runs the model
            on the calibration data itself (as peft's CorDA `run_model`). Every input row counts (padding too), and
            under several processes each runs it whole (the sums are still all-reduced).
    """

    dataset: Any = None
    data_collator: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None
    batch_size: int = 16
    max_batches: int = 64
    run_model: Callable[[nn.Module], None] | None = None

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.run_model is None):
            raise ValueError("CalibrationData needs exactly one of dataset= (examples) or run_model= (a callable).")
        for name in ("batch_size", "max_batches"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"CalibrationData.{name}={value!r}: must be a positive integer, e.g. 16.")
        if self.dataset is not None and min(len(self.dataset), self.batch_size * self.max_batches) == 0:
            raise ValueError(
                "CalibrationData got an empty dataset: the data-aware factors need calibration examples (the "
                "training set, say)."
            )

    def batches(self, device: torch.device) -> Iterable[dict[str, torch.Tensor]]:
        """This process's share of the calibration batches, on `device`, without labels."""
        count = min(len(self.dataset), self.max_batches * self.batch_size)
        rank, world = _rank_and_world()
        if count < world:  # every process must run (and all-reduce) the same layers
            raise ValueError(f"CalibrationData: {count} calibration examples for {world} processes; give more.")
        mine = Subset(self.dataset, range(rank, count, world))  # lazy: one batch of examples in memory at a time
        loader = DataLoader(mine, batch_size=self.batch_size, collate_fn=self.data_collator or default_data_collator)
        for batch in loader:
            yield send_to_device({k: v for k, v in batch.items() if k not in ("labels", "label")}, device)


def target_linear_names(model: nn.Module, config: SVDConfig) -> list[str]:
    """The linear layers `svd_factorize_(model, config)` would factor; refuses convolution targets."""
    targets = config.resolved_targets(getattr(getattr(model, "config", None), "model_type", None))
    modules = dict(model.named_modules())
    names = find_targets(model, targets, config.exclude_modules, (*FACTORABLE_TYPES, nn.Conv2d))
    convs = [n for n in names if isinstance(modules[n], nn.Conv2d)]
    if convs:
        raise ValueError(
            f"Data-aware factors are for linear layers only; the targets include convolutions {convs[:3]}: "
            "leave them out with exclude_modules."
        )
    return names


@torch.no_grad()
def input_covariances(
    model: nn.Module,
    data: CalibrationData | Any,
    config: SVDConfig | None = None,
    names: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The input second moment `C = mean x x^T` (float64, on the CPU) of every target linear layer.

    Layers that read the very same input tensor (query, key and value) share one matrix: the dict maps each of
    their names to the same tensor.

    Args:
        model (`nn.Module`): The model, dense or already factored at full rank (the same function).
        data (`CalibrationData` or a dataset): The calibration inputs; a dataset is wrapped in `CalibrationData`.
        config (`SVDConfig`, *optional*): The targets; defaults to `SVDConfig()`.
        names (`list[str]`, *optional*): Only these layers (a chunk of the targets, to bound memory).

    Returns:
        `dict[str, torch.Tensor]`: Layer name -> `[in_features, in_features]` float64 mean second moment.

    Raises:
        `ValueError`: no calibration data, a convolution target, or batches the model does not accept.
    """
    data = data if isinstance(data, CalibrationData) else CalibrationData(dataset=data)
    names = target_linear_names(model, config or SVDConfig()) if names is None else names
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}  # layer -> the layer whose input it reads (same tensor)

    def accumulate(name: str, rows: torch.Tensor, seen: dict[int, tuple[str, torch.Tensor]], x: torch.Tensor) -> None:
        # `seen` holds this batch's inputs (so no id is reused within it): a second reader of one tensor is aliased.
        owner = seen.setdefault(id(x), (name, x))[0]
        if owner != name:
            shared[name] = owner
            return
        rows = rows.double()
        if name not in sums:
            sums[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
        sums[name] += (rows.T @ rows).cpu()

    totals = _run_hooked(model, modules, names, data, accumulate)
    for name, total in sums.items():
        sums[name] = _all_reduce(total) / max(1.0, totals[name])
    return {n: sums[shared.get(n, n)] for n in names}


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

    The inputs are those of the first `max_batches * batch_size` examples of `dataset`, in order (split over the
    processes of a multi-process run and all-reduced, so every process computes the same scales); positions that
    `attention_mask` marks as padding are left out.

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
    if len(dataset) == 0 or max_batches * batch_size == 0:
        raise ValueError("activation_scales needs at least one example: the dataset is empty.")
    data = CalibrationData(dataset, data_collator, batch_size, max_batches)
    names = target_linear_names(model, config or SVDConfig())
    modules = dict(model.named_modules())
    sums = {n: torch.zeros(dense_weight(modules[n]).shape[1], dtype=torch.float64) for n in names}

    def accumulate(name: str, rows: torch.Tensor, _seen: dict, _x: torch.Tensor) -> None:
        sums[name] += rows.abs().double().sum(0).cpu()

    totals = _run_hooked(model, modules, names, data, accumulate)
    return {n: (_all_reduce(sums[n]) / max(1.0, totals[n])).pow(alpha).float() for n in names}


class _Seen(Exception):
    """Raised by the last hooked layer of a batch: the rest of the forward pass is not needed."""


def _run_hooked(
    model: nn.Module,
    modules: dict[str, nn.Module],
    names: list[str],
    data: CalibrationData,
    accumulate: Callable[[str, torch.Tensor, dict, torch.Tensor], None],
) -> dict[str, float]:
    """Run the calibration data through `model` in eval mode with a pre-hook on each of `names` that hands the
    layer's unpadded input rows to `accumulate`; returns the all-reduced row count per layer.

    A batch's forward pass stops once every layer of `names` has seen it (the later layers are not needed), so
    streaming a model chunk by chunk costs about half a full pass per chunk.
    """
    rows_seen = dict.fromkeys(names, 0)
    state: dict[str, Any] = {"mask": None, "seen": {}, "layers": set()}
    early = data.run_model is None  # a user's run_model is left to finish

    def record(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            x, pad = args[0], state["mask"]
            keep = pad is not None and x.dim() >= 2 and x.shape[:2] == pad.shape
            rows = x[pad.bool()] if keep else x.reshape(-1, x.shape[-1])
            accumulate(name, rows, state["seen"], x)
            rows_seen[name] += rows.shape[0]
            state["layers"].add(name)
            if early and len(state["layers"]) == len(names):
                raise _Seen

        return hook

    was_training = model.training
    model.eval()
    handles = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    try:
        if data.run_model is not None:
            data.run_model(model)
        else:
            device = next(model.parameters()).device
            for batch in data.batches(device):
                state["mask"], state["seen"], state["layers"] = batch.get("attention_mask"), {}, set()
                try:
                    model(**batch)
                except _Seen:
                    pass
                except (TypeError, ValueError) as err:
                    raise ValueError(
                        f"The model does not accept the calibration batches (keys {sorted(batch)}): {err}. Pass the "
                        "task's data_collator (e.g. DataCollatorWithPadding for text) and examples with the model's "
                        "input columns, or CalibrationData(run_model=...)."
                    ) from err
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    counts = _all_reduce(torch.tensor([float(rows_seen[n]) for n in names], dtype=torch.float64))
    if names and not float(counts.min()) > 0:
        empty = [n for n, c in zip(names, counts.tolist()) if c == 0]
        raise ValueError(
            f"No calibration input reached {empty[:3]} ({len(empty)} layers): the calibration data is empty or "
            "does not run through these layers."
        )
    return dict(zip(names, counts.tolist()))


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over the processes (a CPU float64 tensor; the identity in one process)."""
    if _rank_and_world()[1] > 1:
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        moved = t.to(device)
        dist.all_reduce(moved)
        return moved.cpu()
    return t
