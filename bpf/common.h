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
#ifdef WITH_SCHED
    if (e->kind != EV_EXEC && e->kind != EV_EXIT) {
        u32 tgid = e->tgid;
        // A lookup first: most records come from processes already watched,
        // and a lookup is cheaper than an update.
        if (!watched.lookup(&tgid)) {
            u8 one = 1;
            watched.update(&tgid, &one);
        }
    }
#endif
    events.ringbuf_submit(e, SUBMIT_FLAGS);
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
static __always_inline void *fd_file(u32 fd) {
    void *task = (void *)bpf_get_current_task();
    void *files = read_ptr(task, OFF_TASK_FILES);
    void *fdt = read_ptr(files, OFF_FILES_FDT);
    if (!fdt || fd >= read_u32(fdt, OFF_FDTABLE_MAX_FDS))
        return 0;
    void **fds = read_ptr(fdt, OFF_FDTABLE_FD);
    return read_ptr(fds, (u64)fd * sizeof(void *));
}

// The file's private_data if it is a KVM anon-inode file whose dentry name
// is "kvm-vm" or starts with "kvm-vcpu:": the ioctl numbers alone are not
// unique to KVM, and the fops symbols are not in kallsyms here.
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

// Fill the VM identity and vCPU id of a record from its struct kvm_vcpu.
static __always_inline void set_vcpu(struct event *e, void *vcpu) {
    e->vm = (u64)read_ptr(vcpu, OFF_VCPU_KVM);
    bpf_probe_read_kernel(&e->arg, sizeof(e->arg), (char *)vcpu + OFF_VCPU_ID);
}

#endif  // WITH_KVM_IOCTL

#ifdef WITH_KVM_IOCTL
#define KVM_RUN 0xAE80

// A KVM ioctl between its sys_enter and sys_exit, keyed by thread id. The
// exit tracepoint has only the result, so what the call was about is kept
// here. For KVM_RUN it is also how the kvm tracepoints that fire inside it
// (kvm_fpu, kvm_msr, kvm_exit, kvm_entry), whose fields name no vCPU
// pointer, find the vCPU. LRU so that no path can leak an entry for good.
struct ioctl_call {
    void *obj;     // struct kvm_vcpu * (struct kvm * for KVM_CREATE_VCPU, 0 for KVM_CREATE_VM)
    u64 value;     // cpuid: CPUID.0xD.0 EDX:EAX; xcrs: XCR0; msrs: XFD; set_xsave: XSTATE_BV
    u64 value2;    // msrs: XFD_ERR; set_xsave: XCOMP_BV
    u64 uarg;      // the ioctl's user pointer
    u32 cmd;
    s32 arg;       // KVM_CREATE_VCPU: the id asked for
    u32 flags;
    u32 size;      // xsave: bytes the call copies
    s32 idx1;      // msrs: entry index of XFD (-1: none)
    s32 idx2;      // msrs: entry index of XFD_ERR (-1: none)
};
BPF_TABLE("lru_hash", u32, struct ioctl_call, ioctl_calls, 16384);

// The vCPU this thread runs (inside KVM_RUN), or 0.
static __always_inline void *running_vcpu(void) {
    u32 tid = bpf_get_current_pid_tgid();
    struct ioctl_call *c = ioctl_calls.lookup(&tid);
    return c && c->cmd == KVM_RUN ? c->obj : 0;
}
#endif

#endif  // XSTATE_AGENT_COMMON_H
