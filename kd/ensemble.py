"""An ensemble of students of one architecture, shipped as one model: the winner's fold students, as judged.

A cross-validated search judges a trial by its K fold students' pooled out-of-fold predictions; the refit ships a
different model (trained on all the data, with a threshold tuned on the fold students' predictions). `Ensemble`
ships the fold students themselves: each image's class probabilities are the mean of the K students'. Its forward
returns the log of that mean, so softmax of the output is the mean probability and every reader of logits
(evaluation, the threshold, ONNX, `torch.export`) treats it as one model. It costs K students' compute:
its latency is measured as one model's.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Ensemble(nn.Module):
    """K students; forward: log of their mean softmax (N x classes), computed in float32."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        # the input normalisation and timm's config are the members' (one architecture): kd.models.mean_std reads it
        self.pretrained_cfg: dict[str, Any] = dict(getattr(members[0], "pretrained_cfg", None) or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([member(x).float().softmax(dim=-1) for member in self.members]).mean(dim=0)
        return probs.clamp_min(torch.finfo(torch.float32).tiny).log()

    def __len__(self) -> int:
        return len(self.members)


def member_prefix(i: int) -> str:
    """Member `i`'s key prefix in an ensemble's state dict (`members.0.` ...): strip it to load one in timm."""
    return f"members.{i}."
