"""Tests of `hf_svd_compress.report`: numbers in report.json against hand-computed values, the Markdown, the plots.

The fixture is a realistic export folder built by hand (not by the exporter): a tiny BERT's own state dict with
each target linear replaced by `down` [r, in] / `up` [out, r] factors, or kept dense where its rank saves nothing,
the zero-size marker tensor the exporter adds, and a `config.json` with the `svd_compression` metadata.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from builders import bert_config
from PIL import Image
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification

from hf_svd_compress.report import build_report, representative_layers, short_names, write_report

HIDDEN, INTERMEDIATE, LAYERS = 32, 64, 2
KINDS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
# Per block, the kept rank of each kind. The break-even rank is 16 for the 32 x 32 layers and 21.3 for the
# 64 x 32 / 32 x 64 ones, so block 0 `attention.output.dense` (16), block 1 `value` (20) and block 1
# `intermediate.dense` (30) are stored dense.
RANKS = ((8, 8, 12, 16, 10, 20), (4, 6, 20, 9, 30, 12))
ACCURACY = {
    "dense": {"accuracy": 0.90, "test_accuracy": 0.88},
    "factored": {"accuracy": 0.89, "test_accuracy": 0.87},
    "pruned": {"accuracy": 0.80, "test_accuracy": 0.79},
    "compressed": {"accuracy": 0.885, "test_accuracy": 0.875},
}


def module_names(layers: int = LAYERS) -> list[str]:
    return [f"bert.encoder.layer.{i}.{kind}" for i in range(layers) for kind in KINDS]


def make_export(
    folder: Path,
    config: BertConfig,
    ranks: dict[str, int],
    summary: bool = True,
    selection: dict | None = None,
) -> BertForSequenceClassification:
    """Write an export folder shaped like `save_compressed`'s for `ranks`; returns the dense model it came from."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    linears = {name: model.get_submodule(name) for name in ranks}
    shapes = {name: [layer.out_features, layer.in_features] for name, layer in linears.items()}
    dense = [name for name, r in ranks.items() if r * sum(shapes[name]) >= shapes[name][0] * shapes[name][1]]
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(n + "." for n in ranks))}
    for name, r in ranks.items():
        out_features, in_features = shapes[name]
        if name in dense:
            state[f"{name}.weight"] = torch.randn(out_features, in_features)
            state[f"{name}.bias"] = torch.zeros(out_features)
        else:
            state[f"{name}.down.weight"] = torch.randn(r, in_features)
            state[f"{name}.up.weight"] = torch.randn(out_features, r)
            state[f"{name}.up.bias"] = torch.zeros(out_features)
    first = next(n for n in ranks if n not in dense)
    state[f"{first}.weight"] = torch.zeros(0)  # the exporter's marker against a plain from_pretrained
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})

    meta = {
        "format_version": 1,
        "ranks": ranks,
        "dense_modules": dense,
        "full_ranks": {name: min(shape) for name, shape in shapes.items()},
        "shapes": shapes,
        "rank_selection": selection or {"method": "energy", "energy": 0.9},
        "base_model_type": "bert",
        "base_architecture": "BertForSequenceClassification",
        "base_config_class": "BertConfig",
    }
    config_dict = {**config.to_dict(), "model_type": "svd_compressed_bert", "svd_compression": meta}
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
    if summary:
        spectra = {name: [10.0 * 0.8**i for i in range(min(shapes[name]))] for name in ranks}
        trained = {name: [s * (1.0 if i < 8 else 0.1) for i, s in enumerate(v)] for name, v in spectra.items()}
        trained[module_names()[0]][-1] = 0.0  # a value driven exactly to zero must not break the log axis
        record = {
            "accuracy": ACCURACY,
            "parameters_dense": sum(p.numel() for p in model.parameters()),
            "spectra_initial": spectra,
            "spectra_trained": trained,
            "ranks": ranks,
            "wall_time_s": 312.4,
            "base_model": "tiny-bert",
            "task": "bbc_news",
        }
        (folder / "compression_summary.json").write_text(json.dumps(record))
    return model


def tiny_config() -> BertConfig:
    sizes = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "intermediate_size": INTERMEDIATE}
    return bert_config(vocab_size=50, num_attention_heads=2, max_position_embeddings=16, num_labels=3, **sizes)


def tiny_ranks() -> dict[str, int]:
    return dict(zip(module_names(), (r for block in RANKS for r in block), strict=True))


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    """A fresh export folder, for tests that edit it."""
    folder = tmp_path / "exported"
    make_export(folder, tiny_config(), tiny_ranks())
    return folder


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict, BertForSequenceClassification, Path]:
    """One report (plots included, the slow part) shared by the read-only tests."""
    folder = tmp_path_factory.mktemp("report") / "exported"
    model = make_export(folder, tiny_config(), tiny_ranks())
    out = write_report(str(folder))  # no output_dir: the default `<model_dir>/report`
    return out, json.loads((out / "report.json").read_text()), model, folder


def expected_layer_params() -> tuple[int, int]:
    """(dense, kept) weights of the 12 target layers, by hand: r * (m + n) when factored, m * n when stored dense."""
    shapes = {kind: (HIDDEN, HIDDEN) for kind in KINDS[:4]}
    shapes |= {"intermediate.dense": (INTERMEDIATE, HIDDEN), "output.dense": (HIDDEN, INTERMEDIATE)}
    dense = kept = 0
    for block in RANKS:
        for kind, r in zip(KINDS, block, strict=True):
            m, n = shapes[kind]
            dense += m * n
            kept += m * n if r * (m + n) >= m * n else r * (m + n)
    return dense, kept


def test_layer_parameters_and_macs(written):
    _, report, _, _ = written
    dense, kept = expected_layer_params()
    # Written out: 8 x 32 x 32 + 2 x 64 x 32 x 2 = 16384 dense; block 0 keeps 512+512+768+1024+960+1920 = 5696,
    # block 1 keeps 256+384+1024+576+2048+1152 = 5440 (its `intermediate.dense` at rank 30 is stored dense).
    assert (dense, kept) == (16384, 5696 + 5440)
    assert report["target_layers"] == {
        "count": 12,
        "stored_factored": 9,
        "stored_dense": 3,
        "parameters_dense": dense,
        "parameters_kept": kept,
        "fraction": pytest.approx(kept / dense),
    }
    macs = report["macs_per_token"]
    assert (macs["dense"], macs["compressed"]) == (dense, kept)
    assert macs["reduction"] == pytest.approx(16384 / 11136)
    assert macs["fraction"] == pytest.approx(11136 / 16384)


def test_whole_model_parameters_and_size(written):
    _, report, model, folder = written
    dense_model = sum(p.numel() for p in model.parameters())
    dense, kept = expected_layer_params()
    params = report["parameters"]
    assert params["dense"] == dense_model
    assert params["dense_source"] == "compression_summary.json"
    assert params["compressed"] == dense_model - dense + kept
    assert params["fraction"] == pytest.approx((dense_model - dense + kept) / dense_model)

    size = report["size"]
    file_bytes = (folder / "model.safetensors").stat().st_size
    assert size["files"] == ["model.safetensors"]
    assert size["bytes"] == file_bytes
    assert size["mb"] == pytest.approx(file_bytes / 1e6)
    assert (size["dtype"], size["bytes_per_param"]) == ("F32", 4)
    assert size["estimated_dense_bytes"] == 4 * dense_model
    # The file holds the kept parameters in fp32 plus a small JSON header.
    assert 4 * params["compressed"] < file_bytes < 4 * params["compressed"] + 20_000


def test_layer_rows_accuracy_and_metadata(written):
    _, report, _, _ = written
    rows = {row["name"]: row for row in report["layers"]}
    assert list(rows) == module_names()
    assert rows["bert.encoder.layer.0.attention.self.query"] == {
        "name": "bert.encoder.layer.0.attention.self.query",
        "shape": [32, 32],
        "full_rank": 32,
        "kept_rank": 8,
        "kept_fraction": 0.25,
        "break_even_rank": 16.0,  # the synthetic export records no speed_break_even: the parameter break-even
        "stored_as": "factored",
        "parameters_dense": 1024,
        "parameters_kept": 512,
    }
    assert rows["bert.encoder.layer.0.attention.output.dense"]["stored_as"] == "dense"
    assert rows["bert.encoder.layer.1.intermediate.dense"]["parameters_kept"] == 64 * 32

    accuracy = report["accuracy"]
    assert list(accuracy["stages"]) == ["dense", "factored", "pruned", "compressed"]
    assert accuracy["change"] == {"accuracy": pytest.approx(-0.015), "test_accuracy": pytest.approx(-0.005)}
    assert report["rank_selection"] == {"method": "energy", "energy": 0.9}
    assert (report["model"]["base_model"], report["model"]["task"], report["wall_time_s"]) == (
        "tiny-bert",
        "bbc_news",
        312.4,
    )
    assert report["plots"] == ["ranks.png", "spectra.png"]


def test_markdown(written):
    out, report, _, _ = written
    md = (out / "report.md").read_text()
    # Headline before the tables, then the sections in reading order.
    order = ["## Summary", "## Size and compute", "## Accuracy", "## Rank selection", "## Plots", "## Per-layer"]
    assert [md.index(title) for title in order] == sorted(md.index(title) for title in order)
    assert "| `bert.encoder.layer.0.attention.self.query` | 32 x 32 | 32 | 8 | 25.0% | factored |" in md
    assert "| `bert.encoder.layer.1.intermediate.dense` | 64 x 32 | 32 | 30 | 93.8% | dense |" in md
    assert md.count("| `bert.encoder.layer.") == 12
    assert f"| {16384:,} | {11136:,} | 68.0% |" in md  # target-layer parameters and MACs rows
    assert "(1.47x fewer)" in md
    assert "validation accuracy 0.9000 dense -> 0.8850 compressed (-0.0150)" in md
    assert "| test_accuracy | 0.8800 | 0.8700 | 0.7900 | 0.8750 | -0.0050 |" in md
    assert "holding 0.9 of its energy" in md
    assert "![" in md and "(ranks.png)" in md and "(spectra.png)" in md
    assert f"{report['size']['mb']:.1f} MB" in md


def test_plots_are_pngs(written):
    out, _, _, _ = written
    for name in ("ranks.png", "spectra.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert width > 400 and height > 300
            # Not a blank canvas: a drawn plot has many distinct colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20


def test_ranks_plot_grows_with_layer_count(tmp_path):
    from hf_svd_compress.report import plot_ranks

    row = {
        "name": "",
        "shape": [8, 8],
        "full_rank": 8,
        "kept_rank": 3,
        "kept_fraction": 3 / 8,
        "stored_as": "factored",
    }
    heights = []
    for n in (6, 48):
        path = plot_ranks([{**row, "name": f"enc.layer.{i}.fc"} for i in range(n)], tmp_path / f"{n}.png")
        with Image.open(path) as image:
            heights.append(image.size[1])
    assert heights[1] > 3 * heights[0]


def test_without_summary(tmp_path):
    folder = tmp_path / "bare"
    model = make_export(
        folder, tiny_config(), tiny_ranks(), summary=False, selection={"method": "budget", "budget": 0.5}
    )
    out = write_report(folder, tmp_path / "elsewhere")
    assert out == tmp_path / "elsewhere"
    assert sorted(p.name for p in out.iterdir()) == ["ranks.png", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    # Computed from the file and the ranks, the dense count must equal the real dense model's.
    assert report["parameters"]["dense"] == sum(p.numel() for p in model.parameters())
    assert report["parameters"]["dense_source"] == "computed from the ranks"
    assert report["accuracy"] is None and report["wall_time_s"] is None
    md = (out / "report.md").read_text()
    assert "- **Accuracy:** not recorded" in md
    assert "keep 0.5 of their dense parameters" in md
    assert "spectra.png" not in md


def test_default_output_dir(written):
    out, _, _, folder = written
    assert out == folder / "report"
    assert sorted(p.name for p in out.iterdir()) == ["ranks.png", "report.json", "report.md", "spectra.png"]


def test_not_a_compressed_model(export_dir):
    folder = export_dir
    config = json.loads((folder / "config.json").read_text())
    del config["svd_compression"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{folder}.*not a compressed model"):
        build_report(folder)
    assert not (folder / "report").exists()
    with pytest.raises(ValueError, match="not a compressed model"):
        write_report(folder)


def test_missing_shape_is_named(export_dir):
    folder = export_dir
    config = json.loads((folder / "config.json").read_text())
    del config["svd_compression"]["shapes"]["bert.encoder.layer.1.output.dense"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shapes\['bert.encoder.layer.1.output.dense'\]"):
        build_report(folder)


def test_missing_matplotlib(export_dir, monkeypatch):
    folder = export_dir
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        write_report(folder)
    assert not (folder / "report").exists()  # checked before anything is written


def test_short_names_and_representative_layers():
    names = module_names(6)
    assert short_names(names)[:2] == ["0.attention.self.query", "0.attention.self.key"]
    assert short_names([names[0], "bert.pooler.dense", "classifier"]) == [
        "0.attention.self.query",
        "bert.pooler.dense",
        "classifier",
    ]
    assert short_names(["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]) == ["0.attn.c_attn", "1.mlp.c_fc"]
    assert short_names(["classifier"]) == ["classifier"]
    assert short_names(["a.b.fc", "a.b.fc"]) == ["fc", "fc"]
    grid = representative_layers(names)
    assert [len(row) for row in grid] == [6, 6, 6]
    assert [row[0] for row in grid] == [f"bert.encoder.layer.{i}.attention.self.query" for i in (0, 2, 5)]
    # No repeated blocks: one row with the first, middle and last layers.
    assert representative_layers(["pooler.dense", "classifier"]) == [["pooler.dense", "classifier"]]


def test_layers_are_stored_dense_from_the_exports_own_break_even(tmp_path):
    from builders import make_bert

    from hf_svd_compress import prune_, save_compressed, svd_factorize_
    from hf_svd_compress.layers.allocation import BREAK_EVEN

    model = svd_factorize_(make_bert())
    prune_(model, budget=0.9, rank_multiple=1)  # three layers keep 0.9 to 1.0 of their parameter break-even rank
    save_compressed(model, tmp_path / "export")
    rows = build_report(tmp_path / "export")["layers"]
    for row in rows:
        (m, n), rank = row["shape"], row["kept_rank"]
        assert row["break_even_rank"] == pytest.approx(BREAK_EVEN * m * n / (m + n))
        assert (row["stored_as"] == "dense") == (rank >= row["break_even_rank"])
    between = [row for row in rows if row["break_even_rank"] <= row["kept_rank"] < row["break_even_rank"] / BREAK_EVEN]
    assert between and all(row["stored_as"] == "dense" for row in between)
