"""Ray: starting or joining it, what a trial or task may use, and running kd work as Ray tasks.

The one rule for resources lives here: a trial (and every task that trains like one: the re-ranking
runs, the refit) takes `search.cpus_per_trial` CPUs and, where the cluster has GPUs, `search.gpus_per_trial`
of one; torch inside it uses as many threads as it has CPUs. (The teachers: search.teachers.)
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kd.data import Dataset
from kd.errors import UserError
from kd.hub import Files, provide, shipped
from search.compat import started_ray_node, swap_ray_printer
from search.config import Config
from search.format import shown

log = logging.getLogger("search")


# Trial output stays in the trial folders; the console gets one line per trial (search.progress). Tune's "new
# output" ("silent" mode still prints boxes and tracebacks) and its warning about slow experiment-state syncs off.
TUNE_SETTINGS = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0", "RAY_AIR_NEW_OUTPUT": "0"}


@contextlib.contextmanager
def tune_settings() -> Iterator[None]:
    """Within the block (a search's use of Ray, from `start_ray` to its shutdown) the environment has
    `TUNE_SETTINGS`, where the user set no value of their own; after it, whatever happens, each variable is as it
    was before (unset, or the user's value)."""
    before = {name: os.environ.get(name) for name in TUNE_SETTINGS}
    for name, value in TUNE_SETTINGS.items():
        os.environ.setdefault(name, value)
    try:
        yield
    finally:
        for name, was in before.items():
            if was is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = was


def start_ray(address: str | None) -> bool:
    """Join `address` (auto, HOST:PORT or ray://HOST:10001) or start Ray on this machine. True if we started it.
    (A search calls it within `tune_settings()`.)"""
    if ray.is_initialized():
        return False
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


@contextlib.contextmanager
def ended_if_ray_dies(started: bool, message: Callable[[str], str], poll_s: float = 0.5) -> Iterator[None]:
    """A Ray runtime this process started (`started`) whose GCS server or raylet dies under it (killed from
    outside, the machine's OOM killer) would leave the driver waiting on the lost GCS, then ended by Ray's own
    "Failed to connect to GCS within 60 seconds ... The program will terminate", exit 1. Within this block a
    watcher thread sees either process end within `poll_s`; it then stops what is left of that runtime, prints
    `message(cause)` to stderr and exits 130, as an interrupted search does: the trials' reports and
    checkpoints are on disk, so the search resumes as after a killed driver. (Nothing in the driver can be
    trusted to return once the GCS is gone, so the watcher exits the process itself.) A joined cluster's GCS
    is another machine's and not watched. (Where this Ray does not tell its processes, search.compat.started_ray_node,
    nothing is watched, and Ray ends the search as it does.)"""
    node = started_ray_node() if started else None
    if node is None:
        yield
        return
    watched = node.processes
    stop = threading.Event()

    def dead() -> tuple[str, Any] | None:
        return next(((kind, p) for kind, p in watched if p.poll() is not None), None)

    def end(kind: str, process: Any) -> None:
        with contextlib.suppress(Exception):
            node.kill()
        cause = f"the Ray runtime this search started went away (its {kind}, pid {process.pid}, ended)"
        try:
            text = message(cause)
        except Exception as e:  # the records may be mid-write: the exit must still happen
            text = f"search interrupted: {cause} ({type(e).__name__} reading what finished)"
        sys.stdout.flush()
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        os._exit(130)

    def watch() -> None:
        while not stop.wait(poll_s):
            found = dead()
            if found and not stop.is_set():
                end(*found)

    thread = threading.Thread(target=watch, name="kd-search-ray-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        found = dead()
        if found:  # the driver saw Ray go first (a call to it raised): the same end, not its error
            end(*found)


@ray.remote(num_cpus=0)
def _unreadable(paths: list[str]) -> list[str]:
    """The files this node cannot open for reading."""
    return [p for p in paths if not (os.path.isfile(p) and os.access(p, os.R_OK))]


def check_stream_files(data: Dataset, resources: Resources) -> None:
    """With `data.pipeline: stream` the trials decode image files wherever Ray places them: every node that can
    run a trial (one with `resources`) must read the files the driver listed, at the same paths. Checked once,
    before any teacher or trial, by a task pinned to each such node; a node that cannot is named, with the ways
    out."""
    paths = [p for name in ("train", "val", "test") if data.split(name).images is None for p in data.split(name).paths]
    if not paths or not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if fits(n, resources)]
    checks = [_unreadable.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
              .remote(paths) for n in nodes]
    for node, bad in zip(nodes, ray.get(checks), strict=True):
        if bad:
            raise UserError(f"data.pipeline is stream, but the Ray node {node['NodeManagerAddress']} "
                            f"({node['NodeID'][:8]}) cannot read {len(bad)} of the {len(paths)} image files "
                            f"(first: {bad[0]}). Put the images on a file system every node mounts at the same "
                            "path, or use data.pipeline: memory (the driver then ships the decoded images to the "
                            "trials through Ray's object store)")


@contextlib.contextmanager
def ray_errors_to(path: Path, echo: Callable[[str], None]) -> Iterator[None]:
    """Ray's driver prints every error its cluster publishes (a lost node's missed heartbeats, a dead raylet's last
    log lines with its state dump) straight to the console, from a thread of its own, whatever `log_to_driver`
    says, and its loggers print their warnings and errors there with their tracebacks. Within this block each such
    message goes whole to `path`, and the console gets its first sentences on one line. (Ray has no setting for
    the first: its module-level printer is swapped, and put back after.)"""
    said: set[str] = set()

    def to_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        lines = [str(line) for line in data.get("lines", [])]
        # a full or vanished disk must not end Ray's listener thread: the console still gets its line
        with contextlib.suppress(OSError), open(path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ({data.get('pid', 'ray')})\n" + "\n".join(lines) + "\n")
        sentences = re.split(r"(?<=[.!?])\s+", " ".join(lines[0].split())) if lines else []
        headline = sentences[0] if sentences else ""
        for sentence in sentences[1:]:
            if len(headline) + len(sentence) > 100:
                break
            headline += " " + sentence
        if headline and headline not in said:  # Ray publishes some errors once per job: the console says it once
            said.add(headline)
            echo(f"Ray: {headline[:240]} (Ray's message in {shown(path)})")

    class ToLog(logging.Handler):
        """Ray's own Python loggers too (Tune's experiment-state sync failing once, with its traceback)."""

        def emit(self, record: logging.LogRecord) -> None:
            text = " ".join(record.getMessage().split())
            if record.exc_info and record.exc_info[0]:
                text = f"{text.rstrip(': ')}: {record.exc_info[0].__name__}."
            whole = self.format(record).splitlines()
            to_log({"lines": [text, *whole[1:]], "pid": record.name})

    ray_logger = logging.getLogger("ray")  # Ray's logging setup prints its records from there, to stderr
    handlers = ray_logger.handlers[:]
    ray_logger.handlers = [ToLog(logging.WARNING)]
    try:
        with swap_ray_printer(to_log):
            yield
    finally:
        ray_logger.handlers = handlers


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))

    def as_tune(self) -> dict[str, float]:
        return {"cpu": self.cpus, "gpu": self.gpus}


def trial_resources(cfg: Config) -> Resources:
    """What one trial (or a task training like one) asks Ray for: GPUs only where the cluster has them."""
    s = cfg.search
    return Resources(s.cpus_per_trial, s.gpus_per_trial if _cluster_gpus() > 0 else 0.0)


def _cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0


def trials_run_here() -> bool:
    """Whether every trial runs on this machine's CPU, as this process would: no CUDA here, and no Ray or every live
    node of the cluster on this machine (a local cluster's nodes too)."""
    if torch.cuda.is_available():
        return False
    if not ray.is_initialized():
        return True
    here = ray.util.get_node_ip_address()
    return all(node["NodeManagerAddress"] == here for node in ray.nodes() if node["Alive"])


def check_resources(cfg: Config) -> Resources:
    """A trial's resources, checked once per search: GPUs left idle are worth a warning."""
    if _cluster_gpus() > 0 and cfg.search.gpus_per_trial == 0:
        log.warning("GPUs are available but search.gpus_per_trial is 0: trials run on CPUs (try 0.25)")
    return trial_resources(cfg)


def fits(node: dict[str, Any], resources: Resources) -> int:
    """How many trials (or tasks) with `resources` node `node` (an entry of `ray.nodes()`) runs at once."""
    if not node["Alive"]:
        return 0
    have = node["Resources"]
    counts = [have.get("CPU", 0) / resources.cpus if resources.cpus else float("inf"),
              have.get("GPU", 0) / resources.gpus if resources.gpus else float("inf")]
    return int(min(counts) + 1e-9)


def trial_slots(resources: Resources) -> int | None:
    """How many trials with `resources` fit on the cluster's live nodes at once (each node counted on its own: a
    trial runs on one node); None when none fits yet (an autoscaling cluster: no limit, Tune's own pace). Tune
    starts one trial at a time under a searcher unless told this number, which fills a cluster's slots in seconds
    instead of one actor start after another. Counted when the search starts (a resumed search keeps it)."""
    slots = sum(fits(node, resources) for node in (ray.nodes() if ray.is_initialized() else []))
    return slots or None


def where() -> dict[str, str]:
    """The Ray node this process runs on and the GPU ids Ray gave it ("" on CPUs; a declared GPU is given like a
    real one)."""
    context = ray.get_runtime_context()
    return {"node": context.get_node_id(), "gpus": ",".join(map(str, context.get_accelerator_ids().get("GPU", [])))}


_SHIPPED: list[ray.ObjectRef | None] = []  # the weights files the search running here hands its tasks


@contextlib.contextmanager
def shipping(models: dict[str, bool]) -> Iterator[Files]:
    """Within this block every Ray task (`remote`, `call`) gets the driver's files for `models` (name -> whether its
    weights are loaded: kd.hub.shipped; a worker never downloads, and loads the very file the driver checked:
    kd.hub.provide); the files are yielded for the trials (which get them through tune.with_parameters)."""
    files = shipped(models)
    _SHIPPED.append(ray.put(files) if files else None)
    try:
        yield files
    finally:
        _SHIPPED.pop()


@ray.remote
def _task(fn: Callable[..., Any], threads: int, weights: Files | None, *args: Any,
          **kwargs: Any) -> Any:
    provide(weights)
    torch.set_num_threads(threads)
    try:
        return fn(*args, **kwargs)
    finally:  # Ray keeps the worker process for later tasks: the GPU memory this one cached goes back now
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def remote(fn: Callable[..., Any], resources: Resources, *args: Any, returns: int = 1, **kwargs: Any) -> Any:
    """Run `fn(*args, **kwargs)` as a Ray task with `resources`, torch using as many threads as it has CPUs: its
    result's reference, or with `returns` > 1 one reference per item of the tuple `fn` returns (each fetched, or
    dropped, on its own). Object references among the arguments arrive as their values (Ray resolves top-level
    arguments)."""
    weights = _SHIPPED[-1] if _SHIPPED else None
    return _task.options(num_cpus=resources.cpus, num_gpus=resources.gpus, num_returns=returns).remote(
        fn, resources.threads, weights, *args, **kwargs)


def call(fn: Callable[..., Any], resources: Resources, *args: Any, here: bool = False, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` as a Ray task where Ray runs, else (or with `here`) right here; with a trial's resources
    either way (the same threads: the same float sums, so a refit here gives the very student a task would)."""
    if ray.is_initialized() and not here:
        return ray.get(remote(fn, resources, *args, **kwargs))
    threads = torch.get_num_threads()
    torch.set_num_threads(resources.threads)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
