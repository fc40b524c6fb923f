# Copyright 2025 The hf_svd_compress Authors.
# Licensed under the Apache License, Version 2.0.
"""F1 metric shipped with `hf_svd_compress` so that `evaluate.load` works without the Hugging Face Hub.

A numpy re-implementation of the canonical `evaluate-metric/f1` module for single-label classification, supporting
`average="macro"` (the default here, the useful one for multi-class), `"micro"` and `"weighted"`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
The F1 score is the harmonic mean of precision and recall: F1 = 2 * (precision * recall) / (precision + recall).
For multi-class problems the per-class scores are averaged.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`):
        Predicted labels.
    references (`list` of `int`):
        Ground truth labels.
    average (`str`, defaults to `"macro"`):
        `"macro"` (unweighted mean over the classes present in predictions or references), `"weighted"` (mean
        weighted by class support) or `"micro"` (global counts, equal to accuracy for single-label data).

Returns:
    f1 (`float`): F1 score between 0.0 and 1.0. A class with no true and no predicted positives scores 0.0, as in
    scikit-learn's default `zero_division` handling.

Examples:
    >>> f1_metric = evaluate.load("hf_svd_compress/metric_modules/f1")
    >>> f1_metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 2, 1, 0, 0, 1])
    {'f1': 0.26666666666666666}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    """Macro/micro/weighted F1 for single-label classification."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/f1"],
        )

    def _compute(self, predictions, references, average: str = "macro") -> dict:
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if average == "micro":
            # For single-label data micro-F1 reduces to accuracy.
            return {"f1": float(np.mean(predictions == references)) if len(references) else float("nan")}
        if average not in ("macro", "weighted"):
            raise ValueError(f"average must be 'macro', 'micro' or 'weighted', got {average!r}.")
        classes = np.union1d(predictions, references)
        scores, support = [], []
        for cls in classes:
            true_pos = np.sum((predictions == cls) & (references == cls))
            denom = np.sum(predictions == cls) + np.sum(references == cls)
            scores.append(2.0 * true_pos / denom if denom > 0 else 0.0)
            support.append(np.sum(references == cls))
        if not scores:
            return {"f1": float("nan")}
        weights = np.asarray(support, dtype=float) if average == "weighted" else None
        if weights is not None and weights.sum() == 0:
            return {"f1": 0.0}
        return {"f1": float(np.average(scores, weights=weights))}
