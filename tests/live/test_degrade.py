"""Each event source is its own probe group: one that cannot be built (a
field BTF lacks, a tracepoint this kernel lacks, code that does not compile)
is left out with its reason, the groups that need it too, and the rest run."""

import errno

import pytest

from agent.events.model import Perm, Xcr0
from agent.probes import offsets as offsets_mod
from agent.probes import tracepoint_backend as tb
from agent.kvmctl import ARCH_GET_XCOMP_SUPP, Vm, arch_prctl_get
from livecheck import require_bpf, require_kvm


@pytest.fixture
def backend():
    require_bpf()
    made = []

    def make(**kw):
        from livecollector import Collector
        c = Collector()
        made.append(c)
        return c.start(tb.TracepointBackend(c, **kw))
    yield make
    for c in made:
        c.close()


def _state(c):
    return {g: (s.attached, s.reason) for g, s in c.backend.status.items()}


def test_missing_btf_field_and_tracepoint(backend, monkeypatch):
    monkeypatch.setitem(offsets_mod.FIELDS, "OFF_FPSTATE_USER_XFEATURES", ("fpstate", "user_xfeatures_renamed"))
    monkeypatch.setitem(tb.PROBES, "guest_msr", (("kvm:kvm_no_such_event", "on_kvm_msr"),))
    c = backend()
    st = _state(c)
    assert st["fpu_load"][0] is False and "user_xfeatures_renamed" in st["fpu_load"][1]
    assert st["fpu_load"][1].startswith("BTF lacks a field: struct fpstate has no field")
    assert st["guest_msr"] == (False, "no such tracepoint on this kernel: kvm:kvm_no_such_event")
    others = set(st) - {"fpu_load", "guest_msr"}
    assert all(st[g] == (True, None) for g in others), st
    # What runs still reports.
    mark = c.mark()
    ret, mask = arch_prctl_get(ARCH_GET_XCOMP_SUPP)
    (e, _), = c.expect(mark, 1, Perm)
    assert (e.mask, e.ret) == (mask, ret)


def test_base_group_missing_disables_its_dependents(backend, monkeypatch):
    monkeypatch.setitem(offsets_mod.FIELDS, "OFF_FILE_DENTRY", ("file", "f_path.no_dentry"))
    c = backend()
    st = _state(c)
    assert st["kvm_ioctl"][0] is False and "no_dentry" in st["kvm_ioctl"][1]
    for g in offsets_mod.IN_KVM_RUN + ("kvm_msrs", "kvm_xsave"):
        assert st[g][0] is False and st[g][1].startswith("needs group kvm_ioctl: BTF lacks a field"), (g, st[g])
    assert st["arch_prctl"] == st["sched"] == st["guest_perm"] == (True, None)


def test_a_group_that_does_not_compile_is_left_out(backend, monkeypatch):
    """The whole program fails to compile: each group is tried alone (with
    what it requires) to find the culprit; the others are built."""
    require_kvm()
    real = offsets_mod.resolve

    def broken(*a, **kw):
        o = real(*a, **kw)
        o.values["VCPU_REG_RCX"] = "not_a_number"  # breaks guest_xcr0's C only
        return o
    monkeypatch.setattr(tb, "resolve", broken)
    c = backend(groups=("arch_prctl", "kvm_ioctl", "guest_xcr0"))
    st = _state(c)
    assert st["guest_xcr0"][0] is False and "could not compile" in st["guest_xcr0"][1]
    assert st["arch_prctl"] == st["kvm_ioctl"] == (True, None)
    # Groups not asked for are not listed.
    assert set(st) == {"arch_prctl", "kvm_ioctl", "guest_xcr0"}
    vm = Vm()
    try:
        vcpu = vm.create_vcpu(0)
        vm.set_cpuid(vcpu, vm.supported_cpuid())
        mark = c.mark()
        assert vm.set_xcrs(vcpu, [(0, 0x5)]) == -errno.EINVAL
        (e, _), = c.expect(mark, 1, Xcr0)
        assert (e.value, e.ret, e.source) == (0x5, -errno.EINVAL, "host")
    finally:
        vm.close()


def test_detach_stops_new_records_and_keeps_those_waiting(backend):
    c = backend(groups=("arch_prctl",))
    mark = c.mark()
    arch_prctl_get(ARCH_GET_XCOMP_SUPP)  # in the ring, not read yet
    c.backend.detach()
    arch_prctl_get(ARCH_GET_XCOMP_SUPP)  # no probe any more
    assert c.backend.attached == []
    got = c.since(mark, 2, timeout=0.5)
    assert [type(e) for e, _ in got] == [Perm]
