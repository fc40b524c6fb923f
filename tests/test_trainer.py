"""SVDTrainer: regularizers in compute_loss, their scaling, logging, pruning during training, checkpoints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import make_bert, token_dataset
from datasets import Dataset
from safetensors.torch import load_file
from transformers import (
    BertForSequenceClassification,
    HfArgumentParser,
    TrainerCallback,
    TrainingArguments,
)

from hf_svd_compress import (
    SVDConfig,
    SVDPruningCallback,
    SVDTrainer,
    SVDTrainingArguments,
    current_ranks,
    svd_factorize_,
    svd_layers,
)
from hf_svd_compress.layers.regularizers import regularizer_totals
from hf_svd_compress.training.distillation import distillation_loss, hidden_state_loss

SCRIPT = Path(__file__).parent / "scripts" / "one_sgd_step.py"


def tiny_model(config: SVDConfig | None = None, seed: int = 0) -> BertForSequenceClassification:
    return svd_factorize_(make_bert(seed=seed).train(), config or SVDConfig(sparsity_weight=0.01))


def args(tmp_path, **kw) -> SVDTrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return SVDTrainingArguments(**{**base, **kw})


# ---- scaling under gradient accumulation and several processes --------------------------------------------------


def run_step(out: Path, per_device_batch: int, grad_accum: int = 1, processes: int = 1, *extra: str) -> dict:
    cmd = [str(SCRIPT), "--per_device_batch", str(per_device_batch), "--grad_accum", str(grad_accum)]
    cmd += ["--out", str(out), *extra]
    if processes > 1:
        launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd = [sys.executable, *launch, *cmd]
    else:
        cmd = [sys.executable, *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out / "update.safetensors")


def max_relative_diff(a: dict, b: dict) -> float:
    scale = max(t.abs().max().item() for t in b.values())
    return max((a[k] - b[k]).abs().max().item() for k in b) / scale


@pytest.fixture(scope="module", params=["bert", "vit"])
def model_kind(request):
    """BERT returns a plain mean loss; ViT normalizes by num_items_in_batch: the Trainer scales them differently."""
    return request.param


@pytest.fixture(scope="module")
def reference_update(tmp_path_factory, model_kind):
    """Single process, no accumulation, batch 8: the update every other configuration must reproduce."""
    return run_step(tmp_path_factory.mktemp("ref"), 8, 1, 1, "--model", model_kind)


def test_regularizers_move_the_reference_step(reference_update, model_kind, tmp_path):
    # Guard against a vacuous comparison: the regularizers must change the step by far more than the tolerance.
    task_only = run_step(tmp_path, 8, 1, 1, "--no_regularizers", "--model", model_kind)
    assert max_relative_diff(task_only, reference_update) > 0.1


def test_gradient_accumulation_matches_reference(reference_update, model_kind, tmp_path):
    update = run_step(tmp_path, 4, 2, 1, "--model", model_kind)
    assert max_relative_diff(update, reference_update) < 1e-4


@pytest.mark.distributed
def test_two_processes_match_reference(reference_update, model_kind, tmp_path):
    update = run_step(tmp_path, 4, 1, 2, "--model", model_kind)
    assert max_relative_diff(update, reference_update) < 1e-4


@pytest.mark.distributed
def test_two_processes_with_accumulation_match_reference(reference_update, model_kind, tmp_path):
    update = run_step(tmp_path, 2, 2, 2, "--model", model_kind)
    assert max_relative_diff(update, reference_update) < 1e-4


# Task loss and distillation alone (the regularizers' scaling is checked above): the update is theirs.
DISTILL = ("--distill", "--no_regularizers")


@pytest.fixture(scope="module")
def distill_reference(tmp_path_factory, model_kind):
    return run_step(tmp_path_factory.mktemp("ref_kd"), 8, 1, 1, "--model", model_kind, *DISTILL)


def test_distillation_moves_the_reference_step(distill_reference, model_kind, tmp_path):
    task_only = run_step(tmp_path, 8, 1, 1, "--no_regularizers", "--model", model_kind)
    assert max_relative_diff(task_only, distill_reference) > 0.1


def test_distillation_under_accumulation_matches_reference(distill_reference, model_kind, tmp_path):
    update = run_step(tmp_path, 4, 2, 1, "--model", model_kind, *DISTILL)
    assert max_relative_diff(update, distill_reference) < 1e-4


@pytest.mark.distributed
def test_distillation_two_processes_with_accumulation_match_reference(distill_reference, model_kind, tmp_path):
    update = run_step(tmp_path, 2, 2, 2, "--model", model_kind, *DISTILL)
    assert max_relative_diff(update, distill_reference) < 1e-4


# ---- weights, arguments, logging -------------------------------------------------------------------------------


def test_logs_unweighted_terms_next_to_loss(tmp_path):
    model = tiny_model()
    trainer = SVDTrainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=token_dataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert {"orth_loss", "sparsity_loss", "rank_fraction"} <= set(entry)
    # The first step's logged terms are those of the initial weights.
    assert logs[0]["sparsity_loss"] > 1.0


def test_loss_is_task_loss_plus_weighted_terms(tmp_path):
    model = tiny_model(SVDConfig(orth_weight=3.0, sparsity="l1", sparsity_weight=0.2))
    trainer = SVDTrainer(model=model, args=args(tmp_path), train_dataset=token_dataset())
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    loss = trainer.compute_loss(model, batch)
    task = model(**batch).loss
    orth, l1 = regularizer_totals(list(svd_layers(trainer.model).values()), "l1")
    torch.testing.assert_close(loss, task + 3.0 * orth + 0.2 * l1, rtol=1e-5, atol=1e-6)


def test_eval_loss_has_no_regularizer(tmp_path):
    model = tiny_model(SVDConfig(sparsity="l1", sparsity_weight=1.0))
    eval_args = args(tmp_path, per_device_eval_batch_size=16)
    trainer = SVDTrainer(model=model, args=eval_args, train_dataset=token_dataset(), eval_dataset=token_dataset(16))
    metrics = trainer.evaluate()
    model.eval()
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader())))
    with torch.no_grad():
        assert metrics["eval_loss"] == pytest.approx(model(**batch).loss.item(), rel=1e-4)


def test_plain_training_arguments_use_model_config(tmp_path):
    model = tiny_model(SVDConfig(orth_weight=0.7, sparsity="hoyer_square", sparsity_weight=0.03))
    plain = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    trainer = SVDTrainer(model=model, args=plain, train_dataset=token_dataset())
    assert trainer.regularizer_weights() == (0.7, "hoyer_square", 0.03)
    trainer.train()
    assert "sparsity_loss" in trainer.state.log_history[0] or trainer.state.global_step == 1


def test_set_arguments_override_and_unset_defer(tmp_path):
    model = tiny_model(SVDConfig(orth_weight=0.7, sparsity="hoyer", sparsity_weight=0.03))
    trainer = SVDTrainer(model=model, args=args(tmp_path, sparsity_weight=0.5), train_dataset=token_dataset())
    assert trainer.regularizer_weights() == (0.7, "hoyer", 0.5)
    trainer = SVDTrainer(model=model, args=args(tmp_path, sparsity="none"), train_dataset=token_dataset())
    assert trainer.regularizer_weights() == (0.7, None, 0.0)


def test_hf_argument_parser_exposes_fields():
    (parsed,) = HfArgumentParser(SVDTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "x", "--orth_weight", "2", "--sparsity", "l1"]
        + ["--prune_at_step", "3", "--prune_budget", "0.5"]
    )
    assert (parsed.orth_weight, parsed.sparsity, parsed.prune_at_step, parsed.prune_budget) == (2.0, "l1", 3, 0.5)
    assert parsed.sparsity_weight is None


@pytest.mark.parametrize(
    "bad",
    [
        {"sparsity": "l2"},
        {"orth_weight": -1.0},
        {"orth_weight": float("nan")},  # would train with a NaN loss
        {"sparsity_weight": float("inf")},
        {"distill_alpha": float("nan")},
        {"prune_energy": 1.5},
        {"prune_energy": True},  # a bool is not a number
        {"prune_budget": 1.0},
        {"prune_at_step": 0},  # no optimizer step ends at 0: it would never prune
        {"prune_at_step": -3},
        {"prune_at_step": 2.5},
        {"regularizer_interval": 0},
    ],
)
def test_bad_arguments_are_refused(tmp_path, bad):
    (name, value), shown = next(iter(bad.items())), str(next(iter(bad.values())))
    with pytest.raises(ValueError, match=re.escape(f"--{name} {shown if name != 'sparsity' else repr(value)}: ")):
        args(tmp_path, **bad)


def test_numpy_scalars_are_accepted_as_numbers(tmp_path):
    parsed = args(tmp_path, prune_budget=np.float32(0.5), orth_weight=np.float64(0.1), prune_at_step=np.int64(4))
    assert (parsed.prune_budget, parsed.orth_weight, parsed.prune_at_step) == (0.5, 0.1, 4)
    assert type(parsed.prune_at_step) is int


def test_unfactored_model_is_refused(tmp_path):
    model = make_bert()
    with pytest.raises(ValueError, match="svd_factorize_"):
        SVDTrainer(model=model, args=args(tmp_path), train_dataset=token_dataset())


# ---- distillation from a teacher ----------------------------------------------------------------------------------


def dense_teacher(seed: int = 5) -> BertForSequenceClassification:
    """A dense model with the student's shape and other weights, so that the distillation term is far from 0."""
    torch.manual_seed(seed)
    teacher = BertForSequenceClassification(tiny_model().config).eval()
    with torch.no_grad():
        teacher.classifier.weight.mul_(50.0)  # confident predictions: a random head's logits are nearly uniform
    return teacher


def test_hidden_state_distillation_adds_its_weighted_term_and_logs_it(tmp_path):
    model, teacher = tiny_model(SVDConfig(orth_weight=0.0, sparsity=None)), dense_teacher()
    training_args = args(tmp_path, distill_alpha=0.25, distill_temperature=3.0, distill_hidden_weight=2.0)
    trainer = SVDTrainer(model=model, args=training_args, train_dataset=token_dataset(), teacher_model=teacher)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    loss = trainer.compute_loss(model, batch)
    student = model(**batch, output_hidden_states=True)
    with torch.no_grad():
        reference = teacher(input_ids=batch["input_ids"], output_hidden_states=True)
    kd = distillation_loss(student.logits, reference.logits, 3.0)
    hidden = hidden_state_loss(student.hidden_states, reference.hidden_states, batch.get("attention_mask"))
    assert hidden.item() > 0.01  # the check below is not vacuous
    torch.testing.assert_close(loss, 0.75 * student.loss + 0.25 * kd + 2.0 * hidden, rtol=1e-5, atol=1e-6)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["distill_hidden_loss"] > 0 for entry in logs)


def test_loss_mixes_task_and_distillation_and_logs_it(tmp_path):
    model, teacher = tiny_model(SVDConfig(orth_weight=0.0, sparsity=None)), dense_teacher()
    training_args = args(tmp_path, distill_alpha=0.25, distill_temperature=3.0, distill_hidden_weight=0.0)
    trainer = SVDTrainer(model=model, args=training_args, train_dataset=token_dataset(), teacher_model=teacher)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    loss = trainer.compute_loss(model, batch)
    task = model(**batch)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"]).logits
    kd = distillation_loss(task.logits, teacher_logits, 3.0)
    assert kd.item() > 0.01  # the check below is not vacuous
    torch.testing.assert_close(loss, 0.75 * task.loss + 0.25 * kd, rtol=1e-5, atol=1e-6)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["distill_loss"] > 0 for entry in logs)
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())


def test_distillation_pulls_the_student_to_the_teacher(tmp_path):
    def kl_after(alpha: float) -> float:
        model, teacher = tiny_model(SVDConfig(orth_weight=0.0, sparsity=None)), dense_teacher()
        training_args = args(tmp_path / str(alpha), max_steps=16, learning_rate=5e-3, distill_alpha=alpha)
        SVDTrainer(model=model, args=training_args, train_dataset=token_dataset(), teacher_model=teacher).train()
        ids = torch.tensor(token_dataset()["input_ids"])
        model.eval()
        with torch.no_grad():
            return distillation_loss(model(input_ids=ids).logits, teacher(input_ids=ids).logits).item()

    assert kl_after(1.0) < 0.5 * kl_after(0.0)


def test_eval_loss_has_no_distillation(tmp_path):
    model = tiny_model(SVDConfig(sparsity=None))
    eval_args = args(tmp_path, per_device_eval_batch_size=16, distill_alpha=0.9)
    trainer = SVDTrainer(model=model, args=eval_args, eval_dataset=token_dataset(16), teacher_model=dense_teacher())
    metrics = trainer.evaluate()
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader())))
    with torch.no_grad():
        assert metrics["eval_loss"] == pytest.approx(model.eval()(**batch).loss.item(), rel=1e-4)


def test_distillation_settings_are_checked_up_front(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="no teacher_model"):
        SVDTrainer(model=model, args=args(tmp_path, distill_alpha=0.5), train_dataset=token_dataset())
    with pytest.raises(ValueError, match="shares parameters"):
        SVDTrainer(model=model, args=args(tmp_path), train_dataset=token_dataset(), teacher_model=model)
    with pytest.raises(ValueError, match="distill_alpha 1.5"):
        args(tmp_path, distill_alpha=1.5)
    with pytest.raises(ValueError, match="distill_temperature 0"):
        args(tmp_path, distill_temperature=0.0)
    trainer = SVDTrainer(
        model=model, args=args(tmp_path), train_dataset=token_dataset(), teacher_model=dense_teacher()
    )
    assert trainer.distill_alpha == 0.5  # unset: the default weight with a teacher


# ---- pruning during training, checkpoints, gradient checkpointing -------------------------------------------------


def test_prune_at_step_then_fine_tune_without_sparsity(tmp_path):
    model = tiny_model(SVDConfig(sparsity="hoyer", sparsity_weight=0.05))
    training_args = args(tmp_path, max_steps=6, prune_at_step=3, prune_energy=0.8)
    trainer = SVDTrainer(model=model, args=training_args, train_dataset=token_dataset())
    trainer.train()
    ranks = current_ranks(model)
    assert all(rank < model.get_submodule(name).full_rank for name, rank in ranks.items())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("sparsity_loss" in entry for entry in logs if entry["step"] <= 3)
    assert all("sparsity_loss" not in entry for entry in logs if entry["step"] > 3)
    assert logs[-1]["rank_fraction"] < 1.0


def test_gradual_pruning_follows_the_cubic_schedule_to_the_budget(tmp_path):
    model = tiny_model(SVDConfig(sparsity="hoyer", sparsity_weight=0.05, prune_rank_multiple=1))
    kw = dict(max_steps=8, prune_start_step=2, prune_at_step=6, prune_budget=0.4, logging_steps=1)
    trainer = SVDTrainer(model=model, args=args(tmp_path, **kw), train_dataset=token_dataset())
    (pruning,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, SVDPruningCallback)]
    budgets = [pruning.target(step)[1] for step in range(9)]
    assert budgets[:3] == [None, None, None] and budgets[7:] == [None, None]  # step 2: progress 0 cuts nothing
    assert budgets[6] == 0.4 and budgets[3] > budgets[4] > budgets[5] > budgets[6]
    assert budgets[3] == pytest.approx(1 - 0.6 * (1 - 0.75**3))
    trainer.train()
    fractions = [e["rank_fraction"] for e in trainer.state.log_history if "loss" in e]
    assert fractions[:2] == [1.0, 1.0] and fractions[2] > fractions[3] > fractions[4] > fractions[5]
    assert fractions[5:] == [fractions[5]] * 3  # nothing more after prune_at_step
    layers = list(svd_layers(trainer.model).values())
    kept = sum(layer.rank * (layer.in_features + layer.out_features) for layer in layers)
    assert kept <= 0.4 * sum(layer.in_features * layer.out_features for layer in layers)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all("sparsity_loss" in e for e in logs if e["step"] <= 6)  # on while pruning, off after
    assert all("sparsity_loss" not in e for e in logs if e["step"] > 6)


def test_gradual_pruning_needs_a_later_prune_at_step(tmp_path):
    with pytest.raises(ValueError, match="--prune_start_step 4: must be below --prune_at_step 4"):
        args(tmp_path, prune_budget=0.5, prune_start_step=4, prune_at_step=4)
    with pytest.raises(ValueError, match="--prune_start_step -1"):
        args(tmp_path, prune_start_step=-1)
    with pytest.raises(ValueError, match="without --prune_at_step"):
        SVDTrainer(model=tiny_model(), args=args(tmp_path, prune_start_step=3), train_dataset=token_dataset())
    with pytest.raises(ValueError, match="start_step=5"):
        SVDPruningCallback(at_step=5, budget=0.5, start_step=5)
    with pytest.raises(ValueError, match="needs a budget target"):
        SVDPruningCallback(at_step=5, energy=0.9, start_step=2)


class StopAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step
        return control


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    common = dict(max_steps=6, prune_at_step=2, prune_energy=0.8, save_strategy="steps", save_steps=3)
    full = tiny_model()
    SVDTrainer(model=full, args=args(tmp_path / "a", **common), train_dataset=token_dataset()).train()

    interrupted = tiny_model()
    first = SVDTrainer(model=interrupted, args=args(tmp_path / "b", **common), train_dataset=token_dataset())
    first.add_callback(StopAfter(3))  # a crash after the step-3 checkpoint, same schedule as the full run
    first.train()
    resumed = tiny_model()  # a fresh factored model: masks and factors come from the checkpoint
    trainer = SVDTrainer(model=resumed, args=args(tmp_path / "b", **common), train_dataset=token_dataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert current_ranks(resumed) == current_ranks(full)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_gradient_checkpointing_does_not_count_terms_twice(tmp_path):
    losses = []
    for checkpointing in (False, True):
        model = tiny_model(SVDConfig(sparsity="l1", sparsity_weight=0.1))
        training_args = args(tmp_path, max_steps=1, gradient_checkpointing=checkpointing)
        trainer = SVDTrainer(model=model, args=training_args, train_dataset=token_dataset())
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
        assert trainer.state.log_history[0]["sparsity_loss"] == pytest.approx(
            regularizer_totals(list(svd_layers(trainer.model).values()), "l1")[1].item(), rel=0.05
        )
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_singular_value_lr_scale_gives_s_its_own_learning_rate(tmp_path):
    model = tiny_model()
    trainer = SVDTrainer(
        model=model,
        args=args(tmp_path, learning_rate=1e-3, singular_value_lr_scale=100.0),
        train_dataset=token_dataset(),
    )
    optimizer = trainer.create_optimizer()
    s_ids = {id(layer.s) for layer in list(svd_layers(trainer.model).values())}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert not ids or ids <= s_ids or not ids & s_ids, "a group mixes singular values and other parameters"
        assert group["lr"] == pytest.approx(0.1 if ids and ids <= s_ids else 1e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    before = {id(layer.s): layer.s.detach().clone() for layer in list(svd_layers(trainer.model).values())}
    trainer.train()
    moved = max(
        (layer.s.detach() - before[id(layer.s)]).abs().max().item()
        for layer in list(svd_layers(trainer.model).values())
    )
    assert moved > 0.05  # 4 Adam steps at lr 0.1 (about 1e-3 x 4 without the scale)


class RecordLearningRates(TrainerCallback):
    """The learning rate of every optimizer group at the start of each step."""

    def __init__(self) -> None:
        self.rates: list[list[float]] = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.rates.append([group["lr"] for group in optimizer.param_groups])


@pytest.mark.parametrize("gradual", [False, True])
def test_singular_values_return_to_the_base_rate_once_pruned(tmp_path, gradual):
    pruning = dict(prune_budget=0.5, prune_start_step=0) if gradual else dict(prune_energy=0.9)
    kw = dict(learning_rate=1e-3, singular_value_lr_scale=100.0, max_steps=5, prune_at_step=2, **pruning)
    trainer = SVDTrainer(
        model=tiny_model(), args=args(tmp_path, lr_scheduler_type="linear", **kw), train_dataset=token_dataset()
    )
    record = RecordLearningRates()
    trainer.add_callback(record)
    trainer.train()
    base = [min(rates) for rates in record.rates]
    assert base == pytest.approx([1e-3 * (1 - step / 5) for step in range(5)])  # the linear schedule, unchanged
    assert [max(rates) / min(rates) for rates in record.rates] == pytest.approx([100, 100, 1, 1, 1])
    assert all("singular_value_lr_scale" not in group for group in trainer.optimizer.param_groups)


def test_evaluate_before_training_a_model_whose_loss_takes_num_items(tmp_path):
    # ViT's loss uses `num_items_in_batch`: the regularizer scale reads Trainer state that exists only in training.
    from builders import make_vit

    model = svd_factorize_(make_vit(), SVDConfig(sparsity="l1", sparsity_weight=1.0, parameterization="cur"))
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {"pixel_values": torch.randn(8, 3, 16, 16, generator=g).tolist(), "labels": [i % 3 for i in range(8)]}
    )
    trainer = SVDTrainer(model=model, args=args(tmp_path, per_device_eval_batch_size=4), eval_dataset=data)
    assert trainer.evaluate()["eval_loss"] > 0
