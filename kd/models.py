"""timm models as teacher or student: creation, weights, input normalisation, distillation heads.

Pretrained weights never come from the network at run time: `pretrained: true` takes timm's weights
from the Hugging Face hub cache (or torch's hub checkpoint folder) where an earlier download left them,
and a path loads a local file. `check_model` tries all of it on the meta device before a run decodes an
image or writes a file, so a typo costs a second, not a fine-tuned teacher.
"""
from __future__ import annotations

import difflib
import logging
import os
from urllib.parse import urlparse

import torch
from torch import nn

from kd.config import Config, ModelConfig
from kd.errors import UserError

log = logging.getLogger("kd")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm publishes on the hub, preferred first


def create_model(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """A timm model with `num_classes` outputs; ViT-style models are built for `image_size`.

    `cfg.pretrained`: false (random init), true (timm's own weights, from the local hub cache) or a local
    file (safetensors or a torch checkpoint, loaded with weights_only=True); a classifier whose shape does
    not match is left freshly initialised.
    """
    hub_file = cached_pretrained_file(cfg.name) if cfg.pretrained is True else None
    model = _build(cfg, num_classes, image_size, hub_file)
    if isinstance(cfg.pretrained, str) and cfg.pretrained:
        load_weights(model, cfg.pretrained, cfg.name)
    return model


def check_models(cfg: Config, weights: bool = True, roles: tuple[str, ...] = ("teacher", "student")) -> None:
    """Fail fast on the teacher and the student of `cfg` (or those in `roles`), before any data is decoded or
    output written.

    `weights=False` skips the pretrained weights (on a Ray cluster the workers, not the driver, load them).
    """
    classes = len(cfg.data.classes) if cfg.data.classes else 2  # the classifier's size does not matter here
    for role in roles:
        check_model(getattr(cfg, role), classes, cfg.data.image_size, role, weights)


def check_model(cfg: ModelConfig, num_classes: int, image_size: int, role: str, weights: bool = True) -> None:
    """Everything `create_model` would reject, found without building weights: the name, the input size
    (patch sizes), and the pretrained weights (in the hub cache, or a local file that fits the architecture)."""
    with torch.device("meta"):
        model = _build(cfg, num_classes, image_size, None, role)
    if not weights:
        return
    if cfg.pretrained is True:
        cached_pretrained_file(cfg.name, role)
    elif isinstance(cfg.pretrained, str) and cfg.pretrained:
        _matching(read_weights(cfg.pretrained, cfg.name), model, cfg.pretrained, cfg.name)


def _build(cfg: ModelConfig, num_classes: int, image_size: int, hub_file: str | None, role: str = "") -> nn.Module:
    import timm

    where = f"{role}.name: " if role else ""
    if not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
        raise UserError(f"{where}'{cfg.name}' is not a timm model name.{hint}")
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop_rate)
    if hub_file:  # timm's own loading (classifier reset, position-embedding resampling), from the cached file
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": hub_file})
    try:
        try:
            model = timm.create_model(cfg.name, img_size=image_size, **kwargs)
        except TypeError as e:  # CNNs take any size and have no img_size argument
            if "img_size" not in str(e):
                raise
            model = timm.create_model(cfg.name, **kwargs)
    except Exception as e:
        if not hub_file:
            raise
        raise UserError(f"could not load timm's pretrained weights for '{cfg.name}' from the cached file {hub_file} "
                        f"({type(e).__name__}: {e}); the file may be damaged: fetch it again where there is network, or set "
                        "pretrained to a weights file") from None
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        if image_size % int(patch):
            raise UserError(f"'{cfg.name}' cuts images into {patch}-pixel patches: data.image_size ({image_size}) "
                            f"must be a multiple of {patch}")
    return model


def cached_pretrained_file(name: str, role: str = "") -> str:
    """The local file holding timm's pretrained weights for `name`; never downloads.

    Looks where timm's own downloads land: the Hugging Face hub cache (HF_HOME / HF_HUB_CACHE), then
    torch's hub checkpoint folder (TORCH_HOME) for weights timm fetches by URL.
    """
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    pcfg = timm.models.get_pretrained_cfg(name)
    looked = []
    if pcfg is not None and pcfg.hf_hub_id:
        repo, _, revision = pcfg.hf_hub_id.partition("@")
        for filename in ([pcfg.hf_hub_filename] if pcfg.hf_hub_filename else HUB_FILES):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        looked.append(f"the Hugging Face hub cache {constants.HF_HUB_CACHE} (repository {repo})")
    if pcfg is not None and pcfg.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(pcfg.url).path))
        if os.path.isfile(path):
            return path
        looked.append(path)
    key = f"{role}.pretrained" if role else "pretrained"
    if not looked:
        raise UserError(f"{key}: timm has no pretrained weights for '{name}'; set it to false or to a weights file")
    raise UserError(
        f"{key} is true but timm's weights for '{name}' are not on this machine (looked in "
        f"{' and '.join(looked)}); kd-search never downloads at run time. Fill the cache once where there is "
        f"network (python -c \"import timm; timm.create_model('{name}', pretrained=True)\", then copy the cache "
        f"here), or set {key} to a local weights file (.safetensors or .pth)")


def read_weights(path: str, name: str) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or a torch checkpoint read with weights_only=True."""
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights file {path} (for '{name}') does not exist")
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


def load_weights(model: nn.Module, path: str, name: str) -> None:
    """Load a local checkpoint into `model`, keeping only tensors whose names and shapes match."""
    usable = _matching(read_weights(path, name), model, path, name)
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


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
