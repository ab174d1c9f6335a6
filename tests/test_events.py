"""trial_events.jsonl: written by the driver's TrialLog as search.events.TrialEvent records, read back through them."""
import json
from types import SimpleNamespace

import pytest

from kd.errors import UserError
from search.events import TrialEvent, read_events
from search.progress import TrialLog
from search.records import EVENTS, TrialStatus


def _trial(trial_id, error=""):
    return SimpleNamespace(trial_id=trial_id, config={"train.lr": 0.01}, last_result={}, path=None, local_path=None,
                           get_error=lambda: error)


def test_the_trial_log_writes_typed_events_that_read_back(tmp_path):
    log = TrialLog(tmp_path, "val_balanced_accuracy", "max", max_epochs=3, echo=False)
    log.on_trial_result(0, [], _trial("a"), {"epoch": 3, "val_balanced_accuracy": 0.9})
    log.on_trial_complete(0, [], _trial("a"))
    log.on_trial_result(0, [], _trial("b"), {"epoch": 1, "val_balanced_accuracy": 0.5})
    log.on_trial_complete(0, [], _trial("b"))
    log.on_trial_recover(0, [], _trial("c", "Traceback (most recent call last):\nValueError: boom"))
    log.on_trial_error(0, [], _trial("c", "RuntimeError: again"))
    events = read_events(tmp_path)
    assert [(e.trial, e.status, e.epochs, e.error) for e in events] == [
        ("a", TrialStatus.COMPLETED, 3, ""), ("b", TrialStatus.STOPPED, 1, ""),
        ("c", TrialStatus.RETRY, None, "ValueError: boom"), ("c", TrialStatus.FAILED, None, "RuntimeError: again")]
    assert all(e.time > 0 for e in events)
    lines = [json.loads(line) for line in (tmp_path / EVENTS).read_text().splitlines()]
    assert lines[0] == {**events[0].to_dict(), "status": "completed"}  # the plain strings, as before


def test_an_earlier_versions_events_still_read_and_a_renamed_field_names_the_file_and_line(tmp_path):
    earlier = [{"trial": "a", "status": "stopped early", "epochs": 2, "time": 1.5},
               {"trial": "b", "status": "retry", "error": "ValueError: x", "time": 2.0},
               {"trial": "b", "status": "failed", "error": "ValueError: y", "time": 3.0}]
    text = "".join(json.dumps(e) + "\n" for e in earlier)
    (tmp_path / EVENTS).write_text(text + '{"trial": "c", "sta')  # the last line cut short by a kill: skipped
    assert read_events(tmp_path) == [TrialEvent("a", TrialStatus.STOPPED, epochs=2, time=1.5),
                                     TrialEvent("b", TrialStatus.RETRY, error="ValueError: x", time=2.0),
                                     TrialEvent("b", TrialStatus.FAILED, error="ValueError: y", time=3.0)]
    assert read_events(tmp_path / "nowhere") == []
    (tmp_path / EVENTS).write_text(text + json.dumps({"trial_id": "c", "status": "failed"}) + "\n")
    with pytest.raises(UserError, match=rf"{EVENTS} line 4: unknown field 'trial_id' \(did you mean 'trial'\?\)"):
        read_events(tmp_path)
    (tmp_path / EVENTS).write_text(json.dumps({"trial": "c", "status": "lost"}) + "\n")
    with pytest.raises(UserError, match=rf"{EVENTS} line 1: 'status' must be one of"):
        read_events(tmp_path)


def test_the_console_counts_trials_done_and_the_time_left(tmp_path, capsys, monkeypatch):
    """Each finished trial's line: the trials done of search.num_samples, and the time left at this run's pace
    (on a resumed search, the trials an earlier run finished count as done but not toward the pace)."""
    clock = iter([1000.0, 1030.0, 1030.0, 1060.0, 1060.0, 1090.0, 1090.0])
    monkeypatch.setattr("search.progress.time.time", lambda: next(clock))
    log = TrialLog(tmp_path, "val_auc", "max", max_epochs=3, echo=True, total=6)  # started at 1000
    earlier = SimpleNamespace(trial_id="old", status="TERMINATED")  # finished before a resume
    for name, value in (("a", 0.9), ("b", 0.95)):
        log.on_trial_result(0, [], _trial(name), {"epoch": 3, "val_auc": value})
        log.on_trial_complete(0, [earlier], _trial(name))
    log.on_trial_error(0, [earlier], _trial("c", "RuntimeError: x"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[  0:30 2/6, about 2 min left] trial a completed: val_auc 0.9000 (best 0.9000)")
    assert lines[1].startswith("[  1:00 3/6, about 90 s left] trial b completed: val_auc 0.9500 (best 0.9500)")
    assert lines[2].startswith("[  1:30 4/6, about 60 s left] trial c failed: RuntimeError: x")
