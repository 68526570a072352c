"""Shared machinery of the live-agent benchmarks (bench_live_overhead.py,
bench_live_flood.py, bench_startup.py), and a runner for all of them:

    python benchmarks/livebench.py [--quick]          # the three benchmarks in turn
    python benchmarks/livebench.py agent [options]    # the agent process (used by the benchmarks)
    python benchmarks/livebench.py floor --tracepoint TP ...   # the floor process

The agent runs as its own process so that its CPU time and RSS are its own:
the real TracepointBackend feeding a Pipeline with the real Engine and the
statistics observer (what `xstate-agent run` does), draining the ring buffer
every --poll-ms. It takes commands on stdin, one per line ("stats", "pause",
"resume", "quit"), and answers each with one JSON line on stdout. Options
for measuring changes: --bpf-source FILE (another BPF C file), --bpf-stats
(each program's run time, BPF_ENABLE_STATS), --reader mmap (a prototype
reader, see MmapReader), --events-log PATH, --profile PATH (cProfile).

The floor process attaches benchmarks/floor/empty.bpf.c (a program that
returns at once) to the tracepoints the agent attaches.

The load generator is benchmarks/loadgen.c, compiled with gcc into a
temporary directory the first time it is needed.
"""

import argparse
import hashlib
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FLOOR_SOURCE = HERE / "floor" / "empty.bpf.c"
LOADGEN_SOURCE = HERE / "loadgen.c"
# The hooks the agent's syscall probes used before raw_syscalls (compared in the benchmarks).
SYSCALLS_IOCTL = ["syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl"]
EVENT_SIZE = 104  # sizeof(struct event) in bpf/common.h (decode.EVENT_SIZE): the minimal recorder's record

# The traced process and the agent on different CPUs (this machine has 2).
LOAD_CPU = 0
AGENT_CPU = 1
# Every process the benchmarks start runs at this nice value, in a session
# (so a scheduler autogroup) of its own whose nice is set to it too: with
# autogroups (kernel.sched_autogroup_enabled=1) a process's nice counts only
# inside its session, and sessions share the CPUs evenly, so other work on a
# shared machine (other users' test runs) would otherwise take half of the
# CPU from the flood and from the agent. XSTATE_BENCH_NICE=0: measure without.
NICE = int(os.environ.get("XSTATE_BENCH_NICE", "-20"))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs, fmt="{:.1f}") -> str:
    """'median (min-max, n=N)'."""
    if not xs:
        return "n/a"
    return f"{fmt.format(med(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))}, n={len(xs)})"


def rate_str(r: float) -> str:
    return f"{r / 1000:.1f}k/s"


# -- the machine ---------------------------------------------------------------


def machine() -> dict:
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            if not line.strip():
                break  # the first CPU is enough
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    except OSError:
        pass
    model = (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}"
             f"{', under a hypervisor' if 'hypervisor' in info.get('flags', '').split() else ''})")
    try:
        import bcc
        bcc_version = getattr(bcc, "__version__", "?")
    except ImportError:
        bcc_version = "not importable"
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "bcc": bcc_version,
            "loadavg": open("/proc/loadavg").read().split()[:3]}


def foreign_bpf() -> list[str]:
    """Other processes holding BPF programs: they skew every figure here."""
    out = []
    me = {os.getpid()}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            n = sum(1 for fd in fds if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf-prog")
            if n:
                out.append(f"{pid} ({open(f'/proc/{pid}/comm').read().strip()}): {n} BPF programs")
        except OSError:
            continue
    return out


def wait_quiet(timeout: float = 60.0) -> list[str]:
    """Wait until no other process holds BPF programs (the live tests of
    this project, run in parallel, attach the same hooks and would count in
    every condition). Returns what is still there after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        f = foreign_bpf()
        if not f or time.monotonic() > deadline:
            return f
        time.sleep(0.5)


def measured(fn, tries: int = 2, timeout: float = 20.0):
    """fn() run while no other process holds BPF programs, if that can be had
    in `tries` attempts. Returns (result, [foreign programs seen])."""
    for i in range(tries):
        before = wait_quiet(timeout)
        out = fn()
        after = foreign_bpf()
        if not before and not after:
            return out, []
    return out, sorted(set(before + after))


def print_machine(title: str) -> dict:
    m = machine()
    print(f"== {title}")
    print(f"machine: {m['nproc']} CPUs, {m['cpu']}, kernel {m['kernel']}, Python {m['python']}, "
          f"BCC {m['bcc']}, load average {' '.join(m['loadavg'])}; benchmark processes at nice {NICE}, "
          f"each in its own autogroup at nice {NICE}")
    for f in foreign_bpf():
        print(f"WARNING: another process holds BPF programs, figures are skewed: {f}")
    return m


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("the live benchmarks need root (BPF, /dev/kvm)")


# -- the load generator ----------------------------------------------------------


def loadgen() -> str:
    """Path of the compiled benchmarks/loadgen.c (built once per source version)."""
    src = LOADGEN_SOURCE.read_bytes()
    d = Path(tempfile.gettempdir()) / f"xstate-loadgen-{hashlib.sha256(src).hexdigest()[:12]}"
    exe = d / "loadgen"
    if not exe.exists():
        d.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe) + ".tmp", str(LOADGEN_SOURCE)], check=True)
        os.replace(str(exe) + ".tmp", exe)
    return str(exe)


def taskset(cpu: int | None) -> list[str]:
    """The command prefix: pinned to `cpu`, at NICE (both exec the command:
    the child's pid is the command's)."""
    return (["nice", "-n", str(NICE)] if NICE else []) + ([] if cpu is None else ["taskset", "-c", str(cpu)])


def spawn(argv: list[str], **kw) -> subprocess.Popen:
    """Popen in a new session (autogroup) whose nice is NICE."""
    p = subprocess.Popen(argv, start_new_session=True, **kw)
    if NICE:
        try:
            with open(f"/proc/{p.pid}/autogroup", "w") as f:
                f.write(str(NICE))
        except OSError:
            pass  # no autogroups in this kernel: the plain nice is enough
    return p


def syscall_loop(what: str, n: int, repeats: int, cpu: int | None = LOAD_CPU) -> list[tuple[float, float]]:
    """(wall ns, CPU ns) per call of `what` (getppid | fionread), one pair per repeat."""
    p = spawn(taskset(cpu) + [loadgen(), "loop", what, str(n), str(repeats)], stdout=subprocess.PIPE, text=True)
    out = p.communicate()[0]
    if p.returncode:
        raise RuntimeError(f"loadgen loop {what} failed ({p.returncode})")
    return [(float(f[1]), float(f[3])) for f in (line.split() for line in out.splitlines()) if f[0] == "ns"]


class Flood:
    """One loadgen process flooding KVM_SET_XCRS on its own vCPU.

    start() returns once the VM is set up (its vcpu_create and cpuid events
    already emitted); go() starts the flood; wait() returns its counts; the
    process then stays, quiet, until finish()."""

    def __init__(self, rate: float, seconds: float, cpu: int | None = LOAD_CPU):
        self.p = spawn(taskset(cpu) + [loadgen(), "xcrs", str(rate), str(seconds)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if line.strip() != "ready":
            self.p.kill()
            raise RuntimeError(f"loadgen failed to start: {line!r}")
        # taskset execs the loadgen: same pid.
        self.pid = self.p.pid

    def go(self) -> None:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()

    def wait(self) -> dict:
        line = self.p.stdout.readline().split()
        if not line or line[0] != "done":
            raise RuntimeError(f"loadgen failed: {line}")
        d = {k: int(v) for k, v in (f.split("=") for f in line[1:])}
        d["rate"] = d["sent"] / (d["elapsed_ns"] / 1e9)
        # Calls per second of the flood's own CPU time: what the calls cost
        # it, without the time other processes took its CPU.
        d["cpu_rate"] = d["sent"] / (d["cpu_ns"] / 1e9) if d["cpu_ns"] else float("nan")
        return d

    def finish(self) -> None:
        try:
            self.p.stdin.write("exit\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass
        self.p.wait(timeout=10)


# -- the agent and floor processes, seen from the benchmarks --------------------


class Proc:
    """A child process speaking one JSON line per command."""

    def __init__(self, argv: list[str], cpu: int | None = AGENT_CPU):
        self.cleanup: list[str] = []  # files removed at close()
        self.t_spawn = time.perf_counter()
        self.p = spawn(taskset(cpu) + [sys.executable, str(HERE / "livebench.py")] + argv,
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.pid = self.p.pid
        self.ready = self._read()
        self.t_ready = time.perf_counter()
        if "error" in self.ready:
            self.close()
            raise RuntimeError(self.ready["error"])

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.p.args} exited ({self.p.wait()})")
        return json.loads(line)

    def ask(self, cmd: str = "stats") -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write("quit\n")
                self.p.stdin.flush()
                self.p.wait(timeout=20)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait()
        for path in self.cleanup:
            try:
                os.unlink(path)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_agent(ringbuf_pages: int | None = None, poll_ms: float | None = None, stats: bool = True,
                cpu: int | None = AGENT_CPU, bpf_source: str | None = None, bpf_stats: bool = False,
                events_log: bool = False, reader: str = "bcc") -> Proc:
    argv = ["agent", "--reader", reader] + (["--bpf-stats"] if bpf_stats else [])
    if events_log:  # a fresh file in the temp directory, removed when the process is closed
        fd, path = tempfile.mkstemp(prefix="xstate-bench-", suffix=".jsonl")
        os.close(fd)
        argv += ["--events-log", path]
    if bpf_source:
        argv += ["--bpf-source", bpf_source]
    if ringbuf_pages:
        argv += ["--ringbuf-pages", str(ringbuf_pages)]
    if poll_ms is not None:
        argv += ["--poll-ms", str(poll_ms)]
    if not stats:
        argv += ["--no-stats"]
    p = Proc(argv, cpu)
    if events_log:
        p.cleanup.append(path)
    return p


def start_floor(tracepoints: list[str], cpu: int | None = AGENT_CPU, bpf_stats: bool = False,
                record: int = 0) -> Proc:
    argv = ["floor"] + (["--bpf-stats"] if bpf_stats else []) + (["--record", str(record)] if record else [])
    for tp in tracepoints:
        argv += ["--tracepoint", tp]
    return Proc(argv, cpu)


def seen_of(stats: dict, tgid: int, kind: str = "xcr0") -> int:
    return stats["seen"].get(f"{tgid}:{kind}", 0)


def bpf_time(proc: "Proc", work) -> tuple[dict, int]:
    """In-kernel run time of `proc`'s BPF programs (started with bpf_stats)
    while work() runs: ({program: (runs, ns per run)}, total ns), from
    BPF_ENABLE_STATS. Unlike timings of the traced process, this does not
    move with what other processes of the machine do."""
    before = proc.ask()["progs"]
    work()
    after = proc.ask()["progs"]
    out, total = {}, 0
    for name, (ns, runs) in after.items():
        ns0, runs0 = before.get(name, (0, 0))
        if runs > runs0:
            out[name] = (runs - runs0, (ns - ns0) / (runs - runs0))
            total += ns - ns0
    return out, total


# -- inside the agent process -------------------------------------------------


class MmapReader:
    """Prototype of a reader for the BPF ring buffer without BCC's per-record
    ctypes callback: the ring is mapped into Python (as libbpf maps it), the
    records are parsed in place with struct.unpack_from, and the consumer
    position is written once per batch instead of once per record (each
    write is a cache line the producer, the traced process on another CPU,
    reads at every reserve). Same decoding and hand-off as
    TracepointBackend._on_raw. (--reader mmap; not the agent's code.)

    Measured here: about 10-25 points less agent CPU at 100k events/s. But
    with it the BPF side counts a few reserve failures (tens per million
    records) although the ring is nearly empty, and more of them
    (~0.1%) when the consumer position is written per record as libbpf does
    (XSTATE_BENCH_MMAP_PER_RECORD=1); the BCC reader showed none at the same
    rates. Not understood yet: do not adopt as is."""

    BUSY, DISCARD, HDR = 1 << 31, 1 << 30, 8

    def __init__(self, backend):
        import mmap
        import struct
        from agent.probes import decode
        self.backend, self.decode = backend, decode
        fd = backend.bpf[b"events"].map_fd
        page = mmap.PAGESIZE
        self.size = backend.ringbuf_pages * page
        self.mask = self.size - 1
        # consumer page (rw); producer page + the data area mapped twice (ro), so a record never wraps
        self.cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self.prod = mmap.mmap(fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self.data = memoryview(self.prod)[page:]
        # Native formats: struct copies those with one memcpy, a single 8-byte
        # load or store on x86-64; the "<Q" form goes byte by byte, and the
        # kernel (or this reader) could see a torn position.
        self.per_record = os.environ.get("XSTATE_BENCH_MMAP_PER_RECORD") == "1"  # as libbpf: to compare
        self.u64 = struct.Struct("Q")
        self.u32 = struct.Struct("I")

    def poll(self) -> None:
        b, dec = self.backend, self.decode
        unpack_raw, to_event, vms, on_event, counts = dec.Raw.unpack, dec.to_event, b.vms, b.on_event, b.counts
        u32, data, mask = self.u32.unpack_from, self.data, self.mask
        cons = self.u64.unpack_from(self.cons, 0)[0]
        prod = self.u64.unpack_from(self.prod, 0)[0]
        self.max_backlog = max(getattr(self, "max_backlog", 0), prod - cons)
        while cons < prod:
            off = cons & mask
            hdr = u32(data, off)[0]
            if hdr & self.BUSY:
                break  # reserved, not yet submitted
            length = hdr & ~(self.BUSY | self.DISCARD)
            if not hdr & self.DISCARD:
                try:
                    raw = unpack_raw(data[off + 8: off + 8 + length])
                    event = to_event(raw, vms)
                except Exception as e:  # noqa: BLE001 - as _on_raw
                    b.decode_errors += 1
                    b.last_decode_error = f"{type(e).__name__}: {e}"
                    event = None
                if event is not None:
                    counts[event.kind] += 1
                    on_event(event, raw)
                    if raw.kind in (dec.EV_EXEC, dec.EV_EXIT):
                        vms.forget(raw.tgid)
            cons += (length + self.HDR + 7) & ~7
            if self.per_record:
                self.u64.pack_into(self.cons, 0, cons)
        self.u64.pack_into(self.cons, 0, cons)


def _rss_kb() -> tuple[int, int]:
    rss = hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def enable_bpf_stats():
    """BPF_ENABLE_STATS: the kernel counts each program's run time and runs
    while the returned fd is open (adds ~20 ns per program run)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(16)  # union bpf_attr { __u32 type; } enable_stats; BPF_STATS_RUN_TIME = 0
    fd = libc.syscall(321, 32, attr, 16)  # __NR_bpf, BPF_ENABLE_STATS
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS")
    return fd


def prog_stats(funcs: dict, btf_progs: dict) -> dict:
    """{name: [run_time_ns, run_cnt]} of loaded BPF programs: BCC's BPF.funcs
    and the tp_btf programs loaded beside them ({name: TpBtfProgram})."""
    fds = {(k.decode() if isinstance(k, bytes) else k): fn.fd for k, fn in funcs.items()}
    fds.update({name: p.prog_fd for name, p in btf_progs.items()})
    out = {}
    for name, fd in fds.items():
        try:
            info = dict(line.split(":", 1) for line in open(f"/proc/self/fdinfo/{fd}") if ":" in line)
        except OSError:
            continue
        out[name] = [int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))]
    return out


def _serve(answer, poll) -> None:
    """Run `poll()` in a loop; answer stdin commands between polls."""
    buf = b""
    paused = False
    while True:
        if paused:
            select.select([0], [], [], 0.05)
        else:
            poll()
        r, _, _ = select.select([0], [], [], 0)
        if not r:
            continue
        chunk = os.read(0, 4096)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd = line.decode().strip()
            if cmd == "quit":
                return
            if cmd in ("pause", "resume"):  # stop/restart draining the ring (to measure the reader's own effect)
                paused = cmd == "pause"
                sys.stdout.write(json.dumps({"paused": paused}) + "\n")
                sys.stdout.flush()
                continue
            ru = os.times()
            rss, hwm = _rss_kb()
            out = {"cpu_s": ru.user + ru.system, "wall": time.monotonic(), "rss_kb": rss, "hwm_kb": hwm}
            out.update(answer())
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()


def agent_main(args) -> int:
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from agent.pipeline import Pipeline
    from agent.policy.engine import Engine
    from agent.probes import tracepoint_backend
    from agent.probes.tracepoint_backend import BackendError, TracepointBackend
    if args.bpf_source:
        src = Path(args.bpf_source).resolve()
        tracepoint_backend.BPF_SOURCE = src
        if hasattr(tracepoint_backend, "program_text"):  # its default path is bound at definition
            inline = tracepoint_backend.program_text
            tracepoint_backend.program_text = lambda path=src, _seen=None: inline(path, _seen)

    engine = Engine()
    observers = []
    if args.stats:
        try:
            from agent.stats import Stats
            observers.append(Stats(engine))
        except Exception as e:  # agent/stats.py is being written in parallel
            print(f"statistics observer left out: {e!r}", file=sys.stderr)
    log = None
    if args.events_log:
        from agent.pipeline import EventLog
        log = EventLog(args.events_log)
    pipeline = Pipeline(engine, on_violation=None, event_log=log, observers=observers)
    seen: dict[str, int] = {}
    batch = []

    def on_event(ev, raw):
        key = f"{ev.tgid}:{ev.kind}"
        seen[key] = seen.get(key, 0) + 1
        batch.append(ev)

    if args.bpf_stats:
        stats_fd = enable_bpf_stats()  # noqa: F841 (kept open)
    kw = {}
    if args.ringbuf_pages:
        kw["ringbuf_pages"] = args.ringbuf_pages
    backend = TracepointBackend(on_event, **kw)
    t_import = time.perf_counter() - t0
    try:
        backend.start()
    except BackendError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    t_start = time.perf_counter() - t0
    tps = [tp for tp, _ in backend.attached]
    t = backend.timings
    print(json.dumps({"ready": True, "tracepoints": tps, "import_s": t_import, "start_s": t_start,
                      "btf_s": t.btf_s, "compile_s": t.compile_s, "attach_s": t.attach_s,
                      "observers": [type(o).__name__ for o in observers],
                      "ringbuf_pages": backend.ringbuf_pages,
                      "status": {g: (s.attached, s.reason) for g, s in backend.status.items()}}), flush=True)
    poll_ms = args.poll_ms
    polls = 0

    reader = MmapReader(backend) if args.reader == "mmap" else None

    def poll():
        nonlocal polls
        if reader is not None:
            time.sleep(poll_ms / 1000)
            reader.poll()
        else:
            backend.poll(poll_ms)
        polls += 1
        if batch:
            pipeline.feed(batch)
            batch.clear()

    def answer():
        return {"seen": seen, "events": pipeline.events, "violations": pipeline.violations,
                "lost": backend.lost(), "reader_drops": backend.decode_errors, "polls": polls,
                "progs": prog_stats(backend.bpf.funcs, {p.name: p for p in backend.btf_progs}) if args.bpf_stats else {},
                "max_backlog": getattr(reader, "max_backlog", None)}

    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    try:
        _serve(answer, poll)
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.profile)
        backend.close()
        pipeline.close()
    return 0


def floor_main(args) -> int:
    sys.path.insert(0, str(ROOT))
    from bcc import BPF

    from agent.probes import tracepoint_backend
    from agent.probes.btf import Btf
    from agent.probes.btfprog import TpBtfProgram, tracepoint_btf_id
    tracepoint_backend._headers_env()  # the same kernel headers as the agent
    if args.bpf_stats:
        stats_fd = enable_bpf_stats()  # noqa: F841 (kept open)
    t0 = time.perf_counter()
    cflags = [f"-DRECORD_SIZE={args.record}", "-DRINGBUF_PAGES=4096"] if args.record else []
    b = BPF(src_file=str(FLOOR_SOURCE).encode(), cflags=cflags)
    fn = b.load_func(b"empty", BPF.TRACEPOINT)
    btf_progs = {}
    for tp in dict.fromkeys(args.tracepoint):
        cat, name = tp.split(":")
        if cat == "raw_syscalls":  # as the agent attaches them: BTF raw tracepoint programs
            btf_progs[f"empty_{name}"] = TpBtfProgram(f"empty_{name}", b.dump_func(b"empty_raw"),
                                                      tracepoint_btf_id(Btf.load(), name))
        else:
            b.attach_tracepoint(tp=tp.encode(), fn_name=fn.name)
    poll = lambda: select.select([0], [], [], 0.5)  # noqa: E731
    if args.record:
        # The minimal recorder: its records are drained (and counted) on the
        # agent's 2 ms timer, so the ring's cache traffic is the agent's.
        received = [0]
        b[b"records"].open_ring_buffer(lambda ctx, data, size: received.__setitem__(0, received[0] + 1))
        rec = b.load_func(b"record_raw", BPF.RAW_TRACEPOINT)
        b.attach_raw_tracepoint(tp=b"sys_enter", fn_name=rec.name)

        def poll():
            b.ring_buffer_poll(2)
            b.ring_buffer_consume()
    print(json.dumps({"ready": True, "tracepoints": args.tracepoint, "start_s": time.perf_counter() - t0}),
          flush=True)
    try:
        _serve(lambda: {"progs": prog_stats(b.funcs, btf_progs) if args.bpf_stats else {},
                        "received": received[0] if args.record else None}, poll)
    finally:
        b.cleanup()
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    a = sub.add_parser("agent", help="the agent process")
    a.add_argument("--ringbuf-pages", type=int, default=None)
    a.add_argument("--poll-ms", type=int, default=2)
    a.add_argument("--no-stats", dest="stats", action="store_false")
    a.add_argument("--bpf-source", default=None,
                   help="load this BPF C file instead of bpf/tracepoints.bpf.c (to measure a proposed change)")
    a.add_argument("--reader", choices=("bcc", "mmap"), default="bcc",
                   help="bcc: the backend's poll(); mmap: the MmapReader prototype")
    a.add_argument("--profile", default=None, metavar="PATH", help="cProfile the reader loop into PATH")
    a.add_argument("--events-log", default=None, metavar="PATH", help="the pipeline also writes every event there")
    a.add_argument("--bpf-stats", action="store_true", help="report each BPF program's run time (BPF_ENABLE_STATS)")
    f = sub.add_parser("floor", help="the floor process")
    f.add_argument("--tracepoint", action="append", default=[])
    f.add_argument("--bpf-stats", action="store_true")
    f.add_argument("--record", type=int, default=0, metavar="BYTES",
                   help="also send a record of BYTES per KVM_SET_XCRS from raw sys_enter (the minimal recorder)")
    ap.add_argument("--quick", action="store_true", help="shorter runs, fewer repeats (about 2 minutes)")
    args = ap.parse_args(argv)
    if args.cmd == "agent":
        return agent_main(args)
    if args.cmd == "floor":
        return floor_main(args)

    require_root()
    rc = 0
    q = ["--quick"] if args.quick else []
    for bench in ("bench_startup.py", "bench_live_overhead.py", "bench_live_flood.py"):
        t0 = time.monotonic()
        rc |= subprocess.run([sys.executable, str(HERE / bench)] + q).returncode
        print(f"({bench}: {time.monotonic() - t0:.0f} s)\n", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
