"""The deployable graphs of an export: `model.pt2` (torch.export) and `model.onnx` (checked with onnxruntime).

Each holds the student with its input normalisation inside (`Preprocessed`), takes float32 RGB images in [0, 1] with
any batch size and returns logits; each is compared with the PyTorch model's logits right after it is written and
dropped, with a warning, where they differ by more than `TOLERANCE` (kd.export writes them, and lists what it kept).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd.augment import Normalize

log = logging.getLogger("kd")
TOLERANCE = 1e-4  # largest |logit difference| accepted between a graph and the PyTorch model


class Preprocessed(nn.Module):
    """A model with its input normalisation inside: float images in [0, 1] -> logits (what the graphs hold)."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))


def _max_diff(got: Any, expected: torch.Tensor) -> float:
    got = torch.as_tensor(np.asarray(got) if not torch.is_tensor(got) else got).float()
    if got.shape != expected.shape:
        return float("inf")
    return float((got - expected).abs().max())


def _checked(path: Path, what: str, diff: float) -> tuple[str | None, float | None]:
    if diff <= TOLERANCE:
        return path.name, diff
    path.unlink(missing_ok=True)
    log.warning("the %s differs from the PyTorch model by up to %.3g in its logits (more than %g): not exported",
                what, diff, TOLERANCE)
    return None, diff if np.isfinite(diff) else None


def export_graph(deploy: nn.Module, size: int, path: Path, check: torch.Tensor,
                 expected: torch.Tensor) -> tuple[str | None, float | None]:
    """`torch.export` graph with a dynamic batch dimension, normalisation included; a model torch.export
    cannot trace is skipped (the safetensors weights are the export)."""
    example = torch.rand(2, 3, size, size)
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(deploy, (example,), dynamic_shapes=({0: batch},))
        with warnings.catch_warnings():
            # torch's archive writer notes weights sharing storage in odd layouts; the graph is read back and its
            # logits checked against the model below, which decides
            warnings.filterwarnings("ignore", message="No complete tensor found")
            torch.export.save(program, str(path))
        with torch.no_grad():
            got = torch.export.load(str(path)).module()(check)
    except Exception as e:
        path.unlink(missing_ok=True)
        log.warning("could not export a torch.export graph (%s: %s); weights are exported", type(e).__name__, e)
        return None, None
    return _checked(path, "torch.export graph", _max_diff(got, expected))


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx.export's exporter)
    except ImportError:
        return False
    return True


def export_onnx(deploy: nn.Module, size: int, path: Path, check: torch.Tensor,
                expected: torch.Tensor) -> tuple[str | None, float | None]:
    """ONNX graph (input `images`, output `logits`, dynamic batch), checked with onnxruntime. torch's TorchScript
    exporter first: it writes a small model's graph in well under a second, where the torch.export-based one takes
    5 to 10 s (it decomposes the whole program again); that one where the first cannot trace the model or its graph
    does not match the model."""
    if not onnx_available():
        log.info("model.onnx not written: install the onnx extra (pip install 'kd-search[onnx]') for it")
        return None, None
    import onnxruntime as ort

    example = torch.rand(2, 3, size, size)
    failure = ""
    for dynamo in (False, True):
        try:
            _write_onnx(deploy, example, path, dynamo)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = session.run(["logits"], {"images": check.numpy()})[0]
        except Exception as e:
            failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        if _max_diff(got, expected) <= TOLERANCE or dynamo:
            return _checked(path, "ONNX graph", _max_diff(got, expected))
        failure = f"its logits differ by {_max_diff(got, expected):.3g}"
    path.unlink(missing_ok=True)
    for extra in path.parent.glob(path.name + ".*"):  # external data, if the exporter wrote any
        extra.unlink(missing_ok=True)
    log.warning("could not export an ONNX graph (%s); weights are exported", failure)
    return None, None


def _write_onnx(deploy: nn.Module, example: torch.Tensor, path: Path, dynamo: bool) -> None:
    """One of torch's two ONNX exporters, with a dynamic batch and no external data."""
    path.unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes: the check decides
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(deploy, (example,), str(path), input_names=["images"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
        else:
            torch.onnx.export(deploy, (example,), str(path), input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18,
                              dynamo=False)
