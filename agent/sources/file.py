"""Events from recorded logs, optionally followed as they grow (`run --from FILE --follow`)."""

import threading
from collections.abc import Iterator

from agent.events.reader import read_files

POLL_SECONDS = 0.2


class _Growing:
    """A file read as a stream that waits for more data instead of ending, until stopped."""

    def __init__(self, raw, stop: threading.Event, poll: float):
        self._raw = raw
        self._stop = stop
        self._poll = poll

    def read(self, n: int) -> bytes:
        while True:
            data = self._raw.read(n)
            if data or self._stop.wait(self._poll):
                return data


def file_source(paths: list[str], stop: threading.Event, follow: bool = False,
                poll: float = POLL_SECONDS) -> Iterator[tuple[str, list, object]]:
    """Batches (file, events, line numbers); with `follow`, the last file is tailed until `stop`."""
    if not follow:
        yield from read_files(paths)
        return
    yield from read_files(paths[:-1])
    yield from read_files(paths[-1:], lambda raw: _Growing(raw, stop, poll))
