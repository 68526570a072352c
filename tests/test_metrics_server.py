"""`xstate-agent run --listen`: a real /metrics scrape, /healthz, TLS and basic auth from a web config."""

import base64
import gzip
import socket
import ssl
import subprocess
import urllib.error

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.exporters.prometheus import MetricsServer, WebConfig, WebConfigError, parse_listen
from promstack import AGENT, INCIDENT_EVENTS, INCIDENTS, ROOT, Agent, get, make_tls, need

DOCS = ROOT / "docs" / "metrics.md"


@pytest.fixture(scope="module")
def agent():
    a = Agent("--from", str(INCIDENTS), "--follow", "--listen", "127.0.0.1:0")
    a.wait_events(INCIDENT_EVENTS)
    yield a
    a.stop()


def scrape(agent: Agent, **headers) -> bytes:
    return get(agent.url("/metrics"), headers=headers)


def test_promtool_check_metrics_on_a_real_scrape(agent):
    promtool = need("promtool")
    body = scrape(agent)
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), (r.stdout + r.stderr).decode()
    names = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    for name in ("xstate_events_total", "xstate_violations_total", "xstate_guest_xsetbv_total",
                 "xstate_amx_vcpus", "xstate_build_info", "xstate_policy_info", "process_resident_memory_bytes"):
        assert name in names
    assert b'xstate_violations_total{rule="XS011",severity="critical",vm="db-7"} 1.0' in body


def test_every_metric_is_documented(agent):
    """docs/metrics.md names every family the agent serves (the live side's too)."""
    doc = DOCS.read_text()
    families = {f.name for f in text_string_to_metric_families(scrape(agent).decode())}
    families |= {"xstate_events_lost", "xstate_probe_attached", "xstate_event_source_probes",
                 "xstate_event_latency_seconds"}
    missing = sorted(f for f in families if f.startswith("xstate_") and f"`{f}" not in doc)
    assert not missing, f"not in docs/metrics.md: {missing}"


def test_healthz_index_404_gzip_and_openmetrics(agent):
    assert get(agent.url("/healthz")) == b"ok\n"
    assert b'href="/metrics"' in get(agent.url("/"))
    with pytest.raises(urllib.error.HTTPError) as e:
        get(agent.url("/nope"))
    assert e.value.code == 404
    zipped = scrape(agent, **{"Accept-Encoding": "gzip"})
    assert b"xstate_events_total" in gzip.decompress(zipped)
    om = scrape(agent, Accept="application/openmetrics-text; version=1.0.0")
    assert om.rstrip().endswith(b"# EOF")


def test_no_vm_label():
    a = Agent("--from", str(INCIDENTS), "--listen", "127.0.0.1:0", "--no-vm-label", "--follow")
    try:
        a.wait_events(INCIDENT_EVENTS)
        body = scrape(a).decode()
    finally:
        a.stop()
    assert "vm=" not in body
    assert 'xstate_violations_total{rule="XS011",severity="critical"} 1.0' in body
    assert 'xstate_violations_total{rule="XS002",severity="critical"} 0.0' in body
    assert "xstate_guest_fpu_buffer_bytes 38416.0" in body  # 3 x 11008 + 2 x 2696


def run(*args, timeout=30):
    return subprocess.run([str(AGENT), "run", "--from", str(INCIDENTS), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_listen_errors_are_one_line_with_their_own_status():
    r = run("--listen", "nowhere")
    assert r.returncode == 2 and r.stderr.startswith("error: --listen") and r.stderr.count("\n") == 1
    r = run("--listen", "::1:9477")
    assert r.returncode == 2 and "brackets" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run("--listen", f"127.0.0.1:{s.getsockname()[1]}")
    assert r.returncode == 3 and "in use" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = run("--web-config", "/nonexistent.yml")
    assert r.returncode == 2 and "needs --listen" in r.stderr


def test_parse_listen():
    assert parse_listen("127.0.0.1:9477") == ("127.0.0.1", 9477)
    assert parse_listen(":9477") == ("", 9477)
    assert parse_listen("[::1]:9477") == ("::1", 9477)
    assert parse_listen("localhost:0") == ("localhost", 0)
    for bad in ("9477", "host:", "host:99999", "[nope]:1", "::1:2"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_a_server_bound_but_never_started_stops():
    # The live agent binds before attaching and serves only once its privileges are dropped: an agent
    # that stops in between (no probe) closes the socket without waiting for a loop that never ran.
    server = MetricsServer(CollectorRegistry(), "127.0.0.1:0")
    address = server.address
    server.stop()
    with socket.socket() as s:
        assert s.connect_ex(address) != 0


# ---- TLS and basic auth -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    make_tls(d, {"alice": "s3cret", "bob": "hunter2"})
    return d


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_tls_and_basic_auth(tls_files):
    a = Agent("--from", str(INCIDENTS), "--follow", "--listen", "127.0.0.1:0",
              "--web-config", str(tls_files / "web.yml"))
    try:
        assert a.scheme == "https"
        ctx = ssl.create_default_context(cafile=str(tls_files / "cert.pem"))
        import urllib.request
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))

        def fetch(path, **headers):
            with opener.open(urllib.request.Request(a.url(path), headers=headers), timeout=10) as r:
                return r.read(), r.headers

        a.wait_events(INCIDENT_EVENTS, opener, **basic("alice", "s3cret"))
        body, headers = fetch("/metrics", **basic("alice", "s3cret"))
        assert b"xstate_events_total" in body and headers["X-Content-Type-Options"] == "nosniff"
        assert b"xstate_events_total" in fetch("/metrics", **basic("bob", "hunter2"))[0]
        assert fetch("/healthz")[0] == b"ok\n"  # for liveness probes: no credentials, nothing secret
        for headers in ({}, basic("alice", "wrong"), basic("mallory", "s3cret")):
            with pytest.raises(urllib.error.HTTPError) as e:
                fetch("/metrics", **headers)
            assert e.value.code == 401 and e.value.headers["WWW-Authenticate"].startswith("Basic")
        # Plain HTTP to the TLS port gets nowhere.
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            get(f"http://{a.target}/metrics", timeout=5)
        # curl, another real client, if the host has it.
        curl = need("curl") if __import__("shutil").which("curl") else None
        if curl:
            r = subprocess.run([curl, "-sf", "--cacert", str(tls_files / "cert.pem"), "-u", "bob:hunter2",
                                a.url("/metrics")], capture_output=True, timeout=30)
            assert r.returncode == 0 and b"xstate_build_info" in r.stdout
    finally:
        a.stop()


def test_web_config_errors_name_the_key(tmp_path, tls_files):
    def load(text):
        p = tmp_path / "web.yml"
        p.write_text(text)
        return WebConfig.load(str(p))

    with pytest.raises(WebConfigError, match="tls_server_config.cipher_suites: unknown or unsupported"):
        load(f"tls_server_config:\n  cert_file: {tls_files / 'cert.pem'}\n  key_file: {tls_files / 'key.pem'}\n"
             "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n")
    with pytest.raises(WebConfigError, match="tls_server_config.key_file: required"):
        load(f"tls_server_config:\n  cert_file: {tls_files / 'cert.pem'}\n")
    with pytest.raises(WebConfigError, match="basic_auth_users.alice: expected a bcrypt hash"):
        load("basic_auth_users:\n  alice: plaintext\n")
    with pytest.raises(WebConfigError, match="tsl_server_config: unknown"):
        load("tsl_server_config: {}\n")
    with pytest.raises(WebConfigError, match="not valid YAML"):
        load("basic_auth_users: [\n")
    assert load("").users == {} and load("").ssl_context is None
    r = subprocess.run([str(AGENT), "run", "--from", str(INCIDENTS), "--listen", "127.0.0.1:0",
                        "--web-config", str(tmp_path / "missing.yml")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.startswith("error: --web-config") and "missing.yml" in r.stderr
