// Kprobe backend: the design card's probes, on the kernel functions that do
// the XSTATE work (KVM's XCR0 and MSR handlers, the FPU buffer allocation,
// the guest FPU swap, arch_prctl's permission code), plus the KVM ioctl
// dispatchers for what the VMM asked and the sched tracepoints for process
// lifetimes. Same records (common.h) as the tracepoint backend, so the same
// decoder turns both into spec events.
//
// Built by agent/probes/kprobe_backend.py with BCC, configured only by -D
// defines; which kernel function each source attaches to is chosen there per
// kernel (kallsyms, BTF) from ordered alternatives (kprobe_plan.py). Defines,
// besides those of tracepoints.bpf.c (EVENT_SIZE, RINGBUF_PAGES,
// SUBMIT_FLAGS, WITH_<SOURCE>, OFF_*, VCPU_REG_*, WITH_KVM_RUN,
// EXIT_HAS_GROUP_DEAD):
//   KPROBES              this program (the shared headers leave out the
//                        tracepoint backend's own paths)
//   KP_NGROUPS, GROUP_<SOURCE>  indexes of the sources in `group_on`
//   PRCTL_ARGS           2: fpu_xstate_prctl(option, arg2) (6.1+);
//                        3: fpu_xstate_prctl(tsk, option, arg2) (5.17)
//   XCR_VIA_XSETBV       guest XCR0 from kvm_emulate_xsetbv, not __kvm_set_xcr
//   FPSTATE_VIA_CALLERS  fpstate from fpu_enable_guest_xfd_features and
//                        xfd_enable_feature, not __xfd_enable_feature
//   VCPU_FROM_GFPU       vcpu_destroy from fpu_free_guest_fpstate(gfpu)
//   NM_VIA_EXIT_IRQOFF   the #NM XFD_ERR save seen from vmx_handle_exit_irqoff
//
// Entry points are named kp_* (never kprobe__*: BCC would attach those at
// load; the loader attaches each itself so that one failure is reported
// alone). Arguments are read from the registers (PT_REGS_PARM*), by the
// position the running kernel's BTF gives them.

#include <uapi/linux/ptrace.h>  // struct pt_regs, PT_REGS_*

#include "common.h"

#ifdef WITH_ARCH_PRCTL
#include "arch_prctl.h"

// fpu_xstate_prctl([tsk,] option, arg2): the XSTATE options of arch_prctl.
int kp_prctl(struct pt_regs *ctx) {
#if PRCTL_ARGS == 3
    return enter_arch_prctl((u32)PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx));
#else
    return enter_arch_prctl((u32)PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx));
#endif
}

int kp_prctl_ret(struct pt_regs *ctx) {
    return exit_arch_prctl((long)PT_REGS_RC(ctx));
}
#endif

#ifdef WITH_FPU_LOAD
#include "fpu_load.h"
#endif

#ifdef WITH_KVM_IOCTL
#include "kvm_ioctl.h"

// The ioctl dispatchers, (struct file *filp, unsigned int ioctl, unsigned
// long arg): filp->private_data is the vCPU or VM. What they were asked is
// decoded at entry and reported at return by the same code as the
// tracepoint backend's sys_enter/sys_exit_ioctl (kvm_ioctl.h).

// kvm_arch_vcpu_ioctl: KVM_SET_CPUID2, KVM_SET_XCRS, KVM_SET_MSRS,
// KVM_GET_XSAVE(2), KVM_SET_XSAVE.
int kp_arch_vcpu_ioctl(struct pt_regs *ctx) {
    u32 cmd = PT_REGS_PARM2(ctx);
    if (cmd == KVM_RUN || ioctl_target(cmd) != 1)
        return 0;
    void *vcpu = read_ptr((void *)PT_REGS_PARM1(ctx), OFF_FILE_PRIVATE_DATA);
    return vcpu ? begin_call(vcpu, cmd, PT_REGS_PARM3(ctx)) : 0;
}

// kvm_vm_ioctl: KVM_CREATE_VCPU.
int kp_vm_ioctl(struct pt_regs *ctx) {
    u32 cmd = PT_REGS_PARM2(ctx);
    if (cmd != KVM_CREATE_VCPU)
        return 0;
    void *kvm = read_ptr((void *)PT_REGS_PARM1(ctx), OFF_FILE_PRIVATE_DATA);
    return kvm ? begin_call(kvm, cmd, PT_REGS_PARM3(ctx)) : 0;
}

// kvm_dev_ioctl: KVM_CREATE_VM (a new VM: its struct kvm from the new fd at return).
int kp_dev_ioctl(struct pt_regs *ctx) {
    if ((u32)PT_REGS_PARM2(ctx) != KVM_CREATE_VM)
        return 0;
    return begin_call(0, KVM_CREATE_VM, 0);
}

// The return of each of the three.
int kp_ioctl_ret(struct pt_regs *ctx) {
    return end_call((long)PT_REGS_RC(ctx));
}

// kvm_arch_init_vm(kvm, type): a new VM, where kvm_dev_ioctl cannot be probed.
int kp_arch_init_vm(struct pt_regs *ctx) {
    struct event *e = reserve(EV_VM_CREATE);
    if (!e)
        return 0;
    e->op = KVM_CREATE_VM;
    e->vm = PT_REGS_PARM1(ctx);
    submit(e);
    return 0;
}

#ifdef WITH_KVM_RUN
// kvm_vcpu_ioctl entry, every vCPU ioctl: which vCPU the thread runs. A
// KVM_RUN is recorded (running_vcpu()) until the thread's next vCPU ioctl
// begins; it has no return probe, as it may last as long as the guest runs
// (a kretprobe instance held per running vCPU).
int kp_vcpu_ioctl(struct pt_regs *ctx) {
    void *vcpu = 0;
    if ((u32)PT_REGS_PARM2(ctx) == KVM_RUN)
        vcpu = read_ptr((void *)PT_REGS_PARM1(ctx), OFF_FILE_PRIVATE_DATA);
    struct task_ctx *t = this_task(vcpu != 0);
    if (t)
        t->running = vcpu;
    return 0;
}
#endif
#endif  // WITH_KVM_IOCTL

#include "kp_kvm.h"

#ifdef WITH_FPU_LOAD
// fpu_swap_kvm_fpstate(guest_fpu, enter_guest): the guest's FPU state is
// loaded (enter_guest) in the thread's KVM_RUN of the vCPU it belongs to.
int kp_fpu_swap(struct pt_regs *ctx) {
    if (!(u8)PT_REGS_PARM2(ctx))
        return 0;
    void *vcpu = running_vcpu();
    if (!vcpu || (char *)vcpu + OFF_VCPU_GUEST_FPU != (char *)PT_REGS_PARM1(ctx))
        return 0;
    return fpu_load_vcpu(vcpu);
}
#endif

#ifdef WITH_GUEST_XCR0
#ifdef XCR_VIA_XSETBV
int kp_set_xcr(struct pt_regs *ctx) {  // kvm_emulate_xsetbv(vcpu)
    return xsetbv_enter((void *)PT_REGS_PARM1(ctx));
}
#else
int kp_set_xcr(struct pt_regs *ctx) {  // __kvm_set_xcr(vcpu, index, xcr)
    return xcr_enter((void *)PT_REGS_PARM1(ctx), (u32)PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx));
}
#endif

int kp_set_xcr_ret(struct pt_regs *ctx) {
    return xcr_exit((long)PT_REGS_RC(ctx));
}
#endif

#if defined(WITH_KVM_MSRS) || defined(WITH_GUEST_MSR)
int kp_set_msr(struct pt_regs *ctx) {  // kvm_set_msr_common(vcpu, msr_info)
    return msr_enter((void *)PT_REGS_PARM1(ctx), (void *)PT_REGS_PARM2(ctx));
}

int kp_set_msr_ret(struct pt_regs *ctx) {
    return msr_exit((int)PT_REGS_RC(ctx));
}
#endif

#ifdef WITH_PASSTHROUGH
int kp_vendor_set_msr(struct pt_regs *ctx) {  // vmx_set_msr / svm_set_msr(vcpu, msr_info)
    return passthrough_enter((void *)PT_REGS_PARM1(ctx), (void *)PT_REGS_PARM2(ctx));
}

int kp_vendor_set_msr_ret(struct pt_regs *ctx) {
    return passthrough_exit((int)PT_REGS_RC(ctx));
}
#endif

#ifdef WITH_FPSTATE
#ifndef FPSTATE_VIA_CALLERS
int kp_xfd_enable(struct pt_regs *ctx) {  // __xfd_enable_feature(xfd_err, guest_fpu)
    return fpstate_enter((void *)PT_REGS_PARM2(ctx), PT_REGS_PARM1(ctx));
}
#else
int kp_guest_xfd_features(struct pt_regs *ctx) {  // fpu_enable_guest_xfd_features(guest_fpu, xfeatures)
    return guest_features_enter((void *)PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx));
}

int kp_host_xfd_enable(struct pt_regs *ctx) {  // xfd_enable_feature(xfd_err)
    return fpstate_enter(0, PT_REGS_PARM1(ctx));
}
#endif

int kp_xfd_enable_ret(struct pt_regs *ctx) {
    return fpstate_exit((int)PT_REGS_RC(ctx));
}
#endif

#ifdef WITH_VCPU_DESTROY
int kp_vcpu_create(struct pt_regs *ctx) {  // kvm_arch_vcpu_create(vcpu)
    return vcpu_creating((void *)PT_REGS_PARM1(ctx), 0);
}

int kp_vcpu_postcreate(struct pt_regs *ctx) {  // kvm_arch_vcpu_postcreate(vcpu): created
    return vcpu_creating((void *)PT_REGS_PARM1(ctx), 1);
}

int kp_vcpu_destroy(struct pt_regs *ctx) {
#ifdef VCPU_FROM_GFPU
    return vcpu_destroy((char *)PT_REGS_PARM1(ctx) - OFF_VCPU_GUEST_FPU);  // fpu_free_guest_fpstate(gfpu)
#else
    return vcpu_destroy((void *)PT_REGS_PARM1(ctx));  // kvm_[arch_]vcpu_destroy(vcpu)
#endif
}
#endif

#ifdef WITH_XFD_NM
int kp_nm(struct pt_regs *ctx) {  // handle_nm_fault_irqoff / vmx_handle_exit_irqoff(vcpu)
    return nm_enter((void *)PT_REGS_PARM1(ctx));
}

int kp_nm_ret(struct pt_regs *ctx) {
    return nm_exit();
}
#endif

#ifdef WITH_SCHED
// sched.h holds its tracepoint entry points too: the same in both programs.
#include "sched.h"
#endif
