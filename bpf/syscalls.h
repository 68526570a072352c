// The syscalls: raw_syscalls:sys_enter(struct pt_regs *regs, long id) and
// sys_exit(struct pt_regs *regs, long ret), which run for every syscall of
// the host, so each returns at once unless the number is ioctl or
// arch_prctl. They cost a tenth of syscalls:sys_*_ioctl, which fill a perf
// buffer with the arguments for every ioctl. At sys_exit the syscall's
// arguments are still in its pt_regs: calls are reported there whole. What
// sys_enter does: it marks KVM_RUN (the vCPU the kvm tracepoints inside it
// belong to), and reads the arrays of KVM_SET_CPUID2 and KVM_SET_MSRS
// (kvm_ioctl.h: their loops verify apart from the record code).
//
// Each is built twice (the loader takes the first that loads): *_btf, a
// tp_btf program reading pt_regs, the task and its fd table with plain
// loads, and *_raw, a plain raw tracepoint program doing each read with
// bpf_probe_read_kernel, for kernels whose verifier refuses the former.
#define NR_IOCTL 16  // x86_64 numbers
#define NR_ARCH_PRCTL 158
#define TS_COMPAT 0x0002

// A 32-bit syscall: its numbers are i386's (16 is lchown there), its
// arguments elsewhere in pt_regs. 32-bit VMMs are not observed.
static __always_inline int compat_syscall(int direct) {
    return kload32(current_task(direct), OFF_TASK_TI_STATUS, direct) & TS_COMPAT;
}

static __always_inline int sys_exit(u64 *ctx, int direct) {
    const void *regs = (const void *)ctx[0];
    long ret = ctx[1];
    u64 nr = kload64(regs, OFF_REGS_ORIG_AX, direct);
#ifdef WITH_KVM_IOCTL
    if (nr == NR_IOCTL) {
        u32 cmd = kload64(regs, OFF_REGS_SI, direct);
        if (((cmd >> 8) & 0xff) != 0xAE || compat_syscall(direct))  // KVM's ioctl type
            return 0;
#ifdef WITH_KVM_RUN
        if (cmd == KVM_RUN) {
            struct task_ctx *t = this_task(0);
            if (t && t->running) {
                t->running = 0;
#ifdef WITH_GUEST_XCR0
                xsetbv_end(0);  // an XSETBV still pending: KVM is done with it now
#endif
            }
            return 0;
        }
#endif
        int target = ioctl_target(cmd);
        if (target == -2)
            return 0;
        struct ioctl_call c = {};
        if (read_at_entry(cmd)) {  // read by sys_enter: its fd was checked there
            if (!take_call(cmd, &c))
                return 0;
            return report_ioctl(c.obj, cmd, c.arg, ret, direct, &c);
        }
        void *obj = 0;
        if (target >= 0) {
            obj = kvm_file_data(kload64(regs, OFF_REGS_DI, direct), target, direct);
            if (!obj)
                return 0;
        }
        return report_ioctl(obj, cmd, kload64(regs, OFF_REGS_DX, direct), ret, direct, &c);
    }
#endif
#ifdef WITH_ARCH_PRCTL
    if (nr == NR_ARCH_PRCTL && !compat_syscall(direct))
        return report_arch_prctl(kload64(regs, OFF_REGS_DI, direct), kload64(regs, OFF_REGS_SI, direct), ret, direct);
#endif
    return 0;
}

#ifdef WITH_KVM_IOCTL  // (attached for the KVM sources only)
static __always_inline int sys_enter(u64 *ctx, int direct) {
    if (ctx[1] != NR_IOCTL)
        return 0;
    const void *regs = (const void *)ctx[0];
    u32 cmd = kload64(regs, OFF_REGS_SI, direct);
#ifdef WITH_KVM_RUN
    int run = cmd == KVM_RUN;
#else
    int run = 0;
#endif
    if ((!run && !read_at_entry(cmd)) || compat_syscall(direct))
        return 0;
    void *vcpu = kvm_file_data(kload64(regs, OFF_REGS_DI, direct), 1, direct);
    if (!vcpu)
        return 0;
    if (!run)
        return begin_call(vcpu, cmd, kload64(regs, OFF_REGS_DX, direct));
    struct task_ctx *t = this_task(1);
    if (t)
        t->running = vcpu;
    return 0;
}
#endif
