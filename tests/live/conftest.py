"""Live tests run against the real kernel: they need root, BCC and (some)
/dev/kvm. Without them they skip with the reason, except in CI (CI=true),
where a missing prerequisite is a failure: CI must run them for real."""

import os
import threading
import time

import pytest

from livecheck import require_bpf


class Collector:
    """Events from the live backend, for this test process only."""

    def __init__(self):
        self.items = []  # (event, raw)
        self.backend = None

    def __call__(self, event, raw):
        if event.tgid == os.getpid():
            self.items.append((event, raw))

    def mark(self) -> int:
        """Drain what is pending; events after this index are the test's own."""
        self.backend.poll(0)
        return len(self.items)

    def since(self, mark: int, n: int, timeout: float = 2.0):
        """At least n events after `mark` from this thread, waiting for them up to timeout."""
        tid = threading.get_native_id()
        deadline = time.monotonic() + timeout
        while True:
            got = [(e, r) for e, r in self.items[mark:] if e.tid == tid]
            if len(got) >= n or time.monotonic() > deadline:
                return got
            self.backend.poll(5)


@pytest.fixture(scope="session")
def live():
    """One backend for the whole session (compiling takes about a second)."""
    require_bpf()
    from agent.probes.tracepoint_backend import TracepointBackend
    c = Collector()
    c.backend = TracepointBackend(c)
    c.backend.start()
    yield c
    c.backend.close()
