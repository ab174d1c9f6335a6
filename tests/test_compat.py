"""The adapters over Ray's, timm's and MLflow's private parts (kd/compat.py, search/compat.py): each works on the
installed versions, and its fallback works where the private name is gone. Importing kd changes nothing."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import kd.compat
import kd.files
from kd.compat import check_version, minor_version

ROOT = Path(__file__).resolve().parent.parent
DATA = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3}


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """Each test sees its own 'said once' warnings."""
    monkeypatch.setattr(kd.compat, "_warned", set())


def warnings_of(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and needle in r.getMessage()]


# ------------------------------------------------------------------------------------- versions

def _newest(tested: tuple[str, ...]) -> tuple[int, int]:
    return max((int(v.split(".")[0]), int(v.split(".")[1])) for v in tested)


def test_pyproject_caps_the_tested_releases_as_far_as_the_fallbacks_reach():
    """Ray and optuna: every private part used has a tested fallback, so the cap is the tested release's next major,
    and a fresh install may bring a newer minor release (Ray logs one warning for it; CI then tests it). timm and
    MLflow: capped just beyond the tested release, so the installed one is a tested one. pyproject.toml names each
    tested release."""
    import mlflow
    import timm

    from search.compat import MLFLOW_TESTED, OPTUNA_TESTED, RAY_TESTED
    assert minor_version(timm.__version__) in kd.compat.TIMM_TESTED
    assert minor_version(mlflow.__version__) in MLFLOW_TESTED
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11 and later)
    for name, tested in (("timm", kd.compat.TIMM_TESTED), ("ray", RAY_TESTED), ("optuna", OPTUNA_TESTED),
                         ("mlflow-skinny", MLFLOW_TESTED)):
        for release in tested:
            assert re.search(rf"{re.escape(name)} {re.escape(release)}\.\d+", pyproject), (name, release)
    for package, tested, next_major in (("ray[tune]", RAY_TESTED, True), ("optuna", OPTUNA_TESTED, True),
                                        ("timm", kd.compat.TIMM_TESTED, False),
                                        ("mlflow-skinny", MLFLOW_TESTED, False)):
        caps = set(re.findall(rf'"{re.escape(package)}[^"]*<\s*([\d.]+)"', pyproject))
        assert len(caps) == 1, (package, caps)
        cap = caps.pop()
        major, minor = _newest(tested)
        assert cap == (f"{major + 1}" if next_major else f"{major}.{minor + 1}"), (package, cap, tested)


def test_an_untested_version_is_said_once(caplog):
    assert check_version("timm", "1.0.31", ("1.0",))
    assert not check_version("timm", "1.4.0", ("1.0",)) and not check_version("timm", "1.4.1", ("1.0",))
    assert len(warnings_of(caplog, "timm 1.4.0 is not a version")) == 1
    assert not warnings_of(caplog, "1.0.31")


# ------------------------------------------------------------------------------------- no side effects at import

def test_importing_kd_leaves_the_backend_and_pyplot_alone_and_the_pictures_are_still_drawn(tmp_path):
    script = f"""
import sys, matplotlib
matplotlib.use("svg")
import kd, kd.files, kd.plots, kd.export, kd.cost
import search.plots
hist = [{{"epoch": 1, "train_loss": 1.0, "val_balanced_accuracy": 0.5}},
        {{"epoch": 2, "train_loss": 0.5, "val_balanced_accuracy": 0.8}}]
kd.plots.learning_curves({{"a": hist}}, {str(tmp_path / "curves.png")!r}, "title", "rule")
kd.plots.confusion_matrix([[5, 1], [2, 7]], ["x", "y"], {str(tmp_path / "cm.png")!r})
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("curves.png", "cm.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_importing_search_tracking_leaves_the_environment_alone():
    script = "import os, search.tracking; assert 'TUNE_DISABLE_AUTO_CALLBACK_LOGGERS' not in os.environ"
    env = {k: v for k, v in os.environ.items() if k != "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def umask():
    """Set the process's umask for a test, and put it back after."""
    before = os.umask(0o022)
    os.umask(before)
    yield lambda mask: os.umask(mask)
    os.umask(before)


def _modes(tmp_path: Path) -> tuple[int, int]:
    kd.files.atomic_write_text(tmp_path / "file.txt", "x")
    with kd.files.atomic_dir(tmp_path / "folder") as d:
        (d / "inner").write_text("y")
    return (tmp_path / "file.txt").stat().st_mode & 0o777, (tmp_path / "folder").stat().st_mode & 0o777


def test_outputs_follow_the_umask_of_the_moment_they_are_written(tmp_path, umask):
    umask(0o027)
    assert kd.files.current_umask() == 0o027 and _modes(tmp_path / "a") == (0o640, 0o750)
    umask(0o002)  # changed after kd was imported: the next output follows it
    assert kd.files.current_umask() == 0o002 and _modes(tmp_path / "b") == (0o664, 0o775)


def test_without_proc_the_umask_is_read_by_setting_it_back_and_is_left_as_it_was(tmp_path, umask, monkeypatch):
    monkeypatch.setattr(kd.files, "_PROC_STATUS", str(tmp_path / "no-proc"))
    umask(0o027)
    results = []
    threads = [threading.Thread(target=lambda: results.append(kd.files.current_umask())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0o027] * 8
    assert _modes(tmp_path / "a") == (0o640, 0o750)
    assert os.umask(0o027) == 0o027  # left as it was


# ------------------------------------------------------------------------------------- timm: config.json

def _model(name: str, **kwargs):
    import timm
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=2, drop_rate=0.1, **kwargs).eval()


def _timm_loads(folder: Path, model) -> None:
    """timm builds the model from the folder (config.json and the weights) with the same outputs."""
    import timm
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert loaded.pretrained_cfg["label_names"] == ["a", "b"]
    data = timm.data.resolve_data_config({}, model=loaded)
    assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == 1.0 and data["interpolation"] == "bilinear"
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# resnet18: a source config with test-time sizes, which an export's input processing replaces
MODELS = [("test_resnet", {}), ("test_vit", {"img_size": 32}), ("test_efficientnet", {}), ("resnet18", {})]


@pytest.mark.parametrize("name, kwargs", MODELS)
def test_timm_config_on_the_installed_timm_is_timms_own(tmp_path, caplog, name, kwargs):
    from timm.models._hub import save_config_for_hf
    model = _model(name, **kwargs)
    kd.compat.save_timm_config(model, tmp_path / "config.json", {"label_names": ["a", "b"]}, DATA)
    save_config_for_hf(model, str(tmp_path / "timm.json"), model_config={"label_names": ["a", "b"]}, data_config=DATA)
    assert (tmp_path / "config.json").read_text() == (tmp_path / "timm.json").read_text()
    assert not warnings_of(caplog, "save_config_for_hf")
    _timm_loads(tmp_path, model)


@pytest.mark.parametrize("name, kwargs", MODELS)
def test_timm_config_without_the_private_function_is_the_same_file(tmp_path, caplog, monkeypatch, name, kwargs):
    import timm.models._hub
    model = _model(name, **kwargs)
    timm.models._hub.save_config_for_hf(model, str(tmp_path / "timm.json"), model_config={"label_names": ["a", "b"]},
                                        data_config=DATA)
    monkeypatch.delattr(timm.models._hub, "save_config_for_hf")
    for _ in range(2):
        kd.compat.save_timm_config(model, tmp_path / "config.json", {"label_names": ["a", "b"]}, DATA)
    assert (tmp_path / "config.json").read_text() == (tmp_path / "timm.json").read_text()
    assert len(warnings_of(caplog, "has no timm.models._hub.save_config_for_hf")) == 1
    _timm_loads(tmp_path, model)


def test_timm_config_of_an_older_private_function_without_data_config_is_the_fallback(tmp_path, caplog, monkeypatch):
    import timm.models._hub
    model = _model("test_resnet")
    timm.models._hub.save_config_for_hf(model, str(tmp_path / "timm.json"), model_config={"label_names": ["a", "b"]},
                                        data_config=DATA)

    def older(model, config_path, model_config=None, model_args=None):  # timm 1.0.x before data_config
        raise AssertionError("the older function would write the source checkpoint's input processing")

    monkeypatch.setattr(timm.models._hub, "save_config_for_hf", older)
    kd.compat.save_timm_config(model, tmp_path / "config.json", {"label_names": ["a", "b"]}, DATA)
    assert (tmp_path / "config.json").read_text() == (tmp_path / "timm.json").read_text()
    assert len(warnings_of(caplog, "save_config_for_hf(..., data_config)")) == 1
    _timm_loads(tmp_path, model)


@pytest.mark.parametrize("name, kwargs", MODELS)
def test_timm_config_without_the_newer_public_helpers_still_loads(tmp_path, monkeypatch, name, kwargs):
    """An older timm (no save_config_for_hf, no get_model_args / get_model_input_config): a config timm reads."""
    import timm.models
    model = _model(name, **kwargs)
    for attr in ("get_model_args", "get_model_input_config"):
        monkeypatch.delattr(timm.models, attr)
    monkeypatch.delattr(timm.models._hub, "save_config_for_hf")
    kd.compat.save_timm_config(model, tmp_path / "config.json", {"label_names": ["a", "b"]}, DATA)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 2 and config["label_names"] == ["a", "b"]
    _timm_loads(tmp_path, model)


def test_an_export_writes_timms_config_through_the_adapter(tmp_path, monkeypatch):
    """kd.export goes through kd.compat: an export still loads in timm where the private function is gone."""
    import timm.models._hub

    from kd.export import write_timm_config
    model = _model("test_resnet")
    write_timm_config(model, tmp_path / "timm.json", ["a", "b"], 32)
    monkeypatch.delattr(timm.models._hub, "save_config_for_hf")
    write_timm_config(model, tmp_path / "config.json", ["a", "b"], 32)
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((tmp_path / "timm.json").read_text())


# ------------------------------------------------------------------------------------- Ray: the error printer

class _Subscriber:
    """What Ray's error listener polls: one published error, then the listener is told to stop."""

    def __init__(self, stop: threading.Event):
        self.stop, self.sent = stop, False

    def subscribe(self):
        pass

    def poll(self):
        if self.sent:
            self.stop.set()
            return None, None
        self.sent = True
        return None, {"job_id": None, "error_message": "A node was lost. Its raylet died."}


class _Job:
    def binary(self):
        return b"job"


class _Worker:
    def __init__(self, stop: threading.Event):
        self.gcs_error_subscriber, self.current_job_id = _Subscriber(stop), _Job()


def _listen_once() -> None:
    """Ray's own error listener (the loop its driver thread runs), on one published error."""
    from ray._private import worker
    stop = threading.Event()
    worker.listen_error_messages(_Worker(stop), stop)


def test_ray_printer_is_swapped_within_the_block_and_put_back(caplog):
    from ray._private import worker

    from search.compat import swap_ray_printer
    original = worker.print_to_stdstream
    seen = []
    with swap_ray_printer(lambda data, ignore_prefix=False: seen.append(data)) as swapped:
        assert swapped
        _listen_once()
    assert seen == [{"lines": ["A node was lost. Its raylet died."], "pid": "raylet", "is_err": False}]
    assert worker.print_to_stdstream is original
    with pytest.raises(RuntimeError), swap_ray_printer(seen.append):
        raise RuntimeError("the search failed")
    assert worker.print_to_stdstream is original and len(seen) == 1
    assert not warnings_of(caplog, "print_to_stdstream")


def test_without_rays_printer_nothing_is_swapped_and_it_is_said_once(caplog, monkeypatch):
    from ray._private import worker

    from search.compat import swap_ray_printer
    monkeypatch.delattr(worker, "print_to_stdstream")
    for _ in range(2):
        with swap_ray_printer(print) as swapped:
            assert swapped is False
            assert not hasattr(worker, "print_to_stdstream")
        assert not hasattr(worker, "print_to_stdstream")
    assert len(warnings_of(caplog, "no ray._private.worker.print_to_stdstream")) == 1


# ------------------------------------------------------------------------------------- Ray's MLflow callback

def _mlflow_callback(tmp_path: Path):
    from search.tracking import _mlflow_callback
    callback = _mlflow_callback()(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name="compat",
                                  tags={"kdsearch.run": str(tmp_path)})
    callback.setup()
    return callback


def _one_epoch(callback, trial, epoch: int) -> None:
    callback.log_trial_start(trial)
    callback.log_trial_result(epoch, trial, {"training_iteration": epoch, "val_accuracy": 0.5 + epoch / 10})
    callback.log_trial_end(trial)


def _runs(tmp_path: Path) -> list:
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("compat").experiment_id])


@pytest.fixture
def trial():
    from ray.tune.experiment import Trial
    return Trial("distill_trainable", config={"lr": 0.1}, trial_id="abcd1234", stub=True)


def test_mlflow_run_map_of_rays_callback_continues_a_resumed_trials_run(tmp_path, caplog, trial):
    from search.compat import mlflow_trial_runs
    first = _mlflow_callback(tmp_path)
    assert mlflow_trial_runs(first) == {}
    _one_epoch(first, trial, 1)
    assert list(mlflow_trial_runs(first)) == [trial]
    _one_epoch(_mlflow_callback(tmp_path), trial, 2)  # a resumed search: a new callback, the same trial
    runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].data.metrics["val_accuracy"] == pytest.approx(0.7)
    assert not warnings_of(caplog, "_trial_runs")


def test_without_the_run_map_mlflow_runs_as_with_rays_own_callback(tmp_path, caplog, monkeypatch, trial):
    from search.compat import mlflow_trial_runs
    callback = _mlflow_callback(tmp_path)
    runs = callback.__dict__.pop("_trial_runs")
    assert mlflow_trial_runs(callback) is None and mlflow_trial_runs(callback) is None
    assert len(warnings_of(caplog, "keeps no _trial_runs")) == 1
    callback._trial_runs = runs
    # the caller, given None, leaves Ray's callback to itself: a resumed trial gets a second run, nothing fails
    monkeypatch.setattr("search.tracking.mlflow_trial_runs", lambda callback: None)
    _one_epoch(_mlflow_callback(tmp_path), trial, 1)
    _one_epoch(_mlflow_callback(tmp_path), trial, 2)
    assert len(_runs(tmp_path)) == 2


# ------------------------------------------------------------------------------------- Ray's experiment files

def _state(exp: Path, session: str, trials: list) -> None:
    (exp / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": trials, "runner_data": {}}))


def test_trial_statuses_read_the_newest_experiment_state(tmp_path, caplog):
    """The newest state's word stands; a trial only an older one holds (a search that added trials ran a second
    Tune experiment in the folder) keeps its status there; an unreadable state is skipped, and said."""
    from search.compat import trial_statuses
    assert trial_statuses(tmp_path) == {}
    _state(tmp_path, "2026-01-01_10-00-00", [[json.dumps({"trial_id": "aaaa0000", "status": "RUNNING"}), "{}"],
                                             [json.dumps({"trial_id": "cccc2222", "status": "TERMINATED"}), "{}"]])
    _state(tmp_path, "2026-01-02_10-00-00", [
        [json.dumps({"trial_id": "aaaa0000", "status": "TERMINATED"}), json.dumps({"num_failures": 2})],
        json.dumps({"trial_id": "bbbb1111", "status": "ERROR"}),  # an older Ray's entry: the trial alone
    ])
    (tmp_path / "experiment_state-2026-01-03_10-00-00.json").write_text("{cut short")
    assert trial_statuses(str(tmp_path)) == {"aaaa0000": {"status": "TERMINATED", "failures": 2},
                                             "bbbb1111": {"status": "ERROR", "failures": 0},
                                             "cccc2222": {"status": "TERMINATED", "failures": 0}}
    assert warnings_of(caplog, "deriving them from the trial folders")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"trial_data": [["{}", "{}"]]}),
                                     json.dumps({"trial_data": [[json.dumps({"trial_id": "a"}), "[1]"]]})])
def test_trial_statuses_of_an_unreadable_state_are_none_and_said(tmp_path, caplog, content):
    from search.compat import trial_statuses
    (tmp_path / "experiment_state-2026-01-01_10-00-00.json").write_text(content)
    assert trial_statuses(tmp_path) == {}
    assert warnings_of(caplog, "deriving them from the trial folders")


def test_trial_folder_names(caplog):
    from search.compat import trial_folder_id
    name = "distill_trainable_0a1b2c3d_12_distill.mode=soft,lr=0.0100_2026-01-02_10-00-00"
    assert trial_folder_id(name) == ("0a1b2c3d", 12)
    assert trial_folder_id("distill_trainable_deadbeef_3_x=1_2026") == ("deadbeef", 3)
    assert not warnings_of(caplog, "not Ray's")
    assert trial_folder_id("my-own-folder") == ("my-own-folder", 0)
    assert trial_folder_id("another_folder") == ("another_folder", 0)
    assert len(warnings_of(caplog, "not Ray's")) == 1


# ------------------------------------------------------------------------------------- Ray's logger switch

def test_exact_loggers_sets_rays_switch_for_the_block_only(monkeypatch):
    from search.tracking import AUTO_LOGGERS_OFF, exact_loggers
    monkeypatch.delenv(AUTO_LOGGERS_OFF, raising=False)
    with exact_loggers():
        assert os.environ[AUTO_LOGGERS_OFF] == "1"
    assert AUTO_LOGGERS_OFF not in os.environ
    with pytest.raises(KeyboardInterrupt), exact_loggers():
        raise KeyboardInterrupt
    assert AUTO_LOGGERS_OFF not in os.environ
    monkeypatch.setenv(AUTO_LOGGERS_OFF, "0")  # the user's own setting comes back
    with exact_loggers():
        assert os.environ[AUTO_LOGGERS_OFF] == "1"
    assert os.environ[AUTO_LOGGERS_OFF] == "0"
    with exact_loggers(on=False):  # a resumed search: left as it is
        assert os.environ[AUTO_LOGGERS_OFF] == "0"
    assert os.environ[AUTO_LOGGERS_OFF] == "0"


@pytest.mark.slow
def test_on_a_real_ray_experiment(shared_search):
    """Ray's files as the installed Ray wrote them for a real search (the test run's shared one): each trial's status
    and failure count, and the trial ids and numbers in its folders' names. (That Ray adds no logger of its own within
    `exact_loggers`: tests/test_objectives.py, on a search that asks for none.)"""
    from search.compat import trial_folder_id, trial_statuses
    from tests.helpers import read_table
    cfg, run_dir, _ = shared_search
    exp = run_dir.parent.parent / "remote" / "tiny-search" / "ray"  # where search.storage put the experiment
    folders = sorted(p.parent for p in exp.glob("*/params.json"))
    ids = {trial_folder_id(f.name) for f in folders}
    statuses = trial_statuses(exp)
    assert len(folders) == cfg.search.num_samples and {trial for trial, _ in ids} == set(statuses)
    assert {n for _, n in ids} == set(range(1, len(folders) + 1))
    table = read_table(run_dir / "trials.csv").set_index("trial")
    for trial, status in statuses.items():
        failed = table.loc[trial, "status"] == "failed"
        assert status["status"] == ("ERROR" if failed else "TERMINATED")
        assert (status["failures"] >= 1) == failed  # Ray counts the failure it did not retry (search.max_failures)


@pytest.fixture
def sleepers():
    """Makes stand-ins for a Ray node's processes (each a sleeping child of this test); every one is gone after it."""
    made: list[subprocess.Popen] = []

    def make() -> subprocess.Popen:
        made.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
        return made[-1]

    yield make
    for p in made:
        if p.poll() is None:
            p.kill()
        p.wait()


def _ray_node(processes: dict):
    """The installed Ray's own Node, as `ray.init` keeps it, without starting one: `processes` (kind -> process)
    stand for what it started."""
    from ray._private.node import Node
    from ray._private.services import ProcessInfo
    node = Node.__new__(Node)
    node.removal_lock = threading.Lock()
    node.all_processes = {kind: [ProcessInfo(process=p, stdout_file=None, stderr_file=None, use_valgrind=False,
                                             use_gdb=False, use_valgrind_profiler=False, use_perftools_profiler=False,
                                             use_tmux=False)] for kind, p in processes.items()}
    return node


def test_started_ray_node_on_the_installed_ray_watches_its_gcs_and_raylet_and_stops_it(caplog, monkeypatch,
                                                                                      sleepers):
    from ray._private import ray_constants, worker

    from search.cluster import ended_if_ray_dies
    from search.compat import started_ray_node
    assert (ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET) == ("gcs_server", "raylet")
    monkeypatch.setattr(worker, "_global_node", None)  # (the attribute must be there) no Ray started here
    assert started_ray_node() is None
    gcs, raylet, monitor = sleepers(), sleepers(), sleepers()
    node = _ray_node({"gcs_server": gcs, "raylet": raylet, "log_monitor": monitor})
    monkeypatch.setattr(worker, "_global_node", node)
    found = started_ray_node()
    assert found is not None and found.processes == [("gcs_server", gcs), ("raylet", raylet)]
    gcs.kill()
    gcs.wait()
    found.kill()  # as the watcher does once the GCS is gone: the rest of the runtime, a dead process no error
    assert raylet.poll() is not None and monitor.poll() is not None and node.all_processes == {}
    assert not warnings_of(caplog, "_global_node")

    # the watcher in search/cluster.py on it: the raylet dies within the block -> the node is stopped, exit 130
    raylet, monitor = sleepers(), sleepers()
    node = _ray_node({"gcs_server": sleepers(), "raylet": raylet, "log_monitor": monitor})
    monkeypatch.setattr(worker, "_global_node", node)
    exits = []

    def _exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", _exit)
    with pytest.raises(SystemExit), ended_if_ray_dies(True, lambda cause: cause, poll_s=300):
        raylet.kill()
        raylet.wait()
    assert exits == [130] and monitor.poll() is not None and node.all_processes == {}


@pytest.mark.parametrize("node", ["missing", "no processes"])
def test_without_rays_global_node_the_search_runs_unwatched_and_it_is_said_once(caplog, monkeypatch, node):
    from ray._private import worker

    from search.cluster import ended_if_ray_dies
    from search.compat import started_ray_node
    if node == "missing":
        monkeypatch.delattr(worker, "_global_node")
    else:  # a Ray whose node keeps its processes otherwise
        monkeypatch.setattr(worker, "_global_node", object())
    assert started_ray_node() is None and started_ray_node() is None
    ran = []
    with ended_if_ray_dies(True, lambda cause: cause, poll_s=0.01):
        assert not [t for t in threading.enumerate() if t.name == "kd-search-ray-watch"]
        ran.append(True)
    assert ran == [True]
    assert len(warnings_of(caplog, "no ray._private.worker._global_node")) == 1


# ------------------------------------------------------------------------------------- Ray's OptunaSearch

def _optuna_search(cls=None, **kwargs):
    """Ray's OptunaSearch (or `cls`) over one float, on an in-memory Optuna study: driven here without Ray."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return (cls or OptunaSearch)(space={"x": optuna.distributions.FloatDistribution(0.0, 1.0)}, metric="score",
                                 mode="max", sampler=optuna.samplers.RandomSampler(seed=0), **kwargs)


def test_optuna_trial_of_rays_optuna_search_is_the_trial_its_study_asked_for(caplog):
    import optuna

    from search.compat import optuna_trial
    searcher = _optuna_search()
    params = searcher.suggest("t1")
    found = optuna_trial(searcher, "t1")
    assert found is not None and isinstance(found.study, optuna.Study) and isinstance(found.trial, optuna.Trial)
    assert found.trial.params == params and found.trial.number == 0
    assert optuna_trial(searcher, "unknown") is None
    found.trial.report(0.5, 1)
    found.study.tell(found.trial, state=optuna.trial.TrialState.PRUNED)
    found.told()
    assert optuna_trial(searcher, "t1") is None  # told: Ray's searcher knows it (and ignores a second telling)
    searcher.on_trial_complete("t1", {"score": 0.9, "training_iteration": 2})
    (trial,) = found.study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.value == 0.5
    assert not warnings_of(caplog, "_ot_trials")


class _Without:
    """`obj` as a Ray whose OptunaSearch lacks `name` shows it."""

    def __init__(self, obj, name: str):
        self._obj, self._name = obj, name

    def __getattr__(self, attr):
        if attr == self._name:
            raise AttributeError(attr)
        return getattr(self._obj, attr)


@pytest.mark.parametrize("name", ["_ot_trials", "_ot_study", "_completed_trials"])
def test_without_optuna_searchs_trials_a_stopped_trial_is_told_as_ray_tells_it_and_said_once(caplog, monkeypatch,
                                                                                             name):
    import optuna

    import search.compat
    import search.tuner
    searcher = _optuna_search()
    searcher.suggest("t1")
    monkeypatch.delattr(searcher, name)
    assert search.compat.optuna_trial(searcher, "t1") is None and search.compat.optuna_trial(searcher, "t1") is None
    assert len(warnings_of(caplog, "keeps no _ot_trials, _ot_study and _completed_trials")) == 1

    # search.tuner.Searcher over such a Ray: ASHA stops a trial at epoch 2 of 4
    def told(searcher):
        for trial_id, figures in (("t1", [0.8, 0.9]), ("t2", [0.5, 0.6, 0.65, 0.7])):
            searcher.suggest(trial_id)
            for epoch, value in enumerate(figures[:-1], start=1):
                searcher.on_trial_result(trial_id, {"score": value, "training_iteration": epoch})
            searcher.on_trial_complete(trial_id, {"score": figures[-1], "training_iteration": len(figures)})
            assert search.compat.optuna_trial(searcher, trial_id) is None  # told, and known to be
        return [(t.state, t.value, t.intermediate_values) for t in searcher._ot_study.trials]

    pruned, complete = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
    assert told(_optuna_search(search.tuner.Searcher, epochs=4)) == [(pruned, 0.9, {1: 0.8, 2: 0.9}),
                                                                      (complete, 0.7, {1: 0.5, 2: 0.6, 3: 0.65})]
    monkeypatch.setattr(search.tuner, "optuna_trial", lambda s, trial_id: search.compat.optuna_trial(
        _Without(s, name), trial_id))
    assert told(_optuna_search(search.tuner.Searcher, epochs=4)) == [(complete, 0.9, {1: 0.8}),
                                                                      (complete, 0.7, {1: 0.5, 2: 0.6, 3: 0.65})]
    assert len(warnings_of(caplog, "keeps no _ot_trials, _ot_study and _completed_trials")) == 1


# ------------------------------------------------------------------------------------- Tune's settings

def test_tune_settings_hold_for_the_block_only_and_a_users_own_value_is_kept(monkeypatch):
    from search.cluster import TUNE_SETTINGS, tune_settings
    sync, output = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "RAY_AIR_NEW_OUTPUT"
    assert set(TUNE_SETTINGS) == {sync, output}
    for name in TUNE_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    with tune_settings():
        assert {name: os.environ[name] for name in TUNE_SETTINGS} == TUNE_SETTINGS
    assert dict(os.environ) == before
    with pytest.raises(KeyboardInterrupt), tune_settings():
        raise KeyboardInterrupt
    assert dict(os.environ) == before
    monkeypatch.setenv(output, "1")  # the user's own: kept within, and after
    with tune_settings():
        assert os.environ[output] == "1" and os.environ[sync] == TUNE_SETTINGS[sync]
        os.environ[output] = "changed"  # (by Ray, say)
    assert os.environ[output] == "1" and sync not in os.environ


def test_starting_ray_leaves_the_environment_alone(monkeypatch):
    """(A search sets Tune's settings around its use of Ray: search.driver, within `tune_settings()`.)"""
    import ray

    from search.cluster import TUNE_SETTINGS, start_ray
    for name in TUNE_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    inits = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: inits.append(kwargs))
    levels = {name: logging.getLogger(name).level for name in ("ray.tune.execution.tune_controller", "ray.tune.tune")}
    before = dict(os.environ)
    try:
        assert start_ray(None) and inits[0]["address"] == "local"
    finally:  # start_ray quietens Tune's loggers: put back for the other tests
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert dict(os.environ) == before
