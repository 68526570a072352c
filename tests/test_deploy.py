"""deploy/: the systemd unit and the Kubernetes manifests are well formed, agree with each other (the
capabilities, ports, labels, volumes) and with the agent (its `run` options, its metrics port, its exit
statuses)."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import typer.main
import yaml

from agent import cli
from agent.exporters.prometheus import DEFAULT_LISTEN, DEFAULT_PORT

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNIT = DEPLOY / "systemd" / "xstate-agent.service"
K8S = DEPLOY / "kubernetes"


def run_options() -> set[str]:
    """Every option `xstate-agent run --help` lists."""
    run = typer.main.get_command(cli.app).commands["run"]
    return {opt for param in run.params for opt in (*param.opts, *param.secondary_opts)}


def options(argv: list[str]) -> dict[str, str]:
    """`--opt VALUE` pairs of a `run` command line (every option it uses takes a value)."""
    assert argv[0] == "run", argv
    assert len(argv) % 2 == 1 and all(a.startswith("--") for a in argv[1::2]), argv
    return dict(zip(argv[1::2], argv[2::2]))


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> values (a key may be given more than once)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key, []).append(value)
    return out


def config_lines(path: Path) -> list[list[str]]:
    """sysusers.d / tmpfiles.d lines, split into fields."""
    return [shlex.split(line) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def service():
    return unit(UNIT)["Service"]


@pytest.fixture(scope="module")
def manifests():
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def pod(manifests):
    return manifests["DaemonSet"]["spec"]["template"]


def agent_container(pod):
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "xstate-agent"]
    return container


# ---- systemd ------------------------------------------------------------------------------------

def test_unit_runs_the_live_agent_with_options_it_has(service):
    argv = shlex.split(service["ExecStart"][0])
    assert PurePosixPath(argv[0]).is_absolute() and PurePosixPath(argv[0]).name == "xstate-agent"
    opts = options(argv[1:])
    assert set(opts) <= run_options(), set(opts) - run_options()
    assert opts["--listen"] == DEFAULT_LISTEN  # loopback: no auth by default
    assert service["Type"] == ["notify"] and service["Restart"] == ["on-failure"]
    # Statuses `run` exits with when it cannot go on, not the ones a restart may cure (3: the port is taken).
    prevent = set(map(int, service["RestartPreventExitStatus"][0].split()))
    statuses = {v for k, v in vars(cli).items() if k.startswith("EXIT_")}
    assert prevent <= statuses - {cli.EXIT_OK, cli.EXIT_VIOLATION, cli.EXIT_LISTEN}, prevent
    assert {cli.EXIT_INPUT, cli.EXIT_NO_PROBES, cli.EXIT_PRIVILEGES} <= prevent


def test_unit_user_and_events_log_directory(service):
    opts = options(shlex.split(service["ExecStart"][0])[1:])
    log_dir = str(PurePosixPath(opts["--events-log"]).parent)
    # The log directory, and the state directory where the key of VM ids is made at the first start.
    assert service["ReadWritePaths"] == [f"{log_dir} /var/lib/xstate-agent"]
    (user,) = config_lines(DEPLOY / "systemd" / "xstate-agent.sysusers")
    assert user[:2] == ["u", opts["--user"]]
    # The directory is the user's: after the drop the agent rotates and reopens the log there.
    (directory,) = config_lines(DEPLOY / "systemd" / "xstate-agent.tmpfiles")
    assert directory[:5] == ["d", log_dir, "0750", opts["--user"], opts["--user"]]


def test_unit_is_sandboxed(service):
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("ProtectKernelTunables", "yes"), ("MemoryDenyWriteExecute", "yes")):
        assert service[key] == [value], key
    # BCC finds the kernel headers under /lib/modules, VM names come from other processes' /proc.
    assert "ProtectKernelModules" not in service and "ProtectProc" not in service


def test_unit_and_daemonset_grant_the_same_capabilities(service, pod):
    unit_caps = set(service["CapabilityBoundingSet"][0].split())
    pod_caps = agent_container(pod)["securityContext"]["capabilities"]
    assert pod_caps["drop"] == ["ALL"]
    assert unit_caps == {f"CAP_{c}" for c in pod_caps["add"]}
    assert {"CAP_BPF", "CAP_PERFMON", "CAP_SETUID", "CAP_SETGID"} <= unit_caps


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("needs systemd-analyze (Debian package systemd)")
    # The unit names where a deployment installs the agent; verify it against this one.
    text = UNIT.read_text()
    installed = shlex.split(unit(UNIT)["Service"]["ExecStart"][0])[0]
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(installed, str(Path(sys.prefix) / "bin" / "xstate-agent")))
    r = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


# ---- Kubernetes ---------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest(manifests):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert set(manifests) == {"Namespace", "DaemonSet", "Service", "ServiceMonitor"}


def test_namespaces_labels_and_selectors(manifests, pod):
    ns = manifests["Namespace"]["metadata"]["name"]
    for kind in ("DaemonSet", "Service", "ServiceMonitor"):
        assert manifests[kind]["metadata"]["namespace"] == ns, kind
    assert manifests["ServiceMonitor"]["spec"]["namespaceSelector"]["matchNames"] == [ns]
    pod_labels = pod["metadata"]["labels"].items()
    assert manifests["DaemonSet"]["spec"]["selector"]["matchLabels"].items() <= pod_labels
    assert manifests["Service"]["spec"]["selector"].items() <= pod_labels
    service_labels = manifests["Service"]["metadata"]["labels"].items()
    assert manifests["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= service_labels


def test_ports_and_probes(manifests, pod):
    container = agent_container(pod)
    (port,) = container["ports"]
    assert port["containerPort"] == DEFAULT_PORT
    opts = options(container["args"])
    assert opts["--listen"] == f":{port['containerPort']}"  # the pod's network, for Prometheus
    (svc_port,) = manifests["Service"]["spec"]["ports"]
    assert svc_port["targetPort"] == port["name"] and svc_port["port"] == port["containerPort"]
    (endpoint,) = manifests["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["port"] == svc_port["name"] and endpoint["path"] == "/metrics"
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port["name"]}, probe


def test_agent_command_and_image(pod):
    container = agent_container(pod)
    assert set(options(container["args"])) <= run_options()
    entrypoint = next(line for line in (K8S / "Containerfile").read_text().splitlines()
                      if line.startswith("ENTRYPOINT"))
    assert yaml.safe_load(entrypoint.split(None, 1)[1]) == container["command"]
    assert {c["image"] for c in pod["spec"]["initContainers"]} == {container["image"]}


def test_host_access(pod):
    spec = pod["spec"]
    assert spec["hostPID"] is True
    assert {"operator": "Exists"} in spec["tolerations"]  # every node, whatever its taints
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = [m for c in spec["containers"] + spec["initContainers"] for m in c["volumeMounts"]]
    assert {m["name"] for m in mounts} == set(volumes)  # each mount has its volume, each volume is used
    agent_mounts = {m["mountPath"]: m for m in agent_container(pod)["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/sys/kernel/btf", "/lib/modules", "/usr/src"):
        mount = agent_mounts[path]
        assert mount.get("readOnly") is True and volumes[mount["name"]]["hostPath"]["path"] == path, path


def test_events_log_directory_is_the_users(pod):
    container = agent_container(pod)
    opts = options(container["args"])
    log_dir = str(PurePosixPath(opts["--events-log"]).parent)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == log_dir)
    assert not mount.get("readOnly")
    (init,) = pod["spec"]["initContainers"]
    assert init["command"] == ["chown", f"{opts['--user']}:{opts['--user']}", log_dir]
    assert [m["name"] for m in init["volumeMounts"] if m["mountPath"] == log_dir] == [mount["name"]]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
