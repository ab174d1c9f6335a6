"""timm models as teacher or student: creation, weights, input normalisation, distillation heads.

`pretrained: true` takes timm's weights as timm gets them (kd.hub: the hub cache, else one download, on the
driver, when the model is checked), and a path loads a local file. `check_model` tries all of it on the meta
device before a run decodes an image or writes a file, so a typo costs a second, not a fine-tuned teacher.
"""
from __future__ import annotations

import difflib
import logging
import os
from typing import Any

import torch
from torch import nn

from kd.config import Config, DataConfig, ModelConfig, TeacherConfig
from kd.errors import UserError
from kd.hub import pretrained_file, source_config, source_folder, source_of

log = logging.getLogger("kd")


def create_model(cfg: ModelConfig, num_classes: int, image_size: int, role: str = "") -> nn.Module:
    """A timm model with `num_classes` outputs; ViT-style models are built for `image_size`.

    `cfg.pretrained`: false (random init), true (timm's own weights: kd.hub, never downloaded here) or a local
    file (safetensors or a torch checkpoint, loaded with weights_only=True); a classifier whose shape does
    not match is left freshly initialised. A name in timm's source syntax (`hf-hub:owner/repo[@revision]`,
    `local-dir:PATH`) is built from that model's config.json, and true takes its weights (kd.hub.source_folder).
    A teacher used without fine-tuning (`train.epochs: 0`) is refused when its classifier would be one of those
    (see `check_teacher_head`). `role` ("teacher", "student")
    names the config key in errors, as `check_model` does, for a caller whose real build is its check.
    """
    if cfg.pretrained is True:
        check_teacher_head(cfg, num_classes)
    hub_file = pretrained_file(cfg.name, role, download=False) if cfg.pretrained is True else None
    model = _build(cfg, num_classes, image_size, hub_file, role)
    if isinstance(cfg.pretrained, str) and cfg.pretrained:
        state = read_weights(cfg.pretrained, cfg.name)
        check_teacher_head(cfg, num_classes, model, state)
        load_weights(model, cfg.pretrained, cfg.name, state)
    return model


def check_models(cfg: Config, weights: bool = True, roles: tuple[str, ...] = ("teacher", "student"),
                 num_classes: int | None = None) -> None:
    """Fail fast on the teacher and the student of `cfg` (or those in `roles`), before any data is decoded or
    output written.

    `weights=False` skips the pretrained weights (true: they are downloaded here where not cached: kd.hub).
    `num_classes`: the data's class count where the caller knows it (a loaded dataset); otherwise it is taken
    from the config where that fixes it (`known_class_count`).
    """
    classes = num_classes or known_class_count(cfg.data)
    for role in roles:
        check_model(getattr(cfg, role), classes, cfg.data.image_size, role, weights)


def fetch_pretrained(cfg: Config, roles: tuple[str, ...] = ("teacher", "student")) -> None:
    """timm's weights for every model of `roles` with `pretrained: true`, downloaded now where they are not cached
    (kd.hub): a command does this first, so the models it builds never reach for the network."""
    for role in roles:
        model: ModelConfig = getattr(cfg, role)
        if model.pretrained is True:
            pretrained_file(model.name, role)
        elif source_of(model.name, f"{role}.name"):  # a named source's architecture: its config.json alone
            source_folder(model.name, role, weights=False)


def known_class_count(data: DataConfig) -> int | None:
    """The number of classes the data will have, where that is known before any file is decoded: digits (2),
    `data.classes`, or the class folders of a folder source's train split. None for a CSV without
    `data.classes` (its labels are known once the CSV is read), or a folder the data loader will refuse."""
    if data.source == "digits":
        return 2
    if data.classes:
        return len(data.classes)
    if data.source == "folder" and data.train is not None and os.path.isdir(data.train.path):
        root = data.train.path
        try:
            dirs = {d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))}
        except OSError:
            return None
        if len(dirs) >= 2 and not dirs <= {"train", "val", "valid", "validation", "test"}:
            return len(dirs)
    return None


def check_model(cfg: ModelConfig, num_classes: int | None, image_size: int, role: str, weights: bool = True) -> None:
    """Everything `create_model` would reject, found without building weights: the name, the input size
    (patch sizes), and the pretrained weights (in the hub cache, or a local file that fits the architecture).

    `num_classes` None: not known yet (any count builds the model; a teacher's head is checked by
    `create_model` once the data is loaded)."""
    classes = num_classes or 2  # the classifier's size matters only to `check_teacher_head`
    named = source_of(cfg.name, f"{role}.name")
    if named and not weights:
        return  # its architecture is in its config.json, which this check is not to fetch
    if num_classes and cfg.pretrained is True:
        check_teacher_head(cfg, num_classes, role=role)
    with torch.device("meta"):
        model = _build(cfg, classes, image_size, None, role, fetch=True)
    if not weights:
        return
    if cfg.pretrained is True:
        path = pretrained_file(cfg.name, role)  # downloaded here, once, if not cached
        if named:  # its weights must fit the architecture its config.json names (an ensemble export's do not)
            _matching(read_weights(path, cfg.name), model, path, cfg.name)
    elif isinstance(cfg.pretrained, str) and cfg.pretrained:
        state = read_weights(cfg.pretrained, cfg.name)
        _matching(state, model, cfg.pretrained, cfg.name)
        if num_classes:
            check_teacher_head(cfg, num_classes, model, state, role)


def check_teacher_head(cfg: ModelConfig, num_classes: int, model: nn.Module | None = None,
                       state: dict[str, torch.Tensor] | None = None, role: str = "teacher") -> None:
    """Refuse a teacher used as given (`train.epochs: 0`) whose pretrained classifier would not load.

    timm (for `pretrained: true`) and `load_weights` (for a file) keep a classifier only when it has exactly
    `num_classes` outputs; any other head is left randomly initialised, and a teacher that is not fine-tuned
    would then be a random classifier. For a file, `model` is the architecture (the meta device will do) and
    `state` the file's tensors. Students, and teachers that are fine-tuned, pass unchecked.
    """
    if not (isinstance(cfg, TeacherConfig) and cfg.train.epochs == 0) or cfg.pretrained is False:
        return
    import timm

    if cfg.pretrained is True:
        if source_of(cfg.name):
            outputs = source_config(cfg.name, role).get("num_classes")
        else:
            outputs = getattr(timm.models.get_pretrained_cfg(cfg.name), "num_classes", None)
        if outputs is None or outputs == num_classes:
            return  # no weights at all is pretrained_file's error to give
        whose = f"the pretrained classifier of '{cfg.name}' has {outputs} outputs"
    else:
        if model is None or state is None:
            return
        own = model.state_dict()
        keys = [f"{c}.{p}" for c in _classifier_names(model) for p in ("weight", "bias") if f"{c}.{p}" in own]
        if not keys or all(k in state and state[k].shape == own[k].shape for k in keys):
            return
        weight = state.get(keys[0])
        if weight is None:
            whose = f"{cfg.pretrained} has no classifier ({keys[0]}) for '{cfg.name}'"
        elif weight.ndim >= 1 and weight.shape[0] != num_classes:
            whose = f"the pretrained classifier of '{cfg.name}' in {cfg.pretrained} has {weight.shape[0]} outputs"
        else:
            whose = f"the classifier in {cfg.pretrained} does not fit '{cfg.name}'"
    key = f"{role or 'teacher'}.train.epochs"
    raise UserError(f"{key} is 0 (no fine-tuning) but {whose} and the data has {num_classes} classes: its head "
                    f"would be random. Fine-tune it ({key} >= 1) or give weights whose classifier has "
                    f"{num_classes} outputs")


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The module names of the model's classifier(s), as timm's pretrained config lists them (e.g. 'fc', or
    'head' and 'head_dist' for a distilled DeiT)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not names:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


def _build(cfg: ModelConfig, num_classes: int, image_size: int, hub_file: str | None, role: str = "",
           fetch: bool = False) -> nn.Module:
    """`fetch`: a model named by its source may be downloaded here (the driver's check), not only found."""
    import timm

    where = f"{role}.name: " if role else ""
    name = cfg.name
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_rate": cfg.drop_rate}
    if source_of(cfg.name, f"{role}.name" if role else "name"):
        # timm's own local-dir loading (its config.json's architecture and arguments; with weights, the classifier
        # reset where the classes differ), from the folder the hub cache, the driver or the user holds
        name = f"local-dir:{source_folder(cfg.name, role, download=fetch, weights=hub_file is not None)}"
        kwargs["pretrained"] = hub_file is not None
    elif not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
        raise UserError(f"{where}'{cfg.name}' is not a timm model name.{hint} (A model outside timm's registry: "
                        "hf-hub:owner/repo or local-dir:PATH.)")
    elif hub_file:  # timm's own loading (classifier reset, position-embedding resampling), from the cached file
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": hub_file})
    try:
        try:
            model = timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError as e:  # CNNs take any size and have no img_size argument
            if "img_size" not in str(e):
                raise
            model = timm.create_model(name, **kwargs)
    except Exception as e:
        if name != cfg.name:  # a model named by its source: its config.json or its weights file
            raise UserError(f"{where}could not build '{cfg.name}' from {name.removeprefix('local-dir:')} "
                            f"({type(e).__name__}: {e})") from None
        if not hub_file:
            raise
        raise UserError(f"could not load timm's pretrained weights for '{cfg.name}' from the cached file {hub_file} "
                        f"({type(e).__name__}: {e}); the file may be damaged: fetch it again where there is network, "
                        "or set pretrained to a weights file") from None
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        if image_size % int(patch):
            raise UserError(f"'{cfg.name}' cuts images into {patch}-pixel patches: data.image_size ({image_size}) "
                            f"must be a multiple of {patch}")
    return model


def read_weights(path: str, name: str) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or a torch checkpoint read with weights_only=True."""
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights file {path} (for '{name}') does not exist")
    state: Any  # a state dict, or a checkpoint that holds one
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        if "Weights only load failed" in str(e) or "weights_only" in str(e):
            why = ("it is not a plain checkpoint of tensors (kd-search loads weights only and never runs pickled "
                   "code; save the model's state_dict, or use safetensors)")
        else:
            why = f"{type(e).__name__}: {first}"
        raise UserError(f"cannot read weights from {path}: {why}") from None
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of weights")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items() if torch.is_tensor(v)}


def _matching(state: dict[str, torch.Tensor], model: nn.Module, path: str, name: str) -> dict[str, torch.Tensor]:
    """The tensors of `state` that fit `model` by name and shape; an error if most of the model is left out."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own) / 2:
        raise UserError(f"{path} does not look like weights for '{name}': only {len(usable)} of its "
                        f"{len(own)} tensors match by name and shape")
    return usable


def load_weights(model: nn.Module, path: str, name: str, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load a local checkpoint into `model` (`state`: its tensors, when already read), keeping only tensors
    whose names and shapes match."""
    usable = _matching(read_weights(path, name) if state is None else state, model, path, name)
    model.load_state_dict(usable, strict=False)
    fresh = sorted(set(model.state_dict()) - set(usable))
    if fresh:
        log.info("weights from %s: %d tensors loaded, %d left initialised (%s%s)", path, len(usable), len(fresh),
                 ", ".join(fresh[:4]), ", ..." if len(fresh) > 4 else "")


def mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation the model was built (or pretrained) with."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def is_distilled(model: nn.Module) -> bool:
    """DeiT-style students with a distillation token: two heads in training, their mean at inference."""
    return hasattr(model, "set_distilled_training")


def is_cnn(model: nn.Module) -> bool:
    """Convolutional enough to gain from channels_last (a ViT's single patch-embedding conv is not)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 2
