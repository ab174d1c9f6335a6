"""Helpers the tests import: tiny configs, small images on disk, real digit scans as files.

Fixtures live in conftest.py (pytest finds them); plain functions live here, so tests import them as
`from tests.helpers import ...` (pyproject.toml puts the repository root on pytest's path).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from kd.files import read_jsonl


def tiny_overrides(cache_dir: Path | str, out_dir: Path | str | None = None) -> list[str]:
    """A distillation that runs in seconds on a 2-core CPU and still learns the rare class."""
    sets = [
        f"data.cache_dir={cache_dir}",
        "data.image_size=16",  # the size of the demo; a 32-px fit costs about 1.6 times as much
        "teacher.name=test_resnet",
        "teacher.train.epochs=4",
        "teacher.train.optimizer=adamw",
        "teacher.train.lr=0.003",
        "student.name=test_resnet",
        "train.epochs=3",
        "train.optimizer=adamw",
        "train.lr=0.003",
        "train.batch_size=64",
        "search.folds=1",  # the holdout: searches that test folds set them
    ]
    if out_dir is not None:
        sets.append(f"output_dir={out_dir}")
    return sets


def read_table(path: Path | str, **kwargs) -> pd.DataFrame:
    """A table kd-search wrote (trials.csv, compare.csv), its id columns as text: a Ray trial id is 8 hex digits,
    which pandas reads as a number when they are all digits (29653240) or look like one (1234e567)."""
    ids = {"trial": str, "winner": str, "node": str, "gpus": str}
    return pd.read_csv(path, dtype={**ids, **kwargs.pop("dtype", {})}, **kwargs)


def trial_results(experiment: Path) -> dict[str, list[dict]]:
    """Every result each trial of a Ray experiment reported, in order (a retried trial's repeated epochs
    included), by trial id. A search may be writing them: a line cut short is skipped."""
    out = {}
    for f in experiment.glob("*/result.json"):
        rows = read_jsonl(f)
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (20, 16), seed: int = 0) -> Path:
    """A small random image in any Pillow mode, saved by extension."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert("P")
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    img.save(path)
    return path


def make_folder_dataset(root: Path, counts: dict[str, int], start_seed: int = 0) -> Path:
    """ROOT/<class>/<images>, every image distinct."""
    seed = start_seed
    for name, n in counts.items():
        for i in range(n):
            write_image(root / name / f"{name}_{i}.png", seed=seed)
            seed += 1
    return root


def digits_folder(root: Path, count: int = 400, size: int = 32) -> Path:
    """Real scans as files: the first `count` digits, 8 against the rest, as PNGs in ROOT/<class>/."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for i in range(count):
        cls = "digit_8" if digits.target[i] == 8 else "other"
        img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8))
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        (root / cls).mkdir(parents=True, exist_ok=True)
        img.save(root / cls / f"{i:04d}.png")
    return root
