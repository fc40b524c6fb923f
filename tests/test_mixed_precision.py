"""bf16 on the CPU: autocast training (`bf16=True`) and bf16-loaded models.

The SVD, the regularizers and the pruning decisions stay in float32 whatever the training dtype; the exported model
keeps the dtype the user trained in (float32 weights under autocast, bf16 for a bf16-loaded model).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from builders import make_bert
from datasets import Dataset
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from hf_svd_compress import (
    SVDConfig,
    SVDLinear,
    SVDTrainer,
    SVDTrainingArguments,
    current_ranks,
    load_compressed,
    prune_,
    save_compressed,
    svd_factorize_,
    svd_layers,
)
from hf_svd_compress.layers.regularizers import regularizer_totals

CONFIG = SVDConfig(orth_weight=1.0, sparsity="hoyer", sparsity_weight=0.05)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny dense BERT saved in float32, to load in bf16 as users do (`dtype=torch.bfloat16`)."""
    path = tmp_path_factory.mktemp("bert")
    make_bert().save_pretrained(path)
    return path


def load(checkpoint, dtype: torch.dtype = torch.float32) -> BertForSequenceClassification:
    return BertForSequenceClassification.from_pretrained(checkpoint, dtype=dtype)


def data(n: int = 16) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (n, 10), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})


def train(model, tmp_path, **kw) -> SVDTrainer:
    args = SVDTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        prune_at_step=2,
        prune_energy=0.8,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        **kw,
    )
    trainer = SVDTrainer(model=model, args=args, train_dataset=data())
    trainer.train()
    return trainer


def perturb_factors(model, scale: float = 1e-2) -> None:
    """Move U and V off orthonormality so the orthogonality term is well above float32 rounding."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in svd_layers(model).values():
            for p in (layer.U, layer.V):
                p.add_((scale * torch.randn(p.shape, generator=g)).to(p.dtype))


def recorded_terms(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the terms the layers record in a training forward pass (what SVDTrainer adds to the loss)."""
    layers = list(svd_layers(model).values())
    for layer in layers:
        layer.regularizer_terms.clear()
        layer.orth_enabled, layer.sparsity_kind = True, "hoyer"
    model.train()
    model(input_ids=torch.tensor(data(4)["input_ids"]))
    terms = [t for layer in layers for t in layer.regularizer_terms]
    for layer in layers:
        layer.orth_enabled, layer.sparsity_kind = False, None
        layer.regularizer_terms.clear()
    assert len(terms) == len(layers)
    return torch.stack([o for o, _ in terms]).sum(), torch.stack([s for _, s in terms]).sum()


# ---- SVD and regularizers in float32 ------------------------------------------------------------------------------


def test_bf16_loaded_model_is_factored_in_float32(checkpoint, monkeypatch):
    model = load(checkpoint, torch.bfloat16)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    seen = []
    real_svd = torch.linalg.svd

    def spy(A, *args, **kwargs):
        seen.append(A.dtype)
        return real_svd(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    svd_factorize_(model, CONFIG)
    layers = svd_layers(model)
    assert seen == [torch.float32] * len(layers)
    for name, layer in layers.items():
        assert {p.dtype for p in (layer.U, layer.s, layer.V, layer.bias)} == {torch.bfloat16}
        # The float32 SVD of the bf16 weight, rounded to bf16 once at the end.
        W = weights[name].float()
        torch.testing.assert_close(layer.s, real_svd(W)[1].to(torch.bfloat16), rtol=2**-8, atol=0)
        composed = (layer.U.float() * layer.s.float()) @ layer.V.float().T
        assert (composed - W).norm() / W.norm() < 1e-2, name


def test_regularizers_stay_float32_under_autocast(checkpoint):
    model = svd_factorize_(load(checkpoint), CONFIG)
    perturb_factors(model, scale=1e-3)
    expected = regularizer_totals(svd_layers(model).values(), "hoyer")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        orth, sparsity = recorded_terms(model)
    assert orth.dtype == sparsity.dtype == torch.float32
    # A bf16 matmul in A^T A - I would be off by far more than this.
    torch.testing.assert_close(orth, expected[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(sparsity, expected[1], rtol=1e-5, atol=0)


def test_regularizers_of_a_bf16_model_are_float32(checkpoint):
    model = svd_factorize_(load(checkpoint, torch.bfloat16), CONFIG)
    perturb_factors(model)
    orth, sparsity = recorded_terms(model)
    assert orth.dtype == sparsity.dtype == torch.float32
    # The same terms as from float32 copies of the (bf16-valued) factors.
    reference = copy.deepcopy(model).float()
    expected = regularizer_totals(svd_layers(reference).values(), "hoyer")
    torch.testing.assert_close(orth, expected[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(sparsity, expected[1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("how", [{"energy": 0.9}, {"energy": 0.5}, {"budget": 0.4}])
def test_pruning_a_bf16_model_decides_as_on_float32_values(checkpoint, how):
    model = svd_factorize_(load(checkpoint, torch.bfloat16), CONFIG)
    reference = copy.deepcopy(model).float()
    assert prune_(model, **how) == prune_(reference, **how)
    for name, layer in svd_layers(model).items():
        kept = layer.s.detach().float()[layer.mask].sort().values
        expected = reference.get_submodule(name)
        torch.testing.assert_close(kept, expected.s.detach()[expected.mask].sort().values, rtol=0, atol=0)


# ---- training and export --------------------------------------------------------------------------------------------


def test_autocast_training_keeps_float32_weights_and_exports_float32(checkpoint, tmp_path):
    model = svd_factorize_(load(checkpoint), CONFIG)
    outputs = []
    hook = next(iter(svd_layers(model).values())).register_forward_hook(lambda m, i, o: outputs.append(o.dtype))
    trainer = train(model, tmp_path, bf16=True)
    hook.remove()
    assert torch.bfloat16 in outputs  # autocast really ran the factored layers in bf16
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert all(torch.isfinite(torch.tensor(entry["orth_loss"])) for entry in logs)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert any(layer.rank < layer.full_rank for layer in svd_layers(model).values())

    save_compressed(model, tmp_path / "out")
    floats = {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values() if t.is_floating_point()}
    assert floats == {torch.float32}
    assert load_compressed(tmp_path / "out").dtype == torch.float32


def test_bf16_model_trains_and_exports_bf16(checkpoint, tmp_path):
    model = svd_factorize_(load(checkpoint, torch.bfloat16), CONFIG)
    trainer = train(model, tmp_path, bf16=True)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ranks = current_ranks(model)
    assert any(rank < svd_layers(model)[name].full_rank for name, rank in ranks.items())

    save_compressed(model, tmp_path / "out")
    floats = {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values() if t.is_floating_point()}
    assert floats == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_compressed(tmp_path / "out", trainable=True)
    assert loaded.dtype == torch.bfloat16
    assert all(isinstance(loaded.get_submodule(name), SVDLinear) for name in ranks)
    assert current_ranks(loaded) == ranks
    inputs = {"input_ids": torch.tensor(data(4)["input_ids"])}
    model.eval()
    with torch.no_grad():
        expected, got = model(**inputs).logits.float(), loaded(**inputs).logits.float()
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
