"""Restart safety of the node side, against the real parts.

* qemu-storage-daemon killed (-9) under load: the supervisor starts a new
  one and re-serves the volume from the catalog (new FUSE export, loop
  device, mount at the same staging path, binds at the same targets);
  everything fsynced before the kill reads back.
* The plugin killed (-9) under load and restarted on the same pool and run
  directory: the QSD never noticed, the volume is still served from the same
  mount, the writer never saw an error, and the new plugin adopts it.
* Staging, publishing, unpublishing and unstaging 20 times leaves no loop
  device, mount, FUSE export, or layer file open in the QSD (its block
  nodes) behind.
* A server stopped with nothing staged leaves no FUSE mount of its run
  directory (the QSD itself may keep running: that is by design).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rootconf import (Driver, DriverFactory, Writer, block_cap, check_files, create_volume,
                      daemons_of, loops_under, mount_cap, mountinfo, mounts_of, publish, stage,
                      unpublish, unstage)
from csidriver.pb import csi_pb2

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/loop-control").exists()
    or not Path("/dev/fuse").exists() or shutil.which("qemu-storage-daemon") is None,
    reason="needs root, loop devices, FUSE and qemu-storage-daemon")

MiB = 1 << 20
SIZE = 64 * MiB


def staged_source(path: Path) -> str | None:
    """The device mounted at ``path`` (None when nothing is)."""
    found = None
    for m in mountinfo():
        if m["point"] == os.path.realpath(path):
            found = m["source"]
    return found


def loop_backing(device: str) -> str | None:
    """What a loop device is bound to now (None when it is free).  A device
    left on a FUSE export whose mount was detached shows "/": nobody can
    find it by its file any more."""
    try:
        return Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()
    except FileNotFoundError:
        return None


def condition(d: Driver, volume_id: str, path: Path) -> csi_pb2.VolumeCondition | None:
    """The volume's condition at ``path``; None while stats cannot be had."""
    import grpc
    try:
        return d.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path=str(path)), timeout=10).volume_condition
    except grpc.RpcError:
        return None


def open_images(pid: int, pool_root: Path) -> list[str]:
    """Files of the pool a process has open: for the QSD, the layer files of
    the chains it serves (one block node per layer)."""
    root = os.path.realpath(pool_root) + "/"
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(root):
            found.append(target)
    return sorted(found)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.1)


def test_qsd_killed_under_load_is_reserved(driver: Driver, node_paths: Path) -> None:
    cap = mount_cap("ext4")
    vol = create_volume(driver, "qsd-kill", SIZE, cap)
    staging, target = node_paths / "staging", node_paths / "target"
    stage(driver, vol, staging, cap)
    publish(driver, vol, staging, target, cap)
    [qsd] = daemons_of(driver.run_dir)
    dead_device = staged_source(staging)
    assert dead_device is not None and dead_device.startswith("/dev/loop")
    writer = Writer(target)
    writer.start()
    try:
        writer.wait_for(30)
        os.kill(qsd, signal.SIGKILL)
        # The supervisor notices and starts a new daemon.  The writer fails
        # meanwhile (its device is gone): what it fsynced before is durable.
        wait_until(lambda: daemons_of(driver.run_dir) not in ([], [qsd]), 30,
                   "a new qemu-storage-daemon")
    finally:
        durable = writer.finish()
    assert durable >= 30
    # Served again: healthy, mounted at the staging path, bound at the target.
    wait_until(lambda: (c := condition(driver, vol, target)) is not None and not c.abnormal
               and staged_source(staging) is not None and staged_source(target) is not None,
               60, "the volume served again")
    check_files(target, durable)
    (target / "after").write_text("served again")
    assert (staging / "after").read_text() == "served again"
    assert "re-serving" in driver.log()
    unpublish(driver, vol, target)
    unstage(driver, vol, staging)
    # The dead daemon's loop device goes too, once nothing holds it (it
    # may be someone else's by now: free or bound to another file is fine).
    try:
        wait_until(lambda: loops_under(driver.run_dir) == {} and mounts_of(driver.run_dir) == []
                   and loop_backing(dead_device) != "/", 30,
                   f"the dead daemon's loop device {dead_device} and mounts released")
    finally:
        if loop_backing(dead_device) == "/":      # ours, and leaked: do not keep it
            subprocess.run(["losetup", "--detach", dead_device], check=False)


def test_plugin_killed_under_load_keeps_serving(driver: Driver, node_paths: Path) -> None:
    cap = mount_cap("ext4")
    vol = create_volume(driver, "plugin-kill", SIZE, cap)
    bcap = block_cap()
    bvol = create_volume(driver, "plugin-kill-b", SIZE, bcap)
    staging, target = node_paths / "staging", node_paths / "target"
    bstaging, device = node_paths / "bstaging", node_paths / "dev"
    stage(driver, vol, staging, cap)
    publish(driver, vol, staging, target, cap)
    stage(driver, bvol, bstaging, bcap)
    publish(driver, bvol, bstaging, device, bcap)
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x5a" * 65536, MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    mounted_before = staged_source(staging)
    [qsd] = daemons_of(driver.run_dir)
    writer = Writer(target)
    writer.start()
    try:
        writer.wait_for(20)
        driver.kill()
        seen = writer.done
        writer.wait_for(seen + 20)          # the workload does not notice
        driver.start()                      # same pool, same run directory
        writer.wait_for(writer.done + 20)
    finally:
        written = writer.finish()
    assert writer.error is None, f"the writer failed: {writer.error}"
    assert daemons_of(driver.run_dir) == [qsd]
    assert staged_source(staging) == mounted_before
    check_files(target, written)
    with open(device, "rb") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\x5a" * 65536
    # The new plugin knows both volumes: stats, idempotent stage and
    # publish, snapshots through the daemon, and a clean take-down.
    for volume_id, path in ((vol, target), (bvol, device)):
        c = condition(driver, volume_id, path)
        assert c is not None and not c.abnormal
    stage(driver, vol, staging, cap)
    publish(driver, vol, staging, target, cap)
    assert staged_source(staging) == mounted_before
    driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="after-restart",
                                                                   source_volume_id=vol))
    for volume_id, st, tg in ((vol, staging, target), (bvol, bstaging, device)):
        unpublish(driver, volume_id, tg)
        unstage(driver, volume_id, st)
    assert loops_under(driver.run_dir) == {} and mounts_of(driver.run_dir) == []


def test_repeated_stage_publish_leaves_nothing(driver: Driver, node_paths: Path) -> None:
    vols = {"mount": (create_volume(driver, "cycle-m", SIZE, mount_cap("ext4")),
                      mount_cap("ext4")),
            "block": (create_volume(driver, "cycle-b", SIZE, block_cap()), block_cap())}
    staging, target = node_paths / "staging", node_paths / "target"
    # The first staging makes the filesystem and starts the daemon: measure after it.
    vol, cap = vols["mount"]
    stage(driver, vol, staging, cap)
    unstage(driver, vol, staging)
    # Only mounts under this test's own paths count: other processes on the
    # machine (a concurrent test run) may mount and unmount meanwhile.
    ours = (str(node_paths), str(driver.run_dir), str(driver.pool_root))
    mounts_before = [m for m in mountinfo() if m["point"].startswith(ours)]
    loops_before = loops_under(driver.run_dir)
    [qsd] = daemons_of(driver.run_dir)
    assert open_images(qsd, driver.pool_root) == []
    for i in range(20):
        vol, cap = vols["mount" if i % 2 == 0 else "block"]
        t = target / str(i)
        stage(driver, vol, staging, cap)
        publish(driver, vol, staging, t, cap)
        unpublish(driver, vol, t)
        unstage(driver, vol, staging)
        assert not t.exists()
    assert [m for m in mountinfo() if m["point"].startswith(ours)] == mounts_before
    assert loops_under(driver.run_dir) == loops_before == {}
    assert mounts_of(driver.run_dir) == []
    assert daemons_of(driver.run_dir) == [qsd]
    assert open_images(qsd, driver.pool_root) == []
    assert list((driver.run_dir / "exports").iterdir()) == []


def test_server_stop_leaves_no_fuse_mount(driver_factory: DriverFactory,
                                          node_paths: Path) -> None:
    d = driver_factory()
    cap = mount_cap("ext4")
    vol = create_volume(d, "stop", SIZE, cap)
    staging = node_paths / "staging"
    stage(d, vol, staging, cap)
    unstage(d, vol, staging)
    assert d.stop() == 0
    run = os.path.realpath(d.run_dir)
    fuse = [m["point"] for m in mountinfo()
            if m["fstype"].startswith("fuse") and m["point"].startswith(run + "/")]
    assert fuse == []
    assert loops_under(d.run_dir) == {}
    assert staged_source(staging) is None
