// Source `arch_prctl`: XSTATE permission calls (ARCH_GET/REQ_XCOMP_*),
// reported at their end: option, argument, result, and a GET's mask read
// from user memory where the kernel wrote it.

#define ARCH_GET_XCOMP_SUPP       0x1021
#define ARCH_GET_XCOMP_PERM       0x1022
#define ARCH_REQ_XCOMP_PERM       0x1023
#define ARCH_GET_XCOMP_GUEST_PERM 0x1024
#define ARCH_REQ_XCOMP_GUEST_PERM 0x1025

// Report a finished XSTATE arch_prctl(option, arg2) that returned `ret`.
static __always_inline int report_arch_prctl(u32 option, u64 arg2, long ret, int direct) {
    if (option < ARCH_GET_XCOMP_SUPP || option > ARCH_REQ_XCOMP_GUEST_PERM)
        return 0;
    struct event *e = reserve_in(EV_PERM, direct);
    if (!e)
        return 0;
    e->op = option;
    e->ret = ret;
    if (option == ARCH_REQ_XCOMP_PERM || option == ARCH_REQ_XCOMP_GUEST_PERM) {
        e->value = arg2;  // the xfeature number, whole: any value can be asked for
    } else if (e->ret == 0) {
        // A successful GET wrote the mask to user memory at arg2.
        if (bpf_probe_read_user(&e->value, sizeof(e->value), (void *)arg2) == 0)
            e->flags |= F_VALUE;
    }
#ifdef WITH_GUEST_PERM
    // check1: guest_perm.__state_perm after the call.
    if (read_guest_perm(&e->check1) == 0)
        e->flags |= F_CHECKED;
#endif
    submit(e);
    return 0;
}

#ifdef KPROBES
// Kprobe backend: the call is kept from entry to return in the thread's storage.
static __always_inline int enter_arch_prctl(u32 option, u64 arg2) {
    if (option < ARCH_GET_XCOMP_SUPP || option > ARCH_REQ_XCOMP_GUEST_PERM)
        return 0;
    struct task_ctx *t = this_task(1);
    if (t) {
        t->prctl_arg2 = arg2;
        t->prctl_option = option;
    }
    return 0;
}

static __always_inline int exit_arch_prctl(long ret) {
    struct task_ctx *t = this_task(0);
    if (!t || !t->prctl_option)
        return 0;
    u32 option = t->prctl_option;
    t->prctl_option = 0;
    return report_arch_prctl(option, t->prctl_arg2, ret, 0);
}
#endif
