"""Soak: a search of many tiny trials keeps the driver's memory flat and the results folder bounded.

CI runs a reduced form (8 trials); `KDSEARCH_SOAK_TRIALS=40 pytest tests/test_soak.py -s` is the full one
(its figures are in docs/reliability.md).
"""
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search.config import load_config
from tests.helpers import read_table, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
TRIALS = int(os.environ.get("KDSEARCH_SOAK_TRIALS", "8"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def finished_trials(exp: Path) -> int:
    count = 0
    for f in exp.glob("*/result.json") if exp.is_dir() else []:
        lines = [line for line in f.read_text().splitlines() if line.strip()]
        count += bool(lines) and json.loads(lines[-1])["epoch"] == 2
    return count


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def test_soak_many_trials(tmp_path, shared_cache):
    cfg = load_config(None, tiny_overrides(shared_cache, tmp_path / "results") + [
        "name=soak", f"search.num_samples={TRIALS}", "search.scheduler=none", "train.epochs=2",
        "search.confirm_seeds=0"])
    config = tmp_path / "soak.yaml"
    config.write_text(cfg.to_yaml())
    exp = tmp_path / "results" / "soak" / "ray"
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "search", str(config), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    samples: list[tuple[int, float]] = []  # (trials finished, driver RSS in MB)
    try:
        while proc.poll() is None:
            try:
                samples.append((finished_trials(exp), rss_mb(proc.pid)))
            except OSError:
                break
            time.sleep(0.25)
        _, err = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0, err
    table = read_table(tmp_path / "results" / "soak" / "trials.csv")
    assert len(table) == TRIALS and (table["status"] == "completed").all()

    early = max(r for n, r in samples if n <= TRIALS // 4)  # driver RSS once the first quarter has finished
    later = [r for n, r in samples if TRIALS // 4 < n < TRIALS]
    late = max(later) if later else early
    per_trial = folder_mb(exp) / TRIALS
    checkpoints = [len(list(d.glob("checkpoint_*"))) for d in exp.iterdir() if d.is_dir()]
    print(f"\nsoak: {TRIALS} trials; driver RSS {early:.0f} MB after the first quarter, at most {late:.0f} MB later "
          f"(+{late - early:.0f} MB); Ray experiment folder {folder_mb(exp):.1f} MB, {per_trial:.2f} MB per trial; "
          f"checkpoints kept per trial: {max(checkpoints)}")
    assert late - early < 80, "the driver's memory grows with the number of trials"
    assert max(checkpoints) == 1  # older checkpoints are pruned (CheckpointConfig num_to_keep=1)
    assert per_trial < 10
