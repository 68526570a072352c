// Load generator for the live benchmarks (benchmarks/livebench.py compiles it
// at run time with gcc; no binary is committed).
//
//   loadgen loop getppid|fionread N REPEATS
//       REPEATS timed loops of N calls; one line per loop:
//       "ns <wall ns per call> cpu_ns <CPU ns per call>".
//   loadgen xcrs RATE SECONDS [VALUE]
//       A VMM's vCPU setup (KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_SET_CPUID2 with
//       the supported CPUID), then prints "ready" and waits for a line on
//       stdin; then KVM_SET_XCRS (XCR0 = VALUE, default 0x7) at RATE calls/s
//       (0: as fast as it can) for SECONDS; prints
//       "done sent=N ok=N failed=N elapsed_ns=N cpu_ns=N" (cpu_ns: this
//       process's CPU time during the flood), and waits for a line on
//       stdin before exiting (so that the harness reads the agent's counters
//       while this process, and its exit, are quiet).
//   loadgen churn VMS VCPUS
//       A short-lived VMM (benchmarks/soak.py): the arch_prctl XSTATE
//       permission calls, then VMS VMs of VCPUS vCPUs made and closed in turn,
//       each vCPU given one KVM_SET_XCRS and one KVM_RUN of a guest that
//       halts; then it exits.
//
// Pacing: calls are due at start + i / RATE; when ahead of schedule by more
// than 20 us the process sleeps to the next due time (timer slack 1 ns), so
// the average rate is exact and short bursts catch up after a late wakeup.

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define ARCH_GET_XCOMP_SUPP 0x1021
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define ARCH_GET_XCOMP_GUEST_PERM 0x1024
#define ARCH_REQ_XCOMP_GUEST_PERM 0x1025
#define XFEATURE_XTILEDATA 18

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

// CPU time of this process (user + system), in ns: unlike the wall clock it
// leaves out the time other processes of this shared machine ran on our CPU.
static uint64_t cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void sleep_until(uint64_t t) {
    struct timespec ts = {.tv_sec = t / 1000000000ull, .tv_nsec = t % 1000000000ull};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static void wait_line(void) {
    char buf[64];
    if (!fgets(buf, sizeof(buf), stdin))
        exit(0);
}

static int loop(const char *what, long n, int repeats) {
    int pipefd[2];
    if (pipe(pipefd) != 0) {
        perror("pipe");
        return 1;
    }
    int fionread = strcmp(what, "fionread") == 0;
    if (!fionread && strcmp(what, "getppid") != 0) {
        fprintf(stderr, "unknown loop %s\n", what);
        return 2;
    }
    for (int r = 0; r < repeats; r++) {
        int avail;
        uint64_t c0 = cpu_ns(), t0 = now_ns();
        if (fionread) {
            for (long i = 0; i < n; i++)
                ioctl(pipefd[0], FIONREAD, &avail);
        } else {
            for (long i = 0; i < n; i++)
                syscall(SYS_getppid);  // the raw syscall: glibc may not cache it, but be sure
        }
        uint64_t t1 = now_ns(), c1 = cpu_ns();
        printf("ns %.2f cpu_ns %.2f\n", (double)(t1 - t0) / n, (double)(c1 - c0) / n);
        fflush(stdout);
    }
    return 0;
}

// KVM_CREATE_VM, then `n` vCPUs, each with KVM_SET_CPUID2 of what KVM supports
// (the kernel sizes the guest FPU buffer there). Returns the VM's fd and the
// vCPUs' in vcpus[], or -1 after printing why.
static int make_vm(int kvm, int n, int *vcpus) {
    static struct kvm_cpuid2 *cpuid;
    if (!cpuid) {
        int nent = 256;
        cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
        cpuid->nent = nent;
        if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) {
            perror("KVM_GET_SUPPORTED_CPUID");
            return -1;
        }
    }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) {
        perror("KVM_CREATE_VM");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        vcpus[i] = ioctl(vm, KVM_CREATE_VCPU, i);
        if (vcpus[i] < 0) {
            perror("KVM_CREATE_VCPU");
            return -1;
        }
        if (ioctl(vcpus[i], KVM_SET_CPUID2, cpuid) < 0) {
            perror("KVM_SET_CPUID2");
            return -1;
        }
    }
    return vm;
}

static void set_xcr0(struct kvm_xcrs *x, uint64_t value) {
    memset(x, 0, sizeof(*x));
    x->nr_xcrs = 1;
    x->xcrs[0].xcr = 0;
    x->xcrs[0].value = value;
}

static int xcrs(double rate, double seconds, uint64_t value) {
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        perror("/dev/kvm");
        return 1;
    }
    int vcpu;
    if (make_vm(kvm, 1, &vcpu) < 0)
        return 1;
    struct kvm_xcrs x;
    set_xcr0(&x, value);

    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    printf("ready\n");
    fflush(stdout);
    wait_line();

    uint64_t sent = 0, ok = 0, failed = 0;
    uint64_t c0 = cpu_ns(), t0 = now_ns(), end = t0 + (uint64_t)(seconds * 1e9), t = t0;
    double period = rate > 0 ? 1e9 / rate : 0;
    while (t < end) {
        if (rate > 0) {
            uint64_t due = t0 + (uint64_t)(sent * period);
            if (due > t + 20000) {
                sleep_until(due);
                t = now_ns();
                continue;
            }
            if (due > t) {
                t = now_ns();
                continue;
            }
        }
        if (ioctl(vcpu, KVM_SET_XCRS, &x) == 0)
            ok++;
        else
            failed++;
        sent++;
        t = now_ns();
    }
    uint64_t c = cpu_ns() - c0;
    printf("done sent=%llu ok=%llu failed=%llu elapsed_ns=%llu cpu_ns=%llu\n", (unsigned long long)sent,
           (unsigned long long)ok, (unsigned long long)failed, (unsigned long long)(t - t0),
           (unsigned long long)c);
    fflush(stdout);
    wait_line();
    return 0;
}

// A short-lived VMM: the arch_prctl permission calls, then VMS VMs made and
// closed in turn (so their vCPUs are destroyed while the process lives),
// each with VCPUS vCPUs, each vCPU given one KVM_SET_XCRS and one KVM_RUN of
// a guest that halts; then it exits.
static int churn(int vms, int nvcpus) {
    uint64_t mask;
    syscall(SYS_arch_prctl, ARCH_GET_XCOMP_SUPP, &mask);
    syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);  // refused without AMX: still an event
    syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mask);
    syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_GUEST_PERM, XFEATURE_XTILEDATA);
    syscall(SYS_arch_prctl, ARCH_GET_XCOMP_GUEST_PERM, &mask);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        perror("/dev/kvm");
        return 1;
    }
    int vcpus[64];
    if (nvcpus < 1 || nvcpus > 64) {
        fprintf(stderr, "churn: 1 to 64 vCPUs\n");
        return 2;
    }
    struct kvm_xcrs x;
    set_xcr0(&x, 0x7);
    long run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    for (int v = 0; v < vms; v++) {
        int vm = make_vm(kvm, nvcpus, vcpus);
        if (vm < 0)
            return 1;
        // A real-mode guest that halts at once: KVM_RUN loads its FPU state (fpu_load).
        size_t mem_size = 0x10000;
        unsigned char *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        mem[0x1000] = 0xf4;  // hlt
        struct kvm_userspace_memory_region region = {
            .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size, .userspace_addr = (uint64_t)mem};
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
            perror("KVM_SET_USER_MEMORY_REGION");
            return 1;
        }
        for (int i = 0; i < nvcpus; i++) {
            ioctl(vcpus[i], KVM_SET_XCRS, &x);
            struct kvm_sregs sregs;
            ioctl(vcpus[i], KVM_GET_SREGS, &sregs);
            sregs.cs.base = sregs.cs.selector = 0;
            ioctl(vcpus[i], KVM_SET_SREGS, &sregs);
            struct kvm_regs regs = {.rip = 0x1000, .rflags = 0x2};
            ioctl(vcpus[i], KVM_SET_REGS, &regs);
            void *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpus[i], 0);
            if (ioctl(vcpus[i], KVM_RUN, 0) < 0 || ((struct kvm_run *)run)->exit_reason != KVM_EXIT_HLT)
                fprintf(stderr, "churn: KVM_RUN did not halt\n");
            munmap(run, run_size);
            close(vcpus[i]);
        }
        close(vm);
        munmap(mem, mem_size);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 5 && strcmp(argv[1], "loop") == 0)
        return loop(argv[2], atol(argv[3]), atoi(argv[4]));
    if (argc >= 4 && strcmp(argv[1], "xcrs") == 0)
        return xcrs(atof(argv[2]), atof(argv[3]), argc > 4 ? strtoull(argv[4], NULL, 0) : 0x7);
    if (argc >= 4 && strcmp(argv[1], "churn") == 0)
        return churn(atoi(argv[2]), atoi(argv[3]));
    fprintf(stderr, "usage: loadgen loop getppid|fionread N REPEATS | loadgen xcrs RATE SECONDS [VALUE]"
                    " | loadgen churn VMS VCPUS\n");
    return 2;
}
