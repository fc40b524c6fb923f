"""Activation-aware SVD (ASVD, Yuan et al. 2023): factor `W diag(a)` with `a` from calibration activations.

The scaled weight's spectrum says how much each direction matters *for the inputs the layer actually sees*; the
factors are mapped back (`V <- diag(a)^-1 V`) so the layer still computes `W x`, and pruning to the budget then
uses the scaled spectrum.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_svd_compress import SVDConfig, svd_factorize_, svd_layers
from hf_svd_compress.core.matching import find_targets
from hf_svd_compress.layers.linalg import FACTORABLE_TYPES, dense_weight


def target_names(model: nn.Module, config: SVDConfig) -> list[str]:
    """The layers `svd_factorize_(model, config)` would factor, by the same matching rules."""
    targets = config.resolved_targets(getattr(model.config, "model_type", None))
    return find_targets(model, targets, config.exclude_modules, FACTORABLE_TYPES)


@torch.no_grad()
def asvd_factorize_(
    model: nn.Module, config: SVDConfig, scales: dict[str, torch.Tensor], alpha: float = 0.5
) -> nn.Module:
    """Factor the target layers as ASVD does: `W diag(a) = U S V'^T`, `a = scales^alpha`, then `V = diag(a)^-1 V'`.

    The result computes what the dense model did (up to float error); its `s` holds the scaled spectrum, so a
    following `prune_(model, budget=b)` applies the usual global energy threshold to the scaled spectra.
    """
    modules = dict(model.named_modules())
    weights = {n: dense_weight(modules[n]).detach().clone() for n in target_names(model, config)}
    svd_factorize_(model, config)
    for name, layer in svd_layers(model).items():
        a = scales[name].double().pow(alpha)
        a = a.clamp_min(a.max() * 1e-6)  # a channel never active would divide by zero
        U, s, Vh = torch.linalg.svd(weights[name].double() * a, full_matrices=False)
        V = Vh.T / a[:, None]
        for param, value in ((layer.U, U), (layer.s, s), (layer.V, V)):
            param.copy_(value.to(param.dtype))
    return model


@torch.no_grad()
def normalize_columns_(model: nn.Module) -> nn.Module:
    """Rescale each column of `V` to unit norm, moving the norm into `s` (same function).

    ASVD's `V = diag(a)^-1 V'` has columns of very different norms; with unit columns every method fine-tunes
    factors of the same scale under the same learning rate.
    """
    for layer in svd_layers(model).values():
        norms = layer.V.norm(dim=0).clamp_min(1e-12)
        layer.V.div_(norms)
        layer.s.mul_(norms)
    return model
