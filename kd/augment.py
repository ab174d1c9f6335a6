"""Batched, seeded augmentation on the training device.

The reference projects' set (random resized crop, horizontal flip, small rotation, colour jitter) as one affine
`grid_sample` plus per-sample colour matrices. Every random parameter of sample `i` in epoch `e` is drawn
from a generator seeded by (seed, e) in sample order, so a sample gets the same view in an epoch
whatever batch it lands in: the teacher's cached logits are logits of exactly the view the student sees
(consistent teaching, Beyer et al. 2022), and every trial of a search sees the same stream.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kd.config import AugmentConfig

_LUMA = torch.tensor([0.299, 0.587, 0.114])
# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) plane.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


class Augmenter:
    """Draws a table of per-sample parameters once per epoch and applies it to any batch of indices."""

    def __init__(self, cfg: AugmentConfig, num_samples: int, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.n = num_samples
        self.device = torch.device(device)
        self._epoch: int | None = None
        # the epoch's tables on the device: N x 2 x 3 affine matrices, N x 3 x 3 saturation + hue matrices,
        # N x 2 brightness, contrast factors
        self._tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def params(self, epoch: int) -> dict[str, torch.Tensor]:
        """The parameter table of one epoch, on the CPU: a pure function of (seed, epoch)."""
        c, n = self.cfg, self.n
        g = torch.Generator().manual_seed((c.seed * 1_000_003 + epoch) % (2**63 - 1))
        u = torch.rand((n, 9), generator=g, dtype=torch.float64)
        scale = c.crop_scale[0] + (c.crop_scale[1] - c.crop_scale[0]) * u[:, 0]
        log_r = math.log(c.crop_ratio[0]) + (math.log(c.crop_ratio[1]) - math.log(c.crop_ratio[0])) * u[:, 1]
        ratio = torch.exp(log_r)
        w = torch.sqrt(scale * ratio).clamp(max=1.0)  # crop size as a fraction of the image side
        h = torch.sqrt(scale / ratio).clamp(max=1.0)
        return {
            "w": w, "h": h,
            "cx": (1 - w) * (2 * u[:, 2] - 1), "cy": (1 - h) * (2 * u[:, 3] - 1),
            "flip": (u[:, 4] < c.flip).double() * -2 + 1,
            "angle": math.radians(c.rotation) * (2 * u[:, 5] - 1),
            "brightness": 1 + c.brightness * (2 * u[:, 6] - 1),
            "contrast": 1 + c.contrast * (2 * u[:, 7] - 1),
            "saturation": 1 + c.saturation * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1),
            "hue": c.hue * (2 * u[:, 8] - 1),
        }

    def _prepare(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._epoch == epoch and self._tables is not None:
            return self._tables
        p = self.params(epoch)
        cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
        # input coords = crop(rotate(flip(output coords))), in grid_sample's [-1, 1] convention
        theta = torch.zeros((self.n, 2, 3), dtype=torch.float64)
        theta[:, 0, 0] = p["w"] * cos * p["flip"]
        theta[:, 0, 1] = -p["w"] * sin
        theta[:, 0, 2] = p["cx"]
        theta[:, 1, 0] = p["h"] * sin * p["flip"]
        theta[:, 1, 1] = p["h"] * cos
        theta[:, 1, 2] = p["cy"]
        s = p["saturation"].view(-1, 1, 1)
        eye = torch.eye(3, dtype=torch.float64)
        saturate = s * eye + (1 - s) * _LUMA.double().view(1, 1, 3).expand(self.n, 3, 3)
        a = 2 * math.pi * p["hue"]
        rot = eye.repeat(self.n, 1, 1)
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)
        hue = _YIQ2RGB.double() @ rot @ _RGB2YIQ.double()
        self._tables = (theta.float().to(self.device), (hue @ saturate).float().to(self.device),
                        torch.stack([p["brightness"], p["contrast"]], 1).float().to(self.device))
        self._epoch = epoch
        return self._tables

    def __call__(self, images: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """uint8 B x 3 x H x W (the samples `idx` of the training set) -> float views in [0, 1]."""
        theta, colour, bc = self._prepare(epoch)
        idx = idx.to(self.device)
        x = images.float().div_(255)
        grid = F.affine_grid(theta[idx], list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        bc = bc[idx]
        x = (x * bc[:, 0].view(-1, 1, 1, 1)).clamp_(0, 1)
        grey = (x * _LUMA.to(x.device).view(1, 3, 1, 1)).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        contrast = bc[:, 1].view(-1, 1, 1, 1)
        x = (contrast * x + (1 - contrast) * grey).clamp_(0, 1)
        x = torch.einsum("bij,bjhw->bihw", colour[idx], x)
        return x.clamp_(0, 1)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1], no augmentation (evaluation)."""
    return images.float().div_(255)


class Normalize(torch.nn.Module):
    """(x - mean) / std with a model's own timm mean/std: teacher and student may differ."""

    mean: torch.Tensor  # buffers, declared for the type checker
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
