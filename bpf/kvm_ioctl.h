// KVM ioctls, reported at their end with what userspace asked (the ioctl's
// user struct, read then: the kernel has copied it and the VMM does not
// change it under its own call), the result, and kernel state read back.
// The tracepoint backend sees them at raw_syscalls:sys_exit, the fd, number
// and argument still in the syscall's pt_regs (tracepoints.bpf.c); the
// kprobe backend from KVM's ioctl dispatchers (kprobes.bpf.c). Filtered in
// the kernel twice: by ioctl number, then by the file (a KVM VM or vCPU
// anon-inode file, see kvm_file_data in common.h).
//
// Sources, each built by its -D switch:
//   WITH_KVM_IOCTL  (`kvm_ioctl`) KVM_CREATE_VM (bookkeeping: a new VM),
//                   KVM_CREATE_VCPU, KVM_SET_CPUID2 (leaf 0xD.0), KVM_SET_XCRS
//   WITH_KVM_MSRS   (`kvm_msrs`) KVM_SET_MSRS entries for IA32_XFD/XFD_ERR
//   WITH_KVM_XSAVE  (`kvm_xsave`) KVM_GET_XSAVE, KVM_GET_XSAVE2, KVM_SET_XSAVE
//   WITH_KVM_RUN    KVM_RUN: no record, the vCPU for the kvm tracepoints

#define KVM_CREATE_VM   0xAE01
#define KVM_CREATE_VCPU 0xAE41
#define KVM_SET_CPUID2  0x4008AE90
#define KVM_SET_XCRS    0x4188AEA7
#define KVM_SET_MSRS    0x4008AE89
#define KVM_GET_XSAVE   0x9000AEA4
#define KVM_SET_XSAVE   0x5000AEA5
#define KVM_GET_XSAVE2  0x9000AECF

#define KVM_MAX_CPUID_ENTRIES 256
#define KVM_MAX_XCRS 16
#define KVM_MAX_IO_MSRS 256      // KVM refuses KVM_SET_MSRS with more (-E2BIG)
#define KVM_XSAVE_SIZE 4096      // sizeof(struct kvm_xsave)
#define XSAVE_HDR_XSTATE_BV 512  // the XSAVE header inside the image
#define XSAVE_HDR_XCOMP_BV 520

// Reads the arrays of KVM_SET_CPUID2 (its leaf 0xD.0: EDX:EAX, the XCR0 bits
// the guest may set) and KVM_SET_MSRS (the first XFD and XFD_ERR entries)
// into `call`, a stack copy: the loops' state stays exact there, which keeps
// the verifier's work small on every kernel (6.1 included).
static __always_inline void read_call_arrays(struct ioctl_call *call, char *uarg) {
    if (call->cmd == KVM_SET_CPUID2) {
        // struct kvm_cpuid2 {u32 nent, padding; struct kvm_cpuid_entry2 entries[]}
        // entry2 (40 bytes): function@0 index@4 flags@8 eax@12 ebx@16 ecx@20 edx@24.
        u32 nent = 0;
        bpf_probe_read_user(&nent, sizeof(nent), uarg);
#pragma clang loop unroll(disable)
        for (u32 i = 0; i < KVM_MAX_CPUID_ENTRIES; i++) {
            if (i >= nent)
                break;
            u32 ent[7] = {};
            if (bpf_probe_read_user(ent, sizeof(ent), uarg + 8 + i * 40) != 0)
                break;
            if (ent[0] == 0xd && ent[1] == 0) {
                call->value = ((u64)ent[6] << 32) | ent[3];
                call->flags |= F_VALUE;
                break;
            }
        }
        return;  // (else every way out of this loop would walk the next one)
    }
#ifdef WITH_KVM_MSRS
    if (call->cmd == KVM_SET_MSRS) {
        // struct kvm_msrs {u32 nmsrs, pad; struct kvm_msr_entry {u32 index, reserved; u64 data} entries[]}
        // The first XFD and the first XFD_ERR entry (a VMM writes each MSR once per call).
        // No test of the indexes here: the verifier would then track their
        // exact values and walk each pair of them apart (it gave up); the
        // two flags leave it four states per entry.
        u32 n = 0;
        bpf_probe_read_user(&n, sizeof(n), uarg);
        call->idx1 = call->idx2 = -1;
        int found1 = 0, found2 = 0;
#pragma clang loop unroll(disable)
        for (u32 i = 0; i < KVM_MAX_IO_MSRS; i++) {
            if (i >= n || (found1 && found2))
                break;
            u64 ent[2] = {};
            if (bpf_probe_read_user(ent, sizeof(ent), uarg + 8 + i * 16) != 0)
                break;
            u32 index = (u32)ent[0];
            if (index == MSR_IA32_XFD && !found1) {
                found1 = 1;
                call->idx1 = i;
                call->value = ent[1];
            } else if (index == MSR_IA32_XFD_ERR && !found2) {
                found2 = 1;
                call->idx2 = i;
                call->value2 = ent[1];
            }
        }
    }
#endif
}

// Whether `cmd`'s user struct is read at entry (read_call_arrays).
static __always_inline int read_at_entry(u32 cmd) {
#ifdef WITH_KVM_MSRS
    if (cmd == KVM_SET_MSRS)
        return 1;
#endif
    return cmd == KVM_SET_CPUID2;
}

// Keep a call from its entry to its end in the thread's storage, with what
// is read at entry.
static __always_inline int begin_call(void *obj, u32 cmd, u64 arg) {
    struct ioctl_call call = {.obj = obj, .arg = arg, .cmd = cmd};
    read_call_arrays(&call, (char *)arg);
    struct task_ctx *t = this_task(1);
    if (t)
        t->call = call;
    return 0;
}

// The thread's call kept since entry, if it is a `cmd` (any, if 0), taken
// out of the storage into *out.
static __always_inline int take_call(u32 cmd, struct ioctl_call *out) {
    struct task_ctx *t = this_task(0);
    if (!t || !t->call.cmd || (cmd && t->call.cmd != cmd))
        return 0;
    *out = t->call;
    t->call.cmd = 0;
    return 1;
}

// The XCR0 entry of KVM_SET_XCRS's array (KVM applies the first entry with
// xcr == 0 only). F_VALUE in *flags if there is one.
static __always_inline u64 xcrs_xcr0(char *uarg, u32 *flags) {
    // struct kvm_xcrs {u32 nr_xcrs, flags; struct kvm_xcr {u32 xcr, reserved; u64 value} xcrs[16]; ...}
    // The header and the first entry in one read: XCR0 is the first in practice.
    u32 head[6] = {};
    if (bpf_probe_read_user(head, sizeof(head), uarg) != 0)
        return 0;
    u32 nr = head[0];
    if (nr >= 1 && head[2] == 0) {
        *flags |= F_VALUE;
        return ((u64)head[5] << 32) | head[4];
    }
#pragma clang loop unroll(disable)
    for (u32 i = 1; i < KVM_MAX_XCRS; i++) {
        // Opaque to clang: else it counts the loop down from a trip count
        // the 6.1 verifier cannot bound (it gave up after 8192 branches).
        asm volatile("" : "+r"(i));
        if (i >= nr)
            break;
        u32 x[4] = {};
        if (bpf_probe_read_user(x, sizeof(x), uarg + 8 + i * 16) != 0)
            break;
        if (x[0] == 0) {
            *flags |= F_VALUE;
            return ((u64)x[3] << 32) | x[2];
        }
    }
    return 0;
}

// What a KVM ioctl number is called on: 1 a vCPU fd, 0 a VM fd, -1 /dev/kvm
// (KVM_CREATE_VM: the new VM's fd is checked at exit), -2 not a call
// reported here.
static __always_inline int ioctl_target(u32 cmd) {
    switch (cmd) {
    case KVM_CREATE_VM:
        return -1;
    case KVM_CREATE_VCPU:
        return 0;
    case KVM_SET_CPUID2:
    case KVM_SET_XCRS:
#ifdef WITH_KVM_MSRS
    case KVM_SET_MSRS:
#endif
#ifdef WITH_KVM_XSAVE
    case KVM_GET_XSAVE:
    case KVM_GET_XSAVE2:
    case KVM_SET_XSAVE:
#endif
        return 1;
    default:
        return -2;
    }
}

#ifdef WITH_KVM_MSRS
// One record per reported KVM_SET_MSRS entry. KVM_SET_MSRS returns how many
// entries it set: it stops at the first entry KVM refuses. So for an entry
// at index i: i < ret took effect (ret 0); i == ret was refused. KVM gives
// no errno for one MSR (its set_msr answers 1, what a guest would get as
// #GP), so a refused entry is reported as -1 (-EPERM: not accepted), in the
// event format's negative-errno convention. Entries after it (i > ret) were
// never tried: no write happened, no record. A negative ret (-E2BIG,
// -EFAULT, ...) failed before any entry: each is reported with that errno.
static __always_inline void msr_record(void *vcpu, u32 kind, s32 idx, u64 value, long ret, int direct) {
    s32 r;
    if (idx < 0)
        return;
    if (ret < 0)
        r = ret;
    else if (idx < ret)
        r = 0;
    else if (idx == ret)
        r = -1;
    else
        return;
    struct event *e = reserve_in(kind, direct);
    if (!e)
        return;
    set_vcpu(e, vcpu);
    e->op = KVM_SET_MSRS;
    e->value = value;
    e->ret = r;
    e->check1 = ret;  // the ioctl's own result
    e->check2 = idx;
    e->flags = F_VALUE;
    submit(e);
}

// The XFD and XFD_ERR entries found at entry, in entry order, as KVM applied them.
static __always_inline void report_msrs(void *vcpu, const struct ioctl_call *c, long ret, int direct) {
    if (c->idx2 >= 0 && (c->idx1 < 0 || c->idx2 < c->idx1)) {
        msr_record(vcpu, EV_XFD_ERR, c->idx2, c->value2, ret, direct);
        msr_record(vcpu, EV_XFD, c->idx1, c->value, ret, direct);
    } else {
        msr_record(vcpu, EV_XFD, c->idx1, c->value, ret, direct);
        msr_record(vcpu, EV_XFD_ERR, c->idx2, c->value2, ret, direct);
    }
}
#endif

// Report a finished KVM ioctl: `cmd` with argument `arg` on `obj` (the
// struct kvm_vcpu or struct kvm its fd stands for; 0 for /dev/kvm), which
// returned `ret`; `c`: what was read at its entry (read_at_entry(cmd)).
static __always_inline int report_ioctl(void *obj, u32 cmd, u64 arg, long ret, int direct,
                                        const struct ioctl_call *c) {
    char *uarg = (char *)arg;
    if (cmd == KVM_CREATE_VM) {
        void *kvm = ret >= 0 ? kvm_file_data(ret, 0, direct) : 0;
        if (!kvm)
            return 0;  // failed, or not /dev/kvm
        struct event *e = reserve_in(EV_VM_CREATE, direct);
        if (!e)
            return 0;
        e->op = cmd;
        e->vm = (u64)kvm;
        submit(e);
        return 0;
    }
#ifdef WITH_KVM_MSRS
    if (cmd == KVM_SET_MSRS) {
#ifdef KPROBES
        // The kprobe backend reports each entry KVM tried from
        // kvm_set_msr_common; here only a call refused as a whole (ret < 0:
        // -E2BIG, -EFAULT, ... before any entry was tried).
        if (ret >= 0)
            return 0;
#endif
        report_msrs(obj, c, ret, direct);
        return 0;
    }
#endif
#ifdef WITH_KVM_XSAVE
    if (cmd == KVM_GET_XSAVE || cmd == KVM_GET_XSAVE2 || cmd == KVM_SET_XSAVE) {
        struct event *e = reserve_in(EV_XSAVE, direct);
        if (!e)
            return 0;
        set_vcpu(e, obj);
        e->op = cmd;
        e->ret = ret;
        // KVM_GET_XSAVE copies struct kvm_xsave (4096 bytes). KVM_GET_XSAVE2
        // and KVM_SET_XSAVE copy guest_fpu.uabi_size bytes: the vCPU's
        // buffer in the standard format, at least 4096 (what
        // KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) tells the VMM to allocate).
        e->size = cmd == KVM_GET_XSAVE ? KVM_XSAVE_SIZE : read_u32(obj, OFF_VCPU_GUEST_FPU_UABI_SIZE);
        // SET: what userspace asked to load; GET: what the kernel wrote there.
        if (cmd == KVM_SET_XSAVE || ret == 0) {
            u64 bv[2] = {};  // XSTATE_BV, XCOMP_BV
            if (bpf_probe_read_user(bv, sizeof(bv), uarg + XSAVE_HDR_XSTATE_BV) == 0) {
                e->value = bv[0];
                e->check1 = bv[1];
                e->flags = F_VALUE;
            }
        }
        submit(e);
        return 0;
    }
#endif
    u32 flags = 0;
    u64 value = 0;
    if (cmd == KVM_SET_CPUID2) {
        value = c->value;
        flags = c->flags;
    } else if (cmd == KVM_SET_XCRS) {
        value = xcrs_xcr0(uarg, &flags);
        if (!(flags & F_VALUE))
            return 0;  // no XCR0 in the array: nothing was written
    }
    u32 kind = cmd == KVM_CREATE_VCPU ? EV_VCPU_CREATE : cmd == KVM_SET_CPUID2 ? EV_CPUID : EV_XCR0;
    struct event *e = reserve_in(kind, direct);
    if (!e)
        return 0;
    e->op = cmd;
    e->value = value;
    e->flags = flags;
    if (cmd == KVM_CREATE_VCPU) {
        e->vm = (u64)obj;
        e->arg = arg;  // the vCPU id asked for
        e->ret = ret < 0 ? ret : 0;  // the ioctl returns the new fd
        void *vcpu = ret >= 0 ? kvm_file_data(ret, 1, direct) : 0;
        if (vcpu) {
#ifdef WITH_FPU_LOAD
            // A new vCPU may sit at a freed one's address: forget that one's last load.
            fpu_last.delete(&vcpu);
#endif
            // Cross-check through the new fd: same VM, same id.
            e->check1 = (u64)read_ptr(vcpu, OFF_VCPU_KVM);
            e->check3 = read_u32(vcpu, OFF_VCPU_ID);
            e->flags |= F_CHECKED;
        }
    } else {
        void *vcpu = obj;
        e->ret = ret;
        set_vcpu(e, vcpu);
        if (cmd == KVM_SET_CPUID2) {
            // What KVM derived: guest_supported_xcr0, and the guest FPU buffer.
            e->check1 = read_u64(vcpu, OFF_VCPU_GUEST_SUPPORTED_XCR0);
            void *fps = read_ptr(vcpu, OFF_VCPU_GUEST_FPSTATE);
            e->check2 = read_u64(fps, OFF_FPSTATE_XFEATURES);
            e->check3 = read_u32(fps, OFF_FPSTATE_SIZE);
        } else {
            e->check1 = read_u64(vcpu, OFF_VCPU_XCR0);
        }
        e->flags |= F_CHECKED;
    }
    submit(e);
    return 0;
}

#ifdef KPROBES
// Kprobe backend: every call is kept from its dispatcher's entry (begin_call)
// to its return.
static __always_inline int end_call(long ret) {
    struct ioctl_call c;
    if (!take_call(0, &c))
        return 0;
    return report_ioctl(c.obj, c.cmd, c.arg, ret, 0, &c);
}
#endif
