"""A model of a correct upstream (Linux 5.17+) KVM host, emitting the events the agent would record.

Used by tests/test_properties.py. The model follows reference/kernel-notes.md
§5 ("final upstream design") on a Sapphire Rapids host (XCR0 0x602e7):

- a VMM process asks ARCH_REQ_XCOMP_GUEST_PERM(18) *before* its first
  KVM_CREATE_VCPU, which locks the guest permission for good (only an
  exec resets it); GET_* calls report masks that only grow;
- KVM_SET_CPUID2 exposes AMX only when permitted, and then (and only then)
  grows the guest FPU buffer (an `fpstate` guest event adding XTILEDATA);
- the guest writes valid XCR0 values within CPUID (#GP otherwise), XFD
  values within CPUID & DYN; the first accepted non-zero XFD write (guest
  WRMSR or host KVM_SET_MSRS) drops XFD write interception for good, after
  which guest XFD writes are no longer seen (the model still tracks the
  real value); a `passthrough` event may follow;
- #NM saves XFD_ERR only while interception is off (#NM is trapped only
  then) and only for a bit that XCR0 enables and XFD arms;
- `fpu_load` carries the real buffer features, XFD and guest permission;
- KVM_GET_XSAVE(2) images carry only state the guest CPUID allows and, as
  on kernels with commit b45f72177594, nothing that XFD disarms; images
  loaded with KVM_SET_XSAVE are ones taken that way;
- operations a correct VMM or guest may get refused are refused with
  realistic results (guest #GP = 1, -EINVAL, -EOPNOTSUPP, -E2BIG, ...);
- processes fork (the child inherits both permissions and the guest lock,
  unseen by the agent), exec (permissions reset) and exit (the VM files
  may be closed, and vcpu_destroy reported, after the exit event); pids
  are reused; VMs are saved and restored into new VMs; a VMM may load an
  older XSAVE image while the guest's XFD is unknown to the agent (what
  amx_test's RESTORE_TILEDATA does).

Besides the real state, the model keeps what the *agent* can know from the
events it emitted (spec/policy.md: exact permission masks, the masks GET/REQ
calls showed granted, whether the vCPU's XFD is visible). The injection
tests use it to pick places where a single bad event is judgeable.

It is driven by any `random.Random`, so a stream is reproducible from a seed:

    host = Host(random.Random(7)); host.run(200); host.events
"""

from __future__ import annotations

import random

from agent.events.model import (
    Cpuid, Event, Exec, Exit, FpuLoad, Fpstate, Passthrough, Perm, VcpuCreate, VcpuDestroy,
    Xcr0, Xfd, XfdErr, Xsave,
)
from agent.xstate import AVX512, FP, SSE, XTILE, XTILECFG, XTILEDATA, YMM, request_mask

PKRU = 1 << 9
DYN = XTILEDATA
# What KVM supports on the host (kvm_caps.supported_xcr0) and ARCH_GET_XCOMP_SUPP reports.
HOST_XCR0 = FP | SSE | YMM | AVX512 | PKRU | XTILE  # 0x602e7
# The default permission (fpu_kernel_cfg.default_features = max & ~USER_DYNAMIC), as GET_* reports it:
# XTILECFG is in it, XTILEDATA is not.
DEFAULT_PERM = HOST_XCR0 & ~XTILEDATA  # 0x202e7
AMX_PERM = HOST_XCR0  # 0x602e7
# Features and sizes of the guest FPU buffer before and after KVM_SET_CPUID2 grows it for AMX
# (uABI, non-compacted sizes: the XTILEDATA component is 8192 bytes at offset 2816).
DEFAULT_BUF = DEFAULT_PERM
DEFAULT_SIZE = 2816
AMX_SIZE = 11008
KVM_XSAVE_SIZE = 4096  # sizeof(struct kvm_xsave), what legacy KVM_GET_XSAVE uses
# CPUID.0xD.0 masks VMMs set for CPU models without AMX.
LEGACY_MODELS = (0x2E7, 0x207, 0x7, 0x3)
# XSAVE state components as groups that XCR0 enables together (SDM rules).
GROUPS = (SSE, SSE | YMM, SSE | YMM | AVX512, PKRU, XTILE)
BNDREGS_BNDCSR = 0x18  # MPX: valid as a pair, never supported on this host
APX = 1 << 19  # not supported on this host

HOST, GUEST = "host", "guest"
FAMILY = {"GET_XCOMP_PERM": HOST, "REQ_XCOMP_PERM": HOST,
          "GET_XCOMP_GUEST_PERM": GUEST, "REQ_XCOMP_GUEST_PERM": GUEST}

EPERM, E2BIG, ENOMEM, EFAULT, EBUSY, EEXIST, EINVAL, ENOSPC, EOPNOTSUPP = -1, -7, -12, -14, -16, -17, -22, -28, -95
GP = 1  # a guest instruction that took #GP instead

COMMS = ("qemu-system-x86", "cloud-hypervisor", "firecracker", "crosvm", "amx_test")


class VCpuM:
    """One vCPU: the real state, plus what the agent can know of it."""

    def __init__(self, proc: ProcM, vm: VmM, index: int):
        self.proc, self.vm, self.index = proc, vm, index
        self.supported: int | None = None  # CPUID.0xD.0 as set by an accepted KVM_SET_CPUID2
        self.guest_features = DEFAULT_BUF
        self.xcr0 = FP
        self.xfd = 0
        self.xfd_err = 0
        self.inuse = 0  # components the guest has touched (XINUSE)
        self.passthrough = False  # XFD write interception dropped
        self.pt_reported = False  # a `passthrough` event was emitted
        self.ran = False
        self.running = False  # inside KVM_RUN (after its fpu_load, until exit to userspace)
        self.xfd_visible = True  # the agent knows the real XFD (spec: "known"/"unknown")
        self.snapshot: int | None = None  # XSTATE_BV of the last image the VMM read

    @property
    def xfd_allowed(self) -> int:
        """kvm_guest_supported_xfd(): CPUID & DYN (0 before KVM_SET_CPUID2)."""
        return (self.supported or 0) & DYN

    @property
    def uabi_size(self) -> int:
        return AMX_SIZE if self.guest_features & XTILEDATA else KVM_XSAVE_SIZE

    def key(self) -> dict:
        return {"tgid": self.proc.tgid, "vm": self.vm.name, "vcpu": self.index}


class VmM:
    def __init__(self, proc: ProcM, name: str):
        self.proc, self.name = proc, name
        self.vcpus: list[VCpuM] = []


class ProcM:
    """A VMM process (tgid)."""

    def __init__(self, tgid: int, comm: str, wants_amx: bool):
        self.tgid, self.comm, self.wants_amx = tgid, comm, wants_amx
        self.reset()
        # The agent has seen nothing of this process yet.
        self.exact = False

    def reset(self):
        """A new process or one after exec(): default permissions, no VMs."""
        self.guest_perm = DEFAULT_PERM
        self.host_perm = DEFAULT_PERM
        self.locked = False  # FPU_GUEST_PERM_LOCKED: a vCPU was created
        self.vms: list[VmM] = []
        self.host_amx_buffer = False
        # What the agent knows (spec/policy.md "Terms").
        self.exact = True  # exec: "masks are exact and hold no dynamic feature"
        self.granted = {HOST: 0, GUEST: 0}  # bits GET/REQ calls showed granted (XS016)
        self.vcpu_seen = False  # the agent knows a vCPU was created (XS012/XS013)

    def vcpus(self):
        return [c for vm in self.vms for c in vm.vcpus]


def valid_xcr0(rng: random.Random, supported: int) -> int:
    """A random XCR0 that XSETBV accepts with this CPUID: FP plus whole groups within it."""
    if rng.random() < 0.5:
        return supported | FP  # what a Linux guest does: everything CPUID offers
    value = FP
    for group in GROUPS:
        if group & ~supported == 0 and rng.random() < 0.7:
            value |= group
    return value


def invalid_xcr0(rng: random.Random, supported: int) -> int:
    """A value XSETBV refuses: a partial group, FP clear, or bits outside CPUID."""
    value = valid_xcr0(rng, supported)
    choices = [value & ~FP or SSE, value | BNDREGS_BNDCSR, FP | YMM]
    if supported & XTILE == XTILE:
        choices.append((value & ~XTILE) | XTILECFG)
    else:
        choices.append(value | XTILE)
    if supported & AVX512:
        choices.append((value & ~AVX512) | SSE | YMM | (1 << 5))
    return rng.choice(choices)


class Host:
    """The host: processes, VMs and vCPUs, and the stream of events they produce."""

    def __init__(self, rng: random.Random, *, max_procs: int = 3, amx_share: float = 0.7, first_tgid: int = 1000):
        self.rng = rng
        self.max_procs = max_procs
        self.amx_share = amx_share
        self.events: list[Event] = []
        self.ts = rng.randrange(10**9, 10**12)
        self.procs: list[ProcM] = []
        self.dead_tgids: list[int] = []
        self.next_tgid = first_tgid
        self.next_vm = 1
        # Called before every action with the host (tests look for injection points there).
        self.on_gap = None

    # ---- plumbing

    def emit(self, cls, **fields) -> Event:
        self.ts += self.rng.randrange(1, 20_000)
        ev = cls(v=1, ts=self.ts, **fields)
        self.events.append(ev)
        return ev

    def vcpus(self, pred=lambda c: True) -> list[VCpuM]:
        return [c for p in self.procs for c in p.vcpus() if pred(c)]

    def _pick(self, items):
        return self.rng.choice(items) if items else None

    # ---- processes and permissions

    def spawn(self, wants_amx: bool | None = None, tgid: int | None = None, fork: bool | None = None) -> ProcM | None:
        if len(self.procs) >= self.max_procs and tgid is None:
            return None
        rng = self.rng
        if tgid is None:
            if self.dead_tgids and rng.random() < 0.3:
                tgid = self.dead_tgids.pop(rng.randrange(len(self.dead_tgids)))  # pid reuse
            else:
                tgid = self.next_tgid
                self.next_tgid += rng.randrange(1, 500)
        if wants_amx is None:
            wants_amx = rng.random() < self.amx_share
        p = ProcM(tgid, rng.choice(COMMS), wants_amx)
        p.exact = False  # the agent did not see it start
        parents = [q for q in self.procs if q.tgid != tgid]
        if parents and fork is not False and (fork or rng.random() < 0.2):
            # fork(): fpu_inherit_perms() copies both permissions, the guest lock bit included.
            parent = rng.choice(parents)
            p.guest_perm, p.host_perm, p.locked = parent.guest_perm, parent.host_perm, parent.locked
            p.wants_amx = bool(p.guest_perm & XTILEDATA) or not p.locked and wants_amx
        self.procs.append(p)
        return p

    def perm(self, p: ProcM, option: str, feature=None):
        """One arch_prctl call, with the kernel's answer."""
        fam = FAMILY.get(option)
        mask = ret = None
        if option == "GET_XCOMP_SUPP":
            mask, ret = HOST_XCR0, 0
        elif option == "GET_XCOMP_PERM":
            mask, ret = p.host_perm, 0
        elif option == "GET_XCOMP_GUEST_PERM":
            mask, ret = p.guest_perm, 0
            p.exact = True
        else:
            guest = option == "REQ_XCOMP_GUEST_PERM"
            have = p.guest_perm if guest else p.host_perm
            if feature >= 19:
                ret = EINVAL  # idx >= XFEATURE_MAX
            elif feature != 18:
                ret = EOPNOTSUPP  # xstate_prctl_req[idx] == 0: only XTILEDATA can be requested
            elif have & XTILEDATA:
                ret = 0  # already permitted: no change, even when locked
            elif guest and p.locked:
                raise AssertionError("a correct VMM never asks for guest permission after KVM_CREATE_VCPU")
            elif not guest and self.rng.random() < 0.1:
                ret = ENOSPC  # a sigaltstack too small for the AMX signal frame
            else:
                ret = 0
                if guest:
                    p.guest_perm |= XTILEDATA
                else:
                    p.host_perm |= XTILEDATA
            if ret == 0:
                p.granted[fam] |= request_mask(feature)
        if mask is not None and fam is not None:
            p.granted[fam] |= mask
        self.emit(Perm, tgid=p.tgid, comm=p.comm, option=option, feature=feature, mask=mask, ret=ret)

    def act_perm(self) -> bool:
        p = self._pick(self.procs)
        if p is None:
            return False
        rng = self.rng
        options = ["GET_XCOMP_SUPP", "GET_XCOMP_PERM", "GET_XCOMP_GUEST_PERM", "REQ_XCOMP_PERM"]
        if not p.locked or p.guest_perm & XTILEDATA:
            options.append("REQ_XCOMP_GUEST_PERM")
        option = rng.choice(options)
        feature = None
        if option.startswith("REQ"):
            feature = 18
            if not (option == "REQ_XCOMP_GUEST_PERM" and p.locked) and rng.random() < 0.2:
                feature = rng.choice((17, 0, 19, 40, 63))  # refused: not a dynamic feature, or no such feature
            if option == "REQ_XCOMP_GUEST_PERM" and feature == 18 and not p.locked and not p.wants_amx:
                p.wants_amx = True
        self.perm(p, option, feature)
        return True

    def request_amx(self, p: ProcM):
        """What QEMU's kvm_request_xsave_components() does: REQ 18, and maybe GET to check it."""
        self.perm(p, "REQ_XCOMP_GUEST_PERM", 18)
        if self.rng.random() < 0.6:
            self.perm(p, "GET_XCOMP_GUEST_PERM")

    def act_host_amx(self) -> bool:
        """The VMM's own thread uses AMX: the host buffer grows on its first #NM (host permission needed)."""
        ps = [p for p in self.procs if p.host_perm & XTILEDATA and not p.host_amx_buffer]
        p = self._pick(ps)
        if p is None:
            return False
        ok = self.rng.random() < 0.9
        self.emit(Fpstate, tgid=p.tgid, guest=False, features=XTILEDATA, size=AMX_SIZE, ret=0 if ok else ENOMEM)
        p.host_amx_buffer = ok
        return True

    def exec_(self, p: ProcM):
        self.emit(Exec, tgid=p.tgid, comm=p.comm)
        p.reset()
        p.wants_amx = self.rng.random() < self.amx_share

    def act_exec(self) -> bool:
        ps = [p for p in self.procs if not any(c.running for c in p.vcpus())]
        p = self._pick(ps)
        if p is None:
            return False
        if self.rng.random() < 0.5:
            for vm in list(p.vms):
                self.destroy_vm(vm)
        self.exec_(p)
        return True

    def act_exit(self) -> bool:
        ps = [p for p in self.procs if not any(c.running for c in p.vcpus())]
        p = self._pick(ps)
        if p is None:
            return False
        when = self.rng.choice(("before", "after", "never"))
        if when == "before":
            for vm in list(p.vms):
                self.destroy_vm(vm)
        # sched_process_exit fires before exit_files(): the VM files may be closed after it.
        self.emit(Exit, tgid=p.tgid)
        if when == "after":
            for vm in list(p.vms):
                self.destroy_vm(vm)
        self.procs.remove(p)
        self.dead_tgids.append(p.tgid)
        return True

    # ---- VMs and vCPUs

    def create_vm(self, p: ProcM) -> VmM:
        vm = VmM(p, f"vm-{self.next_vm}")
        self.next_vm += 1
        p.vms.append(vm)
        return vm

    def create_vcpu(self, vm: VmM) -> VCpuM:
        p = vm.proc
        if not p.locked and p.wants_amx and not p.guest_perm & XTILEDATA:
            self.request_amx(p)  # permission first, before the first vCPU
        c = VCpuM(p, vm, len(vm.vcpus))
        self.emit(VcpuCreate, **c.key(), ret=0)
        vm.vcpus.append(c)
        p.locked = True
        p.vcpu_seen = True
        return c

    def act_create_vcpu(self) -> bool:
        rng = self.rng
        p = self._pick(self.procs)
        if p is None:
            return False
        vms = [vm for vm in p.vms if len(vm.vcpus) < 4]
        if not vms or rng.random() < 0.2:
            if len(p.vms) >= 2:
                return False
            vms = [self.create_vm(p)]
        vm = rng.choice(vms)
        if vm.vcpus and rng.random() < 0.1:
            # KVM_CREATE_VCPU with an id that exists: -EEXIST (the permission is locked already).
            self.emit(VcpuCreate, tgid=p.tgid, vm=vm.name, vcpu=rng.randrange(len(vm.vcpus)), ret=EEXIST)
            return True
        self.create_vcpu(vm)
        return True

    def destroy_vm(self, vm: VmM):
        for c in vm.vcpus:
            assert not c.running
            self.emit(VcpuDestroy, **c.key())
        vm.proc.vms.remove(vm)

    def act_destroy_vm(self) -> bool:
        vms = [vm for p in self.procs for vm in p.vms if not any(c.running for c in vm.vcpus)]
        vm = self._pick(vms)
        if vm is None:
            return False
        self.destroy_vm(vm)
        return True

    def set_cpuid(self, c: VCpuM, mask: int | None = None):
        """KVM_SET_CPUID2; with AMX the kernel grows the guest buffer (kvm_check_cpuid)."""
        rng = self.rng
        if mask is None:
            mask = rng.choice(LEGACY_MODELS) if rng.random() < 0.3 else DEFAULT_PERM & ~XTILE
            if c.proc.guest_perm & XTILEDATA and (c.proc.wants_amx or rng.random() < 0.3):
                mask |= XTILE
        if c.ran:
            # After KVM_RUN only an identical CPUID is accepted.
            ret = 0 if mask == c.supported else EINVAL
            self.emit(Cpuid, **c.key(), xcr0_supported=mask, ret=ret)
            return
        grow = mask & XTILEDATA and not c.guest_features & XTILEDATA
        if grow and rng.random() < 0.5:
            # fpstate_realloc() runs inside the ioctl, before it returns.
            self._grow(c)
        self.emit(Cpuid, **c.key(), xcr0_supported=mask, ret=0)
        if grow and not c.guest_features & XTILEDATA:
            self._grow(c)
        c.supported = mask

    def _grow(self, c: VCpuM):
        self.emit(Fpstate, **c.key(), guest=True, features=XTILEDATA, size=AMX_SIZE, ret=0)
        c.guest_features |= XTILEDATA

    def act_cpuid(self) -> bool:
        rng = self.rng
        cs = self.vcpus(lambda c: not c.running and (c.supported is None or rng.random() < 0.2))
        c = self._pick(cs)
        if c is None:
            return False
        if c.supported is not None and c.ran and rng.random() < 0.5:
            self.set_cpuid(c, c.supported)
        elif rng.random() < 0.08:
            # Refused before anything is checked (too many entries): counted, not judged.
            mask = c.supported if c.supported is not None else DEFAULT_PERM & ~XTILE
            self.emit(Cpuid, **c.key(), xcr0_supported=mask, ret=E2BIG)
        else:
            self.set_cpuid(c)
        return True

    # ---- KVM_RUN and what the guest does meanwhile

    def run_start(self, c: VCpuM):
        fields = {}
        if self.rng.random() < 0.5:
            fields["guest_size"] = AMX_SIZE if c.guest_features & XTILEDATA else DEFAULT_SIZE
        if self.rng.random() < 0.4:
            fields["guest_perm"] = c.proc.guest_perm
            c.proc.exact = True
        self.emit(FpuLoad, **c.key(), guest_features=c.guest_features, xfd=c.xfd, **fields)
        c.running = c.ran = True
        if c.passthrough:
            c.xfd_visible = False

    def act_run_start(self) -> bool:
        c = self._pick(self.vcpus(lambda c: not c.running and c.supported is not None))
        if c is None:
            return False
        self.run_start(c)
        # A burst of guest work right away (other vCPUs interleave with it later).
        guest = (self.act_xsetbv, self.act_wrmsr_xfd, self.act_use_state, self.act_amx_task, self.act_wrmsr_xfd_err)
        for _ in range(self.rng.choice((0, 1, 2, 3, 4))):
            self.rng.choice(guest)(c)
        return True

    def act_run_stop(self) -> bool:
        c = self._pick(self.vcpus(lambda c: c.running))
        if c is None:
            return False
        c.running = False
        return True

    def guest_xsetbv(self, c: VCpuM, value: int):
        ok = value & FP and not value & ~(c.supported | FP) and _well_formed(value)
        self.emit(Xcr0, **c.key(), value=value, source=GUEST, ret=0 if ok else GP)
        if ok:
            c.xcr0 = value

    def act_xsetbv(self, c: VCpuM | None = None) -> bool:
        c = c or self._pick(self.vcpus(lambda c: c.running))
        if c is None:
            return False
        rng = self.rng
        if rng.random() < 0.15:
            value = invalid_xcr0(rng, c.supported)
        else:
            value = valid_xcr0(rng, c.supported)
        self.guest_xsetbv(c, value)
        return True

    def guest_wrmsr_xfd(self, c: VCpuM, value: int):
        ok = bool(c.xfd_allowed) and not value & ~c.xfd_allowed  # no XFD in CPUID without AMX: #GP
        if c.passthrough:
            if ok and self.rng.random() < 0.05:
                # Emulated (e.g. by the instruction emulator), so seen after all.
                self.emit(Xfd, **c.key(), value=value, source=GUEST, ret=0)
            # Not intercepted: the agent cannot see it; the CPU itself faults on unsupported bits.
            if ok:
                self._set_xfd(c, value)
            return
        self.emit(Xfd, **c.key(), value=value, source=GUEST, ret=0 if ok else GP)
        if ok:
            self._set_xfd(c, value)
            if value:
                self._passthrough_on(c)

    @staticmethod
    def _set_xfd(c: VCpuM, value: int):
        c.xfd = value
        # State that XFD disarms is dropped when it is next saved (XSTATE_BV[i] = 0 while XFD[i] = 1).
        c.inuse &= ~value

    def _passthrough_on(self, c: VCpuM):
        """vmx_set_msr(): the first accepted non-zero XFD write drops write interception, for good."""
        c.passthrough = True
        if c.running:
            c.xfd_visible = False
        if self.rng.random() < 0.5:
            self.emit(Passthrough, **c.key(), enabled=True)
            c.pt_reported = True

    def act_wrmsr_xfd(self, c: VCpuM | None = None) -> bool:
        c = c or self._pick(self.vcpus(lambda c: c.running))
        if c is None:
            return False
        rng = self.rng
        if rng.random() < 0.1:
            value = rng.choice((XTILECFG, APX, XTILEDATA | XTILECFG))
        else:
            value = rng.choice((0, XTILEDATA))
        self.guest_wrmsr_xfd(c, value)
        return True

    def act_passthrough_event(self) -> bool:
        """A (late or repeated) report that XFD interception is off, e.g. 7.2's vmx_recalc_msr_intercepts."""
        c = self._pick(self.vcpus(lambda c: c.passthrough and (not c.pt_reported or self.rng.random() < 0.2)))
        if c is None:
            return False
        self.emit(Passthrough, **c.key(), enabled=True)
        c.pt_reported = True
        return True

    def act_use_state(self, c: VCpuM | None = None) -> bool:
        """The guest executes instructions: touches enabled components; AMX with XFD armed takes #NM."""
        c = c or self._pick(self.vcpus(lambda c: c.running))
        if c is None:
            return False
        rng = self.rng
        enabled = c.xcr0 | SSE  # SSE works with CR4.OSFXSR whatever XCR0 says
        touched = enabled & rng.choice((FP | SSE, FP | SSE | YMM, HOST_XCR0, XTILE, XTILE, XTILECFG))
        if touched & XTILEDATA and c.xfd & XTILEDATA:
            # XFD-armed tile use: #NM. It is trapped because interception is off (xfd != 0 means
            # a non-zero write happened), and handle_nm_fault_irqoff() saves XFD_ERR.
            assert c.passthrough
            self.emit(XfdErr, **c.key(), value=XTILEDATA, source="nm", ret=0)
            c.xfd_err = XTILEDATA
            touched &= ~XTILEDATA
        elif c.xfd and rng.random() < 0.05:
            # A #NM from CR0.TS while XFD is non-zero: before 6.15 KVM still saves the hardware
            # XFD_ERR, which is 0 then (known-bugs.md 12; no rule judges it).
            self.emit(XfdErr, **c.key(), value=0, source="nm", ret=0)
            c.xfd_err = 0
        elif rng.random() < 0.1:
            c.inuse &= ~XTILE  # TILERELEASE
            touched &= ~XTILE
        c.inuse |= touched & ~c.xfd
        return True

    def act_amx_task(self, c: VCpuM | None = None) -> bool:
        """A Linux guest switching to a task that uses AMX: XFD off, tiles used, maybe XFD back on."""
        c = c or self._pick(self.vcpus(lambda c: c.running and c.xcr0 & XTILEDATA))
        if c is None or not c.xcr0 & XTILEDATA:
            return False
        self.guest_wrmsr_xfd(c, 0)
        c.inuse |= XTILE
        if self.rng.random() < 0.5:
            self.guest_wrmsr_xfd(c, XTILEDATA)
        return True

    def act_wrmsr_xfd_err(self, c: VCpuM | None = None) -> bool:
        c = c or self._pick(self.vcpus(lambda c: c.running))
        if c is None:
            return False
        value = 0 if self.rng.random() < 0.8 else XTILEDATA
        ok = bool(c.xfd_allowed) and not value & ~c.xfd_allowed
        self.emit(XfdErr, **c.key(), value=value, source=GUEST, ret=0 if ok else GP)
        if ok:
            c.xfd_err = value
        return True

    # ---- host ioctls on a stopped vCPU

    def host_xfd(self, c: VCpuM, value: int):
        ok = not value & ~c.xfd_allowed
        self.emit(Xfd, **c.key(), value=value, source=HOST, ret=0 if ok else EINVAL)
        if ok:
            self._set_xfd(c, value)
            c.xfd_visible = True
            if value:
                self._passthrough_on(c)

    def host_xfd_err(self, c: VCpuM, value: int):
        ok = not value & ~c.xfd_allowed
        self.emit(XfdErr, **c.key(), value=value, source=HOST, ret=0 if ok else EINVAL)
        if ok:
            c.xfd_err = value

    def host_xcr0(self, c: VCpuM, value: int):
        ok = value & FP and not value & ~((c.supported or 0) | FP) and _well_formed(value)
        self.emit(Xcr0, **c.key(), value=value, source=HOST, ret=0 if ok else EINVAL)
        if ok:
            c.xcr0 = value

    def xsave_get(self, c: VCpuM, size: int | None = None) -> int:
        """KVM_GET_XSAVE2 (or legacy KVM_GET_XSAVE while the buffer fits 4 KiB): the image's XSTATE_BV."""
        if size is None:
            size = AMX_SIZE if c.uabi_size > KVM_XSAVE_SIZE or c.proc.guest_perm & XTILEDATA else KVM_XSAVE_SIZE
        bv = self.image_bv(c)
        if c.snapshot is None or bv & XTILEDATA or self.rng.random() < 0.3:
            c.snapshot = bv  # the VMM keeps some images (amx_test's tile_state)
        self.emit(Xsave, **c.key(), op="get", xstate_bv=bv, size=size, ret=0)
        return bv

    def image_bv(self, c: VCpuM) -> int:
        # Filtered to guest CPUID (commit 8647c52e9504), and with XFD-disarmed state cleared (b45f72177594).
        return c.inuse & ((c.supported or 0) | FP | SSE) & ~c.xfd

    def xsave_set(self, c: VCpuM, bv: int, size: int | None = None):
        assert not bv & c.xfd & DYN and not bv & ~HOST_XCR0
        self.emit(Xsave, **c.key(), op="set", xstate_bv=bv, size=size or max(c.uabi_size, KVM_XSAVE_SIZE), ret=0)
        c.inuse = bv

    def act_host_ioctl(self) -> bool:
        rng = self.rng
        c = self._pick(self.vcpus(lambda c: not c.running and c.supported is not None))
        if c is None:
            return False
        what = rng.choices(("xfd", "xfd_err", "xcr0", "get", "set", "snapshot", "fpu", "refused", "migrate"),
                           (3, 1, 1, 3, 1, 2, 1, 1, 1))[0]
        if what == "xfd":
            value = rng.choice((0, XTILEDATA, XTILEDATA)) if rng.random() < 0.9 else XTILECFG
            self.host_xfd(c, value)
        elif what == "xfd_err":
            self.host_xfd_err(c, rng.choice((0, 0, XTILEDATA)))
        elif what == "xcr0":
            self.host_xcr0(c, valid_xcr0(rng, c.supported) if rng.random() < 0.85 else invalid_xcr0(rng, c.supported))
        elif what == "get":
            self.xsave_get(c)
        elif what == "set":
            self.xsave_set(c, self.image_bv(c) & rng.choice((HOST_XCR0, HOST_XCR0, FP | SSE, ~XTILE)))
        elif what == "snapshot":
            self.restore_snapshot(c)
        elif what == "fpu":
            # Guest FPU loaded outside KVM_RUN (INIT, KVM_GET_MP_STATE in 6.1, XSTATE MSRs in 7.2).
            self.run_start(c)
            c.running = False
        elif what == "refused":
            # A bad buffer address (any size), or an image with a feature the host lacks.
            if rng.random() < 0.5:
                size = AMX_SIZE if c.guest_features & XTILEDATA else rng.choice((KVM_XSAVE_SIZE, AMX_SIZE))
                self.emit(Xsave, **c.key(), op="get", xstate_bv=0, size=size, ret=EFAULT)
            else:
                self.emit(Xsave, **c.key(), op="set", xstate_bv=self.image_bv(c) | APX,
                          size=max(c.uabi_size, KVM_XSAVE_SIZE), ret=EINVAL)
        elif not any(o.running for o in c.vm.vcpus):
            self.migrate(c.vm)
        else:
            self.xsave_get(c)
        return True

    def restore_snapshot(self, c: VCpuM):
        """KVM_SET_XSAVE of an image taken earlier (amx_test's RESTORE_TILEDATA does this).

        XFD may have changed since: the image can hold state that XFD now disarms, which
        kernels with b45f72177594 drop. A correct host does that only where the agent cannot
        know XFD (XS018 judges the case where it can): the point here is that an unknown XFD
        must not make XS018 fire.
        """
        bv = c.snapshot
        if bv is None or bv & c.xfd & DYN and c.xfd_visible:
            return
        self.emit(Xsave, **c.key(), op="set", xstate_bv=bv, size=max(c.uabi_size, KVM_XSAVE_SIZE), ret=0)
        c.inuse = bv & ~c.xfd

    def migrate(self, vm: VmM):
        """Save every vCPU, close the VM, restore into a new one (what amx_test does after each sync).

        Restore order as QEMU and the selftests: KVM_SET_CPUID2, KVM_SET_MSRS (XFD, XFD_ERR),
        KVM_SET_XCRS, KVM_SET_XSAVE.
        """
        p = vm.proc
        saved = []
        for c in vm.vcpus:
            assert not c.running
            saved.append((c, self.xsave_get(c)))
        self.destroy_vm(vm)
        new = self.create_vm(p)
        for old, bv in saved:
            c = self.create_vcpu(new)
            if old.supported is not None:
                self.set_cpuid(c, old.supported)
            self.host_xfd(c, old.xfd)
            self.host_xfd_err(c, old.xfd_err)
            self.host_xcr0(c, old.xcr0)
            self.xsave_set(c, bv)

    # ---- driver

    ACTIONS = (
        ("spawn", 2), ("perm", 3), ("create_vcpu", 4), ("cpuid", 4), ("run_start", 6), ("run_stop", 5),
        ("xsetbv", 3), ("wrmsr_xfd", 5), ("use_state", 5), ("amx_task", 3), ("wrmsr_xfd_err", 2), ("passthrough_event", 1),
        ("host_ioctl", 8), ("host_amx", 1), ("destroy_vm", 1), ("exec", 0.5), ("exit", 0.7),
    )

    def step(self):
        if self.on_gap is not None:
            self.on_gap(self)
        names = [a for a, _ in self.ACTIONS]
        weights = [w for _, w in self.ACTIONS]
        for _ in range(20):
            name = self.rng.choices(names, weights)[0]
            if name == "spawn":
                if self.spawn() is not None:
                    return
            elif getattr(self, "act_" + name)():
                return

    def run(self, steps: int) -> list[Event]:
        for _ in range(steps):
            self.step()
        return self.events

    # ---- fixtures: fixed setups, for when a random stream lacks the state an injection needs

    def fixture_no_amx(self) -> VCpuM:
        """A VMM that never asked for AMX, whose permission the agent knows exactly; its vCPU runs."""
        p = self.spawn(wants_amx=False, tgid=self.next_tgid, fork=False)
        self.next_tgid += 7
        self._gap()
        self.perm(p, "GET_XCOMP_GUEST_PERM")
        self._gap()
        c = self.create_vcpu(self.create_vm(p))
        self._gap()
        self.set_cpuid(c, DEFAULT_PERM & ~XTILE)
        self._gap()
        self.run_start(c)
        self._gap()
        self.guest_xsetbv(c, DEFAULT_PERM & ~XTILE)
        c.running = False
        self._gap()
        return c

    def fixture_amx(self) -> VCpuM:
        """An AMX VMM; its vCPU enables AMX in XCR0, then the host arms XFD (interception off)."""
        p = self.spawn(wants_amx=True, tgid=self.next_tgid, fork=False)
        self.next_tgid += 7
        self._gap()
        c = self.create_vcpu(self.create_vm(p))
        self._gap()
        self.set_cpuid(c, AMX_PERM)
        self._gap()
        self.run_start(c)
        self._gap()
        self.guest_xsetbv(c, AMX_PERM)
        c.running = False
        self._gap()
        self.host_xfd(c, XTILEDATA)
        self._gap()
        return c

    def _gap(self):
        if self.on_gap is not None:
            self.on_gap(self)


def _well_formed(value: int) -> bool:
    from agent.xstate import xcr0_invalid_reason
    return xcr0_invalid_reason(value) is None


def generate(seed: int, steps: int, **kw) -> list[Event]:
    """A correct stream: `steps` random actions of a few VMM processes, interleaved."""
    return Host(random.Random(seed), **kw).run(steps)
