"""The Ray Tune trainable: base config + sampled keys -> the scheme's fit (kd.schemes), an epoch per `step`.

`param_space` (the `config` argument here) holds only the sampled dotted keys; the base config and the
scheme (its datasets and its teachers' cached logits) arrive through `tune.with_parameters`, so trials
never decode an image or run a teacher.

A class trainable, so that Ray can reuse its actor for the next trial (`reset_config`): the process,
its imports, its CUDA context and the scheme it fetched from the object store stay, and the next trial
starts within a second of the last one ending. Each `step` trains one epoch in the actor's own thread
(there is no training thread that must end before a reuse, as with function trainables, whose reuse
failed on a busy node when that thread outlived Ray's reset wait). A checkpoint is saved at every epoch
in `checkpoint_epochs`; a restarted trial resumes from it (`load_checkpoint`).
"""
from __future__ import annotations

import gc
import os
import time
from typing import Any

import torch
from ray import tune

from kd.hub import Files, provide
from kd.infer import resolve_device
from kd.metrics import scalars
from kd.schemes import Scheme
from kd.teacher import TeacherWork
from kd.train import Fitting, Outcome, load_state, save_state
from search.cluster import where
from search.config import from_dict
from search.costs import Costs
from search.halves import half_figures
from search.records import STATE_FILE, TEACHER_WORK


class TrialDiverged(RuntimeError):
    """Raised inside a trial so Ray records it as failed, with this message as its error."""


def placement(device: str) -> dict[str, Any]:
    """Where and since when this attempt of the trial runs: its Ray node and GPU ids (search.cluster.where), the
    device torch trains on and its process (a reused actor runs several trials). Reported with every epoch, so the
    trials table shows how trials were spread, packed and reused."""
    return {**where(), "device": str(resolve_device(device)), "pid": os.getpid(), "attempt_started": time.time()}


class DistillTrainable(tune.Trainable):
    """One trial: distil with the sampled hyperparameters `config` on top of `base`, as `scheme` trains (a student
    per member, judged on their pooled held-out predictions), one epoch per step."""

    def setup(self, config: dict[str, Any], base: dict[str, Any] | None = None, scheme: Scheme | None = None,
              checkpoint_epochs: frozenset[int] = frozenset(), threads: int = 1,
              weights: Files | None = None, costs: Costs | None = None) -> None:
        """`costs`: each searched student's cost, measured once before the trials (search.costs)."""
        assert base is not None and scheme is not None and costs, "DistillTrainable needs tune.with_parameters"
        provide(weights)  # the driver's timm weights files: this node never downloads
        torch.set_num_threads(max(1, threads))
        self.base, self.scheme, self.checkpoint_epochs, self.costs = base, scheme, checkpoint_epochs, costs
        self._begin(config)

    def _begin(self, config: dict[str, Any]) -> None:
        """A new trial (or a restarted one) in this actor. Nothing here may fail (a reset that raises breaks Ray's
        reuse of the actor): the trial's own work, its cost looked up and its fit started (from a checkpoint if one
        is loaded first), happens in its first step, where a failure fails that trial alone."""
        self.trial_config = config
        self.teacher_work = TeacherWork()  # any teacher forward pass the trial's steps make (by design: none)
        self.placed = placement("cpu")
        self.resume: dict[str, Any] | None = None
        self.fitting: Fitting | None = None

    def step(self) -> dict[str, Any]:
        with self.teacher_work.counting():  # this trial's work alone: the count is its own, opened around each step
            return self._step()

    def _step(self) -> dict[str, Any]:
        if self.fitting is None:
            self.cfg = from_dict(self.base, "search base config").updated(self.trial_config,
                                                                           source="sampled trial config")
            self.cost = self.costs[self.cfg.student.name]
            if "error" in self.cost:  # measured before the trials: this student cannot run on these images
                raise RuntimeError(f"student {self.cfg.student.name}: {self.cost['error']}")
            self.placed = {**placement(self.cfg.train.device), "attempt_started": self.placed["attempt_started"]}
            self.fitting = self.scheme.start(self.cfg, resume=self.resume)
        row = self.fitting.step()
        if row.get("status") == Outcome.DIVERGED:  # no result: it would lack the metric Tune optimises
            raise TrialDiverged(f"non-finite loss at epoch {row['epoch']}: the trial diverged")
        metrics = {**scalars(row), **self.cost, **self.placed,
                   TEACHER_WORK: self.teacher_work.images, "reported_at": time.time()}
        held, probs = self.scheme.held, self.fitting.result.probs
        if held is not None and probs is not None and self.cfg.search.metric in row:  # each half's pool: search.rerank
            metrics.update(half_figures(self.cfg.search.metric, held, probs))
        if row["epoch"] in self.checkpoint_epochs:
            metrics[tune.result.SHOULD_CHECKPOINT] = True
        if self.fitting.done:
            metrics[tune.result.DONE] = True
        return metrics

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        assert self.fitting is not None
        save_state(self.fitting.state(), os.path.join(checkpoint_dir, STATE_FILE))

    def load_checkpoint(self, checkpoint: str | dict[str, Any] | None) -> None:
        assert isinstance(checkpoint, str)
        self._release()
        self.resume = load_state(os.path.join(checkpoint, STATE_FILE))

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        """The next trial in this actor: nothing of the last one is kept but the scheme and the costs."""
        self._release()
        self._begin(new_config)
        return True

    def cleanup(self) -> None:
        self._release()

    def _release(self) -> None:
        """Let go of the last trial's models and optimiser state, and give the GPU memory back."""
        fitting: Fitting | None = getattr(self, "fitting", None)
        if fitting is not None:
            fitting.finish()
        self.fitting = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
