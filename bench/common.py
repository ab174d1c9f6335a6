"""What the benchmarks share: the profiles (the data, models and epochs of each), the image files, the config of
a kd-search run on them."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from search.config import Config


class _Profile(TypedDict):
    size: int
    images: int
    teacher: str
    student: str
    batch: int
    epochs: int
    trials: int
    teacher_epochs: int
    teacher_lr: float
    lr: float
    workers: int
    compile: bool
    pack: int


class Profile(_Profile, total=False):
    trial_epochs: int  # the epochs of the single runs (the reference-style loop, a trial); default `epochs`


PROFILES: dict[str, Profile] = {
    "cpu": Profile(size=32, images=1797, teacher="resnet18", student="test_resnet", batch=64, epochs=20, trials=8,
                   teacher_epochs=10, teacher_lr=0.002, lr=0.05, workers=2, compile=False, pack=0),
    # the demo (search/presets/digits.yaml) against one distillation as the reference projects ran it on its data
    "demo": Profile(size=16, images=1797, teacher="resnet18", student="test_resnet", batch=64, epochs=20, trials=10,
                    teacher_epochs=4, teacher_lr=0.002, lr=0.05, workers=2, compile=False, pack=0),
    "smoke": Profile(size=32, images=400, teacher="test_resnet", student="test_resnet", batch=64, epochs=3, trials=2,
                     teacher_epochs=1, teacher_lr=0.003, lr=0.05, workers=2, compile=False, pack=2, trial_epochs=2),
    "gpu": Profile(size=224, images=3000, teacher="deit_small_distilled_patch16_224", student="resnet50", batch=128,
                   epochs=20, trials=16, teacher_epochs=3, teacher_lr=0.0005, lr=0.05, workers=12, compile=True,
                   pack=4, trial_epochs=3),
}


# ------------------------------------------------------------------------------------------------ data

def make_files(root: Path, size: int, count: int) -> Path:
    """Real images as files: scikit-learn's digit scans (8 vs the rest), topped up with crops of its two photos."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    marker = root / f".done-{size}-{count}"
    if marker.exists():
        return root
    digits = load_digits()
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    fmt = "png" if size <= 64 else "jpg"
    for i in range(count):
        if i < len(digits.images):
            cls = "digit_8" if digits.target[i] == 8 else "other"
            img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).convert("RGB")
        else:  # a random crop of a photo, so a few thousand images exist at 224 px
            cls = "other"
            photo = photos[i % 2]
            s = int(rng.integers(96, 400))
            y, x = int(rng.integers(0, photo.shape[0] - s)), int(rng.integers(0, photo.shape[1] - s))
            img = Image.fromarray(photo[y:y + s, x:x + s])
        (root / cls).mkdir(parents=True, exist_ok=True)
        img.resize((size, size), Image.Resampling.BILINEAR).save(root / cls / f"{i:05d}.{fmt}", quality=90)
    marker.touch()
    return root


def config(p: Profile, work: Path, **sets: Any) -> Config:
    from search.config import load_config
    base = [f"name=bench-{p['size']}", f"output_dir={work / 'results'}", "data.source=folder",
            f"data.train={work / 'images'}", f"data.image_size={p['size']}", f"data.cache_dir={work / 'cache'}",
            f"data.workers={p['workers']}", f"teacher.name={p['teacher']}", "teacher.pretrained=false",
            f"teacher.train.epochs={p['teacher_epochs']}", "teacher.train.optimizer=adamw",
            f"teacher.train.lr={p['teacher_lr']}", f"teacher.train.batch_size={p['batch']}",
            f"student.name={p['student']}", f"train.epochs={p['epochs']}", f"train.batch_size={p['batch']}",
            f"train.lr={p['lr']}", "train.schedule=step", "search.confirm_seeds=0", "search.folds=1",
            f"search.num_samples={p['trials']}", "data.allow_leakage=true"]
    return load_config(None, base + [f"{k}={v}" for k, v in sets.items()])


def gpu_peak() -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
