"""One search session on its run directory: where it lives, one search at a time, start or resume, signals."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kd.errors import UserError
from search.config import Config, load_config
from search.records import (
    BEST,
    CONFIG,
    EVENTS,
    EXPERIMENT,
    JOURNAL,
    MLFLOW_DB,
    RAY_ERRORS,
    RERANK,
    RERANK_PROBS,
    TEACHER,
)

STALE = (JOURNAL, EVENTS, RERANK, RERANK_PROBS, TEACHER, BEST, EXPERIMENT, MLFLOW_DB, RAY_ERRORS)
log = logging.getLogger("search")


def run_dir_of(cfg: Config) -> Path:
    return (Path(cfg.output_dir) / cfg.name).absolute()


def experiment_path(cfg: Config, run_dir: Path, storage: str | None = None) -> str:
    """Where Ray keeps the experiment: `ray/` in the run directory, or NAME/ray under `--storage`."""
    root = storage or cfg.search.storage or str(run_dir)
    if "://" in root:
        return root.rstrip("/") + f"/{cfg.name}/{EXPERIMENT}"
    absolute = Path(root).absolute()
    return str(absolute / (EXPERIMENT if absolute == run_dir else f"{cfg.name}/{EXPERIMENT}"))


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


def should_resume(cfg: Config, run_dir: Path, exp_path: str, resume: bool) -> bool:
    """True when `run_dir` holds a search of this very config to continue (its unfinished trials resume). With
    `resume`, `search.num_samples` may be raised (the driver then adds the trials: search.tuner's `adding`); any
    other change refuses, saying why."""
    from ray.tune import Tuner
    saved_path = run_dir / CONFIG
    restorable = saved_path.exists() and Tuner.can_restore(exp_path)
    if not restorable:
        if resume:
            raise UserError(f"nothing to resume in {run_dir}: no interrupted search was found there")
        return False
    saved = load_config(saved_path)
    a, b = _flat(saved.to_dict()), _flat(cfg.to_dict())
    a["search.final"], b["search.final"] = saved.ships, cfg.ships  # auto, or the way it resolves to: the same search
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    more = b["search.num_samples"] - a["search.num_samples"]
    if changed == ["search.num_samples"] and more > 0:
        if resume:
            return True
        raise UserError(f"{run_dir} holds a search of {a['search.num_samples']} trials; to add {more} to it (the "
                        "study's TPE goes on from the trials so far), run the same command with --resume, or choose "
                        "another name (--set name=...)")
    if changed:
        grows = "" if more >= 0 else f" (search.num_samples can grow, not shrink: {a['search.num_samples']} planned)"
        raise UserError(f"{run_dir} holds a search with a different config (changed: {', '.join(changed[:8])})"
                        f"{grows}. Resuming continues the same search and may only raise search.num_samples: any "
                        "other change would judge the trials so far by settings they did not train with (and feed "
                        "TPE their figures as if they had). Run it with the same config, or choose another name "
                        "(--set name=...)")
    return True


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "space":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def set_aside_stale(run_dir: Path) -> Path | None:
    """A fresh search on a directory that holds an earlier, unresumable search's study, event log or results moves
    them into `stale-<time>/`: an old Optuna journal would otherwise feed the new TPE old observations (and run the
    hand-picked points twice), and an old record would be read as this search's."""
    stale = [run_dir / name for name in STALE if (run_dir / name).exists()]
    if not stale:
        return None
    target = run_dir / time.strftime("stale-%Y%m%d-%H%M%S")
    target.mkdir()
    for path in stale:
        os.replace(path, target / path.name)
    log.warning("%s held an earlier search that cannot be resumed (%s); moved to %s", run_dir,
                ", ".join(p.name for p in stale), target)
    return target


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a cluster scheduler, `kill`) stops the search the way Ctrl-C does: cleanly, resumable."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
