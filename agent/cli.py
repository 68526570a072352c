"""The xstate-agent command line."""

import enum
import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import NoReturn

import typer

from agent import __version__
from agent.config import (DEFAULT_PATH as DEFAULT_CONFIG, KEYS as CONFIG_KEYS, NEEDS_RESTART, NO_LISTEN,
                          OPTIONAL_PATHS, Config, ConfigError, merge as merge_config, read as read_config)
from agent.eventlog import DEFAULT_KEEP, DEFAULT_MAX_BYTES, LiveEventLog
from agent.events.reader import InputError
from agent.exporters.prometheus import DEFAULT_LISTEN, MetricsServer, WebConfig, WebConfigError, make_registry
from agent.logs import Log
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
    text = f"{file}:{line}: {v.rule.id} {v.rule.severity}: {v.message} [{ev.kind} {where} ts={ev.ts}]"
    # A log's strings (vm, comm, file names) must not reach the terminal as control sequences.
    print(text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text))


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


# `run`: a status per reason the agent cannot go on, each with a one-line error (README, `run --help`).
# No event source could get a probe (live mode): `xstate-agent doctor` says why.
EXIT_NO_PROBES = 4
# The configuration file cannot be read or is not valid.
EXIT_CONFIG = 5
# No kernel BTF: the probes read kernel structs at the offsets it gives.
EXIT_NO_BTF = 6
# No tracefs, and it cannot be mounted: no tracepoint can be attached.
EXIT_NO_TRACEFS = 7
# Privileges cannot be dropped once the probes are attached (--user unknown, its events log directory
# not writable by it, ...): the agent does not go on as root.
EXIT_PRIVILEGES = 8


@app.command("run")
def run_cmd(
    ctx: typer.Context,
    from_: list[str] = typer.Option(None, "--from", metavar="FILE",
                                    help="Drive the pipeline from recorded event logs instead of live probes."),
    follow: bool = typer.Option(False, help="With --from: keep reading the last file as it grows, until stopped."),
    config: str = typer.Option(None, "--config", metavar="FILE",
                               help=f"Read the options from this TOML file (default {DEFAULT_CONFIG}, if it "
                                    f"exists; keys: deploy/config.example.toml); options given here win. Live: "
                                    f"SIGHUP reads it again."),
    backend: BackendName = typer.Option(BackendName.auto, help="Live probes: per event source, the first of "
                                        "kprobe, tracepoint that attaches (auto), or only one of them."),
    profile: ProfileName = typer.Option(ProfileName.upstream, help="Which design to judge against."),
    events_log: str = typer.Option(None, metavar="PATH", help="Append every event to PATH as spec JSONL "
                                   "(its directory is made if needed; SIGHUP reopens it, for logrotate)."),
    events_log_max_bytes: int = typer.Option(DEFAULT_MAX_BYTES, min=0, metavar="BYTES", help="Live: when the next "
                                             "batch would take the events log past BYTES, rotate it (PATH -> "
                                             "PATH.1 -> ... -> PATH.N, renames only); 0: never."),
    events_log_keep: int = typer.Option(DEFAULT_KEEP, min=1, metavar="N", help="Live: rotated events logs kept "
                                        "(PATH.1 ... PATH.N); the oldest is dropped."),
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
    log_format: Format = typer.Option(Format.text, "--log-format", help="Messages about the agent on stderr: "
                                      "text lines, or one JSON object per line (ts, level, msg, fields)."),
    user: str = typer.Option(None, metavar="NAME", help="Live: once the probes are attached, run as this user "
                             "(name or uid); every capability is dropped either way. Its events log directory "
                             "must be writable by it."),
) -> None:
    """Judge events as they come, from the live probes (default) or recorded logs (--from); violations go to
    stdout as JSON lines. Stops cleanly on SIGINT/SIGTERM; SIGHUP reloads the configuration file and reopens
    the events log.

    Exit status:
    0: stopped (SIGINT, SIGTERM);
    2: a bad option, input or events log;
    3: the --listen address cannot be bound;
    4: no event source has a working probe (`xstate-agent doctor` says why);
    5: the configuration file cannot be read or is not valid;
    6: no kernel BTF (/sys/kernel/btf/vmlinux; XSTATE_AGENT_BTF=DIR, for tests, looks in DIR);
    7: no tracefs, and it cannot be mounted (XSTATE_AGENT_TRACEFS=DIR, for tests, looks in DIR only);
    8: privileges cannot be dropped once the probes are attached (--user)."""
    # What the command line gives wins over the file, on every reload too.
    given = {key: getattr(value, "value", value) for key, value in ctx.params.items()
             if key in CONFIG_KEYS and getattr(ctx.get_parameter_source(key), "name", None) == "COMMANDLINE"}
    log = Log(given.get("log_format", "text"))
    if config is None and os.path.exists(DEFAULT_CONFIG):
        config = DEFAULT_CONFIG
    try:
        cfg = merge_config(read_config(config) if config is not None else {}, given)
    except ConfigError as e:
        _fail(log, EXIT_CONFIG, str(e), file=e.path, line=e.line, key=e.key)
    log.format = cfg.log_format
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    engine = Engine(cfg.profile, cfg.dyn, cfg.max_processes, cfg.max_vcpus)
    # Statistics are kept for the metrics server, when there is one.
    stats = Stats(engine, per_vm=cfg.vm_label, max_vms=cfg.max_vms)
    if not from_:
        if follow:
            _fail(log, EXIT_INPUT, "--follow needs --from")
        # SIGHUP reloads the configuration and reopens the events log (logrotate); from the start, so that an
        # early one does not kill us.
        hup = threading.Event()
        signal.signal(signal.SIGHUP, lambda *_: hup.set())
        _run_live(cfg, LiveReload(config, given, cfg, log), engine, stats, stop, hup, log)
        return
    server = _serve_metrics(stats, None if cfg.listen is None or cfg.listen.lower() in NO_LISTEN else cfg.listen,
                            cfg.web_config, log)
    try:
        events = EventLog(cfg.events_log) if cfg.events_log else None
    except OSError as e:
        if server is not None:
            server.stop()
        _fail(log, EXIT_INPUT, f"events log {cfg.events_log}: {e.strerror}")
    pipeline = Pipeline(engine, ViolationPrinter(), events, observers=[stats] if server is not None else [])
    try:
        for file, batch, lines in file_source(from_, stop, follow):
            pipeline.feed(batch, file, lines)
            if stop.is_set():
                break
    except InputError as e:
        _fail(log, EXIT_INPUT, str(e))
    finally:
        pipeline.close()
        if server is not None:
            server.stop()
        log.info(f"{pipeline.events} events judged, {pipeline.violations} violations", plain=True,
                 events=pipeline.events, violations=pipeline.violations)


def _fail(log: Log, status: int, msg: str, **fields) -> NoReturn:
    """The one-line error of an exit status, then that exit."""
    log.error(msg, status=status, **fields)
    raise typer.Exit(status)


def _check_host(log: Log) -> None:
    """Exits if the kernel lacks what every backend needs: BTF (struct offsets) and tracefs (mounted if it can
    be). Before anything is started, so that the agent fails early with its own status."""
    from agent.live import ensure_tracefs
    from agent.probes.btf import SYSFS_BTF
    vmlinux = os.path.join(SYSFS_BTF, "vmlinux")
    try:
        with open(vmlinux, "rb"):
            pass
    except OSError as e:
        _fail(log, EXIT_NO_BTF, f"no kernel BTF: {vmlinux}: {e.strerror} (a kernel built without "
                                f"CONFIG_DEBUG_INFO_BTF?); the probes find the kernel's struct fields there")
    root, note = ensure_tracefs()
    if root is None:
        _fail(log, EXIT_NO_TRACEFS, note)
    if note:
        log.info(note)


def _open_events_log(cfg: Config, stats: Stats, log: Log) -> LiveEventLog:
    return LiveEventLog(cfg.events_log, stats, warn=log.warning, max_bytes=cfg.events_log_max_bytes,
                        keep=cfg.events_log_keep)


def _run_live(cfg: Config, reload: "LiveReload", engine: Engine, stats: Stats, stop: threading.Event,
              hup: threading.Event, log: Log) -> None:
    """The live agent: attach, then poll, log and judge until stopped (agent/live.py)."""
    from agent.live import LiveRunner, NoProbes, Probes, process_age, sd_notify
    from agent.privileges import PrivilegeError, describe, drop_privileges

    t0 = time.perf_counter()
    _check_host(log)
    stats.measure_latency(time.monotonic_ns)  # the probes' ts: bpf_ktime_get_ns, CLOCK_MONOTONIC
    for stage in ("ringbuf", "reader") + (("events_log",) if cfg.events_log else ()):
        stats.lost(stage, 0)
    listen = DEFAULT_LISTEN if cfg.listen is None else cfg.listen
    # Bound now (a port below 1024 needs root), served once privileges are dropped: a thread started
    # before would keep them.
    server = _serve_metrics(stats, None if listen.lower() in NO_LISTEN else listen, cfg.web_config, log,
                            start=False)
    events = None
    if cfg.events_log:
        try:
            events = _open_events_log(cfg, stats, log)
        except OSError as e:
            if server is not None:
                server.stop()
            _fail(log, EXIT_INPUT, f"events log {cfg.events_log}: {e.strerror or e}")
    runner = LiveRunner(Pipeline(engine, ViolationPrinter(), None, observers=[stats] if server else []),
                        stats, events)
    runner.reopen_log = hup
    runner.on_hup = reload
    reload.runner = runner
    probes = runner.probes = Probes(cfg.backend, runner.on_event)
    try:
        try:
            probes.start()
        except NoProbes as e:
            probes.report_to(stats)
            _fail(log, EXIT_NO_PROBES, f"{e}; `xstate-agent doctor` checks what this host allows")
        probes.report_to(stats)
        if probes.tracefs_note:
            log.info(probes.tracefs_note)
        for plan in probes.plans.values():
            if plan.attached:
                log.info(f"probe {plan.source}: {plan.backend}" + (f" ({', '.join(plan.kinds)})" if plan.kinds else ""),
                         source=plan.source, backend=plan.backend, kinds=plan.kinds)
            else:
                (log.warning if plan.applicable else log.info)(
                    f"probe {plan.source}: {'NOT attached' if plan.applicable else 'not applicable on this host'}: "
                    + "; ".join(f"{t.backend}: {t.reason}" for t in plan.tried),
                    source=plan.source, tried={t.backend: t.reason for t in plan.tried})
        try:
            dropped = drop_privileges(cfg.user, [os.path.dirname(os.path.abspath(events.path))] if events else [])
        except PrivilegeError as e:
            _fail(log, EXIT_PRIVILEGES, f"dropping privileges: {e}")
        log.info("privileges: " + describe(dropped), **dropped)
        if server is not None:
            server.start()
        if events is not None:
            events.comment(f"xstate-agent {__version__} started pid {os.getpid()} backend {cfg.backend} "
                           f"profile {engine.profile.name}: {probes.summary()}")
        attached = sum(p.attached for p in probes.plans.values())
        applicable = sum(p.applicable for p in probes.plans.values())
        age = process_age()
        elapsed = time.perf_counter() - t0
        log.info(f"ready: {attached}/{applicable} event sources attached in {elapsed:.2f} s"
                 + (f" ({len(probes.plans) - applicable} not applicable on this host)"
                    if applicable < len(probes.plans) else "")
                 + (f" ({age:.2f} s since the process started)" if age is not None else "")
                 + f": {probes.summary()}" + (f"; events log {events.path}" if events else ""),
                 attached=attached, sources=applicable, start_s=round(elapsed, 3),
                 events_log=events.path if events else None)
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
        log.info(f"{runner.pipeline.events} events judged, {runner.pipeline.violations} violations, lost: "
                 + ", ".join(f"{k} {v}" for k, v in sorted(lost.items())), plain=True,
                 events=runner.pipeline.events, violations=runner.pipeline.violations, lost=lost)


class LiveReload:
    """SIGHUP in the live agent: the configuration file read again and applied, in the reader thread between
    two batches of events (LiveRunner.on_hup), without touching the probes or forgetting what the engine
    tracks. The keys in config.NEEDS_RESTART are reported and ignored. A file that is not valid, or an events
    log that cannot be opened, changes nothing: the configuration in force stays, and the log says why."""

    def __init__(self, path: str | None, given: dict, cfg: Config, log: Log):
        self.path = path  # None: no file, SIGHUP only reopens the events log
        self.given = given
        self.config = cfg  # in force
        self.log = log
        self.runner = None  # the LiveRunner it reconfigures, once made

    def __call__(self) -> None:
        if self.path is None:
            return
        from agent.live import sd_notify
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            self._reload()
        finally:
            sd_notify("READY=1")

    def _reload(self) -> None:
        try:
            values = read_config(self.path)
        except ConfigError as e:
            self.log.error(f"reload: {e}; the configuration in force is kept", file=e.path, line=e.line, key=e.key)
            return
        new = merge_config(values, self.given)
        old = self.config
        changed = [k for k in CONFIG_KEYS if getattr(old, k) != getattr(new, k)]
        restart = [k for k in changed if k in NEEDS_RESTART]
        apply = [k for k in changed if k not in NEEDS_RESTART]
        runner, stats = self.runner, self.runner.stats
        # The one step that can fail comes first: a reload is whole or nothing.
        if any(k.startswith("events_log") for k in apply):
            try:
                events = _open_events_log(new, stats, self.log) if new.events_log else None
            except OSError as e:
                self.log.error(f"reload: events log {new.events_log}: {e.strerror or e}; the configuration in "
                               f"force is kept", file=self.path)
                return
            if runner.log is not None:
                runner.log.close()
            runner.log = events
            if events is not None:
                stats.lost("events_log", 0)
        if "profile" in apply or "dyn" in apply:
            runner.pipeline.engine.set_profile(new.profile, new.dyn)
        if "vm_label" in apply or "max_vms" in apply:
            stats.set_vm_labels(new.vm_label, new.max_vms)
        self.log.format = new.log_format
        self.config = replace(new, **{k: getattr(old, k) for k in restart})
        overridden = [k for k in values if k in self.given and values[k] != self.given[k]]

        def change(k):
            return f"{k} {json.dumps(_as_in_file(k, getattr(old, k)))} -> {json.dumps(_as_in_file(k, getattr(new, k)))}"
        msg = f"reloaded {self.path}: {'; '.join(map(change, apply)) or 'no change'}"
        if restart:
            msg += f"; needs a restart, ignored: {', '.join(restart)}"
        if overridden:
            msg += f"; the command line sets {', '.join(overridden)}"
        self.log.info(msg, file=self.path, changed={k: _as_in_file(k, getattr(new, k)) for k in apply},
                      needs_restart=restart, command_line=overridden)
        if apply and runner.log is not None:
            runner.log.comment(f"xstate-agent pid {os.getpid()} {msg}")


def _as_in_file(key: str, value):
    """A configuration value as the file writes it."""
    return hex(value) if key == "dyn" else "" if value is None and key in OPTIONAL_PATHS else value


def _serve_metrics(stats: Stats, listen: str | None, web_config: str | None, log: Log, start: bool = True):
    """The metrics server bound to `listen` (and started); None without `listen`. Exits on a bad address or
    config."""
    if listen is None:
        if web_config is not None:
            _fail(log, EXIT_INPUT, "--web-config needs --listen")
        return None
    try:
        web = WebConfig.load(web_config) if web_config else None
        server = MetricsServer(make_registry(stats), listen, web, __version__)
    except (ValueError, WebConfigError) as e:
        _fail(log, EXIT_INPUT, f"{'--web-config ' if isinstance(e, WebConfigError) else '--listen '}{e}")
    except OSError as e:
        _fail(log, EXIT_LISTEN, f"--listen {listen}: {e.strerror or e}")
    log.info(f"metrics on {server.url}", plain=True, url=server.url)
    return server.start() if start else server


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
