"""Does a search survive a lost node? A 3-node Ray cluster on this machine, a worker node killed at a random moment.

The cluster is the one a user would start (tests/localcluster.py: `ray start --head --num-gpus=0` and two
`ray start --address=... --num-cpus=2 --num-gpus=1` worker nodes, token authentication). Each round starts a
fresh cluster and an 8-trial search joined with `--address` (`search.gpus_per_trial: 0.25`, so each GPU node
packs up to four trials), and SIGKILLs one worker node's raylet at a moment drawn uniformly from 10% to 80% of
an undisturbed search's duration (measured first, in round 0). It prints, per round, the exit status, the
trials finished, the retries, the wall time and any console line that is not kd-search's own, and keeps the
figures in bench/results-cluster.json.

    .venv/bin/python bench/cluster.py --rounds 5
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TypedDict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search.config import load_config  # noqa: E402
from tests.helpers import tiny_overrides  # noqa: E402
from tests.localcluster import LocalCluster, token_env  # noqa: E402

# kd-search's own console lines (one per trial event, the steps of the search, and one per error Ray published)
OURS = re.compile(r"^(\[\s*\d+:\d\d\] trial |Ray: |data: |preparing |  fold |teacher |starting |resuming |"
                  r"re-rank|refit|exported|student |summary: |best trial |$)")


class Round(TypedDict):
    """One round's figures, as printed and kept in results-cluster.json."""
    returncode: int
    finished: int
    trials: int
    retries: int
    killed_at_s: float | None
    seconds: float
    foreign_lines: list[str]


def run_round(work: Path, cache: Path, trials: int, kill_after: float | None, seed: int) -> Round:
    cfg = load_config(None, tiny_overrides(cache, work / "results") + [
        "name=cluster", f"search.num_samples={trials}", "search.cpus_per_trial=0.5", "search.gpus_per_trial=0.25",
        "search.confirm_seeds=0", "search.rerank=1", "search.max_failures=2", f"search.seed={seed}",
        "train.epochs=4"])
    config = work / "cluster.yaml"
    config.write_text(cfg.to_yaml())
    with LocalCluster(workers=2, worker_cpus=2, worker_gpus=1) as cluster:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "search.cli", "search", str(config), "--address",
                                 cluster.address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=work, env=token_env(), start_new_session=True)
        killed_at = None
        if kill_after is not None:
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                cluster.kill(1)
                killed_at = time.perf_counter() - t0
        output, _ = proc.communicate(timeout=1800)
        seconds = time.perf_counter() - t0
    trials_csv = work / "results" / "cluster" / "trials.csv"
    finished = retries = 0
    if trials_csv.is_file():
        import pandas as pd
        table = pd.read_csv(trials_csv)
        finished = int(table["status"].isin(["completed", "stopped early"]).sum())
        retries = int(table["failures"].sum())
    noise = [line for line in output.splitlines() if not OURS.match(line)]
    return {"returncode": proc.returncode, "finished": finished, "trials": trials, "retries": retries,
            "killed_at_s": killed_at, "seconds": seconds, "foreign_lines": noise}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds with a node killed (after one undisturbed)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results-cluster.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="kd-cluster-") as tmp:
        cache = Path(tmp) / "cache"
        for i in range(args.rounds + 1):
            work = Path(tmp) / f"round{i}"
            work.mkdir()
            kill_after = None if i == 0 else rng.uniform(0.1, 0.8) * rounds[0]["seconds"]
            r = run_round(work, cache, args.trials, kill_after, seed=i)
            rounds.append(r)
            kill = f"node killed at {r['killed_at_s']:.1f} s" if r["killed_at_s"] else "no node killed"
            print(f"round {i}: {kill}; exit {r['returncode']}, {r['finished']}/{r['trials']} trials finished, "
                  f"{r['retries']} retries, {r['seconds']:.1f} s, {len(r['foreign_lines'])} foreign console lines"
                  + "".join(f"\n    | {line}" for line in r["foreign_lines"][:5]), flush=True)
    killed = [r for r in rounds[1:] if r["killed_at_s"] is not None]
    ok = [r for r in killed if r["returncode"] == 0 and r["finished"] == r["trials"]]
    print(f"\n{len(ok)} of {len(killed)} rounds with a node killed finished by themselves with every trial and "
          f"exit 0; undisturbed search {rounds[0]['seconds']:.1f} s")
    Path(args.out).write_text(json.dumps({"rounds": rounds, "seed": args.seed}, indent=1) + "\n")
    return 0 if len(ok) == len(killed) else 1


if __name__ == "__main__":
    sys.exit(main())
