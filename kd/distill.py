"""`kdsearch distill` and `kdsearch teacher`: data, teacher (cached), student (kd.student), export, test once."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch

from kd import plots
from kd.config import Config, save_config
from kd.cost import distill_report
from kd.data import Dataset, load_dataset
from kd.errors import Diverged
from kd.export import export_student
from kd.files import atomic_path
from kd.metrics import format_metrics
from kd.models import check_models, fetch_pretrained, known_class_count
from kd.records import JsonRecord
from kd.student import evaluate_model, new_student, train_student
from kd.teacher import TeacherInfo, load_teacher_model, new_teacher, prepare_teacher
from kd.timing import Phases, phases_text
from kd.train import FitResult, Outcome

log = logging.getLogger("kd")


@dataclass(frozen=True)
class DistillMetrics(JsonRecord):
    """`kdsearch distill`'s metrics.json (in its output folder): the student on validation and, once, on test, its
    teacher, what it costs against the teacher, and the run's time. The export's own metrics.json holds the same
    without the time (`exported`)."""
    FILE: ClassVar[str] = "metrics.json"
    val: dict[str, Any]                          # kd.metrics.compute_metrics on the validation split
    test: dict[str, Any]                         # ... and on the test split (full)
    threshold: float | None                      # the decision threshold tuned on validation, or None: argmax
    teacher_val: dict[str, Any]                  # the teacher on the validation split
    epochs: int                                  # the epochs the student trained
    teacher: TeacherInfo | None = None           # how the teacher was prepared
    cost: dict[str, Any] = field(default_factory=dict)      # the compression report (kd.cost.distill_report)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of the run
    seconds: float = 0.0                         # the run's seconds in all

    def exported(self) -> dict[str, Any]:
        """What the export's metrics.json holds: everything but the run's time."""
        return {k: v for k, v in self.to_dict().items() if k not in ("phases", "seconds")}


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    if row.get("status") == Outcome.DIVERGED:
        return f"epoch {row['epoch']}/{epochs}: loss is not finite; training stopped"
    return (f"epoch {row['epoch']:>3}/{epochs}  loss {row['train_loss']:.4f}  val balanced acc "
            f"{row['val_balanced_accuracy']:.4f}  acc {row['val_accuracy']:.4f}  ({row['epoch_time']:.1f} s)")


def finish_student(cfg: Config, data: Dataset, result: FitResult, out_dir: Path, teacher_metrics: dict[str, Any],
                   teacher: TeacherInfo | None = None, teacher_model: torch.nn.Module | None = None,
                   phases: Phases | None = None) -> DistillMetrics:
    """Evaluate a trained student on validation and, once, on test; measure what it costs against the teacher
    (`kd.cost`: in metrics["cost"] and the export's kdsearch.json); export it; draw its pictures."""
    if result.status != Outcome.COMPLETED:
        raise Diverged(f"training diverged at epoch {len(result.history)} (non-finite loss): "
                       "try a lower train.lr or a lower distill.temperature")
    phases = phases or Phases()
    with phases("evaluate"):
        val = evaluate_model(result.model, data, "val", result.threshold, cfg)
        test = evaluate_model(result.model, data, "test", result.threshold, cfg)
    with phases("compression report"):
        cost = distill_report(cfg, result.model, teacher_model, teacher_metrics, val)
    metrics = DistillMetrics(val=val, test=test, threshold=result.threshold, teacher_val=teacher_metrics,
                             epochs=len(result.history), teacher=teacher, cost=cost)
    with phases("export"):
        export_student(out_dir / "model", result.model, cfg, data.classes, result.threshold, metrics.exported())
    with phases("plots"):
        plots.learning_curves({cfg.student.name: result.history}, out_dir / "plots" / "learning_curves.png",
                              f"{cfg.teacher.name} -> {cfg.student.name}, {cfg.distill.mode} KD")
        plots.confusion_matrix(test["confusion_matrix"], data.classes, out_dir / "plots" / "confusion_matrix_test.png",
                               "student on the held-out test split")
    metrics = dataclasses.replace(metrics, phases=dict(phases.seconds), seconds=phases.total)
    metrics.write(out_dir / DistillMetrics.FILE)
    return metrics


def write_history(history: list[dict[str, Any]], path: Path) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def run_distill(cfg: Config, out_dir: str | Path | None = None, progress: bool = True,
                echo: Callable[[str], None] = print) -> DistillMetrics:
    """`kdsearch distill`: everything from the config to an exported, tested student in `out_dir`.

    With `progress` off only the results are echoed (the final metrics and where the export is).
    """
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / cfg.name / "distill"
    # A bad model name or weights file fails here, before any data is decoded or output written, and no model is
    # built twice: where the config fixes the class count, both models are built for real now (that is their
    # check) and used as built: the teacher fine-tuned or given its cached weights, the student trained.
    # Otherwise they are checked on the meta device and built once the data says how many classes there are.
    phases = Phases()
    with phases("models"):
        fetch_pretrained(cfg)  # timm's weights, where pretrained is true: from the cache, else downloaded once
        classes = known_class_count(cfg.data)
        teacher_model = student = None
        if classes:
            teacher_model, student = new_teacher(cfg, classes), new_student(cfg, classes)
        else:
            check_models(cfg)
    with phases("decode"):
        data = load_dataset(cfg.data, progress)
    if len(data.classes) != classes:  # not known up front (a CSV's labels), or not what the folders promised
        teacher_model = student = None
    with phases("teacher"):
        teacher = prepare_teacher(cfg, data, progress=progress, model=teacher_model)
    if progress:
        echo(f"{teacher.info.describe()}; validation balanced accuracy {teacher.metrics['balanced_accuracy']:.4f}")
    out.mkdir(parents=True, exist_ok=True)  # only now: bad input leaves an earlier run's folder as it was
    save_config(cfg, out / "config.yaml")

    def report(row: dict[str, Any], state_fn: Callable[[], dict[str, Any]]) -> None:
        history.append(row)
        write_history(history, out / "history.csv")
        if progress:
            echo(epoch_line(row, cfg.train.epochs))

    history: list[dict[str, Any]] = []
    with phases("train"):
        result = train_student(cfg, data, teacher.logits, report=report, progress=progress, model=student)
    if teacher_model is None:  # for the compression report
        teacher_model = load_teacher_model(cfg, data, teacher.directory)[0]
    metrics = finish_student(cfg, data, result, out, teacher.metrics, teacher_model=teacher_model,
                             teacher=teacher.info, phases=phases)
    echo(format_metrics(metrics.val, data.classes, "validation (threshold chosen here):"))
    echo(format_metrics(metrics.test, data.classes, "held-out test (evaluated once):"))
    echo(metrics.cost["summary"])
    echo(f"exported student: {out / 'model'}")
    echo(f"time: {phases_text(metrics.phases)}; {metrics.seconds:.1f} s in all")
    return metrics


def run_teacher(cfg: Config, progress: bool = True, echo: Callable[[str], None] = print) -> None:
    """`kdsearch teacher`: only the teacher and its cached logits, with its validation metrics."""
    check_models(cfg, roles=("teacher",))
    data = load_dataset(cfg.data, progress)
    teacher = prepare_teacher(cfg, data, progress=progress)
    echo(format_metrics(teacher.metrics, data.classes, f"teacher {cfg.teacher.name} on validation:"))
    echo(f"teacher cache: {teacher.directory} ({'found' if teacher.info.cached else 'fine-tuned now'}); "
         f"logits for {len(teacher.logits)} epochs x {teacher.logits.shape[1]} views")
