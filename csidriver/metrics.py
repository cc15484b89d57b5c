"""Prometheus metrics of the driver, on ``/metrics`` when ``--metrics-port``
is given (off by default).

Request metrics are pushed as they happen (RPC latency by method and code,
snapshot cut time, the window guests stay frozen); the pool's state is read at scrape time by a collector,
so a scrape always sees the catalog as it is rather than a cached copy.
Everything lives in a registry of its own: nothing global.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.pool import Pool
from engine.reclaim import MaintenanceStats

log = logging.getLogger(__name__)

# Snapshot cuts take milliseconds; RPCs range from sub-millisecond reads
# to merges measured in seconds.
CUT_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.05, 0.1,
               0.25, 1.0)
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
               5.0, 10.0, 30.0)
# A guest stays frozen from its agent's fsfreeze to its thaw: a few ms
# around a local cut, up to seconds when an agent is slow; past 5 s it
# counts as an outage, and the last bucket (+Inf) is where to look.
FROZEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class PoolCollector(Collector):
    """The pool's state, read from the catalog on every scrape."""

    def __init__(self, pool: Pool, stats: MaintenanceStats) -> None:
        self.pool = pool
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        capacity = self.pool.capacity()
        with self.pool.catalog.reading() as tx:
            volumes = tx.count("volumes")
            snapshots = tx.count("snapshots")
            intents = tx.count("intents")
            layers = tx.all_layers()
            garbage = len(tx.garbage())
        gauges = [
            ("qsnap_pool_used_bytes", "Bytes the pool's layer files occupy.", capacity.used_bytes),
            ("qsnap_pool_available_bytes",
             "Bytes new volumes may still use (free space net of the reserve, within the quota).",
             capacity.available_bytes),
            ("qsnap_pool_provisioned_bytes", "Sum of the volumes' sizes (thin).",
             capacity.provisioned_bytes),
            ("qsnap_pool_size_bytes", "The pool's size: its quota, else its filesystem's size.",
             capacity.total_bytes),
            ("qsnap_volumes", "Volumes in the pool.", volumes),
            ("qsnap_snapshots", "Snapshots in the pool.", snapshots),
            ("qsnap_layers", "Layer files in the pool.", len(layers)),
            ("qsnap_layers_awaiting_reclaim",
             "Layers nothing refers to any more, not yet removed by the maintainer.", garbage),
            ("qsnap_chain_depth_max", "The deepest backing chain in the pool.",
             max((layer.depth for layer in layers), default=0)),
            ("qsnap_chain_depth_cap", "The depth past which chains are merged.",
             self.pool.config.depth_cap),
            ("qsnap_intents_pending", "Multi-step changes in progress (or left by a crash).",
             intents),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        merges = CounterMetricFamily("qsnap_merges", "Layer merges done since start, by kind.",
                                     labels=["kind"])
        for kind, count in sorted(self.stats.merges.items()):
            merges.add_metric([kind], count)
        yield merges
        yield CounterMetricFamily("qsnap_layers_reclaimed",
                                  "Layers removed by the maintainer since start.",
                                  value=self.stats.reclaimed_layers)
        yield CounterMetricFamily("qsnap_maintenance_passes",
                                  "Maintenance passes run since start.", value=self.stats.passes)
        yield self._indications()

    def _indications(self) -> GaugeMetricFamily:
        """Snapshots in the pool by indication (a snapshot counts once for
        each of its indications): how many cuts were application-consistent
        (GuestAgent), crash-consistent (NoGuestAgent, QuiesceFailed...).

        A gauge of what exists, read at scrape time, rather than a counter
        of cuts: the pool's observers report durations only.  Grouped by the
        stored text in SQL, so a scrape decodes one row per distinct set of
        indications, not one per snapshot (pools hold tens of thousands).
        """
        counts: dict[str, int] = {}
        with self.pool.catalog.reading() as tx:
            rows = tx.all("SELECT indications, COUNT(*) FROM snapshots GROUP BY indications")
        for text, count in rows:
            try:
                marks = json.loads(text)
            except ValueError:
                continue    # an unreadable row is the catalog's concern, not a scrape's
            for mark in marks if isinstance(marks, list) else ():
                counts[str(mark)] = counts.get(str(mark), 0) + int(count)
        family = GaugeMetricFamily(
            "qsnap_snapshots_by_indication",
            "Snapshots in the pool carrying each indication (Online, Offline, GuestAgent, "
            "NoGuestAgent, QuiesceFailed, QuiesceTimeout, QuiesceDisabled, Paused, "
            "FilesystemFrozen).", labels=["indication"])
        for mark, count in sorted(counts.items()):
            family.add_metric([mark], count)
        return family


class Metrics:
    """The driver's metrics and, once :meth:`serve` is called, their HTTP endpoint."""

    def __init__(self, pool: Pool, stats: MaintenanceStats) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpc_seconds = Histogram(
            "qsnap_rpc_duration_seconds", "Latency of gRPC calls, by method and status code.",
            ["method", "code"], buckets=RPC_BUCKETS, registry=self.registry)
        self.cut_seconds = Histogram(
            "qsnap_snapshot_cut_seconds",
            "Time from recording a cut's intent to its completion (snapshots and clones).",
            buckets=CUT_BUCKETS, registry=self.registry)
        self.frozen_seconds = Histogram(
            "qsnap_guest_frozen_seconds",
            "How long guests stayed frozen around a cut (agent freeze to thaw; cuts that "
            "froze a guest only).", buckets=FROZEN_BUCKETS, registry=self.registry)
        self.registry.register(PoolCollector(pool, stats))
        pool.add_observer(self.observe)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_seconds.labels(method=method, code=code).observe(seconds)

    def observe(self, event: str, seconds: float) -> None:
        """The pool's timing events (see ``Pool.add_observer``)."""
        if event == "cut":
            self.cut_seconds.observe(seconds)
        elif event == "frozen":
            self.frozen_seconds.observe(seconds)

    def serve(self, address: str, port: int) -> int:
        """Serve ``/metrics`` on ``address:port`` (port 0 picks a free one).

        :returns: the port actually bound.
        :raises OSError: the port cannot be bound.
        """
        self._server, self._thread = start_http_server(port, addr=address, registry=self.registry)
        bound = int(self._server.server_port)
        log.info("metrics on http://%s:%d/metrics", address or "0.0.0.0", bound)
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
