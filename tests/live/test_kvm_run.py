"""KVM_RUN of a real-mode guest: fpu_load when the vCPU's guest FPU state is
loaded (kvm:kvm_fpu), quiet while nothing changes; guest XSETBV and guest
WRMSR to XFD/XFD_ERR with their outcome.

On this machine (PVM backend) every real-mode guest instruction goes through
KVM's instruction emulator: kvm:kvm_emulate_insn and kvm:kvm_inj_exception
fire, kvm:kvm_exit/kvm_entry never do. The XSETBV VM-exit path of the
guest_xcr0 source (VMX/SVM hosts) is attached but cannot fire here."""

import errno
import os

import pytest

from agent.events.model import FpuLoad, Xcr0, Xfd, XfdErr
from agent.xstate import FP, PERM_LOCKED, SSE, XTILE, XTILECFG, XTILEDATA, YMM
from agent.kvmctl import (ARCH_GET_XCOMP_GUEST_PERM, ARCH_GET_XCOMP_SUPP, CR4_OSXSAVE, HLT, KVM_CAP_XSAVE2, KVM_EXIT_HLT,
                    KVM_GET_XSAVE2, MSR_IA32_XFD, MSR_IA32_XFD_ERR, WRMSR, XSETBV, Vm, arch_prctl_get, leaf, leaf_d0,
                    mov32, xstate_bv, xstate_standard_size)

XFEATURE_MASK_USER_DYNAMIC = XTILEDATA


@pytest.fixture
def vcpu(kvm):
    vm = kvm()
    fd = vm.create_vcpu(0)
    entries = vm.supported_cpuid()
    assert vm.set_cpuid(fd, entries) == 0
    return vm, fd, entries


def _loads(live, mark):
    return [(e, r) for e, r in live.quiet(mark) if isinstance(e, FpuLoad)]


# ---- fpu_load -------------------------------------------------------------------

def test_fpu_load_matches_what_kvm_reports(live, vcpu, group):
    group("fpu_load")
    vm, fd, entries = vcpu
    mark = live.mark()
    assert vm.guest(fd, HLT) == (KVM_EXIT_HLT, Vm.CODE + 1)
    (e, raw), = _loads(live, mark)
    assert (e.vcpu, e.xfd) == (0, 0)

    # guest_features: fpstate->xfeatures & ->user_xfeatures read through BTF.
    # The kernel's other answers about the same buffer:
    _, supp = arch_prctl_get(ARCH_GET_XCOMP_SUPP)  # every user feature the kernel handles
    kvm_xcr0 = leaf_d0(entries)  # what KVM lets this guest enable (CPUID 0xD.0 as we set it)
    # A new guest buffer has room for every non-dynamic user feature, and a
    # dynamic one only once KVM_SET_CPUID2 enabled it.
    assert e.guest_features == supp & ~XFEATURE_MASK_USER_DYNAMIC | kvm_xcr0 & XFEATURE_MASK_USER_DYNAMIC
    # Room for everything the guest may put in XCR0.
    assert kvm_xcr0 & ~e.guest_features == 0
    # The whole fpstate->xfeatures holds more: supervisor state (none of it user).
    assert raw.value & e.guest_features == e.guest_features and raw.value & ~e.guest_features & supp == 0

    # guest_size: fpstate->user_size, the standard-format size of those features,
    # recomputed from CPUID leaf 0xD sub-leaves (offset + size of each feature).
    assert e.guest_size == xstate_standard_size(entries, e.guest_features)
    if e.guest_features == kvm_xcr0:
        # CPUID.(0xD,0).EBX: the size for the XCR0 bits KVM supports.
        assert e.guest_size == leaf(entries, 0xD, 0).ebx
        # KVM_CAP_XSAVE2: that size, but never under sizeof(struct kvm_xsave).
        assert vm.check_extension(KVM_CAP_XSAVE2) == max(e.guest_size, 4096)
    # The image KVM_GET_XSAVE2 returns holds no state outside the buffer's features.
    ret, image = Vm.get_xsave(fd, vm.check_extension(KVM_CAP_XSAVE2), KVM_GET_XSAVE2)
    assert ret == 0 and xstate_bv(image) & ~e.guest_features == 0

    # guest_perm: the group leader's guest_perm without the lock flag (set by
    # KVM_CREATE_VCPU); its user part is what ARCH_GET_XCOMP_GUEST_PERM answers.
    assert raw.check3 & PERM_LOCKED
    ret, perm = arch_prctl_get(ARCH_GET_XCOMP_GUEST_PERM)
    assert ret == 0 and e.guest_perm & supp == perm and not e.guest_perm & PERM_LOCKED


def test_fpu_load_quiet_without_change(live, vcpu, group):
    group("fpu_load")
    vm, fd, _ = vcpu
    mark = live.mark()
    for _ in range(50):
        assert vm.guest(fd, HLT)[0] == KVM_EXIT_HLT
    # kvm_fpu fired at each KVM_RUN; one record left the kernel.
    assert len(_loads(live, mark)) == 1
    mark = live.mark()
    assert vm.guest(fd, HLT)[0] == KVM_EXIT_HLT
    assert _loads(live, mark) == []


def test_each_vcpu_and_each_new_vm_gets_its_fpu_load(live, kvm, group):
    group("fpu_load")
    names = []
    for _ in range(3):  # closed and made again: its objects likely reuse the freed addresses
        vm = kvm()
        fds = [vm.create_vcpu(0), vm.create_vcpu(1)]
        for fd in fds:
            assert vm.set_cpuid(fd, vm.supported_cpuid()) == 0
        mark = live.mark()
        for fd in fds + fds:
            assert vm.guest(fd, HLT)[0] == KVM_EXIT_HLT
        got = _loads(live, mark)
        assert [e.vcpu for e, _ in got] == [0, 1]
        assert got[0][0].vm == got[1][0].vm
        names.append(got[0][0].vm)
        vm.close()
    # Each VM its own id, even at the address of a closed one.
    assert len(set(names)) == 3


# ---- guest XSETBV ------------------------------------------------------------

def _xsetbv(value: int, index: int = 0) -> bytes:
    return mov32("ecx", index) + mov32("eax", value & 0xFFFFFFFF) + mov32("edx", value >> 32) + XSETBV + HLT


def _end(code: bytes) -> int:
    return Vm.CODE + len(code)


def test_guest_xsetbv(live, vcpu, group):
    group("guest_xcr0")
    vm, fd, entries = vcpu
    supported = leaf_d0(entries)
    cases = [
        (FP | SSE | YMM, True),
        (XTILE | FP | SSE | YMM, bool(supported & XTILE == XTILE)),
        (supported, True),
        (FP | YMM, False),  # YMM without SSE
        (XTILECFG | FP, False),  # XTILECFG without XTILEDATA
        (FP | SSE, True),
    ]
    mark = live.mark()
    state = FP
    for value, ok in cases:
        code = _xsetbv(value)
        reason, rip = vm.guest(fd, code, cr4=CR4_OSXSAVE)
        # The guest's own view: it reached the HLT after XSETBV, or the #GP handler.
        assert (reason, rip) == (KVM_EXIT_HLT, _end(code) if ok else Vm.GP_HANDLER + 1), hex(value)
        state = value if ok else state
        assert vm.get_xcr0(fd) == state
    got = [(e, r) for e, r in live.since(mark, len(cases) + 1) if isinstance(e, Xcr0)]
    assert [(e.value, e.source, e.ret) for e, _ in got] == [(v, "guest", 0 if ok else 1) for v, ok in cases]
    # check1: arch.xcr0 when KVM was done with the instruction; check3: the
    # exception injected meanwhile (0x100 | 13: #GP), 0 for none.
    assert [r.check1 for _, r in got] == _states(cases)
    assert [r.check3 for _, r in got] == [0 if ok else 0x100 | 13 for _, ok in cases]


def _states(cases):
    state, out = FP, []
    for value, ok in cases:
        state = value if ok else state
        out.append(state)
    return out


def test_guest_xsetbv_of_another_xcr_is_not_an_xcr0_write(live, vcpu, group):
    group("guest_xcr0")
    vm, fd, _ = vcpu
    mark = live.mark()
    assert vm.guest(fd, _xsetbv(FP | SSE, index=1), cr4=CR4_OSXSAVE) == (KVM_EXIT_HLT, Vm.GP_HANDLER + 1)
    assert [e for e, _ in live.quiet(mark) if isinstance(e, Xcr0)] == []


def test_guest_xsetbv_without_osxsave_is_ud_not_a_write(live, vcpu, group):
    group("guest_xcr0")
    vm, fd, _ = vcpu
    mark = live.mark()
    code = _xsetbv(FP | SSE)
    reason, rip = vm.guest(fd, code)  # CR4.OSXSAVE clear: #UD before any XCR0 check
    assert (reason, rip) == (KVM_EXIT_HLT, Vm.UD_HANDLER + 1)
    got = [(e, r) for e, r in live.quiet(mark) if isinstance(e, Xcr0)]
    # KVM's emulator decoded an XSETBV (here): reported as a write the guest
    # got a fault for (#UD, vector 6, in check3), never as one that took effect.
    assert [(e.value, e.ret) for e, _ in got] in ([], [(FP | SSE, 1)])
    assert all(r.check3 in (0x100 | 6, 0x100 | 13) for _, r in got)
    assert vm.get_xcr0(fd) == FP


def test_xsetbv_exit_path_is_attached(live, group):
    """The VM-exit path (VMX reason 55, SVM 0x8d) cannot fire on this PVM
    host; doctor must still show it attached where the kernel has it."""
    group("guest_xcr0")
    st = live.backend.status["guest_xcr0"]
    assert set(st.tracepoints) == {"raw_syscalls:sys_enter (tp_btf)", "kvm:kvm_exit", "kvm:kvm_entry",
                                   "kvm:kvm_emulate_insn", "kvm:kvm_inj_exception"}


# ---- guest WRMSR to XFD / XFD_ERR --------------------------------------------

def _wrmsr(msr: int, value: int) -> bytes:
    return mov32("ecx", msr) + mov32("eax", value & 0xFFFFFFFF) + mov32("edx", value >> 32) + WRMSR + HLT


def test_guest_xfd_writes(live, vcpu, group):
    group("guest_msr")
    vm, fd, entries = vcpu
    # A guest may write XFD/XFD_ERR only if its CPUID has XFD (0xD.1 EAX[4]),
    # and only bits of the supported XFD (XTILEDATA).
    guest_xfd = bool(leaf(entries, 0xD, 1).eax & (1 << 4))
    cases = [(MSR_IA32_XFD, XTILEDATA, Xfd), (MSR_IA32_XFD, 0, Xfd), (MSR_IA32_XFD_ERR, XTILEDATA, XfdErr),
             (MSR_IA32_XFD_ERR, 0, XfdErr), (MSR_IA32_XFD, XTILECFG, Xfd)]
    mark = live.mark()
    want = []
    for msr, value, kind in cases:
        ok = guest_xfd and value & ~(leaf_d0(entries) & XTILEDATA) == 0
        code = _wrmsr(msr, value)
        assert vm.guest(fd, code) == (KVM_EXIT_HLT, _end(code) if ok else Vm.GP_HANDLER + 1)
        want.append((kind, value, "guest", 0 if ok else 1))
    got = [(e, r) for e, r in live.since(mark, len(cases) + 1) if isinstance(e, (Xfd, XfdErr))]
    assert [(type(e), e.value, e.source, e.ret) for e, _ in got] == want
    assert {e.vcpu for e, _ in got} == {0}


def test_guest_other_msr_is_not_reported(live, vcpu, group):
    group("guest_msr")
    vm, fd, _ = vcpu
    mark = live.mark()
    code = _wrmsr(0x174, 0x10)  # IA32_SYSENTER_CS
    assert vm.guest(fd, code) == (KVM_EXIT_HLT, _end(code))
    assert [e for e, _ in live.quiet(mark) if isinstance(e, (Xfd, XfdErr))] == []


def test_nothing_lost(live):
    live.assert_nothing_lost()
