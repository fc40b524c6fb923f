"""The user path on every supported architecture family, with the default targets (tests/architectures.py).

For each architecture: factor (the default targets, counted by hand), a training step, prune to half the
parameters, export, reload with our loader (lean and trainable) and with remote code in a fresh process where
`hf_svd_compress` cannot be imported, then a `save_pretrained` re-save that plain classes still refuse. Plus
`pipeline()`, sentence-transformers and `generate()` on the exports.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from builders import ARCHITECTURES, BY_NAME, Arch, loss_inputs, outputs
from safetensors import safe_open
from test_export import fresh_case, run_fresh

from hf_svd_compress import SVDConfig, load_compressed, prune_, save_compressed, svd_factorize_, svd_layers
from hf_svd_compress.hub.templates.modeling_svd_compressed import GUARD_KEY

# Default targets per architecture (2 blocks each unless noted), written out by hand: every linear layer of the
# repeated blocks, never embeddings, poolers or heads.
EXPECTED_TARGETS = {
    "bert": 12,  # query, key, value, attention.output.dense, intermediate.dense, output.dense
    "roberta": 12,
    "distilbert": 12,  # q_lin, k_lin, v_lin, out_lin, ffn.lin1, ffn.lin2
    "albert": 6,  # one shared layer
    "electra": 12,
    "deberta-v2": 12,
    "mpnet": 12,
    "xlm-roberta": 12,
    "modernbert": 12,  # 3 layers of Wqkv, Wo, mlp.Wi, mlp.Wo
    "vit": 12,
    "deit": 12,
    "beit": 12,
    "swin": 13,  # 2 blocks of 6, and the patch merging's reduction between the stages
    "clip-vision": 12,
    "dinov2": 12,
    "gpt2": 8,  # c_attn, c_proj, mlp.c_fc, mlp.c_proj (Conv1D)
    "llama": 14,  # q, k, v, o, gate, up, down
    "qwen2": 14,
    "t5": 32,  # encoder: q, k, v, o, wi, wo; decoder: self and cross attention, wi, wo
}


def compressed(arch: Arch) -> torch.nn.Module:
    """`arch` factored with the default targets, after one training step, pruned to half its parameters."""
    model = arch.build()
    svd_factorize_(model, SVDConfig())
    model.train()
    loss = model(**loss_inputs(arch, arch.inputs())).loss
    loss.backward()
    layer = next(iter(svd_layers(model).values()))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in (layer.U, layer.s, layer.V))
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad
    prune_(model, budget=0.5)
    return model.eval()


def test_every_family_is_listed():
    assert set(EXPECTED_TARGETS) == set(BY_NAME)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_default_targets_and_user_path(arch, tmp_path):
    model = arch.build()
    svd_factorize_(model, SVDConfig())
    assert len(svd_layers(model)) == EXPECTED_TARGETS[arch.name]

    model = compressed(arch)
    inputs = arch.inputs()
    expected = outputs(model, inputs)
    save_compressed(model, tmp_path / "export")

    lean = load_compressed(tmp_path / "export")
    assert not svd_layers(lean) and any(type(m).__name__ == "LowRankLinear" for m in lean.modules())
    torch.testing.assert_close(outputs(lean, inputs), expected, atol=1e-4, rtol=1e-4)
    trainable = load_compressed(tmp_path / "export", trainable=True)
    assert set(svd_layers(trainable)) == set(svd_layers(model))
    torch.testing.assert_close(outputs(trainable, inputs), expected, atol=1e-4, rtol=1e-4)

    # A re-save of the loaded model keeps the guard, loads with remote code, and plain classes still refuse it.
    lean.save_pretrained(tmp_path / "resaved")
    remote = arch.auto.from_pretrained(tmp_path / "resaved", trust_remote_code=True).eval()
    torch.testing.assert_close(outputs(remote, inputs), expected, atol=1e-4, rtol=1e-4)
    plain = getattr(transformers, arch.task_class)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        plain.from_pretrained(tmp_path / "resaved")


def test_remote_code_without_the_package_on_every_family(tmp_path):
    cases = []
    for arch in ARCHITECTURES:
        model = compressed(arch)
        folder = tmp_path / arch.name
        save_compressed(model, folder)
        inputs = arch.inputs()
        cases.append({**fresh_case(folder, inputs, outputs(model, inputs), arch.auto, atol=1e-4), "loader": "remote"})
    out = run_fresh(cases, tmp_path, block_package=True)
    assert out.count("ok remote") == len(ARCHITECTURES)


def test_guard_tensors_are_written_by_both_saves(tmp_path):
    """A plain class fails on the zero-size weight; its load report lists GUARD_KEY (`...trust_remote_code=True`)."""
    arch = BY_NAME["bert"]
    save_compressed(compressed(arch), tmp_path / "export")
    load_compressed(tmp_path / "export").save_pretrained(tmp_path / "resaved")
    for folder in ("export", "resaved"):
        with safe_open(tmp_path / folder / "model.safetensors", "pt") as f:
            empty = [k for k in f.keys() if f.get_slice(k).get_shape() == [0]]
        assert GUARD_KEY in empty and len(empty) == 2 and "trust_remote_code=True" in GUARD_KEY


def test_weight_reads_compose_nothing_and_uses_compose():
    arch = BY_NAME["t5"]
    model = compressed(arch)
    layer = model.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo")
    weight = layer.weight
    assert isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and weight.shape == (32, 64)
    torch.testing.assert_close(weight @ torch.eye(64), layer.composed_weight())
    with pytest.raises(RuntimeError, match="write the factors"):
        weight.zero_()
    # Gradients reach the factors through a composed weight.
    (layer.weight * 1.0).sum().backward()
    assert layer.s.grad is not None


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_pipeline_on_the_lean_export(name, tmp_path):
    arch = BY_NAME[name]
    save_compressed(compressed(arch), tmp_path / "export")
    model = load_compressed(tmp_path / "export")
    if arch.kind == "image":
        from transformers import ViTImageProcessor

        processor = ViTImageProcessor(size={"height": 32, "width": 32})
        classify = transformers.pipeline("image-classification", model=model, image_processor=processor)
        from PIL import Image

        result = classify(Image.new("RGB", (40, 40), color=(120, 30, 200)))
    else:
        tokenizer = _tokenizer(tmp_path)
        classify = transformers.pipeline("text-classification", model=model, tokenizer=tokenizer)
        result = classify("market shares rose")
    assert result and 0 <= result[0]["score"] <= 1


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "t5"])
def test_generate_matches_the_in_memory_model(name, tmp_path):
    arch = BY_NAME[name]
    model = compressed(arch)
    save_compressed(model, tmp_path / "export")
    inputs = {k: v[1:] for k, v in arch.inputs().items() if k in ("input_ids", "attention_mask")}
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(**inputs, **settings)
    for loaded in (
        load_compressed(tmp_path / "export"),
        arch.auto.from_pretrained(tmp_path / "export", trust_remote_code=True),
    ):
        assert torch.equal(loaded.generate(**inputs, **settings), expected)


def test_sentence_transformers_encodes_like_the_in_memory_model(tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    arch = BY_NAME["bert"]
    model = compressed(arch)
    base = transformers.AutoModel  # sentence-transformers loads the bare encoder
    save_compressed(model, tmp_path / "export", processing_class=_tokenizer(tmp_path))
    encoder = sentence_transformers.SentenceTransformer(str(tmp_path / "export"), trust_remote_code=True, device="cpu")
    texts = ["market shares rose", "the team won the match"]
    got = torch.as_tensor(encoder.encode(texts))
    tokens = _tokenizer(tmp_path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.bert(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(got, (hidden * mask).sum(1) / mask.sum(1), atol=1e-4, rtol=1e-4)
    assert base.from_pretrained(tmp_path / "export", trust_remote_code=True) is not None


def _tokenizer(tmp_path):
    """A word-level tokenizer over the tiny vocabulary (ids below the tiny models' 99)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "market shares rose the team won match film music".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
