// Guest instructions that KVM intercepts, seen through kvm tracepoints that
// fire inside KVM_RUN (the vCPU comes from the thread's KVM_RUN call).
//
// Source `guest_xcr0`: guest XSETBV, handled by KVM on one of two paths.
//   - An XSETBV VM exit (kvm:kvm_exit: VMX basic reason 55, SVM exit code
//     0x8d; the `isa` field tells which), handled by kvm_emulate_xsetbv().
//   - KVM's instruction emulator (kvm:kvm_emulate_insn with the bytes
//     0f 01 d1): guest states the CPU cannot run itself, such as real mode
//     without unrestricted guest, and every real-mode guest instruction on
//     this machine's PVM backend.
// Either way the value asked for is in the vCPU's cached registers when the
// tracepoint fires (EDX:EAX, XCR index in ECX: VMX saves the GPRs to
// vcpu->arch.regs on every exit, SVM copies RAX there before kvm_exit, the
// emulator reads them from there). The outcome is known once KVM is done
// with the instruction: at the vCPU's next kvm_entry, next emulated
// instruction, or the end of its KVM_RUN, whichever comes first. ret is 1
// if KVM injected an exception meanwhile (kvm:kvm_inj_exception: #GP for a
// refused value, #UD where CR4.OSXSAVE is clear) or arch.xcr0 does not hold
// the value; else 0 (the write took effect).
//
// Source `guest_msr` (kvm:kvm_msr): intercepted or emulated guest WRMSR to
// IA32_XFD or IA32_XFD_ERR; ret 1 when the guest got #GP instead (the
// tracepoint's `exception`). Host KVM_SET_MSRS never fires kvm_msr.

#define KVM_ISA_VMX 1
#define KVM_ISA_SVM 2
#define VMX_EXIT_XSETBV 55
#define SVM_EXIT_XSETBV 0x8d

#ifdef WITH_GUEST_XCR0
struct xsetbv_pending {
    void *vcpu;
    u64 value;  // EDX:EAX
    u64 rip;    // guest RIP of the XSETBV
    u32 fault;  // 0x100 | vector of an exception injected since, or 0
};
// Thread id -> an XSETBV KVM has not finished with. Keyed by thread: a vCPU
// runs in one KVM_RUN at a time, and KVM finishes the instruction there.
BPF_TABLE("lru_hash", u32, struct xsetbv_pending, xsetbv_pending, 4096);
// How many are pending, so that the hot tracepoints (every VM entry, every
// emulated instruction) skip the hash lookup when none is: an array lookup
// is a few instructions. May over-count if the LRU drops an entry; that only
// costs the lookup.
BPF_ARRAY(xsetbv_pending_n, s64, 1);

static __always_inline int xsetbv_none_pending(void) {
    int zero = 0;
    s64 *n = xsetbv_pending_n.lookup(&zero);
    return !n || *n <= 0;
}

static __always_inline void xsetbv_count(s64 delta) {
    int zero = 0;
    s64 *n = xsetbv_pending_n.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, delta);
}

static __always_inline void xsetbv_begin(void *vcpu, u64 rip) {
    // XSETBV with ECX != 0 names no XCR that exists: #GP, no XCR0 write.
    if ((u32)read_u64(vcpu, OFF_VCPU_REGS + 8 * VCPU_REG_RCX) != 0)
        return;
    struct xsetbv_pending p = {.vcpu = vcpu, .rip = rip};
    u64 rax = read_u64(vcpu, OFF_VCPU_REGS + 8 * VCPU_REG_RAX);
    u64 rdx = read_u64(vcpu, OFF_VCPU_REGS + 8 * VCPU_REG_RDX);
    p.value = (rdx << 32) | (u32)rax;
    u32 tid = bpf_get_current_pid_tgid();
    if (!xsetbv_pending.lookup(&tid))
        xsetbv_count(1);
    xsetbv_pending.update(&tid, &p);
}

// KVM is done with this thread's pending XSETBV, if any: send its record.
// `rip`: the guest RIP now, where the tracepoint gives it (else 0).
static __always_inline void xsetbv_end(u64 rip) {
    if (xsetbv_none_pending())
        return;
    u32 tid = bpf_get_current_pid_tgid();
    struct xsetbv_pending *p = xsetbv_pending.lookup(&tid);
    if (!p)
        return;
    struct xsetbv_pending c = *p;
    xsetbv_pending.delete(&tid);
    xsetbv_count(-1);
    struct event *e = reserve(EV_XCR0);
    if (!e)
        return;
    set_vcpu(e, c.vcpu);
    u64 xcr0 = read_u64(c.vcpu, OFF_VCPU_XCR0);
    e->value = c.value;
    e->ret = c.fault || xcr0 != c.value ? 1 : 0;
    e->check1 = xcr0;
    e->check2 = c.rip;
    e->check3 = c.fault;
    e->check4 = rip;
    e->flags = F_VALUE | F_GUEST | F_CHECKED;
    submit(e);
}

static __always_inline int kvm_exit(u32 reason, u32 isa, u64 guest_rip) {
    if (!(isa == KVM_ISA_VMX && (reason & 0xffff) == VMX_EXIT_XSETBV) &&
        !(isa == KVM_ISA_SVM && reason == SVM_EXIT_XSETBV))
        return 0;
    void *vcpu = running_vcpu();
    if (vcpu)
        xsetbv_begin(vcpu, guest_rip);
    return 0;
}

static __always_inline int kvm_entry(u64 rip) {
    xsetbv_end(rip);
    return 0;
}

// `insn`: the first 8 instruction bytes, little-endian. XSETBV is 0f 01 d1,
// after at most 4 prefixes that do not make it #UD (segment overrides,
// address size, REX); 66/f2/f3/f0 do.
static __always_inline int is_xsetbv(u64 insn, u32 len) {
#pragma clang loop unroll(full)
    for (int i = 0; i < 5; i++) {
        u32 b = insn & 0xff;
        if ((insn & 0xffffff) == 0xd1010f)
            return (u32)i + 3 <= len;
        if (b != 0x26 && b != 0x2e && b != 0x36 && b != 0x3e && b != 0x64 && b != 0x65 && b != 0x67 &&
            (b & 0xf0) != 0x40)
            return 0;
        insn >>= 8;
    }
    return 0;
}

static __always_inline int kvm_emulate_insn(u64 rip, u64 insn, u32 len, u32 failed) {
    // The instruction before this one is done (or, failed, this one is).
    xsetbv_end(rip);
    if (failed || !is_xsetbv(insn, len))
        return 0;
    void *vcpu = running_vcpu();
    if (vcpu)
        xsetbv_begin(vcpu, rip);
    return 0;
}

static __always_inline int kvm_inj_exception(u32 vector) {
    if (xsetbv_none_pending())
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    struct xsetbv_pending *p = xsetbv_pending.lookup(&tid);
    if (p && !p->fault)
        p->fault = 0x100 | vector;
    return 0;
}
#endif  // WITH_GUEST_XCR0

#ifdef WITH_GUEST_MSR
static __always_inline int kvm_msr(u32 write, u32 msr, u64 data, u8 exception) {
    if (!write)
        return 0;
    if (msr != MSR_IA32_XFD && msr != MSR_IA32_XFD_ERR)
        return 0;
    void *vcpu = running_vcpu();
    if (!vcpu)
        return 0;
    struct event *e = reserve(msr == MSR_IA32_XFD ? EV_XFD : EV_XFD_ERR);
    if (!e)
        return 0;
    set_vcpu(e, vcpu);
    e->op = msr;
    e->value = data;
    e->ret = exception ? 1 : 0;
    e->flags = F_VALUE | F_GUEST;
    submit(e);
    return 0;
}
#endif  // WITH_GUEST_MSR
