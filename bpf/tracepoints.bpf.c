// Tracepoint backend: arch_prctl XSTATE permission calls and KVM vCPU ioctls,
// seen at syscall entry/exit (no kprobes needed).
//
// Built by agent/probes/tracepoint_backend.py with BCC, configured only by -D
// defines (cflags):
//   EVENT_SIZE        sizeof(struct event) as the Python decoder expects it
//   RINGBUF_PAGES     ring buffer size in pages (power of two)
//   SUBMIT_FLAGS      ring buffer submit flags: BPF_RB_NO_WAKEUP (the reader
//                     polls on a timer; a wakeup per event costs the traced
//                     process ~5 us, see shared/reference/build-machine-bpf.md)
//                     or 0 (wake the reader on every event)
//   WITH_KVM_IOCTL    build the ioctl probes; needs the OFF_* byte offsets
//                     below, all resolved from the running kernel's BTF
//                     (the headers BCC compiles with are for another kernel,
//                     so no kernel struct is dereferenced by type here).
//   WITH_GUEST_PERM   perm events also carry the process's guest permission
//                     (group leader's fpu.guest_perm.__state_perm); needs
//                     OFF_TASK_GROUP_LEADER and OFF_TASK_GUEST_PERM.
//
// Functions are not named tracepoint__*: BCC would attach them all at load,
// and the loader attaches each one itself so that one failure is reported
// alone. The struct tracepoint__cat__event argument still makes BCC build
// the args layout from tracefs.

#define ARCH_GET_XCOMP_SUPP       0x1021
#define ARCH_GET_XCOMP_PERM       0x1022
#define ARCH_REQ_XCOMP_PERM       0x1023
#define ARCH_GET_XCOMP_GUEST_PERM 0x1024
#define ARCH_REQ_XCOMP_GUEST_PERM 0x1025

#define KVM_CREATE_VCPU 0xAE41
#define KVM_SET_CPUID2  0x4008AE90
#define KVM_SET_XCRS    0x4188AEA7

// Event kinds; agent/probes/decode.py maps them to agent.events.model.
#define EV_PERM        1
#define EV_VCPU_CREATE 2
#define EV_CPUID       3
#define EV_XCR0        4

// event.flags
#define F_VALUE   1  // `value` holds what the kind says (GET mask read, CPUID leaf 0xD.0 found)
#define F_CHECKED 2  // `check*` hold read-backs from kernel state after the call

struct event {
    u64 ts;       // bpf_ktime_get_ns: CLOCK_MONOTONIC
    u64 value;    // perm: GET mask or REQ feature; cpuid: xcr0_supported; xcr0: value written
    u64 vm;       // struct kvm * of the VM (mapped to an opaque name in Python)
    u64 check1;   // read back after the call (see decode.py)
    u64 check2;
    u32 tgid;
    u32 tid;
    u32 kind;
    u32 op;       // perm: arch_prctl option; ioctls: the ioctl number
    s32 ret;      // the syscall's result
    s32 arg;      // KVM events: vCPU id
    u32 flags;
    u32 check3;
    char comm[16];
};
_Static_assert(sizeof(struct event) == EVENT_SIZE, "event layout differs from the Python decoder");

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
// Events dropped because the ring was full, per CPU (read and summed by Python).
BPF_PERCPU_ARRAY(lost, u64, 1);

static __always_inline struct event *reserve(u32 kind) {
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        int zero = 0;
        u64 *n = lost.lookup(&zero);
        if (n)
            (*n)++;
        return 0;
    }
    u64 id = bpf_get_current_pid_tgid();
    __builtin_memset(e, 0, sizeof(*e));
    e->ts = bpf_ktime_get_ns();
    e->tgid = id >> 32;
    e->tid = (u32)id;
    e->kind = kind;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    return e;
}

// (BCC 0.26 cannot pass the ring to bpf_ringbuf_query, so the wakeup policy
// cannot depend on how full the ring is: it is fixed at build time.)
static __always_inline void submit(struct event *e) {
    events.ringbuf_submit(e, SUBMIT_FLAGS);
}

// ---- arch_prctl -------------------------------------------------------------

struct prctl_call {
    u64 arg2;
    u32 option;
};
// Keyed by thread id from entry to exit; LRU so a thread killed inside the
// syscall cannot leak an entry for good.
BPF_TABLE("lru_hash", u32, struct prctl_call, prctl_calls, 4096);

int on_enter_arch_prctl(struct tracepoint__syscalls__sys_enter_arch_prctl *args) {
    u32 option = args->option;
    if (option < ARCH_GET_XCOMP_SUPP || option > ARCH_REQ_XCOMP_GUEST_PERM)
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    struct prctl_call call = {.arg2 = args->arg2, .option = option};
    prctl_calls.update(&tid, &call);
    return 0;
}

int on_exit_arch_prctl(struct tracepoint__syscalls__sys_exit_arch_prctl *args) {
    u32 tid = bpf_get_current_pid_tgid();
    struct prctl_call *call = prctl_calls.lookup(&tid);
    if (!call)
        return 0;
    struct prctl_call c = *call;
    prctl_calls.delete(&tid);

    struct event *e = reserve(EV_PERM);
    if (!e)
        return 0;
    e->op = c.option;
    e->ret = args->ret;
    if (c.option == ARCH_REQ_XCOMP_PERM || c.option == ARCH_REQ_XCOMP_GUEST_PERM) {
        e->value = c.arg2;  // the xfeature number, whole: any value can be asked for
    } else if (e->ret == 0) {
        // A successful GET wrote the mask to user memory at arg2.
        if (bpf_probe_read_user(&e->value, sizeof(e->value), (void *)c.arg2) == 0)
            e->flags |= F_VALUE;
    }
#ifdef WITH_GUEST_PERM
    // check1: guest_perm.__state_perm, lock flag (bit 63) included.
    void *leader = 0;
    bpf_probe_read_kernel(&leader, sizeof(leader), (char *)bpf_get_current_task() + OFF_TASK_GROUP_LEADER);
    if (leader && bpf_probe_read_kernel(&e->check1, sizeof(e->check1), (char *)leader + OFF_TASK_GUEST_PERM) == 0)
        e->flags |= F_CHECKED;
#endif
    submit(e);
    return 0;
}

// ---- KVM ioctls -------------------------------------------------------------
#ifdef WITH_KVM_IOCTL

#define KVM_MAX_CPUID_ENTRIES 256
#define KVM_MAX_XCRS 16

static __always_inline void *read_ptr(void *base, u64 off) {
    void *p = 0;
    bpf_probe_read_kernel(&p, sizeof(p), (char *)base + off);
    return p;
}

// current->files->fdt->fd[fd] (no RCU lock is possible here; the ioctl holds
// a reference to this file, and a racing close only makes the read fail).
static __always_inline void *fd_file(u32 fd) {
    void *task = (void *)bpf_get_current_task();
    void *files = read_ptr(task, OFF_TASK_FILES);
    void *fdt = read_ptr(files, OFF_FILES_FDT);
    u32 max_fds = 0;
    bpf_probe_read_kernel(&max_fds, sizeof(max_fds), (char *)fdt + OFF_FDTABLE_MAX_FDS);
    if (!fdt || fd >= max_fds)
        return 0;
    void **fds = read_ptr(fdt, OFF_FDTABLE_FD);
    return read_ptr(fds, (u64)fd * sizeof(void *));
}

// The file's private_data if it is a KVM anon-inode file whose dentry name
// starts with `want` ("kvm-vm" or "kvm-vcpu:"): the ioctl numbers alone are
// not unique to KVM, and the fops symbols are not in kallsyms here.
static __always_inline void *kvm_file_data(u32 fd, int vcpu) {
    void *file = fd_file(fd);
    if (!file)
        return 0;
    void *dentry = read_ptr(file, OFF_FILE_DENTRY);
    const char *name = read_ptr(dentry, OFF_DENTRY_NAME);
    char buf[10] = {};
    if (!name || bpf_probe_read_kernel_str(buf, sizeof(buf), name) < 0)
        return 0;
    if (buf[0] != 'k' || buf[1] != 'v' || buf[2] != 'm' || buf[3] != '-')
        return 0;
    if (vcpu) {
        if (buf[4] != 'v' || buf[5] != 'c' || buf[6] != 'p' || buf[7] != 'u' || buf[8] != ':')
            return 0;
    } else if (buf[4] != 'v' || buf[5] != 'm' || buf[6] != 0) {
        return 0;
    }
    return read_ptr(file, OFF_FILE_PRIVATE_DATA);
}

struct ioctl_call {
    void *obj;     // struct kvm * (KVM_CREATE_VCPU) or struct kvm_vcpu *
    u64 value;
    u32 cmd;
    s32 arg;
    u32 flags;
};
BPF_TABLE("lru_hash", u32, struct ioctl_call, ioctl_calls, 4096);

int on_enter_ioctl(struct tracepoint__syscalls__sys_enter_ioctl *args) {
    u32 cmd = args->cmd;
    if (cmd != KVM_CREATE_VCPU && cmd != KVM_SET_CPUID2 && cmd != KVM_SET_XCRS)
        return 0;
    struct ioctl_call call = {.cmd = cmd};
    call.obj = kvm_file_data(args->fd, cmd != KVM_CREATE_VCPU);
    if (!call.obj)
        return 0;
    char *uarg = (char *)args->arg;

    if (cmd == KVM_CREATE_VCPU) {
        call.arg = args->arg;  // the requested vCPU id
    } else if (cmd == KVM_SET_CPUID2) {
        // struct kvm_cpuid2 {u32 nent, padding; struct kvm_cpuid_entry2 entries[]}
        // entry2 (40 bytes): function@0 index@4 flags@8 eax@12 ebx@16 ecx@20 edx@24.
        u32 nent = 0;
        bpf_probe_read_user(&nent, sizeof(nent), uarg);
#pragma clang loop unroll(disable)
        for (u32 i = 0; i < KVM_MAX_CPUID_ENTRIES; i++) {
            if (i >= nent)
                break;
            char *ent = uarg + 8 + i * 40;
            u32 fi[2] = {};
            if (bpf_probe_read_user(fi, sizeof(fi), ent) != 0)
                break;
            if (fi[0] == 0xd && fi[1] == 0) {
                u32 eax = 0, edx = 0;
                bpf_probe_read_user(&eax, sizeof(eax), ent + 12);
                bpf_probe_read_user(&edx, sizeof(edx), ent + 24);
                call.value = ((u64)edx << 32) | eax;
                call.flags |= F_VALUE;
                break;
            }
        }
    } else {
        // struct kvm_xcrs {u32 nr_xcrs, flags; struct kvm_xcr {u32 xcr, reserved; u64 value} xcrs[16]; ...}
        // KVM applies the first entry with xcr == 0 (XCR0) only.
        u32 nr = 0;
        bpf_probe_read_user(&nr, sizeof(nr), uarg);
#pragma clang loop unroll(disable)
        for (u32 i = 0; i < KVM_MAX_XCRS; i++) {
            if (i >= nr)
                break;
            char *x = uarg + 8 + i * 16;
            u32 xcr = 1;
            if (bpf_probe_read_user(&xcr, sizeof(xcr), x) != 0)
                break;
            if (xcr == 0) {
                bpf_probe_read_user(&call.value, sizeof(call.value), x + 8);
                call.flags |= F_VALUE;
                break;
            }
        }
        if (!(call.flags & F_VALUE))
            return 0;  // no XCR0 in the array: nothing is written
    }
    u32 tid = bpf_get_current_pid_tgid();
    ioctl_calls.update(&tid, &call);
    return 0;
}

int on_exit_ioctl(struct tracepoint__syscalls__sys_exit_ioctl *args) {
    u32 tid = bpf_get_current_pid_tgid();
    struct ioctl_call *p = ioctl_calls.lookup(&tid);
    if (!p)
        return 0;
    struct ioctl_call c = *p;
    ioctl_calls.delete(&tid);
    long ret = args->ret;

    u32 kind = c.cmd == KVM_CREATE_VCPU ? EV_VCPU_CREATE : c.cmd == KVM_SET_CPUID2 ? EV_CPUID : EV_XCR0;
    struct event *e = reserve(kind);
    if (!e)
        return 0;
    e->op = c.cmd;
    e->value = c.value;
    e->flags = c.flags;
    if (c.cmd == KVM_CREATE_VCPU) {
        e->vm = (u64)c.obj;
        e->arg = c.arg;
        e->ret = ret < 0 ? ret : 0;  // the ioctl returns the new fd
        void *vcpu = ret >= 0 ? kvm_file_data(ret, 1) : 0;
        if (vcpu) {
            // Cross-check through the new fd: same VM, same id.
            e->check1 = (u64)read_ptr(vcpu, OFF_VCPU_KVM);
            bpf_probe_read_kernel(&e->check3, sizeof(e->check3), (char *)vcpu + OFF_VCPU_ID);
            e->flags |= F_CHECKED;
        }
    } else {
        void *vcpu = c.obj;
        e->ret = ret;
        e->vm = (u64)read_ptr(vcpu, OFF_VCPU_KVM);
        bpf_probe_read_kernel(&e->arg, sizeof(e->arg), (char *)vcpu + OFF_VCPU_ID);
        if (c.cmd == KVM_SET_CPUID2) {
            // What KVM derived: guest_supported_xcr0, and the guest FPU buffer.
            bpf_probe_read_kernel(&e->check1, sizeof(e->check1), (char *)vcpu + OFF_VCPU_GUEST_SUPPORTED_XCR0);
            void *fps = read_ptr(vcpu, OFF_VCPU_GUEST_FPSTATE);
            bpf_probe_read_kernel(&e->check2, sizeof(e->check2), (char *)fps + OFF_FPSTATE_XFEATURES);
            bpf_probe_read_kernel(&e->check3, sizeof(e->check3), (char *)fps + OFF_FPSTATE_SIZE);
        } else {
            bpf_probe_read_kernel(&e->check1, sizeof(e->check1), (char *)vcpu + OFF_VCPU_XCR0);
        }
        e->flags |= F_CHECKED;
    }
    submit(e);
    return 0;
}

#endif  // WITH_KVM_IOCTL
