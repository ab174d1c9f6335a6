"""What a user must not miss, said once on the console and at the top of summary.md (best/metrics.json keeps it).

- Every teacher at chance on its validation images: the students learn from noise, and distillation cannot help.
- A shipped model that never predicts a class, on the held-out predictions its rule was chosen on or on the test
  split: whatever its accuracy, it has not learned that class.
- A winner that does not beat its labels-only twin (the same config with distill.alpha 0) beyond the noise.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kd.metrics import balanced_accuracy_ci
from search.records import LabelsOnly, TeacherRecord, Verdict


def at_chance(confusion: list[list[int]]) -> bool:
    """Balanced accuracy whose 95% interval (kd.metrics) reaches down to chance (one over the classes present)."""
    cm = np.asarray(confusion)
    present = int((cm.sum(axis=1) > 0).sum())
    return present < 2 or balanced_accuracy_ci(cm)[0] <= 1 / present


def teacher_warning(teacher: TeacherRecord | None) -> list[str]:
    if teacher is None or not teacher.each or not all(at_chance(t["confusion_matrix"]) for t in teacher.each):
        return []
    figures = ", ".join(f"{t['balanced_accuracy']:.2f}" for t in teacher.each)
    every = f"every one of the {len(teacher.each)} teachers" if len(teacher.each) > 1 else "the teacher"
    return [f"{every} is at chance on its validation images (balanced accuracy {figures}, each within its 95% "
            "interval of chance): the students learned from noise, so distillation cannot help. Try more teacher "
            "epochs (teacher.train.epochs), pretrained weights (teacher.pretrained: true) or a larger image size "
            "(data.image_size)"]


def never_predicted(classes: list[str], called: list[float], test: dict[str, Any], noun: str) -> list[str]:
    """A class the shipped model never predicts on the held-out predictions its rule was chosen on (`called`: the
    share of images it calls each class), or on the test split."""
    out = []
    for where, shares in (("on the held-out predictions its rule was chosen on", called),
                          ("on the test split", np.asarray(test["confusion_matrix"]).sum(axis=0).tolist())):
        missing = [c for c, share in zip(classes, shares, strict=True) if share == 0] if shares else []
        if missing:
            out.append(f"{noun} never predicts {' or '.join(missing)} {where}: it has not learned "
                       f"{'that class' if len(missing) == 1 else 'those classes'}, whatever its accuracy")
    return out


def twin_warning(twin: LabelsOnly | None) -> list[str]:
    if twin is not None and twin.verdict == Verdict.SAME:
        return ["the winner trains on the labels alone (distill.alpha 0): in this search the teacher did not help"]
    if twin is None or twin.verdict != Verdict.WITHIN_NOISE:
        return []
    return [f"the winner does not beat its labels-only twin (the same config, distill.alpha 0) beyond the noise "
            f"({twin.difference:+.4f}, it could find {twin.detectable:.4f}): the teacher added nothing measurable. "
            "A better teacher (more epochs, pretrained weights) may help"]
