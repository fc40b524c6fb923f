"""Data-aware start: `activation_scales` and `svd_factorize_(..., input_scales=...)` on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import forward, make_bert, make_vit, vit_inputs
from conftest import relative_error
from torch import nn

from hf_svd_compress import (
    SVDConfig,
    SVDLinear,
    activation_scales,
    load_compressed,
    prune_,
    save_compressed,
    svd_factorize_,
    svd_layers,
    truncate_,
)

AWARE = SVDConfig()  # the orthogonality term on: U and V are orthonormal
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def text_examples(count: int = 6, seq: int = 7) -> list[dict[str, torch.Tensor]]:
    """Token examples with trailing padding of different lengths (the collator stacks them)."""
    g = torch.Generator().manual_seed(3)
    examples = []
    for i in range(count):
        mask = torch.ones(seq, dtype=torch.long)
        mask[seq - i % 3 :] = 0
        examples.append({"input_ids": torch.randint(0, 100, (seq,), generator=g), "attention_mask": mask, "label": 1})
    return examples


def reference_scales(model: nn.Module, examples: list[dict], name: str, alpha: float) -> torch.Tensor:
    """mean |x| ** alpha over the unpadded positions of layer `name`, one example at a time (no batching)."""
    module, rows = model.get_submodule(name), []
    handle = module.register_forward_pre_hook(lambda _m, args: rows.append(args[0][0]))
    with torch.no_grad():
        for ex in examples:
            model(input_ids=ex["input_ids"][None], attention_mask=ex["attention_mask"][None])
    handle.remove()
    kept = torch.cat([r[ex["attention_mask"].bool()] for r, ex in zip(rows, examples)])
    return kept.abs().double().mean(0).pow(alpha).float()


def test_activation_scales_match_a_per_example_reference_without_padding():
    model, examples = make_bert(), text_examples()
    model.train()  # restored afterwards
    scales = activation_scales(model, examples, AWARE, batch_size=4, max_batches=2)
    assert model.training
    assert list(scales) == list(svd_layers(svd_factorize_(make_bert(), AWARE)))  # the layers it would factor
    for name in ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"):
        expected = reference_scales(make_bert(), examples, name, 0.5)
        assert torch.allclose(scales[name], expected, rtol=1e-5), name
    # max_batches bounds the examples seen: one batch of 2 gives the scales of the first two examples only.
    first_two = activation_scales(make_bert(), examples, AWARE, batch_size=2, max_batches=1, alpha=1.0)
    name = "bert.encoder.layer.0.intermediate.dense"
    assert torch.allclose(first_two[name], reference_scales(make_bert(), examples[:2], name, 1.0), rtol=1e-5)


def test_data_aware_factors_compute_the_dense_function_in_a_new_basis():
    dense, examples = make_bert(), text_examples()
    scales = activation_scales(dense, examples, AWARE, batch_size=3)
    inputs = {"input_ids": torch.stack([e["input_ids"] for e in examples])}
    inputs["attention_mask"] = torch.stack([e["attention_mask"] for e in examples])
    with torch.no_grad():
        reference = forward(dense, inputs)
    aware = svd_factorize_(make_bert(), AWARE, input_scales=scales)
    plain = svd_factorize_(make_bert(), AWARE)
    with torch.no_grad():
        assert relative_error(forward(aware, inputs), reference) < 1e-5
    dense_modules = dict(make_bert().named_modules())
    for name, layer in svd_layers(aware).items():
        assert isinstance(layer, SVDLinear) and layer.rank == layer.full_rank
        eye = torch.eye(layer.full_rank)
        assert torch.allclose(layer.U.T @ layer.U, eye, atol=1e-5)  # both factors orthonormal
        assert torch.allclose(layer.V.T @ layer.V, eye, atol=1e-5)
        assert torch.equal(layer.input_scale, scales[name])  # kept as the fixed buffer
        # s is the spectrum of W diag(a), not W's
        expected = torch.linalg.svdvals(dense_modules[name].weight.double() * scales[name].double())
        assert torch.allclose(layer.s.double(), expected, rtol=1e-5), name
        assert not torch.allclose(layer.s, svd_layers(plain)[name].s, rtol=1e-3)
        with torch.no_grad():  # the dense weight's factors, as export reads them
            U, s, V = layer.live_factors()
            assert relative_error((U * s) @ V.T, dense_modules[name].weight) < 1e-5


def test_data_aware_layers_prune_and_truncate_as_asvd_does(monkeypatch):
    """Pruning ranks ASVD's spectrum: the same masks as the quality benchmark's ASVD baseline (`quality_lib.asvd`)
    at a budget, the same weights; truncation keeps `input_scale` and the function."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from quality_lib.asvd import asvd_factorize_

    examples = text_examples()
    raw = activation_scales(make_bert(), examples, AWARE, batch_size=3, alpha=1.0)  # mean |x|, as the benchmark's
    library = svd_factorize_(make_bert(), AWARE, input_scales={n: a.pow(0.5) for n, a in raw.items()})
    baseline = asvd_factorize_(make_bert(), AWARE, raw, alpha=0.5)
    prune_(library, budget=0.5)
    prune_(baseline, budget=0.5)
    inputs = {"input_ids": torch.stack([e["input_ids"] for e in examples])}
    with torch.no_grad():
        pruned = forward(library, inputs)
    for name, layer in svd_layers(library).items():
        other = svd_layers(baseline)[name]
        assert torch.equal(layer.mask, other.mask), name
        with torch.no_grad():
            assert relative_error(layer.composed_weight(), other.composed_weight()) < 1e-5, name
    truncate_(library)
    for layer in svd_layers(library).values():
        assert layer.full_rank == layer.rank and layer.input_scale.shape == (layer.in_features,)
    with torch.no_grad():
        assert relative_error(forward(library, inputs), pruned) < 1e-6


def test_data_aware_layers_save_and_reload_through_the_hub_format(tmp_path):
    examples = text_examples()
    model = svd_factorize_(make_bert(), AWARE, input_scales=activation_scales(make_bert(), examples, AWARE))
    prune_(model, budget=0.5)
    inputs = {"input_ids": torch.stack([e["input_ids"] for e in examples])}
    model.eval()
    with torch.no_grad():
        expected = forward(model, inputs)
    save_compressed(model, tmp_path / "export")
    with torch.no_grad():
        assert relative_error(forward(load_compressed(tmp_path / "export"), inputs), expected) < 1e-5


def test_refusals_name_the_fix_and_leave_the_model_unchanged():
    scales = activation_scales(make_bert(), text_examples(), AWARE)
    cases = [
        (SVDConfig(parameterization="householder"), scales, 'parameterization="svd"'),
        (SVDConfig(init_energy=0.9), scales, "init_energy"),
        (AWARE, dict(list(scales.items())[1:]), "no scales for"),
        (AWARE, {**scales, "bert.encoder.layer.0.output.dense": torch.ones(5)}, "expected 64 finite"),
        (AWARE, {**scales, "bert.encoder.layer.0.output.dense": torch.full((64,), float("nan"))}, "finite"),
        (AWARE, {**scales, "bert.encoder.layer.0.output.dense": torch.zeros(64)}, "not all zero"),
    ]
    for config, given, message in cases:
        model = make_bert()
        with pytest.raises(ValueError, match=message):
            svd_factorize_(model, config, input_scales=given)
        assert not svd_layers(model), message  # nothing swapped
    conv = SVDConfig(target_modules=["vit.embeddings.patch_embeddings.projection", "query"])
    with pytest.raises(ValueError, match="linear layers only"):
        activation_scales(make_vit(), [{"pixel_values": vit_inputs(1)["pixel_values"][0]}], conv)
    with pytest.raises(ValueError, match="dataset is empty"):
        activation_scales(make_bert(), [], AWARE)


def test_vit_scales_use_every_patch():
    model = make_vit()
    examples = [{"pixel_values": x, "labels": 0} for x in vit_inputs(4)["pixel_values"]]
    scales = activation_scales(model, examples, AWARE, batch_size=2)
    aware = svd_factorize_(make_vit(), AWARE, input_scales=scales)
    inputs = vit_inputs(4)
    with torch.no_grad():
        assert relative_error(forward(aware, inputs), forward(make_vit(), inputs)) < 1e-5
