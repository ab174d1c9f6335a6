"""The teachers of a search: one per member of its scheme (kd.schemes), each fine-tuned once, before the trials.

A teacher is found in the cache when it can be (kd.teacher's content address); otherwise it is fine-tuned
here when this machine has the best device for it (a local GPU, or a cluster without GPUs), else in a Ray
task on a GPU node. `RayCompute` gives a scheme's `final` step the same teachers and a trial's resources.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import ray
import torch

from kd.config import Config
from kd.data import Dataset
from kd.metrics import mean_metrics
from kd.schemes import Scheme
from kd.teacher import Teacher, cached_teacher, prepare_teacher
from search.cluster import Resources, call, remote, trial_resources, where
from search.records import Placement, TeacherRecord

T = TypeVar("T")


def prepare_teacher_once(cfg: Config, data: Dataset, epochs: int) -> Teacher:
    """Fine-tune (or find) the teacher and its logits once: here when this machine has the best device for
    it (a local GPU, or a cluster without GPUs), else in a Ray task on a GPU node."""
    found = cached_teacher(cfg, data, epochs)  # no need to start anything for what is on disk
    if found is not None:
        return found
    if not ray.is_initialized() or torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) < 1:
        teacher = prepare_teacher(cfg, data, epochs=epochs, progress=False)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the trials get the GPU memory back
        return teacher
    # a whole GPU and all the CPUs of the best-provided GPU node (more than one node has would never be placed)
    cpus = max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes()
                if n["Alive"] and n["Resources"].get("GPU", 0) >= 1] + [1])
    return ray.get(remote(_prepare_teacher_here, Resources(cpus, 1), cfg, data, epochs))


def _prepare_teacher_here(cfg: Config, data: Dataset, epochs: int) -> Teacher:
    """`prepare_teacher` in a Ray task, its info naming the node and the GPU it ran on."""
    teacher = prepare_teacher(cfg, data, epochs=epochs, progress=False)
    placed = where()
    info = dataclasses.replace(teacher.info, node=placed["node"], gpus=placed["gpus"])
    return dataclasses.replace(teacher, info=info)


@dataclass
class Prepared:
    """What the trials train on: the scheme, with each member's teacher logits, and those teachers."""
    scheme: Scheme
    teachers: list[Teacher]

    def record(self, seconds: float) -> TeacherRecord:
        """teacher.json: the teachers' validation metrics (the mean over them) and how they were prepared."""
        infos = [t.info for t in self.teachers]
        summed = {k: sum(getattr(i, k) for i in infos) for k in ("finetune_seconds", "logit_seconds", "forward_images")}
        info = dataclasses.replace(infos[0], cached=all(i.cached for i in infos),
                                   logits_cached=all(i.logits_cached for i in infos), **summed)
        return TeacherRecord(metrics=mean_metrics([t.metrics for t in self.teachers]), info=info,
                             teachers=len(infos), placement=[Placement(i.node, i.gpus) for i in infos],
                             seconds=seconds)


def prepare_teachers(cfg: Config, scheme: Scheme, echo: Callable[[str], None] = print) -> Prepared:
    """A teacher for each member of `scheme`, each fine-tuned on that member's training images only (so no student
    learns its held-out images' labels through the logits)."""
    k = len(scheme.members)
    echo(f"preparing the teacher ({cfg.teacher.name}) once for all trials ..." if k == 1 else
         f"preparing {k} teachers ({cfg.teacher.name}), one per fold, each fine-tuned on the other folds ...")
    teachers = []
    for m, data in enumerate(scheme.members):
        teacher = prepare_teacher_once(cfg, data, cfg.train.epochs)
        teachers.append(teacher)
        figure = teacher.metrics["balanced_accuracy"]
        echo(f"{teacher.info.describe()}; validation balanced accuracy {figure:.4f}" if k == 1 else
             f"  fold {m + 1}/{k}: {teacher.info.describe()}; its fold's balanced accuracy {figure:.4f}")
    return Prepared(scheme.taught([t.logits for t in teachers]), teachers)


class RayCompute:
    """kd.schemes.Compute on the search's Ray (or here, without one): the teachers as the search prepares them, the
    training with a trial's resources (the same threads: the same float sums, so a refit here gives the very
    student a task would)."""

    def __init__(self, cfg: Config):
        self.resources = trial_resources(cfg)

    def teacher(self, cfg: Config, data: Dataset) -> Teacher:
        return prepare_teacher_once(cfg, data, cfg.train.epochs)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        return call(fn, self.resources, *args)

