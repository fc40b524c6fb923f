"""`SVDConv2d`: an `nn.Conv2d` stored as the SVD of its flattened kernel, channel-wise or spatial-wise.

Yang et al. (CVPR-W 2020) factor a conv weight `[Cout, Cin, kh, kw]` in one of two matrix views:

- channel-wise, `[Cout, Cin*kh*kw]`: a kh x kw conv `Cin -> r` (kernel `(V diag(s))^T`) then a 1x1 conv `r -> Cout`
  (`U`);
- spatial-wise, `[Cin*kh, Cout*kw]` (the weight permuted to `[Cin, kh, Cout, kw]`): a kh x 1 conv `Cin -> r`
  (kernel `(U diag(s))^T`) then a 1 x kw conv `r -> Cout` (`V`), stride/padding/dilation split between them.

The matrix is what `SVDLinear` factors, so `SVDConv2d` subclasses it: pruning, regularizers, the trainer and export
rank logic see its `U`, `s`, `V`, `mask` and `in_features`/`out_features` (the matrix's columns/rows) unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_svd_compress.hub.templates.modeling_svd_compressed import FactoredWeight, LowRankConv2d, conv_stages
from hf_svd_compress.layers.linalg import assign_, energy_rank, split_product, thin_svd
from hf_svd_compress.layers.registry import Parameterization, register_parameterization
from hf_svd_compress.layers.svd import SVDLinear

__all__ = ["CONV_MODES", "GEOMETRY_KEYS", "SVDConv2d", "check_conv", "conv_tensor_shapes", "kernel_to_matrix"]

Padding = tuple[int, int] | str
# How an `nn.Conv2d` weight [Cout, Cin, kh, kw] is flattened to a matrix before its SVD (Yang et al.).
CONV_MODES = ("channel", "spatial")
# The keys of `SVDConv2d.geometry()`, stored per conv in the export's `svd_compression["convs"]`.
GEOMETRY_KEYS = ("mode", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")


def check_conv(conv: nn.Module, conv_mode: str, name: str = "the conv") -> None:
    """Raise if `conv` cannot be factored as `conv_mode` (nothing is changed).

    Args:
        conv (`nn.Module`): Should be an `nn.Conv2d`.
        conv_mode (`str`): `"channel"` or `"spatial"`.
        name (`str`): Module name for the messages.

    Raises:
        `TypeError` (not an `nn.Conv2d`) or `ValueError` naming the problem and the fix.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name} is a {type(conv).__name__}; SVDConv2d factors nn.Conv2d only.")
    fix = "exclude it with SVDConfig(exclude_modules=[...]) or leave it out of target_modules"
    if conv_mode not in CONV_MODES:
        raise ValueError(f"conv_mode={conv_mode!r} is not supported for {name}: use one of {CONV_MODES}.")
    if conv.groups != 1:
        raise ValueError(
            f"{name} is a grouped conv (groups={conv.groups}): its weight is block-diagonal, not one matrix to "
            f"factor; {fix}."
        )
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"{name} has padding_mode={conv.padding_mode!r}: only zero padding splits exactly into the two factored "
            f"convs; {fix}."
        )
    if isinstance(conv.padding, str) and conv.padding not in ("valid", "same"):
        raise ValueError(f"{name} has padding={conv.padding!r}: only 'valid', 'same' or integers split; {fix}.")


def conv_tensor_shapes(geometry: dict[str, Any], rank: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the exported tensors of a factored conv: `down`, `up` (factored) and `dense` (the conv's weight).

    Args:
        geometry (`dict`): `SVDConv2d.geometry()` (the `svd_compression["convs"]` entry).
        rank (`int`): The stored rank.
    """
    (kh, kw), cin, cout = geometry["kernel_size"], geometry["in_channels"], geometry["out_channels"]
    if geometry["mode"] == "channel":
        return {"down": (rank, cin, kh, kw), "up": (cout, rank, 1, 1), "dense": (cout, cin, kh, kw)}
    return {"down": (rank, cin, kh, 1), "up": (cout, rank, 1, kw), "dense": (cout, cin, kh, kw)}


class SVDConv2d(SVDLinear):
    """An `nn.Conv2d` parameterized by the SVD of its flattened kernel (channel-wise or spatial-wise, see the module).

    Args:
        in_channels (`int`), out_channels (`int`): The conv's channels.
        kernel_size (`int` or pair): The conv's kernel `(kh, kw)`.
        rank (`int`): Number of singular triplets stored.
        conv_mode (`str`, defaults to `"channel"`): `"channel"` (matrix `[Cout, Cin*kh*kw]`) or `"spatial"`
            (matrix `[Cin*kh, Cout*kw]`).
        stride, dilation (`int` or pair), padding (`int`, pair, `"valid"` or `"same"`): The conv's.
        bias (`bool`, defaults to `True`): Whether the conv has a bias (`Cout`, added after the second conv).

    `U` is `[rows, r]`, `V` is `[cols, r]` of the matrix view; `in_features`/`out_features` are its columns/rows, so
    parameter counts (`r (m + n)` factored, `m n` dense) equal the conv's. The `weight` property is the dense kernel.
    """

    dense_type = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        conv_mode: str = "channel",
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if conv_mode not in CONV_MODES:
            raise ValueError(f"SVDConv2d(conv_mode={conv_mode!r}) is not supported: use one of {CONV_MODES}.")
        kh, kw = _pair(kernel_size)
        rows, cols = (
            (out_channels, in_channels * kh * kw) if conv_mode == "channel" else (in_channels * kh, out_channels * kw)
        )
        super().__init__(cols, rows, rank, bias=False, device=device, dtype=dtype)
        # The bias has Cout entries, which in spatial mode is not the matrix's row count.
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.conv_mode, self.in_channels, self.out_channels = conv_mode, in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = (kh, kw), _pair(stride), _pair(dilation)
        self.padding = _resolve_padding(padding, self.kernel_size, self.dilation)
        self._down_kwargs, self._up_kwargs = conv_stages(
            conv_mode, self.kernel_size, self.stride, self.padding, self.dilation
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, conv_mode={self.conv_mode!r}, "
            f"rank={self.rank}/{self.full_rank}, bias={self.bias is not None}"
        )

    # ---- construction and conversion --------------------------------------------------------------------------

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, conv_mode: str = "channel", energy: float | None = None, max_rank: int | None = None
    ) -> SVDConv2d:
        """Factor a dense `nn.Conv2d` by the SVD of its flattened kernel, computed in float32 (float64 stays).

        Args:
            conv (`nn.Conv2d`): The conv to factor (`groups=1`, zero padding).
            conv_mode (`str`, defaults to `"channel"`): `"channel"` or `"spatial"`.
            energy (`float`, *optional*): Keep the fewest singular values holding this fraction of sum(s^2).
            max_rank (`int`, *optional*): Keep at most this many singular values.

        Returns:
            `SVDConv2d` on the weight's device and dtype, computing the same function (up to float error) when no
            truncation is asked for.

        Raises:
            `TypeError` / `ValueError` (see `check_conv`) before anything is computed.
        """
        check_conv(conv, conv_mode)
        matrix = kernel_to_matrix(conv.weight, conv_mode)
        full = min(matrix.shape)
        keep = min(max_rank or full, full)
        U, s, V = thin_svd(matrix, keep if energy is None else full)
        if energy is not None:
            keep = min(keep, energy_rank(s, energy))
        geometry = _conv_geometry(conv, conv_mode)
        layer = cls.from_geometry(geometry, keep, conv.bias is not None, conv.weight.device, conv.weight.dtype)
        with torch.no_grad():
            for param, value in ((layer.U, U[:, :keep]), (layer.s, s[:keep]), (layer.V, V[:, :keep])):
                param.copy_(value)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, energy: float | None = None, max_rank: int | None = None) -> SVDConv2d:
        raise TypeError("SVDConv2d factors convolutions: use SVDConv2d.from_conv(conv, conv_mode), or SVDLinear.")

    @classmethod
    def from_geometry(
        cls,
        geometry: dict[str, Any],
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SVDConv2d:
        """An uninitialized layer of `rank` from `geometry()` (the exported `svd_compression["convs"]` entry)."""
        keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
        kwargs = {k: geometry[k] for k in keys}
        return cls(rank=rank, conv_mode=geometry["mode"], bias=bias, device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_kernels(
        cls,
        down: torch.Tensor,
        up: torch.Tensor,
        bias: torch.Tensor | None,
        geometry: dict[str, Any],
        orthonormal: bool = False,
    ) -> SVDConv2d:
        """The layer computing `up(down(x))` (the exported layout, see `factored_kernels`) at rank `r`.

        Args:
            down (`torch.Tensor`), up (`torch.Tensor`): The two conv kernels; `down` carries the singular values.
            bias (`torch.Tensor`, *optional*): The bias of `up`.
            geometry (`dict`): `geometry()` of the layer.
            orthonormal (`bool`, defaults to `False`): Re-orthonormalize `U`, `V` (QR of each factor, then an r x r
                SVD), needed when the kernels were changed (e.g. LoRA merged); without it `s` is read as the norms of
                `down`'s filters, inverting `factored_kernels` exactly.
        """
        layer = cls.from_geometry(geometry, down.shape[0], bias is not None, down.device, down.dtype)
        work = torch.float64 if down.dtype == torch.float64 else torch.float32
        plain, carrier = layer._kernel_factors(down.detach().to(work), up.detach().to(work))
        P, s, Q = split_product(plain, carrier, orthonormal)
        U, V = (P, Q) if layer.conv_mode == "channel" else (Q, P)
        assign_((layer.U, U), (layer.s, s), (layer.V, V), (layer.bias, bias))
        return layer

    @classmethod
    def from_low_rank(cls, module: nn.Module, orthonormal: bool = True) -> SVDConv2d:
        """From a `LowRankConv2d` (ours, the remote code's, or one whose `down`/`up` peft's LoRA merged into)."""
        geometry = {
            k: getattr(module, k) for k in ("in_channels", "out_channels", "kernel_size", "stride", "dilation")
        }
        geometry.update(mode=module.conv_mode, padding=module.padding)
        return cls.from_kernels(module.down.weight, module.up.weight, module.up.bias, geometry, orthonormal)

    def geometry(self) -> dict[str, Any]:
        """The conv geometry, JSON-ready: `mode`, channels, `kernel_size`, `stride`, `padding`, `dilation`."""
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {
            "mode": self.conv_mode,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": padding,
            "dilation": list(self.dilation),
        }

    def to_conv(self) -> nn.Conv2d:
        """Merge back into a dense `nn.Conv2d` computing the same function (masked values dropped)."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            device=self.U.device,
            dtype=self.U.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.merged_kernel())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def to_linear(self) -> nn.Linear:
        raise TypeError("SVDConv2d is a convolution: merge it with to_conv() (or to_dense()), not to_linear().")

    def to_dense(self) -> nn.Conv2d:
        return self.to_conv()

    def export_tensors(self, name: str, dense: bool) -> dict[str, torch.Tensor]:
        """Two conv kernels `{name}.down.weight`, `{name}.up.weight` (+ `up.bias`), or the dense `{name}.weight`."""
        if dense:
            tensors, prefix = {f"{name}.weight": self.merged_kernel()}, f"{name}."
        else:
            down, up = self.factored_kernels()
            tensors, prefix = {f"{name}.down.weight": down, f"{name}.up.weight": up}, f"{name}.up."
        if self.bias is not None:
            tensors[prefix + "bias"] = self.bias.detach().clone()
        return tensors

    def export_metadata(self, name: str) -> dict[str, dict[str, Any]]:
        """The conv's geometry, under `svd_compression["convs"]` (which files without convs lack)."""
        return {"convs": {name: self.geometry()}}

    def checkpoint_record(self) -> dict[str, Any]:
        return {**super().checkpoint_record(), "geometry": self.geometry()}

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], prefix: str, dense: nn.Module, record: dict[str, Any]
    ) -> SVDConv2d:
        rank, dtype = state[f"{prefix}s"].shape[0], state[f"{prefix}s"].dtype
        return cls.from_geometry(record["geometry"], rank, f"{prefix}bias" in state, dtype=dtype)

    @torch.no_grad()
    def to_low_rank(self) -> LowRankConv2d:
        """The exported form `up(down(x))` of the live factors, as a `LowRankConv2d` (for peft's LoRA on conv)."""
        down, up = self.factored_kernels()
        module = LowRankConv2d.from_geometry(self.geometry(), down.shape[0], self.bias is not None)
        module.to(device=self.U.device, dtype=self.U.dtype)
        module.down.weight.copy_(down)
        module.up.weight.copy_(up)
        if self.bias is not None:
            module.up.bias.copy_(self.bias)
        return module

    # ---- kernels ----------------------------------------------------------------------------------------------

    def matrix_to_kernel(self, matrix: torch.Tensor) -> torch.Tensor:
        """The kernel `[Cout, Cin, kh, kw]` of a matrix view (inverse of `kernel_to_matrix`)."""
        (kh, kw), cin, cout = self.kernel_size, self.in_channels, self.out_channels
        if self.conv_mode == "channel":
            return matrix.reshape(cout, cin, kh, kw)
        return matrix.reshape(cin, kh, cout, kw).permute(2, 0, 1, 3)

    def composed_kernel(self) -> torch.Tensor:
        """The dense kernel `[Cout, Cin, kh, kw]` of `U diag(s * mask) V^T`."""
        return self.matrix_to_kernel(self.composed_weight())

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel as a `FactoredWeight` (`composed_kernel()` when used); architectures read its dtype."""
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        return FactoredWeight(self.composed_kernel, shape, self.s)

    def kernels(self, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(down, up)` conv kernels of factors `U`, `s`, `V` (`s` folded into `down`), see `conv_tensor_shapes`."""
        r, (kh, kw), cin, cout = s.shape[0], self.kernel_size, self.in_channels, self.out_channels
        if self.conv_mode == "channel":
            return (V * s).T.reshape(r, cin, kh, kw), U.reshape(cout, r, 1, 1)
        return (U * s).T.reshape(r, cin, kh, 1), V.reshape(cout, kw, r).permute(0, 2, 1).unsqueeze(2)

    @torch.no_grad()
    def factored_kernels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(down, up)` of the live factors (largest singular values first), as exported; computed in float32."""
        down, up = self.kernels(*self._work_factors())
        return down.to(self.U.dtype).contiguous(), up.to(self.U.dtype).contiguous()

    @torch.no_grad()
    def merged_kernel(self) -> torch.Tensor:
        """The dense kernel of the live factors, detached and computed in float32 (float64 stays)."""
        U, s, V = self._work_factors()
        return self.matrix_to_kernel((U * s) @ V.T).to(self.U.dtype).contiguous()

    def _work_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        work = torch.float64 if self.U.dtype == torch.float64 else torch.float32
        return tuple(t.detach().to(work) for t in self.live_factors())

    def _kernel_factors(self, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of `kernels`: `(plain, carrier)`, the `up`-side and `down`-side factor matrices, each [*, r]."""
        r = down.shape[0]
        if self.conv_mode == "channel":
            return up.reshape(self.out_channels, r), down.reshape(r, -1).T
        return up.squeeze(2).permute(0, 2, 1).reshape(-1, r), down.reshape(r, -1).T

    # ---- forward ----------------------------------------------------------------------------------------------

    def use_composed_conv(self, input_shape: tuple[int, ...]) -> bool:
        """Whether composing the dense kernel and running one conv takes fewer multiplies than the two thin convs.

        Composed: `m n r` (build the kernel) + `P m n` for `P` output positions; channel-wise: `P r (m + n)`;
        spatial-wise: `P1 r m` for the kh x 1 conv at `P1` positions (output height, input width) + `P r n`.
        """
        batch = math.prod(input_shape[:-3])
        (h_in, w_in), (kh, kw) = input_shape[-2:], self.kernel_size
        h_out = _out_size(h_in, kh, self.stride[0], self._pad_total(0), self.dilation[0])
        w_out = _out_size(w_in, kw, self.stride[1], self._pad_total(1), self.dilation[1])
        m, n, r = self.out_features, self.in_features, self.full_rank
        positions = batch * h_out * w_out
        composed = m * n * r + positions * m * n
        if self.conv_mode == "channel":
            return composed <= positions * r * (m + n)
        return composed <= batch * h_out * w_in * r * m + positions * r * n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and (self.orth_enabled or self.sparsity_kind):
            self.record_regularizers()
        s = self._live_s()
        if self.use_composed_conv(tuple(x.shape)):
            kernel = self.matrix_to_kernel((self.U * s) @ self.V.T)
            return F.conv2d(x, kernel, self.bias, self.stride, self.padding, self.dilation)
        down, up = self.kernels(self.U, s, self.V)
        hidden = F.conv2d(x, down, None, **_functional(self._down_kwargs))
        return F.conv2d(hidden, up, self.bias, **_functional(self._up_kwargs))

    def _pad_total(self, dim: int) -> int:
        if self.padding == "same":
            return self.dilation[dim] * (self.kernel_size[dim] - 1)
        return 2 * self.padding[dim]


def kernel_to_matrix(weight: torch.Tensor, conv_mode: str) -> torch.Tensor:
    """The matrix a conv kernel `[Cout, Cin, kh, kw]` is factored as: `[Cout, Cin*kh*kw]` (channel-wise) or
    `[Cin*kh, Cout*kw]` (spatial-wise)."""
    if conv_mode == "channel":
        return weight.flatten(1)
    return weight.permute(1, 2, 0, 3).flatten(2).flatten(0, 1)


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _resolve_padding(
    padding: int | tuple[int, int] | str, kernel: tuple[int, int], dilation: tuple[int, int]
) -> Padding:
    """Integer padding where it is symmetric; `"same"` stays a string only when PyTorch pads it asymmetrically."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return "same" if any(t % 2 for t in totals) else (totals[0] // 2, totals[1] // 2)
    if isinstance(padding, str):
        raise ValueError(f"padding={padding!r} is not supported: use integers, 'valid' or 'same'.")
    return _pair(padding)


def _conv_geometry(conv: nn.Conv2d, conv_mode: str) -> dict[str, Any]:
    return {
        "mode": conv_mode,
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
    }


def _functional(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`F.conv2d` keywords from `conv_stages`' `nn.Conv2d` keywords (the kernel size comes from the weight)."""
    return {k: v for k, v in kwargs.items() if k != "kernel_size"}


def _out_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    return max(0, (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1)


register_parameterization(
    Parameterization(
        "svd",
        (nn.Conv2d,),
        build=lambda conv, config, scale, covariance: SVDConv2d.from_conv(
            conv, config.conv_mode, config.init_energy, config.init_max_rank
        ),
        check=lambda conv, config, name: check_conv(conv, config.conv_mode, name),
        fields=("conv_mode",),
    )
)
