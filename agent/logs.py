"""What the agent says about itself, on standard error: text lines, or JSON objects (one per line).

    log = Log("json")
    log.info("ready: 9/9 event sources attached", attached=9)
    log.error("no tracefs: ...", status=7)

text (the default):
    xstate-agent: ready: 9/9 event sources attached
    error: no tracefs: ...
json (for journald, Loki, Elasticsearch...):
    {"ts":"2025-06-01T12:00:00.123456Z","level":"info","msg":"ready: 9/9 event sources attached","fields":{"attached":9}}

`ts` is UTC (RFC 3339), `level` info, warning or error, `fields` the message's
data (possibly empty). Violations are not messages about the agent: they go
to standard output in their own format, whatever this one is.
"""

import json
import sys
from datetime import datetime, timezone

FORMATS = ("text", "json")
LEVELS = ("info", "warning", "error")
_TEXT_PREFIX = {"info": "xstate-agent: ", "warning": "xstate-agent: warning: ", "error": "error: "}


class Log:
    def __init__(self, format: str = "text", stream=None):
        if format not in FORMATS:
            raise ValueError(f"unknown log format {format!r}: expected one of {', '.join(FORMATS)}")
        self.format = format  # a reload may change it
        self._stream = stream  # None: sys.stderr when written (tests replace it)

    def info(self, msg: str, *, plain: bool = False, **fields) -> None:
        """`plain`: the text line is the message alone, without "xstate-agent: " (results, as the summary)."""
        self._emit("info", msg, fields, plain)

    def warning(self, msg: str, **fields) -> None:
        self._emit("warning", msg, fields)

    def error(self, msg: str, **fields) -> None:
        self._emit("error", msg, fields)

    def _emit(self, level: str, msg: str, fields: dict, plain: bool = False) -> None:
        if self.format == "json":
            ts = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
            line = json.dumps({"ts": ts, "level": level, "msg": msg, "fields": fields},
                              separators=(",", ":"), default=str)
        else:
            line = msg if plain else _TEXT_PREFIX[level] + msg
        stream = self._stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()
