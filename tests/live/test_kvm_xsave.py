"""KVM_GET_XSAVE, KVM_GET_XSAVE2 and KVM_SET_XSAVE: xsave events whose
XSTATE_BV is the one in the image (read by this test from the buffer the
kernel filled, or the one it passed in), with the size the call used."""

import errno

import pytest

from agent.events.model import Xsave
from agent.xstate import FP, SSE, XTILEDATA
from agent.kvmctl import (KVM_CAP_XSAVE2, KVM_GET_XSAVE, KVM_GET_XSAVE2, KVM_SET_XSAVE, HLT, Vm, leaf_d0, raw_ioctl,
                    with_xstate_bv, xstate_bv)

MXCSR_OFFSET, MXCSR_DEFAULT = 24, 0x1F80


@pytest.fixture
def vcpu(kvm, group):
    group("kvm_xsave")
    vm = kvm()
    fd = vm.create_vcpu(0)
    entries = vm.supported_cpuid()
    assert vm.set_cpuid(fd, entries) == 0
    return vm, fd, leaf_d0(entries)


def test_get_xsave(live, vcpu):
    vm, fd, _ = vcpu
    mark = live.mark()
    ret, image = Vm.get_xsave(fd)
    assert ret == 0
    (e, _), = live.expect(mark, 1, Xsave)
    assert (e.op, e.size, e.ret, e.xstate_bv, e.vcpu) == ("get", 4096, 0, xstate_bv(image), 0)


def test_get_xsave2_size_is_what_the_kernel_announced(live, vcpu):
    vm, fd, _ = vcpu
    size = vm.check_extension(KVM_CAP_XSAVE2)
    assert size >= 4096
    mark = live.mark()
    ret, image = Vm.get_xsave(fd, size, KVM_GET_XSAVE2)
    assert ret == 0
    (e, _), = live.expect(mark, 1, Xsave)
    # size: the vCPU's guest_fpu.uabi_size read through BTF when the call began;
    # KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) told userspace the same number.
    assert (e.op, e.size, e.ret, e.xstate_bv) == ("get", size, 0, xstate_bv(image))


def test_set_then_get_after_the_guest_ran(live, vcpu):
    vm, fd, supported = vcpu
    assert vm.guest(fd, HLT)[0] == 5  # the guest has run: its state is the CPU's now
    ret, image = Vm.get_xsave(fd)
    assert ret == 0
    # Load x87+SSE state (MXCSR at its default), then read it back.
    bv = FP | SSE
    image = with_xstate_bv(image, bv)
    image = image[:MXCSR_OFFSET] + MXCSR_DEFAULT.to_bytes(4, "little") + image[MXCSR_OFFSET + 4:]
    mark = live.mark()
    assert Vm.set_xsave(fd, image) == 0
    ret, back = Vm.get_xsave(fd)
    assert ret == 0
    (s, rs), (g, _) = live.expect(mark, 2, Xsave)
    assert (s.op, s.xstate_bv, s.size, s.ret) == ("set", bv, 4096, 0)
    assert (g.op, g.xstate_bv, g.ret) == ("get", xstate_bv(back), 0)
    assert xstate_bv(back) & ~supported == 0


def test_set_refused(live, vcpu):
    vm, fd, supported = vcpu
    ret, image = Vm.get_xsave(fd)
    assert ret == 0
    bad = supported | (1 << 62)  # a feature no CPU has: KVM refuses the image
    mark = live.mark()
    assert Vm.set_xsave(fd, with_xstate_bv(image, bad)) == -errno.EINVAL
    (e, _), = live.expect(mark, 1, Xsave)
    assert (e.op, e.xstate_bv, e.ret) == ("set", bad, -errno.EINVAL)
    if not supported & XTILEDATA:  # AMX state on a CPU without it: refused as well
        mark = live.mark()
        assert Vm.set_xsave(fd, with_xstate_bv(image, FP | XTILEDATA)) == -errno.EINVAL
        (e, _), = live.expect(mark, 1, Xsave)
        assert (e.xstate_bv, e.ret) == (FP | XTILEDATA, -errno.EINVAL)


def test_failed_get_has_no_image(live, vcpu):
    vm, fd, _ = vcpu
    mark = live.mark()
    assert raw_ioctl(fd, KVM_GET_XSAVE, 8) == -errno.EFAULT  # unmapped address
    (e, _), = live.expect(mark, 1, Xsave)
    assert (e.op, e.ret, e.xstate_bv) == ("get", -errno.EFAULT, 0)


def test_xsave_ioctl_numbers_elsewhere_are_ignored(live, kvm, group):
    group("kvm_xsave")
    mark = live.mark()
    with open("/dev/null", "rb") as f:
        for cmd in (KVM_GET_XSAVE, KVM_GET_XSAVE2, KVM_SET_XSAVE):
            assert raw_ioctl(f.fileno(), cmd, 0) < 0
    assert live.quiet(mark) == []


def test_nothing_lost(live):
    live.assert_nothing_lost()
