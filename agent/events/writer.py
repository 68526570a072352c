"""Writer of spec/events.md JSON Lines: masks as hex strings, absent fields left out."""

from typing import BinaryIO

import msgspec

from agent.events.model import EVENT_TYPES, Event

_COMMON = ("v", "ts", "tgid")
# Per kind: (field, is_mask) in declaration order, without the common head.
_LAYOUT = {
    t: tuple((f, f in t.MASKS) for f in t.__struct_fields__ if f not in _COMMON) for t in EVENT_TYPES
}
_encoder = msgspec.json.Encoder()


def to_dict(ev: Event) -> dict:
    """The event as the spec writes it: v, ts, kind, tgid first."""
    out = {"v": 1, "ts": ev.ts, "kind": ev.kind, "tgid": ev.tgid}
    for field, is_mask in _LAYOUT[type(ev)]:
        value = getattr(ev, field)
        if value is not None:
            out[field] = f"{value:#x}" if is_mask else value
    return out


def encode(ev: Event) -> bytes:
    """One JSON line, newline included."""
    return _encoder.encode(to_dict(ev)) + b"\n"


class EventWriter:
    """Appends events to a binary stream, one line each."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream

    def write(self, ev: Event) -> None:
        self._stream.write(encode(ev))

    def flush(self) -> None:
        self._stream.flush()
