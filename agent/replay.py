"""Offline replay: judge recorded event logs and report the verdicts."""

import sys
from collections import Counter
from collections.abc import Callable, Iterable

from agent.events.reader import read_files
from agent.policy.engine import Engine, Violation

Sink = Callable[[Violation, str, int], None]


class Summary:
    def __init__(self):
        self.events = 0
        self.ts_backwards = 0
        self.by_severity: Counter = Counter()
        self.by_rule: Counter = Counter()

    @property
    def violations(self) -> int:
        return sum(self.by_severity.values())

    def line(self, engine: Engine) -> str:
        sev = ", ".join(f"{n} {s}" for s, n in sorted(self.by_severity.items())) or "none"
        st = engine.state
        return (f"{self.events} events judged ({sum(engine.refused.values())} refused), "
                f"{self.violations} violations ({sev}); profile {engine.profile.name}; "
                f"evicted {st.evicted_processes} processes, {st.evicted_vcpus} vCPUs"
                + (f"; ts went backwards {self.ts_backwards} times" if self.ts_backwards else ""))


def replay(paths: Iterable[str], engine: Engine, sink: Sink, summary: Summary) -> Summary:
    """Judge every event of `paths` in order; raises InputError at the first bad line.

    `summary` is filled as it goes, so it is right up to a bad line too.
    """
    judge = engine.judge
    current, last_ts = None, -1
    for file, events, lines in read_files(paths):
        if file != current:
            current, last_ts = file, -1
        for ev, line in zip(events, lines):
            if ev.ts < last_ts:
                # The spec allows a warning, never a reorder: the first one is shown, all are counted.
                if not summary.ts_backwards:
                    print(f"{file}:{line}: warning: ts goes backwards ({ev.ts} < {last_ts})", file=sys.stderr)
                summary.ts_backwards += 1
            last_ts = ev.ts
            out = judge(ev)
            if out:
                for v in out:
                    summary.by_severity[v.rule.severity] += 1
                    summary.by_rule[v.rule.id] += 1
                    sink(v, file, line)
        summary.events += len(events)
    return summary
