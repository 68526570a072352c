"""End to end, with real components on loopback: agent → Prometheus → rules → Alertmanager → webhook.

Debian's `prometheus` and `prometheus-alertmanager` run in a temporary
directory with 1 s scrape and evaluation intervals. The agent replays
samples/amx-host-incidents.jsonl with `run --from --follow` and serves its
metrics over TLS with basic auth (Prometheus is the client). Prometheus
evaluates the shipped rules; Alertmanager delivers to a webhook receiver in
this test. Then every query of every dashboard panel runs against that
Prometheus, and a second Prometheus federates from the first with the
example federation configuration.
"""

import json
import shutil
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from promstack import (
    INCIDENT_EVENTS, INCIDENTS, ROOT, RULES, Agent, Server, free_port, get, make_tls, need, prometheus_query,
    wait_until,
)

PASSWORD = "e2e-s3cret"


class Webhook:
    """Alertmanager's webhook receiver: keeps every alert it is sent."""

    def __init__(self):
        self.alerts: list[dict] = []
        received = self.alerts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.extend(json.loads(body)["alerts"])
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def find(self, **labels) -> dict | None:
        for a in list(self.alerts):
            if a["status"] == "firing" and all(a["labels"].get(k) == v for k, v in labels.items()):
                return a
        return None

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class Stack:
    def __init__(self, tmp):
        self.tmp = tmp
        prometheus, alertmanager = need("prometheus"), need("prometheus-alertmanager")
        web = make_tls(tmp, {"prometheus": PASSWORD})
        self.log = tmp / "host.jsonl"
        shutil.copy(INCIDENTS, self.log)
        self.parts = []
        self.agent = Agent("--from", str(self.log), "--follow", "--listen", "127.0.0.1:0", "--web-config", str(web))
        self.parts.append(self.agent)
        self.webhook = Webhook()
        self.parts.append(self.webhook)

        am_port, prom_port = free_port(), free_port()
        (tmp / "alertmanager.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "test", "group_by": ["alertname", "instance", "rule", "vm"],
                      "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "test", "webhook_configs": [{"url": self.webhook.url, "send_resolved": False}]}],
        }))
        self.alertmanager = Server([alertmanager, f"--config.file={tmp / 'alertmanager.yml'}",
                                    f"--storage.path={tmp / 'am-data'}", f"--web.listen-address=127.0.0.1:{am_port}",
                                    "--cluster.listen-address="],
                                   tmp / "alertmanager.log", f"http://127.0.0.1:{am_port}/-/ready")
        self.parts.append(self.alertmanager)

        (tmp / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [{
                "job_name": "xstate-agent", "scheme": "https",
                "tls_config": {"ca_file": str(tmp / "cert.pem")},
                "basic_auth": {"username": "prometheus", "password": PASSWORD},
                "static_configs": [{"targets": [self.agent.target]}],
            }],
        }))
        self.prometheus = Server([prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                                  f"--storage.tsdb.path={tmp / 'prom-data'}",
                                  f"--web.listen-address=127.0.0.1:{prom_port}"],
                                 tmp / "prometheus.log", f"http://127.0.0.1:{prom_port}/-/ready")
        self.parts.append(self.prometheus)
        self.prom = f"http://127.0.0.1:{prom_port}"
        self.alertmanager.wait_ready()
        self.prometheus.wait_ready()

    def query(self, expr: str) -> list:
        r = prometheus_query(self.prom, expr)
        assert r["status"] == "success", f"{expr}: {r}"
        return r["data"]["result"]

    def logs(self) -> str:
        return "\n".join(f"--- {s.log.name}\n{s.log.read_text()[-2000:]}" for s in (self.prometheus, self.alertmanager))

    def stop(self):
        for part in reversed(self.parts):
            part.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("e2e"))
    try:
        wait_until("Prometheus to scrape the agent over TLS with basic auth",
                   lambda: s.query('up{job="xstate-agent"} == 1'), timeout=60)
        wait_until("every event of the log in Prometheus",
                   lambda: s.query(f"sum(xstate_events_total) >= {INCIDENT_EVENTS}"), timeout=60)
        yield s
    finally:
        s.stop()


def test_the_critical_alert_reaches_the_webhook_with_rule_and_vm(stack):
    instance = stack.agent.target
    try:
        alert = wait_until("XstateCriticalViolation for XS001 on batch-3 at the webhook",
                           lambda: stack.webhook.find(alertname="XstateCriticalViolation", rule="XS001",
                                                      vm="batch-3"), timeout=60)
    except AssertionError:
        raise AssertionError(f"{stack.webhook.alerts}\n{stack.logs()}") from None
    assert alert["labels"] == {"alertname": "XstateCriticalViolation", "severity": "critical", "rule": "XS001",
                               "vm": "batch-3", "instance": instance, "job": "xstate-agent"}
    ann = alert["annotations"]
    assert "XS001" in ann["summary"] and "batch-3" in ann["summary"]
    assert f"host {instance}, VM batch-3" in ann["description"]
    assert ann["runbook_url"].endswith("docs/runbooks/critical-violation.md#xs001")
    # The other alerts of the log.
    for labels in ({"alertname": "XstateCriticalViolation", "rule": "XS008", "vm": "batch-3"},
                   {"alertname": "XstateGuestFpuAllocationFailed", "rule": "XS011", "vm": "db-7"},
                   {"alertname": "XstateWarningViolation", "rule": "XS020", "vm": "legacy-2"},
                   {"alertname": "XstateWarningViolation", "rule": "XS014", "vm": "batch-3"}):
        wait_until(f"{labels} at the webhook", lambda: stack.webhook.find(**labels), timeout=30)
    # The healthy VM never is named; XS011 is not in the generic critical alert.
    assert not stack.webhook.find(vm="web-1")
    assert not stack.webhook.find(alertname="XstateCriticalViolation", rule="XS011")


def test_a_violation_appended_to_the_followed_log_alerts_too(stack):
    with open(stack.log, "a") as f:
        # web-1's guest writes an XCR0 with AVX but without SSE, and KVM accepts it: XS004.
        f.write('{"v":1,"ts":90000,"kind":"xcr0","tgid":4242,"vm":"web-1","vcpu":1,"value":"0x5",'
                '"source":"guest","ret":0}\n')
    alert = wait_until("XstateCriticalViolation for XS004 on web-1",
                       lambda: stack.webhook.find(alertname="XstateCriticalViolation", rule="XS004", vm="web-1"),
                       timeout=60)
    assert alert["labels"]["instance"] == stack.agent.target


def dashboard_queries():
    for name in ("xstate-fleet.json", "xstate-host.json"):
        d = json.loads((ROOT / "dashboards" / name).read_text())
        for p in d["panels"]:
            for t in p.get("targets", []):
                yield name, p["title"], t["expr"]


def grafana(expr: str, instance: str) -> str:
    """The query as Grafana sends it: one host selected, every VM, a rate interval."""
    return (expr.replace("$instance", instance).replace("$vm", ".*")
            .replace("$__rate_interval", "30s").replace("$__interval", "15s").replace("$__range", "5m"))


# Panels that must show data for a host replaying samples/amx-host-incidents.jsonl. The others
# (losses, probes, latency) are the live side's and have no series in a replay.
MAIN_PANELS = {
    "xstate-fleet.json": {
        "Hosts reporting", "VMs with AMX", "AMX vCPUs", "Guest FPU buffers", "Critical violations (10m)",
        "Warnings (10m)", "Violations by rule", "Hosts and VMs with violations (last 10 minutes)",
        "arch_prctl permission failures", "Guest FPU buffer memory by host", "AMX vCPUs by host",
        "VMs with AMX by host", "Agents", "Events judged by host",
    },
    "xstate-host.json": {
        "Guest XSETBV", "Guest XFD writes", "#NM with XFD_ERR saved", "vCPUs with XFD passthrough", "AMX vCPUs",
        "Guest FPU buffer memory", "Violations by VM and rule", "Violations (last 10 minutes)", "Events by kind",
        "arch_prctl calls", "Tracked state", "Evictions", "Agent CPU", "Agent memory",
    },
}


def test_every_dashboard_query_runs_and_the_main_panels_have_data(stack):
    instance = stack.agent.target
    # Rates need two samples in their window, the recording rules an evaluation.
    wait_until("the recording rules", lambda: stack.query("instance_rule_vm:xstate_violations:increase10m"))
    time.sleep(3)
    empty = []
    seen = {name: set() for name in MAIN_PANELS}
    for name, title, expr in dashboard_queries():
        result = stack.query(grafana(expr, instance))  # asserts status success
        seen[name].add(title)
        if title in MAIN_PANELS[name] and not result:
            empty.append((name, title, expr))
    assert not empty, f"main panels without data: {empty}"
    for name, titles in MAIN_PANELS.items():
        assert titles <= seen[name], f"{name}: no panel named {titles - seen[name]}"


def test_dashboard_variables_resolve(stack):
    instance = stack.agent.target

    def label_values(label, match):
        url = f"{stack.prom}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": match})
        r = json.loads(get(url))
        assert r["status"] == "success"
        return r["data"]

    for name in ("xstate-fleet.json", "xstate-host.json"):
        variables = json.loads((ROOT / "dashboards" / name).read_text())["templating"]["list"]
        for v in variables:
            if v["type"] != "query":
                continue
            label, match = _label_values(grafana(v["query"], instance))
            values = label_values(label, match)
            if v["name"] == "instance":
                assert values == [instance]
            else:
                assert set(values) == {"batch-3", "db-7", "legacy-2", "web-1"}


def _label_values(query: str) -> tuple[str, str]:
    """label_values(MATCH, LABEL) -> (LABEL, MATCH)."""
    inner = query[len("label_values("):-1]
    match, _, label = inner.rpartition(",")
    return label.strip(), match.strip()


def test_federation_example_serves_the_fleet_view(stack):
    """A global Prometheus with dashboards/examples/prometheus-global-federation.yml, aimed at this one."""
    config = yaml.safe_load((ROOT / "dashboards" / "examples" / "prometheus-global-federation.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    job = config["scrape_configs"][0]
    job["static_configs"] = [{"targets": [stack.prom.removeprefix("http://")]}]
    tmp = stack.tmp
    (tmp / "global.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    glob = Server([need("prometheus"), f"--config.file={tmp / 'global.yml'}", f"--storage.tsdb.path={tmp / 'global-data'}",
                   f"--web.listen-address=127.0.0.1:{port}"], tmp / "global.log", f"http://127.0.0.1:{port}/-/ready")
    try:
        glob.wait_ready()
        base = f"http://127.0.0.1:{port}"

        def fed(expr):
            r = prometheus_query(base, expr)
            assert r["status"] == "success", r
            return r["data"]["result"]

        got = wait_until("federated violations", lambda: fed(
            'instance_rule_vm:xstate_violations:increase10m{rule="XS011", vm="db-7"}'), timeout=60)
        assert got[0]["metric"]["instance"] == stack.agent.target and got[0]["metric"]["job"] == "xstate-agent"
        assert wait_until("federated alerts", lambda: fed('ALERTS{alertname="XstateGuestFpuAllocationFailed"}'))
        assert wait_until("federated fleet gauges", lambda: fed("job:xstate_amx_vms:sum"))
        # Raw per-event counters stay on the site.
        assert not fed("xstate_events_total")
    finally:
        glob.stop()
