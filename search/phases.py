"""Where a search's time went: the seconds of each phase (decode, teachers, trials, re-ranking, final student,
export), kept in run.json as each ends, so an interrupted search keeps what it measured; how busy the trial slots
were is read back from the trials (search.run's `slot_use`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from kd.timing import Phases
from search.records import RunRecord


class RunPhases(Phases):
    """kd.timing.Phases written into the search's run.json (once it has one: `start_record`)."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir
        self.record: RunRecord | None = None

    def start_record(self, record: RunRecord) -> None:
        self.record = record
        self.ended()

    def ended(self) -> None:
        if self.record is not None:
            self.record = dataclasses.replace(self.record, phases=dict(self.seconds), seconds=self.total)
            self.record.write(self.run_dir)
