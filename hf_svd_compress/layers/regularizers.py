"""The regularizers of SVD training, as pure functions computed in float32 whatever the training dtype.

Orthogonality of the singular vectors, `L_o(A) = ||A^T A - I||_F^2 / r^2`, and sparsity of the singular values:
L1 `||s||_1`, Hoyer `||s||_1 / ||s||_2` and Hoyer-square `||s||_1^2 / ||s||_2^2`. Only live (unmasked) singular
values count: masked columns are zeroed, their identity entries dropped and `r` is the live rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn


def _autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off while a term is computed, if it is on for `t`'s device.

    Under bf16 autocast `A.T @ A` would round the factors to bf16 first: `A^T A - I` (entries of a few 1e-3 at
    most) would be rounding noise, and so would its gradient.
    """
    try:
        active = torch.is_autocast_enabled(t.device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        active = False
    return torch.autocast(t.device.type, enabled=False) if active else contextlib.nullcontext()


def _live(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    t = t.float()
    return t if mask is None else t * mask.to(t.dtype)


def gram_deviation(A: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`||A^T A - I||_F^2 / r^2` over the live columns of `A` (d x r)."""
    with _autocast_off(A):
        A = A.float()  # no copy for a float32 parameter: backward keeps A itself, not a d x r temporary
        deviation = A.T @ A - torch.eye(A.shape[1], device=A.device, dtype=A.dtype)
        if mask is None:
            return deviation.square().sum() / A.shape[1] ** 2
        mask = mask.bool()
        # Mask the r x r Gram matrix rather than the d x r factor (same value and gradient, less saved memory).
        deviation = torch.where(mask[:, None] & mask[None, :], deviation, 0.0)
        # clamp: an all-masked layer gives 0 / 1, with no host sync on `r == 0` in the forward pass.
        return deviation.square().sum() / mask.sum().clamp_min(1).to(A.dtype).square()


def gram_deviation_estimate(A: torch.Tensor, probes: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased randomized estimate of `gram_deviation(A, mask)` (Hutchinson) from `probes` Rademacher vectors.

    For `E[z z^T] = I`, `||G - I||_F^2 = E ||(A^T A - I) z||^2`: with `Z` (r x p), `||A^T (A Z) - Z||_F^2 / p` costs
    `2 d r p` multiply-adds instead of the Gram matrix's `d r^2` (p = 16 at r = 384: 1/12). Its gradient is unbiased
    too; the noise averages out over steps (and over processes under DDP, each drawing its own probes).
    """
    with _autocast_off(A):
        A = A.float()
        Z = torch.randint(0, 2, (A.shape[1], probes), device=A.device).to(A.dtype).mul_(2).sub_(1)
        r = torch.tensor(A.shape[1], device=A.device, dtype=A.dtype)
        if mask is not None:
            live = mask.to(A.dtype)[:, None]
            Z = Z * live  # masked coordinates neither probed nor read back
            r = mask.sum().clamp_min(1).to(A.dtype)
        AZ = A @ Z
        residual = A.T @ AZ - Z
        if mask is not None:
            residual = residual * live
        return residual.square().sum() / (probes * r.square())


def orthogonality_loss(
    U: torch.Tensor, V: torch.Tensor | None, mask: torch.Tensor | None = None, probes: int = 0
) -> torch.Tensor:
    """`L_o(U) + L_o(V)` for one factored layer, in float32: exact, or estimated with `probes` > 0 random vectors.

    The estimate is used only where it is cheaper (`2 probes < r`); otherwise the exact value is. `V=None` gives
    `L_o(U)` alone (whitened factors, whose `V` is orthonormal in the metric of the input covariance).
    """
    factors = [U] if V is None else [U, V]
    if 0 < 2 * probes < U.shape[1]:
        return sum(gram_deviation_estimate(A, probes, mask) for A in factors)
    return sum(gram_deviation(A, mask) for A in factors)


def l1(s: torch.Tensor) -> torch.Tensor:
    """`||s||_1`."""
    return s.abs().sum()


def hoyer(s: torch.Tensor) -> torch.Tensor:
    """`||s||_1 / ||s||_2` (0 for an all-zero s)."""
    # An all-zero s has ||s||_1 = 0: clamping the denominator gives 0 without a host sync or a NaN gradient.
    return s.abs().sum() / s.norm().clamp_min(torch.finfo(s.dtype).tiny)


def hoyer_square(s: torch.Tensor) -> torch.Tensor:
    """`||s||_1^2 / ||s||_2^2` (0 for an all-zero s)."""
    return s.abs().sum().square() / s.square().sum().clamp_min(torch.finfo(s.dtype).tiny)


SPARSITY_FUNCTIONS = {"l1": l1, "hoyer": hoyer, "hoyer_square": hoyer_square}


def sparsity_loss(s: torch.Tensor, kind: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The `kind` sparsity regularizer of the live singular values `s`, in float32."""
    if kind not in SPARSITY_FUNCTIONS:
        raise ValueError(f"Unknown sparsity regularizer {kind!r}; use one of {sorted(SPARSITY_FUNCTIONS)}.")
    with _autocast_off(s):
        return SPARSITY_FUNCTIONS[kind](_live(s, mask))


def regularizer_totals(layers: Iterable[nn.Module], sparsity: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the orthogonality and sparsity terms over factored layers, computed outside any forward pass.

    The trainer collects the terms inside each layer's forward instead (safe under DDP/FSDP); this direct sum is
    the reference it is tested against and a tool for analysis.
    """
    orth, sp = torch.zeros(()), torch.zeros(())
    for layer in layers:
        orth = orth.to(layer.s.device) + orthogonality_loss(
            layer.U, None if getattr(layer, "whitened", False) else layer.V, layer.mask
        )
        if sparsity:
            sp = sp.to(layer.s.device) + sparsity_loss(layer.s, sparsity, layer.mask)
    return orth, sp
