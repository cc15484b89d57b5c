"""Offline expansion: a volume grown by ControllerExpandVolume while it was
not staged gets its filesystem grown by NodeStageVolume (ext4 before it is
mounted, which needs no CAP_SYS_RESOURCE; xfs once mounted), and a
NodeExpandVolume that follows is a no-op that succeeds.  Real parts:
qemu-storage-daemon, FUSE export, loop device, ext4 and xfs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rootconf import Driver, create_volume, mount_cap, stage, unstage
from csidriver.pb import csi_pb2

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/loop-control").exists()
    or not Path("/dev/fuse").exists() or shutil.which("qemu-storage-daemon") is None
    or shutil.which("mkfs.xfs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None,
    reason="needs root, loop devices, FUSE, qemu-storage-daemon, e2fsprogs and xfsprogs")

MiB = 1 << 20
SIZES = {"ext4": 64 * MiB, "xfs": 320 * MiB}


def _fs_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def _source(path: Path) -> str:
    found = ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4] == os.path.realpath(path):
            found = fields[fields.index("-", 6) + 2]
    return found


def _controller_expand(d: Driver, vol: str, size: int) -> None:
    grown = d.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol, capacity_range=csi_pb2.CapacityRange(required_bytes=size)))
    assert grown.capacity_bytes == size
    assert grown.node_expansion_required


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_stage_grows_a_filesystem_expanded_offline(driver: Driver, node_paths: Path,
                                                   fs_type: str) -> None:
    size = SIZES[fs_type]
    cap = mount_cap(fs_type)
    vol = create_volume(driver, f"offline-{fs_type}", size, cap)
    staging = node_paths / "staging"
    stage(driver, vol, staging, cap)
    (staging / "kept").write_bytes(b"k" * 100_000)
    first = _fs_bytes(staging)
    unstage(driver, vol, staging)

    _controller_expand(driver, vol, 3 * size)           # unstaged: qemu-img grows the image

    stage(driver, vol, staging, cap)
    grown = _fs_bytes(staging)
    assert grown > first + size, f"{fs_type} spans {grown} bytes after stage, {first} before"
    assert (staging / "kept").read_bytes() == b"k" * 100_000
    (staging / "new").write_bytes(b"n" * 1000)

    # Staging again (the CO's retry) changes nothing; NodeExpandVolume, which
    # the CO calls after an offline expansion, finds nothing left to grow and
    # succeeds without an online resize (which would need CAP_SYS_RESOURCE
    # for ext4).
    stage(driver, vol, staging, cap)
    expanded = driver.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol, volume_path=str(staging),
        capacity_range=csi_pb2.CapacityRange(required_bytes=3 * size)))
    assert expanded.capacity_bytes == 3 * size
    assert _fs_bytes(staging) == grown

    device = _source(staging)
    assert device.startswith("/dev/")
    unstage(driver, vol, staging)
    assert _source(staging) == ""


def test_ext4_grown_at_stage_is_clean(driver: Driver, node_paths: Path) -> None:
    """The offline grow leaves a filesystem e2fsck finds clean (checked on
    the served device between an unmount and the next mount)."""
    cap = mount_cap("ext4")
    vol = create_volume(driver, "offline-fsck", SIZES["ext4"], cap)
    staging = node_paths / "staging"
    stage(driver, vol, staging, cap)
    for i in range(20):
        (staging / f"f{i}").write_bytes(os.urandom(4096) * (i + 1))
    unstage(driver, vol, staging)
    _controller_expand(driver, vol, 4 * SIZES["ext4"])
    stage(driver, vol, staging, cap)
    device = _source(staging)
    subprocess.run(["umount", str(staging)], check=True)
    try:
        fsck = subprocess.run(["e2fsck", "-f", "-n", device], capture_output=True, text=True,
                              check=False, env={**os.environ, "PATH": os.environ.get("PATH", "")
                                                + ":/usr/sbin:/sbin"})
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        blocks = subprocess.run(["blockdev", "--getsize64", device], capture_output=True,
                                text=True, check=True).stdout.strip()
        assert int(blocks) == 4 * SIZES["ext4"]
    finally:
        # Staging again re-mounts it (idempotent repair), then unstage.
        stage(driver, vol, staging, cap)
    assert len(list(staging.glob("f*"))) == 20
    unstage(driver, vol, staging)


def test_read_only_stage_does_not_grow(driver: Driver, node_paths: Path) -> None:
    cap = mount_cap("ext4")
    vol = create_volume(driver, "offline-ro", SIZES["ext4"], cap)
    staging = node_paths / "staging"
    stage(driver, vol, staging, cap)
    first = _fs_bytes(staging)
    unstage(driver, vol, staging)
    _controller_expand(driver, vol, 2 * SIZES["ext4"])
    ro = mount_cap("ext4", mode=2)    # SINGLE_NODE_READER_ONLY
    stage(driver, vol, staging, ro)
    assert _fs_bytes(staging) == first
    unstage(driver, vol, staging)
    stage(driver, vol, staging, cap)
    assert _fs_bytes(staging) > first
    unstage(driver, vol, staging)
