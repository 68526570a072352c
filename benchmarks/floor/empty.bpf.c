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

// The same, to load as a raw tracepoint program (BCC keeps one program type
// per function name): the floor of the alternative hook raw_syscalls:sys_*,
// compared in the overhead benchmark's notes.
int empty_raw(void *ctx) {
    return 0;
}
