// Source `fpu_load`: kvm:kvm_fpu (load) fires in KVM_RUN when the vCPU's
// guest FPU state is loaded to run the guest. It fires on every KVM_RUN, so
// a record leaves the kernel only when that vCPU's buffer (features, sizes),
// XFD or the process's guest permission changed since its last load.

struct fpu_seen {
    u64 xfeatures;       // fpstate->xfeatures: what the kernel (compacted) buffer is sized for
    u64 user_xfeatures;  // fpstate->user_xfeatures: the user-visible part of it
    u64 xfd;             // fpstate->xfd: the guest's XFD
    u64 perm;            // group leader's guest_perm.__state_perm (0 without WITH_GUEST_PERM)
    u32 size;            // fpstate->size: kernel (compacted) buffer size
    u32 user_size;       // fpstate->user_size: its size in the standard (UABI) format
};
// struct kvm_vcpu * -> state at its last load. The entry of a new vCPU is
// dropped at KVM_CREATE_VCPU (kvm_ioctl.h): a freed vCPU's address may be
// reused. LRU bounds it for vCPUs freed without our seeing.
BPF_TABLE("lru_hash", void *, struct fpu_seen, fpu_last, 16384);

// The guest FPU state of `vcpu` is being loaded: a record if it changed.
static __always_inline int fpu_load_vcpu(void *vcpu) {
    void *fps = read_ptr(vcpu, OFF_VCPU_GUEST_FPSTATE);
    if (!fps)
        return 0;
    struct fpu_seen now = {};
    now.xfeatures = read_u64(fps, OFF_FPSTATE_XFEATURES);
    now.user_xfeatures = read_u64(fps, OFF_FPSTATE_USER_XFEATURES);
    now.xfd = read_u64(fps, OFF_FPSTATE_XFD);
    now.size = read_u32(fps, OFF_FPSTATE_SIZE);
    now.user_size = read_u32(fps, OFF_FPSTATE_USER_SIZE);
    int have_perm = 0;
#ifdef WITH_GUEST_PERM
    have_perm = read_guest_perm(&now.perm) == 0;
#endif
    struct fpu_seen *last = fpu_last.lookup(&vcpu);
    if (last && last->xfeatures == now.xfeatures && last->user_xfeatures == now.user_xfeatures &&
        last->xfd == now.xfd && last->perm == now.perm && last->size == now.size &&
        last->user_size == now.user_size)
        return 0;
    struct event *e = reserve(EV_FPU_LOAD);
    if (!e)
        return 0;  // not remembered: the next load tries again
    fpu_last.update(&vcpu, &now);
    set_vcpu(e, vcpu);
    e->op = KVM_RUN;
    e->value = now.xfeatures;
    e->check1 = now.user_xfeatures;
    e->check2 = now.xfd;
    e->check3 = now.perm;
    e->check4 = now.size;
    e->size = now.user_size;
    e->flags = F_VALUE | (have_perm ? F_PERM : 0);
    submit(e);
    return 0;
}

static __always_inline int kvm_fpu(u32 load) {
    if (!load)
        return 0;
    void *vcpu = running_vcpu();
    if (!vcpu)
        return 0;
    return fpu_load_vcpu(vcpu);
}
