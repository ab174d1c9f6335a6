"""`data.workers`: 0 is one per core (at most 8), resolved in one place for the decoding threads and the streaming
workers."""
from __future__ import annotations

import os

import pytest

import kd.images
from kd.data import load_dataset
from kd.images import resolve_workers
from search.config import load_config
from tests.helpers import make_folder_dataset, tiny_overrides


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def test_zero_is_one_per_core_and_a_count_is_kept(monkeypatch):
    assert resolve_workers(0) == min(cores(), kd.images.MAX_AUTO_WORKERS) >= 1
    if hasattr(os, "sched_getaffinity"):  # a large node: capped, as several trials may stream on it at once
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
        assert resolve_workers(0) == kd.images.MAX_AUTO_WORKERS
    assert resolve_workers(3) == 3 and resolve_workers(64) == 64


def test_zero_is_one_per_core_the_process_may_run_on():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this system")
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert resolve_workers(0) == 1
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_decoding_threads_and_the_streaming_workers_are_the_same_count(tmp_path, monkeypatch, workers):
    threads = []
    real = kd.images.ThreadPoolExecutor

    def pool(max_workers):
        threads.append(max_workers)
        return real(max_workers=max_workers)

    monkeypatch.setattr(kd.images, "ThreadPoolExecutor", pool)
    root = make_folder_dataset(tmp_path / "images", {"a": 12, "b": 12})
    cfg = load_config(None, tiny_overrides(tmp_path / "cache") + ["data.source=folder", f"data.train={root}",
                                                                  "data.pipeline=stream", f"data.workers={workers}"])
    data = load_dataset(cfg.data, progress=False)
    assert threads and set(threads) == {data.workers} == {resolve_workers(workers)}
