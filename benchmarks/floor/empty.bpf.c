// The floor of the overhead benchmark: a BPF program that does nothing,
// attached by benchmarks/livebench.py to the same tracepoints as the agent's
// probes. What it costs is the price of having any program on those hooks
// (for syscall tracepoints: every syscall of every task takes the traced slow
// path), which no agent can go below.
//
// Not named tracepoint__*: the loader attaches it itself, to each hook.
int empty(void *ctx) {
    return 0;
}

// The same, for the raw_syscalls hooks, which the agent attaches as BTF raw
// tracepoint programs (BCC keeps one program type per function name).
int empty_raw(void *ctx) {
    return 0;
}

// The floor of any design that sends one record per KVM_SET_XCRS (-D
// RECORD_SIZE, -D RINGBUF_PAGES): on raw_syscalls:sys_enter, the cheapest
// hook, one read of the ioctl number from pt_regs (x86_64: si at 104), and
// a record reserved and submitted without wakeup, drained by a reader on
// the other CPU as the agent drains its ring. No fd walk, no map, no other
// helper: what no agent that reports every call can go below.
#ifdef RECORD_SIZE
BPF_RINGBUF_OUTPUT(records, RINGBUF_PAGES);

int record_raw(struct bpf_raw_tracepoint_args *ctx) {
    if (ctx->args[1] != 16)  // __NR_ioctl
        return 0;
    unsigned long cmd = 0;
    bpf_probe_read_kernel(&cmd, sizeof(cmd), (char *)ctx->args[0] + 104);
    if ((unsigned int)cmd != 0x4188AEA7)  // KVM_SET_XCRS
        return 0;
    u64 *r = records.ringbuf_reserve(RECORD_SIZE);
    if (!r)
        return 0;
    r[0] = bpf_ktime_get_ns();
    r[1] = bpf_get_current_pid_tgid();
    records.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    return 0;
}
#endif
