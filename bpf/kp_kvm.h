// Kprobe backend: what KVM and the x86 FPU code do, seen from inside their
// functions (entry: the arguments; return: the result and the state they
// left). The entry points are in kprobes.bpf.c; each source is built by its
// -DWITH_<SOURCE> switch and reads kernel memory only at OFF_* offsets from
// the running kernel's BTF (agent/probes/kprobe_plan.py lists which).
//
// Calls are kept from entry to return in per-thread tables (LRU, so that a
// return the kernel missed cannot leak an entry for good). A kretprobe holds
// a kernel instance for as long as its function runs: none of the functions
// given one here runs long (KVM_RUN is seen by an entry probe only).

#define XFEATURE_MASK_USER_DYNAMIC 0x40000ULL  // XTILEDATA, in every kernel 5.16-7.2
#define PF_EXITING 0x00000004

// Sources switched on (GROUP_<SOURCE> index -> 1), set by the loader. A
// source handed back to the tracepoint backend (KprobeBackend.release) is
// switched off here when a function it shares stays attached for another.
BPF_ARRAY(group_on, u32, KP_NGROUPS);

static __always_inline int on(u32 group) {
    u32 *v = group_on.lookup(&group);
    return v && *v;
}

static __always_inline u32 current_tid(void) {
    return (u32)bpf_get_current_pid_tgid();
}

#ifdef OFF_VCPU_KVM
// The VM identity and vCPU id of a record, from its struct kvm_vcpu.
static __always_inline void kp_vcpu(struct event *e, void *vcpu) {
    e->vm = (u64)read_ptr(vcpu, OFF_VCPU_KVM);
    bpf_probe_read_kernel(&e->arg, sizeof(e->arg), (char *)vcpu + OFF_VCPU_ID);
}
#endif

static __always_inline u8 read_u8(void *base, u64 off) {
    u8 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (char *)base + off);
    return v;
}

// ---- guest XCR0 ---------------------------------------------------------------------------------
// __kvm_set_xcr(vcpu, index, xcr) validates and stores every XCR0 write: the
// guest's XSETBV (its VM exit through kvm_emulate_xsetbv, or KVM's
// instruction emulator) and the host's KVM_SET_XCRS. Inside the thread's
// KVM_RUN it is the guest's; the host's is reported by the ioctl's exit
// (kvm_ioctl), as the ioctl's result. ret: 0 the write took effect, 1 KVM
// refused it (the guest gets #GP).
// Where __kvm_set_xcr is inlined (XCR_VIA_XSETBV): kvm_emulate_xsetbv(vcpu),
// the XSETBV exit handler, with ECX and EDX:EAX from the vCPU's registers at
// entry; the outcome is whether arch.xcr0 holds the value at return. The
// emulator's XSETBV is not seen on that path.
#ifdef WITH_GUEST_XCR0
struct xcr_call {
    void *vcpu;
    u64 value;
};
BPF_TABLE("lru_hash", u32, struct xcr_call, xcr_calls, 4096);

static __always_inline int xcr_enter(void *vcpu, u32 index, u64 value) {
    if (index != 0)
        return 0;  // names no XCR that exists: #GP, no XCR0 write
    if (running_vcpu() != vcpu)
        return 0;  // KVM_SET_XCRS: the kvm_ioctl source reports it
    struct xcr_call c = {.vcpu = vcpu, .value = value};
    u32 tid = current_tid();
    xcr_calls.update(&tid, &c);
    return 0;
}

#ifdef XCR_VIA_XSETBV
static __always_inline int xsetbv_enter(void *vcpu) {
    u64 rcx = read_u64(vcpu, OFF_VCPU_REGS + 8 * VCPU_REG_RCX);
    u64 rax = read_u64(vcpu, OFF_VCPU_REGS + 8 * VCPU_REG_RAX);
    u64 rdx = read_u64(vcpu, OFF_VCPU_REGS + 8 * VCPU_REG_RDX);
    return xcr_enter(vcpu, (u32)rcx, (rdx << 32) | (u32)rax);
}
#endif

static __always_inline int xcr_exit(long rc) {
    u32 tid = current_tid();
    struct xcr_call *p = xcr_calls.lookup(&tid);
    if (!p)
        return 0;
    struct xcr_call c = *p;
    xcr_calls.delete(&tid);
    if (!on(GROUP_GUEST_XCR0))
        return 0;
    struct event *e = reserve(EV_XCR0);
    if (!e)
        return 0;
    kp_vcpu(e, c.vcpu);
    u64 xcr0 = read_u64(c.vcpu, OFF_VCPU_XCR0);
    e->value = c.value;
#ifdef XCR_VIA_XSETBV
    e->ret = xcr0 != c.value ? 1 : 0;
#else
    e->ret = rc ? 1 : 0;
#endif
    e->check1 = xcr0;  // arch.xcr0 once KVM was done with it
    e->check2 = rc;    // the function's own result
    e->flags = F_VALUE | F_GUEST | F_CHECKED;
    submit(e);
    return 0;
}
#endif  // WITH_GUEST_XCR0

// ---- IA32_XFD / IA32_XFD_ERR writes ---------------------------------------------------------------
// kvm_set_msr_common(vcpu, msr_info) handles every write of either MSR that
// KVM takes: msr_info->host_initiated tells the host's KVM_SET_MSRS entries
// (kvm_msrs: ret 0 set, -1 refused, as the tracepoint backend reports them)
// from the guest's intercepted WRMSR (guest_msr: ret 0, or 1 for the #GP the
// guest gets). It returns 0 or 1 (inject #GP / stop KVM_SET_MSRS).
#if defined(WITH_KVM_MSRS) || defined(WITH_GUEST_MSR)
struct msr_call {
    void *vcpu;
    u64 data;
    u32 index;
    u32 host;
};
BPF_TABLE("lru_hash", u32, struct msr_call, msr_calls, 4096);

static __always_inline int msr_enter(void *vcpu, void *info) {
    u32 index = read_u32(info, OFF_MSR_INDEX);
    if (index != MSR_IA32_XFD && index != MSR_IA32_XFD_ERR)
        return 0;
    struct msr_call c = {.vcpu = vcpu, .index = index};
    c.host = read_u8(info, OFF_MSR_HOST_INITIATED) != 0;
    if (!on(c.host ? GROUP_KVM_MSRS : GROUP_GUEST_MSR))
        return 0;
    c.data = read_u64(info, OFF_MSR_DATA);
    u32 tid = current_tid();
    msr_calls.update(&tid, &c);
    return 0;
}

static __always_inline int msr_exit(long rc) {
    u32 tid = current_tid();
    struct msr_call *p = msr_calls.lookup(&tid);
    if (!p)
        return 0;
    struct msr_call c = *p;
    msr_calls.delete(&tid);
    struct event *e = reserve(c.index == MSR_IA32_XFD ? EV_XFD : EV_XFD_ERR);
    if (!e)
        return 0;
    kp_vcpu(e, c.vcpu);
    e->value = c.data;
    e->check1 = rc;
    if (c.host) {
        e->op = 0x4008AE89;  // KVM_SET_MSRS
        e->ret = rc ? -1 : 0;
        e->flags = F_VALUE;
    } else {
        e->op = c.index;
        e->ret = rc ? 1 : 0;
        e->flags = F_VALUE | F_GUEST;
    }
    submit(e);
    return 0;
}
#endif

// ---- XFD write interception switched off ------------------------------------------------------------
// The vendor set_msr (vmx_set_msr) drops write interception of IA32_XFD on
// the first accepted non-zero write, guest or host, and sets
// arch.xfd_no_write_intercept for good: a record when its return finds the
// flag set that its entry found clear. It comes after the xfd record, which
// kvm_set_msr_common's return (inside it) sent.
#ifdef WITH_PASSTHROUGH
struct pt_call {
    void *vcpu;
    u32 host;
};
BPF_TABLE("lru_hash", u32, struct pt_call, pt_calls, 4096);

static __always_inline int passthrough_enter(void *vcpu, void *info) {
    if (read_u32(info, OFF_MSR_INDEX) != MSR_IA32_XFD)
        return 0;
    if (read_u8(vcpu, OFF_VCPU_XFD_NO_WRITE_INTERCEPT))
        return 0;  // on already: it is never switched back
    struct pt_call c = {.vcpu = vcpu, .host = read_u8(info, OFF_MSR_HOST_INITIATED) != 0};
    u32 tid = current_tid();
    pt_calls.update(&tid, &c);
    return 0;
}

static __always_inline int passthrough_exit(long rc) {
    u32 tid = current_tid();
    struct pt_call *p = pt_calls.lookup(&tid);
    if (!p)
        return 0;
    struct pt_call c = *p;
    pt_calls.delete(&tid);
    if (!read_u8(c.vcpu, OFF_VCPU_XFD_NO_WRITE_INTERCEPT) || !on(GROUP_PASSTHROUGH))
        return 0;
    struct event *e = reserve(EV_PASSTHROUGH);
    if (!e)
        return 0;
    kp_vcpu(e, c.vcpu);
    e->value = 1;  // enabled
    e->check1 = rc;
    e->check2 = c.host;
    e->flags = F_VALUE;
    submit(e);
    return 0;
}
#endif

// ---- FPU buffer (re)allocation for dynamic features ---------------------------------------------
// __xfd_enable_feature(xfd_err, guest_fpu) grows a buffer for the dynamic
// features in xfd_err: the vCPU's guest buffer (guest_fpu set: from
// fpu_enable_guest_xfd_features at KVM_SET_CPUID2) or the process's own
// (guest_fpu NULL: from xfd_enable_feature, the host's first #NM of AMX).
// It returns 0, -EPERM (not permitted) or -EFAULT (allocation failed). The
// size reported is the new buffer's user_size (standard format, as
// fpu_load's guest_size) at return; fpstate->size and ->xfeatures go in
// check1/check2.
// Where __xfd_enable_feature is inlined (FPSTATE_VIA_CALLERS): its two
// callers, fpu_enable_guest_xfd_features(guest_fpu, xfeatures) (features
// not in guest_fpu->xfeatures yet) and xfd_enable_feature(xfd_err).
#ifdef WITH_FPSTATE
struct fps_call {
    void *gfpu;
    u64 features;
};
BPF_TABLE("lru_hash", u32, struct fps_call, fps_calls, 4096);

static __always_inline int fpstate_enter(void *gfpu, u64 features) {
    features &= XFEATURE_MASK_USER_DYNAMIC;
    if (!features)
        return 0;  // nothing to enable: the kernel returns 0 at once
    struct fps_call c = {.gfpu = gfpu, .features = features};
    u32 tid = current_tid();
    fps_calls.update(&tid, &c);
    return 0;
}

#ifdef FPSTATE_VIA_CALLERS
static __always_inline int guest_features_enter(void *gfpu, u64 xfeatures) {
    u64 have = read_u64(gfpu, OFF_VCPU_GUEST_FPU_XFEATURES - OFF_VCPU_GUEST_FPU);
    return fpstate_enter(gfpu, xfeatures & ~have);
}
#endif

static __always_inline int fpstate_exit(long rc) {
    u32 tid = current_tid();
    struct fps_call *p = fps_calls.lookup(&tid);
    if (!p)
        return 0;
    struct fps_call c = *p;
    fps_calls.delete(&tid);
    if (!on(GROUP_FPSTATE))
        return 0;
    struct event *e = reserve(EV_FPSTATE);
    if (!e)
        return 0;
    void *fps;
    if (c.gfpu) {
        void *vcpu = (char *)c.gfpu - OFF_VCPU_GUEST_FPU;
        kp_vcpu(e, vcpu);
        fps = read_ptr(vcpu, OFF_VCPU_GUEST_FPSTATE);
        e->flags = F_GUEST;
    } else {
        fps = read_ptr((void *)bpf_get_current_task(), OFF_TASK_FPSTATE);
    }
    e->value = c.features;
    e->ret = rc;
    if (fps) {
        e->size = read_u32(fps, OFF_FPSTATE_USER_SIZE);
        e->check1 = read_u32(fps, OFF_FPSTATE_SIZE);
        e->check2 = read_u64(fps, OFF_FPSTATE_XFEATURES);
        e->flags |= F_CHECKED;
    }
    e->flags |= F_VALUE;
    submit(e);
    return 0;
}
#endif  // WITH_FPSTATE

// ---- vCPU freed -----------------------------------------------------------------------------------
// kvm_arch_vcpu_destroy(vcpu) (or kvm_vcpu_destroy, fpu_free_guest_fpstate:
// VCPU_FROM_GFPU) when the VM is freed, its last file closed. Not reported:
// a vCPU that a failed KVM_CREATE_VCPU (-EEXIST, ...) frees again (its
// vcpu_create record has the error): kvm_arch_vcpu_create marks a vCPU as
// being created, kvm_arch_vcpu_postcreate (success only) clears the mark;
// nor vCPUs freed while their process exits (PF_EXITING: the exit record,
// sent before, covers them).
#ifdef WITH_VCPU_DESTROY
BPF_TABLE("lru_hash", void *, u8, vcpus_creating, 4096);

static __always_inline int vcpu_creating(void *vcpu, int done) {
    if (done) {
        vcpus_creating.delete(&vcpu);
    } else {
        u8 one = 1;
        vcpus_creating.update(&vcpu, &one);
    }
    return 0;
}

static __always_inline int vcpu_destroy(void *vcpu) {
    if (vcpus_creating.lookup(&vcpu)) {
        vcpus_creating.delete(&vcpu);
        return 0;
    }
    void *task = (void *)bpf_get_current_task();
    if (read_u32(task, OFF_TASK_FLAGS) & PF_EXITING)
        return 0;
#ifdef WITH_FPU_LOAD
    fpu_last.delete(&vcpu);  // its address may hold the next vCPU
#endif
    if (!on(GROUP_VCPU_DESTROY))
        return 0;
    struct event *e = reserve(EV_VCPU_DESTROY);
    if (!e)
        return 0;
    kp_vcpu(e, vcpu);
    submit(e);
    return 0;
}
#endif

// ---- XFD_ERR saved on the guest's #NM -------------------------------------------------------------
// handle_nm_fault_irqoff(vcpu) (VMX, IRQs off) reads the hardware XFD_ERR
// into arch.guest_fpu.xfd_err when the guest's XFD is armed: the value at
// its return, source "nm". It is inlined in most builds (Debian 6.1, 6.12):
// NM_VIA_EXIT_IRQOFF then uses vmx_handle_exit_irqoff(vcpu), which calls it
// for an exception exit: the exit reason (vcpu_vmx.exit_reason, basic 0 =
// EXCEPTION_NMI) at entry, the interruption info (vcpu_vmx.exit_intr_info,
// cached by the exception handling) at return must say #NM (vector 7,
// hardware exception, valid). struct vcpu_vmx begins with its kvm_vcpu.
#ifdef WITH_XFD_NM
BPF_TABLE("lru_hash", u32, void *, nm_calls, 4096);

static __always_inline int nm_enter(void *vcpu) {
    void *fps = read_ptr(vcpu, OFF_VCPU_GUEST_FPSTATE);
    if (!fps || !read_u64(fps, OFF_FPSTATE_XFD))
        return 0;  // KVM saves XFD_ERR only while the guest's XFD is non-zero
#ifdef NM_VIA_EXIT_IRQOFF
    if ((read_u32(vcpu, OFF_VMX_EXIT_REASON) & 0xffff) != 0)
        return 0;
#endif
    u32 tid = current_tid();
    nm_calls.update(&tid, &vcpu);
    return 0;
}

static __always_inline int nm_exit(void) {
    u32 tid = current_tid();
    void **p = nm_calls.lookup(&tid);
    if (!p)
        return 0;
    void *vcpu = *p;
    nm_calls.delete(&tid);
#ifdef NM_VIA_EXIT_IRQOFF
    if ((read_u32(vcpu, OFF_VMX_EXIT_INTR_INFO) & 0x800007ff) != (0x80000000 | 0x300 | 7))
        return 0;
#endif
    if (!on(GROUP_XFD_NM))
        return 0;
    struct event *e = reserve(EV_XFD_ERR);
    if (!e)
        return 0;
    kp_vcpu(e, vcpu);
    e->value = read_u64(vcpu, OFF_VCPU_GUEST_FPU_XFD_ERR);
    void *fps = read_ptr(vcpu, OFF_VCPU_GUEST_FPSTATE);
    e->check1 = fps ? read_u64(fps, OFF_FPSTATE_XFD) : 0;
    e->flags = F_VALUE | F_NM;
    submit(e);
    return 0;
}
#endif  // WITH_XFD_NM
