"""A long fuzzing run: the properties of tests/test_fuzz.py for minutes, with random seeds.

    .venv/bin/python benchmarks/fuzz_long.py [--minutes M] [--target NAME]... [--chunk N] [--seed S]

Each target of tests/test_fuzz.py (TARGETS: the reader on arbitrary bytes and
on mutated event lines, decode_line, the engine on events in any order,
`xstate-agent replay` in-process) gets an equal share of --minutes (default
20), run in rounds of --chunk examples (default 500), each round with a new
random seed (from --seed, so a run can be repeated). A failure is shrunk by
Hypothesis and printed with its falsifying example; the target then goes on
with the next round. At the end: per target, the examples run, examples/s
and the distinct failures. Exit 1 if anything was found.
"""

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

import test_fuzz  # noqa: E402


def run_target(name: str, budget: float, chunk: int, rng: random.Random) -> tuple[int, float, dict]:
    """(examples, seconds, {failure: its report}) of `name` fuzzed for `budget` seconds."""
    strategies, check, _ = test_fuzz.TARGETS[name]
    count = [0]

    def counted(**kw):
        count[0] += 1
        check(**kw)

    found: dict[str, str] = {}
    t0 = time.monotonic()
    while time.monotonic() - t0 < budget:
        s = rng.getrandbits(64)
        test = seed(s)(settings(max_examples=chunk, deadline=None, database=None, derandomize=False,
                                suppress_health_check=list(HealthCheck))(given(**strategies)(counted)))
        try:
            test()
        except Exception as e:  # noqa: BLE001 - any failure of the property is a finding
            first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if first not in found:
                notes = "\n".join(getattr(e, "__notes__", ()))
                found[first] = f"{first}\n(seed {s})\n{notes[:3000]}"
                print(f"  {name}: FOUND {first}", flush=True)
    return count[0], time.monotonic() - t0, found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--target", action="append", choices=sorted(test_fuzz.TARGETS),
                    help="fuzz only this target (repeatable; default: all)")
    ap.add_argument("--chunk", type=int, default=500, help="examples per round (default 500)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the rounds' seeds (default: random)")
    args = ap.parse_args(argv)
    targets = args.target or sorted(test_fuzz.TARGETS)
    master = args.seed if args.seed is not None else random.getrandbits(32)
    rng = random.Random(master)
    budget = args.minutes * 60 / len(targets)
    print(f"== fuzzing {len(targets)} targets, {budget / 60:.1f} min each, rounds of {args.chunk} examples, "
          f"--seed {master}", flush=True)
    rows, findings = [], {}
    for name in targets:
        n, secs, found = run_target(name, budget, args.chunk, rng)
        rows.append((name, n, secs, len(found)))
        findings.update({f"{name}: {k}": v for k, v in found.items()})
        print(f"  {name}: {n:,} examples in {secs:.0f} s, {n / secs:,.0f}/s, {len(found)} distinct failures",
              flush=True)
    print(f"\n{'target':45} {'examples':>10} {'per s':>8} {'found':>6}")
    for name, n, secs, k in rows:
        print(f"{name:45} {n:>10,} {n / secs:>8,.0f} {k:>6}")
    if not findings:
        print("found: nothing")
        return 0
    print(f"found: {len(findings)} distinct failures")
    for k, report in findings.items():
        print(f"\n-- {k}\n{report}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
