"""Shared fixtures: tiny timm models, small real images (scikit-learn's digits), caches in tmp dirs."""
from __future__ import annotations

import logging
import os
from collections.abc import Generator
from pathlib import Path

import pytest

# `make test` runs the suite in pytest-xdist workers, one per core: each worker's torch (and the kdsearch processes
# and Ray workers it starts) gets its share of the cores, so that two workers do not fight over both. A search still
# gives a task as many threads as its Ray has CPUs (a teacher's fine-tuning takes the node), and two threads beside
# the other worker's busy one spin-wait at each step while one of them waits for a core (OpenMP's default, made for a
# machine of one's own): the shared search's teachers took 107 s beside the other worker, 15 s alone. Passive waiting
# (set before torch loads its OpenMP runtime, and inherited by every process a test starts) gives the core back:
# a 2-thread fine-tuning beside a busy core took 4.0 s instead of 7.5 s, and 7 % longer than spinning when alone.
if (_workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from search.config import Config, load_config
from tests.helpers import tiny_overrides

if _workers > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(wrapper=True)  # a wrapper: its first half runs before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> Generator[None, None, None]:
    """Every test that reads the one shared search runs in the same xdist worker (`--dist loadgroup`), so that the
    search is made once per test run, not once per worker."""
    for item in items:
        if "shared_search" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("shared_search"))
    return (yield)


@pytest.fixture
def tiny_config(tmp_path) -> Config:
    return load_config(None, tiny_overrides(tmp_path / "cache", tmp_path / "results"))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the session: the digits decode and the tiny teacher are prepared once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def digits_setup(shared_cache):
    """(config, dataset, teacher) for the tiny digits distillation, shared by the tests that only read it."""
    from kd.data import load_dataset
    from kd.teacher import prepare_teacher
    cfg = load_config(None, tiny_overrides(shared_cache))
    data = load_dataset(cfg.data, progress=False)
    teacher = prepare_teacher(cfg, data, progress=False)
    return cfg, data, teacher


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="kd")


# The one search of a test run (`shared_search`): two students of different size under a budget both fit, a student
# that cannot run on these images and a learning rate that diverges; every trial a hand-picked point, so that what each
# test reads is the same from run to run. Failed trials are not retried here (search.max_failures=0): both failures
# would fail again, each in a new Ray worker process; the retries are tested where a retry can succeed
# (test_reliability, test_cluster).
SPACE = {
    # inception_v3 is a real timm model, but too deep for 32-px images: its trials raise in their first forward
    "student.name": {"type": "choice", "values": ["test_resnet", "test_efficientnet", "inception_v3"]},
    "distill.mode": {"type": "choice", "values": ["soft", "hard"]},
    "distill.temperature": {"type": "loguniform", "low": 1.0, "high": 20.0, "when": {"distill.mode": "soft"}},
    "train.lr": {"type": "loguniform", "low": 0.001, "high": 1e10},
}
POINTS = [
    {"student.name": "test_resnet", "distill.mode": "soft", "distill.temperature": 4.0, "train.lr": 0.003},
    {"student.name": "test_efficientnet", "distill.mode": "hard", "train.lr": 0.01},
    {"student.name": "inception_v3", "distill.mode": "soft", "distill.temperature": 4.0, "train.lr": 0.003},
    {"student.name": "test_resnet", "distill.mode": "soft", "distill.temperature": 2.0, "train.lr": 1e10},
]


def shared_search_config(tmp: Path, cache: Path) -> Config:
    """A small search whose experiment lives in 'remote' storage (file://, read through the same pyarrow
    filesystem layer as s3://); the reliability and soak tests cover the default local storage."""
    cfg = load_config(None, tiny_overrides(cache, tmp / "results") + [f"search.storage=file://{tmp / 'remote'}",
        "name=tiny-search", "search.num_samples=4", "search.grace_period=1", "search.confirm_seeds=2",
        "search.judge_seeds=1",
        "search.max_failures=0", "search.cpus_per_trial=1", "search.folds=2", "search.rerank=2",
        "search.max_params=400000", "search.loggers=[tensorboard,mlflow]"])
    return cfg.updated({"search.space": SPACE, "search.points": POINTS})


@pytest.fixture(scope="session")
def shared_search(tmp_path_factory) -> tuple[Config, Path, list[str]]:
    """(config, run directory, console lines) of the one search a test run makes, read by every test that only reads
    a finished search (test_search, test_compat, test_slots). Its own cache: its teachers are
    fine-tuned in it, so their placements are this search's."""
    import ray

    from search.driver import run_search
    tmp = tmp_path_factory.mktemp("search")
    cfg = shared_search_config(tmp, tmp / "cache")
    lines: list[str] = []
    run_dir = run_search(cfg, quiet=False, echo=lines.append)
    assert not ray.is_initialized()
    return cfg, run_dir, lines
