"""Helpers to run the agent, Prometheus and Alertmanager for real, on loopback, in a temporary directory."""

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENT = Path(sys.prefix) / "bin" / "xstate-agent"
RULES = ROOT / "dashboards" / "alerts" / "xstate.rules.yml"
INCIDENTS = ROOT / "samples" / "amx-host-incidents.jsonl"
INCIDENT_EVENTS = sum(1 for line in INCIDENTS.read_text().splitlines() if line.startswith("{"))


def need(tool: str) -> str:
    """The path of a Debian tool the test runs (scripts/setup installs them); skip outside CI without it."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (scripts/setup installs it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Agent:
    """`xstate-agent run ... --listen 127.0.0.1:0`, with the address it reports on stderr."""

    def __init__(self, *args: str, cwd: Path = ROOT):
        self.proc = subprocess.Popen([str(AGENT), "run", *args], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        m = re.match(r"metrics on (https?)://([^ ]+):(\d+)/metrics", line)
        if not m:
            rest = self.proc.stderr.read() if self.proc.poll() is not None else ""
            stop(self.proc)
            raise AssertionError(f"the agent did not report its metrics address: {line!r} {rest!r}")
        self.scheme, self.host, self.port = m.group(1), m.group(2), int(m.group(3))

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, path: str = "/metrics") -> str:
        return f"{self.scheme}://{self.target}{path}"

    def stop(self) -> str:
        stop(self.proc)
        return self.proc.stderr.read()

    def wait_events(self, n: int, opener=None, **headers) -> None:
        """Until the agent has judged `n` events (it serves metrics before it starts reading)."""
        def judged():
            text = (opener.open(urllib.request.Request(self.url(), headers=headers), timeout=5).read()
                    if opener else get(self.url(), headers=headers)).decode()
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("xstate_events_total{")) >= n
        wait_until(f"{n} events judged", judged, timeout=30, every=0.1)


# Loopback only: never through a proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, timeout: float = 10, **kw) -> bytes:
    with _opener.open(urllib.request.Request(url, **kw), timeout=timeout) as r:
        return r.read()


def wait_until(what: str, check, timeout: float = 60, every: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError as e:  # not up yet
            value, last = None, e
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


class Server:
    """A Prometheus or Alertmanager process with its log kept for failures."""

    def __init__(self, argv: list[str], log: Path, ready_url: str):
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, cwd=log.parent)
        self.ready_url = ready_url

    def wait_ready(self, timeout: float = 60) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.log.name} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            return get(self.ready_url, timeout=2)
        wait_until(f"{self.ready_url}", ready, timeout)

    def stop(self) -> None:
        stop(self.proc)
        self._out.close()


def prometheus_query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(get(url))
    except urllib.error.HTTPError as e:  # a bad query answers 400 with the reason
        return json.loads(e.read())


def make_tls(d: Path, users: dict[str, str]) -> Path:
    """A self-signed certificate for 127.0.0.1 (openssl) and a web config with TLS and basic auth users."""
    import bcrypt
    openssl = need("openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=xstate-test",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")], check=True, capture_output=True)
    lines = ["tls_server_config:", f"  cert_file: {d / 'cert.pem'}", f"  key_file: {d / 'key.pem'}",
             "  min_version: TLS12", "http_server_config:", "  headers:", "    X-Content-Type-Options: nosniff",
             "basic_auth_users:"]
    for n, (user, password) in enumerate(users.items()):
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        if n % 2 == 0:  # htpasswd -B writes $2y$: accepted as exporter-toolkit accepts it
            hashed = hashed.replace("$2b$", "$2y$", 1)
        lines.append(f"  {user}: '{hashed}'")
    (d / "web.yml").write_text("\n".join(lines) + "\n")
    return d / "web.yml"
