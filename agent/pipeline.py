"""events → policy → sinks: the one path that live probes and recorded logs share."""

import json
import sys
from collections.abc import Iterable
from typing import Protocol, TextIO

from agent.events import Event
from agent.events.writer import EventWriter
from agent.policy.engine import Engine, Violation


class Observer(Protocol):
    """Sees every event with its verdicts (statistics, metrics)."""

    def observe(self, ev: Event, violations) -> None: ...


class ViolationPrinter:
    """Violations as JSON lines, the keys of `replay --format json`."""

    def __init__(self, out: TextIO = sys.stdout):
        self._out = out

    def __call__(self, v: Violation, file: str | None, line: int | None) -> None:
        self._out.write(json.dumps(v.to_dict(file, line), separators=(",", ":")) + "\n")
        self._out.flush()


class EventLog:
    """Every event as spec JSONL, a recording that `replay` judges identically."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "ab")
        self._writer = EventWriter(self._file)
        # Lines already there, so that violations can point into the file.
        with open(path, "rb") as f:
            self.lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    def write(self, ev: Event) -> int:
        self._writer.write(ev)
        self.lines += 1
        return self.lines

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Pipeline:
    def __init__(self, engine: Engine, on_violation=None, event_log: EventLog | None = None,
                 observers: Iterable[Observer] = ()):
        self.engine = engine
        self.on_violation = on_violation
        self.event_log = event_log
        self.observers = tuple(observers)
        self.events = 0
        self.violations = 0

    def feed(self, events: Iterable[Event], file: str | None = None, lines: Iterable[int] | None = None) -> None:
        """Judge a batch in order. `file`/`lines` locate the events in their source, if any."""
        judge = self.engine.judge
        log = self.event_log
        observers = self.observers
        source_lines = None if lines is None else iter(lines)
        where = line = None
        for ev in events:
            if source_lines is not None:
                where, line = file, next(source_lines)
            if log is not None:
                logged = log.write(ev)
                if source_lines is None:
                    where, line = log.path, logged
            out = judge(ev)
            for o in observers:
                o.observe(ev, out)
            self.events += 1
            if out:
                self.violations += len(out)
                if self.on_violation is not None:
                    for v in out:
                        self.on_violation(v, where, line)

    def close(self) -> None:
        if self.event_log is not None:
            self.event_log.close()
