"""Predicting image files with an export, from any of the forms it is written in.

`load_predictor(path)` takes an export folder (the PyTorch model, through timm), its `model.onnx` (run by
onnxruntime) or its `model.pt2` (the `torch.export` graph); all three give the same classes and
probabilities (within 1e-4) since both graphs hold the normalisation and are checked against the PyTorch
model when written. `kdsearch predict` is `run_predict`.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd.errors import UserError
from kd.export import GRAPH_FILE, ONNX_FILE, ExportInfo, Student, export_folder, load_graph, load_student, read_metadata
from kd.files import atomic_path
from kd.images import decode_files, list_images
from kd.metrics import predict

log = logging.getLogger("kd")


class GraphStudent(ExportInfo):
    """An export's `model.pt2` (torch.export graph), with the classes and threshold of its kdsearch.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta, self.timm_config = read_metadata(self.path)
        self.module = load_graph(self.path)

    @torch.no_grad()
    def probs(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        out = [torch.softmax(self.module(images[i:i + batch_size].float().div_(255)).float(), dim=1)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), dtype=np.float32)


class OnnxStudent(ExportInfo):
    """An export's `model.onnx` run by onnxruntime (CPU), with the classes and threshold of its kdsearch.json."""

    def __init__(self, path: str | Path, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("onnxruntime is not installed: pip install 'kd-search[onnx]' (or onnxruntime)") from None
        self.path = Path(path)
        self.meta, self.timm_config = read_metadata(self.path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such file (the export has no ONNX graph: onnx was not installed "
                            "when it was written, or the graph did not match)")
        self.session = ort.InferenceSession(str(self.path), providers=providers or ["CPUExecutionProvider"])

    def probs(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].numpy().astype(np.float32) / np.float32(255)
            logits = self.session.run(["logits"], {"images": x})[0]
            out.append(torch.softmax(torch.from_numpy(logits).float(), dim=1))
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), dtype=np.float32)


def load_predictor(path: str | Path, device: str | torch.device = "cpu") -> ExportInfo:
    """An export folder (PyTorch), DIR/model.onnx (onnxruntime) or DIR/model.pt2 (torch.export graph)."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxStudent(path)
    if path.suffix == ".pt2":
        return GraphStudent(path)
    if path.is_dir() or path.name.endswith(".json") or path.suffix == ".safetensors":
        return load_student(export_folder(path), device)
    raise UserError(f"{path}: not an export folder, nor its {ONNX_FILE} or {GRAPH_FILE}")


def collect_images(inputs: list[str], allow_external_links: bool = False) -> list[str]:
    """Files named directly, plus the image files inside named folders (`kd.images.list_images`: recursive,
    sorted, hidden files skipped, links leading out of the folder refused with a warning)."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found, refused = list_images(item, allow_external_links)
            for path, why in refused:
                log.warning("skipped %s: %s", path, why)
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    if not files:
        raise UserError(f"no image files found in {', '.join(inputs)}")
    return files


def predict_files(student: ExportInfo, files: list[str], progress: bool = True,
                  batch_size: int = 256) -> list[dict[str, Any]]:
    """One row per file: predicted class and class probabilities, or the reason it could not be read.

    Images are decoded as in training (RGB, squashed to the export's size, bilinear) with the export's own
    decompression-bomb limit (its config's data.max_image_pixels)."""
    decoded = decode_files(files, student.image_size, student.max_image_pixels, progress=progress,
                           desc="reading images")
    pixels = [a for a in decoded.arrays if a is not None]  # the files that decoded, in order
    good = [i for i, a in enumerate(decoded.arrays) if a is not None]
    rows: list[dict[str, Any]] = [{"file": f, "predicted": "", "error": e}
                                  for f, e in zip(files, decoded.errors, strict=True)]
    if good:
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
        probs = student.probs(images, batch_size)
        pred = predict(probs, student.threshold)
        for j, i in enumerate(good):
            rows[i]["predicted"] = student.classes[pred[j]]
            rows[i].update({f"p_{c}": round(float(p), 6) for c, p in zip(student.classes, probs[j], strict=True)})
    return rows


def write_predictions(rows: list[dict[str, Any]], classes: list[str], path: str | Path) -> None:
    """The predictions CSV (file, predicted, p_<class>..., error), written atomically."""
    fields = ["file", "predicted", *[f"p_{c}" for c in classes], "error"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def prediction_summary(rows: list[dict[str, Any]], classes: list[str], path: str | Path) -> str:
    """'wrote N predictions to PATH: class count, ...; K files could not be read'."""
    bad = sum(1 for r in rows if r["error"])
    counts = {c: sum(1 for r in rows if r["predicted"] == c) for c in classes}
    return (f"wrote {len(rows)} predictions to {path}: " + ", ".join(f"{c} {n}" for c, n in counts.items())
            + (f"; {bad} files could not be read (see the error column)" if bad else ""))


def run_predict(model: str | Path, inputs: list[str], out: str | Path, progress: bool = True) -> str:
    """`kdsearch predict MODEL IMAGES... --out CSV`: MODEL is an export folder, its model.onnx or its model.pt2.
    Returns the summary line to print."""
    student = load_predictor(model)
    rows = predict_files(student, collect_images(inputs), progress=progress)
    write_predictions(rows, student.classes, out)
    return prediction_summary(rows, student.classes, out)


__all__ = ["GraphStudent", "OnnxStudent", "Student", "collect_images", "load_predictor", "predict_files",
           "prediction_summary", "run_predict", "write_predictions"]
