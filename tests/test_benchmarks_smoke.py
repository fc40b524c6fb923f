"""Each benchmark script runs on a tiny configuration, so none of them rots (the figures are in docs/benchmarks.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("train_step.py", ["--models", "tiny", "--steps", "2", "--rounds", "1", "--intervals", "1", "2"], "| tiny |"),
        ("train_step.py", ["--models", "tiny", "--steps", "2", "--rounds", "1", "--defaults"], "| teacher |"),
        ("inference.py", ["--tiny"], "budget"),
        ("memory.py", ["--tiny"], "peak"),
    ],
)
def test_benchmark_runs_on_tiny_config(script, args, expected, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert expected in result.stdout
