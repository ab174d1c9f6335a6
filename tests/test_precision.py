"""The GPU compute path (bf16 autocast, channels_last) forced on the CPU, so a dtype or memory-format mistake
fails here rather than first on a user's GPU; and "off" really is float32 throughout."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import yaml

from search.config import load_config
from tests.helpers import tiny_overrides


@contextlib.contextmanager
def stem_convs():
    """Every call of a 3-channel (stem) convolution, in any model, while the block runs: what it saw."""
    seen: list[dict] = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3:
            x = args[0]
            seen.append({"channels_last": x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                         "autocast": torch.is_autocast_enabled("cpu"), "out": output.dtype,
                         "params": {p.dtype for p in module.parameters()}, "training": module.training})

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def check(seen: list[dict], what: str, low: bool) -> None:
    assert seen, f"{what}: no stem convolution ran"
    for s in seen:
        assert s["params"] == {torch.float32}, (what, s)  # autocast, never .half(): the weights stay float32
        if low:
            assert s["channels_last"] and s["autocast"] and s["out"] == torch.bfloat16, (what, s)
        else:
            assert not s["channels_last"] and not s["autocast"] and s["out"] == torch.float32, (what, s)


@pytest.mark.parametrize("amp, channels_last", [("bf16", "always"), ("off", "off")])
def test_every_compute_path_uses_the_chosen_precision_and_memory_format(tmp_path, amp, channels_last):
    from kd.data import load_dataset
    from kd.infer import Runner, predict_probs
    from kd.models import mean_std
    from kd.student import evaluate_model, train_student
    from kd.teacher import prepare_teacher

    low = amp == "bf16"
    sets = [f"{section}.{key}={value}" for section in ("train", "teacher.train")
            for key, value in (("amp", amp), ("channels_last", channels_last))]
    cfg = load_config(None, tiny_overrides(tmp_path / "cache") + sets + ["teacher.train.epochs=2"])
    data = load_dataset(cfg.data, progress=False)

    with stem_convs() as seen:
        teacher = prepare_teacher(cfg, data, progress=False)  # fine-tuning, its validation, then its logits
    check([s for s in seen if s["training"]], "teacher fine-tuning", low)
    check([s for s in seen if not s["training"]], "teacher evaluation and logits", low)
    assert not teacher.info.cached and teacher.info.forward_images == cfg.train.epochs * len(data.train)
    assert torch.isfinite(teacher.logits).all() and teacher.logits.dtype == torch.float32
    assert teacher.metrics["balanced_accuracy"] > 0.6

    with stem_convs() as seen:
        result = train_student(cfg, data, teacher.logits, progress=False)
    check([s for s in seen if s["training"]], "student training", low)
    check([s for s in seen if not s["training"]], "validation after each epoch", low)
    assert result.status == "completed"
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    assert result.history[-1]["val_balanced_accuracy"] > 0.6, result.history[-1]
    assert all(p.dtype == torch.float32 for p in result.model.parameters())

    device = torch.device("cpu")
    with stem_convs() as seen:
        val = evaluate_model(result.model, data, "val", result.threshold, cfg)
        probs = Runner(result.model, device, amp, channels_last).split_probs(data, "test", 256)
        images = data.test.images[:100]
        direct = predict_probs(result.model, images, *mean_std(result.model), device, 64, amp, channels_last)
    check(seen, "evaluation", low)
    assert val["balanced_accuracy"] > 0.6
    assert probs.dtype == np.float32 and np.isfinite(probs).all()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5) and np.allclose(direct, probs[:100], atol=1e-6)


def test_auto_keeps_the_cpu_in_float32_and_a_cnn_channels_last():
    from kd.config import ModelConfig
    from kd.infer import Runner
    from kd.models import create_model
    vit = Runner(create_model(ModelConfig("test_vit"), 2, 32), torch.device("cpu"))  # a ViT gains nothing from it
    assert not vit.amp and not vit.channels_last
    run = Runner(create_model(ModelConfig("test_resnet"), 2, 32), torch.device("cpu"))  # amp, channels_last: auto
    assert not run.amp and run.channels_last
    with stem_convs() as seen:
        out = run(torch.rand(4, 3, 32, 32))
    assert seen and all(s["channels_last"] and not s["autocast"] and s["out"] == torch.float32 for s in seen)
    assert out.dtype == torch.float32


def test_an_older_config_with_boolean_switches_still_loads(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"train": {"amp": True, "channels_last": False},
                                    "teacher": {"train": {"amp": False, "channels_last": True}}}))
    cfg = load_config(path)
    assert (cfg.train.amp, cfg.train.channels_last) == ("auto", "off")  # true meant "where it helps": auto
    assert (cfg.teacher.train.amp, cfg.teacher.train.channels_last) == ("off", "auto")
    cfg = load_config(None, ["train.amp=false", "train.channels_last=True", "teacher.train.amp=bf16"])
    assert (cfg.train.amp, cfg.train.channels_last, cfg.teacher.train.amp) == ("off", "auto", "bf16")
    assert load_config(None, ["train.amp=off"]).updated({"train.amp": True}).train.amp == "auto"
    again = load_config(None, ["train.channels_last=always", "train.amp=off"])
    saved = yaml.safe_load(again.to_yaml())["train"]  # saved as the new words, and read back as them
    assert (saved["channels_last"], saved["amp"]) == ("always", "off")
    assert load_config(None, ["train.channels_last=on"]).train.channels_last == "auto"  # YAML's on is true


def test_teacher_info_describes_itself_and_round_trips_through_json():
    import json

    from kd.teacher import TeacherInfo
    made = TeacherInfo("abc", "resnet18", cached=False, finetune_seconds=12.34, logits_cached=False,
                       logit_seconds=2.1, forward_images=8616, logit_epochs=8)
    assert made.describe() == ("teacher resnet18 fine-tuned in 12.3 s; 8616 forward passes made its logits for 8 "
                               "epochs of views (2.1 s)")
    found = TeacherInfo("abc", "resnet18", cached=True, finetune_seconds=12.34, logits_cached=True, logit_epochs=8)
    assert found.describe() == "teacher resnet18 found in the cache; its logits too"
    back = TeacherInfo.from_dict(json.loads(json.dumps(made.to_dict())) | {"added_later": 1})
    assert back == made
