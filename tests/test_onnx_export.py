"""ONNX export (`export_onnx`, `hf-svd-compress export-onnx`): onnxruntime graphs that match PyTorch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from builders import BY_NAME
from test_architectures import compressed

from hf_svd_compress import save_compressed
from hf_svd_compress.hub.onnx import check_onnx_installed, export_onnx

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(params=["bert", "vit"])
def exported(request, tmp_path):
    arch = BY_NAME[request.param]
    model = compressed(arch)
    save_compressed(model, tmp_path / "export")
    return arch, model, tmp_path / "export"


def test_round_trip_matches_pytorch_at_other_shapes(exported):
    arch, model, folder = exported
    result = export_onnx(folder)
    assert result.path == folder / "onnx" / "model.onnx" and result.max_abs_diff < 1e-4
    assert (folder / "onnx" / "config.json").is_file()
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # dynamic batch axis (and sequence axis, for text)
        inputs = arch.inputs(batch=batch)
        feed = {k: v.numpy() for k, v in inputs.items() if k in result.input_names}
        (got,) = session.run(None, feed)
        with torch.no_grad():
            expected = model(**{k: inputs[k] for k in result.input_names}).logits
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)


def test_factored_layers_are_two_matmuls(exported):
    _, model, folder = exported
    graph = onnx.load(str(export_onnx(folder, optimize=False).path)).graph
    meta = json.loads((folder / "config.json").read_text())["svd_compression"]
    dense = len(meta["dense_modules"])
    attention = 2 * model.config.num_hidden_layers  # QK^T and AV per layer
    matmuls = Counter(node.op_type for node in graph.node)["MatMul"]
    # down and up per factored layer; the head (and a dense layer) may become a Gemm
    assert matmuls >= 2 * (len(meta["ranks"]) - dense) + attention


def test_existing_graph_is_kept_without_overwrite(exported):
    _, _, folder = exported
    first = export_onnx(folder).path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        export_onnx(folder)
    assert (folder / "onnx" / "model.onnx").read_bytes() == first
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_dense_checkpoint_exports_too(tmp_path):
    model = BY_NAME["bert"].build()
    model.save_pretrained(tmp_path / "dense")
    assert export_onnx(tmp_path / "dense").max_abs_diff < 1e-4


def test_missing_onnxruntime_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name))
    with pytest.raises(ImportError, match=r"onnxruntime.*hf_svd_compress\[onnx\]"):
        check_onnx_installed()


def test_cli_prints_the_difference(tmp_path):
    save_compressed(compressed(BY_NAME["bert"]), tmp_path / "export")
    run = [sys.executable, "-m", "hf_svd_compress.cli", "export-onnx", str(tmp_path / "export")]
    result = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    diff = float(result.stdout.split("max abs diff to PyTorch: ")[1].split()[0])
    assert diff < 1e-4 and (tmp_path / "export" / "onnx" / "model.onnx").is_file()
    again = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "overwrite" in again.stderr
