"""Training and pruning on two real CPU processes (gloo): DDP through the Trainer, FSDP1 and FSDP2 by hand.

Every run trains the same tiny factored BERT for 6 steps of total batch 8, prunes by energy after step 3 and
fine-tunes. The single-process run (batch 8 x 1 process) is the reference; the distributed runs use 4 x 2 processes.
They must see the same examples in every step, end with bitwise identical weights and ranks on both processes, and
match the reference within float tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_svd_compress import current_ranks, load_compressed

SCRIPTS = Path(__file__).parent / "scripts"
LAUNCH = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
LAUNCH += ["--mixed_precision", "no", "--dynamo_backend", "no"]
# Plain SGD with momentum: two runs differ by summation order only, ~1e-8 after 6 steps (measured 3e-8).
TOLERANCE = 1e-6

pytestmark = pytest.mark.distributed


def run(script: str, out: Path, *args: str, processes: int = 1) -> None:
    """Run `script` writing into `out`, as one plain process or under `accelerate launch` with 2 processes."""
    launch = LAUNCH if processes > 1 else []
    cmd = [sys.executable, *launch, str(SCRIPTS / script), "--out", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def read_records(out: Path, processes: int) -> list[dict]:
    """Each process's `rank{i}.json`, with its tensors under `state`."""
    records = []
    for rank in range(processes):
        record = json.loads((out / f"rank{rank}.json").read_text())
        record["state"] = load_file(out / f"rank{rank}.safetensors")
        records.append(record)
    return records


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One process, batch 8: the run every distributed one must reproduce."""
    out = tmp_path_factory.mktemp("single")
    run("train_prune_ddp.py", out, "--per_device_batch", "8")
    (record,) = read_records(out, 1)
    return record


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ddp")
    run("train_prune_ddp.py", out, "--per_device_batch", "4", processes=2)
    return out, read_records(out, 2)


def check_against_reference(records: list[dict], reference: dict) -> None:
    first, second = records
    assert first["world_size"] == second["world_size"] == 2
    # Sound comparison: step k of the 2-process run used exactly the examples of step k of the reference.
    for step, examples in reference["examples"].items():
        assert len(first["examples"][step]) == len(second["examples"][step]) == 4
        assert sorted(first["examples"][step] + second["examples"][step]) == sorted(examples), f"step {step}"
    # Both processes hold the same model, bit for bit.
    assert first["ranks"] == second["ranks"]
    assert first["state"].keys() == second["state"].keys()
    for name, tensor in first["state"].items():
        assert torch.equal(tensor, second["state"][name]), name
    assert first["checksum"] == second["checksum"]
    # And the model of the single-process run.
    assert first["ranks"] == reference["ranks"]
    assert first["state"].keys() == reference["state"].keys()
    for name, expected in reference["state"].items():
        torch.testing.assert_close(first["state"][name], expected, rtol=0, atol=TOLERANCE, msg=name)
    losses = [entry["loss"] for entry in first["logs"] if "loss" in entry]
    expected_losses = [entry["loss"] for entry in reference["logs"] if "loss" in entry]
    assert losses == pytest.approx(expected_losses, rel=1e-5)


def test_reference_run_is_not_vacuous(reference):
    # The regularizers ran until pruning, and pruning removed singular values in every layer (full rank 32).
    assert len(reference["ranks"]) == 12 and all(rank < 32 for rank in reference["ranks"].values())
    logs = [entry for entry in reference["logs"] if "loss" in entry]
    assert [("sparsity_loss" in entry) for entry in logs] == [True] * 3 + [False] * 3
    assert logs[-1]["rank_fraction"] < 0.6
    masks = [t for name, t in reference["state"].items() if name.endswith(".mask")]
    assert len(masks) == 12 and all(not bool(m.all()) for m in masks)


def test_ddp_matches_single_process(ddp, reference):
    _, records = ddp
    check_against_reference(records, reference)


def test_ddp_saves_once_on_the_main_process(ddp):
    out, records = ddp
    assert sorted(p.name for p in out.iterdir() if "compressed" in p.name) == ["compressed"]
    # The trainable form: the 32x32 layers at rank 16 are past the break-even, stored dense, refactored on load.
    assert current_ranks(load_compressed(out / "compressed", trainable=True)) == records[0]["ranks"]


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory) -> Path:
    """FSDP1 then FSDP2, in one launch (one process start-up for both)."""
    out = tmp_path_factory.mktemp("fsdp")
    run("dist_fsdp_train_prune.py", out, "--fsdp_versions", "1", "2", processes=2)
    return out


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_matches_single_process(version, fsdp_out, reference):
    check_against_reference(read_records(fsdp_out / f"fsdp{version}", 2), reference)


def test_calibrated_factors_are_identical_on_every_process(tmp_path):
    """Two processes, each with half the calibration examples, build bitwise identical whitened factors, equal to
    one process's over all of them."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    run("calibrate_ddp.py", tmp_path / "one")
    run("calibrate_ddp.py", tmp_path / "two", processes=2)
    reference = load_file(tmp_path / "one" / "rank0.safetensors")
    first, second = (load_file(tmp_path / "two" / f"rank{i}.safetensors") for i in range(2))
    assert first.keys() == reference.keys() and len(first) == 36
    for key in first:
        assert torch.equal(first[key], second[key]), key
        # Another summation order (two partial sums): the same factors up to float error.
        torch.testing.assert_close(first[key], reference[key], rtol=1e-4, atol=1e-5)
