"""kd-search speed benchmark: a reference-style loop against a kd-search trial and a whole search.

    python bench/bench.py --profile cpu    # this 2-core machine: digits at 32 px, resnet18 -> test_resnet
    python bench/bench.py --profile gpu    # one GPU: ~3000 images at 224 px, DeiT-Small -> ResNet-50
    python bench/bench.py --profile demo --cases demo  # `kdsearch demo` against one reference-style distillation

Every case runs in its own process (peak memory is that process tree's, Ray's workers included) on the
same files, models, image size and epochs, and the table gives each one's ratio against the reference:
the reference-style loop, written below as the reference projects wrote it (a DataLoader over image files with PIL
transforms, the teacher run forward on every batch, fp32). Figures come from one run of the script:
these machines are shared, so only ratios measured together mean much.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import PROFILES, Profile, config, gpu_peak, make_files  # noqa: E402
from bench.reference import seed_style  # noqa: E402

# a row of the table: its case, its figures, and what its speed-up is against (0: the 1-run reference-style loop,
# 3: the reference-style runs of a search, "pack": one trial at a time; None and "reference": the references)
Row = tuple[str, dict[str, Any], Literal[0, 3, "reference", "pack"] | None]


# ------------------------------------------------------------------------------------ kd-search cases

def kd_trial(p: Profile, work: Path, epochs: int, **sets: Any) -> dict[str, Any]:
    import torch

    from kd.data import load_dataset
    from kd.student import train_student
    from kd.teacher import TeacherWork, prepare_teacher

    t0 = time.perf_counter()
    cfg = config(p, work, **{"train.epochs": epochs, **sets})
    data = load_dataset(cfg.data, progress=False)
    teacher = prepare_teacher(cfg, data, progress=False)  # cached: the trial itself never runs the teacher
    logits, setup = teacher.logits, time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with TeacherWork().counting() as teacher_work:  # the trial's own teacher forward passes (none: cached logits)
        result = train_student(cfg, data, logits, progress=False)
    seconds = time.perf_counter() - t0
    images = sum(len(data.train) - (len(data.train) % cfg.train.batch_size == 1) for _ in result.history)
    return {"seconds": seconds, "images": images, "teacher_forwards": teacher_work.images,
            "val_balanced_accuracy": result.history[-1]["val_balanced_accuracy"], "gpu_peak_gb": gpu_peak(),
            "setup_seconds": setup, "teacher_finetune_seconds": teacher.info.finetune_seconds}


def kd_search(p: Profile, work: Path, trials: int, **sets: Any) -> dict[str, Any]:
    import pandas as pd

    from kd.data import load_dataset
    from kd.teacher import _augment_key, teacher_key
    from search.driver import run_search
    from search.run import Run

    name = f"search-{trials}-" + "-".join(f"{k}{v}" for k, v in sorted(sets.items())).replace(".", "")
    cfg = config(p, work, **{"name": name, "search.num_samples": trials, **sets})
    shutil.rmtree(work / "results" / name, ignore_errors=True)  # every search starts afresh,
    data = load_dataset(cfg.data, progress=False)                # and pays for its teacher logits
    (Path(cfg.data.cache_dir) / "teacher" / teacher_key(cfg, data) / f"logits-{_augment_key(cfg)}.safetensors").unlink(
        missing_ok=True)
    t0 = time.perf_counter()
    run_dir = run_search(cfg, quiet=True, echo=lambda s: None)
    seconds = time.perf_counter() - t0
    table = pd.read_csv(run_dir / "trials.csv")
    teacher = json.loads((run_dir / "teacher.json").read_text())
    n_train = json.loads((run_dir / "run.json").read_text())["data"]
    epochs = int(table["epochs"].sum())
    images = epochs * _train_size(n_train)
    spans = _trial_span(run_dir / "ray")
    run = Run(run_dir)
    use = run.slot_use()
    return {"seconds": seconds, "images": images, "epochs": epochs,
            "phases": run.record.phases if run.record else {}, "slots_busy": use.busy if use else None,
            "median_idle_s": use.median_idle if use else None,
            "teacher_forwards": teacher["info"]["forward_images"],
            "val_balanced_accuracy": float(table["val_balanced_accuracy"].max()), "trial_phase_seconds": spans,
            "gpu_peak_gb": None}


def kd_distill(p: Profile, work: Path, epochs: int, **sets: Any) -> dict[str, Any]:
    """The whole `kdsearch distill` command with the teacher cached, from its start to its exit, in a process of its
    own: what a user waits for (imports, decoding from the cache, training, the test evaluation, the compression
    report, the export with its graphs)."""
    from kd.config import save_config
    from kd.data import load_dataset
    from kd.distill import DistillMetrics

    cfg = config(p, work, **{"train.epochs": epochs, "name": "distill", **sets})
    path = work / "distill.yaml"
    save_config(cfg, path)
    n_train = len(load_dataset(cfg.data, progress=False).train)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "search.cli", "distill", str(path), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"kdsearch distill failed: {done.stderr[-2000:]}")
    metrics = DistillMetrics.read(Path(cfg.output_dir) / "distill" / "distill" / DistillMetrics.FILE)
    if metrics is None:
        raise SystemExit("kdsearch distill wrote no metrics.json")
    return {"seconds": seconds, "images": epochs * n_train, "teacher_forwards": 0, "gpu_peak_gb": None,
            "val_balanced_accuracy": metrics.val["balanced_accuracy"], "phases": metrics.phases}


def kd_demo(p: Profile, work: Path) -> dict[str, Any]:
    """`kdsearch demo`, the whole search a new user runs first, from an empty folder (nothing cached), in a process of
    its own, from its start to its exit."""
    from search.run import Run
    folder = work / "demo"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "search.cli", "demo", "--quiet"], cwd=folder, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"kdsearch demo failed: {done.stderr[-2000:]}")
    run = Run(folder / "results" / "digits")
    best = json.loads((run.directory / "best" / "metrics.json").read_text())
    return {"seconds": seconds, "phases": run.record.phases if run.record else {},
            "test_balanced_accuracy": best["test"]["balanced_accuracy"]}


def demo_against_reference(args: argparse.Namespace, p: Profile) -> None:
    """The demo's whole search against one distillation as the reference projects ran it (its teacher fine-tuned
    first), on the same digits (8 against the rest), teacher, student and image size: the ratio of their wall times,
    in one run (bar: 1.0)."""
    reference = run_case(args, "seed", epochs=p["epochs"], teacher_epochs=p["teacher_epochs"])
    demo = run_case(args, "demo")
    print(f"\nkd-search demo against one reference-style distillation: digits at {p['size']} px, teacher "
          f"{p['teacher']}, student {p['student']}")
    print(f"  one distillation, teacher {p['teacher_epochs']} epochs + student {p['epochs']} epochs (PIL DataLoader, "
          f"the teacher on every batch): {reference['seconds']:.1f} s, validation balanced accuracy "
          f"{reference['val_balanced_accuracy']:.3f}, peak RSS {reference['peak_rss_gb']:.2f} GB")
    print(f"  kdsearch demo, the whole search from an empty cache: {demo['seconds']:.1f} s, test balanced accuracy "
          f"{demo['test_balanced_accuracy']:.3f}, peak RSS {demo['peak_rss_gb']:.2f} GB")
    print("    its phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in demo["phases"].items()))
    print(f"  ratio (demo / one distillation): {demo['seconds'] / reference['seconds']:.2f}")
    if args.out:
        args.out.write_text(json.dumps({"profile": args.profile, "reference": reference, "demo": demo}, indent=2))


def _train_size(describe: str) -> int:
    return int(describe.split("train ")[1].split(" ")[0])


def _trial_span(exp: Path) -> float:
    """Seconds from the first trial's start to the last trial's end, from Ray's own result files."""
    starts, ends = [], []
    for f in exp.glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            starts.append(rows[0]["timestamp"] - rows[0]["time_this_iter_s"])
            ends.append(rows[-1]["timestamp"])
    return max(ends) - min(starts) if starts else float("nan")


# ----------------------------------------------------------------------------------- the harness

def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            rss[int(entry)] = int(Path(f"/proc/{entry}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def run_case(args: argparse.Namespace, case: str, **kwargs: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--profile", args.profile, "--work", str(args.work), "--case", case,
           "--kwargs", json.dumps(kwargs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"case {case} {kwargs} failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gb"] = peak[0] / 2**30
    print(f"  {case} {kwargs}: {result['seconds']:.1f} s", file=sys.stderr, flush=True)
    return result


def child(args: argparse.Namespace) -> None:
    p, work, kwargs = PROFILES[args.profile], args.work, json.loads(args.kwargs)
    cases: dict[str, Callable[..., dict[str, Any]]] = {"seed": seed_style, "trial": kd_trial, "search": kd_search,
                                                        "distill": kd_distill, "demo": kd_demo}
    fn = cases[args.case]
    print(json.dumps(fn(p, work, **kwargs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--cases", default="all", help="comma list of: trial (reference-style loop and trials), "
                        "search, pack, demo (`kdsearch demo` against one reference-style distillation, alone); default "
                        "all but demo (a long GPU benchmark can be split across calls)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a case, in its own process: --work is already the profile's folder
        return child(args)
    args.work = args.work.absolute() / args.profile
    p = PROFILES[args.profile]
    make_files(args.work / "images", p["size"], p["images"])
    if args.cases == "demo":
        return demo_against_reference(args, p)
    ep, trial_ep = p["epochs"], p.get("trial_epochs", p["epochs"])
    cases = {"trial", "search", "pack"} if args.cases == "all" else set(args.cases.split(","))
    print(f"preparing data and teacher ({p['teacher']}, {p['teacher_epochs']} epochs) ...", file=sys.stderr)
    t0 = time.perf_counter()
    prep = run_case(args, "trial", epochs=1)  # decodes once and fine-tunes the teacher: paid once, cached
    saved = args.work / "seed-run.json"
    if "trial" in cases or not saved.exists():
        rows: list[Row] = [("reference-style loop, 1 run", run_case(args, "seed", epochs=trial_ep), None)]
        saved.write_text(json.dumps(rows[0][1]))
    else:  # measured by an earlier call of this script on this machine
        rows = [("reference-style loop, 1 run (earlier call)", json.loads(saved.read_text()), None)]
    if "trial" in cases:
        rows.append(("kd-search trial (teacher cached)", run_case(args, "trial", epochs=trial_ep), 0))
        rows.append(("kdsearch distill, the whole command (teacher cached)", run_case(args, "distill",
                                                                                     epochs=trial_ep), 0))
        rows.append(("kd-search trial, data.pipeline=stream", run_case(args, "trial", epochs=trial_ep,
                                                                        **{"data.pipeline": "stream"}), 0))
        if p["compile"]:
            rows.append(("kd-search trial, torch.compile", run_case(args, "trial", epochs=trial_ep,
                                                                   **{"train.compile": True}), 0))
    seed_run = rows[0][1]
    k = p["trials"]
    per_epoch = seed_run["seconds"] / trial_ep
    reference = {"seconds": per_epoch * ep * k, "images": seed_run["images"] / trial_ep * ep * k,
                 "teacher_forwards": seed_run["teacher_forwards"] / trial_ep * ep * k, "peak_rss_gb": None,
                 "gpu_peak_gb": seed_run["gpu_peak_gb"], "val_balanced_accuracy": None}
    rows.append((f"reference-style loop, {k} runs x {ep} epochs (from the 1 run)", reference, "reference"))
    # each search gets its own augmentation stream, so it computes (and counts) the teacher's logits itself
    if "search" in cases:
        rows.append((f"kd-search search, {k} trials (ASHA)", run_case(args, "search", trials=k,
                                                                      **{"augment.seed": 1}), 3))
        if args.profile == "cpu":  # on a GPU this is minutes of device time; ASHA's search is the target there
            rows.append((f"kd-search search, {k} trials, no early stopping", run_case(
                args, "search", trials=k, **{"search.scheduler": "none", "augment.seed": 2}), 3))
            rows.append(("kd-search search, 1 trial", run_case(args, "search", trials=1, **{"augment.seed": 3}), 3))
    if p["pack"] and "pack" in cases:
        n, pack_ep = p["pack"], trial_ep
        one = run_case(args, "search", trials=n, **{"search.scheduler": "none", "search.gpus_per_trial": 1.0,
                                                      "train.epochs": pack_ep})
        packed = run_case(args, "search", trials=n, **{"search.scheduler": "none", "search.gpus_per_trial": 1.0 / n,
                                                         "train.epochs": pack_ep})
        for r in (one, packed):
            r["aggregate"] = r["images"] / r["trial_phase_seconds"]
        rows.append((f"{n} trials one at a time (gpus_per_trial 1)", one, "pack"))
        rows.append((f"{n} trials packed (gpus_per_trial {1 / n:g})", packed, "pack"))
    report(args, p, rows, prep, time.perf_counter() - t0)


def report(args: argparse.Namespace, p: Profile, rows: list[Row], prep: dict[str, Any], total: float) -> None:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"\nkd-search benchmark, profile {args.profile}: {p['images']} images at {p['size']} px, teacher "
          f"{p['teacher']}, student {p['student']}, batch {p['batch']}; {device}; torch {torch.__version__}; "
          f"{platform.node()}")
    print(f"paid once per dataset and teacher, then cached (excluded below from both sides): the teacher's "
          f"fine-tuning ({p['teacher_epochs']} epochs) took {prep['teacher_finetune_seconds']:.1f} s\n")
    header = (f"{'case':<58} {'wall s':>8} {'img/s':>9} {'peak RSS':>9} {'peak GPU':>9} {'teacher fwd':>12} "
              f"{'bal.acc':>8} {'speed-up':>9}")
    print(header)
    print("-" * len(header))
    seed_run = rows[0][1]
    reference = next(r for _, r, kind in rows if kind == "reference")
    pack_one = next((r for _, r, kind in rows if kind == "pack"), None)
    for name, r, kind in rows:
        ips = r.get("aggregate") or r["images"] / r["seconds"]
        if kind == 0:
            ratio = f"{seed_run['seconds'] / r['seconds']:.1f}x"
        elif kind == 3:
            ratio = f"{reference['seconds'] / r['seconds']:.1f}x" if "search, 1 trial" not in name else ""
        elif kind == "pack":
            assert pack_one is not None  # found among the rows: this one is a "pack" row
            ratio = f"{ips / (pack_one['aggregate']):.2f}x"
        else:
            ratio = "1.0x"
        rss = f"{r['peak_rss_gb']:.2f} GB" if r.get("peak_rss_gb") else ""
        gpu = f"{r['gpu_peak_gb']:.1f} GB" if r.get("gpu_peak_gb") else ""
        acc = f"{r['val_balanced_accuracy']:.3f}" if r.get("val_balanced_accuracy") is not None else ""
        print(f"{name:<58} {r['seconds']:>8.1f} {ips:>9.0f} {rss:>9} {gpu:>9} {int(r['teacher_forwards']):>12} "
              f"{acc:>8} {ratio:>9}")
    print("\nwhere the time went:")
    for name, r, _ in rows:
        if r.get("phases"):
            busy = f"; slots {r['slots_busy']:.0%} busy" if r.get("slots_busy") is not None else ""
            idle = f", {r['median_idle_s']:.1f} s median wait between trials" if r.get("median_idle_s") else ""
            print(f"  {name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items()) + busy + idle)
    print(f"\ntrial speed-ups are against the 1-run reference-style loop ({rows[0][1]['seconds']:.1f} s for "
          f"{p.get('trial_epochs', p['epochs'])} epochs); search speed-ups against {p['trials']} reference-style "
          "runs of "
          f"{p['epochs']} epochs; packing: aggregate student images/s against one trial at a time. "
          f"Total {total:.0f} s.")
    if args.out:
        args.out.write_text(json.dumps({"profile": args.profile, "device": device, "rows": [
            {"case": n, **{k: v for k, v in r.items()}} for n, r, _ in rows]}, indent=2))


if __name__ == "__main__":
    main()
