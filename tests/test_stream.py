"""The streaming pipeline decodes in DataLoader workers but must train exactly as the in-memory one."""
import torch

from kd.data import load_dataset
from kd.student import train_student
from kd.teacher import prepare_teacher
from search.config import load_config
from tests.helpers import digits_folder, tiny_overrides


def test_stream_and_memory_pipelines_give_the_same_training(tmp_path):
    root = digits_folder(tmp_path / "digits", count=300)
    sets = tiny_overrides(tmp_path / "cache") + ["data.source=folder", f"data.train={root}", "train.epochs=2",
                                                 "teacher.train.epochs=1", "data.workers=2"]
    memory = load_config(None, sets)
    stream = load_config(None, sets + ["data.pipeline=stream"])
    data_m, data_s = load_dataset(memory.data, progress=False), load_dataset(stream.data, progress=False)
    assert data_s.train.images is None and data_m.train.images is not None
    assert data_s.train.paths == data_m.train.paths and data_s.fingerprint == data_m.fingerprint

    teacher_m = prepare_teacher(memory, data_m, progress=False)
    teacher_s = prepare_teacher(stream, data_s, progress=False)
    assert teacher_s.info.cached  # same data, same teacher: the stream run finds it
    assert torch.allclose(teacher_m.logits, teacher_s.logits)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_m = train_student(memory, data_m, teacher_m.logits, progress=False)
        run_s = train_student(stream, data_s, teacher_s.logits, progress=False)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(run_m.history, run_s.history, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_balanced_accuracy"] == b["val_balanced_accuracy"]

