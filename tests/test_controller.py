"""The Controller (and Inspect) services against the real server over its
unix socket: happy paths, idempotency, every error code, pagination,
concurrency, and data written with qemu-io surviving snapshot, restore,
clone, expansion and deletion in any order."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from csidriver.pb import csi_pb2, qsnap_pb2
from engine.qemu_img import image_locks

if TYPE_CHECKING:
    # Only for annotations: several test directories have a conftest.py, so
    # "conftest" is not a module name to import at run time.
    from conftest import Driver, DriverFactory, QemuIo

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

Mode = csi_pb2.VolumeCapability.AccessMode
RPC = csi_pb2.ControllerServiceCapability.RPC
Code = grpc.StatusCode

SINGLE_NODE_MODES = [Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                     Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER]
MULTI_NODE_MODES = [Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_SINGLE_WRITER,
                    Mode.MULTI_NODE_MULTI_WRITER]

# Names and IDs that must never get near a path or a log line.
BAD_NAMES = ["a/b", "..", "a..b", "x\x00y", "back\\slash", "tab\there", "n" * 129, "é" * 65]
UNKNOWN_VOLUME = "v-" + "0" * 32
UNKNOWN_SNAPSHOT = "s-" + "0" * 32


# -- helpers ----------------------------------------------------------------------

def cap(mode: Mode.Mode = Mode.SINGLE_NODE_WRITER, *, block: bool = False,
        fs_type: str = "") -> csi_pb2.VolumeCapability:
    access = Mode(mode=mode)
    if block:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                        access_mode=access)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
                                    access_mode=access)


def volume_req(name: str, size: int = 4 * MIB, *, limit: int = 0,
               caps: list[csi_pb2.VolumeCapability] | None = None, snapshot: str = "",
               volume: str = "", params: dict[str, str] | None = None
               ) -> csi_pb2.CreateVolumeRequest:
    req = csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=caps if caps is not None else [cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=size, limit_bytes=limit),
        parameters=params or {})
    if snapshot:
        req.volume_content_source.snapshot.snapshot_id = snapshot
    if volume:
        req.volume_content_source.volume.volume_id = volume
    return req


def create(d: Driver, name: str, size: int = 4 * MIB, **kw: Any) -> csi_pb2.Volume:
    return d.controller.CreateVolume(volume_req(name, size, **kw)).volume


def snap(d: Driver, name: str, volume_id: str) -> csi_pb2.Snapshot:
    return d.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=volume_id)).snapshot


def error(method: Callable[..., Any], request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        method(request)
    return e.value


def code(method: Callable[..., Any], request: Any) -> grpc.StatusCode:
    return error(method, request).code()


def describe(d: Driver, volume_id: str) -> qsnap_pb2.VolumeDetails:
    return d.inspect.DescribeVolume(qsnap_pb2.DescribeVolumeRequest(volume_id=volume_id))


def top(d: Driver, volume_id: str) -> str:
    return describe(d, volume_id).chain[0].path


def status(d: Driver) -> qsnap_pb2.PoolStatusResponse:
    return d.inspect.PoolStatus(qsnap_pb2.PoolStatusRequest())


def ns(ts: Any) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def wait_empty(d: Driver, timeout: float = 30.0) -> None:
    """Wait until the maintainer has reclaimed every layer."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(d)
        files = sorted(p.name for p in (d.pool_root / "layers").glob("*.qcow2"))
        if st.layers == 0 and st.garbage_layers == 0 and not files:
            break
        assert time.monotonic() < deadline, f"pool not empty: {st} files={files}"
        time.sleep(0.1)
    assert (st.volumes, st.snapshots, st.pending_intents, st.provisioned_bytes) == (0, 0, 0, 0)


def read_patterns(d: Driver, volume_id: str, reads: list[tuple[int, int, int]]) -> None:
    """Assert the volume reads each (pattern, offset, length).

    The maintainer may be merging the volume's chain in the background, and
    reading qcow2 files another process is changing (qemu-io -U) can see
    half-written metadata.  A failed read therefore counts only when the
    chain was the same before and after it and no merge intent was pending
    at either point; otherwise it is retried.  Every merge changes the chain
    of each volume whose content it touches, so a real difference is never
    excused.
    """
    args = []
    for pattern, offset, length in reads:
        args += ["-c", f"read -P {pattern:#x} {offset} {length}"]
    output = ""
    for _ in range(100):
        chain = describe(d, volume_id).chain
        before = [layer.id for layer in chain]
        merging = status(d).pending_intents
        done = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", *args, chain[0].path],
                              capture_output=True, text=True, timeout=60, check=False)
        output = done.stdout + done.stderr
        ok = done.returncode == 0 and "verification failed" not in output
        if ok:
            return
        after = [layer.id for layer in describe(d, volume_id).chain]
        merging += status(d).pending_intents
        assert before != after or merging, f"{volume_id} {reads}:\n{output}"
        time.sleep(0.1)
    raise AssertionError(f"{volume_id}: qemu-io {args} kept failing:\n{output}")


def read_pattern(d: Driver, volume_id: str, pattern: int, offset: int, length: int) -> None:
    read_patterns(d, volume_id, [(pattern, offset, length)])


@pytest.fixture
def shared(module_driver: Driver) -> Driver:
    """The module's server, for tests that need no empty pool."""
    return module_driver


# -- capabilities ---------------------------------------------------------------

def test_controller_capabilities(shared: Driver) -> None:
    reply = shared.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest())
    advertised = {c.rpc.type for c in reply.capabilities}
    assert advertised == {
        RPC.CREATE_DELETE_VOLUME, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS,
        RPC.GET_SNAPSHOT, RPC.CLONE_VOLUME, RPC.EXPAND_VOLUME, RPC.LIST_VOLUMES,
        RPC.GET_CAPACITY, RPC.GET_VOLUME, RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER}
    assert len(reply.capabilities) == len(advertised)


@pytest.mark.parametrize("rpc, request_type", [
    ("ControllerPublishVolume", csi_pb2.ControllerPublishVolumeRequest),
    ("ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest),
    ("ControllerModifyVolume", csi_pb2.ControllerModifyVolumeRequest),
])
def test_unsupported_rpcs_are_unimplemented(shared: Driver, rpc: str, request_type: Any) -> None:
    e = error(getattr(shared.controller, rpc), request_type(volume_id=UNKNOWN_VOLUME))
    assert e.code() == Code.UNIMPLEMENTED
    assert rpc in e.details()


# -- CreateVolume / DeleteVolume ----------------------------------------------------

def test_create_volume(driver: Driver) -> None:
    vol = create(driver, "pvc-1", 10 * MIB)
    assert vol.volume_id.startswith("v-")
    assert vol.capacity_bytes == 10 * MIB
    assert dict(vol.volume_context) == {"qsnap.csi.dev/node": "test-node"}
    assert not vol.HasField("content_source")
    assert [dict(t.segments) for t in vol.accessible_topology] == \
        [{"topology.qsnap.csi.dev/node": "test-node"}]
    d = describe(driver, vol.volume_id)
    assert (d.name, d.size_bytes, len(d.chain)) == ("pvc-1", 10 * MIB, 1)
    assert Path(d.chain[0].path).is_file()
    assert not d.chain[0].read_only
    got = driver.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume == vol
    assert not got.status.volume_condition.abnormal
    assert not got.status.published_node_ids


def test_create_volume_sizes(shared: Driver) -> None:
    # Whole sectors, rounded up; no range: 1 GiB (thin, costs nothing).
    assert create(shared, "size-round", 1000).capacity_bytes == 1024
    assert create(shared, "size-default", 0).capacity_bytes == GIB
    assert create(shared, "size-limit-only", 0, limit=8 * MIB).capacity_bytes == 8 * MIB
    assert create(shared, "size-exact", 3 * MIB, limit=3 * MIB).capacity_bytes == 3 * MIB


@pytest.mark.parametrize("mode", SINGLE_NODE_MODES)
@pytest.mark.parametrize("kind", ["block", "mount", "ext4", "xfs"])
def test_create_volume_supported_capabilities(shared: Driver, mode: Mode.Mode, kind: str) -> None:
    c = cap(mode, block=True) if kind == "block" else cap(mode, fs_type="" if kind == "mount"
                                                          else kind)
    name = f"caps-{kind}-{mode}"
    assert create(shared, name, caps=[c]).volume_id


def test_create_volume_is_idempotent(driver: Driver) -> None:
    caps = [cap(Mode.SINGLE_NODE_WRITER, fs_type="ext4"), cap(Mode.SINGLE_NODE_READER_ONLY,
                                                              fs_type="ext4")]
    params = {"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "ns"}
    first = create(driver, "same", 4 * MIB, caps=caps, params=params)
    # Same arguments, capabilities in another order: the same volume.
    again = create(driver, "same", 4 * MIB, caps=list(reversed(caps)), params=params)
    assert again == first
    # A range the existing size satisfies is the same request too.
    assert create(driver, "same", 2 * MIB, limit=8 * MIB, caps=caps, params=params) == first
    assert status(driver).volumes == 1
    details = describe(driver, first.volume_id)
    assert details.owner == "closed"
    assert dict(details.parameters) == params


def test_create_volume_same_name_other_arguments(driver: Driver) -> None:
    base = create(driver, "taken", 4 * MIB)
    s = snap(driver, "taken-snap", base.volume_id)
    conflicts = [
        volume_req("taken", 8 * MIB),
        volume_req("taken", 4 * MIB, limit=2 * MIB),
        volume_req("taken", 4 * MIB, caps=[cap(block=True)]),
        volume_req("taken", 4 * MIB, caps=[cap(fs_type="xfs")]),
        volume_req("taken", 4 * MIB, params={"csi.storage.k8s.io/pvc/name": "x"}),
        volume_req("taken", 4 * MIB, snapshot=s.snapshot_id),
        volume_req("taken", 4 * MIB, volume=base.volume_id),
    ]
    for req in conflicts:
        e = error(driver.controller.CreateVolume, req)
        assert e.code() == Code.ALREADY_EXISTS, req
        assert base.volume_id in e.details()
    assert status(driver).volumes == 1


def test_create_volume_missing_fields(shared: Driver) -> None:
    c = shared.controller.CreateVolume
    assert code(c, csi_pb2.CreateVolumeRequest(volume_capabilities=[cap()])) == \
        Code.INVALID_ARGUMENT
    e = error(c, csi_pb2.CreateVolumeRequest(name="no-caps"))
    assert e.code() == Code.INVALID_ARGUMENT and "volume_capabilities" in e.details()
    empty_source = volume_req("empty-source")
    empty_source.volume_content_source.SetInParent()
    assert code(c, empty_source) == Code.INVALID_ARGUMENT
    no_snapshot_id = volume_req("no-snapshot-id")
    no_snapshot_id.volume_content_source.snapshot.SetInParent()
    assert code(c, no_snapshot_id) == Code.INVALID_ARGUMENT
    no_volume_id = volume_req("no-volume-id")
    no_volume_id.volume_content_source.volume.SetInParent()
    assert code(c, no_volume_id) == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("bad", [
    csi_pb2.VolumeCapability(access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)),   # no access type
    csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume()),     # no access mode
    cap(Mode.UNKNOWN),
    cap(Mode.SINGLE_NODE_WRITER, fs_type="btrfs"),
    cap(Mode.SINGLE_NODE_WRITER, fs_type="ntfs"),
    *[cap(m) for m in MULTI_NODE_MODES],
    *[cap(m, block=True) for m in MULTI_NODE_MODES],
])
def test_create_volume_bad_capability(shared: Driver, bad: csi_pb2.VolumeCapability) -> None:
    assert code(shared.controller.CreateVolume,
                volume_req("bad-cap", caps=[cap(), bad])) == Code.INVALID_ARGUMENT


def test_create_volume_block_and_mount_at_once(shared: Driver) -> None:
    req = volume_req("both", caps=[cap(block=True), cap(fs_type="ext4")])
    assert code(shared.controller.CreateVolume, req) == Code.INVALID_ARGUMENT


def test_create_volume_parameters(shared: Driver) -> None:
    e = error(shared.controller.CreateVolume, volume_req("params", params={"fast": "yes"}))
    assert e.code() == Code.INVALID_ARGUMENT and "fast" in e.details()
    req = volume_req("mutable")
    req.mutable_parameters["iops"] = "100"
    assert code(shared.controller.CreateVolume, req) == Code.INVALID_ARGUMENT
    # Kubernetes' own metadata is accepted and kept.
    vol = create(shared, "k8s-params", params={"csi.storage.k8s.io/pv/name": "pv-1"})
    assert dict(describe(shared, vol.volume_id).parameters) == {
        "csi.storage.k8s.io/pv/name": "pv-1"}


def test_secrets_are_accepted_and_never_logged(driver: Driver) -> None:
    secret = "s3cr3t-value-never-logged"
    req = volume_req("with-secrets")
    req.secrets["password"] = secret
    vol = driver.controller.CreateVolume(req).volume
    dreq = csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id, secrets={"token": secret})
    driver.controller.DeleteVolume(dreq)
    bad = volume_req("bad/name")
    bad.secrets["password"] = secret
    assert code(driver.controller.CreateVolume, bad) == Code.INVALID_ARGUMENT
    log = driver.log()
    assert "CreateVolume" in log and vol.volume_id in log
    assert secret not in log


def test_mount_flags_are_not_stored(driver: Driver) -> None:
    # Mount flags may be sensitive: they are not part of the catalog record.
    c = cap(fs_type="ext4")
    c.mount.mount_flags.append("password=hunter2")
    vol = create(driver, "flags", caps=[c])
    with sqlite3.connect(driver.pool_root / "catalog.db") as db:
        stored = db.execute("SELECT capabilities FROM volumes WHERE id = ?",
                            (vol.volume_id,)).fetchone()[0]
    assert stored == "mount/ext4:SINGLE_NODE_WRITER"
    assert "hunter2" not in driver.log()


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_path_trick_names_and_ids(shared: Driver, bad: str) -> None:
    c = shared.controller
    calls: list[tuple[Callable[..., Any], Any]] = [
        (c.CreateVolume, volume_req(bad)),
        (c.CreateVolume, volume_req("ok-name", snapshot=bad)),
        (c.CreateVolume, volume_req("ok-name", volume=bad)),
        (c.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=bad)),
        (c.ControllerGetVolume, csi_pb2.ControllerGetVolumeRequest(volume_id=bad)),
        (c.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
            volume_id=bad, capacity_range=csi_pb2.CapacityRange(required_bytes=MIB))),
        (c.ValidateVolumeCapabilities, csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=bad, volume_capabilities=[cap()])),
        (c.CreateSnapshot, csi_pb2.CreateSnapshotRequest(name=bad, source_volume_id=UNKNOWN_VOLUME)),
        (c.CreateSnapshot, csi_pb2.CreateSnapshotRequest(name="ok-name", source_volume_id=bad)),
        (c.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id=bad)),
        (c.GetSnapshot, csi_pb2.GetSnapshotRequest(snapshot_id=bad)),
        (c.ListSnapshots, csi_pb2.ListSnapshotsRequest(snapshot_id=bad)),
        (c.ListSnapshots, csi_pb2.ListSnapshotsRequest(source_volume_id=bad)),
        (shared.inspect.DescribeVolume, qsnap_pb2.DescribeVolumeRequest(volume_id=bad)),
        (shared.inspect.DescribeSnapshot, qsnap_pb2.DescribeSnapshotRequest(snapshot_id=bad)),
    ]
    for method, req in calls:
        assert code(method, req) == Code.INVALID_ARGUMENT, (method, req)
    # Nothing was made under the pool for any of them.
    assert not list((shared.pool_root / "layers").glob("*.tmp"))


def test_max_length_names(shared: Driver) -> None:
    name = "n" * 128
    vol = create(shared, name)
    s = snap(shared, "s" * 128, vol.volume_id)
    assert snap(shared, "s" * 128, vol.volume_id) == s
    assert describe(shared, vol.volume_id).name == name


def test_delete_volume(driver: Driver) -> None:
    vol = create(driver, "doomed")
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert code(driver.controller.ControllerGetVolume,
                csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id)) == Code.NOT_FOUND
    # Deleting again, or an ID that never existed, is done already.
    for volume_id in (vol.volume_id, UNKNOWN_VOLUME, "fake-vol-id"):
        driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
    assert code(driver.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest()) == \
        Code.INVALID_ARGUMENT
    wait_empty(driver)
    # The name is free again, for a new volume with a new ID.
    assert create(driver, "doomed").volume_id != vol.volume_id


# -- not found / out of range / exhausted -------------------------------------------

def test_not_found(shared: Driver) -> None:
    c = shared.controller
    for snapshot_id in (UNKNOWN_SNAPSHOT, "non-existing-snapshot-id"):
        assert code(c.CreateVolume, volume_req("from-nothing", snapshot=snapshot_id)) == \
            Code.NOT_FOUND
        assert code(c.GetSnapshot, csi_pb2.GetSnapshotRequest(snapshot_id=snapshot_id)) == \
            Code.NOT_FOUND
        assert code(shared.inspect.DescribeSnapshot,
                    qsnap_pb2.DescribeSnapshotRequest(snapshot_id=snapshot_id)) == Code.NOT_FOUND
    for volume_id in (UNKNOWN_VOLUME, "fake-vol-id-1234"):
        assert code(c.CreateVolume, volume_req("clone-of-nothing", volume=volume_id)) == \
            Code.NOT_FOUND
        assert code(c.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
            name="snap-of-nothing", source_volume_id=volume_id)) == Code.NOT_FOUND
        assert code(c.ValidateVolumeCapabilities, csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume_id, volume_capabilities=[cap()])) == Code.NOT_FOUND
        assert code(c.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=MIB))) == \
            Code.NOT_FOUND
        assert code(c.ControllerGetVolume,
                    csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id)) == Code.NOT_FOUND
        assert code(shared.inspect.DescribeVolume,
                    qsnap_pb2.DescribeVolumeRequest(volume_id=volume_id)) == Code.NOT_FOUND
    # Nothing half-made is left behind by the failed creations.
    names = {e.volume.volume_id for e in c.ListVolumes(csi_pb2.ListVolumesRequest()).entries}
    assert all(describe(shared, v).name not in ("from-nothing", "clone-of-nothing") for v in names)


def test_out_of_range(driver: Driver) -> None:
    c = driver.controller
    for req in [volume_req("r", 8 * MIB, limit=4 * MIB),      # required above limit
                volume_req("r", 0, limit=100),                # under one sector
                volume_req("r", 1000, limit=1000),            # rounds up past the limit
                volume_req("r", 65 * TIB)]:                   # beyond qcow2's reach
        assert code(c.CreateVolume, req) == Code.OUT_OF_RANGE, req
    assert code(c.CreateVolume, volume_req("r", -1)) == Code.INVALID_ARGUMENT
    vol = create(driver, "origin", 4 * MIB)
    s = snap(driver, "origin-snap", vol.volume_id)
    # A restore or a clone cannot be smaller than its content.
    assert code(c.CreateVolume, volume_req("small", MIB, limit=2 * MIB,
                                           snapshot=s.snapshot_id)) == Code.OUT_OF_RANGE
    assert code(c.CreateVolume, volume_req("small", MIB, limit=2 * MIB,
                                           volume=vol.volume_id)) == Code.OUT_OF_RANGE
    # Asking for less without a limit gets the content's size.
    assert create(driver, "fits", MIB, snapshot=s.snapshot_id).capacity_bytes == 4 * MIB
    expand = csi_pb2.ControllerExpandVolumeRequest
    for rng in [csi_pb2.CapacityRange(required_bytes=MIB, limit_bytes=2 * MIB),   # shrink
                csi_pb2.CapacityRange(required_bytes=8 * MIB, limit_bytes=6 * MIB),
                csi_pb2.CapacityRange(required_bytes=65 * TIB)]:
        assert code(c.ControllerExpandVolume, expand(volume_id=vol.volume_id,
                                                     capacity_range=rng)) == Code.OUT_OF_RANGE
    assert status(driver).volumes == 2


def test_pool_full_quota(driver_factory: DriverFactory) -> None:
    d = driver_factory("--quota", "8M")
    c = d.controller
    cap_reply = c.GetCapacity(csi_pb2.GetCapacityRequest())
    assert cap_reply.available_capacity == 8 * MIB
    vol = create(d, "big", 6 * MIB)
    assert c.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity == 2 * MIB
    e = error(c.CreateVolume, volume_req("too-big", 4 * MIB))
    assert e.code() == Code.RESOURCE_EXHAUSTED and "quota" in e.details()
    s = snap(d, "big-snap", vol.volume_id)   # a snapshot provisions nothing
    assert code(c.CreateVolume, volume_req("restore", snapshot=s.snapshot_id)) == \
        Code.RESOURCE_EXHAUSTED
    assert code(c.CreateVolume, volume_req("clone", volume=vol.volume_id)) == \
        Code.RESOURCE_EXHAUSTED
    assert code(c.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=10 * MIB))) \
        == Code.RESOURCE_EXHAUSTED
    assert create(d, "fits", 2 * MIB).capacity_bytes == 2 * MIB
    assert status(d).volumes == 2
    # Deleting gives the room back.
    c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert create(d, "restore", snapshot=s.snapshot_id).capacity_bytes == 6 * MIB


def test_pool_full_reserve(driver_factory: DriverFactory) -> None:
    # A reserve larger than any filesystem: the pool is always "full".
    d = driver_factory("--reserve", "1P")
    c = d.controller
    reply = c.GetCapacity(csi_pb2.GetCapacityRequest())
    assert reply.available_capacity == 0
    assert reply.maximum_volume_size.value == 0
    e = error(c.CreateVolume, volume_req("nope"))
    assert e.code() == Code.RESOURCE_EXHAUSTED and "reserve" in e.details()
    st = status(d)
    assert (st.volumes, st.layers, st.pending_intents) == (0, 0, 0)
    assert not list((d.pool_root / "layers").iterdir())


# -- ValidateVolumeCapabilities --------------------------------------------------

def test_validate_volume_capabilities(shared: Driver) -> None:
    params = {"csi.storage.k8s.io/pvc/name": "claim"}
    vol = create(shared, "validate", params=params)
    validate = shared.controller.ValidateVolumeCapabilities
    req = csi_pb2.ValidateVolumeCapabilitiesRequest
    caps = [cap(m, block=b) for m in SINGLE_NODE_MODES for b in (False, True)]
    caps += [cap(fs_type="ext4"), cap(fs_type="xfs")]
    ok = validate(req(volume_id=vol.volume_id, volume_capabilities=caps,
                      volume_context=vol.volume_context, parameters=params))
    assert ok.HasField("confirmed")
    assert list(ok.confirmed.volume_capabilities) == caps
    assert dict(ok.confirmed.parameters) == params
    assert dict(ok.confirmed.volume_context) == dict(vol.volume_context)
    unconfirmed = [
        req(volume_id=vol.volume_id, volume_capabilities=[cap(), cap(Mode.MULTI_NODE_MULTI_WRITER)]),
        req(volume_id=vol.volume_id, volume_capabilities=[cap(Mode.MULTI_NODE_READER_ONLY,
                                                              block=True)]),
        req(volume_id=vol.volume_id, volume_capabilities=[cap(fs_type="btrfs")]),
        req(volume_id=vol.volume_id, volume_capabilities=[cap()], parameters={"other": "x"}),
        req(volume_id=vol.volume_id, volume_capabilities=[cap()],
            volume_context={"qsnap.csi.dev/node": "elsewhere"}),
        req(volume_id=vol.volume_id, volume_capabilities=[cap()], mutable_parameters={"a": "b"}),
    ]
    for r in unconfirmed:
        reply = validate(r)
        assert not reply.HasField("confirmed"), r
        assert reply.message, r
    assert code(validate, req(volume_id=vol.volume_id)) == Code.INVALID_ARGUMENT
    assert code(validate, req(volume_capabilities=[cap()])) == Code.INVALID_ARGUMENT
    assert code(validate, req(volume_id=vol.volume_id, volume_capabilities=[
        csi_pb2.VolumeCapability(access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))])) == Code.INVALID_ARGUMENT


# -- ListVolumes / GetCapacity / ControllerGetVolume ------------------------------

def test_list_volumes_pagination(driver: Driver) -> None:
    c = driver.controller
    made = [create(driver, f"page-{i}").volume_id for i in range(5)]
    everything = c.ListVolumes(csi_pb2.ListVolumesRequest())
    assert [e.volume.volume_id for e in everything.entries] == made
    assert everything.next_token == ""
    seen: list[str] = []
    sizes = []
    token = ""
    while True:
        page = c.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token))
        sizes.append(len(page.entries))
        seen += [e.volume.volume_id for e in page.entries]
        for e in page.entries:
            assert e.volume.capacity_bytes == 4 * MIB
            assert e.status.HasField("volume_condition")
            assert not e.status.volume_condition.abnormal
        token = page.next_token
        if not token:
            break
    assert sizes == [2, 2, 1]
    assert seen == made
    # A token stays valid when the volumes around it are deleted.
    first = c.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2))
    for volume_id in made[:3]:
        c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
    late = create(driver, "page-late").volume_id
    rest = c.ListVolumes(csi_pb2.ListVolumesRequest(starting_token=first.next_token))
    assert [e.volume.volume_id for e in rest.entries] == made[3:] + [late]


def test_list_bad_arguments(shared: Driver) -> None:
    c = shared.controller
    for token in ("invalid-token", "-1", "1" * 30, "abc123"):
        assert code(c.ListVolumes, csi_pb2.ListVolumesRequest(starting_token=token)) == \
            Code.ABORTED
        assert code(c.ListSnapshots, csi_pb2.ListSnapshotsRequest(starting_token=token)) == \
            Code.ABORTED
    assert code(c.ListVolumes, csi_pb2.ListVolumesRequest(max_entries=-1)) == \
        Code.INVALID_ARGUMENT
    assert code(c.ListSnapshots, csi_pb2.ListSnapshotsRequest(max_entries=-1)) == \
        Code.INVALID_ARGUMENT


def test_get_capacity(driver: Driver) -> None:
    c = driver.controller
    reply = c.GetCapacity(csi_pb2.GetCapacityRequest())
    assert reply.available_capacity > 0
    assert reply.maximum_volume_size.value == min(reply.available_capacity, 64 * TIB)
    assert reply.minimum_volume_size.value == 512
    with_caps = c.GetCapacity(csi_pb2.GetCapacityRequest(
        volume_capabilities=[cap(), cap(block=True)],
        parameters={"csi.storage.k8s.io/pvc/name": "x"}))
    assert with_caps.available_capacity > 0
    # Capabilities qsnap cannot serve have no capacity.
    none = c.GetCapacity(csi_pb2.GetCapacityRequest(
        volume_capabilities=[cap(Mode.MULTI_NODE_MULTI_WRITER)]))
    assert none.available_capacity == 0
    assert code(c.GetCapacity, csi_pb2.GetCapacityRequest(parameters={"fast": "1"})) == \
        Code.INVALID_ARGUMENT
    assert code(c.GetCapacity, csi_pb2.GetCapacityRequest(volume_capabilities=[
        csi_pb2.VolumeCapability(access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))])) == Code.INVALID_ARGUMENT


def test_volume_condition_reports_missing_layer(driver: Driver) -> None:
    vol = create(driver, "fragile")
    other = create(driver, "healthy")
    Path(top(driver, vol.volume_id)).unlink()
    got = driver.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.status.volume_condition.abnormal
    assert "missing" in got.status.volume_condition.message
    listed = {e.volume.volume_id: e.status.volume_condition
              for e in driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries}
    assert listed[vol.volume_id].abnormal
    assert not listed[other.volume_id].abnormal
    # Deleting a broken volume still works, and nothing is left over.
    for v in (vol, other):
        driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id))
    wait_empty(driver)


def test_get_volume_missing_fields(shared: Driver) -> None:
    assert code(shared.controller.ControllerGetVolume, csi_pb2.ControllerGetVolumeRequest()) == \
        Code.INVALID_ARGUMENT
    assert code(shared.inspect.DescribeVolume, qsnap_pb2.DescribeVolumeRequest()) == \
        Code.INVALID_ARGUMENT
    assert code(shared.inspect.DescribeSnapshot, qsnap_pb2.DescribeSnapshotRequest()) == \
        Code.INVALID_ARGUMENT


# -- snapshots --------------------------------------------------------------------

def test_create_snapshot(driver: Driver) -> None:
    vol = create(driver, "src", 4 * MIB)
    before = time.time_ns()
    s = snap(driver, "snap-1", vol.volume_id)
    after = time.time_ns()
    assert s.snapshot_id.startswith("s-")
    assert s.source_volume_id == vol.volume_id
    assert s.size_bytes == 4 * MIB
    assert s.ready_to_use
    assert before <= ns(s.creation_time) <= after
    details = driver.inspect.DescribeSnapshot(
        qsnap_pb2.DescribeSnapshotRequest(snapshot_id=s.snapshot_id))
    # creation_time is the cut, to the nanosecond.
    assert details.created_ns == ns(s.creation_time)
    assert details.name == "snap-1" and details.ready_to_use
    assert details.chain[0].read_only and details.chain[0].depth == 1
    # The volume went on on a new top, above the snapshot's layer.
    chain = describe(driver, vol.volume_id).chain
    assert [layer.id for layer in chain[1:]] == [layer.id for layer in details.chain]
    assert [layer.depth for layer in chain] == [2, 1]
    assert not chain[0].read_only
    got = driver.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=s.snapshot_id))
    assert got.snapshot == s


def test_create_snapshot_is_idempotent(driver: Driver) -> None:
    vol = create(driver, "src")
    other = create(driver, "other")
    s = snap(driver, "once", vol.volume_id)
    time.sleep(0.01)
    again = snap(driver, "once", vol.volume_id)
    assert again == s   # same ID, same creation_time to the nanosecond
    assert status(driver).snapshots == 1
    e = error(driver.controller.CreateSnapshot,
              csi_pb2.CreateSnapshotRequest(name="once", source_volume_id=other.volume_id))
    assert e.code() == Code.ALREADY_EXISTS
    assert code(driver.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
        name="once", source_volume_id=vol.volume_id, parameters={"csi.storage.k8s.io/x": "y"})) \
        == Code.ALREADY_EXISTS
    # The snapshot outlives its volume, and the name still means it.
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert snap(driver, "once", vol.volume_id) == s


def test_snapshot_missing_fields(shared: Driver) -> None:
    c = shared.controller
    assert code(c.CreateSnapshot, csi_pb2.CreateSnapshotRequest(source_volume_id="testId")) == \
        Code.INVALID_ARGUMENT
    assert code(c.CreateSnapshot, csi_pb2.CreateSnapshotRequest(name="name")) == \
        Code.INVALID_ARGUMENT
    assert code(c.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest()) == Code.INVALID_ARGUMENT
    assert code(c.GetSnapshot, csi_pb2.GetSnapshotRequest()) == Code.INVALID_ARGUMENT
    vol = create(shared, "snap-params")
    assert code(c.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
        name="p", source_volume_id=vol.volume_id, parameters={"zstd": "1"})) == \
        Code.INVALID_ARGUMENT


def test_delete_snapshot(driver: Driver) -> None:
    vol = create(driver, "src")
    s = snap(driver, "gone", vol.volume_id)
    for _ in range(2):
        driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=s.snapshot_id))
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=UNKNOWN_SNAPSHOT))
    driver.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id="reallyfakesnapshotid"))
    assert code(driver.controller.GetSnapshot,
                csi_pb2.GetSnapshotRequest(snapshot_id=s.snapshot_id)) == Code.NOT_FOUND
    assert status(driver).snapshots == 0


def test_list_snapshots_filters_and_pagination(driver: Driver) -> None:
    c = driver.controller
    a = create(driver, "a")
    b = create(driver, "b")
    made = []
    for i in range(5):
        made.append(snap(driver, f"a-{i}", a.volume_id))
        made.append(snap(driver, f"b-{i}", b.volume_id))
    listed = c.ListSnapshots(csi_pb2.ListSnapshotsRequest())
    assert [e.snapshot for e in listed.entries] == made and not listed.next_token
    only = c.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=made[3].snapshot_id))
    assert [e.snapshot for e in only.entries] == [made[3]]
    of_a = [s for s in made if s.source_volume_id == a.volume_id]
    both = c.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=made[3].snapshot_id,
                                                        source_volume_id=a.volume_id))
    assert not both.entries   # made[3] is b's
    for unknown in (csi_pb2.ListSnapshotsRequest(snapshot_id=UNKNOWN_SNAPSHOT),
                    csi_pb2.ListSnapshotsRequest(snapshot_id="none-exist-id"),
                    csi_pb2.ListSnapshotsRequest(source_volume_id=UNKNOWN_VOLUME),
                    csi_pb2.ListSnapshotsRequest(source_volume_id="fake-vol-id-123")):
        reply = c.ListSnapshots(unknown)
        assert not reply.entries and not reply.next_token
    # Pages of one volume's snapshots.
    pages, token = [], ""
    while True:
        page = c.ListSnapshots(csi_pb2.ListSnapshotsRequest(
            max_entries=2, starting_token=token, source_volume_id=a.volume_id))
        pages.append([e.snapshot for e in page.entries])
        token = page.next_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [s for p in pages for s in p] == of_a
    # A token, then no limit: the remainder at once (csi-sanity's check).
    first = c.ListSnapshots(csi_pb2.ListSnapshotsRequest(max_entries=2))
    rest = c.ListSnapshots(csi_pb2.ListSnapshotsRequest(starting_token=first.next_token))
    assert len(first.entries) + len(rest.entries) == len(made)
    assert [e.snapshot for e in rest.entries] == made[2:]


# -- data through CSI ------------------------------------------------------------

def test_snapshot_restore_keeps_data(driver: Driver, qemu_io: QemuIo) -> None:
    vol = create(driver, "data", 4 * MIB)
    qemu_io(top(driver, vol.volume_id), "write -P 0xaa 0 1M")
    s = snap(driver, "data-snap", vol.volume_id)
    qemu_io(top(driver, vol.volume_id), "write -P 0xbb 0 1M")
    restored = create(driver, "restored", 4 * MIB, snapshot=s.snapshot_id)
    assert restored.content_source.snapshot.snapshot_id == s.snapshot_id
    assert restored.capacity_bytes == 4 * MIB
    qemu_io(top(driver, restored.volume_id), "read -P 0xaa 0 1M")
    qemu_io(top(driver, restored.volume_id), "read -P 0 1M 3M")
    qemu_io(top(driver, vol.volume_id), "read -P 0xbb 0 1M")
    # Writing to the restored volume touches neither the snapshot nor the source.
    qemu_io(top(driver, restored.volume_id), "write -P 0xcc 0 512k")
    again = create(driver, "restored-2", 4 * MIB, snapshot=s.snapshot_id)
    qemu_io(top(driver, again.volume_id), "read -P 0xaa 0 1M")
    qemu_io(top(driver, vol.volume_id), "read -P 0xbb 0 1M")
    # The snapshot outlives its source volume; a bigger restore reads zeros past the end.
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    big = create(driver, "restored-big", 8 * MIB, snapshot=s.snapshot_id)
    assert big.capacity_bytes == 8 * MIB
    read_pattern(driver, big.volume_id, 0xAA, 0, MIB)
    read_pattern(driver, big.volume_id, 0, 4 * MIB, 4 * MIB)
    assert describe(driver, big.volume_id).chain[0].virtual_size == 8 * MIB


def test_clone_keeps_data(driver: Driver, qemu_io: QemuIo) -> None:
    vol = create(driver, "origin", 4 * MIB)
    qemu_io(top(driver, vol.volume_id), "write -P 0x11 0 2M")
    clone = create(driver, "clone", 4 * MIB, volume=vol.volume_id)
    assert clone.content_source.volume.volume_id == vol.volume_id
    assert create(driver, "clone", 4 * MIB, volume=vol.volume_id) == clone
    qemu_io(top(driver, clone.volume_id), "read -P 0x11 0 2M")
    qemu_io(top(driver, vol.volume_id), "write -P 0x22 0 1M")
    qemu_io(top(driver, clone.volume_id), "write -P 0x33 1M 1M")
    qemu_io(top(driver, clone.volume_id), "read -P 0x11 0 1M")
    qemu_io(top(driver, vol.volume_id), "read -P 0x11 1M 1M")
    # The source's old top became a shared read-only layer under both.
    src_chain, clone_chain = describe(driver, vol.volume_id).chain, describe(
        driver, clone.volume_id).chain
    assert src_chain[1].id == clone_chain[1].id and src_chain[1].read_only
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    read_pattern(driver, clone.volume_id, 0x11, 0, MIB)
    read_pattern(driver, clone.volume_id, 0x33, MIB, MIB)
    larger = create(driver, "clone-larger", 16 * MIB, volume=clone.volume_id)
    assert larger.capacity_bytes == 16 * MIB
    read_pattern(driver, larger.volume_id, 0x33, MIB, MIB)


def test_expand_volume(driver: Driver, qemu_io: QemuIo) -> None:
    c = driver.controller
    vol = create(driver, "grow", 4 * MIB, caps=[cap(fs_type="ext4")])
    qemu_io(top(driver, vol.volume_id), "write -P 0x44 3M 1M")
    snap(driver, "grow-snap", vol.volume_id)
    expand = csi_pb2.ControllerExpandVolumeRequest
    reply = c.ControllerExpandVolume(expand(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MIB)))
    assert reply.capacity_bytes == 8 * MIB
    assert reply.node_expansion_required   # a filesystem grows on the node
    got = c.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume.capacity_bytes == 8 * MIB
    assert describe(driver, vol.volume_id).chain[0].virtual_size == 8 * MIB
    qemu_io(top(driver, vol.volume_id), "read -P 0x44 3M 1M")
    qemu_io(top(driver, vol.volume_id), "read -P 0 4M 4M")
    qemu_io(top(driver, vol.volume_id), "write -P 0x55 7M 1M")
    # Never shrinks; the size it has already is fine (and repeatable).
    for rng in (csi_pb2.CapacityRange(required_bytes=2 * MIB),
                csi_pb2.CapacityRange(required_bytes=8 * MIB, limit_bytes=8 * MIB)):
        assert c.ControllerExpandVolume(expand(volume_id=vol.volume_id,
                                               capacity_range=rng)).capacity_bytes == 8 * MIB
    # The capability in the request decides what the node must do.
    block = c.ControllerExpandVolume(expand(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=9 * MIB),
        volume_capability=cap(block=True)))
    assert (block.capacity_bytes, block.node_expansion_required) == (9 * MIB, False)
    raw = create(driver, "raw", 4 * MIB, caps=[cap(block=True)])
    reply = c.ControllerExpandVolume(expand(
        volume_id=raw.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=1000 * KIB)
        ))
    assert reply.capacity_bytes == 4 * MIB and not reply.node_expansion_required
    reply = c.ControllerExpandVolume(expand(
        volume_id=raw.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=5 * MIB)))
    assert reply.capacity_bytes == 5 * MIB and not reply.node_expansion_required
    assert code(c.ControllerExpandVolume, expand(volume_id=vol.volume_id)) == \
        Code.INVALID_ARGUMENT
    assert code(c.ControllerExpandVolume, expand(
        capacity_range=csi_pb2.CapacityRange(required_bytes=MIB))) == Code.INVALID_ARGUMENT
    assert code(c.ControllerExpandVolume, expand(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=10 * MIB),
        volume_capability=cap(Mode.MULTI_NODE_MULTI_WRITER))) == Code.INVALID_ARGUMENT
    assert status(driver).provisioned_bytes == 9 * MIB + 5 * MIB


# -- deletion in any order down to an empty pool -----------------------------------

def _build_family(d: Driver, qemu_io: QemuIo) -> tuple[list[tuple[str, str]],
                                                      dict[str, list[tuple[int, int]]]]:
    """A volume with snapshots, restores and clones, each with data of its
    own.  Returns the objects as (kind, id) and the patterns each volume
    must read as (pattern, offset in MiB)."""
    a = create(d, "a", 4 * MIB).volume_id
    qemu_io(top(d, a), "write -P 0xaa 0 1M")
    s1 = snap(d, "s1", a).snapshot_id
    b = create(d, "b", 4 * MIB, snapshot=s1).volume_id
    qemu_io(top(d, b), "write -P 0xbb 1M 1M")
    c = create(d, "c", 4 * MIB, volume=a).volume_id
    qemu_io(top(d, c), "write -P 0xcc 2M 1M")
    qemu_io(top(d, a), "write -P 0xa1 3M 1M")
    s2 = snap(d, "s2", b).snapshot_id
    dd = create(d, "d", 4 * MIB, snapshot=s2).volume_id
    qemu_io(top(d, dd), "write -P 0xdd 3M 1M")
    s3 = snap(d, "s3", a).snapshot_id
    objects = [("volume", a), ("snapshot", s1), ("volume", b), ("volume", c),
               ("snapshot", s2), ("volume", dd), ("snapshot", s3)]
    expect = {a: [(0xAA, 0), (0, 1), (0, 2), (0xA1, 3)],
              b: [(0xAA, 0), (0xBB, 1), (0, 2), (0, 3)],
              c: [(0xAA, 0), (0, 1), (0xCC, 2), (0, 3)],
              dd: [(0xAA, 0), (0xBB, 1), (0, 2), (0xDD, 3)]}
    return objects, expect


@pytest.mark.parametrize("order", ["created", "reversed", "shuffle-1", "shuffle-2", "shuffle-3"])
def test_delete_in_any_order_empties_pool(driver: Driver, qemu_io: QemuIo, order: str) -> None:
    objects, expect = _build_family(driver, qemu_io)
    if order == "reversed":
        objects.reverse()
    elif order.startswith("shuffle"):
        random.Random(order).shuffle(objects)
    c = driver.controller
    remaining = set(expect)
    for kind, object_id in objects:
        if kind == "volume":
            c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=object_id))
            remaining.discard(object_id)
        else:
            c.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=object_id))
        # Whatever was deleted, every other volume still reads its own data.
        for volume_id in sorted(remaining):
            read_patterns(driver, volume_id,
                          [(pattern, mib * MIB, MIB) for pattern, mib in expect[volume_id]])
    wait_empty(driver)


# -- concurrency -------------------------------------------------------------------

def test_second_call_on_busy_volume_is_aborted(driver: Driver) -> None:
    vol = create(driver, "busy")
    c = driver.controller
    # Hold the catalog's write lock from outside so that the first call sits
    # in the engine (SQLite waits up to 5 s for it) while the others arrive.
    db = sqlite3.connect(driver.pool_root / "catalog.db", timeout=0, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
                name="first", source_volume_id=vol.volume_id))
            time.sleep(1.0)
            assert not first.done()
            others: list[tuple[Callable[..., Any], Any]] = [
                (c.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
                    name="second", source_volume_id=vol.volume_id)),
                (c.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
                    name="first", source_volume_id=vol.volume_id)),
                (c.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id)),
                (c.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=vol.volume_id,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MIB))),
                (c.CreateVolume, volume_req("clone", volume=vol.volume_id)),
            ]
            for method, req in others:
                e = error(method, req)
                assert e.code() == Code.ABORTED, (method, req)
                assert "in progress" in e.details()
            db.execute("ROLLBACK")
            made = first.result(timeout=30).snapshot
    finally:
        db.close()
    assert made.source_volume_id == vol.volume_id
    # Retried after the first finished, the aborted calls go through.
    assert snap(driver, "first", vol.volume_id) == made
    assert snap(driver, "second", vol.volume_id).snapshot_id != made.snapshot_id


def test_many_concurrent_snapshots_stay_consistent(driver: Driver) -> None:
    vol = create(driver, "hot", 4 * MIB)
    c = driver.controller
    names = [f"race-{i}" for i in range(10)]
    start = threading.Barrier(len(names))

    def attempt(name: str) -> tuple[str, Any]:
        start.wait()
        try:
            return name, snap(driver, name, vol.volume_id)
        except grpc.RpcError as e:
            return name, e.code()

    with ThreadPoolExecutor(len(names)) as pool:
        results = dict(pool.map(attempt, names))
    made = {n: r for n, r in results.items() if isinstance(r, csi_pb2.Snapshot)}
    aborted = [n for n, r in results.items() if r == Code.ABORTED]
    assert made, results
    assert len(made) + len(aborted) == len(names), results   # nothing but OK or ABORTED
    listed = c.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=vol.volume_id))
    assert {e.snapshot.snapshot_id for e in listed.entries} == \
        {s.snapshot_id for s in made.values()}
    # Each cut stacked one layer: the chain has one layer per snapshot, plus the top.
    assert len(describe(driver, vol.volume_id).chain) == len(made) + 1
    for name in aborted:
        made[name] = snap(driver, name, vol.volume_id)
    for name, s in made.items():
        assert snap(driver, name, vol.volume_id) == s
    assert status(driver).snapshots == len(names)


def test_concurrent_create_same_name(driver: Driver) -> None:
    start = threading.Barrier(8)

    def attempt(_: int) -> Any:
        start.wait()
        try:
            return create(driver, "contested", 4 * MIB).volume_id
        except grpc.RpcError as e:
            return e.code()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(8)))
    ids = {r for r in results if isinstance(r, str)}
    assert len(ids) == 1, results
    assert all(r == Code.ABORTED for r in results if not isinstance(r, str)), results
    assert status(driver).volumes == 1
    assert create(driver, "contested", 4 * MIB).volume_id in ids


# -- Inspect and restart -------------------------------------------------------------

def test_pool_status_counts(driver: Driver) -> None:
    st = status(driver)
    assert st.root == str(driver.pool_root.resolve())
    assert (st.volumes, st.snapshots, st.layers, st.garbage_layers, st.pending_intents,
            st.max_depth) == (0, 0, 0, 0, 0, 0)
    assert st.depth_cap == 16 and st.total_bytes > 0
    vol = create(driver, "counted", 4 * MIB)
    snap(driver, "counted-snap", vol.volume_id)
    st = status(driver)
    assert (st.volumes, st.snapshots, st.layers, st.max_depth) == (1, 1, 2, 2)
    assert st.provisioned_bytes == 4 * MIB and st.used_bytes > 0


def test_restart_keeps_everything(driver: Driver, qemu_io: QemuIo) -> None:
    vol = create(driver, "persist", 4 * MIB)
    qemu_io(top(driver, vol.volume_id), "write -P 0x77 0 1M")
    s = snap(driver, "persist-snap", vol.volume_id)
    second = create(driver, "persist-2", 4 * MIB)
    page = driver.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=1))
    assert page.next_token
    driver.restart()
    assert create(driver, "persist", 4 * MIB) == vol
    assert snap(driver, "persist-snap", vol.volume_id) == s   # same creation_time too
    # Tokens survive a restart as well.
    rest = driver.controller.ListVolumes(
        csi_pb2.ListVolumesRequest(starting_token=page.next_token))
    assert [e.volume for e in rest.entries] == [second]
    restored = create(driver, "after-restart", snapshot=s.snapshot_id)
    qemu_io(top(driver, restored.volume_id), "read -P 0x77 0 1M")


# -- error mapping -----------------------------------------------------------------

def test_every_engine_error_has_one_code() -> None:
    import engine.errors as ee
    from csidriver.errors import RpcError, status_for
    expected = {
        ee.InvalidArgument: Code.INVALID_ARGUMENT, ee.NotFound: Code.NOT_FOUND,
        ee.AlreadyExists: Code.ALREADY_EXISTS, ee.OutOfRange: Code.OUT_OF_RANGE,
        ee.PoolFull: Code.RESOURCE_EXHAUSTED, ee.FailedPrecondition: Code.FAILED_PRECONDITION,
        ee.InUse: Code.FAILED_PRECONDITION, ee.Busy: Code.ABORTED, ee.ImageError: Code.INTERNAL,
        ee.CatalogCorrupt: Code.INTERNAL, ee.EngineError: Code.INTERNAL,
    }
    defined = {c for c in vars(ee).values() if isinstance(c, type) and issubclass(c, ee.EngineError)}
    assert defined == set(expected), "a new engine error needs its code in csidriver/errors.py"
    for cls, want in expected.items():
        got, message = status_for(cls("the reason"), "SomeRpc")
        assert got == want, cls
        assert "the reason" in message

    class Narrower(ee.NotFound):
        pass
    assert status_for(Narrower("x"))[0] == Code.NOT_FOUND
    got, message = status_for(KeyError("internal detail"), "CreateVolume")
    assert got == Code.INTERNAL
    assert "CreateVolume" in message and "internal detail" not in message
    assert status_for(RpcError(Code.UNIMPLEMENTED, "no"))[0] == Code.UNIMPLEMENTED


# Whatever libvirt's state, a top held by a process that is not the
# driver's own refuses every change: libvirt up but no domain uses the file
# (the host's libvirtd, if any), libvirt unreachable, libvirt turned off.
@pytest.mark.parametrize("libvirt", ["default", "unreachable", "none"])
def test_open_volume_is_failed_precondition(driver_factory: DriverFactory, libvirt: str) -> None:
    flags = {"default": (),
             "unreachable": ("--libvirt-uri", "qemu:///system?socket=/nonexistent/libvirt-sock"),
             "none": ("--libvirt-uri", "none")}[libvirt]
    driver = driver_factory(*flags)
    vol = create(driver, "in-use")
    # A QEMU process other than the driver's own has the top open for
    # writing (as a domain that opened the file directly would): nothing may
    # switch or change it behind that process's back.
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(top(driver, vol.volume_id))],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not image_locks(top(driver, vol.volume_id)).writer:
            assert time.monotonic() < deadline, "qemu-io did not open the image"
            time.sleep(0.05)
        c = driver.controller
        for method, req in [
            (c.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id)),
            (c.CreateSnapshot, csi_pb2.CreateSnapshotRequest(name="s",
                                                             source_volume_id=vol.volume_id)),
            (c.CreateVolume, volume_req("clone", volume=vol.volume_id)),
            (c.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
                volume_id=vol.volume_id,
                capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MIB))),
        ]:
            e = error(method, req)
            assert e.code() == Code.FAILED_PRECONDITION, method
            assert "is open" in e.details(), e.details()
    finally:
        holder.communicate(b"quit\n", timeout=30)
    # Nothing was made while it was open, and once it is closed all works.
    assert list(driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries) == []
    driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=vol.volume_id))
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_broken_layer_is_internal_with_a_clear_message(driver: Driver) -> None:
    vol = create(driver, "broken")
    with open(top(driver, vol.volume_id), "r+b") as f:
        f.write(b"not a qcow2 header")
    e = error(driver.controller.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MIB)))
    assert e.code() == Code.INTERNAL
    assert e.details().startswith("image tool failure: ")
    assert "not in qcow2 format" in e.details()
    assert "Traceback" not in e.details()
    # The traceback is in the driver's log, next to the RPC's own line.
    log = driver.log()
    assert "ControllerExpandVolume failed" in log and "Traceback" in log
    assert f"volume_id={vol.volume_id} code=INTERNAL" in log
    # The volume is still there, unchanged.
    got = driver.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume.capacity_bytes == 4 * MIB
