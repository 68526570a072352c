"""agent.probes.decode without a kernel: records as bpf/common.h lays them
out, packed here, decoded into spec events."""

import pytest

from agent.events.model import Cpuid, Exec, Exit, FpuLoad, Perm, VcpuCreate, Xcr0, Xfd, XfdErr, Xsave
from agent.events.reader import decode_line
from agent.events.writer import encode
from agent.probes import decode as d
from agent.probes.vmnames import VmNames

KVM = 0xFFFF888812345000


def rec(kind, *, value=0, vm=KVM, check1=0, check2=0, check3=0, check4=0, tgid=42, tid=43, op=0, ret=0, arg=0,
        flags=0, size=0, comm=b"qemu"):
    return d.RAW.pack(1000, value, vm, check1, check2, check3, check4, tgid, tid, kind, op, ret & 0xFFFFFFFF,
                      arg & 0xFFFFFFFF, flags, size, comm)


def event(data, vms=None):
    e = d.to_event(d.Raw.unpack(data), vms or VmNames(proc="/nonexistent"))
    if e is not None:
        # msgspec does not validate on construction: the strict reader must
        # accept what the backend makes, unchanged.
        assert decode_line(encode(e).rstrip(b"\n")) == e
    return e


def test_layout_matches_the_c_struct():
    # struct event in bpf/common.h: 7 u64, 8 u32, char comm[16].
    assert d.EVENT_SIZE == 7 * 8 + 8 * 4 + 16 == 104


def test_common_fields_and_signed_values():
    e = event(rec(d.EV_VCPU_CREATE, ret=-17, arg=3, comm=b"qemu-system-x86\0"))
    assert isinstance(e, VcpuCreate)
    assert (e.v, e.ts, e.tgid, e.tid, e.comm, e.vcpu, e.ret) == (1, 1000, 42, 43, "qemu-system-x86", 3, -17)
    assert e.vm.startswith("vm-")


def test_perm():
    e = event(rec(d.EV_PERM, op=0x1025, value=18, ret=-95))
    assert isinstance(e, Perm) and (e.option, e.feature, e.mask, e.ret) == ("REQ_XCOMP_GUEST_PERM", 18, None, -95)
    e = event(rec(d.EV_PERM, op=0x1021, value=0x207, flags=d.F_VALUE))
    assert (e.option, e.mask, e.feature) == ("GET_XCOMP_SUPP", 0x207, None)


def test_cpuid_without_leaf_0xd_is_zero():
    assert event(rec(d.EV_CPUID)).xcr0_supported == 0
    e = event(rec(d.EV_CPUID, value=0x207, flags=d.F_VALUE))
    assert isinstance(e, Cpuid) and e.xcr0_supported == 0x207


@pytest.mark.parametrize("kind, cls", [(d.EV_XFD, Xfd), (d.EV_XFD_ERR, XfdErr), (d.EV_XCR0, Xcr0)])
def test_writes_host_and_guest(kind, cls):
    host = event(rec(kind, value=0x40000, ret=-1, flags=d.F_VALUE))
    guest = event(rec(kind, value=0x40000, ret=1, flags=d.F_VALUE | d.F_GUEST))
    assert isinstance(host, cls) and (host.source, host.ret, host.value) == ("host", -1, 0x40000)
    assert (guest.source, guest.ret) == ("guest", 1)


def test_xsave():
    e = event(rec(d.EV_XSAVE, op=d.KVM_GET_XSAVE2, value=0x207, flags=d.F_VALUE, size=4096))
    assert isinstance(e, Xsave) and (e.op, e.xstate_bv, e.size, e.ret) == ("get", 0x207, 4096, 0)
    e = event(rec(d.EV_XSAVE, op=d.KVM_GET_XSAVE, ret=-14, size=4096))
    assert (e.op, e.xstate_bv, e.ret) == ("get", 0, -14)  # no image
    assert event(rec(d.EV_XSAVE, op=d.KVM_SET_XSAVE, value=3, flags=d.F_VALUE)).op == "set"
    with pytest.raises(d.DecodeError):
        event(rec(d.EV_XSAVE, op=0x1234))


def test_fpu_load_reports_user_features_and_drops_the_lock_flag():
    e = event(rec(d.EV_FPU_LOAD, value=0x1A07, check1=0x207, check2=0, check3=(1 << 63) | 0x1A07, check4=880,
                  size=2440, flags=d.F_VALUE | d.F_PERM))
    assert isinstance(e, FpuLoad)
    assert (e.guest_features, e.guest_size, e.xfd, e.guest_perm) == (0x207, 2440, 0, 0x1A07)
    e = event(rec(d.EV_FPU_LOAD, value=0x602E7, check1=0x602E7, check2=0x40000, size=11008, flags=d.F_VALUE))
    assert (e.guest_features, e.xfd, e.guest_perm) == (0x602E7, 0x40000, None)


def test_process_events_and_vm_bookkeeping():
    vms = VmNames(proc="/nonexistent")
    assert isinstance(event(rec(d.EV_EXEC), vms), Exec)
    assert isinstance(event(rec(d.EV_EXIT), vms), Exit)
    first = event(rec(d.EV_VCPU_CREATE), vms).vm
    assert event(rec(d.EV_VM_CREATE), vms) is None  # a new VM at that address
    assert event(rec(d.EV_VCPU_CREATE), vms).vm != first


def test_bad_records():
    with pytest.raises(d.DecodeError, match="unknown record kind 99"):
        event(rec(99))
    with pytest.raises(d.DecodeError, match="unknown option"):
        event(rec(d.EV_PERM, op=0x1003))
    with pytest.raises(d.DecodeError, match="record of 10 bytes"):
        d.Raw.unpack(b"\0" * 10)
    # Any process with /dev/kvm can ask KVM_CREATE_VCPU for id 0x80000000 (refused: -EINVAL).
    with pytest.raises(d.DecodeError, match="vCPU id -2147483648 out of range"):
        event(rec(d.EV_VCPU_CREATE, arg=0x80000000, ret=-22))
