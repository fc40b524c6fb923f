"""Exactly orthonormal singular vectors: Householder factors (SVDP) and their tensor-train form (STTP).

Obukhov et al., "Spectral Tensor Train Parameterization of Deep Learning Layers" (AISTATS 2021). A factored layer
`W = U diag(s) V^T` keeps `U` (m x r) and `V` (n x r) orthonormal by construction instead of by a loss:

- **SVDP** (`parameterization="householder"`): a d x r factor is the first r columns of a product of r Householder
  reflections `H_i = I - tau_i v_i v_i^T`, `tau_i = 2 / ||v_i||^2`, whose vectors `v_i` are the columns of a
  unit-lower-trapezoidal d x r matrix (the trainable strictly-lower entries; the diagonal is 1, the upper part is
  unused). Degrees of freedom `d r - r (r + 1) / 2`, those of the Stiefel manifold.
- **STTP** (`parameterization="sttp"`): d is split into its prime factors `m_1 ... m_D` and the factor is a
  left-orthogonal tensor train: `Q_1 = G_1`, `Q_k = (Q_{k-1} (x) I_{m_k}) G_k`, `U = Q_D`, each core
  `G_k` ((r_{k-1} m_k) x r_k) orthonormal by Householder reflections as above, so `U` is orthonormal. The TT-ranks
  are those of an exact TT-SVD, `r_k = min(r_{k-1} m_k, (d / (m_1 ... m_k)) r)`, optionally capped by
  `tt_max_rank`, which trades exactness for degrees of freedom `O(tt_max_rank^2 log d)` per factor (but never below
  `ceil(r m_1 ... m_k / d)`, the least rank that still leaves room for r orthonormal columns).

The product of r reflections is built with the "UT transform" (Joffrain et al., 2006): `H_1 ... H_r = I - Y T Y^T`
with `T^{-1} = striu(Y^T Y) + diag(Y^T Y) / 2`, so a factor costs two d x r x r GEMMs and one r x r triangular
solve, forward and backward (4x to 50x faster on a CPU than `torch.linalg.householder_product`, whose backward
loops over the reflections). Factors are always built in float32 or float64 (never under autocast), once per
forward pass.

Reflections from `torch.geqrf` reproduce an orthonormal matrix up to the sign of each column (and a reflector whose
LAPACK `tau` is 0 is still a reflection here, flipping one sign); a `sign` buffer of +-1 per column stores the
correction, so the layer computes exactly the dense function right after factoring.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_svd_compress.layers.base import dense_type_of
from hf_svd_compress.layers.linalg import FACTORABLE_TYPES, dense_weight, energy_rank, split_product, thin_svd
from hf_svd_compress.layers.registry import Parameterization, register_parameterization
from hf_svd_compress.layers.regularizers import sparsity_loss
from hf_svd_compress.layers.svd import SVDLinear

__all__ = [
    "HOUSEHOLDER_PARAMETERIZATIONS",
    "HouseholderFactor",
    "HouseholderSVDLinear",
    "TTHouseholderFactor",
    "householder_columns",
    "prime_factors",
    "tt_ranks",
]

HOUSEHOLDER_PARAMETERIZATIONS = ("householder", "sttp")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off while a factor is built: in bf16 the reflections would lose orthonormality (~1e-2)."""
    try:
        active = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        active = False
    return torch.autocast(device.type, enabled=False) if active else contextlib.nullcontext()


def householder_columns(reflectors: torch.Tensor) -> torch.Tensor:
    """First r columns of `H_1 ... H_r`, `H_i = I - 2 v_i v_i^T / ||v_i||^2`, `v_i` = column i of `Y`.

    Args:
        reflectors (`torch.Tensor`): d x r (r <= d); only its strictly lower part is read, `Y` is that plus the
            identity (unit lower trapezoidal, the LAPACK `geqrf` layout).

    Returns:
        The d x r orthonormal matrix, in `reflectors`' dtype, differentiable with respect to `reflectors`.
    """
    d, r = reflectors.shape
    eye = torch.eye(d, r, device=reflectors.device, dtype=reflectors.dtype)
    Y = reflectors.tril(-1) + eye
    gram = Y.T @ Y
    t_inv = gram.triu(1) + torch.diag(gram.diagonal() / 2)  # UT transform: T^{-1} for tau_i = 2 / ||v_i||^2
    # (I - Y T Y^T)[:, :r] = E_r - Y (T Y[:r]^T)
    return eye - Y @ torch.linalg.solve_triangular(t_inv, Y[:r].T, upper=True)


def prime_factors(d: int) -> list[int]:
    """Prime factors of `d` in ascending order (`[1]` for 1): the TT modes of a dimension, as in the STTP code."""
    factors, p = [], 2
    while p * p <= d:
        while d % p == 0:
            factors.append(p)
            d //= p
        p += 1
    if d > 1 or not factors:
        factors.append(d)
    return factors


def tt_ranks(dims: list[int], rank: int, max_rank: int | None = None) -> list[int]:
    """TT-ranks `[1, r_1, ..., r_{D-1}, rank]` of a left-orthogonal TT of a `prod(dims)` x `rank` matrix.

    Without `max_rank` these are the ranks of an exact TT-SVD, `min(r_{k-1} m_k, (d / M_k) rank)` with
    `M_k = m_1 ... m_k`. With it each is capped at `max(max_rank, ceil(rank M_k / d))`: below that the remaining
    modes could not hold `rank` orthonormal columns.
    """
    d = math.prod(dims)
    ranks, prefix = [1], 1
    for m in dims[:-1]:
        prefix *= m
        bound = min(ranks[-1] * m, (d // prefix) * rank)
        if max_rank is not None:
            bound = min(bound, max(max_rank, -(-rank * prefix // d)))
        ranks.append(bound)
    return [*ranks, rank]


def _stiefel_dof(rows: int, cols: int) -> int:
    return rows * cols - cols * (cols + 1) // 2


def _polar(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to `a` (Procrustes), `W Z^T` from `a = W S Z^T`."""
    w, _, zh = torch.linalg.svd(a, full_matrices=False)
    return w @ zh


class HouseholderFactor(nn.Module):
    """A `rows` x `cols` orthonormal matrix, the first columns of a product of `cols` Householder reflections.

    Args:
        rows (`int`), cols (`int`): The shape, `cols <= rows`.

    Parameter `reflectors` (rows x cols, strictly-lower part used), buffer `sign` (+-1 per column).
    """

    def __init__(
        self, rows: int, cols: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if not 1 <= cols <= rows:
            raise ValueError(f"HouseholderFactor({rows}, {cols}): an orthonormal matrix needs 1 <= cols <= rows.")
        self.reflectors = nn.Parameter(torch.zeros(rows, cols, device=device, dtype=dtype))
        self.register_buffer("sign", torch.ones(cols, device=device, dtype=dtype))

    @property
    def dof(self) -> int:
        """Degrees of freedom: the strictly-lower entries of `reflectors`."""
        return _stiefel_dof(*self.reflectors.shape)

    def matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The orthonormal matrix in `dtype` (default: float32, or float64 for float64 parameters)."""
        work = dtype or _work_dtype(self.reflectors.dtype)
        with _autocast_off(self.reflectors.device):
            return householder_columns(self.reflectors.to(work)) * self.sign.to(work)

    def forward(self) -> torch.Tensor:
        return self.matrix()

    @torch.no_grad()
    def load_orthonormal_(self, q: torch.Tensor) -> None:
        """Set the reflectors so that `matrix()` is `q` (orthonormal columns, this factor's shape), in place."""
        q = q.detach().to(device=self.reflectors.device, dtype=torch.float64)
        a, _ = torch.geqrf(q)
        self.reflectors.copy_(a.tril(-1))
        # The reflections give q up to column signs: LAPACK's choice of sign, and tau = 0 (no reflection) in LAPACK
        # is a reflection here. Read the signs off what the stored (rounded) reflectors actually produce.
        built = householder_columns(self.reflectors.to(torch.float64))
        agree = (built * q).sum(0)
        self.sign.copy_(torch.where(agree < 0, -1.0, 1.0))


class TTHouseholderFactor(nn.Module):
    """A d x r orthonormal matrix as a left-orthogonal tensor train of Householder-parameterized cores (STTP).

    Args:
        rows (`int`): d, split into its prime factors (`dims`).
        cols (`int`): r, `r <= d`.
        ranks (`list[int]`, *optional*): TT-ranks `[1, r_1, ..., r_{D-1}, r]`; default `tt_ranks(dims, r, max_rank)`.
        max_rank (`int`, *optional*): Cap on the TT-ranks (see `tt_ranks`).

    Core k is a `HouseholderFactor` of shape (r_{k-1} m_k) x r_k in `cores[k]`.
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        ranks: list[int] | None = None,
        max_rank: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= cols <= rows:
            raise ValueError(f"TTHouseholderFactor({rows}, {cols}): an orthonormal matrix needs 1 <= cols <= rows.")
        self.dims = prime_factors(rows)
        self.ranks = list(ranks) if ranks is not None else tt_ranks(self.dims, cols, max_rank)
        _check_tt_ranks(self.dims, cols, self.ranks)
        self.cores = nn.ModuleList(
            HouseholderFactor(self.ranks[k] * m, self.ranks[k + 1], device=device, dtype=dtype)
            for k, m in enumerate(self.dims)
        )

    @property
    def dof(self) -> int:
        """Degrees of freedom: the sum over cores."""
        return sum(core.dof for core in self.cores)

    def matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The d x r orthonormal matrix, contracting the cores left to right."""
        with _autocast_off(self.cores[0].reflectors.device):
            q = self.cores[0].matrix(dtype)
            for core, r_left, m, r_right in zip(self.cores[1:], self.ranks[1:], self.dims[1:], self.ranks[2:]):
                q = (q @ core.matrix(dtype).reshape(r_left, m * r_right)).reshape(-1, r_right)
        return q

    def forward(self) -> torch.Tensor:
        return self.matrix()

    @torch.no_grad()
    def load_orthonormal_(self, q: torch.Tensor) -> None:
        """TT-SVD of `q` (d x r, orthonormal) into this factor's ranks, in place.

        Exact (up to float error) when every rank is at least the matching unfolding rank of `q`, always true for
        the uncapped ranks; otherwise each core keeps the leading left singular vectors and the last core is the
        orthonormal matrix nearest to the projected remainder, so the result stays orthonormal.
        """
        q = q.detach().to(torch.float64)
        cols, remaining, carry = q.shape[1], q.shape[0], q
        for core, r_left, m, r_right in zip(self.cores[:-1], self.ranks, self.dims, self.ranks[1:]):
            remaining //= m
            a = carry.reshape(r_left * m, remaining * cols)
            if r_right == min(a.shape):
                left, carry = torch.linalg.qr(a)
            else:  # rank cap below the unfolding's size: best rank-r_right subspace
                u, sv, vh = torch.linalg.svd(a, full_matrices=False)
                left, carry = u[:, :r_right], sv[:r_right, None] * vh[:r_right]
            core.load_orthonormal_(left)
        self.cores[-1].load_orthonormal_(_polar(carry.reshape(self.ranks[-2] * self.dims[-1], cols)))


def _check_tt_ranks(dims: list[int], cols: int, ranks: list[int]) -> None:
    """Raise unless every core (r_{k-1} m_k) x r_k can be orthonormal and the train ends at `cols` columns."""
    ok = len(ranks) == len(dims) + 1 and ranks[0] == 1 and ranks[-1] == cols
    ok = ok and all(1 <= ranks[k + 1] <= ranks[k] * m for k, m in enumerate(dims))
    if not ok:
        raise ValueError(
            f"TT-ranks {ranks} do not fit modes {dims} and {cols} columns: they must start at 1, end at {cols}, "
            "and satisfy 1 <= r_k <= r_(k-1) * m_k; use tt_ranks(dims, cols, max_rank)."
        )


def _make_factor(
    rows: int,
    cols: int,
    parameterization: str,
    tt_max_rank: int | None,
    ranks: list[int] | None,
    **kw,
) -> nn.Module:
    if parameterization == "sttp":
        return TTHouseholderFactor(rows, cols, ranks=ranks, max_rank=tt_max_rank, **kw)
    return HouseholderFactor(rows, cols, **kw)


class HouseholderSVDLinear(SVDLinear):
    """`SVDLinear` whose `U` and `V` are orthonormal by construction (SVDP, or STTP in tensor-train form).

    Args:
        in_features (`int`): n. out_features (`int`): m. rank (`int`): r, at most `min(m, n)`.
        bias (`bool`, defaults to `True`): Whether the layer has a bias.
        parameterization (`str`, defaults to `"householder"`): `"householder"` (SVDP) or `"sttp"` (tensor train).
        tt_max_rank (`int`, *optional*): STTP only: cap on the TT-ranks (see `tt_ranks`).
        u_ranks, v_ranks (`list[int]`, *optional*): STTP only: explicit TT-ranks of U and V (as after `truncate_`).

    `U`, `V` are read-only properties computed from the submodules `u_factor`, `v_factor` (each access rebuilds
    them; `forward` builds them once). `s`, `bias` and the `mask` buffer are those of `SVDLinear`, so pruning, the
    sparsity regularizer, `singular_value_lr_scale` and export work unchanged. The orthogonality term is always 0.
    """

    parameterization = "householder"  # the class default; instances hold theirs ("householder" or "sttp")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        parameterization: str = "householder",
        tt_max_rank: int | None = None,
        u_ranks: list[int] | None = None,
        v_ranks: list[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_arguments(in_features, out_features, rank, parameterization, tt_max_rank)
        # Not SVDLinear.__init__: it would register U and V as parameters, which are properties here.
        nn.Module.__init__(self)
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.parameterization, self.tt_max_rank = parameterization, tt_max_rank
        self.u_factor = _make_factor(out_features, rank, parameterization, tt_max_rank, u_ranks, **kw)
        self.v_factor = _make_factor(in_features, rank, parameterization, tt_max_rank, v_ranks, **kw)
        self.s = nn.Parameter(torch.empty(rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.register_buffer("mask", torch.ones(rank, dtype=torch.bool, device=device))
        # The attributes SVDTrainer sets and reads (see SVDLinear).
        self.orth_enabled = False
        self.orth_probes = 0
        self.sparsity_kind: str | None = None
        self.regularizer_terms: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def U(self) -> torch.Tensor:
        """m x r, orthonormal columns, in the parameters' dtype."""
        return self.u_factor().to(self.s.dtype)

    @property
    def V(self) -> torch.Tensor:
        """n x r, orthonormal columns, in the parameters' dtype."""
        return self.v_factor().to(self.s.dtype)

    @property
    def dof(self) -> int:
        """Degrees of freedom of the weight: those of U and V plus the r singular values (not the bias)."""
        return self.u_factor.dof + self.v_factor.dof + self.full_rank

    def extra_repr(self) -> str:
        cap = f", tt_max_rank={self.tt_max_rank}" if self.tt_max_rank is not None else ""
        return f"{super().extra_repr()}, parameterization={self.parameterization!r}{cap}"

    # ---- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        energy: float | None = None,
        max_rank: int | None = None,
        parameterization: str = "householder",
        tt_max_rank: int | None = None,
    ) -> HouseholderSVDLinear:
        """Factor a dense `nn.Linear` or transformers `Conv1D` by its SVD, then its singular vectors by reflections.

        Args:
            linear (`nn.Module`): The layer to factor.
            energy (`float`, *optional*), max_rank (`int`, *optional*): As in `SVDLinear.from_linear`.
            parameterization (`str`, defaults to `"householder"`): `"householder"` or `"sttp"`.
            tt_max_rank (`int`, *optional*): STTP only: cap on the TT-ranks.

        Returns:
            The layer on the weight's device and dtype. Without truncation (and without `tt_max_rank`) it computes
            the dense function up to float error; with `tt_max_rank` its U, V are the capped TT approximations and
            `s` the best singular values for them.
        """
        weight = dense_weight(linear)
        m, n = weight.shape
        full = min(m, n)
        keep = min(max_rank or full, full)
        U, s, V = thin_svd(weight, keep if energy is None else full)
        if energy is not None:
            keep = min(keep, energy_rank(s, energy))
        layer = cls.from_factors(
            U[:, :keep], s[:keep], V[:, :keep], linear.bias, parameterization, tt_max_rank, dtype=weight.dtype
        )
        layer.dense_type = dense_type_of(linear)
        return layer

    @classmethod
    @torch.no_grad()
    def from_factors(
        cls,
        U: torch.Tensor,
        s: torch.Tensor,
        V: torch.Tensor,
        bias: torch.Tensor | None,
        parameterization: str = "householder",
        tt_max_rank: int | None = None,
        u_ranks: list[int] | None = None,
        v_ranks: list[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> HouseholderSVDLinear:
        """The layer computing `U diag(s) V^T` (+ bias) from orthonormal `U` (m x r) and `V` (n x r).

        Args:
            U, s, V (`torch.Tensor`): An SVD-like factorization with orthonormal `U`, `V`.
            bias (`torch.Tensor`, *optional*): The bias (m).
            parameterization, tt_max_rank, u_ranks, v_ranks: As in the constructor.
            dtype (`torch.dtype`, *optional*): Of the parameters (default: `s`'s).

        Returns:
            A `HouseholderSVDLinear` on `s`'s device.
        """
        (m, r), n = U.shape, V.shape[0]
        kw = {"device": s.device, "dtype": dtype or s.dtype}
        layer = cls(n, m, r, bias is not None, parameterization, tt_max_rank, u_ranks, v_ranks, **kw)
        layer.u_factor.load_orthonormal_(U)
        layer.v_factor.load_orthonormal_(V)
        if tt_max_rank is not None:
            # Capped TT-ranks approximate U and V: the best diagonal for them is diag(U'^T U diag(s) V^T V').
            u_fit = layer.u_factor.matrix(torch.float64).T @ U.double()
            v_fit = layer.v_factor.matrix(torch.float64).T @ V.double()
            s = ((u_fit * s.double()) * v_fit).sum(1)
        layer.s.copy_(s)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    # ---- SVDLinear interface --------------------------------------------------------------------------------------

    @torch.no_grad()
    def truncate_(self) -> HouseholderSVDLinear:
        """Drop the masked singular values for good; returns self, still a `HouseholderSVDLinear`.

        The reflectors are re-derived for the live columns (sorted by |s|), from U and V built in float64, so the
        layer computes the same function. STTP keeps each TT-rank at most what it was (and no larger than the
        fewer columns need), which keeps the TT-SVD exact.
        """
        idx = torch.nonzero(self.mask).flatten()
        idx = idx[torch.argsort(self.s.detach()[idx].abs(), descending=True)]
        U, V = self.u_factor.matrix(torch.float64)[:, idx], self.v_factor.matrix(torch.float64)[:, idx]
        rank, kw = idx.numel(), {"device": self.s.device, "dtype": self.s.dtype}
        if rank == 0:
            raise ValueError("truncate_: every singular value is masked; keep at least one (prune_ always does).")
        u_ranks, v_ranks = _shrunk_ranks(self.u_factor, rank), _shrunk_ranks(self.v_factor, rank)
        self.u_factor = _make_factor(self.out_features, rank, self.parameterization, None, u_ranks, **kw)
        self.v_factor = _make_factor(self.in_features, rank, self.parameterization, None, v_ranks, **kw)
        self.u_factor.load_orthonormal_(U)
        self.v_factor.load_orthonormal_(V)
        self.s = nn.Parameter(self.s.detach()[idx].clone())
        self.mask = torch.ones(rank, dtype=torch.bool, device=self.s.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and (self.orth_enabled or self.sparsity_kind):
            self.record_regularizers()
        U, V, s = self.U, self.V, self._live_s()  # each factor built once per forward, O(d r^2)
        if self.use_composed(x.numel() // self.in_features):
            return F.linear(x, (U * s) @ V.T, self.bias)
        return F.linear(F.linear(x, (V * s).T), U, self.bias)

    def record_regularizers(self) -> None:
        """Record `(0, sparsity)`: U and V are orthonormal by construction, so there is no orthogonality term."""
        zero = torch.zeros((), device=self.s.device, dtype=torch.float32)
        sparsity = sparsity_loss(self.s, self.sparsity_kind, self.mask) if self.sparsity_kind else zero
        self.regularizer_terms.append((zero, sparsity))

    @classmethod
    @torch.no_grad()
    def from_svd_layer(
        cls, layer: SVDLinear, parameterization: str = "householder", tt_max_rank: int | None = None
    ) -> HouseholderSVDLinear:
        """The layer computing what `layer` (an `SVDLinear`) computes with its live singular values.

        `U` and `V` are re-orthonormalized first (QR of each, then an r x r SVD), so the conversion is exact even
        where they had drifted; with `tt_max_rank` (STTP) they are approximated.
        """
        U, s, V = (t.detach().double() for t in layer.live_factors())
        U, s, V = split_product(U * s, V, orthonormal=True)
        new = cls.from_factors(U, s, V, layer.bias, parameterization, tt_max_rank, dtype=layer.s.dtype)
        new.dense_type = layer.dense_type
        return new.to(layer.s.device)

    # ---- checkpoints ----------------------------------------------------------------------------------------------

    def checkpoint_record(self) -> dict[str, Any]:
        return {**super().checkpoint_record(), "tt_max_rank": self.tt_max_rank}

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], prefix: str, dense: nn.Module, record: dict[str, Any]
    ) -> HouseholderSVDLinear:
        out_features, in_features = dense_weight(dense).shape
        bias, dtype = f"{prefix}bias" in state, state[f"{prefix}s"].dtype
        layer = cls.from_state_shapes(state, prefix, in_features, out_features, bias, record.get("tt_max_rank"), dtype)
        layer.dense_type = dense_type_of(dense)
        return layer

    @classmethod
    def from_state_shapes(
        cls,
        state: dict[str, torch.Tensor],
        prefix: str,
        in_features: int,
        out_features: int,
        bias: bool,
        tt_max_rank: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> HouseholderSVDLinear:
        """An uninitialized layer whose tensors have the shapes that `state` holds under `prefix` (e.g. `"fc."`).

        Used to reload a checkpoint saved while factored (`load_factored_checkpoint`): the rank and, for STTP, the
        TT-ranks (which `truncate_` may have lowered) are read off the stored tensors.
        """
        rank = state[f"{prefix}s"].shape[0]
        if f"{prefix}u_factor.reflectors" in state:
            return cls(in_features, out_features, rank, bias, "householder", dtype=dtype)
        u_ranks = _stored_tt_ranks(state, f"{prefix}u_factor.")
        v_ranks = _stored_tt_ranks(state, f"{prefix}v_factor.")
        return cls(in_features, out_features, rank, bias, "sttp", tt_max_rank, u_ranks, v_ranks, dtype=dtype)


def _check_arguments(in_features: int, out_features: int, rank: int, parameterization: str, cap: int | None) -> None:
    if parameterization not in HOUSEHOLDER_PARAMETERIZATIONS:
        raise ValueError(
            f"HouseholderSVDLinear(parameterization={parameterization!r}) is not supported: use one of "
            f"{HOUSEHOLDER_PARAMETERIZATIONS}."
        )
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"HouseholderSVDLinear(rank={rank}) must be in [1, min(in_features, out_features) = "
            f"{min(in_features, out_features)}]: orthonormal factors have at most as many columns as rows."
        )
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"HouseholderSVDLinear(tt_max_rank={cap!r}) must be a positive integer or None.")
    if cap is not None and parameterization != "sttp":
        raise ValueError(
            f"HouseholderSVDLinear(tt_max_rank={cap!r}) only applies to parameterization='sttp' (got "
            f"{parameterization!r})."
        )


def _shrunk_ranks(factor: nn.Module, rank: int) -> list[int] | None:
    """TT-ranks for `rank` of the factor's columns: the exact ones, but never above the current ones."""
    if not isinstance(factor, TTHouseholderFactor):
        return None
    return [min(a, b) for a, b in zip(tt_ranks(factor.dims, rank), factor.ranks[:-1])] + [rank]


def _stored_tt_ranks(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    count = sum(1 for k in state if k.startswith(f"{prefix}cores.") and k.endswith(".reflectors"))
    if count == 0:
        raise KeyError(f"No Householder factor under {prefix!r} (neither reflectors nor TT cores) in the state.")
    return [1] + [state[f"{prefix}cores.{k}.reflectors"].shape[1] for k in range(count)]


for _name in HOUSEHOLDER_PARAMETERIZATIONS:
    register_parameterization(
        Parameterization(
            _name,
            FACTORABLE_TYPES,
            build=lambda linear, config, scale, covariance: HouseholderSVDLinear.from_linear(
                linear,
                config.init_energy,
                config.init_max_rank,
                parameterization=config.parameterization,
                tt_max_rank=config.tt_max_rank,
            ),
            fields=("tt_max_rank",) if _name == "sttp" else (),
        )
    )
