"""peft with compressed models: LoRA on the exported `down`/`up` layers, merged, and exported again."""

from __future__ import annotations

import pytest
import torch
from builders import bert_inputs, make_bert
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from hf_svd_compress import (
    SVDConfig,
    SVDLinear,
    current_ranks,
    load_compressed,
    lowrank_to_svd_,
    prune_,
    save_compressed,
    svd_factorize_,
    svd_layers,
    svd_to_lowrank_,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = svd_factorize_(make_bert(), SVDConfig())
    with torch.no_grad():
        for layer in svd_layers(model).values():
            layer.mask[5:] = False
    folder = tmp_path_factory.mktemp("peft") / "bert-svd"
    save_compressed(model, folder)
    return folder


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**bert_inputs()).logits


def train_lora(model, target_modules: list[str], steps: int = 2):
    """Wrap in LoRA, take a few AdamW steps on a toy batch, and return the merged model."""
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=target_modules))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(**bert_inputs(), labels=torch.tensor([0, 1])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model.merge_and_unload()


def test_lora_on_load_compressed_model(exported, tmp_path):
    model = load_compressed(exported)
    before = logits(model)
    svd_to_lowrank_(model)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-4)
    merged = train_lora(model, ["down", "up"])
    tuned = logits(merged)
    assert not torch.allclose(tuned, before, atol=1e-4)  # the adapter learned something

    lowrank_to_svd_(merged)
    layers = svd_layers(merged)
    assert len(layers) == 12 and set(current_ranks(merged).values()) == {5}
    for layer in layers.values():  # orthonormal again after the merge
        eye = torch.eye(layer.full_rank)
        torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(merged), tuned, atol=1e-5, rtol=1e-4)

    save_compressed(merged, tmp_path / "tuned")
    torch.testing.assert_close(logits(load_compressed(tmp_path / "tuned")), tuned, atol=1e-5, rtol=1e-4)


def test_lora_on_remote_code_model(exported, tmp_path):
    remote = AutoModelForSequenceClassification.from_pretrained(exported, trust_remote_code=True)
    merged = train_lora(remote, ["down", "up"])
    assert sum(type(m).__name__ == "LowRankLinear" for m in merged.modules()) == 12
    tuned = logits(merged)

    save_compressed(merged, tmp_path / "tuned")  # LowRankLinear layers export directly
    torch.testing.assert_close(logits(load_compressed(tmp_path / "tuned")), tuned, atol=1e-5, rtol=1e-4)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tuned", trust_remote_code=True)
    torch.testing.assert_close(logits(again), tuned, atol=1e-5, rtol=1e-4)


def test_merged_lora_model_can_be_factored_and_compressed(tmp_path):
    merged = train_lora(make_bert(), ["query", "value"])
    assert not any("lora" in name for name, _ in merged.named_modules())
    dense_logits = logits(merged)
    svd_factorize_(merged, SVDConfig())
    torch.testing.assert_close(logits(merged), dense_logits, atol=1e-5, rtol=1e-4)
    prune_(merged, energy=0.999)
    save_compressed(merged, tmp_path / "lora-svd")
    loaded = load_compressed(tmp_path / "lora-svd")
    assert all(isinstance(m, SVDLinear) for m in svd_layers(loaded).values())
    torch.testing.assert_close(logits(loaded), logits(merged), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(loaded), dense_logits, atol=5e-3, rtol=0)
