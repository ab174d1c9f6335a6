"""Exported students: save in a layout other tools load, load back with one call, and predict.

An export is a folder in timm's Hugging Face hub layout, plus kd-search's own metadata beside it:

- `model.safetensors`: the weights (a native timm state dict).
- `config.json`: timm's own model config, written by timm (`save_config_for_hf`, as `push_to_hf_hub` does;
  `kd.compat.save_timm_config` holds that private call and its fallback):
  `architecture`, `num_classes`, `num_features`, `label_names` and `pretrained_cfg` (mean, std, input size,
  crop_pct 1.0, interpolation). `timm.create_model("local-dir:DIR", pretrained=True)` builds the model from it.
- `kdsearch.json`: what only kd-search knows (timm ignores it): format version, classes, decision threshold and
  positive class, distilled heads, hyperparameters, metrics, the full resolved config, the names of the
  graph files with their checks against PyTorch, and the compression report.
- `metrics.json`: the metrics alone.
- `model.pt2` (`torch.export`) and `model.onnx` (when onnx and onnxruntime are installed: the `onnx` extra):
  deployable graphs that run without timm or this package. Both take float32 RGB images in [0, 1]
  (pixel / 255), N x 3 x H x W with H = W = the export's image size and any batch size, and return logits:
  the normalisation (mean/std) is inside the graph. Each is compared with the PyTorch model's logits right
  after it is written and dropped (with a warning) when they differ by more than `kd.graphs.TOLERANCE`.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kd.augment import Normalize, to_float
from kd.compat import save_timm_config
from kd.config import MAX_IMAGE_PIXELS, Config, ModelConfig
from kd.ensemble import Ensemble
from kd.errors import UserError
from kd.files import atomic_dir, atomic_write_json
from kd.graphs import Preprocessed, export_graph, export_onnx
from kd.hub import provenance
from kd.infer import predict_probs
from kd.metrics import predict
from kd.modelcard import model_card
from kd.models import create_model, is_distilled, mean_std
from kd.records import JsonRecord

log = logging.getLogger("kd")
EXPORT_FORMAT = "kd-search-student-2"
OLD_FORMATS = ("kd-search-student-1",)  # everything in config.json, which timm cannot read
METADATA_FILE = "kdsearch.json"
TIMM_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"  # the model card, as the Hugging Face hub shows one (kd/modelcard.py)
GRAPH_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
GRAPH_INPUT = ("float32 RGB images in [0, 1] (pixel / 255), N x 3 x H x W, H = W = image_size, any batch size; "
               "the normalisation (mean, std) is inside the graph; output: logits, N x num_classes")
INTERPOLATION = "bilinear"  # kd.images resizes (squashes, no crop) the whole image to size x size with it


@dataclass(frozen=True, kw_only=True)
class ExportMetadata(JsonRecord):
    """kdsearch.json: what only kd-search knows of an export (timm ignores it), written by `export_student` and read
    by `read_metadata` (kd.records: every field checked). Its fields in the order they are written."""
    format: str = EXPORT_FORMAT
    architecture: str                            # the student's timm architecture (as its config.json says)
    # K: the weights hold K students (members.0. ...), each loads in timm with its prefix stripped, and the
    # graphs and the PyTorch model output the log of their mean probability (kd.ensemble)
    ensemble: int = 0
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    interpolation: str = INTERPOLATION
    threshold: float | None = None               # the decision threshold on p(positive_class), or None: argmax
    positive_class: str | None = None
    distilled_heads: bool = False
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # distill, imbalance, train, student, teacher
    metrics: dict[str, Any] = field(default_factory=dict)  # the caller's metrics, without the cost
    config: dict[str, Any] = field(default_factory=dict)   # the full resolved config
    files: dict[str, str] = field(default_factory=dict)
    graph: str | None = None                     # GRAPH_FILE, or None where it was not written
    onnx: str | None = None                      # ONNX_FILE, or None
    graph_input: str = GRAPH_INPUT
    checks: dict[str, float | None] = field(default_factory=dict)  # each graph's largest logit difference
    compression: dict[str, Any] | None = None    # the compression report (kd.cost)
    weights_bytes: int = 0
    # the weights the teacher and the student started from (kd.hub.provenance: the hub repository, revision and
    # commit, or the local file, and the sha256), None for random initialisation
    started_from: dict[str, Any] = field(default_factory=dict)


def started_from(cfg: Config) -> dict[str, Any]:
    """The weights the teacher and the student started from (kd.hub.provenance), as far as this machine knows."""
    out: dict[str, Any] = {}
    for role in ("teacher", "student"):
        model = getattr(cfg, role)
        try:
            out[role] = provenance(model.name, model.pretrained)
        except (UserError, OSError) as e:  # an export made where the weights' file is not (a copied run folder)
            out[role] = {"name": model.name, "unknown": str(e)}
    return out


def export_student(out_dir: str | Path, model: torch.nn.Module, cfg: Config, classes: list[str],
                   threshold: float | None, metrics: dict[str, Any], graph: bool = True, onnx: bool = True,
                   cost: dict[str, Any] | None = None) -> Path:
    """Write an export folder atomically: a kill leaves the previous export (or none), never half of one.

    `cost`: the compression report (`kd.cost.compression_report`), stored in kdsearch.json (default: the
    one in `metrics["cost"]`, if any).
    """
    out_dir = Path(out_dir)
    model = model.cpu().eval()
    one = model.members[0] if isinstance(model, Ensemble) else model  # an ensemble's members share one architecture
    mean, std = mean_std(one)
    size = cfg.data.image_size
    graph_file = onnx_file = None
    checks: dict[str, float | None] = {}
    with atomic_dir(out_dir) as tmp:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
        write_timm_config(one, tmp / TIMM_CONFIG_FILE, classes, size)
        if graph or onnx:
            deploy = Preprocessed(model, mean, std).eval()
            check = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))  # not the export batch
            with torch.no_grad():
                expected = deploy(check)
            if graph:
                graph_file, checks["graph_max_abs_diff"] = export_graph(deploy, size, tmp / GRAPH_FILE, check,
                                                                         expected)
            if onnx:
                onnx_file, checks["onnx_max_abs_diff"] = export_onnx(deploy, size, tmp / ONNX_FILE, check, expected)
        started = started_from(cfg)
        meta = ExportMetadata(
            architecture=str(getattr(one, "pretrained_cfg", {}).get("architecture") or cfg.student.name),
            ensemble=len(model) if isinstance(model, Ensemble) else 0,
            classes=list(classes), image_size=size, mean=list(mean), std=list(std),
            threshold=threshold, positive_class=classes[1] if threshold is not None else None,
            distilled_heads=is_distilled(one),
            hyperparameters={"distill": vars(cfg.distill), "imbalance": vars(cfg.imbalance),
                             "train": {k: v for k, v in vars(cfg.train).items() if k != "device"},
                             "student": vars(cfg.student), "teacher": cfg.teacher.name},
            metrics={k: v for k, v in metrics.items() if k != "cost"},  # the cost is `compression`, below
            config=cfg.to_dict(),
            files={"weights": WEIGHTS_FILE, "timm_config": TIMM_CONFIG_FILE, "metrics": "metrics.json",
                   "model_card": CARD_FILE},
            graph=graph_file, onnx=onnx_file, checks=checks,
            compression=cost if cost is not None else metrics.get("cost"),
            weights_bytes=(tmp / WEIGHTS_FILE).stat().st_size,
            started_from=started,
        )
        atomic_write_json(tmp / METADATA_FILE, meta.to_dict())
        atomic_write_json(tmp / "metrics.json", metrics)
        params = sum(p.numel() for p in model.parameters())
        (tmp / CARD_FILE).write_text(model_card(cfg, list(classes), threshold, metrics, params, started))
    return out_dir


FOREIGN_PRETRAINED_KEYS = ("tag", "license", "hf_hub_id", "hf_hub_filename", "url", "origin_url", "paper_ids",
                           "paper_name", "notes", "description")


def write_timm_config(model: nn.Module, path: Path, classes: list[str], image_size: int) -> None:
    """timm's config.json for the model, written by timm itself, with the classes and the input processing."""
    mean, std = mean_std(model)
    save_timm_config(model, path, model_config={"label_names": list(classes)},
                     data_config={"input_size": (3, image_size, image_size), "crop_pct": 1.0,
                                  "interpolation": INTERPOLATION, "mean": tuple(mean), "std": tuple(std)})
    # these weights were trained here: timm's pretrained tag, licence and source describe the weights it would have
    # downloaded for the architecture, not these
    config = json.loads(path.read_text())
    pretrained = config.get("pretrained_cfg", {})
    for key in FOREIGN_PRETRAINED_KEYS:
        pretrained.pop(key, None)
    pretrained["tag"] = "kd-search"
    path.write_text(json.dumps(config, indent=2))


class ExportInfo:
    """What every loaded form of an export shares: its kdsearch.json (`meta`) and timm's config.json beside it
    (`timm_config`, timm's own file: {} where there is none)."""
    meta: ExportMetadata
    timm_config: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @property
    def threshold(self) -> float | None:
        return self.meta.threshold

    @property
    def image_size(self) -> int:
        return self.meta.image_size

    @property
    def architecture(self) -> str:
        return _model_shape(self.meta, self.timm_config)[0]

    @property
    def num_classes(self) -> int:
        return _model_shape(self.meta, self.timm_config)[1]

    @property
    def info(self) -> Mapping[str, Any]:
        """kdsearch.json as plain data (read-only), with timm's architecture, num_classes and pretrained_cfg."""
        return MappingProxyType({**self.meta.to_dict(), "architecture": self.architecture,
                                 "num_classes": self.num_classes,
                                 "pretrained_cfg": self.timm_config.get("pretrained_cfg", {})})

    @property
    def max_image_pixels(self) -> int:
        """The decompression-bomb limit the student was trained with (its config's data.max_image_pixels)."""
        found = self.meta.config.get("data", {}).get("max_image_pixels")  # the resolved config, as plain data
        return int(found) if found else MAX_IMAGE_PIXELS

    def probs(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return predict(self.probs(images), self.threshold)


def _model_shape(meta: ExportMetadata, timm_config: dict[str, Any]) -> tuple[str, int]:
    """The timm model the weights are for and its class count: as timm's config.json says, else kdsearch.json."""
    return (str(timm_config.get("architecture") or meta.architecture),
            int(timm_config.get("num_classes") or len(meta.classes)))


@dataclass
class Student(ExportInfo):
    """An exported student loaded back: model, classes, input size, normalisation and threshold."""
    model: torch.nn.Module
    meta: ExportMetadata
    timm_config: dict[str, Any]
    device: torch.device

    def probs(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Class probabilities for uint8 N x 3 x H x W images at the model's input size."""
        return predict_probs(self.model, images, self.meta.mean, self.meta.std, self.device, batch_size)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        norm = Normalize(tuple(self.meta.mean), tuple(self.meta.std)).to(self.device)
        with torch.no_grad():
            return self.model(norm(to_float(images.to(self.device))))


def export_folder(path: str | Path) -> Path:
    """The export folder of `path`: the folder itself, or the folder of a file in it."""
    path = Path(path)
    return path.parent if path.is_file() or path.suffix in (".json", ".onnx", ".pt2", ".safetensors") else path


def read_metadata(path: str | Path) -> tuple[ExportMetadata, dict[str, Any]]:
    """An export's kdsearch.json, read through ExportMetadata, and timm's config.json beside it ({} where there is
    none). A folder of the earlier format (everything in config.json) is refused, naming it."""
    folder = export_folder(path)
    meta_path, timm_path = folder / METADATA_FILE, folder / TIMM_CONFIG_FILE
    if not meta_path.is_file():
        old = _read_json(timm_path) if timm_path.is_file() else {}
        if old.get("format") in OLD_FORMATS:
            raise UserError(f"{folder} is an export of an earlier kd-search (format {old['format']!r}); this version "
                            f"reads {EXPORT_FORMAT!r} (timm's config.json plus {METADATA_FILE}): export it again "
                            "with `kdsearch export RUN_DIR --out DIR`, or re-run `kdsearch distill`")
        raise UserError(f"{folder} is not an exported student (it needs {METADATA_FILE}, {TIMM_CONFIG_FILE} and "
                        f"{WEIGHTS_FILE})")
    raw = _read_json(meta_path)
    if raw.get("format") != EXPORT_FORMAT:  # checked before the fields: another format has other fields
        raise UserError(f"{meta_path} has format {raw.get('format')!r}, expected {EXPORT_FORMAT!r}")
    return ExportMetadata.from_dict(raw, str(meta_path)), _read_json(timm_path) if timm_path.is_file() else {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable: {e}") from None
    if not isinstance(found, dict):
        raise UserError(f"{path} is not a JSON object")
    return found


def load_student(path: str | Path, device: str | torch.device = "cpu") -> Student:
    """Load an export folder (or its config.json / kdsearch.json) written by `export_student`."""
    folder = export_folder(path)
    meta, timm_config = read_metadata(folder)
    weights = folder / WEIGHTS_FILE
    if not (folder / TIMM_CONFIG_FILE).is_file() or not weights.is_file():
        raise UserError(f"{folder} is not an exported student (it needs {METADATA_FILE}, {TIMM_CONFIG_FILE} and "
                        f"{WEIGHTS_FILE})")
    architecture, num_classes = _model_shape(meta, timm_config)
    # the hyperparameters' student section is the config's, as plain data: its drop_rate shapes the model
    student_cfg = ModelConfig(name=architecture, pretrained=False,
                              drop_rate=meta.hyperparameters["student"].get("drop_rate", 0.0))
    model = create_model(student_cfg, num_classes, meta.image_size)
    if meta.ensemble:
        model = Ensemble([model, *(create_model(student_cfg, num_classes, meta.image_size)
                                   for _ in range(meta.ensemble - 1))])
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:
        raise UserError(f"{weights} does not hold weights for {architecture}: {e}") from None
    device = torch.device(device)
    return Student(model.to(device).eval(), meta, timm_config, device)


def load_graph(path: str | Path) -> torch.nn.Module:
    """The exported `torch.export` graph as a module: float images in [0, 1] -> logits (normalisation inside)."""
    folder = export_folder(path)
    if not (folder / GRAPH_FILE).is_file():
        raise UserError(f"{folder} has no {GRAPH_FILE} (the model could not be traced, or it was not exported)")
    return torch.export.load(str(folder / GRAPH_FILE)).module()
