"""`xstate-agent run` drops its privileges once the probes are attached (agent/privileges.py): every
thread ends with no capability (bounding set included) but CAP_BPF on a kernel whose bpf() needs it for
map access (before Linux 5.19, with unprivileged BPF disabled), no_new_privs, and with --user that user's
ids; and it goes on judging events: it still sees this test's arch_prctl calls, serves metrics, reopens
its log on SIGHUP, stops cleanly."""

import os
import pwd
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import pytest

from agent import kvmctl as k
from agent import privileges
from agentproc import Agent, wait_until

CAPS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def _status(pid: int) -> dict[str, dict[str, str]]:
    """/proc/PID/task/*/status of every thread, as {tid: {key: value}}."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                out[tid] = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        except FileNotFoundError:
            continue  # a metrics request's thread, ended meanwhile
    return out


@pytest.fixture(scope="module", params=[None, "nobody"], ids=["uid0", "nobody"])
def agent(request):
    user = request.param
    # With --user the events log's directory must be that user's (it is rotated and reopened by name),
    # and reachable: not under pytest's root-only base directory.
    directory = Path(tempfile.mkdtemp(prefix="xstate-priv-"))
    os.chmod(directory, 0o755)
    if user:
        pw = pwd.getpwnam(user)
        os.chown(directory, pw.pw_uid, pw.pw_gid)
    try:
        a = Agent(directory, *(("--user", user) if user else ()))
        a.user = user
        yield a
        a.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_privileges_are_dropped_in_every_thread(agent):
    err = agent.stderr()
    line = next(line for line in err.splitlines() if "privileges:" in line)
    assert err.index("privileges:") < err.index("ready:"), err
    # What this kernel needs, asked here the way the agent asks (capabilities lowered, then raised again).
    kept = privileges.map_access_needs(privileges.capget()[1])[0]
    names = ", ".join(privileges.names(kept))
    assert f"kept {names or 'none'} (" in line and f"bounding set: {names or 'empty'};" in line, line
    agent.metrics()  # the metrics thread runs (started after the drop)
    threads = _status(agent.proc.pid)
    assert len(threads) >= 2, threads
    uid = str(pwd.getpwnam(agent.user).pw_uid) if agent.user else "0"
    for tid, st in threads.items():
        assert {key: int(st[key], 16) for key in CAPS} == dict(CapInh=0, CapPrm=kept, CapEff=kept, CapBnd=kept,
                                                              CapAmb=0), (tid, st)
        assert st["NoNewPrivs"] == "1", (tid, st)
        assert st["Uid"].split() == [uid] * 4, (tid, st)
    if agent.user:
        assert f"({agent.user})" in line


def test_still_judges_events_after_the_drop(agent):
    def mine(events):
        return [e for e in events if e.kind == "perm" and e.tgid == os.getpid()
                and e.tid == threading.get_native_id()]
    before = len(mine(agent.events()))
    ret, mask = k.arch_prctl_get(k.ARCH_GET_XCOMP_SUPP)
    assert ret == 0
    got = mine(agent.wait_events(lambda evs: len(mine(evs)) > before))[before:]
    assert [(e.option, e.mask, e.ret) for e in got] == [("GET_XCOMP_SUPP", mask, 0)]
    metrics = agent.metrics()
    assert 'xstate_events_total{kind="perm",result="accepted",source=""}' in metrics
    assert 'xstate_events_lost_total{stage="reader"} 0.0' in metrics


def test_sighup_reopens_the_log_and_it_stops_cleanly(agent):
    # After logrotate moved it: the new file is made by the unprivileged agent.
    agent.log.rename(agent.log.with_name("events.jsonl.1"))
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_until(agent.log.exists, 10), "the events log was not reopened"
    k.arch_prctl_get(k.ARCH_GET_XCOMP_SUPP)
    assert wait_until(lambda: agent.log.stat().st_size, 10), "nothing written to the reopened events log"
    uid = pwd.getpwnam(agent.user).pw_uid if agent.user else 0
    assert agent.log.stat().st_uid == uid
    assert agent.stop(signal.SIGTERM) == 0
    assert "events judged" in agent.stderr().splitlines()[-1]
