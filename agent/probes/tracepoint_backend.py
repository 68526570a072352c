"""Loads bpf/tracepoints.bpf.c with BCC, attaches each event source's
tracepoints, and turns ring-buffer records into agent.events.model events.

Every source is a probe group (agent.probes.offsets.GROUPS) with its own
status: it is left out, with the reason, when the BTF lacks a field it reads,
when a tracepoint it needs does not exist on this kernel, when it does not
compile, or when attaching fails; the other sources still run.

Usage:
    backend = TracepointBackend(on_event)    # on_event(event, raw)
    backend.start()                          # BackendError if no source attached
    while running: backend.poll(2)           # the reader's timer: calls on_event
    backend.lost(), backend.decode_errors, backend.status, backend.timings
    backend.detach(); backend.poll(0)        # clean stop: no new records, drain the rest
    backend.close()
"""

import ctypes
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agent.probes import decode
from agent.probes.btf import BtfError, KernelBtf
from agent.probes.btfprog import BtfProgError, TpBtfProgram, tracepoint_btf_id
from agent.probes.offsets import GROUPS, IN_KVM_RUN, REQUIRES, Offsets, resolve
from agent.probes.vmnames import VmNames

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
BPF_SOURCE = BPF_DIR / "tracepoints.bpf.c"
# Where scripts/install-deps.sh merges Debian's split header trees.
DEFAULT_HEADERS = "/var/lib/xstate-agent/kernel-headers"
# Where the agent looks for tracefs; XSTATE_AGENT_TRACEFS=DIR, for tests, makes DIR the only place (BCC
# attaches through its own paths all the same).
TRACEFS_ENV = "XSTATE_AGENT_TRACEFS"
TRACEFS = ((os.environ[TRACEFS_ENV],) if TRACEFS_ENV in os.environ
           else ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"))

# group -> ((tracepoint, BPF function), ...), attached in this order. Exits
# come before entries so that no call is recorded at entry without a handler
# for its exit (kvm_entry before kvm_exit likewise). Groups with none are
# code inside another group's programs (REQUIRES) or extra reads.
# The raw_syscalls hooks are one program each, shared by the groups that
# list them (bpf/syscalls.h): sys_enter reads the arrays of KVM_SET_CPUID2
# and KVM_SET_MSRS, and marks KVM_RUN for the groups whose tracepoints fire
# inside it.
SYS_EXIT = ("raw_syscalls:sys_exit", "on_sys_exit")
SYS_ENTER = ("raw_syscalls:sys_enter", "on_sys_enter")
PROBES = {
    "arch_prctl": (SYS_EXIT,),
    "guest_perm": (),
    "kvm_ioctl": (SYS_EXIT, SYS_ENTER),
    "kvm_msrs": (),
    "kvm_xsave": (),
    "fpu_load": (SYS_ENTER, ("kvm:kvm_fpu", "on_kvm_fpu")),
    "guest_xcr0": (SYS_ENTER, ("kvm:kvm_entry", "on_kvm_entry"), ("kvm:kvm_inj_exception", "on_kvm_inj_exception"),
                   ("kvm:kvm_emulate_insn", "on_kvm_emulate_insn"), ("kvm:kvm_exit", "on_kvm_exit")),
    "guest_msr": (SYS_ENTER, ("kvm:kvm_msr", "on_kvm_msr")),
    "sched": (("sched:sched_process_exit", "on_sched_exit"),
              ("sched:sched_process_exec", "on_sched_exec")),
}
assert PROBES.keys() == GROUPS.keys()

# Event kinds each group produces (doctor, metrics: which kinds the agent is
# blind to). guest_perm adds a field (fpu_load.guest_perm, and a read-back to
# perm records), no kind. The tracepoint backend has no source for
# vcpu_destroy, fpstate and passthrough: no tracepoint shows them.
KINDS = {
    "arch_prctl": ("perm",),
    "guest_perm": (),
    "kvm_ioctl": ("vcpu_create", "cpuid", "xcr0"),
    "kvm_msrs": ("xfd", "xfd_err"),
    "kvm_xsave": ("xsave",),
    "fpu_load": ("fpu_load",),
    "guest_xcr0": ("xcr0",),
    "guest_msr": ("xfd", "xfd_err"),
    "sched": ("exec", "exit"),
}
assert KINDS.keys() == PROBES.keys()
# What a group reports, in words, for status listings.
REPORTS = {
    "arch_prctl": "perm",
    "guest_perm": "guest_perm of fpu_load (and perm read-backs)",
    "kvm_ioctl": "vcpu_create, cpuid, host xcr0",
    "kvm_msrs": "host xfd, xfd_err",
    "kvm_xsave": "xsave",
    "fpu_load": "fpu_load",
    "guest_xcr0": "guest xcr0 (XSETBV)",
    "guest_msr": "guest xfd, xfd_err (WRMSR)",
    "sched": "exec, exit",
}


@dataclass
class Status:
    """Per probe group: attached, or why not."""
    attached: bool = False
    reason: str | None = None
    tracepoints: tuple[str, ...] = ()


@dataclass
class Timings:
    btf_s: float = 0.0
    compile_s: float = 0.0  # BPF(): clang + map creation (all compile attempts)
    attach_s: float = 0.0  # program loads (verifier) + tracepoint attach


class BackendError(Exception):
    pass


def bcc_available() -> str | None:
    """None if BCC can be imported, else why not."""
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return f"BCC's Python binding is not importable ({e}); install python3-bpfcc (scripts/install-deps.sh)"
    return None


def tracefs_root() -> str | None:
    for root in TRACEFS:
        if os.path.isdir(os.path.join(root, "events")):
            return root
    return None


def tracepoint_format(tp: str) -> str | None:
    """The tracefs format text of "cat:event", or None if it does not exist here."""
    root = tracefs_root()
    if root is None:
        return None
    cat, name = tp.split(":")
    try:
        with open(os.path.join(root, "events", cat, name, "format")) as f:
            return f.read()
    except OSError:
        return None


def kvm_vm_holders(proc: str = "/proc") -> set[int]:
    """Processes holding a KVM VM fd now (VMMs started before the agent)."""
    out = set()
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        fd_dir = os.path.join(proc, pid, "fd")
        try:
            for fd in os.listdir(fd_dir):
                if os.readlink(os.path.join(fd_dir, fd)) == "anon_inode:kvm-vm":
                    out.add(int(pid))
                    break
        except OSError:
            continue  # gone, or a kernel thread
    return out


_LOCAL_INCLUDE = re.compile(r'^#include "([^"/]+)"\s*$')


def program_text(path: Path = BPF_SOURCE, _seen: set | None = None) -> str:
    """The BPF program with its local `#include "x.h"` files inlined (each
    once), `#line` markers keeping compiler messages on the real files.

    BCC rewrites map method calls (events.ringbuf_reserve(), table.lookup())
    and builds tracepoint argument structs only in its main file, so the
    per-source headers cannot reach it as real includes.
    """
    seen = set() if _seen is None else _seen
    out = [f'#line 1 "{path.name}"']
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = _LOCAL_INCLUDE.match(line)
        if not m:
            out.append(line)
            continue
        inc = path.parent / m.group(1)
        if inc.name not in seen:
            seen.add(inc.name)
            out.append(program_text(inc, seen))
        out.append(f'#line {n + 1} "{path.name}"')
    return "\n".join(out)


def _headers_env() -> None:
    # BCC reads BCC_KERNEL_SOURCE from the environment when it compiles.
    if "BCC_KERNEL_SOURCE" not in os.environ and os.path.isdir(DEFAULT_HEADERS):
        os.environ["BCC_KERNEL_SOURCE"] = DEFAULT_HEADERS


class RingReader:
    """What both backends do once their programs run: read the ring buffer,
    decode records into events, count what is lost. KINDS: group -> event kinds."""

    KINDS: dict

    def _check_ring(self) -> None:
        n = self.ringbuf_pages
        if n < 1 or n & (n - 1):
            raise BackendError(f"a ring buffer of {n} pages: it must be a power of two (XSTATE_RINGBUF_PAGES)")

    def _compile(self, BPF, build: list[str]) -> list[str]:
        """Compile the sources; if that fails, find those that do not compile
        (each with what it requires), mark them and build the rest.
        Uses BPF_SOURCE, REQUIRES (source -> sources it is built on), UNIT."""
        _headers_env()
        text = program_text(self.BPF_SOURCE)

        def compile_(groups):
            return BPF(text=text.encode(), cflags=self._cflags(groups))

        try:
            self.bpf = compile_(build)
            return build
        except Exception as first:  # BCC raises bare Exception
            error = first
        where = (f"BCC could not compile {self.BPF_SOURCE.name} "
                 f"(BCC_KERNEL_SOURCE={os.environ.get('BCC_KERNEL_SOURCE', 'unset')})")
        good = []
        for g in build:
            reqs = self.REQUIRES.get(g, ())
            if missing := [r for r in reqs if r not in good]:
                self.status[g].reason = f"needs {self.UNIT} {missing[0]}: {self.status[missing[0]].reason}"
                continue
            try:
                compile_([r for r in good if r in reqs] + [g]).cleanup()
                good.append(g)
            except Exception as e:  # noqa: BLE001
                self.status[g].reason = f"{where}: {e}"
        if not good:
            raise BackendError(f"{where}: {error}") from error
        self.bpf = compile_(good)
        return good

    def kinds_covered(self) -> dict[str, list[str]]:
        """Event kind -> the attached groups (sources) that produce it."""
        out: dict[str, list[str]] = {}
        for g, st in self.status.items():
            if st.attached:
                for kind in self.KINDS[g]:
                    out.setdefault(kind, []).append(g)
        return out

    def watch(self, tgid: int) -> None:
        """Report this process's exec and exit (it does KVM work we did not see begin)."""
        sched = self.status.get("sched")
        if self.bpf is not None and sched is not None and sched.attached:
            table = self.bpf[b"watched"]
            table[table.Key(tgid)] = table.Leaf(1)

    # Records one poll() hands over at most. libbpf reads on while records keep coming: under a flood
    # faster than the reader it would never return, and the reader would hold every event in one batch
    # (memory without bound), judge none, and not see SIGTERM or SIGHUP until the flood stopped.
    POLL_RECORDS = 16384
    _budget = POLL_RECORDS

    def _on_raw(self, _ctx, data, size) -> int:
        self._budget -= 1
        try:
            raw = decode.Raw.unpack(ctypes.string_at(data, size))
            event = decode.to_event(raw, self.vms)
        except Exception as e:  # a bad record must not stop the reader
            self.decode_errors += 1
            self.last_decode_error = f"{type(e).__name__}: {e}"
            event = None
        if event is not None:
            self.counts[event.kind] += 1
            self.on_event(event, raw)
            if raw.kind in (decode.EV_EXEC, decode.EV_EXIT):
                self.vms.forget(raw.tgid)
        return -1 if self._budget <= 0 else 0  # negative: libbpf stops there, the record consumed

    def poll(self, timeout_ms: int = 2) -> None:
        """Wait up to timeout_ms, then hand the waiting records (at most
        POLL_RECORDS) to on_event. Without a wakeup per event the wait always
        lasts timeout_ms: call this in a loop, it is the reader's timer."""
        self._budget = self.POLL_RECORDS
        self.bpf.ring_buffer_poll(timeout_ms)
        if self._budget > 0:
            self.bpf.ring_buffer_consume()

    def lost(self) -> int:
        """Records dropped in BPF because the ring buffer was full."""
        return sum(sum(v) for v in self.bpf[b"lost"].values()) if self.bpf else 0


def default_ringbuf_pages() -> int:
    """The ring buffer's size in pages: 4096 (16 MiB: a 2 ms poll then absorbs >100k events/s), or
    XSTATE_RINGBUF_PAGES, a testing knob (a small ring makes the kernel drop records, to test the loss
    accounting: tests/live/test_reliability.py); 0 when that is not a number, which start() refuses."""
    try:
        return int(os.environ.get("XSTATE_RINGBUF_PAGES", 4096))
    except ValueError:
        return 0


@dataclass
class TracepointBackend(RingReader):
    KINDS = KINDS
    BPF_SOURCE = BPF_SOURCE
    REQUIRES = REQUIRES
    UNIT = "group"
    on_event: Callable  # (event: agent.events.model.Event, raw: decode.Raw) -> None
    groups: tuple[str, ...] = tuple(PROBES)
    ringbuf_pages: int = field(default_factory=default_ringbuf_pages)
    # No wakeup per event: poll() drains on a timer (see bpf/tracepoints.bpf.c).
    wakeup_per_event: bool = False
    # None: decided from tracefs (group_dead in sched_process_exit's format).
    exit_has_group_dead: bool | None = None
    offsets: Offsets | None = None
    status: dict[str, Status] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    vms: VmNames = field(default_factory=VmNames)
    decode_errors: int = 0
    last_decode_error: str | None = None
    counts: Counter = field(default_factory=Counter)  # events handed to on_event, by kind
    bpf: object = None
    attached: list = field(default_factory=list)  # (tracepoint, detach()) in attach order
    # raw_syscalls hook -> how it is attached: "tp_btf", or "raw (why tp_btf was not used)".
    hook_modes: dict = field(default_factory=dict)
    btf_progs: list = field(default_factory=list)  # TpBtfProgram, closed with the backend

    # -- start-up --

    def start(self) -> None:
        """Resolve offsets, compile, attach. Raises BackendError if nothing could attach."""
        why = bcc_available()
        if why:
            raise BackendError(why)
        if tracefs_root() is None:
            raise BackendError("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)")
        self._check_ring()
        from bcc import BPF

        t0 = time.perf_counter()
        if self.offsets is None:
            self.offsets = resolve()
        self.timings.btf_s = time.perf_counter() - t0
        if self.exit_has_group_dead is None:
            fmt = tracepoint_format("sched:sched_process_exit") or ""
            self.exit_has_group_dead = " group_dead;" in fmt
        self.offsets.exit_has_group_dead = self.exit_has_group_dead

        build = self._buildable()
        t0 = time.perf_counter()
        try:
            build = self._compile(BPF, build)
        finally:
            self.timings.compile_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        self._attach(BPF, build)
        self.timings.attach_s = time.perf_counter() - t0
        if not any(s.attached for s in self.status.values()):
            raise BackendError("no probe attached: " + "; ".join(f"{g}: {s.reason}" for g, s in self.status.items()))
        self.bpf[b"events"].open_ring_buffer(self._on_raw)
        if self.status.get("sched", Status()).attached:
            for tgid in kvm_vm_holders():
                self.watch(tgid)

    def _buildable(self) -> list[str]:
        """Groups asked for whose BTF fields, tracepoints and required groups are there."""
        build = []
        for g in [g for g in PROBES if g in self.groups]:
            tps = tuple(tp for tp, _ in PROBES[g])
            self.status[g] = st = Status(tracepoints=tps)
            if err := self.offsets.group_error(g):
                st.reason = f"BTF lacks a field: {err}"
            elif missing := [tp for tp in tps if tracepoint_format(tp) is None]:
                st.reason = f"no such tracepoint on this kernel: {', '.join(missing)}"
            elif missing := [r for r in REQUIRES.get(g, ()) if r not in build]:
                why = self.status[missing[0]].reason if missing[0] in self.status else "not asked for"
                st.reason = f"needs group {missing[0]}: {why}"
            else:
                build.append(g)
        return build

    def _cflags(self, groups) -> list[str]:
        return [f"-DEVENT_SIZE={decode.EVENT_SIZE}", f"-DRINGBUF_PAGES={self.ringbuf_pages}",
                f"-DSUBMIT_FLAGS={0 if self.wakeup_per_event else 'BPF_RB_NO_WAKEUP'}"] + self.offsets.cflags(groups)

    def _attach(self, BPF, build: list[str]) -> None:
        attached = set()  # (tracepoint, function) pairs, each attached once
        for g in build:
            req = [r for r in REQUIRES.get(g, ()) if not self.status[r].attached]
            if req:
                self.status[g].reason = f"needs group {req[0]}: {self.status[req[0]].reason}"
                continue
            mine = []
            try:
                for tp, fn in PROBES[g]:
                    if (tp, fn) not in attached:
                        mine.append((tp, self._attach_one(BPF, tp, fn)))
                        attached.add((tp, fn))
                self.attached += mine
                st = self.status[g]
                st.attached, st.reason = True, None
                # How each raw_syscalls hook runs, for doctor: "raw_syscalls:sys_exit (tp_btf)".
                st.tracepoints = tuple(f"{tp} ({self.hook_modes[tp]})" if tp in self.hook_modes else tp
                                       for tp in st.tracepoints)
            except Exception as e:  # BCC raises bare Exception
                self.status[g].reason = f"attach failed: {e}"
                for _, undo in reversed(mine):  # a group runs whole or not at all
                    _quietly(undo)

    def _attach_one(self, BPF, tp: str, fn: str):
        """Attach `fn` to `tp`; returns what detaches it."""
        cat, name = tp.split(":")
        if cat != "raw_syscalls":
            f = self.bpf.load_func(fn.encode(), BPF.TRACEPOINT)
            self.bpf.attach_tracepoint(tp=tp.encode(), fn_name=f.name)
            return lambda: self.bpf.detach_tracepoint(tp.encode())
        try:
            prog = TpBtfProgram(f"{fn}_btf", self.bpf.dump_func(f"{fn}_btf".encode()),
                                tracepoint_btf_id((self.offsets.btf or KernelBtf()).vmlinux, name))
        except (BtfProgError, BtfError) as e:
            f = self.bpf.load_func(f"{fn}_raw".encode(), BPF.RAW_TRACEPOINT)
            self.bpf.attach_raw_tracepoint(tp=name.encode(), fn_name=f.name)
            self.hook_modes[tp] = f"raw (tp_btf: {e})"
            return lambda: self.bpf.detach_raw_tracepoint(tp=name.encode())
        self.btf_progs.append(prog)
        self.hook_modes[tp] = "tp_btf"
        return prog.detach

    def detach(self) -> None:
        """Stop new records, keeping the ring buffer readable for a last
        poll(). In the reverse of the attach order: entries before exits, so
        a call already in flight still gets its exit record."""
        while self.attached:
            _quietly(self.attached.pop()[1])

    def close(self) -> None:
        self.detach()
        for prog in self.btf_progs:
            prog.close()
        self.btf_progs = []
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def _quietly(undo) -> None:
    try:
        undo()
    except Exception:  # noqa: BLE001 - close() frees what is left
        pass


__all__ = ["TracepointBackend", "BackendError", "Status", "Timings", "PROBES", "KINDS", "REPORTS", "IN_KVM_RUN",
           "bcc_available", "tracepoint_format", "tracefs_root", "kvm_vm_holders", "program_text"]
