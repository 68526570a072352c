"""Raw ring-buffer records of bpf/tracepoints.bpf.c -> agent.events.model events.

RAW mirrors `struct event` in the BPF C file; its size is passed to the
compiler as -DEVENT_SIZE and checked there with _Static_assert, so the two
cannot drift apart silently.
"""

import struct
from typing import NamedTuple

from agent.events.model import Cpuid, Event, Perm, VcpuCreate, Xcr0

RAW = struct.Struct("<5Q8I16s")
EVENT_SIZE = RAW.size

EV_PERM, EV_VCPU_CREATE, EV_CPUID, EV_XCR0 = 1, 2, 3, 4
F_VALUE, F_CHECKED = 1, 2

PERM_OPTION = {
    0x1021: "GET_XCOMP_SUPP",
    0x1022: "GET_XCOMP_PERM",
    0x1023: "REQ_XCOMP_PERM",
    0x1024: "GET_XCOMP_GUEST_PERM",
    0x1025: "REQ_XCOMP_GUEST_PERM",
}
REQ_OPTIONS = (0x1023, 0x1025)


class Raw(NamedTuple):
    ts: int
    value: int
    vm: int
    check1: int
    check2: int
    tgid: int
    tid: int
    kind: int
    op: int
    ret: int
    arg: int
    flags: int
    check3: int
    comm: str

    @classmethod
    def unpack(cls, data: bytes) -> "Raw":
        f = RAW.unpack_from(data)
        # ret and arg are s32 in C.
        ret = f[9] - (1 << 32) if f[9] & 0x80000000 else f[9]
        arg = f[10] - (1 << 32) if f[10] & 0x80000000 else f[10]
        comm = f[13].split(b"\0", 1)[0].decode("utf-8", "replace")
        return cls(*f[:9], ret, arg, f[11], f[12], comm)


class VmNames:
    """Opaque VM names ("vm-1", ...) for kernel `struct kvm` addresses, so that
    no kernel pointer leaves the agent. Keyed by (tgid, address): an address
    can be reused by a later VM; forget() drops a process's VMs at its exit."""

    def __init__(self):
        self._names: dict[tuple[int, int], str] = {}
        self._next = 1

    def name(self, tgid: int, kvm: int) -> str:
        key = (tgid, kvm)
        name = self._names.get(key)
        if name is None:
            name = self._names[key] = f"vm-{self._next}"
            self._next += 1
        return name

    def forget(self, tgid: int) -> None:
        for key in [k for k in self._names if k[0] == tgid]:
            del self._names[key]


def to_event(raw: Raw, vms: VmNames) -> Event | None:
    """The model event for a raw record, or None for a kind this decoder does not know."""
    common = dict(v=1, ts=raw.ts, tgid=raw.tgid, tid=raw.tid, comm=raw.comm)
    if raw.kind == EV_PERM:
        option = PERM_OPTION[raw.op]
        # A feature number outside the model's 0..63 (the kernel refuses it
        # with -EINVAL) is left out rather than made into an invalid event.
        feature = raw.value if raw.op in REQ_OPTIONS and raw.value < 64 else None
        mask = raw.value if raw.op not in REQ_OPTIONS and raw.flags & F_VALUE else None
        return Perm(**common, option=option, feature=feature, mask=mask, ret=raw.ret)
    if raw.kind == EV_VCPU_CREATE:
        return VcpuCreate(**common, vm=vms.name(raw.tgid, raw.vm), vcpu=raw.arg, ret=raw.ret)
    if raw.kind == EV_CPUID:
        # No leaf 0xD sub-leaf 0 in the array: the guest gets no XSAVE features.
        supported = raw.value if raw.flags & F_VALUE else 0
        return Cpuid(**common, vm=vms.name(raw.tgid, raw.vm), vcpu=raw.arg, xcr0_supported=supported, ret=raw.ret)
    if raw.kind == EV_XCR0:
        return Xcr0(**common, vm=vms.name(raw.tgid, raw.vm), vcpu=raw.arg, value=raw.value, source="host",
                    ret=raw.ret)
    return None
