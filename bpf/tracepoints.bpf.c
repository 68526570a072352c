// Tracepoint backend (no kprobes needed): every event source of the agent
// seen through syscall, kvm and sched tracepoints.
//
// Built by agent/probes/tracepoint_backend.py with BCC, configured only by -D
// defines (cflags). The loader inlines the `#include "x.h"` files of this
// directory before BCC sees the text (program_text(): BCC rewrites map calls
// and tracepoint argument structs only in its main file):
//   EVENT_SIZE        sizeof(struct event) as the Python decoder expects it
//   RINGBUF_PAGES     ring buffer size in pages (power of two)
//   SUBMIT_FLAGS      ring buffer submit flags: BPF_RB_NO_WAKEUP (the reader
//                     polls on a timer; a wakeup per event costs the traced
//                     process ~5 us, see shared/reference/build-machine-bpf.md)
//                     or 0 (wake the reader on every event)
//   WITH_<SOURCE>     build that source (agent/probes/offsets.py GROUPS); each
//                     needs the OFF_* byte offsets it reads, resolved from the
//                     running kernel's BTF, and VCPU_REG_* indexes of
//                     kvm_vcpu_arch.regs from BTF's enum kvm_reg
//   WITH_KVM_RUN      record KVM_RUN calls (for the kvm tracepoint sources)
//   OFF_REGS_*, OFF_TASK_*  pt_regs and task fields the raw_syscalls hooks
//                     read (syscalls.h)
//   EXIT_HAS_GROUP_DEAD  sched_process_exit has the group_dead field (sched.h)
//
// Each source's logic is in its header; this file holds the entry points
// (sched.h has its own, shared with kprobes.bpf.c). BCC builds the
// `struct tracepoint__cat__event` argument layouts from tracefs, so they
// match this kernel, for the text it is given: the headers inlined into it.
// Only sources whose tracepoints exist here may be built (the loader checks).
//
// Functions are not named tracepoint__*: BCC would attach them all at load,
// and the loader attaches each one itself so that one failure is reported
// alone.

#include "common.h"

#ifdef WITH_ARCH_PRCTL
#include "arch_prctl.h"
#endif
#ifdef WITH_FPU_LOAD
#include "fpu_load.h"

int on_kvm_fpu(struct tracepoint__kvm__kvm_fpu *args) {
    return kvm_fpu(args->load);
}
#endif

#if defined(WITH_GUEST_XCR0) || defined(WITH_GUEST_MSR)
#include "kvm_guest.h"
#endif

#ifdef WITH_KVM_IOCTL
#include "kvm_ioctl.h"
#endif

#if defined(WITH_ARCH_PRCTL) || defined(WITH_KVM_IOCTL)
#include "syscalls.h"

// Each hook twice; the loader takes the first that loads (syscalls.h).
int on_sys_exit_btf(u64 *ctx) {
    return sys_exit(ctx, 1);
}

int on_sys_exit_raw(u64 *ctx) {
    return sys_exit(ctx, 0);
}

#ifdef WITH_KVM_IOCTL
int on_sys_enter_btf(u64 *ctx) {
    return sys_enter(ctx, 1);
}

int on_sys_enter_raw(u64 *ctx) {
    return sys_enter(ctx, 0);
}
#endif
#endif

#ifdef WITH_GUEST_XCR0
int on_kvm_exit(struct tracepoint__kvm__kvm_exit *args) {
    return kvm_exit(args->exit_reason, args->isa, args->guest_rip);
}

int on_kvm_entry(struct tracepoint__kvm__kvm_entry *args) {
    return kvm_entry(args->rip);
}

int on_kvm_emulate_insn(struct tracepoint__kvm__kvm_emulate_insn *args) {
    u64 insn = 0;
    __builtin_memcpy(&insn, args->insn, sizeof(insn));
    return kvm_emulate_insn(args->rip, insn, args->len, args->failed);
}

int on_kvm_inj_exception(struct tracepoint__kvm__kvm_inj_exception *args) {
    return kvm_inj_exception(args->exception);
}
#endif

#ifdef WITH_GUEST_MSR
int on_kvm_msr(struct tracepoint__kvm__kvm_msr *args) {
    return kvm_msr(args->write, args->ecx, args->data, args->exception);
}
#endif

#ifdef WITH_SCHED
// sched.h holds its tracepoint entry points too: the same in both programs.
#include "sched.h"
#endif
