"""Pictures a person would rather look at than read: learning curves and confusion matrices.

Drawn on `matplotlib.figure.Figure` objects, never through pyplot: saving a PNG uses matplotlib's Agg canvas
whatever the backend, so importing kd leaves a notebook's backend (and pyplot's figures) as they were.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import rcParams
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kd.files import atomic_path


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure of its own (no pyplot, no backend chosen): `save_figure` writes it, then it is garbage."""
    return Figure(figsize=figsize)


def save_figure(fig: Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def chance_level(metric: str, classes: int) -> float | None:
    """What a model that knows nothing scores on `metric` (val_ or test figure names): AUC 0.5, balanced accuracy
    and recall 1/K, a balanced log-loss of uniform probabilities ln K; None where it depends on the class counts."""
    name = metric.removeprefix("val_").removeprefix("test_")
    if name == "auc":
        return 0.5
    if name.startswith(("balanced_accuracy", "recall_")):
        return 1 / classes
    if name == "balanced_log_loss":
        return float(np.log(classes))
    return None


THRESHOLD_FREE = ("val_auc", "val_balanced_log_loss")  # figures of the probabilities themselves: no decision rule


def learning_curves(histories: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "",
                    rule: str = "", metric: str = "val_balanced_accuracy", classes: int = 2,
                    losses: dict[str, str] | None = None) -> None:
    """Training loss and the held-out `metric` per epoch, one line per run (its colour the same in every panel), with
    the metric's chance level dotted. `losses` names each run's kind of loss (a search's distillation mode): runs
    whose losses are different sums (soft mode's KL to softened probabilities against hard mode's cross-entropy to
    the teacher's labels) get a loss panel each, never one axis."""
    losses = losses or {}
    kinds = sorted(dict.fromkeys(losses.get(label, "") for label in histories),
                   key=lambda kind: ["soft", "hard"].index(kind) if kind in ("soft", "hard") else 2)
    fig = new_figure((5.5 * (len(kinds) + 1), 4.4))
    *ax_losses, ax_metric = fig.subplots(1, len(kinds) + 1, sharex=True, squeeze=False)[0]  # epochs line up
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, history) in enumerate(histories.items()):
        epochs = [h["epoch"] for h in history]
        colour = colours[i % len(colours)]
        ax_loss = ax_losses[kinds.index(losses.get(label, ""))]
        ax_loss.plot(epochs, [h.get("train_loss", np.nan) for h in history], marker=".", label=label, color=colour)
        ax_metric.plot(epochs, [h.get(metric, np.nan) for h in history], marker=".", label=label, color=colour)
    for ax_loss, kind in zip(ax_losses, kinds, strict=True):
        ax_loss.set(xlabel="epoch", ylabel="training loss", title=f"training loss, {kind} mode" if kind else
                    "training loss")
    name = metric.removeprefix("val_").replace("_", " ").replace("auc", "AUC")
    rule = "" if metric in THRESHOLD_FREE else rule  # AUC and the log-loss judge probabilities: no rule
    ax_metric.set(xlabel="epoch", ylabel=name, title=f"validation {name}" + (f"\n({rule})" if rule else ""))
    seen = [float(h[metric]) for history in histories.values() for h in history if h.get(metric) is not None
            and not np.isnan(h[metric])]
    if "log_loss" not in metric and seen:  # the lines' own range (with chance, where it is near): not 0 to 1
        low = min(min(seen), 1.0)
        ax_metric.set_ylim(max(0.0, low - 0.05 * (1.02 - low) - 0.01), 1.0 + 0.05 * (1.0 - low) + 0.005)
    chance = chance_level(metric, classes)
    if chance is not None and (not seen or chance >= min(seen) - 0.1):  # chance, where it is in view
        ax_metric.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
    for ax in (*ax_losses, ax_metric):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    handles, labels = ax_metric.get_legend_handles_labels()
    rows = -(-len(labels) // 3)
    if len(histories) > 1 or next(iter(histories), ""):  # below the panels, where it hides no line
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(3, len(labels)), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.01, 1, 1))
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
