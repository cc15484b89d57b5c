"""Depth merges and reclaim on volumes that qemu-storage-daemon serves.

The engine is driven directly (no gRPC): a pool, its node, a block volume
staged and published through a real qemu-storage-daemon, FUSE export and
loop device.  Data goes in and out through the loop device only.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.model import SnapshotSource
from engine.node import BLOCK, Access, Node
from engine.pool import Pool, PoolConfig
from engine.qsd import fuse_mounts
from engine.reclaim import Maintainer

MIB = 1 << 20
CAP = 4


@pytest.fixture
def node_pool(tmp_path: Path) -> Iterator[tuple[Pool, Node, Path]]:
    run_dir = Path(tempfile.mkdtemp(prefix="qsnap-merge-", dir="/tmp"))
    pool = Pool.open(tmp_path / "pool", config=PoolConfig(depth_cap=CAP))
    node = Node(pool, run_dir, supervise_interval=0.2)
    node.start()
    try:
        yield pool, node, tmp_path
    finally:
        node.stop()
        node.release_all()
        node.shutdown()
        pool.close()
        assert not [m for m in fuse_mounts() if str(m).startswith(str(run_dir))]


def _pattern(i: int) -> bytes:
    return bytes([i % 251 + 1]) * MIB


def _write(device: Path, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(device: Path, offset: int, length: int) -> bytes:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def test_served_chain_stays_short_and_keeps_content(node_pool: tuple[Pool, Node, Path]) -> None:
    pool, node, tmp = node_pool
    volume = pool.create_volume("served", required_bytes=32 * MIB)
    node.stage(volume.id, tmp / "stage", Access(BLOCK))
    device = tmp / "device"
    node.publish(volume.id, tmp / "stage", device, read_only=False)

    snapshots = []
    for i in range(3 * CAP):
        _write(device, i * MIB, _pattern(i))
        snapshots.append(pool.create_snapshot(f"s{i}", volume.id))
    assert all(s.indications == ("Online",) for s in snapshots)
    with pool.catalog.reading() as tx:
        assert max(layer.depth for layer in tx.all_layers()) == 3 * CAP + 1

    Maintainer(pool).run_once()

    # Every layer of the served chain, top included, is back under the cap
    # plus the one exported top QEMU cannot rewrite.
    chain = pool.volume_chain(volume.id)
    assert len(chain) <= CAP + 1, [layer.depth for layer in chain]
    with pool.catalog.reading() as tx:
        assert max(layer.depth for layer in tx.all_layers()) <= CAP + 1
    # The workload still sees everything it wrote, through the same device.
    for i in range(3 * CAP):
        assert _read(device, i * MIB, MIB) == _pattern(i), f"region {i}"
    # Every snapshot still holds exactly what the volume held when it was cut.
    for i, snapshot in enumerate(snapshots):
        restored = pool.create_volume(f"r{i}", source=SnapshotSource(snapshot.id))
        node.stage(restored.id, tmp / f"rs{i}", Access(BLOCK, read_only=True))
        rdev = tmp / f"rd{i}"
        node.publish(restored.id, tmp / f"rs{i}", rdev, read_only=True)
        assert _read(rdev, i * MIB, MIB) == _pattern(i)
        assert _read(rdev, (i + 1) * MIB, MIB) == b"\0" * MIB
        node.unpublish(restored.id, rdev)
        node.unstage(restored.id, tmp / f"rs{i}")
        pool.delete_volume(restored.id)


def test_deleted_snapshots_of_a_served_volume_are_reclaimed(
        node_pool: tuple[Pool, Node, Path]) -> None:
    pool, node, tmp = node_pool
    volume = pool.create_volume("served", required_bytes=16 * MIB)
    node.stage(volume.id, tmp / "stage", Access(BLOCK))
    device = tmp / "device"
    node.publish(volume.id, tmp / "stage", device, read_only=False)
    for i in range(6):
        _write(device, i * MIB, _pattern(i))
        pool.create_snapshot(f"s{i}", volume.id)
    for snapshot in pool.list_snapshots().items:
        pool.delete_snapshot(snapshot.id)
    maintainer = Maintainer(pool)
    maintainer.run_once()
    # Only the exported top and the layer directly under it remain: the
    # top cannot be merged while exported, everything below collapsed.
    chain = pool.volume_chain(volume.id)
    assert len(chain) == 2, [layer.id for layer in chain]
    assert maintainer.stats.merges["collapse"] >= 4
    assert len(pool.layout.layer_files()) == 2
    for i in range(6):
        assert _read(device, i * MIB, MIB) == _pattern(i)
    # The next cut moves the top; then the last merge can happen.
    snapshot = pool.create_snapshot("last", volume.id)
    pool.delete_snapshot(snapshot.id)
    maintainer.run_once()
    assert len(pool.volume_chain(volume.id)) == 2
    for i in range(6):
        assert _read(device, i * MIB, MIB) == _pattern(i)


def test_read_only_block_publication_refuses_writes(node_pool: tuple[Pool, Node, Path]) -> None:
    """A bind of a device node is not read-only by itself: a read-only
    publication must be backed by a read-only loop device."""
    pool, node, tmp = node_pool
    volume = pool.create_volume("ro", required_bytes=8 * MIB)
    node.stage(volume.id, tmp / "stage", Access(BLOCK))
    rw, ro = tmp / "rw", tmp / "ro"
    node.publish(volume.id, tmp / "stage", rw, read_only=False)
    node.publish(volume.id, tmp / "stage", ro, read_only=True)
    _write(rw, 0, _pattern(7))
    assert _read(ro, 0, MIB) == _pattern(7)
    with pytest.raises(OSError):
        _write(ro, 0, _pattern(8))
    assert _read(rw, 0, MIB) == _pattern(7)
    export = Path(node._staging(volume.id).export_path)
    assert len(node.devices.find_loops(export)) == 2
    node.unpublish(volume.id, ro)
    assert len(node.devices.find_loops(export)) == 1
    node.unpublish(volume.id, rw)
    node.unstage(volume.id, tmp / "stage")
    assert node.devices.find_loops(export) == []
