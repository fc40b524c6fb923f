"""`SVDConv2d`: channel- and spatial-wise factored convolutions, their integration (factoring, pruning, training,
export, remote code, peft) on a tiny ViT's patch embedding and a small CNN."""

from __future__ import annotations

import json

import builders
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import seed_everything
from conftest import relative_error
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForImageClassification, ViTForImageClassification

from hf_svd_compress import (
    CompressedFormatError,
    SVDConfig,
    SVDLinear,
    SVDTrainer,
    SVDTrainingArguments,
    current_ranks,
    load_compressed,
    load_factored_checkpoint,
    lowrank_to_svd_,
    merge_to_dense_,
    prune_,
    save_compressed,
    svd_factorize_,
    svd_layers,
    svd_to_lowrank_,
    truncate_,
)
from hf_svd_compress.config import METADATA_KEY
from hf_svd_compress.hub.templates.modeling_svd_compressed import LowRankConv2d
from hf_svd_compress.layers.conv import SVDConv2d, kernel_to_matrix

MODES = ["channel", "spatial"]
# (kernel_size, stride, padding, dilation, bias): square/rectangular kernels, strides, paddings, dilations.
GEOMETRIES = {
    "3x3": (3, 1, 1, 1, True),
    "3x3-no-bias": (3, 1, 1, 1, False),
    "3x2-stride-dilation": ((3, 2), (2, 1), (1, 0), (1, 2), True),
    "2x3-all": ((2, 3), (3, 2), (2, 1), (2, 1), True),
    "valid-stride2": (3, 2, "valid", 1, True),
    "same-odd": (3, 1, "same", 2, True),
    "same-even": (4, 1, "same", 1, True),  # PyTorch pads asymmetrically; each factor conv does the same
    "same-even-dilated": (2, 1, "same", (3, 2), False),
    "1x3": ((1, 3), 1, (0, 2), (1, 3), True),
}
PATCH = "vit.embeddings.patch_embeddings.projection"
VIT_TARGETS = [PATCH, "q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_conv(geometry: str, cin: int = 5, cout: int = 7, dtype=torch.float32) -> nn.Conv2d:
    kernel, stride, padding, dilation, bias = GEOMETRIES[geometry]
    seed_everything()
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias, dtype=dtype)


def images(batch: int = 2, channels: int = 5, size: tuple[int, int] = (11, 13), seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed))


def run(layer: SVDConv2d, x: torch.Tensor, composed: bool) -> torch.Tensor:
    """The layer's output through one forward path, forced."""
    layer.use_composed_conv = lambda shape: composed
    try:
        return layer(x)
    finally:
        del layer.use_composed_conv


def reference_kernel(layer: SVDConv2d) -> torch.Tensor:
    """The dense kernel of the live factors, written out with numpy independently of the layer's code."""
    keep = layer.mask.numpy()
    U, s, V = (t.detach().double().numpy() for t in (layer.U, layer.s, layer.V))
    matrix = (U[:, keep] * s[keep]) @ V[:, keep].T
    cout, cin, (kh, kw) = layer.out_channels, layer.in_channels, layer.kernel_size
    if layer.conv_mode == "channel":
        kernel = matrix.reshape(cout, cin, kh, kw)
    else:
        kernel = matrix.reshape(cin, kh, cout, kw).transpose(2, 0, 1, 3)
    return torch.from_numpy(np.ascontiguousarray(kernel))


def reference_output(layer: SVDConv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.detach().double()
    return F.conv2d(x.double(), reference_kernel(layer), bias, layer.stride, layer.padding, layer.dilation)


# ------------------------------------------------------------------------------------------------ the layer


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # PyTorch's note on even kernels, for the dense conv too
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("mode", MODES)
def test_factoring_is_exact_on_both_paths(mode, geometry):
    conv = make_conv(geometry)
    layer = SVDConv2d.from_conv(conv, mode)
    x = images()
    expected = conv(x)
    for composed in (True, False):
        assert relative_error(run(layer, x, composed), expected) < 1e-5
    assert relative_error(layer.weight, conv.weight) < 1e-5
    merged = layer.to_conv()
    assert relative_error(merged(x), expected) < 1e-5
    assert (merged.stride, merged.dilation, merged.bias is None) == (conv.stride, conv.dilation, conv.bias is None)


@pytest.mark.parametrize("mode", MODES)
def test_unbatched_input(mode):
    conv = make_conv("2x3-all")
    layer = SVDConv2d.from_conv(conv, mode)
    x = images()[0]
    for composed in (True, False):
        assert relative_error(run(layer, x, composed), conv(x)) < 1e-5


@pytest.mark.parametrize("mode, rows, cols", [("channel", 7, 5 * 3 * 2), ("spatial", 5 * 3, 7 * 2)])
def test_matrix_view_and_recorded_geometry(mode, rows, cols):
    conv = make_conv("3x2-stride-dilation")
    layer = SVDConv2d.from_conv(conv, mode)
    r = min(rows, cols)
    assert (layer.out_features, layer.in_features) == (rows, cols)
    assert layer.U.shape == (rows, r) and layer.V.shape == (cols, r) and layer.s.shape == (r,)
    assert layer.bias.shape == (7,)
    # Singular values are those of the matrix view, and the factors orthonormal.
    matrix = kernel_to_matrix(conv.weight.detach().double(), mode).numpy()
    np.testing.assert_allclose(layer.s.detach().numpy(), np.linalg.svd(matrix, compute_uv=False), rtol=1e-5)
    assert torch.allclose(layer.U.T @ layer.U, torch.eye(r), atol=1e-5)
    assert layer.geometry() == {
        "mode": mode,
        "in_channels": 5,
        "out_channels": 7,
        "kernel_size": [3, 2],
        "stride": [2, 1],
        "padding": [1, 0],
        "dilation": [1, 2],
    }
    json.dumps(layer.geometry())
    assert isinstance(layer, SVDLinear) and f"conv_mode='{mode}'" in repr(layer)


def test_paddings_are_resolved_to_integers_where_symmetric():
    assert SVDConv2d.from_conv(make_conv("valid-stride2"), "spatial").padding == (0, 0)
    assert SVDConv2d.from_conv(make_conv("same-odd"), "spatial").padding == (2, 2)
    assert SVDConv2d.from_conv(make_conv("same-even"), "channel").padding == "same"
    assert SVDConv2d.from_conv(make_conv("same-even"), "channel").to_conv().padding == "same"


@pytest.mark.parametrize("mode", MODES)
def test_float64_stays_float64(mode):
    conv = make_conv("3x3", dtype=torch.float64)
    layer = SVDConv2d.from_conv(conv, mode)
    assert layer.U.dtype == torch.float64
    x = images().double()
    assert relative_error(run(layer, x, False), conv(x)) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_energy_and_max_rank_truncate_at_factoring(mode):
    conv = make_conv("3x3")
    assert SVDConv2d.from_conv(conv, mode, max_rank=3).full_rank == 3
    layer = SVDConv2d.from_conv(conv, mode, energy=0.5)
    s = np.linalg.svd(kernel_to_matrix(conv.weight.detach(), mode).numpy(), compute_uv=False)
    expected = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.5)) + 1
    assert layer.full_rank == expected < min(layer.out_features, layer.in_features)
    x = images()
    assert relative_error(run(layer, x, True), run(layer, x, False)) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_choice_of_path_follows_the_operation_count(mode):
    layer = SVDConv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1), mode)  # full rank: factored never saves work
    assert layer.use_composed_conv((8, 16, 32, 32))
    small = SVDConv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1), mode, max_rank=2)
    assert not small.use_composed_conv((8, 16, 32, 32))
    # Tiny input: building the kernel (m n r) dominates, so the two thin convs win even at full rank.
    assert not layer.use_composed_conv((1, 16, 1, 1))


@pytest.mark.parametrize("mode", MODES)
def test_masked_values_contribute_nothing_and_get_no_gradient(mode):
    layer = SVDConv2d.from_conv(make_conv("2x3-all"), mode)
    with torch.no_grad():
        layer.mask[1::2] = False
    x = images()
    grads = []
    for composed in (True, False):
        out = run(layer, x, composed)
        assert relative_error(out, reference_output(layer, x)) < 1e-5
        layer.zero_grad()
        out.square().sum().backward()
        assert torch.all(layer.s.grad[~layer.mask] == 0) and torch.all(layer.s.grad[layer.mask] != 0)
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    for name in grads[0]:
        assert relative_error(grads[0][name], grads[1][name]) < 1e-5, name


@pytest.mark.parametrize("mode", MODES)
def test_gradients_flow_to_every_factor(mode):
    conv = make_conv("3x3")
    layer = SVDConv2d.from_conv(conv, mode)
    x = images()
    run(layer, x, False).square().mean().backward()
    conv(x).square().mean().backward()
    for name in ("U", "s", "V", "bias"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert relative_error(layer.bias.grad, conv.bias.grad) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_truncate_keeps_the_masked_function(mode):
    layer = SVDConv2d.from_conv(make_conv("3x2-stride-dilation"), mode)
    with torch.no_grad():
        layer.mask[3:] = False
    x = images()
    before = run(layer, x, False).detach()
    assert layer.truncate_() is layer
    assert layer.full_rank == layer.rank == 3 and layer.U.shape[1] == layer.V.shape[1] == 3
    assert layer.geometry()["mode"] == mode
    for composed in (True, False):
        assert relative_error(run(layer, x, composed), before) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_exported_kernels_round_trip(mode):
    layer = SVDConv2d.from_conv(make_conv("2x3-all"), mode)
    with torch.no_grad():
        layer.mask[4:] = False
    down, up = layer.factored_kernels()
    kh, kw = layer.kernel_size
    assert down.shape == ((4, 5, kh, kw) if mode == "channel" else (4, 5, kh, 1))
    assert up.shape == ((7, 4, 1, 1) if mode == "channel" else (7, 4, 1, kw))
    x = images()
    for orthonormal in (False, True):
        back = SVDConv2d.from_kernels(down, up, layer.bias, layer.geometry(), orthonormal)
        assert relative_error(back(x), reference_output(layer, x)) < 1e-5
        assert torch.allclose(back.s, layer.live_factors()[1], rtol=1e-5)
    low_rank = layer.to_low_rank()
    assert isinstance(low_rank, LowRankConv2d)
    assert relative_error(low_rank(x), reference_output(layer, x)) < 1e-5
    assert relative_error(low_rank.weight, reference_kernel(layer)) < 1e-5


def test_linear_conversions_are_refused():
    layer = SVDConv2d.from_conv(make_conv("3x3"), "channel")
    with pytest.raises(TypeError, match="to_conv"):
        layer.to_linear()
    with pytest.raises(TypeError, match="from_conv"):
        SVDConv2d.from_linear(nn.Linear(3, 4))


@pytest.mark.parametrize(
    "conv, mode, match",
    [
        (nn.Conv2d(4, 6, 3, groups=2), "channel", "groups=2"),
        (nn.Conv2d(4, 4, 3, groups=4), "spatial", "groups=4"),
        (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), "channel", "padding_mode='reflect'"),
        (nn.Conv2d(4, 6, 3), "diagonal", "conv_mode='diagonal'"),
        (nn.Conv1d(4, 6, 3), "channel", "nn.Conv2d only"),
    ],
)
def test_unfactorable_convs_are_refused(conv, mode, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SVDConv2d.from_conv(conv, mode)


def test_unknown_padding_string_is_refused():
    with pytest.raises(ValueError, match="padding='full'"):
        SVDConv2d(3, 4, 3, rank=2, padding="full")


# ---------------------------------------------------------------------------------------- a small CNN, spatial


def make_cnn() -> nn.Sequential:
    seed_everything()
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2)),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    ).eval()


def test_cnn_spatial_factor_prune_truncate_train():
    cnn = make_cnn()
    x = images(channels=3, size=(12, 16))
    expected = cnn(x)
    svd_factorize_(cnn, SVDConfig(target_modules=["0", "2", "4"], conv_mode="spatial"))
    assert all(isinstance(cnn[i], SVDConv2d) and cnn[i].conv_mode == "spatial" for i in (0, 2, 4))
    assert relative_error(cnn(x), expected) < 1e-5
    # Parameter counts of the matrix view are the conv's: pruning's budget counts them right.
    assert cnn[2].out_features * cnn[2].in_features == 8 * 8 * 3 * 5
    ranks = prune_(cnn, budget=0.5)
    kept = sum(
        min(r * (cnn[i].in_features + cnn[i].out_features), cnn[i].in_features * cnn[i].out_features)
        for i, r in zip((0, 2, 4), ranks.values())
    )
    assert kept <= 0.5 * sum(p.numel() for p in make_cnn().parameters() if p.dim() == 4)
    masked = cnn(x).detach()
    truncate_(cnn)
    assert current_ranks(cnn) == ranks
    assert relative_error(cnn(x), masked) < 1e-5
    optimizer = torch.optim.SGD(cnn.parameters(), lr=0.1)
    before = cnn[2].s.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        cnn(x).square().mean().backward()
        optimizer.step()
    assert not torch.equal(cnn[2].s, before)
    merge_to_dense_(cnn)
    assert all(type(cnn[i]) is nn.Conv2d for i in (0, 2, 4))


class ConvBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_all_linear_never_factors_a_conv():
    model = svd_factorize_(ConvBlocks(), SVDConfig(target_modules="all-linear"))
    assert list(svd_layers(model)) == ["blocks.2"] and type(model.blocks[0]) is nn.Conv2d


@pytest.mark.parametrize(
    "config, match",
    [
        (SVDConfig(target_modules=["0", "2"], parameterization="householder"), "parameterization='householder'"),
        (SVDConfig(target_modules=["0", "2"], conv_mode="spatial"), "groups=2"),
    ],
)
def test_refusals_happen_before_the_model_changes(config, match):
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2))
    if config.parameterization != "svd":
        model[2] = nn.Conv2d(4, 4, 3)
    with pytest.raises(ValueError, match=match):
        svd_factorize_(model, config)
    assert type(model[0]) is nn.Conv2d and not hasattr(model, "svd_config")


def test_not_a_layer_error_names_convs():
    with pytest.raises(TypeError, match="nn.Linear or nn.Conv2d"):
        svd_factorize_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), SVDConfig(target_modules=["1"]))


# ------------------------------------------------------------------------------------------ a tiny ViT


def make_vit() -> ViTForImageClassification:
    return builders.make_vit(image_size=32)


def pixels(batch: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pixel_values=pixels()).logits


def factored_vit(mode: str, keep: int | None = None) -> ViTForImageClassification:
    model = svd_factorize_(make_vit(), SVDConfig(target_modules=VIT_TARGETS, conv_mode=mode))
    if keep is not None:
        with torch.no_grad():
            for layer in svd_layers(model).values():
                layer.mask[keep:] = False
    return model


@pytest.mark.parametrize("mode", MODES)
def test_vit_patch_embedding_factored_with_the_linears(mode):
    expected = logits(make_vit())
    model = factored_vit(mode)
    layers = svd_layers(model)
    assert len(layers) == 13 and isinstance(layers[PATCH], SVDConv2d)
    assert relative_error(logits(model), expected) < 1e-5
    assert model.config.svd_training["convs"][PATCH]["mode"] == mode


def test_vit_trains_with_svd_trainer(tmp_path):
    model = factored_vit("channel")
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {"pixel_values": torch.randn(16, 3, 32, 32, generator=g).tolist(), "labels": [i % 3 for i in range(16)]}
    )
    args = SVDTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        orth_weight=0.1,
        sparsity="hoyer",
        sparsity_weight=0.01,
    )
    patch = model.get_submodule(PATCH)
    before = {n: p.detach().clone() for n, p in patch.named_parameters()}
    trainer = SVDTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert svd_layers(trainer.model)[PATCH] is patch
    assert all(not torch.equal(p, before[n]) for n, p in patch.named_parameters())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(np.isfinite(entry["loss"]) for entry in logged)


@pytest.mark.parametrize("mode", MODES)
def test_vit_export_round_trips_through_both_loaders(tmp_path, mode):
    model = factored_vit(mode, keep=5)
    expected = logits(model)
    save_compressed(model, tmp_path / "vit")
    meta = json.loads((tmp_path / "vit" / "config.json").read_text())[METADATA_KEY]
    assert meta["convs"] == {PATCH: model.get_submodule(PATCH).geometry()}
    assert PATCH not in meta["dense_modules"]
    tensors = load_file(tmp_path / "vit" / "model.safetensors")
    kh, kw = 8, 8
    assert tensors[f"{PATCH}.down.weight"].shape == ((5, 3, kh, kw) if mode == "channel" else (5, 3, kh, 1))
    assert tensors[f"{PATCH}.up.weight"].shape == ((32, 5, 1, 1) if mode == "channel" else (32, 5, 1, kw))
    assert tensors[f"{PATCH}.up.bias"].shape == (32,)

    ours = load_compressed(tmp_path / "vit", trainable=True)
    assert isinstance(ours.get_submodule(PATCH), SVDConv2d) and current_ranks(ours) == current_ranks(model)
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=1e-4)

    remote = AutoModelForImageClassification.from_pretrained(tmp_path / "vit", trust_remote_code=True).eval()
    assert type(remote.get_submodule(PATCH)).__name__ == "LowRankConv2d"
    torch.testing.assert_close(logits(remote), expected, atol=1e-5, rtol=1e-4)
    base = AutoModel.from_pretrained(tmp_path / "vit", trust_remote_code=True).eval()
    with torch.no_grad():
        hidden = base(pixel_values=pixels()).last_hidden_state
        torch.testing.assert_close(hidden, model.vit(pixel_values=pixels()).last_hidden_state, atol=1e-5, rtol=1e-4)

    # A model loaded with remote code exports again (its LowRankConv2d read back as SVDConv2d).
    save_compressed(remote, tmp_path / "again")
    torch.testing.assert_close(
        logits(load_compressed(tmp_path / "again", trainable=True)), expected, atol=1e-5, rtol=1e-4
    )


def test_vit_conv_stored_dense_when_its_rank_saves_nothing(tmp_path):
    model = factored_vit("channel")  # full rank everywhere: every layer is stored dense
    expected = logits(model)
    save_compressed(model, tmp_path / "vit")
    meta = json.loads((tmp_path / "vit" / "config.json").read_text())[METADATA_KEY]
    assert PATCH in meta["dense_modules"]
    assert load_file(tmp_path / "vit" / "model.safetensors")[f"{PATCH}.weight"].shape == (32, 3, 8, 8)
    ours = load_compressed(tmp_path / "vit", trainable=True)
    assert isinstance(ours.get_submodule(PATCH), SVDConv2d)
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=1e-4)
    remote = AutoModelForImageClassification.from_pretrained(tmp_path / "vit", trust_remote_code=True)
    assert type(remote.get_submodule(PATCH)) is nn.Conv2d
    torch.testing.assert_close(logits(remote), expected, atol=1e-5, rtol=1e-4)


def test_vit_conv_shape_mismatch_names_the_module(tmp_path):
    save_compressed(factored_vit("spatial", keep=5), tmp_path / "vit")
    path = tmp_path / "vit" / "model.safetensors"
    tensors = load_file(path)
    tensors[f"{PATCH}.up.weight"] = tensors[f"{PATCH}.up.weight"][:, :, :, :4].contiguous()
    save_file(tensors, path)
    with pytest.raises(CompressedFormatError, match=rf"module '{PATCH}'.*up\.weight"):
        load_compressed(tmp_path / "vit")


def test_vit_conv_geometry_missing_from_the_metadata_is_named(tmp_path):
    save_compressed(factored_vit("channel", keep=5), tmp_path / "vit")
    config_file = tmp_path / "vit" / "config.json"
    config = json.loads(config_file.read_text())
    del config[METADATA_KEY]["convs"][PATCH]["stride"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(CompressedFormatError, match=rf"lacks convs\['{PATCH}'\]\['stride'\]"):
        load_compressed(tmp_path / "vit")


def test_export_without_convs_has_no_convs_entry(tmp_path):
    model = svd_factorize_(make_vit(), SVDConfig(target_modules=VIT_TARGETS[1:]))
    save_compressed(model, tmp_path / "vit")
    assert "convs" not in json.loads((tmp_path / "vit" / "config.json").read_text())[METADATA_KEY]
    assert "convs" not in model.config.svd_training


def test_vit_merge_to_dense_and_factored_checkpoint(tmp_path):
    model = factored_vit("spatial", keep=6)
    expected = logits(model)
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = load_factored_checkpoint(tmp_path / "ckpt")
    assert isinstance(reloaded.get_submodule(PATCH), SVDConv2d) and current_ranks(reloaded) == current_ranks(model)
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=1e-4)
    merge_to_dense_(model)
    assert type(model.get_submodule(PATCH)) is nn.Conv2d
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-4)


def test_vit_lora_on_the_low_rank_conv_merges_back(tmp_path):
    model = factored_vit("channel", keep=5)
    expected = logits(model)
    svd_to_lowrank_(model)
    assert isinstance(model.get_submodule(PATCH), LowRankConv2d)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-4)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["down", "up"]))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(2):
        optimizer.zero_grad()
        peft_model(pixel_values=pixels(), labels=torch.tensor([0, 1])).loss.backward()
        optimizer.step()
    merged = peft_model.merge_and_unload()
    tuned = logits(merged)
    lowrank_to_svd_(merged)
    patch = merged.get_submodule(PATCH)
    assert isinstance(patch, SVDConv2d) and patch.rank == 5
    torch.testing.assert_close(logits(merged), tuned, atol=1e-5, rtol=1e-4)
    save_compressed(merged, tmp_path / "tuned")
    torch.testing.assert_close(logits(load_compressed(tmp_path / "tuned")), tuned, atol=1e-5, rtol=1e-4)
