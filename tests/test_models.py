"""Pretrained weights come from a local file, the hub cache or one download on the driver (tests/test_hub.py: from
a local stand-in for the hub); a model build never downloads; bad weights fail fast."""
from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import save_file

from kd.config import ModelConfig
from kd.errors import UserError
from kd.models import check_model, create_model
from search.config import load_config

HUB_REPO = "models--timm--test_resnet.r160_in1k"  # where timm's download of test_resnet's weights would land


@pytest.fixture
def network_attempts(monkeypatch):
    """Every attempt to look up a host, open a connection or download weights, recorded and refused (a library
    that swallows the refusal and retries still leaves its attempts here)."""
    import huggingface_hub
    import timm.models._hub
    attempts: list[str] = []

    def refusing(what):
        def refuse(*args, **kwargs):
            attempts.append(f"{what} {args[1:] if what.startswith('socket') else args} {kwargs}")
            raise AssertionError("kd-search tried to reach the network")
        return refuse
    monkeypatch.setattr(socket.socket, "connect", refusing("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refusing("socket.connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refusing("getaddrinfo"))
    for module in (huggingface_hub, huggingface_hub.file_download, timm.models._hub):
        monkeypatch.setattr(module, "hf_hub_download", refusing("hf_hub_download"))
    for module in (torch.hub, timm.models._hub):
        monkeypatch.setattr(module, "download_url_to_file", refusing("download_url_to_file"))
    return attempts


@pytest.fixture
def offline(monkeypatch, tmp_path, network_attempts):
    """An empty hub cache and torch hub folder, and any attempt to reach the network fails the test."""
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


def test_pretrained_true_offline_without_a_cache_fails_at_once_and_says_what_to_do(offline, network_attempts,
                                                                                   monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        check_model(ModelConfig("test_resnet", pretrained=True), 2, 32, "teacher")
    message = str(err.value)
    assert "teacher.pretrained" in message and "'test_resnet'" in message and "HF_HUB_OFFLINE is set" in message
    assert str(offline) in message  # where it looked
    assert "copy it here (HF_HOME), or set teacher.pretrained to a local weights file" in message  # the ways out
    assert network_attempts == []  # not one try, so no retries against an unreachable hub


def test_a_model_build_never_downloads(offline, network_attempts):
    """Only the check on the driver downloads; a build (in a Ray worker) takes the driver's file or the cache."""
    with pytest.raises(UserError, match="none were handed over by the driver"):
        create_model(ModelConfig("test_resnet", pretrained=True), 2, 32, "student")
    assert network_attempts == []


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
    from tests.helpers import tiny_overrides
    cfg = load_config(None, tiny_overrides(tmp_path / "cache", tmp_path / "results") + ["student.name=resnet_51"])
    with pytest.raises(UserError, match=r"student\.name: 'resnet_51' is not a timm model name\. Did you mean"):
        run_distill(cfg, progress=False)
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def test_a_vit_whose_patches_do_not_tile_the_image_is_refused():
    with pytest.raises(UserError, match="must be a multiple of 16"):
        check_model(ModelConfig("deit_tiny_distilled_patch16_224"), 2, 40, "student")


def _test_resnet_file(path, num_classes: int) -> str:
    import timm
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=num_classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _teacher_as_given(tmp_path, pretrained, *sets):
    from tests.helpers import tiny_overrides
    return load_config(None, tiny_overrides(tmp_path / "cache", tmp_path / "results") +
                       ["teacher.train.epochs=0", f"teacher.pretrained={pretrained}", *sets])


def test_a_teacher_used_as_given_needs_a_classifier_that_fits_the_data(tmp_path):
    from kd.models import check_models
    fits = _test_resnet_file(tmp_path / "two.safetensors", 2)
    check_models(_teacher_as_given(tmp_path, fits))  # digits: 2 classes, the file's head loads
    create_model(_teacher_as_given(tmp_path, fits).teacher, 2, 32)

    five = _test_resnet_file(tmp_path / "five.safetensors", 5)
    with pytest.raises(UserError) as err:
        check_models(_teacher_as_given(tmp_path, five))
    message = str(err.value)
    assert message.startswith("teacher.train.epochs is 0 (no fine-tuning) but the pretrained classifier of "
                              "'test_resnet'")
    assert "has 5 outputs and the data has 2 classes: its head would be random" in message
    assert "teacher.train.epochs >= 1" in message and "classifier has 2 outputs" in message and "\n" not in message
    check_models(_teacher_as_given(tmp_path, five, "teacher.train.epochs=1"))  # fine-tuned: a new head is fine
    check_models(_teacher_as_given(tmp_path, five, "data.classes=[a,b,c,d,e]", "data.source=csv",
                                   f"data.train={tmp_path / 'labels.csv'}"))  # 5 classes: the head loads

    # a CSV's classes are known only once it is read: the teacher is refused when it is built, before any training
    csv = _teacher_as_given(tmp_path, five, "data.source=csv", f"data.train={tmp_path / 'labels.csv'}")
    check_models(csv)
    with pytest.raises(UserError, match="has 5 outputs and the data has 2 classes"):
        create_model(csv.teacher, 2, 32)
    # a folder's classes are its class folders: known before any image is decoded
    for name in ("a", "b", "c"):
        (tmp_path / "ds" / name).mkdir(parents=True)
    with pytest.raises(UserError, match="has 5 outputs and the data has 3 classes"):
        check_models(_teacher_as_given(tmp_path, five, "data.source=folder", f"data.train={tmp_path / 'ds'}"))


def test_pretrained_true_as_given_is_refused_when_timms_head_has_other_classes(tmp_path):
    from kd.models import check_models
    cfg = _teacher_as_given(tmp_path, "true", "teacher.name=resnet18")
    with pytest.raises(UserError) as err:
        check_models(cfg, weights=False)  # known from timm's config, even where the weights are not loaded here
    assert str(err.value) == (
        "teacher.train.epochs is 0 (no fine-tuning) but the pretrained classifier of 'resnet18' has 1000 outputs "
        "and the data has 2 classes: its head would be random. Fine-tune it (teacher.train.epochs >= 1) or give "
        "weights whose classifier has 2 outputs")
    with pytest.raises(UserError, match="has 1000 outputs"):
        create_model(cfg.teacher, 2, 32)


def test_the_cli_refuses_a_random_teacher_head_with_one_line(tmp_path, capsys):
    from search.cli import main
    from tests.helpers import tiny_overrides
    five = _test_resnet_file(tmp_path / "five.safetensors", 5)
    sets = [a for s in tiny_overrides(tmp_path / "cache", tmp_path / "results") +
            ["teacher.train.epochs=0", f"teacher.pretrained={five}"] for a in ("--set", s)]
    for command in ("distill", "teacher"):
        assert main([command, "digits", *sets, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "teacher.train.epochs is 0" in err[0], err
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()
