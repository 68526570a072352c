"""Prometheus exposition of the agent's statistics, and the HTTP server that serves it.

The collector reads `Stats.snapshot()` at scrape time: nothing here runs per
event. Metric names and labels are documented in docs/metrics.md (a test
checks that every metric served is documented there).

The server answers `/metrics` (text format 0.0.4, or OpenMetrics when asked,
gzip when accepted), `/healthz` and `/`. A web configuration file in the
format of the Prometheus exporter-toolkit turns on TLS (`tls_server_config`)
and HTTP basic auth (`basic_auth_users`, bcrypt hashes).
"""

import base64
import errno
import hashlib
import hmac
import html
import ipaddress
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily,
)
from prometheus_client.registry import Collector

from agent.stats import LATENCY_BUCKETS, Snapshot, Stats

NS = "xstate"
DEFAULT_PORT = 9477
# Loopback: the metrics name VMs, and the agent runs as root on a hypervisor.
# Opening them to the network is the operator's decision (--listen :9477), best with --web-config.
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"


class StatsCollector(Collector):
    """Every xstate_ metric, from one snapshot of the statistics per scrape."""

    def __init__(self, stats: Stats):
        self.stats = stats

    def describe(self):
        # Not known before a scrape (labels depend on what was seen): registering must not collect.
        return []

    def collect(self):
        s = self.stats.snapshot()
        yield from _health(s)
        yield from _domain(s)


def _vm_labels(s: Snapshot, *names: str) -> list[str]:
    return [*names, "vm"] if s.per_vm else list(names)


def _vm_values(s: Snapshot, vm, *values: str) -> list[str]:
    return [*values, vm] if s.per_vm else list(values)


def _domain(s: Snapshot):
    m = CounterMetricFamily(f"{NS}_events", "Events observed, by kind, source (guest, host or nm for xcr0, xfd "
                            "and xfd_err; empty for other kinds) and result (accepted: the operation took effect "
                            "or the event is a fact; refused: the kernel refused it).",
                            labels=["kind", "source", "result"])
    for (kind, source, result), n in sorted(s.events.items()):
        m.add_metric([kind, source, result], n)
    yield m

    m = CounterMetricFamily(f"{NS}_arch_prctl_calls", "arch_prctl XSTATE permission calls, by option, feature "
                            "(the xfeature a REQ_* call asks for; empty for GET_*) and result.",
                            labels=["option", "feature", "result"])
    for (option, feature, result), n in sorted(s.perm.items()):
        m.add_metric([option, feature, result], n)
    yield m

    m = CounterMetricFamily(f"{NS}_violations", "Policy violations, by rule and severity"
                            + (", and the VM of the event (empty for process-level rules)." if s.per_vm else "."),
                            labels=_vm_labels(s, "rule", "severity"))
    for (rule, severity, vm), n in sorted(s.violations.items(), key=lambda kv: (kv[0][0], kv[0][2] or "")):
        m.add_metric(_vm_values(s, vm, rule, severity), n)
    yield m

    rows = sorted(s.vms.items(), key=lambda kv: kv[0] or "")
    per_vm = [
        ("guest_xsetbv", CounterMetricFamily, "Guest XSETBV (XCR0 writes by the guest), accepted or not.", "xsetbv"),
        ("guest_xfd_writes", CounterMetricFamily, "Guest writes of IA32_XFD that exited to the host.", "xfd_writes"),
        ("guest_xfd_err_saves", CounterMetricFamily,
         "Guest #NM exceptions from XFD whose IA32_XFD_ERR the host saved.", "nm_saves"),
        ("amx_vcpus", GaugeMetricFamily,
         "Tracked vCPUs whose guest FPU buffer has room for a dynamic feature (AMX).", "amx_vcpus"),
        ("guest_fpu_buffer_bytes", GaugeMetricFamily,
         "Size of the guest FPU buffers of tracked vCPUs, where known.", "fpu_bytes"),
        ("xfd_passthrough_vcpus", GaugeMetricFamily,
         "Tracked vCPUs with IA32_XFD write interception switched off (passthrough).", "passthrough_vcpus"),
    ]
    for name, family, text, attr in per_vm:
        m = family(f"{NS}_{name}", text + (" Per VM." if s.per_vm else ""), labels=_vm_labels(s))
        for vm, row in rows:
            m.add_metric(_vm_values(s, vm), getattr(row, attr))
        yield m

    yield GaugeMetricFamily(f"{NS}_amx_vms", "VMs with at least one AMX vCPU (see xstate_amx_vcpus).", value=s.amx_vms)


def _health(s: Snapshot):
    yield InfoMetricFamily(f"{NS}_build", "The agent's version and Python.",
                           value={"version": s.version, "python_version": s.python})
    yield InfoMetricFamily(f"{NS}_policy", "The policy in force: profile, digest of its rule table, DYN mask.",
                           value={"profile": s.profile, "rules_hash": s.rules_hash, "dyn": f"{s.dyn:#x}"})

    m = CounterMetricFamily(f"{NS}_events_lost", "Events lost before the policy judged them, by stage "
                            "(ringbuf: kernel buffer full; reader: undecodable; events_log: not recorded).",
                            labels=["stage"])
    for stage, n in sorted(s.lost.items()):
        m.add_metric([stage], n)
    yield m

    m = GaugeMetricFamily(f"{NS}_probe_attached", "1 if the probe is attached, 0 if it could not be, "
                          "by probe and backend.", labels=["probe", "backend"])
    for (probe, backend), attached in sorted(s.probes.items()):
        m.add_metric([probe, backend], attached)
    yield m

    m = GaugeMetricFamily(f"{NS}_event_source_probes", "Attached probes that produce each event kind the agent "
                          "watches; 0 means the agent is blind to that kind.", labels=["kind"])
    for kind, n in sorted(s.sources.items()):
        m.add_metric([kind], n)
    yield m

    yield GaugeMetricFamily(f"{NS}_tracked_processes", "Processes the policy engine tracks.",
                            value=s.tracked_processes)
    yield GaugeMetricFamily(f"{NS}_tracked_vcpus", "vCPUs the policy engine tracks.", value=s.tracked_vcpus)
    yield GaugeMetricFamily(f"{NS}_tracked_processes_limit", "Most processes tracked at once (--max-processes).",
                            value=s.max_processes)
    yield GaugeMetricFamily(f"{NS}_tracked_vcpus_limit", "Most vCPUs tracked at once (--max-vcpus).",
                            value=s.max_vcpus)
    m = CounterMetricFamily(f"{NS}_tracked_evictions", "Least recently seen processes and vCPUs forgotten "
                            "past the limits.", labels=["object"])
    m.add_metric(["process"], s.evicted_processes)
    m.add_metric(["vcpu"], s.evicted_vcpus)
    yield m

    if s.per_vm:
        yield GaugeMetricFamily(f"{NS}_vm_labels", "VMs with their own vm label.", value=s.vm_labels)
        yield GaugeMetricFamily(f"{NS}_vm_labels_limit", "Most VMs with their own vm label (--max-vms).",
                                value=s.max_vms)
        yield CounterMetricFamily(f"{NS}_vm_label_overflows", "Events of VMs past --max-vms, counted "
                                  "under vm=\"_other\".", value=s.vm_overflows)

    if s.latency is not None:
        cumulative, total = s.latency
        buckets = [(repr(b), n) for b, n in zip(LATENCY_BUCKETS, cumulative)]
        buckets.append(("+Inf", cumulative[-1]))
        yield HistogramMetricFamily(f"{NS}_event_latency_seconds", "Delay from the kernel event to its verdict.",
                                    buckets=buckets, sum_value=total)


def make_registry(stats: Stats, process: bool = True) -> CollectorRegistry:
    """A registry with the xstate_ metrics and, with `process`, the standard process_/python_ ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


# ---- web configuration (exporter-toolkit format) ------------------------------------------------

class WebConfigError(Exception):
    pass


_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
_HTTP_KEYS = {"http2", "headers"}
# A bcrypt hash to compare against when the user is unknown, so that the time taken does not tell.
_DUMMY_HASH = b"$2b$10$8zjL7QNYwUZpWzYtSrxBKeEvd3CHq6SL/xqT.ajE3dUVybh.v6jc."


class WebConfig:
    """TLS and basic auth settings, read from a web configuration file."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, users: dict | None = None,
                 headers: dict | None = None):
        self.ssl_context = ssl_context
        self.users = users or {}
        self.headers = headers or {}
        self._cache: dict[bytes, bool] = {}
        self._cache_lock = threading.Lock()

    @classmethod
    def load(cls, path: str) -> "WebConfig":
        try:
            import yaml
        except ImportError:
            raise WebConfigError("--web-config needs PyYAML: pip install 'xstate-agent[web]' "
                                 "or apt install python3-yaml") from None
        try:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except OSError as e:
            raise WebConfigError(f"{path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise WebConfigError(f"{path}: not valid YAML: {e}") from None
        try:
            return cls.from_dict(doc or {})
        except WebConfigError as e:
            raise WebConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, doc) -> "WebConfig":
        if not isinstance(doc, dict):
            raise WebConfigError("expected a mapping at the top level")
        _only(doc, {"tls_server_config", "http_server_config", "basic_auth_users"}, "")
        ctx = None
        tls = doc.get("tls_server_config")
        if tls is not None:
            ctx = _ssl_context(_mapping(tls, "tls_server_config"))
        headers = {}
        http = doc.get("http_server_config")
        if http is not None:
            http = _mapping(http, "http_server_config")
            _only(http, _HTTP_KEYS, "http_server_config.")
            for k, v in _mapping(http.get("headers") or {}, "http_server_config.headers").items():
                if not isinstance(v, str) or "\n" in v or "\r" in v:
                    raise WebConfigError(f"http_server_config.headers.{k}: expected a one-line string")
                headers[str(k)] = v
        users = {}
        auth = doc.get("basic_auth_users")
        if auth is not None:
            auth = _mapping(auth, "basic_auth_users")
            if auth:
                try:
                    import bcrypt  # noqa: F401
                except ImportError:
                    raise WebConfigError("basic_auth_users needs bcrypt: pip install 'xstate-agent[web]' "
                                         "or apt install python3-bcrypt") from None
            for user, hashed in auth.items():
                if not isinstance(hashed, str) or not hashed.startswith("$2"):
                    raise WebConfigError(f"basic_auth_users.{user}: expected a bcrypt hash ($2y$..., $2b$...)")
                users[str(user)] = hashed.encode()
        return cls(ctx, users, headers)

    def check(self, authorization: str | None) -> bool:
        """Whether an Authorization header passes basic auth (always, when no users are configured)."""
        if not self.users:
            return True
        if not authorization or not authorization.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(authorization[6:], validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), password.encode(), hashed or b""))).digest()
        with self._cache_lock:
            ok = self._cache.get(key)
        if ok is None:
            import bcrypt
            try:
                ok = bcrypt.checkpw(password.encode(), hashed or _DUMMY_HASH) and hashed is not None
            except ValueError:
                ok = False
            with self._cache_lock:
                if len(self._cache) > 1024:
                    self._cache.clear()
                self._cache[key] = ok
        return ok


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise WebConfigError(f"{where}: expected a mapping")
    return value


def _only(doc: dict, allowed: set, prefix: str) -> None:
    for key in doc:
        if key not in allowed:
            raise WebConfigError(f"{prefix}{key}: unknown or unsupported key "
                                 f"(supported: {', '.join(sorted(allowed))})")


def _ssl_context(tls: dict) -> ssl.SSLContext:
    _only(tls, _TLS_KEYS, "tls_server_config.")
    for key in ("cert_file", "key_file"):
        if not isinstance(tls.get(key), str) or not tls[key]:
            raise WebConfigError(f"tls_server_config.{key}: required")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls["cert_file"], tls["key_file"])
    except (OSError, ssl.SSLError) as e:
        raise WebConfigError(f"tls_server_config: cannot load {tls['cert_file']} / {tls['key_file']}: {e}") from None
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"tls_server_config.client_auth_type: {auth!r} is not one of "
                             f"{', '.join(_CLIENT_AUTH)}")
    ctx.verify_mode = _CLIENT_AUTH[auth]
    ca = tls.get("client_ca_file")
    if ca:
        try:
            ctx.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as e:
            raise WebConfigError(f"tls_server_config.client_ca_file: cannot load {ca}: {e}") from None
    elif ctx.verify_mode != ssl.CERT_NONE:
        raise WebConfigError(f"tls_server_config.client_ca_file: required with client_auth_type {auth}")
    for key, attr in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if key in tls:
            if tls[key] not in _TLS_VERSIONS:
                raise WebConfigError(f"tls_server_config.{key}: expected one of {', '.join(_TLS_VERSIONS)}")
            setattr(ctx, attr, _TLS_VERSIONS[tls[key]])
    return ctx


# ---- HTTP server --------------------------------------------------------------------------------

def parse_listen(value: str) -> tuple[str, int]:
    """'ADDR:PORT', '[IPv6]:PORT' or ':PORT' (every interface) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: expected ADDR:PORT, [ADDR]:PORT or :PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, e.g. [::1]:{port}")
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, handler, app: "MetricsServer"):
        host = address[0]
        try:
            ipaddress.IPv6Address(host)
            self.address_family = socket.AF_INET6
        except ValueError:
            pass
        self.app = app
        super().__init__(address, handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            # '::' serves IPv4 too.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def finish_request(self, request, client_address):
        # The TLS handshake runs here, in the connection's own thread, under a time limit.
        ctx = self.app.web.ssl_context
        if ctx is not None:
            request.settimeout(_Handler.timeout)
            try:
                request = ctx.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        pass  # a client that went away is not the agent's problem


class _Handler(BaseHTTPRequestHandler):
    server_version = "xstate-agent"
    timeout = 30

    def log_message(self, format, *args):
        pass

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        app: MetricsServer = self.server.app
        path = urlsplit(self.path).path
        if path == "/healthz":
            return self._send(200, b"ok\n", "text/plain; charset=utf-8")
        if path not in ("/", "/metrics"):
            return self._send(404, b"not found\n", "text/plain; charset=utf-8")
        if not app.web.check(self.headers.get("Authorization")):
            return self._send(401, b"unauthorized\n", "text/plain; charset=utf-8",
                              [("WWW-Authenticate", 'Basic realm="xstate-agent"')])
        if path == "/":
            body = (f"<html><head><title>xstate-agent</title></head><body><h1>xstate-agent "
                    f"{html.escape(app.version)}</h1><p><a href=\"/metrics\">Metrics</a></p>"
                    f"<p><a href=\"/healthz\">Health</a></p></body></html>\n").encode()
            return self._send(200, body, "text/html; charset=utf-8")
        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        try:
            body = encoder(app.registry)
        except Exception as e:  # a broken collector must not take the server down
            return self._send(500, f"error collecting metrics: {e}\n".encode(), "text/plain; charset=utf-8")
        extra = []
        if gzip_accepted(self.headers.get("Accept-Encoding")):
            import gzip
            body = gzip.compress(body, 6)
            extra.append(("Content-Encoding", "gzip"))
        self._send(200, body, content_type, extra)

    def _send(self, code: int, body: bytes, content_type: str, extra=()):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (*self.server.app.web.headers.items(), *extra):
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class MetricsServer:
    """Serves a registry on ADDR:PORT in a background thread, until stop()."""

    def __init__(self, registry: CollectorRegistry, listen: str, web: WebConfig | None = None,
                 version: str = ""):
        self.registry = registry
        self.web = web or WebConfig()
        self.version = version
        host, port = parse_listen(listen)
        if host:
            self._server = _Server((host, port), _Handler, self)
        else:
            # Every interface: IPv6 and IPv4 where the host has IPv6, else IPv4.
            try:
                self._server = _Server(("::", port), _Handler, self)
            except OSError as e:
                if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    raise
                self._server = _Server(("0.0.0.0", port), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.web.ssl_context is not None else "http"
        return f"{scheme}://{host}:{port}/metrics"

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever(), forever if it never ran
            self._server.shutdown()
        self._server.server_close()
