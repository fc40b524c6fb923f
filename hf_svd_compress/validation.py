"""The checks of every user-facing setting, written once: `SVDConfig`, `SVDTrainingArguments`, the pipeline and task
arguments (so the CLI, its YAML files and the recipes), `prune_` and `compress`.

Each check returns the value as a plain Python `int` / `float` (numpy and torch scalars are accepted and converted,
so the settings stay JSON-serializable) or raises a `ValueError` that reads `<what> <value>: <fix>`, for example
`--orth_weight nan: must be a finite number >= 0 (0 disables the term)`. Booleans are never numbers here:
`prune_energy=True` would otherwise pass as 1.0 (keep everything).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def describe(what: str, value: Any) -> str:
    """`--flag value` for command-line names, `name=value` for Python ones (`SVDConfig.prune_energy=True`)."""
    shown = repr(value) if isinstance(value, str) else str(value)
    return f"{what} {shown}" if what.startswith("--") else f"{what}={shown}"


def refuse(what: str, value: Any, fix: str) -> ValueError:
    """The one form of a refusal: `<what> <value>: <fix>`."""
    return ValueError(f"{describe(what, value)}: {fix}")


def _plain(value: Any) -> Any:
    """A numpy / torch scalar as the Python number it holds; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        return value.item()
    if isinstance(value, numbers.Number) and hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def number(
    what: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: bool = False,
    below: bool = False,
    integer: bool = False,
    optional: bool = False,
    hint: str = "",
) -> Any:
    """Check one numeric setting and return it as a Python number.

    Args:
        what (`str`): How the user names it: `"--svd_steps"` or `"SVDConfig.prune_energy"`.
        value: The value given.
        minimum (`float`, *optional*): Lower bound, included unless `above`.
        maximum (`float`, *optional*): Upper bound, included unless `below`.
        above (`bool`): The value must be strictly greater than `minimum`.
        below (`bool`): The value must be strictly smaller than `maximum`.
        integer (`bool`): Only integers (no floats, even integral ones).
        optional (`bool`): `None` is accepted (and returned).
        hint (`str`): Appended to the fix, e.g. `"e.g. 0.95"` or `"0 disables the term"`.

    Returns:
        The value as `int` or `float` (or `None` when `optional`).

    Raises:
        `ValueError`: `<what> <value>: must be <kind and range>`, for booleans, non-numbers, NaN and infinities
            and values out of range.
    """
    if value is None and optional:
        return None
    plain = _plain(value)
    kind = "an integer" if integer else "a finite number"
    fix = f"must be {kind}{_range(minimum, maximum, above, below)}"
    wrong_type = isinstance(plain, bool) or not isinstance(plain, int if integer else int | float)
    if wrong_type:
        not_bool = ", not a bool" if isinstance(plain, bool | np.bool_) else ""
        raise refuse(what, value, fix + _or_none(optional) + not_bool + _tail(hint))
    if not math.isfinite(plain) or not _in_range(plain, minimum, maximum, above, below):
        raise refuse(what, value, fix + _tail(hint))
    return int(plain) if integer else plain


def choice(what: str, value: Any, choices: Sequence[Any], optional: bool = False) -> Any:
    """Check that `value` is one of `choices` (or `None` when `optional`) and return it."""
    if (value is None and optional) or value in choices:
        return value
    raise refuse(what, value, f"use one of {tuple(choices)}{_or_none(optional)}")


def _in_range(value: float, minimum: float | None, maximum: float | None, above: bool, below: bool) -> bool:
    low_ok = minimum is None or (value > minimum if above else value >= minimum)
    high_ok = maximum is None or (value < maximum if below else value <= maximum)
    return low_ok and high_ok


def _range(minimum: float | None, maximum: float | None, above: bool, below: bool) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if above else '['}{minimum:g}, {maximum:g}{')' if below else ']'}"
    if minimum is not None:
        return f" {'>' if above else '>='} {minimum:g}"
    if maximum is not None:
        return f" {'<' if below else '<='} {maximum:g}"
    return ""


def _or_none(optional: bool) -> str:
    return " or None" if optional else ""


def _tail(hint: str) -> str:
    return f" ({hint})" if hint else ""


# Rules shared by the settings: keyword arguments of `number`.
FRACTION = {"minimum": 0, "maximum": 1, "above": True}  # (0, 1]
OPEN_FRACTION = {**FRACTION, "below": True}  # (0, 1)
NON_NEGATIVE = {"minimum": 0}
POSITIVE = {"minimum": 0, "above": True}
COUNT = {"minimum": 1, "integer": True}  # an integer >= 1


def check_fields(settings: Any, rules: dict[str, dict[str, Any]], prefix: str) -> None:
    """Check (and normalize, in place) each field of `settings` named in `rules` with `number(**rule)`.

    `prefix` names the fields as the user wrote them: `"--"` for command-line arguments, `"SVDConfig."` for the
    config.
    """
    for name, rule in rules.items():
        setattr(settings, name, number(f"{prefix}{name}", getattr(settings, name), **rule))
