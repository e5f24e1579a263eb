"""Scale-out behind a real HAProxy: affinity, draining and failover, seen through each replica's /metrics.

Three real `lorad serve` processes on loopback (the tiny random Llama saved to disk, so they
start in seconds), HAProxy started by the test from the template in deploy/haproxy/, the real
lorad client in front. Which replica served a request is read from the per-replica counters
(`lorad_requests_total`), never assumed. A round-robin HAProxy in front of the same replicas is
the contrast that proves the affinity assertions can fail.

The tests share one cluster and run in file order: the drain test stops one replica, the
failover test then kills another.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lorad.clients import Client
from lorad.cluster import ClusterConfig, LocalCluster, MetricsSnapshot
from lorad.haproxy import BalancerConfig, HAProxyProcess, Replica, find_haproxy, free_port, render, wait_servers
from lorad.testing import write_random_adapter

pytestmark = pytest.mark.skipif(
    find_haproxy() is None, reason="haproxy is not installed (apt-get install haproxy; .ci/run installs it)")

ADAPTERS = [f"tenant-{i:02d}" for i in range(12)]


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory, tiny_base) -> Path:
    path = tmp_path_factory.mktemp("tiny-base")
    tiny_base.model.save_pretrained(path)
    tiny_base.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_base_dir, tiny_geometry):
    adapters = tmp_path_factory.mktemp("shared-adapters")
    for i, name in enumerate(ADAPTERS):
        write_random_adapter(adapters / name, tiny_geometry, rank=4, seed=i)
    config = ClusterConfig(
        replicas=3, port=0, adapters_dir=str(adapters), base=str(tiny_base_dir), kv_cache_memory="16MiB",
        max_seq_len=512, threads=1, drain_seconds=3.0, workdir=str(tmp_path_factory.mktemp("cluster")),
        serve_args=("--quant", "none", "--max-loras", "4", "--max-cpu-loras", "8", "--max-lora-rank", "8"))
    with LocalCluster(config) as local:
        yield local


@pytest.fixture(scope="module")
def round_robin(cluster):
    """A second HAProxy, round-robin, in front of the same replicas."""
    port = free_port()
    replicas = [Replica(r.name, f"127.0.0.1:{r.grpc_port}", r.metrics_port, id=i + 1)
                for i, r in enumerate(cluster.replicas)]
    config = BalancerConfig(bind=f"127.0.0.1:{port}", policy="roundrobin",
                            runtime_socket=str(cluster.workdir / "rr.sock"))
    proxy = HAProxyProcess(render(config, replicas), cluster.workdir / "round-robin")
    proxy.start("127.0.0.1", port)
    wait_servers(config.runtime_socket, [r.name for r in replicas], timeout=10)  # two passed checks
    yield f"127.0.0.1:{port}"
    proxy.stop()


def _requests_by_replica(cluster) -> dict[str, float]:
    return {r.name: MetricsSnapshot(r.metrics()).sum("lorad_requests_total") for r in cluster.replicas if r.alive}


def _served_by(cluster, send) -> dict[str, float]:
    """Run send() and return how many requests each replica finished meanwhile."""
    before = _requests_by_replica(cluster)
    send()
    after = _requests_by_replica(cluster)
    return {name: after[name] - before[name] for name in after if after[name] != before.get(name, 0.0)}


def test_affinity_sends_every_request_of_an_adapter_to_one_replica(cluster):
    owners: dict[str, str] = {}
    with Client(cluster.target, timeout=30) as client:
        for adapter in ADAPTERS:
            served = _served_by(cluster, lambda: [
                client.generate("Hello", adapter_id=adapter, max_new_tokens=2) for _ in range(3)])
            assert list(served.values()) == [3.0], f"{adapter}: {served}"
            owners[adapter] = next(iter(served))
    assert len(set(owners.values())) >= 2, owners  # the hash spreads tenants over replicas
    # each adapter was loaded into a device slot once, on its own replica, and never again
    device_loads = sum(MetricsSnapshot(r.metrics()).sum("lorad_adapter_loads_total", into="device")
                       for r in cluster.replicas)
    assert device_loads == len(ADAPTERS)
    # the replica that owns an adapter reports it resident (--metrics-adapter-ids)
    for replica in cluster.replicas:
        resident = {s["adapter_id"] for s in MetricsSnapshot(replica.metrics()).labels("lorad_adapter_resident")}
        assert resident == {a for a, owner in owners.items() if owner == replica.name}
    cluster.owners = owners


def test_round_robin_spreads_one_adapter_over_every_replica(cluster, round_robin):
    with Client(round_robin, timeout=30) as client:
        served = _served_by(cluster, lambda: [
            client.generate("Hello", adapter_id=ADAPTERS[0], max_new_tokens=2) for _ in range(3)])
    assert sorted(served.values()) == [1.0, 1.0, 1.0]


def _host_loads(replica) -> float:
    return MetricsSnapshot(replica.metrics()).sum("lorad_adapter_loads_total", into="host")


def test_replace_through_one_replica_is_served_by_the_next_request_on_another(cluster, tmp_path, tiny_geometry):
    """Replicas share the adapters folder. v1 is uploaded through the balancer and B holds it in
    memory; a replace published through A must answer B's very next request with v2 (B's admission stats the files: three stats, no
    re-read), and B reads the files again only once, for the new version."""
    a, b = cluster.replicas[0], cluster.replicas[1]
    v1 = write_random_adapter(tmp_path / "v1", tiny_geometry, rank=4, seed=101)
    v2 = write_random_adapter(tmp_path / "v2", tiny_geometry, rank=4, seed=202)
    ask = dict(prompt="Hello", adapter_id="replaced-tenant", max_new_tokens=8)
    with Client(f"127.0.0.1:{a.grpc_port}", timeout=30) as on_a, Client(f"127.0.0.1:{b.grpc_port}", timeout=30) as on_b:
        with Client(cluster.target, timeout=30) as balanced:  # an upload streams through HAProxy too
            first = balanced.upload_adapter(v1, "replaced-tenant")
        old = on_b.generate(**ask)
        assert old.adapter_version == first.adapter.digest
        loads = _host_loads(b)
        assert on_b.generate(**ask).token_ids == old.token_ids  # from B's memory: no read
        assert _host_loads(b) == loads

        second = on_a.upload_adapter(v2, "replaced-tenant", replace=True)
        assert second.replaced and second.previous_digest == first.adapter.digest != second.adapter.digest
        new = on_b.generate(**ask)
        assert new.adapter_version == second.adapter.digest
        reference = on_a.generate(**ask)  # the replica that published v2 answers with v2
        assert reference.adapter_version == second.adapter.digest
        assert reference.token_ids != old.token_ids  # the two versions answer differently...
        assert new.token_ids == reference.token_ids  # ...and B answers as v2
        for _ in range(3):
            assert on_b.generate(**ask).adapter_version == second.adapter.digest
        assert _host_loads(b) == loads + 1  # one read of v2; admissions after it only stat the files


def _owner(cluster, client, adapter) -> str:
    served = _served_by(cluster, lambda: [
        client.generate("Hello", adapter_id=adapter, max_new_tokens=2) for _ in range(2)])
    assert list(served.values()) == [2.0], f"{adapter}: {served}"
    return next(iter(served))


def _wait_running(replica, timeout=10.0) -> None:
    """Wait until the replica runs a request (so what follows hits it mid-request)."""
    deadline = time.time() + timeout
    while MetricsSnapshot(replica.metrics()).sum("lorad_requests_running") < 1:
        assert time.time() < deadline, f"{replica.name} never started the request"
        time.sleep(0.02)


def test_killed_replica_requests_keep_succeeding_and_only_its_adapters_move(cluster):
    owners = cluster.owners
    victim = next(r for r in cluster.replicas if r.name == owners[ADAPTERS[0]])
    results, errors = [], []
    with Client(cluster.target, timeout=60) as client:
        def long_generate():
            try:
                results.append(client.generate("Tell me a story", adapter_id=ADAPTERS[0], max_new_tokens=400))
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                errors.append(exc)

        worker = threading.Thread(target=long_generate)
        worker.start()
        _wait_running(victim)
        victim.kill()  # SIGKILL mid-request: no drain, its connections reset
        replies = [client.generate("Hello", adapter_id=adapter, max_new_tokens=2) for adapter in ADAPTERS * 2]
        worker.join(60)
        # HAProxy re-sent the request the victim never answered to a survivor (retry-on empty-response)
        assert not errors, errors
        assert results[0].completion_tokens == 400
        assert all(r.completion_tokens == 2 for r in replies)
        wait_servers(cluster.runtime_socket, [victim.name], timeout=10, status="DOWN")  # out of the ring
        after = {adapter: _owner(cluster, client, adapter) for adapter in ADAPTERS}
    for adapter, owner in owners.items():
        if owner == victim.name:
            assert after[adapter] != victim.name
        else:  # consistent hashing: adapters of the survivors stay where they were
            assert after[adapter] == owner, adapter
    cluster.owners = after


def test_draining_replica_finishes_its_streams_and_traffic_moves(cluster):
    alive = [r for r in cluster.replicas if r.alive]
    assert len(alive) == 2
    adapter = next(a for a in ADAPTERS if cluster.owners[a] == alive[0].name)
    victim, survivor = alive
    streamed, errors = [], []
    with Client(cluster.target, timeout=60) as client:
        def long_stream():
            try:
                streamed.extend(client.stream("Tell me a story", adapter_id=adapter, max_new_tokens=400))
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                errors.append(exc)

        reader = threading.Thread(target=long_stream)
        reader.start()
        _wait_running(victim)
        victim.terminate()  # SIGTERM: /ready 503 at once, serves 3 s more, then refuses; in-flight finishes
        replies = []
        for _ in range(20):  # traffic for the victim's adapter during and after the drain
            replies.append(client.generate("Hello", adapter_id=adapter, max_new_tokens=2))
            time.sleep(0.2)
        reader.join(60)
        assert victim.wait(30) == 0
        served = _served_by(cluster, lambda: client.generate("Hello", adapter_id=adapter, max_new_tokens=2))
    assert not errors, errors
    assert streamed[-1].finish_reason == "length" and streamed[-1].completion_tokens == 400
    assert all(r.completion_tokens == 2 for r in replies)
    assert served == {survivor.name: 1.0}


def test_cluster_up_cli_prints_the_address_serves_and_stops_on_ctrl_c(tmp_path, tiny_base_dir):
    """`lorad cluster up` as a user runs it (one replica to keep it quick), stopped with SIGINT."""
    import signal
    import subprocess
    import sys

    lorad = str(Path(sys.executable).with_name("lorad"))
    proc = subprocess.Popen(
        [lorad, "cluster", "up", "--replicas", "1", "--port", "0", "--base", str(tiny_base_dir),
         "--kv-cache-memory", "16MiB", "--max-seq-len", "256", "--workdir", str(tmp_path), "--", "--quant", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops the cluster" in line:
                break
        address = next(line.split()[1] for line in lines if line.strip().startswith("address"))
        with Client(address, timeout=30) as client:
            assert client.generate("Hello", max_new_tokens=3).completion_tokens == 3
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "stopped" in rest
    assert "stopped" in (tmp_path / "r0.log").read_text()  # the replica drained and exited itself
    assert "Proxy lorad stopped" in (tmp_path / "haproxy.log").read_text()
