"""Where a run's time went: seconds per phase, in the order the phases ran (`with phases("train"): ...`)."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class Phases:
    """Seconds per named phase since this object was made; a phase entered twice adds up. `ended(self)` is called
    as each phase ends (a subclass keeps its figures somewhere)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.ended()

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0

    def ended(self) -> None:
        """Called after each phase."""


def phases_text(phases: dict[str, float], notes: dict[str, str] | None = None) -> str:
    """'decode 2.1 s, teachers 31.0 s, trials 120.4 s (slots 86% busy), ...', with a note after any phase."""
    notes = notes or {}
    return ", ".join(f"{n} {s:.1f} s" + (f" ({notes[n]})" if n in notes else "") for n, s in phases.items())
