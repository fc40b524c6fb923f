# Copyright 2025 The hf_svd_compress Authors.
# Licensed under the Apache License, Version 2.0.
"""Accuracy metric shipped with `hf_svd_compress` so that `evaluate.load` works without the Hugging Face Hub.

This is a dependency-light (numpy only) re-implementation of the canonical `evaluate-metric/accuracy` module; it
returns the same `{"accuracy": float}` dictionary.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the total number of cases processed:
Accuracy = (TP + TN) / (TP + TN + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`):
        Predicted labels.
    references (`list` of `int`):
        Ground truth labels.
    normalize (`bool`, defaults to `True`):
        If `False`, return the number of correctly classified samples instead of the fraction.
    sample_weight (`list` of `float`, *optional*):
        Sample weights.

Returns:
    accuracy (`float` or `int`): Accuracy score, between 0.0 and 1.0 if `normalize=True`, else the (weighted)
    count of correct predictions.

Examples:
    >>> accuracy_metric = evaluate.load("hf_svd_compress/metric_modules/accuracy")
    >>> accuracy_metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
          Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction (or weighted count) of predictions equal to the references."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/accuracy"],
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict:
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        correct = float(np.sum(weights * (predictions == references)))
        if not normalize:
            return {"accuracy": correct}
        # An empty evaluation set has no meaningful accuracy; nan is what numpy's mean would give.
        total = float(np.sum(weights))
        return {"accuracy": correct / total if total > 0 else float("nan")}
