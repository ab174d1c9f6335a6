"""Pretrained weights come from a local file or the existing hub cache, never the network; bad ones fail fast."""
from __future__ import annotations

import socket
import time

import pytest
import torch
from safetensors.torch import save_file

from kd.config import ModelConfig, load_config
from kd.errors import UserError
from kd.models import check_model, create_model

HUB_REPO = "models--timm--test_resnet.r160_in1k"  # where timm's download of test_resnet's weights would land


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty hub cache and torch hub folder, and any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("kd-search tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def _imagenet_test_resnet(seed: int = 3) -> dict[str, torch.Tensor]:
    import timm
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=1000).state_dict().items()}


def test_pretrained_true_loads_timms_weights_from_the_hub_cache(offline):
    weights = _imagenet_test_resnet()
    snapshot = offline / HUB_REPO / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file(weights, str(snapshot / "model.safetensors"))
    (offline / HUB_REPO / "refs").mkdir()
    (offline / HUB_REPO / "refs" / "main").write_text("0123abcd")

    model = create_model(ModelConfig("test_resnet", pretrained=True), 2, 32)
    state = model.state_dict()
    body = [k for k in weights if not k.startswith("fc.")]
    assert body and all(torch.equal(state[k], weights[k]) for k in body)  # the backbone is the cached one
    assert state["fc.weight"].shape[0] == 2  # timm's 1000-class head replaced by a fresh 2-class one
    check_model(ModelConfig("test_resnet", pretrained=True), 2, 32, "student")


def test_pretrained_true_without_a_cache_fails_at_once_and_says_what_to_do(offline):
    t0 = time.perf_counter()
    with pytest.raises(UserError) as err:
        check_model(ModelConfig("test_resnet", pretrained=True), 2, 32, "teacher")
    message = str(err.value)
    assert "teacher.pretrained" in message and "'test_resnet'" in message and "never downloads" in message
    assert str(offline) in message  # where it looked
    assert time.perf_counter() - t0 < 5  # no retries against an unreachable hub


def test_local_weights_file_round_trips_and_a_wrong_one_is_named(tmp_path):
    torch.manual_seed(0)
    trained = create_model(ModelConfig("test_resnet"), 2, 32)
    path = tmp_path / "teacher.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, path)
    loaded = create_model(ModelConfig("test_resnet", pretrained=str(path)), 2, 32)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in loaded.state_dict().items())

    other = tmp_path / "resnet18.safetensors"
    import timm
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18", num_classes=2).state_dict().items()},
              str(other))
    with pytest.raises(UserError, match=r"resnet18.safetensors does not look like weights for 'test_resnet'"):
        check_model(ModelConfig("test_resnet", pretrained=str(other)), 2, 32, "student")

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError) as err:
        check_model(ModelConfig("test_resnet", pretrained=str(text)), 2, 32, "student")
    assert "cannot read weights from" in str(err.value) and "\n" not in str(err.value)


def test_a_typo_in_the_student_fails_before_the_teacher_trains_or_anything_is_written(tmp_path):
    from kd.distill import run_distill
    from tests.conftest import tiny_overrides
    cfg = load_config(None, tiny_overrides(tmp_path / "cache", tmp_path / "results") + ["student.name=resnet_51"])
    with pytest.raises(UserError, match="student.name: 'resnet_51' is not a timm model name. Did you mean"):
        run_distill(cfg, progress=False)
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def test_a_vit_whose_patches_do_not_tile_the_image_is_refused():
    with pytest.raises(UserError, match="must be a multiple of 16"):
        check_model(ModelConfig("deit_tiny_distilled_patch16_224"), 2, 40, "student")
