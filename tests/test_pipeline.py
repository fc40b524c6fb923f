"""Pipeline guards that run before any training (the stages themselves run end to end in test_cli/test_recipes)."""

from __future__ import annotations

import pytest
from transformers import TrainingArguments

from hf_svd_compress.pipeline import PipelineArguments, check_unsharded
from hf_svd_compress.training.arguments import SVDTrainingArguments
from hf_svd_compress.training.compress import compress_config


@pytest.mark.parametrize("setting", [None, "false", "0", "no"])
@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_unsharded_runs_pass_and_sharded_ones_are_refused(tmp_path, monkeypatch, variable, setting):
    """accelerate writes ACCELERATE_USE_FSDP=false for a DDP config: only a value that switches it on refuses."""
    other = next(v for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED") if v != variable)
    monkeypatch.delenv(other, raising=False)
    if setting is None:
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, setting)
    args = TrainingArguments(tmp_path, use_cpu=True)
    assert check_unsharded(args) is None
    for on in ("true", "1", "TRUE", "yes"):
        monkeypatch.setenv(variable, on)
        with pytest.raises(ValueError, match=variable):
            check_unsharded(args)


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_accelerate_fsdp_or_deepspeed_is_refused_with_the_fix(tmp_path, monkeypatch, variable):
    args = TrainingArguments(tmp_path, use_cpu=True)
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ValueError, match=f"{variable}.*multi_gpu.yaml"):
        check_unsharded(args)


def test_fsdp_in_the_training_arguments_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    args = TrainingArguments(tmp_path, use_cpu=True)
    args.fsdp = ["full_shard"]  # set after __post_init__, which needs a GPU-capable accelerate state for FSDP
    with pytest.raises(ValueError, match="not under FSDP or DeepSpeed"):
        check_unsharded(args)


def test_pipeline_arguments_build_the_svd_config(tmp_path):
    args = SVDTrainingArguments(tmp_path, use_cpu=True, orth_probes=8, prune_budget=0.4, prune_rank_multiple=4)
    config = PipelineArguments(target_modules="query,value").svd_config(args)
    assert config.target_modules == ["query", "value"]
    assert (config.orth_probes, config.prune_budget, config.prune_rank_multiple) == (8, 0.4, 4)
    assert PipelineArguments(target_modules="re:.*query").svd_config(args).target_modules == ".*query"


def test_negative_step_counts_are_refused():
    with pytest.raises(ValueError, match="--svd_steps"):
        PipelineArguments(svd_steps=-1)


def test_the_pipeline_defaults_are_compress_defaults(tmp_path):
    config = PipelineArguments().svd_config(SVDTrainingArguments(tmp_path, use_cpu=True))
    assert config == compress_config(prune_budget=0.5)
    assert (config.orth_weight, config.sparsity, config.prune_allocation) == (0.0, None, "threshold")
    assert (PipelineArguments().init, PipelineArguments().schedule, PipelineArguments().finetune_steps) == (
        "whitened",
        "at_start",
        0,
    )
