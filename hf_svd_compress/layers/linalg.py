"""The linear algebra the factored layers share: dense weights, thin and data-aware SVDs, rank rules."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# Layer types that `svd_factorize_` can factor: `nn.Linear` and transformers' `Conv1D` (GPT-2 style, weight [in, out]).
FACTORABLE_TYPES = (nn.Linear, Conv1D)


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


def scaled_svd(
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


def whitened_svd(
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


def thin_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, else float32: the precision factorizations run in."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def whole(t: torch.Tensor) -> torch.Tensor:
    """`t`, or the whole tensor of an FSDP2 / tensor-parallel `DTensor` (a collective: all processes call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def split_product(
    plain: torch.Tensor, carrier: torch.Tensor, orthonormal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(P, s, Q)` with `plain @ carrier^T = P diag(s) Q^T`, for a carrier that holds the singular values.

    Without `orthonormal`: `s` = the carrier's column norms, `Q` = its normalized columns, `P = plain` (exact inverse
    of folding `s` into one factor). With it: QR of both factors and an r x r SVD give orthonormal `P`, `Q`.
    """
    if orthonormal:
        q_p, r_p = torch.linalg.qr(plain)
        q_c, r_c = torch.linalg.qr(carrier)
        small_p, s, small_ch = torch.linalg.svd(r_p @ r_c.T)
        return q_p @ small_p, s, q_c @ small_ch.T
    s = carrier.norm(dim=0)
    return plain, s, carrier / torch.where(s > 0, s, torch.ones_like(s))


@torch.no_grad()
def assign_(*pairs: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
    """Copy each value into its parameter, skipping pairs where either is `None` (a layer without bias)."""
    for param, value in pairs:
        if param is not None and value is not None:
            param.copy_(value)
