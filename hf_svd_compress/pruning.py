"""Singular-value pruning: choose each factored layer's rank by energy or by a global parameter budget."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import ALLOCATIONS
from .cur import cur_layers, prune_cur_, truncate_cur_
from .factorize import svd_layers
from .layers import SVDLinear, energy_rank
from .templates.modeling_svd_compressed import low_rank_names
from .validation import COUNT, FRACTION, OPEN_FRACTION, choice, number

logger = logging.getLogger(__name__)

# The one break-even rule of pruning, export, report and model card: a layer is kept as factors only while they hold
# fewer than this fraction of its dense weights, `r (m + n) < BREAK_EVEN * m n`; past it the layer is stored (and
# counted) dense. Measured in benchmarks/inference.py (`--break-even`; 12 shapes of BERT / MiniLM / DINOv2 layers,
# 128 and 4096 tokens): the factored layer stops being faster at 0.9-1.0 of the parameter break-even rank for ranks
# that are multiples of 8, and at 0.85-0.9 (128 tokens) or 0.6-0.85 (4096 tokens) for odd ranks.
BREAK_EVEN = 0.9


def factored(out_features: int, in_features: int, rank: int, break_even: float = BREAK_EVEN) -> bool:
    """Whether a layer keeping `rank` singular values is stored as factors (below `break_even` of its weights)."""
    return rank * (out_features + in_features) < break_even * out_features * in_features


def layer_params(out_features: int, in_features: int, rank: int, break_even: float = BREAK_EVEN) -> int:
    """Weight parameters a layer stores at `rank`: factored `r (m + n)` below the break-even, else dense `m n`."""
    dense = out_features * in_features
    return rank * (out_features + in_features) if factored(out_features, in_features, rank, break_even) else dense


def worth_factoring(layer: SVDLinear, rank: int | None = None) -> bool:
    """Whether keeping `rank` (default: the live rank) singular values is stored as factors (`BREAK_EVEN`)."""
    return factored(layer.out_features, layer.in_features, layer.rank if rank is None else rank)


def live_spectra(layers: dict[str, SVDLinear]) -> dict[str, torch.Tensor]:
    """Each layer's live singular values, whole on every process (an FSDP2 / DTensor shard is gathered)."""
    return {name: _whole(layer.s).detach()[layer.mask] for name, layer in layers.items()}


def energy_ranks(
    layers: dict[str, SVDLinear],
    energy: float,
    spectra: dict[str, torch.Tensor] | None = None,
    rank_multiple: int = 1,
) -> dict[str, int]:
    """Per layer, the fewest live singular values holding `energy` of the live spectral energy.

    With `rank_multiple` > 1 each rank is rounded up to a multiple of it (at most the live count).
    """
    spectra = live_spectra(layers) if spectra is None else spectra
    return {
        name: round_up_rank(energy_rank(spectra[name], energy), rank_multiple, spectra[name].numel())
        for name in layers
    }


def round_up_rank(rank: int, multiple: int, limit: int) -> int:
    """`rank` rounded up to a multiple of `multiple`, capped at `limit` (the live count)."""
    return max(1, min(limit, -(-rank // multiple) * multiple))


def budget_ranks(
    layers: dict[str, SVDLinear], budget: float, iterations: int = 40, rank_multiple: int = 1
) -> dict[str, int]:
    """Ranks from the one energy threshold whose kept parameters fit `budget` of the layers' dense parameters.

    Parameters kept grow with the threshold, so a bisection finds the largest threshold within budget; the ranks
    are rounded up to `rank_multiple` before their cost is counted, so the rounded ranks fit the budget.
    """
    allowed = budget * sum(layer.out_features * layer.in_features for layer in layers.values())

    def cost(ranks: dict[str, int]) -> int:
        return sum(layer_params(layers[n].out_features, layers[n].in_features, r) for n, r in ranks.items())

    spectra = live_spectra(layers)  # gathered once, not at every bisection step
    if rank_multiple > 1 and cost(energy_ranks(layers, 1e-9, spectra, rank_multiple)) > allowed:
        logger.warning("Budget %.3f is too small for ranks in multiples of %d; not rounding.", budget, rank_multiple)
        return budget_ranks(layers, budget, iterations)
    low, high = 0.0, 1.0
    best = energy_ranks(layers, 1e-9, spectra)
    for _ in range(iterations):
        mid = (low + high) / 2
        ranks = energy_ranks(layers, mid, spectra, rank_multiple)
        if cost(ranks) <= allowed:
            low, best = mid, ranks
        else:
            high = mid
    if cost(best) > allowed:
        logger.warning("Budget %.3f is below one singular value per layer; keeping rank 1 everywhere.", budget)
    return best


def greedy_ranks(layers: dict[str, SVDLinear], budget: float, rank_multiple: int = 1) -> dict[str, int]:
    """Ranks that spend `budget` of the layers' dense parameters on the triplets of highest `s_i^2 / (m + n)`.

    Triplets are taken in `rank_multiple` blocks, best block score first, while the budget allows: a layer costs
    `r (m + n)` until its rank passes `BREAK_EVEN`, where it jumps to its dense `m n` and keeps every value (a
    block whose cost no longer fits is skipped, smaller ones may still fit). With whitened factors
    (`svd_factorize_(..., calibration=)`) `s_i^2` is the mean squared output error of dropping triplet `i`.
    """
    spectra = live_spectra(layers)
    allowed = budget * sum(layer.out_features * layer.in_features for layer in layers.values())
    # Every layer keeps its first block (at least one value), counted first.
    ranks = {name: min(rank_multiple, s.numel()) for name, s in spectra.items()}
    spent = sum(layer_params(layers[n].out_features, layers[n].in_features, r) for n, r in ranks.items())
    if spent > allowed and rank_multiple > 1:
        logger.warning("Budget %.3f is too small for ranks in multiples of %d; not rounding.", budget, rank_multiple)
        return greedy_ranks(layers, budget)
    if spent > allowed:
        logger.warning("Budget %.3f is below one singular value per layer; keeping rank 1 everywhere.", budget)
    blocks = []  # (mean score per parameter of the block, layer, rank with the block)
    for name, s in spectra.items():
        m, n = layers[name].out_features, layers[name].in_features
        energy = s.double().square().sort(descending=True).values
        for start in range(ranks[name], energy.numel(), rank_multiple):
            stop = min(start + rank_multiple, energy.numel())
            blocks.append((float(energy[start:stop].mean()) / (m + n), name, stop))
    for _, name, rank in sorted(blocks, key=lambda b: -b[0]):
        layer = layers[name]
        if rank <= ranks[name]:  # the layer went dense already
            continue
        m, n = layer.out_features, layer.in_features
        cost = layer_params(m, n, rank) - layer_params(m, n, ranks[name])
        if spent + cost <= allowed:
            spent += cost
            ranks[name] = spectra[name].numel() if not factored(m, n, rank) else rank
    return ranks


def uniform_ranks(layers: dict[str, SVDLinear], budget: float, rank_multiple: int = 1) -> dict[str, int]:
    """SVD-LLM's allocation: every layer keeps `budget` of its own weights, `r = budget m n / (m + n)` rounded down
    to `rank_multiple` (at least one block, at most the live count)."""
    ranks = {}
    for name, layer in layers.items():
        m, n, live = layer.out_features, layer.in_features, int(layer.mask.sum())
        rank = int(budget * m * n / (m + n)) // rank_multiple * rank_multiple
        ranks[name] = max(1, min(live, max(rank, rank_multiple)))
    return ranks


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

    `CURLinear` layers (`parameterization="cur"`) get their ranks by enumeration instead (`cur.prune_cur_`): under a
    budget the CUR and the SVD layers each keep `budget` of their own parameters.
    """
    if (energy is None) == (budget is None):
        raise ValueError("prune_ needs exactly one of energy= (e.g. 0.95) or budget= (e.g. 0.5).")
    energy = number("energy", energy, **FRACTION, optional=True, hint="e.g. 0.95 keeps 95% of sum(s^2)")
    budget = number("budget", budget, **OPEN_FRACTION, optional=True, hint="e.g. 0.5 keeps half")
    rank_multiple = number("rank_multiple", rank_multiple, **COUNT, hint="e.g. 8 (1: no rounding)")
    allocation = choice("allocation", allocation, ALLOCATIONS)
    layers, cur = svd_layers(model), cur_layers(model)
    if not layers and not cur:
        raise ValueError("prune_ found no SVDLinear or CURLinear layer: call svd_factorize_(model, config) first.")
    with _whole_parameters(model):
        cur_ranks = prune_cur_(cur, energy, budget, rank_multiple) if cur else {}  # CUR layers: see cur.prune_cur_
        if energy is not None:
            ranks = energy_ranks(layers, energy, rank_multiple=rank_multiple)
        elif allocation == "greedy":
            ranks = greedy_ranks(layers, budget, rank_multiple=rank_multiple)
        elif allocation == "uniform":
            ranks = uniform_ranks(layers, budget, rank_multiple=rank_multiple)
        else:
            ranks = budget_ranks(layers, budget, rank_multiple=rank_multiple)
        for name, layer in layers.items():
            _keep_largest(layer, ranks[name])
    dense = [n for n, layer in layers.items() if not worth_factoring(layer)]
    if dense:
        logger.info("%d layer(s) keep a rank that saves no parameters and export dense: %s", len(dense), dense)
    return {**ranks, **cur_ranks}


def truncate_(model: nn.Module) -> dict[str, int]:
    """Slice every factored layer to its live singular values (new, smaller parameters); returns the ranks.

    Changes parameter shapes: call it between training runs or before export, never on a DDP-wrapped model. A pruned
    `CURLinear` becomes a `CompactCURLinear` (parameters `C`, `U`, `R`).
    """
    ranks = {name: layer.truncate_().full_rank for name, layer in svd_layers(model).items()}
    return {**ranks, **truncate_cur_(model)}


def current_ranks(model: nn.Module) -> dict[str, int]:
    """`{module_name: live rank}` of the factored layers (SVD, CUR, and the exported two-matmul form)."""
    ranks = {name: layer.rank for name, layer in svd_layers(model).items()}
    exported = {name: model.get_submodule(name).rank for name in low_rank_names(model)}
    return {**ranks, **exported, **{name: layer.rank for name, layer in cur_layers(model).items()}}


def _keep_largest(layer: SVDLinear, rank: int) -> None:
    live = torch.nonzero(layer.mask).flatten()
    order = torch.argsort(_whole(layer.s).detach()[live].abs(), descending=True)
    new_mask = torch.zeros_like(layer.mask)
    new_mask[live[order[:rank]]] = True
    layer.mask.copy_(new_mask)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """`t`, or the whole tensor of an FSDP2 / tensor-parallel `DTensor` (a collective: all processes call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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
