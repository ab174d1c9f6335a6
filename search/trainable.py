"""The Ray Tune function trainable: base config + sampled keys -> the scheme's fit (kd.schemes) -> tune.report.

`param_space` (the `config` argument here) holds only the sampled dotted keys; the base config and the
scheme (its datasets and its teachers' cached logits) arrive through `tune.with_parameters`, so trials
never decode an image or run a teacher. The kd loop reports every epoch through a callback that this module
turns into `tune.report(metrics, checkpoint=...)`; a restarted trial resumes from `tune.get_checkpoint()`.
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
from kd.data import Dataset
from kd.errors import Diverged
from kd.infer import resolve_device
from kd.metrics import scalars
from kd.models import create_model
from kd.schemes import Scheme
from kd.teacher import forwarded_images
from kd.train import Outcome, load_state, save_state
from search.cluster import where
from search.records import STATE_FILE


class TrialDiverged(RuntimeError):
    """Raised inside a trial so Ray records it as failed, with this message as its error."""


def student_cost(cfg: Config, data: Dataset) -> dict[str, float]:
    """What this trial's student costs, measured in the trial on its own device (kd.cost: parameters, FLOPs from
    torch's flop counter, median latency at batch 1 after warm-up, throughput at a large batch)."""
    model = create_model(dataclasses.replace(cfg.student, pretrained=False), len(data.classes), data.image_size)
    report = measure(model, data.image_size, resolve_device(cfg.train.device))
    return {"student_params": report["parameters"], "student_mflops": report["flops"] / 1e6,
            "student_latency_ms": report["latency_ms_batch1"], "student_images_per_s": report["images_per_s_batch"]}


def placement(device: str) -> dict[str, Any]:
    """Where and since when this attempt of the trial runs: its Ray node and GPU ids (search.cluster.where) and the
    device torch trains on. Reported with every epoch, so the trials table shows how trials were spread and packed."""
    return {**where(), "device": str(resolve_device(device)), "attempt_started": time.time()}


def distill_trainable(config: dict[str, Any], base: dict[str, Any], scheme: Scheme, checkpoint_epochs: frozenset[int],
                      threads: int = 1) -> None:
    """One trial: distil with the sampled hyperparameters `config` on top of `base`, as `scheme` trains (a student
    per member, judged on their pooled held-out predictions).

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

    forwarded = forwarded_images()  # the trial reports any teacher forward pass it makes (by design: none)
    cost = student_cost(cfg, scheme.data)  # on the device this trial trains on, before it trains
    placed = placement(cfg.train.device)

    def report(row: dict[str, Any], state_fn) -> None:
        if row.get("status") == Outcome.DIVERGED:  # no report: it would lack the metric Tune optimises
            raise TrialDiverged(f"non-finite loss at epoch {row['epoch']}: the trial diverged")
        metrics = {**scalars(row), **cost, **placed, "teacher_forward_images": forwarded_images() - forwarded,
                   "reported_at": time.time()}
        if row["epoch"] not in checkpoint_epochs:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(state_fn(), os.path.join(d, STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        scheme.fit(cfg, report=report, resume=resume)
    except Diverged as e:
        raise TrialDiverged(str(e)) from None
    finally:  # release GPU memory when a trial ends or is stopped early
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
