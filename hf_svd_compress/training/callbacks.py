"""`SVDPruningCallback`: prune at a step of training (one cut, or gradually on a cubic schedule)."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from hf_svd_compress.core.pruning import prune_
from hf_svd_compress.training.optimizer import unscale_singular_value_lr

logger = logging.getLogger(__name__)


class SVDPruningCallback(TrainerCallback):
    """Prune singular values (masks only, DDP-safe) at the end of optimizer step `at_step`, or gradually.

    With `start_step` (and a `budget`), every step from `start_step` to `at_step` masks a little more: the pruned
    part `1 - budget` is reached as `1 - (1 - p)^3` of it with the progress `p` from 0 to 1, the cubic schedule of
    gradual magnitude pruning (Zhu & Gupta 2017) and AdaLoRA. Masked values stay masked, so each cut only removes
    values; the last one is exactly the `at_step` budget. An energy target cannot be split this way (each cut would
    keep a fraction of what the previous ones left), so gradual pruning needs a budget.

    Args:
        at_step (`int`): The optimizer step after which the target is reached.
        energy (`float`, *optional*): Energy each layer keeps (see `prune_`).
        budget (`float`, *optional*): Global parameter fraction kept (see `prune_`).
        rank_multiple (`int`, defaults to 1): Round the ranks up to a multiple of this (see `prune_`).
        start_step (`int`, *optional*): First step of gradual pruning (below `at_step`); unset: one cut.
        allocation (`str`, defaults to `"threshold"`): How a budget is shared across layers (see `prune_`).
    """

    def __init__(
        self,
        at_step: int,
        energy: float | None = None,
        budget: float | None = None,
        rank_multiple: int = 1,
        start_step: int | None = None,
        allocation: str = "threshold",
    ) -> None:
        if start_step is not None and not 0 <= start_step < at_step:
            raise ValueError(f"start_step={start_step}: must be in [0, at_step={at_step}) for gradual pruning.")
        if start_step is not None and budget is None:
            raise ValueError(
                "Gradual pruning (start_step / --prune_start_step) needs a budget target (--prune_budget, e.g. 0.5): "
                "energy cuts would compound, each keeping a fraction of what the previous ones left."
            )
        self.at_step, self.energy, self.budget, self.rank_multiple = at_step, energy, budget, rank_multiple
        self.start_step, self.allocation = start_step, allocation
        self.ranks: dict[str, int] | None = None

    def target(self, step: int) -> tuple[float | None, float | None]:
        """`(energy, budget)` to prune to after optimizer step `step`; `(None, None)` for no cut."""
        if step == self.at_step:
            return self.energy, self.budget
        if self.start_step is None or not self.start_step <= step < self.at_step:
            return None, None
        pruned = 1 - (1 - (step - self.start_step) / (self.at_step - self.start_step)) ** 3
        budget = 1 - (1 - self.budget) * pruned
        return (None, None) if budget >= 1 else (None, budget)  # the schedule's first step cuts nothing

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        energy, budget = self.target(state.global_step)
        if model is not None and (energy is not None or budget is not None):
            self.ranks = prune_(
                model, energy=energy, budget=budget, rank_multiple=self.rank_multiple, allocation=self.allocation
            )
            logger.info("Pruned at step %d: ranks %s", state.global_step, self.ranks)
            control.should_log = True
        if state.global_step == self.at_step and optimizer is not None:
            # The sparsity term is off from here on: a faster rate for s would only make the spectrum drift.
            unscale_singular_value_lr(optimizer, lr_scheduler)
        return control
