"""Shared fixtures: tiny timm models, small real images (scikit-learn's digits), caches in tmp dirs."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kd.config import Config, load_config
from tests.helpers import tiny_overrides


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
