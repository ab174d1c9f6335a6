"""Searches on a real multi-node Ray cluster on this machine: a head without GPUs and two worker nodes that
declare one GPU each (tests/localcluster.py, `ray start` processes, token authentication as Ray >= 2.59 sets it).

The search runs as a user runs it, `kdsearch search CONFIG --address HOST:PORT` in its own process; a worker
node is killed with SIGKILL while its trials run. bench/cluster.py repeats the kill at random moments.
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from kd.files import read_jsonl
from search.cli import main
from search.config import load_config
from search.records import STATE_FILE
from tests.helpers import digits_folder, read_table, tiny_overrides, trial_results
from tests.localcluster import LocalCluster, token_env

pytestmark = [pytest.mark.slow, pytest.mark.cluster,
              pytest.mark.skipif(torch.cuda.is_available(), reason="the worker nodes declare GPUs that are not there; "
                                 "on a machine with CUDA the teacher and trials would use a real one")]
TRIALS = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The tests' one cluster. Its worker nodes have a hub cache of their own and no hub at all (HF_HUB_OFFLINE), as
    on a cluster whose nodes cannot reach the internet: only the hub test reads weights there."""
    worker_home = tmp_path_factory.mktemp("worker-hf")
    with LocalCluster(workers=2, worker_cpus=2, worker_gpus=1,
                      worker_env={"HF_HOME": str(worker_home), "HF_HUB_OFFLINE": "1"}) as c:
        yield c


EPOCHS = 3
WAIT = 480  # seconds for a trial on the node to be killed to save its first checkpoint


@pytest.fixture(scope="module")
def lost_node_search(cluster, tmp_path_factory):
    """One search across the two GPU nodes, as a user runs it, with worker node 1 killed (SIGKILL to its raylet)
    once one of its trials has reported an epoch. Two folds and a fresh cache, so two teachers are fine-tuned,
    side by side in Ray tasks (and the refit's beside the trials);
    the GPU compute path (bf16 autocast, channels_last) forced on through the teacher, the trials, the re-ranking's
    tasks, the export and its test evaluation; quarter GPUs, so each node packs four trials."""
    tmp = tmp_path_factory.mktemp("cluster")
    folder = digits_folder(tmp / "digits", count=700, size=16)  # small: a CPU without bf16 units runs it ~5x fp32
    gpu_path = [f"{section}.{key}" for section in ("train", "teacher.train")
                for key in ("amp=bf16", "channels_last=always")]
    cfg = load_config(None, tiny_overrides(tmp / "cache", tmp / "results") + gpu_path + [
        "name=lost-node", f"search.num_samples={TRIALS}", "search.scheduler=none", "search.rerank=1",
        "search.confirm_seeds=1", "search.cpus_per_trial=0.5", "search.gpus_per_trial=0.25", "search.max_failures=2",
        "search.folds=2", "data.source=folder", f"data.train={folder}", "data.image_size=16",
        f"train.epochs={EPOCHS}"])
    config = tmp / "lost-node.yaml"
    config.write_text(cfg.to_yaml())
    storage = tmp / "shared-storage"
    victim = cluster.nodes[1]
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "search", str(config), "--address", cluster.address,
                             "--storage", str(storage)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp, env=token_env(), start_new_session=True)
    experiment = storage / "lost-node" / "ray"
    try:
        deadline = time.time() + WAIT  # a hang's limit, not a speed
        while not checkpointed_on(experiment, victim.node_id):
            if proc.poll() is not None:
                pytest.fail(f"the search ended (exit {proc.returncode}) before a trial on worker node 1 saved a "
                            f"checkpoint:\n{proc.stdout.read()}")
            if time.time() > deadline:
                proc.kill()
                pytest.fail(f"no trial on worker node 1 ({victim.node_id[:8]}) saved a checkpoint within {WAIT} s, so "
                            f"the node was not killed; the search said:\n{proc.communicate()[0]}")
            time.sleep(0.2)
        time.sleep(0.5)  # the checkpoint's folder is written before Ray's controller hears of it
        checkpointed = checkpointed_on(experiment, victim.node_id)  # these must resume; the others may start over
        cluster.kill(1)
        try:
            output, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"the search did not finish within 600 s of worker node 1's death:\n{proc.communicate()[0]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"returncode": proc.returncode, "output": output, "run_dir": tmp / "results" / "lost-node",
            "experiment": experiment, "victim": victim, "survivor": cluster.nodes[2], "checkpointed": checkpointed}


def checkpointed_on(experiment: Path, node_id: str) -> set[str]:
    """The trials still running on node `node_id` that have an epoch's checkpoint in shared storage. The node is
    killed only once there is one: an epoch reported is checkpointed by a later call to the trial's actor, so a
    trial on a node killed between the two loses that epoch by design and rightly starts again from epoch 1."""
    found = set()
    for trial_dir in experiment.glob("*/"):
        rows = read_jsonl(trial_dir / "result.json") if (trial_dir / "result.json").exists() else []
        if (rows and rows[-1].get("node") == node_id and rows[-1].get("epoch", EPOCHS) < EPOCHS
                and any(trial_dir.glob(f"checkpoint_*/{STATE_FILE}"))):
            found.add(rows[0]["trial_id"])
    return found


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_a_worker_node_killed_mid_search_loses_nothing(lost_node_search):
    s = lost_node_search
    assert s["returncode"] == 0, s["output"]
    table = read_table(s["run_dir"] / "trials.csv")
    assert len(table) == TRIALS and (table["status"] == "completed").all(), table[["trial", "status", "error"]]
    runs = trial_results(s["experiment"])
    victim, survivor = s["victim"].node_id, s["survivor"].node_id
    # the trials the dead node was running: they finished on the surviving node
    lost = {t for t, rows in runs.items() if any(r["node"] == victim for r in rows) and rows[-1]["node"] == survivor}
    assert lost, "no trial was running on the killed node"
    assert set(table["node"]) <= {victim, survivor}
    assert lost & s["checkpointed"], (lost, s["checkpointed"])
    for trial in lost:
        epochs = [r["epoch"] for r in runs[trial]]
        assert sorted(set(epochs)) == list(range(1, EPOCHS + 1)), epochs
        if trial in s["checkpointed"]:  # resumed from its checkpoint (one per epoch): never trained again from 1
            assert epochs.count(1) == 1, (trial, epochs)
    assert (table.set_index("trial").loc[sorted(lost), "failures"] >= 1).all()  # each counted as retried
    assert "will be retried" in s["output"] and "search interrupted" not in s["output"]
    best = json.loads((s["run_dir"] / "best" / "metrics.json").read_text())
    assert best["test"]["balanced_accuracy"] > 0.6  # a bf16-trained student, re-ranked, exported and tested
    rerank = json.loads((s["run_dir"] / "rerank.json").read_text())
    assert all(len(c["values"]) == 1 for c in rerank["candidates"])


def test_the_console_holds_kd_search_lines_only(lost_node_search):
    output, run_dir = lost_node_search["output"], lost_node_search["run_dir"]
    for noise in ("[state-dump]", "(raylet)", "Traceback", "WARNING", "(pid="):  # Ray's logs, heartbeats, dumps
        assert noise not in output, noise
    said = [line for line in output.splitlines() if line.startswith("Ray: ")]
    assert said and len(said) == len(set(said)) and all(len(line) < 400 for line in said)
    kept = (run_dir / "ray-errors.log").read_text()  # Ray's whole messages, the dead raylet's last log lines among them
    for line in said:
        assert line.removeprefix("Ray: ").split(" (Ray's message in")[0] in kept


def test_the_fold_teachers_ran_side_by_side_as_tasks_on_gpu_nodes(lost_node_search):
    """One teacher per fold, each once, in a Ray task holding a quarter of a GPU node's GPU (as a trial does), all
    submitted at once: their start and end times overlap, where one after another they could not."""
    teacher = json.loads((lost_node_search["run_dir"] / "teacher.json").read_text())
    assert not teacher["info"]["cached"] and teacher["info"]["finetune_seconds"] > 0
    placed = teacher["placement"]
    gpu_nodes = {n.node_id for n in (lost_node_search["victim"], lost_node_search["survivor"])}
    assert len(placed) == teacher["teachers"] == 2 and all(p["gpus"] == "0" and p["node"] in gpu_nodes for p in placed)
    spans = sorted((p["started"], p["ended"]) for p in placed)
    assert all(start < end for start, end in spans)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), spans


def test_quarter_gpus_pack_up_to_four_trials_on_each_gpu_node(lost_node_search):
    """From the trials' start and end times on each node (each span inside the time the trial held its quarter GPU):
    never a fifth trial on a node's one GPU, and trials sharing it at once, which whole GPUs per trial (one trial
    per node) would never show. Exactly four at once is not guaranteed: the trials start one after another, and
    on a slow machine the first can finish before the fourth starts."""
    spans: dict[str, dict[str, list[float]]] = {}  # node -> trial -> [first start there, last report there]
    for trial, rows in trial_results(lost_node_search["experiment"]).items():
        for r in rows:
            span = spans.setdefault(r["node"], {}).setdefault(trial, [r["attempt_started"], r["reported_at"]])
            span[0], span[1] = min(span[0], r["attempt_started"]), max(span[1], r["reported_at"])
        assert {r["gpus"] for r in rows} == {"0"} and {r["device"] for r in rows} == {"cpu"}
    gpu_nodes = {lost_node_search["victim"].node_id, lost_node_search["survivor"].node_id}
    assert set(spans) <= gpu_nodes, spans
    peaks = {node[:8]: max_overlap([tuple(v) for v in trials.values()]) for node, trials in spans.items()}
    assert all(peak <= 4 for peak in peaks.values()), (peaks, spans)  # 0.25 GPU and 0.5 of 2 CPUs each: four fit
    assert max(peaks.values()) >= 2, (peaks, spans)  # one GPU shared by trials at once: packed
    assert (lost_node_search["run_dir"] / "plots" / "timeline.png").is_file()


def test_results_land_where_storage_says_and_analyze_works_from_a_copy(lost_node_search, tmp_path):
    run_dir, experiment = lost_node_search["run_dir"], lost_node_search["experiment"]
    assert experiment.is_dir() and not (run_dir / "ray").exists()  # the experiment on --storage
    for name in ("optuna.journal", "trials.csv", "summary.md", "best/model.safetensors"):
        assert (run_dir / name).is_file(), name
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.copytree(experiment, copy / "ray")  # a user's copy of both: the run folder with the experiment in it
    (copy / "trials.csv").unlink()
    (copy / "run.json").write_text(json.dumps({**json.loads((copy / "run.json").read_text()),
                                               "experiment": str(tmp_path / "gone")}))
    assert main(["analyze", str(copy)]) == 0
    pd.testing.assert_frame_equal(read_table(run_dir / "trials.csv"), read_table(copy / "trials.csv"))


STREAM_CHECK = """
import sys
from pathlib import Path
from search.config import load_config
from kd.data import load_dataset
from kd.errors import UserError
from search.cluster import Resources, check_stream_files, start_ray
cfg = load_config(sys.argv[1])
data = load_dataset(cfg.data, progress=False)
assert data.train.images is None
start_ray(sys.argv[2])
check_stream_files(data, Resources(1, 0))  # every node with a CPU reads them: one file system here
print("all nodes read", len(data.train.paths) + len(data.val.paths) + len(data.test.paths), "files")
Path(data.train.paths[3]).unlink()  # as on a node that lacks the dataset
try:
    check_stream_files(data, Resources(1, 0))
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


def test_workers_without_the_hub_load_the_drivers_weights_file(cluster, tmp_path):
    """Worker nodes with their own empty hub cache and no hub at all (HF_HUB_OFFLINE) run a search whose teacher is
    a model published on the hub (hf-hub:owner/repo: its config.json and weights) and whose students start from
    timm's pretrained weights: the driver downloads each file once from the hub (a local stand-in) and hands them
    to the teacher's task and the trials. (After the lost-node search one worker node is left; run alone, both
    take trials.)"""
    from tests.hub import PUBLISHED, StandInHub, published, timm_weights
    folder = published(tmp_path / "published")
    weights = "timm/test_resnet.r160_in1k/model.safetensors"
    files = {weights: timm_weights("test_resnet", tmp_path / "served.safetensors"),
             **{f"{PUBLISHED}/{name}": (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}}
    with StandInHub(files) as hub:
        cfg = load_config(None, tiny_overrides(tmp_path / "cache", tmp_path / "results") + [
            "name=hub", "search.num_samples=2", "search.confirm_seeds=0", "search.cpus_per_trial=1",
            f"teacher.name=hf-hub:{PUBLISHED}", "teacher.pretrained=true", "student.pretrained=true",
            "teacher.train.epochs=1", "train.epochs=1"])
        config = tmp_path / "hub.yaml"
        config.write_text(cfg.to_yaml())
        env = {**token_env(), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "driver-hf")}
        run = subprocess.run([sys.executable, "-m", "search.cli", "search", str(config), "--address", cluster.address,
                              "--storage", str(tmp_path / "shared")], capture_output=True, text=True, cwd=tmp_path,
                             env=env, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert dict(hub.downloads) == {key: 1 for key in files}  # the driver's one download of each
    assert not list(Path(cluster.worker_env["HF_HOME"]).rglob("*.safetensors"))  # no worker downloaded or cached one
    table = read_table(tmp_path / "results" / "hub" / "trials.csv")
    assert (table["status"] == "completed").all()
    assert set(table["node"]) <= {n.node_id for n in cluster.nodes[1:]}
