"""Which modules to factor: peft's matching rules plus `"all-linear"` restricted to the transformer blocks."""

from __future__ import annotations

import re

from torch import nn


class NoTargetModulesError(ValueError):
    """Raised when `target_modules` matches no module of the model."""


def matches(name: str, pattern: list[str] | str) -> bool:
    """peft's rule: a string is a regex matched against the full name; a list matches exactly or by `.suffix`."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def block_module_names(model: nn.Module) -> set[str]:
    """Names of the modules inside repeated blocks (any `nn.ModuleList`), i.e. not embeddings, poolers or heads."""
    inside: set[str] = set()
    for list_name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            prefix = f"{list_name}." if list_name else ""
            inside.update(prefix + sub for sub, _ in module.named_modules() if sub)
    return inside


def find_targets(
    model: nn.Module,
    target_modules: list[str] | str,
    exclude_modules: list[str] | str | None = None,
    layer_types: tuple[type, ...] = (nn.Linear,),
) -> list[str]:
    """Names of the modules selected by `target_modules` minus `exclude_modules`, in model order.

    `"all-linear"` selects the modules of `layer_types` inside the transformer blocks. Raises
    `NoTargetModulesError` listing what was asked for when nothing matches.
    """
    if target_modules == "all-linear":
        blocks = block_module_names(model)
        names = [n for n, m in model.named_modules() if n in blocks and isinstance(m, layer_types)]
    else:
        names = [n for n, _ in model.named_modules() if n and matches(n, target_modules)]
    if exclude_modules:
        names = [n for n in names if not matches(n, exclude_modules)]
    if not names:
        raise NoTargetModulesError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no module of "
            f"{type(model).__name__}. Pass module names (exact or by suffix, e.g. ['query', 'value']), a regex of "
            f"the full name, or 'all-linear'. Some linear layers of this model: {_sample_linear_names(model)}."
        )
    return names


def _sample_linear_names(model: nn.Module, limit: int = 6) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[:limit]
