"""The Ray Tune function trainable: base config + sampled keys -> kd distillation -> tune.report.

`param_space` (the `config` argument here) holds only the sampled dotted keys; the base config, the
dataset and the teacher's cached logits arrive through `tune.with_parameters`, so trials never decode an
image or run the teacher. The kd loop reports every epoch through a callback that this module turns into
`tune.report(metrics, checkpoint=...)`; a restarted trial resumes from `tune.get_checkpoint()`.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import tempfile
import time
from typing import Any

import torch
from ray import tune

from kd.config import Config, from_dict
from kd.cost import measure
from kd.crossval import Folds, cross_validate
from kd.data import Dataset
from kd.distill import train_student
from kd.errors import Diverged
from kd.infer import resolve_device
from kd.metrics import scalars
from kd.models import create_model
from kd.train import DIVERGED, load_state, save_state
from search.cluster import where
from search.run import STATE_FILE


class TrialDiverged(RuntimeError):
    """Raised inside a trial so Ray records it as failed, with this message as its error."""


def student_cost(cfg: Config, data: Dataset | Folds) -> dict[str, float]:
    """What this trial's student costs, measured in the trial on its own device (kd.cost: parameters, FLOPs from
    torch's flop counter, median latency at batch 1 after warm-up, throughput at a large batch)."""
    dataset = data.datasets[0] if isinstance(data, Folds) else data
    model = create_model(dataclasses.replace(cfg.student, pretrained=False), len(dataset.classes), dataset.image_size)
    report = measure(model, dataset.image_size, resolve_device(cfg.train.device))
    return {"student_params": report["parameters"], "student_mflops": report["flops"] / 1e6,
            "student_latency_ms": report["latency_ms_batch1"], "student_images_per_s": report["images_per_s_batch"]}


def placement(device: str) -> dict[str, Any]:
    """Where and since when this attempt of the trial runs: its Ray node and GPU ids (search.cluster.where) and the
    device torch trains on. Reported with every epoch, so the trials table shows how trials were spread and packed."""
    return {**where(), "device": str(resolve_device(device)), "attempt_started": time.time()}


def distill_trainable(config: dict[str, Any], base: dict[str, Any], data: Dataset | Folds,
                      teacher_logits: torch.Tensor | list[torch.Tensor], checkpoint_epochs: frozenset[int],
                      threads: int = 1) -> None:
    """One trial: distil a student with the sampled hyperparameters `config` on top of `base`: one student on the
    holdout split, or with `Folds` one per fold, judged on their pooled out-of-fold predictions.

    A checkpoint is saved at every epoch in `checkpoint_epochs` (every `search.checkpoint_every`-th, every epoch
    at which ASHA may stop the trial, and the last), so the exported state is always that of the epoch that
    ranked the trial.
    """
    torch.set_num_threads(max(1, threads))
    cfg = from_dict(base, "search base config").updated(config, source="sampled trial config")
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_state(os.path.join(d, STATE_FILE))

    cost = student_cost(cfg, data)  # on the device this trial trains on, before it trains
    placed = placement(cfg.train.device)

    def report(row: dict[str, Any], state_fn) -> None:
        if row.get("status") == DIVERGED:  # no report: it would lack the metric Tune optimises
            raise TrialDiverged(f"non-finite loss at epoch {row['epoch']}: the trial diverged")
        metrics = {**scalars(row), **cost, **placed, "reported_at": time.time()}
        if row["epoch"] not in checkpoint_epochs:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(state_fn(), os.path.join(d, STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        if isinstance(data, Folds):
            cross_validate(cfg, data, teacher_logits, report=report, resume=resume)
        else:
            train_student(cfg, data, teacher_logits, report=report, resume=resume, progress=False)
    except Diverged as e:
        raise TrialDiverged(str(e)) from None
    finally:  # release GPU memory when a trial ends or is stopped early
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
