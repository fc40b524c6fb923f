"""The accuracy ladder (benchmarks/ladder.py) on the tiny task: every rung runs, writes its result file, resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from ladder import ROLES  # noqa: E402

FIELDS = {"task", "method", "role", "budget", "seed", "steps", "test_accuracy", "budget_realized", "commit"}


def ladder(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(BENCHMARKS / "ladder.py"), "--task", "tiny", "--budgets", "0.5", "--seeds", "42"]
    cmd += ["--results_dir", str(tmp_path / "results"), "--cache_dir", str(tmp_path / "cache"), *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)


def test_every_rung_writes_one_result_file_and_a_rerun_skips_them(tmp_path):
    result = ladder(tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    folder = tmp_path / "results" / "tiny" / "10"
    files = {p.name: json.loads(p.read_text()) for p in folder.glob("*.json")}
    assert len(files) == len(ROLES) + 1 and "dense.json" in files  # every rung + the dense reference
    for name, record in files.items():
        if name != "dense.json":
            assert FIELDS <= set(record), name
            assert record["steps"] == 10 and record["budget_realized"] <= 0.5 + 1e-9, name
    roles = {r["method"]: r["role"] for r in files.values()}
    assert roles["default"] == "default" and roles["svd_ft_kd"] == roles["whitened_ft"] == "baseline"
    assert "| 50% | " in result.stdout  # the paired difference against the best baseline
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    again = ladder(tmp_path, "--methods", "default")
    assert again.returncode == 0 and "default@0.5 seed 42" not in again.stdout  # resumed: nothing rerun
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.json")} == stamps
