"""Ray Tune + Optuna: start (or join) Ray, prepare the teacher once, run or resume the trials.

Optuna's TPE (seeded, multivariate over the conditional space, constant-liar for parallel trials) picks
each trial's hyperparameters through `OptunaSearch`; ASHA stops weak trials early. Everything a search
writes lives in `results/<name>/` (Ray's experiment in `ray/`, or under `--storage` on a cluster).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from kd.files import atomic_write_json
from search.format import shown
from kd.config import Config, load_config, save_config
from kd.errors import Interrupted, UserError
from search.space import DefineByRun, check_points, check_searched_models, parse_space

log = logging.getLogger("search")


def run_dir_of(cfg: Config) -> Path:
    return (Path(cfg.output_dir) / cfg.name).absolute()


def experiment_path(cfg: Config, run_dir: Path, storage: str | None = None) -> str:
    root = storage or cfg.search.storage or str(run_dir)
    if "://" in root:
        return root.rstrip("/") + f"/{cfg.name}/ray"
    return str(Path(root).absolute() / ("ray" if Path(root).absolute() == run_dir else f"{cfg.name}/ray"))


@contextlib.contextmanager
def exclusive(run_dir: Path) -> Iterator[None]:
    """Only one search per run directory: a second one refuses with a clear message. A directory made here and
    left holding nothing but the lock (the search could not start) is removed again."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".search.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"{run_dir} is in use by another search ({holder}); wait for it, or use another "
                            "name (--set name=...)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            if created and [p.name for p in run_dir.iterdir()] == [path.name]:
                path.unlink()
                run_dir.rmdir()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _should_resume(cfg: Config, run_dir: Path, exp_path: str, resume: bool) -> bool:
    from ray.tune import Tuner
    saved_path = run_dir / "config.yaml"
    restorable = saved_path.exists() and Tuner.can_restore(exp_path)
    if not restorable:
        if resume:
            raise UserError(f"nothing to resume in {run_dir}: no interrupted search was found there")
        return False
    saved = load_config(saved_path)
    if saved != cfg:
        a, b = _flat(saved.to_dict()), _flat(cfg.to_dict())
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise UserError(f"{run_dir} holds a search with a different config (changed: {', '.join(changed[:8])}). "
                        "Run it with the same config to resume, or choose another name (--set name=...)")
    return True


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "space":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def start_ray(address: str | None, quiet: bool) -> bool:
    """Join `address` (auto, or ray://HOST:10001) or start Ray on this machine. Returns True if we started it."""
    import ray
    if ray.is_initialized():
        return False
    # Trial output stays in the trial folders; the console gets one line per trial (search.progress).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # its "silent" mode still prints boxes and tracebacks
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                                  configure_logging=True)
    # Failed trials get one line from search.progress and their error in trials.csv; not a traceback here.
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if address:
        import kd
        import search
        kwargs["runtime_env"] = {"py_modules": [os.path.dirname(kd.__file__), os.path.dirname(search.__file__)]}
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"could not join the Ray cluster at {address}: {e}. Is its head running (`ray status` "
                            "there)? Heads use token authentication by default since Ray 2.59, and Ray sends the "
                            "token to an explicit address only with RAY_AUTH_MODE=token set here (the token from "
                            "RAY_AUTH_TOKEN or ~/.ray/auth_token, copied from the head)") from None
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)  # its own Ray, even beside a running head
    return True


def prepare_teacher_once(cfg: Config, data: Any, epochs: int) -> Any:
    """Fine-tune (or find) the teacher and its logits once: here when this machine has the best device for
    it (a local GPU, or a cluster without GPUs), else in a Ray task on a GPU node."""
    import ray
    import torch

    from kd.teacher import cached_teacher, prepare_teacher

    found = cached_teacher(cfg, data, epochs)  # no need to start anything for what is on disk
    if found is not None:
        return found
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    if torch.cuda.is_available() or cluster_gpus < 1:
        teacher = prepare_teacher(cfg, data, epochs=epochs, progress=False)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the trials get the GPU memory back
        return teacher
    gpus = 1
    cpus = max(1, min(int(ray.cluster_resources().get("CPU", 1)), os.cpu_count() or 1))

    @ray.remote
    def teacher_task(cfg_dict: dict, data: Any, epochs: int, threads: int) -> Any:
        import torch

        from kd.config import from_dict
        torch.set_num_threads(threads)
        return prepare_teacher(from_dict(cfg_dict), data, epochs=epochs, progress=False)

    return ray.get(teacher_task.options(num_gpus=gpus, num_cpus=cpus).remote(cfg.to_dict(), data, epochs, cpus))


def describe_teacher(teacher: Any) -> str:
    info = teacher.info
    ran = "found in the cache" if info["cached"] else f"fine-tuned in {info['finetune_seconds']:.1f} s"
    logits = (f"{info['forward_images']} forward passes cached its logits for {len(teacher.logits)} epochs of views"
              if info["forward_images"] else "its logits were cached already")
    return f"teacher {ran}, validation balanced accuracy {teacher.metrics['balanced_accuracy']:.4f}; {logits}"


def build_tuner(cfg: Config, data: Any, teacher_logits: Any, exp_path: str, restore: bool, quiet: bool):
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from search.trainable import distill_trainable

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = cfg.search
    gpus = s.gpus_per_trial if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if s.gpus_per_trial > 0 and gpus == 0:
        log.debug("no GPU in the cluster: trials run on CPUs")
    if gpus == 0 and ray.cluster_resources().get("GPU", 0) > 0:
        log.warning("GPUs are available but search.gpus_per_trial is 0: trials run on CPUs (try 0.25)")
    trainable = tune.with_resources(
        tune.with_parameters(distill_trainable, base=cfg.to_dict(), data=data, teacher_logits=teacher_logits,
                             checkpoint_every=s.checkpoint_every, threads=max(1, int(s.cpus_per_trial))),
        {"cpu": s.cpus_per_trial, "gpu": gpus})
    if restore:
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False)

    params = parse_space(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=s.seed, multivariate=True, group=True, constant_liar=True,
                                             n_startup_trials=min(10, max(4, s.num_samples // 3)))
    # The study lives beside the results (not in remote storage): Optuna's own tools can load it from there.
    journal = run_dir_of(cfg) / "optuna.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    searcher = OptunaSearch(space=DefineByRun(params, cfg), metric=s.metric, mode=s.mode,
                            points_to_evaluate=check_points(s.points, params, cfg) or None, sampler=sampler,
                            storage=storage, study_name=cfg.name)
    if s.scheduler == "asha":
        grace = min(s.grace_period, cfg.train.epochs)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs, grace_period=grace,
                                  reduction_factor=s.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=s.num_samples,
                                  metric=s.metric, mode=s.mode, max_concurrent_trials=s.max_concurrent or None,
                                  reuse_actors=True)
    root, name = os.path.split(exp_path.rstrip("/"))
    from search.progress import TrialLog
    run_config = tune.RunConfig(
        name=name, storage_path=root, verbose=0,
        callbacks=[TrialLog(run_dir_of(cfg), s.metric, s.mode, cfg.train.epochs, echo=not quiet)],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=s.max_failures))
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a cluster scheduler, `kill`) stops the search the way Ctrl-C does: cleanly, resumable."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_if_interrupted(cfg: Config, run_dir: Path, exp_path: str) -> None:
    """Tune returns normally after Ctrl-C; an unfinished experiment must not be reported as a finished one."""
    from search.analyze import load_run, load_trials
    _, local = load_run(run_dir)  # a local copy when the experiment lives in remote storage
    table, _ = load_trials(cfg, local, run_dir)
    finished = int(table["status"].isin(["completed", "stopped early", "failed"]).sum()) if len(table) else 0
    if finished < cfg.search.num_samples:
        raise Interrupted(f"search interrupted: {finished} of {cfg.search.num_samples} trials finished and saved in "
                          f"{run_dir}; unfinished trials resume from their last checkpoint")


def run_search(cfg: Config, address: str | None = None, storage: str | None = None, resume: bool = False,
               quiet: bool = False, echo: Callable[[str], None] = print) -> Path:
    """`kdsearch search`: the whole search, from the config to results/<name>/ with the best student exported."""
    import ray

    from kd.data import load_dataset
    from search.finalize import finalize

    params = parse_space(cfg)  # a bad space, point or model is reported before anything starts
    check_points(cfg.search.points, params, cfg)
    check_searched_models(cfg, params, weights=address is None)
    run_dir = run_dir_of(cfg)
    exp_path = experiment_path(cfg, run_dir, storage)
    with exclusive(run_dir):
        restore = _should_resume(cfg, run_dir, exp_path, resume)
        t0 = time.perf_counter()
        data = load_dataset(cfg.data, progress=not quiet)
        started = start_ray(address, quiet)
        try:  # written once the data is good and Ray is up: a search that cannot start leaves nothing behind
            save_config(cfg, run_dir / "config.yaml")
            run_info = {"experiment": exp_path, "resumed": restore, "classes": data.classes, "data": data.describe()}
            atomic_write_json(run_dir / "run.json", run_info)
            echo(f"preparing the teacher ({cfg.teacher.name}) once for all trials ...")
            teacher = prepare_teacher_once(cfg, data, cfg.train.epochs)
            echo(describe_teacher(teacher))
            atomic_write_json(run_dir / "teacher.json", {"metrics": teacher.metrics, "info": teacher.info,
                                                          "seconds": time.perf_counter() - t0})
            echo(("resuming" if restore else "starting") + f" the search: {cfg.search.num_samples} trials of "
                 f"{cfg.student.name}, optimising {cfg.search.metric} ({cfg.search.mode}); results in {shown(run_dir)}")
            tuner = build_tuner(cfg, data, teacher.logits, exp_path, restore, quiet)
            with sigterm_as_interrupt():
                tuner.fit()
            _raise_if_interrupted(cfg, run_dir, exp_path)
            atomic_write_json(run_dir / "run.json", {**run_info, "seconds": time.perf_counter() - t0})
            finalize(cfg, run_dir, data, teacher, echo=echo)
        finally:
            if started:
                ray.shutdown()
    return run_dir
