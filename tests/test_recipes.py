"""The recipes under `accelerate launch --multi_gpu --num_processes 2` (two gloo processes on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import make_vit
from PIL import Image
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
    ViTImageProcessor,
    default_data_collator,
)

from hf_svd_compress import load_compressed, load_factored_checkpoint
from hf_svd_compress.tasks import (
    ImageTaskArguments,
    TextTaskArguments,
    setup_image_classification,
    setup_text_classification,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# The line of docs/howto.md and the recipes' docstrings, as written: no --use_cpu, no other launcher flag.
DOCUMENTED = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH = [*DOCUMENTED, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
STEPS = ["--dense_steps", "2", "--svd_steps", "10", "--per_device_train_batch_size", "4", "--calibration_batches", "2"]
STEPS += ["--logging_steps", "1", "--disable_tqdm", "true"]

pytestmark = pytest.mark.distributed


def launch(script: str, args: list[str], cwd: Path, launcher: list[str] = LAUNCH) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, str(RECIPES / script), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def check_export(out: Path, result: subprocess.CompletedProcess, task: Any) -> None:
    """One export, on the main process, that computes (and scores) what the trained model did, through every loader."""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # Saving happens once, on the main process: one export line, one folder, no leftover staging folders.
    assert result.stdout.count("[hf-svd-compress] 4/4") == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("compressed")) == ["compressed"]
    summary = json.loads((out / "compressed" / "compression_summary.json").read_text())
    assert summary["ranks"] and all(v >= 1 for v in summary["ranks"].values())
    # The reloaded model on the recipe's own validation split scores what the trained model scored there.
    args = TrainingArguments(
        out / "check", use_cpu=True, per_device_eval_batch_size=4, report_to=[], remove_unused_columns=False
    )
    setup_task = setup_text_classification if isinstance(task, TextTaskArguments) else setup_image_classification
    setup = setup_task(task, args)
    loaded = load_compressed(out / "compressed")
    trainer = Trainer(loaded, args, data_collator=setup.data_collator, compute_metrics=setup.compute_metrics)
    scores = trainer.evaluate(setup.eval_dataset)
    assert scores["eval_accuracy"] == pytest.approx(summary["accuracy"]["compressed"]["accuracy"])
    # The export computes the model the recipe trained: without a fine-tuning stage, the factored model it saved
    # after the SVD stage (`<output_dir>/factored`), truncated. All three loaders give its logits.
    batch = (setup.data_collator or default_data_collator)([setup.eval_dataset[i] for i in range(2)])
    batch = {k: v for k, v in batch.items() if k not in ("labels", "label")}
    auto = AutoModelForImageClassification if "pixel_values" in batch else AutoModelForSequenceClassification
    with torch.no_grad():
        trained = load_factored_checkpoint(out / "factored").eval()(**batch).logits
        for model in (
            loaded,
            load_compressed(out / "compressed", trainable=True),
            auto.from_pretrained(out / "compressed", trust_remote_code=True),
        ):
            torch.testing.assert_close(model.eval()(**batch).logits, trained, atol=1e-5, rtol=1e-4)
        # Not vacuous: training and the cut moved the function well away from the base model's.
        base = auto.from_pretrained(task.model_name_or_path).eval()(**batch).logits
    assert (base - trained).abs().max() > 1e-3


def test_text_recipe_two_processes_with_the_documented_line(tiny_text_model, tiny_text_csv, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: one DDP job of two processes."""
    args = ["--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), "--max_length", "16"]
    result = launch("text_classification.py", [*args, *STEPS, "--output_dir", str(tmp_path)], tmp_path, DOCUMENTED)
    task = TextTaskArguments(model_name_or_path=str(tiny_text_model), dataset=str(tiny_text_csv), max_length=16)
    check_export(tmp_path, result, task)
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in result.stderr
    # Each process trained on half the batches: the SVD stage logs its 10 steps once, from the main process.
    assert result.stdout.count("'distill_loss'") == 10


def test_recipe_refusals_are_one_error_line_per_process(tiny_text_model, tiny_text_csv, tmp_path):
    args = ["--model_name_or_path", str(tiny_text_model), "--dataset", str(tiny_text_csv), "--target_modules", "nope"]
    result = launch("text_classification.py", [*args, *STEPS, "--output_dir", str(tmp_path / "o")], tmp_path)
    # The launcher reports its failed children with its own traceback; no frame of the recipe or the package shows.
    assert result.returncode != 0 and 'recipes/text_classification.py", line' not in result.stderr
    assert "hf_svd_compress/" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("target_modules=['nope']" in line for line in errors)
    assert "[hf-svd-compress] 1/4" not in result.stdout


@pytest.fixture(scope="module")
def tiny_vit_and_images(tmp_path_factory):
    """A tiny ViT with its image processor, and an image folder with two classes of 16 x 16 images."""
    root = tmp_path_factory.mktemp("vision")
    make_vit(num_labels=2).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "vit")
    rng = np.random.default_rng(0)
    for label, base in (("dark", 40), ("bright", 200)):
        (root / "images" / label).mkdir(parents=True)
        for i in range(24):
            pixels = np.clip(base + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / label / f"{i}.png")
    return root / "vit", root / "images"


@pytest.mark.parametrize("init", ["whitened", "asvd"])
def test_image_recipe_two_processes_from_data_aware_factors(tiny_vit_and_images, tmp_path, init):
    model_dir, images = tiny_vit_and_images
    args = ["--model_name_or_path", str(model_dir), "--dataset", str(images), "--eval_size", "8", "--init", init]
    result = launch("image_classification.py", [*args, *STEPS, "--output_dir", str(tmp_path)], tmp_path)
    check_export(
        tmp_path, result, ImageTaskArguments(model_name_or_path=str(model_dir), dataset=str(images), eval_size=8)
    )
    assert result.stdout.count(f"from {init} factors") == 1  # stage lines are printed by the main process
