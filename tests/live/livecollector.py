"""A live backend's events, collected for the live tests (see conftest.live)."""

import os
import threading
import time

from agent.events.reader import decode_line
from agent.events.writer import encode


class Collector:
    """Events from a live backend, for this test process and the child
    processes a test follows (follow()).

    A thread drains the ring buffer every 2 ms, as the agent's reader does,
    so that other processes' events (a benchmark flooding KVM ioctls on the
    same host) cannot fill it while a test waits for its own.
    """

    def __init__(self):
        self.items = []  # (event, raw)
        self.backend = None
        self.polls = 0
        self._stop = threading.Event()
        self._reader = None
        self.tgids = {os.getpid()}
        self.names = {}  # vm id -> human name, looked up when its event arrived
        self.invalid = []  # (event, why): events the strict spec reader does not take back unchanged
        self.foreign = 0  # events of processes not followed

    def __call__(self, event, raw):
        if event.tgid not in self.tgids:
            # Another process (a benchmark may flood this host): kept cheap.
            self.foreign += 1
            return
        try:
            if decode_line(encode(event).rstrip(b"\n")) != event:
                self.invalid.append((event, "changed by a write/read round trip"))
        except Exception as e:  # noqa: BLE001 - recorded, checked by test_live_events_are_valid
            self.invalid.append((event, repr(e)))
        self.items.append((event, raw))
        vm = getattr(event, "vm", None)
        if vm is not None:
            self.names[vm] = self.backend.vms.name(vm)

    def start(self, backend) -> "Collector":
        """Start `backend` (made with this collector as its callback) and its reader thread."""
        self.backend = backend
        backend.start()
        self._reader = threading.Thread(target=self._read, name="ring-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        while not self._stop.is_set():
            self.backend.poll(2)
            self.polls += 1

    def close(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.join()
        self.backend.close()

    def _sync(self) -> None:
        """Return once a whole poll began after this call: every record
        submitted before it has been handed over."""
        target = self.polls + 2
        while self.polls < target:
            time.sleep(0.001)

    def assert_nothing_lost(self) -> None:
        """Nothing lost in BPF and nothing the decoder refused. On a quiet host
        (CI) exactly; when another process floods the host with KVM ioctls
        (a benchmark next to the tests), losses beyond the reader are its."""
        lost = self.backend.lost()
        assert self.backend.decode_errors == 0, self.backend.last_decode_error
        assert lost == 0 or self.foreign > 10_000, \
            f"{lost} records lost with only {self.foreign} events of other processes"

    def follow(self, tgid: int) -> None:
        self.tgids.add(tgid)

    def expect(self, mark: int, n: int, kind):
        """Exactly the next n events of this thread after `mark`, all of type `kind`."""
        got = self.since(mark, n)
        assert [type(e) for e, _ in got] == [kind] * n, got
        return got

    def quiet(self, mark: int, wait: float = 0.2):
        """Events of this thread after `mark`, after waiting `wait` seconds for any."""
        return self.since(mark, 10**9, timeout=wait)

    def of(self, tgid: int, mark: int, n: int, timeout: float = 5.0):
        """At least n events of process `tgid` after `mark`, waiting for them up to timeout."""
        return self._wait(mark, n, timeout, lambda e: e.tgid == tgid)

    def mark(self) -> int:
        """Drain what is pending; events after this index are the test's own."""
        self._sync()
        return len(self.items)

    def since(self, mark: int, n: int, timeout: float = 2.0):
        """At least n events after `mark` from this thread, waiting for them up to timeout."""
        tid = threading.get_native_id()
        return self._wait(mark, n, timeout, lambda e: e.tid == tid)

    def _wait(self, mark, n, timeout, match):
        deadline = time.monotonic() + timeout
        while True:
            got = [(e, r) for e, r in self.items[mark:] if match(e)]
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                self._sync()  # what was submitted by now is in
                return [(e, r) for e, r in self.items[mark:] if match(e)]
            time.sleep(0.002)
