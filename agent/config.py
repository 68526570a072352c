"""The configuration file of `xstate-agent run`: a TOML file with one top-level key per option.

    values = read(path)              # the keys the file sets, checked; ConfigError names file, line, key
    config = merge(values, given)    # defaults < file < options given on the command line
    config = resolve(path, given)    # both (path None: no file)

Every key is the name of a `run` option with `_` for `-` (deploy/config.example.toml
documents each). A key the agent does not know is an error, as is a value of the
wrong type or out of range: a typo must not quietly leave the default in force.
tomllib gives no positions, so the line of a key is found in the text.

On SIGHUP the live agent reads the file again (cli.LiveReload): the keys in
NEEDS_RESTART are reported and ignored, the others take effect between two
batches of events.
"""

import difflib
import json
import os
import re
import tomllib
from dataclasses import dataclass, fields

from agent.eventlog import DEFAULT_KEEP, DEFAULT_MAX_BYTES
from agent.exporters.prometheus import parse_listen
from agent.logs import FORMATS
from agent.policy.profiles import PROFILES, UPSTREAM
from agent.policy.state import DEFAULT_MAX_PROCESSES, DEFAULT_MAX_VCPUS
from agent.stats import DEFAULT_MAX_VMS
from agent.xstate import DEFAULT_DYN, MASK64

DEFAULT_PATH = "/etc/xstate-agent/config.toml"
BACKENDS = ("auto", "kprobe", "tracepoint")  # as `run --backend`
NO_LISTEN = ("", "none", "off")  # `listen` values that turn the metrics server off


@dataclass(frozen=True)
class Config:
    """What `run` runs with. None: not set (events_log, web_config: none; listen: the live default)."""

    backend: str = "auto"
    profile: str = UPSTREAM
    dyn: int = DEFAULT_DYN
    max_processes: int = DEFAULT_MAX_PROCESSES
    max_vcpus: int = DEFAULT_MAX_VCPUS
    events_log: str | None = None
    events_log_max_bytes: int = DEFAULT_MAX_BYTES
    events_log_keep: int = DEFAULT_KEEP
    listen: str | None = None
    web_config: str | None = None
    vm_label: bool = True
    max_vms: int = DEFAULT_MAX_VMS
    log_format: str = "text"
    user: str | None = None


KEYS = tuple(f.name for f in fields(Config))
# Set up once at start: the probes, the metrics server, the engine's state tables.
NEEDS_RESTART = frozenset({"backend", "listen", "web_config", "max_processes", "max_vcpus", "user"})
# "" means none for these (TOML has no null), in the file and on the command line.
OPTIONAL_PATHS = ("events_log", "web_config")


class ConfigError(Exception):
    """The configuration file cannot be read or is not valid: `path[:line]: [key: ]what`."""

    def __init__(self, path: str, what: str, key: str | None = None, line: int | None = None):
        self.path, self.what, self.key, self.line = path, what, key, line
        super().__init__(f"{path}{f':{line}' if line else ''}: {f'{key}: ' if key else ''}{what}")


# ---- values -------------------------------------------------------------------------------------

def _describe(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, (int, float)):
        return str(v)
    return f"a {type(v).__name__}"  # dates and times


def _one_of(*choices):
    def check(v):
        if v not in choices or not isinstance(v, str):
            raise ValueError(f"expected one of {', '.join(json.dumps(c) for c in choices)}, not {_describe(v)}")
        return v
    return check


def _integer(least: int):
    def check(v):
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise ValueError(f"expected an integer of at least {least}, not {_describe(v)}")
        return v
    return check


def _mask(v) -> int:
    # A string too: TOML integers stop at 2^63-1, masks at 2^64-1.
    mask = None
    if isinstance(v, int) and not isinstance(v, bool):
        mask = v
    elif isinstance(v, str):
        try:
            mask = int(v, 0)
        except ValueError:
            pass
    if mask is None or not 0 < mask <= MASK64:
        raise ValueError(f'expected a mask of 1 to 2^64-1 (an integer, or a string such as "0x40000"), '
                         f"not {_describe(v)}")
    return mask


def _path(v) -> str | None:
    if not isinstance(v, str) or "\0" in v or v and not os.path.isabs(v):
        raise ValueError(f'expected an absolute path, or "" for none, not {_describe(v)}')
    return v or None


def _user(v) -> str | None:
    if not isinstance(v, str) or "\0" in v:
        raise ValueError(f'expected a user name or uid, or "" for none, not {_describe(v)}')
    return v or None


def _listen(v) -> str:
    if not isinstance(v, str):
        raise ValueError(f'expected "ADDR:PORT", "[IPv6]:PORT", ":PORT" or "none", not {_describe(v)}')
    if v.lower() not in NO_LISTEN:
        parse_listen(v)  # its ValueError says what is wrong
    return v


def _boolean(v) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, not {_describe(v)}")
    return v


CHECKS = {
    "backend": _one_of(*BACKENDS),
    "profile": _one_of(*PROFILES),
    "dyn": _mask,
    "max_processes": _integer(1),
    "max_vcpus": _integer(1),
    "events_log": _path,
    "events_log_max_bytes": _integer(0),
    "events_log_keep": _integer(1),
    "listen": _listen,
    "web_config": _path,
    "vm_label": _boolean,
    "max_vms": _integer(1),
    "log_format": _one_of(*FORMATS),
    "user": _user,
}

# ---- the file -----------------------------------------------------------------------------------

def key_line(text: str, key: str) -> int | None:
    """The line (1-based) where the top-level `key` is set, as `key = `, `key.x = ` or `[key]`; None if not found."""
    name = rf"""(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')"""
    pattern = re.compile(rf"\s*(?:{name}\s*[=.]|\[\[?\s*{name}\s*[\].])")
    # "\n" only: TOML counts lines so, str.splitlines() also splits at \x0c, \u2028...
    for n, line in enumerate(text.split("\n"), 1):
        if pattern.match(line):
            return n
    return None


def read(path: str) -> dict:
    """The keys `path` sets, with their values checked and normalized. ConfigError if it cannot be read,
    is not TOML, or has an unknown key or a bad value (the first one, in the order of the file)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, "not valid UTF-8", line=data.count(b"\n", 0, e.start) + 1) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r" \(at line (\d+), column (\d+)\)$", str(e))
        if m is None:  # "(at end of document)"
            raise ConfigError(path, f"not valid TOML: {e}") from None
        raise ConfigError(path, f"not valid TOML: {str(e)[:m.start()]} (column {m[2]})", line=int(m[1])) from None
    errors, values = [], {}
    for key, value in doc.items():
        check = CHECKS.get(key)
        try:
            if check is None:
                close = difflib.get_close_matches(key, KEYS, 1)
                raise ValueError(f"unknown key (did you mean {close[0]}?)" if close else
                                 f"unknown key; the keys are {', '.join(KEYS)}")
            values[key] = check(value)
        except ValueError as e:
            errors.append(ConfigError(path, str(e), key, key_line(text, key)))
    if errors:
        raise min(errors, key=lambda e: e.line or 0)
    return values


def merge(values: dict, given: dict) -> Config:
    """The defaults, then the file's `values`, then the options `given` on the command line."""
    merged = {**values, **given}
    for key in OPTIONAL_PATHS:
        if merged.get(key) == "":
            merged[key] = None
    return Config(**merged)


def resolve(path: str | None, given: dict) -> Config:
    return merge(read(path) if path is not None else {}, given)
