"""Knowledge distillation: a quantized student learns from a float teacher's soft labels.

Hinton, Vinyals, Dean, "Distilling the knowledge in a neural network" (arXiv 1503.02531)::

    L = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )

``z_s``, ``z_t``: student and teacher logits; ``T``: the temperature (the ``T^2`` keeps the soft
term's gradient on the scale of the hard one as ``T`` grows). The teacher runs in eval mode
without gradients. :class:`KnowledgeDistillation` is a Trainer ``loss_fn``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KnowledgeDistillation", "kd_loss"]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 0.9,
            temperature: float = 4.0) -> Tensor:
    """``(1 - alpha) CE(z_s, y) + alpha T^2 KL(softmax(z_t/T) || softmax(z_s/T))`` (batch mean)."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, target) if alpha < 1 else student_logits.new_zeros(())
    return (1 - alpha) * hard + alpha * t * t * soft


def check_kd_options(alpha: float, temperature: float, who: str = "kd") -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise ValueError(f"{who}: alpha must be a number in [0, 1], got {alpha!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature <= 0:
        raise ValueError(f"{who}: temperature must be a number > 0, got {temperature!r}")


def frozen_teacher(teacher: nn.Module, who: str = "kd") -> nn.Module:
    """The teacher in eval mode with gradients off (its BatchNorm statistics never move)."""
    if not isinstance(teacher, nn.Module):
        raise ValueError(f"{who}: teacher must be a torch module (a run directory or checkpoint path is "
                         f"loaded by `lowbit train` / lowbit.experiment), got {type(teacher).__name__}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class KnowledgeDistillation:
    """Trainer ``loss_fn(model, x, y) -> (loss, student logits)`` with a float teacher."""

    name = "kd"

    def __init__(self, teacher: nn.Module, alpha: float = 0.9, temperature: float = 4.0) -> None:
        check_kd_options(alpha, temperature)
        self.teacher = frozen_teacher(teacher)
        self.alpha, self.temperature = float(alpha), float(temperature)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            self.teacher.eval()
            z_t = self.teacher(x)
        z_s = model(x)
        return kd_loss(z_s, z_t, y, self.alpha, self.temperature), z_s
