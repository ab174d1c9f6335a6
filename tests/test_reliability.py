"""Searches survive kills, crashes and interrupts, and lose nothing. Each test does the thing for real.

These start real searches in subprocesses (so they can be killed) on tiny models; Ray is stopped after
each, and the killed sessions' leftover processes are killed with their process group.
"""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from kd.files import read_jsonl
from search.config import load_config
from tests.helpers import read_table, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
EPOCHS = 3


def write_config(tmp: Path, cache: Path, name: str, *sets: str) -> Path:
    cfg = load_config(None, tiny_overrides(cache, tmp / "results") + [
        # 32 px, not the suite's 16: the kills land between a trial's epochs, which at 16 px can all pass between a
        # poll that sees a trial mid-way and the kill that follows it
        "data.image_size=32",
        f"name={name}", "search.num_samples=3", "search.max_concurrent=1", "search.scheduler=none",
        f"train.epochs={EPOCHS}", "search.confirm_seeds=0", *sets])
    path = tmp / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def start(config: Path, *extra: str) -> subprocess.Popen:
    """`kdsearch search CONFIG` in its own session, so the test can kill it (and its Ray) like a user would."""
    return subprocess.Popen([sys.executable, "-m", "search.cli", "search", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=config.parent)


def epochs_by_trial(exp: Path) -> dict[str, list[int]]:
    out = {}
    for f in exp.glob("*/result.json"):
        rows = read_jsonl(f)  # a search may be writing it: a line cut short is skipped
        out[f.parent.name.split("_")[2]] = [r["epoch"] for r in rows]
    return out


def wait_for(exp: Path, done: int, partial_epochs: int, since: dict[str, list[int]] | None = None,
             timeout: float = 240) -> dict[str, list[int]]:
    """Until `done` trials have run every epoch and another has reported `partial_epochs` (so it checkpointed),
    counting only a running trial that has progressed beyond the snapshot `since` (the new process's work)."""
    since = since or {}
    deadline = time.time() + timeout
    while time.time() < deadline:
        if exp.is_dir():
            state = epochs_by_trial(exp)
            finished = [t for t, e in state.items() if e and e[-1] == EPOCHS]
            running = [t for t, e in state.items() if e and partial_epochs <= e[-1] < EPOCHS
                       and len(e) > len(since.get(t, []))]
            if len(finished) >= done and running:
                return state
        time.sleep(0.1)
    raise AssertionError(f"the search did not get that far in {timeout} s")


def stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def resume_to_the_end(config: Path) -> None:
    """`kdsearch search CONFIG --resume`, as an interrupted search says to: it must finish, exit 0."""
    proc = start(config, "--resume")
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        stop_group(proc)
    assert proc.returncode == 0, err


def test_killed_then_interrupted_search_finishes_with_every_trial_once(tmp_path, shared_cache):
    # cross-validated, so K students resume; with MLflow, whose run for a trial goes on when the trial does. Four
    # trials: the killed driver's trials may get a trial further before its Ray goes (seen on a loaded machine: the
    # second trial ended and the third reached epoch 2), and step 2 needs a trial still to interrupt.
    config = write_config(tmp_path, shared_cache, "kills", "search.folds=2", "search.loggers=[mlflow]",
                          "search.num_samples=4")
    exp = tmp_path / "results" / "kills" / "ray"

    # 1. A second search on the same directory while the first runs refuses; then SIGKILL the first one's
    #    driver (only the driver, as `kill -9 PID` would) mid-trial.
    first = start(config)
    try:
        wait_for(exp, done=0, partial_epochs=1)
        busy = subprocess.run([sys.executable, "-m", "search.cli", "search", str(config)], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120)
        assert busy.returncode == 2, busy.stderr
        assert "is in use by another search (pid" in busy.stderr and "Traceback" not in busy.stderr
        before_kill = wait_for(exp, done=1, partial_epochs=2)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        stop_group(first)

    # 2. The same command again; Ctrl-C it mid-trial: it stops cleanly and says how to resume.
    second = start(config)
    try:
        before_interrupt = wait_for(exp, done=2, partial_epochs=1, since=epochs_by_trial(exp))
        os.kill(second.pid, signal.SIGINT)
        _, err = second.communicate(timeout=120)
    finally:
        stop_group(second)
    assert second.returncode == 130, err
    assert "search interrupted" in err and f"resume with: kdsearch search {config} --resume" in err
    assert "Traceback" not in err

    # 3. Resume as told: it completes.
    resume_to_the_end(config)
    table = read_table(tmp_path / "results" / "kills" / "trials.csv")
    assert len(table) == 4 and table["trial"].is_unique and (table["status"] == "completed").all()
    final = epochs_by_trial(exp)
    for trial, epochs in final.items():
        assert epochs == list(range(1, EPOCHS + 1)), (trial, epochs)  # no epoch run twice: resumed, not restarted
    for snapshot in (before_kill, before_interrupt):
        for trial, epochs in snapshot.items():
            assert final[trial][:len(epochs)] == epochs  # what was reported before stays as it was
    assert (tmp_path / "results" / "kills" / "best" / "model.safetensors").is_file()
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'kills' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kills").experiment_id])
    assert sorted(r.data.tags["trial_name"].rsplit("_", 1)[-1] for r in runs) == sorted(table["trial"])  # one each
    for run in runs:
        assert run.info.status == "FINISHED"
        curve = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
        assert sorted({m.step for m in curve}) == list(range(1, EPOCHS + 1))  # across the three processes


GATE = "KD_TEST_REPORT_GATE"  # a folder: while set, every trial's epoch waits there for the test's word
GATED_MODULE = "tests.test_reliability"  # this file, as Ray's workers import it


def gated_runtime_env(runtime_env: dict | None) -> dict:
    """Ray's RAY_RUNTIME_ENV_HOOK, called by ray.init in the driver: every worker of the search runs
    gate_trial_reports when it starts."""
    runtime_env = dict(runtime_env or {})
    runtime_env["worker_process_setup_hook"] = f"{GATED_MODULE}.gate_trial_reports"
    root = str(Path(__file__).resolve().parents[1])  # a worker runs the hook before it sees the driver's path
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), GATE: os.environ[GATE], "PYTHONPATH": path}
    return runtime_env


def gate_trial_reports() -> None:
    """In a Ray worker: after each epoch a trial trains (DistillTrainable.step), say so in the gate folder
    (PID-TRIAL-EPOCH.reported, with the trial's folder) and wait until the test lets the trial go on
    (PID-TRIAL-EPOCH.go) or kills the process. The trial cannot outrun the test's kills, however fast its epochs."""
    from search.trainable import DistillTrainable
    gate = Path(os.environ[GATE])
    step = DistillTrainable.step

    def gated(self):
        metrics = step(self)
        name = f"{os.getpid()}-{self.trial_id}-{metrics['epoch']}"  # a reused actor runs several trials
        seen = {"pid": os.getpid(), "epoch": metrics["epoch"], "trial": Path(self.logdir).name}
        (gate / f"{name}.tmp").write_text(json.dumps(seen))
        (gate / f"{name}.tmp").rename(gate / f"{name}.reported")
        deadline = time.time() + 300
        while not (gate / f"{name}.go").exists():
            if time.time() > deadline:
                raise RuntimeError(f"the test never answered the report of epoch {metrics['epoch']} (pid {name})")
            time.sleep(0.01)
        return metrics
    DistillTrainable.step = gated


def test_killed_trial_processes_are_retried_then_recorded_as_failed(tmp_path, shared_cache, monkeypatch):
    """Trial 1's worker is killed once (retried, resumes, completes); trial 2's twice (max_failures=1: failed).
    A process killed by the OOM killer dies the same way. Each kill comes right after the trial reports an epoch
    (from the second on, so a checkpoint exists), while the trial waits for it (gate_trial_reports)."""
    from search.driver import run_search
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv(GATE, str(gate))
    monkeypatch.setenv("RAY_RUNTIME_ENV_HOOK", f"{GATED_MODULE}.gated_runtime_env")
    cfg = load_config(write_config(tmp_path, shared_cache, "crash", "search.num_samples=2", "search.max_failures=1",
                                   "train.epochs=5"))
    plan = {1: 1, 2: 2}  # trial number -> how many times to kill its process
    killed: dict[int, list[int]] = {}
    answered: list[dict] = []
    stop = threading.Event()

    def killer() -> None:
        handled: set[str] = set()
        while not stop.is_set():
            for f in sorted(gate.glob("*.reported")):
                if f.name in handled:
                    continue
                handled.add(f.name)
                seen = json.loads(f.read_text())
                answered.append(seen)
                number = int(re.match(r".*?_[0-9a-f]{8}_(\d+)_", seen["trial"]).group(1))
                pids = killed.setdefault(number, [])
                if seen["epoch"] >= 2 and len(pids) < plan.get(number, 0) and seen["pid"] not in pids:
                    pids.append(seen["pid"])
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(seen["pid"], signal.SIGKILL)
                else:
                    (gate / f"{f.stem}.go").touch()
            stop.wait(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        run_dir = run_search(cfg, quiet=True, echo=lambda s: None)
    finally:
        stop.set()
        thread.join()
    assert answered, "no trial's report reached the test's gate (gate_trial_reports not run in Ray's workers?)"
    assert {n: len(p) for n, p in killed.items() if p} == plan, (killed, answered)
    table = read_table(run_dir / "trials.csv").set_index("number")
    assert table.loc[1, "status"] == "completed" and table.loc[1, "failures"] == 1
    assert table.loc[1, "epochs"] == 5 and pd.isna(table.loc[1, "error"])
    assert table.loc[2, "status"] == "failed" and table.loc[2, "failures"] == 2
    assert "died" in table.loc[2, "error"].lower() or "actor" in table.loc[2, "error"].lower()
    assert (run_dir / "summary.md").read_text().count("Failed trials") == 1
    assert (run_dir / "best" / "model.safetensors").is_file()


def test_a_busy_node_cannot_fail_the_next_trial_through_actor_reuse(tmp_path, shared_cache, monkeypatch):
    """Ray reuses a function trainable's actor only if the last trial's thread ends within
    TUNE_FUNCTION_THREAD_TIMEOUT_S; on a busy node it may not, and a reused actor then failed the next trial
    ("Trainable runner reuse requires reset_config() ..."). A timeout of 0 made every such reuse fail. The trials are a
    class trainable, with no thread to wait for: every trial completes, and they ran in one reused process."""
    from search.driver import run_search
    monkeypatch.setenv("TUNE_FUNCTION_THREAD_TIMEOUT_S", "0")
    cfg = load_config(write_config(tmp_path, shared_cache, "busy", "search.num_samples=3", "train.epochs=1",
                                   "search.max_failures=0"))
    run_dir = run_search(cfg, quiet=True, echo=lambda s: None)
    table = read_table(run_dir / "trials.csv")
    assert (table["status"] == "completed").all() and len(table) == 3, table[["status", "error"]]
    assert table["pid"].nunique() == 1, table[["trial", "pid"]]  # one trial at a time, in one warm actor


def test_a_search_whose_ray_dies_says_so_and_resumes(tmp_path, shared_cache):
    """The GCS server of the search's own Ray, killed from outside mid-trial: the search ends within seconds (not
    after Ray's 60 s wait for the GCS and its own exit 1) with kd-search's interrupted message, what finished and
    the command that resumes it, exit 130 and no process of that Ray left; the resume completes every trial."""
    import psutil
    config = write_config(tmp_path, shared_cache, "gcs", "search.num_samples=2")
    exp = tmp_path / "results" / "gcs" / "ray"
    first = start(config)
    try:
        wait_for(exp, done=1, partial_epochs=1)
        ray_processes = psutil.Process(first.pid).children(recursive=True)
        names = {}
        for p in ray_processes:
            with contextlib.suppress(psutil.NoSuchProcess):  # a short-lived helper may be gone already
                names[p] = p.name()
        gcs = [p for p, name in names.items() if name == "gcs_server"]
        assert len(gcs) == 1, names
        killed_at = time.time()
        gcs[0].send_signal(signal.SIGKILL)
        _, err = first.communicate(timeout=60)
        ended_in = time.time() - killed_at
    finally:
        stop_group(first)
    assert first.returncode == 130, err
    assert ended_in < 15, ended_in
    message = err.strip().splitlines()
    assert message[-2].startswith("search interrupted: the Ray runtime this search started went away (its "
                                  f"gcs_server, pid {gcs[0].pid}, ended); 1 of 2 trials finished"), err
    assert message[-1] == f"resume with: kdsearch search {config} --resume"
    assert "Traceback" not in err and "Failed to connect to GCS" not in err
    _, alive = psutil.wait_procs(ray_processes, timeout=15)
    assert not alive, [p.name() for p in alive]

    resume_to_the_end(config)
    table = read_table(tmp_path / "results" / "gcs" / "trials.csv")
    assert len(table) == 2 and (table["status"] == "completed").all() and (table["epochs"] == EPOCHS).all()
    assert (tmp_path / "results" / "gcs" / "best" / "model.safetensors").is_file()
