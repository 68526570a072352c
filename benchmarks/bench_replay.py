"""Replay throughput and memory per tracked vCPU.

    python benchmarks/bench_replay.py [--events N] [--processes P] [--vcpus V] [--seed S]
                                      [--repeat R] [--cpu C] [--tracked T] [--profile NAME]

1. Replay: the log of benchmarks/genlog.py (made once, cached in the temp
   directory under a name built from its parameters and the generator's
   source) is judged by `xstate-agent replay` in a fresh child process pinned
   to one CPU: the CLI's own code path (typer, reader, engine, sinks), its
   output discarded. Best of R runs; interpreter start and imports are timed
   apart. Peak RSS is the child's ru_maxrss.
2. Memory per tracked vCPU: T vCPUs, 100 per process, each brought to a
   realistic state by judging vcpu_create, cpuid, xcr0 and fpu_load events
   decoded from JSON as replay decodes them. Measured with tracemalloc (what
   Python allocated and kept) and, in a separate run, as the growth of RSS.

Targets are printed beside the figures; nothing is asserted.
"""

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET_EVENTS_PER_S = 500_000
TARGET_BYTES_PER_VCPU = 2048


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def current_rss() -> int:
    """Resident set size now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    import resource

    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the log --------------------------------------------------------------


def log_path(events: int, processes: int, vcpus: int, seed: int, rich: bool) -> Path:
    """Cache file for these parameters and this version of the generator."""
    digest = hashlib.sha256((HERE / "genlog.py").read_bytes()).hexdigest()[:12]
    d = Path(tempfile.gettempdir()) / "xstate-agent-bench"
    d.mkdir(exist_ok=True)
    return d / f"genlog-e{events}-p{processes}-v{vcpus}-s{seed}{'-rich' if rich else ''}-{digest}.jsonl"


def ensure_log(events: int, processes: int, vcpus: int, seed: int, rich: bool) -> Path:
    path = log_path(events, processes, vcpus, seed, rich)
    if not path.exists():
        print(f"generating {path} ...", file=sys.stderr)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        subprocess.run([sys.executable, str(HERE / "genlog.py"), str(tmp), "--events", str(events),
                        "--processes", str(processes), "--vcpus", str(vcpus), "--seed", str(seed)]
                       + (["--rich"] if rich else []), check=True)
        tmp.replace(path)
    return path


# -- children: each measurement runs in a fresh interpreter -----------------


def child_replay(path: str, profile: str, cpu: int | None) -> dict:
    pin(cpu)
    t0 = time.perf_counter()
    from agent.cli import app

    t1 = time.perf_counter()
    args = ["--profile", profile, "--fail-on", "never"]
    devnull = open(os.devnull, "w")
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = devnull
    try:
        # The first command imports what the CLI loads lazily: timed apart, with an empty log.
        with tempfile.NamedTemporaryFile(suffix=".jsonl") as empty:
            sys.stderr = devnull
            app(["replay", empty.name, *args], standalone_mode=False)
        t2 = time.perf_counter()
        sys.stderr = summary = _Capture()
        code = app(["replay", path, *args], standalone_mode=False)
        t3 = time.perf_counter()
    finally:
        sys.stdout, sys.stderr = stdout, stderr
    return {"import_s": t2 - t0, "replay_s": t3 - t2, "exit": code or 0, "summary": summary.text().strip(),
            "peak_rss": peak_rss(), "load": os.getloadavg()[0]}


def child_core(path: str, profile: str) -> dict:
    """agent.replay.replay() alone (what `xstate-agent replay` runs), for counting instructions."""
    from agent.policy.engine import Engine
    from agent.replay import Summary, replay

    summary = replay([path], Engine(profile), lambda *_: None, Summary())
    return {"events": summary.events}


def instructions(path: Path, profile: str) -> float | None:
    """Instructions per event in the steady state (cachegrind), or None without valgrind.

    Judged: the first 20,000 and the first 60,000 lines; the difference over
    40,000 leaves out start-up and the setup events at the head of the log.
    """
    if shutil.which("valgrind") is None:
        return None
    counts = []
    for n in (20_000, 60_000):
        part = path.with_name(f"{path.stem}-head{n}.jsonl")
        if not part.exists():
            with open(path, "rb") as src, open(part, "wb") as dst:
                dst.writelines(itertools.islice(src, n))
        out = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                              sys.executable, __file__, "--child", "core", "--path", str(part), "--profile", profile],
                             check=True, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        refs = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
        counts.append(int(refs.group(1).replace(",", "")))
    return (counts[1] - counts[0]) / 40_000


class _Capture:
    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass

    def text(self):
        return "".join(self.parts)


def vcpu_events(n: int, per_process: int):
    """JSON lines that bring n vCPUs to a realistic state, as replay would read them."""
    from agent.events import Cpuid, FpuLoad, VcpuCreate, Xcr0
    from agent.events.writer import encode

    for i in range(n):
        tgid, vcpu = 10_000 + i // per_process, i % per_process
        # VMs named as genlog.py names them (pid-fd).
        common = dict(v=1, ts=i, tgid=tgid, vm=f"{tgid}-11", vcpu=vcpu)
        yield encode(VcpuCreate(ret=0, **common))
        yield encode(Cpuid(xcr0_supported=0x602E7, ret=0, **common))
        yield encode(Xcr0(value=0x602E7, source="guest", ret=0, **common))
        yield encode(FpuLoad(guest_features=0x602E7, guest_size=11008, xfd=0, guest_perm=0x602E7, **common))


def child_vcpus(n: int, profile: str, use_tracemalloc: bool) -> dict:
    import gc
    import tracemalloc

    from agent.events.reader import decode_line
    from agent.policy.engine import Engine

    per_process = 100
    # The lines are made first so that only the engine's growth is measured.
    lines = list(vcpu_events(n, per_process))
    engine = Engine(profile, max_processes=n // per_process + 1, max_vcpus=n)
    gc.collect()
    if use_tracemalloc:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if use_tracemalloc else current_rss()
    for raw in lines:
        if engine.judge(decode_line(raw)):
            raise SystemExit("a violation while building vCPUs: the benchmark's events are wrong")
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if use_tracemalloc else current_rss()
    assert len(engine.state.vcpus) == n
    return {"bytes": after - before, "vcpus": n}


# -- the parent -----------------------------------------------------------


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {model}, Python {sys.version.split()[0]}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--processes", type=int, default=50)
    ap.add_argument("--vcpus", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rich", action="store_true", help="the log with tid/comm everywhere (genlog.py --rich)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cpu", type=int, default=None, help="CPU to pin the children to (default: the first usable)")
    ap.add_argument("--tracked", type=int, default=100_000, help="vCPUs for the memory measurement (0: skip)")
    ap.add_argument("--profile", default="upstream")
    ap.add_argument("--instructions", action="store_true",
                    help="also count instructions per event with valgrind (cachegrind): a figure that a busy "
                         "machine does not change")
    ap.add_argument("--child", choices=("replay", "core", "vcpus-tracemalloc", "vcpus-rss"), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.events < 1 or a.repeat < 1:
        ap.error("--events and --repeat must be at least 1")

    if a.child == "replay":
        print(json.dumps(child_replay(a.path, a.profile, a.cpu)))
        return
    if a.child == "core":
        print(json.dumps(child_core(a.path, a.profile)))
        return
    if a.child:
        pin(a.cpu)
        print(json.dumps(child_vcpus(a.tracked, a.profile, a.child == "vcpus-tracemalloc")))
        return

    cpu = a.cpu if a.cpu is not None else min(os.sched_getaffinity(0))
    print(f"machine: {machine()}; pinned to CPU {cpu}")
    path = ensure_log(a.events, a.processes, a.vcpus, a.seed, a.rich)
    size = path.stat().st_size
    print(f"log: {path.name} ({a.events} events, {size / 1e6:.0f} MB, {size / max(a.events, 1):.0f} B/event)")

    runs = [run_child(["--child", "replay", "--path", str(path), "--profile", a.profile, "--cpu", str(cpu)])
            for _ in range(a.repeat)]
    best = min(runs, key=lambda r: r["replay_s"])
    rate = a.events / best["replay_s"]
    print(f"replay summary: {best['summary']}")
    print(f"replay: best of {a.repeat}: {best['replay_s']:.3f} s, {rate:,.0f} events/s "
          f"({1e6 / rate:.2f} us/event)  target >= {TARGET_EVENTS_PER_S:,}/s: {verdict(rate >= TARGET_EVENTS_PER_S)}")
    times = ", ".join(f"{r['replay_s']:.3f}" for r in runs)
    print(f"  all runs: {times} s; interpreter start, imports and a first command "
          f"{best['import_s']:.3f} s more; load average {best['load']:.2f} on {os.cpu_count()} CPUs")
    print(f"  peak RSS: {max(r['peak_rss'] for r in runs) / 2**20:.1f} MiB")
    if a.instructions:
        n = instructions(path, a.profile)
        print(f"  instructions per event (steady state, cachegrind): {n:,.0f}" if n is not None
              else "  instructions per event: valgrind is not installed")

    if a.tracked > 0:
        common = ["--tracked", str(a.tracked), "--profile", a.profile, "--cpu", str(cpu)]
        tm = run_child(["--child", "vcpus-tracemalloc", *common])
        rss = run_child(["--child", "vcpus-rss", *common])
        per = tm["bytes"] / tm["vcpus"]
        print(f"memory per tracked vCPU ({a.tracked:,} vCPUs): {per:,.0f} B (tracemalloc), "
              f"{rss['bytes'] / rss['vcpus']:,.0f} B (RSS growth)  target <= {TARGET_BYTES_PER_VCPU:,} B: "
              f"{verdict(per <= TARGET_BYTES_PER_VCPU)}")


if __name__ == "__main__":
    main()
