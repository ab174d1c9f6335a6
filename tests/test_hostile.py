"""Caches that rebuild themselves, outputs that are never half-written, and input that cannot hurt."""
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from kd.data import load_dataset
from kd.errors import UserError
from kd.files import atomic_dir, atomic_path, load_tensors, save_tensors
from kd.teacher import prepare_teacher
from search.cli import main
from search.config import load_config
from tests.helpers import digits_folder, make_folder_dataset, tiny_overrides, write_image

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- outputs

def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["table.csv"]
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.safetensors").write_text("old model")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "model.safetensors").write_text("new")
        raise RuntimeError("killed")
    assert (folder / "model.safetensors").read_text() == "old model"
    assert sorted(os.listdir(tmp_path)) == ["export", "table.csv"]


EXPORT_STAGES = [  # kd.export's name for a step of the write, what it writes, the file it leaves in the new folder
    ("save_file", "the weights", "model.safetensors"),                  # the first step
    ("export_graph", "the torch.export graph", "model.pt2"),            # one in the middle
    ("atomic_write_json", "kdsearch.json", "kdsearch.json"),            # the last before the new folder moves in
]


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(folder.iterdir())}


@pytest.mark.reliability
def test_sigkill_during_export_never_leaves_a_half_written_export(tmp_path, digits_setup):
    """A process exporting over an export is stopped after a step of the write (the first, one in the middle, the
    last) and killed there (SIGKILL): every time, the export folder is the previous export, complete, byte for byte,
    and loadable."""
    from kd.export import export_student, load_student
    from kd.models import create_model
    cfg, data, _ = digits_setup
    model = create_model(cfg.student, 2, cfg.data.image_size)
    export_student(tmp_path / "model", model, cfg, data.classes, 0.5, {})
    before = _digests(tmp_path / "model")
    torch.save({"cfg": cfg.to_dict(), "classes": data.classes}, tmp_path / "job.pt")
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        import kd.export
        from search.config import from_dict
        from kd.models import create_model
        stop = sys.argv[1]

        def stopping(name, what):
            real = getattr(kd.export, name)
            def step(*args, **kwargs):
                out = real(*args, **kwargs)
                if what == stop:  # wait here to be killed, the new export half written
                    print("stopped after", what, flush=True)
                    time.sleep(600)
                return out
            setattr(kd.export, name, step)
        for name, what, _ in {EXPORT_STAGES!r}:
            stopping(name, what)
        job = torch.load({str(tmp_path / 'job.pt')!r}, weights_only=True)
        cfg = from_dict(job["cfg"])
        kd.export.export_student({str(tmp_path / 'model')!r}, create_model(cfg.student, 2, cfg.data.image_size), cfg,
                                 job["classes"], 0.5, {{}})
        print("finished without stopping", flush=True)
    """)
    procs = {what: subprocess.Popen([sys.executable, "-c", script, what], stdout=subprocess.PIPE, text=True)
             for _, what, _ in EXPORT_STAGES}  # side by side: each writes a new folder of its own
    try:
        for what, proc in procs.items():
            deadline = threading.Timer(240, proc.kill)  # an export that never gets there ends, and says so below
            deadline.start()
            said = proc.stdout.readline()
            deadline.cancel()
            assert said == f"stopped after {what}\n", f"the export never stopped after writing {what}: {said!r}"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert _digests(tmp_path / "model") == before, f"killed after writing {what}: not the previous export"
            load_student(tmp_path / "model")  # complete and loadable
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
            proc.stdout.close()
    # the killed processes' new folders, each as far as it got: the kills came mid-export
    half = [{f.name for f in d.iterdir()} for d in tmp_path.glob(".model.*.tmp")]
    assert len(half) == len(EXPORT_STAGES) and not any("metrics.json" in files for files in half), half
    assert all(any(written in files for files in half) for _, _, written in EXPORT_STAGES), half


# -------------------------------------------------------------------------------------------- caches

def test_corrupted_teacher_and_logits_caches_are_rebuilt_and_reported(tmp_path, caplog):
    cfg = load_config(None, tiny_overrides(tmp_path / "cache") + ["teacher.train.epochs=1", "train.epochs=2"])
    data = load_dataset(cfg.data, progress=False)
    first = prepare_teacher(cfg, data, progress=False)
    weights = first.directory / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    weights.write_bytes(bytes(raw))
    second = prepare_teacher(cfg, data, progress=False)
    assert "teacher cache rebuilt" in caplog.text and "checksum mismatch" in caplog.text
    assert not second.info.cached and load_tensors(weights)
    logits = next(first.directory.glob("logits-*.safetensors"))
    logits.write_bytes(logits.read_bytes()[:100])  # truncated, as by a full disk
    caplog.clear()
    third = prepare_teacher(cfg, data, progress=False)
    assert "teacher logits cache rebuilt" in caplog.text and third.info.forward_images == 2 * len(data.train)
    assert torch.allclose(third.logits, second.logits, atol=1e-5)


def test_a_cache_of_another_version_is_rebuilt(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"a": torch.ones(3)}, {"k": 1})
    from safetensors.torch import save_file
    save_file({"a": torch.ones(3)}, str(path), metadata={"format": "kd-search-0"})
    from kd.files import CacheError
    with pytest.raises(CacheError, match="has format 'kd-search-0'"):
        load_tensors(path)


def _fill_caches(cache: str, root: str, out: str) -> None:
    """Run in two processes at once: decode the same folder and prepare the same teacher."""
    import sys
    sys.path.insert(0, str(ROOT))
    from kd.data import load_dataset
    from kd.teacher import prepare_teacher
    from search.config import load_config
    from tests.helpers import tiny_overrides
    cfg = load_config(None, tiny_overrides(cache) + ["data.source=folder", f"data.train={root}",
                                                     "teacher.train.epochs=1", "train.epochs=1"])
    data = load_dataset(cfg.data, progress=False)
    teacher = prepare_teacher(cfg, data, progress=False)
    torch.save({"images": data.train.images, "logits": teacher.logits, "cached": teacher.info.cached}, out)


def test_two_processes_filling_the_same_caches_take_turns(tmp_path):
    import multiprocessing as mp
    root = digits_folder(tmp_path / "digits", count=200)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_fill_caches, args=(str(tmp_path / "cache"), str(root), str(tmp_path / f"{i}.pt")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    a, b = (torch.load(tmp_path / f"{i}.pt", weights_only=True) for i in range(2))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["logits"], b["logits"])
    assert sorted([a["cached"], b["cached"]]) == [False, True]  # one fine-tuned, the other waited and reused it
    for f in (tmp_path / "cache").rglob("*.safetensors"):
        load_tensors(f)  # every entry intact


# ------------------------------------------------------------------------------- nothing is executed

class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_in_checkpoints_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": Payload(str(marker))}))
    from kd.config import ModelConfig
    from kd.models import create_model
    with pytest.raises(UserError, match=r"cannot read weights from .*evil\.pt"):
        create_model(ModelConfig("test_resnet", pretrained=str(evil)), 2, 32)
    from kd.train import load_state
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_state(str(evil))
    assert not marker.exists()


# -------------------------------------------------------------------------- hostile input, end to end

def _folder(tmp_path: Path) -> Path:
    return make_folder_dataset(tmp_path / "ds", {"B": 8, "M": 6})


def _csv(tmp_path: Path, rows: list[str], header: str = "file,label") -> Path:
    root = tmp_path / "csvds"
    for i in range(14):
        write_image(root / f"{i}.png", seed=i)
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return root / "labels.csv"


GOOD_ROWS = [f"{i}.png,{'a' if i < 8 else 'b'}" for i in range(14)]
HOSTILE = {
    "only broken images": (lambda t: _only_broken(t), ["data.source=folder"], "none of the"),
    "csv without the label column": (lambda t: _csv(t, [r.split(",")[0] for r in GOOD_ROWS], "file"),
                                     ["data.source=csv"], "no column 'label'"),
    "csv with an unknown label": (lambda t: _csv(t, GOOD_ROWS), ["data.source=csv", "data.classes=[a, c]"],
                                  "is not one of data.classes"),
    "csv escaping the image folder": (lambda t: _csv(t, GOOD_ROWS + ["../../etc/passwd,a"]), ["data.source=csv"],
                                      "points outside the image folder"),
    "csv with an absolute path": (lambda t: _csv(t, GOOD_ROWS + ["/etc/hostname,a"]), ["data.source=csv"],
                                  "points outside the image folder"),
    "csv that is binary": (lambda t: _binary_csv(t), ["data.source=csv"], "not a UTF-8 text CSV"),
    "wrong type": (lambda t: _folder(t), ["data.source=folder", "train.epochs=many"], "must be an integer"),
    "negative epochs": (lambda t: _folder(t), ["data.source=folder", "train.epochs=-2"], "must be >= 1"),
    "alpha outside [0, 1]": (lambda t: _folder(t), ["data.source=folder", "distill.alpha=1.2"], "must be in [0, 1]"),
    "a missing folder": (lambda t: t / "nothing-here", ["data.source=folder"], "does not exist"),
}


def _only_broken(tmp_path: Path) -> Path:
    root = tmp_path / "broken"
    for cls in ("B", "M"):
        (root / cls).mkdir(parents=True)
        (root / cls / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        (root / cls / "b.png").write_bytes(b"")
    return root


def _binary_csv(tmp_path: Path) -> Path:
    path = tmp_path / "labels.csv"
    path.write_bytes(os.urandom(256) + b"\xff\xfe")
    return path


@pytest.mark.parametrize("command", ["distill", "search"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_ends_in_one_clear_message_and_writes_nothing(case, command, tmp_path, capsys):
    make, sets, message = HOSTILE[case]
    path = make(tmp_path)
    args = [command, "digits", "--quiet", "--set", f"data.train={path}", "--set", f"data.cache_dir={tmp_path / 'c'}",
            "--set", f"output_dir={tmp_path / 'out'}"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    written = [p for p in (tmp_path / "out").rglob("*")] if (tmp_path / "out").exists() else []
    assert not written, written


def test_an_empty_search_space_is_refused_before_anything_runs(tmp_path, capsys):
    config = tmp_path / "s.yaml"
    config.write_text("search:\n  space: {}\n")
    assert main(["search", str(config), "--quiet"]) == 2
    assert "'search.space' is empty" in capsys.readouterr().err


def test_sigterm_stops_a_search_the_way_ctrl_c_does():
    """A cluster scheduler's SIGTERM reaches Tune's SIGINT handler (here Python's default: KeyboardInterrupt)."""
    from search.session import sigterm_as_interrupt
    before = signal.getsignal(signal.SIGTERM)
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever an earlier test's library set
    try:
        with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert signal.getsignal(signal.SIGTERM) == before
