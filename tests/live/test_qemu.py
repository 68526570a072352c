"""A real VMM under the live agent: Debian's QEMU on KVM (`-cpu qemu64,+xsave -smp 2 -S`, quit from its
monitor). The agent reports both vCPUs, their CPUID and XCR0 writes, the VM's name from `-name`, and the
process exit, with zero violations; a QEMU that was running before the agent started gives none either;
and the recording replayed gives the verdicts the agent printed."""

import json
import subprocess

import pytest

from agentproc import AGENT, Agent, Qemu


@pytest.fixture(scope="module")
def early(tmp_path_factory):
    """A QEMU started before the agent (its vCPUs made, paused)."""
    q = Qemu(tmp_path_factory.mktemp("qemu-early"), "early-vm")
    yield q
    q.kill()


@pytest.fixture(scope="module")
def agent(early, tmp_path_factory):
    a = Agent(tmp_path_factory.mktemp("qemu-agent"))
    yield a
    a.stop()


def _kinds(events, kind):
    return [e for e in events if e.kind == kind]


def _of(events, tgid):
    return [e for e in events if e.tgid == tgid]


def test_qemu_started_under_the_agent(agent, tmp_path):
    q = Qemu(tmp_path, "xstate-test")
    try:
        def ready(evs):
            evs = _of(evs, q.pid)
            return len(_kinds(evs, "vcpu_create")) >= 2 and len(_kinds(evs, "cpuid")) >= 2 \
                and {e.vcpu for e in _kinds(evs, "xcr0")} >= {0, 1}
        agent.wait_events(ready, timeout=20)
        # The VM's name from QEMU's -name guest=..., as the vm label of its per-VM metrics.
        assert 'vm="xstate-test"' in agent.metrics()
    finally:
        rc = q.quit()
    assert rc == 0
    evs = _of(agent.wait_events(lambda evs: _kinds(_of(evs, q.pid), "exit"), timeout=20), q.pid)

    creates = _kinds(evs, "vcpu_create")
    assert sorted((e.vcpu, e.ret) for e in creates) == [(0, 0), (1, 0)]
    vm = creates[0].vm
    assert all(e.vm == vm for e in evs if hasattr(e, "vm"))
    cpuids = _kinds(evs, "cpuid")
    assert {e.vcpu for e in cpuids} == {0, 1} and all(e.ret == 0 for e in cpuids)
    # Both vCPUs have the same CPUID; XCR0 as QEMU sets it at reset (x87 only), within what CPUID allows.
    assert len({e.xcr0_supported for e in cpuids}) == 1
    xcr0 = _kinds(evs, "xcr0")
    assert {e.vcpu for e in xcr0} == {0, 1}
    assert all(e.source == "host" and e.ret == 0 and e.value & 1 for e in xcr0)
    assert all(e.value & ~(cpuids[0].xcr0_supported | 1) == 0 for e in xcr0)
    # The exit comes last, once.
    assert evs[-1].kind == "exit" and len(_kinds(evs, "exit")) == 1
    assert [v for v in agent.violations() if v["tgid"] == q.pid] == []
    assert all(e.comm.startswith("qemu") or e.comm.startswith("CPU") for e in evs), {e.comm for e in evs}


def test_qemu_running_before_the_agent(agent, early):
    assert early.proc.poll() is None and early.vcpu_fds() == 2
    assert early.quit() == 0
    # The agent watched it from its start: it reports the exit, so that the state can go.
    mine = _of(agent.wait_events(lambda evs: _kinds(_of(evs, early.pid), "exit"), timeout=20), early.pid)
    assert mine[-1].kind == "exit"
    assert [v for v in agent.violations() if v["tgid"] == early.pid] == []


def test_recording_replayed_gives_the_same_verdicts(agent):
    assert agent.stop() == 0  # SIGTERM
    live = agent.violations()
    r = subprocess.run([str(AGENT), "replay", "--format", "json", "--fail-on", "never", str(agent.log)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == live
