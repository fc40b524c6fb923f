"""The Hub format: save_compressed / load_compressed / remote code / dense export / factored checkpoints / safety."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from builders import bert_inputs, gpt2_inputs, make_bert, make_gpt2, make_vit, vit_inputs
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    ViTImageProcessor,
    ViTModel,
)
from transformers.pytorch_utils import Conv1D

from hf_svd_compress import (
    CompressedFormatError,
    SVDConfig,
    current_ranks,
    load_compressed,
    load_factored_checkpoint,
    merge_to_dense_,
    prune_,
    save_compressed,
    svd_factorize_,
    svd_layers,
    truncate_,
)
from hf_svd_compress.config import METADATA_KEY
from hf_svd_compress.hub.format import MODELING_FILE

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny matrices: a second thread only adds synchronization, which costs seconds on a busy shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compress(model: nn.Module, config: SVDConfig | None = None, ranks=(3, 30, 6)) -> nn.Module:
    """Factor and mask to a cycle of ranks: small ones store factors, a large one (>= break-even) stores dense."""
    svd_factorize_(model, config or SVDConfig(target_modules="all-linear"))
    with torch.no_grad():
        for i, layer in enumerate(svd_layers(model).values()):
            layer.mask[ranks[i % len(ranks)] :] = False
    return model.eval()


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _bert(cls):
    return make_bert(task_class=cls, num_labels=3)


def _vit_model():
    return ViTModel(make_vit().config).eval()


def _dinov2():
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=16, patch_size=8
    )
    config.num_labels = 3
    return Dinov2ForImageClassification(config).eval()


# (name, build, inputs, auto class of the export)
CASES = [
    ("bert-seq-cls", lambda: _bert(BertForSequenceClassification), bert_inputs, AutoModelForSequenceClassification),
    ("bert-token-cls", lambda: _bert(BertForTokenClassification), bert_inputs, AutoModelForTokenClassification),
    ("bert-masked-lm", lambda: _bert(BertForMaskedLM), bert_inputs, AutoModelForMaskedLM),
    ("bert-model", lambda: _bert(BertModel), bert_inputs, AutoModel),
    ("vit-image-cls", make_vit, vit_inputs, AutoModelForImageClassification),
    ("vit-model", _vit_model, vit_inputs, AutoModel),
    ("dinov2-image-cls", _dinov2, vit_inputs, AutoModelForImageClassification),
    ("gpt2-causal-lm", make_gpt2, gpt2_inputs, AutoModelForCausalLM),
]


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory):
    """A tiny compressed BERT classifier, its inputs and expected logits, and the folder it was saved to."""
    model = compress(make_bert())
    path = tmp_path_factory.mktemp("export") / "bert-svd"
    save_compressed(model, path, rank_selection={"method": "energy", "energy": 0.9}, training_settings={"lr": 1e-4})
    return model, path, output(model, bert_inputs())


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name,build,inputs,auto_class", CASES, ids=[c[0] for c in CASES])
def test_round_trip_with_both_loaders(tmp_path, name, build, inputs, auto_class):
    model = compress(build())
    expected = output(model, inputs())
    save_compressed(model, tmp_path / name)

    ours = load_compressed(tmp_path / name, trainable=True)
    assert type(ours) is type(model)
    assert current_ranks(ours) == current_ranks(model)
    torch.testing.assert_close(output(ours, inputs()), expected, atol=1e-5, rtol=1e-4)

    dense = set(json.loads((tmp_path / name / "config.json").read_text())[METADATA_KEY]["dense_modules"])
    remote = auto_class.from_pretrained(tmp_path / name, trust_remote_code=True).eval()
    lean = load_compressed(tmp_path / name)  # the same classes as the remote code, from our template
    for loaded in (remote, lean):
        assert isinstance(loaded, type(model)) and type(loaded).__name__.startswith("SVDCompressed")
        low_rank = [n for n, m in loaded.named_modules() if type(m).__name__ == "LowRankLinear"]
        assert sorted(low_rank) == sorted(set(current_ranks(model)) - dense)
        assert not svd_layers(loaded)
        torch.testing.assert_close(output(loaded, inputs()), expected, atol=1e-5, rtol=1e-4)


def test_remote_auto_model_loads_the_base_model_of_a_classifier(saved_bert):
    model, path, _ = saved_bert
    base = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    torch.testing.assert_close(output(base, bert_inputs()), output(model.bert, bert_inputs()), atol=1e-5, rtol=1e-4)


def test_reexport_of_a_loaded_model_is_identical(saved_bert, tmp_path):
    _, path, _ = saved_bert
    save_compressed(load_compressed(path, trainable=True), tmp_path / "again")
    first, second = load_file(path / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], atol=1e-6, rtol=1e-5)


def test_loaded_model_can_be_pruned_and_reexported(saved_bert, tmp_path):
    _, path, _ = saved_bert
    model = load_compressed(path, trainable=True)
    assert model.config.svd_training["ranks"] == current_ranks(model)
    assert isinstance(model.svd_config, SVDConfig)
    prune_(model, energy=0.5)
    save_compressed(model, tmp_path / "pruned")
    assert current_ranks(load_compressed(tmp_path / "pruned", trainable=True)) == current_ranks(model)
    assert current_ranks(load_compressed(tmp_path / "pruned")) == current_ranks(model)  # the lean form too


def test_bf16_model_keeps_its_dtype(tmp_path):
    model = compress(make_bert()).to(torch.bfloat16)
    save_compressed(model, tmp_path / "bf16")
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_compressed(tmp_path / "bf16").dtype == torch.bfloat16
    remote = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16", trust_remote_code=True)
    assert remote.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------- format


def test_file_holds_truncated_factors_and_dense_layers(saved_bert):
    model, path, _ = saved_bert
    tensors = load_file(path / "model.safetensors")
    meta = json.loads((path / "config.json").read_text())[METADATA_KEY]
    for name, layer in svd_layers(model).items():
        r, (out_f, in_f) = layer.rank, meta["shapes"][name]
        assert meta["ranks"][name] == r and meta["full_ranks"][name] == min(out_f, in_f)
        if r * (out_f + in_f) >= out_f * in_f:
            assert name in meta["dense_modules"] and tensors[f"{name}.weight"].shape == (out_f, in_f)
            torch.testing.assert_close(tensors[f"{name}.weight"], layer.composed_weight(), atol=1e-6, rtol=1e-5)
        else:
            assert name not in meta["dense_modules"]
            down, up = tensors[f"{name}.down.weight"], tensors[f"{name}.up.weight"]
            assert down.shape == (r, in_f) and up.shape == (out_f, r)
            torch.testing.assert_close(up @ down, layer.composed_weight(), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(tensors[f"{name}.up.bias"], layer.bias)
    assert any(t.numel() == 0 for t in tensors.values())  # the marker that fails a plain base-class load


def test_config_metadata_and_files(saved_bert):
    model, path, _ = saved_bert
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors", MODELING_FILE]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "svd_compressed_bert" and "svd_training" not in config
    assert config["auto_map"] == {
        "AutoConfig": "modeling_svd_compressed.SVDCompressedConfig",
        "AutoModel": "modeling_svd_compressed.SVDCompressedBaseModel",
        "AutoModelForSequenceClassification": "modeling_svd_compressed.SVDCompressedModel",
    }
    meta = config[METADATA_KEY]
    assert meta["format_version"] == 1
    assert meta["rank_selection"] == {"method": "energy", "energy": 0.9}
    assert (meta["base_model_type"], meta["base_architecture"], meta["base_config_class"]) == (
        "bert",
        "BertForSequenceClassification",
        "BertConfig",
    )
    assert SVDConfig.from_dict(meta["svd_config"]) == model.svd_config
    # The modeling file imports only torch and transformers.
    source = (path / MODELING_FILE).read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports - set(sys.stdlib_module_names) == {"torch", "transformers"}
    assert 'TASK_MODEL_CLASS = "BertForSequenceClassification"' in source


def test_model_card(saved_bert):
    model, path, _ = saved_bert
    card = (path / "README.md").read_text()
    data = ModelCard(card).data
    assert (data.library_name, data.pipeline_tag) == ("transformers", "text-classification")
    assert "hf_svd_compress" in data.tags and data.base_model is None  # a local path is not Hub metadata
    for name, layer in svd_layers(model).items():
        assert f"| `{name}` | {layer.out_features} x {layer.in_features} | 32 | {layer.rank} |" in card
    params = sum(t.numel() for t in load_file(path / "model.safetensors").values())
    assert f"{params:,}" in card and '"lr": 0.0001' in card and '"energy": 0.9' in card
    assert "trust_remote_code=True" in card


def test_file_size_follows_the_parameters_kept(tmp_path):
    sizes, params = {}, {}
    for rank in (2, 8):
        model = compress(make_bert(), SVDConfig(target_modules="all-linear"), ranks=(rank,))
        save_compressed(model, tmp_path / str(rank))
        sizes[rank] = (tmp_path / str(rank) / "model.safetensors").stat().st_size
        params[rank] = sum(t.numel() for t in load_file(tmp_path / str(rank) / "model.safetensors").values())
    assert sizes[2] < sizes[8]
    assert (sizes[8] - sizes[2]) == pytest.approx(4 * (params[8] - params[2]), rel=0.05)


def test_processing_class_is_saved(tmp_path):
    save_compressed(compress(make_vit()), tmp_path / "vit", processing_class=ViTImageProcessor(size=16))
    assert (tmp_path / "vit" / "preprocessor_config.json").is_file()


# -------------------------------------------------------------------------------- loading without remote code


@pytest.mark.parametrize("trust_remote_code", [None, False])
def test_plain_auto_class_refuses_and_says_how_to_load(saved_bert, trust_remote_code):
    _, path, _ = saved_bert
    with pytest.raises(ValueError, match=r"contains custom code.*\n(.*\n)*.*trust_remote_code=True"):
        AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)


def test_plain_base_class_fails_instead_of_random_init(saved_bert):
    _, path, _ = saved_bert
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        BertForSequenceClassification.from_pretrained(path)


# ------------------------------------------------------------------------------------------- dense export


def test_merge_to_dense_restores_the_original_layer_types(tmp_path):
    for build, inputs, layer_type in ((make_bert, bert_inputs, nn.Linear), (make_gpt2, gpt2_inputs, Conv1D)):
        model = compress(build())
        expected = output(model, inputs())
        names = list(svd_layers(model))
        merge_to_dense_(model)
        assert not svd_layers(model) and not hasattr(model.config, "svd_training")
        assert all(type(model.get_submodule(n)) is layer_type for n in names)
        torch.testing.assert_close(output(model, inputs()), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "build,inputs,auto_class",
    [(make_bert, bert_inputs, AutoModelForSequenceClassification), (make_gpt2, gpt2_inputs, AutoModelForCausalLM)],
    ids=["bert", "gpt2"],
)
def test_dense_export_is_a_plain_checkpoint(tmp_path, build, inputs, auto_class):
    model = compress(build())
    expected = output(model, inputs())
    save_compressed(model, tmp_path / "dense", dense=True)
    assert not (tmp_path / "dense" / MODELING_FILE).exists()
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "auto_map" not in config and METADATA_KEY not in config and "svd_training" not in config
    plain = auto_class.from_pretrained(tmp_path / "dense").eval()
    assert not svd_layers(plain)
    torch.testing.assert_close(output(plain, inputs()), expected, atol=1e-5, rtol=1e-4)
    assert svd_layers(model)  # the user's model is untouched


def test_save_does_not_change_the_model(tmp_path):
    model = compress(make_bert())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    save_compressed(model, tmp_path / "a")
    save_compressed(model, tmp_path / "b", dense=True)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.to_dict() == config_before


# ------------------------------------------------------------------------------------ factored checkpoints


def test_load_factored_checkpoint_rebuilds_masks_and_config(tmp_path):
    model = compress(make_bert())
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_factored_checkpoint(tmp_path / "ckpt")
    assert current_ranks(loaded) == current_ranks(model)
    assert {n: m.full_rank for n, m in svd_layers(loaded).items()} == {n: 32 for n in svd_layers(model)}
    assert loaded.svd_config == model.svd_config
    torch.testing.assert_close(output(loaded, bert_inputs()), output(model, bert_inputs()))
    prune_(loaded, budget=0.3)
    save_compressed(loaded, tmp_path / "pruned", rank_selection={"method": "budget", "budget": 0.3})
    torch.testing.assert_close(
        output(load_compressed(tmp_path / "pruned"), bert_inputs()), output(loaded, bert_inputs()), atol=1e-5, rtol=0
    )


def test_load_factored_checkpoint_of_a_model_saved_under_legacy_names(tmp_path):
    # transformers 5 writes ViT's `attention.q_proj` as `attention.attention.query` and renames it on load.
    model = compress(make_vit())
    model.save_pretrained(tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    renamed_on_save = sorted(set(model.state_dict()) - saved)
    loaded = load_factored_checkpoint(tmp_path / "ckpt")
    assert current_ranks(loaded) == current_ranks(model)
    torch.testing.assert_close(output(loaded, vit_inputs()), output(model, vit_inputs()))
    assert renamed_on_save, "transformers no longer renames ViT keys on save: this test no longer covers that path"


def test_load_factored_checkpoint_after_truncation(tmp_path):
    model = compress(make_bert())
    truncate_(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_factored_checkpoint(tmp_path / "ckpt")
    assert {n: m.full_rank for n, m in svd_layers(loaded).items()} == current_ranks(model)
    torch.testing.assert_close(output(loaded, bert_inputs()), output(model, bert_inputs()))


def test_load_factored_checkpoint_refuses_a_dense_checkpoint(tmp_path):
    make_bert().save_pretrained(tmp_path / "dense")
    with pytest.raises(CompressedFormatError, match="svd_training"):
        load_factored_checkpoint(tmp_path / "dense")


# ------------------------------------------------------------------------------------------ bad folders


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_or_unknown_metadata_is_refused(saved_bert, tmp_path):
    _, path, _ = saved_bert
    missing = _copy(path, tmp_path / "missing")
    _edit_config(missing, lambda c: c.pop(METADATA_KEY))
    with pytest.raises(CompressedFormatError, match="has no `svd_compression` metadata"):
        load_compressed(missing)
    future = _copy(path, tmp_path / "future")
    _edit_config(future, lambda c: c[METADATA_KEY].update(format_version=2))
    with pytest.raises(CompressedFormatError, match="format_version 2 is not supported"):
        load_compressed(future)
    with pytest.raises(ValueError, match="format_version 2 is not supported"):
        AutoModelForSequenceClassification.from_pretrained(future, trust_remote_code=True)


def test_tensors_not_matching_the_metadata_name_the_module(saved_bert, tmp_path):
    _, path, _ = saved_bert
    tensors = load_file(path / "model.safetensors")
    name = "bert.encoder.layer.1.attention.self.value"
    wrong_shape = _copy(path, tmp_path / "shape")
    save_file({**tensors, f"{name}.down.weight": torch.zeros(5, 32)}, wrong_shape / "model.safetensors")
    with pytest.raises(CompressedFormatError, match=rf"module '{name}'.*shape \[6, 32\], found \(5, 32\)"):
        load_compressed(wrong_shape)
    gone = _copy(path, tmp_path / "gone")
    save_file({k: v for k, v in tensors.items() if not k.startswith(name)}, gone / "model.safetensors")
    with pytest.raises(CompressedFormatError, match=rf"module '{name}'.*found None"):
        load_compressed(gone)
    with pytest.raises(ValueError, match=name):
        AutoModelForSequenceClassification.from_pretrained(gone, trust_remote_code=True)
    unknown = _copy(path, tmp_path / "unknown")
    _edit_config(unknown, lambda c: c[METADATA_KEY]["ranks"].update({"bert.nope": 2}))
    with pytest.raises(CompressedFormatError, match=r"shapes\['bert.nope'\]"):
        load_compressed(unknown)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_name_the_file(saved_bert, tmp_path, damage):
    _, path, _ = saved_bert
    bad = _copy(path, tmp_path / damage)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    with pytest.raises(CompressedFormatError, match=r"model\.safetensors is not a readable safetensors file"):
        load_compressed(bad)


# ---------------------------------------------------------------------------------------- safe writing


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_model_folder_is_refused_before_writing(tmp_path):
    target = tmp_path / "model"
    make_bert().save_pretrained(target)
    before, siblings = _listing(target), sorted(tmp_path.iterdir())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_compressed(compress(make_bert()), target)
    assert _listing(target) == before and sorted(tmp_path.iterdir()) == siblings


def test_overwrite_replaces_the_folder_once_complete(tmp_path):
    target = tmp_path / "model"
    make_bert().save_pretrained(target)
    (target / "old-notes.txt").write_text("x")
    save_compressed(compress(make_bert()), target, overwrite=True)
    assert not (target / "old-notes.txt").exists() and (target / MODELING_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failure_while_writing_leaves_the_old_folder(tmp_path):
    class Broken:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")
            raise OSError("disk full")

    target = tmp_path / "model"
    save_compressed(compress(make_bert()), target)
    before = _listing(target)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(compress(make_bert(), ranks=(2,)), target, overwrite=True, processing_class=Broken())
    assert _listing(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(OSError, match="disk full"):
        save_compressed(compress(make_bert()), tmp_path / "new", processing_class=Broken())
    assert not (tmp_path / "new").exists()


def test_folder_without_a_model_is_written_into(tmp_path):
    (tmp_path / "out" / "runs").mkdir(parents=True)
    (tmp_path / "out" / "runs" / "log.txt").write_text("keep me")
    save_compressed(compress(make_bert()), tmp_path / "out")
    assert (tmp_path / "out" / "runs" / "log.txt").read_text() == "keep me"
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_file_of_the_user_is_never_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"holds \['README.md'\]"):
        save_compressed(compress(make_bert()), tmp_path / "out")
    assert _listing(tmp_path / "out") == {"README.md": b"my notes"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left either


def test_leftover_staging_folders_are_removed_by_the_next_write(tmp_path):
    # A run killed while exporting (SIGTERM, SIGKILL) leaves its staging folder: older names had no pid, newer ones
    # the pid of a process that is gone. A folder another live process is writing stays.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftovers = [".model.tmp-0123456789ab", f".model.tmp-{dead.stdout.strip()}-0123456789ab"]
    live = f".model.tmp-{os.getppid()}-0123456789ab"
    for name in [*leftovers, live, ".other.tmp-0123456789ab"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    save_compressed(compress(make_bert()), tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".other.tmp-0123456789ab", live, "model"])


# ---------------------------------------------------------------------------------------- integrity on load


def _edit_metadata(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config[METADATA_KEY])
    (folder / "config.json").write_text(json.dumps(config))


def _load_with(loader: str, folder: Path) -> nn.Module:
    if loader == "remote":
        return AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    return load_compressed(folder, trainable=loader == "trainable")


LOADERS = ["lean", "trainable", "remote"]


@pytest.mark.parametrize("loader", LOADERS)
def test_the_weights_checksum_is_recorded_and_verified(tmp_path, loader):
    save_compressed(compress(make_bert()), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())[METADATA_KEY]
    digest = hashlib.sha256((tmp_path / "m" / "model.safetensors").read_bytes()).hexdigest()
    assert meta["checksums"] == {"model.safetensors": f"sha256:{digest}"}
    _load_with(loader, tmp_path / "m")  # untouched: loads
    data = bytearray((tmp_path / "m" / "model.safetensors").read_bytes())
    data[-8:] = bytes(8)  # overwrite the last tensor's bytes: same size, still a valid safetensors file
    (tmp_path / "m" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match the checksum"):
        _load_with(loader, tmp_path / "m")


@pytest.mark.parametrize("loader", LOADERS)
def test_an_edited_rank_of_a_dense_stored_layer_is_refused(tmp_path, loader):
    save_compressed(compress(make_bert()), tmp_path / "m")  # ranks 3, 30, 6: the 30s are stored dense
    name = json.loads((tmp_path / "m" / "config.json").read_text())[METADATA_KEY]["dense_modules"][0]
    _edit_metadata(tmp_path / "m", lambda meta: meta["ranks"].update({name: 4}))
    with pytest.raises(ValueError, match=f"module '{re.escape(name)}' is stored dense with rank 4"):
        _load_with(loader, tmp_path / "m")


@pytest.mark.parametrize("loader", LOADERS)
def test_a_layer_missing_from_ranks_is_refused(tmp_path, loader):
    save_compressed(compress(make_bert()), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())[METADATA_KEY]
    name = next(n for n in meta["ranks"] if n not in meta["dense_modules"])
    _edit_metadata(tmp_path / "m", lambda meta: meta["ranks"].pop(name))
    with pytest.raises(ValueError, match=re.escape(f"module(s) ['{name}']")):
        _load_with(loader, tmp_path / "m")


@pytest.mark.parametrize("loader", ["lean", "remote"])
def test_a_resaved_model_records_the_checksums_of_its_new_files(tmp_path, loader):
    save_compressed(compress(make_bert()), tmp_path / "m")
    model = _load_with(loader, tmp_path / "m")
    model.save_pretrained(tmp_path / "resaved")
    meta = json.loads((tmp_path / "resaved" / "config.json").read_text())[METADATA_KEY]
    digest = hashlib.sha256((tmp_path / "resaved" / "model.safetensors").read_bytes()).hexdigest()
    assert meta["checksums"] == {"model.safetensors": f"sha256:{digest}"}
    assert model.config.svd_compression["checksums"] != meta["checksums"]  # the in-memory config keeps its own
    for other in LOADERS:
        reloaded = _load_with(other, tmp_path / "resaved")
        inputs = bert_inputs()
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


def test_written_folder_has_the_usual_permissions(tmp_path):
    (tmp_path / "reference").mkdir()
    save_compressed(compress(make_bert()), tmp_path / "model")
    assert (tmp_path / "model").stat().st_mode == (tmp_path / "reference").stat().st_mode


def test_missing_local_folder_is_not_taken_for_a_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_compressed(tmp_path / "nowhere")


def test_bad_arguments_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match="no SVDLinear layer"):
        save_compressed(make_bert(), tmp_path / "a")
    with pytest.raises(TypeError, match="unexpected arguments"):
        save_compressed(compress(make_bert()), tmp_path / "b", privat=True)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------- fresh processes

_BLOCK_PACKAGE = """
import sys

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_svd_compress":
            raise ImportError("hf_svd_compress is blocked in this process")

sys.meta_path.insert(0, _Blocker())
try:
    import hf_svd_compress
except ImportError:
    pass
else:
    raise SystemExit("hf_svd_compress is still importable")
"""

_LOAD_AND_COMPARE = """
import json, sys
import torch, transformers
from safetensors.torch import load_file

for case in json.loads(sys.argv[1]):
    if case["loader"] == "remote":
        model = getattr(transformers, case["auto_class"]).from_pretrained(case["folder"], trust_remote_code=True)
        assert any(type(m).__name__ == "LowRankLinear" for m in model.modules())
    else:
        from hf_svd_compress import SVDLinear, load_compressed
        model = load_compressed(case["folder"], trainable=True)
        assert any(isinstance(m, SVDLinear) for m in model.modules())
    data = load_file(case["data"])
    expected = data.pop("expected")
    with torch.no_grad():
        out = model.eval()(**data)
    got = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    torch.testing.assert_close(got, expected, atol=case["atol"], rtol=1e-4)
    print("ok", case["loader"], case["folder"], float((got - expected).abs().max()))
    if case["loader"] == "remote":
        assert not any(m.split(".")[0] == "hf_svd_compress" for m in sys.modules)
"""


def run_fresh(cases: list[dict], tmp: Path, block_package: bool) -> str:
    """Load and compare each case in a new Python process, optionally where hf_svd_compress cannot be imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "modules"), OMP_NUM_THREADS="1")
    code = (_BLOCK_PACKAGE if block_package else "") + _LOAD_AND_COMPARE
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), json.dumps(cases)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def fresh_case(folder: Path, inputs: dict, expected: torch.Tensor, auto_class: type, atol: float = 1e-5) -> dict:
    """Inputs and expected output saved next to `folder`, as a case for `run_fresh` (both loaders)."""
    data = folder.parent / f"{folder.name}-io.safetensors"
    save_file({**inputs, "expected": expected.contiguous()}, data)
    return {"folder": str(folder), "data": str(data), "auto_class": auto_class.__name__, "atol": atol}


def test_fresh_processes_rebuild_bert_and_vit(tmp_path):
    cases = []
    for name, build, inputs, auto_class in (CASES[0], CASES[4]):
        model = compress(build())
        save_compressed(model, tmp_path / name)
        cases.append(fresh_case(tmp_path / name, inputs(), output(model, inputs()), auto_class))
    remote = run_fresh([{**c, "loader": "remote"} for c in cases], tmp_path, block_package=True)
    ours = run_fresh([{**c, "loader": "ours"} for c in cases], tmp_path, block_package=False)
    assert remote.count("ok remote") == 2 and ours.count("ok ours") == 2


def test_blocker_really_blocks(tmp_path):
    code = _BLOCK_PACKAGE + "\nimport hf_svd_compress\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "ImportError: hf_svd_compress is blocked" in result.stderr
    assert transformers.__version__  # the blocker leaves transformers alone (used by every fresh process)


def test_gpt2_export_keeps_tied_lm_head(tmp_path):
    model = compress(make_gpt2())
    save_compressed(model, tmp_path / "gpt2")
    tensors = load_file(tmp_path / "gpt2" / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied to the embeddings, stored once
    loaded = load_compressed(tmp_path / "gpt2")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with safe_open(tmp_path / "gpt2" / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"


def test_large_exports_are_sharded_and_every_loader_reads_and_verifies_the_shards(tmp_path):
    from builders import BY_NAME, outputs

    from hf_svd_compress.hub.format import CompressedFormatError

    arch = BY_NAME["bert"]
    model = svd_factorize_(arch.build())
    prune_(model, budget=0.5, rank_multiple=1)
    save_compressed(model, tmp_path / "export", max_shard_size=40_000)
    shards = sorted(p.name for p in (tmp_path / "export").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "export" / "model.safetensors.index.json").is_file()
    meta = json.loads((tmp_path / "export" / "config.json").read_text())["svd_compression"]
    assert sorted(meta["checksums"]) == shards
    inputs = arch.inputs()
    for loaded in (
        load_compressed(tmp_path / "export"),
        load_compressed(tmp_path / "export", trainable=True),
        arch.auto.from_pretrained(tmp_path / "export", trust_remote_code=True),
    ):
        torch.testing.assert_close(outputs(loaded, inputs), outputs(model.eval(), inputs), atol=1e-4, rtol=1e-4)
    shard = tmp_path / "export" / shards[-1]
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")  # same size, changed bytes
    with pytest.raises(CompressedFormatError, match=shards[-1]):
        load_compressed(tmp_path / "export")
