"""timm models as teacher or student: creation, weights, input normalisation, distillation heads."""
from __future__ import annotations

import difflib
import logging
import os

import torch
from torch import nn

from kd.config import ModelConfig
from kd.errors import UserError

log = logging.getLogger("kd")


def create_model(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """A timm model with `num_classes` outputs; ViT-style models are built for `image_size`.

    `cfg.pretrained`: false (random init), true (timm's own weights, from the hub cache or network) or a
    local file (safetensors or a torch checkpoint, loaded with weights_only=True); a classifier whose
    shape does not match is left freshly initialised.
    """
    import timm

    if not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
        raise UserError(f"'{cfg.name}' is not a timm model name.{hint}")
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop_rate)
    use_hub = cfg.pretrained is True
    try:
        try:
            model = timm.create_model(cfg.name, pretrained=use_hub, img_size=image_size, **kwargs)
        except TypeError as e:  # CNNs take any size and have no img_size argument
            if "img_size" not in str(e):
                raise
            model = timm.create_model(cfg.name, pretrained=use_hub, **kwargs)
    except UserError:
        raise
    except Exception as e:
        if use_hub:
            raise UserError(f"could not load timm's pretrained weights for '{cfg.name}' ({type(e).__name__}: {e}). "
                            "They come from the Hugging Face hub cache or the network; with neither, download them "
                            "elsewhere and set pretrained to the file's path.") from None
        raise
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        if image_size % int(patch):
            raise UserError(f"'{cfg.name}' cuts images into {patch}-pixel patches: data.image_size ({image_size}) "
                            f"must be a multiple of {patch}")
    if isinstance(cfg.pretrained, str) and cfg.pretrained:
        load_weights(model, cfg.pretrained, cfg.name)
    return model


def load_weights(model: nn.Module, path: str, name: str) -> None:
    """Load a local checkpoint into `model`, keeping only tensors whose names and shapes match."""
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights file {path} (for '{name}') does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights from {path}: {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of weights")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items() if torch.is_tensor(v)}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own) / 2:
        raise UserError(f"{path} does not look like weights for '{name}': only {len(usable)} of its "
                        f"{len(own)} tensors match by name and shape")
    model.load_state_dict(usable, strict=False)
    fresh = sorted(set(own) - set(usable))
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
