"""The GroupController service against the real server over its unix
socket: group snapshots of several volumes, restoring each member, the
idempotency and error codes of the CSI spec (v1.12), and member snapshots
seen through the Controller service."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from csidriver.pb import csi_pb2, csi_pb2_grpc, qsnap_pb2

if TYPE_CHECKING:
    # Only for annotations: several test directories have a conftest.py.
    from conftest import Driver, QemuIo

MIB = 1 << 20
Code = grpc.StatusCode
GroupRPC = csi_pb2.GroupControllerServiceCapability.RPC
UNKNOWN_VOLUME = "v-" + "0" * 32
UNKNOWN_GROUP = "g-" + "0" * 32


# -- helpers ----------------------------------------------------------------------

def groups(d: Driver) -> Any:
    """A GroupController stub on the driver's channel (the fixture has none)."""
    return csi_pb2_grpc.GroupControllerStub(d.channel)


def create(d: Driver, name: str, size: int = 4 * MIB) -> str:
    cap = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    return str(d.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[cap],
        capacity_range=csi_pb2.CapacityRange(required_bytes=size))).volume.volume_id)


def restore(d: Driver, name: str, snapshot_id: str) -> str:
    cap = csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap])
    req.volume_content_source.snapshot.snapshot_id = snapshot_id
    return str(d.controller.CreateVolume(req).volume.volume_id)


def top(d: Driver, volume_id: str) -> str:
    return str(d.inspect.DescribeVolume(
        qsnap_pb2.DescribeVolumeRequest(volume_id=volume_id)).chain[0].path)


def group_snap(d: Driver, name: str, volume_ids: list[str],
               params: dict[str, str] | None = None) -> csi_pb2.VolumeGroupSnapshot:
    return groups(d).CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
        name=name, source_volume_ids=volume_ids, parameters=params or {},
        secrets={"ignored": "yes"})).group_snapshot


def code(method: Any, request: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        method(request)
    return e.value.code()


def ns(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


# -- capabilities -------------------------------------------------------------------

def test_group_controller_is_advertised_and_serving(driver: Driver) -> None:
    caps = driver.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in caps.capabilities if c.HasField("service")}
    assert csi_pb2.PluginCapability.Service.GROUP_CONTROLLER_SERVICE in services
    reply = groups(driver).GroupControllerGetCapabilities(
        csi_pb2.GroupControllerGetCapabilitiesRequest())
    assert [c.rpc.type for c in reply.capabilities] == \
        [GroupRPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]
    health = driver.health.Check(health_pb2.HealthCheckRequest(service="csi.v1.GroupController"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# -- create, restore ----------------------------------------------------------------

def test_group_snapshot_restores_each_member(driver: Driver, qemu_io: QemuIo) -> None:
    a = create(driver, "db-data", 4 * MIB)
    b = create(driver, "db-log", 8 * MIB)
    qemu_io(top(driver, a), "write -P 0xa1 0 1M")
    qemu_io(top(driver, b), "write -P 0xb1 1M 1M")
    before = time.time_ns()
    g = group_snap(driver, "db-consistent", [a, b])
    after = time.time_ns()
    # Written after the cut: must not show in the restores.
    qemu_io(top(driver, a), "write -P 0xa2 0 1M")
    qemu_io(top(driver, b), "write -P 0xb2 1M 1M")

    assert g.group_snapshot_id.startswith("g-") and len(g.group_snapshot_id) == 34
    assert g.ready_to_use
    assert before <= ns(g.creation_time) <= after
    by_volume = {s.source_volume_id: s for s in g.snapshots}
    assert set(by_volume) == {a, b} and len(g.snapshots) == 2
    for s in g.snapshots:
        assert s.snapshot_id.startswith("s-")
        assert s.group_snapshot_id == g.group_snapshot_id
        assert s.ready_to_use
        # One instant for the whole group.
        assert ns(s.creation_time) == ns(g.creation_time)
    assert by_volume[a].size_bytes == 4 * MIB and by_volume[b].size_bytes == 8 * MIB

    ra = restore(driver, "db-data-restored", by_volume[a].snapshot_id)
    rb = restore(driver, "db-log-restored", by_volume[b].snapshot_id)
    qemu_io(top(driver, ra), "read -P 0xa1 0 1M")
    qemu_io(top(driver, ra), "read -P 0 1M 3M")
    qemu_io(top(driver, rb), "read -P 0 0 1M")
    qemu_io(top(driver, rb), "read -P 0xb1 1M 1M")
    qemu_io(top(driver, a), "read -P 0xa2 0 1M")
    qemu_io(top(driver, b), "read -P 0xb2 1M 1M")

    # Members are ordinary snapshots: listed, gettable, with their group.
    listed = driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest())
    assert {e.snapshot.snapshot_id: e.snapshot.group_snapshot_id for e in listed.entries} == \
        {s.snapshot_id: g.group_snapshot_id for s in g.snapshots}
    got = driver.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id=by_volume[a].snapshot_id)).snapshot
    assert got == by_volume[a]
    details = driver.inspect.DescribeSnapshot(
        qsnap_pb2.DescribeSnapshotRequest(snapshot_id=by_volume[a].snapshot_id))
    assert details.indications, "a cut records how it was taken"

    fetched = groups(driver).GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id,
        snapshot_ids=[s.snapshot_id for s in reversed(g.snapshots)])).group_snapshot
    assert fetched == g


def test_single_snapshots_have_no_group(driver: Driver) -> None:
    v = create(driver, "alone")
    s = driver.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="alone-snap", source_volume_id=v)).snapshot
    assert s.group_snapshot_id == ""
    [entry] = driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries
    assert entry.snapshot.group_snapshot_id == ""


# -- idempotency ----------------------------------------------------------------------

def test_create_is_idempotent_by_name(driver: Driver) -> None:
    a, b, c = create(driver, "a"), create(driver, "b"), create(driver, "c")
    g = group_snap(driver, "nightly", [a, b])
    time.sleep(0.01)
    # Same name, same volumes (in any order): the same group, to the nanosecond.
    assert group_snap(driver, "nightly", [b, a]) == g
    assert len(driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries) == 2
    gc = groups(driver)
    for other in ([a, c], [a], [a, b, c]):
        assert code(gc.CreateVolumeGroupSnapshot, csi_pb2.CreateVolumeGroupSnapshotRequest(
            name="nightly", source_volume_ids=other)) == Code.ALREADY_EXISTS
    assert code(gc.CreateVolumeGroupSnapshot, csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="nightly", source_volume_ids=[a, b],
        parameters={"qsnap.csi.dev/guest-agent": "disabled"})) == Code.ALREADY_EXISTS


# -- bad input ------------------------------------------------------------------------

def test_create_bad_input(driver: Driver) -> None:
    a, b = create(driver, "a"), create(driver, "b")
    gc = groups(driver)

    def create_code(name: str, volume_ids: list[str],
                    params: dict[str, str] | None = None) -> grpc.StatusCode:
        return code(gc.CreateVolumeGroupSnapshot, csi_pb2.CreateVolumeGroupSnapshotRequest(
            name=name, source_volume_ids=volume_ids, parameters=params or {}))

    assert create_code("", [a, b]) == Code.INVALID_ARGUMENT
    assert create_code("no-volumes", []) == Code.INVALID_ARGUMENT
    assert create_code("twice", [a, b, a]) == Code.INVALID_ARGUMENT
    assert create_code("empty-id", [a, ""]) == Code.INVALID_ARGUMENT
    assert create_code("bad/name", [a]) == Code.INVALID_ARGUMENT
    assert create_code("unknown", [a, UNKNOWN_VOLUME]) == Code.NOT_FOUND
    assert create_code("malformed", [a, "fake-volume-id"]) == Code.NOT_FOUND
    assert create_code("bad-agent", [a, b], {"qsnap.csi.dev/guest-agent": "sometimes"}) == \
        Code.INVALID_ARGUMENT
    assert create_code("bad-deadline", [a, b], {"qsnap.csi.dev/freeze-deadline": "soon"}) == \
        Code.INVALID_ARGUMENT
    assert create_code("bad-fsfreeze", [a, b], {"qsnap.csi.dev/fsfreeze": "maybe"}) == \
        Code.INVALID_ARGUMENT
    assert create_code("unknown-key", [a, b], {"zstd": "1"}) == Code.INVALID_ARGUMENT
    # Nothing was cut by any of them.
    assert not driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries
    # Valid parameters are accepted (closed volumes: no guest to freeze).
    g = group_snap(driver, "with-params", [a, b], {"qsnap.csi.dev/guest-agent": "disabled",
                                                   "qsnap.csi.dev/freeze-deadline": "30s"})
    assert len(g.snapshots) == 2


# -- get, delete ------------------------------------------------------------------------

def test_get_errors(driver: Driver) -> None:
    gc = groups(driver)
    assert code(gc.GetVolumeGroupSnapshot, csi_pb2.GetVolumeGroupSnapshotRequest()) == \
        Code.INVALID_ARGUMENT
    for unknown in (UNKNOWN_GROUP, "fake-group-id"):
        assert code(gc.GetVolumeGroupSnapshot, csi_pb2.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=unknown)) == Code.NOT_FOUND
    a, b = create(driver, "a"), create(driver, "b")
    g = group_snap(driver, "g", [a, b])
    ids = [s.snapshot_id for s in g.snapshots]
    # Without snapshot_ids (csi-sanity sends none) and with the right ones.
    for given in ([], ids):
        got = gc.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=g.group_snapshot_id, snapshot_ids=given)).group_snapshot
        assert got == g
    lone = driver.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="lone", source_volume_id=a)).snapshot.snapshot_id
    # The spec's "snapshot list mismatch" is INVALID_ARGUMENT.
    for wrong in (ids[:1], ids + [lone], [ids[0], lone]):
        assert code(gc.GetVolumeGroupSnapshot, csi_pb2.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=g.group_snapshot_id, snapshot_ids=wrong)) == Code.INVALID_ARGUMENT


def test_delete(driver: Driver) -> None:
    gc = groups(driver)
    assert code(gc.DeleteVolumeGroupSnapshot, csi_pb2.DeleteVolumeGroupSnapshotRequest()) == \
        Code.INVALID_ARGUMENT
    # Unknown IDs are already deleted.
    for unknown in (UNKNOWN_GROUP, "fake-group-id"):
        gc.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=unknown, snapshot_ids=["s-" + "1" * 32]))
    a, b = create(driver, "a"), create(driver, "b")
    g = group_snap(driver, "g", [a, b])
    ids = [s.snapshot_id for s in g.snapshots]
    lone = driver.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="lone", source_volume_id=a)).snapshot.snapshot_id
    for wrong in (ids[:1], ids + [lone]):
        assert code(gc.DeleteVolumeGroupSnapshot, csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=g.group_snapshot_id, snapshot_ids=wrong)) == Code.INVALID_ARGUMENT
    # A refused delete deleted nothing.
    assert gc.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id)).group_snapshot == g

    for _ in range(2):    # the second is a retry of a delete that is done
        gc.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=g.group_snapshot_id, snapshot_ids=list(reversed(ids))))
    assert code(gc.GetVolumeGroupSnapshot, csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id)) == Code.NOT_FOUND
    for snapshot_id in ids:
        assert code(driver.controller.GetSnapshot,
                    csi_pb2.GetSnapshotRequest(snapshot_id=snapshot_id)) == Code.NOT_FOUND
    # The lone snapshot and both volumes stay.
    left = driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries
    assert [e.snapshot.snapshot_id for e in left] == [lone]
    # The name is free again: a new group, with a new ID.
    again = group_snap(driver, "g", [a, b])
    assert again.group_snapshot_id != g.group_snapshot_id


def test_delete_after_a_member_went(driver: Driver) -> None:
    """A member deleted on its own: the group's list shrinks, and a delete
    naming the gone member is still a match (its artifact no longer exists)."""
    gc = groups(driver)
    a, b = create(driver, "a"), create(driver, "b")
    g = group_snap(driver, "g", [a, b])
    ids = [s.snapshot_id for s in g.snapshots]
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=ids[0]))
    got = gc.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id)).group_snapshot
    assert [s.snapshot_id for s in got.snapshots] == ids[1:]
    gc.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=g.group_snapshot_id, snapshot_ids=ids))
    assert not driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries
