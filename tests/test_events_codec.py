"""The strict reader and the writer of spec/events.md (JSON Lines, version 1)."""

import io
import json
import sys

import pytest

from agent.events import model
from agent.events import reader
from agent.events.reader import InputError, decode_line, read_files, read_stream
from agent.events.writer import EventWriter, encode, to_dict
from helpers import AMX, TILEDATA, xcr0

# One line of each kind, with every optional field, masks in mixed case and as ints.
EVERY_KIND = {
    "perm": '{"v":1,"ts":1000,"kind":"perm","tgid":4242,"tid":4243,"comm":"qemu-system-x86",'
            '"option":"GET_XCOMP_GUEST_PERM","mask":"0x602E7","ret":0}',
    "vcpu_create": '{"v":1,"ts":2000,"kind":"vcpu_create","tgid":4242,"vm":"vm-1","vcpu":0,"ret":0}',
    "vcpu_destroy": '{"v":1,"ts":2100,"kind":"vcpu_destroy","tgid":4242,"vm":"vm-1","vcpu":3}',
    "cpuid": '{"v":1,"ts":3000,"kind":"cpuid","tgid":4242,"vm":"vm-1","vcpu":0,"xcr0_supported":393959,"ret":0}',
    "xcr0": '{"v":1,"ts":4000,"kind":"xcr0","tgid":4242,"vm":"vm-1","vcpu":0,"value":"0X602e7","source":"guest","ret":0}',
    "xfd": '{"v":1,"ts":5000,"kind":"xfd","tgid":4242,"vm":"vm-1","vcpu":0,"value":"0x40000","source":"host","ret":-22}',
    "xfd_err": '{"v":1,"ts":6000,"kind":"xfd_err","tgid":4242,"vm":"vm-1","vcpu":0,"value":"0x40000","source":"nm","ret":0}',
    "fpstate": '{"v":1,"ts":7000,"kind":"fpstate","tgid":4242,"vm":"vm-1","vcpu":0,"guest":true,"features":"0x60000",'
               '"size":11008,"ret":0}',
    "fpu_load": '{"v":1,"ts":8000,"kind":"fpu_load","tgid":4242,"vm":"vm-1","vcpu":0,"guest_features":"0x602e7",'
                '"guest_size":11008,"xfd":"0x0","guest_perm":"0x602e7"}',
    "passthrough": '{"v":1,"ts":9000,"kind":"passthrough","tgid":4242,"vm":"vm-1","vcpu":0,"enabled":true}',
    "xsave": '{"v":1,"ts":9500,"kind":"xsave","tgid":4242,"vm":"vm-1","vcpu":0,"op":"get","xstate_bv":"0x602e3",'
             '"size":4096,"ret":-22}',
    "exec": '{"v":1,"ts":9800,"kind":"exec","tgid":4242}',
    "exit": '{"v":1,"ts":9900,"kind":"exit","tgid":4242,"comm":"qemu-system-x86"}',
}

MASK_FIELDS = {"mask", "xcr0_supported", "value", "features", "guest_features", "xfd", "guest_perm", "xstate_bv"}


def test_every_kind_of_the_spec_has_a_sample():
    assert sorted(EVERY_KIND) == sorted(model.KINDS)


def stream(*lines: str, end: str = "\n") -> io.BytesIO:
    return io.BytesIO(("\n".join(lines) + end).encode())


def read_all(data, name="log.jsonl") -> list[tuple[int, model.Event]]:
    """(line, event) pairs of a whole stream."""
    if isinstance(data, bytes):
        data = io.BytesIO(data)
    return [(n, ev) for evs, lines in read_stream(data, name) for ev, n in zip(evs, lines)]


def read_until_error(data, name="log.jsonl"):
    """(events delivered before the error, the InputError)."""
    got = []
    with pytest.raises(InputError) as exc:
        for evs, lines in read_stream(data, name):
            got.extend(zip(lines, evs))
    return got, exc.value


def exit_line(ts: int, tgid: int = 1) -> str:
    return json.dumps({"v": 1, "ts": ts, "kind": "exit", "tgid": tgid})


# Decoding -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(EVERY_KIND))
def test_decode_each_kind_to_its_type(kind):
    ev = decode_line(EVERY_KIND[kind].encode())
    assert type(ev).kind == kind == ev.kind
    raw = json.loads(EVERY_KIND[kind])
    for field, value in raw.items():
        if field == "kind":
            continue
        got = getattr(ev, field)
        if field in MASK_FIELDS:
            assert got == (value if isinstance(value, int) else int(value, 16))
        else:
            assert got == value


@pytest.mark.parametrize("text", ['"0x602e7"', '"0x602E7"', '"0X602E7"', "393959", '"0x000602e7"'])
def test_masks_in_either_hex_case_or_as_integers(text):
    line = f'{{"v":1,"ts":1,"kind":"xcr0","tgid":1,"vm":"a","vcpu":0,"value":{text},"source":"guest","ret":0}}'
    assert decode_line(line.encode()).value == AMX


@pytest.mark.parametrize("text,value", [('"0x0"', 0), ("0", 0), ('"0xffffffffffffffff"', 2**64 - 1),
                                        (str(2**64 - 1), 2**64 - 1)])
def test_mask_range_ends_accepted(text, value):
    line = f'{{"v":1,"ts":1,"kind":"xsave","tgid":1,"vm":"a","vcpu":0,"op":"set","xstate_bv":{text},"size":1,"ret":0}}'
    assert decode_line(line.encode()).xstate_bv == value


def test_unknown_fields_are_ignored():
    line = ('{"v":1,"ts":5,"kind":"passthrough","tgid":7,"vm":"x","vcpu":1,"enabled":false,'
            '"future":{"nested":[1,"two",null]},"msr":"0x1c4","cpu":3}')
    ev = decode_line(line.encode())
    assert ev == model.Passthrough(v=1, ts=5, tgid=7, vm="x", vcpu=1, enabled=False)


def test_optional_fields_may_be_absent():
    ev = decode_line(b'{"v":1,"ts":1,"kind":"perm","tgid":1,"option":"GET_XCOMP_SUPP","ret":-22}')
    assert (ev.tid, ev.comm, ev.feature, ev.mask) == (None, None, None, None)
    ev = decode_line(b'{"v":1,"ts":1,"kind":"fpstate","tgid":1,"guest":false,"features":"0x40000","ret":0}')
    assert (ev.vm, ev.vcpu, ev.size) == (None, None, None)


def test_guest_perm_lock_flag_is_not_a_feature():
    line = ('{"v":1,"ts":1,"kind":"fpu_load","tgid":1,"vm":"a","vcpu":0,"guest_features":"0x602e7","xfd":"0x0",'
            '"guest_perm":"0x80000000000602e7"}')
    assert decode_line(line.encode()).guest_perm == AMX


def test_ts_is_not_required_to_grow():
    assert [ev.ts for _, ev in read_all(stream(exit_line(5), exit_line(3)))] == [5, 3]


# Input errors: every class of the spec, reported with the right line -------------------

def _line(**fields) -> str:
    """A valid xcr0 line with `fields` replaced (None value: the field removed)."""
    base = {"v": 1, "ts": 1, "kind": "xcr0", "tgid": 1, "vm": "vm-1", "vcpu": 0, "value": "0x7",
            "source": "guest", "ret": 0}
    for k, v in fields.items():
        if v is None:
            base.pop(k)
        else:
            base[k] = v
    return json.dumps(base)


NULL = "null-marker"


def _with(line: str, **fields) -> str:
    """`line` (a JSON object) with fields set; NULL sets JSON null."""
    obj = json.loads(line)
    for k, v in fields.items():
        obj[k] = None if v is NULL else v
    return json.dumps(obj)


def _without(line: str, field: str) -> str:
    obj = json.loads(line)
    del obj[field]
    return json.dumps(obj)


BAD_LINES = {
    # not a JSON object
    "array": ("[1, 2]", "object"),
    "number": ("42", "object"),
    "string": ('"perm"', "object"),
    "truncated": ('{"v":1,"ts":1,', "not a JSON object"),
    "not json": ("v=1 ts=1 kind=exit", "not a JSON object"),
    "two objects on a line": (exit_line(1) + " " + exit_line(2), "not a JSON object"),
    "leading space before #": ("  # not a comment", "not a JSON object"),
    # missing required field
    "no v": (_line(v=None), "`v`"),
    "no ts": (_line(ts=None), "`ts`"),
    "no kind": (_line(kind=None), "`kind`"),
    "no tgid": (_line(tgid=None), "`tgid`"),
    "no vm": (_line(vm=None), "`vm`"),
    "no vcpu": (_line(vcpu=None), "`vcpu`"),
    "no value": (_line(value=None), "`value`"),
    "no source": (_line(source=None), "`source`"),
    "no ret": (_line(ret=None), "`ret`"),
    "perm no option": (_without(EVERY_KIND["perm"], "option"), "`option`"),
    "cpuid no xcr0_supported": (_without(EVERY_KIND["cpuid"], "xcr0_supported"), "`xcr0_supported`"),
    "fpu_load no xfd": (_without(EVERY_KIND["fpu_load"], "xfd"), "`xfd`"),
    "passthrough no enabled": (_without(EVERY_KIND["passthrough"], "enabled"), "`enabled`"),
    "xsave no size": (_without(EVERY_KIND["xsave"], "size"), "`size`"),
    "fpstate no guest": (_without(EVERY_KIND["fpstate"], "guest"), "`guest`"),
    "fpstate guest without vm": (_without(EVERY_KIND["fpstate"], "vm"), "`vm`"),
    "fpstate guest without vcpu": (_without(EVERY_KIND["fpstate"], "vcpu"), "`vcpu`"),
    # wrong type
    "null tgid": (_with(_line(), tgid=NULL), "`$.tgid`"),
    "null optional tid": (_with(_line(), tid=NULL), "`$.tid`"),
    "null optional comm": (_with(_line(), comm=NULL), "`$.comm`"),
    "null mask": (_with(_line(), value=NULL), "`$.value`"),
    "null optional feature": (_with(EVERY_KIND["perm"], feature=NULL), "`$.feature`"),
    "bool for int": (_with(_line(), tgid=True), "`$.tgid`"),
    "bool for ret": (_with(_line(), ret=False), "`$.ret`"),
    "bool for mask": (_with(_line(), value=True), "`$.value`"),
    "float for int": (_with(_line(), ts=1.5), "`$.ts`"),
    "integral float for int": (_with(_line(), vcpu=0.0), "`$.vcpu`"),
    "float for mask": (_with(_line(), value=7.0), "`$.value`"),
    "string for int": (_with(_line(), vcpu="0"), "`$.vcpu`"),
    "int for string": (_with(_line(), vm=1), "`$.vm`"),
    "int for bool": (_with(EVERY_KIND["passthrough"], enabled=1), "`$.enabled`"),
    "string for bool": (_with(EVERY_KIND["fpstate"], guest="true"), "`$.guest`"),
    "object for mask": (_with(_line(), value={"hex": "0x7"}), "`$.value`"),
    # out of range
    "mask 2^64": (_with(_line(), value=2**64), "`$.value`"),
    "hex mask 2^64": (_with(_line(), value="0x10000000000000000"), "`$.value`"),
    "negative mask": (_with(_line(), value=-1), "`$.value`"),
    "negative hex mask": (_with(_line(), value="-0x1"), "`$.value`"),
    "mask without 0x": (_with(_line(), value="602e7"), "`$.value`"),
    "mask 0x alone": (_with(_line(), value="0x"), "`$.value`"),
    "mask not hex": (_with(_line(), value="0xfg"), "`$.value`"),
    "mask with underscore": (_with(_line(), value="0x6_02e7"), "`$.value`"),
    "mask with space": (_with(_line(), value=" 0x7"), "`$.value`"),
    "feature 64": (_with(EVERY_KIND["perm"], feature=64), "`$.feature`"),
    "negative feature": (_with(EVERY_KIND["perm"], feature=-1), "`$.feature`"),
    "negative ts": (_with(_line(), ts=-1), "`$.ts`"),
    "tgid 2^31": (_with(_line(), tgid=2**31), "`$.tgid`"),
    "negative vcpu": (_with(_line(), vcpu=-1), "`$.vcpu`"),
    "ret 2^31": (_with(_line(), ret=2**31), "`$.ret`"),
    "size 2^32": (_with(EVERY_KIND["xsave"], size=2**32), "`$.size`"),
    "empty vm": (_with(_line(), vm=""), "`$.vm`"),
    "comm too long": (_with(_line(), comm="q" * 65), "`$.comm`"),
    # not one of the listed choices
    "perm option": (_with(EVERY_KIND["perm"], option="SET_XCOMP_PERM"), "`$.option`"),
    "xcr0 source nm": (_with(_line(), source="nm"), "`$.source`"),
    "xfd source nm": (_with(EVERY_KIND["xfd"], source="nm"), "`$.source`"),
    "xfd_err source": (_with(EVERY_KIND["xfd_err"], source="kernel"), "`$.source`"),
    "xsave op": (_with(EVERY_KIND["xsave"], op="put"), "`$.op`"),
    "source case": (_with(_line(), source="Guest"), "`$.source`"),
    # unknown kind
    "unknown kind": (_with(_line(), kind="xcr1"), "`$.kind`"),
    "kind case": (_with(_line(), kind="XCR0"), "`$.kind`"),
    "kind not a string": (_with(_line(), kind=3), "kind"),
    # v other than 1
    "v 2": (_with(_line(), v=2), "`$.v`"),
    "v 0": (_with(_line(), v=0), "`$.v`"),
    "v string": (_with(_line(), v="1"), "`$.v`"),
    "v float": (_with(_line(), v=1.0), "`$.v`"),
    "v bool": (_with(_line(), v=True), "`$.v`"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_decode_line_rejects(case):
    line, fragment = BAD_LINES[case]
    with pytest.raises(ValueError) as exc:
        decode_line(line.encode())
    assert fragment in str(exc.value)


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_reader_reports_bad_line_with_its_number_after_delivering_the_events_before(case):
    line, fragment = BAD_LINES[case]
    data = stream("# a recorded log", exit_line(1), "", exit_line(2), line, exit_line(3))
    got, err = read_until_error(data, "rec.jsonl")
    assert [(n, ev.ts) for n, ev in got] == [(2, 1), (4, 2)]
    assert (err.file, err.line) == ("rec.jsonl", 5)
    assert fragment in err.message
    assert str(err) == f"rec.jsonl:5: {err.message}"


def test_not_utf8_is_an_input_error():
    bad = b'{"v":1,"ts":1,"kind":"exit","tgid":1,"comm":"qemu\xff"}'
    with pytest.raises(ValueError, match="UTF-8"):
        decode_line(bad)
    data = io.BytesIO(exit_line(1).encode() + b"\n" + bad + b"\n" + exit_line(2).encode() + b"\n")
    got, err = read_until_error(data)
    assert [n for n, _ in got] == [1]
    assert err.line == 2 and "UTF-8" in err.message


def test_not_utf8_in_a_comment_is_still_skipped():
    data = io.BytesIO(b"# caf\xe9\n" + exit_line(1).encode() + b"\n")
    assert [n for n, _ in read_all(data)] == [2]


def test_first_line_bad_delivers_nothing():
    got, err = read_until_error(stream("{", exit_line(1)))
    assert got == [] and err.line == 1


def test_last_line_without_newline_is_read_and_checked():
    assert [n for n, _ in read_all(stream(exit_line(1), exit_line(2), end=""))] == [1, 2]
    got, err = read_until_error(stream(exit_line(1), '{"v":1', end=""))
    assert [n for n, _ in got] == [1] and err.line == 2


def test_a_value_split_over_two_lines_is_an_error_at_its_first_line():
    half = '{"v":1,"ts":2,'
    rest = '"kind":"exit","tgid":2}'
    # Line 1 holds two objects, which keeps the line count equal to the object count.
    got, err = read_until_error(stream(exit_line(1) + " " + exit_line(3), half, rest))
    assert got == [] and err.line == 1
    got, err = read_until_error(stream(exit_line(1), half, rest))
    assert [n for n, _ in got] == [1] and err.line == 2


def test_two_objects_on_a_line_are_an_error_even_beside_a_blank_line():
    got, err = read_until_error(stream(exit_line(1) + exit_line(2), "   ", exit_line(3)))
    assert got == [] and err.line == 1


# Comments, blank lines and line numbers --------------------------------------------------

LOG = [
    "# xstate-agent events, recorded",
    exit_line(10),
    "",
    "#",
    exit_line(20),
    "   ",
    "\t",
    "#{\"v\":1,\"ts\":0,\"kind\":\"exit\",\"tgid\":1}",
    exit_line(30),
    exit_line(40),
    "",
    "",
    exit_line(50),
    "# the end",
]
LOG_EVENTS = [(2, 10), (5, 20), (9, 30), (10, 40), (13, 50)]


def test_comments_and_blank_lines_are_skipped_and_line_numbers_kept():
    assert [(n, ev.ts) for n, ev in read_all(stream(*LOG))] == LOG_EVENTS


def test_only_comments_and_empty_input_give_nothing():
    assert read_all(stream("# nothing", "")) == []
    assert read_all(io.BytesIO(b"")) == []
    assert read_all(io.BytesIO(b"\n\n")) == []


@pytest.mark.parametrize("block", [1, 2, 7, 40, 64, 100, 1000])
def test_line_numbers_across_block_boundaries(monkeypatch, block):
    monkeypatch.setattr(reader, "BLOCK", block)
    assert [(n, ev.ts) for n, ev in read_all(stream(*LOG))] == LOG_EVENTS


@pytest.mark.parametrize("block", [1, 7, 64, 100])
def test_bad_line_across_block_boundaries(monkeypatch, block):
    monkeypatch.setattr(reader, "BLOCK", block)
    lines = LOG[:10] + ['{"v":1,"ts":45,"kind":"exit"}'] + LOG[10:]
    got, err = read_until_error(stream(*lines))
    assert [(n, ev.ts) for n, ev in got] == LOG_EVENTS[:4]
    assert err.line == 11 and "`tgid`" in err.message


def test_line_numbers_across_the_real_1mib_block():
    """Some 1.2 MiB: a comment straddling the first boundary, blank lines, then a bad line."""
    def ev(i):
        return exit_line(10**9 + i, tgid=1000000).encode()

    body, expected = [], []
    size = 0
    while size + len(ev(0)) + 1 < reader.BLOCK - 100:
        body.append(ev(len(body)))
        expected.append((len(body), 10**9 + len(body) - 1))
        size += len(body[-1]) + 1
    body += [b"#" + b"x" * 200, b"", b"   "]  # the comment crosses byte 2^20
    assert size < reader.BLOCK < size + 202
    for _ in range(len(body) // 5):
        body.append(ev(len(body)))
        expected.append((len(body), 10**9 + len(body) - 1))
    data = b"\n".join(body) + b"\n"
    assert [(n, e.ts) for n, e in read_all(io.BytesIO(data))] == expected
    bad_at = len(body) - 10
    body[bad_at - 1] = b'{"v":1,"ts":1,"kind":"exit","tgid":-1}'
    got, err = read_until_error(io.BytesIO(b"\n".join(body) + b"\n"))
    assert err.line == bad_at and "`$.tgid`" in err.message
    assert [(n, e.ts) for n, e in got] == [x for x in expected if x[0] < bad_at]


# Files, standard input --------------------------------------------------------------------

def test_read_files_in_order_with_their_names(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("# a\n" + exit_line(1) + "\n" + exit_line(2) + "\n")
    b.write_text(exit_line(3) + "\n")
    got = [(f, n, ev.ts) for f, evs, lines in read_files([str(a), str(b)]) for ev, n in zip(evs, lines)]
    assert got == [(str(a), 2, 1), (str(a), 3, 2), (str(b), 1, 3)]


def test_read_files_error_names_the_file_and_line(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(exit_line(1) + "\n")
    b.write_text(exit_line(2) + "\n" + _with(_line(), v=2) + "\n")
    got = []
    with pytest.raises(InputError) as exc:
        for f, evs, lines in read_files([str(a), str(b)]):
            got.extend((f, n) for n in lines)
    assert got == [(str(a), 1), (str(b), 1)]
    assert (exc.value.file, exc.value.line) == (str(b), 2)


def test_read_files_missing_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(InputError) as exc:
        list(read_files([missing]))
    assert (exc.value.file, exc.value.line) == (missing, 0)
    assert "cannot open" in exc.value.message
    assert str(exc.value).startswith(f"{missing}: cannot open")


def test_read_files_dash_is_standard_input(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((exit_line(7) + "\n").encode())))
    a = tmp_path / "a.jsonl"
    a.write_text(exit_line(8) + "\n")
    got = [(f, n, ev.ts) for f, evs, lines in read_files(["-", str(a)]) for ev, n in zip(evs, lines)]
    assert got == [("<stdin>", 1, 7), (str(a), 1, 8)]


# Writing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(EVERY_KIND))
def test_round_trip_is_stable(kind):
    ev = decode_line(EVERY_KIND[kind].encode())
    once = encode(ev)
    assert once.endswith(b"\n") and once.count(b"\n") == 1
    assert decode_line(once.rstrip(b"\n")) == ev
    assert encode(decode_line(once)) == once


@pytest.mark.parametrize("kind", sorted(EVERY_KIND))
def test_writer_writes_what_it_read_masks_as_lowercase_hex(kind):
    raw = json.loads(EVERY_KIND[kind])
    out = to_dict(decode_line(EVERY_KIND[kind].encode()))
    assert list(out)[:4] == ["v", "ts", "kind", "tgid"]
    assert set(out) == set(raw)
    for field, value in raw.items():
        if field in MASK_FIELDS:
            number = value if isinstance(value, int) else int(value, 16)
            assert out[field] == hex(number)
        else:
            assert out[field] == value


def test_writer_leaves_absent_fields_out_and_hexes_int_masks():
    ev = xcr0(AMX, ts=5, tgid=9, vm="v", vcpu=2)
    assert encode(ev) == (b'{"v":1,"ts":5,"kind":"xcr0","tgid":9,"vm":"v","vcpu":2,"value":"0x602e7",'
                          b'"source":"guest","ret":0}\n')


def test_writer_zero_mask_and_largest_mask():
    ev = model.Xfd(v=1, ts=1, tgid=1, vm="a", vcpu=0, value=0, source="host", ret=0)
    assert to_dict(ev)["value"] == "0x0"
    ev = model.Xfd(v=1, ts=1, tgid=1, vm="a", vcpu=0, value=2**64 - 1, source="host", ret=0)
    assert to_dict(ev)["value"] == "0xffffffffffffffff"


def test_event_writer_appends_lines_that_read_back():
    buf = io.BytesIO()
    w = EventWriter(buf)
    events = [decode_line(EVERY_KIND[k].encode()) for k in sorted(EVERY_KIND)]
    for ev in events:
        w.write(ev)
    w.flush()
    assert [ev for _, ev in read_all(buf.getvalue())] == events


def test_encoded_masks_are_strings_not_numbers():
    out = json.loads(encode(model.Xfd(v=1, ts=1, tgid=1, vm="a", vcpu=0, value=TILEDATA, source="guest", ret=0)))
    assert out["value"] == "0x40000"
