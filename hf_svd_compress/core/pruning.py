"""Singular-value pruning: choose each factored layer's rank by energy or by a global parameter budget."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hf_svd_compress.config import ALLOCATIONS, CONFIG_KEY
from hf_svd_compress.core.factorize import attach_svd_config, stored_svd_config
from hf_svd_compress.hub.templates.modeling_svd_compressed import low_rank_names
from hf_svd_compress.layers.allocation import factored
from hf_svd_compress.layers.base import FactoredLayer, factored_modules, group_by_allocator
from hf_svd_compress.validation import COUNT, FRACTION, OPEN_FRACTION, choice, number

logger = logging.getLogger(__name__)


def worth_factoring(layer: FactoredLayer, rank: int | None = None) -> bool:
    """Whether keeping `rank` (default: the live rank) singular values is stored as factors (`BREAK_EVEN`)."""
    return factored(layer.out_features, layer.in_features, layer.rank if rank is None else rank)


@torch.no_grad()
def prune_(
    model: nn.Module,
    energy: float | None = None,
    budget: float | None = None,
    rank_multiple: int = 1,
    allocation: str = "threshold",
) -> dict[str, int]:
    """Mask the smallest singular values of every factored layer, in place (shapes unchanged, DDP-safe).

    Args:
        model (`nn.Module`): A model factored by `svd_factorize_`.
        energy (`float`, *optional*): In (0, 1]; each layer keeps the fewest singular values whose squared sum is
            at least `energy` of its total.
        budget (`float`, *optional*): In (0, 1); keep this fraction of the factored layers' dense parameters,
            counting a layer as dense where its rank saves nothing.
        rank_multiple (`int`, defaults to 1): Round each kept rank up to a multiple of this (8 makes the exported
            layers' GEMMs 35-50% faster on CPUs and fits GPU tensor cores; see docs/benchmarks.md). Under a budget
            the rounded ranks fit the budget; with energy they keep at least `energy`.
        allocation (`str`, defaults to `"threshold"`): How a budget is shared (`ALLOCATIONS`): `"threshold"`
            keeps the same energy fraction in every layer (`budget_ranks`); `"greedy"` keeps the triplets of highest
            `s_i^2 / (m + n)` across all layers (`greedy_ranks`); `"uniform"` keeps `budget` of every layer's own
            weights (`uniform_ranks`, SVD-LLM's). The ladder (docs/benchmarks.md) measured threshold best.

    Returns:
        `{module_name: rank}` of the live ranks after pruning. Already-masked values stay masked.

    Each layer class chooses through its `FactoredLayer.allocate_ranks`; layers sharing one share the budget.
    `CURLinear` layers (`parameterization="cur"`) choose by enumeration (`cur.prune_cur_`): under a budget the CUR
    and the SVD layers each keep `budget` of their own parameters.
    """
    if (energy is None) == (budget is None):
        raise ValueError("prune_ needs exactly one of energy= (e.g. 0.95) or budget= (e.g. 0.5).")
    energy = number("energy", energy, **FRACTION, optional=True, hint="e.g. 0.95 keeps 95% of sum(s^2)")
    budget = number("budget", budget, **OPEN_FRACTION, optional=True, hint="e.g. 0.5 keeps half")
    rank_multiple = number("rank_multiple", rank_multiple, **COUNT, hint="e.g. 8 (1: no rounding)")
    allocation = choice("allocation", allocation, ALLOCATIONS)
    layers = factored_modules(model)
    if not layers:
        raise ValueError(
            "prune_ found no factored layer (SVDLinear, CURLinear, ...): call svd_factorize_(model, config) first."
        )
    refused = {name: why for name, layer in layers.items() if (why := layer.refuses_pruning())}
    if refused:
        raise ValueError(f"prune_ cannot choose the ranks of {sorted(refused)[:4]}: {next(iter(refused.values()))}")
    ranks: dict[str, int] = {}
    with _whole_parameters(model):
        for layer_class, group in group_by_allocator(layers):
            ranks.update(layer_class.allocate_ranks(group, energy, budget, rank_multiple, allocation))
    dense = [n for n, layer in layers.items() if not worth_factoring(layer)]
    if dense:
        logger.info("%d layer(s) keep a rank that saves no parameters and export dense: %s", len(dense), dense)
    return ranks


def truncate_(model: nn.Module) -> dict[str, int]:
    """Slice every factored layer to its live singular values (new, smaller parameters); returns the ranks.

    Changes parameter shapes: call it between training runs or before export, never on a DDP-wrapped model. A pruned
    `CURLinear` becomes a `CompactCURLinear` (parameters `C`, `U`, `R`).
    """
    ranks = {}
    for name, layer in factored_modules(model).items():
        truncated = layer.truncate_()
        if truncated is not layer:
            model.set_submodule(name, truncated)
        ranks[name] = truncated.rank
    if hasattr(getattr(model, "config", None), CONFIG_KEY):  # the records name the new layers for checkpoints
        attach_svd_config(model, stored_svd_config(model))
    return ranks


def current_ranks(model: nn.Module) -> dict[str, int]:
    """`{module_name: live rank}` of the factored layers (SVD, CUR, and the exported two-matmul form)."""
    ranks = {name: layer.rank for name, layer in factored_modules(model).items()}
    return {**ranks, **{name: model.get_submodule(name).rank for name in low_rank_names(model)}}


@contextmanager
def _whole_parameters(model: nn.Module) -> Iterator[None]:
    """Gather FSDP1-sharded parameters while pruning reads `s` (outside forward each process holds a flat shard).

    Only the masks (buffers, never sharded) change, so nothing is written back.
    """
    fsdp = _fsdp1_class()
    if fsdp is not None and any(isinstance(m, fsdp) for m in model.modules()):
        with fsdp.summon_full_params(model, writeback=False):
            yield
    else:
        yield


def _fsdp1_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel
