"""distillation_loss: Hinton's soft-target KL against a direct computation, masking, errors."""

from __future__ import annotations

import pytest
import torch

from hf_svd_compress.training.distillation import distillation_loss


def reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T^2 mean_i sum_c p_t log(p_t / p_s)`, written out."""
    p_t = torch.softmax(teacher.double() / temperature, -1)
    log_p_s = torch.log_softmax(student.double() / temperature, -1)
    return temperature**2 * (p_t * (p_t.log() - log_p_s)).sum(-1).mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_matches_the_written_out_kl(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss = distillation_loss(student, teacher, temperature)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference(student, teacher, temperature).item(), rel=1e-5)


def test_zero_when_student_equals_teacher_and_gradient_points_to_teacher():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(4, 3, generator=g)
    assert distillation_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros(4, 3, requires_grad=True)
    distillation_loss(student, teacher).backward()
    stepped = student.detach() - 10.0 * student.grad
    assert distillation_loss(stepped, teacher) < distillation_loss(student.detach(), teacher)


def test_bf16_logits_are_computed_in_float32():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    low = distillation_loss(student.bfloat16(), teacher.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(distillation_loss(student, teacher).item(), rel=0.05)


def test_token_positions_labelled_minus_100_are_left_out():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    labels = torch.tensor([[0, 1, -100, -100, 2], [-100, 1, 1, 0, -100]])
    keep = labels != -100
    expected = reference(student[keep], teacher[keep], 2.0)
    assert distillation_loss(student, teacher, 2.0, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    nothing = torch.full((2, 5), -100)
    empty = distillation_loss(student.requires_grad_(), teacher, 2.0, nothing)
    assert empty.item() == 0.0 and empty.requires_grad


def test_sequence_labels_of_a_classifier_do_not_mask():
    # [batch, classes] logits with [batch] labels: every example counts, whatever its label.
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    labels = torch.tensor([0, -100, 2])
    assert distillation_loss(student, teacher, 2.0, labels) == distillation_loss(student, teacher, 2.0)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="same task model"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature 0"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0)
