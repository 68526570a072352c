// Source `sched`: exec and exit of processes that did XSTATE permission or
// KVM work (the `watched` table of common.h), so that the state the agent
// keeps for them can go. Every other process's exec and exit stays in the
// kernel after one hash lookup.
//
// Exit means the whole thread group: sched_process_exit fires for each
// thread. Where the tracepoint has `group_dead` (newer kernels; the loader
// reads the format and defines EXIT_HAS_GROUP_DEAD) it says so; elsewhere
// the tracepoint comes after do_exit() decremented signal->live, so a live
// count of 0 means this was the group's last thread. The group leader's own
// exit is not used: a leader may leave (pthread_exit) while threads run on.

static __always_inline int sched_exec(s32 old_pid) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!watched.lookup(&tgid))
        return 0;
    // A new program: it is watched again once it does XSTATE or KVM work.
    watched.delete(&tgid);
    struct event *e = reserve(EV_EXEC);
    if (!e)
        return 0;
    e->check1 = old_pid;
    submit(e);
    return 0;
}

// group_dead: the tracepoint's field, or 1 where it has none (EXIT_HAS_GROUP_DEAD undefined).
static __always_inline int sched_exit(int group_dead) {
    if (!group_dead)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!watched.lookup(&tgid))
        return 0;
#ifndef EXIT_HAS_GROUP_DEAD
    void *signal = read_ptr((void *)bpf_get_current_task(), OFF_TASK_SIGNAL);
    if (!signal || read_u32(signal, OFF_SIGNAL_LIVE) != 0)
        return 0;
#endif
    watched.delete(&tgid);
    struct event *e = reserve(EV_EXIT);
    if (!e)
        return 0;
    submit(e);
    return 0;
}

int on_sched_exec(struct tracepoint__sched__sched_process_exec *args) {
    return sched_exec(args->old_pid);
}

int on_sched_exit(struct tracepoint__sched__sched_process_exit *args) {
#ifdef EXIT_HAS_GROUP_DEAD
    return sched_exit(args->group_dead);
#else
    return sched_exit(1);
#endif
}
