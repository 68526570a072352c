// Source `arch_prctl`: XSTATE permission calls (ARCH_GET/REQ_XCOMP_*), seen
// at syscall entry (option, argument) and exit (result; a GET's mask is read
// from user memory once the kernel wrote it).

#define ARCH_GET_XCOMP_SUPP       0x1021
#define ARCH_GET_XCOMP_PERM       0x1022
#define ARCH_REQ_XCOMP_PERM       0x1023
#define ARCH_GET_XCOMP_GUEST_PERM 0x1024
#define ARCH_REQ_XCOMP_GUEST_PERM 0x1025

struct prctl_call {
    u64 arg2;
    u32 option;
};
// Keyed by thread id from entry to exit; LRU so a thread killed inside the
// syscall cannot leak an entry for good.
BPF_TABLE("lru_hash", u32, struct prctl_call, prctl_calls, 4096);

static __always_inline int enter_arch_prctl(u32 option, u64 arg2) {
    if (option < ARCH_GET_XCOMP_SUPP || option > ARCH_REQ_XCOMP_GUEST_PERM)
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    struct prctl_call call = {.arg2 = arg2, .option = option};
    prctl_calls.update(&tid, &call);
    return 0;
}

static __always_inline int exit_arch_prctl(long ret) {
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
    e->ret = ret;
    if (c.option == ARCH_REQ_XCOMP_PERM || c.option == ARCH_REQ_XCOMP_GUEST_PERM) {
        e->value = c.arg2;  // the xfeature number, whole: any value can be asked for
    } else if (e->ret == 0) {
        // A successful GET wrote the mask to user memory at arg2.
        if (bpf_probe_read_user(&e->value, sizeof(e->value), (void *)c.arg2) == 0)
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
