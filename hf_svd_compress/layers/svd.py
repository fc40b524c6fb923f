"""`SVDLinear`: a linear layer stored as its singular value decomposition `W = U diag(s) V^T`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_svd_compress.hub.templates.modeling_svd_compressed import FactoredWeight, LowRankLinear
from hf_svd_compress.layers.base import FactoredLayer, RegularizerSettings, dense_module, dense_type_of
from hf_svd_compress.layers.linalg import (
    FACTORABLE_TYPES,
    assign_,
    compose_first,
    dense_weight,
    energy_rank,
    scaled_svd,
    split_product,
    thin_svd,
    whitened_svd,
    whole,
    work_dtype,
)
from hf_svd_compress.layers.registry import Parameterization, register_parameterization
from hf_svd_compress.layers.regularizers import orthogonality_loss, sparsity_loss


class SVDLinear(FactoredLayer):
    """A linear layer parameterized by its SVD, `y = x V diag(s * mask) U^T + bias`.

    Args:
        in_features (`int`): Size of each input sample (`n`).
        out_features (`int`): Size of each output sample (`m`).
        rank (`int`): Number of singular triplets stored (`r`).
        bias (`bool`, defaults to `True`): Whether the layer has a bias.

    Parameters are `U` (m x r), `s` (r), `V` (n x r) and `bias` (m); the boolean buffer `mask` (r) marks the live
    singular values. Masked values contribute nothing and get no gradient, so pruning never changes shapes (safe
    under DDP); `truncate_` removes them for good.

    The `FactoredLayer` of `parameterization="svd"`. A data-aware layer (`from_linear(input_scale=a)`) also holds
    the fixed buffer `input_scale` (n): its weight is `U diag(s) V^T diag(a)^-1`, so `s` is the spectrum of
    `W diag(a)` and `U`, `V` stay orthonormal; `live_factors` and `composed_weight` give the dense weight's factors
    (`diag(a)^-1 V`).
    """

    parameterization = "svd"

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
        # Which regularizer terms forward() records: set by `configure_regularizers` (SVDTrainer calls it).
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
            U, s, V, input_scale = scaled_svd(weight, input_scale)
        elif covariance is not None:
            U, s, V = whitened_svd(weight, covariance, ridge)
        else:
            U, s, V = thin_svd(weight, keep if energy is None else full)
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
        layer.dense_type = dense_type_of(linear)
        return layer

    @classmethod
    @torch.no_grad()
    def from_low_rank_factors(
        cls, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, orthonormal: bool = False
    ) -> SVDLinear:
        """The layer computing `up @ down` (+ bias) at rank `r`, from `down` [r, in] and `up` [out, r].

        Without `orthonormal`, the exported layout is inverted as saved (`U = up`, `s` = row norms of `down`); with
        it, a QR of each factor and an r x r SVD give orthonormal `U`, `V` (needed after LoRA merged into them).
        """
        d, u = down.detach().to(work_dtype(down)), up.detach().to(work_dtype(down))
        U, s, V = split_product(u, d.T, orthonormal)  # `down` carries the singular values
        layer = cls(d.shape[1], u.shape[0], s.shape[0], bias is not None, device=down.device, dtype=down.dtype)
        assign_((layer.U, U), (layer.s, s), (layer.V, V), (layer.bias, bias))
        return layer

    @classmethod
    def from_low_rank(cls, module: nn.Module, orthonormal: bool = True) -> SVDLinear:
        """From a `LowRankLinear` (ours, the remote code's, or one whose `down` / `up` peft's LoRA merged into)."""
        return cls.from_low_rank_factors(module.down.weight, module.up.weight, module.up.bias, orthonormal)

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

    # ---- FactoredLayer ----------------------------------------------------------------------------------------

    def spectrum(self) -> torch.Tensor:
        return whole(self.s).detach()[self.mask]

    @torch.no_grad()
    def keep_(self, rank: int) -> None:
        """Keep the `rank` largest live singular values (by |s|), masking the others."""
        live = torch.nonzero(self.mask).flatten()
        order = torch.argsort(whole(self.s).detach()[live].abs(), descending=True)
        new_mask = torch.zeros_like(self.mask)
        new_mask[live[order[:rank]]] = True
        self.mask.copy_(new_mask)

    def svd_form(self) -> SVDLinear:
        return self

    def to_dense(self) -> nn.Module:
        """The dense `nn.Linear` (or transformers `Conv1D`, if that is what was factored) of the live factors."""
        with torch.no_grad():
            return dense_module(self.composed_weight().detach(), self.bias, self.dense_type)

    @torch.no_grad()
    def export_tensors(self, name: str, dense: bool) -> dict[str, torch.Tensor]:
        """`{name}.down.weight = (V diag(s))^T`, `{name}.up.weight = U` (+ `up.bias`), or the dense `{name}.weight`
        (in `Conv1D` layout for a GPT-2 style layer); computed in float32+, stored in the parameters' dtype."""
        U, s, V = (t.detach().to(work_dtype(t)) for t in self.live_factors())
        if dense:
            weight = ((U * s) @ V.T).to(self.s.dtype)
            tensors = {f"{name}.weight": weight.T.contiguous() if self.dense_type is Conv1D else weight}
            prefix = f"{name}."
        else:
            down, up = (V * s).T.contiguous().to(self.s.dtype), U.contiguous().to(self.s.dtype)
            tensors, prefix = {f"{name}.down.weight": down, f"{name}.up.weight": up}, f"{name}.up."
        if self.bias is not None:
            tensors[prefix + "bias"] = self.bias.detach().clone()
        return tensors

    @torch.no_grad()
    def to_low_rank(self) -> LowRankLinear:
        """The exported form `up(down(x))` of the live factors as a `LowRankLinear` (LoRA can target `down`, `up`)."""
        U, s, V = (t.detach().to(work_dtype(t)) for t in self.live_factors())
        low_rank = LowRankLinear(self.in_features, self.out_features, s.shape[0], self.bias is not None)
        low_rank.to(device=self.s.device, dtype=self.s.dtype)
        low_rank.down.weight.copy_((V * s).T)
        low_rank.up.weight.copy_(U)
        if self.bias is not None:
            low_rank.up.bias.copy_(self.bias)
        return low_rank

    def configure_regularizers(self, settings: RegularizerSettings) -> bool:
        self.regularizer_terms.clear()
        self.orth_enabled, self.orth_probes, self.sparsity_kind = (
            settings.orth,
            settings.orth_probes,
            settings.sparsity,
        )
        return bool(self.orth_enabled or self.sparsity_kind)

    def pop_terms(self) -> dict[str, torch.Tensor]:
        """`orth_loss` (0 where off) and, with a sparsity kind, `sparsity_loss`, summed over the recordings."""
        terms, self.regularizer_terms = self.regularizer_terms, []
        if not terms:
            return {}
        summed = {"orth_loss": torch.stack([o for o, _ in terms]).sum()}
        if self.sparsity_kind:
            summed["sparsity_loss"] = torch.stack([s for _, s in terms]).sum()
        return summed

    def spectral_parameters(self) -> list[nn.Parameter]:
        return [self.s]

    def checkpoint_record(self) -> dict[str, Any]:
        return {**super().checkpoint_record(), "whitened": bool(getattr(self, "whitened", False))}

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], prefix: str, dense: nn.Module, record: dict[str, Any]
    ) -> SVDLinear:
        out_features, in_features = dense_weight(dense).shape
        dtype = state[f"{prefix}s"].dtype
        layer = cls(in_features, out_features, state[f"{prefix}s"].shape[0], f"{prefix}bias" in state, dtype=dtype)
        if f"{prefix}input_scale" in state:  # a data-aware layer: its buffer is filled by the load
            layer.input_scale = torch.empty(in_features, dtype=dtype)
        layer.whitened = bool(record.get("whitened", False))
        layer.dense_type = dense_type_of(dense)
        return layer

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


def svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    """The SVD-family layers of `model` (`SVDLinear`, `SVDConv2d`, Householder), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def plain_svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    """The layers of `model` that are exactly `SVDLinear` (no subclass), by module name."""
    return {n: m for n, m in model.named_modules() if type(m) is SVDLinear}


register_parameterization(
    Parameterization(
        "svd",
        FACTORABLE_TYPES,
        build=lambda linear, config, scale, covariance: SVDLinear.from_linear(
            linear, config.init_energy, config.init_max_rank, scale, covariance, config.whitening_ridge
        ),
        data_aware=True,
    )
)
