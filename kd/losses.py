"""Distillation losses and class-imbalance corrections.

Conventions (stated because codebases disagree):
- `alpha` weights the distillation term and `1 - alpha` the label term, as in the reference projects and DeiT
  (torchdistill uses the opposite).
- Soft KD is `T^2 * KL(softmax(t / T) || softmax(s / T))` with `batchmean` reduction; unlike DeiT's and
  peterliht's code it is not divided by the number of classes (with two classes that would halve it).
- Hard KD is cross-entropy against the teacher's argmax.
- Class weights apply to both cross-entropies (labels and, in hard mode, the teacher's argmax, since a
  biased teacher's argmax otherwise teaches the majority class), never to the soft KL. A weighted CE is
  PyTorch's weighted mean, `sum_i w[y_i] * ce_i / sum_i w[y_i]`.
- Logit adjustment (Menon et al. 2021) adds `tau * log(prior)` to the student's logits inside both
  cross-entropies during training only; predictions use the raw logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd.config import DistillConfig, ImbalanceConfig


@dataclass
class LossParts:
    loss: torch.Tensor       # what is minimised
    task_loss: torch.Tensor  # cross-entropy against the labels
    kd_loss: torch.Tensor    # distillation term (soft KL * T^2, or hard CE); zero without a teacher


def class_weights(counts: list[int] | torch.Tensor, method: str, beta: float = 0.999) -> torch.Tensor | None:
    """Per-class loss weights, normalised to sum to the number of classes; None where the method uses none.

    inverse:   w_c proportional to 1 / n_c
    effective: w_c proportional to (1 - beta) / (1 - beta ** n_c)   (Cui et al. 2019)
    """
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    if method == "inverse":
        w = 1.0 / n
    elif method == "effective":
        w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    else:
        return None
    return (w * len(n) / w.sum()).float()


def logit_adjustment(counts: list[int] | torch.Tensor, tau: float) -> torch.Tensor:
    """tau * log(class prior): added to training logits by the logit-adjusted loss."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    return (tau * torch.log(n / n.sum())).float()


def soft_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                  reduction="batchmean", log_target=True)
    return kl * (t * t)


class DistillLoss(torch.nn.Module):
    """`alpha * distillation + (1 - alpha) * CE(labels)`, returning the parts and the total.

    The student's output may be a (class head, distillation head) pair, as DeiT's distilled models give
    in training: the label term goes to the class head and the distillation term to the other.
    """

    weights: torch.Tensor | None  # buffers, declared for the type checker
    adjustment: torch.Tensor | None

    def __init__(self, distill: DistillConfig, weights: torch.Tensor | None = None,
                 adjustment: torch.Tensor | None = None):
        super().__init__()
        self.mode, self.alpha, self.temperature = distill.mode, distill.alpha, distill.temperature
        self.register_buffer("weights", weights, persistent=False)
        self.register_buffer("adjustment", adjustment, persistent=False)

    @classmethod
    def build(cls, distill: DistillConfig, imbalance: ImbalanceConfig, counts: list[int]) -> DistillLoss:
        weights = class_weights(counts, imbalance.method, imbalance.beta)
        adjustment = logit_adjustment(counts, imbalance.tau) if imbalance.method == "logit_adjust" else None
        return cls(distill, weights, adjustment)

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.adjustment is not None:
            logits = logits + self.adjustment
        return F.cross_entropy(logits, target, weight=self.weights)

    def forward(self, output: torch.Tensor | tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor,
                teacher: torch.Tensor | None = None) -> LossParts:
        cls_out, dist_out = output if isinstance(output, tuple) else (output, output)
        cls_out, dist_out = cls_out.float(), dist_out.float()
        task = self._ce(cls_out, labels)
        if teacher is None:
            zero = task.new_zeros(())
            return LossParts(task, task, zero)
        teacher = teacher.float()
        if self.mode == "soft":
            kd = soft_kd(dist_out, teacher, self.temperature)
        else:
            kd = self._ce(dist_out, teacher.argmax(dim=1))
        return LossParts(self.alpha * kd + (1.0 - self.alpha) * task, task, kd)
