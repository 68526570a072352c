"""Host writes of IA32_XFD / IA32_XFD_ERR through KVM_SET_MSRS: one xfd or
xfd_err event per entry, with the value and the entry's own result.

KVM_SET_MSRS returns how many entries it set and stops at the first one it
refuses, so the agent reports an entry before that index with ret 0, the
refused one with ret -1, and none after it (never tried). What KVM accepts
is derived here from the CPUID it reports, as KVM decides it: a host write of
XFD or XFD_ERR is refused when it sets a bit outside the guest's supported
XFD (XCR0-supported & XTILEDATA, and only if the CPU has XFD). This CPU has
no XFD: every non-zero value is refused, 0 is accepted."""

import errno

import pytest

from agent.events.model import Xfd, XfdErr
from agent.xstate import XTILECFG, XTILEDATA
from agent.kvmctl import MSR_IA32_XFD, MSR_IA32_XFD_ERR, Vm, leaf, leaf_d0

MSR_IA32_SYSENTER_CS = 0x174  # any MSR KVM always lets the host write
KVM_MAX_IO_MSRS = 256


@pytest.fixture
def vcpu(kvm, group):
    group("kvm_msrs")
    vm = kvm()
    fd = vm.create_vcpu(0)
    entries = vm.supported_cpuid()
    assert vm.set_cpuid(fd, entries) == 0
    cpu_has_xfd = bool(leaf(entries, 0xD, 1).eax & (1 << 4))  # CPUID.(0xD,1).EAX[4]
    supported_xfd = leaf_d0(entries) & XTILEDATA if cpu_has_xfd else 0
    return vm, fd, supported_xfd


def test_xfd_refused_on_this_cpu(live, vcpu):
    vm, fd, supported_xfd = vcpu
    mark = live.mark()
    accepted = Vm.set_msrs(fd, [(MSR_IA32_XFD, 0)])
    refused = Vm.set_msrs(fd, [(MSR_IA32_XFD, XTILEDATA)])
    # The kernel's own answers first: 0 always goes in; XTILEDATA only with XFD.
    assert accepted == 1
    assert refused == (1 if supported_xfd else 0)
    (a, ra), (b, rb) = live.expect(mark, 2, Xfd)
    assert (a.value, a.source, a.ret, a.vcpu) == (0, "host", 0, 0)
    assert (b.value, b.source, b.ret) == (XTILEDATA, "host", 0 if supported_xfd else -1)
    # check1: the ioctl's result, check2: the entry's index.
    assert (ra.check1, ra.check2, rb.check1, rb.check2) == (1, 0, refused, 0)
    assert Vm.get_msrs(fd, [MSR_IA32_XFD]) == (1, [XTILEDATA if supported_xfd else 0])


def test_entries_after_the_refused_one_are_not_reported(live, vcpu):
    vm, fd, _ = vcpu
    # XTILECFG is never a supported XFD bit (only XTILEDATA can be): refused on any CPU.
    mark = live.mark()
    # SYSENTER_CS set, XFD_ERR refused at index 1, XFD at 2 never tried.
    assert Vm.set_msrs(fd, [(MSR_IA32_SYSENTER_CS, 0x10), (MSR_IA32_XFD_ERR, XTILECFG), (MSR_IA32_XFD, 0)]) == 1
    (e, raw), = live.expect(mark, 1, XfdErr)
    assert (e.value, e.ret, raw.check2) == (XTILECFG, -1, 1)
    mark = live.mark()
    assert Vm.set_msrs(fd, [(MSR_IA32_XFD, XTILECFG), (MSR_IA32_XFD_ERR, 0)]) == 0
    (e, _), = live.expect(mark, 1, Xfd)
    assert (e.value, e.ret) == (XTILECFG, -1)
    assert live.quiet(mark + 1) == []


def test_both_in_entry_order(live, vcpu):
    vm, fd, _ = vcpu
    mark = live.mark()
    assert Vm.set_msrs(fd, [(MSR_IA32_SYSENTER_CS, 0x10), (MSR_IA32_XFD_ERR, 0), (MSR_IA32_XFD, 0)]) == 3
    got = live.since(mark, 2)
    assert [(type(e), e.value, e.ret, r.check2) for e, r in got] == [(XfdErr, 0, 0, 1), (Xfd, 0, 0, 2)]


def test_failed_ioctl_reports_its_errno(live, vcpu):
    vm, fd, _ = vcpu
    mark = live.mark()
    too_many = [(MSR_IA32_XFD, 0)] + [(MSR_IA32_SYSENTER_CS, 0)] * (KVM_MAX_IO_MSRS - 1)
    assert Vm.set_msrs(fd, too_many) == -errno.E2BIG
    (e, raw), = live.expect(mark, 1, Xfd)
    assert (e.value, e.ret, raw.check1) == (0, -errno.E2BIG, -errno.E2BIG & (2**64 - 1))


def test_other_msrs_send_nothing(live, vcpu):
    vm, fd, _ = vcpu
    mark = live.mark()
    assert Vm.set_msrs(fd, [(MSR_IA32_SYSENTER_CS, 0x10)]) == 1
    assert Vm.get_msrs(fd, [MSR_IA32_XFD, MSR_IA32_XFD_ERR])[0] == 2  # reads are not writes
    assert live.quiet(mark) == []


def test_nothing_lost(live):
    live.assert_nothing_lost()
