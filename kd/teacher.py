"""The teacher: fine-tuned once, frozen, cached by content, and its logits precomputed for every view.

The cache key is a hash of the data fingerprint and the teacher's config, so any change to either makes
a new teacher and nothing stale is reused. Beside the weights lie the teacher's logits for every
training view of every epoch (views are a function of the augmentation seed, epoch and sample index),
so a student, and every trial of a search, trains without running the teacher at all.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm import tqdm

from kd.augment import Augmenter
from kd.config import Config, TrainConfig
from kd.data import Dataset
from kd.errors import UserError
from kd.files import CacheError, file_lock, load_tensors, save_tensors
from kd.hub import source_fingerprint, source_of
from kd.infer import Runner, resolve_device
from kd.losses import DistillLoss, class_weights
from kd.metrics import compute_metrics
from kd.models import create_model
from kd.records import JsonRecord
from kd.stream import BatchSource
from kd.train import Outcome, fit, seed_everything

log = logging.getLogger("kd")
TEACHER_VERSION = 1


@dataclass
class TeacherWork:
    """A count of the images run through a teacher to make logits, kept by whoever opens it around its own work:

        work = TeacherWork()
        with work.counting():
            ...                # every teacher forward pass made here, in this thread, adds to work.images

    Counts nest (each open one counts), and none counts work done outside its block or in another thread or
    process: a search's trial opens its own around each of its steps (search.trainable), so the figure it reports
    is its own work alone (by design none: its teachers' logits come from the cache)."""
    images: int = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[TeacherWork]:
        token = _OPEN_COUNTS.set((*_OPEN_COUNTS.get(), self))
        try:
            yield self
        finally:
            _OPEN_COUNTS.reset(token)


# the counts open in this context (a new thread starts with none): _logits adds to each; nothing else is kept here
_OPEN_COUNTS: ContextVar[tuple[TeacherWork, ...]] = ContextVar("kd_teacher_work", default=())


def _count_forward(images: int) -> None:
    for work in _OPEN_COUNTS.get():
        work.images += images


@dataclass
class TeacherInfo:
    """How a teacher was prepared in this process: cache hits, timings, forward passes."""
    key: str                        # the teacher's content address in the cache
    name: str                       # timm model name
    cached: bool = False            # weights found in the cache (not fine-tuned now)
    finetune_seconds: float = 0.0   # the fine-tuning's time, whenever it ran
    logits_cached: bool = False     # every epoch's logits found in the cache (no forward pass now)
    logit_seconds: float = 0.0      # time spent computing logits now
    forward_images: int = 0         # images run through the teacher now to make logits
    logit_epochs: int = 0           # epochs of training views the logits cover
    node: str = ""                  # the Ray node it was prepared on ("" without Ray)
    gpus: str = ""                  # the GPU ids Ray gave that task ("" on CPUs)
    started: float = 0.0            # wall-clock seconds (time.time()) when its preparation began, and ended
    ended: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TeacherInfo:
        """Read `to_dict()`'s JSON back; keys this version does not know are ignored, missing ones defaulted."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def describe(self) -> str:
        """One line, e.g. 'teacher resnet18 fine-tuned in 12.3 s; 8616 forward passes made its logits for 8
        epochs of views (2.1 s)' or 'teacher resnet18 found in the cache; its logits too'."""
        how = "found in the cache" if self.cached else f"fine-tuned in {self.finetune_seconds:.1f} s"
        if self.forward_images:
            views = f" for {self.logit_epochs} epochs of views" if self.logit_epochs else ""
            logits = f"{self.forward_images} forward passes made its logits{views} ({self.logit_seconds:.1f} s)"
        else:
            logits = "its logits too" if self.cached else "its logits found in the cache"
        where = f" (Ray node {self.node[:8]}, GPU {self.gpus})" if self.gpus else ""
        return f"teacher {self.name} {how}{where}; {logits}"


@dataclass(frozen=True)
class TeacherMeta(JsonRecord):
    """The teacher cache's teacher.json (the same record is in its weights file's header): what fine-tuning made
    it. Written by `prepare_teacher`, read by `cached_teacher` and `load_teacher_model`."""
    FILE: ClassVar[str] = "teacher.json"         # in the teacher's cache folder
    name: str                                    # timm model name
    config: dict[str, Any]                       # its teacher section, as plain data
    classes: list[str]
    val_metrics: dict[str, Any]                  # on the validation split ({} where there was none: a final refit's)
    finetune_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # its fine-tuning's epochs
    fingerprint: str = ""                        # the data's (kd.data)


@dataclass
class Teacher:
    key: str
    directory: Path
    logits: torch.Tensor                 # epochs x N_train x classes, float32
    metrics: dict[str, Any]              # validation metrics of the teacher
    info: TeacherInfo


def teacher_key(cfg: Config, data: Dataset) -> str:
    """Content address of a fine-tuned teacher: data fingerprint + everything that shapes its weights."""
    teacher = dataclasses.asdict(cfg.teacher)
    teacher["train"].pop("device")
    for key, was in (("amp", {"auto": True, "off": False}), ("channels_last", {"auto": True, "off": False})):
        value = teacher["train"][key]  # these were booleans once: the same setting keeps its old key (and cache)
        teacher["train"][key] = was.get(value, value)
    if isinstance(cfg.teacher.pretrained, str):
        st = os.stat(cfg.teacher.pretrained) if os.path.exists(cfg.teacher.pretrained) else None
        teacher["pretrained"] = [os.path.abspath(cfg.teacher.pretrained), st and st.st_size, st and st.st_mtime_ns]
    if source_of(cfg.teacher.name):  # hf-hub:, local-dir: by what they hold, not by the name
        teacher["name"] = [cfg.teacher.name, source_fingerprint(cfg.teacher.name, "teacher",
                                                                weights=cfg.teacher.pretrained is True)]
    augment = dataclasses.asdict(cfg.augment)
    augment.pop("seed")  # the students' view stream: it shapes the logits, not the teacher's weights
    blob = json.dumps([TEACHER_VERSION, data.fingerprint, teacher, augment], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def new_teacher(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The teacher of `cfg` before fine-tuning, seeded with teacher.train.seed (as the fine-tuning makes it)."""
    seed_everything(cfg.teacher.train.seed)
    return create_model(cfg.teacher, num_classes, cfg.data.image_size, role="teacher")


def load_teacher_model(cfg: Config, data: Dataset, directory: Path,
                       model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, TeacherMeta]:
    """The cached teacher's weights, in `model` when given (one of `new_teacher`'s), else in a new model, and the
    record in their file's header."""
    path = directory / "model.safetensors"
    tensors, raw = load_tensors(path)
    meta = TeacherMeta.from_dict(raw, f"{path} (its header)")
    if model is None:
        model = create_model(dataclasses.replace(cfg.teacher, pretrained=False), len(data.classes), data.image_size)
    model.load_state_dict(tensors)
    return model.eval(), meta


def cached_teacher(cfg: Config, data: Dataset, epochs: int | None = None,
                   model: torch.nn.Module | None = None) -> Teacher | None:
    """The teacher and its logits when both are already in the cache (no training, no forward pass), else None.
    `model` (one of `new_teacher`'s), when given, receives the cached weights."""
    epochs = epochs or cfg.train.epochs
    key = teacher_key(cfg, data)
    directory = Path(cfg.data.cache_dir) / "teacher" / key
    akey = _augment_key(cfg)
    try:
        with file_lock(directory / "model"):
            meta = TeacherMeta.read(directory / TeacherMeta.FILE)  # None: not there, or cut short
            weights, _ = load_tensors(directory / "model.safetensors")  # verifies the weights' checksums
        with file_lock(directory / f"logits-{akey}.safetensors"):
            tensors, _ = load_tensors(directory / f"logits-{akey}.safetensors")
    except (CacheError, OSError):
        return None
    if meta is None:
        return None
    logits = tensors["logits"]
    if len(logits) < epochs or tuple(logits.shape[1:]) != (len(data.train), len(data.classes)):
        return None
    if model is not None:
        model.load_state_dict(weights)
        model.eval()
    info = TeacherInfo(key, cfg.teacher.name, cached=True, finetune_seconds=meta.finetune_seconds,
                       logits_cached=True, logit_epochs=epochs)
    return Teacher(key, directory, logits[:epochs].float(), meta.val_metrics, info)


def _augment_key(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(cfg.augment), sort_keys=True).encode()).hexdigest()[:12]


def prepare_teacher(cfg: Config, data: Dataset, epochs: int | None = None, progress: bool = True,
                    model: torch.nn.Module | None = None) -> Teacher:
    """Fine-tune the teacher (or find it in the cache) and make sure logits exist for `epochs` epochs.

    `model`: the untrained teacher from `new_teacher(cfg, len(data.classes))`, built by a caller that wants the
    teacher afterwards; it is fine-tuned, or the cached weights are loaded into it, so no teacher is built twice.
    It is left on the CPU in eval mode. Without it, a teacher is built only if its weights or logits are needed.
    """
    epochs = epochs or cfg.train.epochs
    started = time.time()
    found = cached_teacher(cfg, data, epochs, model)
    if found is not None:  # weights and every epoch's logits on disk: no model to build at all
        log.info("teacher %s and its logits found in the cache (%s)", cfg.teacher.name, found.directory)
        found.info.started, found.info.ended = started, time.time()
        return found
    key = teacher_key(cfg, data)
    directory = Path(cfg.data.cache_dir) / "teacher" / key
    info = TeacherInfo(key, cfg.teacher.name, started=started)
    device = resolve_device(cfg.teacher.train.device)
    with file_lock(directory / "model"):
        try:
            model, meta = load_teacher_model(cfg, data, directory, model)
            info.cached, info.finetune_seconds = True, meta.finetune_seconds
            log.info("teacher %s found in the cache (%s)", cfg.teacher.name, directory)
        except CacheError as e:
            if (directory / "model.safetensors").exists():
                log.warning("teacher cache rebuilt: %s", e)
            model, meta = _finetune(cfg, data, device, progress, model)
            save_tensors(directory / "model.safetensors", model.state_dict(), meta.to_dict())
            meta.write(directory / TeacherMeta.FILE)
            info.cached, info.finetune_seconds = False, meta.finetune_seconds
    logits = _logits(cfg, data, model, directory, epochs, device, progress, info)
    model.cpu()
    info.ended = time.time()
    return Teacher(key, directory, logits, meta.val_metrics, info)


def _finetune(cfg: Config, data: Dataset, device: torch.device, progress: bool,
              model: torch.nn.Module | None) -> tuple[torch.nn.Module, TeacherMeta]:
    t0 = time.perf_counter()
    tcfg = cfg.teacher
    model = model if model is not None else new_teacher(cfg, len(data.classes))
    seed_everything(tcfg.train.seed)
    history: list[dict[str, Any]] = []
    if tcfg.train.epochs > 0:
        log.info("fine-tuning teacher %s for %d epochs on %s", tcfg.name, tcfg.train.epochs, device)
        weights = class_weights(data.class_counts(), "inverse") if tcfg.class_weighted else None
        loss = DistillLoss(cfg.distill, weights=weights)
        # the teacher trains on its own augmentation stream (from its own seed); the students' views come from
        # cfg.augment.seed, so a new student stream needs new logits but not a new teacher
        stream = dataclasses.replace(cfg.augment, seed=tcfg.train.seed + 104_729)
        result = fit(model, dataclasses.replace(tcfg.train, tune_threshold=False), data, loss, stream,
                     progress=progress, desc=f"teacher {tcfg.name}")
        if result.status != Outcome.COMPLETED:
            raise UserError(f"the teacher's fine-tuning diverged (non-finite loss at epoch {len(result.history)}); "
                            "lower teacher.train.lr")
        history = result.history
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {}  # a teacher for a final refit trains on every labelled image: nothing to validate on
    if len(data.val):
        probs = Runner.for_config(model, tcfg.train, device).split_probs(data, "val", tcfg.train.eval_batch_size)
        metrics = compute_metrics(data.val.labels.numpy(), probs, data.classes)
        log.info("teacher %s: validation balanced accuracy %.4f, accuracy %.4f (%.1f s)", tcfg.name,
                 metrics["balanced_accuracy"], metrics["accuracy"], seconds)
    meta = TeacherMeta(name=tcfg.name, config=dataclasses.asdict(tcfg), classes=list(data.classes),
                       val_metrics=metrics, finetune_seconds=seconds, history=history, fingerprint=data.fingerprint)
    return model.cpu(), meta


@torch.no_grad()
def _logits(cfg: Config, data: Dataset, model: torch.nn.Module, directory: Path, epochs: int,
            device: torch.device, progress: bool, info: TeacherInfo) -> torch.Tensor:
    """Teacher logits for every view of epochs 0..epochs-1 (extending a shorter cached set); `info` records
    what it took."""
    path = directory / f"logits-{_augment_key(cfg)}.safetensors"
    n, k = len(data.train), len(data.classes)
    with file_lock(path):
        have = torch.zeros((0, n, k))
        try:
            tensors, _ = load_tensors(path)
            have = tensors["logits"]
            if tuple(have.shape[1:]) != (n, k):
                raise CacheError(f"{path} has logits of shape {tuple(have.shape)}, expected (*, {n}, {k})")
        except CacheError as e:
            if path.exists():
                log.warning("teacher logits cache rebuilt: %s", e)
            have = torch.zeros((0, n, k))
        info.logit_epochs = epochs
        if len(have) >= epochs:
            info.logits_cached, info.logit_seconds, info.forward_images = True, 0.0, 0
            return have[:epochs].float()
        t0 = time.perf_counter()
        # the fine-tuning's amp and channels_last
        logits = torch.cat([have, view_logits(model, cfg.teacher.train, cfg, data, range(len(have), epochs), device,
                                              progress)])
        forward = (epochs - len(have)) * n
        _count_forward(forward)
        save_tensors(path, {"logits": logits}, {"augment": dataclasses.asdict(cfg.augment)})
        seconds = time.perf_counter() - t0
        log.info("teacher logits for %d epochs x %d views computed in %.1f s", epochs - len(have), n, seconds)
        info.logits_cached, info.logit_seconds, info.forward_images = False, seconds, forward
        return logits[:epochs]


@torch.no_grad()
def view_logits(model: torch.nn.Module, forward: TrainConfig, cfg: Config, data: Dataset, epochs: Iterable[int],
                device: torch.device, progress: bool = False, desc: str = "teacher logits") -> torch.Tensor:
    """`model`'s logits (float32, on the CPU) for every training view of `data.train` in `epochs`: the views the
    students of `cfg` train on (`cfg.augment`); `forward`: the training section whose amp and channels_last it
    runs with. Epochs x N_train x classes."""
    epochs = list(epochs)
    run = Runner.for_config(model.eval(), forward, device)
    source = BatchSource(data, "train", device)
    augmenter = Augmenter(cfg.augment, len(data.train), device)
    out = torch.empty((len(epochs), len(data.train), len(data.classes)), device=device)
    for i, epoch in enumerate(tqdm(epochs, desc=desc, unit="epoch", disable=None if progress else True,
                                   leave=False)):
        for idx, images in source.in_order(forward.eval_batch_size):
            out[i, idx] = run.logits(augmenter(images, idx, epoch))
    return out.cpu()
