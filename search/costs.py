"""What each searched student costs, measured once before any trial and kept across searches.

kd.cost measures a student: parameters, FLOPs (torch's flop counter), median latency at batch 1 and throughput at a
large batch, after warm-up, the students timed in turns. Here that happens once per architecture, class count,
input size, device and thread count, in one Ray task holding a trial's resources (so on the kind of device and with
the threads a trial has), before the teachers take the slots; the figures are kept in `<data.cache_dir>/costs.json`
and reused by later searches. Where the trials run on this machine's CPU, this process is such a device: it reads
the cache and measures right here, with a trial's threads, and starts no task (a Ray worker that imports torch and
timm for it cost a search 5 to 11 s on 2 cores, most of that where it only read a cached file). Every trial of a
student reports the same figures, so identical students cost the same and a front over cost is a front over
architectures, not over timing noise (a per-trial measurement on a busy CPU read 1.36 ms and 2.65 ms for one
student in one search).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch

from kd.cost import count_flops, device_name, measure_many
from kd.files import atomic_write_json, file_lock, read_json
from kd.hub import source_fingerprint, source_of
from kd.infer import resolve_device
from kd.student import student_shell
from search.cluster import call, trial_resources, trials_run_here
from search.config import Config

log = logging.getLogger("search")
FORMAT = 1
COSTS_FILE = "costs.json"

# student name -> student_params, student_mflops, student_latency_ms, student_images_per_s (or its error)
Costs = dict[str, dict[str, Any]]


def student_costs(cfg: Config, names: list[str], classes: int, image_size: int) -> Costs:
    """Each of `names`' cost on a trial's device, from the cache where it was measured before (same
    architecture, classes, input size, device and threads, same torch), else measured now and kept."""
    path = Path(cfg.data.cache_dir) / COSTS_FILE
    known = _read(path)
    resources, here = trial_resources(cfg), trials_run_here()
    if here:  # the trials' device and threads are known here: the cache may answer without a task
        device = device_name(resolve_device(cfg.train.device))
        keys = [_key(name, classes, image_size, device, resources.threads) for name in names]
        if all(k in known for k in keys):
            return {name: known[k] for name, k in zip(names, keys, strict=True)}
    costs, new = call(_measure, resources, cfg, names, classes, image_size, known, here=here)
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path):  # another search may be adding its own
            atomic_write_json(path, {"format": FORMAT, "costs": {**_read(path), **new}})
    return costs


def _read(path: Path) -> dict[str, dict[str, float]]:
    record = read_json(path)
    if record is None or record.get("format") != FORMAT or not isinstance(record.get("costs"), dict):
        if path.exists():
            log.warning("%s is not a cost cache this version reads: the students are measured again", path)
        return {}
    return record["costs"]


def _key(name: str, classes: int, image_size: int, device: str, threads: int) -> str:
    if source_of(name):  # hf-hub:, local-dir: by the architecture they hold (a cost is the same for any weights)
        name = f"{name} ({source_fingerprint(name, 'student', weights=False)[:16]})"
    return (f"{name} | {classes} classes | {image_size} px | {device} | {threads} threads | torch {torch.__version__} "
            f"| timm {timm.__version__}")


def _measure(cfg: Config, names: list[str], classes: int, image_size: int,
             known: dict[str, dict[str, float]]) -> tuple[Costs, dict[str, dict[str, float]]]:
    """In the task: the costs of `names` on this device (`known` where cached) and the entries measured now. A
    student that cannot run at this input size gets its error instead (its trials fail with it; nothing is kept)."""
    device = resolve_device(cfg.train.device)
    keys = {name: _key(name, classes, image_size, device_name(device), torch.get_num_threads()) for name in names}
    costs: Costs = {name: known[keys[name]] for name in names if keys[name] in known}
    shells = []
    for name in [n for n in names if n not in costs]:
        try:
            shell = student_shell(cfg.updated({"student.name": name}, source="search.space['student.name']"),
                                  classes, image_size)
            count_flops(shell.to(device).eval(), image_size)  # one forward pass
        except Exception as e:  # a model too deep for the images: its trials say so
            costs[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        shells.append((name, shell))
    new: dict[str, dict[str, float]] = {}
    try:  # timed in turns, so a busy moment favours none of them
        measured = measure_many([(m, image_size) for _, m in shells], device) if shells else []
        reports = list(zip(shells, measured, strict=True))
    except Exception:  # one fails at the large batch (out of memory): each alone, its error kept for its trials
        reports = []
        for name, shell in shells:
            try:
                reports.append(((name, shell), measure_many([(shell, image_size)], device)[0]))
            except Exception as e:
                costs[name] = {"error": f"{type(e).__name__}: {e}"}
    for (name, _), report in reports:
        new[keys[name]] = costs[name] = {
            "student_params": report["parameters"], "student_mflops": report["flops"] / 1e6,
            "student_latency_ms": report["latency_ms_batch1"], "student_images_per_s": report["images_per_s_batch"]}
    return {name: costs[name] for name in names}, new


def described(costs: Costs) -> str:
    """One line: each student's latency and size, as the console says it."""
    return "; ".join(f"{name} {c['student_latency_ms']:.2f} ms, {c['student_params'] / 1e6:.2f}M params"
                     if "error" not in c else f"{name} cannot run ({c['error'][:80]})" for name, c in costs.items())
