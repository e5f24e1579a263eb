"""Adapter residency for dashboards and adapter-aware routers, read from the snapshot the adapter
manager publishes (lorad.server.residency).

Always (no adapter ids):
    lorad_adapters_resident{tier="device"|"host"}   how many adapters each tier holds
    lorad_adapters_pinned                           adapters pinned to a device slot
    lorad_adapter_bytes{tier="device"|"host"}       memory they take: host copies, device slots in
                                                    use (retired versions still running included)

Only with `lorad serve --metrics-adapter-ids` (adapter ids become label values: one series per
resident adapter, and ids may be confidential):
    lorad_lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}
        the shape of vLLM's `vllm:lora_requests_info`: comma-separated adapter ids of running and
        queued requests, max_lora = device slots, value = the Unix time of the snapshot. Routers
        that read vLLM's gauge (the Gateway API Inference Extension endpoint picker) can be
        pointed at this name.
    lorad_adapter_resident{adapter_id, tier="device"|"host"} = 1
        what is *resident*, not only what is running: the signal an affinity router needs once
        traffic is low and "running" is empty.

A collector (evaluated at scrape time) rather than gauges with labels: series of adapters that
left a tier disappear with the snapshot, nothing has to remember to remove them.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client.core import GaugeMetricFamily

from lorad.server.residency import AdapterResidency


class AdapterResidencyCollector:
    def __init__(self, snapshot: Callable[[], AdapterResidency | None], with_ids: bool):
        self.snapshot = snapshot
        self.with_ids = with_ids

    def describe(self):
        return []  # families are produced at scrape time; nothing to check at registration

    def collect(self):
        r = self.snapshot()
        if r is None:  # the base is still loading
            return
        counts = GaugeMetricFamily("lorad_adapters_resident", "Adapters held per tier (device slots, host cache).",
                                   labels=["tier"])
        counts.add_metric(["device"], len(r.device))
        counts.add_metric(["host"], len(r.host))
        yield counts
        yield GaugeMetricFamily("lorad_adapters_pinned", "Adapters pinned to a device slot.", value=r.pinned)
        nbytes = GaugeMetricFamily("lorad_adapter_bytes", "Bytes of adapters per tier (host copies, device slots "
                                   "in use).", labels=["tier"])
        nbytes.add_metric(["device"], r.device_bytes)
        nbytes.add_metric(["host"], r.host_bytes)
        yield nbytes
        if not self.with_ids:
            return
        info = GaugeMetricFamily(
            "lorad_lora_requests_info",
            "Adapters of running and waiting requests (vLLM lora_requests_info shape); value = snapshot Unix time.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info.add_metric([str(r.max_loras), ",".join(r.running), ",".join(r.waiting)], r.published_at)
        yield info
        resident = GaugeMetricFamily("lorad_adapter_resident", "1 for each adapter held in a tier.",
                                     labels=["adapter_id", "tier"])
        for tier, ids in (("device", r.device), ("host", r.host)):
            for adapter_id in ids:
                resident.add_metric([adapter_id, tier], 1)
        yield resident
