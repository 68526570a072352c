// Shared by every source of both backends (tracepoints.bpf.c, kprobes.bpf.c):
// the record sent to user space, the ring buffer and its loss counter, the
// set of watched processes, and the walk from a file descriptor to KVM's
// objects.
//
// Kernel struct fields are read only at OFF_* byte offsets given as -D
// defines, resolved from the running kernel's BTF (agent/probes/offsets.py):
// BCC compiles against Debian's 6.1 headers whatever kernel runs, so no
// kernel struct is dereferenced by type here.

#ifndef XSTATE_AGENT_COMMON_H
#define XSTATE_AGENT_COMMON_H

// Record kinds; agent/probes/decode.py maps them to agent.events.model.
#define EV_PERM        1
#define EV_VCPU_CREATE 2
#define EV_CPUID       3
#define EV_XCR0        4
#define EV_XFD         5
#define EV_XFD_ERR     6
#define EV_XSAVE       7
#define EV_FPU_LOAD    8
#define EV_EXEC        9
#define EV_EXIT        10
#define EV_VM_CREATE   11  // bookkeeping only: a new struct kvm (its address may be a freed VM's)
// Kinds only the kprobe backend sees (bpf/kp_kvm.h).
#define EV_FPSTATE      12
#define EV_PASSTHROUGH  13
#define EV_VCPU_DESTROY 14

#ifndef MSR_IA32_XFD  // (the kprobe program's headers define them too)
#define MSR_IA32_XFD     0x1c4
#define MSR_IA32_XFD_ERR 0x1c5
#endif

// event.flags
#define F_VALUE   1  // `value` holds what the kind says (GET mask read, CPUID leaf 0xD.0 found, ...)
#define F_CHECKED 2  // `check*` hold read-backs from kernel state (see decode.py per kind)
#define F_GUEST   4  // a guest instruction (XSETBV, WRMSR) rather than a host ioctl
#define F_PERM    8  // `check3` holds the group leader's guest_perm (fpu_load)
#define F_NM      16 // xfd_err saved by KVM on the guest's #NM (kprobe backend)

struct event {
    u64 ts;       // bpf_ktime_get_ns: CLOCK_MONOTONIC
    u64 value;    // the value the kind is about (see decode.py)
    u64 vm;       // struct kvm * of the VM (mapped to an opaque name in Python)
    u64 check1;   // kind-specific extra values, mostly read back from kernel state
    u64 check2;
    u64 check3;
    u64 check4;
    u32 tgid;
    u32 tid;
    u32 kind;
    u32 op;       // perm: arch_prctl option; ioctls: the ioctl number
    s32 ret;      // the result, in the event format's convention
    s32 arg;      // KVM events: vCPU id
    u32 flags;
    u32 size;     // xsave: buffer size the call used; fpu_load: guest buffer size
    char comm[16];
};
_Static_assert(sizeof(struct event) == EVENT_SIZE, "event layout differs from the Python decoder");

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
// Records dropped because the ring was full, per CPU (summed by Python).
BPF_PERCPU_ARRAY(lost, u64, 1);

#ifdef WITH_SCHED
// Processes that did XSTATE permission or KVM work (tgid -> 1): only their
// exec and exit leave the kernel. Filled at every record sent, and by the
// loader for VMMs that were running before it started. LRU: a full table
// forgets the least recently active process rather than refusing a new one.
BPF_TABLE("lru_hash", u32, u8, watched, 16384);
#endif

// A zeroed record of `kind` with its time stamp, or 0 (counted lost).
static __always_inline struct event *reserve_bare(u32 kind) {
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        int zero = 0;
        u64 *n = lost.lookup(&zero);
        if (n)
            (*n)++;
        return 0;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->ts = bpf_ktime_get_ns();
    e->kind = kind;
    return e;
}

// (BCC 0.26 cannot pass the ring to bpf_ringbuf_query, so the wakeup policy
// cannot depend on how full the ring is: it is fixed at build time.)
static __always_inline void submit(struct event *e) {
#ifdef WITH_SCHED
    // Only kinds that begin XSTATE or KVM work add the process to the
    // watched table (the loader adds VMMs that were running before it): a
    // table update on every record was a tenth of a record's cost.
    u32 k = e->kind;
    if (k == EV_PERM || k == EV_VM_CREATE || k == EV_VCPU_CREATE || k == EV_CPUID) {
        u32 tgid = e->tgid;
        u8 one = 1;
        watched.update(&tgid, &one);
    }
#endif
    events.ringbuf_submit(e, SUBMIT_FLAGS);
}

// Per thread, in task local storage (freed with its task, so no path can
// leak an entry, and cheaper than a hash keyed by thread id).
struct ioctl_call {
    void *obj;     // struct kvm_vcpu * (struct kvm * for KVM_CREATE_VCPU, 0 for KVM_CREATE_VM)
    u64 arg;       // the ioctl's argument
    u64 value;     // cpuid: CPUID.0xD.0 EDX:EAX; msrs: XFD
    u64 value2;    // msrs: XFD_ERR
    u32 cmd;       // 0: no call in flight
    u32 flags;
    s32 idx1;      // msrs: entry index of XFD (-1: none)
    s32 idx2;      // msrs: entry index of XFD_ERR (-1: none)
};
struct task_ctx {
    void *running;  // the struct kvm_vcpu * of this thread's KVM_RUN in progress, or 0
    // A KVM ioctl between its entry and its end, for what is read at entry:
    // every call on the kprobe backend (its return probes have no
    // arguments), the arrays of KVM_SET_CPUID2 and KVM_SET_MSRS on both
    // (their loops verify apart from the code that sends records).
    struct ioctl_call call;
    u64 prctl_arg2;
    u32 prctl_option;  // 0: no arch_prctl in flight
};
BPF_TASK_STORAGE(task_ctxs, struct task_ctx);

static __always_inline struct task_ctx *this_task(int create) {
    return task_ctxs.task_storage_get(bpf_get_current_task_btf(), 0, create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

// The vCPU this thread runs (inside KVM_RUN), or 0.
static __always_inline void *running_vcpu(void) {
    struct task_ctx *t = this_task(0);
    return t ? t->running : 0;
}

static __always_inline void *read_ptr(void *base, u64 off) {
    void *p = 0;
    bpf_probe_read_kernel(&p, sizeof(p), (char *)base + off);
    return p;
}

static __always_inline u64 read_u64(void *base, u64 off) {
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (char *)base + off);
    return v;
}

static __always_inline u32 read_u32(void *base, u64 off) {
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (char *)base + off);
    return v;
}

// Loads from kernel objects reached from BTF pointers (the task, pt_regs):
// plain loads in a BTF program (tp_btf: `direct`, the verifier checks them
// against the kernel's BTF), bpf_probe_read_kernel elsewhere. `direct` is a
// constant wherever these are inlined: the other branch compiles away.
static __always_inline u64 kload64(const void *base, u64 off, int direct) {
    return direct ? *(volatile const u64 *)((const char *)base + off) : read_u64((void *)base, off);
}

static __always_inline u32 kload32(const void *base, u64 off, int direct) {
    return direct ? *(volatile const u32 *)((const char *)base + off) : read_u32((void *)base, off);
}

static __always_inline void *current_task(int direct) {
    return direct ? (void *)bpf_get_current_task_btf() : (void *)bpf_get_current_task();
}

// A record of `kind` from the current thread, or 0 (counted lost). `direct`
// (BTF programs): its ids and comm by plain loads from the task, two helper
// calls fewer per record.
static __always_inline struct event *reserve_in(u32 kind, int direct) {
    struct event *e = reserve_bare(kind);
    if (!e)
        return 0;
#ifdef OFF_TASK_COMM
    if (direct) {
        const void *task = current_task(1);
        e->tid = kload32(task, OFF_TASK_PID, 1);
        e->tgid = kload32(task, OFF_TASK_TGID, 1);
        u64 comm[2] = {kload64(task, OFF_TASK_COMM, 1), kload64(task, OFF_TASK_COMM + 8, 1)};
        __builtin_memcpy(e->comm, comm, sizeof(e->comm));
        return e;
    }
#endif
    u64 id = bpf_get_current_pid_tgid();
    e->tgid = id >> 32;
    e->tid = (u32)id;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    return e;
}

static __always_inline struct event *reserve(u32 kind) {
    return reserve_in(kind, 0);
}

#ifdef WITH_GUEST_PERM
// current->group_leader's fpu.guest_perm.__state_perm, lock flag (bit 63)
// included: the permission the kernel enforces for the whole process.
static __always_inline int read_guest_perm(u64 *perm) {
    void *leader = read_ptr((void *)bpf_get_current_task(), OFF_TASK_GROUP_LEADER);
    return leader ? bpf_probe_read_kernel(perm, sizeof(*perm), (char *)leader + OFF_TASK_GUEST_PERM) : -1;
}
#endif

#ifdef WITH_KVM_IOCTL

// current->files->fdt->fd[fd] (no RCU lock is possible here; the ioctl holds
// a reference to this file, and a racing close only makes the read fail).
static __always_inline void *fd_file(u32 fd, int direct) {
    const void *files = (const void *)kload64(current_task(direct), OFF_TASK_FILES, direct);
    if (!files)
        return 0;
    const void *fdt = (const void *)kload64(files, OFF_FILES_FDT, direct);
    if (!fdt || fd >= kload32(fdt, OFF_FDTABLE_MAX_FDS, direct))
        return 0;
    void **fds = (void **)kload64(fdt, OFF_FDTABLE_FD, direct);
    return read_ptr(fds, (u64)fd * sizeof(void *));
}

// f_op of vCPU files (0) and VM files (1), learned from the first file whose
// dentry name says so: then one compare recognises a KVM file, where reading
// and comparing its name took three helper calls.
BPF_ARRAY(kvm_fops, u64, 2);

// Whether `file`'s dentry name is "kvm-vm", or starts with "kvm-vcpu:": the
// ioctl numbers alone are not unique to KVM, and the fops symbols are not in
// kallsyms.
static __always_inline int kvm_file_named(void *file, int vcpu) {
    void *dentry = read_ptr(file, OFF_FILE_DENTRY);
    const char *name = read_ptr(dentry, OFF_DENTRY_NAME);
    char buf[10] = {};
    if (!name || bpf_probe_read_kernel_str(buf, sizeof(buf), name) < 0)
        return 0;
    if (buf[0] != 'k' || buf[1] != 'v' || buf[2] != 'm' || buf[3] != '-')
        return 0;
    if (vcpu)
        return buf[4] == 'v' && buf[5] == 'c' && buf[6] == 'p' && buf[7] == 'u' && buf[8] == ':';
    return buf[4] == 'v' && buf[5] == 'm' && buf[6] == 0;
}

// The file's private_data (struct kvm_vcpu * or struct kvm *) if fd is a
// KVM vCPU (vcpu) or VM file of the current process, else 0.
static __always_inline void *kvm_file_data(u32 fd, int vcpu, int direct) {
    void *file = fd_file(fd, direct);
    if (!file)
        return 0;
    u64 f_op = 0;
    void *data = 0;
#if OFF_FILE_PRIVATE_DATA > OFF_FILE_F_OP && OFF_FILE_PRIVATE_DATA - OFF_FILE_F_OP < 64
    u64 span[(OFF_FILE_PRIVATE_DATA - OFF_FILE_F_OP) / 8 + 1] = {};  // both in one read
    if (bpf_probe_read_kernel(span, sizeof(span), (char *)file + OFF_FILE_F_OP) != 0)
        return 0;
    f_op = span[0];
    data = (void *)span[(OFF_FILE_PRIVATE_DATA - OFF_FILE_F_OP) / 8];
#else
    f_op = read_u64(file, OFF_FILE_F_OP);
    data = read_ptr(file, OFF_FILE_PRIVATE_DATA);
#endif
    u32 slot = vcpu ? 0 : 1;
    u64 *known = kvm_fops.lookup(&slot);
    if (!known || !f_op)
        return 0;
    if (*known != f_op) {
        if (!kvm_file_named(file, vcpu))
            return 0;
        *known = f_op;
    }
    return data;
}

// Fill the VM identity and vCPU id of a record from its struct kvm_vcpu.
static __always_inline void set_vcpu(struct event *e, void *vcpu) {
#if OFF_VCPU_ID > OFF_VCPU_KVM && OFF_VCPU_ID - OFF_VCPU_KVM < 64
    u64 span[(OFF_VCPU_ID - OFF_VCPU_KVM) / 8 + 1] = {};  // both in one read
    bpf_probe_read_kernel(span, sizeof(span), (char *)vcpu + OFF_VCPU_KVM);
    e->vm = span[0];
    __builtin_memcpy(&e->arg, (char *)span + (OFF_VCPU_ID - OFF_VCPU_KVM), sizeof(e->arg));
#else
    e->vm = (u64)read_ptr(vcpu, OFF_VCPU_KVM);
    bpf_probe_read_kernel(&e->arg, sizeof(e->arg), (char *)vcpu + OFF_VCPU_ID);
#endif
}

#define KVM_RUN 0xAE80

#endif  // WITH_KVM_IOCTL

#endif  // XSTATE_AGENT_COMMON_H
