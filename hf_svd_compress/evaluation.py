# Copyright 2025 The hf_svd_compress Authors.
# Licensed under the Apache License, Version 2.0.
"""Offline-safe metrics for `Trainer(compute_metrics=...)`.

`evaluate.load("accuracy")` downloads the metric script from the Hugging Face Hub, so it fails on air-gapped
machines and in CI. The metrics used by default here (`"accuracy"` and macro `"f1"`) are shipped with the package as
local `evaluate` modules under `hf_svd_compress/metric_modules/`, loaded by path, with a pure-numpy fallback should
`evaluate` itself fail to load them. Any other metric name is forwarded to `evaluate.load` (which needs the Hub).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

METRIC_MODULES_DIR = Path(__file__).resolve().parent / "metric_modules"

MetricFn = Callable[..., dict[str, float]]


class MetricLoadError(RuntimeError):
    """Raised when a metric that is not shipped with `hf_svd_compress` cannot be loaded with `evaluate.load`."""


def _as_label_arrays(predictions: Any, references: Any) -> tuple[np.ndarray, np.ndarray]:
    predictions = np.asarray(predictions).reshape(-1)
    references = np.asarray(references).reshape(-1)
    if predictions.shape != references.shape:
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} and {len(references)}."
        )
    return predictions, references


def accuracy(predictions: Any, references: Any) -> dict[str, float]:
    """
    Fraction of predictions equal to the references, computed with numpy.

    Args:
        predictions (array-like of `int`):
            Predicted class ids.
        references (array-like of `int`):
            Ground-truth class ids, same length as `predictions`.

    Returns:
        `dict[str, float]`: `{"accuracy": value}`, `nan` for empty inputs.
    """
    predictions, references = _as_label_arrays(predictions, references)
    if references.size == 0:
        return {"accuracy": float("nan")}
    return {"accuracy": float(np.mean(predictions == references))}


def f1_macro(predictions: Any, references: Any) -> dict[str, float]:
    """
    Macro-averaged F1 over the classes present in `predictions` or `references`, computed with numpy.

    Matches `sklearn.metrics.f1_score(references, predictions, average="macro")`, including scoring 0.0 for a
    class that is predicted but never correct.

    Args:
        predictions (array-like of `int`):
            Predicted class ids.
        references (array-like of `int`):
            Ground-truth class ids, same length as `predictions`.

    Returns:
        `dict[str, float]`: `{"f1": value}`, `nan` for empty inputs.
    """
    predictions, references = _as_label_arrays(predictions, references)
    classes = np.union1d(predictions, references)
    if classes.size == 0:
        return {"f1": float("nan")}
    scores = []
    for cls in classes:
        true_pos = np.sum((predictions == cls) & (references == cls))
        denom = np.sum(predictions == cls) + np.sum(references == cls)
        scores.append(2.0 * true_pos / denom)  # denom > 0: cls occurs in one of the two arrays
    return {"f1": float(np.mean(scores))}


# Metrics that work without network access: name -> numpy fallback. Each also has a local evaluate module at
# `METRIC_MODULES_DIR / name / f"{name}.py"`.
OFFLINE_METRICS: dict[str, MetricFn] = {"accuracy": accuracy, "f1": f1_macro}


def _numpy_compute(fn: MetricFn) -> MetricFn:
    # Same keyword interface as `evaluate.EvaluationModule.compute`.
    def compute(*, predictions: Any, references: Any) -> dict[str, float]:
        return fn(predictions, references)

    compute.__name__ = compute.__qualname__ = fn.__name__
    compute.__doc__ = fn.__doc__
    return compute


def _load_local_module(name: str) -> MetricFn:
    import evaluate

    module = evaluate.load(str(METRIC_MODULES_DIR / name))
    return module.compute


def _load_hub_module(name: str) -> MetricFn:
    import evaluate

    try:
        module = evaluate.load(name)
    except Exception as err:
        offline = ", ".join(repr(n) for n in OFFLINE_METRICS)
        raise MetricLoadError(
            f"Could not load metric {name!r} with `evaluate.load({name!r})` ({type(err).__name__}: {err}). "
            f"Metrics other than {offline} are fetched from the Hugging Face Hub (or must be a local path to an "
            "`evaluate` module), so they need network access and `HF_HUB_OFFLINE` unset. "
            f"Metrics that work offline: {offline}."
        ) from err
    return module.compute


@functools.cache
def load_metric(name: str) -> MetricFn:
    """
    Load a metric as a callable `compute(predictions=..., references=...) -> dict`.

    Loaded metrics are cached, so calling this once per evaluation is cheap.

    Args:
        name (`str`):
            `"accuracy"` or `"f1"` (macro-averaged) work offline: they are loaded from the `evaluate` modules
            shipped in `hf_svd_compress/metric_modules/`, falling back to a numpy implementation if `evaluate`
            cannot load them. Any other name (a Hub metric such as `"matthews_correlation"`, or a local path to an
            `evaluate` module) is passed to `evaluate.load`.

    Returns:
        `Callable[..., dict[str, float]]`: the metric's `compute` function.

    Raises:
        `MetricLoadError`: if a metric that is not shipped with the package cannot be loaded, e.g. offline.
    """
    if name in OFFLINE_METRICS:
        try:
            return _load_local_module(name)
        except Exception as err:  # any failure: read-only cache dir, evaluate/datasets version mismatch, ...
            # The numpy version gives identical numbers, so a broken `evaluate` install should never stop training.
            logger.warning("Could not load the local evaluate module for %r (%s); using numpy instead.", name, err)
            return _numpy_compute(OFFLINE_METRICS[name])
    return _load_hub_module(name)


def _logits_and_labels(eval_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(eval_pred, "predictions"):
        logits, labels = eval_pred.predictions, eval_pred.label_ids
    else:
        logits, labels = eval_pred[0], eval_pred[1]
    # Models configured to return extra outputs (hidden states, attentions) give a tuple; logits come first.
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return np.asarray(logits), np.asarray(labels)


def make_compute_metrics(
    metric_names: str | Iterable[str] = ("accuracy",),
) -> Callable[[Any], dict[str, float]]:
    """
    Build a `compute_metrics` function for `transformers.Trainer` for single-label classification.

    Metrics are loaded here rather than at the first evaluation, so a metric that cannot be loaded fails before
    any training time is spent.

    Args:
        metric_names (`str` or iterable of `str`, defaults to `("accuracy",)`):
            Names accepted by [`load_metric`].

    Returns:
        `Callable[[EvalPrediction], dict[str, float]]`: takes the Trainer's `EvalPrediction` (or a
        `(logits, labels)` tuple), takes the argmax over the last axis of the logits and returns the union of the
        metrics' result dictionaries.

    Example:
        ```python
        >>> trainer = Trainer(model=model, args=args, compute_metrics=make_compute_metrics(("accuracy", "f1")))
        ```
    """
    if isinstance(metric_names, str):
        metric_names = (metric_names,)
    metrics = {name: load_metric(name) for name in metric_names}
    if not metrics:
        raise ValueError("make_compute_metrics needs at least one metric name.")

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        logits, labels = _logits_and_labels(eval_pred)
        predictions = np.argmax(logits, axis=-1)
        results: dict[str, float] = {}
        for compute in metrics.values():
            results.update(compute(predictions=predictions, references=labels))
        return results

    return compute_metrics
