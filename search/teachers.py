"""The teachers of a search: one per member of its scheme (kd.schemes), all prepared at once before the trials,
and the one its final student needs, beside the trials or the re-ranking.

A teacher is found in the cache when it can be (kd.teacher's content address). The others are fine-tuned as Ray
tasks, all submitted together, so they run side by side wherever the cluster has room: several on one GPU where a
trial's share of one (`search.gpus_per_trial`) fits, as trials pack; on CPU nodes one per node, with all its
cores (`teacher_resources`). The trials wait only for the members' teachers; the final student's teacher (a
refit's, fine-tuned on train + validation) needs no trial result and runs on one trial's resources beside other
work: beside the trials where members pack like trials (GPUs), else beside the re-ranking (`Prepared.start_final`,
called by search.finalize). On a CPU node, a one-CPU teacher submitted with the whole-node members started in the
gap the first left and held the next back (55 s of the demo's teacher phase); started beside the trials, it
held one of two slots, and Ray Tune never filled that slot again when it came free: each time a new actor for it
was starting, a trial ended first, the pending trial took the cached actor and the new one was dropped (the
demo's 12 trials all ran in one process, the slots 47% busy).
`RayCompute` hands it, and a trial's resources, to the scheme's `final` step.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
import torch

from kd import config as library
from kd.data import Dataset
from kd.metrics import mean_metrics
from kd.schemes import Scheme
from kd.teacher import Teacher, cached_teacher, prepare_teacher, teacher_key
from search.cluster import Resources, call, remote, where
from search.config import Config
from search.records import Placement, TeacherRecord

T = TypeVar("T")


def teacher_resources(cfg: Config) -> Resources:
    """What one teacher's fine-tuning asks Ray for. Where the cluster has GPUs: a trial's CPUs and share of a GPU (a
    whole one if trials take none), so teachers pack on the GPUs as trials do. Without GPUs: every CPU of the largest
    node, so each node fine-tunes one teacher at a time with all its threads, and the nodes side by side. (Two
    one-thread teachers side by side on this project's 2-core VM ran 1.3x slower in all than one at a time with two
    threads: 304 ms against 133 ms per step of resnet18 at 32 px for each, memory-bound.)"""
    nodes = [n for n in ray.nodes() if n["Alive"]] if ray.is_initialized() else []
    if any(n["Resources"].get("GPU", 0) > 0 for n in nodes):
        return Resources(cfg.search.cpus_per_trial, cfg.search.gpus_per_trial or 1.0)
    return Resources(max([n["Resources"].get("CPU", 0) for n in nodes] + [cfg.search.cpus_per_trial]), 0.0)


def _prepare_teacher_here(cfg: Config, data: Dataset, epochs: int) -> Teacher:
    """`prepare_teacher` in a Ray task, its info naming the node and the GPU it ran on."""
    teacher = prepare_teacher(cfg, data, epochs=epochs, progress=False)
    placed = where()
    info = dataclasses.replace(teacher.info, node=placed["node"], gpus=placed["gpus"])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the trials get the GPU memory back
    return dataclasses.replace(teacher, info=info)


def start_teacher(cfg: Config, data: Dataset, beside_trials: bool = False) -> Teacher | ray.ObjectRef:
    """The teacher of `cfg` on `data`: from the cache when it is there, else a Ray task fine-tuning it (its reference;
    with no Ray running, fine-tuned here). `beside_trials`: it runs while trials do, so it takes one trial's
    resources, not a whole CPU node (which would hold the first trials back until it is done)."""
    found = cached_teacher(cfg, data, cfg.train.epochs)  # no need to start anything for what is on disk
    if found is not None:
        now = time.time()
        return dataclasses.replace(found, info=dataclasses.replace(found.info, started=now, ended=now))
    if not ray.is_initialized():
        return prepare_teacher(cfg, data, epochs=cfg.train.epochs, progress=False)
    resources = teacher_resources(cfg)
    if beside_trials:
        resources = dataclasses.replace(resources, cpus=min(resources.cpus, cfg.search.cpus_per_trial))
    return remote(_prepare_teacher_here, resources, cfg, data, cfg.train.epochs)


@dataclass
class Prepared:
    """What the trials train on: the scheme, with each member's teacher logits, those teachers, and the final
    student's teacher (a Ray reference while it is still being fine-tuned)."""
    scheme: Scheme
    teachers: list[Teacher]
    final_teacher: dict[str, Teacher | ray.ObjectRef] = field(default_factory=dict)  # by teacher key
    final_data: Dataset | None = None   # the final student's teacher's data, while that teacher waits to start
    cfg: Config | None = None

    def known(self, key: str) -> Teacher | ray.ObjectRef | None:
        """A teacher this search has prepared or started, by its key (kd.teacher.teacher_key)."""
        return next((t for t in self.teachers if t.key == key), None) or self.final_teacher.get(key)

    def start_final(self) -> None:
        """Start the final student's teacher on one trial's resources, beside what runs now, if it waits to."""
        if self.final_data is not None and self.cfg is not None:
            key = teacher_key(self.cfg, self.final_data)
            self.final_teacher[key] = start_teacher(self.cfg, self.final_data, beside_trials=True)
            self.final_data = None

    def record(self, seconds: float) -> TeacherRecord:
        """teacher.json: the teachers' validation metrics (the mean over them) and how they were prepared."""
        infos = [t.info for t in self.teachers]
        summed = {k: sum(getattr(i, k) for i in infos) for k in ("finetune_seconds", "logit_seconds", "forward_images")}
        info = dataclasses.replace(infos[0], cached=all(i.cached for i in infos),
                                   logits_cached=all(i.logits_cached for i in infos),
                                   started=min(i.started for i in infos), ended=max(i.ended for i in infos), **summed)
        return TeacherRecord(metrics=mean_metrics([t.metrics for t in self.teachers]), info=info,
                             teachers=len(infos),
                             placement=[Placement(i.node, i.gpus, i.started, i.ended) for i in infos],
                             seconds=seconds,
                             each=[{k: t.metrics[k] for k in ("balanced_accuracy", "confusion_matrix")}
                                   for t in self.teachers])


def prepare_teachers(cfg: Config, scheme: Scheme, echo: Callable[[str], None] = print) -> Prepared:
    """A teacher for each member of `scheme`, each fine-tuned on that member's training images only (so no student
    learns its held-out images' labels through the logits), all at once; the final student's teacher started too,
    where it packs like them (else `Prepared.start_final` starts it later)."""
    k = len(scheme.members)
    echo(f"preparing {k} teacher{'s' if k > 1 else ''} ({cfg.teacher.name}), {scheme.teachers_text(cfg)} ...")
    pending = [start_teacher(cfg, data) for data in scheme.members]
    prepared = Prepared(scheme, [], final_data=scheme.final_teacher_data(), cfg=cfg)
    if not ray.is_initialized() or teacher_resources(cfg).gpus > 0:
        prepared.start_final()  # members pack on the GPUs like trials: it goes on beside them, and the trials
    teachers: list[Teacher | None] = [p if isinstance(p, Teacher) else None for p in pending]
    refs = {p: m for m, p in enumerate(pending) if not isinstance(p, Teacher)}
    for m, teacher in enumerate(teachers):
        if teacher is not None:
            _echo_teacher(teacher, scheme.member_name(m, k), echo)
    while refs:
        done, _ = ray.wait(list(refs), num_returns=1)
        m = refs.pop(done[0])
        teachers[m] = ray.get(done[0])
        _echo_teacher(teachers[m], scheme.member_name(m, k), echo)  # type: ignore[arg-type]
    ready = [t for t in teachers if t is not None]
    return dataclasses.replace(prepared, scheme=scheme.taught([t.logits for t in ready]), teachers=ready)


def _echo_teacher(teacher: Teacher, member: str, echo: Callable[[str], None]) -> None:
    figure = teacher.metrics["balanced_accuracy"]
    prefix = f"  {member}: " if member else ""
    echo(f"{prefix}{teacher.info.describe()}; validation balanced accuracy {figure:.4f}")


class RayCompute:
    """kd.schemes.Compute on the search's Ray (or here, without one): the teachers as the search prepares them (the
    final student's, started beside the trials or the re-ranking, once it is done), the training with a trial's
    resources (the same threads: the same float sums, so a refit here gives the very student a task would)."""

    def __init__(self, resources: Resources, prepared: Prepared | None = None):
        self.resources, self.prepared = resources, prepared

    def teacher(self, cfg: library.Config, data: Dataset) -> Teacher:
        assert isinstance(cfg, Config), "a search's scheme hands its own config back"
        started = self.prepared.known(teacher_key(cfg, data)) if self.prepared else None
        found = started if started is not None else start_teacher(cfg, data)
        return found if isinstance(found, Teacher) else ray.get(found)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        result: T = call(fn, self.resources, *args)
        return result
