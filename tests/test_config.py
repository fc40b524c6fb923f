"""`SVDConfig`: defaults, validation in `__post_init__`, the versioned dict round trip, per-architecture targets."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from hf_svd_compress import DEFAULT_TARGET_MODULES, SVDConfig
from hf_svd_compress.config import CONFIG_FORMAT_VERSION


def test_defaults():
    config = SVDConfig()
    assert config.target_modules is None
    assert config.exclude_modules is None
    assert config.sparsity == "hoyer"
    assert config.orth_weight > 0 and config.sparsity_weight > 0
    assert 0 < config.prune_energy <= 1
    assert config.prune_budget is None and config.init_energy is None and config.init_max_rank is None


def test_every_field_has_help():
    for f in dataclasses.fields(SVDConfig):
        assert f.metadata.get("help"), f"field {f.name} has no help text"


@pytest.mark.parametrize(
    "field, value",
    [
        ("sparsity", "l2"),
        ("sparsity", "L1"),
        ("orth_weight", -0.1),
        ("orth_weight", float("nan")),
        ("orth_weight", "0.1"),
        ("sparsity_weight", -1e-3),
        ("sparsity_weight", float("inf")),
        ("prune_energy", 0),
        ("prune_energy", 0.0),
        ("prune_energy", -0.5),
        ("prune_energy", 1.5),
        ("prune_energy", float("nan")),
        ("prune_energy", True),  # a bool is not a number: True would keep everything
        ("orth_weight", False),
        ("whitening_ridge", float("nan")),
        ("orth_probes", True),
        ("prune_rank_multiple", True),
        ("prune_budget", 0.0),
        ("prune_budget", 1.0),
        ("prune_budget", 1.2),
        ("prune_budget", -0.3),
        ("init_energy", 0.0),
        ("init_energy", 1.01),
        ("init_max_rank", 0),
        ("init_max_rank", -4),
        ("init_max_rank", 2.5),
        ("init_max_rank", True),
        ("prune_rank_multiple", 0),
        ("prune_rank_multiple", 8.0),
        ("prune_rank_multiple", None),
        ("parameterization", "qr"),
        ("conv_mode", "depthwise"),
        ("approx_weight", -1.0),
        ("target_modules", []),
        ("target_modules", ""),
        ("target_modules", [""]),
        ("target_modules", ["query", 3]),
        ("target_modules", "(unclosed"),
        ("exclude_modules", []),
        ("exclude_modules", 7),
    ],
)
def test_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        SVDConfig(**{field: value})
    message = str(info.value)
    assert field in message
    assert repr(value) in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prune_energy": 1.0},
        {"prune_energy": 1},
        {"prune_budget": 0.5},
        {"init_energy": 1.0},
        {"init_max_rank": 1},
        {"orth_weight": 0, "sparsity_weight": 0.0},
        {"sparsity": None},
        {"sparsity": "l1"},
        {"sparsity": "hoyer_square"},
        {"target_modules": "all-linear"},
        {"target_modules": r".*\.(query|value)"},
        {"target_modules": ["query"], "exclude_modules": r".*layer\.0\..*"},
    ],
)
def test_valid_boundaries_accepted(kwargs):
    config = SVDConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


def test_numpy_and_torch_scalars_become_python_numbers():
    config = SVDConfig(prune_energy=np.float32(0.5), orth_weight=torch.tensor(0.25), prune_rank_multiple=np.int64(4))
    assert (config.prune_energy, config.orth_weight, config.prune_rank_multiple) == (0.5, 0.25, 4)
    assert type(config.prune_energy) is float and type(config.prune_rank_multiple) is int
    json.dumps(config.to_dict())  # stays serializable


def test_tuple_and_set_targets_become_sorted_lists():
    assert SVDConfig(target_modules=("value", "query")).target_modules == ["query", "value"]
    assert SVDConfig(exclude_modules={"b", "a"}).exclude_modules == ["a", "b"]


def test_round_trip_through_json():
    config = SVDConfig(
        target_modules=["query", "value"],
        exclude_modules=r".*layer\.1\..*",
        orth_weight=2.0,
        sparsity="hoyer_square",
        sparsity_weight=0.05,
        prune_energy=0.9,
        prune_budget=0.3,
        init_energy=0.99,
        init_max_rank=8,
    )
    data = config.to_dict()
    assert data["format_version"] == CONFIG_FORMAT_VERSION == 1
    restored = SVDConfig.from_dict(json.loads(json.dumps(data)))
    assert restored == config
    assert restored.to_dict() == data
    assert SVDConfig.from_dict(SVDConfig().to_dict()) == SVDConfig()


def test_to_dict_lists_every_field():
    data = SVDConfig().to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(SVDConfig)} | {"format_version"}


def test_from_dict_does_not_mutate_input():
    data = SVDConfig(orth_weight=0.3).to_dict()
    copy = dict(data)
    SVDConfig.from_dict(data)
    assert data == copy


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unknown_format_version_refused(version):
    data = SVDConfig().to_dict()
    data["format_version"] = version
    with pytest.raises(ValueError, match=re.escape(f"format_version {version}")):
        SVDConfig.from_dict(data)


def test_unknown_fields_refused():
    data = SVDConfig().to_dict()
    data["rank_pattern"] = {}
    data["lora_alpha"] = 8
    with pytest.raises(ValueError, match="lora_alpha.*rank_pattern"):
        SVDConfig.from_dict(data)


def test_from_dict_validates_values():
    data = SVDConfig().to_dict()
    data["prune_energy"] = 2.0
    with pytest.raises(ValueError, match="prune_energy"):
        SVDConfig.from_dict(data)


def test_resolved_targets_per_model_type():
    config = SVDConfig()
    bert = config.resolved_targets("bert")
    assert isinstance(bert, list)
    assert {"query", "key", "value", "intermediate.dense", "output.dense"} <= set(bert)
    assert bert == DEFAULT_TARGET_MODULES["bert"]
    vit = config.resolved_targets("vit")
    assert isinstance(vit, list) and vit == DEFAULT_TARGET_MODULES["vit"]
    for default in (bert, vit):
        assert not {"classifier", "pooler", "pooler.dense", "dense"} & set(default)
    assert config.resolved_targets("gpt2") == "all-linear"
    assert config.resolved_targets("some_new_arch") == "all-linear"
    assert config.resolved_targets(None) == "all-linear"


def test_explicit_targets_override_defaults():
    assert SVDConfig(target_modules=["fc1"]).resolved_targets("bert") == ["fc1"]
    assert SVDConfig(target_modules="all-linear").resolved_targets("vit") == "all-linear"
