"""Throughput of the live agent, and what it costs the traced VMM, under a
flood of KVM_SET_XCRS calls on a real vCPU.

    sudo .venv/bin/python benchmarks/bench_live_flood.py [--seconds S] [--quick] [--events-log]

The load generator (benchmarks/loadgen.c, pinned to CPU 0) makes a VM and a
vCPU with /dev/kvm, sets its CPUID, then calls KVM_SET_XCRS (XCR0 = 0x7, a
valid value: no violation) at a fixed rate, or as fast as it can. The agent
is its own process (benchmarks/livebench.py agent: the real
TracepointBackend, Engine, Pipeline and statistics observer, polling every
2 ms, pinned to CPU 1), so its CPU time and RSS are its own.

1. Cost to the traced VMM: the unpaced flood's rate with no BPF, with the
   floor (an empty program on the agent's hooks), with the agent, and (for
   comparison) with the empty program on syscalls:sys_enter/exit_ioctl (the
   agent's hooks before raw_syscalls) and with the minimal recorder (one
   record per call, nothing else: the least any design can cost), in
   interleaved rounds; then each program's own run time per call
   (BPF_ENABLE_STATS), which does not move with the machine's noise. The rate is given per second of wall time and per
   second of the flood's own CPU time; the verdict uses the CPU-time rate
   (median over rounds of agent/none within a round), which leaves out the
   time other processes of this shared machine took the CPU.
   Target: at most 12% slower.
2. Throughput: counts are taken between "set up" and "done" of each flood,
   once the agent has drained its ring buffer, so that sent is exactly the
   KVM_SET_XCRS calls made and seen the xcr0 events of that process that
   reached the pipeline; lost is the BPF reserve-failure counter plus the
   reader's drops (records it could not decode) over the same window.
   - idle, then 1k, 10k, 100k events/s for S seconds each: agent CPU% (its
     CPU time over wall time) and RSS;
   - the highest rate sustained for S seconds with sent = seen: the unpaced
     flood, if the agent keeps up with it (then the load generator is the
     limit), else a bisection between the best clean rate and it;
   - twice that rate (from two load generators, one per CPU, when one cannot
     make it), then the same with a 256 KiB ring so that loss is certain:
     sent = seen + lost must hold exactly.
   Target: at least 100,000 events/s with no loss.
Nothing is asserted.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import livebench as lb  # noqa: E402

BPF_SOURCE = None  # --bpf-source
COMPARE = None  # --compare-bpf

TARGET_RATE = 100_000
TARGET_SLOWDOWN = 0.12
SMALL_RING_PAGES = 64  # 256 KiB


def flood(agent: lb.Proc | None, rates: list[float], seconds: float, cpus=None) -> dict:
    """One flood from len(rates) load generators at once (rate 0: unpaced),
    counted by `agent` if given. Returns sent/seen/lost and agent CPU/RSS."""
    cpus = cpus or [lb.LOAD_CPU] * len(rates)
    gens = [lb.Flood(r, seconds, cpu) for r, cpu in zip(rates, cpus)]
    try:
        time.sleep(0.1)
        base = agent.ask() if agent else None
        for g in gens:
            g.go()
        done = [g.wait() for g in gens]
        sent = sum(d["sent"] for d in done)
        out = {"sent": sent, "rate": sum(d["rate"] for d in done), "cpu_rate": sum(d["cpu_rate"] for d in done),
               "failed": sum(d["failed"] for d in done), "gens": done, "asked": sum(rates),
               # Share of its CPU the generator had: below ~95%, other processes took CPU 0 from it.
               "gen_oncpu": sum(d["cpu_ns"] for d in done) / sum(d["elapsed_ns"] for d in done)}
        if agent:
            # Wait for the agent to drain: every call accounted for, or no progress.
            deadline = time.monotonic() + 30
            while True:
                s = agent.ask()
                seen = sum(lb.seen_of(s, g.pid) - lb.seen_of(base, g.pid) for g in gens)
                lost = s["lost"] - base["lost"]
                drops = s["reader_drops"] - base["reader_drops"]
                if seen + lost + drops >= sent or time.monotonic() > deadline:
                    break
                prev = (seen, lost, drops)
                time.sleep(0.3)
                s2 = agent.ask()
                seen2 = sum(lb.seen_of(s2, g.pid) - lb.seen_of(base, g.pid) for g in gens)
                if (seen2, s2["lost"] - base["lost"], s2["reader_drops"] - base["reader_drops"]) == prev:
                    break
            wall = done[0]["elapsed_ns"] / 1e9
            # Agent CPU%: its CPU time from just before "go" to drained, over
            # that span (the drain adds a few ms, unless the agent fell behind).
            span = s["wall"] - base["wall"]
            out.update(seen=seen, lost=lost, drops=drops, cpu_pct=100 * (s["cpu_s"] - base["cpu_s"]) / span,
                       span=span, flood_s=wall, rss_mb=s["rss_kb"] / 1024, hwm_mb=s["hwm_kb"] / 1024,
                       violations=s["violations"] - base["violations"])
        return out
    finally:
        for g in gens:
            g.finish()


def clean(r: dict) -> bool:
    return r["seen"] == r["sent"] and r["lost"] == 0 and r["drops"] == 0


def accounting(r: dict) -> str:
    lost = r["lost"] + r["drops"]
    diff = r["sent"] - r["seen"] - lost
    return (f"     sent = seen + lost: {r['sent']:,} = {r['seen']:,} + {lost:,}: "
            + ("exact" if diff == 0 else f"NOT exact (difference {diff:+,})"))


def describe(r: dict) -> str:
    s = (f"sent {r['sent']:>9,} ({lb.rate_str(r['rate'])}), seen {r['seen']:>9,}, lost {r['lost']:,}"
         f" (+{r['drops']} reader drops)")
    if "cpu_pct" in r:
        s += f"; agent CPU {r['cpu_pct']:5.1f}%, RSS {r['rss_mb']:.0f} MiB"
    if r["asked"] and r["rate"] < 0.98 * r["asked"]:
        s += (f" [the generator fell short of {lb.rate_str(r['asked'])}: it was on its CPU "
              f"{100 * r['gen_oncpu'] / len(r['gens']):.0f}% of the time]")
    return s


def vmm_cost(tracepoints: list[str], rounds: int, seconds: float) -> bool:
    print(f"-- 3. cost to the traced VMM: unpaced KVM_SET_XCRS, {rounds} rounds of {seconds:g} s per condition")
    conds = ("none", "floor", "agent", "syscalls", "min") + (("other",) if COMPARE else ())
    start = {"none": lambda: None, "floor": lambda: lb.start_floor(tracepoints),
             "syscalls": lambda: lb.start_floor(lb.SYSCALLS_IOCTL),
             "min": lambda: lb.start_floor([], record=lb.EVENT_SIZE),
             "agent": lambda: lb.start_agent(bpf_source=BPF_SOURCE),
             "other": lambda: lb.start_agent(bpf_source=COMPARE)}
    if COMPARE:
        print(f"  other: the agent with {COMPARE}")
    res = {c: [] for c in conds}
    ratios, wall_ratios = [], []
    foreign = set()
    for r in range(rounds):
        row = {}
        for c in conds[r % len(conds):] + conds[:r % len(conds)]:
            def run():
                p = start[c]()
                try:
                    return flood(p if c in ("agent", "other") else None, [0], seconds)
                finally:
                    if p is not None:
                        p.close()
            out, seen = lb.measured(run)
            foreign.update(seen)
            res[c].append(out)
            row[c] = out
        ratios.append(row["agent"]["cpu_rate"] / row["none"]["cpu_rate"])
        wall_ratios.append(row["agent"]["rate"] / row["none"]["rate"])
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{c} {lb.rate_str(row[c]['rate'])} wall / {lb.rate_str(row[c]['cpu_rate'])} CPU" for c in conds)
            + (f"; agent lost {row['agent']['lost']:,} of {row['agent']['sent']:,}" if row["agent"]["lost"] else ""),
            flush=True)
    for f in sorted(foreign):
        print(f"WARNING: some figures were taken while another process held BPF programs: {f}")
    for c in conds:
        w = [x["rate"] / 1000 for x in res[c]]
        u = [x["cpu_rate"] / 1000 for x in res[c]]
        ns = [1e9 / x["cpu_rate"] for x in res[c]]
        print(f"  {c:6} wall {lb.spread(w)}k/s   CPU {lb.spread(u)}k/s   = {lb.med(ns):.0f} ns of CPU per call")
    slow = 1 - lb.med(ratios)
    ok = slow <= TARGET_SLOWDOWN
    per_call = {c: lb.med([1e9 / x["cpu_rate"] for x in res[c]]) for c in conds}
    print(f"agent vs none: {100 * slow:.1f}% slower by CPU-time rate (rounds "
          f"{100 * (1 - max(ratios)):.1f}..{100 * (1 - min(ratios)):.1f}%), {100 * (1 - lb.med(wall_ratios)):.1f}% "
          f"by wall rate; per call the agent adds {per_call['agent'] - per_call['none']:+.0f} ns, of which the "
          f"floor {per_call['floor'] - per_call['none']:+.0f} ns")
    # In-kernel cost per call, from the programs' own run-time counters.
    print("  in-kernel BPF time per KVM_SET_XCRS (BPF_ENABLE_STATS, 100k/s for 2 s; stats add ~20 ns per program run):")
    for c in [c for c in conds if c in ("floor", "agent", "other")]:
        p = (lb.start_floor(tracepoints, bpf_stats=True) if c == "floor" else
             lb.start_agent(bpf_source=COMPARE if c == "other" else BPF_SOURCE, bpf_stats=True))
        with p:
            sent = []
            progs, total = lb.bpf_time(p, lambda: sent.append(flood(None, [100_000], 2)["sent"]))
        per_call[c + " bpf"] = total / sent[0]
        print(f"    {c:6} {total / sent[0]:6.0f} ns per call: " + ", ".join(
            f"{n} {ns:.0f} ns x {runs / sent[0]:.2f}" for n, (runs, ns) in sorted(progs.items())))
    if COMPARE:
        other = lb.med([1 - x["cpu_rate"] / y["cpu_rate"] for x, y in zip(res["other"], res["none"])])
        print(f"other vs none: {100 * other:.1f}% slower by CPU-time rate; per call it adds "
              f"{per_call['other'] - per_call['none']:+.0f} ns")
    print(f"syscalls (for comparison: the empty program on syscalls:sys_enter/exit_ioctl, the agent's hooks "
          f"before raw_syscalls) adds {per_call['syscalls'] - per_call['none']:+.0f} ns per call")
    least = lb.med([1 - x["cpu_rate"] / y["cpu_rate"] for x, y in zip(res["min"], res["none"])])
    print(f"min (the least any per-call record costs: one {lb.EVENT_SIZE}-byte record per KVM_SET_XCRS from raw "
          f"sys_enter, drained every 2 ms): {100 * least:.1f}% slower, {per_call['min'] - per_call['none']:+.0f} ns "
          f"per call")
    print(f"  target: at most {100 * TARGET_SLOWDOWN:.0f}% slower: {lb.verdict(ok)}")
    return ok


def throughput(seconds: float, bisect_steps: int, events_log: bool) -> bool:
    print(f"-- 2. throughput: KVM_SET_XCRS floods of {seconds:g} s, agent on CPU {lb.AGENT_CPU}, "
          f"load on CPU {lb.LOAD_CPU}")
    with lb.start_agent(bpf_source=BPF_SOURCE) as a:
        print(f"agent: pid {a.pid}, ring {a.ready['ringbuf_pages'] * 4} KiB, observers {a.ready['observers']}")
        b = a.ask()
        time.sleep(min(seconds, 3))
        s = a.ask()
        print(f"  idle          agent CPU {100 * (s['cpu_s'] - b['cpu_s']) / (s['wall'] - b['wall']):5.1f}%, "
              f"RSS {s['rss_kb'] / 1024:.0f} MiB")
        levels = {}
        for rate in (1_000, 10_000, 100_000):
            r = flood(a, [rate], seconds)
            levels[rate] = r
            print(f"  {rate:>7,}/s    {describe(r)}", flush=True)
        r = flood(a, [0], seconds)
        print(f"  unpaced       {describe(r)}", flush=True)
        unpaced = r
        if clean(r):
            best = max([r] + [x for x in levels.values() if clean(x)], key=lambda x: x["rate"])
            best_rate = best["rate"]
            limit = ("the load generator: the agent kept up with all that one vCPU thread could send, "
                     f"the generator on its CPU {100 * r['gen_oncpu']:.0f}% of the time")
        else:
            good = [x for x in levels.values() if clean(x)]
            lo = max((x["rate"] for x in good), default=0)
            hi = r["rate"]
            for _ in range(bisect_steps):
                mid = (lo + hi) / 2
                x = flood(a, [mid], seconds)
                print(f"  {mid:>7,.0f}/s    {describe(x)}", flush=True)
                if clean(x):
                    good.append(x)
                if clean(x) and x["rate"] >= 0.98 * mid:
                    lo = mid
                else:
                    hi = mid
            best = max(good, key=lambda x: x["rate"]) if good else None
            best_rate = best["rate"] if best else 0
            starved = r["cpu_pct"] < 90
            limit = ("the agent" + (f", which had only {r['cpu_pct']:.0f}% of a CPU in the unpaced flood: other "
                                    "processes took the rest" if starved else ", CPU-bound"))
        print(f"highest rate sustained for {seconds:g} s with sent = seen: {lb.rate_str(best_rate)} "
              f"(limited by {limit})")
        if best and best["cpu_pct"] > 0:
            per_event = best["cpu_pct"] / 100 / best["rate"]
            print(f"agent: {1e6 * per_event:.1f} us of CPU per event at {lb.rate_str(best['rate'])}: one CPU "
                  f"would consume about {lb.rate_str(1 / per_event)}")

        # Twice that rate.
        target = 2 * best_rate
        if target <= 0.9 * unpaced["rate"]:
            rates, cpus = [target], [lb.LOAD_CPU]
        else:
            rates, cpus = [target / 2, target / 2], [lb.LOAD_CPU, lb.AGENT_CPU]
        over = flood(a, rates, seconds, cpus)
        exact = over["sent"] == over["seen"] + over["lost"] + over["drops"]
        print(f"  2x ({lb.rate_str(target)} asked, {len(rates)} generator(s)): {describe(over)}")
        print(accounting(over))
    with lb.start_agent(ringbuf_pages=SMALL_RING_PAGES, bpf_source=BPF_SOURCE) as a:
        small = flood(a, rates, seconds, cpus)
    exact_small = small["sent"] == small["seen"] + small["lost"] + small["drops"]
    print(f"  2x, {SMALL_RING_PAGES * 4} KiB ring: {describe(small)}")
    print(accounting(small))
    if events_log:
        with lb.start_agent(events_log=True, bpf_source=BPF_SOURCE) as a:
            x = flood(a, [100_000], seconds)
        print(f"  100,000/s with --events-log: {describe(x)}")

    print("agent CPU and RSS: " + "; ".join(
        f"{rate // 1000}k/s: {levels[rate]['cpu_pct']:.1f}% CPU, {levels[rate]['rss_mb']:.0f} MiB"
        for rate in levels))
    ok = best_rate >= TARGET_RATE and clean(levels[100_000])
    print(f"  target: at least {TARGET_RATE:,} events/s with no loss: {lb.verdict(ok)}")
    print(f"  loss accounting exact (sent = seen + lost) at 2x: {lb.verdict(exact and exact_small)}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=None,
                    help="length of each throughput flood (default 10; --quick: 3)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of the VMM-cost comparison (default 5; --quick: 2)")
    ap.add_argument("--events-log", action="store_true",
                    help="also measure 100k/s with the agent writing the events log")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--bpf-source", default=None, metavar="FILE",
                    help="the agent loads this BPF C file instead of bpf/tracepoints.bpf.c (to measure a change)")
    ap.add_argument("--compare-bpf", default=None, metavar="FILE",
                    help="add to the VMM-cost rounds an agent loading this BPF C file (condition 'other')")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    global BPF_SOURCE, COMPARE
    BPF_SOURCE, COMPARE = args.bpf_source, args.compare_bpf
    seconds = args.seconds or (3 if args.quick else 10)
    rounds = args.rounds or (2 if args.quick else 5)
    lb.require_root()
    lb.print_machine("KVM_SET_XCRS flood")
    print(f"load generator alone: {lb.rate_str(flood(None, [0], 1)['rate'])} unpaced (1 s)")
    with lb.start_agent(bpf_source=BPF_SOURCE) as a:
        tracepoints = a.ready["tracepoints"]
    if not args.skip_throughput:
        if lb.wait_quiet():
            print("WARNING: another process holds BPF programs; its events share the ring and the lost counter")
        throughput(seconds, 2 if args.quick else 3, args.events_log)
    if not args.skip_cost:
        vmm_cost(tracepoints, rounds, 1 if args.quick else 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
