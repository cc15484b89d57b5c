"""The driver's Prometheus endpoint, scraped from a real server."""

from __future__ import annotations

import os
import socket
import urllib.request
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from csidriver.metrics import FROZEN_BUCKETS, Metrics
from csidriver.pb import csi_pb2
from engine.pool import Pool
from engine.reclaim import MaintenanceStats

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import DriverFactory

MIB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
    return out


def _value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    for sample, sample_labels, value in samples:
        if sample == name and all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    raise AssertionError(f"no sample {name} {labels} in {samples}")


def _create(driver, name: str) -> str:  # type: ignore[no-untyped-def]
    cap = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    reply = driver.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=4 * MIB),
        volume_capabilities=[cap]))
    return str(reply.volume.volume_id)


def test_metrics_follow_requests_and_pool_state(driver_factory: "DriverFactory") -> None:
    port = _free_port()
    driver = driver_factory("--metrics-port", str(port), "--metrics-address", "127.0.0.1")
    volume_id = _create(driver, "m1")
    for i in range(3):
        driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name=f"ms{i}", source_volume_id=volume_id))
    try:
        driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name="missing", source_volume_id="v-" + "0" * 32))
    except Exception:
        pass
    m = _scrape(port)

    rpc = m["qsnap_rpc_duration_seconds"]
    assert _value(rpc, "qsnap_rpc_duration_seconds_count", method="CreateSnapshot",
                  code="OK") == 3
    assert _value(rpc, "qsnap_rpc_duration_seconds_count", method="CreateSnapshot",
                  code="NOT_FOUND") == 1
    assert _value(rpc, "qsnap_rpc_duration_seconds_count", method="CreateVolume",
                  code="OK") == 1
    cut = m["qsnap_snapshot_cut_seconds"]
    assert _value(cut, "qsnap_snapshot_cut_seconds_count") == 3
    assert 0 < _value(cut, "qsnap_snapshot_cut_seconds_sum") < 3

    assert _value(m["qsnap_volumes"], "qsnap_volumes") == 1
    assert _value(m["qsnap_snapshots"], "qsnap_snapshots") == 3
    assert _value(m["qsnap_layers"], "qsnap_layers") == 4
    assert _value(m["qsnap_chain_depth_max"], "qsnap_chain_depth_max") == 4
    assert _value(m["qsnap_chain_depth_cap"], "qsnap_chain_depth_cap") == 16
    assert _value(m["qsnap_pool_provisioned_bytes"], "qsnap_pool_provisioned_bytes") == 4 * MIB
    assert _value(m["qsnap_pool_used_bytes"], "qsnap_pool_used_bytes") > 0
    assert _value(m["qsnap_pool_available_bytes"], "qsnap_pool_available_bytes") > 0
    assert _value(m["qsnap_merges"], "qsnap_merges_total", kind="collapse") == 0
    # Closed volumes are cut offline: every snapshot says so.
    assert _value(m["qsnap_snapshots_by_indication"], "qsnap_snapshots_by_indication",
                  indication="Offline") == 3
    # No guest was frozen: the histogram is there, and empty.
    assert _value(m["qsnap_guest_frozen_seconds"], "qsnap_guest_frozen_seconds_count") == 0

    # Deleting everything: the maintainer reclaims, and the counters say so.
    for i in range(3):
        snaps = driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
            source_volume_id=volume_id)).entries
        for entry in snaps:
            driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
                snapshot_id=entry.snapshot.snapshot_id))
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = _scrape(port)
        if _value(m["qsnap_layers"], "qsnap_layers") == 0:
            break
        time.sleep(0.2)
    assert _value(m["qsnap_layers"], "qsnap_layers") == 0
    assert _value(m["qsnap_layers_awaiting_reclaim"], "qsnap_layers_awaiting_reclaim") == 0
    assert _value(m["qsnap_layers_reclaimed"], "qsnap_layers_reclaimed_total") == 4


def _listening_tcp_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":          # LISTEN
                    inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def test_metrics_are_off_by_default(driver_factory: "DriverFactory") -> None:
    """Without --metrics-port the driver listens on no TCP port at all."""
    quiet = driver_factory()
    loud = driver_factory("--metrics-port", "0", "--metrics-address", "127.0.0.1")
    assert quiet.process is not None and loud.process is not None
    listening = _listening_tcp_inodes()
    assert not _socket_inodes(quiet.process.pid) & listening
    # The check itself works: the same probe sees the metrics listener.
    assert _socket_inodes(loud.process.pid) & listening


def test_frozen_window_histogram(tmp_path: "Path") -> None:
    """The pool's "frozen" events (a guest's freeze -> thaw window) land in
    their own histogram, whose buckets span 1 ms to 5 s; "cut" events stay
    in theirs."""
    assert FROZEN_BUCKETS[0] == 0.001 and FROZEN_BUCKETS[-1] == 5.0
    assert list(FROZEN_BUCKETS) == sorted(FROZEN_BUCKETS)
    pool = Pool.open(tmp_path / "pool")
    try:
        metrics = Metrics(pool, MaintenanceStats())
        for seconds in (0.0015, 0.004, 0.3, 7.0):
            pool._observe("frozen", seconds)   # as a cut that froze a guest reports it
        pool._observe("cut", 0.003)
        sample = metrics.registry.get_sample_value
        assert sample("qsnap_guest_frozen_seconds_count") == 4
        assert sample("qsnap_guest_frozen_seconds_sum") == 0.0015 + 0.004 + 0.3 + 7.0
        assert sample("qsnap_guest_frozen_seconds_bucket", {"le": "0.001"}) == 0
        assert sample("qsnap_guest_frozen_seconds_bucket", {"le": "0.002"}) == 1
        assert sample("qsnap_guest_frozen_seconds_bucket", {"le": "0.005"}) == 2
        assert sample("qsnap_guest_frozen_seconds_bucket", {"le": "5.0"}) == 3
        assert sample("qsnap_guest_frozen_seconds_bucket", {"le": "+Inf"}) == 4
        assert sample("qsnap_snapshot_cut_seconds_count") == 1
        # Unknown events are ignored, not errors: the pool may grow new ones.
        metrics.observe("something-new", 1.0)
        assert sample("qsnap_guest_frozen_seconds_count") == 4
    finally:
        pool.close()


def test_snapshots_by_indication(tmp_path: "Path") -> None:
    """Scrape-time counts of snapshots per indication, one per indication a
    snapshot carries, from the catalog as it is."""
    pool = Pool.open(tmp_path / "pool")
    try:
        metrics = Metrics(pool, MaintenanceStats())
        sample = metrics.registry.get_sample_value
        assert sample("qsnap_snapshots_by_indication", {"indication": "Offline"}) is None
        a = pool.create_volume("a", required_bytes=MIB)
        b = pool.create_volume("b", required_bytes=MIB)
        one = pool.create_snapshot("one", a.id)
        pool.create_snapshot("two", b.id, parameters={"qsnap.csi.dev/guest-agent": "disabled"})
        pool.create_snapshot("three", b.id)
        assert sample("qsnap_snapshots_by_indication", {"indication": "Offline"}) == 3
        pool.delete_snapshot(one.id)
        assert sample("qsnap_snapshots_by_indication", {"indication": "Offline"}) == 2
    finally:
        pool.close()
