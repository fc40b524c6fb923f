"""`factored_layer`: the factored replacement of one dense layer, in the parameterization the config asks for."""

from __future__ import annotations

import torch
from torch import nn

from .config import SVDConfig
from .conv import SVDConv2d, check_conv
from .cur import cur_layer
from .householder import HOUSEHOLDER_PARAMETERIZATIONS, HouseholderSVDLinear
from .layers import SVDLinear


def factored_layer(
    dense: nn.Module,
    config: SVDConfig,
    input_scale: torch.Tensor | None = None,
    covariance: torch.Tensor | None = None,
) -> nn.Module:
    """The factored layer that replaces `dense` (an `nn.Linear`, transformers `Conv1D` or `nn.Conv2d`) under `config`.

    Args:
        dense (`nn.Module`): The layer to factor.
        config (`SVDConfig`): Its `parameterization`, `conv_mode`, `init_energy` and `init_max_rank` decide the
            result.
        input_scale (`torch.Tensor`, *optional*): The layer's data-aware scales (`SVDLinear.from_linear`); "svd" and
            linear layers only (`svd_factorize_` checks this first).
        covariance (`torch.Tensor`, *optional*): The layer's input covariance, for whitened factors (same
            restrictions).

    Returns:
        A module computing the same function as `dense` (up to float error) when no truncation is asked for.
    """
    kind = config.parameterization
    if isinstance(dense, nn.Conv2d):
        check_conv(dense, config.conv_mode, kind)  # only "svd" factors convolutions
        return SVDConv2d.from_conv(dense, config.conv_mode, config.init_energy, config.init_max_rank)
    if kind == "svd":
        return SVDLinear.from_linear(
            dense, config.init_energy, config.init_max_rank, input_scale, covariance, config.whitening_ridge
        )
    if kind == "cur":
        return cur_layer(dense, config)
    if kind in HOUSEHOLDER_PARAMETERIZATIONS:  # an nn.Linear or Conv1D (dense_weight refuses anything else)
        return HouseholderSVDLinear.from_linear(
            dense, config.init_energy, config.init_max_rank, parameterization=kind, tt_max_rank=config.tt_max_rank
        )
    raise NotImplementedError(f"SVDConfig.parameterization={kind!r} is not available yet; use 'svd'.")
