"""How ranks are shared across layers: the break-even rule, and the allocations of singular values by energy or by a
parameter budget (`prune_`'s default `FactoredLayer.allocate_ranks`).

The functions take `{name: layer}` of `FactoredLayer`s and read only `spectrum()`, `rank`, `out_features` and
`in_features`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from hf_svd_compress.layers.linalg import energy_rank

if TYPE_CHECKING:
    from hf_svd_compress.layers.base import FactoredLayer

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


def live_spectra(layers: dict[str, FactoredLayer]) -> dict[str, torch.Tensor]:
    """Each layer's live singular values, whole on every process (an FSDP2 / DTensor shard is gathered)."""
    return {name: layer.spectrum() for name, layer in layers.items()}


def energy_ranks(
    layers: dict[str, FactoredLayer],
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
    layers: dict[str, FactoredLayer], budget: float, iterations: int = 40, rank_multiple: int = 1
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


def greedy_ranks(layers: dict[str, FactoredLayer], budget: float, rank_multiple: int = 1) -> dict[str, int]:
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


def uniform_ranks(layers: dict[str, FactoredLayer], budget: float, rank_multiple: int = 1) -> dict[str, int]:
    """SVD-LLM's allocation: every layer keeps `budget` of its own weights, `r = budget m n / (m + n)` rounded down
    to `rank_multiple` (at least one block, at most the live count)."""
    ranks = {}
    for name, layer in layers.items():
        m, n, live = layer.out_features, layer.in_features, layer.rank
        rank = int(budget * m * n / (m + n)) // rank_multiple * rank_multiple
        ranks[name] = max(1, min(live, max(rank, rank_multiple)))
    return ranks


def spectral_ranks(
    layers: dict[str, FactoredLayer],
    energy: float | None,
    budget: float | None,
    rank_multiple: int = 1,
    allocation: str = "threshold",
) -> dict[str, int]:
    """The ranks `prune_` keeps: by `energy` per layer, else `budget` shared by `allocation` (see `prune_`)."""
    if energy is not None:
        return energy_ranks(layers, energy, rank_multiple=rank_multiple)
    allocate = {"greedy": greedy_ranks, "uniform": uniform_ranks, "threshold": budget_ranks}[allocation]
    return allocate(layers, budget, rank_multiple=rank_multiple)
