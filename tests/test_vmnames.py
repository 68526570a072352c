"""VM ids and human names (agent.probes.vmnames): QEMU command-line parsing
and the id lifecycle, without a kernel."""

import re

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.exporters.prometheus import make_registry
from agent.pipeline import Pipeline
from agent.policy.engine import Engine
from agent.probes.vmnames import NAME_MAX, VmNames, name_from_cmdline, sanitise, vm_id_key
from agent.stats import OTHER_VM, Stats
from helpers import vcpu_create, xcr0


def cmdline(*args: str) -> bytes:
    return b"".join(a.encode() + b"\0" for a in args)


QEMU = "/usr/bin/qemu-system-x86_64"


@pytest.mark.parametrize("args, name", [
    # libvirt's form
    (("-name", "guest=web-01,debug-threads=on"), "web-01"),
    # the implied key
    (("-name", "web-01"), "web-01"),
    (("-name", "web-01,process=qemu-web"), "web-01"),
    (("--name", "web-01"), "web-01"),
    # ',,' is a literal comma
    (("-name", "guest=a,,b,debug-threads=on"), "a,b"),
    (("-name", "a,,b"), "a,b"),
    # guest= given after another key
    (("-name", "process=p,guest=late"), "late"),
    # the last -name wins, as in QEMU
    (("-name", "first", "-name", "second"), "second"),
    # no guest name: the UUID
    (("-name", "process=p", "-uuid", "0b5a1c2e-1111-4222-8333-444455556666"), "0b5a1c2e-1111-4222-8333-444455556666"),
    (("-uuid", "0b5a1c2e-1111-4222-8333-444455556666"), "0b5a1c2e-1111-4222-8333-444455556666"),
    (("--uuid", "u"), "u"),
    # nothing
    ((), None),
    (("-name",), None),  # no value
    (("-m", "1024"), None),
    # an empty name falls back to the UUID
    (("-name", "guest=", "-uuid", "u-1"), "u-1"),
])
def test_qemu_names(args, name):
    assert name_from_cmdline(cmdline(QEMU, *args)) == name


def test_values_are_sanitised():
    assert name_from_cmdline(cmdline(QEMU, "-name", "guest=bad\x1b[31mname\n")) == "bad__31mname_"
    assert name_from_cmdline(cmdline(QEMU, "-name", "  padded  ")) == "padded"
    assert name_from_cmdline(cmdline(QEMU, "-name", "x" * 1000)) == "x" * NAME_MAX
    assert name_from_cmdline(cmdline(QEMU, "-name", "x" * (NAME_MAX - 1) + " y")) == "x" * (NAME_MAX - 1)
    assert name_from_cmdline(cmdline(QEMU, "-name", "guest=gäst-名前 1.2_3:a@b+c=d")) == "gäst-名前 1.2_3:a@b+c=d"
    assert sanitise("e\u0301te") == "\u00e9te"  # composed first: the accent is not "_"
    # Not UTF-8: replaced, not fatal.
    assert name_from_cmdline(QEMU.encode() + b"\0-name\0\xff\xfe\0") == "__"
    assert sanitise("\x00\x01") == "__" and sanitise("   ") is None


@pytest.mark.parametrize("hostile, name", [
    ('a"b\\c', "a_b_c"),  # label quoting
    ("line\nbreak\r\u2028", "line_break__"),  # log lines, exposition lines
    ("<!channel> *bold* `x` $(id)", "__channel_ _bold_ _x_ __id_"),  # Slack, Markdown, shells
    ("[click](http://evil)", "_click__http:__evil_"),  # Markdown links
    ("safe\u202egnp.exe", "safe_gnp.exe"),  # a right-to-left override
    ("{{ .Alerts }}", "__ .Alerts __"),  # template syntax
])
def test_hostile_names(hostile, name):
    assert sanitise(hostile) == name


def test_names_that_pass_for_other_series_are_not_used():
    # An unnamed VM is labelled with its id, the VMs past --max-vms with _other.
    for reserved in ("vm-1", "vm-42", "vm-3f0c9a1b2e", OTHER_VM):
        assert sanitise(reserved) is None
        assert name_from_cmdline(cmdline(QEMU, "-name", reserved, "-uuid", "u-1")) == "u-1"
    assert sanitise("vm-1z") == "vm-1z" and sanitise("my_other") == "my_other"


def test_a_hostile_name_stays_one_label_value_in_the_exposition():
    hostile = 'x"} 1\nxstate_fake{vm="y\\' + "\x1b" * 100
    name = name_from_cmdline(cmdline(QEMU, "-name", f"guest={hostile}"))
    engine = Engine()
    stats = Stats(engine)
    Pipeline(engine, observers=[stats]).feed([vcpu_create(vm="vm-1"), xcr0(0x3, vm="vm-1")])
    stats.set_vm_name("vm-1", name)
    text = generate_latest(make_registry(stats, process=False)).decode()
    assert "xstate_fake" not in {f.name for f in text_string_to_metric_families(text)}
    xsetbv = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "xstate_guest_xsetbv_total"]
    assert [(s.labels, s.value) for s in xsetbv] == [({"vm": name}, 1.0)]
    assert name == "x__ 1_xstate_fake_vm=_y_" + "_" * (NAME_MAX - 24)


def test_cmdline_without_trailing_nul():
    assert name_from_cmdline(b"qemu\0-name\0vm7") == "vm7"


def _proc(tmp_path, pid: int, *args: str):
    d = tmp_path / str(pid)
    d.mkdir()
    (d / "cmdline").write_bytes(cmdline(*args))


def test_ids_names_and_forgetting(tmp_path):
    _proc(tmp_path, 100, QEMU, "-name", "guest=alpha")
    _proc(tmp_path, 200, "/usr/bin/firecracker")
    v = VmNames(proc=str(tmp_path))
    a = v.id(100, 0xFFFF0001)
    assert a == v.id(100, 0xFFFF0001)  # stable
    b = v.id(100, 0xFFFF0002)  # a second VM of the same VMM
    c = v.id(200, 0xFFFF0001)  # same address, another process: another VM
    assert len({a, b, c}) == 3
    assert (v.name(a), v.name(b), v.name(c)) == ("alpha", "alpha", None)
    assert v.id(300, 1) and v.name(v.id(300, 1)) is None  # no such process: no name, still an id
    v.forget(100)
    assert v.name(a) is None and v.id(100, 0xFFFF0001) not in (a, b)
    assert v.id(200, 0xFFFF0001) == c


def _stat(proc, pid, start):
    d = proc / str(pid)
    d.mkdir(exist_ok=True)
    # /proc/PID/stat: the start time is field 22, after a comm that may hold spaces and parentheses.
    (d / "stat").write_text(f"{pid} (qemu (x) y) S 1 " + " ".join(["0"] * 17) + f" {start} 0 0\n")


def test_ids_are_stable_across_agent_restarts_and_reveal_no_address(tmp_path):
    _stat(tmp_path, 100, 123456)
    key = b"k" * 32
    a = VmNames(proc=str(tmp_path), key=key).id(100, 0xFFFF888812345000)
    again = VmNames(proc=str(tmp_path), key=key)  # a restarted agent, the VMM still running
    assert again.id(100, 0xFFFF888812345000) == a and re.fullmatch(r"vm-[0-9a-f]{10}", a)
    assert "12345" not in a
    # Another host (another key), or another process that got pid 100 later: another id.
    assert VmNames(proc=str(tmp_path), key=b"o" * 32).id(100, 0xFFFF888812345000) != a
    _stat(tmp_path, 100, 999999)
    assert VmNames(proc=str(tmp_path), key=key).id(100, 0xFFFF888812345000) != a


def test_the_key_is_made_once_root_only(tmp_path):
    path = tmp_path / "state" / "vm-id.key"
    key = vm_id_key(str(path))
    assert len(key) == 32 and path.read_bytes() == key and (path.stat().st_mode & 0o777) == 0o600
    assert vm_id_key(str(path)) == key


def test_a_new_vm_at_a_freed_address_gets_a_new_id(tmp_path):
    v = VmNames(proc=str(tmp_path))
    a = v.id(1, 0xABC)
    v.created(1, 0xABC)
    b = v.id(1, 0xABC)
    assert a != b and v.name(a) is None
    v.created(1, 0xDEF)  # never seen: nothing to drop
    assert v.id(1, 0xABC) == b


def test_names_are_read_once_per_process(tmp_path):
    _proc(tmp_path, 5, QEMU, "-name", "one")
    v = VmNames(proc=str(tmp_path))
    a = v.id(5, 1)
    (tmp_path / "5" / "cmdline").write_bytes(cmdline(QEMU, "-name", "two"))
    assert v.name(v.id(5, 2)) == "one" == v.name(a)
    v.forget(5)  # e.g. it exec'd: read again
    assert v.name(v.id(5, 3)) == "two"
