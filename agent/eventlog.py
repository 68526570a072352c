"""The live agent's events log: every event appended to PATH as spec JSONL, one write per batch, rotated by size.

    log = LiveEventLog(path, stats, max_bytes=256 << 20, keep=5)
    lines = log.write(batch)     # their line numbers in log.path, or None: not written, counted lost
    log.reopen()                 # SIGHUP: a new file at PATH (logrotate moved the old one)
    log.close()

Rotation: when the next batch would take PATH past max_bytes, PATH.(keep-1)
-> PATH.keep (the oldest goes), ..., PATH.1 -> PATH.2, PATH -> PATH.1, and
a new PATH starts with a `#` line saying it continues PATH.1. Readers skip
`#` lines, so `replay PATH.keep ... PATH.1 PATH` judges what one unrotated
file would hold. A batch is never split across files. Rotation is renames
only, in the reader's thread, so it never waits for the disk (no fsync, no
compression). A rotation that fails is counted and reported; writing goes on
in the current file and rotation is tried again ROTATE_RETRY_S later.
"""

import os
import sys
import time

from agent import __version__
from agent.events.writer import encode

DEFAULT_MAX_BYTES = 256 << 20
DEFAULT_KEEP = 5
# Each kind of trouble (a failed write, a failed rotation) is reported at most this often.
WARN_EVERY_S = 60.0
# After a failed rotation: until then, batches go on into the current file without another try.
ROTATE_RETRY_S = 10.0


class LiveEventLog:
    """Every event appended to PATH as spec JSONL, one write per batch.

    A batch is written whole or not at all: after a failed write (disk full...)
    the file is cut back to its last complete line, the batch's events are
    counted lost (stage events_log), and they are judged all the same. The
    line numbers given to violations are those of the file the batch went in,
    PATH at the time (PATH.1 once it is rotated). reopen() (on SIGHUP, after
    logrotate moved the file) starts a new file at PATH. max_bytes (0: never)
    and keep: rotation, see the module's docstring.
    """

    def __init__(self, path: str, stats=None, warn=None, *, max_bytes: int = 0, keep: int = DEFAULT_KEEP):
        if max_bytes < 0 or keep < 1:
            raise ValueError("max_bytes must be at least 0 and keep at least 1")
        self.path = path
        self.stats = stats
        self.warn = warn or (lambda msg: print(f"xstate-agent: {msg}", file=sys.stderr, flush=True))
        self.max_bytes = max_bytes
        self.keep = keep
        self.lost = 0
        self.rotations = 0
        self.rotate_failures = 0
        self._last_warning: dict[str, float] = {}
        self._retry_rotate_at = 0.0
        self._write = os.write  # tests put failing ones here
        self._rename = os.rename
        self.fd = -1
        self._open()

    def _open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            lines, size = 0, 0
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    lines += chunk.count(b"\n")
                    size += len(chunk)
                    last = chunk[-1:]
            if size and last != b"\n":
                # A line cut short (an earlier crash): end it, so that ours start on a line of their own.
                # It stays invalid: replay stops there with its line number.
                os.write(fd, b"\n")
                lines += 1
                size += 1
        except BaseException:
            os.close(fd)
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.lines, self.size = fd, lines, size
        # Up to this size the file holds no event: rotating it would make a file of nothing.
        self._empty_size = 0

    def reopen(self) -> None:
        try:
            self._open()
        except OSError as e:
            self.warn(f"events log {self.path}: cannot reopen: {e.strerror or e}; still writing the old file")

    def comment(self, text: str) -> None:
        """`#` lines (readers skip them): the start of a run, the file a new one continues."""
        lines = text.splitlines()
        self._write_all(b"".join(b"# " + line.encode() + b"\n" for line in lines), 0, len(lines))

    def write(self, events: list) -> list[int] | None:
        """Append the batch; its line numbers, or None if it could not be written (counted lost)."""
        data = b"".join(map(encode, events))
        if self._rotation_due(len(data)):
            self._rotate()
        first = self.lines + 1
        # One line per event: JSON strings escape newlines.
        if not self._write_all(data, len(events), len(events)):
            return None
        return list(range(first, first + len(events)))

    def _rotation_due(self, more: int) -> bool:
        """Would `more` bytes take the file past max_bytes? Not for a file with no event yet (the batch goes
        whole into it), nor before a failed rotation may be tried again."""
        return (0 < self.max_bytes < self.size + more and self.size > self._empty_size
                and time.monotonic() >= self._retry_rotate_at)

    def _rotate(self) -> None:
        try:
            for i in range(self.keep - 1, 0, -1):
                try:
                    self._rename(f"{self.path}.{i}", f"{self.path}.{i + 1}")
                except FileNotFoundError:
                    pass  # fewer files so far
            self._rename(self.path, f"{self.path}.1")
        except OSError as e:
            self._rotate_failed(e)
            return
        try:
            self._open()
        except OSError as e:
            # Back to PATH: the file we go on writing must be the one violations name.
            try:
                self._rename(f"{self.path}.1", self.path)
            except OSError:
                pass
            self._rotate_failed(e)
            return
        self.rotations += 1
        self.comment(f"xstate-agent {__version__} pid {os.getpid()}: this events log continues {self.path}.1")
        self._empty_size = self.size

    def _rotate_failed(self, e: OSError) -> None:
        self.rotate_failures += 1
        self._retry_rotate_at = time.monotonic() + ROTATE_RETRY_S
        self._report("rotate", f"events log {self.path}: cannot rotate: {e.strerror or e}; still writing "
                               f"{self.path} ({self.rotate_failures} failed rotations so far)")

    def _report(self, kind: str, msg: str) -> None:
        now = time.monotonic()
        last = self._last_warning.get(kind)
        if last is None or now - last >= WARN_EVERY_S:
            self._last_warning[kind] = now
            self.warn(msg)

    def _write_all(self, data: bytes, n: int, lines: int) -> bool:
        view, done = memoryview(data), 0
        try:
            while done < len(data):
                done += self._write(self.fd, view[done:])
        except OSError as e:
            try:  # back to the last whole line, whatever part of the batch went in
                os.ftruncate(self.fd, self.size)
            except OSError:
                # The file may end in a partial line; count again from what is there.
                self.reopen()
            self.lost += n
            if self.stats is not None and n:
                self.stats.lost("events_log", n)
            self._report("write", f"events log {self.path}: {e.strerror or e}; events are judged but not logged "
                                  f"({self.lost} so far)")
            return False
        self.size += len(data)
        self.lines += lines
        return True

    def flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            self.flush()
            os.close(self.fd)
            self.fd = -1
