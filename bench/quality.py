"""Does the search pick a better student than hand-picked settings, on images it never saw?

On real scans (scikit-learn's digits) made into imbalanced tasks, over several split seeds, each method's
exported student is evaluated once on the held-out test split:

  (a) `kdsearch search` with cross-validated trials (search.folds)
  (b) `kdsearch search` as before: one holdout validation split (search.folds=1)
  (c) `kdsearch distill` with the reference projects' fixed settings (first: soft KD, T 5, alpha 0.5, no imbalance
      correction; second: hard KD, alpha 0.5, no correction)
  (d) `kdsearch distill` with the tool's defaults

`--study ranking` asks which figure the search should rank its trials by (search.metric): the same
cross-validated search ranked by balanced accuracy under the shipped rule, by AUC and by a class-balanced
log-loss (both threshold-free), beside the first reference project's settings. The default is the one whose
searches give the higher mean test balanced accuracy. `--study final` ships each search's winner three ways
(search.final: refit, its fold students averaged, or one student distilled from them) and sets their test
balanced accuracy and latency side by side, with the teacher's own test figure.

Each run is the command a user types, in its own process. The table gives test balanced accuracy mean ± std
over the split seeds, each search's paired difference against the first reference project's settings with
the number of splits it won, and wall times. Results go to bench/results-quality.json (results-ranking.json).

    .venv/bin/python bench/quality.py                     # 3 tasks x 5 split seeds (about an hour on 2 cores)
    .venv/bin/python bench/quality.py --tasks rare-9 --seeds 0 1
    .venv/bin/python bench/quality.py --study ranking --tasks rare-9 rare-8 --folds 3
    .venv/bin/python bench/quality.py --study final --tasks rare-9 rare-8 --folds 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_1 = {"distill.mode": "soft", "distill.temperature": 5.0, "distill.alpha": 0.5, "imbalance.method": "none"}
REFERENCE_2 = {"distill.mode": "hard", "distill.alpha": 0.5, "imbalance.method": "none"}
REFERENCE_1_NAME = "reference 1: soft T 5, alpha 0.5"  # how the tables name the studies' yardstick


def write_task(root: Path, keep: dict[int, int], names: dict[int, str], seed: int = 0) -> Path:
    """A class-folder dataset of real digit scans: `keep[d]` images of digit d (all digits not named: skipped)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for digit, n in keep.items():
        idx = np.flatnonzero(digits.target == digit)
        idx = rng.permutation(idx)[:n] if n < len(idx) else idx
        folder = root / names[digit]
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8))
            img.save(folder / f"{i:04d}.png")
    return root


def tasks(data_dir: Path) -> dict[str, list[str]]:
    """Each task's data: small and imbalanced, as the reference projects' data was (a few hundred images).

    rare-9:       9 (easily confused with 3, 5 and 8) as a 7% minority against 600 scans of the other digits
    rare-8:       8 as a 10% minority against 600 scans of the other digits
    long-tail-6:  six digits with a long tail of counts (150, 100, 70, 45, 30, 20)
    """
    specs = {
        "rare-9": ({**dict.fromkeys(range(9), 67), 9: 45}, {**dict.fromkeys(range(9), "other"), 9: "nine"}),
        "rare-8": ({**{d: 67 for d in (0, 1, 2, 3, 4, 5, 6, 7, 9)}, 8: 67}, {**dict.fromkeys(range(10), "other"),
                                                                          8: "eight"}),
        "long-tail-6": ({3: 150, 5: 100, 8: 70, 9: 45, 2: 30, 7: 20},
                        {3: "three", 5: "five", 8: "eight", 9: "nine", 2: "two", 7: "seven"}),
    }
    out = {}
    for name, (keep, names) in specs.items():
        folder = data_dir / name
        if not folder.is_dir():
            write_task(folder, keep, names)
        out[name] = ["data.source=folder", f"data.train={folder}"]
    return out


BASE = [  # CPU-sized: tiny timm models at 32 px, as a first run on a laptop would be
    "data.image_size=32", "teacher.name=test_resnet", "teacher.train.epochs=12", "teacher.train.optimizer=adamw",
    "teacher.train.lr=0.003", "student.name=test_resnet", "train.epochs=8", "train.optimizer=adamw",
    "train.lr=0.003", "train.batch_size=64", "search.num_samples=6", "search.grace_period=2", "search.rerank=2",
    "search.confirm_seeds=2", "search.cpus_per_trial=1",
]
SPACE = "search.space={distill.mode: {type: choice, values: [soft, hard]}, distill.temperature: {type: loguniform, " \
        "low: 1, high: 20, when: {distill.mode: soft}}, distill.alpha: {type: uniform, low: 0, high: 1}, train.lr: " \
        "{type: loguniform, low: 0.0003, high: 0.03}, imbalance.method: {type: choice, values: [none, inverse, " \
        "effective, balanced_sampling, logit_adjust]}, imbalance.beta: {type: uniform, low: 0.9, high: 0.9999, " \
        "when: {imbalance.method: effective}}, imbalance.tau: {type: uniform, low: 0.25, high: 2.0, when: " \
        "{imbalance.method: logit_adjust}}}"
POINTS = f"search.points={json.dumps([REFERENCE_1, REFERENCE_2])}"  # the reference projects' settings, tried first


def run(args: list[str], cwd: Path, quiet: bool = True) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "search.cli", *args, *(["--quiet"] if quiet else [])], cwd=cwd,
                          capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def sets(values: list[str]) -> list[str]:
    return [x for v in values for x in ("--set", v)]


def one(task: str, data: list[str], seed: int, work: Path, folds: int) -> dict[str, dict[str, float]]:
    """Every method on one split of one task: test balanced accuracy and wall seconds."""
    common = [*BASE, *data, f"data.split_seed={seed}", f"data.cache_dir={work / 'cache'}", f"output_dir={work}"]
    out = {}
    methods = (("search, cross-validated", [f"search.folds={folds}"]), ("search, holdout", ["search.folds=1"]))
    for method, extra in methods:
        name = f"{task}-{seed}-{'cv' if 'cross' in method else 'holdout'}"
        seconds = run(["search", "digits", *sets([*common, *extra, SPACE, POINTS, f"name={name}"])], work)
        best = json.loads((work / name / "best" / "metrics.json").read_text())
        out[method] = {"test": best["test"]["balanced_accuracy"], "seconds": seconds}
    for method, params in ((REFERENCE_1_NAME, REFERENCE_1),
                           ("reference 2: hard, alpha 0.5", REFERENCE_2), ("tool defaults", {})):
        name = f"{task}-{seed}-{len(out)}"
        seconds = run(["distill", "digits", *sets([*common, *[f"{k}={v}" for k, v in params.items()], f"name={name}"])],
                      work)
        metrics = json.loads((work / name / "distill" / "metrics.json").read_text())
        out[method] = {"test": metrics["test"]["balanced_accuracy"], "seconds": seconds}
    return out


def reference_1(task: str, data: list[str], seed: int, work: Path) -> dict[str, dict[str, float]]:
    """The first reference project's settings through `kdsearch distill` on this split: the studies' yardstick."""
    name = f"{task}-{seed}-reference-1"
    seconds = run(["distill", "digits", *sets([*BASE, *data, f"data.split_seed={seed}",
                                               f"data.cache_dir={work / 'cache'}", f"output_dir={work}",
                                               *[f"{k}={v}" for k, v in REFERENCE_1.items()], f"name={name}"])], work)
    metrics = json.loads((work / name / "distill" / "metrics.json").read_text())
    return {REFERENCE_1_NAME: {"test": metrics["test"]["balanced_accuracy"], "seconds": seconds}}


RANKINGS = ("val_balanced_accuracy", "val_auc", "val_balanced_log_loss")


def ranking(task: str, data: list[str], seed: int, work: Path, folds: int) -> dict[str, dict[str, float]]:
    """The same cross-validated search ranked by each figure of RANKINGS, and the first reference project's
    settings: test balanced accuracy and wall seconds."""
    common = [*BASE, *data, f"data.split_seed={seed}", f"data.cache_dir={work / 'cache'}", f"output_dir={work}",
              f"search.folds={folds}", SPACE, POINTS]
    out = {}
    for metric in RANKINGS:
        name = f"{task}-{seed}-rank-{metric}"
        seconds = run(["search", "digits", *sets([*common, f"search.metric={metric}", f"name={name}"])], work)
        best = json.loads((work / name / "best" / "metrics.json").read_text())
        out[f"search ranked by {metric}"] = {"test": best["test"]["balanced_accuracy"], "seconds": seconds}
    return {**out, **reference_1(task, data, seed, work)}


FINALS = ("refit", "ensemble", "distilled")


def finals(task: str, data: list[str], seed: int, work: Path, folds: int,
           earlier: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """One cross-validated search, its winner shipped each way of FINALS (the refit is the search's own export;
    the others come from `kdsearch export --final`), and the first reference project's settings: test balanced
    accuracy, the shipped model's latency at batch 1 and wall seconds (an export's: that export alone).
    `earlier`: this split's figures from an earlier run; only what they lack is run (the search, if its folder is
    gone)."""
    earlier = earlier or {}
    common = [*BASE, *data, f"data.split_seed={seed}", f"data.cache_dir={work / 'cache'}", f"output_dir={work}",
              f"search.folds={folds}", SPACE, POINTS]
    name = f"{task}-{seed}-finals"
    out: dict[str, dict[str, float]] = {}
    run_json = work / name / "run.json"  # a kept search: its own wall seconds
    seconds = float(json.loads(run_json.read_text()).get("seconds", 0.0)) if run_json.is_file() else 0.0
    if not (work / name / "best" / "metrics.json").is_file():
        earlier = {k: v for k, v in earlier.items() if k == REFERENCE_1_NAME}  # a new search: new winners
        seconds = run(["search", "digits", *sets([*common, f"name={name}"])], work)
    for final in FINALS:
        method = f"search, shipped as {final}"
        if method in earlier:
            out[method] = earlier[method]
            continue
        folder = work / name / ("best" if final == "refit" else f"best-{final}")
        if final != "refit":
            seconds = run(["export", str(work / name), "--final", final, "--out", str(folder)], work, quiet=False)
        best = json.loads((folder / "metrics.json").read_text())
        shipped_threshold = best["test"].get("threshold") is not None
        out[method] = {"test": best["test"]["balanced_accuracy"], "seconds": seconds,
                       # the same model under each candidate rule (recorded by the export, never used to choose)
                       "test_argmax": best["test_argmax"]["balanced_accuracy"],
                       "test_threshold": (best["test"] if shipped_threshold else best.get("test_threshold") or
                                          best["test_argmax"])["balanced_accuracy"],
                       "rule": best.get("rule", {}).get("threshold") is not None,
                       **({"labels_only_test": best["labels_only"]["test_balanced_accuracy"]}
                          if "test_balanced_accuracy" in best.get("labels_only", {}) else {}),
                       "latency_ms": best["cost"]["student"]["latency_ms_batch1"],
                       "teacher_test": best["teacher_test"]["balanced_accuracy"],
                       # a distilled student's own teacher: the fold ensemble, on the same images at argmax
                       **({"ensemble_test": best["ensemble_test"]["balanced_accuracy"]}
                          if best.get("ensemble_test") else {})}
    reference = {REFERENCE_1_NAME: earlier[REFERENCE_1_NAME]} if REFERENCE_1_NAME in earlier else \
        reference_1(task, data, seed, work)
    return {**out, **reference}


def table(results: dict[str, dict[str, dict[str, dict[str, float]]]]) -> str:
    lines = []
    for task, by_seed in results.items():
        seeds = sorted(by_seed)
        methods = list(by_seed[seeds[0]])
        ref = np.array([by_seed[s][REFERENCE_1_NAME]["test"] for s in seeds])
        w = max(36, *(len(m) + 1 for m in methods))
        lines += [f"\n{task} ({len(seeds)} split seeds: {', '.join(seeds)})",
                  f"{'method':<{w}} {'test bal. acc':>15} {'vs reference 1 (paired)':>25} {'won':>5} {'wall s':>8}"]
        for m in methods:
            v = np.array([by_seed[s][m]["test"] for s in seeds])
            secs = np.mean([by_seed[s][m]["seconds"] for s in seeds])
            d = v - ref
            vs = "" if m.startswith("reference 1") else f"{d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0:.3f}"
            won = "" if m.startswith("reference 1") else f"{int((d > 0).sum())}/{len(d)}"
            lines.append(f"{m:<{w}} {v.mean():>8.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f} {vs:>25} {won:>5} "
                         f"{secs:>8.0f}")
        for m in methods:
            if all("test_argmax" in by_seed[s][m] for s in seeds):
                lines.append(f"  {m}: " + _rules(by_seed, seeds, m))
        for m in methods:
            if "latency_ms" in by_seed[seeds[0]][m]:
                lat = np.mean([by_seed[s][m]["latency_ms"] for s in seeds])
                teacher = np.array([by_seed[s][m]["teacher_test"] for s in seeds])
                lines.append(f"  {m}: latency at batch 1 {lat:.2f} ms; the large teacher's own test balanced accuracy "
                             f"(argmax) {teacher.mean():.3f} ± {teacher.std(ddof=1) if len(teacher) > 1 else 0:.3f}"
                             + _taught_by(by_seed, seeds, m))
        if "search, holdout" in methods:
            cv = np.mean([by_seed[s]["search, cross-validated"]["seconds"] for s in seeds])
            hold = np.mean([by_seed[s]["search, holdout"]["seconds"] for s in seeds])
            lines.append(f"the cross-validated search took {cv / hold:.1f}x the holdout search's wall time")
    return "\n".join(lines)


def _rules(by_seed: dict[str, dict[str, dict[str, float]]], seeds: list[str], method: str) -> str:
    """The same shipped model under each decision rule: as shipped (search.shipped_rule auto), at argmax, at the tuned
    threshold; the paired difference of as shipped against argmax with the splits it won, lost and tied."""
    def figures(key: str) -> np.ndarray:
        return np.array([by_seed[s][method][key] for s in seeds])
    shipped, argmax, threshold = figures("test"), figures("test_argmax"), figures("test_threshold")
    d = shipped - argmax
    chose = int(sum(bool(by_seed[s][method].get("rule")) for s in seeds))
    twin = (f"; labels-only twin {figures('labels_only_test').mean():.3f}"
            if all("labels_only_test" in by_seed[s][method] for s in seeds) else "")
    return (f"as shipped {shipped.mean():.3f}, argmax {argmax.mean():.3f}, threshold always {threshold.mean():.3f}; "
            f"as shipped - argmax {d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0:.3f} "
            f"(won {int((d > 0).sum())}, lost {int((d < 0).sum())}, tied {int((d == 0).sum())}); the threshold "
            f"shipped on {chose}/{len(seeds)}"
            + twin)


def _taught_by(by_seed: dict[str, dict[str, dict[str, float]]], seeds: list[str], method: str) -> str:
    """A distilled student's own teacher, the fold ensemble, on the test images at argmax, where recorded."""
    if not all("ensemble_test" in by_seed[s][method] for s in seeds):
        return ""
    v = np.array([by_seed[s][method]["ensemble_test"] for s in seeds])
    return f"; the fold ensemble it learned from {v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="*", default=["rare-9", "rare-8", "long-tail-6"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--folds", type=int, default=5, help="search.folds of the cross-validated search")
    parser.add_argument("--work", default="/tmp/kd-quality", help="where runs write (default: /tmp/kd-quality)")
    parser.add_argument("--study", choices=["search", "ranking", "final"], default="search",
                        help="search: the search against fixed settings; ranking: which figure to rank trials by; "
                        "final: the winner shipped as a refit, its fold students averaged, or one student "
                        "distilled from them")
    parser.add_argument("--out", help="default: bench/results-quality.json (results-ranking.json, results-final.json)")
    args = parser.parse_args()
    study = {"search": one, "ranking": ranking, "final": finals}[args.study]
    args.out = args.out or str(ROOT / "bench" / f"results-{'quality' if args.study == 'search' else args.study}.json")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = tasks(work / "data")
    out_path = Path(args.out)
    results: dict = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for seed in args.seeds:  # seed by seed: every task has as many splits done whenever the run is stopped
        for task in args.tasks:
            earlier = results.get(task, {}).get(str(seed))
            if earlier and (args.study != "final" or all(f"search, shipped as {f}" in earlier for f in FINALS)):
                continue  # kept from an earlier run: the script resumes where it stopped
            t0 = time.perf_counter()
            more = {"earlier": earlier} if args.study == "final" else {}  # a new way to ship: the searches reused
            results.setdefault(task, {})[str(seed)] = study(task, data[task], seed, work, args.folds, **more)
            out_path.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{task} split seed {seed}: " + ", ".join(f"{m} {r['test']:.3f}" for m, r in
                  results[task][str(seed)].items()) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(table({t: results[t] for t in args.tasks if t in results}))


if __name__ == "__main__":
    main()
