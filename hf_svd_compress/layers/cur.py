"""CUR decomposition of linear layers (Cai et al., Applied Sciences 2023): `W ~ C U R` from actual columns and rows.

`C = W[:, J]` holds `k` columns and `R = W[I, :]` holds `k` rows of the weight, chosen by deterministic leverage scores
(the squared row norms of the top singular vectors); `U = C^+ W R^+` is the optimal core, so `C U R = P_C W P_R` is the
projection of `W` onto the column space of `C` and the row space of `R`. Training adds the relative distance
`||W - C U R||_F^2 / ||W||_F^2` of each weight to its CUR approximation to the task loss (`SVDConfig.approx_weight`),
and ranks are chosen per layer by enumerating the candidate ranks against a parameter budget or an error target.

Life cycle of a layer:

1. `CURLinear` (from `svd_factorize_` with `parameterization="cur"`) holds the dense weight and computes the dense
   function; in training it records its approximation distance at its working rank `approx_rank`.
2. `prune_` picks each layer's rank `k` (buffers only: shapes unchanged, DDP-safe); the layer then computes
   `C U R` at rank `k` from its weight, differentiably.
3. `truncate_` swaps it for a `CompactCURLinear` whose parameters are `C` [out, k], `U` [k, k] and `R` [k, in]:
   `k (m + n) + k^2` weights for fine-tuning, exported as the two factors `down = U R`, `up = C` (`k (m + n)`).

Parameter counts in budgets are those of the export, `min(k (m + n), m n)`, as for `SVDLinear`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_svd_compress.layers.allocation import BREAK_EVEN, factored, layer_params
from hf_svd_compress.layers.base import FactoredLayer, RegularizerSettings, dense_module, dense_type_of
from hf_svd_compress.layers.linalg import FACTORABLE_TYPES, compose_first, dense_weight, energy_rank, whole, work_dtype
from hf_svd_compress.layers.registry import Parameterization, register_parameterization
from hf_svd_compress.layers.svd import SVDLinear

if TYPE_CHECKING:
    from hf_svd_compress.config import SVDConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CURLinear",
    "CompactCURLinear",
    "CURProfile",
    "approximation_loss",
    "cur_layers",
    "cur_profile",
    "leverage_orders",
    "optimal_core",
    "prune_cur_",
    "refresh_cur_selection_",
]


def break_even_rank(out_features: int, in_features: int) -> int:
    """Largest rank the export stores as factors (`allocation.factored`: `k (m + n) < BREAK_EVEN m n`; 0 if none)."""
    rank = int(BREAK_EVEN * out_features * in_features // (out_features + in_features))
    while rank > 0 and not factored(out_features, in_features, rank):
        rank -= 1
    return rank


def exported_params(out_features: int, in_features: int, rank: int) -> int:
    """Weights a layer exports at `rank`: the factors `k (m + n)`, or the dense `m n` past the break-even (the one
    rule of `allocation.layer_params`)."""
    return layer_params(out_features, in_features, rank)


def _rtol(out_features: int, in_features: int) -> float:
    # One cut-off for every pseudo-inverse (float32 forward, float64 export), so they agree on numerically dependent
    # columns: singular values below max(m, n) * eps32 of the largest count as zero.
    return max(out_features, in_features) * torch.finfo(torch.float32).eps


def _full_precision(t: torch.Tensor):
    """Autocast off on `t`'s device: the CUR algebra (pseudo-inverses, residuals) runs in float32 or float64."""
    return torch.autocast(device_type=t.device.type, enabled=False)


# ---- the decomposition -------------------------------------------------------------------------------------------


def leverage_orders(U: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns sorted by decreasing leverage score at `rank` (deterministic CUR selection).

    Args:
        U (`torch.Tensor`): Left singular vectors [m, p] of the weight, by decreasing singular value.
        Vh (`torch.Tensor`): Right singular vectors [p, n], by decreasing singular value.
        rank (`int`): How many top singular vectors define the scores (`1 <= rank <= p`).

    Returns:
        `(rows, cols)`: index tensors of length m and n; the first k of each pick `R` and `C` at rank k. Ties keep the
        natural order.
    """
    row_scores = U[:, :rank].square().sum(1)
    col_scores = Vh[:rank].square().sum(0)
    rows = torch.argsort(row_scores, descending=True, stable=True)
    cols = torch.argsort(col_scores, descending=True, stable=True)
    return rows, cols


def optimal_core(C: torch.Tensor, W: torch.Tensor, R: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """The core `U = C^+ W R^+` minimizing `||W - C U R||_F` (differentiable; pseudo-inverses by SVD, rank-safe).

    Args:
        C (`torch.Tensor`): Columns [m, k]. W (`torch.Tensor`): The weight [m, n]. R (`torch.Tensor`): Rows [k, n].
        rtol (`float`, *optional*): Relative cut-off of the pseudo-inverses (default: `max(m, n) * eps32`).

    Returns:
        `U` [k, k] in the dtype of the inputs (call it with float32 or float64 tensors).
    """
    rtol = _rtol(*W.shape) if rtol is None else rtol
    return torch.linalg.pinv(C, rtol=rtol) @ W @ torch.linalg.pinv(R, rtol=rtol)


def approximation_loss(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`||W - C U R||_F^2 / ||W||_F^2` for `C = W[:, cols]`, `R = W[rows, :]` and the optimal core, in float32+.

    The core is computed without gradient: `U*` minimizes the distance, so (envelope theorem) the gradient of the
    distance with `U*` held fixed is its full gradient, and no pseudo-inverse is differentiated (robust when `C` or
    `R` is rank-deficient, and cheaper).

    Args:
        weight (`torch.Tensor`): The weight [m, n].
        rows (`torch.Tensor`): The `k` row indices of `R`.
        cols (`torch.Tensor`): The `k` column indices of `C`.

    Returns:
        A scalar float32 (float64 for a float64 weight) tensor in [0, 1], differentiable with respect to `weight`.
    """
    with _full_precision(weight):
        w = weight.to(work_dtype(weight))
        C, R = w[:, cols], w[rows]
        with torch.no_grad():
            core = optimal_core(C, w, R)
        residual = w - C @ core @ R
        return residual.square().sum() / w.square().sum().clamp_min(torch.finfo(w.dtype).tiny)


@dataclass
class CURProfile:
    """A layer's CUR approximation error at every rank 1..len(errors), from a few candidate selections.

    Args:
        errors (`torch.Tensor`): float64 [K]; `errors[k - 1]` is the smallest `||W - C U R||^2 / ||W||^2` at rank k
            over the candidate selections.
        choice (`torch.Tensor`): long [K]; index in `selections` of the selection reaching `errors[k - 1]`.
        selections (`list`): `(rows, cols, leverage_rank)` orders: leverage scores at ranks 1, 2, 4, ..., K and K,
            plus the layer's own selection when it has one.
    """

    errors: torch.Tensor
    choice: torch.Tensor
    selections: list[tuple[torch.Tensor, torch.Tensor, int]]

    def selection(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The `(rows, cols, leverage_rank)` order with the smallest error at `rank`."""
        return self.selections[int(self.choice[rank - 1])]


@torch.no_grad()
def cur_profile(
    weight: torch.Tensor, max_rank: int, extra: tuple[torch.Tensor, torch.Tensor, int] | None = None
) -> CURProfile:
    """The CUR error of `weight` at every rank up to `max_rank`, for leverage orders at a geometric grid of ranks.

    With nested selections (the first k of one order), one column-ordered QR gives every rank at once: if
    `Q_c`, `Q_r` are the Q factors of `W[:, cols[:K]]` and `W[rows[:K], :]^T`, the CUR approximation at rank k is
    `Q_c[:, :k] A[:k, :k] Q_r[:, :k]^T` with `A = Q_c^T W Q_r`, so its squared error is `||W||^2 - ||A[:k, :k]||^2`
    (Pythagoras). Leverage scores at rank t are best for ranks near t, so each rank takes the best of the orders at
    t = 1, 2, 4, ..., `max_rank` (plus `extra`, e.g. the selection a layer was trained for): about log2(K) QRs.
    The errors are exact while the selected columns (rows) are linearly independent, as for trained weights; past
    the rank of a rank-deficient weight they are 0, as the true errors are.

    Args:
        weight (`torch.Tensor`): The weight [m, n] (any float dtype; computed in float32, float64 kept).
        max_rank (`int`): Largest rank profiled, in [1, min(m, n)].
        extra (`tuple`, *optional*): Another `(rows, cols, leverage_rank)` selection to compare.

    Returns:
        `CURProfile`.
    """
    w = weight.detach().to(work_dtype(weight))
    U, _, Vh = torch.linalg.svd(w, full_matrices=False)
    grid = sorted({2**i for i in range(max_rank.bit_length()) if 2**i <= max_rank} | {max_rank})
    selections = [(*leverage_orders(U, Vh, t), t) for t in grid]
    if extra is not None:
        selections.append(extra)
    norm = w.double().square().sum().clamp_min(torch.finfo(torch.float64).tiny)
    curves = torch.stack([_prefix_errors(w, rows, cols, max_rank, norm) for rows, cols, _ in selections])
    errors, choice = curves.min(dim=0)
    return CURProfile(errors.cpu(), choice.cpu(), selections)


def _prefix_errors(w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, max_rank: int, norm) -> torch.Tensor:
    """Relative squared CUR errors at ranks 1..max_rank of the nested selection `rows`, `cols` (see `cur_profile`)."""
    q_c, _ = torch.linalg.qr(w[:, cols[:max_rank]])
    q_r, _ = torch.linalg.qr(w[rows[:max_rank]].T)
    kept = (q_c.T @ w @ q_r).double().square().cumsum(0).cumsum(1).diagonal()
    return ((norm - kept) / norm).clamp_min(0)


# ---- layers -------------------------------------------------------------------------------------------------------


class CURLayer(FactoredLayer):
    """What the two CUR layers share: pruning by enumeration, and export as the layout `up = C`, `down = U R`."""

    parameterization = "cur"

    @classmethod
    def allocate_ranks(
        cls, layers: dict, energy: float | None, budget: float | None, rank_multiple: int, allocation_rule: str
    ) -> dict[str, int]:
        """`prune_cur_`'s enumeration (the SVD `allocation_rule` does not apply)."""
        return prune_cur_(layers, energy, budget, rank_multiple)

    def svd_form(self) -> SVDLinear:
        """The `SVDLinear` of the exported layout `up = C`, `down = U R` (not re-orthonormalized)."""
        layer = SVDLinear.from_low_rank_factors(*self.low_rank_factors(), self.bias)
        layer.dense_type = self.dense_type
        return layer

    def to_dense(self) -> nn.Module:
        with torch.no_grad():
            return dense_module(self.composed_weight().detach(), self.bias, self.dense_type)


class CURLinear(CURLayer):
    """A linear layer trained toward its CUR approximation; dense at full rank, `C U R` after `prune_`.

    Args:
        in_features (`int`): Size of each input sample (`n`).
        out_features (`int`): Size of each output sample (`m`).
        bias (`bool`, defaults to `True`): Whether the layer has a bias.

    Parameters are `weight` [m, n] and `bias` [m]. Buffers: `row_order` [m] and `col_order` [n], the leverage-score
    orders (the first k pick `R` and `C`), and `cur_ranks` = `[rank, approx_rank, leverage_rank]`: the rank the
    forward uses (`min(m, n)`: no approximation, the dense function), the working rank of the approximation term,
    and the rank whose leverage scores made the orders. Python copies of the ranks keep the forward free of
    host-device syncs.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        full = min(in_features, out_features)
        self.register_buffer("row_order", torch.arange(out_features, device=device))
        self.register_buffer("col_order", torch.arange(in_features, device=device))
        self.register_buffer("cur_ranks", torch.tensor([full, full, full], device=device))
        self._ranks = (full, full, full)
        # Set by SVDTrainer: record the approximation term in forward (see `record_approximation`).
        self.approx_enabled = False
        self.approx_terms: list[torch.Tensor] = []

    @property
    def full_rank(self) -> int:
        """`min(m, n)`: the rank at which the layer computes its dense function."""
        return min(self.in_features, self.out_features)

    @property
    def rank(self) -> int:
        """The rank of the `C U R` the forward computes (`full_rank`: dense)."""
        return self._ranks[0]

    @property
    def approx_rank(self) -> int:
        """Working rank of the approximation term recorded in training."""
        return self._ranks[1]

    @property
    def leverage_rank(self) -> int:
        """Rank whose leverage scores ordered `row_order` and `col_order`."""
        return self._ranks[2]

    @property
    def approximating(self) -> bool:
        """Whether training adds this layer's approximation term: dense forward, working rank below full."""
        return self.rank >= self.full_rank and self.approx_rank < self.full_rank

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}/{self.full_rank}, "
            f"approx_rank={self.approx_rank}, bias={self.bias is not None}"
        )

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, approx_rank: int | None = None) -> CURLinear:
        """Wrap a dense layer (same function), with its rows and columns ordered by leverage at `approx_rank`.

        Args:
            linear (`nn.Linear` or `transformers.pytorch_utils.Conv1D`): The layer to wrap.
            approx_rank (`int`, *optional*): Working rank of the approximation term, in [1, min(m, n)] (default:
                half the parameter break-even rank, i.e. a quarter of the dense weights).

        Returns:
            `CURLinear` on the weight's device and dtype, at full rank.
        """
        weight = dense_weight(linear)
        m, n = weight.shape
        layer = cls(n, m, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
        layer.dense_type = dense_type_of(linear)
        layer.weight.copy_(weight)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        approx_rank = max(1, break_even_rank(m, n) // 2) if approx_rank is None else approx_rank
        _check_rank("approx_rank", approx_rank, layer.full_rank)
        if approx_rank < layer.full_rank:
            layer.select_(approx_rank, approx_rank=approx_rank, rank=layer.full_rank)
        return layer

    @torch.no_grad()
    def select_(
        self,
        leverage_rank: int,
        approx_rank: int | None = None,
        rank: int | None = None,
        orders: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> CURLinear:
        """Set the selection (leverage orders at `leverage_rank`, from the current weight) and ranks; returns self.

        Args:
            leverage_rank (`int`): Rank of the leverage scores, in [1, min(m, n)].
            approx_rank (`int`, *optional*): New working rank of the approximation term (default: unchanged).
            rank (`int`, *optional*): New forward rank (default: unchanged; `min(m, n)` is dense).
            orders (`tuple`, *optional*): `(rows, cols)` already computed for `leverage_rank` (skips the SVD).
        """
        full = self.full_rank
        for name, value in (("leverage_rank", leverage_rank), ("approx_rank", approx_rank), ("rank", rank)):
            if value is not None:
                _check_rank(name, value, full)
        if orders is None:
            w = whole(self.weight).detach()
            U, _, Vh = torch.linalg.svd(w.to(work_dtype(w)), full_matrices=False)
            orders = leverage_orders(U, Vh, leverage_rank)
        self.row_order.copy_(orders[0])
        self.col_order.copy_(orders[1])
        self._set_ranks(self.rank if rank is None else rank, approx_rank or self.approx_rank, leverage_rank)
        return self

    def refresh_selection_(self) -> CURLinear:
        """Recompute the leverage orders from the current weight at the same leverage rank; returns self."""
        return self.select_(self.leverage_rank)

    def cur_factors(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(C, U, R)` at `rank` (default: the forward rank) in float32+, differentiable with respect to `weight`."""
        k = self.rank if rank is None else rank
        with _full_precision(self.weight):
            w = self.weight.to(work_dtype(self.weight))
            C, R = w[:, self.col_order[:k]], w[self.row_order[:k]]
            return C, optimal_core(C, w, R), R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approx_enabled and self.training and torch.is_grad_enabled() and self.approximating:
            self.record_approximation()
        if self.rank >= self.full_rank:
            return F.linear(x, self.weight, self.bias)
        C, U, R = self.cur_factors()
        with _full_precision(C):
            up, down = C.to(x.dtype), (U @ R).to(x.dtype)
        if compose_first(self.out_features, self.in_features, self.rank, x.numel() // self.in_features):
            return F.linear(x, up @ down, self.bias)
        return F.linear(F.linear(x, down), up, self.bias)

    def record_approximation(self) -> None:
        """Append this layer's approximation term at `approx_rank` inside forward (sharded parameters are whole).

        The trainer clears `approx_terms` before its forward pass and sums them after it, so a recomputation under
        gradient checkpointing (which runs after the sum) is never counted.
        """
        k = self.approx_rank
        self.approx_terms.append(approximation_loss(self.weight, self.row_order[:k], self.col_order[:k]))

    @torch.no_grad()
    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(down, up)` with `up @ down` the weight the forward uses: `U R` [k, n] and `C` [m, k] (weight dtype).

        At full rank (dense), `(I, W)` or `(W, I)`: rank `min(m, n)`, which export stores dense.
        """
        w = whole(self.weight).detach()
        if self.rank >= self.full_rank:
            eye = torch.eye(self.full_rank, device=w.device, dtype=w.dtype)
            return (eye, w.clone()) if self.out_features >= self.in_features else (w.clone(), eye)
        C, U, R = self._exact_factors(w)
        return (U @ R).to(w.dtype), C.to(w.dtype)

    def composed_weight(self) -> torch.Tensor:
        """The weight [m, n] the forward uses (`C U R` below full rank), in the weight's dtype."""
        if self.rank >= self.full_rank:
            return self.weight
        C, U, R = self.cur_factors()
        return (C @ U @ R).to(self.weight.dtype)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A dense `nn.Linear` computing the same function."""
        w = whole(self.weight)
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        linear.weight.copy_(self.composed_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    @torch.no_grad()
    def to_compact(self) -> CompactCURLinear:
        """The `CompactCURLinear` (parameters `C`, `U`, `R`, bias) computing the same function at the current rank.

        The core is computed in float64 from the current weight. Raises `ValueError` at full rank, where `C U R`
        would store three times the dense weights (`truncate_` keeps such layers as they are).
        """
        if self.rank >= self.full_rank:
            raise ValueError(
                f"CURLinear is at full rank {self.full_rank}: call prune_(model, budget=... or energy=...) before "
                "truncating it."
            )
        w = whole(self.weight).detach()
        C, U, R = self._exact_factors(w)
        layer = CompactCURLinear(
            self.in_features, self.out_features, self.rank, self.bias is not None, device=w.device, dtype=w.dtype
        )
        for param, value in ((layer.C, C), (layer.U, U), (layer.R, R), (layer.bias, self.bias)):
            if param is not None:
                param.copy_(value)
        layer.row_index.copy_(self.row_order[: self.rank])
        layer.col_index.copy_(self.col_order[: self.rank])
        layer.dense_type = self.dense_type
        return layer

    # ---- FactoredLayer ----------------------------------------------------------------------------------------

    def truncate_(self) -> FactoredLayer:
        """The `CompactCURLinear` of a pruned layer; a layer at full rank stays (`C U R` would store more)."""
        return self.to_compact() if self.rank < self.full_rank else self

    def configure_regularizers(self, settings: RegularizerSettings) -> bool:
        self.approx_terms.clear()
        self.approx_enabled = settings.approx and self.approximating
        return self.approx_enabled

    def pop_terms(self) -> dict[str, torch.Tensor]:
        terms, self.approx_terms = self.approx_terms, []
        return {"approx_loss": torch.stack(terms).sum()} if terms else {}

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], prefix: str, dense: nn.Module, record: dict[str, Any]
    ) -> CURLinear:
        out_features, in_features = dense_weight(dense).shape
        weight = state[f"{prefix}weight"]
        layer = cls(in_features, out_features, f"{prefix}bias" in state, dtype=weight.dtype)
        layer.dense_type = dense_type_of(dense)
        return layer

    def _exact_factors(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w64 = w.double()
        C, R = w64[:, self.col_order[: self.rank]], w64[self.row_order[: self.rank]]
        return C, optimal_core(C, w64, R, _rtol(*w.shape)), R

    def _set_ranks(self, rank: int, approx_rank: int, leverage_rank: int) -> None:
        self._ranks = (int(rank), int(approx_rank), int(leverage_rank))
        self.cur_ranks.copy_(torch.tensor(self._ranks))

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ranks = tuple(int(v) for v in self.cur_ranks.tolist())


class CompactCURLinear(CURLayer):
    """A truncated CUR layer, `y = x (C U R)^T + bias`, with `C` [out, k], `U` [k, k] and `R` [k, in] trainable.

    Args:
        in_features (`int`): Size of each input sample (`n`).
        out_features (`int`): Size of each output sample (`m`).
        rank (`int`): `k`.
        bias (`bool`, defaults to `True`): Whether the layer has a bias.

    Buffers `row_index`, `col_index` record which rows and columns of the weight `R` and `C` started as. Export
    writes `down = U R` [k, in] and `up = C` [out, k], the format `save_compressed` uses for every low-rank layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.C = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.U = nn.Parameter(torch.empty(rank, rank, **kw))
        self.R = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.register_buffer("row_index", torch.zeros(rank, dtype=torch.long, device=device))
        self.register_buffer("col_index", torch.zeros(rank, dtype=torch.long, device=device))

    @property
    def rank(self) -> int:
        """`k`, the number of columns and rows kept."""
        return self.U.shape[0]

    @property
    def full_rank(self) -> int:
        """Same as `rank`: a compact layer stores only what it uses."""
        return self.rank

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.U @ self.R
        if compose_first(self.out_features, self.in_features, self.rank, x.numel() // self.in_features):
            return F.linear(x, self.C @ down, self.bias)
        return F.linear(F.linear(x, down), self.C, self.bias)

    @torch.no_grad()
    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(down, up) = (U R, C)`, computed in float32+ and returned in the parameters' dtype."""
        work = work_dtype(self.U)
        down = self.U.detach().to(work) @ self.R.detach().to(work)
        return down.to(self.U.dtype), self.C.detach().clone()

    def composed_weight(self) -> torch.Tensor:
        """`C U R` [out, in]."""
        return self.C @ (self.U @ self.R)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A dense `nn.Linear` computing the same function."""
        kw = {"device": self.C.device, "dtype": self.C.dtype}
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, **kw)
        linear.weight.copy_(self.composed_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    # ---- FactoredLayer ----------------------------------------------------------------------------------------

    def refuses_pruning(self) -> str | None:
        return (
            "truncated CUR layers keep their columns and rows: "
            "prune before truncate_, or factor the dense model again."
        )

    def truncate_(self) -> CompactCURLinear:
        return self

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], prefix: str, dense: nn.Module, record: dict[str, Any]
    ) -> CompactCURLinear:
        out_features, in_features = dense_weight(dense).shape
        core = state[f"{prefix}U"]
        layer = cls(in_features, out_features, core.shape[0], f"{prefix}bias" in state, dtype=core.dtype)
        layer.dense_type = dense_type_of(dense)
        return layer


CUR_TYPES = (CURLinear, CompactCURLinear)


def _check_rank(name: str, value: int, full: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= full):
        raise ValueError(f"{name}={value!r} must be an integer in [1, {full}] (min(out_features, in_features)).")


# ---- model-level operations ---------------------------------------------------------------------------------------


def cur_layers(model: nn.Module) -> dict[str, CURLinear | CompactCURLinear]:
    """The CUR layers of `model` (training and compact), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CUR_TYPES)}


def cur_layer(dense: nn.Module, config: SVDConfig) -> CURLinear:
    """The `CURLinear` replacing `dense` under `config` (used by `factored_layer` for `parameterization="cur"`).

    The working rank of the approximation term is where pruning is expected to land: with `prune_budget` b, the
    rank keeping b of the layer's weights; else the SVD rank holding `prune_energy` of the spectrum (CUR needs at
    least that); rounded up to `prune_rank_multiple`, at most the parameter break-even rank. `init_energy` /
    `init_max_rank` start the layer below full rank: the smallest CUR rank (at most the break-even) whose relative
    error is `<= 1 - init_energy`, capped by `init_max_rank`.

    Args:
        dense (`nn.Module`): An `nn.Linear` or transformers `Conv1D`.
        config (`SVDConfig`): The factoring config.

    Returns:
        `CURLinear`.
    """
    weight = dense_weight(dense).detach()
    m, n = weight.shape
    limit = break_even_rank(m, n)
    if config.prune_budget is not None:
        target = int(config.prune_budget * m * n // (m + n))
    else:
        target = energy_rank(torch.linalg.svdvals(weight.to(work_dtype(weight))), config.prune_energy)
    multiple = config.prune_rank_multiple
    approx_rank = max(1, min(limit, -(-max(target, 1) // multiple) * multiple)) if limit else min(m, n)
    layer = CURLinear.from_linear(dense, approx_rank)
    start, profile = _initial_rank(layer, config)
    if start < layer.full_rank:
        if profile is None or profile.errors.numel() < start:
            profile = cur_profile(layer.weight, start)
        rows, cols, leverage = profile.selection(start)
        layer.select_(leverage, approx_rank=start, rank=start, orders=(rows, cols))
    return layer


def _initial_rank(layer: CURLinear, config: SVDConfig) -> tuple[int, CURProfile | None]:
    """The starting rank `config.init_energy` / `init_max_rank` ask for, and the profile it was chosen from."""
    full = layer.full_rank
    rank = min(config.init_max_rank or full, full)
    limit = break_even_rank(layer.out_features, layer.in_features)
    if config.init_energy is None or not limit:
        return rank, None
    profile = cur_profile(layer.weight, limit)
    meets = torch.nonzero(profile.errors <= 1 - config.init_energy + 1e-12).flatten()
    return min(rank, int(meets[0]) + 1 if meets.numel() else full), profile


@torch.no_grad()
def refresh_cur_selection_(model: nn.Module) -> dict[str, int]:
    """Recompute every `CURLinear`'s leverage orders from its current weight; returns `{name: leverage_rank}`."""
    layers = {n: m for n, m in cur_layers(model).items() if isinstance(m, CURLinear)}
    return {name: layer.refresh_selection_().leverage_rank for name, layer in layers.items()}


# ---- rank selection -----------------------------------------------------------------------------------------------


@dataclass
class _Options:
    """One layer's candidate ranks (ascending; the last is the current rank), their errors and exported costs."""

    ranks: list[int]
    errors: torch.Tensor
    costs: torch.Tensor
    profile: CURProfile | None


@torch.no_grad()
def prune_cur_(
    layers: dict[str, CURLinear | CompactCURLinear],
    energy: float | None = None,
    budget: float | None = None,
    rank_multiple: int = 1,
) -> dict[str, int]:
    """Choose each `CURLinear`'s rank by enumeration, in place (buffers only: shapes unchanged, DDP-safe).

    Candidate ranks are the multiples of `rank_multiple` up to the parameter break-even rank (and at most the current
    rank), plus the current rank (full rank: dense, exact). Errors are relative, `||W - C U R||^2 / ||W||^2`, from
    `cur_profile`; costs are the exported weights `min(k (m + n), m n)`. Every layer leaves the joint-training phase:
    a pruned one computes `C U R`, one kept dense stops recording the approximation term (`approx_rank` = full).

    Args:
        layers (`dict`): `{name: layer}`, e.g. `cur_layers(model)`; arguments are those of `prune_`, validated there.
        energy (`float`, *optional*): Each layer keeps its smallest candidate rank with error `<= 1 - energy`.
        budget (`float`, *optional*): Total exported weights `<= budget * sum(m n)`, minimizing the sum of the
            layers' relative errors greedily (each step buys the largest error decrease per weight that still fits).
        rank_multiple (`int`, defaults to 1): Candidate ranks are multiples of this.

    Returns:
        `{name: rank}` after pruning.

    Raises:
        `ValueError`: a layer is already truncated (`CompactCURLinear`), before anything changes.
    """
    compact = sorted(n for n, layer in layers.items() if isinstance(layer, CompactCURLinear))
    if compact:
        raise ValueError(
            f"prune_ cannot re-select the ranks of truncated CUR layers {compact[:4]}: prune before truncate_, or "
            "factor the dense model again."
        )
    options = {name: _layer_options(layer, rank_multiple) for name, layer in layers.items()}
    if energy is not None:
        picks = {name: _energy_pick(opt, energy) for name, opt in options.items()}
    else:
        allowed = budget * sum(layer.out_features * layer.in_features for layer in layers.values())
        picks = _budget_picks(options, allowed)
        if picks is None and rank_multiple > 1:
            logger.warning(
                "Budget %.3f is too small for ranks in multiples of %d; not rounding.", budget, rank_multiple
            )
            return prune_cur_(layers, budget=budget)
        if picks is None:
            logger.warning("Budget %.3f is below the smallest CUR rank of every layer; keeping the smallest.", budget)
            picks = dict.fromkeys(options, 0)
    for name, layer in layers.items():
        _apply(layer, options[name], picks[name])
    return {name: layer.rank for name, layer in layers.items()}


def _layer_options(layer: CURLinear, rank_multiple: int) -> _Options:
    m, n, current = layer.out_features, layer.in_features, layer.rank
    top = min(break_even_rank(m, n), current)
    ranks = [k for k in range(rank_multiple, top + 1, rank_multiple) if k != current] + [current]
    profiled = max(ranks) if current < layer.full_rank else top
    profile = None
    if profiled:
        own = (layer.row_order, layer.col_order, layer.leverage_rank)
        profile = cur_profile(whole(layer.weight), profiled, extra=own)
    errors = torch.tensor([profile.errors[k - 1].item() if k < layer.full_rank else 0.0 for k in ranks])
    costs = torch.tensor([float(exported_params(m, n, k)) for k in ranks], dtype=torch.float64)
    return _Options(ranks, errors.double(), costs, profile)


def _energy_pick(options: _Options, energy: float) -> int:
    """Index of the smallest candidate with relative error `<= 1 - energy` (the current rank if none)."""
    meets = torch.nonzero(options.errors <= 1 - energy + 1e-12).flatten()
    return int(meets[0]) if meets.numel() else len(options.ranks) - 1


def _budget_picks(options: dict[str, _Options], allowed: float) -> dict[str, int] | None:
    """Greedy allocation: start every layer at its smallest candidate, then repeatedly take the step (to any larger
    candidate of one layer) with the largest error decrease per exported weight that fits; `None` if the smallest
    candidates already exceed `allowed`."""
    names = list(options)
    width = max(len(opt.ranks) for opt in options.values())
    errors = torch.full((len(names), width), float("inf"), dtype=torch.float64)
    costs = torch.full((len(names), width), float("inf"), dtype=torch.float64)
    for i, name in enumerate(names):
        errors[i, : len(options[name].ranks)] = options[name].errors
        costs[i, : len(options[name].ranks)] = options[name].costs
    at = torch.zeros(len(names), dtype=torch.long)
    rows, cols = torch.arange(len(names)), torch.arange(width)
    spent = costs[:, 0].sum().item()
    if spent > allowed:
        return None
    while True:
        extra = costs - costs[rows, at][:, None]
        gain = errors[rows, at][:, None] - errors
        ok = (cols[None] > at[:, None]) & (extra <= allowed - spent) & torch.isfinite(errors)
        ratio = torch.where(ok, gain / extra, torch.tensor(float("-inf"), dtype=torch.float64))
        best = int(ratio.argmax())
        layer, step = divmod(best, width)
        if not ok[layer, step] or ratio[layer, step] <= 0:
            break
        spent += extra[layer, step].item()
        at[layer] = step
    return {name: int(at[i]) for i, name in enumerate(names)}


def _apply(layer: CURLinear, options: _Options, pick: int) -> None:
    rank = options.ranks[pick]
    if rank >= layer.full_rank:  # stays dense; the rank is decided, so training stops pulling it toward a CUR
        layer._set_ranks(rank, rank, layer.leverage_rank)
        return
    rows, cols, leverage = options.profile.selection(rank)
    layer.select_(leverage, approx_rank=rank, rank=rank, orders=(rows.clone(), cols.clone()))


register_parameterization(
    Parameterization(
        "cur",
        FACTORABLE_TYPES,
        build=lambda linear, config, scale, covariance: cur_layer(linear, config),
    )
)
