"""Grafana dashboards of xstate-agent, as code (grafana-foundation-sdk).

    python dashboards/generate.py           # writes dashboards/xstate-*.json
    python dashboards/generate.py --check   # exit 1 if the checked-in JSON is stale

The JSON files are checked in, ready to provision (Grafana's file provider);
tests/test_dashboards.py checks that they are what this script makes, and the
end-to-end test runs every panel's query against a real Prometheus.

Every panel and variable uses the data source chosen in the `datasource`
variable (no data source UID is written anywhere). Some panels read the
recording rules of dashboards/alerts/xstate.rules.yml (`...:increase10m`):
load that rule file in the Prometheus the dashboards query.
"""

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync, DataSourceRef, VariableHide, VariableRefresh, VariableSort,
)

HERE = Path(__file__).resolve().parent
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
INST = 'instance=~"$instance"'
VM = 'instance=~"$instance", vm=~"$vm"'
FLEET_UID, HOST_UID = "xstate-fleet", "xstate-host"
TAGS = ["xstate-agent", "kvm", "amx"]


def q(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt_table: bool = False):
    t = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        t = t.legend_format(legend)
    if instant:
        t = t.instant()
    if fmt_table:
        from grafana_foundation_sdk.models.prometheus import PromQueryFormat
        t = t.format(PromQueryFormat.TABLE)
    return t


def ts(title: str, description: str, *targets, unit: str = "short", w: int = 12, h: int = 8):
    p = timeseries.Panel().title(title).description(description).datasource(DS).unit(unit).span(w).height(h)
    p = p.fill_opacity(10).min(0)
    for t in targets:
        p = p.with_target(t)
    return p


def single(title: str, description: str, target, unit: str = "short", w: int = 4, no_value: str = "0"):
    return (stat.Panel().title(title).description(description).datasource(DS).unit(unit).span(w).height(4)
            .with_target(target).no_value(no_value))


def tab(title: str, description: str, target, w: int = 12, h: int = 8):
    return table.Panel().title(title).description(description).datasource(DS).span(w).height(h).with_target(target)


def datasource_var():
    return dash.DatasourceVariable("datasource").label("Data source").type("prometheus")


def instance_var(multi: bool):
    v = (dash.QueryVariable("instance").label("Host").datasource(DS)
         .query("label_values(xstate_build_info, instance)")
         .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))
    if multi:
        v = v.multi(True).include_all(True).all_value(".*")
    return v


def vm_var():
    # With --no-vm-label there is no vm label: "All" (.*) still matches the host's series.
    return (dash.QueryVariable("vm").label("VM").datasource(DS)
            .query('label_values(xstate_guest_xsetbv_total{instance=~"$instance"}, vm)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*"))


def base(uid: str, title: str, description: str):
    return (dash.Dashboard(title).uid(uid).description(description).tags(TAGS).editable()
            .tooltip(DashboardCursorSync.CROSSHAIR).time("now-6h", "now").refresh("1m").timezone("browser"))


def fleet():
    d = base(FLEET_UID, "xstate-agent / Fleet", "Dynamic XSAVE (Intel AMX) handling across KVM hosts: "
             "policy violations, guest permission failures and what AMX costs in guest memory.")
    d = d.with_variable(datasource_var()).with_variable(instance_var(multi=True))
    d = d.link(dash.DashboardLink("Host drill-down").type("dashboards").tags(["xstate-agent"])
               .include_vars(True).keep_time(True).as_dropdown(False))

    d = d.with_row(dash.Row("Fleet"))
    d = d.with_panel(single("Hosts reporting", "Agents that Prometheus scrapes (xstate_build_info).",
                            q(f"count(xstate_build_info{{{INST}}})", instant=True)))
    d = d.with_panel(single("VMs with AMX", "VMs with at least one vCPU whose guest FPU buffer has room for AMX.",
                            q(f"sum(xstate_amx_vms{{{INST}}})", instant=True)))
    d = d.with_panel(single("AMX vCPUs", "vCPUs whose guest FPU buffer has room for AMX.",
                            q(f"sum(xstate_amx_vcpus{{{INST}}})", instant=True)))
    d = d.with_panel(single("Guest FPU buffers", "Memory of the guest FPU buffers of tracked vCPUs.",
                            q(f"sum(xstate_guest_fpu_buffer_bytes{{{INST}}})", instant=True), unit="bytes"))
    d = d.with_panel(single("Critical violations (10m)", "Critical policy violations in the last 10 minutes.",
                            q(f'sum(instance_rule_vm:xstate_violations:increase10m{{severity="critical", {INST}}})',
                              instant=True)))
    d = d.with_panel(single("Warnings (10m)", "Warning-level policy violations in the last 10 minutes.",
                            q(f'sum(instance_rule_vm:xstate_violations:increase10m{{severity="warning", {INST}}})',
                              instant=True)))

    d = d.with_row(dash.Row("Violations"))
    d = d.with_panel(ts("Violations by rule", "Violations of each rule in the 10 minutes before each point "
                        "(recording rule instance_rule_vm:xstate_violations:increase10m).",
                        q(f"sum by (rule) (instance_rule_vm:xstate_violations:increase10m{{{INST}}})", "{{rule}}")))
    d = d.with_panel(tab("Hosts and VMs with violations (last 10 minutes)",
                         "Each rule broken on a host and VM in the last 10 minutes; the agent's log has the events.",
                         q(f"sum by (instance, vm, rule, severity) "
                           f"(instance_rule_vm:xstate_violations:increase10m{{{INST}}}) > 0",
                           instant=True, fmt_table=True)))

    d = d.with_row(dash.Row("Guest permissions and what AMX costs"))
    d = d.with_panel(ts("arch_prctl permission failures", "Refused arch_prctl XSTATE permission calls per second, "
                        "by host, option and feature.",
                        q(f'sum by (instance, option, feature) (rate(xstate_arch_prctl_calls_total'
                          f'{{result="refused", {INST}}}[$__rate_interval]))', "{{instance}} {{option}} {{feature}}"),
                        unit="ops"))
    d = d.with_panel(ts("Guest FPU buffer memory by host", "Memory of the guest FPU buffers of tracked vCPUs.",
                        q(f"sum by (instance) (xstate_guest_fpu_buffer_bytes{{{INST}}})", "{{instance}}"),
                        unit="bytes"))
    d = d.with_panel(ts("AMX vCPUs by host", "vCPUs whose guest FPU buffer has room for AMX.",
                        q(f"sum by (instance) (xstate_amx_vcpus{{{INST}}})", "{{instance}}")))
    d = d.with_panel(ts("VMs with AMX by host", "VMs with at least one AMX vCPU.",
                        q(f"sum by (instance) (xstate_amx_vms{{{INST}}})", "{{instance}}")))

    d = d.with_row(dash.Row("Agents"))
    d = d.with_panel(tab("Agents", "Version and policy of each agent (profile, digest of the rule table, DYN).",
                         q(f"xstate_policy_info{{{INST}}} * on (job, instance) group_left (version) "
                           f"xstate_build_info{{{INST}}}", instant=True, fmt_table=True)))
    d = d.with_panel(ts("Events judged by host", "Events per second that each agent judged.",
                        q(f"sum by (instance) (rate(xstate_events_total{{{INST}}}[$__rate_interval]))", "{{instance}}"),
                        unit="ops"))
    d = d.with_panel(ts("Events lost by host", "Events per second lost before the policy saw them, by stage.",
                        q(f"sum by (instance, stage) (rate(xstate_events_lost_total{{{INST}}}[$__rate_interval]))",
                          "{{instance}} {{stage}}"), unit="ops"))
    return d


def host():
    d = base(HOST_UID, "xstate-agent / Host", "One KVM host and its VMs: guest XSETBV, XFD and #NM activity, "
             "XFD passthrough, AMX buffers, violations, and the agent's health.")
    d = d.with_variable(datasource_var()).with_variable(instance_var(multi=False)).with_variable(vm_var())
    d = d.link(dash.DashboardLink("Fleet").type("dashboards").tags(["xstate-agent"])
               .include_vars(False).keep_time(True).as_dropdown(False))

    d = d.with_row(dash.Row("VMs"))
    d = d.with_panel(ts("Guest XSETBV", "XCR0 writes by each VM's guests per second.",
                        q(f"sum by (vm) (rate(xstate_guest_xsetbv_total{{{VM}}}[$__rate_interval]))", "{{vm}}"),
                        unit="ops", w=8))
    d = d.with_panel(ts("Guest XFD writes", "Guest writes of IA32_XFD that exited to the host, per second.",
                        q(f"sum by (vm) (rate(xstate_guest_xfd_writes_total{{{VM}}}[$__rate_interval]))", "{{vm}}"),
                        unit="ops", w=8))
    d = d.with_panel(ts("#NM with XFD_ERR saved", "Guest #NM exceptions from XFD per second (first AMX use of "
                        "a guest task).",
                        q(f"sum by (vm) (rate(xstate_guest_xfd_err_saves_total{{{VM}}}[$__rate_interval]))",
                          "{{vm}}"), unit="ops", w=8))
    d = d.with_panel(ts("vCPUs with XFD passthrough", "vCPUs whose IA32_XFD writes no longer exit to the host.",
                        q(f"sum by (vm) (xstate_xfd_passthrough_vcpus{{{VM}}})", "{{vm}}"), w=8))
    d = d.with_panel(ts("AMX vCPUs", "vCPUs whose guest FPU buffer has room for AMX.",
                        q(f"sum by (vm) (xstate_amx_vcpus{{{VM}}})", "{{vm}}"), w=8))
    d = d.with_panel(ts("Guest FPU buffer memory", "Memory of each VM's guest FPU buffers.",
                        q(f"sum by (vm) (xstate_guest_fpu_buffer_bytes{{{VM}}})", "{{vm}}"), unit="bytes", w=8))
    d = d.with_panel(ts("Violations by VM and rule", "Violations in the 10 minutes before each point.",
                        q(f"sum by (vm, rule) (instance_rule_vm:xstate_violations:increase10m{{{VM}}})",
                          "{{vm}} {{rule}}")))
    d = d.with_panel(tab("Violations (last 10 minutes)", "Rules broken on this host in the last 10 minutes.",
                         q(f"sum by (vm, rule, severity) (instance_rule_vm:xstate_violations:increase10m{{{VM}}}) > 0",
                           instant=True, fmt_table=True)))

    d = d.with_row(dash.Row("Events"))
    d = d.with_panel(ts("Events by kind", "Events judged per second, by kind, source and result.",
                        q(f"sum by (kind, source, result) (rate(xstate_events_total{{{INST}}}[$__rate_interval]))",
                          "{{kind}} {{source}} {{result}}"), unit="ops"))
    d = d.with_panel(ts("arch_prctl calls", "arch_prctl XSTATE permission calls per second.",
                        q(f"sum by (option, feature, result) "
                          f"(rate(xstate_arch_prctl_calls_total{{{INST}}}[$__rate_interval]))",
                          "{{option}} {{feature}} {{result}}"), unit="ops"))

    d = d.with_row(dash.Row("Agent health"))
    d = d.with_panel(ts("Events lost", "Events lost per second before the policy saw them, by stage.",
                        q(f"sum by (stage) (rate(xstate_events_lost_total{{{INST}}}[$__rate_interval]))", "{{stage}}"),
                        unit="ops", w=8))
    d = d.with_panel(tab("Probes", "1: attached; 0: could not attach (see `xstate-agent doctor`).",
                         q(f"xstate_probe_attached{{{INST}}}", instant=True, fmt_table=True), w=8))
    d = d.with_panel(ts("Attached probes per event kind", "0 means the agent is blind to that kind of event.",
                        q(f"xstate_event_source_probes{{{INST}}}", "{{kind}}"), w=8))
    d = d.with_panel(ts("Latency from kernel event to verdict", "Quantiles of the delay from the kernel event "
                        "to its verdict (a sample of the events).",
                        q(f"histogram_quantile(0.5, sum by (le) "
                          f"(rate(xstate_event_latency_seconds_bucket{{{INST}}}[$__rate_interval])))", "p50"),
                        q(f"histogram_quantile(0.99, sum by (le) "
                          f"(rate(xstate_event_latency_seconds_bucket{{{INST}}}[$__rate_interval])))", "p99", ref="B"),
                        unit="s", w=8))
    d = d.with_panel(ts("Tracked state", "Processes and vCPUs the policy tracks, and the limits.",
                        q(f"xstate_tracked_processes{{{INST}}}", "processes"),
                        q(f"xstate_tracked_vcpus{{{INST}}}", "vCPUs", ref="B"),
                        q(f"xstate_tracked_processes_limit{{{INST}}}", "process limit", ref="C"),
                        q(f"xstate_tracked_vcpus_limit{{{INST}}}", "vCPU limit", ref="D"), w=8))
    d = d.with_panel(ts("Evictions", "Processes and vCPUs forgotten per second past the limits.",
                        q(f"sum by (object) (rate(xstate_tracked_evictions_total{{{INST}}}[$__rate_interval]))",
                          "{{object}}"), unit="ops", w=8))
    d = d.with_panel(ts("Agent CPU", "CPU time the agent's process uses.",
                        q(f"rate(process_cpu_seconds_total{{{INST}}}[$__rate_interval])", "cpu"),
                        unit="percentunit", w=12))
    d = d.with_panel(ts("Agent memory", "Resident memory of the agent's process.",
                        q(f"process_resident_memory_bytes{{{INST}}}", "rss"), unit="bytes", w=12))
    return d


DASHBOARDS = {"xstate-fleet.json": fleet, "xstate-host.json": host}


def render(build) -> str:
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that the files are up to date")
    ap.add_argument("--out", type=Path, default=HERE, help="directory to write to (default: beside this script)")
    args = ap.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = args.out / name
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python dashboards/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
