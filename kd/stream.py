"""Where batches of uint8 images come from: resident tensors, or files decoded in DataLoader workers.

Both sources take the same sample order and yield (indices, uint8 images) on the training device, so
the device-side augmentation, keyed by sample index, gives the same views either way and the teacher's
cached logits hold for both. `data.pipeline: memory` (the default) keeps the whole split on the device;
`stream` is for datasets too big for memory: only the file list is held, and each epoch decodes again.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from kd.data import Dataset, Split
from kd.images import BadImage, decode_file


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], size: int, max_pixels: int):
        self.paths, self.size, self.max_pixels = paths, size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        try:
            arr, _ = decode_file(self.paths[i], self.size, self.max_pixels)
            arr = np.array(arr)  # writable, as torch wants
        except BadImage as e:  # it decoded when the dataset was listed: the file changed since
            raise BadImage(f"{self.paths[i]}: {e} (the file changed after the dataset was loaded)") from None
        return i, torch.from_numpy(arr).permute(2, 0, 1)


def _collate(items: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([i for i, _ in items]), torch.stack([x for _, x in items])


class BatchSource:
    """Batches of one split, in a given order, as (indices, uint8 N x 3 x H x W) on `device`."""

    def __init__(self, data: Dataset, split: str, device: torch.device):
        self.split: Split = data.split(split)
        self.device = device
        images = self.split.images
        self.streaming = images is None
        self.image_size, self.workers, self.max_pixels = data.image_size, data.workers, data.max_pixels
        self.images = None if images is None else images.to(device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.split)

    def __call__(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if self.images is not None:
            for idx in chunks:
                idx = idx.to(self.device, non_blocking=True)
                yield idx, self.images[idx]
            return
        loader = torch.utils.data.DataLoader(
            _Files(self.split.paths, self.image_size, self.max_pixels), batch_sampler=[c.tolist() for c in chunks],
            num_workers=self.workers, collate_fn=_collate, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None, persistent_workers=False)
        for idx, images in loader:
            yield idx.to(self.device, non_blocking=True), images.to(self.device, non_blocking=True)

    def in_order(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self(torch.arange(len(self.split)), batch_size)
