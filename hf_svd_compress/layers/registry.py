"""The registry of parameterizations: which `FactoredLayer` replaces a dense layer under `SVDConfig.parameterization`.

Each parameterization module registers itself when it is imported (`layers/__init__.py` imports the built-in ones),
as peft's `register_peft_method` does: `register_parameterization(Parameterization(name, dense_types, build))`;
`factored_layer` looks up the entry for the config's name and the dense layer's type; nothing else dispatches on
names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from hf_svd_compress.config import SVDConfig
    from hf_svd_compress.layers.base import FactoredLayer

# build(dense, config, input_scale, covariance) -> the factored layer.
Builder = Callable[[nn.Module, "SVDConfig", "torch.Tensor | None", "torch.Tensor | None"], "FactoredLayer"]
# check(dense, config, module_name): raise, naming the problem and the fix, before any layer is swapped.
Check = Callable[[nn.Module, "SVDConfig", str], None]


@dataclass(frozen=True)
class Parameterization:
    """One registered way to factor one kind of dense layer.

    Args:
        name (`str`): The `SVDConfig.parameterization` value.
        dense_types (`tuple[type, ...]`): The dense layer types it factors (`nn.Linear`, `Conv1D`, `nn.Conv2d`).
        build (`Builder`): Makes the factored layer.
        check (`Check`, *optional*): Refuses a dense layer it cannot factor, before anything changes.
        data_aware (`bool`): Whether `build` accepts input scales and covariances (data-aware starts).
        fields (`tuple[str, ...]`): `SVDConfig` fields that apply to this parameterization only.
    """

    name: str
    dense_types: tuple[type, ...]
    build: Builder
    check: Check | None = None
    data_aware: bool = False
    fields: tuple[str, ...] = ()


_REGISTRY: dict[str, list[Parameterization]] = {}


def register_parameterization(entry: Parameterization) -> Parameterization:
    """Add `entry`; a name may have one entry per dense layer type (e.g. "svd" for linear layers and for convs)."""
    entries = _REGISTRY.setdefault(entry.name, [])
    clash = [e for e in entries if set(e.dense_types) & set(entry.dense_types)]
    if clash:
        raise ValueError(f"Parameterization {entry.name!r} is already registered for {clash[0].dense_types}.")
    entries.append(entry)
    return entry


def unregister_parameterization(name: str) -> None:
    """Remove every entry of `name` (for plugins and tests that register one for a while)."""
    _REGISTRY.pop(name, None)


def parameterization_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def data_aware_names() -> tuple[str, ...]:
    """The names with a data-aware entry (input scales, covariances)."""
    return tuple(name for name, entries in _REGISTRY.items() if any(e.data_aware for e in entries))


def method_fields() -> dict[str, tuple[str, ...]]:
    """`{SVDConfig field: the parameterizations it applies to}` for the fields one method owns."""
    owners: dict[str, tuple[str, ...]] = {}
    for name, entries in _REGISTRY.items():
        for field in {f for e in entries for f in e.fields}:
            owners[field] = (*owners.get(field, ()), name)
    return owners


def lookup(dense: nn.Module, name: str, module_name: str = "the layer") -> Parameterization:
    """The entry of `name` that factors `dense`'s type; raises `ValueError` naming what can factor it."""
    for entry in _REGISTRY.get(name, []):
        if isinstance(dense, entry.dense_types):
            return entry
    able = [n for n, entries in _REGISTRY.items() if any(isinstance(dense, e.dense_types) for e in entries)]
    kind = "convolutions" if isinstance(dense, nn.Conv2d) else f"{type(dense).__name__} layers"
    only = " and ".join(repr(n) for n in able) or "no parameterization"
    fix = f"use parameterization={able[0]!r} or " if able else ""
    raise ValueError(
        f"SVDConfig.parameterization={name!r} cannot factor {module_name} (a {type(dense).__name__}): only {only} "
        f"{'factors' if len(able) == 1 else 'factor'} {kind}; {fix}exclude it with SVDConfig(exclude_modules=[...]) "
        "or leave it out of target_modules."
    )


def check_factorable(dense: nn.Module, config: SVDConfig, module_name: str) -> None:
    """Raise if `config` cannot factor `dense` (nothing is changed)."""
    entry = lookup(dense, config.parameterization, module_name)
    if entry.check is not None:
        entry.check(dense, config, module_name)


def factored_layer(
    dense: nn.Module,
    config: SVDConfig,
    input_scale: torch.Tensor | None = None,
    covariance: torch.Tensor | None = None,
) -> FactoredLayer:
    """The factored layer that replaces `dense` (an `nn.Linear`, transformers `Conv1D` or `nn.Conv2d`) under `config`.

    Args:
        dense (`nn.Module`): The layer to factor.
        config (`SVDConfig`): Its `parameterization` picks the registry entry; the entry reads the fields it uses.
        input_scale (`torch.Tensor`, *optional*): The layer's data-aware scales (`SVDLinear.from_linear`); only for
            entries with `data_aware` (`svd_factorize_` checks this first).
        covariance (`torch.Tensor`, *optional*): The layer's input covariance, for whitened factors (same).

    Returns:
        A module computing the same function as `dense` (up to float error) when no truncation is asked for.
    """
    entry = lookup(dense, config.parameterization)
    if entry.check is not None:
        entry.check(dense, config, "the layer")
    return entry.build(dense, config, input_scale, covariance)
