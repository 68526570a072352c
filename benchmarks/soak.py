"""Soak: the live agent for an hour under a steady load; does its memory stay flat?

    sudo .venv/bin/python benchmarks/soak.py [--minutes M] [--rate R] [--churn-every S] [--sample-every S]
                                             [--events-log PATH|none] [--agent-tree DIR] [--plot PATH]

The agent is the real one, `xstate-agent run` (BPF probes, backend auto,
metrics on a free local port, events log to a temporary file unless told).
The load, for --minutes (default 60):

- one VMM (benchmarks/loadgen.c `xcrs`) setting XCR0 with KVM_SET_XCRS on its
  vCPU at --rate calls/s (default 1,000), the whole run;
- every --churn-every seconds (default 5) a short-lived VMM (`loadgen churn
  2 2`): the five arch_prctl XSTATE permission calls, then two VMs of two
  vCPUs made and closed in turn, each vCPU running a guest that halts
  (vcpu_create, cpuid, xcr0, fpu_load, vcpu_destroy), then exit: state the
  agent must create, then forget.

Every --sample-every seconds (default 10) it records the agent's RSS
(/proc/PID/status) and CPU time, from its /metrics the tracked processes and
vCPUs, the VM labels kept for the metrics (a VM's series stay 15 minutes
after it is gone), events and losses, and how many other processes hold BPF
programs ("others": other agents or benchmarks on a shared machine, whose
load this agent sees too). It prints each sample as it is taken, then the
curve condensed to about a dozen rows, a PNG plot when matplotlib is
importable (it is not a dependency), and the verdict:

- RSS flat: its level at the end is less than 5% above its level at the
  1/4 mark (Python's allocator, BCC and the ring buffer settle in the first
  minutes). A level is the median over a tenth of the run: bursts of events
  from other work on the machine (the agent sees every process) raise RSS
  for a sample or two, a leak raises it for good. The highest value and the
  least-squares trend are printed beside it;
- tracked state bounded: over the last 3/4 of the run the tracked processes
  and vCPUs never go higher than in the first 1/4 plus SLACK (64: other
  processes of the machine that use KVM are tracked too), and nothing is
  evicted. After the load stops, it also prints what is still tracked: the
  load's processes have exited, so it should be back to what it was before
  the load started (but for other work's processes, and processes whose
  exit event was lost when the ring buffer was full).

Root, BCC, gcc and /dev/kvm are needed. It runs at the default priority
(XSTATE_BENCH_NICE=0): it measures memory over time, not speed, and should
not take the CPU from other work. Nothing is asserted.
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("XSTATE_BENCH_NICE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import livebench as lb  # noqa: E402

RSS_TARGET = 0.05
# Other processes of the machine that use KVM or arch_prctl are tracked too (the
# project's live tests hold up to ~40 vCPUs in one process); a leak of one
# process or vCPU per short-lived VMM (720 of them an hour) exceeds it in minutes.
SLACK = 64
CHURN = ["2", "2"]  # VMs per churn process, vCPUs per VM
HZ = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_kb: int
    cpu_s: float
    processes: int
    vcpus: int
    vm_labels: int
    events: int
    lost: int
    evicted: int
    violations: int
    others: int = 0  # other processes holding BPF programs (other agents, benchmarks): their events count here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_rss_cpu(pid: int) -> tuple[int, float]:
    """(VmRSS in KiB, user + system CPU seconds) of a process."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    # Fields after the command name, which may hold spaces: utime and stime are the 12th and 13th.
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / HZ


def scrape(url: str) -> dict[str, float]:
    """Sums of the samples of each metric of the agent's /metrics, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


class Agent:
    """`xstate-agent run` as a child process, its stdout (violations) and stderr in files."""

    def __init__(self, events_log: str | None, workdir: str, tree: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.out_path = os.path.join(workdir, "violations.jsonl")
        self.err_path = os.path.join(workdir, "agent.err")
        argv = [sys.executable, "-m", "agent", "run", "--listen", f"127.0.0.1:{self.port}"]
        argv += ["--events-log", events_log] if events_log else []
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            # `-m agent` imports the agent package of the working directory.
            self.p = subprocess.Popen(argv, cwd=tree, stdout=out, stderr=err, start_new_session=True)
        deadline = time.monotonic() + 120
        while "ready:" not in self.stderr():
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the agent did not start:\n{self.stderr()}")
            time.sleep(0.2)

    def stderr(self) -> str:
        return Path(self.err_path).read_text(errors="replace")

    def violations(self) -> int:
        return sum(1 for _ in open(self.out_path, "rb"))

    def sample(self, t: float) -> Sample:
        rss, cpu = proc_rss_cpu(self.p.pid)
        m = scrape(self.url)
        return Sample(t, rss, cpu, int(m["xstate_tracked_processes"]), int(m["xstate_tracked_vcpus"]),
                      int(m.get("xstate_vm_labels", 0)), int(m.get("xstate_events_total", 0)),
                      int(m.get("xstate_events_lost_total", 0)), int(m.get("xstate_tracked_evictions_total", 0)),
                      int(m.get("xstate_violations_total", 0)))

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.p.kill()
        return self.p.wait()


def row(s: Sample, prev: Sample | None) -> str:
    if prev is None or s.t <= prev.t:
        cpu, rate = "", ""
    else:
        span = s.t - prev.t
        cpu, rate = f"{100 * (s.cpu_s - prev.cpu_s) / span:.1f}", f"{(s.events - prev.events) / span:,.0f}"
    return (f"{s.t / 60:7.1f} {s.rss_kb / 1024:9.1f} {cpu:>6} {rate:>9} {s.processes:>6} {s.vcpus:>6} "
            f"{s.vm_labels:>6} {s.events:>12,} {s.lost:>8,} {s.evicted:>5} {s.others:>6}")


HEADER = (f"{'minute':>7} {'RSS MiB':>9} {'CPU%':>6} {'events/s':>9} {'procs':>6} {'vCPUs':>6} "
          f"{'vm lbl':>6} {'events':>12} {'lost':>8} {'evict':>5} {'others':>6}")


def verdict(samples: list[Sample]) -> list[str]:
    """The verdicts, each after the lines that say why."""
    total = samples[-1].t
    quarter = next(i for i, s in enumerate(samples) if s.t >= total / 4)
    first, rest = samples[:quarter + 1], samples[quarter:]
    # RSS levels: the median over a tenth of the run, so that a burst (other work's events) does not count.
    n = max(3, len(samples) // 10)
    at_quarter = [s.rss_kb for s in samples[quarter:quarter + n]]
    at_end = [s.rss_kb for s in samples[-n:]]
    base, end = statistics.median(at_quarter), statistics.median(at_end)
    peak = max(s.rss_kb for s in rest)
    flat = end < base * (1 + RSS_TARGET)
    # Least-squares slope of RSS over the last 3/4, in MiB per hour.
    mt = sum(s.t for s in rest) / len(rest)
    mr = sum(s.rss_kb for s in rest) / len(rest)
    var = sum((s.t - mt) ** 2 for s in rest)
    slope = sum((s.t - mt) * (s.rss_kb - mr) for s in rest) / var * 3600 / 1024 if var else 0.0
    lines = [f"RSS (median of {n} samples) after the 1/4 mark ({samples[quarter].t / 60:.1f} min) {base / 1024:.1f} "
             f"MiB, at the end {end / 1024:.1f} MiB ({100 * (end - base) / base:+.2f}%); lowest "
             f"{min(at_quarter) / 1024:.1f} then {min(at_end) / 1024:.1f} MiB; highest over the last 3/4 "
             f"{peak / 1024:.1f} MiB; least-squares trend over the last 3/4 {slope:+.1f} MiB/hour; whole run "
             f"{min(s.rss_kb for s in samples) / 1024:.1f} to {max(s.rss_kb for s in samples) / 1024:.1f} MiB",
             f"  RSS flat (end < {100 * RSS_TARGET:.0f}% above the 1/4 mark): {lb.verdict(flat)}"]
    bounded = samples[-1].evicted == 0
    for name in ("processes", "vcpus"):
        early, late = max(getattr(s, name) for s in first), max(getattr(s, name) for s in rest)
        bounded &= late <= early + SLACK
        lines.append(f"tracked {name}: at most {early} in the first 1/4, {late} in the last 3/4")
    lines.append(f"  tracked state bounded (last 3/4 at most the first 1/4's + {SLACK}, no eviction): "
                 f"{lb.verdict(bounded)}")
    return lines


def plot(samples: list[Sample], path: str, title: str) -> str:
    try:
        import matplotlib
    except ImportError:
        return "no plot: matplotlib is not importable here (it is not a dependency; the table above is the curve)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    minutes = [s.t / 60 for s in samples]
    fig, (a, b) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    a.plot(minutes, [s.rss_kb / 1024 for s in samples])
    a.set_ylabel("agent RSS (MiB)")
    a.set_title(title)
    for name, label in (("processes", "tracked processes"), ("vcpus", "tracked vCPUs"), ("vm_labels", "VM labels")):
        b.plot(minutes, [getattr(s, name) for s in samples], label=label)
    b.set_xlabel("minutes")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return f"plot: {path}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--rate", type=float, default=1000, help="KVM_SET_XCRS calls per second (default 1000)")
    ap.add_argument("--churn-every", type=float, default=5, help="seconds between short-lived VMMs (default 5)")
    ap.add_argument("--sample-every", type=float, default=10, help="seconds between samples (default 10)")
    ap.add_argument("--events-log", default=None, metavar="PATH|none",
                    help="the agent's events log (default: a temporary file, removed at the end)")
    ap.add_argument("--agent-tree", type=Path, default=lb.ROOT, metavar="DIR",
                    help="run the agent from this source tree (default: this one), e.g. `git archive` of a commit "
                         "unpacked, so that edits to the working tree during an hour-long run do not reach it")
    ap.add_argument("--plot", default=os.path.join(tempfile.gettempdir(), "xstate-soak.png"), metavar="PATH")
    args = ap.parse_args(argv)
    lb.require_root()
    lb.print_machine(f"soak: {args.minutes:g} minutes, KVM_SET_XCRS at {args.rate:,.0f}/s, a short-lived VMM "
                     f"({CHURN[0]} VMs x {CHURN[1]} vCPUs) every {args.churn_every:g} s")
    loadgen = lb.loadgen()
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="xstate-soak-") as work:
        events_log = (None if args.events_log == "none" else
                      args.events_log or os.path.join(work, "events.jsonl"))
        agent = Agent(events_log, work, args.agent_tree.resolve())
        try:
            print(f"agent: pid {agent.p.pid}, from {args.agent_tree}, metrics {agent.url}, events log "
                  f"{events_log or 'none'}")
            print("\n".join("  " + line for line in agent.stderr().splitlines()))
            before = agent.sample(0.0)
            print(f"before the load: RSS {before.rss_kb / 1024:.1f} MiB, tracked {before.processes} processes, "
                  f"{before.vcpus} vCPUs", flush=True)
            flood = lb.Flood(args.rate, seconds, cpu=None)
            samples: list[Sample] = []
            churns = churn_failures = 0
            try:
                flood.go()
                t0 = time.monotonic()
                print(HEADER, flush=True)
                next_sample = next_churn = 0.0
                while True:
                    now = time.monotonic() - t0
                    if now >= next_sample:
                        # Before a churn due at the same time: its processes are then never alive at a sample.
                        if agent.p.poll() is not None:
                            print(f"the agent exited ({agent.p.returncode}) at minute {now / 60:.1f}:\n"
                                  f"{agent.stderr()}\nverdict: the agent crashed: FAIL")
                            return 0
                        samples.append(agent.sample(now))
                        samples[-1].others = sum(not f.startswith(f"{agent.p.pid} ") for f in lb.foreign_bpf())
                        print(row(samples[-1], samples[-2] if len(samples) > 1 else None), flush=True)
                        next_sample += args.sample_every
                        if now >= seconds:
                            break
                    if now >= next_churn:
                        churn_failures += subprocess.run([loadgen, "churn", *CHURN]).returncode != 0
                        churns += 1
                        next_churn += args.churn_every
                    time.sleep(max(0.0, min(next_sample, next_churn) - (time.monotonic() - t0)))
                done = flood.wait()
            finally:
                flood.finish()
            time.sleep(2)  # the load's exits judged (2-3 ms) and the metrics up to date
            after = agent.sample(time.monotonic() - t0)
            violations = agent.violations()
            log_size = os.path.getsize(events_log) if events_log and os.path.exists(events_log) else None
        finally:
            rc = agent.stop()
        tail = agent.stderr().strip().splitlines()[-1:]

    print(f"\nload: {done['sent']:,} KVM_SET_XCRS sent ({done['rate']:,.0f}/s, {done['failed']} failed), "
          f"{churns} short-lived VMMs ({churn_failures} failed)")
    print(f"agent: {samples[-1].events - before.events:,} events judged during the load, "
          f"{samples[-1].lost - before.lost} lost, {violations} violations printed, mean CPU "
          f"{100 * (samples[-1].cpu_s - samples[0].cpu_s) / (samples[-1].t - samples[0].t):.1f}%"
          + (f", events log {log_size / 2**20:,.0f} MiB" if log_size is not None else "")
          + f"; exit {rc}: {tail[0] if tail else ''}")
    print(f"after the load stopped: tracked {after.processes} processes, {after.vcpus} vCPUs "
          f"(before it: {before.processes}, {before.vcpus}); {after.vm_labels} VM labels kept")
    step = max(1, len(samples) // 12)
    print("\nthe curve, condensed:\n" + HEADER)
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    for prev, s in zip([None] + shown, shown):
        print(row(s, prev))
    print(plot(samples, args.plot, f"xstate-agent soak: {args.minutes:g} min, {args.rate:,.0f} KVM_SET_XCRS/s"))
    print("\n".join(verdict(samples)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
