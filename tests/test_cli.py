"""The `hf-svd-compress` command end to end on a tiny configuration, and its refusals of bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_svd_compress import load_compressed, load_factored_checkpoint, svd_layers
from hf_svd_compress.cli import main

CLI = [sys.executable, "-m", "hf_svd_compress.cli"]
FAST = ["--dense_steps", "2", "--svd_steps", "3", "--finetune_steps", "2", "--per_device_train_batch_size", "4"]
FAST += ["--max_length", "16", "--logging_steps", "1", "--use_cpu", "--disable_tqdm", "true"]


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def compressed_run(tiny_text_model, tiny_text_csv, tmp_path_factory):
    """One real `compress` run: tiny BERT, tiny csv, a few steps per stage."""
    out = tmp_path_factory.mktemp("run")
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv)]
    result = run([*args, "--output_dir", str(out), "--prune_energy", "0.8", *FAST], cwd=out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out, result


def test_compress_runs_every_stage_and_exports(compressed_run):
    out, result = compressed_run
    for stage in ("2/5", "3/5", "4/5", "5/5"):
        assert f"[hf-svd-compress] {stage}" in result.stdout
    export = out / "compressed"
    assert (export / "model.safetensors").is_file() and (export / "README.md").is_file()
    summary = json.loads((export / "compression_summary.json").read_text())
    assert set(summary["accuracy"]) == {"dense", "factored", "pruned", "compressed"}
    config = json.loads((export / "config.json").read_text())
    ranks = config["svd_compression"]["ranks"]
    assert ranks and all(r < 32 for r in ranks.values())
    model = load_compressed(export)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[2, 5, 9]])).logits.shape == (1, 3)


def test_compress_distills_from_the_dense_model(tiny_text_model, tiny_text_csv, tmp_path):
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv)]
    args += ["--output_dir", str(tmp_path / "o"), "--prune_energy", "0.8", "--distill_alpha", "0.7", *FAST]
    result = run(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # The SVD (3 steps) and fine-tuning (2 steps) stages log the distillation term at every step, dense does not.
    assert result.stdout.count("'distill_loss'") == 5
    assert '"distill_alpha": 0.7' in (tmp_path / "o" / "compressed" / "README.md").read_text()  # model card


@pytest.mark.parametrize("at_step", [None, 3])
def test_compress_prunes_gradually_during_the_svd_stage(tiny_text_model, tiny_text_csv, tmp_path, at_step):
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), *FAST]
    args += ["--output_dir", str(tmp_path / "o"), "--prune_budget", "0.5", "--prune_start_step", "1"]
    args += [] if at_step is None else ["--prune_at_step", str(at_step)]
    result = run([*args, "--prune_rank_multiple", "1", "--svd_steps", "4"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    svd_stage = result.stdout.split("[hf-svd-compress] 3/5")[1].split("[hf-svd-compress] 4/5")[0]
    fractions = [float(f) for f in re.findall(r"'rank_fraction': '([0-9.e-]+)'", svd_stage)]
    assert len(fractions) == 4 and fractions[0] == 1.0 and fractions[1] > fractions[2]
    # By default the budget is reached at the SVD stage's last step; with --prune_at_step 3 at step 3, and step 4
    # trains the pruned model.
    assert fractions[2] > fractions[3] if at_step is None else fractions[2] == fractions[3]
    meta = json.loads((tmp_path / "o" / "compressed" / "config.json").read_text())["svd_compression"]
    expected = {"method": "budget", "budget": 0.5, "gradual_from_step": 1}
    assert meta["rank_selection"] == expected if at_step is None else {**expected, "at_svd_step": 3}
    kept = sum(r * sum(meta["shapes"][n]) for n, r in meta["ranks"].items() if n not in meta["dense_modules"])
    kept += sum(meta["shapes"][n][0] * meta["shapes"][n][1] for n in meta["dense_modules"])
    assert kept <= 0.5 * sum(m * n for m, n in meta["shapes"].values())


def test_compress_in_one_schedule_without_a_fine_tuning_stage(tiny_text_model, tiny_text_csv, tmp_path):
    # The quality benchmark's one_schedule: the SVD stage has every step, prunes gradually to step 3, then trains
    # the pruned model in the same learning-rate schedule; there is no fine-tuning stage.
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), *FAST]
    args += ["--output_dir", str(tmp_path / "o"), "--prune_budget", "0.5", "--prune_start_step", "1"]
    args += ["--prune_at_step", "3", "--svd_steps", "4", "--finetune_steps", "0", "--singular_value_lr_scale", "100"]
    result = run(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    svd_stage = result.stdout.split("[hf-svd-compress] 3/5")[1].split("[hf-svd-compress] 4/5")[0]
    assert len(re.findall(r"'rank_fraction'", svd_stage)) == 4
    after = result.stdout.split("[hf-svd-compress] 4/5")[1].split("[hf-svd-compress] 5/5")[0]
    assert "'rank_fraction'" not in after  # no training after the SVD stage
    summary = json.loads((tmp_path / "o" / "compressed" / "compression_summary.json").read_text())
    assert summary["accuracy"]["compressed"] == summary["accuracy"]["pruned"]


def test_compress_cuts_once_inside_the_svd_stage_at_prune_at_step(tiny_text_model, tiny_text_csv, tmp_path):
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), *FAST]
    args += ["--output_dir", str(tmp_path / "o"), "--prune_energy", "0.8", "--prune_at_step", "2"]
    result = run([*args, "--prune_rank_multiple", "1", "--svd_steps", "4"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    svd_stage = result.stdout.split("[hf-svd-compress] 3/5")[1].split("[hf-svd-compress] 4/5")[0]
    fractions = [float(f) for f in re.findall(r"'rank_fraction': '([0-9.e-]+)'", svd_stage)]
    assert len(fractions) == 4 and fractions[0] == 1.0 > fractions[1] == fractions[2] == fractions[3]
    meta = json.loads((tmp_path / "o" / "compressed" / "config.json").read_text())["svd_compression"]
    assert meta["rank_selection"] == {"method": "energy", "energy": 0.8, "at_svd_step": 2}
    summary = json.loads((tmp_path / "o" / "compressed" / "compression_summary.json").read_text())
    assert summary["accuracy"]["pruned"] == summary["accuracy"]["factored"]  # no second cut after the stage
    # ... and the exported ranks are those the SVD stage ended with (a second energy cut would lower them).
    full = sum(min(meta["shapes"][n]) for n in summary["ranks"])
    assert sum(summary["ranks"].values()) / full == pytest.approx(fractions[3], rel=1e-3)


def test_compress_starts_from_data_aware_factors_and_fine_tunes_at_its_own_rate(
    compressed_run, tiny_text_model, tiny_text_csv, tmp_path
):
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), *FAST]
    args += ["--output_dir", str(tmp_path / "o"), "--prune_energy", "0.8", "--data_aware_init"]
    result = run([*args, "--calibration_batches", "2", "--finetune_lr_scale", "0.3"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "[hf-svd-compress] 2/5 factoring the target layers (full-rank data-aware SVD)" in result.stdout
    summary = json.loads((tmp_path / "o" / "compressed" / "compression_summary.json").read_text())
    plain = json.loads((compressed_run[0] / "compressed" / "compression_summary.json").read_text())
    layer = next(iter(summary["spectra_initial"]))  # same dense model, another basis: another start
    assert summary["spectra_initial"][layer] != pytest.approx(plain["spectra_initial"][layer], rel=1e-3)
    rates = {}
    for stage, text in (("svd", "3/5"), ("finetune", "4/5")):
        part = result.stdout.split(f"[hf-svd-compress] {text}")[1].split("[hf-svd-compress] ")[0]
        rates[stage] = [float(r) for r in re.findall(r"'learning_rate': '([0-9.e-]+)'", part)]
        assert "orth_loss" in part  # U and V are orthonormal in the data-aware basis too: the term stays on
    # Step for step, the fine-tuning schedule is the SVD stage's at 0.3 times the rate.
    assert len(rates["svd"]) == 3 and rates["svd"][1] > 0
    assert rates["finetune"] == pytest.approx([0.3 * r for r in rates["svd"][:2]])
    card = (tmp_path / "o" / "compressed" / "README.md").read_text()
    assert '"data_aware_init": true' in card and '"finetune_lr_scale": 0.3' in card
    # The factored checkpoint holds each layer's input_scale and re-prunes as it was trained (ASVD's spectrum).
    factored = load_factored_checkpoint(tmp_path / "o" / "factored")
    assert all(layer.input_scale is not None for layer in svd_layers(factored).values())
    result = run(
        ["prune", str(tmp_path / "o" / "factored"), "--budget", "0.6", "--output_dir", str(tmp_path / "p")],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "p" / "model.safetensors").is_file()


def test_prune_reprunes_the_factored_checkpoint(compressed_run):
    out, _ = compressed_run
    target = out / "reprune"
    result = run(["prune", str(out / "factored"), "--budget", "0.6", "--output_dir", str(target)], cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((target / "config.json").read_text())["svd_compression"]
    assert meta["rank_selection"] == {"method": "budget", "budget": 0.6, "rank_multiple": 8}
    full = meta["full_ranks"]
    assert all(r % 8 == 0 or r == full[n] for n, r in meta["ranks"].items())
    kept = sum(r * sum(meta["shapes"][n]) for n, r in meta["ranks"].items() if n not in meta["dense_modules"])
    kept += sum(meta["shapes"][n][0] * meta["shapes"][n][1] for n in meta["dense_modules"])
    total = sum(m * n for m, n in meta["shapes"].values())
    assert kept <= 0.6 * total


def test_report_writes_summary_and_plots(compressed_run):
    out, _ = compressed_run
    main(["report", str(out / "compressed"), "--output_dir", str(out / "report")])
    assert {"report.md", "report.json", "ranks.png", "spectra.png"} <= {p.name for p in (out / "report").iterdir()}


def test_config_file_supplies_options_and_flags_override(tiny_text_model, tiny_text_csv, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_text_model}\ndataset: {tiny_text_csv}\nprune_energy: 2.0\n")
    result = run(["compress", "--config", str(config), "--output_dir", str(tmp_path / "o")], cwd=tmp_path)
    assert result.returncode != 0 and "prune_energy" in result.stderr  # the YAML value is validated
    config.write_text("no_such_option: 1\n")
    result = run(["compress", "--config", str(config)], cwd=tmp_path)
    assert result.returncode != 0 and "no_such_option" in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model_name_or_path", "./no/such/folder"], "does not exist"),
        (["--text_column", "body"], "body"),
        (["--prune_energy", "1.5"], "prune_energy"),
        (["--prune_budget", "1.0"], "prune_budget"),
        (["--prune_start_step", "3", "--prune_budget", "0.5"], "--prune_start_step 3: the SVD stage has 3 steps"),
        (["--prune_start_step", "1"], "needs a budget target: add --prune_budget"),
        (["--prune_at_step", "4"], "--prune_at_step 4: in the pipeline it is a step of the SVD stage (3 steps"),
        (["--finetune_lr_scale", "0"], "--finetune_lr_scale 0.0: must be > 0"),
        (["--calibration_batches", "0"], "--calibration_batches 0: must be >= 1"),
    ],
)
def test_bad_input_fails_before_training(tiny_text_model, tiny_text_csv, tmp_path, extra, message):
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), *FAST]
    result = run([*args, "--output_dir", str(tmp_path / "o"), *extra], cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "[hf-svd-compress] 1/5" not in result.stdout and "2/5" not in result.stdout
    assert not (tmp_path / "o" / "compressed").exists()


def test_export_folder_holding_a_model_is_refused(compressed_run, tiny_text_model, tiny_text_csv, tmp_path):
    out, _ = compressed_run
    before = (out / "compressed" / "model.safetensors").read_bytes()
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), *FAST]
    result = run([*args, "--output_dir", str(out)], cwd=tmp_path)
    assert result.returncode != 0 and "--overwrite_export" in result.stderr
    assert (out / "compressed" / "model.safetensors").read_bytes() == before


def test_prune_refuses_bad_values(compressed_run):
    out, _ = compressed_run
    for flag, value in (("--energy", "0"), ("--budget", "1.5")):
        result = run(["prune", str(out / "factored"), flag, value, "--output_dir", str(out / "x")], cwd=out)
        assert result.returncode != 0 and flag in result.stderr
        assert not (out / "x").exists()


def test_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit, match="compress"):
        main(["compres"])


def test_a_budget_replaces_the_default_energy(tmp_path):
    from hf_svd_compress.cli import COMPRESS_DEFAULTS, parse_with_config
    from hf_svd_compress.pipeline import PipelineArguments
    from hf_svd_compress.tasks import TextTaskArguments
    from hf_svd_compress.trainer import SVDTrainingArguments

    types = (TextTaskArguments, PipelineArguments, SVDTrainingArguments)
    argv = ["--output_dir", str(tmp_path), "--prune_budget", "0.5"]
    *_, args = parse_with_config(types, argv, COMPRESS_DEFAULTS)
    assert (args.prune_budget, args.prune_energy) == (0.5, None)
    *_, args = parse_with_config(types, ["--output_dir", str(tmp_path)], COMPRESS_DEFAULTS)
    assert (args.prune_budget, args.prune_energy) == (None, 0.9)
    with pytest.raises(ValueError, match="only one"):
        parse_with_config(types, [*argv, "--prune_energy", "0.8"], COMPRESS_DEFAULTS)
