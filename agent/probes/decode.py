"""Raw ring-buffer records of bpf/tracepoints.bpf.c and bpf/kprobes.bpf.c -> agent.events.model events.

RAW mirrors `struct event` in bpf/common.h; its size is passed to the
compiler as -DEVENT_SIZE and checked there with _Static_assert, so the two
cannot drift apart silently. What `value`, `check*` and `size` hold for each
kind is written next to its decoding below.
"""

import struct
from typing import NamedTuple

from agent.events.model import (Cpuid, Event, Exec, Exit, Fpstate, FpuLoad, Passthrough, Perm, VcpuCreate,
                                VcpuDestroy, Xcr0, Xfd, XfdErr, Xsave)
from agent.probes.vmnames import VmNames
from agent.xstate import PERM_LOCKED

RAW = struct.Struct("<7Q8I16s")
EVENT_SIZE = RAW.size

(EV_PERM, EV_VCPU_CREATE, EV_CPUID, EV_XCR0, EV_XFD, EV_XFD_ERR, EV_XSAVE, EV_FPU_LOAD, EV_EXEC, EV_EXIT,
 EV_VM_CREATE) = range(1, 12)
# Kinds only the kprobe backend sends (bpf/kp_kvm.h).
EV_FPSTATE, EV_PASSTHROUGH, EV_VCPU_DESTROY = range(12, 15)
F_VALUE, F_CHECKED, F_GUEST, F_PERM, F_NM = 1, 2, 4, 8, 16

KVM_GET_XSAVE, KVM_SET_XSAVE, KVM_GET_XSAVE2 = 0x9000AEA4, 0x5000AEA5, 0x9000AECF
XSAVE_OP = {KVM_GET_XSAVE: "get", KVM_GET_XSAVE2: "get", KVM_SET_XSAVE: "set"}

PERM_OPTION = {
    0x1021: "GET_XCOMP_SUPP",
    0x1022: "GET_XCOMP_PERM",
    0x1023: "REQ_XCOMP_PERM",
    0x1024: "GET_XCOMP_GUEST_PERM",
    0x1025: "REQ_XCOMP_GUEST_PERM",
}
REQ_OPTIONS = (0x1023, 0x1025)


class DecodeError(ValueError):
    """A record the decoder cannot turn into an event (counted by the backend)."""


class Raw(NamedTuple):
    ts: int
    value: int
    vm: int
    check1: int
    check2: int
    check3: int
    check4: int
    tgid: int
    tid: int
    kind: int
    op: int
    ret: int
    arg: int
    flags: int
    size: int
    comm: str

    @classmethod
    def unpack(cls, data: bytes) -> "Raw":
        if len(data) < EVENT_SIZE:
            raise DecodeError(f"record of {len(data)} bytes, expected {EVENT_SIZE}")
        f = RAW.unpack_from(data)
        # ret and arg are s32 in C.
        ret = f[11] - (1 << 32) if f[11] & 0x80000000 else f[11]
        arg = f[12] - (1 << 32) if f[12] & 0x80000000 else f[12]
        comm = f[15].split(b"\0", 1)[0].decode("utf-8", "replace")
        return cls(*f[:11], ret, arg, f[13], f[14], comm)


def guest_features(raw: Raw) -> int:
    """fpu_load's guest_features: the user-visible features the guest buffer has room for.

    fpstate->xfeatures (raw.value) is what the kernel buffer is sized for; it
    also holds supervisor features (CET bits 11-12 on this machine's 6.18)
    that XCR0 can never enable. fpstate->user_xfeatures (raw.check1) is the
    kernel's own user-visible set of the same buffer (both grow together in
    fpstate_realloc). Their intersection is what the spec means, and what the
    policy compares with XCR0; the whole xfeatures stays in raw.value.
    """
    return raw.value & raw.check1


def _fpstate_size(raw: Raw) -> int | None:
    """fpstate's size: the buffer's user_size read at the return of the
    allocation (check1 = its kernel size, check2 = its xfeatures); none when
    the allocation failed (the buffer read is the old one) or was not read."""
    return raw.size if raw.ret == 0 and raw.flags & F_CHECKED else None


def to_event(raw: Raw, vms: VmNames) -> Event | None:
    """The model event for a raw record; None for a bookkeeping record (a new
    VM). Raises DecodeError for a record it cannot decode."""
    common = dict(v=1, ts=raw.ts, tgid=raw.tgid, tid=raw.tid, comm=raw.comm)
    kind = raw.kind
    if kind == EV_PERM:
        option = PERM_OPTION.get(raw.op)
        if option is None:
            raise DecodeError(f"perm record with unknown option {raw.op:#x}")
        # A feature number outside the model's 0..63 (the kernel refuses it
        # with -EINVAL) is left out rather than made into an invalid event.
        feature = raw.value if raw.op in REQ_OPTIONS and raw.value < 64 else None
        mask = raw.value if raw.op not in REQ_OPTIONS and raw.flags & F_VALUE else None
        return Perm(**common, option=option, feature=feature, mask=mask, ret=raw.ret)
    if kind == EV_VM_CREATE:
        vms.created(raw.tgid, raw.vm, raw.ts)
        return None
    if kind == EV_EXEC:
        return Exec(**common)
    if kind == EV_EXIT:
        return Exit(**common)
    if kind == EV_FPSTATE and not raw.flags & F_GUEST:
        # The process's own buffer (the host's first #NM of a dynamic feature).
        return Fpstate(**common, guest=False, features=raw.value, ret=raw.ret, size=_fpstate_size(raw))

    if raw.arg < 0:
        # Only a KVM_CREATE_VCPU can carry one: its argument as the caller passed it (KVM refuses ids
        # past KVM_MAX_VCPU_IDS). The spec's vcpu is 0..2^31-1: such an event would stop replay there.
        raise DecodeError(f"vCPU id {raw.arg} out of range")
    vcpu = dict(common, vm=vms.id(raw.tgid, raw.vm, raw.ts), vcpu=raw.arg)
    if kind == EV_VCPU_CREATE:
        return VcpuCreate(**vcpu, ret=raw.ret)
    if kind == EV_CPUID:
        # No leaf 0xD sub-leaf 0 in the array: the guest gets no XSAVE features.
        supported = raw.value if raw.flags & F_VALUE else 0
        return Cpuid(**vcpu, xcr0_supported=supported, ret=raw.ret)
    if kind == EV_VCPU_DESTROY:
        return VcpuDestroy(**vcpu)
    if kind == EV_PASSTHROUGH:
        # check1 = the vendor set_msr's result, check2 = 1 for a host write.
        return Passthrough(**vcpu, enabled=bool(raw.value))
    if kind == EV_FPSTATE:
        # A vCPU's guest buffer (KVM_SET_CPUID2 enabling a dynamic feature).
        return Fpstate(**vcpu, guest=True, features=raw.value, ret=raw.ret, size=_fpstate_size(raw))
    source = "nm" if raw.flags & F_NM else "guest" if raw.flags & F_GUEST else "host"
    if kind == EV_XCR0:
        # host: KVM_SET_XCRS, ret the ioctl's. guest: XSETBV, ret 0 or 1 (a
        # fault); check1 = arch.xcr0 once KVM was done with it, check2 = its
        # RIP, check3 = 0x100 | vector of the exception injected (0: none),
        # check4 = RIP at the next entry or emulated instruction (0: unknown).
        return Xcr0(**vcpu, value=raw.value, source=source, ret=raw.ret)
    if kind in (EV_XFD, EV_XFD_ERR):
        # host: one KVM_SET_MSRS entry, ret 0 (set) or -1 (refused) or the
        # ioctl's errno; check1 = the ioctl's result, check2 = entry index.
        # guest: WRMSR seen by kvm:kvm_msr, ret 1 if the guest got #GP.
        # kprobes: each entry/WRMSR from kvm_set_msr_common, check1 = its
        # result; nm: XFD_ERR as KVM saved it on the guest's #NM, check1 = XFD.
        cls = Xfd if kind == EV_XFD else XfdErr
        return cls(**vcpu, value=raw.value, source=source, ret=raw.ret)
    if kind == EV_XSAVE:
        op = XSAVE_OP.get(raw.op)
        if op is None:
            raise DecodeError(f"xsave record with unknown ioctl {raw.op:#x}")
        # XSTATE_BV of the image (set: as passed in; get: as the kernel wrote
        # it). A get that failed filled no image: its XSTATE_BV is reported 0.
        xstate_bv = raw.value if raw.flags & F_VALUE else 0
        return Xsave(**vcpu, op=op, xstate_bv=xstate_bv, size=raw.size, ret=raw.ret)
    if kind == EV_FPU_LOAD:
        # value/check1 = fpstate xfeatures/user_xfeatures, check2 = fpstate->xfd,
        # check3 = guest_perm (F_PERM), check4 = fpstate->size (compacted, with
        # supervisor state), size = fpstate->user_size: the size of
        # guest_features' state in the standard format, the same features'
        # size, not the kernel's compacted allocation.
        perm = raw.check3 & ~PERM_LOCKED if raw.flags & F_PERM else None
        return FpuLoad(**vcpu, guest_features=guest_features(raw), guest_size=raw.size, xfd=raw.check2,
                       guest_perm=perm)
    raise DecodeError(f"unknown record kind {kind}")
