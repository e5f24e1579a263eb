"""`lorad cluster`: N lorad replicas on this machine behind HAProxy, with adapter affinity.

    lorad cluster up --replicas 3 --adapters ./adapters     # prints the address; Ctrl-C stops it
    lorad cluster config --server 10.0.0.5:50051:9400 ...   # an HAProxy config for your own hosts

`up` is the scale-out topology of deploy/kubernetes/ on one machine: each replica is a real
`lorad serve` process on loopback (ports chosen by the OS, a small KV budget, torch threads
split between replicas), HAProxy (lorad.haproxy) in front. Replicas run in their own sessions,
so Ctrl-C reaches only this supervisor, which drains the replicas (each finishes its in-flight
requests) and then stops HAProxy.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import click

from lorad.errors import ConfigError, LoradError
from lorad.haproxy import (POLICIES, BalancerConfig, HAProxyProcess, Replica, die_with_parent, free_port, render,
                           require_haproxy, wait_servers)

_GRPC_PORT = re.compile(r"gRPC listening on \S+:(\d+)")
_METRICS_PORT = re.compile(r"Prometheus metrics on http://\S+:(\d+)/metrics")
_HTTP_PORT = re.compile(r"HTTP API on https?://\S+:(\d+)/v1")


@dataclass
class ClusterConfig:
    """A local cluster. threads: torch threads per replica (None = cores / replicas, at least 1)."""

    replicas: int = 3
    host: str = "127.0.0.1"
    port: int = 50050  # the balancer's gRPC port; 0 = any free port
    policy: str = "affinity"
    balance_factor: int = 150
    adapters_dir: str | None = None
    base: str | None = None  # None = lorad serve's default (the embedded SmolLM2)
    kv_cache_memory: str = "256MiB"
    max_seq_len: int = 1024
    threads: int | None = None
    drain_seconds: float = 3.0  # > check interval (1 s) x fall (2): HAProxy sees /ready fail first
    workdir: str | None = None  # logs and haproxy.cfg; None = a new temporary folder
    stats_port: int | None = None  # HAProxy's stats page and Prometheus exporter
    serve_args: tuple[str, ...] = ()  # more `lorad serve` options for every replica
    http_port: int | None = None  # the balancer's OpenAI-API port (replicas serve --http-port); None = off

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 64:
            raise ConfigError(f"replicas: {self.replicas} is outside 1-64")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} is outside 0-65535")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port: {self.http_port} is outside 0-65535")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads: must be at least 1")
        if self.adapters_dir is not None and not os.path.isdir(self.adapters_dir):
            raise ConfigError(f"adapters_dir: {self.adapters_dir} is not a folder")
        BalancerConfig(policy=self.policy, balance_factor=self.balance_factor)  # validates both


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


class ReplicaProcess:
    """One `lorad serve` child: its ports come from its log, its readiness from /ready."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None  # its OpenAI API, when started with --http-port

    def start(self) -> "ReplicaProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True, preexec_fn=die_with_parent)
        return self

    def wait_bound(self, timeout: float) -> None:
        """Wait until the replica has bound its gRPC and metrics ports (before its base is loaded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            grpc_m, metrics_m = _GRPC_PORT.search(text), _METRICS_PORT.search(text)
            if grpc_m and metrics_m:  # the HTTP API binds between the two
                self.grpc_port, self.metrics_port = int(grpc_m.group(1)), int(metrics_m.group(1))
                http_m = _HTTP_PORT.search(text)
                self.http_port = int(http_m.group(1)) if http_m else None
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise LoradError(f"replica {self.name} did not start (log {self.log_path}):\n"
                         f"{self.log_path.read_text(errors='replace')[-3000:]}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def probe(self, path: str = "/ready") -> int:
        """HTTP status of /ready or /health (0 when the replica does not answer)."""
        try:
            return http_get(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2)[0]
        except OSError:
            return 0

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)[1]

    def terminate(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: the replica dies as a crashed machine would, without draining."""
        if self.alive:
            self.proc.kill()
            self.proc.wait()


class LocalCluster:
    """Replicas + HAProxy as child processes. `with LocalCluster(cfg) as c: Client(c.target)`."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self.workdir = Path(config.workdir or tempfile.mkdtemp(prefix="lorad-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = config.port or free_port(config.host)
        self.http_port = None if config.http_port is None else (config.http_port or free_port(config.host))
        self.replicas: list[ReplicaProcess] = []
        self.balancer: HAProxyProcess | None = None

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.port}"

    def _replica_argv(self) -> list[str]:
        cfg = self.config
        lorad = str(Path(sys.executable).with_name("lorad"))
        argv = [lorad, "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                "--kv-cache-memory", cfg.kv_cache_memory, "--max-seq-len", str(cfg.max_seq_len),
                "--drain-seconds", str(cfg.drain_seconds), "--metrics-adapter-ids"]
        if cfg.http_port is not None:
            argv += ["--http-port", "0"]
        if cfg.adapters_dir:
            argv += ["--adapters", cfg.adapters_dir]
        if cfg.base:
            argv += ["--base", cfg.base]
        return argv + list(cfg.serve_args)

    def _replica_env(self) -> dict[str, str]:
        threads = self.config.threads or max(1, (os.cpu_count() or 1) // self.config.replicas)
        # more OpenMP threads than cores makes libgomp sleep between every parallel op
        return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false"}

    def start(self, timeout: float = 600.0) -> "LocalCluster":
        cfg = self.config
        require_haproxy()  # before starting replicas that would have nothing in front of them
        argv, env = self._replica_argv(), self._replica_env()
        try:
            for i in range(cfg.replicas):
                replica = ReplicaProcess(f"r{i}", argv, self.workdir / f"r{i}.log", env)
                self.replicas.append(replica.start())
            for replica in self.replicas:
                replica.wait_bound(timeout)
            balancer = BalancerConfig(
                bind=f"{cfg.host}:{self.port}", policy=cfg.policy, balance_factor=cfg.balance_factor,
                runtime_socket=str(self.runtime_socket),
                stats_bind=f"127.0.0.1:{cfg.stats_port}" if cfg.stats_port else None,
                http_bind=f"{cfg.host}:{self.http_port}" if self.http_port else None)
            servers = [Replica(r.name, f"127.0.0.1:{r.grpc_port}", r.metrics_port, id=i + 1,
                               http_address=f"127.0.0.1:{r.http_port}" if r.http_port else "")
                       for i, r in enumerate(self.replicas)]
            self.balancer = HAProxyProcess(render(balancer, servers), self.workdir)
            self.balancer.start(cfg.host, self.port)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def runtime_socket(self) -> Path:
        return self.workdir / "haproxy.sock"

    def wait_ready(self, timeout: float) -> None:
        """Wait until every replica's /ready says 200 and HAProxy's checks have put it in."""
        deadline = time.monotonic() + timeout
        pending = list(self.replicas)
        while pending and time.monotonic() < deadline:
            dead = [r for r in pending if not r.alive]
            if dead:
                raise LoradError(f"replica {dead[0].name} exited while starting (log {dead[0].log_path}):\n"
                                 f"{dead[0].log_path.read_text(errors='replace')[-3000:]}")
            pending = [r for r in pending if r.probe("/ready") != 200]
            time.sleep(0.2)
        if pending:
            raise LoradError(f"replicas {', '.join(r.name for r in pending)} not ready after {timeout:.0f} s "
                             f"(logs in {self.workdir})")
        wait_servers(self.runtime_socket, [r.name for r in self.replicas], max(10.0, deadline - time.monotonic()))
        if self.http_port:
            wait_servers(self.runtime_socket, [r.name for r in self.replicas], max(10.0, deadline - time.monotonic()),
                         backend="lorad_http")

    def stop(self, timeout: float = 60.0) -> None:
        """Drain every replica (SIGTERM: finish in-flight requests), then stop HAProxy."""
        for replica in self.replicas:
            replica.terminate()
        for replica in self.replicas:
            if replica.proc is not None:
                replica.wait(timeout)
        if self.balancer is not None:
            self.balancer.stop()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the CLI ----------------------------------------------------------------------------------

_C = ClusterConfig.__dataclass_fields__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cluster() -> None:
    """Run lorad replicas behind HAProxy with adapter affinity (x-lorad-adapter)."""


@cluster.command("up", context_settings={"ignore_unknown_options": True})
@click.option("--replicas", type=int, default=_C["replicas"].default, show_default=True)
@click.option("--host", default=_C["host"].default, show_default=True, help="Address HAProxy listens on.")
@click.option("--port", type=int, default=_C["port"].default, show_default=True,
              help="HAProxy's gRPC port, the cluster's address (0 = any free port).")
@click.option("--policy", type=click.Choice(POLICIES), default=_C["policy"].default, show_default=True,
              help="affinity: consistent hashing on x-lorad-adapter with bounded load; roundrobin: the baseline.")
@click.option("--balance-factor", type=int, default=_C["balance_factor"].default, show_default=True,
              help="No replica takes more than this percent of the mean concurrent requests.")
@click.option("--adapters", "adapters_dir", type=click.Path(file_okay=False), default=None,
              help="Adapters folder every replica serves (shared, as a volume would be).")
@click.option("--base", default=None, help="lorad serve --base for every replica [default: the embedded SmolLM2].")
@click.option("--kv-cache-memory", default=_C["kv_cache_memory"].default, show_default=True,
              help="KV cache per replica.")
@click.option("--max-seq-len", type=int, default=_C["max_seq_len"].default, show_default=True)
@click.option("--threads", type=int, default=None, help="Torch threads per replica [default: cores / replicas].")
@click.option("--drain-seconds", type=float, default=_C["drain_seconds"].default, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Folder for replica logs and haproxy.cfg [default: a new temporary folder].")
@click.option("--stats-port", type=int, default=None, help="Serve HAProxy's stats page (and /metrics) here.")
@click.option("--http-port", type=int, default=None,
              help="Also balance the replicas' OpenAI-compatible HTTP API on this port (0 = any free port), "
                   "with the same affinity, keyed on x-lorad-adapter or the body's \"model\" [default: off].")
@click.argument("serve_args", nargs=-1, type=click.UNPROCESSED)
def up(replicas, host, port, policy, balance_factor, adapters_dir, base, kv_cache_memory, max_seq_len, threads,
       drain_seconds, workdir, stats_port, http_port, serve_args):
    """Start REPLICAS `lorad serve` processes on loopback and HAProxy in front; Ctrl-C stops them.

    Options after `--` go to every `lorad serve` (e.g. `-- --max-loras 4`).

    \b
    Example:
      lorad cluster up --replicas 3 --adapters ./adapters
      lorad generate --target 127.0.0.1:50050 --adapter demo-a "Hello"
    """
    try:
        config = ClusterConfig(replicas=replicas, host=host, port=port, policy=policy,
                               balance_factor=balance_factor, adapters_dir=adapters_dir, base=base,
                               kv_cache_memory=kv_cache_memory, max_seq_len=max_seq_len, threads=threads,
                               drain_seconds=drain_seconds, workdir=workdir, stats_port=stats_port,
                               serve_args=tuple(serve_args), http_port=http_port)
        local = LocalCluster(config)
        stopping = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        click.echo(f"starting {replicas} replicas and HAProxy (logs in {local.workdir}) ...", err=True)
        local.start()
    except LoradError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    _print_cluster(local)
    down: set[str] = set()
    try:
        while not stopping.wait(1.0):
            for r in local.replicas:
                if not r.alive and r.name not in down:
                    down.add(r.name)
                    click.echo(f"replica {r.name} exited (code {r.proc.returncode}); HAProxy routes around it. "
                               f"Log: {r.log_path}", err=True)
    finally:
        click.echo("stopping: draining replicas, then HAProxy ...", err=True)
        local.stop()
        click.echo("stopped", err=True)


def _print_cluster(local: LocalCluster) -> None:
    cfg = local.config
    how = (f"affinity on x-lorad-adapter, balance factor {cfg.balance_factor}%" if cfg.policy == "affinity"
           else "round-robin")
    click.echo(f"lorad cluster: {cfg.replicas} replicas behind HAProxy ({how})")
    click.echo(f"  address   {local.target}    e.g. lorad generate --target {local.target} --adapter ID \"Hi\"")
    if local.http_port:
        click.echo(f"  openai    http://{cfg.host}:{local.http_port}/v1    (model = an adapter id or the base)")
    for r in local.replicas:
        click.echo(f"  {r.name:<9} grpc 127.0.0.1:{r.grpc_port}  metrics http://127.0.0.1:{r.metrics_port}/metrics")
    if cfg.stats_port:
        click.echo(f"  haproxy   http://127.0.0.1:{cfg.stats_port}/ (stats), /metrics")
    click.echo(f"  logs      {local.workdir}")
    click.echo("Ctrl-C stops the cluster.")
    sys.stdout.flush()


@cluster.command("config")
@click.option("--server", "servers", multiple=True, metavar="HOST:GRPC_PORT:METRICS_PORT[:HTTP_PORT]",
              help="A replica (repeat for each); ids follow the order given, keep it stable. HTTP_PORT: its "
                   "--http-port, needed with --http-bind.")
@click.option("--bind", default="127.0.0.1:50050", show_default=True, help="Where HAProxy listens for gRPC.")
@click.option("--policy", type=click.Choice(POLICIES), default=_C["policy"].default, show_default=True)
@click.option("--balance-factor", type=int, default=_C["balance_factor"].default, show_default=True)
@click.option("--stats-bind", default=None, help="HAProxy stats page and /metrics, e.g. 127.0.0.1:8404.")
@click.option("--http-bind", default=None, help="Also balance the OpenAI HTTP API here, e.g. 127.0.0.1:8000.")
@click.option("--kubernetes", "kube_replicas", type=click.IntRange(1, 64), default=None, metavar="MAX_REPLICAS",
              help="Print the config of deploy/kubernetes/haproxy.yaml instead: StatefulSet pods lorad-0 .. "
                   "lorad-<MAX_REPLICAS - 1> by DNS name.")
def config(servers, bind, policy, balance_factor, stats_bind, http_bind, kube_replicas):
    """Print an HAProxy configuration for lorad replicas running elsewhere."""
    from lorad.haproxy import kubernetes_config

    if kube_replicas is not None:
        click.echo(kubernetes_config(kube_replicas), nl=False)
        return
    if not servers:
        raise click.UsageError("give --server HOST:GRPC_PORT:METRICS_PORT for each replica, or --kubernetes N")
    replicas = []
    for i, spec in enumerate(servers):
        m = re.fullmatch(r"(.+?):(\d+):(\d+)(?::(\d+))?", spec)
        if m is None:
            raise click.BadParameter(f"{spec!r} is not HOST:GRPC_PORT:METRICS_PORT[:HTTP_PORT]", param_hint="--server")
        host, grpc_port, metrics_port, http_port = m.groups()
        replicas.append(Replica(f"r{i}", f"{host}:{grpc_port}", int(metrics_port), id=i + 1,
                                http_address=f"{host}:{http_port}" if http_port else ""))
    try:
        click.echo(render(BalancerConfig(bind=bind, policy=policy, balance_factor=balance_factor,
                                         stats_bind=stats_bind, http_bind=http_bind), replicas), nl=False)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


class MetricsSnapshot:
    """One scrape of a replica's /metrics, parsed by prometheus_client: sum samples by name and labels."""

    def __init__(self, text: str):
        from prometheus_client.parser import text_string_to_metric_families

        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def sum(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def labels(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]
