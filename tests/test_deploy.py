"""The deployment files are valid and describe the topology the code runs.

* HAProxy configs (local template, both policies; the Kubernetes ConfigMap) pass `haproxy -c`,
  and the ConfigMap is exactly what `lorad cluster config --kubernetes 8` renders, with its gRPC
  and its OpenAI HTTP frontends on the ports the manifests expose.
* Kubernetes manifests validate offline against the API schemas (kubernetes-validate, strict:
  unknown fields are errors), and agree with the HAProxy config and the server's probes.
* The Grafana dashboard only queries metrics lorad (or HAProxy) really exports.

Not exercised here: a real cluster, GPU scheduling, the images, the volumes, Grafana itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lorad.cli import main
from lorad.haproxy import BalancerConfig, Replica, check_config, find_haproxy, kubernetes_config, render
from lorad.server.metrics import Metrics
from lorad.server.readiness import PROBE_PATHS
from lorad.server.residency import AdapterResidency

KUBE = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.31"
needs_haproxy = pytest.mark.skipif(find_haproxy() is None, reason="haproxy is not installed (apt-get install haproxy)")


def _documents() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


@needs_haproxy
@pytest.mark.parametrize("policy", ["affinity", "roundrobin"])
def test_local_haproxy_configs_are_valid(tmp_path, policy):
    replicas = [Replica(f"r{i}", f"127.0.0.1:{50061 + i}", 9401 + i, id=i + 1) for i in range(3)]
    text = render(BalancerConfig(policy=policy, stats_bind="127.0.0.1:8404"), replicas)
    (tmp_path / "haproxy.cfg").write_text(text)
    check_config(tmp_path / "haproxy.cfg")
    if policy == "affinity":
        assert "balance hdr(x-lorad-adapter)\n    hash-type consistent\n    hash-balance-factor 150" in text
    else:
        assert "balance roundrobin" in text and "hash-type" not in text


@needs_haproxy
def test_an_invalid_haproxy_config_is_refused_with_haproxys_message(tmp_path):
    from lorad.errors import ConfigError

    (tmp_path / "bad.cfg").write_text("backend b\n    balance no-such-algorithm\n")
    with pytest.raises(ConfigError, match=r"bad.cfg:2\] : balance only supports"):
        check_config(tmp_path / "bad.cfg")


def test_kubernetes_haproxy_config_is_generated_from_the_template():
    cfg = _documents()[("ConfigMap", "lorad-haproxy")]["data"]["haproxy.cfg"]
    assert cfg == kubernetes_config(8), "regenerate deploy/kubernetes/haproxy.yaml: lorad cluster config --kubernetes 8"
    result = CliRunner().invoke(main, ["cluster", "config", "--kubernetes", "8"])
    assert result.exit_code == 0 and result.output == cfg


@needs_haproxy
def test_kubernetes_haproxy_config_is_valid(tmp_path):
    (tmp_path / "haproxy.cfg").write_text(kubernetes_config(8))
    env = {**os.environ, "POD_NAMESPACE": "lorad"}
    result = subprocess.run([find_haproxy(), "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_validate_against_the_api_schemas():
    import kubernetes_validate

    docs = _documents()
    assert {kind for kind, _ in docs} >= {"StatefulSet", "Service", "Deployment", "ConfigMap",
                                          "PersistentVolumeClaim", "PodDisruptionBudget"}
    for (kind, name), doc in docs.items():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises with the field path


def test_a_broken_manifest_fails_validation():
    import kubernetes_validate

    doc = json.loads(json.dumps(_documents()[("StatefulSet", "lorad")]))
    doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_the_dashboard():
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    manifests = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    [generator] = kustomization["configMapGenerator"]
    dashboard_file = generator["files"][0].split("=")[1]
    assert (KUBE / dashboard_file).is_file()


def _sections(haproxy_cfg: str) -> dict[str, str]:
    """'frontend NAME' / 'backend NAME' / ... -> the section's indented lines."""
    sections, name = {}, None
    for line in haproxy_cfg.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            name = line.strip()
            sections[name] = ""
        elif name is not None:
            sections[name] += line + "\n"
    return sections


def _servers(backend: str) -> list[tuple[str, str, str, str]]:
    """(name, pod host, traffic port, probe port) of each server line of a Kubernetes backend."""
    return re.findall(r'server (\S+) "(\S+)\.\$\{POD_NAMESPACE\}\.svc\.cluster\.local:(\d+)" id \d+ port (\d+)',
                      backend)


def _args(container) -> dict[str, str]:
    return dict(a.lstrip("-").partition("=")[::2] for a in container["args"])


def test_manifests_describe_the_topology_haproxy_expects():
    docs = _documents()
    sts = docs[("StatefulSet", "lorad")]
    headless = docs[("Service", sts["spec"]["serviceName"])]
    pod = sts["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    haproxy_cfg = docs[("ConfigMap", "lorad-haproxy")]["data"]["haproxy.cfg"]
    servers = _servers(_sections(haproxy_cfg)["backend lorad"])
    # HAProxy lists every pod the StatefulSet can have, by the headless Service's DNS names and ports
    assert sts["spec"]["replicas"] <= len(servers)
    for i, (name, host, grpc_port, probe_port) in enumerate(servers):
        assert name == f"{sts['metadata']['name']}-{i}" and host == f"{name}.{headless['metadata']['name']}"
        assert (int(grpc_port), int(probe_port)) == (ports["grpc"], ports["metrics"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    # probes hit the server's readiness endpoints on its metrics port
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    assert {"/ready", "/health"} <= set(PROBE_PATHS)
    assert "GET uri /ready" in haproxy_cfg
    # the pod is not killed before draining and in-flight requests are done
    args = _args(container)
    assert pod["terminationGracePeriodSeconds"] > float(args["drain-seconds"]) + float(args["grace"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # one adapters folder for all replicas, writable: an upload through any of them publishes there
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/adapters"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = docs[("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly")
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == ports["metrics"]
    # HAProxy's pods know their namespace, which its server names use
    [proxy] = docs[("Deployment", "lorad-haproxy")]["spec"]["template"]["spec"]["containers"]
    assert any(e["name"] == "POD_NAMESPACE" for e in proxy["env"])


def test_manifests_expose_the_http_api_behind_haproxy_with_adapter_affinity():
    docs = _documents()
    sts = docs[("StatefulSet", "lorad")]
    [container] = sts["spec"]["template"]["spec"]["containers"]
    pod_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # every pod serves the OpenAI API on the port its container and the headless Service name
    assert int(_args(container)["http-port"]) == pod_ports["http"]
    headless = {p["name"]: p for p in docs[("Service", sts["spec"]["serviceName"])]["spec"]["ports"]}
    assert headless["http"]["port"] == pod_ports["http"] and headless["http"]["targetPort"] == "http"

    sections = _sections(docs[("ConfigMap", "lorad-haproxy")]["data"]["haproxy.cfg"])
    frontend, backend = sections["frontend lorad_http"], sections["backend lorad_http"]
    # keyed on the client's x-lorad-adapter header, or else on the OpenAI body's model
    assert "http-request set-var(txn.route) req.hdr(x-lorad-adapter)" in frontend
    assert "req.body,json_query('$.model') unless { var(txn.route) -m found }" in frontend
    assert "option http-buffer-request" in frontend
    assert "balance hdr(x-lorad-route)\n    hash-type consistent\n    hash-balance-factor 150" in backend
    assert "uri /ready" in backend
    # the same pods, names and ids (so the same hash ring) as gRPC, on their HTTP port
    grpc_servers, http_servers = _servers(sections["backend lorad"]), _servers(backend)
    assert len(http_servers) == len(grpc_servers) >= sts["spec"]["replicas"]
    grpc_ids = re.findall(r"server (\S+) \S+ id (\d+)", sections["backend lorad"])
    assert re.findall(r"server (\S+) \S+ id (\d+)", backend) == grpc_ids
    for (name, host, port, probe), (g_name, g_host, _, g_probe) in zip(http_servers, grpc_servers):
        assert (name, host, probe) == (g_name, g_host, g_probe) and int(port) == pod_ports["http"]
    # HAProxy listens on the port its container and the client-facing Service expose
    [bind] = re.findall(r"bind :(\d+)", frontend)
    [proxy] = docs[("Deployment", "lorad-haproxy")]["spec"]["template"]["spec"]["containers"]
    proxy_ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert proxy_ports["http"] == int(bind)
    public = {p["name"]: p for p in docs[("Service", "lorad")]["spec"]["ports"]}
    assert public["http"]["targetPort"] == "http"


def _exported_metric_names() -> set[str]:
    metrics = Metrics()
    metrics.watch_adapters(lambda: AdapterResidency(device=("a",), host=("a",), max_loras=1), with_ids=True)
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ())
        names.update(family.name + s for s in suffixes)
    return names


def test_dashboard_queries_only_metrics_that_exist():
    dashboard = json.loads((KUBE / "lorad-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b(lorad_[a-z_]+)\b", e)}
    missing = used - _exported_metric_names()
    assert not missing, f"the dashboard queries metrics lorad does not export: {sorted(missing)}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("time to first token", "latency", "tokens / s", "waiting", "memory", "adapters resident",
                  "loads per request"):
        assert topic in titles, topic
    assert {"haproxy_server_current_sessions"} <= {m for e in exprs for m in re.findall(r"\b(haproxy_[a-z_]+)\b", e)}


def test_cluster_config_cli_renders_servers_and_refuses_bad_ones():
    runner = CliRunner()
    ok = runner.invoke(main, ["cluster", "config", "--server", "10.0.0.5:50051:9400", "--server", "10.0.0.6:50051:9400"])
    assert ok.exit_code == 0
    assert "server r0 10.0.0.5:50051 id 1 port 9400" in ok.output and "server r1 10.0.0.6:50051 id 2" in ok.output
    bad = runner.invoke(main, ["cluster", "config", "--server", "10.0.0.5:50051"])
    assert bad.exit_code != 0 and "HOST:GRPC_PORT:METRICS_PORT" in bad.output
    none = runner.invoke(main, ["cluster", "config"])
    assert none.exit_code != 0 and "--server" in none.output


@pytest.mark.skipif(__import__("shutil").which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_whole_deployment():
    import kubernetes_validate

    out = subprocess.run(["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert all(d["metadata"].get("namespace", "lorad") == "lorad" for d in built)
    assert any(d["kind"] == "ConfigMap" and d["metadata"]["name"] == "lorad-grafana-dashboard" for d in built)
    for doc in built:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
