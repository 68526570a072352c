// KVM ioctls, seen at sys_enter_ioctl (what userspace asks: the ioctl's user
// struct) and sys_exit_ioctl (the result, and kernel state read back).
// Filtered in the kernel twice: by ioctl number, then by the file (a KVM VM
// or vCPU anon-inode file, see kvm_file_data), so that other ioctls cost
// a compare and a table lookup at exit.
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

// Reads the user struct of a call at entry. Returns 0 when the call writes
// nothing the agent reports (no record at exit).
static __always_inline int read_call_args(struct ioctl_call *call, char *uarg) {
    u32 cmd = call->cmd;
    if (cmd == KVM_SET_CPUID2) {
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
                call->value = ((u64)edx << 32) | eax;
                call->flags |= F_VALUE;
                break;
            }
        }
        return 1;
    }
    if (cmd == KVM_SET_XCRS) {
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
                bpf_probe_read_user(&call->value, sizeof(call->value), x + 8);
                call->flags |= F_VALUE;
                break;
            }
        }
        return call->flags & F_VALUE;  // no XCR0 in the array: nothing is written
    }
#ifdef WITH_KVM_MSRS
    if (cmd == KVM_SET_MSRS) {
        // struct kvm_msrs {u32 nmsrs, pad; struct kvm_msr_entry {u32 index, reserved; u64 data} entries[]}
        // The first XFD and the first XFD_ERR entry are reported (a VMM
        // writes each MSR once per call).
        u32 n = 0;
        bpf_probe_read_user(&n, sizeof(n), uarg);
        call->idx1 = call->idx2 = -1;
#pragma clang loop unroll(disable)
        for (u32 i = 0; i < KVM_MAX_IO_MSRS; i++) {
            if (i >= n)
                break;
            char *ent = uarg + 8 + i * 16;
            u32 index = 0;
            if (bpf_probe_read_user(&index, sizeof(index), ent) != 0)
                break;
            if (index == MSR_IA32_XFD && call->idx1 < 0) {
                call->idx1 = i;
                bpf_probe_read_user(&call->value, sizeof(call->value), ent + 8);
            } else if (index == MSR_IA32_XFD_ERR && call->idx2 < 0) {
                call->idx2 = i;
                bpf_probe_read_user(&call->value2, sizeof(call->value2), ent + 8);
            }
        }
        return call->idx1 >= 0 || call->idx2 >= 0;
    }
#endif
#ifdef WITH_KVM_XSAVE
    if (cmd == KVM_GET_XSAVE || cmd == KVM_GET_XSAVE2 || cmd == KVM_SET_XSAVE) {
        // KVM_GET_XSAVE copies struct kvm_xsave (4096 bytes). KVM_GET_XSAVE2
        // and KVM_SET_XSAVE copy guest_fpu.uabi_size bytes: the vCPU's
        // buffer in the standard format, at least 4096 (what
        // KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) tells the VMM to allocate).
        call->size = cmd == KVM_GET_XSAVE ? KVM_XSAVE_SIZE : read_u32(call->obj, OFF_VCPU_GUEST_FPU_UABI_SIZE);
        call->uarg = (u64)uarg;
        if (cmd == KVM_SET_XSAVE) {  // what userspace asks to load
            if (bpf_probe_read_user(&call->value, sizeof(call->value), uarg + XSAVE_HDR_XSTATE_BV) == 0)
                call->flags |= F_VALUE;
            bpf_probe_read_user(&call->value2, sizeof(call->value2), uarg + XSAVE_HDR_XCOMP_BV);
        }
        return 1;
    }
#endif
    return 1;
}

// What a KVM ioctl number is called on: 1 a vCPU fd, 0 a VM fd, -1 /dev/kvm
// (KVM_CREATE_VM: the new VM's fd is checked at exit), -2 not a call
// recorded here.
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
#ifdef WITH_KVM_RUN
    case KVM_RUN:
#endif
        return 1;
    default:
        return -2;
    }
}

// Record a call on `obj` (the struct kvm_vcpu or struct kvm the fd stands
// for; 0 for /dev/kvm) until its exit.
static __always_inline int begin_call(void *obj, u32 cmd, u64 arg) {
    struct ioctl_call call = {.cmd = cmd, .obj = obj};
    if (cmd == KVM_CREATE_VCPU)
        call.arg = arg;  // the requested vCPU id
    else if (cmd != KVM_CREATE_VM && cmd != KVM_RUN && !read_call_args(&call, (char *)arg))
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    ioctl_calls.update(&tid, &call);
    return 0;
}

#ifndef KPROBES
static __always_inline int enter_ioctl(u32 fd, u32 cmd, u64 arg) {
    // Every ioctl of the host comes here: reject non-KVM numbers (type 0xAE) first.
    if (((cmd >> 8) & 0xff) != 0xAE)
        return 0;
    int target = ioctl_target(cmd);
    if (target == -2)
        return 0;
    void *obj = 0;
    if (target >= 0) {
        obj = kvm_file_data(fd, target);
        if (!obj)
            return 0;
    }
    return begin_call(obj, cmd, arg);
}
#endif

#ifdef WITH_KVM_MSRS
// One record per reported KVM_SET_MSRS entry. KVM_SET_MSRS returns how many
// entries it set: it stops at the first entry KVM refuses. So for an entry
// at index i: i < ret took effect (ret 0); i == ret was refused. KVM gives
// no errno for one MSR (its set_msr answers 1, what a guest would get as
// #GP), so a refused entry is reported as -1 (-EPERM: not accepted), in the
// event format's negative-errno convention. Entries after it (i > ret) were
// never tried: no write happened, no record. A negative ret (-E2BIG,
// -EFAULT, ...) failed before any entry: each is reported with that errno.
static __always_inline void msr_record(struct ioctl_call *c, u32 kind, s32 idx, u64 value, long ret) {
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
    struct event *e = reserve(kind);
    if (!e)
        return;
    set_vcpu(e, c->obj);
    e->op = KVM_SET_MSRS;
    e->value = value;
    e->ret = r;
    e->check1 = ret;  // the ioctl's own result
    e->check2 = idx;
    e->flags = F_VALUE;
    submit(e);
}
#endif

static __always_inline int exit_ioctl(long ret) {
    u32 tid = bpf_get_current_pid_tgid();
    struct ioctl_call *p = ioctl_calls.lookup(&tid);
    if (!p)
        return 0;
    struct ioctl_call c = *p;
    ioctl_calls.delete(&tid);
    if (c.cmd == KVM_RUN) {
#if defined(WITH_GUEST_XCR0) && !defined(KPROBES)
        xsetbv_end(0);  // an XSETBV still pending: KVM is done with it now
#endif
        return 0;
    }

    if (c.cmd == KVM_CREATE_VM) {
        void *kvm = ret >= 0 ? kvm_file_data(ret, 0) : 0;
        if (!kvm)
            return 0;  // failed, or not /dev/kvm
        struct event *e = reserve(EV_VM_CREATE);
        if (!e)
            return 0;
        e->op = c.cmd;
        e->vm = (u64)kvm;
        submit(e);
        return 0;
    }
#ifdef WITH_KVM_MSRS
    if (c.cmd == KVM_SET_MSRS) {
#ifdef KPROBES
        // The kprobe backend reports each entry KVM tried from
        // kvm_set_msr_common; here only a call refused as a whole (ret < 0:
        // -E2BIG, -EFAULT, ... before any entry was tried).
        if (ret >= 0)
            return 0;
#endif
        // In entry order, as KVM applied them.
        if (c.idx2 >= 0 && (c.idx1 < 0 || c.idx2 < c.idx1)) {
            msr_record(&c, EV_XFD_ERR, c.idx2, c.value2, ret);
            msr_record(&c, EV_XFD, c.idx1, c.value, ret);
        } else {
            msr_record(&c, EV_XFD, c.idx1, c.value, ret);
            msr_record(&c, EV_XFD_ERR, c.idx2, c.value2, ret);
        }
        return 0;
    }
#endif
#ifdef WITH_KVM_XSAVE
    if (c.cmd == KVM_GET_XSAVE || c.cmd == KVM_GET_XSAVE2 || c.cmd == KVM_SET_XSAVE) {
        struct event *e = reserve(EV_XSAVE);
        if (!e)
            return 0;
        set_vcpu(e, c.obj);
        e->op = c.cmd;
        e->ret = ret;
        e->size = c.size;
        if (c.cmd == KVM_SET_XSAVE) {
            e->value = c.value;
            e->check1 = c.value2;
            e->flags = c.flags;
        } else if (ret == 0) {
            // The kernel filled the user buffer: read its XSAVE header now.
            char *uarg = (char *)c.uarg;
            if (bpf_probe_read_user(&e->value, sizeof(e->value), uarg + XSAVE_HDR_XSTATE_BV) == 0)
                e->flags |= F_VALUE;
            bpf_probe_read_user(&e->check1, sizeof(e->check1), uarg + XSAVE_HDR_XCOMP_BV);
        }
        submit(e);
        return 0;
    }
#endif

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
        void *vcpu = c.obj;
        e->ret = ret;
        set_vcpu(e, vcpu);
        if (c.cmd == KVM_SET_CPUID2) {
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
