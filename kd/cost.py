"""What a model costs to keep and to run: the compression report of a distillation.

`measure(model, image_size, device)` gives, for one model at its input size: parameters, FLOPs and MACs
of one image (counted by torch's own `FlopCounterMode`, so every operator torch knows is counted the way
torch counts it, with no table of layers kept here), the size of its weights as a safetensors file, and
its measured inference latency and throughput on `device` at batch 1 and at a large batch. `compare`
puts a teacher's and a student's reports side by side in one line.

A measurement runs a few forward passes (a fixed number of warm-up runs, then repeats until a small time
budget is spent, the median kept): a few hundred milliseconds for the tiny test models on a CPU. It is
meant for after training, never inside the training loop.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import torch
from torch import nn

from kd.infer import resolve_device

WARMUP = 2          # untimed runs before timing each batch size (allocator, cuDNN autotuning, lazy init)
MIN_REPEATS = 3     # timed runs at least ...
MAX_REPEATS = 50    # ... and at most, for each batch size
BUDGET_S = 0.15    # seconds per model: timed runs stop once this long was spent (after MIN_REPEATS)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, image_size: int, batch: int = 1) -> int:
    """Floating-point operations of one forward pass of `batch` images, as torch's FlopCounterMode counts them
    (a multiply-add is 2 FLOPs; elementwise operations such as activations and normalisation are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = _device_of(model)
    x = torch.zeros(batch, 3, image_size, image_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def weights_bytes(model: nn.Module) -> int:
    """Size in bytes of the model's state dict as a safetensors file (what an export's model.safetensors holds)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return len(save(state))


def device_name(device: torch.device | str) -> str:
    """The device in words: the GPU's name, or the CPU's model name from /proc/cpuinfo."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_forward_many(models: list[tuple[nn.Module, int]], batch: int, device: torch.device, warmup: int = WARMUP,
                      min_repeats: int = MIN_REPEATS, max_repeats: int = MAX_REPEATS, budget_s: float = BUDGET_S
                      ) -> list[dict[str, Any]]:
    """Median seconds of one forward pass of `batch` float images (fp32) for each (model, image size), and images/s.

    The models take turns, one timed run each, so a machine that is busier for a moment (a shared CPU) slows
    them alike and their ratio holds. Timing stops once every model has `min_repeats` runs and `budget_s` per
    model has passed, or at `max_repeats`.
    """
    inputs = [torch.rand(batch, 3, size, size, device=device) for _, size in models]
    for (model, _), x in zip(models, inputs, strict=True):
        for _ in range(warmup):
            model(x)
    _sync(device)
    times: list[list[float]] = [[] for _ in models]
    start = time.perf_counter()
    while len(times[0]) < max_repeats and (len(times[0]) < min_repeats
                                           or time.perf_counter() - start < budget_s * len(models)):
        turn = list(zip(models, inputs, times, strict=True))
        for (model, _), x, runs in (turn if len(times[0]) % 2 == 0 else turn[::-1]):  # ABBA: order favours neither
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            runs.append(time.perf_counter() - t0)
    out = []
    for runs in times:
        median = statistics.median(runs)
        out.append({"batch": batch, "median_ms": median * 1000, "images_per_s": batch / median,
                    "repeats": len(runs), "warmup": warmup})
    return out


def measure(model: nn.Module, image_size: int, device: torch.device | str = "cpu", batch: int | None = None,
            **timing: Any) -> dict[str, Any]:
    """The cost report of `model` at `image_size` on `device`: size, FLOPs and measured speed.

    `batch`: the large batch timed beside batch 1 (default 64 on a CPU, 256 on a GPU). `timing` goes to
    `time_forward_many` (warmup, min_repeats, max_repeats, budget_s). The model is left on `device`, in the
    mode it was in.
    """
    return measure_many([(model, image_size)], device, batch, **timing)[0]


def measure_many(models: list[tuple[nn.Module, int]], device: torch.device | str = "cpu", batch: int | None = None,
                 **timing: Any) -> list[dict[str, Any]]:
    """`measure` for several (model, image size) pairs, timed in turns (see `time_forward_many`)."""
    device = torch.device(device)
    batch = batch or (256 if device.type == "cuda" else 64)
    models = [(model.to(device), size) for model, size in models]
    modes = [model.training for model, _ in models]
    for model, _ in models:
        model.eval()
    try:
        flops = [count_flops(model, size) for model, size in models]
        speed = [time_forward_many(models, b, device, **timing) for b in (1, batch)]
    finally:
        for (model, _), mode in zip(models, modes, strict=True):
            model.train(mode)
    reports = []
    for i, (model, size) in enumerate(models):
        one, many = speed[0][i], speed[1][i]
        reports.append({
            "parameters": count_parameters(model),
            "flops": flops[i],
            "macs": flops[i] // 2,
            "weights_bytes": weights_bytes(model),
            "input_size": [3, size, size],
            "latency_ms_batch1": one["median_ms"],
            "images_per_s_batch1": one["images_per_s"],
            "batch": batch,
            "latency_ms_batch": many["median_ms"],
            "images_per_s_batch": many["images_per_s"],
            "timing": {"warmup": one["warmup"], "repeats": [one["repeats"], many["repeats"]], "statistic": "median",
                       "dtype": "float32", "what": "model forward on normalised float input, no gradients",
                       "alongside": len(models)},
            "device": device.type if device.index is None else f"{device.type}:{device.index}",
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__.split("+")[0],
        })
    return reports


def _params(n: int) -> str:
    """0.4M, 25.6M, 1.2B, 9.3K."""
    for unit, div, least in (("B", 1e9, 1e9), ("M", 1e6, 1e5), ("K", 1e3, 1e3)):
        if n >= least:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _times(ratio: float, more: str, less: str, same: str) -> str:
    """"12x smaller", "1.5x larger", or `same` within 5%."""
    if 1 / 1.05 < ratio < 1.05:
        return same
    word, r = (more, ratio) if ratio > 1 else (less, 1 / ratio)
    return f"{r:.1f}x {word}" if r < 10 else f"{r:.0f}x {word}"


def compare(teacher: dict[str, Any], student: dict[str, Any], teacher_metric: float | None = None,
            student_metric: float | None = None, metric_name: str = "balanced accuracy") -> dict[str, Any]:
    """Ratios of a teacher's and a student's reports, and the line that says them, e.g. "student 0.4M params,
    12x smaller, 7.0x faster than the teacher on this CPU (batch 64), balanced accuracy 0.95 against the
    teacher's 0.96".

    Speed is throughput at the large batch when both were measured at the same one, else at batch 1.
    """
    same_batch = teacher.get("batch") == student.get("batch")
    key = "images_per_s_batch" if same_batch else "images_per_s_batch1"
    out: dict[str, Any] = {
        "smaller": teacher["parameters"] / max(student["parameters"], 1),
        "fewer_flops": teacher["flops"] / max(student["flops"], 1),
        "faster": student[key] / teacher[key],
        "faster_batch1": student["images_per_s_batch1"] / teacher["images_per_s_batch1"],
        "speed_compared_at_batch": student["batch"] if same_batch else 1,
    }
    if student.get("device_name") != teacher.get("device_name"):
        where = "their own devices"
    else:
        where = "this GPU" if str(student.get("device", "")).startswith("cuda") else "this CPU"
    size = _times(out["smaller"], "smaller", "larger", "the same size")
    speed = _times(out["faster"], "faster than", "slower than", "as fast as")
    line = (f"student {_params(student['parameters'])} params, {size}, {speed} the teacher on {where} "
            f"(batch {out['speed_compared_at_batch']})")
    if teacher_metric is not None and student_metric is not None:
        line += f", {metric_name} {student_metric:.2f} against the teacher's {teacher_metric:.2f}"
        out.update(student_metric=student_metric, teacher_metric=teacher_metric, metric=metric_name)
    out["summary"] = line
    return out


def compression_report(teacher_model: nn.Module | None, student_model: nn.Module, image_size: int,
                       device: torch.device | str = "cpu", teacher_metric: float | None = None,
                       student_metric: float | None = None, metric_name: str = "validation balanced accuracy",
                       teacher_image_size: int | None = None, **timing: Any) -> dict[str, Any]:
    """`measure` for the student (and the teacher when given) and their comparison, as one JSON-ready dict."""
    if teacher_model is None:
        student = measure(student_model, image_size, device, **timing)
        return {"student": student,
                "summary": (f"student {_params(student['parameters'])} params, {student['flops'] / 1e6:.1f} MFLOPs, "
                            f"{student['images_per_s_batch']:.0f} images/s at batch {student['batch']} on "
                            f"{student['device_name']}")}
    # timed in turns, so that a busy moment on a shared machine favours neither
    student, teacher = measure_many([(student_model, image_size), (teacher_model, teacher_image_size or image_size)],
                                    device, **timing)
    comparison = compare(teacher, student, teacher_metric, student_metric, metric_name)
    return {"student": student, "teacher": teacher, "comparison": comparison, "summary": comparison["summary"]}


def distill_report(cfg: Any, student_model: nn.Module, teacher_model: nn.Module | None,
                   teacher_metrics: dict[str, Any] | None, student_metrics: dict[str, Any] | None,
                   metric_name: str = "validation balanced accuracy") -> dict[str, Any]:
    """The compression report of a finished distillation, on its training device (`cfg.train.device`),
    comparing the two balanced accuracies given (`metric_name` says which). Run after training, never inside it."""
    metric = "balanced_accuracy"
    return compression_report(teacher_model, student_model, cfg.data.image_size, resolve_device(cfg.train.device),
                              (teacher_metrics or {}).get(metric), (student_metrics or {}).get(metric), metric_name)
