"""Snapshots, clones and restores of volumes in use, against the real parts.

A staged volume is open in the node's qemu-storage-daemon, so CreateSnapshot
(and a clone's cut) switch its top through QMP while a writer keeps writing.
What must hold:

* with ``qsnap.csi.dev/fsfreeze: "true"`` the cut is filesystem-consistent:
  the restored ext4 passes ``e2fsck -n -f`` untouched, and the snapshot
  records the indication "FilesystemFrozen";
* without it the cut is crash-consistent: the restored filesystem needs its
  journal replayed (so no e2fsck -n there), mounts, and holds every file
  that was fsynced before the cut;
* for a block volume, the bytes written and fsynced before the cut are
  exactly the restored volume's, whatever was written after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from rootconf import (Driver, Writer, block_cap, check_files, create_volume, loops_under,
                      mount_cap, mounts_of, publish, stage, unpublish, unstage)
from csidriver.pb import csi_pb2, qsnap_pb2

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/loop-control").exists()
    or not Path("/dev/fuse").exists() or shutil.which("qemu-storage-daemon") is None
    or shutil.which("e2fsck", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None
    or shutil.which("mkfs.xfs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None,
    reason="needs root, loop devices, FUSE, qemu-storage-daemon, e2fsprogs and xfsprogs")

MiB = 1 << 20
FSFREEZE = "qsnap.csi.dev/fsfreeze"
SBIN = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def snapshot(d: Driver, name: str, volume_id: str, **parameters: str) -> csi_pb2.Snapshot:
    return d.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=name, source_volume_id=volume_id, parameters=parameters)).snapshot


def from_snapshot(snapshot_id: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


def from_volume(volume_id: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume_id))


def indications(d: Driver, snapshot_id: str) -> list[str]:
    return list(d.inspect.DescribeSnapshot(
        qsnap_pb2.DescribeSnapshotRequest(snapshot_id=snapshot_id)).indications)


def e2fsck(device: Path) -> subprocess.CompletedProcess[str]:
    """``e2fsck -n -f``: look, change nothing, check even a clean filesystem."""
    return subprocess.run([shutil.which("e2fsck", path=SBIN) or "e2fsck", "-n", "-f",
                           str(device)], capture_output=True, text=True, timeout=300,
                          check=False, stdin=subprocess.DEVNULL)


def assert_nothing_left(d: Driver) -> None:
    assert loops_under(d.run_dir) == {}
    assert mounts_of(d.run_dir) == []


def _snapshot_while_writing(d: Driver, root: Path, fs_type: str, size: int,
                            **parameters: str) -> tuple[str, csi_pb2.Snapshot, int]:
    """A published filesystem, a writer on it, a snapshot in the middle.
    Returns the snapshot and how many files were durable before the cut."""
    cap = mount_cap(fs_type)
    vol = create_volume(d, f"src-{fs_type}", size, cap)
    staging, target = root / "staging", root / "target"
    stage(d, vol, staging, cap)
    publish(d, vol, staging, target, cap)
    writer = Writer(target)
    writer.start()
    try:
        writer.wait_for(20)
        durable = writer.done          # fsynced before the cut began
        snap = snapshot(d, f"snap-{fs_type}", vol, **parameters)
        # The workload was not stopped: it keeps writing after the cut.
        writer.wait_for(writer.done + 10)
    finally:
        written = writer.finish()
    assert writer.error is None, f"the writer failed: {writer.error}"
    assert snap.ready_to_use and snap.source_volume_id == vol
    check_files(target, written)       # the source keeps every file
    unpublish(d, vol, target)
    unstage(d, vol, staging)
    return vol, snap, durable


def test_frozen_snapshot_while_writing_is_filesystem_consistent(driver: Driver,
                                                                node_paths: Path) -> None:
    vol, snap, durable = _snapshot_while_writing(driver, node_paths, "ext4", 64 * MiB,
                                                 **{FSFREEZE: "true"})
    assert "FilesystemFrozen" in indications(driver, snap.snapshot_id)
    restored = create_volume(driver, "restored", 64 * MiB, mount_cap("ext4"),
                             from_snapshot(snap.snapshot_id))

    # As a block device first: nothing has mounted (and so repaired) it yet.
    staging, device = node_paths / "r-block", node_paths / "r-dev"
    stage(driver, restored, staging, block_cap())
    publish(driver, restored, staging, device, block_cap())
    checked = e2fsck(device)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    unpublish(driver, restored, device)
    unstage(driver, restored, staging)

    staging, target = node_paths / "r-staging", node_paths / "r-target"
    stage(driver, restored, staging, mount_cap("ext4"))
    publish(driver, restored, staging, target, mount_cap("ext4"))
    check_files(target, durable)
    unpublish(driver, restored, target)
    unstage(driver, restored, staging)
    assert_nothing_left(driver)


@pytest.mark.parametrize("fs_type, size", [("ext4", 64 * MiB), ("xfs", 320 * MiB)])
def test_snapshot_while_writing_is_crash_consistent(driver: Driver, node_paths: Path,
                                                    fs_type: str, size: int) -> None:
    vol, snap, durable = _snapshot_while_writing(driver, node_paths, fs_type, size)
    assert "FilesystemFrozen" not in indications(driver, snap.snapshot_id)
    restored = create_volume(driver, "restored", size, mount_cap(fs_type),
                             from_snapshot(snap.snapshot_id))
    staging = node_paths / "r-staging"
    # Mounting replays the journal (or the xfs log) of the cut.
    stage(driver, restored, staging, mount_cap(fs_type))
    check_files(staging, durable)
    unstage(driver, restored, staging)
    assert_nothing_left(driver)


def test_block_snapshot_and_clone_of_a_served_volume(driver: Driver, node_paths: Path) -> None:
    size = 64 * MiB
    cap = block_cap()
    vol = create_volume(driver, "blk", size, cap)
    staging, device = node_paths / "staging", node_paths / "dev"
    stage(driver, vol, staging, cap)
    publish(driver, vol, staging, device, cap)
    offsets = [0, 4096, 7 * MiB + 512, size - 65536]

    def write(pattern: int) -> None:
        fd = os.open(device, os.O_RDWR)
        try:
            for offset in offsets:
                os.pwrite(fd, bytes([pattern]) * 65536, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(path: Path) -> list[bytes]:
        fd = os.open(path, os.O_RDONLY)
        try:
            return [os.pread(fd, 65536, offset) for offset in offsets]
        finally:
            os.close(fd)

    write(0xA1)
    snap = snapshot(driver, "blk-a", vol)
    write(0xB2)
    clone = create_volume(driver, "blk-clone", size, cap, from_volume(vol))   # cut again, live
    write(0xC3)
    assert read(device) == [b"\xc3" * 65536] * len(offsets)
    described = driver.inspect.DescribeVolume(qsnap_pb2.DescribeVolumeRequest(volume_id=vol))
    assert described.owner == "served" and len(described.chain) == 3

    restored = create_volume(driver, "blk-restored", size, cap, from_snapshot(snap.snapshot_id))
    for volume_id, want in ((restored, 0xA1), (clone, 0xB2)):
        r_staging, r_device = node_paths / f"s-{want}", node_paths / f"d-{want}"
        stage(driver, volume_id, r_staging, cap)
        publish(driver, volume_id, r_staging, r_device, cap)
        assert read(r_device) == [bytes([want]) * 65536] * len(offsets)
        unpublish(driver, volume_id, r_device)
        unstage(driver, volume_id, r_staging)

    unpublish(driver, vol, device)
    unstage(driver, vol, staging)
    assert driver.inspect.DescribeVolume(
        qsnap_pb2.DescribeVolumeRequest(volume_id=vol)).owner == "closed"
    assert_nothing_left(driver)


def test_a_group_snapshot_of_served_volumes_is_one_instant(driver: Driver,
                                                          node_paths: Path) -> None:
    """Two served volumes written in lock step by one writer: a group
    snapshot (one QMP transaction in the storage daemon) catches both at
    the same record."""
    from csidriver.pb import csi_pb2_grpc
    size = 16 * MiB
    cap = block_cap()
    vols = [create_volume(driver, f"grp-{i}", size, cap) for i in range(2)]
    devices = []
    for i, vol in enumerate(vols):
        staging, device = node_paths / f"gs-{i}", node_paths / f"gd-{i}"
        stage(driver, vol, staging, cap)
        publish(driver, vol, staging, device, cap)
        devices.append(device)
    fds = [os.open(d, os.O_RDWR) for d in devices]
    stop = threading.Event()
    counter = [0]

    def writer() -> None:
        # The same counter goes to both devices before the next one starts;
        # a device never gets ahead of the other by more than one.
        while not stop.is_set():
            counter[0] += 1
            record = counter[0].to_bytes(8, "little") * 512
            for fd in fds:
                os.pwrite(fd, record, 0)
                os.fsync(fd)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        group = csi_pb2_grpc.GroupControllerStub(driver.channel).CreateVolumeGroupSnapshot(
            csi_pb2.CreateVolumeGroupSnapshotRequest(name="grp", source_volume_ids=vols)
        ).group_snapshot
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join(30)
        for fd in fds:
            os.close(fd)
    assert counter[0] > 5 and group.ready_to_use and len(group.snapshots) == 2
    by_volume = {s.source_volume_id: s.snapshot_id for s in group.snapshots}
    seen = []
    for i, vol in enumerate(vols):
        restored = create_volume(driver, f"grp-r{i}", size, cap, from_snapshot(by_volume[vol]))
        staging, device = node_paths / f"rs-{i}", node_paths / f"rd-{i}"
        stage(driver, restored, staging, cap)
        publish(driver, restored, staging, device, cap)
        fd = os.open(device, os.O_RDONLY)
        try:
            seen.append(int.from_bytes(os.pread(fd, 8, 0), "little"))
        finally:
            os.close(fd)
        unpublish(driver, restored, device)
        unstage(driver, restored, staging)
    # The first device is written first: at one instant it holds the same
    # record as the second, or the next one.
    assert seen[0] - seen[1] in (0, 1), seen
    assert 0 < seen[1] < counter[0]
    for i, vol in enumerate(vols):
        unpublish(driver, vol, devices[i])
        unstage(driver, vol, node_paths / f"gs-{i}")
    assert_nothing_left(driver)
