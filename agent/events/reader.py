"""Strict reader of event logs (JSON Lines, spec/events.md).

Events come out in batches with their line numbers. A block of lines with no
comment, no blank line and nothing wrong is decoded in one msgspec call; any
other block is decoded line by line, which also finds the exact line of an
error. Events before a bad line are still delivered, then InputError is
raised: nothing after a bad line is judged.
"""

import contextlib
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgspec

from agent.events.model import AnyEvent, Event

BLOCK = 1 << 20
_decoder = msgspec.json.Decoder(AnyEvent)
STDIN = "-"
STDIN_NAME = "<stdin>"
# Longest message of an input error: msgspec and the mask check quote the bad value, which may be huge.
MESSAGE_MAX = 300


@dataclass
class InputError(Exception):
    """Bad input: where it is and what is wrong with it."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"


def _clip(message: str) -> str:
    """At most MESSAGE_MAX characters, keeping the end, which names the field (" - at `$.value`")."""
    if len(message) <= MESSAGE_MAX:
        return message
    return f"{message[:MESSAGE_MAX - 100]} ... {message[-95:]}"


def decode_line(raw: bytes) -> Event:
    """Decode one JSON line; raises ValueError with a readable reason."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte {e.start} of the line)") from None
    try:
        return _decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise ValueError(_clip(f"invalid event: {e}")) from None
    except msgspec.DecodeError as e:
        raise ValueError(_clip(f"not a JSON object: {e}")) from None
    except RecursionError:
        # msgspec's limit is Python's recursion limit, even inside a field that is ignored.
        raise ValueError("not a JSON object: nested too deeply") from None


def _is_skipped(raw: bytes) -> bool:
    return not raw.strip() or raw[:1] == b"#"


def _slow(block: bytes, name: str, first_line: int) -> Iterator[tuple[list[Event], list[int]]]:
    events: list[Event] = []
    lines: list[int] = []
    for n, raw in enumerate(block.split(b"\n"), first_line):
        if _is_skipped(raw):
            continue
        try:
            events.append(decode_line(raw))
        except ValueError as e:
            if events:
                yield events, lines
            raise InputError(name, n, str(e)) from None
        lines.append(n)
    if events:
        yield events, lines


def _newlines(block: bytes) -> int:
    # Not block.count(b"\n"): in CPython 3.11 counting one byte is a plain
    # byte loop, while replace() finds it with memchr, some 5x faster here.
    return len(block) - len(block.replace(b"\n", b""))


def _fast(block: bytes, newlines: int) -> list[Event] | None:
    """The whole block in one call, when it is plain: else None."""
    # Plain: every line starts with "{" and ends with "}" (so no comment, no
    # blank line, and no JSON value can span a newline, since "}" whitespace
    # "{" never occurs inside one value).
    if block[:1] != b"{" or block[-1:] != b"}" or block.count(b"}\n{") != newlines:
        return None
    try:
        if not block.isascii():
            block.decode("utf-8")
        events = _decoder.decode_lines(block)
    except (UnicodeDecodeError, msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    # Two objects on one line would shift line numbers.
    return events if len(events) == newlines + 1 else None


def read_stream(stream, name: str) -> Iterator[tuple[list[Event], Iterable[int]]]:
    """Batches of (events, their 1-based line numbers) from a binary stream."""
    line = 1
    pieces: list[bytes] = []  # what was read since the last newline
    while True:
        chunk = stream.read(BLOCK)
        if not chunk:
            data = b"".join(pieces)
            if data:
                yield from _block(data, name, line, _newlines(data))
            return
        cut = chunk.rfind(b"\n")
        if cut < 0:
            # Joined once the line ends: a line longer than a block costs linear
            # time, not a copy of all of it so far at every read.
            pieces.append(chunk)
            continue
        pieces.append(chunk[:cut])
        block = b"".join(pieces)
        pieces = [chunk[cut + 1:]]
        newlines = _newlines(block)
        yield from _block(block, name, line, newlines)
        line += newlines + 1


def _block(block: bytes, name: str, line: int, newlines: int) -> Iterator[tuple[list[Event], Iterable[int]]]:
    events = _fast(block, newlines)
    if events is not None:
        yield events, range(line, line + len(events))
    else:
        yield from _slow(block, name, line)


def _open(path: str):
    """(name, binary stream to use in a `with`) of a path; `-` is standard input, left open."""
    if path == STDIN:
        # None when the process was started with its standard input closed.
        if sys.stdin is None:
            raise InputError(STDIN_NAME, 0, "cannot read: standard input is closed")
        return STDIN_NAME, contextlib.nullcontext(sys.stdin.buffer)
    try:
        return path, open(path, "rb")
    except OSError as e:
        raise InputError(path, 0, f"cannot open: {e.strerror}") from None


def read_files(paths: Iterable[str], wrap=None) -> Iterator[tuple[str, list[Event], Iterable[int]]]:
    """Batches from several files, in order, as one stream; `-` is standard input.

    `wrap`, if given, makes the stream read from each opened file (`run --follow` waits for more).
    """
    for path in paths:
        name, opened = _open(path)
        with opened as stream:
            try:
                yield from ((name, ev, ln) for ev, ln in read_stream(wrap(stream) if wrap else stream, name))
            except OSError as e:
                raise InputError(name, 0, f"cannot read: {e.strerror}") from None
