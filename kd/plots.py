"""Pictures a person would rather look at than read: learning curves and confusion matrices.

Drawn on `matplotlib.figure.Figure` objects, never through pyplot: saving a PNG uses matplotlib's Agg canvas
whatever the backend, so importing kd leaves a notebook's backend (and pyplot's figures) as they were.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kd.files import atomic_path


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure of its own (no pyplot, no backend chosen): `save_figure` writes it, then it is garbage."""
    return Figure(figsize=figsize)


def save_figure(fig: Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def learning_curves(histories: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "",
                    rule: str = "") -> None:
    """Training loss and validation balanced accuracy per epoch, one line per run."""
    fig = new_figure((11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for label, history in histories.items():
        epochs = [h["epoch"] for h in history]
        ax_loss.plot(epochs, [h.get("train_loss", np.nan) for h in history], marker=".", label=label)
        ax_acc.plot(epochs, [h.get("val_balanced_accuracy", np.nan) for h in history], marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="balanced accuracy", ylim=(0.0, 1.02),
               title="validation balanced accuracy" + (f"\n({rule})" if rule else ""))
    ax_acc.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    if len(histories) > 1 or next(iter(histories), ""):
        ax_acc.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def confusion_matrix(cm: list[list[int]], classes: list[str], path: str | Path, title: str = "") -> None:
    """Counts, with each cell's share of its true class (its recall on the diagonal)."""
    cm_arr = np.asarray(cm, dtype=float)
    share = cm_arr / np.maximum(cm_arr.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.9 * len(classes)
    fig = new_figure((size + 1.5, size))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    crowded = len(classes) > 4
    ax.set_xticks(range(len(classes)), classes, rotation=45 if crowded else 0, ha="right" if crowded else "center")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(cm_arr[i, j])}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=9,
                    color="white" if share[i, j] > 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    save_figure(fig, path)
