"""`svd_factorize_`: swap the target layers of a model for factored ones (`FactoredLayer`), in place; the config
they record; `to_householder_`, which swaps factored layers for Householder ones."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from hf_svd_compress.config import CONFIG_KEY, METADATA_KEY, SVDConfig
from hf_svd_compress.core.calibration import CalibrationData, input_covariances
from hf_svd_compress.core.matching import NoTargetModulesError, find_targets
from hf_svd_compress.layers.base import FactoredLayer, factored_modules
from hf_svd_compress.layers.householder import HOUSEHOLDER_PARAMETERIZATIONS, HouseholderSVDLinear
from hf_svd_compress.layers.linalg import FACTORABLE_TYPES, dense_weight
from hf_svd_compress.layers.registry import check_factorable, data_aware_names, factored_layer, lookup
from hf_svd_compress.layers.svd import plain_svd_layers


def target_names(
    model: nn.Module, config: SVDConfig, filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> list[str]:
    """The modules `svd_factorize_(model, config, filter_fn)` would factor, in model order, without changing it.

    Raises:
        `NoTargetModulesError`: `config.target_modules` (minus `exclude_modules`) matches nothing, or `filter_fn`
            rejects every match.
    """
    targets = config.resolved_targets(getattr(getattr(model, "config", None), "model_type", None))
    layer_types = (*FACTORABLE_TYPES, FactoredLayer)
    names = find_targets(model, targets, config.exclude_modules, layer_types)
    if filter_fn is None:
        return names
    modules = dict(model.named_modules())
    kept = [n for n in names if filter_fn(modules[n], n)]
    if not kept:
        raise NoTargetModulesError(
            f"filter_fn rejected all {len(names)} modules matched by target_modules={targets!r} (e.g. "
            f"{names[:3]}), so nothing would be factored: check filter_fn, or drop it."
        )
    return kept


def svd_factorize_(
    model: nn.Module,
    config: SVDConfig | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    input_scales: dict[str, torch.Tensor] | None = None,
    calibration: CalibrationData | dict[str, torch.Tensor] | None = None,
    max_calibration_bytes: int | None = None,
) -> nn.Module:
    """Replace the target layers of `model` by factored layers of `config.parameterization` (`SVDLinear`), in place.

    An `nn.Conv2d` is factored too (as an `SVDConv2d`, in `config.conv_mode`) when `target_modules` names it;
    `"all-linear"` selects linear layers only.

    Args:
        model (`nn.Module`): Usually a `PreTrainedModel`; any module works.
        config (`SVDConfig`, *optional*): What to factor; defaults to `SVDConfig()` (per-architecture targets).
        filter_fn (`Callable[[nn.Module, str], bool]`, *optional*): Extra filter on `(module, name)`, as in
            torchao's `quantize_`.
        input_scales (`dict[str, torch.Tensor]`, *optional*): A data-aware start: per-input-channel scales of every
            target layer, from `activation_scales(model, dataset, config)`. Each layer is factored in the basis of
            ASVD (`W diag(a) = U diag(s) V^T`, `a` kept as the layer's `input_scale` buffer), so the sparsity term
            and pruning rank directions by what they contribute for the inputs the layer sees; `U` and `V` are
            orthonormal. The config must have `parameterization="svd"`, no `init_energy` / `init_max_rank`, and no
            conv targets.
        calibration (`CalibrationData` or `dict[str, torch.Tensor]`, *optional*): A whitened data-aware start
            (SVD-LLM / DRONE, `SVDLinear.from_linear(covariance=)`): each layer's `s_i^2` is then the mean squared
            output error of dropping triplet `i` on the calibration inputs, so pruning the smallest `s` (and the
            sparsity term on `s`) act on what the task sees. Either the input covariances of every target
            (`input_covariances(model, data, config)`) or the `CalibrationData` to compute them from, streamed in
            chunks of at most `max_calibration_bytes` of covariances (one calibration pass per chunk). Same
            restrictions as `input_scales`, and not combined with it.
        max_calibration_bytes (`int`, *optional*): With `CalibrationData`: the float64 covariances held at once;
            default a quarter of the model's parameter bytes (at least one layer's).

    Returns:
        The same `model`, whose outputs equal the dense model's up to float error. Layers already factored are
        left alone, so calling it twice is safe. `model.svd_config` holds the config (the trainer reads it).

    Raises:
        `NoTargetModulesError`: nothing matched. `TypeError`: a matched module is not a linear layer or an
        `nn.Conv2d`. `ValueError`: a matched conv cannot be factored (grouped, non-zero `padding_mode`, or a
        `parameterization` other than "svd"), `input_scales` or `calibration` do not fit (see above), or the model
        does not accept the calibration batches. All are raised before the model is changed.
    """
    config = config or SVDConfig()
    targets = config.resolved_targets(getattr(getattr(model, "config", None), "model_type", None))
    names = target_names(model, config, filter_fn)
    modules = dict(model.named_modules())
    # nn.Conv2d is factored only when named: "all-linear" (in find_targets) stays linear layers only.
    accepted = (*FACTORABLE_TYPES, FactoredLayer, nn.Conv2d)
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not isinstance(modules[n], accepted)]
    if wrong:
        raise TypeError(
            f"target_modules={targets!r} matched modules that are not nn.Linear or nn.Conv2d: {wrong[:5]}. Only "
            "linear layers and 2D convolutions can be factored: target their linear sublayers by name (e.g. "
            "'attention.self.query'), a conv by name (e.g. 'patch_embeddings.projection') or use 'all-linear'."
        )
    for name in names:  # refuse a layer the parameterization cannot factor before any layer is swapped
        if not isinstance(modules[name], FactoredLayer):
            check_factorable(modules[name], config, name)
    if input_scales is not None and calibration is not None:
        raise ValueError("Give input_scales (ASVD) or calibration (whitened factors), not both.")
    if input_scales is not None:
        check_input_scales(modules, names, config, input_scales)
    if calibration is not None:
        check_data_aware(modules, names, config, "calibration")
    if isinstance(calibration, dict):
        check_covariances(modules, names, calibration)
    # Drop our references to the dense layers: each one must be freed as soon as it is swapped out, before the
    # next layer's SVD, so factoring never holds the dense and the factored model at once.
    del modules
    if isinstance(calibration, CalibrationData):  # its first pass (the first chunk) fails before any change
        _factor_streamed(model, names, config, calibration, max_calibration_bytes)
        calibration = None
    for name in names:
        scale = None if input_scales is None else input_scales.get(name)
        _factor_one(model, name, config, scale, None if calibration is None else calibration.get(name))
    attach_svd_config(model, config)
    return model


def check_data_aware(modules: dict[str, nn.Module], names: list[str], config: SVDConfig, what: str) -> None:
    """Refuse a data-aware start (`what`: the argument) for a config or targets it does not apply to."""
    dense = [n for n in names if not isinstance(modules[n], FactoredLayer)]
    convs = [n for n in dense if isinstance(modules[n], nn.Conv2d)]
    linear = [n for n in dense if n not in convs]
    fixes = {
        "parameterization": (
            any(not lookup(modules[n], config.parameterization, n).data_aware for n in linear),
            f'parameterization="{data_aware_names()[0]}"',
        ),
        "init_energy / init_max_rank": (
            config.init_energy is not None or config.init_max_rank is not None,
            "no init_energy / init_max_rank: the data-aware start is full rank (prune after training)",
        ),
    }
    wrong = [f"{field} (use {fix})" for field, (bad, fix) in fixes.items() if bad]
    if wrong:
        raise ValueError(f"{what}: {'; '.join(wrong)}.")
    if convs:
        raise ValueError(f"{what}: data-aware factors are for linear layers; leave out the convs {convs[:3]}.")


def check_covariances(modules: dict[str, nn.Module], names: list[str], covariances: dict[str, torch.Tensor]) -> None:
    """Refuse input covariances that miss a target or do not fit its input width (the model changed since)."""
    dense = [n for n in names if not isinstance(modules[n], FactoredLayer)]
    missing = [n for n in dense if n not in covariances]
    if missing:
        raise ValueError(
            f"calibration has no input covariance for {missing[:3]} ({len(missing)} layers): the targets changed "
            "since calibration; compute them again with input_covariances(model, data, config) for this model and "
            "config."
        )
    for name in dense:
        columns, c = dense_weight(modules[name]).shape[1], covariances[name]
        if tuple(c.shape) != (columns, columns) or not bool(torch.isfinite(c).all()):
            raise ValueError(
                f"calibration[{name!r}]: expected a finite {columns} x {columns} input covariance, got shape "
                f"{tuple(c.shape)}: the model changed since calibration; compute them again with input_covariances."
            )


def check_input_scales(
    modules: dict[str, nn.Module], names: list[str], config: SVDConfig, input_scales: dict[str, torch.Tensor]
) -> None:
    """Refuse data-aware scales that do not fit the config or the dense layers they are for."""
    check_data_aware(modules, names, config, "input_scales")
    dense = [n for n in names if not isinstance(modules[n], FactoredLayer)]
    missing = [n for n in dense if n not in input_scales]
    if missing:
        raise ValueError(
            f"input_scales has no scales for {missing[:3]} ({len(missing)} layers): compute them with "
            "activation_scales(model, dataset, config) for the same model and config."
        )
    for name in dense:
        scale, columns = input_scales[name], dense_weight(modules[name]).shape[1]
        fits = scale.shape == (columns,) and bool(torch.isfinite(scale).all()) and bool((scale >= 0).all())
        if not fits or not float(scale.max()) > 0:
            raise ValueError(
                f"input_scales[{name!r}]: expected {columns} finite non-negative values (one per input channel), not "
                f"all zero; got shape {tuple(scale.shape)}, min {float(scale.min()):g}, max {float(scale.max()):g}."
            )


def _factor_streamed(
    model: nn.Module, names: list[str], config: SVDConfig, data: CalibrationData, max_bytes: int | None
) -> None:
    """Whitened factoring in chunks of layers whose covariances fit `max_bytes`: one calibration pass per chunk.

    A factored layer computes what its dense layer did, so later chunks see the same inputs.
    """
    widths = {n: dense_weight(model.get_submodule(n)).shape[1] for n in names if _is_dense(model, n)}
    if max_bytes is None:
        max_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) // 4
    chunks: list[list[str]] = [[]]
    for name, width in widths.items():
        held = sum(8 * widths[n] ** 2 for n in chunks[-1])
        if chunks[-1] and held + 8 * width**2 > max_bytes:
            chunks.append([])
        chunks[-1].append(name)
    for chunk in chunks:
        if chunk:
            covariances = input_covariances(model, data, config, names=chunk)
            for name in chunk:
                _factor_one(model, name, config, covariance=covariances.pop(name))


def _is_dense(model: nn.Module, name: str) -> bool:
    return not isinstance(model.get_submodule(name), FactoredLayer)


def _factor_one(
    model: nn.Module,
    name: str,
    config: SVDConfig,
    input_scale: torch.Tensor | None = None,
    covariance: torch.Tensor | None = None,
) -> None:
    """Swap one layer for its SVD; the dense layer is unreferenced (and freed) when this returns."""
    if _is_dense(model, name):
        dense = model.get_submodule(name)
        # Swapped at once: the dense layer is freed before the next one's SVD.
        model.set_submodule(name, factored_layer(dense, config, input_scale, covariance))


def record_on_config(model: nn.Module, config: SVDConfig) -> None:
    """Store the config and each factored layer's `checkpoint_record` on `model.config` (`load_factored_checkpoint`
    rebuilds the model from them); `ranks` (stored ranks), `whitened` and `convs` keep the earlier layout."""
    hf_config = getattr(model, "config", None)
    if hf_config is None:
        return
    layers = factored_modules(model)
    records = {name: layer.checkpoint_record() for name, layer in layers.items()}
    stored = {"config": config.to_dict(), "ranks": {n: layer.full_rank for n, layer in layers.items()}}
    whitened = sorted(n for n, record in records.items() if record.get("whitened"))
    if whitened:  # their orthogonality term covers U alone
        stored["whitened"] = whitened
    convs = {n: record["geometry"] for n, record in records.items() if "geometry" in record}
    if convs:
        stored["convs"] = convs
    stored["layers"] = records
    setattr(hf_config, CONFIG_KEY, stored)


def stored_svd_config(model: nn.Module) -> SVDConfig:
    """The model's `SVDConfig`: attached, in the config (factored or exported), else one targeting its layers."""
    if getattr(model, "svd_config", None) is not None:
        return model.svd_config
    config = getattr(model, "config", None)
    stored = (getattr(config, CONFIG_KEY, None) or {}).get("config") or (
        getattr(config, METADATA_KEY, None) or {}
    ).get("svd_config")
    return SVDConfig.from_dict(stored) if stored else SVDConfig(sorted(factored_modules(model)))


def attach_svd_config(model: nn.Module, config: SVDConfig) -> None:
    """`model.svd_config = config`, also recorded on `model.config` (`record_on_config`)."""
    model.svd_config = config
    record_on_config(model, config)


@torch.no_grad()
def to_householder_(
    model: nn.Module, parameterization: str = "householder", tt_max_rank: int | None = None
) -> nn.Module:
    """Swap every plain `SVDLinear` of `model` for a `HouseholderSVDLinear` computing the same function, in place.

    For a model from `load_compressed(..., trainable=True)` (whose layers are plain `SVDLinear`s, as the export
    stores plain low-rank factors) or one trained with the regularized SVD. Only the live singular values are kept;
    U and V are re-orthonormalized first (`HouseholderSVDLinear.from_svd_layer`), so the conversion is exact even
    where they had drifted. `model.svd_config` (and the `svd_training` entry of `model.config`) record the new
    parameterization.

    Args:
        model (`nn.Module`): A model with `SVDLinear` layers (`SVDConv2d` and Householder layers are left alone).
        parameterization (`str`, defaults to `"householder"`): `"householder"` (SVDP) or `"sttp"`.
        tt_max_rank (`int`, *optional*): STTP only: cap on the TT-ranks (then no longer exact).

    Returns:
        The same `model`.
    """
    if parameterization not in HOUSEHOLDER_PARAMETERIZATIONS:
        raise ValueError(
            f"to_householder_(parameterization={parameterization!r}): use one of {HOUSEHOLDER_PARAMETERIZATIONS}."
        )
    layers = plain_svd_layers(model)
    if not layers:
        raise ValueError("to_householder_ found no plain SVDLinear layer: load or factor the model first.")
    # Validates parameterization and tt_max_rank before any layer is swapped.
    config = dataclasses.replace(stored_svd_config(model), parameterization=parameterization, tt_max_rank=tt_max_rank)
    for name, layer in layers.items():
        model.set_submodule(name, HouseholderSVDLinear.from_svd_layer(layer, parameterization, tt_max_rank))
    attach_svd_config(model, config)
    return model
