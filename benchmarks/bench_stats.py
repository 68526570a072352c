"""Cost of the statistics observer (agent/stats.py) per event, and of one scrape.

    python benchmarks/bench_stats.py [--events N] [--vcpus V] [--repeat R]

The events are those of benchmarks/genlog.py (a healthy host's mix: mostly
fpu_load, #NM saves, XSETBV), decoded once. Each run judges them all with a
fresh engine, either alone or followed by Stats.observe (as the Pipeline
calls it), and the difference is the observer's cost. Best of R runs. Then
the time of Stats.snapshot() plus the Prometheus exposition of it, with V
vCPUs tracked. Targets are printed beside the figures; nothing is asserted.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from prometheus_client.exposition import generate_latest  # noqa: E402

from agent.events.reader import read_files  # noqa: E402
from agent.exporters.prometheus import make_registry  # noqa: E402
from agent.policy.engine import Engine  # noqa: E402
from agent.stats import Stats  # noqa: E402
import genlog  # noqa: E402


def load(events: int, vcpus: int) -> list:
    path = Path(tempfile.gettempdir()) / f"xstate-bench-stats-{events}-{vcpus}.jsonl"
    if not path.exists():
        genlog.generate(path, events=events, vcpus=vcpus)
    out = []
    for _, batch, _ in read_files([str(path)]):
        out.extend(batch)
    return out


def judge(events, observe: bool, per_vm: bool = True, latency: bool = False) -> tuple[float, Engine, Stats]:
    engine = Engine()
    stats = Stats(engine, per_vm=per_vm)
    if latency:
        stats.measure_latency(every=8)
    j = engine.judge
    t0 = time.perf_counter()
    if observe:
        o = stats.observe
        for ev in events:
            o(ev, j(ev))
    else:
        for ev in events:
            j(ev)
    return time.perf_counter() - t0, engine, stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--vcpus", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    events = load(args.events, args.vcpus)
    n = len(events)
    kinds = {}
    for ev in events:
        kinds[ev.kind] = kinds.get(ev.kind, 0) + 1
    mix = ", ".join(f"{k} {100 * v / n:.0f}%" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:5])
    print(f"{n} events ({mix}, ...)")

    # Interleaved, so that a busy machine slows every variant alike; best of R each.
    variants = {"engine alone": {"observe": False},
                "stats, vm label on": {"observe": True},
                "stats, vm label off": {"observe": True, "per_vm": False},
                "stats, latency 1 in 8": {"observe": True, "latency": True}}
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeat):
        for name, kw in variants.items():
            best[name] = min(best[name], judge(events, **kw)[0])
    base = best.pop("engine alone")
    print(f"engine alone:                   {1e9 * base / n:6.0f} ns/event")
    for name, t in best.items():
        print(f"engine + {name + ':':<22} {1e9 * t / n:6.0f} ns/event  "
              f"(observer: {1e9 * (t - base) / n:4.0f} ns/event; target < 1000)")

    _, engine, stats = judge(events, observe=True)
    registry = make_registry(stats, process=False)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        body = generate_latest(registry)
        times.append(time.perf_counter() - t0)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    print(f"scrape: {1e3 * min(times):.1f} ms for {len(engine.state.vcpus)} tracked vCPUs, {series} series")


if __name__ == "__main__":
    main()
