"""Deterministic event log of a healthy upstream (5.17+) KVM host running AMX guests.

    python benchmarks/genlog.py OUT [--events N] [--processes P] [--vcpus V] [--seed S] [--rich]

The log has N events (default 1,000,000) from P VMM processes (default 50)
owning V vCPUs in all (default 1,000, spread evenly), one VM per process.
The same arguments always give the same bytes. Every event goes through
agent.events.writer.encode, so the output is exactly what the agent writes.
Lines carry what samples/amx-guest-healthy.jsonl (the kprobe backend)
carries: `comm` on arch_prctl events, VMs named as KVM names their debugfs
directory (pid-fd); about 140 bytes a line. --rich adds `tid` and `comm` to
every event and `guest_perm` to fpu_load (about 190 bytes a line).

What a healthy host does, and so what the log holds:

- Each VMM starts with its arch_prctl calls: GET_XCOMP_SUPP, then (one VMM
  in five runs legacy guests without AMX) REQ_XCOMP_GUEST_PERM(18) and
  GET_XCOMP_GUEST_PERM. Some probe a newer feature first and get -EINVAL.
- Then, per vCPU: KVM_CREATE_VCPU, KVM_SET_CPUID2 (for AMX guests the
  kernel grows the guest FPU buffer right there), and the reset state that
  QEMU puts: XCR0 = 0x1, XFD = 0, an XSAVE image.
- A vCPU's guest boots on its first run: XSETBV, and for AMX guests the
  first (non-zero) XFD write, after which KVM stops intercepting XFD writes
  for good (a `passthrough` event). Guest XFD writes are therefore rare.
- Steady state: mostly fpu_load (every entry to the guest after the vCPU
  thread was scheduled out or went to userspace), XFD_ERR saved on #NM by a
  guest task's first AMX use and cleared again by the guest's #NM handler,
  XSETBV from vCPUs that run nested guests (L1 switches XCR0 around every
  L2 entry and exit), state syncs (KVM_GET_XSAVE2; on a put, KVM_SET_XSAVE
  and host XFD/XFD_ERR writes), VM reboots (reset state put again).
- Refused operations: nested L1s probing invalid XCR0 values (#GP),
  KVM_SET_XSAVE of images with state the vCPU lacks (-EINVAL).
- Churn: a few VMs rebooted by recreating them in the same process (as
  Cloud Hypervisor does: vCPUs destroyed, new VM, new vCPUs), and a few VMM
  processes exiting and new ones starting.

The upstream profile must find no violation in it:
`xstate-agent replay OUT` exits 0.
"""

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.events import (  # noqa: E402
    Cpuid, Exit, FpuLoad, Fpstate, Passthrough, Perm, VcpuCreate, VcpuDestroy, Xcr0, Xfd, XfdErr, Xsave,
)
from agent.events.writer import encode  # noqa: E402

# x87, SSE, AVX, AVX-512 (3 bits), PKRU: what a Sapphire Rapids host gives every guest.
BASE = 0x2E7
XTILE = 0x60000
XTILEDATA = 0x40000
AMX = BASE | XTILE
# Guest FPU buffer sizes (bytes): without and with the 8 KiB of tile data.
SIZE_BASE = 2696
SIZE_AMX = 11008
LEGACY_XSAVE = 4096

DEFAULTS = {"events": 1_000_000, "processes": 50, "vcpus": 1_000, "seed": 1}


class Done(Exception):
    """The log has all its events."""


class VCpuGen:
    __slots__ = ("proc", "vm", "id", "tid", "comm", "amx", "nested", "booted", "passthrough", "xcr0")

    def __init__(self, proc, vm, vcpu_id):
        self.proc = proc
        self.vm = vm
        self.id = vcpu_id
        self.tid = proc.tgid + 10 + vcpu_id
        self.comm = f"CPU {vcpu_id}/KVM"
        self.amx = proc.amx
        self.nested = False
        self.booted = False
        self.passthrough = False
        self.xcr0 = 1


class ProcGen:
    __slots__ = ("tgid", "amx", "comm", "vm", "vcpus", "nvcpus")

    def __init__(self, tgid, amx, nvcpus, comm):
        self.tgid = tgid
        self.amx = amx
        self.comm = comm
        self.nvcpus = nvcpus
        self.vm = None
        self.vcpus = []


class Generator:
    def __init__(self, out, events, processes, vcpus, seed, rich=False):
        if events < 0 or processes < 1 or vcpus < processes:
            raise ValueError("need events >= 0, processes >= 1 and vcpus >= processes")
        self.out = out
        self.rich = rich
        self.left = events
        self.rng = random.Random(seed)
        self.ts = 1_000_000_000_000
        self.tgids = set()
        self.procs = []
        self.vcpus = []  # every live vCPU, for the scheduler
        self.nprocs_started = 0
        per, extra = divmod(vcpus, processes)
        self.sizes = [per + (i < extra) for i in range(processes)]

    # -- output --------------------------------------------------------

    def emit(self, cls, **fields):
        if self.left <= 0:
            raise Done
        self.ts += self.rng.randint(200, 20_000)
        self.out.write(encode(cls(v=1, ts=self.ts, **fields)))
        self.left -= 1

    def vemit(self, c, cls, **fields):
        if self.rich:
            fields.update(tid=c.tid, comm=c.comm)
        self.emit(cls, tgid=c.proc.tgid, vm=c.vm, vcpu=c.id, **fields)

    # -- lifecycle -----------------------------------------------------

    def new_tgid(self):
        while True:
            tgid = self.rng.randrange(2_000, 4_000_000)
            if tgid not in self.tgids:
                self.tgids.add(tgid)
                return tgid

    def new_vm(self, p):
        # As KVM names the VM's debugfs directory: the creator's pid and the VM's fd.
        return f"{p.tgid}-{self.rng.randrange(10, 40)}"

    def start_process(self, nvcpus):
        n = self.nprocs_started
        self.nprocs_started += 1
        comm = "cloud-hypervisor" if n % 7 == 3 else "qemu-system-x86"
        p = ProcGen(self.new_tgid(), n % 5 != 4, nvcpus, comm)
        self.procs.append(p)
        pe = dict(tgid=p.tgid, tid=p.tgid, comm=p.comm)
        self.emit(Perm, option="GET_XCOMP_SUPP", mask=AMX, ret=0, **pe)
        if p.amx:
            if n % 3 == 0:
                # Probing a feature this CPU lacks: refused, nothing granted.
                self.emit(Perm, option="REQ_XCOMP_GUEST_PERM", feature=19, ret=-22, **pe)
            self.emit(Perm, option="REQ_XCOMP_GUEST_PERM", feature=18, ret=0, **pe)
            self.emit(Perm, option="GET_XCOMP_GUEST_PERM", mask=AMX, ret=0, **pe)
        else:
            self.emit(Perm, option="GET_XCOMP_GUEST_PERM", mask=BASE, ret=0, **pe)
        self.create_vm(p)

    def create_vm(self, p):
        old = p.vm
        while p.vm == old:
            p.vm = self.new_vm(p)
        p.vcpus = [VCpuGen(p, p.vm, i) for i in range(p.nvcpus)]
        for c in p.vcpus:
            # One vCPU in ten hosts nested guests (switches XCR0 a lot).
            c.nested = self.rng.random() < 0.1
            self.vemit(c, VcpuCreate, ret=0)
        for c in p.vcpus:
            self.vemit(c, Cpuid, xcr0_supported=AMX if c.amx else BASE, ret=0)
            if c.amx:
                # Upstream grows the guest buffer in KVM_SET_CPUID2 for the permitted features.
                self.vemit(c, Fpstate, guest=True, features=XTILE, size=SIZE_AMX, ret=0)
        for c in p.vcpus:
            self.reset_state(c)
        self.vcpus.extend(p.vcpus)

    def reset_state(self, c):
        """What QEMU puts into a vCPU at (re)set: XSAVE image, XCR0, MSRs."""
        self.vemit(c, Xsave, op="set", xstate_bv=0x3, size=SIZE_AMX if c.amx else LEGACY_XSAVE, ret=0)
        self.vemit(c, Xcr0, value=1, source="host", ret=0)
        c.xcr0 = 1
        if c.amx:
            self.vemit(c, Xfd, value=0, source="host", ret=0)
            self.vemit(c, XfdErr, value=0, source="host", ret=0)
        c.booted = False

    def destroy_vm(self, p):
        for c in p.vcpus:
            self.vemit(c, VcpuDestroy)
        gone = set(map(id, p.vcpus))
        self.vcpus = [c for c in self.vcpus if id(c) not in gone]
        p.vcpus = []

    def exit_process(self, p):
        self.destroy_vm(p)
        self.emit(Exit, tgid=p.tgid)
        self.procs.remove(p)

    # -- steady state --------------------------------------------------

    def fpu_load(self, c):
        if c.amx:
            # Intercepted, XFD is what was last written (0 from the reset); else the
            # guest's own: armed unless its current task uses AMX.
            xfd = XTILEDATA if c.passthrough and self.rng.random() < 0.7 else 0
            self.vemit(c, FpuLoad, guest_features=AMX, guest_size=SIZE_AMX, xfd=xfd, **self.perm(AMX))
        else:
            self.vemit(c, FpuLoad, guest_features=BASE, guest_size=SIZE_BASE, xfd=0, **self.perm(BASE))

    def perm(self, mask):
        return {"guest_perm": mask} if self.rich else {}

    def boot(self, c):
        self.fpu_load(c)  # firmware
        c.xcr0 = AMX if c.amx else BASE
        self.vemit(c, Xcr0, value=c.xcr0, source="guest", ret=0)
        if c.amx and not c.passthrough:
            # Linux arms XFD for tile data at boot; KVM then drops the write interception.
            self.vemit(c, Xfd, value=XTILEDATA, source="guest", ret=0)
            self.vemit(c, Passthrough, enabled=True)
            c.passthrough = True
        c.booted = True
        self.fpu_load(c)

    def nm(self, c):
        if not c.xcr0 & XTILEDATA:
            return self.fpu_load(c)
        # A guest task's first AMX use: #NM, XFD_ERR saved; the guest handler clears it.
        self.vemit(c, XfdErr, value=XTILEDATA, source="nm", ret=0)
        self.vemit(c, XfdErr, value=0, source="guest", ret=0)

    def xsetbv(self, c):
        full = AMX if c.amx else BASE
        r = self.rng.random()
        if r < 0.02:
            # A nested L1 probing XTILECFG alone: #GP.
            self.vemit(c, Xcr0, value=0x20007 if c.amx else 0x207, source="guest", ret=1)
            return
        c.xcr0 = 0x7 if c.xcr0 == full else full
        self.vemit(c, Xcr0, value=c.xcr0, source="guest", ret=0)

    def sync(self, c):
        size = SIZE_AMX if c.amx else LEGACY_XSAVE
        bv = (c.xcr0 & ~XTILE) | (XTILE if c.amx and self.rng.random() < 0.3 else 0)
        self.vemit(c, Xsave, op="get", xstate_bv=bv, size=size, ret=0)
        if self.rng.random() < 0.5:
            return
        # The VMM puts the state back (after a debug stop, a snapshot restore...).
        if not c.amx and self.rng.random() < 0.05:
            # A stale image with tile state for a vCPU without it: refused.
            self.vemit(c, Xsave, op="set", xstate_bv=0x40003, size=size, ret=-22)
        self.vemit(c, Xsave, op="set", xstate_bv=bv, size=size, ret=0)
        if c.amx:
            self.vemit(c, Xfd, value=0, source="host", ret=0)
            self.vemit(c, XfdErr, value=0, source="host", ret=0)
        self.fpu_load(c)

    def step(self):
        rng = self.rng
        r = rng.random()
        if r < 2e-6 * 1:
            p = rng.choice(self.procs)
            size = p.nvcpus
            self.exit_process(p)
            self.start_process(size)
            return
        if r < 2e-6 * 3:
            p = rng.choice(self.procs)
            self.destroy_vm(p)
            self.create_vm(p)
            return
        if r < 2e-6 * 3 + 1e-5:
            # A VM reboot: QEMU resets every vCPU.
            p = rng.choice(self.procs)
            for c in p.vcpus:
                self.reset_state(c)
            return
        c = self.vcpus[int(rng.random() * len(self.vcpus))]
        if not c.booted:
            return self.boot(c)
        r = rng.random()
        if c.nested:
            if r < 0.45:
                return self.xsetbv(c)
            r = (r - 0.45) / 0.55
        if r < 0.83:
            return self.fpu_load(c)
        if r < 0.93:
            return self.nm(c) if c.amx else self.fpu_load(c)
        if r < 0.97:
            return self.xsetbv(c)
        return self.sync(c)

    def run(self):
        try:
            for size in self.sizes:
                self.start_process(size)
            while True:
                self.step()
        except Done:
            pass


def generate(path, events=DEFAULTS["events"], processes=DEFAULTS["processes"],
             vcpus=DEFAULTS["vcpus"], seed=DEFAULTS["seed"], rich=False):
    """Write the log to `path` (a str or Path)."""
    with open(path, "wb", buffering=1 << 20) as out:
        Generator(out, events, processes, vcpus, seed, rich).run()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="output file ('-' for standard output)")
    ap.add_argument("--events", type=int, default=DEFAULTS["events"])
    ap.add_argument("--processes", type=int, default=DEFAULTS["processes"])
    ap.add_argument("--vcpus", type=int, default=DEFAULTS["vcpus"], help="vCPUs in all, over every process")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--rich", action="store_true",
                    help="every event with tid and comm, every fpu_load with guest_perm (longer lines)")
    a = ap.parse_args(argv)
    try:
        if a.out == "-":
            Generator(sys.stdout.buffer, a.events, a.processes, a.vcpus, a.seed, a.rich).run()
        else:
            generate(a.out, a.events, a.processes, a.vcpus, a.seed, a.rich)
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
