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
FAST = ["--dense_steps", "2", "--svd_steps", "10", "--per_device_train_batch_size", "4", "--calibration_batches", "2"]
FAST += ["--max_length", "16", "--logging_steps", "1", "--use_cpu", "--disable_tqdm", "true"]


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def compressed_run(tiny_text_model, tiny_text_csv, tmp_path_factory):
    """One real `compress` run with the defaults: tiny BERT, tiny csv, a few steps per stage."""
    out = tmp_path_factory.mktemp("run")
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv)]
    result = run([*args, "--output_dir", str(out), *FAST], cwd=out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out, result


def stage_output(stdout: str, first: str, last: str) -> str:
    return stdout.split(f"[hf-svd-compress] {first}")[1].split(f"[hf-svd-compress] {last}")[0]


def kept_fraction(meta: dict) -> float:
    kept = sum(r * sum(meta["shapes"][n]) for n, r in meta["ranks"].items() if n not in meta["dense_modules"])
    kept += sum(meta["shapes"][n][0] * meta["shapes"][n][1] for n in meta["dense_modules"])
    return kept / sum(m * n for m, n in meta["shapes"].values())


def test_compress_runs_every_stage_and_exports_with_the_defaults(compressed_run):
    out, result = compressed_run
    for stage in ("1/4", "2/4 SVD training from whitened factors, cut to 0.5, for 10 steps", "3/4", "4/4"):
        assert f"[hf-svd-compress] {stage}" in result.stdout
    export = out / "compressed"
    assert (export / "model.safetensors").is_file() and (export / "README.md").is_file()
    summary = json.loads((export / "compression_summary.json").read_text())
    assert set(summary["accuracy"]) == {"dense", "factored", "pruned", "compressed"}
    meta = json.loads((export / "config.json").read_text())["svd_compression"]
    assert meta["rank_selection"] == {
        "method": "budget",
        "budget": 0.5,
        "allocation": "threshold",
        "rank_multiple": 8,
    }
    assert kept_fraction(meta) <= 0.5
    # One schedule: the whitened factors are cut to the budget before the first step, then train with distillation
    # (logits and hidden states) at every step; nothing trains after the stage.
    svd_stage = stage_output(result.stdout, "2/4", "3/4")
    assert svd_stage.count("'distill_loss'") == 10 and svd_stage.count("'distill_hidden_loss'") == 10
    assert "orth_loss" not in svd_stage and "sparsity_loss" not in svd_stage  # the terms measured inert: off
    fractions = [float(f) for f in re.findall(r"'rank_fraction': '([0-9.e-]+)'", svd_stage)]
    assert len(fractions) == 10 and fractions == [1.0] * 10  # truncated: every stored value is live
    assert "'rank_fraction'" not in stage_output(result.stdout, "3/4", "4/4")
    assert summary["accuracy"]["compressed"] == summary["accuracy"]["pruned"]
    model = load_compressed(export)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[2, 5, 9]])).logits.shape == (1, 3)
    # The factored checkpoint holds the cut factors and the whitened flag; `prune` can cut it further.
    factored = load_factored_checkpoint(out / "factored")
    layers = svd_layers(factored).values()
    assert all(layer.whitened and layer.rank < min(layer.in_features, layer.out_features) for layer in layers)


@pytest.mark.parametrize("at_step", [None, 4])
def test_compress_prunes_on_the_steps_given(tiny_text_model, tiny_text_csv, tmp_path, at_step):
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), *FAST]
    args += ["--output_dir", str(tmp_path / "o"), "--prune_budget", "0.4", "--prune_start_step", "1"]
    args += ["--schedule", "gradual"] + ([] if at_step is None else ["--prune_at_step", str(at_step)])
    result = run([*args, "--prune_rank_multiple", "1", "--distill_alpha", "0"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    svd_stage = stage_output(result.stdout, "2/4", "3/4")
    assert "distill_loss" not in svd_stage  # --distill_alpha 0: no teacher
    fractions = [float(f) for f in re.findall(r"'rank_fraction': '([0-9.e-]+)'", svd_stage)]
    reached = 6 if at_step is None else at_step  # default: 60% of the 10 steps
    assert fractions[0] > fractions[1] > fractions[reached - 1] == fractions[-1]
    meta = json.loads((tmp_path / "o" / "compressed" / "config.json").read_text())["svd_compression"]
    assert kept_fraction(meta) <= 0.4


@pytest.mark.parametrize("init", ["asvd", "svd"])
def test_compress_starts_from_other_factors_and_fine_tunes_after(
    compressed_run, tiny_text_model, tiny_text_csv, tmp_path, init
):
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), *FAST]
    args += ["--output_dir", str(tmp_path / "o"), "--init", init, "--finetune_steps", "2"]
    result = run([*args, "--finetune_lr_scale", "0.3"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert f"[hf-svd-compress] 2/4 SVD training from {init} factors" in result.stdout
    summary = json.loads((tmp_path / "o" / "compressed" / "compression_summary.json").read_text())
    plain = json.loads((compressed_run[0] / "compressed" / "compression_summary.json").read_text())
    layer = next(iter(summary["spectra_initial"]))  # same dense model, another basis: another start
    assert summary["spectra_initial"][layer] != pytest.approx(plain["spectra_initial"][layer], rel=1e-3)
    rates = {}
    for stage, text, end in (("svd", "2/4", "3/4"), ("finetune", "3/4", "4/4")):
        rates[stage] = [
            float(r) for r in re.findall(r"'learning_rate': '([0-9.e-]+)'", stage_output(result.stdout, text, end))
        ]
    # The fine-tuning stage is a new schedule at 0.3 times the rate, without the teacher.
    assert len(rates["finetune"]) == 2 and rates["finetune"][0] == pytest.approx(0.3 * rates["svd"][0])
    assert "distill_loss" not in stage_output(result.stdout, "3/4", "4/4")
    card = (tmp_path / "o" / "compressed" / "README.md").read_text()
    assert f'"init": "{init}"' in card and '"finetune_lr_scale": 0.3' in card
    if init == "asvd":  # the factored checkpoint holds each layer's input_scale
        factored = load_factored_checkpoint(tmp_path / "o" / "factored")
        assert all(layer.input_scale is not None for layer in svd_layers(factored).values())


def test_prune_reprunes_the_factored_checkpoint(compressed_run):
    out, _ = compressed_run
    target = out / "reprune"
    # The default run kept 0.5 of the parameters: re-pruned to 0.4, it keeps less
    result = run(["prune", str(out / "factored"), "--budget", "0.4", "--output_dir", str(target)], cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((target / "config.json").read_text())["svd_compression"]
    assert meta["rank_selection"] == {"method": "budget", "budget": 0.4, "rank_multiple": 8}
    assert kept_fraction(meta) <= 0.4


def test_report_writes_summary_and_plots(compressed_run):
    out, _ = compressed_run
    main(["report", str(out / "compressed"), "--output_dir", str(out / "report")])
    assert {"report.md", "report.json", "ranks.png", "spectra.png"} <= {p.name for p in (out / "report").iterdir()}


def test_config_file_supplies_options_and_flags_override(tiny_text_model, tiny_text_csv, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_text_model}\ndataset: {tiny_text_csv}\nprune_budget: 2.0\n")
    result = run(["compress", "--config", str(config), "--output_dir", str(tmp_path / "o")], cwd=tmp_path)
    assert result.returncode != 0 and "prune_budget" in result.stderr  # the YAML value is validated
    config.write_text("no_such_option: 1\n")
    result = run(["compress", "--config", str(config)], cwd=tmp_path)
    assert result.returncode != 0 and "no_such_option" in result.stderr


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    """A refusal: exit status 2 and one `error:` line naming the problem, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model_name_or_path", "./no/such/folder"], "does not exist"),
        (["--text_column", "body"], "body"),
        (["--prune_energy", "1.5"], "--prune_energy 1.5: must be a finite number in (0, 1]"),
        (["--prune_energy", "0.9"], "the pipeline prunes to a parameter budget"),
        (["--prune_budget", "1.0"], "prune_budget"),
        (["--prune_at_step", "4"], "add --schedule gradual"),
        (["--schedule", "later"], "--schedule 'later': use one of"),
        (["--schedule", "gradual", "--prune_start_step", "6"], "--prune_start_step 6: gradual pruning runs from"),
        (
            ["--schedule", "gradual", "--prune_at_step", "11"],
            "--prune_at_step 11: in the pipeline it is a step of the SVD stage (10 steps",
        ),
        (["--schedule", "gradual", "--prune_at_step", "0"], "--prune_at_step 0: must be an integer >= 1"),
        (["--svd_steps", "5"], "--svd_steps 5: must be an integer >= 10"),
        (["--svd_steps", "0"], "--svd_steps 0: must be an integer >= 10"),
        (["--max_length", "0"], "--max_length 0: must be an integer >= 1"),
        (["--orth_weight", "nan"], "--orth_weight nan: must be a finite number >= 0"),
        (["--sparsity_weight", "inf"], "--sparsity_weight inf: must be a finite number >= 0"),
        (["--target_modules", "re:(unclosed"], "--target_modules 're:(unclosed': not a valid regex"),
        (["--target_modules", "no_such_layer"], "target_modules=['no_such_layer'] (exclude_modules=None) matched no"),
        (["--init", "pca"], "--init 'pca': use one of"),
        (["--finetune_lr_scale", "0"], "--finetune_lr_scale 0.0: must be a finite number > 0"),
        (["--calibration_batches", "0"], "--calibration_batches 0: must be an integer >= 1"),
        (["--export_dir", "/proc/hf-svd-export"], "--export_dir /proc/hf-svd-export: cannot write in /proc"),
        (["--resume_from_checkpoint", "o/svd/checkpoint-4"], "the pipeline cannot resume a stage"),
    ],
)
def test_bad_input_fails_before_training(tiny_text_model, tiny_text_csv, tmp_path, extra, message):
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), *FAST]
    result = run([*args, "--output_dir", str(tmp_path / "o"), *extra], cwd=tmp_path)
    assert_refused(result, message)
    assert "[hf-svd-compress] 1/4" not in result.stdout and "2/4" not in result.stdout
    assert not (tmp_path / "o" / "compressed").exists()


def test_unwritable_output_dir_is_refused_before_training(tiny_text_model, tiny_text_csv, tmp_path):
    # As root every permission bit allows writing: a folder under a file, and /proc, cannot be written by anyone.
    (tmp_path / "a_file").write_text("x")
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), *FAST]
    result = run([*args, "--output_dir", str(tmp_path / "a_file" / "out")], cwd=tmp_path)
    assert_refused(result, f"--output_dir {tmp_path / 'a_file' / 'out'}: {tmp_path / 'a_file'} is a file")
    result = run([*args, "--output_dir", "/proc/hf-svd-out"], cwd=tmp_path)
    assert_refused(result, "--output_dir /proc/hf-svd-out: cannot write in /proc")


def write_csv(path: Path, rows: list[tuple[str, object]]) -> Path:
    with open(path, "w", newline="") as f:
        f.write("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return path


def test_integer_labels_compress_and_export_their_names(tiny_text_model, tmp_path):
    words = ["market shares profit bank", "match goal team season"]
    data = write_csv(tmp_path / "ints.csv", [(f"{words[i % 2]} item {i}", i % 2) for i in range(40)])
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(data), *FAST]
    result = run([*args, "--output_dir", str(tmp_path / "o")], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    config = json.loads((tmp_path / "o" / "compressed" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"}  # a new 2-class head replaced the fixture's 3-class one


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([(f"market item {i}", "business") for i in range(30)], "--label_column 'label': dataset"),
        ([(f"market item {i}", i / 2) for i in range(30)], "needs integer or string labels"),
        ([], "could not read examples from it"),  # a header only
        (None, "the file is empty"),
    ],
)
def test_bad_data_is_refused_before_training_naming_the_file(tiny_text_model, tmp_path, rows, message):
    data = tmp_path / "data.csv"
    data.write_text("") if rows is None else write_csv(data, rows)
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(data), *FAST]
    result = run([*args, "--output_dir", str(tmp_path / "o")], cwd=tmp_path)
    assert_refused(result, message)
    assert str(data) in result.stderr or "'label'" in result.stderr
    assert "[hf-svd-compress] 1/4" not in result.stdout


def test_a_file_of_the_user_in_the_export_folder_is_refused(tiny_text_model, tiny_text_csv, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "README.md").write_text("my notes")
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), *FAST]
    result = run([*args, "--output_dir", str(tmp_path / "o"), "--export_dir", str(export)], cwd=tmp_path)
    assert_refused(result, f"--export_dir {export}: the folder holds ['README.md']")
    assert "[hf-svd-compress] 1/4" not in result.stdout
    assert (
        sorted(p.name for p in export.iterdir()) == ["README.md"] and (export / "README.md").read_text() == "my notes"
    )


def test_config_file_values_are_checked_like_flags(tiny_text_model, tiny_text_csv, tmp_path):
    config = tmp_path / "run.yaml"
    head = f"model_name_or_path: {tiny_text_model}\ndataset: {tiny_text_csv}\n"
    config.write_text(head + "prune_budget: [0.5, 0.3]\n")
    result = run(["compress", "--config", str(config), "--output_dir", str(tmp_path / "o")], cwd=tmp_path)
    assert_refused(result, f"--config {config}: prune_budget [0.5, 0.3]: give one value, not a list")
    config.write_text(head + "prune_budget: true\n")  # a bool is not a fraction: refused like --prune_budget True
    result = run(["compress", "--config", str(config), "--output_dir", str(tmp_path / "o")], cwd=tmp_path)
    assert result.returncode == 2 and "--prune_budget" in result.stderr and "'True'" in result.stderr
    assert not (tmp_path / "o").exists()


def test_config_file_targets_as_a_list_and_numbers_as_flags(tmp_path):
    from hf_svd_compress.cli import COMPRESS_DEFAULTS, parse_with_config
    from hf_svd_compress.pipeline import PipelineArguments
    from hf_svd_compress.tasks import TextTaskArguments
    from hf_svd_compress.training.arguments import SVDTrainingArguments

    config = tmp_path / "run.yaml"
    config.write_text("target_modules: [query, value]\nlearning_rate: 1e-4\nsvd_steps: 20\nbf16: false\n")
    types = (TextTaskArguments, PipelineArguments, SVDTrainingArguments)
    _, pipeline_args, args = parse_with_config(
        types, ["--config", str(config), "--output_dir", "x"], COMPRESS_DEFAULTS
    )
    assert pipeline_args.targets() == ["query", "value"] and pipeline_args.svd_steps == 20
    assert args.learning_rate == 1e-4 and args.bf16 is False  # YAML reads 1e-4 as a string: parsed like the flag


def test_export_folder_holding_a_model_is_refused(compressed_run, tiny_text_model, tiny_text_csv, tmp_path):
    out, _ = compressed_run
    before = (out / "compressed" / "model.safetensors").read_bytes()
    args = ["compress", "--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), *FAST]
    result = run([*args, "--output_dir", str(out)], cwd=tmp_path)
    assert result.returncode != 0 and "--overwrite_export" in result.stderr
    assert (out / "compressed" / "model.safetensors").read_bytes() == before


def test_prune_and_report_refuse_a_folder_that_is_not_an_export(compressed_run, tiny_text_model, tmp_path):
    out, _ = compressed_run
    # The export itself is not a factored checkpoint (prune's input); a dense model is not an export (report's).
    result = run(["prune", str(out / "compressed"), "--budget", "0.4", "--output_dir", str(tmp_path / "p")], cwd=out)
    assert_refused(result, "has no `svd_training` entry")
    assert not (tmp_path / "p").exists()
    result = run(["report", str(tiny_text_model), "--output_dir", str(tmp_path / "r")], cwd=out)
    assert_refused(result, "svd_compression")
    assert not (tmp_path / "r").exists() and not (tiny_text_model / "report").exists()


def test_prune_refuses_bad_values(compressed_run):
    out, _ = compressed_run
    for flag, value in (("--energy", "0"), ("--budget", "1.5")):
        result = run(["prune", str(out / "factored"), flag, value, "--output_dir", str(out / "x")], cwd=out)
        assert result.returncode != 0 and flag in result.stderr
        assert not (out / "x").exists()


def test_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit, match="compress"):
        main(["compres"])


def test_the_default_budget_and_an_explicit_one(tmp_path):
    from hf_svd_compress.cli import COMPRESS_DEFAULTS, parse_with_config
    from hf_svd_compress.pipeline import PipelineArguments
    from hf_svd_compress.tasks import TextTaskArguments
    from hf_svd_compress.training.arguments import SVDTrainingArguments

    types = (TextTaskArguments, PipelineArguments, SVDTrainingArguments)
    argv = ["--output_dir", str(tmp_path), "--prune_budget", "0.5"]
    *_, args = parse_with_config(types, argv, COMPRESS_DEFAULTS)
    assert (args.prune_budget, args.prune_energy) == (0.5, None)
    *_, args = parse_with_config(types, ["--output_dir", str(tmp_path)], COMPRESS_DEFAULTS)
    assert (args.prune_budget, args.prune_energy) == (0.5, None)
    with pytest.raises(ValueError, match="only one"):
        parse_with_config(types, [*argv, "--prune_energy", "0.8"], COMPRESS_DEFAULTS)
