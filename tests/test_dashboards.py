"""The Grafana dashboards: generated from code, up to date, provisionable anywhere (no data source UID)."""

import importlib.util
import json
import re

import pytest

from promstack import ROOT

DIR = ROOT / "dashboards"


def generator():
    spec = importlib.util.spec_from_file_location("dashboards_generate", DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name) -> dict:
    return json.loads((DIR / name).read_text())


def panels(d: dict):
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows


def targets(d: dict):
    for p in panels(d):
        for t in p.get("targets", []):
            yield p, t


NAMES = ["xstate-fleet.json", "xstate-host.json"]


def test_checked_in_json_is_what_generate_py_makes():
    gen = generator()
    assert sorted(gen.DASHBOARDS) == NAMES
    for name, build in gen.DASHBOARDS.items():
        assert (DIR / name).read_text() == gen.render(build), f"{name} is stale: run python dashboards/generate.py"


@pytest.mark.parametrize("name", NAMES)
def test_no_hard_coded_data_source(name):
    d = load(name)
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', (DIR / name).read_text())) - {d["uid"]}
    assert uids == {"${datasource}"}
    for p in panels(d):
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    for p, t in targets(d):
        assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert t["expr"].strip(), p["title"]


def test_template_variables():
    fleet = {v["name"]: v for v in load("xstate-fleet.json")["templating"]["list"]}
    host = {v["name"]: v for v in load("xstate-host.json")["templating"]["list"]}
    assert list(fleet) == ["datasource", "instance"]
    assert list(host) == ["datasource", "instance", "vm"]
    for v in (fleet["datasource"], host["datasource"]):
        assert v["type"] == "datasource" and v["query"] == "prometheus"
    assert host["vm"]["includeAll"] and host["vm"]["allValue"] == ".*"
    assert "label_values(" in host["vm"]["query"] and "vm)" in host["vm"]["query"]


def test_every_panel_has_a_title_description_and_query():
    for name in NAMES:
        for p in panels(load(name)):
            if p["type"] == "row":
                continue
            assert p["title"] and p.get("description"), p
            assert p.get("targets"), p["title"]


def test_queries_use_only_documented_metrics_and_shipped_recording_rules():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    rules = (DIR / "alerts" / "xstate.rules.yml").read_text()
    for name in NAMES:
        for p, t in targets(load(name)):
            for metric in re.findall(r"\b((?:[a-z_]+:)?xstate_[a-z_]+(?::[a-z0-9_]+)?)", t["expr"]):
                if ":" in metric:
                    assert f"record: {metric}" in rules, (p["title"], metric)
                else:
                    base = re.sub(r"_(bucket|sum|count)$", "", metric)
                    assert f"`{base}" in doc or f"`{metric}" in doc, (p["title"], metric)
