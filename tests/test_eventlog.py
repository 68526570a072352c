"""The live agent's events log (agent/eventlog.py): a batch written whole or not at all, SIGHUP reopen,
rotation by size and count, and the rotated files replayed in order judging as one unrotated log."""

import errno
import json
import os
import signal
import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import agent.eventlog as eventlog
from agent import cli
from agent.eventlog import DEFAULT_KEEP, DEFAULT_MAX_BYTES, LiveEventLog
from agent.events import model as m
from agent.events.reader import decode_line, read_files
from agent.live import LiveRunner
from agent.pipeline import Pipeline, ViolationPrinter
from agent.policy.engine import Engine
from agent.replay import Summary, replay
from agent.stats import Stats
from helpers import SAMPLES

INCIDENTS = SAMPLES / "amx-host-incidents.jsonl"  # 39 events, 6 violations that need state from earlier events


def _perm(ts, tgid=7, **kw):
    return m.Perm(v=1, ts=ts, tgid=tgid, option=kw.pop("option", "GET_XCOMP_SUPP"), ret=kw.pop("ret", 0), **kw)


def _ts(*paths) -> list[int]:
    return [e.ts for _, events, _ in read_files(map(str, paths)) for e in events]


def _line(path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read().split(b"\n")[n - 1]


def test_events_log_appends_with_line_numbers(tmp_path):
    path = tmp_path / "sub" / "events.jsonl"
    log = LiveEventLog(str(path))
    log.comment("run 1")
    assert log.write([_perm(1, mask=3), _perm(2, mask=3)]) == [2, 3]
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"v":1,"ts":3,"kind":"exit"')  # a line cut short by a crash
    log = LiveEventLog(str(path))
    # The cut line is ended (and stays invalid: replay stops there); ours start on the next.
    assert log.write([_perm(4)]) == [5]
    log.close()
    assert path.read_bytes().count(b"\n") == 5


def test_a_failed_write_loses_the_batch_and_nothing_else(tmp_path):
    path = tmp_path / "events.jsonl"
    stats = Stats(Engine())
    warnings = []
    log = LiveEventLog(str(path), stats, warn=warnings.append)
    assert log.write([_perm(1)]) == [1]
    real = log._write

    calls = []

    def disk_full(fd, data):  # half a batch goes in, then ENOSPC
        calls.append(len(data))
        if len(calls) % 2:
            return real(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")
    log._write = disk_full
    assert log.write([_perm(2), _perm(3)]) is None
    assert log.write([_perm(4)]) is None
    log._write = real
    assert log.write([_perm(5)]) == [2]
    log.close()
    assert log.lost == 3 and stats.snapshot().lost["events_log"] == 3
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    # The file holds whole lines only: the events that went in.
    (_, events, _), = read_files([str(path)])
    assert [e.ts for e in events] == [1, 5]


def test_reopen_after_rotation(tmp_path):
    path = tmp_path / "events.jsonl"
    log = LiveEventLog(str(path))
    log.write([_perm(1)])
    os.rename(path, tmp_path / "events.jsonl.1")
    log.reopen()
    assert log.write([_perm(2)]) == [1]
    log.close()
    assert path.read_text().count("\n") == 1


class Batches:
    """The probes' side of LiveRunner: each poll hands over the next batch."""

    backends: dict = {}
    decode_errors = 0

    def __init__(self, runner, batches):
        self.runner, self.batches = runner, iter(batches)

    def poll(self, timeout_ms):
        for ev in next(self.batches, ()):
            self.runner.on_event(ev)

    def lost(self):
        return 0

    def vm_name(self, vm):
        return None

    def close(self):
        pass


def _verdicts(paths) -> list[dict]:
    out = []
    replay(list(map(str, paths)), Engine(), lambda v, file, line: out.append(v.to_dict(file, line)), Summary())
    return out


def _judged(v: dict) -> dict:
    """A verdict without its place in the log."""
    return {k: x for k, x in v.items() if k not in ("file", "line")}


def test_rotated_logs_replayed_in_order_give_the_verdicts_of_one_log(tmp_path, capsys):
    events = [e for _, evs, _ in read_files([str(INCIDENTS)]) for e in evs]
    batches = [events[i:i + 3] for i in range(0, len(events), 3)]
    path = tmp_path / "rotated" / "events.jsonl"
    max_bytes = 800  # a few batches per file
    engine = Engine()
    log = LiveEventLog(str(path), max_bytes=max_bytes, keep=100)
    log.comment("xstate-agent started")  # as cli does
    runner = LiveRunner(Pipeline(engine, ViolationPrinter(sys.stdout)), None, log)
    runner.probes = Batches(runner, batches)
    live = []
    for _ in batches:
        runner.step(0)
        for v in map(json.loads, capsys.readouterr().out.splitlines()):
            # When it is printed, a violation points at its event in PATH (PATH.1 once rotated).
            assert v["file"] == str(path)
            ev = decode_line(_line(path, v["line"]))
            assert (ev.ts, ev.kind, ev.tgid) == (v["ts"], v["kind"], v["tgid"])
            live.append(v)
    runner.close()

    n = log.rotations
    assert n >= 5 and log.rotate_failures == 0
    files = [path.parent / f"events.jsonl.{i}" for i in range(n, 0, -1)] + [path]
    assert sorted(os.listdir(path.parent)) == sorted(f.name for f in files)
    assert all(f.stat().st_size <= max_bytes for f in files)
    assert files[0].read_text().startswith("# xstate-agent started\n")
    for f in files[1:]:
        assert f.read_text().split("\n", 1)[0].endswith(f": this events log continues {path}.1")
    assert _ts(*files) == [e.ts for e in events]

    one = tmp_path / "one.jsonl"
    unrotated = LiveEventLog(str(one))
    for b in batches:
        unrotated.write(b)
    unrotated.close()
    expected = _verdicts([one])
    got = _verdicts(files)
    assert len(expected) == 6 and len({v["file"] for v in got}) > 2  # state carried from file to file
    assert [_judged(v) for v in got] == [_judged(v) for v in expected] == [_judged(v) for v in live]
    # Each verdict points at the same event in the rotated files as in the unrotated one.
    for g, e in zip(got, expected):
        assert _line(g["file"], g["line"]) == _line(e["file"], e["line"])


def test_keep_n_rotated_files_the_oldest_dropped(tmp_path):
    path = tmp_path / "events.jsonl"
    log = LiveEventLog(str(path), max_bytes=400, keep=2)
    for ts in range(1, 60):
        log.write([_perm(ts)])
    log.close()
    assert sorted(os.listdir(tmp_path)) == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    kept = _ts(f"{path}.2", f"{path}.1", path)
    assert kept == list(range(kept[0], 60)) and kept[0] > 1  # the newest, in order, without a gap
    assert log.rotations > 2


def test_a_batch_bigger_than_max_bytes_goes_whole_into_a_file_of_its_own(tmp_path):
    path = tmp_path / "events.jsonl"
    log = LiveEventLog(str(path), max_bytes=200)
    big = [_perm(ts) for ts in range(1, 11)]
    assert log.write(big) == list(range(1, 11))  # a new file: nothing to rotate
    assert log.write([_perm(11)]) == [2]  # line 1: the "continues" comment
    assert log.write([_perm(ts) for ts in range(12, 22)]) == list(range(2, 12))
    assert log.rotations == 2
    log.close()
    assert _ts(f"{path}.2", f"{path}.1", path) == list(range(1, 22))
    assert [len(_ts(f)) for f in (f"{path}.2", f"{path}.1", path)] == [10, 1, 10]


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(eventlog, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_a_failed_rotation_is_counted_reported_and_writing_goes_on(tmp_path, clock):
    path = tmp_path / "events.jsonl"
    warnings = []
    line = len(eventlog.encode(_perm(1)))
    log = LiveEventLog(str(path), warn=warnings.append, max_bytes=3 * line)

    def refused(src, dst):
        raise OSError(errno.EACCES, "Permission denied")
    log._rename = refused
    assert [log.write([_perm(ts)]) for ts in range(1, 6)] == [[n] for n in range(1, 6)]
    # One try, then none until ROTATE_RETRY_S has passed.
    assert log.rotate_failures == 1 and log.rotations == 0
    assert warnings == [f"events log {path}: cannot rotate: Permission denied; still writing {path} "
                        "(1 failed rotations so far)"]
    clock[0] += eventlog.ROTATE_RETRY_S
    assert log.write([_perm(6)]) == [6]
    assert log.rotate_failures == 2 and len(warnings) == 1  # counted; reported once a minute
    clock[0] += eventlog.ROTATE_RETRY_S
    log._rename = os.rename
    assert log.write([_perm(7)]) == [2]
    assert log.rotations == 1
    log.close()
    assert _ts(f"{path}.1") == list(range(1, 7)) and _ts(path) == [7]


def test_a_new_file_that_cannot_be_made_leaves_the_current_one_at_path(tmp_path, clock):
    path = tmp_path / "events.jsonl"
    warnings = []
    log = LiveEventLog(str(path), warn=warnings.append, max_bytes=100)

    def rename_then_block(src, dst):
        os.rename(src, dst)
        if src == str(path):  # PATH cannot be made again: a link into a directory that does not exist
            os.symlink(tmp_path / "gone" / "events.jsonl", path)
    log._rename = rename_then_block
    assert log.write([_perm(1)]) == [1]
    assert log.write([_perm(2)]) == [2]
    assert log.rotate_failures == 1 and "No such file or directory" in warnings[0]
    log.close()
    assert sorted(os.listdir(tmp_path)) == ["events.jsonl"] and not path.is_symlink()
    assert _ts(path) == [1, 2]


def test_run_passes_the_rotation_options_to_the_live_agent(monkeypatch):
    got = []
    monkeypatch.setattr(cli, "_run_live",
                        lambda cfg, *args: got.append((cfg.events_log_max_bytes, cfg.events_log_keep)))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        runner = CliRunner()
        assert runner.invoke(cli.app, ["run", "--events-log", "x"]).exit_code == 0
        assert runner.invoke(cli.app, ["run", "--events-log", "x", "--events-log-max-bytes", "0",
                                       "--events-log-keep", "9"]).exit_code == 0
        assert runner.invoke(cli.app, ["run", "--events-log-keep", "0"]).exit_code == 2
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert got == [(DEFAULT_MAX_BYTES, DEFAULT_KEEP), (0, 9)]
