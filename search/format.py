"""How the search shows things to a person: numbers, parameter names, a trial's parameters, paths.

One place for each, so the console, summary.md and the plots say a value the same way.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

SHORT = {"distill.mode": "mode", "distill.temperature": "T", "distill.alpha": "alpha", "train.lr": "lr",
         "imbalance.method": "imbalance", "imbalance.beta": "beta", "imbalance.tau": "tau"}


def number(value: Any) -> str:
    """4 decimals without trailing zeros (0.95, 0.9663), scientific where that would hide the value; '' if missing."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        size = abs(float(value))
        return f"{value:.4g}" if size < 1e-3 or size >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def param_name(key: str) -> str:
    return SHORT.get(key, key)


def params_text(params: dict[str, Any]) -> str:
    """`mode soft, T 3.463, lr 0.05`: a trial's sampled parameters, as summary.md and the console show them."""
    return ", ".join(f"{param_name(k)} {number(v)}" for k, v in params.items())


def shown(path: str | Path) -> str:
    """A path as a person would type it: relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def spread(mean: float, std: float, n: int) -> str:
    """`0.9312 ± 0.0120` over several values; over one, no spread to show: `0.9312 (1 seed)`."""
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f} (1 seed)"
