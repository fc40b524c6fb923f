"""`FactoredLayer`: the one interface of every factored layer. Model-level code (factorize, pruning, the trainer,
export, merge) talks only to it, never to a concrete layer class.

A parameterization is a `FactoredLayer` subclass plus a builder registered in `layers.registry`. The methods, one
meaning each:

- ranks: `rank` (live), `full_rank` (stored), `in_features` / `out_features` (the factored matrix's columns / rows);
- pruning: `allocate_ranks` (class method: choose and apply the ranks of all layers sharing it, under an energy or
  budget target; the default ranks singular values across layers, `layers.allocation`), which calls `spectrum()`
  (the live singular values) and `keep_(rank)` (mask the rest: buffers only, DDP-safe); `truncate_()` drops the
  masked part for good and returns the layer to put in place (itself, or a compact replacement);
  `refuses_pruning()` says why a layer cannot be pruned, checked before any layer changes;
- export: `svd_form()` is the layer as an SVD-family layer (`export_tensors`, `export_metadata`, `to_low_rank`),
  `to_dense()` the dense module it replaced, of that type (`dense_type`, remembered as peft's `get_base_layer()`);
- training: `configure_regularizers(settings)` says which terms forward records; `pop_terms()` returns them;
  `spectral_parameters()` are the singular values the trainer may give their own learning rate;
- checkpoints: `checkpoint_record()` is stored in `config.svd_training["layers"]`; `from_state(state, prefix, dense,
  record)` rebuilds an uninitialized layer shaped like the stored tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_svd_compress.layers import allocation


@dataclass(frozen=True)
class RegularizerSettings:
    """Which regularizer terms the layers record in the next forward pass (set by `SVDTrainer`).

    Args:
        orth (`bool`): The orthogonality term of the singular vectors.
        orth_probes (`int`): > 0: its randomized estimate from that many probes.
        sparsity (`str`, *optional*): The singular-value sparsity term (`"l1"`, `"hoyer"`, `"hoyer_square"`).
        approx (`bool`): The CUR approximation term.
    """

    orth: bool = False
    orth_probes: int = 0
    sparsity: str | None = None
    approx: bool = False


class FactoredLayer(nn.Module, ABC):
    """A layer stored in factored form, replacing a dense `nn.Linear`, transformers `Conv1D` or `nn.Conv2d`.

    Subclasses set the class attribute `parameterization` (their `SVDConfig.parameterization`) and the attributes
    `in_features`, `out_features`; every subclass is listed in `FactoredLayer.classes` by name, which is how
    checkpoints find the class to rebuild.
    """

    parameterization: ClassVar[str]
    classes: ClassVar[dict[str, type[FactoredLayer]]] = {}
    # The type of the dense layer this one replaced; `to_dense` returns one. Set by the builders and loaders.
    dense_type: type[nn.Module] = nn.Linear
    in_features: int
    out_features: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        FactoredLayer.classes[cls.__name__] = cls

    # ---- ranks ------------------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def rank(self) -> int:
        """The live rank (what the layer computes with)."""

    @property
    @abstractmethod
    def full_rank(self) -> int:
        """The stored rank (live or masked)."""

    # ---- pruning ----------------------------------------------------------------------------------------------

    @classmethod
    def allocate_ranks(
        cls,
        layers: dict[str, FactoredLayer],
        energy: float | None,
        budget: float | None,
        rank_multiple: int,
        allocation_rule: str,
    ) -> dict[str, int]:
        """Choose the ranks of `layers` (all sharing this method) and apply them with `keep_`; returns them.

        The default ranks live singular values (`spectrum`) across the layers: `allocation.spectral_ranks`.
        """
        ranks = allocation.spectral_ranks(layers, energy, budget, rank_multiple, allocation_rule)
        for name, layer in layers.items():
            layer.keep_(ranks[name])
        return ranks

    def spectrum(self) -> torch.Tensor:
        """The live singular values, whole on every process (a collective under FSDP2)."""
        raise NotImplementedError(f"{type(self).__name__} has no spectrum: it overrides allocate_ranks instead.")

    def keep_(self, rank: int) -> None:
        """Keep the `rank` most important live components, masking the others (buffers only)."""
        raise NotImplementedError(f"{type(self).__name__} has no keep_: it overrides allocate_ranks instead.")

    def refuses_pruning(self) -> str | None:
        """Why `prune_` cannot choose this layer's rank, or `None` (checked for every layer before any changes)."""
        return None

    @abstractmethod
    def truncate_(self) -> FactoredLayer:
        """Drop the masked components for good (new, smaller parameters); returns self, or the replacement."""

    # ---- export and merge -------------------------------------------------------------------------------------

    @abstractmethod
    def svd_form(self) -> FactoredLayer:
        """This layer as an SVD-family layer computing the same function (itself for one), for export."""

    @abstractmethod
    def to_dense(self) -> nn.Module:
        """The dense module (of `dense_type`) computing the same function; masked components are dropped."""

    def export_tensors(self, name: str, dense: bool) -> dict[str, torch.Tensor]:
        """The tensors the Hub format stores for this layer under `name` (factors, or the dense weight)."""
        raise NotImplementedError(f"{type(self).__name__} is exported through svd_form().")

    def export_metadata(self, name: str) -> dict[str, dict[str, Any]]:
        """Entries this layer adds to the export's `svd_compression` metadata, e.g. `{"convs": {name: ...}}`."""
        return {}

    def to_low_rank(self) -> nn.Module:
        """The exported two-factor form (`LowRankLinear` / `LowRankConv2d`), e.g. for peft's LoRA."""
        return self.svd_form().to_low_rank()

    # ---- training ---------------------------------------------------------------------------------------------

    def configure_regularizers(self, settings: RegularizerSettings) -> bool:
        """Set which terms the next forward records (and clear recorded ones); returns whether it records any."""
        return False

    def pop_terms(self) -> dict[str, torch.Tensor]:
        """The terms recorded since `configure_regularizers`, summed per name (`orth_loss`, ...); clears them."""
        return {}

    def spectral_parameters(self) -> list[nn.Parameter]:
        """The singular values, which `SVDTrainer` may train at their own learning rate."""
        return []

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def checkpoint_record(self) -> dict[str, Any]:
        """JSON-ready facts `from_state` needs beyond the tensors; `class` names the layer class."""
        return {"class": type(self).__name__}

    @classmethod
    @abstractmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], prefix: str, dense: nn.Module, record: dict[str, Any]
    ) -> FactoredLayer:
        """An uninitialized layer whose tensors have the shapes `state` holds under `prefix`, replacing `dense`."""


def factored_modules(model: nn.Module) -> dict[str, FactoredLayer]:
    """The factored layers of `model`, by module name, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, FactoredLayer)}


def dense_type_of(module: nn.Module) -> type[nn.Module]:
    """What `to_dense` should rebuild for a layer replacing `module`: transformers `Conv1D`, `nn.Conv2d` or Linear."""
    for kind in (Conv1D, nn.Conv2d):
        if isinstance(module, kind):
            return kind
    return nn.Linear


@torch.no_grad()
def dense_module(weight: torch.Tensor, bias: torch.Tensor | None, dense_type: type[nn.Module]) -> nn.Module:
    """An `nn.Linear` (or transformers `Conv1D`, which stores `weight.T`) holding the (out x in) `weight`."""
    out_features, in_features = weight.shape
    kw = {"device": weight.device, "dtype": weight.dtype}
    if dense_type is Conv1D:
        module = Conv1D(out_features, in_features).to(**kw)
        module.weight.copy_(weight.T)
        module.bias.copy_(bias if bias is not None else torch.zeros_like(module.bias))
        return module
    module = nn.Linear(in_features, out_features, bias=bias is not None, **kw)
    module.weight.copy_(weight)
    if bias is not None:
        module.bias.copy_(bias)
    return module


def group_by_allocator(layers: dict[str, FactoredLayer]) -> Iterator[tuple[type, dict[str, FactoredLayer]]]:
    """`layers` split by the `allocate_ranks` they share (one budget per group), in model order."""
    groups: dict[Any, tuple[type, dict[str, FactoredLayer]]] = {}
    for name, layer in layers.items():
        key = type(layer).allocate_ranks.__func__
        groups.setdefault(key, (type(layer), {}))[1][name] = layer
    yield from groups.values()
