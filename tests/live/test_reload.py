"""SIGHUP while the real agent runs: the configuration file is read again and applied without detaching a
probe or forgetting what the policy tracks; a file that is not valid changes nothing; with --log-format json
every line the agent writes about itself is a JSON object."""

import json
import os
import signal

from prometheus_client.parser import text_string_to_metric_families

from agent import kvmctl as k
from agentproc import Agent, wait_until

SSE = 1 << 1  # in the FPU buffer of every guest


def metric(agent, name: str, **labels) -> float | None:
    for family in text_string_to_metric_families(agent.metrics()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def policy(agent) -> tuple[str, str]:
    for family in text_string_to_metric_families(agent.metrics()):
        for s in family.samples:
            if s.name == "xstate_policy_info":
                return s.labels["profile"], s.labels["dyn"]
    raise AssertionError("no xstate_policy_info")


def hup(agent, marker: str) -> str:
    """SIGHUP, then what the agent said about it (its stderr from the first line that has `marker`)."""
    start = len(agent.stderr())
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: marker in agent.stderr()[start:], 10), agent.stderr()
    return agent.stderr()[start:]


def my_perm_events(agent, before: int) -> list:
    k.arch_prctl_get(k.ARCH_GET_XCOMP_SUPP)
    return agent.wait_events(lambda evs: len([e for e in evs if e.tgid == os.getpid() and e.kind == "perm"]) > before)


def test_sighup_reloads_the_configuration_keeping_the_probes_and_the_state(tmp_path):
    first, second, config = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "config.toml"
    config.write_text(f'profile = "upstream"\nevents_log = "{first}"\nmax_vms = 100000\n')
    agent = Agent(tmp_path / "agent", "--config", str(config), events_log=False)
    agent.log = first
    vm = k.Vm()
    try:
        fd = vm.create_vcpu(0)
        assert vm.set_cpuid(fd, vm.supported_cpuid()) == 0
        assert vm.guest(fd, k.HLT)[0] == k.KVM_EXIT_HLT
        evs = agent.wait_events(lambda evs: any(e.kind == "fpu_load" and e.tgid == os.getpid() for e in evs))
        load = next(e for e in evs if e.kind == "fpu_load" and e.tgid == os.getpid())
        assert load.guest_features & SSE
        assert policy(agent) == ("upstream", "0x40000")
        assert metric(agent, "xstate_amx_vcpus", vm=load.vm) == 0

        # SSE called dynamic too: the vCPU the engine learnt about before the reload counts at once.
        config.write_text(f'profile = "reference"\ndyn = "{0x40000 | SSE:#x}"\nevents_log = "{second}"\n'
                          f'max_vms = 100000\nbackend = "tracepoint"\nlisten = "127.0.0.1:9"\n')
        said = hup(agent, "reloaded")
        assert said.splitlines()[0] == (
            f'xstate-agent: reloaded {config}: profile "upstream" -> "reference"; dyn "0x40000" -> "0x40002"; '
            f'events_log "{first}" -> "{second}"; needs a restart, ignored: backend; the command line sets listen')
        assert policy(agent) == ("reference", "0x40002")
        assert metric(agent, "xstate_amx_vcpus", vm=load.vm) == 1
        # Nothing was attached again.
        err = agent.stderr()
        assert err.count("ready:") == 1 and err.count("probe arch_prctl: tracepoint") == 1
        assert metric(agent, "xstate_probe_attached", probe="arch_prctl", backend="tracepoint") == 1

        # The events go on, into the new log, which says why it starts.
        agent.log = second
        my_perm_events(agent, 0)
        assert second.read_text().startswith(f"# xstate-agent pid {agent.proc.pid} reloaded {config}: ")
        old = first.read_bytes()

        # A file that is not valid changes nothing.
        config.write_text('profile = "reference"\n\nprofile_typo = 1\n')
        said = hup(agent, "error: reload:")
        assert said == (f"error: reload: {config}:3: profile_typo: unknown key (did you mean profile?); "
                        f"the configuration in force is kept\n")
        assert policy(agent) == ("reference", "0x40002") and agent.proc.poll() is None
        mine = len([e for e in agent.events() if e.tgid == os.getpid() and e.kind == "perm"])
        my_perm_events(agent, mine)
        assert first.read_bytes() == old  # closed at the reload
    finally:
        vm.close()
        status = agent.stop()
    assert status == 0
    assert "events judged" in agent.stderr().splitlines()[-1]


def test_json_logs_from_start_to_stop(tmp_path):
    agent = Agent(tmp_path, "--log-format", "json")
    assert agent.stop() == 0
    lines = [json.loads(line) for line in agent.stderr().splitlines()]
    assert all(list(line) == ["ts", "level", "msg", "fields"] for line in lines)
    assert lines[0]["msg"].startswith("metrics on ") and lines[0]["fields"]["url"] == agent.metrics_url
    ready = next(line for line in lines if line["msg"].startswith("ready: "))
    assert ready["fields"]["attached"] == ready["fields"]["sources"] > 0
    assert ready["fields"]["events_log"] == str(agent.log)
    probes = [line for line in lines if line["msg"].startswith("probe ")]
    attached = [p for p in probes if "backend" in p["fields"]]
    assert attached and all(p["fields"]["backend"] == "tracepoint" for p in attached)
    # The others (kprobe-only sources on a kernel without kprobes) say why, per backend.
    assert all(set(p["fields"]["tried"]) == {"kprobe", "tracepoint"} for p in probes if p not in attached)
    summary = lines[-1]
    assert summary["level"] == "info" and summary["msg"].startswith(f"{summary['fields']['events']} events judged")
    assert set(summary["fields"]["lost"]) == {"ringbuf", "reader", "events_log"}
