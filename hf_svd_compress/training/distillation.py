"""Knowledge distillation from a teacher (the dense model) while a factored student trains, as a pure fp32 loss.

Hinton et al.'s soft-target loss `T^2 KL(softmax(t / T) || softmax(z / T))`, averaged over the predictions: the
soft targets carry the teacher's whole output distribution, which lets a pruned model recover in far fewer steps
than hard labels do (see the quality benchmark in docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """`T^2 KL(p_teacher || p_student)` at temperature `T`, mean over the predictions, in float32.

    Args:
        student_logits (`torch.Tensor`): `[..., num_classes]`, e.g. `[batch, classes]` or `[batch, seq, classes]`.
        teacher_logits (`torch.Tensor`): Same shape as `student_logits`.
        temperature (`float`, defaults to 2.0): Softens both distributions; `T^2` keeps the gradient scale of the
            soft targets independent of `T`.
        labels (`torch.Tensor`, *optional*): With the shape of the logits minus the last dimension (token tasks):
            positions labelled -100 (padding, sub-words) are left out, as the task loss leaves them out.

    Returns:
        `torch.Tensor`: A float32 scalar (0 when no position is left).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "the teacher must be the same task model (same head and label set) as the student."
        )
    if not temperature > 0:
        raise ValueError(f"temperature {temperature}: must be > 0 (1: the plain distributions; 2 is common).")
    classes = student_logits.shape[-1]
    student = student_logits.float().reshape(-1, classes) / temperature
    teacher = teacher_logits.float().reshape(-1, classes) / temperature
    if labels is not None and labels.shape == student_logits.shape[:-1] and student_logits.dim() > 2:
        keep = labels.reshape(-1) != IGNORE_INDEX
        student, teacher = student[keep], teacher[keep]
    if student.shape[0] == 0:
        return student_logits.float().sum() * 0.0  # keeps the graph: every process must call backward
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="batchmean", log_target=True)
    return kl * temperature**2


def hidden_state_loss(
    student_hidden: tuple[torch.Tensor, ...],
    teacher_hidden: tuple[torch.Tensor, ...],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over layers and positions of `||h_s - h_t||^2 / ||h_t||^2` per position (TinyBERT-style, no projection:
    the student has the teacher's depth and width).

    Args:
        student_hidden (`tuple[torch.Tensor, ...]`): The student's `hidden_states` (`output_hidden_states=True`),
            each `[batch, seq, width]`.
        teacher_hidden (`tuple[torch.Tensor, ...]`): The teacher's, of the same shapes.
        attention_mask (`torch.Tensor`, *optional*): `[batch, seq]`; padding positions are left out.

    Returns:
        `torch.Tensor`: A float32 scalar; normalizing by the teacher's norm makes every layer count alike, and the
        mean over positions makes it a per-example mean like the task loss (exact under gradient accumulation).
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"The student has {len(student_hidden)} hidden states and the teacher {len(teacher_hidden)}: hidden-state "
            "distillation needs the teacher's depth (the dense model the student was factored from)."
        )
    terms = []
    for s, t in zip(student_hidden, teacher_hidden):
        s, t = s.float(), t.float()
        if attention_mask is not None and attention_mask.shape == s.shape[:2]:
            keep = attention_mask.bool()
            s, t = s[keep], t[keep]
        error = (s - t).square().sum(-1) / t.square().sum(-1).clamp_min(torch.finfo(t.dtype).tiny)
        terms.append(error.mean() if error.numel() else error.sum())
    return torch.stack(terms).mean()
