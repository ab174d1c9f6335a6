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

def test_the_installed_versions_are_the_tested_ones_and_pyproject_caps_just_beyond_them():
    import mlflow
    import ray
    import timm

    from search.compat import MLFLOW_TESTED, RAY_TESTED
    assert minor_version(ray.__version__) in RAY_TESTED
    assert minor_version(timm.__version__) in kd.compat.TIMM_TESTED
    assert minor_version(mlflow.__version__) in MLFLOW_TESTED
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11 and later)
    for package, tested in (("ray[tune]", RAY_TESTED), ("timm", kd.compat.TIMM_TESTED),
                            ("mlflow-skinny", MLFLOW_TESTED)):
        caps = set(re.findall(rf'"{re.escape(package)}[^"]*<\s*([\d.]+)"', pyproject))
        assert len(caps) == 1, (package, caps)
        cap = caps.pop()
        major, minor = (int(x) for x in max(tested, key=lambda v: tuple(map(int, v.split(".")))).split("."))
        assert cap == f"{major}.{minor + 1}", (package, cap, tested)


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


def test_trial_statuses_read_the_newest_experiment_state(tmp_path):
    from search.compat import trial_statuses
    assert trial_statuses(tmp_path) == {}
    _state(tmp_path, "2026-01-01_10-00-00", [[json.dumps({"trial_id": "aaaa0000", "status": "RUNNING"}), "{}"]])
    _state(tmp_path, "2026-01-02_10-00-00", [
        [json.dumps({"trial_id": "aaaa0000", "status": "TERMINATED"}), json.dumps({"num_failures": 2})],
        json.dumps({"trial_id": "bbbb1111", "status": "ERROR"}),  # an older Ray's entry: the trial alone
    ])
    assert trial_statuses(str(tmp_path)) == {"aaaa0000": {"status": "TERMINATED", "failures": 2},
                                             "bbbb1111": {"status": "ERROR", "failures": 0}}


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
def test_on_a_real_ray_experiment(tmp_path, monkeypatch):
    """Ray's files as the installed Ray writes them: statuses, folder names; its switch honoured within the block."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    from search.compat import trial_folder_id, trial_statuses
    from search.tracking import AUTO_LOGGERS_OFF, exact_loggers

    def _failing_trainable(config):  # defined here: Ray's workers get it by value (they cannot import this file)
        if config["x"] > 0.5:
            raise ValueError("this trial fails")
        tune.report({"score": config["x"]})

    monkeypatch.delenv(AUTO_LOGGERS_OFF, raising=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        searcher = OptunaSearch(space={"x": optuna.distributions.CategoricalDistribution([0.25, 0.75])},
                                metric="score", mode="max", points_to_evaluate=[{"x": 0.25}, {"x": 0.75}])
        tuner = tune.Tuner(_failing_trainable, tune_config=tune.TuneConfig(search_alg=searcher, num_samples=2),
                           run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), verbose=0,
                                                     callbacks=[CSVLoggerCallback(), JsonLoggerCallback()]))
        with exact_loggers():
            tuner.fit()
        assert AUTO_LOGGERS_OFF not in os.environ
    finally:
        if started:
            ray.shutdown()
    exp = tmp_path / "exp"
    folders = sorted(p.parent for p in exp.glob("*/params.json"))
    assert len(folders) == 2
    assert not list(exp.rglob("events.out.tfevents*"))  # Ray added no TensorBoard logger of its own
    ids = {trial_folder_id(f.name) for f in folders}
    statuses = trial_statuses(exp)
    assert {trial for trial, _ in ids} == set(statuses) and {n for _, n in ids} == {1, 2}
    by_x = {json.loads((f / "params.json").read_text())["x"]: trial_folder_id(f.name)[0] for f in folders}
    assert statuses[by_x[0.25]]["status"] == "TERMINATED" and statuses[by_x[0.75]]["status"] == "ERROR"
    assert statuses[by_x[0.75]]["failures"] >= 1
