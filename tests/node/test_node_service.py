"""The CSI Node service against the real parts: qemu-storage-daemon, FUSE
exports, loop devices, ext4 and xfs, real mounts and binds.

Every test uses its own server (``driver_factory``) with its own pool and
node run directory under /tmp; the fixture takes down whatever a failing
test leaves (``conftest.release_node``).  Volumes are small: ext4 64 MiB,
xfs 320 MiB (mkfs.xfs refuses less than 300 MB), thin in the pool.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import shutil
import stat
from pathlib import Path

import grpc
import pytest

from rootconf import (Driver, DriverFactory, block_cap, code_of, create_volume, loops_under,
                      mount_cap, mountinfo, mounts_of, publish, stage, unpublish,
                      unstage)
from csidriver.pb import csi_pb2, qsnap_pb2

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/loop-control").exists()
    or not Path("/dev/fuse").exists() or shutil.which("qemu-storage-daemon") is None
    or shutil.which("mkfs.xfs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None,
    reason="needs root, loop devices, FUSE, qemu-storage-daemon, e2fsprogs and xfsprogs")

Code = grpc.StatusCode
Mode = csi_pb2.VolumeCapability.AccessMode
NodeRPC = csi_pb2.NodeServiceCapability.RPC
Usage = csi_pb2.VolumeUsage
MiB = 1 << 20
SIZES = {"ext4": 64 * MiB, "xfs": 320 * MiB, "block": 64 * MiB}
TOPOLOGY_KEY = "topology.qsnap.csi.dev/node"


# -- helpers -----------------------------------------------------------------

def stats(d: Driver, volume_id: str, path: Path) -> csi_pb2.NodeGetVolumeStatsResponse:
    return d.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume_id, volume_path=str(path)))


def mount_at(path: Path) -> dict[str, str] | None:
    found = None
    for m in mountinfo():
        if m["point"] == os.path.realpath(path):
            found = m
    return found


def mount_options(path: Path) -> set[str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4] == os.path.realpath(path):
            options = set(fields[5].split(","))
            sep = fields.index("-", 6)
            options |= set(fields[sep + 3].split(","))
    return options


def assert_nothing_left(d: Driver) -> None:
    """No loop device, mount or FUSE export of the node's run directory."""
    assert loops_under(d.run_dir) == {}
    assert mounts_of(d.run_dir) == []


# -- mount and block round trips ------------------------------------------------

@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_mount_volume_round_trip(driver: Driver, node_paths: Path, fs_type: str) -> None:
    cap = mount_cap(fs_type, flags=("noatime",))
    vol = create_volume(driver, f"m-{fs_type}", SIZES[fs_type], cap)
    staging, target = node_paths / "staging", node_paths / "pods" / "target"
    staging.mkdir()
    stage(driver, vol, staging, cap)
    mounted = mount_at(staging)
    assert mounted is not None and mounted["fstype"] == fs_type
    assert mounted["source"].startswith("/dev/loop")
    assert "noatime" in mount_options(staging)
    # Idempotent: the same call again changes nothing.
    stage(driver, vol, staging, cap)
    assert mount_at(staging) == mounted

    publish(driver, vol, staging, target, cap)
    publish(driver, vol, staging, target, cap)
    (target / "hello").write_text("from the workload")
    assert (staging / "hello").read_text() == "from the workload"

    for path in (staging, target):
        reply = stats(driver, vol, path)
        units = {u.unit: u for u in reply.usage}
        assert set(units) == {Usage.BYTES, Usage.INODES}
        assert 0 < units[Usage.BYTES].total <= SIZES[fs_type]
        assert units[Usage.BYTES].used > 0 and units[Usage.BYTES].available > 0
        assert units[Usage.INODES].total > 0 and units[Usage.INODES].used > 0
        assert not reply.volume_condition.abnormal, reply.volume_condition.message

    unpublish(driver, vol, target)
    assert not target.exists()
    unpublish(driver, vol, target)   # idempotent
    unstage(driver, vol, staging)
    assert mount_at(staging) is None
    unstage(driver, vol, staging)    # idempotent
    assert_nothing_left(driver)
    # The volume is closed again: it can be deleted.
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol))


def test_block_volume_round_trip(driver: Driver, node_paths: Path) -> None:
    cap = block_cap()
    vol = create_volume(driver, "b", SIZES["block"], cap)
    staging, target = node_paths / "staging", node_paths / "pods" / "dev"
    stage(driver, vol, staging, cap)
    stage(driver, vol, staging, cap)
    publish(driver, vol, staging, target, cap)
    publish(driver, vol, staging, target, cap)
    assert stat.S_ISBLK(target.stat().st_mode)
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xa5" * 4096, 8 * MiB)
        os.fsync(fd)
        assert os.pread(fd, 4096, 8 * MiB) == b"\xa5" * 4096
        assert os.lseek(fd, 0, os.SEEK_END) == SIZES["block"]
    finally:
        os.close(fd)
    reply = stats(driver, vol, target)
    assert [(u.unit, u.total) for u in reply.usage] == [(Usage.BYTES, SIZES["block"])]
    assert not reply.volume_condition.abnormal
    unpublish(driver, vol, target)
    assert not target.exists()
    unstage(driver, vol, staging)
    assert_nothing_left(driver)


def test_data_survives_unstage_and_restage(driver: Driver, node_paths: Path) -> None:
    """A filesystem is made once: staging a volume with data never formats it."""
    cap = mount_cap("ext4")
    vol = create_volume(driver, "keep", SIZES["ext4"], cap)
    staging = node_paths / "staging"
    stage(driver, vol, staging, cap)
    (staging / "kept").write_bytes(b"x" * 5000)
    unstage(driver, vol, staging)
    stage(driver, vol, staging, mount_cap(""))   # "" = whatever it holds
    assert (staging / "kept").read_bytes() == b"x" * 5000
    unstage(driver, vol, staging)
    # Asking for another filesystem than it holds is refused, not formatted,
    # and the refused staging leaves nothing (the CO may well not unstage).
    assert code_of(stage, driver, vol, staging, mount_cap("xfs")) == Code.FAILED_PRECONDITION
    assert_nothing_left(driver)
    assert driver.inspect.DescribeVolume(
        qsnap_pb2.DescribeVolumeRequest(volume_id=vol)).owner == "closed"
    unstage(driver, vol, staging)
    stage(driver, vol, staging, cap)
    assert (staging / "kept").read_bytes() == b"x" * 5000
    unstage(driver, vol, staging)
    assert_nothing_left(driver)


def test_read_only_publish_and_reader_only_stage(driver: Driver, node_paths: Path) -> None:
    cap = mount_cap("ext4")
    vol = create_volume(driver, "ro", SIZES["ext4"], cap)
    staging, rw, ro = node_paths / "staging", node_paths / "rw", node_paths / "ro"
    stage(driver, vol, staging, cap)
    publish(driver, vol, staging, rw, cap)
    publish(driver, vol, staging, ro, cap, readonly=True)
    (rw / "f").write_text("w")
    with pytest.raises(OSError) as e:
        (ro / "g").write_text("no")
    assert e.value.errno == errno.EROFS
    assert (ro / "f").read_text() == "w"
    # The same target with the other read-only state is incompatible.
    assert code_of(publish, driver, vol, staging, ro, cap, False) == Code.ALREADY_EXISTS
    unpublish(driver, vol, rw)
    unpublish(driver, vol, ro)
    unstage(driver, vol, staging)

    reader = mount_cap("ext4", mode=Mode.SINGLE_NODE_READER_ONLY)
    stage(driver, vol, staging, reader)
    assert "ro" in mount_options(staging)
    publish(driver, vol, staging, rw, reader)   # readonly unset, the mode decides
    with pytest.raises(OSError) as e:
        (rw / "h").write_text("no")
    assert e.value.errno == errno.EROFS
    assert (rw / "f").read_text() == "w"
    unpublish(driver, vol, rw)
    unstage(driver, vol, staging)
    assert_nothing_left(driver)


def test_conflicting_requests(driver: Driver, node_paths: Path) -> None:
    cap = mount_cap("ext4")
    vol = create_volume(driver, "c", SIZES["ext4"], cap)
    other = create_volume(driver, "c2", SIZES["ext4"], cap)
    staging, target = node_paths / "staging", node_paths / "target"
    # Not staged yet: publishing has nothing to bind.
    assert code_of(publish, driver, vol, staging, target, cap) == Code.FAILED_PRECONDITION
    stage(driver, vol, staging, cap)
    # Staged elsewhere, or with another capability, is incompatible.
    assert code_of(stage, driver, vol, node_paths / "elsewhere", cap) == Code.ALREADY_EXISTS
    assert code_of(stage, driver, vol, staging, mount_cap("ext4", ("noatime",))) \
        == Code.ALREADY_EXISTS
    assert code_of(stage, driver, vol, staging, block_cap()) == Code.ALREADY_EXISTS
    # Publishing with the other access type than it is staged with.
    assert code_of(publish, driver, vol, staging, target, block_cap()) == Code.INVALID_ARGUMENT
    # Publishing from the wrong staging path.
    assert code_of(publish, driver, vol, node_paths / "elsewhere", target, cap) \
        == Code.FAILED_PRECONDITION
    publish(driver, vol, staging, target, cap)
    # SINGLE_NODE_SINGLE_WRITER: one target only.
    single = mount_cap("ext4", mode=Mode.SINGLE_NODE_SINGLE_WRITER)
    assert code_of(publish, driver, vol, staging, node_paths / "second", single) \
        == Code.FAILED_PRECONDITION
    publish(driver, vol, staging, target, single)          # the same target is fine
    # Another volume cannot take this one's staging path or target.
    assert code_of(stage, driver, other, staging, cap) == Code.FAILED_PRECONDITION
    assert code_of(publish, driver, other, node_paths / "s2", target, cap) \
        == Code.FAILED_PRECONDITION
    assert mount_at(staging) is not None and mount_at(target) is not None
    # Still published: cannot unstage, delete, or unpublish the staging path.
    assert code_of(unstage, driver, vol, staging) == Code.FAILED_PRECONDITION
    assert code_of(driver.controller.DeleteVolume,
                   csi_pb2.DeleteVolumeRequest(volume_id=vol)) == Code.FAILED_PRECONDITION
    assert code_of(unpublish, driver, vol, staging) == Code.INVALID_ARGUMENT
    # Unstaging from another path than it is staged at.
    unpublish(driver, vol, target)
    assert code_of(unstage, driver, vol, node_paths / "elsewhere") == Code.FAILED_PRECONDITION
    unstage(driver, vol, staging)
    assert_nothing_left(driver)


# -- every RPC with bad input ---------------------------------------------------

def test_bad_input_gets_the_spec_codes(driver_factory: DriverFactory, node_paths: Path) -> None:
    d = driver_factory()
    cap = mount_cap("ext4")
    vol = create_volume(d, "bad", SIZES["ext4"], cap)
    staging, target = str(node_paths / "staging"), str(node_paths / "target")
    pool, run = str(d.pool_root), str(d.run_dir)
    unknown = "v-" + "0" * 32
    N = d.node
    Stage = csi_pb2.NodeStageVolumeRequest
    Unstage = csi_pb2.NodeUnstageVolumeRequest
    Publish = csi_pb2.NodePublishVolumeRequest
    Unpublish = csi_pb2.NodeUnpublishVolumeRequest
    Stats = csi_pb2.NodeGetVolumeStatsRequest
    Expand = csi_pb2.NodeExpandVolumeRequest
    no_access_type = csi_pb2.VolumeCapability(access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
    no_mode = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume())
    group = mount_cap("ext4")
    group.mount.volume_mount_group = "1000"
    bad = Code.INVALID_ARGUMENT
    cases = [
        # NodeStageVolume
        (N.NodeStageVolume, Stage(staging_target_path=staging, volume_capability=cap), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, volume_capability=cap), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, staging_target_path=staging), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, staging_target_path="rel/path",
                                  volume_capability=cap), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, staging_target_path=staging + "/../x",
                                  volume_capability=cap), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, staging_target_path=pool + "/layers",
                                  volume_capability=cap), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, staging_target_path=run + "/exports/x",
                                  volume_capability=cap), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, staging_target_path="/",
                                  volume_capability=cap), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, staging_target_path=staging,
                                  volume_capability=no_access_type), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, staging_target_path=staging,
                                  volume_capability=no_mode), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, staging_target_path=staging,
                                  volume_capability=mount_cap("btrfs")), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, staging_target_path=staging,
                                  volume_capability=mount_cap(
                                      "ext4", mode=Mode.MULTI_NODE_MULTI_WRITER)), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, staging_target_path=staging,
                                  volume_capability=mount_cap("ext4", ("bind",))), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, staging_target_path=staging,
                                  volume_capability=mount_cap("ext4", ("noatime,dev",))), bad),
        (N.NodeStageVolume, Stage(volume_id=vol, staging_target_path=staging,
                                  volume_capability=group), bad),
        (N.NodeStageVolume, Stage(volume_id=unknown, staging_target_path=staging,
                                  volume_capability=cap), Code.NOT_FOUND),
        # NodeUnstageVolume
        (N.NodeUnstageVolume, Unstage(staging_target_path=staging), bad),
        (N.NodeUnstageVolume, Unstage(volume_id=vol), bad),
        (N.NodeUnstageVolume, Unstage(volume_id=vol, staging_target_path="rel"), bad),
        (N.NodeUnstageVolume, Unstage(volume_id=unknown, staging_target_path=staging),
         Code.NOT_FOUND),
        # NodePublishVolume
        (N.NodePublishVolume, Publish(target_path=target, staging_target_path=staging,
                                      volume_capability=cap), bad),
        (N.NodePublishVolume, Publish(volume_id=vol, staging_target_path=staging,
                                      volume_capability=cap), bad),
        (N.NodePublishVolume, Publish(volume_id=vol, target_path=target,
                                      staging_target_path=staging), bad),
        (N.NodePublishVolume, Publish(volume_id=vol, target_path=target,
                                      volume_capability=cap), bad),
        (N.NodePublishVolume, Publish(volume_id=vol, target_path="t", staging_target_path=staging,
                                      volume_capability=cap), bad),
        (N.NodePublishVolume, Publish(volume_id=vol, target_path=target + "/../../etc",
                                      staging_target_path=staging, volume_capability=cap), bad),
        (N.NodePublishVolume, Publish(volume_id=vol, target_path=pool,
                                      staging_target_path=staging, volume_capability=cap), bad),
        (N.NodePublishVolume, Publish(volume_id=vol, target_path=run,
                                      staging_target_path=staging, volume_capability=cap), bad),
        (N.NodePublishVolume, Publish(volume_id=vol, target_path=staging + "/in",
                                      staging_target_path=staging, volume_capability=cap), bad),
        (N.NodePublishVolume, Publish(volume_id=vol, target_path=target,
                                      staging_target_path=staging,
                                      volume_capability=mount_cap("ntfs")), bad),
        (N.NodePublishVolume, Publish(volume_id=unknown, target_path=target,
                                      staging_target_path=staging, volume_capability=cap),
         Code.NOT_FOUND),
        # NodeUnpublishVolume
        (N.NodeUnpublishVolume, Unpublish(target_path=target), bad),
        (N.NodeUnpublishVolume, Unpublish(volume_id=vol), bad),
        (N.NodeUnpublishVolume, Unpublish(volume_id=vol, target_path="x/y"), bad),
        (N.NodeUnpublishVolume, Unpublish(volume_id=vol, target_path=pool + "/catalog.db"), bad),
        (N.NodeUnpublishVolume, Unpublish(volume_id=unknown, target_path=target),
         Code.NOT_FOUND),
        # NodeGetVolumeStats
        (N.NodeGetVolumeStats, Stats(volume_path=target), bad),
        (N.NodeGetVolumeStats, Stats(volume_id=vol), bad),
        (N.NodeGetVolumeStats, Stats(volume_id=unknown, volume_path=target), Code.NOT_FOUND),
        (N.NodeGetVolumeStats, Stats(volume_id=vol, volume_path=target), Code.NOT_FOUND),
        # NodeExpandVolume
        (N.NodeExpandVolume, Expand(volume_path=target), bad),
        (N.NodeExpandVolume, Expand(volume_id=vol), bad),
        (N.NodeExpandVolume, Expand(volume_id=vol, volume_path=target,
                                    volume_capability=no_access_type), bad),
        (N.NodeExpandVolume, Expand(volume_id=unknown, volume_path=target), Code.NOT_FOUND),
        (N.NodeExpandVolume, Expand(volume_id=vol, volume_path=target), Code.NOT_FOUND),
    ]
    wrong = [(type(req).__name__, str(req), code_of(call, req).name, want.name)
             for call, req, want in cases if code_of(call, req) != want]
    assert wrong == []

    # Staged: a path it is not at is NOT_FOUND; growth it has not had is OUT_OF_RANGE.
    stage(d, vol, Path(staging), cap)
    assert code_of(N.NodeGetVolumeStats, Stats(volume_id=vol, volume_path=target)) \
        == Code.NOT_FOUND
    assert code_of(N.NodeExpandVolume, Expand(
        volume_id=vol, volume_path=staging,
        capacity_range=csi_pb2.CapacityRange(required_bytes=SIZES["ext4"] * 2))) \
        == Code.OUT_OF_RANGE
    assert code_of(N.NodeExpandVolume, Expand(volume_id=vol, volume_path=staging)) == Code.OK
    unstage(d, vol, Path(staging))
    assert_nothing_left(d)
    assert not d.unknown_calls()


# -- capabilities, info, topology ------------------------------------------------

def test_capabilities_info_and_health(driver_factory: DriverFactory) -> None:
    from grpc_health.v1 import health_pb2

    d = driver_factory("--max-volumes", "7")
    caps = d.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    assert {c.rpc.type for c in caps.capabilities} == {
        NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.GET_VOLUME_STATS, NodeRPC.EXPAND_VOLUME,
        NodeRPC.VOLUME_CONDITION, NodeRPC.SINGLE_NODE_MULTI_WRITER}
    info = d.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == d.nodeid
    assert info.max_volumes_per_node == 7
    assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: d.nodeid}
    plugin = d.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    Service = csi_pb2.PluginCapability.Service
    assert {c.service.type for c in plugin.capabilities if c.HasField("service")} == {
        Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
        Service.GROUP_CONTROLLER_SERVICE}
    assert [c.volume_expansion.type for c in plugin.capabilities
            if c.HasField("volume_expansion")] == [csi_pb2.PluginCapability.VolumeExpansion.ONLINE]
    reply = d.health.Check(health_pb2.HealthCheckRequest(service="csi.v1.Node"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert driver_factory().node.NodeGetInfo(
        csi_pb2.NodeGetInfoRequest()).max_volumes_per_node == 0   # default: no limit


def test_topology(driver: Driver) -> None:
    here = csi_pb2.Topology(segments={TOPOLOGY_KEY: driver.nodeid})
    there = csi_pb2.Topology(segments={TOPOLOGY_KEY: "another-node"})
    cap = mount_cap()

    def create_with(name: str, source: csi_pb2.VolumeContentSource | None = None,
                    requisite=(), preferred=()) -> csi_pb2.Volume:
        req = csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[cap],
            capacity_range=csi_pb2.CapacityRange(required_bytes=MiB),
            accessibility_requirements=csi_pb2.TopologyRequirement(
                requisite=list(requisite), preferred=list(preferred)))
        if source is not None:
            req.volume_content_source.CopyFrom(source)
        return driver.controller.CreateVolume(req).volume

    plain = create_with("plain")
    assert [dict(t.segments) for t in plain.accessible_topology] == [dict(here.segments)]
    assert create_with("req", requisite=[there, here], preferred=[here]).accessible_topology
    assert create_with("pref", preferred=[here]).accessible_topology
    for kwargs in ({"requisite": [there]}, {"preferred": [there]},
                   {"requisite": [there], "preferred": [there]}):
        with pytest.raises(grpc.RpcError) as e:
            create_with("elsewhere", **kwargs)
        assert e.value.code() == Code.RESOURCE_EXHAUSTED
        assert driver.nodeid in e.value.details()

    # Restores and clones land on the source's node, which is this one.
    snap = driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=plain.volume_id)).snapshot
    from_snap = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))
    from_vol = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=plain.volume_id))
    for i, source in enumerate((from_snap, from_vol)):
        with pytest.raises(grpc.RpcError) as e:
            create_with(f"copy-{i}", source, requisite=[there])
        assert e.value.code() == Code.RESOURCE_EXHAUSTED
        made = create_with(f"copy-{i}", source, requisite=[here])
        assert [dict(t.segments) for t in made.accessible_topology] == [dict(here.segments)]

    # Capacity exists only in this node's segment.
    def capacity(topology: csi_pb2.Topology | None) -> int:
        req = csi_pb2.GetCapacityRequest(volume_capabilities=[cap])
        if topology is not None:
            req.accessible_topology.CopyFrom(topology)
        return driver.controller.GetCapacity(req).available_capacity
    assert capacity(here) > 0 and capacity(None) > 0
    assert capacity(there) == 0


# -- concurrency -----------------------------------------------------------------

def test_concurrent_calls_on_one_volume_are_aborted(driver: Driver, node_paths: Path) -> None:
    """A second call on a volume that is being staged answers ABORTED."""
    outcomes: set[Code] = set()
    for i in range(3):
        cap = mount_cap("xfs")     # mkfs.xfs keeps the first call busy long enough
        vol = create_volume(driver, f"busy-{i}", SIZES["xfs"], cap)
        staging = node_paths / f"s{i}"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(code_of, stage, driver, vol, staging, cap) for _ in range(2)]
            codes = sorted((f.result() for f in calls), key=lambda c: c.value[0])
        outcomes |= set(codes)
        assert Code.OK in codes and set(codes) <= {Code.OK, Code.ABORTED}
        stage(driver, vol, staging, cap)   # the retry the CO makes
        unstage(driver, vol, staging)
        if Code.ABORTED in codes:
            break
    assert Code.ABORTED in outcomes
    assert_nothing_left(driver)


# -- expansion -------------------------------------------------------------------

def _expand(d: Driver, vol: str, size: int, path: Path) -> int:
    grown = d.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol, capacity_range=csi_pb2.CapacityRange(required_bytes=size)))
    assert grown.capacity_bytes == size
    return d.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol, volume_path=str(path),
        capacity_range=csi_pb2.CapacityRange(required_bytes=size))).capacity_bytes


def test_online_expansion_xfs_and_block(driver: Driver, node_paths: Path) -> None:
    cap = mount_cap("xfs")
    vol = create_volume(driver, "grow-xfs", SIZES["xfs"], cap)
    staging, target = node_paths / "staging", node_paths / "target"
    stage(driver, vol, staging, cap)
    publish(driver, vol, staging, target, cap)
    (target / "before").write_text("kept")
    before = os.statvfs(target)
    assert _expand(driver, vol, 2 * SIZES["xfs"], target) == 2 * SIZES["xfs"]
    after = os.statvfs(target)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + SIZES["xfs"] // 2
    assert (target / "before").read_text() == "kept"
    unpublish(driver, vol, target)
    unstage(driver, vol, staging)

    bcap = block_cap()
    bvol = create_volume(driver, "grow-block", SIZES["block"], bcap)
    bstaging, dev = node_paths / "bstaging", node_paths / "dev"
    stage(driver, bvol, bstaging, bcap)
    publish(driver, bvol, bstaging, dev, bcap)
    assert _expand(driver, bvol, 2 * SIZES["block"], dev) == 2 * SIZES["block"]
    with open(dev, "rb") as f:
        assert f.seek(0, os.SEEK_END) == 2 * SIZES["block"]
    unpublish(driver, bvol, dev)
    unstage(driver, bvol, bstaging)
    assert_nothing_left(driver)


def _has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return True


def test_online_expansion_ext4(driver: Driver, node_paths: Path) -> None:
    """Online ext4 growth needs CAP_SYS_RESOURCE (the resize ioctl checks
    it).  Without it -- as on the project's machines, root in a VM without
    that capability -- the image and the device grow, and NodeExpandVolume
    answers INTERNAL with a message that names the capability, leaving the
    filesystem as it was and usable.  With it, the filesystem grows."""
    cap = mount_cap("ext4")
    vol = create_volume(driver, "grow-ext4", SIZES["ext4"], cap)
    staging = node_paths / "staging"
    stage(driver, vol, staging, cap)
    (staging / "f").write_text("kept")
    before = os.statvfs(staging).f_blocks
    if _has_cap_sys_resource():
        assert _expand(driver, vol, 2 * SIZES["ext4"], staging) == 2 * SIZES["ext4"]
        assert os.statvfs(staging).f_blocks > before
    else:
        with pytest.raises(grpc.RpcError) as e:
            _expand(driver, vol, 2 * SIZES["ext4"], staging)
        assert e.value.code() == Code.INTERNAL
        assert "CAP_SYS_RESOURCE" in e.value.details()
        assert os.statvfs(staging).f_blocks == before
        (staging / "g").write_text("still writable")
    assert (staging / "f").read_text() == "kept"
    unstage(driver, vol, staging)
    assert_nothing_left(driver)
