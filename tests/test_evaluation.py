"""Offline metrics: the shipped evaluate modules, the numpy fallback and `make_compute_metrics`."""

from __future__ import annotations

import os

# Set before `evaluate`/`datasets` are first imported (they read these at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from transformers import EvalPrediction  # noqa: E402

from hf_svd_compress import evaluation  # noqa: E402
from hf_svd_compress.evaluation import (
    METRIC_MODULES_DIR,
    MetricLoadError,
    accuracy,
    f1_macro,
    load_metric,
    make_compute_metrics,
)

RNG = np.random.default_rng(0)
REFERENCES = RNG.integers(0, 4, size=200)
PREDICTIONS = np.where(RNG.random(200) < 0.7, REFERENCES, RNG.integers(0, 4, size=200))


def test_numpy_accuracy():
    assert accuracy([0, 1, 2, 0, 1, 2], [0, 1, 1, 2, 1, 0]) == {"accuracy": 0.5}
    assert accuracy(PREDICTIONS, REFERENCES)["accuracy"] == pytest.approx(np.mean(PREDICTIONS == REFERENCES))
    with pytest.raises(ValueError, match="same length"):
        accuracy([0, 1], [0])


def test_numpy_f1_macro():
    # Hand-computed: class 0 F1 = 0.8, classes 1 and 2 = 0.
    assert f1_macro(predictions=[0, 2, 1, 0, 0, 1], references=[0, 1, 2, 0, 1, 2])["f1"] == pytest.approx(0.8 / 3)
    sklearn = pytest.importorskip("sklearn.metrics")
    expected = sklearn.f1_score(REFERENCES, PREDICTIONS, average="macro")
    assert f1_macro(PREDICTIONS, REFERENCES)["f1"] == pytest.approx(expected)


@pytest.mark.parametrize("name", ["accuracy", "f1"])
def test_local_evaluate_module_offline(name):
    import evaluate

    assert (METRIC_MODULES_DIR / name / f"{name}.py").is_file()
    # Loaded straight by path (not through load_metric) so a silent numpy fallback cannot hide a broken module.
    module = evaluate.load(str(METRIC_MODULES_DIR / name))
    assert isinstance(module, evaluate.Metric)
    result = module.compute(predictions=PREDICTIONS, references=REFERENCES)
    expected = evaluation.OFFLINE_METRICS[name](PREDICTIONS, REFERENCES)
    assert result.keys() == expected.keys()
    assert result[name] == pytest.approx(expected[name])


def test_load_metric_agrees_with_numpy():
    compute = load_metric("accuracy")
    assert load_metric("accuracy") is compute  # cached
    assert compute(predictions=PREDICTIONS, references=REFERENCES) == pytest.approx(accuracy(PREDICTIONS, REFERENCES))


@pytest.fixture
def fresh_cache():
    # Tests that break loading must neither see nor leave cached metrics.
    evaluation.load_metric.cache_clear()
    yield
    evaluation.load_metric.cache_clear()


def test_load_metric_falls_back_to_numpy(monkeypatch, fresh_cache):
    def broken(name):
        raise OSError("read-only cache")

    monkeypatch.setattr(evaluation, "_load_local_module", broken)
    compute = load_metric("f1")
    assert compute(predictions=[0, 1], references=[0, 1]) == {"f1": 1.0}


def test_compute_metrics_on_logits():
    logits = np.array([[2.0, 0.1, 0.0], [0.0, 3.0, 1.0], [0.5, 0.2, 0.9], [1.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1, 0])  # predictions are 0, 1, 2, 0 -> 3 of 4 right
    compute_metrics = make_compute_metrics(("accuracy", "f1"))
    results = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert results["accuracy"] == pytest.approx(0.75)
    assert results["f1"] == pytest.approx(f1_macro([0, 1, 2, 0], labels)["f1"])
    # Tuple outputs (logits, hidden states) and plain (logits, labels) tuples are accepted too.
    assert make_compute_metrics("accuracy")(((logits, np.zeros((4, 2))), labels)) == {"accuracy": 0.75}


def test_unknown_metric_error_message(monkeypatch, fresh_cache):
    import evaluate

    def offline_load(path, *args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    # Also force a failure when the test machine happens to be online.
    monkeypatch.setattr(evaluate, "load", offline_load)
    with pytest.raises(MetricLoadError) as info:
        load_metric("matthews_correlation")
    message = str(info.value)
    assert "'matthews_correlation'" in message and "Hub" in message
    assert "'accuracy', 'f1'" in message
    with pytest.raises(MetricLoadError):
        make_compute_metrics(("accuracy", "matthews_correlation"))
