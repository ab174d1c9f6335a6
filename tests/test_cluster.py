"""Searches on a real multi-node Ray cluster on this machine: a head without GPUs and two worker nodes that
declare one GPU each (tests/localcluster.py, `ray start` processes, token authentication as Ray >= 2.59 sets it).

The search runs as a user runs it, `kdsearch search CONFIG --address HOST:PORT` in its own process; a worker
node is killed with SIGKILL while its trials run. bench/cluster.py repeats the kill at random moments.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from kd.config import load_config
from search.cli import main
from tests.helpers import digits_folder, tiny_overrides
from tests.localcluster import LocalCluster, token_env

pytestmark = pytest.mark.slow
TRIALS = 8


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=2, worker_cpus=2, worker_gpus=1) as c:
        yield c


def write_config(tmp: Path, cache: Path, name: str, *sets: str) -> Path:
    cfg = load_config(None, tiny_overrides(cache, tmp / "results") + [
        f"name={name}", f"search.num_samples={TRIALS}", "search.scheduler=none", "search.confirm_seeds=0",
        "search.rerank=1", "search.cpus_per_trial=0.5", "search.gpus_per_trial=0.25", "train.epochs=4", *sets])
    path = tmp / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def search(config: Path, cluster: LocalCluster, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "search.cli", "search", str(config), "--address", cluster.address,
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=config.parent,
                            env=token_env(), start_new_session=True)


def results(experiment: Path) -> dict[str, list[dict]]:
    """Every result each trial reported, in order (a retried trial's repeated epochs included), by trial id."""
    out = {}
    for f in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_a_worker_node_killed_mid_search_loses_nothing(cluster, tmp_path, shared_cache):
    config = write_config(tmp_path, shared_cache, "lost-node", "search.max_failures=2")
    storage = tmp_path / "shared-storage"
    proc = search(config, cluster, "--storage", str(storage))
    victim = cluster.nodes[1]
    experiment = storage / "lost-node" / "ray"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # kill the node once one of its trials has checkpointed an epoch
            if any(r[-1].get("node") == victim.node_id for r in results(experiment).values()):
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        cluster.kill(1)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    run_dir = tmp_path / "results" / "lost-node"
    table = pd.read_csv(run_dir / "trials.csv")
    assert len(table) == TRIALS and (table["status"] == "completed").all(), table[["trial", "status", "error"]]
    runs = results(experiment)
    lost = {t for t, rows in runs.items() if any(r.get("node") == victim.node_id for r in rows)}
    assert lost, "no trial ran on the killed node"
    for trial, rows in runs.items():
        assert rows[-1]["node"] != victim.node_id  # every trial finished on a surviving node
        if trial in lost and rows[-1]["epoch"] == 4:
            epochs = [r["epoch"] for r in rows]
            # resumed from its checkpoint (one per epoch) after the node died: never trained again from epoch 1
            assert epochs.count(1) == 1 and sorted(set(epochs)) == [1, 2, 3, 4], epochs
    retried = table.set_index("trial").loc[sorted(lost & set(table["trial"])), "failures"]
    assert (retried >= 1).any(), "a trial that lost its node is counted as retried"
    assert "will be retried" in output and "search interrupted" not in output
    # the console: kd-search's own lines only, none of Ray's (state dumps, heartbeats, worker logs, tracebacks)
    for noise in ("[state-dump]", "(raylet)", "Traceback", "WARNING", "(pid="):
        assert noise not in output, noise
    # the results land where --storage and the run directory say, and analyze works from a copy of them
    assert (storage / "lost-node" / "ray").is_dir() and (run_dir / "optuna.journal").is_file()
    assert (run_dir / "best" / "model.safetensors").is_file()
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.copytree(experiment, copy / "ray")  # a user's copy of both: the run folder with the experiment in it
    shutil.rmtree(storage)
    (copy / "trials.csv").unlink()
    assert main(["analyze", str(copy)]) == 0
    pd.testing.assert_frame_equal(table, pd.read_csv(copy / "trials.csv"))
    cluster.add_worker("worker3")  # the next test gets two GPU nodes again


def test_teacher_runs_as_a_task_on_a_gpu_node_and_quarter_gpus_pack_four_trials(cluster, tmp_path):
    config = write_config(tmp_path, tmp_path / "fresh-cache", "packing", "train.epochs=2")  # the teacher must run
    proc = search(config, cluster)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    run_dir = tmp_path / "results" / "packing"
    gpu_nodes = {n.node_id for n in cluster.nodes if n.gpus and n.raylet() is not None}
    teacher = json.loads((run_dir / "teacher.json").read_text())
    assert not teacher["info"]["cached"] and teacher["info"]["finetune_seconds"] > 0
    assert [p["node"] in gpu_nodes for p in teacher["placement"]] == [True] and teacher["placement"][0]["gpus"]
    table = pd.read_csv(run_dir / "trials.csv", dtype={"gpus": str, "node": str})
    assert set(table["node"]) <= gpu_nodes and set(table["gpus"]) == {"0"} and set(table["device"]) == {"cpu"}
    per_node = table.groupby("node").apply(lambda g: max_overlap(list(zip(g["started"], g["ended"], strict=True))))
    assert per_node.max() == 4, per_node  # four quarter-GPU trials at once on one node, never a fifth
    assert (run_dir / "plots" / "timeline.png").is_file()


STREAM_CHECK = """
import sys
from pathlib import Path
from kd.config import load_config
from kd.data import load_dataset
from kd.errors import UserError
from search.cluster import check_stream_files, start_ray
cfg = load_config(sys.argv[1])
data = load_dataset(cfg.data, progress=False)
assert data.train.images is None
start_ray(sys.argv[2])
check_stream_files(data)  # every node reads them: one file system here
print("all nodes read", len(data.train.paths) + len(data.val.paths) + len(data.test.paths), "files")
Path(data.train.paths[3]).unlink()  # as on a node that lacks the dataset
try:
    check_stream_files(data)
except UserError as e:
    print(e)
"""


def test_streamed_images_must_be_readable_on_every_node(cluster, tmp_path):
    folder = digits_folder(tmp_path / "digits", count=120)
    cfg = load_config(None, tiny_overrides(tmp_path / "cache") + ["data.source=folder", f"data.train={folder}",
                                                                 "data.pipeline=stream"])
    (tmp_path / "stream.yaml").write_text(cfg.to_yaml())
    # in a process of its own, as Ray reads RAY_AUTH_MODE once per process
    out = subprocess.run([sys.executable, "-c", STREAM_CHECK, str(tmp_path / "stream.yaml"), cluster.address],
                         capture_output=True, text=True, env=token_env(), timeout=300, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "all nodes read 120 files"
    workers = [n for n in cluster.nodes if n.cpus and n.raylet() is not None]
    assert re.fullmatch(r"data.pipeline is stream, but the Ray node \S+ \((\w{8})\) cannot read 1 of the 120 image "
                        r"files \(first: \S+\.png\)\. Put the images on a file system every node mounts at the same "
                        r"path, or use data.pipeline: memory .*", lines[1])
    assert re.search(r"\((\w{8})\)", lines[1]).group(1) in {n.node_id[:8] for n in workers}
