"""Exports in timm's hub layout: timm loads them, ONNX and torch.export graphs match, predict reads every form."""
import dataclasses
import json
import logging
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import kd.export
import kd.graphs
from kd.errors import UserError
from kd.export import export_student, load_graph, load_student
from kd.models import create_model
from kd.predict import collect_images, load_predictor, predict_files, write_predictions
from search.config import load_config
from tests.helpers import tiny_overrides

CLASSES = ["other", "digit_8"]


def student_and_config(tmp_path, name="test_resnet", **sets):
    """An untrained student at 32 px (the images these tests feed it), its weights nudged off their init."""
    cfg = load_config(None, tiny_overrides(tmp_path / "cache") + [f"student.name={name}", "data.image_size=32"]
                      + [f"{k}={v}" for k, v in sets.items()])
    torch.manual_seed(0)
    model = create_model(cfg.student, len(CLASSES), cfg.data.image_size)
    with torch.no_grad():  # a model whose outputs vary with the input, like a trained one
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), cfg


def digit_images(n=6, size=32):
    from sklearn.datasets import load_digits
    imgs = load_digits().images[:n] * (255 / 16)
    return [np.asarray(Image.fromarray(im.astype(np.uint8)).resize((size, size), Image.BILINEAR).convert("RGB"))
            for im in imgs]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    model, cfg = student_and_config(tmp, **{"data.max_image_pixels": 1000})
    return export_student(tmp / "model", model, cfg, CLASSES, 0.4, {"val": {"balanced_accuracy": 0.9}})


def test_layout_is_timms_and_timm_loads_it_with_identical_logits(export_dir):
    import timm
    hub = json.loads((export_dir / "config.json").read_text())
    assert hub["architecture"] == "test_resnet" and hub["num_classes"] == 2 and hub["label_names"] == CLASSES
    assert "num_features" in hub and "format" not in hub and "threshold" not in hub
    pcfg = hub["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32] and pcfg["crop_pct"] == 1.0 and pcfg["interpolation"] == "bilinear"
    assert pcfg["mean"] == [0.5, 0.5, 0.5] and pcfg["std"] == [0.5, 0.5, 0.5] and pcfg["num_classes"] == 2
    meta = json.loads((export_dir / "kdsearch.json").read_text())
    assert meta["format"] == kd.export.EXPORT_FORMAT and meta["classes"] == CLASSES and meta["threshold"] == 0.4
    assert meta["positive_class"] == "digit_8" and meta["graph"] == "model.pt2" and meta["onnx"] == "model.onnx"
    assert 0 <= meta["checks"]["graph_max_abs_diff"] <= 1e-4 and 0 <= meta["checks"]["onnx_max_abs_diff"] <= 1e-4
    assert meta["weights_bytes"] == (export_dir / "model.safetensors").stat().st_size
    assert json.loads((export_dir / "metrics.json").read_text()) == {"val": {"balanced_accuracy": 0.9}}

    student = load_student(export_dir)
    model = timm.create_model(f"local-dir:{export_dir}", pretrained=True).eval()
    assert model.pretrained_cfg["label_names"] == CLASSES
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, 32, 32) and data_cfg["crop_pct"] == 1.0
    images = torch.from_numpy(np.stack(digit_images())).permute(0, 3, 1, 2).contiguous()
    mean, std = (torch.tensor(data_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = (images.float() / 255 - mean) / std
    with torch.no_grad():
        assert torch.equal(model(x), student.logits(images))
    # what callers read from `info`
    assert student.info["architecture"] == "test_resnet" and student.info["num_classes"] == 2
    assert student.info["config"]["data"]["max_image_pixels"] == 1000 and student.max_image_pixels == 1000
    assert student.info["metrics"]["val"]["balanced_accuracy"] == 0.9 and student.image_size == 32
    # the graph takes images in [0, 1]: the normalisation is inside
    assert torch.allclose(load_graph(export_dir)(images.float() / 255), student.logits(images), atol=1e-5)


def test_kdsearch_json_is_written_and_read_through_its_record(export_dir, tmp_path):
    import shutil

    from kd.export import ExportMetadata
    student = load_student(export_dir)
    on_disk = json.loads((export_dir / "kdsearch.json").read_text())
    assert ExportMetadata.read(export_dir / "kdsearch.json") == student.meta and student.meta.to_dict() == on_disk
    assert student.meta.threshold == 0.4 and student.meta.ensemble == 0 and student.meta.config["data"]["image_size"]
    with pytest.raises(TypeError):  # `info` is a read-only view: a new threshold goes through `meta`
        student.info["threshold"] = 0.5
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    # an export of an earlier version of this format: before `ensemble`, every export was one student
    (copy / "kdsearch.json").write_text(json.dumps({k: v for k, v in on_disk.items() if k != "ensemble"}))
    earlier = load_student(copy)
    assert earlier.meta.ensemble == 0 and earlier.classes == CLASSES and earlier.threshold == 0.4
    assert torch.equal(earlier.logits(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)),
                       student.logits(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)))
    renamed = {("labels" if k == "classes" else k): v for k, v in on_disk.items()}
    (copy / "kdsearch.json").write_text(json.dumps(renamed))
    with pytest.raises(UserError, match=r"copy/kdsearch\.json: unknown field 'labels'"):
        load_student(copy)
    with pytest.raises(UserError, match=r"copy/kdsearch\.json: unknown field 'labels'"):
        load_predictor(copy / "model.onnx")
    (copy / "kdsearch.json").write_text(json.dumps({**on_disk, "image_size": "large"}))
    with pytest.raises(UserError, match=r"kdsearch\.json: 'image_size' must be an integer"):
        load_student(copy)


def test_a_vit_student_round_trips_through_timm(tmp_path):
    import timm
    model, cfg = student_and_config(tmp_path, "deit_tiny_distilled_patch16_224")
    out = export_student(tmp_path / "vit", model, cfg, CLASSES, None, {}, graph=False, onnx=False)
    meta = json.loads((out / "kdsearch.json").read_text())
    assert meta["distilled_heads"] and meta["graph"] is None and meta["onnx"] is None and meta["threshold"] is None
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and torch.equal(load_student(out).model(x), model(x))


def test_an_earlier_export_is_refused_clearly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "kd-search-student-1", "architecture": "test_resnet"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"earlier kd-search .format 'kd-search-student-1'.*export it again"):
        load_student(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(UserError, match="is not an exported student"):
        load_student(tmp_path)


def test_predictions_agree_across_folder_onnx_and_graph(export_dir, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, arr in enumerate(digit_images(5, size=30)):  # 900 pixels: under the export's limit of 1000
        Image.fromarray(arr).save(folder / ("sub" if i % 2 else ".") / f"{i}.png")
    Image.fromarray(digit_images(1, size=40)[0]).save(folder / "big.png")  # 1600 pixels: refused
    (folder / "broken.jpg").write_text("nope")
    files = collect_images([str(folder)])
    names = ("0.png", "2.png", "4.png", "big.png", "broken.jpg", "sub/1.png", "sub/3.png")
    assert files == [str(folder / n) for n in names]
    tables = {}
    for form in (export_dir, export_dir / "model.onnx", export_dir / "model.pt2"):
        student = load_predictor(form)
        assert student.classes == CLASSES and student.threshold == 0.4 and student.max_image_pixels == 1000
        rows = predict_files(student, files, progress=False)
        write_predictions(rows, student.classes, tmp_path / f"{form.name}.csv")
        tables[form.name] = pd.read_csv(tmp_path / f"{form.name}.csv")
    base = tables["model"]
    assert list(base.columns) == ["file", "predicted", "p_other", "p_digit_8", "error"]
    assert base["error"].notna().sum() == 2
    assert "decompression-bomb limit of 1000" in base.loc[base["file"].str.endswith("big.png"), "error"].item()
    good = base["error"].isna()
    assert good.sum() == 5 and np.allclose(base.loc[good, "p_other"] + base.loc[good, "p_digit_8"], 1, atol=1e-5)
    # the predicted class is the export's threshold (0.4) applied to p(digit_8); unreadable files predict nothing
    assert base.loc[good, "predicted"].tolist() == [CLASSES[int(p >= 0.4)] for p in base.loc[good, "p_digit_8"]]
    assert base.loc[~good, "predicted"].isna().all()
    # a threshold between the probabilities splits the images by it, not by the larger probability
    student = load_predictor(export_dir)
    mid = float(np.median(base.loc[good, "p_digit_8"]))
    student.meta = dataclasses.replace(student.meta, threshold=mid)
    split = [row["predicted"] for row in predict_files(student, files, progress=False) if not row["error"]]
    assert split == [CLASSES[int(p >= mid)] for p in base.loc[good, "p_digit_8"]] and set(split) == set(CLASSES), split
    for name in ("model.onnx", "model.pt2"):
        other = tables[name]
        assert other["predicted"].fillna("").tolist() == base["predicted"].fillna("").tolist(), name
        assert np.allclose(other.loc[good, ["p_other", "p_digit_8"]], base.loc[good, ["p_other", "p_digit_8"]],
                           atol=1e-4), name


def test_collect_images_refuses_links_out_of_the_folder(tmp_path, caplog):
    outside = tmp_path / "outside.png"
    Image.fromarray(digit_images(1)[0]).save(outside)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(digit_images(1)[0]).save(folder / "a.png")
    (folder / "link.png").symlink_to(outside)
    assert collect_images([str(folder)]) == [str(folder / "a.png")]
    assert "link.png" in caplog.text and "outside" in caplog.text
    assert collect_images([str(outside)]) == [str(outside)]  # a file named directly is taken as named
    with pytest.raises(UserError, match="no such file or folder"):
        collect_images([str(tmp_path / "missing")])


def test_graphs_that_do_not_match_or_cannot_be_made_are_left_out(tmp_path, monkeypatch, caplog):
    model, cfg = student_and_config(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the onnx extra were not installed
    monkeypatch.setattr(kd.graphs, "TOLERANCE", -1.0)  # every graph "differs"
    with caplog.at_level(logging.INFO, logger="kd"):
        out = export_student(tmp_path / "m", model, cfg, CLASSES, None, {})
    assert not (out / "model.onnx").exists() and not (out / "model.pt2").exists()
    assert "model.onnx not written: install the onnx extra" in caplog.text
    assert "torch.export graph differs from the PyTorch model" in caplog.text
    meta = json.loads((out / "kdsearch.json").read_text())
    assert meta["onnx"] is None and meta["graph"] is None and meta["checks"]["graph_max_abs_diff"] >= 0
    with pytest.raises(UserError, match=r"has no model\.pt2"):
        load_graph(out)
    assert load_student(out).classes == CLASSES  # the weights are the export


def test_an_ensemble_of_fold_students_exports_as_one_model_and_loads_back(tmp_path):
    """K students averaged (kd.ensemble): the export's PyTorch model, its ONNX and torch.export graphs all give the
    log of the members' mean probability; each member loads in timm from the weights with its prefix stripped."""
    import onnxruntime as ort
    import timm
    from safetensors.torch import load_file

    from kd.ensemble import Ensemble, member_prefix
    members = []
    for seed in range(3):
        model, cfg = student_and_config(tmp_path)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(seed)) * 0.05)
        members.append(model)
    out = export_student(tmp_path / "ensemble", Ensemble(members).eval(), cfg, CLASSES, 0.4, {})
    meta = json.loads((out / "kdsearch.json").read_text())
    assert meta["ensemble"] == 3 and meta["onnx"] == "model.onnx" and meta["graph"] == "model.pt2"
    x = torch.rand(4, 3, 32, 32)
    norm = kd.export.Normalize((0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        mean_probs = torch.stack([m(norm(x)).softmax(-1) for m in members]).mean(0)
        loaded = load_student(out)
        assert torch.allclose(loaded.model(norm(x)).softmax(-1), mean_probs, atol=1e-6)
        assert torch.allclose(load_graph(out)(x).softmax(-1), mean_probs, atol=1e-5)
    onnx_out = ort.InferenceSession(str(out / "model.onnx")).run(None, {"images": x.numpy()})[0]
    assert np.allclose(torch.from_numpy(onnx_out).softmax(-1).numpy(), mean_probs.numpy(), atol=1e-5)
    weights = load_file(str(out / "model.safetensors"))
    second = timm.create_model("test_resnet", num_classes=2)
    second.load_state_dict({k.removeprefix(member_prefix(1)): v for k, v in weights.items()
                            if k.startswith(member_prefix(1))})
    with torch.no_grad():
        assert torch.equal(second.eval()(norm(x)), members[1](norm(x)))
