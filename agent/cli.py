"""The xstate-agent command line."""

import enum
import json
import os
import signal
import sys
import threading

import typer

from agent import __version__
from agent.events.reader import InputError
from agent.exporters.prometheus import DEFAULT_LISTEN, MetricsServer, WebConfig, WebConfigError, make_registry
from agent.policy.engine import Engine, Violation
from agent.policy.rules import RULES, SEVERITIES, rules_markdown
from agent.policy.state import DEFAULT_MAX_PROCESSES, DEFAULT_MAX_VCPUS
from agent.pipeline import EventLog, Pipeline, ViolationPrinter
from agent.replay import Summary, replay
from agent.sources.file import file_source
from agent.stats import DEFAULT_MAX_VMS, Stats
from agent.xstate import DEFAULT_DYN, MASK64

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Watch dynamic XSAVE (Intel AMX) handling on KVM hosts and judge it against the policy.")

EXIT_OK, EXIT_VIOLATION, EXIT_INPUT = 0, 1, 2
# The metrics address cannot be bound (in use, not local, no permission).
EXIT_LISTEN = 3


class ProfileName(str, enum.Enum):
    upstream = "upstream"
    reference = "reference"


class Format(str, enum.Enum):
    text = "text"
    json = "json"


class RulesFormat(str, enum.Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


class FailOn(str, enum.Enum):
    critical = "critical"
    warning = "warning"
    never = "never"


def parse_mask(value: str) -> int:
    try:
        mask = int(value, 0)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number (use 0x... for hex)") from None
    if not 0 < mask <= MASK64:
        raise typer.BadParameter(f"{value} is outside 1..2^64-1")
    return mask


def _text_sink(v: Violation, file: str, line: int) -> None:
    ev = v.event
    where = f"tgid={ev.tgid}"
    if getattr(ev, "vm", None) is not None:
        where += f" vm={ev.vm} vcpu={ev.vcpu}"
    print(f"{file}:{line}: {v.rule.id} {v.rule.severity}: {v.message} [{ev.kind} {where} ts={ev.ts}]")


def _json_sink(v: Violation, file: str, line: int) -> None:
    print(json.dumps(v.to_dict(file, line), separators=(",", ":")))


@app.command("replay")
def replay_cmd(
    files: list[str] = typer.Argument(..., metavar="FILE...", help="Event logs (JSON Lines); '-' reads standard input."),
    profile: ProfileName = typer.Option(ProfileName.upstream, help="Which design to judge against."),
    format: Format = typer.Option(Format.text, "--format", help="How to print violations."),
    fail_on: FailOn = typer.Option(FailOn.warning, help="Exit 1 when a violation of this severity or worse is seen."),
    dyn: str = typer.Option(hex(DEFAULT_DYN), help="Mask of the dynamic XSAVE features (DYN).", callback=parse_mask),
    max_processes: int = typer.Option(DEFAULT_MAX_PROCESSES, min=1, help="Most processes tracked at once."),
    max_vcpus: int = typer.Option(DEFAULT_MAX_VCPUS, min=1, help="Most vCPUs tracked at once."),
) -> None:
    """Judge recorded event logs. Exit 0: clean; 1: a violation at or above --fail-on; 2: bad input."""
    engine = Engine(profile.value, dyn, max_processes, max_vcpus)
    summary = Summary()
    sink = _json_sink if format is Format.json else _text_sink
    try:
        replay(files, engine, sink, summary)
    except InputError as e:
        print(summary.line(engine), file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_INPUT) from None
    print(summary.line(engine), file=sys.stderr)
    failing = {"critical": ("critical",), "warning": SEVERITIES, "never": ()}[fail_on.value]
    if any(summary.by_severity[s] for s in failing):
        raise typer.Exit(EXIT_VIOLATION)


class BackendName(str, enum.Enum):
    auto = "auto"
    kprobe = "kprobe"
    tracepoint = "tracepoint"


# No event source could get a probe (live mode): `xstate-agent doctor` says why.
EXIT_NO_PROBES = 4
NO_LISTEN = ("", "none", "off")


@app.command("run")
def run_cmd(
    from_: list[str] = typer.Option(None, "--from", metavar="FILE",
                                    help="Drive the pipeline from recorded event logs instead of live probes."),
    follow: bool = typer.Option(False, help="With --from: keep reading the last file as it grows, until stopped."),
    backend: BackendName = typer.Option(BackendName.auto, help="Live probes: per event source, the first of "
                                        "kprobe, tracepoint that attaches (auto), or only one of them."),
    profile: ProfileName = typer.Option(ProfileName.upstream, help="Which design to judge against."),
    events_log: str = typer.Option(None, metavar="PATH", help="Append every event to PATH as spec JSONL "
                                   "(its directory is made if needed; SIGHUP reopens it, for logrotate)."),
    dyn: str = typer.Option(hex(DEFAULT_DYN), help="Mask of the dynamic XSAVE features (DYN).", callback=parse_mask),
    max_processes: int = typer.Option(DEFAULT_MAX_PROCESSES, min=1, help="Most processes tracked at once."),
    max_vcpus: int = typer.Option(DEFAULT_MAX_VCPUS, min=1, help="Most vCPUs tracked at once."),
    listen: str = typer.Option(None, metavar="ADDR:PORT",
                               help=f"Serve /metrics and /healthz there ([ADDR]:PORT; ':PORT' is every interface). "
                                    f"Live default {DEFAULT_LISTEN} ('none': no metrics); with --from, only when "
                                    f"given."),
    web_config: str = typer.Option(None, metavar="FILE",
                                   help="TLS and basic auth for --listen (Prometheus exporter-toolkit format)."),
    vm_label: bool = typer.Option(True, "--vm-label/--no-vm-label",
                                  help="Per-VM metrics carry a vm label; without it they are summed per host."),
    max_vms: int = typer.Option(DEFAULT_MAX_VMS, min=1, help="Most VMs with their own vm label; the rest "
                                "are counted under vm=\"_other\"."),
) -> None:
    """Judge events as they come, from the live probes (default) or recorded logs (--from); violations go to
    stdout as JSON lines. Stops cleanly on SIGINT/SIGTERM. Exit 3: --listen cannot be bound; 4: no probe."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    engine = Engine(profile.value, dyn, max_processes, max_vcpus)
    # Statistics are kept for the metrics server, when there is one.
    stats = Stats(engine, per_vm=vm_label, max_vms=max_vms)
    if not from_:
        if follow:
            print("error: --follow needs --from", file=sys.stderr)
            raise typer.Exit(EXIT_INPUT)
        # SIGHUP reopens the events log (logrotate); from the start, so that an early one does not kill us.
        hup = threading.Event()
        signal.signal(signal.SIGHUP, lambda *_: hup.set())
        listen = DEFAULT_LISTEN if listen is None else listen
        _run_live(engine, stats, stop, hup, backend.value, events_log,
                  None if listen.lower() in NO_LISTEN else listen, web_config)
        return
    server = _serve_metrics(stats, listen, web_config)
    try:
        log = EventLog(events_log) if events_log else None
    except OSError as e:
        if server is not None:
            server.stop()
        print(f"error: events log {events_log}: {e.strerror}", file=sys.stderr)
        raise typer.Exit(EXIT_INPUT) from None
    pipeline = Pipeline(engine, ViolationPrinter(), log, observers=[stats] if server is not None else [])
    try:
        for file, events, lines in file_source(from_, stop, follow):
            pipeline.feed(events, file, lines)
            if stop.is_set():
                break
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_INPUT) from None
    finally:
        pipeline.close()
        if server is not None:
            server.stop()
        print(f"{pipeline.events} events judged, {pipeline.violations} violations", file=sys.stderr)


def _run_live(engine: Engine, stats: Stats, stop: threading.Event, hup: threading.Event, backend: str,
              events_log: str | None, listen: str | None, web_config: str | None) -> None:
    """The live agent: attach, then poll, log and judge until stopped (agent/live.py)."""
    import time

    from agent.live import LiveEventLog, LiveRunner, NoProbes, Probes, process_age, sd_notify

    def say(msg: str) -> None:
        print(f"xstate-agent: {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    stats.measure_latency(time.monotonic_ns)  # the probes' ts: bpf_ktime_get_ns, CLOCK_MONOTONIC
    for stage in ("ringbuf", "reader") + (("events_log",) if events_log else ()):
        stats.lost(stage, 0)
    server = _serve_metrics(stats, listen, web_config)
    log = None
    if events_log:
        try:
            log = LiveEventLog(events_log, stats)
        except OSError as e:
            if server is not None:
                server.stop()
            print(f"error: events log {events_log}: {e.strerror or e}", file=sys.stderr)
            raise typer.Exit(EXIT_INPUT) from None
    runner = LiveRunner(Pipeline(engine, ViolationPrinter(), None, observers=[stats] if server else []),
                        stats, log)
    runner.reopen_log = hup
    probes = runner.probes = Probes(backend, runner.on_event)
    try:
        try:
            probes.start()
        except NoProbes as e:
            probes.report_to(stats)
            print(f"error: {e}", file=sys.stderr)
            print("error: `xstate-agent doctor` checks what this host allows", file=sys.stderr)
            raise typer.Exit(EXIT_NO_PROBES) from None
        probes.report_to(stats)
        if probes.tracefs_note:
            say(probes.tracefs_note)
        for plan in probes.plans.values():
            if plan.attached:
                say(f"probe {plan.source}: {plan.backend}" + (f" ({', '.join(plan.kinds)})" if plan.kinds else ""))
            else:
                say(f"probe {plan.source}: NOT attached: " + "; ".join(f"{t.backend}: {t.reason}" for t in plan.tried))
        if log is not None:
            log.comment(f"xstate-agent {__version__} started pid {os.getpid()} backend {backend} "
                        f"profile {engine.profile.name}: {probes.summary()}")
        attached = sum(p.attached for p in probes.plans.values())
        age = process_age()
        say(f"ready: {attached}/{len(probes.plans)} event sources attached in {time.perf_counter() - t0:.2f} s"
            + (f" ({age:.2f} s since the process started)" if age is not None else "")
            + f": {probes.summary()}" + (f"; events log {log.path}" if log else ""))
        sd_notify("READY=1")
        runner.run(stop)
        sd_notify("STOPPING=1")
    finally:
        try:
            runner.close()
        finally:
            if server is not None:
                server.stop()
        lost = stats.snapshot().lost
        print(f"{runner.pipeline.events} events judged, {runner.pipeline.violations} violations, lost: "
              + ", ".join(f"{k} {v}" for k, v in sorted(lost.items())), file=sys.stderr, flush=True)


def _serve_metrics(stats: Stats, listen: str | None, web_config: str | None):
    """The metrics server on `listen`, started; None without `listen`. Exits on a bad address or config."""
    if listen is None:
        if web_config is not None:
            print("error: --web-config needs --listen", file=sys.stderr)
            raise typer.Exit(EXIT_INPUT)
        return None
    try:
        web = WebConfig.load(web_config) if web_config else None
        server = MetricsServer(make_registry(stats), listen, web, __version__)
    except (ValueError, WebConfigError) as e:
        print(f"error: {'--web-config ' if isinstance(e, WebConfigError) else '--listen '}{e}", file=sys.stderr)
        raise typer.Exit(EXIT_INPUT) from None
    except OSError as e:
        print(f"error: --listen {listen}: {e.strerror or e}", file=sys.stderr)
        raise typer.Exit(EXIT_LISTEN) from None
    print(f"metrics on {server.url}", file=sys.stderr, flush=True)
    return server.start()


@app.command("doctor")
def doctor_cmd(
    strict: bool = typer.Option(False, help="Exit 1 if any probe fails to attach on a backend this host can run, "
                                "not only when an event source has none."),
    backend: BackendName = typer.Option(BackendName.auto, help="The backend choice to check, as `run --backend`."),
    format: Format = typer.Option(Format.text, "--format", help="A report, or JSON."),
) -> None:
    """Load and attach every probe this kernel allows, then report per probe (backend, attached or why not) and
    the host (BTF, kernel headers, tracefs, privileges, kprobes). Exit 1 if an event source has no working probe."""
    from agent.doctor import diagnose, render_text
    report = diagnose(backend.value)
    if format is Format.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_text(report))
    if not report["strict_ok" if strict else "ok"]:
        raise typer.Exit(1)


@app.command("selftest")
def selftest_cmd(
    events_log: str = typer.Option(None, metavar="PATH", help="The running agent's --events-log "
                                   "(default: where scripts/run writes it, /var/log/xstate-agent/events.jsonl)."),
    metrics: str = typer.Option(None, metavar="URL", help="Also check the running agent's /metrics there, e.g. "
                                f"http://{DEFAULT_LISTEN}/metrics."),
    timeout: float = typer.Option(5.0, min=0.1, help="Seconds to wait for the agent to report what was done."),
    format: Format = typer.Option(Format.text, "--format", help="One line per check, or JSON."),
) -> None:
    """With the agent running: make real arch_prctl calls, a KVM VM (CPUID, valid and refused XCR0 writes, an XFD
    write, a hlt guest run) and a child process here, and check that the agent reported each with the right values
    (read from its events log). Exit 0: every check passed; 1: one failed."""
    from agent.live import DEFAULT_EVENTS_LOG
    from agent.selftest import Selftest
    quiet = format is Format.json
    test = Selftest(events_log or DEFAULT_EVENTS_LOG, metrics, timeout, say=(lambda _: None) if quiet else print)
    ok = test.run()
    if quiet:
        print(json.dumps({"ok": ok, "pid": os.getpid(), "vm": test.vm_id,
                          "checks": [r.__dict__ for r in test.results]}, indent=2))
    else:
        print(f"selftest: {'ok' if ok else 'FAILED'}: {sum(r.ok for r in test.results)}/{len(test.results)} checks "
              f"passed (pid {os.getpid()}, events log {test.events_log})")
    if not ok:
        raise typer.Exit(1)


@app.command("rules")
def rules_cmd(format: RulesFormat = typer.Option(RulesFormat.text, "--format", help="A table, JSON, or Markdown.")) -> None:
    """List the policy rules."""
    if format is RulesFormat.json:
        print(json.dumps([r.to_dict() for r in RULES], indent=2))
        return
    if format is RulesFormat.markdown:
        print(rules_markdown(), end="")
        return
    for r in RULES:
        profiles = "both" if len(r.profiles) == 2 else "/".join(sorted(r.profiles))
        print(f"{r.id}  {r.severity:<8}  {profiles:<8}  {','.join(k.kind for k in r.kinds):<12}  {r.summary}")


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    print(__version__)


def main() -> None:
    # Like other Unix filters: output piped into `head` ends the command quietly.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    app()
