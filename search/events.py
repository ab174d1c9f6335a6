"""trial_events.jsonl: the driver's record of every trial's end and retry, one `TrialEvent` a line.

search.progress's TrialLog appends an event as it happens (`append_event`); search.experiment reads them back
(`read_events`) through the same dataclass (kd.records: every field checked, every value coerced), so a field
renamed on one side fails at the first read, naming the file and the line. A line cut short by a kill is skipped.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kd.errors import UserError
from kd.records import JsonRecord
from search.records import EVENTS, TrialStatus


@dataclass(frozen=True)
class TrialEvent(JsonRecord):
    """One trial's end (completed, stopped early, failed) or retry."""
    trial: str                                   # Ray's trial id
    status: TrialStatus                          # completed, stopped early, failed, or retry (it runs again)
    epochs: int | None = None                    # the epochs it trained (an end that was not a failure)
    error: str = ""                              # the line naming the exception (a retry or a failure)
    time: float = 0.0                            # wall-clock seconds (time.time()) when the driver learnt of it


def append_event(path: str | Path, event: TrialEvent) -> None:
    """Add `event` to a run's trial_events.jsonl (`path`), flushed to disk before this returns."""
    with open(path, "a") as f:
        f.write(json.dumps(event.to_dict()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_events(run_dir: str | Path) -> list[TrialEvent]:
    """The run's trial events in the order they happened ([] before the first); a line cut short by a kill (or
    still being written) is skipped, a line whose fields are not a TrialEvent's is an error naming the file."""
    path = Path(run_dir) / EVENTS
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    events = []
    for number, line in enumerate(lines, 1):
        try:
            raw = json.loads(line)
        except ValueError:
            continue
        if not isinstance(raw, dict):
            raise UserError(f"{path} line {number}: not a TrialEvent record ({line[:80]})")
        events.append(TrialEvent.from_dict(raw, f"{path} line {number}"))
    return events
