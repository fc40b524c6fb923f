"""`SVDLinear`: a linear layer stored as its singular value decomposition `W = U diag(s) V^T`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .regularizers import orthogonality_loss, sparsity_loss
from .templates.modeling_svd_compressed import FactoredWeight

# Layer types that `svd_factorize_` can factor: `nn.Linear` and transformers' `Conv1D` (GPT-2 style, weight [in, out]).
FACTORABLE_TYPES = (nn.Linear, Conv1D)


class SVDLinear(nn.Module):
    """A linear layer parameterized by its SVD, `y = x V diag(s * mask) U^T + bias`.

    Args:
        in_features (`int`): Size of each input sample (`n`).
        out_features (`int`): Size of each output sample (`m`).
        rank (`int`): Number of singular triplets stored (`r`).
        bias (`bool`, defaults to `True`): Whether the layer has a bias.

    Parameters are `U` (m x r), `s` (r), `V` (n x r) and `bias` (m); the boolean buffer `mask` (r) marks the live
    singular values. Masked values contribute nothing and get no gradient, so pruning never changes shapes (safe
    under DDP); `truncate_` removes them for good.

    A data-aware layer (`from_linear(input_scale=a)`) also holds the fixed buffer `input_scale` (n): its weight is
    `U diag(s) V^T diag(a)^-1`, so `s` is the spectrum of `W diag(a)` and `U`, `V` stay orthonormal;
    `live_factors` and `composed_weight` give the dense weight's factors (`diag(a)^-1 V`).
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
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.s = nn.Parameter(torch.empty(rank, **kw))
        self.V = nn.Parameter(torch.empty(in_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.register_buffer("mask", torch.ones(rank, dtype=torch.bool, device=device))
        self.register_buffer("input_scale", None)  # set by from_linear(input_scale=); None: the plain SVD
        # Which regularizer terms forward() records, set by SVDTrainer; see `record_regularizers`.
        self.orth_enabled = False
        self.orth_probes = 0  # > 0: randomized orthogonality estimate (see `orthogonality_loss`)
        self.sparsity_kind: str | None = None
        # Whitened factors (from_linear(covariance=)): V is C-orthonormal, so the orthogonality term covers U alone.
        self.whitened = False
        self.regularizer_terms: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def full_rank(self) -> int:
        """Number of stored singular triplets (live or masked)."""
        return self.s.shape[0]

    @property
    def rank(self) -> int:
        """Number of live (unmasked) singular values."""
        return int(self.mask.sum())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}/{self.full_rank}, "
            f"bias={self.bias is not None}"
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        energy: float | None = None,
        max_rank: int | None = None,
        input_scale: torch.Tensor | None = None,
        covariance: torch.Tensor | None = None,
        ridge: float = 1e-3,
    ) -> SVDLinear:
        """Factor a dense layer by its SVD, computed in float32 (or float64 if the weight is float64).

        Args:
            linear (`nn.Linear` or `transformers.pytorch_utils.Conv1D`): The layer to factor.
            energy (`float`, *optional*): Keep the fewest singular values holding this fraction of sum(s^2).
            max_rank (`int`, *optional*): Keep at most this many singular values.
            input_scale (`torch.Tensor`, *optional*): Per-input-channel scales `a` (`activation_scales`): factor at
                full rank in the basis of ASVD, `W diag(a) = U diag(s) V^T`, and keep `a` as the buffer
                `input_scale` (the layer computes `x diag(a)^-1 V diag(s) U^T`). `s` is then ASVD's spectrum, which
                pruning ranks by. Not combined with `energy` or `max_rank`.
            covariance (`torch.Tensor`, *optional*): The input second moment `C` (n x n, `input_covariances`):
                factor at full rank in whitened coordinates (SVD-LLM, DRONE), `W C^(1/2) = U diag(s) V_w^T` with
                `V = C^(-1/2) V_w`, so that `s_i^2` is the mean squared output error of dropping triplet `i` on the
                calibration inputs. `U` is orthonormal, `V` is orthonormal in the metric of `C`. Not combined with
                `energy`, `max_rank` or `input_scale`.
            ridge (`float`, defaults to 1e-3): With `covariance`: `ridge * mean(diag C)` is added to its diagonal, so
                a singular or ill-conditioned `C` gives finite factors.

        Returns:
            `SVDLinear` on the weight's device and dtype, computing the same function (up to float error) when
            no truncation is asked for.
        """
        weight = dense_weight(linear)
        m, n = weight.shape
        full = min(m, n)
        keep = min(max_rank or full, full)
        if input_scale is not None or covariance is not None:
            if energy is not None or max_rank is not None:
                raise ValueError("Data-aware factors are full rank: drop energy / max_rank (prune after training).")
            if input_scale is not None and covariance is not None:
                raise ValueError("Give input_scale (ASVD) or covariance (whitened), not both.")
        if input_scale is not None:
            U, s, V, input_scale = _scaled_svd(weight, input_scale)
        elif covariance is not None:
            U, s, V = _whitened_svd(weight, covariance, ridge)
        else:
            U, s, V = _svd(weight, keep if energy is None else full)
        if energy is not None:
            keep = min(keep, energy_rank(s, energy))
        layer = cls(n, m, keep, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.U.copy_(U[:, :keep])
            layer.s.copy_(s[:keep])
            layer.V.copy_(V[:, :keep])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        if input_scale is not None:
            layer.input_scale = input_scale.to(weight.dtype)
        layer.whitened = covariance is not None
        return layer

    def weight_V(self) -> torch.Tensor:
        """`V` in the dense weight's input basis: `diag(input_scale)^-1 V` for a data-aware layer, else `V`."""
        scale = getattr(self, "input_scale", None)  # subclasses with their own factors (Householder, STTP) have none
        return self.V if scale is None else self.V / scale[:, None]

    def live_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(U, s, V)` of the dense weight (`weight_V`) restricted to the live singular values, by decreasing |s|."""
        idx = self._live_index()
        return self.U[:, idx], self.s[idx], self.weight_V()[:, idx]

    def composed_weight(self) -> torch.Tensor:
        """The dense weight `U diag(s * mask) V^T` (out x in)."""
        return (self.U * self._live_s()) @ self.weight_V().T

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (out x in) as a `FactoredWeight`: its dtype, device and shape cost nothing to read, and
        any computation with it composes `composed_weight()` (model code such as T5's reads `wo.weight.dtype`)."""
        return FactoredWeight(self.composed_weight, (self.out_features, self.in_features), self.s)

    def to_linear(self) -> nn.Linear:
        """Merge back into a dense `nn.Linear` computing the same function."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.U.device, dtype=self.U.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(self.composed_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @torch.no_grad()
    def truncate_(self) -> SVDLinear:
        """Drop the masked singular triplets for good (new, smaller parameters); returns self."""
        idx = self._live_index()  # the stored factors: a data-aware layer keeps its input_scale
        U, s, V = self.U[:, idx].clone(), self.s[idx].clone(), self.V[:, idx].clone()
        self.U, self.s, self.V = nn.Parameter(U), nn.Parameter(s), nn.Parameter(V)
        self.mask = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        return self

    def use_composed(self, num_tokens: int) -> bool:
        """Whether composing W first is cheaper than two thin matmuls for `num_tokens` input rows (`compose_first`)."""
        return compose_first(self.out_features, self.in_features, self.full_rank, num_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and (self.orth_enabled or self.sparsity_kind):
            self.record_regularizers()
        s, V = self._live_s(), self.weight_V()
        if self.use_composed(x.numel() // self.in_features):
            return F.linear(x, (self.U * s) @ V.T, self.bias)
        # Folding s (and input_scale) into V costs n*r multiplies instead of T*r (T*n) for scaling activations.
        return F.linear(F.linear(x, (V * s).T), self.U, self.bias)

    def record_regularizers(self) -> None:
        """Compute this layer's regularizer terms inside forward, where sharded parameters are whole.

        The trainer clears `regularizer_terms` before its forward pass and sums them after it, so a recomputation
        under gradient checkpointing (which runs after the sum) is never counted.
        """
        zero = torch.zeros((), device=self.s.device, dtype=torch.float32)
        V = None if self.whitened else self.V
        orth = orthogonality_loss(self.U, V, self.mask, self.orth_probes) if self.orth_enabled else zero
        sparsity = sparsity_loss(self.s, self.sparsity_kind, self.mask) if self.sparsity_kind else zero
        self.regularizer_terms.append((orth, sparsity))

    def _live_index(self) -> torch.Tensor:
        """Indices of the live singular values, by decreasing |s|."""
        idx = torch.nonzero(self.mask).flatten()
        return idx[torch.argsort(self.s.detach()[idx].abs(), descending=True)]

    def _live_s(self) -> torch.Tensor:
        return self.s * self.mask.to(self.s.dtype)


def compose_first(out_features: int, in_features: int, rank: int, num_tokens: int) -> bool:
    """Whether `W = up @ down` (rank `rank`) is cheaper to compose once than to apply as two thin matmuls.

    Composed: `m n r` (build W) + `T m n`; factored: `T r (m + n)`. The backward pass has the same ratio.
    """
    m, n = out_features, in_features
    return m * n * rank + num_tokens * m * n <= num_tokens * rank * (m + n)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out x in) weight of an `nn.Linear` or a transformers `Conv1D` (which stores it as in x out)."""
    if isinstance(layer, Conv1D):
        return layer.weight.T
    if isinstance(layer, nn.Linear):
        return layer.weight
    raise TypeError(f"Expected nn.Linear or transformers Conv1D, got {type(layer).__name__}.")


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Fewest singular values (largest |s| first) whose squared sum reaches `energy` of the total; at least 1."""
    # float64 on the CPU (r values only): float32 cumulative sums lose values below ~1e-7 of the total energy.
    e = s.detach().cpu().double().square().sort(descending=True).values
    # A threshold hit exactly (0.5 of [1, 1, 1, 1], 0.64 of [4, 3]) must not be missed by the rounding of s itself:
    # a float32 SVD returns 3.9999998 for 4 on some LAPACK builds, 3e-8 of energy short of 0.64.
    tolerance = 1e-12 if s.dtype == torch.float64 else 1e-6
    nonzero = int((e > 0).sum())
    if nonzero == 0:
        return 1
    if energy >= 1:
        return nonzero  # all the energy: every non-zero value, however small, and never an exact zero
    cum = e.cumsum(0) / e.sum()
    k = int(torch.searchsorted(cum, torch.tensor(energy - tolerance, dtype=cum.dtype)).item()) + 1
    return max(1, min(k, nonzero))


def _scaled_svd(
    weight: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(U, s, V, a)` with `W diag(a) = U diag(s) V^T`, the SVD in float64 (the layer divides by `a` later).

    A channel that was never active (scale 0) gets the smallest useful scale instead of a division by zero.
    """
    w = weight.detach().double()
    a = scale.detach().to(w.device, torch.float64)
    a = a.clamp_min(float(a.max()) * 1e-6)
    U, s, Vh = torch.linalg.svd(w * a, full_matrices=False)
    return U, s, Vh.T, a


def whitening(covariance: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Q, L)` with `C + ridge * mean(diag C) I = Q diag(L) Q^T`, in float64; every `L` is positive.

    An all-zero `C` (a layer whose inputs were all zero) gives the identity, so factoring falls back to the plain
    SVD; negative rounding noise in the eigenvalues is clamped to the ridge.
    """
    c = covariance.detach().to(torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise ValueError("The input covariance has NaN or inf entries: the calibration inputs overflowed.")
    c = (c + c.T) / 2
    floor = float(c.diagonal().mean()) * ridge
    if not floor > 0:
        return torch.eye(c.shape[0], dtype=torch.float64, device=c.device), torch.ones(c.shape[0], dtype=c.dtype)
    L, Q = torch.linalg.eigh(c + floor * torch.eye(c.shape[0], dtype=c.dtype, device=c.device))
    return Q, L.clamp_min(floor)


def _whitened_svd(
    weight: torch.Tensor, covariance: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(U, s, V)` with `W = U diag(s) V^T`, `U diag(s) V_w^T` the SVD of `W Q diag(L)^(1/2)`, `V = Q L^(-1/2) V_w`."""
    w = weight.detach().double()
    n = w.shape[1]
    if covariance.shape != (n, n):
        raise ValueError(f"covariance has shape {tuple(covariance.shape)}; this layer needs ({n}, {n}).")
    Q, L = whitening(covariance.to(w.device), ridge)
    root = L.sqrt()
    U, s, Vh = torch.linalg.svd(w @ (Q * root), full_matrices=False)
    return U, s, (Q / root) @ Vh.T


def _svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD `W = U diag(s) V^T` of the top `rank` triplets, in float32 or higher, tall orientation."""
    w = weight.detach()
    w = w if w.dtype == torch.float64 else w.float()
    transpose = w.shape[0] < w.shape[1]
    if transpose:  # LAPACK's QR-first path is faster on tall matrices.
        w = w.T
    full = min(w.shape)
    if rank <= full // 4:
        # Randomized SVD is much cheaper when only a few triplets are kept.
        U, s, V = torch.svd_lowrank(w, q=min(full, rank + max(10, math.ceil(0.1 * rank))), niter=4)
    else:
        U, s, Vh = torch.linalg.svd(w, full_matrices=False)
        V = Vh.T
    U, s, V = U[:, :rank], s[:rank], V[:, :rank]
    return (V, s, U) if transpose else (U, s, V)
