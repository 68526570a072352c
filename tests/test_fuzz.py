"""Fuzzing of the strict reader, the policy engine and `xstate-agent replay` with hostile input.

Properties:
- the reader, whatever the bytes (arbitrary, or event lines mutated: wrong
  types, huge ints, NaN, deep nesting, unicode, long strings, missing or
  duplicate keys, CRLF, NUL, BOM...), gives events or raises InputError
  naming the stream and the bad line; nothing else escapes. Its fast path
  (a block in one msgspec call) agrees with the line-by-line reference, at
  any block size, and the events it accepts can be judged;
- the engine, fed valid-typed events of any kind in any order (ids that
  collide, a vCPU used before it is created or after its process exited,
  tiny caps that evict all the time, any DYN mask), never raises, and its
  tracker stays consistent and within its caps;
- `xstate-agent replay` exits 0, 1 or 2, never with a traceback; at 2 it
  names the file (and line);
- an input error's message stays short (the bad value quoted is cut), and
  no huge mask string is kept in the decoder's cache.

CI budget: fixed example counts, derandomized, the whole file in some 20 s.
benchmarks/fuzz_long.py runs the same properties (the check_* functions and
strategies here) for minutes with random seeds.
"""

import io
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from agent.cli import app
from agent.events import model, reader
from agent.events.reader import InputError, decode_line, read_stream
from agent.events.writer import to_dict
from agent.policy.engine import Engine
from agent.policy.profiles import PROFILES
from agent.xstate import DEFAULT_DYN, MASK64, PERM_LOCKED, XTILE
from helpers import ROOT
from hostmodel import Host
from strategies import INTERESTING_MASKS, event_strategy, masks, rets

NAME = "fuzz.jsonl"
CI = dict(deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

# ---- valid events, from ids drawn from the given pools (tests/strategies.py) ---------------------

# Wide ranges, for lines to mutate.
any_event = event_strategy(st.integers(0, 2**31 - 1), st.text(min_size=1, max_size=256), st.integers(0, 2**31 - 1))
# Few ids, so that processes, VMs and vCPUs collide all the time, and mostly a few masks and success,
# so that the state the rules read is often known and their checks run to the end.
colliding_event = event_strategy(st.sampled_from((1, 2, 3, 0)), st.sampled_from(("a", "b")),
                                 st.sampled_from((0, 1, 2**31 - 1)), ts=st.integers(0, 100),
                                 masks=st.sampled_from(INTERESTING_MASKS[:10]) | masks,
                                 rets=st.sampled_from((0, 0, 0, 0, -22)) | rets)


@st.composite
def shuffled_host_streams(draw) -> list:
    """A correct host's stream (tests/hostmodel.py), then events swapped, dropped, repeated, moved or a
    stretch reversed: a vCPU used after its process exited, destroyed before it was created..."""
    events = Host(random.Random(draw(st.integers(0, 2**32 - 1))), max_procs=draw(st.integers(1, 4))).run(
        draw(st.integers(0, 200)))
    for _ in range(draw(st.integers(1, 8)) if events else 0):
        i, j = sorted((draw(st.integers(0, len(events) - 1)), draw(st.integers(0, len(events) - 1))))
        op = draw(st.sampled_from(("swap", "drop", "repeat", "move", "reverse")))
        if op == "swap":
            events[i], events[j] = events[j], events[i]
        elif op == "drop" and len(events) > 1:
            del events[i]
        elif op == "repeat":
            events.insert(j, events[i])
        elif op == "move":
            events.insert(i, events.pop(j))
        else:
            events[i:j + 1] = events[i:j + 1][::-1]
    return events


# ---- hostile JSON -----------------------------------------------------------------------------

def _nested(depth: int, opener: str, closer: str, inner: str = "1") -> str:
    return opener * depth + inner + closer * depth


HOSTILE_TOKENS = (
    "null", "true", "false", "0", "-0", "1", "-1", "0.0", "1.5", "-1e-9", "1e400", "-1e400", "1E2", "1.0",
    "NaN", "-NaN", "Infinity", "-Infinity", "01", "0x10", "+1", ".5", "1.", "--1", "", " ", "\t",
    '""', '"0x"', '"0X"', '"0x-1"', '"-0x1"', '" 0x1"', '"0x1 "', '"0x1\\u0000"', '"0x\\u0661"', '"0x\\uff26"',
    '"0x' + "f" * 17 + '"', '"0x' + "0" * 100_000 + '1"', '"0x' + "f" * 100_000 + '"', '"\\ud800"', '"\\udcff"',
    '"\\u0000"', '"\\n"', '"\\"', '"\\x41"', '"\\uZZZZ"', '"unterminated',
    "[]", "{}", '{"a":1}', "[1,2]", '{"kind":"exit"}', "[null]",
    str(2**31), str(2**31 - 1), str(-(2**31) - 1), str(2**32), str(2**63), str(MASK64), str(2**64), str(-(2**63) - 1),
    "1" + "0" * 5000, "-1" + "0" * 5000, "0." + "0" * 5000 + "1",
    _nested(50, "[", "]"), _nested(2000, "[", "]"), _nested(100_000, "[", "]"),
    _nested(50, '{"a":', "}"), _nested(5000, '{"a":', "}"), _nested(100_000, "[", "]", "")[:150_000],
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
    max_leaves=12)
hostile_values = st.one_of(
    st.sampled_from(HOSTILE_TOKENS),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(json.dumps),
    st.text(max_size=300).map(json.dumps),
    st.text(max_size=300).map(lambda s: json.dumps(s, ensure_ascii=False)),
    st.sampled_from((64, 65, 256, 257, 100_000)).map(lambda n: '"' + "q" * n + '"'),
    json_values.map(json.dumps),
)
FIELDS = sorted({f for t in model.EVENT_TYPES for f in t.__struct_fields__} | {"kind"})
keys = st.sampled_from(FIELDS) | st.text(max_size=12)


@st.composite
def mutated_lines(draw) -> bytes:
    """A valid event's line with a few fields replaced, removed, duplicated or added, then bytes mangled."""
    pairs = [(k, json.dumps(v)) for k, v in to_dict(draw(any_event)).items()]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(("replace", "remove", "duplicate", "add", "shuffle")))
        i = draw(st.integers(0, len(pairs) - 1)) if pairs else 0
        if op == "replace" and pairs:
            pairs[i] = (pairs[i][0], draw(hostile_values))
        elif op == "remove" and pairs:
            del pairs[i]
        elif op == "duplicate" and pairs:
            key = pairs[i][0]
            pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(st.just(pairs[i][1]) | hostile_values)))
        elif op == "add":
            pairs.insert(draw(st.integers(0, len(pairs))), (draw(keys), draw(hostile_values)))
        else:
            pairs = draw(st.permutations(pairs))
    text = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"
    line = text.encode("utf-8", "surrogatepass")  # lone surrogates: not UTF-8
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.integers(0, len(line)))
        how = draw(st.sampled_from(("bom", "cr", "nul", "cut", "byte", "space", "utf16", "latin1")))
        if how == "bom":
            line = b"\xef\xbb\xbf" + line
        elif how == "cr":
            line += b"\r"
        elif how == "nul":
            line = line[:where] + b"\x00" + line[where:]
        elif how == "cut":
            line = line[:where]
        elif how == "byte":
            # Any byte but a newline, which would make two lines.
            line = line[:where] + bytes([draw(st.integers(0, 255).filter(lambda b: b != 10))]) + line[where + 1:]
        elif how == "space":
            line = draw(st.sampled_from((b" ", b"\t", b"\x0b", b"\x0c"))) + line
        elif how == "utf16":
            line = text.encode("utf-16", "surrogatepass").replace(b"\n", b"")
        else:
            line = text.encode("latin-1", "replace")
    return line


valid_lines = any_event.map(lambda ev: json.dumps(to_dict(ev)).encode())
filler_lines = st.sampled_from((b"", b"# a comment", b"   ", b"\r", b"#", b"# caf\xe9"))
# Arbitrary bytes, and streams made of pieces that matter to the reader.
pieces = st.sampled_from((b"\n", b"\r\n", b"#", b"{", b"}", b"}\n{", b"\x00", b"\xef\xbb\xbf", b"\xff", b" ",
                          b'{"v":1,"ts":1,"kind":"exit","tgid":1}', b'"kind":"exit"', b",", b"[", b"]")) | st.binary(
    max_size=8)
byte_streams = st.binary(max_size=2000) | st.lists(pieces, max_size=60).map(b"".join)
blocks = st.sampled_from((1, 2, 7, 64, 1000, reader.BLOCK))


# ---- the properties (also run by benchmarks/fuzz_long.py) ------------------------------------

def reference(data: bytes) -> tuple[list, int | None]:
    """What the reader must give: decode_line on each line that is not blank or a comment, up to the
    first bad one. ([(line, event)], the bad line's number or None)."""
    got = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip() or raw.startswith(b"#"):
            continue
        try:
            got.append((n, decode_line(raw)))
        except ValueError:
            return got, n
    return got, None


def check_stream(data: bytes, block: int) -> None:
    """The reader on `data`, `block` bytes at a time, agrees with reference(); its events can be judged."""
    want, bad_line = reference(data)
    got, err = [], None
    saved, reader.BLOCK = reader.BLOCK, block
    try:
        for evs, lines in read_stream(io.BytesIO(data), NAME):
            got.extend(zip(lines, evs))
    except InputError as e:
        err = e
    finally:
        reader.BLOCK = saved
    assert got == want
    if bad_line is None:
        assert err is None
    else:
        assert err is not None and (err.file, err.line) == (NAME, bad_line), err
        assert str(err).startswith(f"{NAME}:{bad_line}: ") and len(err.message) <= reader.MESSAGE_MAX
    engine = Engine()
    for _, ev in got:
        engine.judge(ev)


def check_tracker(engine: Engine) -> None:
    """The tracker's maps agree with each other and stay within the caps."""
    st_ = engine.state
    assert len(st_.procs) <= st_.max_processes and len(st_.vcpus) <= st_.max_vcpus
    indexed = {(t, vm, i): c for t, vms in st_.index.items() for vm, ids in vms.items() for i, c in ids.items()}
    assert all(st_.index.values()) and all(ids for vms in st_.index.values() for ids in vms.values())
    assert indexed.keys() == st_.vcpus.keys()
    for key, c in st_.vcpus.items():
        p = st_.procs.get(key[0])
        assert indexed[key] is c and c.key == key and c.proc is p and p is not None and key in p.vcpus
    for tgid, p in st_.procs.items():
        assert p.tgid == tgid and all(k in st_.vcpus for k in p.vcpus)


def check_engine(profile: str, dyn: int, max_processes: int, max_vcpus: int, events: list) -> None:
    """judge() never raises, on any order of any events; violations are well-formed; state stays consistent."""
    engine = Engine(profile, dyn, max_processes, max_vcpus)
    for i, ev in enumerate(events):
        for v in engine.judge(ev):
            assert v.rule in engine.rules and v.event is ev and v.message
            json.dumps(v.to_dict(NAME, i + 1))
        check_tracker(engine)


def check_replay_result(code: int, out: str, err: str, paths: list[str]) -> None:
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in out + err, err
    if code == 2 and "error: " in err:
        # Bad input names the file (and line); else it is a usage error, which names the option.
        named = err.split("error: ", 1)[1]
        assert any(named.startswith(f"{p}:") for p in paths + ["<stdin>"]), err


def check_replay(files: list[bytes], options: list[str], stdin: bytes) -> None:
    """`xstate-agent replay` (in-process) on these files and options."""
    with tempfile.TemporaryDirectory(prefix="xstate-fuzz-") as d:
        paths = []
        for i, content in enumerate(files):
            path = os.path.join(d, f"{i}.jsonl")
            Path(path).write_bytes(content)
            paths.append(path)
        paths += ["-"] if stdin else []
        r = CliRunner().invoke(app, ["replay", *paths, *options], input=stdin)
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        check_replay_result(r.exit_code, r.stdout, r.stderr, paths)


def check_decode(line: bytes) -> None:
    """decode_line gives an event or raises ValueError with a reason."""
    try:
        ev = decode_line(line)
    except ValueError as e:
        assert 0 < len(str(e)) <= reader.MESSAGE_MAX
    else:
        assert isinstance(ev, model.Event)


# ---- the targets: strategies of whole inputs, the property, examples in CI ----------------------

profiles = st.sampled_from(PROFILES)
dyns = st.sampled_from((DEFAULT_DYN, XTILE, 1, PERM_LOCKED, MASK64)) | st.integers(1, MASK64)
caps = st.sampled_from((1, 2, 3, 4096, 65536))
some_lines = st.lists(valid_lines | filler_lines, max_size=4)
logs = st.lists(st.one_of(valid_lines, valid_lines, filler_lines, mutated_lines()), max_size=12).map(b"\n".join)
files = st.one_of(logs, byte_streams, logs.map(lambda b: b + b"\n"))
OPTION_VALUES = {
    "--profile": st.sampled_from(PROFILES + ("Upstream", "", "none")),
    "--format": st.sampled_from(("text", "json", "xml")),
    "--fail-on": st.sampled_from(("critical", "warning", "never", "info")),
    "--dyn": st.sampled_from(("0x40000", "0x60000", "0", "-1", "0x", "1e5", "abc", hex(MASK64), hex(2**64), "0b11",
                              "0o7", " 7", "\u0663")) | st.integers(-5, 2**70).map(str),
    "--max-processes": st.sampled_from(("1", "0", "-1", "x", str(10**30), "1.5")),
    "--max-vcpus": st.sampled_from(("1", "2", "0", "-3", "", str(2**64))),
}
options = st.lists(st.sampled_from(sorted(OPTION_VALUES)).flatmap(
    lambda o: OPTION_VALUES[o].map(lambda v: [o, v])), max_size=3).map(lambda xs: [a for x in xs for a in x])

# name: (the property's arguments, the property, examples in CI). benchmarks/fuzz_long.py runs them too.
TARGETS = {
    "reader_on_arbitrary_bytes": (dict(data=byte_streams, block=blocks), check_stream, 1000),
    "decode_line_on_mutated_lines": (dict(line=mutated_lines()), check_decode, 600),
    "reader_on_a_mutated_line_among_valid_ones": (
        dict(data=st.tuples(some_lines, mutated_lines(), some_lines).map(
            lambda t: b"\n".join(t[0] + [t[1]] + t[2]) + b"\n"), block=blocks), check_stream, 250),
    "engine_on_any_events_in_any_order": (
        dict(profile=profiles, dyn=dyns, max_processes=caps, max_vcpus=caps, events=st.lists(colliding_event,
                                                                                            max_size=60)),
        check_engine, 1000),
    "engine_on_shuffled_host_streams": (
        dict(profile=profiles, dyn=dyns, max_processes=caps, max_vcpus=caps, events=shuffled_host_streams()),
        check_engine, 500),
    "replay_cli": (dict(files=st.lists(files, min_size=1, max_size=3), options=options, stdin=st.just(b"") | logs),
                   check_replay, 120),
}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz(target):
    strategies, check, examples = TARGETS[target]
    settings(max_examples=examples, **CI)(given(**strategies)(check))()


# ---- regressions: bugs the fuzzing found ------------------------------------------------------

DEEP = b'{"v":1,"ts":1,"kind":"exit","tgid":1,"x":' + _nested(5000, "[", "]", "").encode() + b"}"


def test_deep_nesting_in_an_ignored_field_is_an_input_error_not_a_recursion_error():
    # msgspec raised RecursionError (a RuntimeError), in the fast path and in decode_line.
    with pytest.raises(ValueError, match="nested too deeply"):
        decode_line(DEEP)
    exit_line = b'{"v":1,"ts":1,"kind":"exit","tgid":1}'
    data = exit_line + b"\n" + DEEP + b"\n" + exit_line + b"\n"
    check_stream(data, reader.BLOCK)
    got, bad_line = reference(data)
    assert [n for n, _ in got] == [1] and bad_line == 2


def test_an_error_quoting_a_huge_value_stays_short():
    # msgspec and the mask check quote the bad value whole: a 1 MB line gave a 1 MB message.
    for field, value in (("option", "A" * 10**6), ("mask", "z" * 10**6)):
        line = json.dumps({"v": 1, "ts": 1, "kind": "perm", "tgid": 1, "option": "GET_XCOMP_PERM", "ret": 0,
                           field: value})
        with pytest.raises(ValueError) as exc:
            decode_line(line.encode())
        message = str(exc.value)
        assert len(message) <= reader.MESSAGE_MAX and message.endswith(f"`$.{field}`"), message


def test_the_mask_cache_keeps_no_long_string():
    # Valid, with leading zeros: up to 4096 such strings of any length were kept for the process's life.
    long_mask = "0x" + "0" * 100_000 + "7"
    line = json.dumps({"v": 1, "ts": 1, "kind": "perm", "tgid": 1, "option": "GET_XCOMP_PERM", "ret": 0,
                       "mask": long_mask})
    assert decode_line(line.encode()).mask == 7
    cache = model._MaskCache()  # a fresh one: the module's may be full already
    assert cache[long_mask] == 7 and cache["0x0000000000000007"] == 7
    assert list(cache) == ["0x0000000000000007"]


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, timeout=60, cwd=ROOT, **kw)


@pytest.mark.parametrize("case", ["deep", "closed stdin", "directory", "binary"])
def test_replay_process_on_hostile_input(tmp_path, case):
    """The real command (rich tracebacks and all) on input that once escaped as an exception."""
    log = tmp_path / "log.jsonl"
    log.write_bytes({"deep": DEEP, "binary": bytes(range(256)) * 4}.get(case, b""))
    path = {"closed stdin": "-", "directory": str(tmp_path)}.get(case, str(log))
    # Started with fd 0 closed: Python then has no sys.stdin.
    kw = {"preexec_fn": lambda: os.close(0)} if case == "closed stdin" else {"stdin": subprocess.DEVNULL}
    r = run_cli(["replay", path], **kw)
    check_replay_result(r.returncode, r.stdout.decode(), r.stderr.decode(), [path])
    assert r.returncode == 2


def test_follow_of_a_missing_file_is_an_input_error(tmp_path):
    # `run --from FILE --follow` opened the followed file without the reader's error handling.
    missing = str(tmp_path / "nope.jsonl")
    r = run_cli(["run", "--from", missing, "--follow"], stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert f"error: {missing}: cannot open".encode() in r.stderr
