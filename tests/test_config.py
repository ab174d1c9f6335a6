import json
import os
import struct
import zlib

import pytest
import yaml

from kd.errors import ConfigError
from search.config import Config, config_keys, from_dict, load_config
from search.presets import config_path, preset_names


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    cfg = load_config(None)
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_unknown_key_names_it_suggests_and_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "distill:\n  temprature: 4\n"))
    text = str(e.value)
    assert "'distill.temprature'" in text and "did you mean 'temperature'" in text
    assert "mode, temperature, alpha" in text and "c.yaml" in text


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'distil'.*valid keys at the top level: name, output_dir"):
        load_config(write(tmp_path, "distil: {alpha: 0.3}\n"))


@pytest.mark.parametrize("text, message", [
    ("train: {epochs: ten}", "'train.epochs' must be an integer"),
    ("train: {epochs: -3}", "'train.epochs' must be >= 1"),
    ("distill: {alpha: 1.5}", "'distill.alpha' must be in [0, 1]"),
    ("distill: {mode: medium}", "'distill.mode' must be one of soft, hard"),
    ("train: {amp: maybe}", "'train.amp' must be one of auto, bf16, off; got 'maybe'"),
    ("search: {space: {}}", "'search.space' is empty"),
    ("search: {loggers: [tensorboard, wandb]}", "'search.loggers' names 'wandb': the loggers are tensorboard, mlflow"),
    ("data: {source: folder}", "'data.train' is required for source 'folder'"),
    ("data: 5", "'data' must be a mapping"),
])
def test_bad_values_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value)


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML at line 2"):
        load_config(write(tmp_path, "a: 1\n b: [\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_is_read_safely(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n"))


def test_overrides_parse_types_and_reject_unknown_keys():
    cfg = load_config(None, ["distill.temperature=7", "train.lr=1e-4", "distill.mode=hard", "train.amp=false",
                             "data.train=/some/folder", "data.source=folder"])
    assert cfg.distill.temperature == 7.0 and cfg.train.lr == 1e-4 and cfg.distill.mode == "hard"
    assert cfg.train.amp == "off" and cfg.data.train.path == "/some/folder"  # an older config's false
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrate'"):
        load_config(None, ["train.lrate=0.1"])
    with pytest.raises(ConfigError, match="expects KEY=VALUE"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["name.x=1"])


def test_split_shorthand_and_updated():
    cfg = from_dict({"data": {"source": "csv", "train": "a/train.csv", "val": {"path": "a/val.csv", "images": "imgs"}}})
    assert cfg.data.train.path == "a/train.csv" and cfg.data.val.images == "imgs"
    changed = cfg.updated({"distill.alpha": 0.25, "imbalance.method": "effective"})
    assert changed.distill.alpha == 0.25 and changed.imbalance.method == "effective" and cfg.distill.alpha == 0.5
    with pytest.raises(ConfigError, match=r"'distill\.alpha' must be in"):
        cfg.updated({"distill.alpha": -0.1})


def test_config_keys_are_dotted_scalars():
    keys = config_keys()
    assert "distill.temperature" in keys and "teacher.train.lr" in keys and "data.train" not in keys
    assert "data.train.path" in keys


@pytest.mark.parametrize("name", preset_names())
def test_presets_load(name):
    sets = {"deit-small-to-resnet50": ["data.train=/data/reference1"],
            "resnet50-to-deit-small": ["data.train=/d/train.csv", "data.val=/d/val.csv", "data.test=/d/test.csv"]}
    cfg = load_config(config_path(name), sets.get(name, []))
    assert isinstance(cfg, Config)
    assert yaml.safe_load(cfg.to_yaml())["name"] == name


def test_reference_presets_match_the_reference_projects():
    reference1 = load_config(config_path("deit-small-to-resnet50"), ["data.train=/x"])
    assert (reference1.teacher.name, reference1.student.name) == ("deit_small_distilled_patch16_224", "resnet50")
    assert reference1.distill.temperature == 5 and reference1.train.schedule == "step" and reference1.train.epochs == 20
    reference2 = load_config(config_path("resnet50-to-deit-small"), ["data.train=/x.csv"])
    t = reference2.train
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay) == ("sgd", 0.01, 0.9, 1e-4)
    assert (reference2.train.schedule, reference2.train.epochs, reference2.train.batch_size) == ("cosine", 50, 32)
    modes = {p["distill.mode"] for p in reference2.search.points}
    assert modes == {"soft", "hard"}


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (1-bit) but that holds almost no data: Pillow reads the size
    without decoding, so a limit can be tested without the image's memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_by_default_images_over_pillows_own_bomb_limit_are_refused_in_training_and_prediction(tmp_path):
    """The one default of the decompression-bomb limit: Pillow's own (89,478,485 pixels), for the data a search
    trains on (data.max_image_pixels unset) and for an export that records no limit of its own."""
    from kd.data import load_dataset
    from kd.export import export_student
    from kd.models import create_model
    from kd.predict import load_predictor, predict_files
    from tests.helpers import make_folder_dataset, tiny_overrides
    pillow_default = 1024 * 1024 * 1024 // 4 // 3  # PIL.Image.MAX_IMAGE_PIXELS as Pillow defines it
    refused = f"{pillow_default + 1}x1 pixels is over the decompression-bomb limit of {pillow_default}"
    root = make_folder_dataset(tmp_path / "ds", {"B": 6, "M": 6})
    (root / "B" / "huge.png").write_bytes(_png_claiming(pillow_default + 1, 1))
    cfg = load_config(None, tiny_overrides(tmp_path / "cache") + ["data.source=folder", f"data.train={root}"])
    data = load_dataset(cfg.data, progress=False)
    assert [(os.path.basename(p), why.split(" (")[0]) for p, why in data.skipped] == [("huge.png", refused)]
    assert sum(len(data.split(s)) for s in ("train", "val", "test")) == 12

    out = export_student(tmp_path / "model", create_model(cfg.student, 2, 32), cfg, data.classes, None, {},
                         graph=False, onnx=False)
    meta = json.loads((out / "kdsearch.json").read_text())
    del meta["config"]["data"]["max_image_pixels"]  # as an export that does not say which limit it was trained with
    (out / "kdsearch.json").write_text(json.dumps(meta))
    rows = predict_files(load_predictor(out), [str(root / "B" / "huge.png"), str(root / "B" / "B_0.png")],
                         progress=False)
    assert rows[0]["error"].split(" (")[0] == refused and not rows[1]["error"]


@pytest.mark.parametrize("final", ["ensemble", "distilled"])  # refit on a holdout: an earlier version's default
def test_a_final_made_of_fold_students_needs_folds(final):
    with pytest.raises(ConfigError, match=r"'search\.final' is " + final + r", but a search with search\.folds 1 "
                       r"\(a holdout\) ships checkpoint \(auto: checkpoint\)"):
        load_config(None, [f"search.final={final}", "search.folds=1"])
    assert load_config(None, [f"search.final={final}", "search.folds=3"]).search.final == final
    with pytest.raises(ConfigError, match=r"search\.final"):
        load_config(None, ["search.final=stacked"])
    with pytest.raises(ConfigError, match=r"search\.folds >= 2 \(cross-validated\) ships refit or ensemble or "
                       r"distilled \(auto: refit\)"):
        load_config(None, ["search.final=checkpoint", "search.folds=3"])


def test_an_earlier_versions_holdout_config_with_its_default_final_still_loads():
    """Earlier versions saved `search.final: refit` (their default) in every config, a holdout's too, where the trial's
    checkpoint shipped: such a config.yaml still loads, as that; and auto resolves to each scheme's own way."""
    old = load_config(None, ["search.folds=1", "search.final=refit"])
    assert old.search.final == "checkpoint" and old.ships == "checkpoint"
    assert load_config(None, ["search.folds=1"]).ships == "checkpoint"
    assert load_config(None, ["search.folds=3"]).ships == load_config(None, ["search.final=refit"]).ships == "refit"


def test_version_names_the_installed_packages_without_importing_them(capsys):
    import importlib.metadata
    import subprocess
    import sys

    from search.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    said = capsys.readouterr().out.strip()
    assert said == (f"kdsearch {importlib.metadata.version('kd-search')} (torch {importlib.metadata.version('torch')}, "
                    f"ray {importlib.metadata.version('ray')}, optuna {importlib.metadata.version('optuna')}, "
                    f"timm {importlib.metadata.version('timm')})")
    # in a fresh process: neither torch nor Ray is loaded to say it
    probe = ("import sys; from search.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'ray', 'optuna', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")


@pytest.mark.parametrize("args, said", [
    (["search", "no-such-config.yaml"], "error: no config file or preset named 'no-such-config.yaml'"),
    (["distill", "digits", "--set", "search.num_samples=many"],
     "error: --set search.num_samples=many: 'search.num_samples' must be an integer, got 'many'"),
    (["search", "digits", "--set", "data.image_size=4"], "error: --set data.image_size=4: 'data.image_size' must be "
                                                          "at least 8"),
    (["search", "digits", "--set", "data.bogus=1"], "error: --set: unknown key 'data.bogus'"),
])
def test_config_errors_are_answered_before_torch_and_ray_load(args, said):
    """A missing file, a bad key and a bad value: one message naming what is wrong (a --set value blamed on --set,
    not on the preset it overrode), exit 2, and none of the heavy modules loaded to say it."""
    import subprocess
    import sys
    probe = ("import sys\nfrom search.cli import main\ncode = main(sys.argv[1:])\n"
             "print('loaded:', sorted(m for m in ('torch', 'ray', 'optuna', 'timm', 'sklearn') if m in sys.modules))\n"
             "sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.startswith(said) and "Traceback" not in run.stderr, run.stderr
    assert run.stdout.strip() == "loaded: []"


def test_kdsearch_config_prints_the_resolved_config_with_each_keys_meaning(tmp_path, capsys):
    """`kdsearch config digits --set search.num_samples=7`: every key of the config, on a line of its own with its
    meaning beside it, as YAML that loads back to the very config the search would run."""
    from search.cli import main
    from search.config import Config, load_config
    from search.configdoc import meanings
    from search.presets import config_path
    assert main(["config", "digits", "--set", "search.num_samples=7"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(text)
    assert load_config(tmp_path / "resolved.yaml").to_dict() == \
        load_config(config_path("digits"), ["search.num_samples=7"]).to_dict()
    assert "  num_samples: 7" in text and text.startswith("# kd-search ")
    known = meanings(Config)
    assert all(known.values()), [k for k, v in known.items() if not v]  # every key of the config types has a meaning
    for key in ("data.image_size", "distill.alpha", "search.shipped_rule", "train.lr", "teacher.train.epochs"):
        name = key.split(".")[-1]
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{name}:"))
        assert line.split("  # ", 1)[1] == known[key], line


def test_the_configuration_reference_in_docs_is_generated_from_the_config_types():
    """docs/configuration.md is `search.configdoc.reference()`: a key added, renamed or given another meaning in
    kd/config.py or search/config.py fails here until the file is regenerated (`python -m search.configdoc >
    docs/configuration.md`)."""
    from pathlib import Path

    from search.configdoc import reference
    path = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    assert path.read_text() == reference(), "docs/configuration.md is stale: python -m search.configdoc > " \
        "docs/configuration.md"

def test_presets_are_listed_with_their_whole_description(capsys):
    from search.cli import main
    assert main(["presets"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Set the folder with: --set data.train=/path/to/ROOT Pretrained weights come from timm's hub cache" in out
    assert out.count("Reference project") == 2
