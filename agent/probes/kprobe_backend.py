"""Loads bpf/kprobes.bpf.c with BCC, attaches each event source's kernel
functions (chosen for this kernel by kprobe_plan), and turns ring-buffer
records into agent.events.model events: the same API and the same records as
the tracepoint backend, plus the kinds only kprobes see (fpstate,
passthrough, vcpu_destroy, xfd_err from #NM).

Every source has its own status: left out, with the reason, when a function
it needs is not in kallsyms or has another signature in BTF, when the BTF
lacks a field it reads, when it does not compile, or when attaching fails;
the other sources still run. A kernel without kprobes (CONFIG_KPROBES unset,
the CI machines) compiles and loads the programs, then fails every attach:
start() raises BackendError with each source's reason.

Usage (as TracepointBackend):
    backend = KprobeBackend(on_event)        # on_event(event, raw)
    backend.plan()                           # optional: per source, None or why not (no compile)
    backend.start()                          # BackendError if no source attached
    while running: backend.poll(2)
    backend.release(["kvm_ioctl"])           # hand sources back (to the tracepoint backend)
    backend.detach(); backend.poll(0); backend.close()
"""

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from agent.probes import decode, kprobe_plan
from agent.probes.kprobe_plan import GROUP_INDEX, KINDS, REPORTS, REQUIRES, SOURCES, Choice
from agent.probes.offsets import Offsets
from agent.probes.tracepoint_backend import (RingReader, BPF_DIR, BackendError, Timings, bcc_available,
                                             default_ringbuf_pages, kvm_vm_holders, tracefs_root, tracepoint_format)
from agent.probes.vmnames import VmNames

BPF_SOURCE = BPF_DIR / "kprobes.bpf.c"


@dataclass
class Status:
    """Per source: attached, or why not; the hooks it runs on and the way chosen."""
    attached: bool = False
    reason: str | None = None
    hooks: tuple[str, ...] = ()  # "kprobe:fn", "kretprobe:fn", "tracepoint:cat:event"
    via: str | None = None  # the alternatives chosen, one per slot
    notes: tuple[str, ...] = ()  # what the chosen way misses
    released: bool = False  # handed back (release()): its records no longer leave the kernel

    @property
    def tracepoints(self) -> tuple[str, ...]:
        """The hooks, under the tracepoint backend's name (live.py, doctor)."""
        return self.hooks


@dataclass
class KprobeTimings(Timings):
    kallsyms_s: float = 0.0


@dataclass
class KprobeBackend(RingReader):
    KINDS = KINDS
    BPF_SOURCE = BPF_SOURCE
    REQUIRES = REQUIRES
    UNIT = "source"
    on_event: Callable  # (event: agent.events.model.Event, raw: decode.Raw) -> None
    groups: tuple[str, ...] = tuple(SOURCES)
    ringbuf_pages: int = field(default_factory=default_ringbuf_pages)
    wakeup_per_event: bool = False
    exit_has_group_dead: bool | None = None
    offsets: Offsets | None = None
    # Test seams: name -> module of text symbols, parameter names by BTF, blacklist, tracepoints.
    kallsyms: dict | None = None
    btf_params: Callable | None = None
    blacklist: set | None = None
    tracepoint_exists: Callable | None = None
    status: dict[str, Status] = field(default_factory=dict)
    timings: KprobeTimings = field(default_factory=KprobeTimings)
    vms: VmNames = field(default_factory=VmNames)
    decode_errors: int = 0
    last_decode_error: str | None = None
    counts: Counter = field(default_factory=Counter)
    bpf: object = None
    choices: dict[str, Choice] = field(default_factory=dict)
    attached: list = field(default_factory=list)  # (type, symbol, fn) in attach order
    _users: dict = field(default_factory=dict)  # (type, symbol, fn) -> sources attached on it

    # -- start-up --

    def plan(self) -> dict[str, str | None]:
        """Per source asked for: None if this kernel has what it needs, else why not.
        Reads kallsyms and BTF; compiles nothing. start() calls it if not done."""
        if not self.choices:
            t0 = time.perf_counter()
            if self.offsets is None or self.btf_params is None:
                from agent.probes.btf import KernelBtf
                btf = KernelBtf()
                if self.offsets is None:
                    self.offsets = kprobe_plan.resolve(btf)
                if self.btf_params is None:
                    self.btf_params = btf.func_params
            self.timings.btf_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            if self.kallsyms is None:
                try:
                    self.kallsyms = kprobe_plan.read_kallsyms(wanted=kprobe_plan.wanted_symbols())
                except OSError as e:
                    raise BackendError(f"cannot read /proc/kallsyms: {e.strerror}") from None
            if self.blacklist is None:
                self.blacklist = kprobe_plan.read_blacklist()
            self.timings.kallsyms_s = time.perf_counter() - t0
            if self.tracepoint_exists is None:
                self.tracepoint_exists = lambda tp: tracepoint_format(tp) is not None
            if self.exit_has_group_dead is None:
                fmt = tracepoint_format("sched:sched_process_exit") or ""
                self.exit_has_group_dead = " group_dead;" in fmt
            self.offsets.exit_has_group_dead = self.exit_has_group_dead
            self.choices = kprobe_plan.plan(self.groups, self.kallsyms, self.btf_params, self.offsets,
                                            self.blacklist, self.tracepoint_exists, self.exit_has_group_dead)
            for s, c in self.choices.items():
                self.status[s] = Status(reason=c.reason, hooks=c.hooks,
                                        via=", ".join(a.name for a in c.alternatives) or None, notes=tuple(c.notes))
        return {s: c.reason for s, c in self.choices.items()}

    def start(self) -> None:
        """Choose, compile, attach. Raises BackendError if no source attached."""
        why = bcc_available()
        if why:
            raise BackendError(why)
        self._check_ring()
        from bcc import BPF

        self.plan()
        build = [s for s, c in self.choices.items() if c.ok]
        if not build:
            raise BackendError("no source can run on kprobes here: " + self._reasons())
        t0 = time.perf_counter()
        try:
            build = self._compile(BPF, build)
        finally:
            self.timings.compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        table = self.bpf[b"group_on"]
        for s in build:  # before any attach: a record may come as soon as a probe is in
            table[table.Key(GROUP_INDEX[s])] = table.Leaf(1)
        self._attach(BPF, build)
        self._settle()
        self.timings.attach_s = time.perf_counter() - t0
        if not any(st.attached for st in self.status.values()):
            raise BackendError("no probe attached: " + self._reasons())
        self.bpf[b"events"].open_ring_buffer(self._on_raw)
        if self.status.get("sched", Status()).attached:
            for tgid in kvm_vm_holders():
                self.watch(tgid)

    def _reasons(self) -> str:
        return "; ".join(f"{s}: {st.reason}" for s, st in self.status.items() if st.reason)

    # <uapi/linux/ptrace.h> (struct pt_regs) drags in x86 headers that newer
    # kernels (6.12) write for gcc: clang's warnings about them are noise.
    QUIET = ("-Wno-ignored-attributes", "-Wno-duplicate-decl-specifier")

    def _cflags(self, groups) -> list[str]:
        return [*self.QUIET, f"-DEVENT_SIZE={decode.EVENT_SIZE}", f"-DRINGBUF_PAGES={self.ringbuf_pages}",
                f"-DSUBMIT_FLAGS={0 if self.wakeup_per_event else 'BPF_RB_NO_WAKEUP'}"] + \
            kprobe_plan.cflags([self.choices[g] for g in groups], self.offsets, self.exit_has_group_dead)

    def _attach(self, BPF, build: list[str]) -> None:
        for g in build:
            st = self.status[g]
            if req := [r for r in REQUIRES.get(g, ()) if not self.status[r].attached]:
                st.reason = f"needs source {req[0]}: {self.status[req[0]].reason}"
                self._switch(g, False)
                continue
            mine = []
            try:
                for p in self.choices[g].probes:
                    for hook in p.hooks():
                        if hook not in self._users:
                            self._attach_hook(BPF, hook)
                            self._users[hook] = set()
                            self.attached.append(hook)
                            mine.append(hook)
                        self._users[hook].add(g)
                st.attached, st.reason = True, None
            except Exception as e:  # noqa: BLE001 - BCC raises bare Exception
                st.reason = f"attach failed: {e}"
                self._switch(g, False)
                for hook in list(self._users):  # a source runs whole or not at all
                    self._users[hook].discard(g)
                for hook in reversed(mine):
                    self._detach_hook(hook)
                    self._users.pop(hook, None)
                    self.attached.remove(hook)

    # guest_perm is reads in other sources' records: it runs when one of them does.
    PERM_READERS = ("arch_prctl", "fpu_load")

    def _settle(self) -> None:
        st = self.status.get("guest_perm")
        if st is not None and st.attached and not any(
                self.status.get(r) and self.status[r].attached for r in self.PERM_READERS):
            why = "; ".join(f"{r}: {self.status[r].reason}" for r in self.PERM_READERS if r in self.status)
            st.attached = False
            st.reason = f"needs source arch_prctl or fpu_load ({why or 'not asked for'})"
            self._switch("guest_perm", False)

    def _attach_hook(self, BPF, hook) -> None:
        kind, symbol, fn = hook
        if kind == "tracepoint":
            f = self.bpf.load_func(fn.encode(), BPF.TRACEPOINT)
            self.bpf.attach_tracepoint(tp=symbol.encode(), fn_name=f.name)
        elif kind == "kretprobe":
            self.bpf.attach_kretprobe(event=symbol.encode(), fn_name=fn.encode())
        else:
            self.bpf.attach_kprobe(event=symbol.encode(), fn_name=fn.encode())

    def _detach_hook(self, hook) -> None:
        kind, symbol, fn = hook
        try:
            if kind == "tracepoint":
                self.bpf.detach_tracepoint(symbol.encode())
            elif kind == "kretprobe":
                self.bpf.detach_kretprobe(symbol.encode(), fn.encode())
            else:
                self.bpf.detach_kprobe(symbol.encode(), fn.encode())
        except Exception:  # noqa: BLE001 - close() frees what is left
            pass

    def _switch(self, source: str, on: bool) -> None:
        if self.bpf is not None:
            table = self.bpf[b"group_on"]
            table[table.Key(GROUP_INDEX[source])] = table.Leaf(1 if on else 0)

    def release(self, sources) -> list[str]:
        """Stop reporting these attached sources (and those that require
        them), e.g. to give them to the tracepoint backend: their records stop
        in the kernel, and hooks no other attached source uses are detached.
        Returns every source released."""
        todo = [s for s in sources if self.status.get(s) and self.status[s].attached]
        done: list[str] = []
        while todo:
            s = todo.pop(0)
            if s in done:
                continue
            done.append(s)
            todo += [d for d, reqs in REQUIRES.items() if s in reqs and self.status.get(d)
                     and self.status[d].attached and d not in done]
        for s in done:
            st = self.status[s]
            self._switch(s, False)
            st.attached, st.released, st.reason = False, True, "released to another backend"
        perm = self.status.get("guest_perm")
        if perm is not None and perm.attached and not any(
                self.status.get(r) and self.status[r].attached for r in self.PERM_READERS):
            self._switch("guest_perm", False)
            perm.attached, perm.released, perm.reason = False, True, "released to another backend"
            done.append("guest_perm")
        for hook in reversed(list(self.attached)):
            users = self._users.get(hook, set())
            users.difference_update(done)
            if not users:
                self._detach_hook(hook)
                self._users.pop(hook, None)
                self.attached.remove(hook)
        return done

    def detach(self) -> None:
        """Stop new records, keeping the ring buffer readable for a last poll().
        Entries before returns (the reverse of the attach order)."""
        while self.attached:
            hook = self.attached.pop()
            self._detach_hook(hook)
            self._users.pop(hook, None)

    def close(self) -> None:
        self.attached = []
        self._users = {}
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def kprobes_possible() -> str | None:
    """None if this kernel may attach kprobes (the kprobe PMU, or tracefs
    kprobe_events), else why not; agent.live.kprobe_support is the thorough check."""
    if os.path.exists("/sys/bus/event_source/devices/kprobe"):
        return None
    root = tracefs_root()
    if root and os.path.exists(os.path.join(root, "kprobe_events")):
        return None
    return "this kernel has no kprobes (no kprobe PMU, no kprobe_events)"


__all__ = ["KprobeBackend", "Status", "KprobeTimings", "BackendError", "KINDS", "REPORTS", "REQUIRES", "SOURCES",
           "BPF_SOURCE", "kprobes_possible"]
