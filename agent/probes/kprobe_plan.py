"""Which kernel functions the kprobe backend attaches to, chosen per kernel.

Every event source (the probe groups the two backends share, plus those only
kprobes can see) needs one or more *slots* filled, each from an ordered list
of alternatives. An alternative is usable when every function it names is in
/proc/kallsyms (not inlined away, not renamed by the compiler, not on the
kprobe blacklist) and, where the kernel's BTF describes the function, its
parameters are the ones the BPF code reads by position. A source whose slot
has no usable alternative, or whose BTF fields are missing, is left out with
the reason; the others run.

Everything here is pure (kallsyms, BTF and tracefs come in as arguments), so
that the selection can be tested with a fake kernel: tests/test_kprobe_plan.py.

What each kernel offers (kallsyms of Debian's 6.1.0-56 and 6.12.117 under
QEMU with kvm_amd, and of the development machines' 6.18.44): see
docs/kprobes.md.
"""

from dataclasses import dataclass, field
from typing import Callable

from agent.probes import offsets as base_offsets
from agent.probes.btf import BtfError, KernelBtf
from agent.probes.offsets import Offsets

# ---- what the BPF code attaches ---------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One kernel function (or tracepoint) and the BPF functions on it."""

    symbol: str  # function name; "cat:event" for a tracepoint
    entry: str | None = None  # BPF function at its entry (kprobe) / the tracepoint's
    ret: str | None = None  # BPF function at its return (kretprobe)
    nargs: int | None = None  # parameters the code reads by position (checked when BTF has the function)
    params: tuple[str, ...] | None = None  # exact parameter names BTF must show (BTF then required)
    tracepoint: bool = False

    def hooks(self) -> list[tuple[str, str, str]]:
        """(type, symbol, BPF function) in attach order: a return before its entry."""
        if self.tracepoint:
            return [("tracepoint", self.symbol, self.entry)]
        out = []
        if self.ret:
            out.append(("kretprobe", self.symbol, self.ret))
        if self.entry:
            out.append(("kprobe", self.symbol, self.entry))
        return out

    def describe(self) -> list[str]:
        return [f"{t}:{s}" for t, s, _ in self.hooks()]


@dataclass(frozen=True)
class Alternative:
    probes: tuple[Probe, ...]
    defines: tuple[str, ...] = ()  # -D switches this way needs in the BPF program
    fields: tuple[str, ...] = ()  # BTF offsets this way needs beyond its source's
    note: str = ""  # what this way misses, for status listings

    @property
    def name(self) -> str:
        return " + ".join(dict.fromkeys(p.symbol for p in self.probes))


@dataclass(frozen=True)
class Slot:
    what: str
    alternatives: tuple[Alternative, ...]


@dataclass(frozen=True)
class Source:
    kinds: tuple[str, ...]
    reports: str  # in words, for status listings
    slots: tuple[Slot, ...] = ()
    fields: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()  # sources whose code (and probes) this one runs on


def kp(symbol, entry=None, ret=None, nargs=None, params=None) -> Probe:
    return Probe(symbol, entry, ret, nargs, params)


def alt(*probes, defines=(), fields=(), note="") -> Alternative:
    return Alternative(tuple(probes), tuple(defines), tuple(fields), note)


_VCPU = ("OFF_VCPU_KVM", "OFF_VCPU_ID")
_MSR = ("OFF_MSR_INDEX", "OFF_MSR_HOST_INITIATED", "OFF_MSR_DATA")
_GUEST_FPSTATE = ("OFF_VCPU_GUEST_FPU", "OFF_VCPU_GUEST_FPSTATE")

# The vCPU ioctl each thread is in (KVM_RUN): an entry probe only (KVM_RUN may last as long as the guest runs).
_RUN = Slot("the thread's current vCPU ioctl (KVM_RUN)", (alt(kp("kvm_vcpu_ioctl", "kp_vcpu_ioctl", nargs=3)),))
_SET_MSR = kp("kvm_set_msr_common", "kp_set_msr", "kp_set_msr_ret", nargs=2)
_XFD_ENABLE = kp("__xfd_enable_feature", "kp_xfd_enable", "kp_xfd_enable_ret", params=("xfd_err", "guest_fpu"))

SOURCES: dict[str, Source] = {
    "arch_prctl": Source(
        ("perm",), "perm",
        (Slot("the XSTATE options of arch_prctl", (
            alt(kp("fpu_xstate_prctl", "kp_prctl", "kp_prctl_ret", params=("option", "arg2")),
                defines=("PRCTL_ARGS=2",)),
            alt(kp("fpu_xstate_prctl", "kp_prctl", "kp_prctl_ret", params=("tsk", "option", "arg2")),
                defines=("PRCTL_ARGS=3",), note="5.16-5.17 signature (with the task)"),
        )),)),
    # Not a probe: perm and fpu_load records carry the process's guest
    # permission as the kernel holds it (group_leader's fpu.guest_perm).
    "guest_perm": Source((), "guest_perm of fpu_load (and perm read-backs)",
                         fields=base_offsets.GROUPS["guest_perm"]),
    "kvm_ioctl": Source(
        ("vcpu_create", "cpuid", "xcr0"), "vcpu_create, cpuid, host xcr0",
        (Slot("vCPU ioctls (KVM_SET_CPUID2, KVM_SET_XCRS, ...)",
              (alt(kp("kvm_arch_vcpu_ioctl", "kp_arch_vcpu_ioctl", "kp_ioctl_ret", nargs=3)),)),
         Slot("VM ioctls (KVM_CREATE_VCPU)", (alt(kp("kvm_vm_ioctl", "kp_vm_ioctl", "kp_ioctl_ret", nargs=3)),)),
         Slot("new VMs (KVM_CREATE_VM)", (
             alt(kp("kvm_dev_ioctl", "kp_dev_ioctl", "kp_ioctl_ret", nargs=3)),
             alt(kp("kvm_arch_init_vm", "kp_arch_init_vm", nargs=2),
                 note="new VMs seen at kvm_arch_init_vm, also those whose creation then fails"),
         ))),
        fields=base_offsets.GROUPS["kvm_ioctl"]),
    "kvm_msrs": Source(("xfd", "xfd_err"), "host xfd, xfd_err",
                       (Slot("IA32_XFD/XFD_ERR writes", (alt(_SET_MSR),)),),
                       fields=_VCPU + _MSR, requires=("kvm_ioctl",)),
    "kvm_xsave": Source(("xsave",), "xsave", fields=base_offsets.GROUPS["kvm_xsave"], requires=("kvm_ioctl",)),
    "fpu_load": Source(
        ("fpu_load",), "fpu_load",
        (Slot("the guest FPU swap", (alt(kp("fpu_swap_kvm_fpstate", "kp_fpu_swap", params=("guest_fpu", "enter_guest"))),)),
         _RUN),
        fields=base_offsets.GROUPS["fpu_load"] + ("OFF_VCPU_GUEST_FPU",), requires=("kvm_ioctl",)),
    "guest_xcr0": Source(
        ("xcr0",), "guest xcr0 (XSETBV)",
        (Slot("the XCR0 handler", (
            alt(kp("__kvm_set_xcr", "kp_set_xcr", "kp_set_xcr_ret", nargs=3)),
            alt(kp("kvm_emulate_xsetbv", "kp_set_xcr", "kp_set_xcr_ret", nargs=1), defines=("XCR_VIA_XSETBV",),
                fields=("OFF_VCPU_REGS", "VCPU_REG_RAX", "VCPU_REG_RCX", "VCPU_REG_RDX"),
                note="__kvm_set_xcr is inlined: XSETBV exits only, not KVM's instruction emulator"),
         )), _RUN),
        fields=_VCPU + ("OFF_VCPU_XCR0",), requires=("kvm_ioctl",)),
    "guest_msr": Source(("xfd", "xfd_err"), "guest xfd, xfd_err (WRMSR)",
                        (Slot("IA32_XFD/XFD_ERR writes", (alt(_SET_MSR),)),), fields=_VCPU + _MSR),
    "sched": Source(("exec", "exit"), "exec, exit",
                    (Slot("process lifetimes", (alt(
                        Probe("sched:sched_process_exit", "on_sched_exit", tracepoint=True),
                        Probe("sched:sched_process_exec", "on_sched_exec", tracepoint=True)),)),)),
    # Only kprobes see these.
    "fpstate": Source(
        ("fpstate",), "fpstate (guest and host FPU buffer growth)",
        (Slot("FPU buffer growth for dynamic features", (
            alt(_XFD_ENABLE),
            alt(kp("fpu_enable_guest_xfd_features", "kp_guest_xfd_features", "kp_xfd_enable_ret",
                   params=("guest_fpu", "xfeatures")),
                kp("xfd_enable_feature", "kp_host_xfd_enable", "kp_xfd_enable_ret", nargs=1),
                defines=("FPSTATE_VIA_CALLERS",), fields=("OFF_VCPU_GUEST_FPU_XFEATURES",),
                note="__xfd_enable_feature is inlined: seen from its two callers"),
        )),),
        fields=_VCPU + _GUEST_FPSTATE + ("OFF_FPSTATE_SIZE", "OFF_FPSTATE_USER_SIZE", "OFF_FPSTATE_XFEATURES",
                                         "OFF_TASK_FPSTATE")),
    "vcpu_destroy": Source(
        ("vcpu_destroy",), "vcpu_destroy",
        (Slot("vCPU freed", (
            alt(kp("kvm_vcpu_destroy", "kp_vcpu_destroy", nargs=1)),
            alt(kp("kvm_arch_vcpu_destroy", "kp_vcpu_destroy", nargs=1)),
            alt(kp("fpu_free_guest_fpstate", "kp_vcpu_destroy", nargs=1), defines=("VCPU_FROM_GFPU",),
                fields=("OFF_VCPU_GUEST_FPU",)),
         )),
         # A failed KVM_CREATE_VCPU frees the vCPU it made: not a vcpu_destroy.
         Slot("vCPUs being created", (alt(kp("kvm_arch_vcpu_create", "kp_vcpu_create", nargs=1),
                                          kp("kvm_arch_vcpu_postcreate", "kp_vcpu_postcreate", nargs=1)),))),
        fields=_VCPU + ("OFF_TASK_FLAGS",)),
    "passthrough": Source(
        ("passthrough",), "passthrough (XFD write interception dropped)",
        (Slot("the vendor MSR write handler", (
            alt(kp("vmx_set_msr", "kp_vendor_set_msr", "kp_vendor_set_msr_ret", nargs=2)),
            alt(kp("svm_set_msr", "kp_vendor_set_msr", "kp_vendor_set_msr_ret", nargs=2),
                note="AMD: KVM never drops XFD interception there (no XFD); attached for the record"),
        )),),
        fields=_VCPU + ("OFF_MSR_INDEX", "OFF_MSR_HOST_INITIATED", "OFF_VCPU_XFD_NO_WRITE_INTERCEPT"),
        # Its record must follow the xfd record of the same write, in the same ring.
        requires=("kvm_msrs", "guest_msr")),
    "xfd_nm": Source(
        ("xfd_err",), "xfd_err saved on the guest's #NM (source nm)",
        (Slot("the #NM exit handler (VMX)", (
            alt(kp("handle_nm_fault_irqoff", "kp_nm", "kp_nm_ret", nargs=1)),
            alt(kp("vmx_handle_exit_irqoff", "kp_nm", "kp_nm_ret", nargs=1), defines=("NM_VIA_EXIT_IRQOFF",),
                fields=("OFF_VMX_EXIT_REASON", "OFF_VMX_EXIT_INTR_INFO"),
                note="handle_nm_fault_irqoff is inlined: seen from vmx_handle_exit_irqoff (every VM exit)"),
        )),),
        fields=_VCPU + ("OFF_VCPU_GUEST_FPSTATE", "OFF_FPSTATE_XFD", "OFF_VCPU_GUEST_FPU_XFD_ERR")),
}

KINDS = {s: src.kinds for s, src in SOURCES.items()}
REPORTS = {s: src.reports for s, src in SOURCES.items()}
REQUIRES = {s: src.requires for s, src in SOURCES.items() if src.requires}
# Sources that need the thread's KVM_RUN (running_vcpu()).
IN_KVM_RUN = ("fpu_load", "guest_xcr0")
# Index of each source in the BPF `group_on` array.
GROUP_INDEX = {s: i for i, s in enumerate(SOURCES)}

# ---- BTF offsets only the kprobe backend reads -----------------------------------------------------

FIELDS = {
    "OFF_VCPU_GUEST_FPU": ("kvm_vcpu", "arch.guest_fpu"),
    "OFF_VCPU_GUEST_FPU_XFD_ERR": ("kvm_vcpu", "arch.guest_fpu.xfd_err"),
    "OFF_MSR_HOST_INITIATED": ("msr_data", "host_initiated"),
    "OFF_MSR_INDEX": ("msr_data", "index"),
    "OFF_MSR_DATA": ("msr_data", "data"),
    "OFF_TASK_FLAGS": ("task_struct", "flags"),
    # struct vcpu_vmx (kvm_intel's BTF): the #NM fallback.
    "OFF_VMX_EXIT_REASON": ("vcpu_vmx", "exit_reason"),
    "OFF_VMX_EXIT_INTR_INFO": ("vcpu_vmx", "exit_intr_info"),
}


def task_fpstate_offset(btf: KernelBtf) -> int:
    """Offset from a task_struct to its fpu.fpstate pointer (see offsets.task_guest_perm_offset)."""
    in_fpu = btf.offset("fpu", "fpstate")
    thread_fpu = btf.field("task_struct", "thread.fpu") if btf.has("task_struct", "thread.fpu") else None
    if thread_fpu is not None and thread_fpu.size == btf.struct_size("fpu"):
        return thread_fpu.offset + in_fpu
    return btf.struct_size("task_struct") + in_fpu


def resolve(btf: KernelBtf | None = None) -> Offsets:
    """The tracepoint backend's offsets plus the kprobe backend's own."""
    btf = btf or KernelBtf()
    out = base_offsets.resolve(btf)
    for define, (struct, path) in FIELDS.items():
        try:
            out.values[define] = btf.offset(struct, path)
        except BtfError as e:
            out.errors[define] = str(e)
    try:
        out.values["OFF_TASK_FPSTATE"] = task_fpstate_offset(btf)
    except BtfError as e:
        out.errors["OFF_TASK_FPSTATE"] = str(e)
    # The #NM fallback reads vcpu_vmx fields from the struct kvm_vcpu pointer.
    if "OFF_VMX_EXIT_REASON" in out.values:
        try:
            at = btf.offset("vcpu_vmx", "vcpu")
        except BtfError as e:
            at = str(e)
        if at != 0:
            why = f"struct vcpu_vmx does not begin with its kvm_vcpu ({at})"
            for d in ("OFF_VMX_EXIT_REASON", "OFF_VMX_EXIT_INTR_INFO"):
                out.values.pop(d, None)
                out.errors[d] = why
    return out


# ---- what this kernel has -------------------------------------------------------------------------------

def read_kallsyms(path: str = "/proc/kallsyms", wanted: set[str] | None = None) -> dict[str, str | None]:
    """Text symbols (t/T) of the running kernel: name -> module (None: vmlinux).
    Names the compiler derived (foo.isra.0, foo.cold, ...) are not the function."""
    out: dict[str, str | None] = {}
    with open(path, "rb") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or parts[1] not in (b"t", b"T"):
                continue
            name = parts[2].decode("ascii", "replace")
            if wanted is not None and name not in wanted:
                continue
            out.setdefault(name, parts[3].decode().strip("[]") if len(parts) > 3 else None)
    return out


def read_blacklist(path: str = "/sys/kernel/debug/kprobes/blacklist") -> set[str]:
    """Functions the kernel refuses kprobes on (empty if unreadable)."""
    try:
        with open(path) as f:
            return {line.split()[1] for line in f if len(line.split()) >= 2}
    except OSError:
        return set()


def wanted_symbols() -> set[str]:
    return {p.symbol for src in SOURCES.values() for sl in src.slots for a in sl.alternatives for p in a.probes
            if not p.tracepoint}


# ---- the choice -------------------------------------------------------------------------------------------


@dataclass
class Choice:
    """How a source runs on this kernel, or why it cannot."""

    source: str
    alternatives: list[Alternative] = field(default_factory=list)  # one per slot
    reason: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def probes(self) -> list[Probe]:
        return [p for a in self.alternatives for p in a.probes]

    @property
    def hooks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(h for p in self.probes for h in p.describe()))

    @property
    def defines(self) -> tuple[str, ...]:
        return tuple(d for a in self.alternatives for d in a.defines)

    @property
    def fields(self) -> tuple[str, ...]:
        return SOURCES[self.source].fields + tuple(f for a in self.alternatives for f in a.fields)


def probe_problem(p: Probe, kallsyms, btf_params: Callable[[str], tuple | None], blacklist=frozenset(),
                  tracepoint_exists: Callable[[str], bool] = lambda tp: True) -> str | None:
    """Why `p` cannot be attached on this kernel, or None."""
    if p.tracepoint:
        return None if tracepoint_exists(p.symbol) else f"no tracepoint {p.symbol}"
    if p.symbol not in kallsyms:
        return f"{p.symbol} not in kallsyms (inlined or not built)"
    if p.symbol in blacklist:
        return f"{p.symbol} is on the kprobe blacklist"
    try:
        params = btf_params(p.symbol)
    except BtfError as e:
        params, err = None, str(e)
    else:
        err = None
    if p.params is not None:
        if params is None:
            return f"{p.symbol}: no FUNC in BTF to tell its signature{f' ({err})' if err else ''}"
        if tuple(params) != p.params:
            return f"{p.symbol}({', '.join(params)}) in BTF, not ({', '.join(p.params)})"
    elif p.nargs is not None and params is not None and len(params) != p.nargs:
        return f"{p.symbol}({', '.join(params)}) in BTF: {p.nargs} parameters expected"
    return None


def choose(source: str, kallsyms, btf_params, offsets: Offsets | None = None, blacklist=frozenset(),
           tracepoint_exists=lambda tp: True, exit_has_group_dead: bool = True) -> Choice:
    """The first usable alternative of each slot of `source`, or the reason there is none."""
    src = SOURCES[source]
    choice = Choice(source)
    for slot in src.slots:
        why = []
        for a in slot.alternatives:
            problems = [w for p in a.probes if (w := probe_problem(p, kallsyms, btf_params, blacklist,
                                                                    tracepoint_exists))]
            if not problems:
                choice.alternatives.append(a)
                if a.note:
                    choice.notes.append(a.note)
                break
            why.append("; ".join(dict.fromkeys(problems)))
        else:
            choice.reason = f"{slot.what}: " + " / ".join(why)
            return choice
    if offsets is not None:
        missing = [offsets.errors.get(d, f"{d} not resolved") for d in needs(choice, exit_has_group_dead)
                   if d not in offsets.values]
        if missing:
            choice.reason = "BTF lacks a field: " + "; ".join(dict.fromkeys(missing))
    return choice


def needs(choice: Choice, exit_has_group_dead: bool = True) -> tuple[str, ...]:
    """BTF defines the chosen way of a source reads."""
    if choice.source == "sched":
        return base_offsets.needs("sched", exit_has_group_dead)
    return choice.fields


def plan(sources, kallsyms, btf_params, offsets: Offsets, blacklist=frozenset(), tracepoint_exists=lambda tp: True,
         exit_has_group_dead: bool = True) -> dict[str, Choice]:
    """choose() for each source asked for, then the requirements between them:
    a source whose required source is not usable is not either (its reason
    says which)."""
    out: dict[str, Choice] = {}
    for s in [s for s in SOURCES if s in sources]:
        c = choose(s, kallsyms, btf_params, offsets, blacklist, tracepoint_exists, exit_has_group_dead)
        if c.ok:
            for r in SOURCES[s].requires:
                if r not in out:
                    c.reason = f"needs source {r}: not asked for"
                    break
                if not out[r].ok:
                    c.reason = f"needs source {r}: {out[r].reason}"
                    break
        out[s] = c
    return out


def cflags(choices: list[Choice], offsets: Offsets, exit_has_group_dead: bool = True) -> list[str]:
    """-D defines for the sources chosen (all usable)."""
    flags = ["-DKPROBES=1", f"-DKP_NGROUPS={len(SOURCES)}"]
    flags += [f"-DGROUP_{s.upper()}={i}" for s, i in GROUP_INDEX.items()]
    for c in choices:
        flags.append(f"-DWITH_{c.source.upper()}=1")
        flags += [f"-D{d}" for d in c.defines]
        flags += [f"-D{d}={offsets.values[d]}" for d in needs(c, exit_has_group_dead)]
    if any(c.source in IN_KVM_RUN for c in choices):
        flags.append("-DWITH_KVM_RUN=1")
    if any(c.source == "sched" for c in choices) and exit_has_group_dead:
        flags.append("-DEXIT_HAS_GROUP_DEAD=1")
    return sorted(set(flags))
