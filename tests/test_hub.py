"""timm's pretrained weights as timm gets them (kd.hub), from a local stand-in for the Hugging Face hub
(tests/hub.py): downloaded once, on the driver, then read from the cache; offline with an empty cache, one clear
message. Nothing here reaches the internet: HF_ENDPOINT points at the stand-in."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd.config import ModelConfig
from kd.errors import UserError
from search.config import load_config
from tests.helpers import tiny_overrides
from tests.hub import COMMIT, PUBLISHED, StandInHub, published, timm_weights

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = "timm/test_resnet.r160_in1k/model.safetensors"  # where timm's test_resnet weights live on the hub


def kdsearch(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**env, "PYTHONPATH": str(ROOT)}, timeout=600)


def sets(values):
    return [x for v in values for x in ("--set", v)]


@pytest.fixture
def hub(tmp_path):
    with StandInHub({WEIGHTS: timm_weights("test_resnet", tmp_path / "served.safetensors")}) as server:
        yield server


def hub_env(hub, home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_two_distillations_download_timms_weights_once_in_all(tmp_path, hub):
    env, base = hub_env(hub, tmp_path / "hf"), [*tiny_overrides(tmp_path / "cache", tmp_path / "out"),
                                                 "teacher.pretrained=true", "student.pretrained=true",
                                                 "teacher.train.epochs=1", "train.epochs=1"]
    first = kdsearch(["distill", "digits", *sets([*base, "name=one"])], env, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert hub.downloads[WEIGHTS] == 1  # teacher and student are both test_resnet: one file, fetched once
    cached = list((tmp_path / "hf" / "hub").rglob("model.safetensors"))
    assert len(cached) == 1 and "downloading timm's weights for 'test_resnet'" in first.stderr
    served = load_file(str(tmp_path / "served.safetensors"))
    got = load_file(str(cached[0]))
    assert got.keys() == served.keys() and all(torch.equal(got[k], served[k]) for k in served)

    second = kdsearch(["distill", "digits", *sets([*base, "name=two"])], env, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert hub.downloads[WEIGHTS] == 1 and "downloading" not in second.stderr  # the cache from then on
    # a search, its teacher's task and its trials on a worker node that has no hub: tests/test_cluster.py


def test_offline_with_an_empty_cache_fails_with_one_message_naming_the_way_out(tmp_path, hub):
    env = {**hub_env(hub, tmp_path / "empty-hf"), "HF_HUB_OFFLINE": "1"}
    run = kdsearch(["distill", "digits", *sets([*tiny_overrides(tmp_path / "cache", tmp_path / "out"),
                                               "teacher.pretrained=true", "name=offline"])], env, tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "teacher.pretrained is true but timm's weights for 'test_resnet' are not cached" in run.stderr
    assert "HF_HUB_OFFLINE is set" in run.stderr and "or set teacher.pretrained to a local weights file" in run.stderr
    assert hub.downloads[WEIGHTS] == 0 and not (tmp_path / "out" / "offline").exists()  # nothing half-written


def test_an_unreachable_hub_is_one_message_too(tmp_path, hub):
    env = {**hub_env(hub, tmp_path / "empty-hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    run = kdsearch(["distill", "digits", *sets([*tiny_overrides(tmp_path / "cache", tmp_path / "out"),
                                               "student.pretrained=true", "name=unreachable"])], env, tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "student.pretrained: could not download timm's weights for 'test_resnet' from http://127.0.0.1:9" \
        in run.stderr


def test_models_named_on_the_hub_and_in_a_folder_as_timm_names_them(tmp_path):
    """`hf-hub:owner/repo@revision` and `local-dir:PATH` (timm's own syntax) as teacher and student: the repository's
    config.json and weights downloaded once, at the pinned revision (the weights at the very commit the config came
    from), and the export records which weights each
    started from (repository, revision, commit, sha256) in kdsearch.json and its model card."""
    folder = published(tmp_path / "published")
    files = {f"{PUBLISHED}/{name}": (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}
    sha256 = hashlib.sha256(files[f"{PUBLISHED}/model.safetensors"]).hexdigest()
    base = [*tiny_overrides(tmp_path / "cache", tmp_path / "out"), f"teacher.name=hf-hub:{PUBLISHED}@v1",
            "teacher.pretrained=true", "teacher.train.epochs=1", f"student.name=local-dir:{folder}",
            "student.pretrained=true", "train.epochs=1"]
    with StandInHub(files) as hub:
        run = kdsearch(["distill", "digits", *sets([*base, "name=named"])], hub_env(hub, tmp_path / "hf"), tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert dict(hub.downloads) == {key: 1 for key in files}  # checked, built and exported: fetched once
        assert hub.revisions == {"v1", COMMIT}  # config.json at the pinned revision, the weights at its commit
        offline = {**hub_env(hub, tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}  # the next command: from the cache
        again = kdsearch(["teacher", "digits", *sets([*base, "name=again"])], offline, tmp_path)
        assert again.returncode == 0 and dict(hub.downloads) == {key: 1 for key in files}, again.stderr[-3000:]
    meta = json.loads((tmp_path / "out" / "named" / "distill" / "model" / "kdsearch.json").read_text())
    assert meta["architecture"] == "test_resnet"  # what timm builds, not the name it was found by
    assert meta["started_from"] == {
        "teacher": {"name": f"hf-hub:{PUBLISHED}@v1", "file": "model.safetensors", "sha256": sha256,
                    "repo": PUBLISHED, "revision": "v1", "commit": COMMIT},
        "student": {"name": f"local-dir:{folder}", "file": "model.safetensors", "sha256": sha256,
                    "folder": str(folder)}}
    card = (tmp_path / "out" / "named" / "distill" / "model" / "README.md").read_text()
    assert (f"- teacher weights at the start: `{PUBLISHED}` at revision `v1` (commit `{COMMIT}`), "
            f"`model.safetensors` sha256 `{sha256}`") in card

    from kd.models import create_model
    saved = load_file(str(folder / "model.safetensors"))
    same = create_model(ModelConfig(name=f"local-dir:{folder}", pretrained=True), 2, 16).state_dict()
    assert all(torch.equal(same[k], saved[k]) for k in saved)  # the student starts from the folder's weights
    other = create_model(ModelConfig(name=f"local-dir:{folder}", pretrained=True), 3, 16).state_dict()
    assert other["fc.weight"].shape[0] == 3 and torch.equal(other["conv1.0.weight"], saved["conv1.0.weight"])
    fresh = create_model(ModelConfig(name=f"local-dir:{folder}", pretrained=False), 2, 16).state_dict()
    assert not torch.equal(fresh["conv1.0.weight"], saved["conv1.0.weight"])  # the architecture only


@pytest.mark.parametrize("name,message", [
    ("local-dir:{tmp}/nowhere", r"student\.name: local-dir:\S+ is not a timm model folder \(it needs config\.json"),
    ("someone/model", r"student\.name: Model name 'someone/model' has no source prefix but looks like a Hugging Face "
                      r"Hub repo id or a local path\. Use 'hf-hub:someone/model'"),
    ("hf:someone/model", r"student\.name: Unknown model source 'hf' in model name 'hf:someone/model', valid "
                         r"sources: hf-hub, local-dir"),
])
def test_a_named_source_that_cannot_work_is_refused_before_anything_runs(tmp_path, name, message):
    from kd.models import check_models
    cfg = load_config(None, [*tiny_overrides(tmp_path / "cache"), f"student.name={name.format(tmp=tmp_path)}"])
    with pytest.raises(UserError, match=message):
        check_models(cfg, roles=("student",))


def test_a_named_folder_is_known_by_what_it_holds(tmp_path):
    """A fine-tuned teacher is cached by the content of a named folder, not its name: exported again in place, it is
    another teacher. Weights that do not fit the architecture its config.json names (an ensemble's members.0. ...)
    are refused before anything runs."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from kd.models import check_models
    from kd.teacher import teacher_key
    folder = published(tmp_path / "model")
    cfg = load_config(None, [*tiny_overrides(tmp_path / "cache"), f"teacher.name=local-dir:{folder}",
                             "teacher.pretrained=true", f"student.name=local-dir:{folder}", "student.pretrained=true"])
    check_models(cfg)
    data = SimpleNamespace(fingerprint="the same images")
    before = teacher_key(cfg, data)
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v + 1 for k, v in state.items()}, str(folder / "model.safetensors"))  # exported again, in place
    assert teacher_key(cfg, data) != before
    save_file({f"members.0.{k}": v for k, v in state.items()}, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"model.safetensors does not look like weights for 'local-dir:"):
        check_models(cfg, roles=("student",))


def test_a_named_model_without_its_weights_reads_its_config_alone(tmp_path, monkeypatch):
    """`pretrained: false` with a named model builds its architecture from config.json alone, as timm does: a
    folder needs no weights, the hub serves config.json only, the workers are handed config.json only, and the
    caches key it by config.json alone."""
    import kd.hub
    from kd.hub import shipped, source_fingerprint
    from kd.models import check_models, create_model
    from kd.teacher import teacher_key
    from search.space import check_searched_models, parse_space
    folder = published(tmp_path / "published")
    name = f"local-dir:{folder}"
    both = load_config(None, [*tiny_overrides(tmp_path / "cache"), f"teacher.name={name}", "teacher.pretrained=true",
                              f"student.name={name}"])
    assert check_searched_models(both, parse_space(both)) == {name: True}  # shipped with the teacher's weights
    files = {f"{PUBLISHED}/{f}": (folder / f).read_bytes() for f in ("config.json", "model.safetensors")}
    (folder / "model.safetensors").unlink()
    cfg = load_config(None, [*tiny_overrides(tmp_path / "cache"), f"teacher.name={name}", f"student.name={name}"])
    check_models(cfg)
    assert create_model(cfg.student, 2, 16, "student").fc.out_features == 2
    assert shipped({name: False}) == {name: [("config.json", (folder / "config.json").read_bytes())]}
    assert source_fingerprint(name, weights=False) == hashlib.sha256(
        hashlib.sha256((folder / "config.json").read_bytes()).hexdigest().encode()).hexdigest()
    teacher_key(cfg, type("Data", (), {"fingerprint": "the images"})())  # keyed without weights to read
    with pytest.raises(UserError, match=r"it needs config\.json and model\.safetensors or pytorch_model\.bin"):
        check_models(cfg.updated({"student.pretrained": True}), roles=("student",))
    monkeypatch.setattr(kd.hub, "_PROVIDED", {})
    kd.hub.provide(shipped({name: False}))  # as a worker gets it: its config.json, and never taken for weights
    assert create_model(cfg.student, 2, 16, "student").fc.out_features == 2
    with pytest.raises(UserError, match=r"holds no model\.safetensors or pytorch_model\.bin"):
        kd.hub.pretrained_file(name, "student")

    sets = [*tiny_overrides(tmp_path / "cache"), f"student.name=hf-hub:{PUBLISHED}"]
    script = ("from kd.models import check_models, fetch_pretrained; from search.config import load_config; "
              f"cfg = load_config(None, {sets!r}); check_models(cfg); fetch_pretrained(cfg)")
    with StandInHub(files) as hub:
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                             env={**hub_env(hub, tmp_path / "hf"), "PYTHONPATH": str(ROOT)}, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert dict(hub.downloads) == {f"{PUBLISHED}/config.json": 1}  # the architecture, not the weights
