"""The alert and recording rules (promtool check and unit tests), their runbooks, and the example configurations."""

import re
import subprocess

import pytest
import yaml

from agent.policy.rules import RULES
from promstack import ROOT, RULES as RULE_FILE, need

PROMTOOL_TESTS = sorted((ROOT / "tests" / "promtool").glob("*.yml"))
EXAMPLES = ROOT / "dashboards" / "examples"
RUNBOOK_BASE = "https://github.com/xstate-agent/xstate-agent/blob/main/"


def alerts() -> list[dict]:
    doc = yaml.safe_load(RULE_FILE.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules_is_clean():
    r = subprocess.run([need("promtool"), "check", "rules", str(RULE_FILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout and "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("test_file", PROMTOOL_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests(test_file):
    r = subprocess.run([need("promtool"), "test", "rules", test_file.name], capture_output=True, text=True,
                       cwd=test_file.parent)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing():
    firing, quiet = set(), set()
    for path in PROMTOOL_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"


def test_every_alert_has_summary_description_and_an_existing_runbook():
    for a in alerts():
        ann = a["annotations"]
        assert set(ann) >= {"summary", "description", "runbook_url"}, a["alert"]
        assert a["labels"]["severity"] in ("critical", "warning")
        assert "$labels.instance" in ann["description"] or a["alert"] == "XstateAgentAbsent", a["alert"]
        url = ann["runbook_url"]
        assert url.startswith(RUNBOOK_BASE), url
        path, _, anchor = url[len(RUNBOOK_BASE):].partition("#")
        doc = ROOT / path
        assert doc.is_file() and path.startswith("docs/runbooks/"), url
        text = doc.read_text()
        assert all(h in text for h in ("## Meaning", "## Confirm", "## Act")), path
        if anchor == "{{ $labels.rule | toLower }}":
            # One section per rule the alert can name.
            sev = re.search(r'severity="(\w+)"', a["expr"]).group(1)
            wanted = [r.id for r in RULES if r.severity == sev]
            missing = [r for r in wanted if f'<a id="{r.lower()}"></a>' not in text]
            assert not missing, f"{path} lacks sections for {missing}"
        elif anchor:
            assert f'<a id="{anchor}"></a>' in text, url


def test_violation_alerts_name_rule_vm_and_host():
    for a in alerts():
        if "xstate_violations_total" in a["expr"]:
            text = a["annotations"]["summary"] + a["annotations"]["description"]
            assert "$labels.instance" in text and "$labels.vm" in text, a["alert"]
            assert "$labels.rule" in text or 'rule="XS011"' in a["expr"], a["alert"]


@pytest.mark.parametrize("name,agent_mode", [("prometheus-site.yml", False),
                                              ("prometheus-global-federation.yml", False),
                                              ("prometheus-agent-remote-write.yml", True)])
def test_example_prometheus_configurations(name, agent_mode):
    cmd = [need("promtool"), "check", "config", *(["--agent"] if agent_mode else []), str(EXAMPLES / name)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_example_alertmanager_configuration():
    r = subprocess.run([need("amtool"), "check-config", str(EXAMPLES / "alertmanager.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
