"""The one compute path: how a model meets a batch on a device, for training, evaluation and the teacher.

`Runner` puts a model on its device (channels_last where chosen), normalises float inputs with the
model's own mean/std, and runs the forward pass under bf16 autocast where chosen. The training step
(`kd.train.fit`), evaluation (`Runner.split_probs`, `predict_probs`) and the teacher's logits (`kd.teacher`)
all go through it, so a dtype or memory-format mistake shows up everywhere at once.

The settings (`TrainConfig.amp`, `TrainConfig.channels_last`): "auto" is bf16 autocast on CUDA only and
channels_last for CNNs on any device (`use_channels_last` says why on the CPU too); "bf16" / "always" force them
on any device and model, the CPU included (which is how the tests exercise the GPU path on a machine without
one); "off" disables them. ("always", not "on": YAML reads a bare `on` as true, which an older config's boolean
makes "auto".)
Autocast leaves the parameters in float32: only the operations inside the forward pass run in bf16.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from kd.augment import Normalize, to_float
from kd.errors import UserError
from kd.models import is_cnn, mean_std
from kd.stream import BatchSource

if TYPE_CHECKING:
    from kd.config import TrainConfig
    from kd.data import Dataset

Amp = Literal["auto", "bf16", "off"]
ChannelsLast = Literal["auto", "always", "off"]


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` (CUDA where there is one, else the CPU), `cpu`, `cuda` or `cuda:N`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device is '{name}' but no CUDA device is available (use auto or cpu)")
    return device


def use_amp(setting: Amp, device: torch.device) -> bool:
    """Whether to run under bf16 autocast: "auto" on CUDA only."""
    return device.type == "cuda" if setting == "auto" else setting == "bf16"


def use_channels_last(setting: ChannelsLast, device: torch.device, model: nn.Module) -> bool:
    """Whether to use channels_last: "auto" for CNNs on any device (a ViT's one patch convolution gains nothing).
    On the CPU too: a training step of batch 32, one thread, took 1.07x to 1.96x less time in it for six of seven
    timm CNNs at 24 to 128 px on this project's VM (test_resnet 1.4x, efficientnet_b0 2.0x), 6% more for one
    (resnet18 at 64 px)."""
    return is_cnn(model) if setting == "auto" else setting == "always"


class Runner:
    """A model prepared to run on `device`: moved there (channels_last when chosen), its inputs normalised
    with `mean`/`std` (default: the model's own) and its forward pass run under bf16 autocast when chosen.

    `compile` wraps the training forward in `torch.compile`; evaluation (`probs`) runs the plain model.
    """

    def __init__(self, model: nn.Module, device: torch.device, amp: Amp = "auto",
                 channels_last: ChannelsLast = "auto", mean: Iterable[float] | None = None,
                 std: Iterable[float] | None = None, compile: bool = False):
        self.device = torch.device(device)
        self.amp = use_amp(amp, self.device)
        self.channels_last = use_channels_last(channels_last, self.device, model)
        self.model = model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if mean is None or std is None:
            mean, std = mean_std(model)
        self.norm = Normalize(tuple(mean), tuple(std)).to(self.device)
        self.forward = torch.compile(self.model) if compile else self.model

    @classmethod
    def for_config(cls, model: nn.Module, cfg: TrainConfig, device: torch.device, **kwargs: Any) -> Runner:
        """A runner with a training section's `amp` and `channels_last` (`compile` only where asked: training)."""
        return cls(model, device, cfg.amp, cfg.channels_last, **kwargs)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (on the device) -> the model's normalised input, in the chosen memory format."""
        x = self.norm(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def __call__(self, x: torch.Tensor) -> Any:
        """The training forward pass on float images in [0, 1]: normalise, memory format, autocast, forward."""
        x = self.inputs(x)
        with self.autocast():
            return self.forward(x)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits of float images in [0, 1], the model in whatever mode the caller left it."""
        x = self.inputs(x)
        with self.autocast():
            return self.model(x).float()

    @torch.no_grad()
    def probs(self, batches: Iterable[torch.Tensor]) -> np.ndarray:
        """Class probabilities for batches of uint8 images, in eval mode, with one transfer back at the end."""
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for images in batches:
                logits = self.logits(to_float(images.to(self.device, non_blocking=True)))
                out.append(torch.softmax(logits, dim=1))
        finally:
            self.model.train(was_training)
        return torch.cat(out).cpu().numpy() if out else np.zeros((0, 0))

    def split_probs(self, data: Dataset, split: str, batch_size: int = 512) -> np.ndarray:
        """Class probabilities for a whole split, resident or streamed."""
        source = BatchSource(data, split, self.device)
        return self.probs(x for _, x in source.in_order(batch_size))


def predict_probs(model: nn.Module, images: torch.Tensor, mean, std, device: torch.device, batch_size: int = 512,
                  amp: Amp = "auto", channels_last: ChannelsLast = "auto") -> np.ndarray:
    """Class probabilities for uint8 images, in large batches, with one transfer back at the end."""
    runner = Runner(model, device, amp, channels_last, mean, std)
    return runner.probs(images[i:i + batch_size] for i in range(0, len(images), batch_size))
