"""Hypothesis strategies of valid events, shared by the property tests and the fuzzing."""

from hypothesis import strategies as st

from agent.events.model import (
    PERM_OPTIONS, Cpuid, Exec, Exit, FpuLoad, Fpstate, Passthrough, Perm, VcpuCreate, VcpuDestroy,
    Xcr0, Xfd, XfdErr, Xsave,
)
from agent.xstate import MASK64, PERM_LOCKED, XTILE, XTILECFG, XTILEDATA

INTERESTING_MASKS = (0, 1, 3, 7, 0xE7, 0x2E7, 0x602E7, XTILECFG, XTILEDATA, XTILE, PERM_LOCKED, MASK64,
                     MASK64 & ~1, PERM_LOCKED | 0x602E7)
masks = st.sampled_from(INTERESTING_MASKS) | st.integers(0, MASK64)
rets = st.sampled_from((0, 0, 0, -1, -22, -95, -16, -14, -12, 1)) | st.integers(-(2**31), 2**31 - 1)


def event_strategy(pids, vms, vcpu_ids, ts=st.integers(0, MASK64), masks=masks, rets=rets):
    """Any valid event of any kind, its ids (and masks, results) drawn from the given strategies."""
    common = dict(v=st.just(1), ts=ts, tgid=pids, tid=st.none() | pids, comm=st.none() | st.text(max_size=64))
    on_vcpu = dict(common, vm=vms, vcpu=vcpu_ids)
    sizes = st.sampled_from((0, 576, 2432, 4096, 11008, 2**32 - 1)) | st.integers(0, 2**32 - 1)
    return st.one_of(
        st.builds(Perm, **common, option=st.sampled_from(PERM_OPTIONS), ret=rets,
                  feature=st.none() | st.sampled_from((17, 18, 0, 63)) | st.integers(0, 63), mask=st.none() | masks),
        st.builds(VcpuCreate, **on_vcpu, ret=rets),
        st.builds(VcpuDestroy, **on_vcpu),
        st.builds(Cpuid, **on_vcpu, xcr0_supported=masks, ret=rets),
        st.builds(Xcr0, **on_vcpu, value=masks, source=st.sampled_from(("guest", "host")), ret=rets),
        st.builds(Xfd, **on_vcpu, value=masks, source=st.sampled_from(("guest", "host")), ret=rets),
        st.builds(XfdErr, **on_vcpu, value=masks, source=st.sampled_from(("nm", "guest", "host")), ret=rets),
        st.builds(Fpstate, **on_vcpu, guest=st.just(True), features=masks, ret=rets, size=st.none() | sizes),
        st.builds(Fpstate, **common, guest=st.just(False), features=masks, ret=rets, size=st.none() | sizes,
                  vm=st.none() | vms, vcpu=st.none() | vcpu_ids),
        st.builds(FpuLoad, **on_vcpu, guest_features=masks, xfd=masks, guest_size=st.none() | sizes,
                  guest_perm=st.none() | masks),
        st.builds(Passthrough, **on_vcpu, enabled=st.booleans()),
        st.builds(Xsave, **on_vcpu, op=st.sampled_from(("get", "set")), xstate_bv=masks, size=sizes, ret=rets),
        st.builds(Exec, **common),
        st.builds(Exit, **common),
    )
