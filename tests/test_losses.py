"""Loss values against numbers computed by hand (plain math, no torch), for every mode and correction."""
import math

import pytest
import torch

from kd.config import DistillConfig, ImbalanceConfig
from kd.losses import DistillLoss, class_weights, logit_adjustment, soft_kd

S = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])  # student logits, two samples, three classes
T = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # teacher logits: argmax [0, 1]
Y = torch.tensor([1, 0])
# Computed by hand with math.exp / math.log (see the derivation in test_soft_kd_single_sample):
SOFT_KD_T2 = 1.2198944669838165   # T=2, batchmean KL * T^2
CE = 1.7512644604326706           # mean CE against Y
CE_W = 1.3033782951032407         # CE against Y with weights [0.5, 1, 2]
HARD = 2.2512644604326706         # CE against the teacher's argmax
HARD_W = 2.5324839590954342       # same, weighted


def test_soft_kd_single_sample_by_hand():
    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]
    t_, s_ = softmax([2 / 2, 0 / 2, 1 / 2]), softmax([1 / 2, 2 / 2, 0 / 2])
    expected = 4 * sum(a * math.log(a / b) for a, b in zip(t_, s_, strict=True))
    assert soft_kd(S[:1], T[:1], 2.0).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.8820576606449144)


def test_soft_loss_alpha_weights_the_distillation_term():
    parts = DistillLoss(DistillConfig("soft", temperature=2.0, alpha=0.3))(S, Y, T)
    assert parts.kd_loss.item() == pytest.approx(SOFT_KD_T2, rel=1e-6)
    assert parts.task_loss.item() == pytest.approx(CE, rel=1e-6)
    assert parts.loss.item() == pytest.approx(0.3 * SOFT_KD_T2 + 0.7 * CE, rel=1e-6)


def test_soft_loss_ignores_class_weights_in_the_kl_but_not_in_the_ce():
    w = torch.tensor([0.5, 1.0, 2.0])
    parts = DistillLoss(DistillConfig("soft", temperature=2.0, alpha=0.5), weights=w)(S, Y, T)
    assert parts.kd_loss.item() == pytest.approx(SOFT_KD_T2, rel=1e-6)
    assert parts.task_loss.item() == pytest.approx(CE_W, rel=1e-6)


def test_hard_loss_with_and_without_weights():
    parts = DistillLoss(DistillConfig("hard", alpha=0.6))(S, Y, T)
    assert parts.kd_loss.item() == pytest.approx(HARD, rel=1e-6)
    assert parts.loss.item() == pytest.approx(0.6 * HARD + 0.4 * CE, rel=1e-6)
    w = torch.tensor([0.5, 1.0, 2.0])
    parts = DistillLoss(DistillConfig("hard", alpha=0.6), weights=w)(S, Y, T)
    assert parts.kd_loss.item() == pytest.approx(HARD_W, rel=1e-6)
    assert parts.task_loss.item() == pytest.approx(CE_W, rel=1e-6)


def test_temperature_does_not_touch_hard_mode_and_alpha_extremes():
    a = DistillLoss(DistillConfig("hard", temperature=1.0, alpha=1.0))(S, Y, T)
    b = DistillLoss(DistillConfig("hard", temperature=20.0, alpha=1.0))(S, Y, T)
    assert a.loss.item() == pytest.approx(b.loss.item()) == pytest.approx(HARD, rel=1e-6)
    only_labels = DistillLoss(DistillConfig("soft", alpha=0.0))(S, Y, T)
    assert only_labels.loss.item() == pytest.approx(CE, rel=1e-6)


def test_without_teacher_the_loss_is_the_label_ce():
    parts = DistillLoss(DistillConfig("soft", alpha=0.9))(S, Y, None)
    assert parts.loss.item() == pytest.approx(CE, rel=1e-6) and parts.kd_loss.item() == 0.0


def test_distilled_heads_route_labels_to_class_head_and_teacher_to_distillation_head():
    other = torch.tensor([[5.0, -1.0, 0.0], [2.0, 2.0, 2.0]])
    parts = DistillLoss(DistillConfig("soft", temperature=2.0, alpha=0.5))((S, other), Y, T)
    assert parts.task_loss.item() == pytest.approx(CE, rel=1e-6)                    # class head = S
    assert parts.kd_loss.item() == pytest.approx(soft_kd(other, T, 2.0).item())     # distillation head


def test_inverse_and_effective_number_weights_by_hand():
    counts = [90, 10]
    inv = class_weights(counts, "inverse")
    assert inv.tolist() == pytest.approx([2 * (1 / 90) / (1 / 90 + 1 / 10), 2 * (1 / 10) / (1 / 90 + 1 / 10)])
    beta = 0.99
    e0, e1 = (1 - beta) / (1 - beta ** 90), (1 - beta) / (1 - beta ** 10)
    eff = class_weights(counts, "effective", beta)
    assert eff.tolist() == pytest.approx([2 * e0 / (e0 + e1), 2 * e1 / (e0 + e1)], rel=1e-6)
    assert eff[1] / eff[0] < inv[1] / inv[0]  # effective number is the gentler correction
    for method in ("none", "balanced_sampling", "logit_adjust"):
        assert class_weights(counts, method) is None


def test_logit_adjustment_shifts_the_ce_by_tau_log_prior():
    counts = [3, 1]
    adj = logit_adjustment(counts, tau=1.5)
    assert adj.tolist() == pytest.approx([1.5 * math.log(0.75), 1.5 * math.log(0.25)], rel=1e-6)
    loss = DistillLoss.build(DistillConfig("soft", alpha=0.0), ImbalanceConfig("logit_adjust", tau=1.5), counts)
    s, y = torch.tensor([[0.3, 0.1]]), torch.tensor([1])
    z = [0.3 + adj[0].item(), 0.1 + adj[1].item()]
    expected = -math.log(math.exp(z[1]) / (math.exp(z[0]) + math.exp(z[1])))
    assert loss(s, y, None).loss.item() == pytest.approx(expected, rel=1e-6)
