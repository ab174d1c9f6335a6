"""`kdsearch evaluate`: an exported student on labelled images, with its metrics and a confusion matrix.

DATA is one of: `digits` (the built-in digits' test split, made as the student's config made it), a config
file (its test split), a folder of class folders, or a CSV of file names and labels.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kd import plots
from kd.config import DataConfig, SplitSource, read_yaml, section
from kd.data import Split, load_dataset, load_labelled
from kd.errors import UserError
from kd.export import Student, load_student
from kd.metrics import compute_metrics, format_metrics, report_text
from kd.records import JsonRecord


@dataclass(frozen=True)
class EvaluationRecord(JsonRecord):
    """`kdsearch evaluate`'s metrics.json: which model on which images, and its figures (kd.metrics.compute_metrics
    at the export's own threshold)."""
    FILE: ClassVar[str] = "metrics.json"
    model: str                                   # the export as it was named
    data: str                                    # the images, in words ("the test split of digits", a folder)
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    recall: dict[str, float]                     # per class
    confusion_matrix: list[list[int]]            # rows: true class, columns: predicted
    n: int
    threshold: float | None = None


def labelled_split(data: str, student: Student, file_column: str = "file", label_column: str = "label",
                   images: str = "", progress: bool = True) -> tuple[Split, str]:
    """The labelled images DATA names, at the student's input size, and how to call them."""
    if data == "digits" or data.endswith((".yaml", ".yml")):
        # only the data section is read: a search's config (or the export's) has sections the library does not know
        raw, source = (student.meta.config, "the model's config") if data == "digits" else (read_yaml(data), data)
        data_cfg = section(raw, "data", DataConfig, source)
        if data == "digits":
            data_cfg = dataclasses.replace(data_cfg, source="digits")
        data_cfg = dataclasses.replace(data_cfg, image_size=student.image_size, pipeline="memory")
        data_cfg.check()
        dataset = load_dataset(data_cfg, progress=progress)
        if dataset.classes != student.classes:
            raise UserError(f"{data} has classes {', '.join(dataset.classes)}; the model {', '.join(student.classes)}")
        return dataset.test, f"the test split of {data}"
    if not os.path.exists(data):
        raise UserError(f"{data}: no such folder or CSV file (DATA may also be 'digits' or a config)")
    data_cfg = DataConfig(source="csv" if os.path.isfile(data) else "folder", image_size=student.image_size,
                          file_column=file_column, label_column=label_column,
                          cache_dir=student.meta.config["data"]["cache_dir"])
    return load_labelled(data_cfg, SplitSource(path=data, images=images), student.classes, progress), data


def evaluate_export(model: str | Path, data: str, out: str | Path, file_column: str = "file",
                    label_column: str = "label", images: str = "", progress: bool = True,
                    echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Metrics of the export at `model` on DATA, printed, with confusion_matrix.png and metrics.json in `out`."""
    student = load_student(model)
    split, name = labelled_split(data, student, file_column, label_column, images, progress)
    assert split.images is not None, "labelled_split decodes into memory"
    probs = student.probs(split.images)
    labels = split.labels.numpy()
    metrics = compute_metrics(labels, probs, student.classes, student.threshold)
    echo(format_metrics(metrics, student.classes, f"{model} on {name} ({len(labels)} images):"))
    echo(report_text(labels, probs, student.classes, student.threshold))
    out = Path(out)
    plots.confusion_matrix(metrics["confusion_matrix"], student.classes, out / "confusion_matrix.png",
                           f"{Path(model).name} on {name}")
    EvaluationRecord(model=str(model), data=name, **metrics).write(out / EvaluationRecord.FILE)
    echo(f"confusion matrix: {out / 'confusion_matrix.png'}; metrics: {out / EvaluationRecord.FILE}")
    return metrics
