"""kd-search speed benchmark: a reference-style loop against a kd-search trial and a whole search.

    python bench/bench.py --profile cpu    # this 2-core machine: digits at 32 px, resnet18 -> test_resnet
    python bench/bench.py --profile gpu    # one GPU: ~3000 images at 224 px, DeiT-Small -> ResNet-50

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
from typing import TYPE_CHECKING, Any, Literal, TypedDict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from kd.config import Config


class _Profile(TypedDict):
    size: int
    images: int
    teacher: str
    student: str
    batch: int
    epochs: int
    trials: int
    teacher_epochs: int
    teacher_lr: float
    lr: float
    workers: int
    compile: bool
    pack: int


class Profile(_Profile, total=False):
    trial_epochs: int  # the epochs of the single runs (the reference-style loop, a trial); default `epochs`


PROFILES: dict[str, Profile] = {
    "cpu": Profile(size=32, images=1797, teacher="resnet18", student="test_resnet", batch=64, epochs=20, trials=8,
                   teacher_epochs=10, teacher_lr=0.002, lr=0.05, workers=2, compile=False, pack=0),
    "smoke": Profile(size=32, images=400, teacher="test_resnet", student="test_resnet", batch=64, epochs=3, trials=2,
                     teacher_epochs=1, teacher_lr=0.003, lr=0.05, workers=2, compile=False, pack=2, trial_epochs=2),
    "gpu": Profile(size=224, images=3000, teacher="deit_small_distilled_patch16_224", student="resnet50", batch=128,
                   epochs=20, trials=16, teacher_epochs=3, teacher_lr=0.0005, lr=0.05, workers=12, compile=True,
                   pack=4, trial_epochs=3),
}
# a row of the table: its case, its figures, and what its speed-up is against (0: the 1-run reference-style loop,
# 3: the reference-style runs of a search, "pack": one trial at a time; None and "reference": the references)
Row = tuple[str, dict[str, Any], Literal[0, 3, "reference", "pack"] | None]


# ------------------------------------------------------------------------------------------------ data

def make_files(root: Path, size: int, count: int) -> Path:
    """Real images as files: scikit-learn's digit scans (8 vs the rest), topped up with crops of its two photos."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    marker = root / f".done-{size}-{count}"
    if marker.exists():
        return root
    digits = load_digits()
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    fmt = "png" if size <= 64 else "jpg"
    for i in range(count):
        if i < len(digits.images):
            cls = "digit_8" if digits.target[i] == 8 else "other"
            img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).convert("RGB")
        else:  # a random crop of a photo, so a few thousand images exist at 224 px
            cls = "other"
            photo = photos[i % 2]
            s = int(rng.integers(96, 400))
            y, x = int(rng.integers(0, photo.shape[0] - s)), int(rng.integers(0, photo.shape[1] - s))
            img = Image.fromarray(photo[y:y + s, x:x + s])
        (root / cls).mkdir(parents=True, exist_ok=True)
        img.resize((size, size), Image.Resampling.BILINEAR).save(root / cls / f"{i:05d}.{fmt}", quality=90)
    marker.touch()
    return root


def config(p: Profile, work: Path, **sets: Any) -> Config:
    from kd.config import load_config
    base = [f"name=bench-{p['size']}", f"output_dir={work / 'results'}", "data.source=folder",
            f"data.train={work / 'images'}", f"data.image_size={p['size']}", f"data.cache_dir={work / 'cache'}",
            f"data.workers={p['workers']}", f"teacher.name={p['teacher']}", "teacher.pretrained=false",
            f"teacher.train.epochs={p['teacher_epochs']}", "teacher.train.optimizer=adamw",
            f"teacher.train.lr={p['teacher_lr']}", f"teacher.train.batch_size={p['batch']}",
            f"student.name={p['student']}", f"train.epochs={p['epochs']}", f"train.batch_size={p['batch']}",
            f"train.lr={p['lr']}", "train.schedule=step", "search.confirm_seeds=0", "search.folds=1",
            f"search.num_samples={p['trials']}", "data.allow_leakage=true"]
    return load_config(None, base + [f"{k}={v}" for k, v in sets.items()])


# ------------------------------------------------------------------------------------ the reference

def seed_style(p: Profile, work: Path, epochs: int) -> dict[str, Any]:
    """The reference projects' loop: PIL decoding and transforms in DataLoader workers every epoch, teacher forward on
    every batch, fp32, soft KD (T=5, alpha 0.5), SGD with StepLR. The teacher is the one kd-search cached."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from sklearn.metrics import balanced_accuracy_score
    from torchvision import transforms as T

    from kd.data import load_dataset
    from kd.models import create_model, mean_std
    from kd.teacher import load_teacher_model, prepare_teacher

    cfg = config(p, work)
    data = load_dataset(cfg.data, progress=False)
    teacher_dir = prepare_teacher(cfg, data, epochs=1, progress=False).directory
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, _ = load_teacher_model(cfg, data, teacher_dir)
    teacher = teacher.to(device).eval()
    t_mean, t_std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in mean_std(teacher))
    torch.manual_seed(0)
    student = create_model(cfg.student, len(data.classes), p["size"]).to(device)
    mean, std = mean_std(student)
    s_mean, s_std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))
    size = p["size"]
    train_tf = T.Compose([T.RandomResizedCrop(size, scale=(0.6, 1.0)), T.RandomHorizontalFlip(), T.RandomRotation(15),
                          T.ColorJitter(0.2, 0.2, 0.2, 0.02), T.ToTensor(), T.Normalize(mean, std)])
    val_tf = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(mean, std)])

    class Files(torch.utils.data.Dataset):
        def __init__(self, split, tf):
            self.paths, self.labels, self.tf = split.paths, split.labels.tolist(), tf

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            return self.tf(Image.open(self.paths[i]).convert("RGB")), self.labels[i]

    batch, workers, pin = p["batch"], p["workers"], device.type == "cuda"
    train = torch.utils.data.DataLoader(Files(data.train, train_tf), shuffle=True, drop_last=True, batch_size=batch,
                                        num_workers=workers, pin_memory=pin)
    val = torch.utils.data.DataLoader(Files(data.val, val_tf), batch_size=batch, num_workers=workers, pin_memory=pin)
    opt = torch.optim.SGD(student.parameters(), lr=p["lr"], momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    temperature, alpha, seen, forwards = 5.0, 0.5, 0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(epochs):
        student.train()
        for x, y in train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad():  # the teacher gets its own normalisation, or it would teach badly
                t_logits = teacher((x * s_std + s_mean - t_mean) / t_std)
            forwards += len(x)
            s_logits = student(x)
            kd = F.kl_div(F.log_softmax(s_logits / temperature, 1), F.softmax(t_logits / temperature, 1),
                          reduction="batchmean") * temperature ** 2
            loss = alpha * kd + (1 - alpha) * F.cross_entropy(s_logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(x)
        sched.step()
        student.eval()
        preds, labels = [], []
        with torch.no_grad():
            for x, y in val:
                preds.append(student(x.to(device)).argmax(1).cpu())
                labels.append(y)
        bacc = balanced_accuracy_score(torch.cat(labels).numpy(), torch.cat(preds).numpy())
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images": seen, "teacher_forwards": forwards, "val_balanced_accuracy": float(bacc),
            "gpu_peak_gb": _gpu_peak()}


# ------------------------------------------------------------------------------------ kd-search cases

def kd_trial(p: Profile, work: Path, epochs: int, **sets: Any) -> dict[str, Any]:
    import torch

    from kd import teacher as kteacher
    from kd.data import load_dataset
    from kd.student import train_student
    from kd.teacher import prepare_teacher

    t0 = time.perf_counter()
    cfg = config(p, work, **{"train.epochs": epochs, **sets})
    data = load_dataset(cfg.data, progress=False)
    teacher = prepare_teacher(cfg, data, progress=False)  # cached: the trial itself never runs the teacher
    logits, setup = teacher.logits, time.perf_counter() - t0
    before = kteacher.forwarded_images()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train_student(cfg, data, logits, progress=False)
    seconds = time.perf_counter() - t0
    images = sum(len(data.train) - (len(data.train) % cfg.train.batch_size == 1) for _ in result.history)
    return {"seconds": seconds, "images": images, "teacher_forwards": kteacher.forwarded_images() - before,
            "val_balanced_accuracy": result.history[-1]["val_balanced_accuracy"], "gpu_peak_gb": _gpu_peak(),
            "setup_seconds": setup, "teacher_finetune_seconds": teacher.info.finetune_seconds}


def kd_search(p: Profile, work: Path, trials: int, **sets: Any) -> dict[str, Any]:
    import pandas as pd

    from kd.data import load_dataset
    from kd.teacher import _augment_key, teacher_key
    from search.driver import run_search

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
    return {"seconds": seconds, "images": images, "epochs": epochs,
            "teacher_forwards": teacher["info"]["forward_images"],
            "val_balanced_accuracy": float(table["val_balanced_accuracy"].max()), "trial_phase_seconds": spans,
            "gpu_peak_gb": None}


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


def _gpu_peak() -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


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
    cases: dict[str, Callable[..., dict[str, Any]]] = {"seed": seed_style, "trial": kd_trial, "search": kd_search}
    fn = cases[args.case]
    print(json.dumps(fn(p, work, **kwargs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--cases", default="all", help="comma list of: trial (reference-style loop and trials), "
                        "search, "
                        "pack; default all (a long GPU benchmark can be split across calls)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a case, in its own process: --work is already the profile's folder
        return child(args)
    args.work = args.work.absolute() / args.profile
    p = PROFILES[args.profile]
    make_files(args.work / "images", p["size"], p["images"])
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
