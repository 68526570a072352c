"""The kernel struct offsets the probes read, resolved from BTF into -D defines.

Each probe group names the defines it needs; a field the running kernel's BTF
lacks disables only the groups that need it, with the BTF error as the reason.
"""

from dataclasses import dataclass, field

from agent.probes.btf import BtfError, KernelBtf

# define -> (struct, field path). Byte offsets within that struct. (Some are
# resolved for the record only: `python -m agent.probes` shows them.)
FIELDS = {
    "OFF_TASK_FILES": ("task_struct", "files"),
    "OFF_TASK_GROUP_LEADER": ("task_struct", "group_leader"),
    "OFF_TASK_SIGNAL": ("task_struct", "signal"),
    "OFF_TASK_TI_STATUS": ("task_struct", "thread_info.status"),
    "OFF_TASK_PID": ("task_struct", "pid"),
    "OFF_TASK_TGID": ("task_struct", "tgid"),
    "OFF_TASK_COMM": ("task_struct", "comm"),
    "OFF_REGS_DI": ("pt_regs", "di"),
    "OFF_REGS_SI": ("pt_regs", "si"),
    "OFF_REGS_DX": ("pt_regs", "dx"),
    "OFF_REGS_ORIG_AX": ("pt_regs", "orig_ax"),
    "OFF_SIGNAL_LIVE": ("signal_struct", "live.counter"),
    "OFF_FILES_FDT": ("files_struct", "fdt"),
    "OFF_FDTABLE_MAX_FDS": ("fdtable", "max_fds"),
    "OFF_FDTABLE_FD": ("fdtable", "fd"),
    "OFF_FILE_PRIVATE_DATA": ("file", "private_data"),
    "OFF_FILE_F_OP": ("file", "f_op"),
    "OFF_FILE_DENTRY": ("file", "f_path.dentry"),
    "OFF_DENTRY_NAME": ("dentry", "d_name.name"),
    "OFF_VCPU_KVM": ("kvm_vcpu", "kvm"),
    "OFF_VCPU_ID": ("kvm_vcpu", "vcpu_id"),
    "OFF_VCPU_REGS": ("kvm_vcpu", "arch.regs"),
    "OFF_VCPU_XCR0": ("kvm_vcpu", "arch.xcr0"),
    "OFF_VCPU_GUEST_SUPPORTED_XCR0": ("kvm_vcpu", "arch.guest_supported_xcr0"),
    "OFF_VCPU_GUEST_FPU_XFEATURES": ("kvm_vcpu", "arch.guest_fpu.xfeatures"),
    "OFF_VCPU_GUEST_FPU_UABI_SIZE": ("kvm_vcpu", "arch.guest_fpu.uabi_size"),
    "OFF_VCPU_GUEST_FPSTATE": ("kvm_vcpu", "arch.guest_fpu.fpstate"),
    "OFF_VCPU_XFD_NO_WRITE_INTERCEPT": ("kvm_vcpu", "arch.xfd_no_write_intercept"),
    "OFF_FPSTATE_SIZE": ("fpstate", "size"),
    "OFF_FPSTATE_USER_SIZE": ("fpstate", "user_size"),
    "OFF_FPSTATE_XFEATURES": ("fpstate", "xfeatures"),
    "OFF_FPSTATE_USER_XFEATURES": ("fpstate", "user_xfeatures"),
    "OFF_FPSTATE_XFD": ("fpstate", "xfd"),
}

# define -> (enum, enumerator): indexes into kvm_vcpu_arch.regs[].
ENUMS = {
    "VCPU_REG_RAX": ("kvm_reg", "VCPU_REGS_RAX"),
    "VCPU_REG_RCX": ("kvm_reg", "VCPU_REGS_RCX"),
    "VCPU_REG_RDX": ("kvm_reg", "VCPU_REGS_RDX"),
}

# A syscall's number and arguments from its pt_regs at raw_syscalls:sys_exit,
# whether it is a 32-bit one (bpf/syscalls.h), and the caller's ids and comm.
_SYSCALL = ("OFF_REGS_DI", "OFF_REGS_SI", "OFF_REGS_DX", "OFF_REGS_ORIG_AX", "OFF_TASK_TI_STATUS",
            "OFF_TASK_PID", "OFF_TASK_TGID", "OFF_TASK_COMM")
# Walking from an ioctl's fd to KVM's objects, and naming the VM and vCPU.
_FD_TO_VCPU = (
    "OFF_TASK_FILES", "OFF_FILES_FDT", "OFF_FDTABLE_MAX_FDS", "OFF_FDTABLE_FD", "OFF_FILE_PRIVATE_DATA",
    "OFF_FILE_F_OP", "OFF_FILE_DENTRY", "OFF_DENTRY_NAME", "OFF_VCPU_KVM", "OFF_VCPU_ID",
)
_FPSTATE = ("OFF_VCPU_GUEST_FPSTATE", "OFF_FPSTATE_SIZE", "OFF_FPSTATE_XFEATURES")

# Probe group (one event source) -> defines it needs from BTF. Its tracepoints
# are in tracepoint_backend.PROBES; its C code is built under -DWITH_<GROUP>.
GROUPS = {
    # perm: ARCH_GET/REQ_XCOMP_* calls.
    "arch_prctl": _SYSCALL,
    # Not a probe: perm and fpu_load events carry the process's guest
    # permission as the kernel holds it (group_leader's fpu.guest_perm).
    "guest_perm": ("OFF_TASK_GROUP_LEADER", "OFF_TASK_GUEST_PERM"),
    # vcpu_create, cpuid, host xcr0 (with read-backs of what KVM derived), and
    # new VMs; the base of every KVM source below.
    "kvm_ioctl": _SYSCALL + _FD_TO_VCPU + ("OFF_VCPU_XCR0", "OFF_VCPU_GUEST_SUPPORTED_XCR0") + _FPSTATE,
    # host xfd / xfd_err (KVM_SET_MSRS).
    "kvm_msrs": (),
    # xsave get/set.
    "kvm_xsave": ("OFF_VCPU_GUEST_FPU_UABI_SIZE",),
    # fpu_load at KVM_RUN (kvm:kvm_fpu).
    "fpu_load": _FPSTATE + ("OFF_FPSTATE_USER_SIZE", "OFF_FPSTATE_USER_XFEATURES", "OFF_FPSTATE_XFD"),
    # guest xcr0 (XSETBV: VM exits via kvm:kvm_exit/kvm_entry, emulated via
    # kvm:kvm_emulate_insn; #GP via kvm:kvm_inj_exception).
    "guest_xcr0": ("OFF_VCPU_REGS", "OFF_VCPU_XCR0", "VCPU_REG_RAX", "VCPU_REG_RCX", "VCPU_REG_RDX"),
    # guest xfd / xfd_err (kvm:kvm_msr).
    "guest_msr": (),
    # exec / exit of watched processes. The signal->live offsets only where
    # sched_process_exit lacks group_dead (see SCHED_EXIT_FALLBACK).
    "sched": (),
}
# Groups that are built on another's code (the fd walk, the ioctl table).
REQUIRES = {g: ("kvm_ioctl",) for g in ("kvm_msrs", "kvm_xsave", "fpu_load", "guest_xcr0", "guest_msr")}
# guest_perm is extra reads in the arch_prctl programs (and fpu_load's).
REQUIRES["guest_perm"] = ("arch_prctl",)
# What sched needs when sched_process_exit has no group_dead field.
SCHED_EXIT_FALLBACK = ("OFF_TASK_SIGNAL", "OFF_SIGNAL_LIVE")
# Groups that need the thread -> vCPU map of KVM_RUN.
IN_KVM_RUN = ("fpu_load", "guest_xcr0", "guest_msr")


def task_guest_perm_offset(btf: KernelBtf) -> int:
    """Offset from a task_struct to its fpu.guest_perm.__state_perm.

    Through 6.15 struct fpu is the last member of thread_struct
    (task->thread.fpu). From 6.16 it is no member at all: x86_task_fpu(task)
    is (void *)task + sizeof(struct task_struct), the FPU state being
    allocated right after the task struct.
    """
    in_fpu = btf.offset("fpu", "guest_perm.__state_perm")
    thread_fpu = btf.field("task_struct", "thread.fpu") if btf.has("task_struct", "thread.fpu") else None
    if thread_fpu is not None and thread_fpu.size == btf.struct_size("fpu"):
        return thread_fpu.offset + in_fpu
    return btf.struct_size("task_struct") + in_fpu


def needs(group: str, exit_has_group_dead: bool = True) -> tuple[str, ...]:
    """The defines `group` needs from BTF."""
    if group == "sched" and not exit_has_group_dead:
        return SCHED_EXIT_FALLBACK
    return GROUPS[group]


@dataclass
class Offsets:
    values: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # define -> why BTF could not give it
    # Whether sched_process_exit has group_dead (set by the loader from tracefs).
    exit_has_group_dead: bool = True
    btf: KernelBtf | None = None  # what they were resolved from (the loader finds tracepoints' BTF ids there)

    def group_error(self, group: str) -> str | None:
        """Why `group` cannot be built from BTF, or None (required groups not included)."""
        missing = [self.errors.get(d, f"{d} not resolved") for d in needs(group, self.exit_has_group_dead)
                   if d not in self.values]
        return "; ".join(missing) or None

    def cflags(self, groups) -> list[str]:
        """-D defines for the groups given (all of which must be buildable)."""
        flags = []
        for g in groups:
            flags.append(f"-DWITH_{g.upper()}=1")
            flags += [f"-D{d}={self.values[d]}" for d in needs(g, self.exit_has_group_dead)]
        if any(g in IN_KVM_RUN for g in groups):
            flags.append("-DWITH_KVM_RUN=1")
        if "sched" in groups and self.exit_has_group_dead:
            flags.append("-DEXIT_HAS_GROUP_DEAD=1")
        return sorted(set(flags))


def resolve(btf: KernelBtf | None = None) -> Offsets:
    btf = btf or KernelBtf()
    out = Offsets(btf=btf)
    for define, (struct, path) in FIELDS.items():
        try:
            out.values[define] = btf.offset(struct, path)
        except BtfError as e:
            out.errors[define] = str(e)
    for define, (enum, name) in ENUMS.items():
        try:
            out.values[define] = btf.enum_value(enum, name)
        except BtfError as e:
            out.errors[define] = str(e)
    try:
        out.values["OFF_TASK_GUEST_PERM"] = task_guest_perm_offset(btf)
    except BtfError as e:
        out.errors["OFF_TASK_GUEST_PERM"] = str(e)
    return out
