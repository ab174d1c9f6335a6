"""The one place kd reaches into timm's internals, each use behind a version check and a tested fallback.

`save_timm_config` writes timm's `config.json` for a model with timm's private
`timm.models._hub.save_config_for_hf` (what timm's public `save_for_hf` and `push_to_hf_hub` call, but they
also write the weights or need the network). Where a timm lacks it, the same file is built from timm's public
pieces (`filter_pretrained_cfg`, `resolve_data_config`, `get_model_args`, the model's own attributes) and one
warning says so. tests/test_compat.py checks both paths write the same file on the installed timm.

`TIMM_TESTED` names the timm releases these adapters were tested with: a newer one logs one warning (and
pyproject.toml caps timm just beyond it). `check_version` and `warn_once` are shared with search/compat.py,
which holds the Ray and MLflow internals.
"""
from __future__ import annotations

import inspect
import json
import logging
import re
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("kd")

TIMM_TESTED = ("1.0",)  # major.minor; tests ran with timm 1.0.31
_warned: set[str] = set()


def warn_once(logger: logging.Logger, key: str, message: str, *args: Any) -> None:
    """Log `message` as a warning the first time `key` is seen in this process, never again."""
    if key in _warned:
        return
    _warned.add(key)
    logger.warning(message, *args)


def minor_version(version: str) -> str:
    """'2.60.0' -> '2.60', '1.0.31.dev0' -> '1.0' (the part a release may break internals in)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return f"{match.group(1)}.{match.group(2)}" if match else version


def check_version(package: str, installed: str, tested: tuple[str, ...], logger: logging.Logger = log) -> bool:
    """Whether `installed` (major.minor) is one of the `tested` releases; else one warning, and False."""
    if minor_version(installed) in tested:
        return True
    warn_once(logger, f"version:{package}", "%s %s is not a version kd-search was tested with (%s): the private "
              "parts of it that kd-search uses (see kd/compat.py, search/compat.py) may have changed",
              package, installed, ", ".join(f"{t}.x" for t in tested))
    return False


# ------------------------------------------------------------------------------------- timm

def _private_save_config() -> Any:
    """timm's `save_config_for_hf`, or None where this timm has none that takes a `data_config` (older timm
    releases had one without it, which writes the source checkpoint's input processing)."""
    try:
        from timm.models import _hub
    except ImportError:
        return None
    save = getattr(_hub, "save_config_for_hf", None)
    try:
        takes = save is not None and "data_config" in inspect.signature(save).parameters
    except (TypeError, ValueError):
        takes = False
    return save if takes else None


def save_timm_config(model: nn.Module, path: str | Path, model_config: dict[str, Any],
                     data_config: dict[str, Any]) -> None:
    """Write timm's config.json for `model` to `path`: what `timm.create_model("local-dir:DIR", pretrained=True)`
    builds the model from. `model_config` holds top-level fields (`label_names`), `data_config` the input
    processing (`input_size`, `crop_pct`, `interpolation`, `mean`, `std`)."""
    import timm

    check_version("timm", timm.__version__, TIMM_TESTED)
    save = _private_save_config()
    if save is not None:
        save(model, str(path), model_config=model_config, data_config=data_config)
        return
    warn_once(log, "timm:save_config_for_hf", "timm %s has no timm.models._hub.save_config_for_hf(..., data_config): "
              "config.json is built from timm's public pieces instead (kd/compat.py)", timm.__version__)
    Path(path).write_text(json.dumps(timm_config(model, model_config, data_config), indent=2))


def timm_config(model: nn.Module, model_config: dict[str, Any], data_config: dict[str, Any]) -> dict[str, Any]:
    """The fallback: the fields `save_config_for_hf` (timm 1.0.31) writes for kd-search's exports, from timm's
    public pieces. Where a public piece is missing, the field is read from the model directly."""
    import timm.models
    from timm.data import resolve_data_config

    model_config = deepcopy(model_config)
    source: dict[str, Any] = dict(getattr(model, "pretrained_cfg", {}))
    pretrained_cfg = deepcopy(timm.models.filter_pretrained_cfg({k: v for k, v in source.items() if k != "state_dict"},
                                                                remove_source=True, remove_null=True))
    current_input = _input_config(model)
    current_args = _model_args(model)
    pretrained_cfg.update(resolve_data_config(data_config, model=model, verbose=False))
    if data_config.get("input_size") is not None or data_config.get("img_size") is not None:
        pretrained_cfg.pop("test_input_size", None)
        pretrained_cfg.pop("test_pool_size", None)
    if data_config.get("crop_pct") is not None:
        pretrained_cfg.pop("test_crop_pct", None)
    pretrained_cfg["fixed_input_size"] = current_input["fixed_input_size"]
    pretrained_cfg["first_conv"] = current_input["first_conv"]
    pretrained_cfg["custom_load"] = False  # an export holds a native timm state dict
    pretrained_cfg.pop("label_offset", None)
    if tuple(pretrained_cfg["input_size"][1:]) != tuple(source["input_size"][1:]):
        pretrained_cfg["pool_size"] = None
    if pretrained_cfg.get("min_input_size"):
        pretrained_cfg["min_input_size"] = (current_input["input_size"][0], *pretrained_cfg["min_input_size"][1:])
    if model.num_classes != pretrained_cfg.get("num_classes"):
        for key in ("label_names", "label_descriptions", "label_offset"):
            pretrained_cfg.pop(key, None)
    pretrained_cfg["num_classes"] = model.num_classes
    config: dict[str, Any] = {"architecture": pretrained_cfg.pop("architecture"), "num_classes": model.num_classes,
                              "num_features": model.num_features}
    pool = _global_pool(model)
    if pool:
        config["global_pool"] = pool
    if model_config.get("label_names"):
        config["label_names"] = model_config.pop("label_names")
    if current_args:
        config["model_args"] = current_args
    config["pretrained_cfg"] = pretrained_cfg
    config.update(model_config)
    return json.loads(json.dumps(config))  # tuples as lists, as the file has them


def _global_pool(model: nn.Module) -> str | None:
    head = getattr(model, "head", None)
    for pool in (getattr(head, "global_pool", None), getattr(head, "pool_type", None),
                 getattr(model, "global_pool", None)):
        pool = getattr(pool, "pool_type", pool)
        if isinstance(pool, str):
            return pool
    return None


def _input_config(model: nn.Module) -> dict[str, Any]:
    import timm.models

    public = getattr(timm.models, "get_model_input_config", None)
    if public is not None:
        return dict(public(model))
    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", {}))
    return {"input_size": tuple(cfg.get("input_size", (3, 224, 224))),
            "fixed_input_size": cfg.get("fixed_input_size", False), "first_conv": cfg.get("first_conv")}


def _model_args(model: nn.Module) -> dict[str, Any]:
    import timm.models

    public = getattr(timm.models, "get_model_args", None)
    if public is not None:
        return dict(public(model))
    args: dict[str, Any] = {"num_classes": model.num_classes, "in_chans": _input_config(model)["input_size"][0]}
    pool = _global_pool(model)
    if pool is not None:
        args["global_pool"] = pool
    return args  # (a model of a fixed input size is rebuilt at pretrained_cfg's input_size)
