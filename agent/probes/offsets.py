"""The kernel struct offsets the probes read, resolved from BTF into -D defines.

Each probe group names the defines it needs; a field the running kernel's BTF
lacks disables only the groups that need it, with the BTF error as the reason.
"""

from dataclasses import dataclass, field

from agent.probes.btf import BtfError, KernelBtf

# define -> (struct, field path). Byte offsets within that struct.
FIELDS = {
    "OFF_TASK_FILES": ("task_struct", "files"),
    "OFF_TASK_GROUP_LEADER": ("task_struct", "group_leader"),
    "OFF_FILES_FDT": ("files_struct", "fdt"),
    "OFF_FDTABLE_MAX_FDS": ("fdtable", "max_fds"),
    "OFF_FDTABLE_FD": ("fdtable", "fd"),
    "OFF_FILE_PRIVATE_DATA": ("file", "private_data"),
    "OFF_FILE_DENTRY": ("file", "f_path.dentry"),
    "OFF_DENTRY_NAME": ("dentry", "d_name.name"),
    "OFF_VCPU_KVM": ("kvm_vcpu", "kvm"),
    "OFF_VCPU_ID": ("kvm_vcpu", "vcpu_id"),
    "OFF_VCPU_XCR0": ("kvm_vcpu", "arch.xcr0"),
    "OFF_VCPU_GUEST_SUPPORTED_XCR0": ("kvm_vcpu", "arch.guest_supported_xcr0"),
    "OFF_VCPU_GUEST_FPU_XFEATURES": ("kvm_vcpu", "arch.guest_fpu.xfeatures"),
    "OFF_VCPU_GUEST_FPU_UABI_SIZE": ("kvm_vcpu", "arch.guest_fpu.uabi_size"),
    "OFF_VCPU_GUEST_FPSTATE": ("kvm_vcpu", "arch.guest_fpu.fpstate"),
    "OFF_VCPU_XFD_NO_WRITE_INTERCEPT": ("kvm_vcpu", "arch.xfd_no_write_intercept"),
    "OFF_FPSTATE_SIZE": ("fpstate", "size"),
    "OFF_FPSTATE_XFEATURES": ("fpstate", "xfeatures"),
    "OFF_FPSTATE_XFD": ("fpstate", "xfd"),
}

# Probe group -> defines it needs (and the -D switch that builds it).
GROUPS = {
    "arch_prctl": (),
    "kvm_ioctl": (
        "OFF_TASK_FILES", "OFF_FILES_FDT", "OFF_FDTABLE_MAX_FDS", "OFF_FDTABLE_FD", "OFF_FILE_PRIVATE_DATA",
        "OFF_FILE_DENTRY", "OFF_DENTRY_NAME", "OFF_VCPU_KVM", "OFF_VCPU_ID", "OFF_VCPU_XCR0",
        "OFF_VCPU_GUEST_SUPPORTED_XCR0", "OFF_VCPU_GUEST_FPSTATE", "OFF_FPSTATE_SIZE", "OFF_FPSTATE_XFEATURES",
    ),
    # Not a probe: lets perm events carry the task's guest permission as the
    # kernel holds it (a cross-check, and the lock flag set by the first vCPU).
    "guest_perm": ("OFF_TASK_GROUP_LEADER", "OFF_TASK_GUEST_PERM"),
}
SWITCHES = {"kvm_ioctl": "WITH_KVM_IOCTL", "guest_perm": "WITH_GUEST_PERM"}


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


@dataclass
class Offsets:
    values: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # define -> why BTF could not give it

    def group_error(self, group: str) -> str | None:
        """Why `group` cannot be built, or None."""
        missing = [self.errors[d] for d in GROUPS[group] if d not in self.values]
        return "; ".join(missing) or None

    def cflags(self, groups) -> list[str]:
        """-D defines for the groups given (all of which must be buildable)."""
        flags = []
        for g in groups:
            if g in SWITCHES:
                flags.append(f"-D{SWITCHES[g]}=1")
            flags += [f"-D{d}={self.values[d]}" for d in GROUPS[g]]
        return sorted(set(flags))


def resolve(btf: KernelBtf | None = None) -> Offsets:
    btf = btf or KernelBtf()
    out = Offsets()
    for define, (struct, path) in FIELDS.items():
        try:
            out.values[define] = btf.offset(struct, path)
        except BtfError as e:
            out.errors[define] = str(e)
    try:
        out.values["OFF_TASK_GUEST_PERM"] = task_guest_perm_offset(btf)
    except BtfError as e:
        out.errors["OFF_TASK_GUEST_PERM"] = str(e)
    return out
