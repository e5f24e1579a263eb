"""HAProxy in front of lorad replicas: render the config from deploy/haproxy/lorad.cfg.tmpl, check it, run it.

Why HAProxy and not a router of our own: it is a trusted, packaged balancer (Debian's `haproxy`,
2.6 here) that already has everything adapter affinity needs: gRPC over HTTP/2 on both sides,
`balance hdr(x-lorad-adapter)` with `hash-type consistent` (an adapter's requests go to one
replica; when a replica leaves, only its adapters move) and `hash-balance-factor` (consistent
hashing with bounded loads: no replica takes more than factor x the mean of concurrent
requests; a hot adapter spills to the next replica on the ring), HTTP health checks against
/ready, and L7 retries of requests a dead replica never answered. Of the other balancers
Debian packages, nginx (`hash ... consistent`) has no load bound and no active health checks in
its open-source build, and Caddy's header hashing has no load bound; Envoy (ring hash +
hash_balance_factor) would do, but is not packaged here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lorad.clients.channel import ROUTING_HEADER
from lorad.errors import ConfigError

POLICIES = ("affinity", "roundrobin")
TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "lorad.cfg.tmpl"

_BALANCE = {
    "affinity": (
        "    # one adapter -> one replica while it is up; a replica above {factor}% of the mean\n"
        "    # concurrent requests hands new ones to the next replica on the ring (bounded load).\n"
        "    # Requests without the header (the base alone) go round-robin.\n"
        "    balance hdr({header})\n"
        "    hash-type consistent\n"
        "    hash-balance-factor {factor}"
    ),
    "roundrobin": (
        "    # the baseline: every replica sees every adapter\n"
        "    balance roundrobin"
    ),
}

# The OpenAI-compatible HTTP API of the replicas (lorad serve --http-port), when they serve it.
# Its routing key is the client's x-lorad-adapter header, or else the JSON body's "model" field
# (HAProxy reads bodies up to tune.bufsize, 16 KiB; a longer one has no key and goes round-robin).
HTTP_ROUTE_HEADER = "x-lorad-route"
_HTTP = """
frontend lorad_http
    # the replicas' OpenAI-compatible API (lorad serve --http-port): adapter affinity as for
    # gRPC, keyed on the x-lorad-adapter header, or else on the JSON body's "model" field
    bind {bind}
    option http-buffer-request
    http-request set-var(txn.route) req.hdr({routing_header})
    http-request set-var(txn.route) req.body,json_query('$.model') unless {{ var(txn.route) -m found }}
    http-request set-header {route_header} %[var(txn.route)] if {{ var(txn.route) -m found }}
    default_backend lorad_http

backend lorad_http
{balance}
    # the same readiness check as the gRPC backend
    option httpchk
    http-check send meth GET uri /ready ver HTTP/1.1 hdr Host lorad
    http-check expect status 200
    default-server check inter {inter} fall {fall} rise {rise} weight 100
{servers}
"""

_STATS = """
frontend stats
    bind {bind}
    # /healthz: HAProxy itself is up (a probe for it); /metrics: its Prometheus exporter
    monitor-uri /healthz
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /
    stats refresh 5s
"""


@dataclass(frozen=True)
class Replica:
    """One lorad server as the balancer sees it."""

    name: str  # HAProxy server name, e.g. r0
    address: str  # gRPC host:port (may use HAProxy "${ENV}" syntax inside double quotes)
    probe_port: int  # the replica's metrics port, which serves /ready
    id: int  # stable server id: consistent hashing places servers on the ring by id
    options: str = ""  # more server-line options, e.g. "resolvers kube init-addr none"
    http_address: str = ""  # host:port of its HTTP API (--http-port); "" = none

    def line(self, address: str | None = None) -> str:
        extra = f" {self.options}" if self.options else ""
        return f"    server {self.name} {address or self.address} id {self.id} port {self.probe_port}{extra}"


@dataclass
class BalancerConfig:
    """How HAProxy balances. balance_factor: percent of the mean load a replica may carry (> 100)."""

    bind: str = "127.0.0.1:50050"
    policy: str = "affinity"
    balance_factor: int = 150
    check_interval: str = "1s"
    fall: int = 2  # failed checks before a replica is taken out
    rise: int = 2  # passed checks before it is put back
    runtime_socket: str = "/tmp/lorad-haproxy.sock"
    stats_bind: str | None = None  # HAProxy's own stats page and Prometheus exporter
    http_bind: str | None = None  # the HTTP API's frontend (replicas need an http_address)
    resolvers: str = ""  # a resolvers section, for replicas named by DNS (Kubernetes)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"policy: {self.policy!r} is not one of {', '.join(POLICIES)}")
        if not 100 < self.balance_factor <= 1000:
            raise ConfigError(f"balance_factor: {self.balance_factor} must be a percentage above 100 "
                              "(150 = no replica above 1.5x the mean load)")
        for name in ("fall", "rise"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")


def render(config: BalancerConfig, replicas: list[Replica], template: str | Path | None = None) -> str:
    """The HAProxy configuration text for these replicas."""
    if not replicas:
        raise ConfigError("replicas: at least one replica is needed")
    if len({r.id for r in replicas}) != len(replicas) or len({r.name for r in replicas}) != len(replicas):
        raise ConfigError("replicas: names and ids must be unique")
    if config.http_bind and not all(r.http_address for r in replicas):
        raise ConfigError("http_bind: every replica needs the address of its HTTP API (lorad serve --http-port)")
    path = Path(template) if template is not None else TEMPLATE
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"HAProxy template {path} cannot be read ({exc}); it ships in the lorad repository's "
                          "deploy/haproxy/ folder") from exc
    fields = {
        "RUNTIME_SOCKET": config.runtime_socket,
        "RESOLVERS": config.resolvers.rstrip("\n"),
        "BIND": config.bind,
        "BALANCE": _BALANCE[config.policy].format(factor=config.balance_factor, header=ROUTING_HEADER),
        "CHECK_INTERVAL": config.check_interval,
        "FALL": str(config.fall),
        "RISE": str(config.rise),
        "SERVERS": "\n".join(r.line() for r in replicas),
        "STATS": _STATS.format(bind=config.stats_bind) if config.stats_bind else "",
        "HTTP": _HTTP.format(
            bind=config.http_bind, routing_header=ROUTING_HEADER, route_header=HTTP_ROUTE_HEADER,
            balance=_BALANCE[config.policy].format(factor=config.balance_factor, header=HTTP_ROUTE_HEADER),
            inter=config.check_interval, fall=config.fall, rise=config.rise,
            servers="\n".join(r.line(r.http_address) for r in replicas)) if config.http_bind else "",
    }
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    return text.rstrip("\n") + "\n"


def find_haproxy() -> str | None:
    """The haproxy binary (Debian puts it in /usr/sbin, which a user's PATH may lack)."""
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None)


def require_haproxy() -> str:
    binary = find_haproxy()
    if binary is None:
        raise ConfigError("haproxy is not installed (Debian/Ubuntu: apt-get install haproxy; 2.6 or newer)")
    return binary


def check_config(path: str | Path) -> None:
    """`haproxy -c`: raises ConfigError with HAProxy's own message when the file is invalid."""
    result = subprocess.run([require_haproxy(), "-c", "-f", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"HAProxy refused {path}:\n{(result.stdout + result.stderr).strip()}")


def die_with_parent() -> None:
    """preexec_fn for child processes: SIGTERM when the parent dies without stopping them
    (Linux prctl PR_SET_PDEATHSIG; a no-op elsewhere). Start children from a thread that
    outlives them: the signal follows the thread that forked."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (HAProxy cannot bind port 0 and report it back)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class HAProxyProcess:
    """HAProxy in the foreground (-db) as a child process, with its log in `log_path`."""

    def __init__(self, config_text: str, workdir: str | Path):
        self.workdir = Path(workdir)
        self.config_path = self.workdir / "haproxy.cfg"
        self.log_path = self.workdir / "haproxy.log"
        self.config_text = config_text
        self.proc: subprocess.Popen | None = None

    def start(self, host: str, port: int, timeout: float = 10.0) -> "HAProxyProcess":
        """Check the config, start HAProxy in its own session (a terminal's Ctrl-C reaches only the
        parent, which stops it in order), and wait until it listens on host:port."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text)
        check_config(self.config_path)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([require_haproxy(), "-db", "-f", str(self.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=die_with_parent)
        if not wait_for_port(host, port, timeout, self.proc):
            self.stop()
            raise ConfigError(f"HAProxy did not listen on {host}:{port}:\n{self.log_path.read_text()[-2000:]}")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Soft stop (SIGUSR1: stop listening, let open connections finish), then a hard one."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGUSR1)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- Kubernetes ---------------------------------------------------------------------------------

KUBE_RESOLVERS = """resolvers kube
    # the cluster DNS from the pod's resolv.conf; pod names re-resolve when a pod is rescheduled
    parse-resolv-conf
    hold valid 10s
"""


def kubernetes_config(max_replicas: int = 8, statefulset: str = "lorad", service: str = "lorad-replicas",
                      grpc_port: int = 50051, metrics_port: int = 9400, http_port: int | None = 8000) -> str:
    """The HAProxy config of deploy/kubernetes/haproxy.yaml: one server line per StatefulSet pod name.

    Pods have stable names (lorad-0, lorad-1, ...) and so stable ids on the hash ring: every
    HAProxy replica maps an adapter to the same pod, and a restarted pod gets its adapters back.
    Servers for pods that do not exist (the StatefulSet has fewer than max_replicas) fail to
    resolve and stay out of the ring until it is scaled up; only their share of adapters moves.
    The namespace comes from the POD_NAMESPACE environment variable (the downward API).
    http_port: the pods' OpenAI HTTP API (lorad serve --http-port), balanced on the same port of
    HAProxy with the same affinity (None: gRPC only).
    """
    def pod(i: int, port: int) -> str:
        return f'"{statefulset}-{i}.{service}.${{POD_NAMESPACE}}.svc.cluster.local:{port}"'

    replicas = [
        Replica(f"{statefulset}-{i}", pod(i, grpc_port), metrics_port, id=i + 1,
                options="resolvers kube init-addr none", http_address=pod(i, http_port) if http_port else "")
        for i in range(max_replicas)
    ]
    config = BalancerConfig(bind=f":{grpc_port}", runtime_socket="/tmp/haproxy.sock", stats_bind=":8404",
                            resolvers=KUBE_RESOLVERS, http_bind=f":{http_port}" if http_port else None)
    return render(config, replicas)


def show_stat(runtime_socket: str | Path, backend: str = "lorad") -> dict[str, dict[str, str]]:
    """The servers of a backend from HAProxy's runtime API (`show stat`): name -> CSV row
    (status "UP" / "DOWN" / "MAINT" ..., scur = current requests, ...)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        s.connect(str(runtime_socket))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = (dict(zip(header, line.split(","))) for line in lines[1:] if line)
    return {row["svname"]: row for row in rows
            if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND")}


def server_sessions(runtime_socket: str | Path, backend: str = "lorad") -> dict[str, int]:
    """Current requests per server of a backend."""
    return {name: int(row["scur"] or 0) for name, row in show_stat(runtime_socket, backend).items()}


def wait_servers(runtime_socket: str | Path, names: list[str], timeout: float, status: str = "UP",
                 backend: str = "lorad") -> None:
    """Wait until HAProxy's checks report every named server UP (in the ring) or DOWN (out of it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            states = {name: row["status"] for name, row in show_stat(runtime_socket, backend).items()}
        except OSError:
            states = {}
        if all(states.get(n, "").split(" ")[0] == status for n in names):
            return
        if time.monotonic() > deadline:
            raise ConfigError(f"HAProxy did not report {', '.join(names)} {status} within {timeout:.0f} s: {states}")
        time.sleep(0.1)
