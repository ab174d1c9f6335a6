"""The training loop shared by teacher fine-tuning and student distillation.

The training set lives on the device as uint8; each batch is augmented there (`kd.augment`), the
teacher's logits for that exact view come from the cache, and nothing synchronises with the host until
the epoch ends. The forward pass (normalisation, memory format, autocast) is `kd.infer.Runner`'s, the
same one evaluation and the teacher's logits use. Each epoch's metrics go to a `report(metrics, state_fn)`
callback: the caller (the CLI, or the search's trainable) decides what to print or where to checkpoint;
`state_fn()` builds the resumable state only when asked. kd/ never imports Ray.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kd.augment import Augmenter
from kd.config import AugmentConfig, TrainConfig
from kd.data import Dataset
from kd.infer import Runner
from kd.infer import predict_probs  # noqa: F401  kd.export still imports it from here; its home is kd.infer
from kd.losses import DistillLoss
from kd.metrics import compute_metrics, flatten, tune_threshold
from kd.models import is_distilled
from kd.stream import BatchSource

ReportFn = Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None]

# FitResult.status; an epoch's history row carries a status only when that epoch diverged
COMPLETED = "completed"
DIVERGED = "diverged"


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = COMPLETED          # COMPLETED | DIVERGED
    threshold: float | None = None   # two classes: tuned on validation (None: argmax)
    val_metrics: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from kd.errors import UserError
        raise UserError(f"train.device is '{name}' but no CUDA device is available (use auto or cpu)")
    return device


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def save_state(state: dict[str, Any], path: str) -> None:
    """A resumable checkpoint (tensors and plain values only: it loads with weights_only=True)."""
    from kd.files import atomic_path
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    from timm.optim import param_groups_weight_decay
    groups = param_groups_weight_decay(model, cfg.weight_decay)  # no decay on norms and biases
    fused = {"fused": True} if device.type == "cuda" else {}  # CUDA only, whatever amp / channels_last say
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, **fused)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warmup, then cosine to zero over the remaining steps, a step decay, or constant."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / total)))
    if cfg.schedule == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
    return 1.0


def epoch_order(n: int, labels: torch.Tensor, seed: int, epoch: int, balanced: bool) -> torch.Tensor:
    """The sample order of one epoch: a permutation, or class-balanced draws with replacement."""
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    if not balanced:
        return torch.randperm(n, generator=g)
    counts = torch.bincount(labels.cpu()).double()
    weights = 1.0 / counts[labels.cpu()]
    return torch.multinomial(weights, n, replacement=True, generator=g)


def fit(model: nn.Module, cfg: TrainConfig, data: Dataset, loss_fn: DistillLoss, augment: AugmentConfig, *,
        teacher_logits: torch.Tensor | None = None, balanced_sampling: bool = False,
        report: ReportFn | None = None, resume: dict[str, Any] | None = None,
        progress: bool = True, desc: str = "train") -> FitResult:
    """Train `model` on `data.train`, evaluating on `data.val` after every epoch.

    `teacher_logits` (epochs x N x classes) are the teacher's outputs for the views of each epoch; when
    given, the loss distils from them. `resume` is a state built by an earlier `report`'s `state_fn`.
    """
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    run = Runner.for_config(model, cfg, device, compile=cfg.compile)  # on the device, amp and channels_last as set
    distilled = teacher_logits is not None and is_distilled(model)
    if distilled:
        model.set_distilled_training(True)
    loss_fn = loss_fn.to(device)

    train, n = data.train, len(data.train)
    source, labels = BatchSource(data, "train", device), train.labels.to(device)
    logits_cache = teacher_logits.to(device) if teacher_logits is not None else None
    if logits_cache is not None and len(logits_cache) < cfg.epochs:  # each epoch's views need their own logits
        raise ValueError(f"teacher logits cover {len(logits_cache)} epochs of views; training runs {cfg.epochs}")
    augmenter = Augmenter(augment, n, device)
    drop_lone = n % cfg.batch_size == 1 and n > 1  # a lone last sample would upset BatchNorm
    steps = n // cfg.batch_size + (0 if n % cfg.batch_size in (0, 1) else 1)

    optimizer = _optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps))
    result = FitResult(model)
    start = 0
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start, result.history = int(resume["epoch"]), list(resume["history"])

    def state_fn() -> dict[str, Any]:
        """A snapshot (copied to the CPU), so later epochs cannot change it."""
        return {"model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
                "optimizer": _to_cpu(optimizer.state_dict()), "scheduler": copy.deepcopy(scheduler.state_dict()),
                "epoch": len(result.history), "history": copy.deepcopy(result.history)}

    bar = tqdm(total=(cfg.epochs - start) * steps, desc=desc, unit="batch", leave=False,
               disable=None if progress else True)  # None: shown on a terminal only
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(cfg.seed * 1_000 + epoch)  # dropout / drop-path: reproducible on resume
        t0 = time.perf_counter()
        model.train()
        order = epoch_order(n, train.labels, cfg.seed, epoch, balanced_sampling)
        order = order[:-1] if drop_lone else order
        sums = torch.zeros(4, device=device)  # loss, task, kd, correct
        seen = 0
        for idx, images in source(order, cfg.batch_size):
            out = run(augmenter(images, idx, epoch))
            teacher = logits_cache[epoch][idx] if logits_cache is not None else None
            parts = loss_fn(out, labels[idx], teacher)
            optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            cls_out = out[0] if isinstance(out, tuple) else out
            k = len(idx)
            sums += torch.stack([parts.loss.detach().float() * k, parts.task_loss.detach().float() * k,
                                 parts.kd_loss.detach().float() * k, (cls_out.argmax(1) == labels[idx]).sum().float()])
            seen += k
            bar.update(1)
        loss, task, kd, correct = (sums / seen).tolist()  # the one host sync of the epoch
        train_time = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss,
                               "train_task_loss": task, "train_kd_loss": kd, "train_accuracy": correct}
        if not math.isfinite(loss):
            result.status = DIVERGED
            row.update(status=DIVERGED, epoch_time=train_time)
            result.history.append(row)
            if report:
                report(row, state_fn)
            break
        probs = run.split_probs(data, "val", cfg.eval_batch_size)
        val_labels = data.val.labels.numpy()
        metrics = compute_metrics(val_labels, probs, data.classes)
        row.update(flatten(metrics, "val"))
        if cfg.tune_threshold and len(data.classes) == 2:
            result.threshold = tune_threshold(val_labels, probs[:, 1])
            tuned = compute_metrics(val_labels, probs, data.classes, result.threshold)
            row.update(val_balanced_accuracy_tuned=tuned["balanced_accuracy"], threshold=result.threshold)
        result.val_metrics = metrics
        row.update(epoch_time=time.perf_counter() - t0, train_images_per_s=seen / train_time)
        result.history.append(row)
        bar.set_postfix(loss=f"{loss:.3f}", val_bacc=f"{metrics['balanced_accuracy']:.3f}")
        if report:
            report(row, state_fn)
    bar.close()
    if result.status == COMPLETED and not result.val_metrics:  # resumed after the last epoch
        probs = run.split_probs(data, "val", cfg.eval_batch_size)
        result.val_metrics = compute_metrics(data.val.labels.numpy(), probs, data.classes)
        result.threshold = result.history[-1].get("threshold") if result.history else None
    if distilled:
        model.set_distilled_training(False)
    model.eval()
    return result
