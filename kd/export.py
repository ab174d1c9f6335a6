"""Exported students: save, load back with one call, and predict.

An export is a folder: `model.safetensors` (weights), `config.json` (timm architecture, classes, input
size, mean/std, decision threshold, hyperparameters, metrics, the full resolved config), `metrics.json`
and `model.pt2`, a `torch.export` graph that runs without timm or this package.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kd.files import atomic_dir, atomic_write_json
from kd.config import Config, ModelConfig
from kd.errors import UserError
from kd.images import IMAGE_EXTENSIONS, decode_files
from kd.metrics import predict
from kd.models import create_model, is_distilled, mean_std
from kd.train import predict_probs

log = logging.getLogger("kd")
EXPORT_FORMAT = "kd-search-student-1"


def export_student(out_dir: str | Path, model: torch.nn.Module, cfg: Config, classes: list[str],
                   threshold: float | None, metrics: dict[str, Any], graph: bool = True) -> Path:
    """Write an export folder atomically: a kill leaves the previous export (or none), never half of one."""
    out_dir = Path(out_dir)
    model = model.cpu().eval()
    mean, std = mean_std(model)
    info = {
        "format": EXPORT_FORMAT,
        "architecture": cfg.student.name,
        "num_classes": len(classes),
        "classes": classes,
        "image_size": cfg.data.image_size,
        "mean": list(mean), "std": list(std),
        "threshold": threshold,
        "positive_class": classes[1] if threshold is not None else None,
        "distilled_heads": is_distilled(model),
        "hyperparameters": {"distill": vars(cfg.distill), "imbalance": vars(cfg.imbalance),
                            "train": {k: v for k, v in vars(cfg.train).items() if k != "device"},
                            "student": vars(cfg.student), "teacher": cfg.teacher.name},
        "metrics": metrics,
        "config": cfg.to_dict(),
        "graph": None,
    }
    with atomic_dir(out_dir) as tmp:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": EXPORT_FORMAT})
        if graph:
            info["graph"] = _export_graph(model, cfg.data.image_size, tmp / "model.pt2")
        atomic_write_json(tmp / "config.json", info)
        atomic_write_json(tmp / "metrics.json", metrics)
    return out_dir


def _export_graph(model: torch.nn.Module, size: int, path: Path) -> str | None:
    """A deployable graph with a dynamic batch dimension; a model torch.export cannot trace is skipped."""
    example = torch.zeros(2, 3, size, size)
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
        return path.name
    except Exception as e:  # a graph is a convenience; the safetensors weights are the export
        log.warning("could not export a torch.export graph (%s: %s); weights are exported", type(e).__name__, e)
        return None


@dataclass
class Student:
    """An exported student loaded back: model, classes, input size, normalisation and threshold."""
    model: torch.nn.Module
    info: dict[str, Any]
    device: torch.device

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]

    @property
    def threshold(self) -> float | None:
        return self.info.get("threshold")

    @property
    def image_size(self) -> int:
        return self.info["image_size"]

    def probs(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Class probabilities for uint8 N x 3 x H x W images at the model's input size."""
        return predict_probs(self.model, images, self.info["mean"], self.info["std"], self.device, batch_size)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        from kd.augment import Normalize, to_float
        norm = Normalize(self.info["mean"], self.info["std"]).to(self.device)
        with torch.no_grad():
            return self.model(norm(to_float(images.to(self.device))))

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return predict(self.probs(images), self.threshold)


def load_student(path: str | Path, device: str | torch.device = "cpu") -> Student:
    """Load an export folder (or its config.json) written by `export_student`."""
    path = Path(path)
    folder = path.parent if path.name == "config.json" else path
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise UserError(f"{folder} is not an exported student (it needs config.json and model.safetensors)")
    try:
        info = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path} is unreadable: {e}") from None
    if info.get("format") != EXPORT_FORMAT:
        raise UserError(f"{config_path} has format {info.get('format')!r}, expected {EXPORT_FORMAT!r}")
    student_cfg = ModelConfig(name=info["architecture"], pretrained=False,
                              drop_rate=info["hyperparameters"]["student"].get("drop_rate", 0.0))
    model = create_model(student_cfg, info["num_classes"], info["image_size"])
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:
        raise UserError(f"{weights} does not hold weights for {info['architecture']}: {e}") from None
    device = torch.device(device)
    return Student(model.to(device).eval(), info, device)


def load_graph(path: str | Path) -> torch.nn.Module:
    """The exported `torch.export` graph as a module: takes normalised float images, returns logits."""
    folder = Path(path)
    return torch.export.load(str(folder / "model.pt2")).module()


def collect_images(inputs: list[str]) -> list[str]:
    """Files named directly, plus the image files inside named folders (recursively, sorted)."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, dirnames, names in os.walk(item):
                dirnames.sort()
                files.extend(os.path.join(dirpath, n) for n in sorted(names)
                             if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS and not n.startswith("."))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    if not files:
        raise UserError(f"no image files found in {', '.join(inputs)}")
    return files


def predict_files(student: Student, files: list[str], progress: bool = True) -> list[dict[str, Any]]:
    """One row per file: predicted class and class probabilities, or the reason it could not be read."""
    decoded = decode_files(files, student.image_size, 89_478_485, progress=progress, desc="reading images")
    good = [i for i, e in enumerate(decoded.errors) if not e]
    rows: list[dict[str, Any]] = [{"file": f, "predicted": "", "error": e} for f, e in zip(files, decoded.errors)]
    if good:
        images = torch.from_numpy(np.stack([decoded.arrays[i] for i in good])).permute(0, 3, 1, 2).contiguous()
        probs = student.probs(images)
        pred = predict(probs, student.threshold)
        for j, i in enumerate(good):
            rows[i]["predicted"] = student.classes[pred[j]]
            rows[i].update({f"p_{c}": round(float(p), 6) for c, p in zip(student.classes, probs[j])})
    return rows
