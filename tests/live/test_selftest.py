"""`xstate-agent selftest` against a running agent: every check passes, the agent judged the selftest's own
activity clean; and without an agent writing the log, selftest fails quickly and says why."""

import json
import os
import re
import signal
import subprocess

import pytest

from agent import kvmctl as k
from agentproc import AGENT, Agent, wait_until
from livecheck import require_kvm

CHECKS = [
    "agent sees this process: arch_prctl(ARCH_GET_XCOMP_SUPP)",
    "arch_prctl(ARCH_GET_XCOMP_PERM)",
    "arch_prctl(ARCH_GET_XCOMP_GUEST_PERM)",
    "arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)",
    "arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, XTILEDATA)",
    "child process: arch_prctl(ARCH_GET_XCOMP_SUPP)",
    "child process: exit",
    "KVM_CREATE_VCPU",
    "KVM_SET_CPUID2",
    "KVM_SET_XCRS XCR0=0x7 (valid)",
    "KVM_SET_XCRS XCR0=0x40007 (refused)",
    "KVM_SET_MSRS IA32_XFD=0x40000",
    "KVM_RUN of a hlt guest: fpu_load",
]


def selftest(*args, timeout=120):
    return subprocess.run([str(AGENT), "selftest", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    require_kvm()
    a = Agent(tmp_path_factory.mktemp("selftest-agent"))
    yield a
    a.stop()


def test_selftest_passes_against_the_running_agent(agent):
    r = selftest("--events-log", str(agent.log), "--metrics", agent.metrics_url)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert all(line.startswith("PASS  ") for line in lines[:-1]), r.stdout
    assert "PASS  metrics: no violation for this VM" in r.stdout
    assert "PASS  metrics: an attached probe for each kind checked" in r.stdout
    assert re.search(r"selftest: ok: (\d+)/\1 checks passed", lines[-1]), lines[-1]
    pid = int(re.search(r"pid (\d+)", lines[-1])[1])
    # The agent judged everything the selftest did as clean.
    assert [v for v in agent.violations() if v["tgid"] == pid] == []


def test_selftest_json(agent):
    r = selftest("--events-log", str(agent.log), "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(r.stdout)
    assert d["ok"] and d["vm"].startswith("vm-")
    assert all(c["ok"] for c in d["checks"])
    # The XCR0 values are this CPU's (x87 with what it has of SSE and AVX).
    names = [re.sub(r"XCR0=0x[0-9a-f]+", "XCR0=...", c["name"]) for c in d["checks"]]
    assert names == [re.sub(r"XCR0=0x[0-9a-f]+", "XCR0=...", n) for n in CHECKS]


def test_selftest_without_an_agent_fails_and_says_why(tmp_path):
    stale = tmp_path / "events.jsonl"
    stale.write_text("")
    r = selftest("--events-log", str(stale), "--timeout", "0.5")
    assert r.returncode == 1
    assert "FAIL  agent sees this process" in r.stdout and "is the agent running" in r.stdout
    r = selftest("--events-log", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 1 and "No such file or directory" in r.stdout


def test_sighup_reopens_the_events_log(agent):
    # Last: the module's log moves away (logrotate's way), the agent writes a new one.
    rotated = agent.log.with_name("events.jsonl.1")
    os.rename(agent.log, rotated)
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_until(agent.log.exists, 5)  # reopened at the next poll
    ret, mask = k.arch_prctl_get(k.ARCH_GET_XCOMP_GUEST_PERM)
    evs = agent.wait_events(lambda evs: any(e.tgid == os.getpid() for e in evs))
    assert [(e.kind, e.option, e.mask) for e in evs if e.tgid == os.getpid()] == [("perm", "GET_XCOMP_GUEST_PERM",
                                                                                 mask)]
    assert agent.proc.poll() is None
