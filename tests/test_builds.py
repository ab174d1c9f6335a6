"""`kdsearch distill` builds each model once, for real, before the data where the class count is known up
front (that build is the fail-fast check), and uses those models; bad names still fail before any work."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from search.config import load_config
from tests.helpers import tiny_overrides


def test_a_student_built_before_the_data_trains_exactly_like_one_built_by_train_student(digits_setup):
    from kd.student import new_student, train_student
    cfg, data, _ = digits_setup
    cfg = cfg.updated({"train.epochs": 1})
    data = dataclasses.replace(data, train=data.train.subset(np.arange(300)))  # no teacher: any subset trains
    early = new_student(cfg, len(data.classes))
    torch.rand(1000)  # whatever runs between building and training (loading data, the teacher) draws numbers
    given = train_student(cfg, data, None, progress=False, model=early)
    built = train_student(cfg, data, None, progress=False)
    assert given.history[0]["train_loss"] == built.history[0]["train_loss"]
    for a, b in zip(given.model.state_dict().values(), built.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_run_distill_builds_each_model_once(digits_setup, tmp_path, monkeypatch):
    import kd.models
    from kd.distill import run_distill
    _, _, teacher = digits_setup  # the same config: its teacher and logits are in the shared cache
    builds = []
    real_build = kd.models._build

    def counting(cfg, num_classes, image_size, hub_file, role=""):
        model = real_build(cfg, num_classes, image_size, hub_file, role)
        builds.append((role, next(model.parameters()).device.type))
        return model

    monkeypatch.setattr(kd.models, "_build", counting)
    cfg = load_config(None, tiny_overrides(teacher.directory.parent.parent, tmp_path / "results"))
    metrics = run_distill(cfg, progress=False, echo=lambda line: None)
    assert metrics.teacher is not None and metrics.teacher.cached and metrics.teacher.logits_cached
    # built for real before the data (their check), then used: the cached weights go into this teacher (for the
    # compression report), and this student is the one trained; no meta-device check, no second build
    assert builds == [("teacher", "cpu"), ("student", "cpu")]
