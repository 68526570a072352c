"""The live agent: probe backends chosen per event source, the reader loop (the events log it writes:
agent/eventlog.py).

    probes = Probes("auto", runner.on_event)   # auto | kprobe | tracepoint
    probes.start()                             # NoProbes if no source got a probe
    runner = LiveRunner(pipeline, stats, probes, log)
    runner.run(stop)                           # poll every 2 ms until stop is set
    runner.close()                             # detach, drain, flush, free

Backends are chosen per event source (a probe group of agent/probes: its
tracepoints or functions and the events they produce). With `auto` each
source gets the first backend that attaches it, in AUTO_ORDER (kprobe, what
production hosts use, then tracepoint); a source is handed to one backend
only, so no event is reported twice: a source left for the tracepoint
backend takes the sources whose code it shares with it (kprobes release
them). Sources only kprobes see (fpstate, vcpu_destroy, passthrough, xfd_nm)
are not applicable on a kernel without kprobes (the CI machines): doctor
lists their kinds as blind, not as failures.

The reader runs in the caller's thread: backend.poll(2 ms) hands the ring
buffer's records over as events, which are appended to the events log in one
write per batch, then judged (Pipeline). The probes submit records without a
wakeup (BPF_RB_NO_WAKEUP): the 2 ms poll is the reader's timer, so the kernel
event to verdict latency is about 1-3 ms.
"""

import gzip
import os
import threading
import time
from dataclasses import dataclass, field

from agent.eventlog import LiveEventLog
from agent.probes.kprobe_backend import KprobeBackend
from agent.probes.kprobe_plan import KINDS as KP_KINDS
from agent.probes.kprobe_plan import SOURCES as KP_SOURCES
from agent.probes.offsets import REQUIRES as TP_REQUIRES
from agent.probes.vmnames import VmNames
from agent.probes.tracepoint_backend import (KINDS, PROBES, TRACEFS_ENV, BackendError, TracepointBackend,
                                             tracefs_root)

DEFAULT_EVENTS_LOG = "/var/log/xstate-agent/events.jsonl"
BACKENDS = ("kprobe", "tracepoint")
AUTO_ORDER = ("kprobe", "tracepoint")
POLL_MS = 2
# How often the loss counters of the kernel and the reader are copied to the statistics.
HEALTH_EVERY_S = 0.5

def sources() -> tuple[str, ...]:
    """Every event source this version knows, in attach order: those of both backends, then those
    only kprobes see."""
    return tuple(PROBES) + tuple(s for s in KP_SOURCES if s not in PROBES)


def kinds_of(source: str) -> tuple[str, ...]:
    """The event kinds a source produces (none for guest_perm, which adds a field to others)."""
    return KINDS.get(source) or KP_KINDS.get(source, ())


def kvm_vendor() -> str | None:
    """"intel" or "amd" from the loaded KVM vendor module, else None."""
    for vendor in ("intel", "amd"):
        if os.path.isdir(f"/sys/module/kvm_{vendor}"):
            return vendor
    return None


# Sources that exist on one KVM vendor only, with why they do not apply on the other.
VENDOR_ONLY = {"xfd_nm": ("intel", "KVM saves XFD_ERR on #NM only under VMX (Intel); this host's KVM is {vendor}")}


# ---- what the kernel allows ---------------------------------------------------------------------

def kernel_config(option: str) -> tuple[str | None, str | None]:
    """(value, where) of a kernel config option: "y"/"m"/... , "n" when "is not set", or (None, None)
    when no config file of the running kernel is readable (/proc/config.gz, /boot/config-RELEASE)."""
    release = os.uname().release
    for path in ("/proc/config.gz", f"/boot/config-{release}", f"/lib/modules/{release}/config"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(option + "="):
                return line.split("=", 1)[1].strip().strip('"'), path
            if line == f"# {option} is not set":
                return "n", path
        return "n", path  # absent from a complete config: not set
    return None, None


def kallsyms_has(symbol: str) -> bool | None:
    """Whether /proc/kallsyms lists `symbol`; None if it cannot be read."""
    try:
        with open("/proc/kallsyms", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return f" {symbol}\n".encode() in data or f" {symbol}\t".encode() in data


@dataclass
class KprobeSupport:
    available: bool
    evidence: list[str]

    @property
    def summary(self) -> str:
        return "; ".join(self.evidence)


def kprobe_support(thorough: bool = False) -> KprobeSupport:
    """Can this kernel attach kprobes? The kernel config decides when it is readable; otherwise
    (or with `thorough`, for doctor) the traces kprobes leave: register_kprobe in /proc/kallsyms,
    the kprobe PMU that perf_event_open attaches through, tracefs kprobe_events, debugfs kprobes/."""
    evidence = []
    value, where = kernel_config("CONFIG_KPROBES")
    verdict = None
    if value is not None:
        verdict = value in ("y", "m")
        evidence.append(f"{where}: CONFIG_KPROBES={value}" if verdict else f"{where}: CONFIG_KPROBES is not set")
    if verdict is not None and not thorough:
        return KprobeSupport(verdict, evidence)
    signs = []
    sym = kallsyms_has("register_kprobe")
    if sym is not None:
        signs.append(sym)
        evidence.append(f"register_kprobe {'in' if sym else 'not in'} /proc/kallsyms")
    pmu = os.path.exists("/sys/bus/event_source/devices/kprobe")
    signs.append(pmu)
    evidence.append(f"kprobe PMU {'present' if pmu else 'absent'} (/sys/bus/event_source/devices/kprobe)")
    root = tracefs_root()
    if root is not None:
        ev = os.path.exists(os.path.join(root, "kprobe_events"))
        signs.append(ev)
        evidence.append(f"{root}/kprobe_events {'present' if ev else 'absent'}")
    if os.path.isdir("/sys/kernel/debug/tracing") or os.path.ismount("/sys/kernel/debug"):
        dbg = os.path.exists("/sys/kernel/debug/kprobes")
        signs.append(dbg)
        evidence.append(f"/sys/kernel/debug/kprobes {'present' if dbg else 'absent'}")
    if verdict is None:
        verdict = any(signs)
    return KprobeSupport(verdict, evidence)


def ensure_tracefs() -> tuple[str | None, str | None]:
    """(tracefs root, note): mounts tracefs at /sys/kernel/tracing when it is not mounted and we are
    root (the CI machines boot without it); the note says what was done or why it is missing."""
    root = tracefs_root()
    if root is not None:
        return root, None
    if TRACEFS_ENV in os.environ:  # pointed elsewhere on purpose (tests): nothing to mount
        return None, f"no tracefs at {os.environ[TRACEFS_ENV]} ({TRACEFS_ENV})"
    mounted = []
    try:
        with open("/proc/self/mounts") as f:
            mounted = [line.split()[1] for line in f if line.split()[2:3] == ["tracefs"]]
    except OSError:
        pass
    if mounted:
        return None, f"tracefs at {mounted[0]} cannot be read by uid {os.geteuid()} (run as root)"
    if os.geteuid() != 0:
        return None, "tracefs is not mounted and only root can mount it (mount -t tracefs nodev /sys/kernel/tracing)"
    import subprocess
    r = subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], capture_output=True, text=True)
    root = tracefs_root()
    if root is None:
        return None, f"tracefs is not mounted and mounting it failed: {r.stderr.strip() or r.returncode}"
    return root, f"mounted tracefs at {root}"


# ---- backends per source ------------------------------------------------------------------------

@dataclass
class ProbeState:
    """One source on one backend."""
    backend: str
    attached: bool = False
    reason: str | None = None
    hooks: tuple[str, ...] = ()  # tracepoints / functions
    # The whole backend cannot run on this host (e.g. kprobes on a kernel without them), or cannot
    # serve this source at all (no tracepoint shows fpstate): with `auto` that is a fallback, not a
    # failed probe (doctor --strict).
    backend_unavailable: bool = False
    # Attached, then handed to the next backend because a source there shares its code (kvm_ioctl
    # for fpu_load on tracepoints): no failure either.
    released: bool = False


@dataclass
class SourcePlan:
    source: str
    kinds: tuple[str, ...]
    backend: str | None = None  # the backend that serves it, if any
    tried: list[ProbeState] = field(default_factory=list)  # in the order tried

    @property
    def attached(self) -> bool:
        return self.backend is not None

    @property
    def applicable(self) -> bool:
        """Some backend tried could serve it on this host (fpstate needs kprobes, xfd_nm Intel)."""
        return self.attached or any(not t.backend_unavailable for t in self.tried)


class NoProbes(Exception):
    """No event source could get a probe."""


class Probes:
    """The live backends, one per source, behind the backend API (poll, lost, close)."""

    def __init__(self, choice: str, on_event, *, only: tuple[str, ...] | None = None, thorough: bool = False):
        if choice not in ("auto",) + BACKENDS:
            raise ValueError(f"unknown backend {choice!r}")
        self.choice = choice
        self.on_event = on_event
        self.thorough = thorough
        self.plans = {s: SourcePlan(s, kinds_of(s)) for s in sources() if only is None or s in only}
        self.backends: dict[str, object] = {}  # name -> started backend
        self.kprobes: KprobeSupport | None = None
        self._watched_across: set[int] = set()  # processes one backend had the other (with sched) watch
        self.vms = VmNames()  # one naming of VMs for both backends
        self.tracefs_note: str | None = None
        self.start_s = 0.0

    @property
    def order(self) -> tuple[str, ...]:
        return AUTO_ORDER if self.choice == "auto" else (self.choice,)

    def start(self) -> None:
        t0 = time.perf_counter()
        try:
            for name in self.order:
                todo = [s for s, p in self.plans.items() if not p.attached]
                if not todo:
                    break
                getattr(self, f"_start_{name}")(todo)
        finally:
            self.start_s = time.perf_counter() - t0
        if not any(p.attached for p in self.plans.values()):
            raise NoProbes("no event source has a working probe: " + self.why_not())

    def why_not(self) -> str:
        """Why sources have no probe, each reason once with the sources it concerns."""
        reasons: dict[tuple, list[str]] = {}
        for s, p in self.plans.items():
            if not p.attached:
                for t in p.tried:
                    reasons.setdefault((t.backend, t.reason), []).append(s)
        unattached = [s for s, p in self.plans.items() if not p.attached]

        def detail(backend):
            return f" [{self.kprobes.summary}]" if backend == "kprobe" and self.kprobes else ""
        return "; ".join(f"{b}: {why}{detail(b)} ({'every source' if srcs == list(self.plans) else ', '.join(srcs)})"
                         for (b, why), srcs in reasons.items()) or ", ".join(unattached)

    def failures(self) -> list[tuple[str, ProbeState]]:
        """(source, probe) of every probe that could not attach on a backend this host can run."""
        return [(s, t) for s, p in self.plans.items() for t in p.tried
                if not t.attached and not t.backend_unavailable and not t.released]

    def _not_applicable(self, todo: list[str], backend: str, why, hooks=lambda s: ()) -> list[str]:
        """Record `backend` as unable to serve these sources (why(source) -> reason or None);
        returns the sources left."""
        left = []
        for s in todo:
            reason = why(s)
            if reason is None:
                left.append(s)
            else:
                self.plans[s].tried.append(ProbeState(backend, False, reason, hooks(s), backend_unavailable=True))
        return left

    def _start_kprobe(self, todo: list[str]) -> None:
        self.kprobes = kprobe_support(self.thorough)
        if not self.kprobes.available:
            self._not_applicable(todo, "kprobe", lambda s: "this kernel has no kprobes")
            return
        vendor = kvm_vendor()
        todo = self._not_applicable(todo, "kprobe", lambda s: (
            VENDOR_ONLY[s][1].format(vendor=vendor) if s in VENDOR_ONLY and vendor not in (None, VENDOR_ONLY[s][0])
            else None))
        self._start_backend("kprobe", KprobeBackend(self._deliver("kprobe"), groups=tuple(todo), vms=self.vms),
                            todo)
        backend = self.backends.get("kprobe")
        if backend is None or "tracepoint" not in self.order:
            return
        # A source left for the tracepoint backend is built there with the groups it requires (it
        # shares their code: fpu_load needs kvm_ioctl's fd walk and sys_enter); kprobes hand those
        # over, so that no event comes from both backends.
        later = [s for s in todo if s in PROBES and not self.plans[s].attached]
        need = {r for s in later for r in TP_REQUIRES.get(s, ()) if self.plans[r].backend == "kprobe"}
        # (Releasing one also releases the kprobe sources built on it: they go to tracepoints too.)
        for s in backend.release(sorted(need)) if need else ():
            if s in self.plans and self.plans[s].backend == "kprobe":
                self.plans[s].backend = None
                t = self.plans[s].tried[-1]
                t.attached, t.released = False, True
                t.reason = f"released to the tracepoint backend, where {', '.join(later)} need(s) its code"

    def _start_tracepoint(self, todo: list[str]) -> None:
        todo = self._not_applicable(todo, "tracepoint", lambda s: None if s in PROBES else "no tracepoint shows it")
        root, self.tracefs_note = ensure_tracefs()
        if root is None:
            for s in todo:
                self.plans[s].tried.append(ProbeState("tracepoint", False, self.tracefs_note,
                                                      tuple(tp for tp, _ in PROBES.get(s, ()))))
            return
        groups = list(todo)
        # guest_perm adds a field, no event: built again here where its readers run here.
        if "guest_perm" not in groups and {"arch_prctl", "fpu_load"} & set(groups):
            groups.append("guest_perm")
        self._start_backend("tracepoint", TracepointBackend(self._deliver("tracepoint"), groups=tuple(groups),
                                                            vms=self.vms), todo)

    def _start_backend(self, name: str, backend, todo: list[str]) -> None:
        """Start `backend` for the sources `todo`, record each source's probe; keep it if any attached."""
        try:
            backend.start()
        except Exception as e:  # noqa: BLE001 - BackendError, or what BTF/BCC raised: the reason of every source
            if not isinstance(e, BackendError):
                e = f"{type(e).__name__}: {e}"
            backend.close()
            for s in todo:
                st = backend.status.get(s)
                reason = st.reason if st is not None and st.reason else str(e)
                hooks = st.tracepoints if st is not None else tuple(tp for tp, _ in PROBES.get(s, ()))
                self.plans[s].tried.append(ProbeState(name, False, reason, hooks))
            return
        self.backends[name] = backend
        for s in todo:
            st = backend.status.get(s)
            if st is None:
                self.plans[s].tried.append(ProbeState(name, False, f"not built by the {name} backend"))
                continue
            self.plans[s].tried.append(ProbeState(name, st.attached, st.reason, st.tracepoints))
            if st.attached:
                self.plans[s].backend = name

    def _deliver(self, name: str):
        """The event callback of backend `name`. With two backends, each process that sends a record
        through the one without the sched source is watched by the one with it, so that its exec and
        exit (which forget its state) are reported whichever backend saw its KVM work."""
        def on_event(event, raw=None):
            sched = self.plans.get("sched")
            if raw is not None and len(self.backends) > 1 and sched is not None and sched.backend:
                if event.kind in ("exec", "exit"):  # its sched backend forgot it: watch it anew
                    self._watched_across.discard(raw.tgid)
                elif sched.backend != name and raw.tgid not in self._watched_across:
                    self._watched_across.add(raw.tgid)
                    self.backends[sched.backend].watch(raw.tgid)
            self.on_event(event, raw)

        return on_event

    # -- the backend API, over every started backend --

    def poll(self, timeout_ms: int = POLL_MS) -> None:
        # The first waits out the reader's timer; the others only drain. kprobe first: it sees VMs
        # created (kvm_ioctl) when it serves any KVM source, the order VmNames then meets them in.
        for i, b in enumerate(self.backends.values()):
            b.poll(timeout_ms if i == 0 else 0)

    def lost(self) -> int:
        return sum(b.lost() for b in self.backends.values())

    @property
    def decode_errors(self) -> int:
        return sum(getattr(b, "decode_errors", 0) for b in self.backends.values())

    def vm_name(self, vm: str) -> str | None:
        for b in self.backends.values():
            vms = getattr(b, "vms", None)
            if vms is not None and (name := vms.name(vm)):
                return name
        return None

    def detach(self) -> None:
        """Stop new records (the ring buffer stays readable, for a last drain)."""
        for b in self.backends.values():
            b.detach()

    def close(self) -> None:
        for b in self.backends.values():
            b.close()
        self.backends = {}

    def report_to(self, stats) -> None:
        """Every probe tried, attached or not, with the kinds it produces (xstate_probe_attached)."""
        for p in self.plans.values():
            for t in p.tried:
                stats.probe(p.source, t.backend, t.attached, p.kinds)

    def summary(self) -> str:
        by_backend: dict[str, list[str]] = {}
        for p in self.plans.values():
            by_backend.setdefault(p.backend or "none", []).append(p.source)
        return "; ".join(f"{b}: {', '.join(s)}" for b, s in by_backend.items())

    def timings(self) -> dict:
        out = {"start_s": round(self.start_s, 3)}
        for b in self.backends.values():  # summed over the backends started
            t = b.timings
            for k in ("btf_s", "compile_s", "attach_s"):
                out[k] = round(out.get(k, 0) + getattr(t, k), 3)
        return out


# ---- the reader loop ----------------------------------------------------------------------------

class LiveRunner:
    """Backend records → events log → policy → sinks, in the caller's thread."""

    def __init__(self, pipeline, stats=None, log: LiveEventLog | None = None):
        self.pipeline = pipeline
        self.stats = stats
        self.log = log
        self.probes: Probes | None = None
        self._batch: list = []
        self._batch_vms: set = set()  # vm ids in the batch
        self._batch_gone: list = []  # tgids that exec'd or exited in the batch
        self._names: dict[str, str | None] = {}  # vm id -> human name, as the backend gave it
        self._vms_of: dict[int, set[str]] = {}  # tgid -> its vm ids, forgotten at exec/exit
        self._next_health = 0.0
        self.reopen_log = threading.Event()  # set from a signal handler (SIGHUP)
        self.on_hup = None  # called on SIGHUP, in this thread, before the log is reopened (the config reload)

    def on_event(self, event, raw=None) -> None:
        """The backends' callback (from inside poll())."""
        self._batch.append(event)
        vm = getattr(event, "vm", None)
        if vm is not None:
            self._batch_vms.add(vm)
            if vm not in self._names and self.probes is not None:
                self._names[vm] = self.probes.vm_name(vm)
                self._vms_of.setdefault(event.tgid, set()).add(vm)
        elif event.kind in ("exec", "exit"):
            self._batch_gone.append(event.tgid)

    def step(self, timeout_ms: int = POLL_MS) -> int:
        """One poll of the backends, then the batch through the pipeline. Events handled."""
        self.probes.poll(timeout_ms)
        if len(self.probes.backends) > 1:  # two rings, read one after the other: judged in time order
            self._batch.sort(key=lambda e: e.ts)
        n = self._flush()
        if self.reopen_log.is_set():
            self.reopen_log.clear()
            if self.on_hup is not None:
                self.on_hup()
            if self.log is not None:
                self.log.reopen()
        if time.monotonic() >= self._next_health:
            self.health()
        return n

    def _flush(self) -> int:
        batch = self._batch
        if not batch:
            return 0
        self._batch = []
        lines = self.log.write(batch) if self.log is not None else None
        if lines is not None:
            self.pipeline.feed(batch, self.log.path, lines)
        else:
            self.pipeline.feed(batch)
        vms, self._batch_vms = self._batch_vms, set()
        if self.stats is not None:
            # After the verdicts: the statistics keep a name only for a VM the engine tracks.
            for vm in vms:
                name = self._names.get(vm)
                if name:
                    self.stats.set_vm_name(vm, name)
        if self._batch_gone:
            for tgid in self._batch_gone:
                for vm in self._vms_of.pop(tgid, ()):
                    self._names.pop(vm, None)
            self._batch_gone = []
        return len(batch)

    def health(self) -> None:
        self._next_health = time.monotonic() + HEALTH_EVERY_S
        if self.stats is not None and self.probes is not None:
            self.stats.set_lost("ringbuf", self.probes.lost())
            self.stats.set_lost("reader", self.probes.decode_errors)

    def run(self, stop) -> None:
        """Poll until `stop` (a threading.Event, set from a signal handler) is set."""
        while not stop.is_set():
            self.step(POLL_MS)

    def drain(self, limit_s: float = 5.0) -> int:
        """Detach, then hand over what the ring buffer still holds (for at most limit_s)."""
        self.probes.detach()
        total = 0
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            n = self.step(0)
            total += n
            if not n:
                break
        self.health()
        return total

    def close(self) -> None:
        try:
            if self.probes is not None and self.probes.backends:
                self.drain()
        finally:
            if self.log is not None:
                self.log.close()
            if self.probes is not None:
                self.probes.close()


def process_age() -> float | None:
    """Seconds since this process started (its start time in /proc/self/stat, in clock ticks since boot)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start
    except (OSError, ValueError, IndexError):
        return None


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify units) about our state; nothing without $NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    import socket
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError:
        pass
