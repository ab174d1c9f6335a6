"""Real distillations on real images (scikit-learn's digits) with tiny timm models."""
import dataclasses
import gc
import json
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kd.distill import DistillMetrics, run_distill
from kd.errors import Diverged, UserError
from kd.evaluate import EvaluationRecord
from kd.export import export_student, load_graph, load_student
from kd.student import train_student
from kd.teacher import TeacherMeta, TeacherWork, cached_teacher, load_teacher_model, prepare_teacher
from search.cli import entry, main
from search.config import load_config
from tests.helpers import tiny_overrides


def test_teacher_is_cached_by_content_and_logits_extend(digits_setup):
    cfg, data, teacher = digits_setup
    assert teacher.logits.shape == (cfg.train.epochs, len(data.train), 2)
    assert teacher.metrics["balanced_accuracy"] > 0.6
    cfg = cfg.updated({"augment.seed": 4242})  # a view stream of this test's own: no other test extends its logits
    outer, inner = TeacherWork(), TeacherWork()
    with outer.counting():
        first = prepare_teacher(cfg, data, progress=False)
        assert first.key == teacher.key and first.info.cached  # the same weights, found
        assert not first.info.logits_cached and first.info.forward_images == cfg.train.epochs * len(data.train)
        with inner.counting():
            again = prepare_teacher(cfg, data, progress=False)
    assert again.info.cached and again.info.logits_cached and again.info.forward_images == 0
    assert outer.images == first.info.forward_images and inner.images == 0  # each count counts its own block alone
    assert torch.equal(again.logits, first.logits)
    longer = prepare_teacher(cfg, data, epochs=cfg.train.epochs + 2, progress=False)
    assert longer.info.cached and longer.info.forward_images == 2 * len(data.train)
    assert outer.images == first.info.forward_images  # done after its block: not counted
    assert torch.allclose(longer.logits[:cfg.train.epochs], first.logits)
    from kd.teacher import teacher_key
    assert teacher_key(cfg.updated({"teacher.train.lr": 0.001}), data) != teacher.key  # another teacher
    assert teacher_key(cfg.updated({"augment.seed": 7}), data) == teacher.key  # same teacher, new logits only


def test_the_teacher_caches_record_is_written_and_read_through_its_type(digits_setup, tmp_path):
    import shutil
    cfg, data, teacher = digits_setup
    meta = TeacherMeta.read(teacher.directory / "teacher.json")
    assert meta is not None and meta.name == "test_resnet" and meta.val_metrics == teacher.metrics
    assert meta.to_dict() == json.loads((teacher.directory / "teacher.json").read_text())
    assert meta.classes == data.classes and meta.fingerprint == data.fingerprint and len(meta.history) == 4
    assert load_teacher_model(cfg, data, teacher.directory)[1] == meta  # the weights file's header holds it too
    cache = tmp_path / "cache"
    copy = cache / "teacher" / teacher.key
    shutil.copytree(teacher.directory, copy)
    mine = cfg.updated({"data.cache_dir": str(cache)})
    found = cached_teacher(mine, data)
    assert found is not None and found.metrics == teacher.metrics
    assert found.info.finetune_seconds == meta.finetune_seconds
    raw = json.loads((copy / "teacher.json").read_text())
    (copy / "teacher.json").write_text(json.dumps({("validation" if k == "val_metrics" else k): v
                                                   for k, v in raw.items()}))
    with pytest.raises(UserError, match=r"teacher\.json: unknown field 'validation'"):
        cached_teacher(mine, data)
    (copy / "teacher.json").write_text(json.dumps(raw)[:40])  # cut short: a cache miss, as before
    assert cached_teacher(mine, data) is None


def test_a_trial_reports_the_teacher_work_of_its_own_steps_alone(monkeypatch):
    """search.trainable opens the trial's own count around each step: work inside its steps is reported, work
    outside them (another trial's, the driver's) is not."""
    import kd.teacher
    from search.records import TEACHER_WORK
    from search.trainable import DistillTrainable

    class Fitting:
        done = False
        result = SimpleNamespace(probs=None)  # no held-out predictions: no halves' figures

        def step(self):
            kd.teacher._count_forward(7)  # as kd.teacher._logits counts a forward pass
            return {"epoch": 1, "val_balanced_accuracy": 0.5}

    trial = object.__new__(DistillTrainable)  # no Ray: the trial's state as _begin and its first step leave it
    monkeypatch.setattr("search.trainable.placement", lambda device: {"attempt_started": 0.0})
    trial.checkpoint_epochs, trial.cost, trial.scheme = frozenset(), {}, SimpleNamespace(held=None)
    trial._begin({})
    trial.fitting = Fitting()
    kd.teacher._count_forward(100)  # outside the trial's steps
    assert trial.step()[TEACHER_WORK] == 7
    assert trial.step()[TEACHER_WORK] == 14
    trial._begin({})  # the next trial in this actor counts afresh
    trial.fitting = Fitting()
    assert trial.step()[TEACHER_WORK] == 7


def test_distill_and_evaluate_records_of_an_earlier_version_read_and_a_renamed_field_is_named(tmp_path):
    earlier = {"val": {"balanced_accuracy": 0.9}, "test": {"n": 3}, "threshold": None, "teacher_val": {},
               "epochs": 2, "seconds": 1.5,  # before `phases` and `cost`; its teacher before node, gpus, started
               "teacher": {"key": "k", "name": "resnet18", "cached": True, "finetune_seconds": 1.0,
                           "logits_cached": True, "logit_seconds": 0.0, "forward_images": 0, "logit_epochs": 2}}
    (tmp_path / "metrics.json").write_text(json.dumps(earlier))
    read = DistillMetrics.read(tmp_path / "metrics.json")
    assert read is not None and read.epochs == 2 and read.teacher and read.teacher.cached and read.phases == {}
    renamed = {("epoch" if k == "epochs" else k): v for k, v in earlier.items()}
    (tmp_path / "metrics.json").write_text(json.dumps(renamed))
    with pytest.raises(UserError, match=r"metrics\.json: unknown field 'epoch' \(did you mean 'epochs'\?\)"):
        DistillMetrics.read(tmp_path / "metrics.json")
    (tmp_path / "metrics.json").write_text(json.dumps({"model": "m", "data": "d", "accuracy": 1, "balanced_accuracy": 1,
                                                       "macro_f1": 1, "recall": {"a": 1}, "confusion_matrix": [[1]],
                                                       "n": 1, "threshold": None}))
    evaluated = EvaluationRecord.read(tmp_path / "metrics.json")
    assert evaluated is not None and evaluated.accuracy == 1.0 and evaluated.recall == {"a": 1.0}
    (tmp_path / "metrics.json").write_text(json.dumps({"model": "m", "data": "d"}))
    with pytest.raises(UserError, match=r"metrics\.json: not a EvaluationRecord record"):
        EvaluationRecord.read(tmp_path / "metrics.json")


def test_logits_are_the_teachers_outputs_on_the_students_views(digits_setup):
    from kd.augment import Augmenter, Normalize
    from kd.models import mean_std
    from kd.teacher import load_teacher_model
    cfg, data, teacher = digits_setup
    model, _ = load_teacher_model(cfg, data, teacher.directory)
    idx = torch.tensor([3, 100, 7])
    view = Augmenter(cfg.augment, len(data.train))(data.train.images[idx], idx, epoch=1)
    with torch.no_grad():
        direct = model(Normalize(*mean_std(model))(view))
    assert torch.allclose(direct, teacher.logits[1][idx], atol=1e-4)


def test_training_longer_than_the_cached_views_is_refused(digits_setup):
    cfg, data, teacher = digits_setup  # epoch 3's views have no logits: reusing epoch 0's would teach the wrong view
    with pytest.raises(ValueError, match="teacher logits cover 2 epochs of views; training runs 3"):
        train_student(cfg, data, teacher.logits[:2], progress=False)


def test_tiny_distillation_learns_the_rare_class(digits_setup):
    cfg, data, teacher = digits_setup
    result = train_student(cfg, data, teacher.logits, progress=False)
    assert result.status == "completed" and len(result.history) == cfg.train.epochs
    assert result.history[-1]["train_kd_loss"] < result.history[0]["train_kd_loss"]
    val = result.history[-1]["val_balanced_accuracy"]  # the shipped rule: a threshold cross-fitted over validation
    from kd.student import evaluate_model
    test = evaluate_model(result.model, data, "test", result.threshold, cfg)
    assert val > 0.75 and test["balanced_accuracy"] > 0.75, (val, test)
    assert test["recall"]["digit_8"] > 0.5


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(digits_setup):
    cfg, data, teacher = digits_setup
    states = []
    full = train_student(cfg, data, teacher.logits, report=lambda row, state: states.append(state()), progress=False)
    resumed = train_student(cfg, data, teacher.logits, resume=states[0], progress=False)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in full.history])
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=False):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_divergence_ends_with_a_clear_status(digits_setup, tmp_path):
    cfg, data, teacher = digits_setup
    bad = cfg.updated({"train.lr": 1e12, "train.optimizer": "sgd", "train.epochs": 2})
    result = train_student(bad, data, teacher.logits, progress=False)
    assert result.status == "diverged" and result.history[-1]["status"] == "diverged"
    from kd.distill import finish_student
    with pytest.raises(Diverged, match="diverged at epoch 1"):
        finish_student(bad, data, result, tmp_path, teacher.metrics)
    assert not (tmp_path / "model").exists()


def test_export_round_trips_to_identical_logits(digits_setup, tmp_path):
    cfg, data, teacher = digits_setup
    result = train_student(cfg, data, teacher.logits, progress=False)
    out = export_student(tmp_path / "export", result.model, cfg, data.classes, result.threshold, {"val": {}})
    loaded = load_student(out)
    images = data.test.images[:50]
    with torch.no_grad():
        direct = result.model.cpu().eval()(((images.float() / 255) - 0.5) / 0.5)  # test_resnet: mean = std = 0.5
    assert torch.allclose(loaded.logits(images), direct, atol=1e-6)
    graph = load_graph(out)  # the normalisation is inside the graph: it takes images in [0, 1]
    assert torch.allclose(graph(images.float() / 255), direct, atol=1e-5)
    info = json.loads((out / "kdsearch.json").read_text())
    assert info["architecture"] == "test_resnet" and info["classes"] == data.classes
    timm_config = json.loads((out / "config.json").read_text())
    assert timm_config["label_names"] == data.classes  # timm's own config, describing these weights, not timm's own
    assert timm_config["pretrained_cfg"]["tag"] == "kd-search" and "license" not in timm_config["pretrained_cfg"]
    card = (out / "README.md").read_text()  # the model card, as the hub shows one
    assert card.startswith("---\nlibrary_name: timm") and f"p(`{data.classes[1]}`) >= {result.threshold:.4f}" in card
    assert "## Intended use and limits" in card and "alpha 0.5" in card
    assert info["threshold"] == pytest.approx(result.threshold) and info["config"]["distill"]["alpha"] == 0.5
    probs = loaded.probs(images)
    assert np.array_equal(loaded.predict(images), (probs[:, 1] >= result.threshold).astype(int))


def test_distilled_deit_student_uses_both_heads(digits_setup):
    cfg, data, teacher = digits_setup
    deit = cfg.updated({"student.name": "deit_tiny_distilled_patch16_224", "train.epochs": 1})
    result = train_student(deit, data, teacher.logits, progress=False)
    assert result.status == "completed"
    assert not result.model.distilled_training  # inference averages the two heads
    size = cfg.data.image_size
    out = result.model(torch.zeros(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2)


def test_cli_distill_evaluate_predict(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    cfg = load_config(None, tiny_overrides(tmp_path / "cache", tmp_path / "results") + ["name=tiny"])
    cfg_path.write_text(cfg.to_yaml())
    assert main(["distill", str(cfg_path), "--quiet"]) == 0
    run = tmp_path / "results" / "tiny" / "distill"
    for name in ("config.yaml", "history.csv", "metrics.json", "model/model.safetensors", "model/config.json",
                 "model/kdsearch.json", "model/model.pt2", "plots/learning_curves.png",
                 "plots/confusion_matrix_test.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert load_config(run / "config.yaml") == cfg
    capsys.readouterr()

    assert main(["evaluate", str(run / "model"), str(cfg_path), "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"balanced accuracy  {metrics['test']['balanced_accuracy']:.4f}" in printed
    assert (tmp_path / "ev" / "confusion_matrix.png").is_file()
    # both metrics.json files are written from their records and read back through them
    written = DistillMetrics.read(run / "metrics.json")
    assert written is not None and written.to_dict() == metrics and written.teacher and written.teacher.name
    evaluated = EvaluationRecord.read(tmp_path / "ev" / "metrics.json")
    assert evaluated is not None and evaluated.to_dict() == json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert evaluated.model == str(run / "model") and evaluated.data == f"the test split of {cfg_path}"
    assert evaluated.balanced_accuracy == metrics["test"]["balanced_accuracy"] and evaluated.n == metrics["test"]["n"]

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        arr = cfg_data_image(i)
        from PIL import Image
        Image.fromarray(arr).save(images / f"{i}.png")
    (images / "broken.jpg").write_text("nope")
    out_csv = tmp_path / "pred.csv"
    assert main(["predict", str(run / "model"), str(images), "--out", str(out_csv), "--quiet"]) == 0
    import pandas as pd
    table = pd.read_csv(out_csv)
    assert list(table.columns) == ["file", "predicted", "p_other", "p_digit_8", "error"]
    assert len(table) == 4 and table["error"].notna().sum() == 1
    good = table[table["error"].isna()]
    assert np.allclose(good["p_other"] + good["p_digit_8"], 1.0, atol=1e-5)


def cfg_data_image(i: int) -> np.ndarray:
    from sklearn.datasets import load_digits
    img = load_digits().images[i] * (255 / 16)
    return np.kron(img, np.ones((3, 3))).astype(np.uint8)


def test_the_console_script_exits_with_the_commands_code_and_its_objects_frozen(tmp_path, monkeypatch, capsys):
    """`kdsearch` is `entry`: the command's exit code, and every object frozen so the interpreter's final garbage
    collections skip them (about 3 s after a distillation)."""
    (script,) = entry_points(group="console_scripts", name="kdsearch")  # the installed command
    assert script.value == "search.cli:entry"
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  alpha: 2\n")
    try:
        for argv, code in ((["presets"], 0), (["distill", str(bad)], 2)):
            gc.unfreeze()
            monkeypatch.setattr(sys, "argv", ["kdsearch", *argv])
            with pytest.raises(SystemExit) as done:
                entry()
            assert done.value.code == code
            assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()  # this test process goes on: its objects are collectable again
    assert "'distill.alpha' must be in [0, 1]" in capsys.readouterr().err


def test_cli_reports_user_mistakes_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  alpha: 2\n")
    assert main(["distill", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'distill.alpha' must be in [0, 1]" in err and "Traceback" not in err
    assert main(["distill", "no-such-preset"]) == 2
    assert "presets: " in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "digits"]) == 2
    assert "is not an exported student" in capsys.readouterr().err
    folder = tmp_path / "ds"
    (folder / "only").mkdir(parents=True)
    assert main(["distill", "digits", "--set", "data.source=folder", "--set", f"data.train={folder}",
                 "--set", f"data.cache_dir={tmp_path / 'c'}", "--quiet"]) == 2
    assert "has no images" in capsys.readouterr().err


def test_run_distill_writes_everything_and_tests_once(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "cache", tmp_path / "results"))
    lines = []
    metrics = run_distill(cfg, progress=True, echo=lines.append)
    assert metrics.test["n"] == 360 and metrics.val["n"] == 360
    assert any(line.startswith("epoch   3/3") for line in lines)
    assert any("held-out test (evaluated once)" in line for line in lines)
    assert dataclasses.asdict(cfg) == metrics_config(tmp_path / "results" / "kd" / "distill")
    cost = metrics.cost  # the compression report, measured after training
    for role in ("student", "teacher"):
        assert {"parameters", "flops", "macs", "weights_bytes", "latency_ms_batch1", "images_per_s_batch1",
                "latency_ms_batch", "images_per_s_batch", "batch", "device_name", "threads"} <= set(cost[role])
    assert cost["summary"] in lines and cost["summary"].startswith("student 0.4M params, ")
    run = tmp_path / "results" / "kd" / "distill"
    assert json.loads((run / "metrics.json").read_text())["cost"]["student"]["flops"] == cost["student"]["flops"]
    assert json.loads((run / "model" / "kdsearch.json").read_text())["compression"]["summary"] == cost["summary"]


def metrics_config(run):
    return json.loads((run / "model" / "kdsearch.json").read_text())["config"]
