"""The configuration file of `run` (agent/config.py): validation naming file, line and key; the command line
over the file; the SIGHUP reload (cli.LiveReload) that keeps what the engine tracks; JSON logs (agent/logs.py);
the exit statuses of `run`."""

import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from agent import cli
from agent.config import BACKENDS, DEFAULT_PATH, KEYS, NEEDS_RESTART, Config, ConfigError, merge, read, resolve
from agent.eventlog import LiveEventLog
from agent.live import LiveRunner
from agent.logs import FORMATS, Log
from agent.pipeline import Pipeline
from agent.policy.engine import Engine
from agent.policy.profiles import PROFILES
from agent.stats import Stats
from agent.xstate import DEFAULT_DYN
from helpers import AMX, NO_AMX, ROOT, SAMPLES, TILEDATA, get_guest, get_host, vcpu_create, xcr0, xfd_err

EXAMPLE = ROOT / "deploy" / "config.example.toml"
MISCONFIGURED = str(SAMPLES / "amx-guest-misconfigured.jsonl")  # upstream: XS014, XS013, XS017; reference: no XS013
EXECUTABLE = Path(sys.prefix) / "bin" / "xstate-agent"
BIT19 = 1 << 19


def write(tmp_path, text: str, name="config.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- reading and checking the file -------------------------------------------------------------

def test_values_are_checked_and_normalized(tmp_path):
    path = write(tmp_path, '# a comment\nprofile = "reference"\ndyn = "0xc0000"\nmax_vms = 3\nvm_label = false\n'
                           'events_log = ""\nweb_config = "/etc/xstate-agent/web.yml"\nlisten = "none"\n'
                           'log_format = "json"\nmax_vcpus = 7\n')
    assert read(path) == {"profile": "reference", "dyn": 0xC0000, "max_vms": 3, "vm_label": False,
                          "events_log": None, "web_config": "/etc/xstate-agent/web.yml", "listen": "none",
                          "log_format": "json", "max_vcpus": 7}
    # An integer mask too; a string reaches past TOML's 2^63-1.
    assert read(write(tmp_path, "dyn = 262144\n"))["dyn"] == DEFAULT_DYN
    assert read(write(tmp_path, 'dyn = "0xffffffffffffffff"\n'))["dyn"] == 2**64 - 1
    assert read(write(tmp_path, "")) == {}


@pytest.mark.parametrize("text,line,key,what", [
    ('profile = "seed"', 3, "profile", 'expected one of "upstream", "reference", not "seed"'),
    ("max_vms = 0", 3, "max_vms", "expected an integer of at least 1, not 0"),
    ('max_vms = "5"', 3, "max_vms", 'expected an integer of at least 1, not "5"'),
    ("max_processes = true", 3, "max_processes", "expected an integer of at least 1, not true"),
    ("events_log_max_bytes = -1", 3, "events_log_max_bytes", "expected an integer of at least 0, not -1"),
    ("vm_label = 1", 3, "vm_label", "expected true or false, not 1"),
    ('dyn = "zz"', 3, "dyn", "expected a mask of 1 to 2^64-1"),
    ("dyn = 0", 3, "dyn", "expected a mask of 1 to 2^64-1"),
    ('events_log = "events.jsonl"', 3, "events_log", 'expected an absolute path, or "" for none, not "events.jsonl"'),
    ('listen = "localhost"', 3, "listen", "expected ADDR:PORT, [ADDR]:PORT or :PORT"),
    ('listen = "::1:9477"', 3, "listen", "write an IPv6 address in brackets"),
    ('log_format = "xml"', 3, "log_format", 'expected one of "text", "json", not "xml"'),
    ('backend = "ebpf"', 3, "backend", 'expected one of "auto", "kprobe", "tracepoint", not "ebpf"'),
    ("maxvms = 3", 3, "maxvms", "unknown key (did you mean max_vms?)"),
    ("colour = 3", 3, "colour", "unknown key; the keys are backend, profile, "),
    ('"profile" = 3', 3, "profile", "not 3"),  # a quoted key
    ("  profile.name = 3", 3, "profile", "not a table"),  # a dotted key
    ("[profile]\nname = 3", 3, "profile", "not a table"),  # a table header
    ("[[listen]]\nx = 1", 3, "listen", "not an array"),
    ("when = 2024-01-01", 3, "when", "unknown key"),
])
def test_a_bad_key_is_named_with_its_file_and_line(tmp_path, text, line, key, what):
    path = write(tmp_path, f'# xstate-agent\nmax_vcpus = 8\n{text}\nevents_log_keep = 9\n')
    with pytest.raises(ConfigError) as e:
        read(path)
    assert (e.value.path, e.value.line, e.value.key) == (path, line, key)
    assert str(e.value).startswith(f"{path}:{line}: {key}: ") and what in str(e.value)


def test_the_first_bad_key_of_the_file_is_reported(tmp_path):
    path = write(tmp_path, 'profile = "upstream"\nmax_vms = 0\n\nmax_vcpus = 0\nprofil = 1\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}:2: max_vms: "):
        read(path)


@pytest.mark.parametrize("data,line,what", [
    (b'profile = "upstream"\nmax_vms = \n', 2, "not valid TOML: Invalid value (column 11)"),
    (b'profile = "upstream"\nprofile = "reference"\n', 2, "not valid TOML: Cannot overwrite a value"),
    (b'profile = "upstream"\n# caf\xe9\n', 2, "not valid UTF-8"),
])
def test_a_file_that_is_not_toml_is_named_with_its_line(tmp_path, data, line, what):
    path = tmp_path / "config.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:{line}: {re.escape(what)}"):
        read(str(path))


def test_a_file_that_cannot_be_read(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}/missing.toml: cannot read: No such file"):
        read(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=": cannot read: Is a directory"):
        read(str(tmp_path))


def test_the_command_line_wins_over_the_file_which_wins_over_the_defaults(tmp_path):
    path = write(tmp_path, 'profile = "reference"\nmax_vms = 3\nevents_log = "/var/log/x.jsonl"\n')
    cfg = resolve(path, {"max_vms": 5, "backend": "tracepoint"})
    assert (cfg.profile, cfg.max_vms, cfg.backend, cfg.events_log, cfg.dyn) == (
        "reference", 5, "tracepoint", "/var/log/x.jsonl", DEFAULT_DYN)
    # "" is none on the command line too.
    assert merge(read(path), {"events_log": ""}).events_log is None
    assert resolve(None, {}) == Config()


# ---- the example, and the options of `run` -------------------------------------------------------

def test_the_example_loads_sets_every_key_and_documents_each():
    text = EXAMPLE.read_text()
    values = read(str(EXAMPLE))
    assert list(values) == list(KEYS), "the example sets every key, in the order of Config"
    # The defaults, but for the events log that production wants.
    assert {k: v for k, v in values.items() if getattr(Config(), k) != v} == {
        "events_log": "/var/log/xstate-agent/events.jsonl", "listen": "127.0.0.1:9477"}
    lines = text.split("\n")
    for key in KEYS:
        n = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        # A comment before the key or the keys it is grouped with.
        above = next(lines[i] for i in range(n - 1, -1, -1) if not re.match(r"\w+ = ", lines[i]))
        assert above.startswith("# "), f"{key} is not documented"
    for key in NEEDS_RESTART:
        n = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        comment = "\n".join(lines[max(0, n - 6):n])
        assert "Restart." in comment.split("\n\n")[-1], f"{key}: needs a restart, the example must say so"


def test_every_option_of_run_has_a_key_of_the_same_name():
    command = typer.main.get_command(cli.app).commands["run"]
    options = {p.name for p in command.params} - {"from_", "follow", "config", "help"}
    assert options == set(KEYS)
    # The defaults agree.
    defaults = {p.name: p.default for p in command.params if p.name in KEYS}
    for key, default in defaults.items():
        want = getattr(Config(), key)
        got = getattr(default, "value", default)
        assert got == (hex(want) if key == "dyn" else want), key
    # And the choices.
    assert [b.value for b in cli.BackendName] == list(BACKENDS)
    assert [p.value for p in cli.ProfileName] == list(PROFILES)
    assert [f.value for f in cli.Format] == list(FORMATS)


def xstate(*args, env=None):
    """The installed command (violations go to the process's standard output, which CliRunner does not catch)."""
    r = subprocess.run([str(EXECUTABLE), *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_the_default_path_is_read_only_if_it_exists(tmp_path, monkeypatch):
    assert DEFAULT_PATH == "/etc/xstate-agent/config.toml"
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(tmp_path / "config.toml"))
    runner = CliRunner()
    r = runner.invoke(cli.app, ["run", "--from", MISCONFIGURED])
    assert (r.exit_code, r.stderr) == (0, "7 events judged, 3 violations\n")
    write(tmp_path, 'profile = "reference"\n')
    r = runner.invoke(cli.app, ["run", "--from", MISCONFIGURED])
    assert (r.exit_code, r.stderr) == (0, "7 events judged, 2 violations\n")


def test_run_takes_the_file_and_the_command_line_over_it(tmp_path):
    path = write(tmp_path, 'profile = "reference"\nlog_format = "json"\n')
    r = xstate("run", "--config", path, "--from", MISCONFIGURED)
    assert [json.loads(v)["rule"] for v in r.stdout.splitlines()] == ["XS014", "XS017"]
    assert json.loads(r.stderr)["msg"] == "7 events judged, 2 violations"
    r = xstate("run", "--config", path, "--from", MISCONFIGURED, "--profile", "upstream", "--log-format", "text")
    assert [json.loads(v)["rule"] for v in r.stdout.splitlines()] == ["XS014", "XS013", "XS017"]
    assert r.stderr == "7 events judged, 3 violations\n"


def test_run_with_a_bad_file_exits_5_with_one_line(tmp_path):
    path = write(tmp_path, 'profile = "upstream"\n\nmax_vms = "many"\n')
    r = CliRunner().invoke(cli.app, ["run", "--config", path, "--from", MISCONFIGURED])
    assert r.exit_code == cli.EXIT_CONFIG == 5
    assert r.stderr == f'error: {path}:3: max_vms: expected an integer of at least 1, not "many"\n'
    assert r.stdout == ""
    r = CliRunner().invoke(cli.app, ["run", "--config", str(tmp_path / "none.toml"), "--log-format", "json"])
    assert r.exit_code == 5
    err = json.loads(r.stderr)
    assert err["level"] == "error" and err["msg"].endswith("none.toml: cannot read: No such file or directory")
    assert err["fields"]["status"] == 5


# ---- JSON logs ----------------------------------------------------------------------------------

def test_log_lines_text_and_json():
    out = io.StringIO()
    log = Log("text", out)
    log.info("ready", attached=9)
    log.warning("probe x: NOT attached")
    log.error("no tracefs", status=7)
    log.info("7 events judged", plain=True)
    assert out.getvalue() == ("xstate-agent: ready\nxstate-agent: warning: probe x: NOT attached\n"
                              "error: no tracefs\n7 events judged\n")
    out = io.StringIO()
    log.format, log._stream = "json", out
    log.info("ready", attached=9, path=Path("/x"))
    log.error("no tracefs")
    first, second = map(json.loads, out.getvalue().splitlines())
    assert list(first) == ["ts", "level", "msg", "fields"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["ts"])
    assert (first["level"], first["msg"], first["fields"]) == ("info", "ready", {"attached": 9, "path": "/x"})
    assert (second["level"], second["fields"]) == ("error", {})


def test_json_logs_leave_the_violations_as_they_are(tmp_path):
    text = xstate("run", "--from", MISCONFIGURED, "--listen", "127.0.0.1:0")
    js = xstate("run", "--from", MISCONFIGURED, "--listen", "127.0.0.1:0", "--log-format", "json")
    assert js.stdout == text.stdout and len(text.stdout.splitlines()) == 3
    lines = [json.loads(line) for line in js.stderr.splitlines()]
    assert [line["msg"].split(" ")[:2] for line in lines] == [["metrics", "on"], ["7", "events"]]
    assert lines[0]["fields"]["url"].startswith("http://127.0.0.1:")
    assert lines[1]["fields"] == {"events": 7, "violations": 3}


# ---- the engine and the statistics, reconfigured --------------------------------------------------

def judge(engine, *events):
    return [v.rule.id for ev in events for v in engine.judge(ev)]


def test_a_new_dyn_keeps_what_the_engine_tracks():
    engine = Engine()
    assert judge(engine, get_guest(NO_AMX), vcpu_create()) == []
    engine.set_profile("upstream", DEFAULT_DYN | BIT19)
    # The exact permission seen before the change makes the write of bit 19 a violation...
    assert judge(engine, xcr0(0x7 | BIT19)) == ["XS001"]
    # ...which an engine that saw nothing before does not know.
    assert judge(Engine(dyn=DEFAULT_DYN | BIT19), xcr0(0x7 | BIT19)) == []


def test_a_new_profile_keeps_the_vcpus_and_forgets_what_it_reads_differently():
    engine = Engine("upstream")
    assert judge(engine, get_host(NO_AMX), get_guest(AMX), vcpu_create(vcpu=0), vcpu_create(vcpu=1)) == []
    tracked = (dict(engine.state.procs), dict(engine.state.vcpus), engine.refused.copy())
    engine.set_profile("reference", DEFAULT_DYN)
    assert (engine.profile.name, [r.id for r in engine.rules]) == ("reference", [r.id for r in Engine("reference").rules])
    assert (dict(engine.state.procs), dict(engine.state.vcpus), engine.refused) == tracked
    # Upstream's host permission read as the reference's one mask would call this AMX write unpermitted.
    assert judge(engine, xcr0(AMX, vcpu=0)) == []
    # The vCPU's XCR0 (1 since its creation) is still known.
    assert judge(engine, xfd_err(TILEDATA, vcpu=1)) == ["XS005"]
    assert judge(Engine("reference"), xfd_err(TILEDATA, vcpu=1)) == []


def test_vm_label_options_change_the_labelling_from_zero():
    engine = Engine()
    stats = Stats(engine, per_vm=True, max_vms=5)
    Pipeline(engine, observers=[stats]).feed([vcpu_create(vm="a"), xcr0(0x7, vm="a")])
    assert stats.snapshot().vms[("a")].xsetbv == 1
    stats.set_vm_labels(False, 5)
    Pipeline(engine, observers=[stats]).feed([xcr0(0x7, vm="a")])
    snap = stats.snapshot()
    assert list(snap.vms) == [None] and snap.vms[None].xsetbv == 1 and snap.max_vms == 5
    stats.set_vm_labels(True, 1)
    Pipeline(engine, observers=[stats]).feed([xcr0(0x7, vm="a"), vcpu_create(vm="b"), xcr0(0x7, vm="b")])
    snap = stats.snapshot()
    assert (snap.vms["a"].xsetbv, snap.vms["_other"].xsetbv, snap.max_vms) == (1, 1, 1)
    with pytest.raises(ValueError):
        stats.set_vm_labels(True, 0)


# ---- the reload ---------------------------------------------------------------------------------

class Live:
    """What LiveReload reconfigures, as the live agent has it, without probes."""

    def __init__(self, tmp_path, text: str, given: dict | None = None):
        self.path = write(tmp_path, text)
        self.given = given or {}
        cfg = resolve(self.path, self.given)
        self.engine = Engine(cfg.profile, cfg.dyn, cfg.max_processes, cfg.max_vcpus)
        self.stats = Stats(self.engine, per_vm=cfg.vm_label, max_vms=cfg.max_vms)
        self.violations = []
        log = LiveEventLog(cfg.events_log, self.stats) if cfg.events_log else None
        pipeline = Pipeline(self.engine, lambda v, file, line: self.violations.append((v.rule.id, file, line)),
                            observers=[self.stats])
        self.runner = LiveRunner(pipeline, self.stats, log)
        self.out = io.StringIO()
        self.log = Log(cfg.log_format, self.out)
        self.reload = cli.LiveReload(self.path, self.given, cfg, self.log)
        self.reload.runner = self.runner

    def hup(self, text: str) -> str:
        """The file rewritten, then SIGHUP: what the agent said."""
        Path(self.path).write_text(text)
        start = len(self.out.getvalue())
        self.reload()
        return self.out.getvalue()[start:]

    def feed(self, *events):
        self.runner._batch.extend(events)
        self.runner._flush()


def test_reload_changes_the_policy_and_keeps_what_the_engine_tracks(tmp_path):
    live = Live(tmp_path, 'profile = "upstream"\n')
    live.feed(get_guest(NO_AMX), vcpu_create())
    said = live.hup(f'profile = "upstream"\ndyn = "{DEFAULT_DYN | BIT19:#x}"\n')
    assert said == f'xstate-agent: reloaded {live.path}: dyn "0x40000" -> "0xc0000"\n'
    live.feed(xcr0(0x7 | BIT19))
    assert [v[0] for v in live.violations] == ["XS001"]
    assert live.reload.config.dyn == DEFAULT_DYN | BIT19
    said = live.hup('profile = "reference"\ndyn = "0x40000"\n')
    assert 'profile "upstream" -> "reference"; dyn "0xc0000" -> "0x40000"' in said
    assert live.stats.snapshot().profile == "reference" and len(live.engine.state.vcpus) == 1
    assert live.stats.rules_hash == Stats(Engine("reference")).rules_hash


def test_a_bad_file_is_reported_and_changes_nothing(tmp_path):
    live = Live(tmp_path, 'profile = "upstream"\n')
    before = live.reload.config
    said = live.hup('profile = "reference"\nmax_vms = 0\n')
    assert said == (f"error: reload: {live.path}:2: max_vms: expected an integer of at least 1, not 0; "
                    f"the configuration in force is kept\n")
    assert live.reload.config is before and live.engine.profile.name == "upstream"


def test_keys_that_need_a_restart_are_reported_and_ignored(tmp_path):
    live = Live(tmp_path, 'backend = "auto"\nmax_vms = 9\n')
    said = live.hup('backend = "tracepoint"\nlisten = ":9100"\nmax_vcpus = 8\nmax_vms = 10\n')
    assert said == (f'xstate-agent: reloaded {live.path}: max_vms 9 -> 10; '
                    f'needs a restart, ignored: backend, max_vcpus, listen\n')
    cfg = live.reload.config
    assert (cfg.backend, cfg.listen, cfg.max_vcpus, cfg.max_vms) == ("auto", None, Config().max_vcpus, 10)
    assert live.stats.max_vms == 10 and live.engine.state.max_vcpus == Config().max_vcpus
    # Until the restart, every reload says so again.
    assert "needs a restart, ignored: backend, max_vcpus, listen" in live.hup(Path(live.path).read_text())


def test_the_command_line_still_wins_on_reload(tmp_path):
    live = Live(tmp_path, 'profile = "upstream"\n', given={"profile": "upstream"})
    said = live.hup('profile = "reference"\n')
    assert said == f"xstate-agent: reloaded {live.path}: no change; the command line sets profile\n"
    assert live.engine.profile.name == "upstream"


def test_reload_moves_the_events_log(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    live = Live(tmp_path, f'events_log = "{first}"\n')
    live.feed(vcpu_create(), xcr0(0x6))
    said = live.hup(f'events_log = "{second}"\nlog_format = "json"\n')
    msg = json.loads(said)
    assert msg["msg"] == (f'reloaded {live.path}: events_log "{first}" -> "{second}"; '
                          f'log_format "text" -> "json"')
    assert msg["fields"]["changed"] == {"events_log": str(second), "log_format": "json"}
    live.feed(xcr0(0x6))
    assert live.violations == [("XS004", str(first), 2), ("XS004", str(second), 2)]
    assert second.read_text().startswith(f"# xstate-agent pid {os.getpid()} {msg['msg']}\n")
    assert first.read_text().count("\n") == 2  # closed, nothing more
    # No events log any more.
    live.hup('events_log = ""\n')
    live.feed(xcr0(0x6))
    assert live.runner.log is None and live.violations[-1] == ("XS004", None, None)


def test_an_events_log_that_cannot_be_opened_refuses_the_whole_reload(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    live = Live(tmp_path, 'profile = "upstream"\n')
    said = live.hup(f'profile = "reference"\nevents_log = "{blocker}/events.jsonl"\n')
    assert said.startswith(f"error: reload: events log {blocker}/events.jsonl: ")
    assert said.endswith("; the configuration in force is kept\n")
    assert live.engine.profile.name == "upstream" and live.reload.config.events_log is None


def test_without_a_file_sighup_only_reopens_the_log(tmp_path):
    reload = cli.LiveReload(None, {}, Config(), Log("text", io.StringIO()))
    reload()  # no runner needed: nothing to do
    assert reload.log._stream.getvalue() == ""


# ---- exit statuses of `run` ----------------------------------------------------------------------

@pytest.fixture
def host(tmp_path):
    """A kernel with BTF and tracefs, as far as the checks before start-up go (XSTATE_AGENT_BTF/TRACEFS)."""
    (tmp_path / "btf").mkdir()
    (tmp_path / "btf" / "vmlinux").write_bytes(b"")
    (tmp_path / "tracefs" / "events").mkdir(parents=True)
    return {**os.environ, "XSTATE_AGENT_BTF": str(tmp_path / "btf"), "XSTATE_AGENT_TRACEFS": str(tmp_path / "tracefs")}


def run(env, *args):
    r = xstate("run", *args, env=env)
    return r.returncode, r.stderr


def test_exit_6_without_btf(host, tmp_path):
    status, err = run({**host, "XSTATE_AGENT_BTF": str(tmp_path / "none")}, "--listen", "none")
    assert status == cli.EXIT_NO_BTF == 6
    assert err == (f"error: no kernel BTF: {tmp_path}/none/vmlinux: No such file or directory (a kernel built "
                   f"without CONFIG_DEBUG_INFO_BTF?); the probes find the kernel's struct fields there\n")


def test_exit_7_without_tracefs(host, tmp_path):
    status, err = run({**host, "XSTATE_AGENT_TRACEFS": str(tmp_path / "none")}, "--log-format", "json")
    assert status == cli.EXIT_NO_TRACEFS == 7
    msg = json.loads(err)
    assert msg["msg"] == f"no tracefs at {tmp_path}/none (XSTATE_AGENT_TRACEFS)" and msg["fields"] == {"status": 7}


def test_exit_3_when_the_metrics_port_is_taken(host):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        status, err = run(host, "--listen", f"127.0.0.1:{port}")
    assert status == cli.EXIT_LISTEN == 3
    assert err == f"error: --listen 127.0.0.1:{port}: Address already in use\n"


def test_exit_2_on_an_events_log_that_cannot_be_opened(host, tmp_path):
    (tmp_path / "file").write_text("")
    status, err = run(host, "--listen", "none", "--events-log", str(tmp_path / "file" / "events.jsonl"))
    assert status == cli.EXIT_INPUT == 2
    assert err.startswith(f"error: events log {tmp_path}/file/events.jsonl: ") and err.count("\n") == 1


def test_exit_4_without_a_probe(host):
    status, err = run(host, "--listen", "none", "--backend", "kprobe")
    assert status == cli.EXIT_NO_PROBES == 4
    error, summary = err.splitlines()  # the summary of a run that judged nothing follows
    assert error.startswith("error: no event source has a working probe: kprobe: ")
    assert summary.startswith("0 events judged, 0 violations")


def test_exit_5_on_a_bad_file_before_anything_else(host, tmp_path):
    status, err = run({**host, "XSTATE_AGENT_BTF": str(tmp_path / "none")}, "--config", write(tmp_path, "x = 1\n"))
    assert status == cli.EXIT_CONFIG == 5 and err.startswith(f"error: {tmp_path}/config.toml:1: x: unknown key")


def test_the_exit_statuses_are_documented():
    readme = (ROOT / "README.md").read_text()
    help_text = CliRunner().invoke(cli.app, ["run", "--help"], terminal_width=200).stdout
    for status in (cli.EXIT_INPUT, cli.EXIT_LISTEN, cli.EXIT_NO_PROBES, cli.EXIT_CONFIG, cli.EXIT_NO_BTF,
                   cli.EXIT_NO_TRACEFS):
        assert re.search(rf"^\| {status} \| ", readme, re.M), f"exit {status} is not in the README's table"
        assert re.search(rf"\b{status}: ", help_text), f"exit {status} is not in `run --help`"
