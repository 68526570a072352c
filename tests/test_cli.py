"""The command line: `replay` (verdicts, output formats, exit status) and `rules`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli import app
from agent.events.writer import encode
from helpers import (
    AMX, NO_AMX, ROOT, SAMPLES, fpu_load, get_guest, lines_of, vcpu_create, xcr0, xfd,
)

HEALTHY = str(SAMPLES / "amx-guest-healthy.jsonl")
MISCONFIGURED = str(SAMPLES / "amx-guest-misconfigured.jsonl")
JSON_KEYS = ["rule", "severity", "ts", "tgid", "vm", "vcpu", "kind", "file", "line", "message"]
EXECUTABLE = Path(sys.prefix) / "bin" / "xstate-agent"

runner = CliRunner()


def replay(*args, input=None):
    return runner.invoke(app, ["replay", *args], input=input)


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def write_log(path: Path, *events, text: str = "") -> str:
    path.write_bytes(b"".join(encode(ev) for ev in events) + text.encode())
    return str(path)


@pytest.fixture
def critical_log(tmp_path) -> str:
    """A log with one critical violation (XS004, invalid XCR0) and no warning."""
    return write_log(tmp_path / "critical.jsonl", vcpu_create(), xcr0(0x6))


# replay: verdicts on the samples ---------------------------------------------------------

def test_healthy_sample_has_no_violation():
    r = replay(HEALTHY)
    assert r.exit_code == 0
    assert r.stdout == ""
    assert "13 events judged (0 refused), 0 violations (none); profile upstream" in r.stderr


def test_misconfigured_sample_gives_xs014_xs013_xs017_warnings_upstream():
    r = replay(MISCONFIGURED)
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert [ln.split(" ")[:3] for ln in lines] == [
        [f"{MISCONFIGURED}:5:", "XS014", "warning:"],
        [f"{MISCONFIGURED}:6:", "XS013", "warning:"],
        [f"{MISCONFIGURED}:7:", "XS017", "warning:"],
    ]
    assert "0x40000" in lines[0] and "0x202e7" in lines[2]
    assert "[cpuid tgid=5151 vm=vm-7 vcpu=0 ts=3000]" in lines[0]
    assert "[perm tgid=5151 ts=3500]" in lines[1]


def test_misconfigured_sample_in_reference_has_no_upstream_only_rule():
    r = replay(MISCONFIGURED, "--profile", "reference", "--format", "json")
    assert r.exit_code == 1
    assert [v["rule"] for v in json_lines(r.stdout)] == ["XS014", "XS017"]
    assert "profile reference" in r.stderr


def test_healthy_upstream_recording_breaks_the_seeds_passthrough_precondition():
    # The shipped kernel starts passthrough when the guest arms XFD; the seed only once
    # XCR0 & ~XFD holds a dynamic feature. The reference profile says so (a warning).
    r = replay(HEALTHY, "--profile", "reference", "--format", "json")
    assert [(v["rule"], v["line"]) for v in json_lines(r.stdout)] == [("XS010", 10)]
    assert r.exit_code == 1


@pytest.mark.parametrize("profile", ["upstream", "reference"])
@pytest.mark.parametrize("sample", sorted(p.name for p in SAMPLES.glob("*.jsonl")))
def test_every_sample_is_valid_input(sample, profile):
    r = replay(str(SAMPLES / sample), "--profile", profile, "--fail-on", "never")
    assert r.exit_code == 0, r.stderr
    assert "error" not in r.stderr


# replay: output ---------------------------------------------------------------------------

def test_json_format_keys_and_values():
    r = replay(MISCONFIGURED, "--format", "json")
    out = json_lines(r.stdout)
    assert all(list(v) == JSON_KEYS for v in out)
    assert out[0] == {
        "rule": "XS014", "severity": "warning", "ts": 3000, "tgid": 5151, "vm": "vm-7", "vcpu": 0,
        "kind": "cpuid", "file": MISCONFIGURED, "line": 5, "message": out[0]["message"],
    }
    assert "0x40000" in out[0]["message"]
    # A process event has no vm or vcpu.
    assert (out[1]["kind"], out[1]["vm"], out[1]["vcpu"]) == ("perm", None, None)


def test_summary_goes_to_stderr_only():
    r = replay(MISCONFIGURED, "--format", "json")
    assert r.stderr.strip() == (
        "7 events judged (3 refused), 3 violations (3 warning); profile upstream; evicted 0 processes, 0 vCPUs")
    assert "events judged" not in r.stdout


def test_text_format_is_the_default():
    assert replay(MISCONFIGURED).stdout != replay(MISCONFIGURED, "--format", "json").stdout
    assert replay(MISCONFIGURED).stdout == replay(MISCONFIGURED, "--format", "text").stdout


def test_text_output_escapes_control_characters(tmp_path):
    # A hostile log must not reach the operator's terminal as escape sequences.
    log = write_log(tmp_path / "esc.jsonl", vcpu_create(vm="vm\x1b[2J"), xcr0(0x40007, vm="vm\x1b[2J"))
    out = replay(log).stdout
    assert "\x1b" not in out and "vm\\x1b[2J" in out


def test_ts_going_backwards_is_a_warning_not_an_error(tmp_path):
    log = write_log(tmp_path / "ts.jsonl", vcpu_create(ts=50), xcr0(0x7, ts=20))
    r = replay(log)
    assert r.exit_code == 0
    assert f"{log}:2: warning: ts goes backwards" in r.stderr


# replay: exit status ----------------------------------------------------------------------

@pytest.mark.parametrize("fail_on,status", [("critical", 0), ("warning", 1), ("never", 0)])
def test_fail_on_with_warnings(fail_on, status):
    assert replay(MISCONFIGURED, "--fail-on", fail_on).exit_code == status


@pytest.mark.parametrize("fail_on,status", [("critical", 1), ("warning", 1), ("never", 0)])
def test_fail_on_with_a_critical(critical_log, fail_on, status):
    r = replay(critical_log, "--fail-on", fail_on, "--format", "json")
    assert [v["rule"] for v in json_lines(r.stdout)] == ["XS004"]
    assert r.exit_code == status


@pytest.mark.parametrize("fail_on", ["critical", "warning", "never"])
def test_fail_on_clean(fail_on):
    assert replay(HEALTHY, "--fail-on", fail_on).exit_code == 0


def test_default_fail_on_is_warning():
    assert replay(MISCONFIGURED).exit_code == 1


@pytest.mark.parametrize("fail_on", ["critical", "warning", "never"])
def test_bad_input_exits_2_naming_file_and_line(tmp_path, fail_on):
    log = write_log(tmp_path / "bad.jsonl", vcpu_create(), xcr0(0x6),
                    text='{"v":1,"ts":9,"kind":"xcr0","tgid":1}\n' + encode(xcr0(0x5)).decode())
    r = replay(log, "--fail-on", fail_on, "--format", "json")
    assert r.exit_code == 2
    # The violation before the bad line is reported; nothing after it is judged.
    assert [(v["rule"], v["line"]) for v in json_lines(r.stdout)] == [("XS004", 2)]
    assert f"error: {log}:3: " in r.stderr and "`vm`" in r.stderr
    assert "2 events judged" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_missing_file_exits_2(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    r = replay(missing)
    assert r.exit_code == 2
    assert f"error: {missing}: cannot open" in r.stderr
    assert "Traceback" not in r.stderr


def test_not_utf8_exits_2(tmp_path):
    log = tmp_path / "latin1.jsonl"
    log.write_bytes(encode(vcpu_create()) + b'{"v":1,"ts":1,"kind":"exit","tgid":1,"comm":"\xe9"}\n')
    r = replay(str(log))
    assert r.exit_code == 2
    assert f"{log}:2: not valid UTF-8" in r.stderr


# replay: inputs ---------------------------------------------------------------------------

def test_stdin_via_dash():
    r = replay("-", "--format", "json", input=Path(MISCONFIGURED).read_bytes())
    assert r.exit_code == 1
    out = json_lines(r.stdout)
    assert [(v["rule"], v["file"], v["line"]) for v in out] == [("XS014", "<stdin>", 5), ("XS013", "<stdin>", 6),
                                                                ("XS017", "<stdin>", 7)]


def test_stdin_bad_input_names_the_line():
    r = replay("-", input=b"# header\n{}\n")
    assert r.exit_code == 2
    assert ":2: " in r.stderr and "stdin" in r.stderr


def test_several_files_in_order():
    r = replay(MISCONFIGURED, HEALTHY, MISCONFIGURED, "--format", "json")
    out = json_lines(r.stdout)
    assert [(v["file"], v["line"]) for v in out] == [(MISCONFIGURED, 5), (MISCONFIGURED, 6), (MISCONFIGURED, 7)] * 2
    assert "27 events judged" in r.stderr


def test_several_files_are_one_stream(tmp_path):
    # Rotated logs: the permission in the first file judges the XCR0 write in the second.
    first = write_log(tmp_path / "1.jsonl", get_guest(NO_AMX), vcpu_create())
    second = write_log(tmp_path / "2.jsonl", xcr0(AMX))
    r = replay(first, second, "--format", "json")
    assert [(v["rule"], v["file"], v["line"]) for v in json_lines(r.stdout)] == [("XS001", second, 1)]
    assert replay(second).exit_code == 0


def test_stdin_between_files(tmp_path):
    first = write_log(tmp_path / "1.jsonl", get_guest(NO_AMX))
    r = replay(first, "-", "--format", "json", input=encode(vcpu_create()) + encode(xcr0(AMX)))
    assert [(v["rule"], v["file"], v["line"]) for v in json_lines(r.stdout)] == [("XS001", "<stdin>", 2)]


# replay: options --------------------------------------------------------------------------

def test_dyn_option(tmp_path):
    bit19 = 1 << 19
    log = write_log(tmp_path / "dyn.jsonl", get_guest(AMX), vcpu_create(), xcr0(AMX | bit19))
    assert replay(log).exit_code == 0
    r = replay(log, "--dyn", hex(0x40000 | bit19), "--format", "json")
    assert [v["rule"] for v in json_lines(r.stdout)] == ["XS001"]
    assert "0x80000" in json_lines(r.stdout)[0]["message"]


@pytest.mark.parametrize("bad", ["0", "zz", hex(2**64)])
def test_dyn_option_rejects_bad_masks(bad):
    r = replay(HEALTHY, "--dyn", bad)
    assert r.exit_code == 2
    assert "--dyn" in r.stderr


def test_unknown_profile_is_a_usage_error():
    assert replay(HEALTHY, "--profile", "seed").exit_code == 2


def test_caps_evict_and_are_counted(tmp_path):
    log = write_log(tmp_path / "caps.jsonl", vcpu_create(vcpu=0), vcpu_create(vcpu=1),
                    fpu_load(0x3, xfd=0x40000, vcpu=0), xfd(0, vcpu=1))
    r = replay(log, "--max-vcpus", "1")
    # vCPU 0 was evicted before its fpu_load: its XFD history is unknown, no XS015.
    assert r.exit_code == 0
    # Each of the last three events evicts the only other vCPU.
    assert "evicted 0 processes, 3 vCPUs" in r.stderr
    assert replay(log).exit_code == 1


# rules --------------------------------------------------------------------------------------

def test_rules_text():
    r = runner.invoke(app, ["rules"])
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == [f"XS{n:03d}" for n in range(1, 21)]
    for ln in lines:
        rule_id, severity, profiles = ln.split()[:3]
        assert severity in ("critical", "warning")
        assert profiles == ("upstream" if rule_id in ("XS002", "XS012", "XS013") else "both")


def test_rules_json():
    r = runner.invoke(app, ["rules", "--format", "json"])
    assert r.exit_code == 0
    rules = json.loads(r.stdout)
    assert len(rules) == 20
    assert [x["id"] for x in rules] == [f"XS{n:03d}" for n in range(1, 21)]
    assert all(set(x) == {"id", "severity", "profiles", "kinds", "summary", "seed"} for x in rules)
    by_id = {x["id"]: x for x in rules}
    assert by_id["XS002"]["profiles"] == ["upstream"]
    assert by_id["XS001"]["profiles"] == ["reference", "upstream"]
    assert by_id["XS018"]["severity"] == "warning" and by_id["XS018"]["kinds"] == ["xsave"]


# The installed console command ------------------------------------------------------------

def run(*args, input=None):
    assert EXECUTABLE.exists(), f"{EXECUTABLE} missing: install the project in its virtual environment"
    return subprocess.run([str(EXECUTABLE), *args], input=input, capture_output=True, cwd=ROOT, timeout=60)


def test_console_command_replays_samples():
    r = run("replay", "samples/amx-guest-healthy.jsonl")
    assert (r.returncode, r.stdout) == (0, b"")
    assert b"0 violations" in r.stderr
    r = run("replay", "--format", "json", "samples/amx-guest-misconfigured.jsonl")
    assert r.returncode == 1
    assert [v["rule"] for v in json_lines(r.stdout.decode())] == ["XS014", "XS013", "XS017"]


def test_console_command_bad_input_from_stdin():
    data = "\n".join(lines_of(HEALTHY)[:3] + ['{"v":1,"ts":1,"kind":"exit","tgid":1,"oops":}']) + "\n"
    r = run("replay", "-", input=data.encode())
    assert r.returncode == 2
    assert b":4: " in r.stderr
    assert b"Traceback" not in r.stderr


def test_console_command_rules():
    r = run("rules", "--format", "json")
    assert r.returncode == 0
    assert len(json.loads(r.stdout)) == 20


def test_console_command_output_into_a_closed_pipe_has_no_traceback():
    # `xstate-agent replay ... | head -1`: no traceback when the reader goes away.
    p = subprocess.Popen([str(EXECUTABLE), "replay", "--fail-on", "never", "-"], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    events = b"".join(encode(xcr0(0x6, ts=i, vcpu=i % 7)) for i in range(20000))
    p.stdout.close()
    _, err = p.communicate(events, timeout=60)
    assert b"Traceback" not in err
