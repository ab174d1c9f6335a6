"""Does a trial's figure at ASHA's first rung predict its figure after all its epochs?

ASHA stops a trial at a rung on the figure it has there. Under a cosine over all the epochs, a trial with a high
learning rate is far from annealed at the first rung and looks worse than it ends ("slow starters"). This runs
the demo's search (scikit-learn's digits, 8 against the rest, resnet18 teacher, test_resnet student, 16 px,
3 folds) with 8 epochs and no early stopping (`search.scheduler=none`: every trial runs every epoch), once per
schedule and split seed, and reads each trial's figure (search.metric, val_auc) at every epoch:

  cosine    one cosine over the 8 epochs (what a search did before search.anneal_at_rungs)
  rungs     the learning rate annealed to zero at ASHA's rungs (epochs 2 and 4) and restarted: what a search
            with ASHA now trains (train.restarts = the rungs)

For each it prints the rank correlation (Spearman) between the figure at the first rung (epoch 2) and the last
epoch's, the same for the second rung (epoch 4), whether the trial best at the end was in the top half at the
first rung (ASHA's cut at reduction_factor 2 keeps the top half), and the trials' mean and best final figure (what
the restarts cost or bought at the end). The same 12 trials' configs under both schedules where the sampler
draws them alike (Optuna's seed; its first 4 are random draws, the 2 reference points among them).

With --again, every trial is also retrained on one further student seed (the re-ranking, all trials its
candidates): the rank correlation of each trial's last-epoch figure with that seed's is how far any figure can
predict the end on this task (two runs of the same configs agree no better), and the rung's correlation with the
other seed's end is the prediction free of the run's own luck.

    .venv/bin/python bench/rungs.py                   # 3 split seeds x 2 schedules (about 35 minutes on 2 cores)
    .venv/bin/python bench/rungs.py --seeds 0
    .venv/bin/python bench/rungs.py --again --schedules rungs --out bench/results-rungs-again.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: the repository, not bench/, is where `bench` is a package

from bench.quality import run, sets  # noqa: E402

SCHEDULES = {"cosine": "train.restarts=[]", "rungs": "train.restarts=[2, 4]"}
EPOCHS, FIRST, SECOND = 8, 2, 4


def one(schedule: str, seed: int, work: Path, trials: int, again: bool = False) -> dict[str, float]:
    """One search where every trial runs every epoch: the rung figures against the last epoch's (and, `again`,
    against the last epoch of a further seed of the same config)."""
    from search.run import Run
    name = f"rungs-{schedule}-{seed}" + ("-again" if again else "")
    common = [f"train.epochs={EPOCHS}", "search.scheduler=none", f"search.num_samples={trials}",
              "search.confirm_seeds=1", "search.judge_seeds=0", f"search.rerank={trials if again else 1}",
              f"data.split_seed={seed}", f"data.cache_dir={work / 'cache'}", f"output_dir={work}", f"name={name}",
              SCHEDULES[schedule]]
    seconds = run(["search", "digits", *sets(common)], work)
    return {"seconds": seconds, **figures(Run(work / name), again)}


def figures(found: Any, again: bool) -> dict[str, float]:
    """The rung figures of a finished search (search.run.Run) against its trials' last epoch (and, `again`, against
    a further seed's: its re-ranking's candidates). Beside them, each trial's training loss at the first rung (lower
    first) against the same end: a figure the rungs could judge by instead."""
    metric = "val_auc"
    curves = {t: {int(r["epoch"]): float(r[metric]) for r in rows if metric in r}
              for t, rows in found.histories.items()}
    curves = {t: c for t, c in curves.items() if EPOCHS in c}
    ids = sorted(curves)
    at = {e: np.array([curves[t][e] for t in ids]) for e in (FIRST, SECOND, EPOCHS)}
    best_end = int(np.argmax(at[EPOCHS]))
    rank_first = int((at[FIRST] > at[FIRST][best_end]).sum())  # trials ahead of the final best at the first rung
    loss_first = np.array([-next(float(r["train_loss"]) for r in found.histories[t] if r.get("epoch") == FIRST)
                           for t in ids])
    out = {"trials": len(ids),
           "spearman_first": float(spearmanr(at[FIRST], at[EPOCHS]).statistic),
           "loss_first_end": float(spearmanr(loss_first, at[EPOCHS]).statistic),
           "spearman_second": float(spearmanr(at[SECOND], at[EPOCHS]).statistic),
           "best_kept": float(rank_first < len(ids) / 2), "best_rank_first": rank_first + 1,
           "mean_end": float(at[EPOCHS].mean()), "best_end": float(at[EPOCHS].max())}
    reranking = found.reranking
    if again and reranking is not None:
        other = {c.trial: c.values[0] for c in reranking.candidates if c.values and c.trial in curves}
        both = [i for i, t in enumerate(ids) if t in other]
        end_other = np.array([other[ids[i]] for i in both])
        out.update(seeds_end=float(spearmanr(at[EPOCHS][both], end_other).statistic),
                   first_other_end=float(spearmanr(at[FIRST][both], end_other).statistic),
                   loss_first_other_end=float(spearmanr(loss_first[both], end_other).statistic),
                   paired=len(both))
    return out


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    again = all("seeds_end" in r for by_seed in results.values() for r in by_seed.values())
    loss = all("loss_first_end" in r for by_seed in results.values() for r in by_seed.values())
    lines = [f"{'schedule':10} {'rho(2, 8)':>16} {'rho(4, 8)':>16} {'best kept':>10} {'mean at 8':>16} "
             f"{'best at 8':>16}" + (f" {'rho(8, 8 again)':>16} {'rho(2, 8 again)':>16}" if again else "") +
             (f" {'rho(loss 2, 8)':>16}" if loss else "") + (f" {'loss 2, 8 again':>16}" if loss and again else "")]
    for schedule, by_seed in results.items():
        rows = list(by_seed.values())

        def stat(key: str, rows: list[dict[str, float]] = rows) -> str:
            v = np.array([r[key] for r in rows])
            return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"
        kept = sum(int(r["best_kept"]) for r in rows)
        lines.append(f"{schedule:10} {stat('spearman_first'):>16} {stat('spearman_second'):>16} "
                     f"{f'{kept}/{len(rows)}':>10} {stat('mean_end'):>16} {stat('best_end'):>16}"
                     + (f" {stat('seeds_end'):>16} {stat('first_other_end'):>16}" if again else "")
                     + (f" {stat('loss_first_end'):>16}" if loss else "")
                     + (f" {stat('loss_first_other_end'):>16}" if loss and again else ""))
    lines.append("(mean ± std over split seeds " + ", ".join(next(iter(results.values()))) + "; best kept: the trial "
                 "best at epoch 8 was in the top half at epoch 2, which ASHA keeps" +
                 ("; 8 again: the same configs' epoch 8 on a further student seed" if again else "") +
                 ("; loss 2: the training loss at epoch 2, lower first" if loss else "") + ")")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--work", default="/tmp/kd-rungs", help="where runs write (default: /tmp/kd-rungs)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results-rungs.json"))
    parser.add_argument("--again", action="store_true", help="retrain every trial on a further seed (twice the time)")
    parser.add_argument("--schedules", nargs="*", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--reread", action="store_true", help="read the figures again from the searches in --work "
                        "(their seconds kept), running nothing")
    args = parser.parse_args()
    work, out_path = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for seed in args.seeds:
        for schedule in args.schedules:
            kept = results.get(schedule, {}).get(str(seed))
            if args.reread and kept is not None:
                from search.run import Run
                name = f"rungs-{schedule}-{seed}" + ("-again" if args.again else "")
                results[schedule][str(seed)] = {**kept, **figures(Run(work / name), args.again)}
                out_path.write_text(json.dumps(results, indent=2) + "\n")
                continue
            if kept is not None and (not args.again or "seeds_end" in kept):
                continue  # kept from an earlier run: the script resumes where it stopped
            t0 = time.perf_counter()
            results.setdefault(schedule, {})[str(seed)] = r = one(schedule, seed, work, args.trials, args.again)
            out_path.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{schedule} split seed {seed}: rho(2, 8) {r['spearman_first']:.3f}, rho(4, 8) "
                  f"{r['spearman_second']:.3f}, the final best ranked {r['best_rank_first']} of {r['trials']} at "
                  f"epoch 2" + (f"; rho(8, 8 again) {r['seeds_end']:.3f}, rho(2, 8 again) "
                                f"{r['first_other_end']:.3f}" if "seeds_end" in r else "") +
                  f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
