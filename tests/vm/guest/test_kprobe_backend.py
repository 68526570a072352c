"""The kprobe backend on a stock kernel (run inside tests/vm/run-kernel for
Debian's 6.1 and 6.12): every source attaches; the live tests' actions
(arch_prctl calls, a VM built through KVM ioctls, hlt runs, guest XSETBV and
WRMSR) give the same events as the tracepoint backend, which watches the
same actions at the same time; and the events only kprobes see are checked
against what KVM reports.

What QEMU's software emulation (TCG, -cpu EPYC,+svm) cannot show:
- AMX: the emulated CPU has none, so no process or guest can be granted it
  (ARCH_REQ_XCOMP_GUEST_PERM(18) is refused); the guest buffer growth at
  KVM_SET_CPUID2 is seen refused (-EPERM), never succeeding.
- XFD: no XFD either, so every non-zero XFD write is refused and KVM never
  drops XFD write interception: no passthrough event can happen (the probe
  is attached, on svm_set_msr); and AMD hosts have no #NM XFD_ERR save (VMX
  only): that source is reported unavailable, with the reason.
- XSETBV exits: the emulated nested SVM does not intercept XSETBV; guest
  XCR0 writes are made through KVM's forced-emulation prefix instead (the
  `fep` fixture), which runs the same XCR0 handler.
"""

import ctypes
import errno
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from agent.events.model import Cpuid, Fpstate, FpuLoad, Passthrough, VcpuDestroy, Xcr0, Xfd, XfdErr
from agent.events.writer import encode
from agent.kvmctl import (ARCH_GET_XCOMP_GUEST_PERM, ARCH_GET_XCOMP_PERM, ARCH_GET_XCOMP_SUPP,
                          ARCH_REQ_XCOMP_GUEST_PERM, ARCH_REQ_XCOMP_PERM, CR4_OSXSAVE, HLT, KVM_CAP_XSAVE2,
                          KVM_EXIT_HLT, KVM_GET_XSAVE, KVM_GET_XSAVE2, MSR_IA32_XFD, MSR_IA32_XFD_ERR, WRMSR, XSETBV,
                          Vm, arch_prctl, arch_prctl_get, leaf, leaf_d0, mov32, raw_ioctl, with_xstate_bv, xstate_bv,
                          xstate_standard_size)
from agent.probes import kprobe_plan
from agent.xstate import FP, PERM_LOCKED, SSE, XTILE, XTILECFG, XTILEDATA, YMM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
KPROBE_ONLY = ("fpstate", "passthrough", "vcpu_destroy")
MSR_IA32_SYSENTER_CS = 0x174
ARCH_GET_FS = 0x1003


# ---- helpers --------------------------------------------------------------------------------------

def _norm(events):
    """Events as spec JSON without ts, VM ids renamed by first appearance (each backend numbers its own)."""
    names, out = {}, []
    for e in events:
        d = json.loads(encode(e))
        d.pop("ts")
        if "vm" in d:
            d["vm"] = names.setdefault(d["vm"], f"vm#{len(names)}")
        out.append(d)
    return out


def _kprobe_only(e) -> bool:
    return e.kind in KPROBE_ONLY or (e.kind == "xfd_err" and e.source == "nm")


class Both:
    """Marks both collectors, then gives what each saw since, once both are drained."""

    def __init__(self, backends):
        self.b = backends
        self.marks = {n: c.mark() for n, c in backends.items()}

    def events(self, name):
        c = self.b[name]
        c._sync()
        return [e for e, _ in c.items[self.marks[name]:]]

    def raws(self, name):
        c = self.b[name]
        c._sync()
        return c.items[self.marks[name]:]

    def same(self, min_events=1):
        """The tracepoint backend's events, equal to the kprobe backend's but for kprobe-only kinds."""
        time.sleep(0.05)
        tp, kp = self.events("tp"), self.events("kp")
        common = [e for e in kp if not _kprobe_only(e)]
        assert _norm(common) == _norm(tp)
        assert len(tp) >= min_events, tp
        return tp, kp


@pytest.fixture
def both(backends):
    def make():
        return Both(backends)
    return make


@pytest.fixture
def kvm():
    vms = []

    def make():
        vms.append(Vm())
        return vms[-1]
    yield make
    for vm in vms:
        vm.close()


def _status(backends, source):
    return backends["kp"].backend.status[source]


# ---- attach -----------------------------------------------------------------------------------------

def test_every_source_attached_but_the_vmx_only_one(backends):
    kp = backends["kp"].backend
    st = {s: (x.attached, x.reason) for s, x in kp.status.items()}
    assert list(st) == list(kprobe_plan.SOURCES)
    assert {s for s, (a, _) in st.items() if not a} == {"xfd_nm"}, st
    # The kvm_amd host of QEMU's emulated SVM: the #NM XFD_ERR save is VMX code (kvm_intel), and
    # handle_nm_fault_irqoff is inlined into kvm-intel.ko on 6.1 and 6.12 anyway.
    assert "handle_nm_fault_irqoff not in kallsyms" in st["xfd_nm"][1]
    # Debian 6.1 and 6.12 both keep these functions out of line:
    assert {s: x.via for s, x in kp.status.items() if x.via} == {
        "arch_prctl": "fpu_xstate_prctl",
        "kvm_ioctl": "kvm_arch_vcpu_ioctl, kvm_vm_ioctl, kvm_dev_ioctl",
        "kvm_msrs": "kvm_set_msr_common",
        "fpu_load": "fpu_swap_kvm_fpstate, kvm_vcpu_ioctl",
        "guest_xcr0": "__kvm_set_xcr, kvm_vcpu_ioctl",
        "guest_msr": "kvm_set_msr_common",
        "sched": "sched:sched_process_exit + sched:sched_process_exec",
        "fpstate": "__xfd_enable_feature",
        "vcpu_destroy": "kvm_arch_vcpu_destroy, kvm_arch_vcpu_create + kvm_arch_vcpu_postcreate",
        "passthrough": "svm_set_msr",
    }
    # Every kind of the spec has a source.
    from agent.events.model import KINDS
    assert set(KINDS) <= set(kp.kinds_covered())


def test_probes_command_shows_every_source(backends):
    """`python -m agent.probes --backend kprobe`, as an operator runs it."""
    p = subprocess.run([sys.executable, "-m", "agent.probes", "--backend", "kprobe"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    lines = {line.split()[0]: line for line in p.stdout.splitlines()
             if line.startswith("  ") and len(line.split()) > 1 and line.split()[0] in kprobe_plan.SOURCES}
    assert set(lines) == set(kprobe_plan.SOURCES), p.stdout + p.stderr
    for s, line in lines.items():
        assert ("NOT attached" in line) == (s == "xfd_nm"), line
    assert "event kinds without an attached source: none" in p.stdout
    assert "load+attach" in p.stdout
    print(next(line for line in p.stdout.splitlines() if line.startswith("backend kprobe:")))


# ---- the same events as the tracepoint backend ------------------------------------------------------

def test_arch_prctl(both):
    b = both()
    for option in (ARCH_GET_XCOMP_SUPP, ARCH_GET_XCOMP_PERM, ARCH_GET_XCOMP_GUEST_PERM):
        assert arch_prctl_get(option)[0] == 0
    _, supp = arch_prctl_get(ARCH_GET_XCOMP_SUPP)
    assert not supp & XTILEDATA  # no AMX under emulation
    assert arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, ctypes.c_long(18)) == -errno.EOPNOTSUPP
    assert arch_prctl(ARCH_REQ_XCOMP_PERM, ctypes.c_long(18)) == -errno.EOPNOTSUPP
    assert arch_prctl(ARCH_REQ_XCOMP_PERM, ctypes.c_long(1000)) == -errno.EINVAL
    assert arch_prctl(ARCH_GET_XCOMP_SUPP, ctypes.c_void_p(8)) == -errno.EFAULT
    fs = ctypes.c_uint64(0)
    assert arch_prctl(ARCH_GET_FS, ctypes.byref(fs)) == 0  # not an XSTATE option: no event
    tp, kp = b.same(7)
    assert [(e.option, e.ret) for e in kp] == [
        ("GET_XCOMP_SUPP", 0), ("GET_XCOMP_PERM", 0), ("GET_XCOMP_GUEST_PERM", 0), ("GET_XCOMP_SUPP", 0),
        ("REQ_XCOMP_GUEST_PERM", -95), ("REQ_XCOMP_PERM", -95), ("REQ_XCOMP_PERM", -22), ("GET_XCOMP_SUPP", -14)]
    assert kp[0].mask == supp and kp[-1].mask is None and kp[4].feature == 18


def test_vm_through_kvm_ioctls(both, kvm):
    vm, other = kvm(), kvm()
    b = both()
    v0 = vm.create_vcpu(0)
    v3 = vm.create_vcpu(3)
    assert vm.create_vcpu(3) == -errno.EEXIST
    assert other.create_vcpu(0) >= 0
    entries = vm.supported_cpuid()
    supported = leaf_d0(entries)
    assert vm.set_cpuid(v0, entries) == 0
    partial = vm.supported_cpuid()
    for e in partial:
        if e.function == 0xD and e.index == 0:
            e.eax, e.edx = 0x3, 0
    assert vm.set_cpuid(v3, partial) == 0
    assert vm.set_cpuid(v3, [e for e in entries if e.function != 0xD]) == 0
    for value, want in ((0x7, 0), (0x60007, -errno.EINVAL), (0x20007, -errno.EINVAL), (0x5, -errno.EINVAL),
                        (0x0, -errno.EINVAL), (supported, 0), (0x3, 0)):
        assert vm.set_xcrs(v0, [(0, value)]) == want, hex(value)
    assert vm.set_xcrs(v0, [(1, 0x1), (0, 0x7)]) == 0  # XCR0 second in the array
    assert vm.set_xcrs(v0, [(1, 0x1)]) == 0  # no XCR0: nothing written, no event
    assert vm.set_xcrs(v0, [(0, 0x3)], flags=1) == -errno.EINVAL  # refused before any write
    tp, kp = b.same(16)
    assert [e.kind for e in tp].count("xcr0") == 9
    assert [(e.vcpu, e.ret) for e in kp if e.kind == "vcpu_create"] == [(0, 0), (3, 0), (3, -17), (0, 0)]
    # The vCPU a failed KVM_CREATE_VCPU (-EEXIST) made and freed is not reported destroyed.
    assert not [e for e in kp if e.kind == "vcpu_destroy"]


def test_kvm_set_msrs(both, kvm):
    vm = kvm()
    v = vm.create_vcpu(0)
    assert vm.set_cpuid(v, vm.supported_cpuid()) == 0
    b = both()
    assert Vm.set_msrs(v, [(MSR_IA32_XFD, 0)]) == 1
    assert Vm.set_msrs(v, [(MSR_IA32_XFD, XTILEDATA)]) == 0  # no XFD on this CPU: refused
    assert Vm.set_msrs(v, [(MSR_IA32_SYSENTER_CS, 0x10), (MSR_IA32_XFD_ERR, XTILECFG), (MSR_IA32_XFD, 0)]) == 1
    assert Vm.set_msrs(v, [(MSR_IA32_SYSENTER_CS, 0x10), (MSR_IA32_XFD_ERR, 0), (MSR_IA32_XFD, 0)]) == 3
    too_many = [(MSR_IA32_XFD, 0)] + [(MSR_IA32_SYSENTER_CS, 0)] * 255
    assert Vm.set_msrs(v, too_many) == -errno.E2BIG  # refused as a whole: each backend reports the errno
    assert Vm.set_msrs(v, [(MSR_IA32_SYSENTER_CS, 0x10)]) == 1
    assert Vm.get_msrs(v, [MSR_IA32_XFD, MSR_IA32_XFD_ERR])[0] == 2
    tp, kp = b.same(6)
    assert [(type(e), e.value, e.source, e.ret) for e in kp] == [
        (Xfd, 0, "host", 0), (Xfd, XTILEDATA, "host", -1), (XfdErr, XTILECFG, "host", -1),
        (XfdErr, 0, "host", 0), (Xfd, 0, "host", 0), (Xfd, 0, "host", -errno.E2BIG)]
    assert not [e for e in kp if isinstance(e, Passthrough)]  # nothing accepted a non-zero XFD


def test_xsave(both, kvm):
    vm = kvm()
    v = vm.create_vcpu(0)
    entries = vm.supported_cpuid()
    assert vm.set_cpuid(v, entries) == 0
    assert vm.guest(v, HLT)[0] == KVM_EXIT_HLT
    b = both()
    ret, image = Vm.get_xsave(v)
    assert ret == 0
    size = vm.check_extension(KVM_CAP_XSAVE2)
    assert Vm.get_xsave(v, size, KVM_GET_XSAVE2)[0] == 0
    assert Vm.set_xsave(v, with_xstate_bv(image, FP | SSE)) == 0
    assert Vm.set_xsave(v, with_xstate_bv(image, leaf_d0(entries) | 1 << 62)) == -errno.EINVAL
    assert Vm.set_xsave(v, with_xstate_bv(image, FP | XTILEDATA)) == -errno.EINVAL
    assert raw_ioctl(v, KVM_GET_XSAVE, 8) == -errno.EFAULT
    tp, kp = b.same(6)
    assert [(e.op, e.xstate_bv if e.op == "set" else None, e.size, e.ret) for e in kp] == [
        ("get", None, 4096, 0), ("get", None, size, 0), ("set", FP | SSE, 4096, 0),
        ("set", leaf_d0(entries) | 1 << 62, 4096, -22), ("set", FP | XTILEDATA, 4096, -22), ("get", None, 4096, -14)]
    assert kp[0].xstate_bv == xstate_bv(image)


def _xsetbv(value: int, index: int = 0, prefix: bytes = b"") -> bytes:
    return mov32("ecx", index) + mov32("eax", value & 0xFFFFFFFF) + mov32("edx", value >> 32) + prefix + XSETBV + HLT


def _wrmsr(msr: int, value: int, prefix: bytes = b"") -> bytes:
    return mov32("ecx", msr) + mov32("eax", value & 0xFFFFFFFF) + mov32("edx", value >> 32) + prefix + WRMSR + HLT


def test_kvm_run_fpu_load_and_guest_writes(both, kvm, fep):
    vm = kvm()
    v0, v1 = vm.create_vcpu(0), vm.create_vcpu(1)
    entries = vm.supported_cpuid()
    for v in (v0, v1):
        assert vm.set_cpuid(v, entries) == 0
    supported = leaf_d0(entries)
    b = both()
    for _ in range(3):
        for v in (v0, v1):
            assert vm.guest(v, HLT) == (KVM_EXIT_HLT, Vm.CODE + 1)
    # Guest XSETBV, emulated by KVM (see `fep`): accepted, refused (#GP), another XCR (#GP, no XCR0 write).
    cases = [(FP | SSE | YMM, True), (XTILE | FP | SSE | YMM, False), (FP | YMM, False), (XTILECFG | FP, False),
             (supported, True), (FP | SSE, True)]
    for value, ok in cases:
        code = _xsetbv(value, prefix=fep)
        assert vm.guest(v0, code, cr4=CR4_OSXSAVE) == (KVM_EXIT_HLT, Vm.CODE + len(code) if ok else Vm.GP_HANDLER + 1)
    assert vm.guest(v0, _xsetbv(FP | SSE, index=1, prefix=fep), cr4=CR4_OSXSAVE) == (KVM_EXIT_HLT, Vm.GP_HANDLER + 1)
    # Guest WRMSR (intercepted): XFD/XFD_ERR need XFD in the guest's CPUID, which this CPU lacks: #GP.
    for msr, value in ((MSR_IA32_XFD, XTILEDATA), (MSR_IA32_XFD, 0), (MSR_IA32_XFD_ERR, 0)):
        assert vm.guest(v1, _wrmsr(msr, value)) == (KVM_EXIT_HLT, Vm.GP_HANDLER + 1)
    assert vm.guest(v1, _wrmsr(MSR_IA32_SYSENTER_CS, 0x10))[0] == KVM_EXIT_HLT  # not reported
    tp, kp = b.same(11)
    loads = [e for e in kp if isinstance(e, FpuLoad)]
    assert [e.vcpu for e in loads] == [0, 1]  # once per vCPU: on change only
    xcr0 = [(e.value, e.source, e.ret) for e in kp if isinstance(e, Xcr0)]
    assert xcr0 == [(value, "guest", 0 if ok else 1) for value, ok in cases]
    assert [(type(e), e.value, e.source, e.ret) for e in kp if isinstance(e, (Xfd, XfdErr))] == [
        (Xfd, XTILEDATA, "guest", 1), (Xfd, 0, "guest", 1), (XfdErr, 0, "guest", 1)]


def test_child_vmm_exit(both, backends):
    """A child VMM: its vcpu_create and exit. Its VM freed while it exits is
    covered by the exit: no vcpu_destroy after it."""
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        from agent.kvmctl import Vm
        vm = Vm()
        assert vm.create_vcpu(0) >= 0 and vm.create_vcpu(1) >= 0
        print("ready", flush=True)
        if sys.stdin.readline().strip() == "close":
            vm.close()
            print("closed", flush=True)
            sys.stdin.readline()
    """) % ROOT
    for how in ("exit", "close"):
        b = both()
        p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for c in backends.values():
            c.follow(p.pid)
        assert p.stdout.readline().strip() == "ready"
        p.stdin.write(how + "\n")
        p.stdin.flush()
        if how == "close":
            assert p.stdout.readline().strip() == "closed"
            p.stdin.write("\n")
            p.stdin.flush()
        assert p.wait(60) == 0
        for name, c in backends.items():
            c.of(p.pid, b.marks[name], 3, timeout=10)
        time.sleep(0.2)
        tp = [e for e in b.events("tp") if e.tgid == p.pid]
        kp = [e for e in b.events("kp") if e.tgid == p.pid]
        assert _norm([e for e in kp if not _kprobe_only(e)]) == _norm(tp)
        assert [e.kind for e in tp] == ["vcpu_create", "vcpu_create", "exit"]
        if how == "exit":
            assert [e.kind for e in kp] == ["vcpu_create", "vcpu_create", "exit"]
        else:
            assert [(e.kind, getattr(e, "vcpu", None)) for e in kp] == [
                ("vcpu_create", 0), ("vcpu_create", 1), ("vcpu_destroy", 0), ("vcpu_destroy", 1), ("exit", None)]
            assert len({e.vm for e in kp if e.kind != "exit"}) == 1


# ---- what only kprobes see --------------------------------------------------------------------------

def test_guest_buffer_growth_at_set_cpuid2(both, kvm):
    """KVM_SET_CPUID2 exposing AMX (CPUID.0xD.0 bit 18) makes KVM grow the
    guest buffer (__xfd_enable_feature): without guest permission, which
    no process can get on a CPU without AMX, it is refused with -EPERM."""
    vm = kvm()
    v = vm.create_vcpu(0)
    entries = vm.supported_cpuid()
    for e in entries:
        if e.function == 0xD and e.index == 0:
            e.eax |= XTILE
    _, perm = arch_prctl_get(ARCH_GET_XCOMP_GUEST_PERM)
    assert not perm & XTILEDATA
    b = both()
    assert vm.set_cpuid(v, entries) == -errno.EPERM
    without = vm.supported_cpuid()  # no dynamic feature: KVM allocates nothing, no fpstate
    assert vm.set_cpuid(v, without) == 0
    tp, kp = b.same(2)
    assert [type(e) for e in kp] == [Fpstate, Cpuid, Cpuid]
    f, c = kp[0], kp[1]
    assert (f.guest, f.features, f.ret, f.size, f.vm, f.vcpu) == (True, XTILEDATA, -errno.EPERM, None, c.vm, 0)
    assert c.ret == -errno.EPERM and c.xcr0_supported & XTILE == XTILE


def test_fpu_load_snapshot_matches_what_kvm_reports(both, kvm):
    vm = kvm()
    v = vm.create_vcpu(0)
    entries = vm.supported_cpuid()
    assert vm.set_cpuid(v, entries) == 0
    b = both()
    assert vm.guest(v, HLT) == (KVM_EXIT_HLT, Vm.CODE + 1)
    tp, kp = b.same(1)
    (e,) = [e for e in kp if isinstance(e, FpuLoad)]
    _, supp = arch_prctl_get(ARCH_GET_XCOMP_SUPP)
    kvm_xcr0 = leaf_d0(entries)
    assert e.guest_features == supp & ~XTILEDATA | kvm_xcr0 & XTILEDATA
    assert e.guest_size == xstate_standard_size(entries, e.guest_features)
    if e.guest_features == kvm_xcr0:
        assert e.guest_size == leaf(entries, 0xD, 0).ebx
        assert vm.check_extension(KVM_CAP_XSAVE2) == max(e.guest_size, 4096)
    assert e.xfd == 0
    ret, perm = arch_prctl_get(ARCH_GET_XCOMP_GUEST_PERM)
    assert ret == 0 and e.guest_perm & supp == perm and not e.guest_perm & PERM_LOCKED
    (raw,) = [r for ev, r in b.raws("kp") if isinstance(ev, FpuLoad)]
    assert raw.check3 & PERM_LOCKED  # the kernel's lock flag, set at KVM_CREATE_VCPU, read through BTF


def test_vcpu_destroy_on_close(both, kvm):
    vm = kvm()
    vm.create_vcpu(2)
    vm.create_vcpu(5)
    b = both()
    vm.close()
    tp, kp = b.events("tp"), b.events("kp")
    for _ in range(100):
        if len(kp) >= 2:
            break
        time.sleep(0.02)
        kp = b.events("kp")
    assert tp == []
    assert [(type(e), e.vcpu) for e in kp] == [(VcpuDestroy, 2), (VcpuDestroy, 5)]


def test_passthrough_attached_but_never_on_without_xfd(backends):
    st = _status(backends, "passthrough")
    assert st.attached and st.hooks == ("kretprobe:svm_set_msr", "kprobe:svm_set_msr")
    assert backends["kp"].backend.counts["passthrough"] == 0


def test_all_events_valid_nothing_lost(backends):
    for name, c in backends.items():
        assert c.invalid == [], (name, c.invalid[:3])
        assert c.backend.decode_errors == 0, (name, c.backend.last_decode_error)
        assert c.backend.lost() == 0, name


def test_timings(backends):
    t = backends["kp"].backend.timings
    print(f"kprobe backend: BTF {t.btf_s:.2f} s, kallsyms {t.kallsyms_s:.2f} s, compile {t.compile_s:.2f} s, "
          f"load+attach {t.attach_s:.2f} s")
    assert t.attach_s < 60


def test_release_hands_sources_back(both, backends, kvm):
    """Last: release() of kvm_ioctl stops the host ioctl records of the kprobe
    backend (and of what is built on it), while guest_msr still reports."""
    kp = backends["kp"].backend
    done = kp.release(["kvm_ioctl"])
    assert {"kvm_ioctl", "kvm_msrs", "kvm_xsave", "fpu_load", "guest_xcr0", "passthrough"} == set(done)
    vm = kvm()
    b = both()
    v = vm.create_vcpu(0)
    assert vm.set_cpuid(v, vm.supported_cpuid()) == 0
    assert Vm.set_msrs(v, [(MSR_IA32_XFD, 0)]) == 1
    assert vm.guest(v, _wrmsr(MSR_IA32_XFD, 0)) == (KVM_EXIT_HLT, Vm.GP_HANDLER + 1)
    time.sleep(0.1)
    tp, kpe = b.events("tp"), b.events("kp")
    assert [e.kind for e in tp] == ["vcpu_create", "cpuid", "xfd", "fpu_load", "xfd"]
    assert [(e.kind, e.source) for e in kpe] == [("xfd", "guest")]
    vm.close()  # vcpu_destroy stands alone: still reported
    time.sleep(0.1)
    assert [(e.kind, e.vcpu) for e in b.events("kp")[1:]] == [("vcpu_destroy", 0)]


# ---- the live agent with --backend auto --------------------------------------------------------------

AGENT = os.path.join(ROOT, ".venv", "bin", "xstate-agent")


def test_doctor_auto_serves_every_source_with_kprobes(backends):
    """`xstate-agent doctor --strict`: kprobes first, and here they serve every source; the
    VMX-only #NM save does not apply on this (emulated AMD) host, which fails nothing."""
    r = subprocess.run([AGENT, "doctor", "--strict", "--format", "json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(r.stdout)
    served = {s["source"]: (s["backend"], s["applicable"]) for s in d["sources"]}
    assert served.pop("xfd_nm") == (None, False)
    assert set(served.values()) == {("kprobe", True)}, served
    assert d["strict_ok"] and d["failed_probes"] == [] and d["blind_kinds"] == []


def test_run_auto_passes_the_selftest(backends, tmp_path):
    """The operator's check after deploying, on the kprobe backend: `run` (auto), then `selftest`
    (arch_prctl calls, a VM through KVM ioctls, valid and refused XCR0 writes, an XFD write, a hlt
    run, a child process) against its events log. (The guest has no network, loopback included:
    no metrics.)"""
    log = tmp_path / "events.jsonl"
    agent = subprocess.Popen([AGENT, "run", "--listen", "none", "--events-log", str(log)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        err = []
        while time.monotonic() < deadline:
            line = agent.stderr.readline()
            assert line, "".join(err)
            err.append(line)
            if "ready: " in line:
                break
        ready = err[-1]
        assert "kprobe: " in ready and "tracepoint: " not in ready, "".join(err)
        r = subprocess.run([AGENT, "selftest", "--events-log", str(log), "--timeout", "30"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        agent.send_signal(2)
        agent.wait(timeout=120)
    assert agent.returncode == 0
