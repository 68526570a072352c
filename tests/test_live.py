"""The live runtime's parts without a kernel: backend choice per source, the reader loop (the events log:
test_eventlog.py).
(tests/live/ runs the real thing.)"""

import json
import os
import sys

import pytest

import agent.live as live
from agent.eventlog import LiveEventLog
from agent.events import model as m
from agent.events.reader import read_files
from agent.live import LiveRunner, NoProbes, Probes, kernel_config
from agent.pipeline import Pipeline
from agent.policy.engine import Engine
from agent.stats import Stats
from agent.probes.tracepoint_backend import PROBES, Status


class FakeTracepoint:
    """TracepointBackend's API: attaches the groups it is given, except those in `fail`."""

    fail = {"guest_xcr0": "no such tracepoint on this kernel: kvm:kvm_exit"}
    made = []

    def __init__(self, on_event, groups=(), vms=None):
        self.on_event = on_event
        self.groups = groups
        self.status = {}
        self.pending = []
        self.closed = self.detached = False
        self.decode_errors = 0
        self.ring_lost = 0
        self.vms = type("Names", (), {"name": staticmethod(lambda vm: {"vm-1": "web-1"}.get(vm))})()
        type(self).made.append(self)

    def start(self):
        for g in self.groups:
            why = self.fail.get(g)
            self.status[g] = Status(attached=why is None, reason=why, tracepoints=("cat:tp",))

    def poll(self, timeout_ms=2):
        pending, self.pending = self.pending, []
        for ev in pending:
            self.on_event(ev, None)

    def lost(self):
        return self.ring_lost

    def detach(self):
        self.detached = True

    def close(self):
        self.closed = True


@pytest.fixture
def fake(monkeypatch):
    FakeTracepoint.made = []
    monkeypatch.setattr(live, "TracepointBackend", FakeTracepoint)
    monkeypatch.setattr(live, "ensure_tracefs", lambda: ("/sys/kernel/tracing", None))
    monkeypatch.setattr(live, "kprobe_support", lambda thorough=False: live.KprobeSupport(
        False, ["/proc/config.gz: CONFIG_KPROBES is not set"]))
    return FakeTracepoint


def test_auto_gives_each_source_one_backend(fake):
    p = Probes("auto", lambda ev, raw=None: None)
    p.start()
    assert len(fake.made) == 1 and fake.made[0].groups == tuple(PROBES)
    for s, plan in p.plans.items():
        # kprobe tried first, unavailable; then the tracepoint backend, once.
        assert [t.backend for t in plan.tried] == ["kprobe", "tracepoint"]
        assert plan.tried[0].reason == "this kernel has no kprobes" and plan.tried[0].backend_unavailable
        if s in PROBES:
            assert plan.backend == (None if s == "guest_xcr0" else "tracepoint")
        else:  # only kprobes see it: not applicable here, no failure
            assert plan.backend is None and plan.tried[1].backend_unavailable
            assert plan.tried[1].reason == "no tracepoint shows it"
    assert set(p.plans) == set(PROBES) | {"fpstate", "vcpu_destroy", "passthrough", "xfd_nm"}
    # The kprobe fallback is no failure; the tracepoint that could not attach is.
    assert [(s, t.backend) for s, t in p.failures()] == [("guest_xcr0", "tracepoint")]


class FakeKprobe(FakeTracepoint):
    """KprobeBackend's API: attaches the sources it is given except `fail`; release() as the real one
    (a source and those built on it), watch() recorded."""

    fail: dict = {}
    requires = {"kvm_msrs": ("kvm_ioctl",), "kvm_xsave": ("kvm_ioctl",), "fpu_load": ("kvm_ioctl",),
                "guest_xcr0": ("kvm_ioctl",), "passthrough": ("kvm_msrs", "guest_msr")}
    made = []

    def __init__(self, on_event, groups=(), vms=None):
        super().__init__(on_event, groups, vms)
        self.watched = []

    def release(self, sources):
        done, todo = [], list(sources)
        while todo:
            s = todo.pop(0)
            if s not in done and self.status.get(s) and self.status[s].attached:
                done.append(s)
                todo += [d for d, reqs in self.requires.items() if s in reqs]
        for s in done:
            self.status[s].attached = False
        return done

    def watch(self, tgid):
        self.watched.append(tgid)


@pytest.fixture
def with_kprobes(fake, monkeypatch):
    FakeKprobe.made = []
    monkeypatch.setattr(live, "KprobeBackend", FakeKprobe)
    monkeypatch.setattr(live, "kprobe_support", lambda thorough=False: live.KprobeSupport(True, ["CONFIG_KPROBES=y"]))
    monkeypatch.setattr(live, "kvm_vendor", lambda: "intel")
    return FakeKprobe


def _served(p):
    return {s: plan.backend for s, plan in p.plans.items()}


def test_auto_with_kprobes_uses_no_tracepoint(with_kprobes, fake):
    p = Probes("auto", lambda ev, raw=None: None)
    p.start()
    assert set(_served(p).values()) == {"kprobe"} and fake.made == []
    assert p.failures() == []


def test_a_source_left_for_tracepoints_takes_the_code_it_shares(with_kprobes, fake, monkeypatch):
    monkeypatch.setattr(FakeKprobe, "fail", {"fpu_load": "fpu_swap_kvm_fpstate is not in kallsyms"})
    p = Probes("auto", lambda ev, raw=None: None)
    p.start()
    served = _served(p)
    # fpu_load on tracepoints needs kvm_ioctl's code there: kvm_ioctl and the kprobe sources built on
    # it come over too; the rest stay on kprobes. One backend per source.
    moved = {"fpu_load", "kvm_ioctl", "kvm_msrs", "kvm_xsave", "guest_xcr0"}
    assert {s for s, b in served.items() if b == "tracepoint"} == moved - {"guest_xcr0"}  # (fails on the fake)
    assert served["passthrough"] is None  # needs kvm_msrs on kprobes, which moved: no tracepoint shows it
    assert served["arch_prctl"] == served["sched"] == served["fpstate"] == "kprobe"
    assert set(fake.made[0].groups) == moved | {"guest_perm"}
    kvm = p.plans["kvm_ioctl"].tried
    assert [t.backend for t in kvm] == ["kprobe", "tracepoint"] and kvm[0].released and not kvm[0].attached
    assert "released to the tracepoint backend" in kvm[0].reason
    # Released probes are no failures; the fpu_load kprobe that did not attach is.
    assert ("fpu_load", "kprobe") in [(s, t.backend) for s, t in p.failures()]
    assert ("kvm_ioctl", "kprobe") not in [(s, t.backend) for s, t in p.failures()]


def test_processes_seen_on_tracepoints_are_watched_by_the_kprobe_sched(with_kprobes, fake, monkeypatch):
    monkeypatch.setattr(FakeKprobe, "fail", {"fpu_load": "missing"})
    got = []
    p = Probes("auto", lambda ev, raw=None: got.append(ev))
    p.start()
    kp, tp = p.backends["kprobe"], p.backends["tracepoint"]
    raw = type("Raw", (), {"tgid": 42})()
    ev = m.VcpuCreate(v=1, ts=1, tgid=42, vm="vm-1", vcpu=0, ret=0)
    tp.on_event(ev, raw)
    tp.on_event(ev, raw)
    assert kp.watched == [42] and len(got) == 2  # once per process
    kp.on_event(m.Exec(v=1, ts=2, tgid=42), raw)  # the kprobe sched forgot it at exec
    tp.on_event(ev, raw)
    assert kp.watched == [42, 42]


def test_xfd_nm_does_not_apply_on_amd(with_kprobes, fake, monkeypatch):
    monkeypatch.setattr(live, "kvm_vendor", lambda: "amd")
    p = Probes("auto", lambda ev, raw=None: None)
    p.start()
    t = p.plans["xfd_nm"].tried
    assert [x.backend for x in t] == ["kprobe", "tracepoint"] and all(x.backend_unavailable for x in t)
    assert "only under VMX (Intel)" in t[0].reason and p.failures() == []


def test_only_kprobe_on_a_kernel_without_kprobes(fake):
    p = Probes("kprobe", lambda ev, raw=None: None)
    with pytest.raises(NoProbes, match=r"kprobe: this kernel has no kprobes \[/proc/config.gz: CONFIG_KPROBES is "
                                       r"not set\] \(every source\)"):
        p.start()
    assert fake.made == []


def test_probes_reported_to_the_statistics(fake):
    p = Probes("auto", lambda ev, raw=None: None)
    p.start()
    stats = Stats(Engine())
    p.report_to(stats)
    snap = stats.snapshot()
    assert snap.probes[("kvm_ioctl", "tracepoint")] == 1 and snap.probes[("kvm_ioctl", "kprobe")] == 0
    assert snap.probes[("guest_xcr0", "tracepoint")] == 0
    # xcr0 still has kvm_ioctl (host writes); guest_xcr0 adds nothing while detached.
    assert snap.sources["xcr0"] == 1 and snap.sources["perm"] == 1 and snap.sources["fpu_load"] == 1


def test_runner_logs_judges_and_points_violations_into_the_log(fake, tmp_path, capsys):
    from agent.pipeline import ViolationPrinter
    engine = Engine()
    stats = Stats(engine)
    log = LiveEventLog(str(tmp_path / "events.jsonl"), stats)
    runner = LiveRunner(Pipeline(engine, ViolationPrinter(sys.stdout), None, observers=[stats]), stats, log)
    runner.probes = Probes("tracepoint", runner.on_event)
    runner.probes.start()
    backend = fake.made[0]
    vcpu = dict(v=1, tgid=9, vm="vm-1", vcpu=0)
    backend.pending = [
        m.VcpuCreate(ts=1, ret=0, **vcpu),
        m.Cpuid(ts=2, xcr0_supported=0x7, ret=0, **vcpu),
        m.Xcr0(ts=3, value=0x40007, source="host", ret=0, **vcpu),  # accepted beyond what CPUID allows
    ]
    backend.ring_lost = 5
    assert runner.step(0) == 3
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out and all(v["file"] == log.path and v["line"] == 3 for v in out)
    snap = stats.snapshot()
    assert snap.lost["ringbuf"] == 5
    assert ("web-1" in snap.vms) and snap.events[("xcr0", "host", "accepted")] == 1
    backend.pending = [m.Exit(v=1, ts=4, tgid=9)]
    runner.close()
    assert backend.detached and backend.closed
    assert runner.pipeline.events == 4 and runner._names == {}
    (_, events, _), = read_files([log.path])
    assert [e.kind for e in events] == ["vcpu_create", "cpuid", "xcr0", "exit"]


def test_kernel_config_of_an_unknown_option():
    release = os.uname().release
    value, where = kernel_config("CONFIG_SURELY_NOT_AN_OPTION_XYZ")
    assert (value, where) in ((None, None), ("n", where))
    if where:
        assert where in ("/proc/config.gz", f"/boot/config-{release}", f"/lib/modules/{release}/config")
