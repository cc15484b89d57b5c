"""Data integrity of volumes, snapshots, restores, clones and expansion,
checked byte for byte with qemu-io against the real layer files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.model import SnapshotSource, VolumeSource
from engine.pool import Pool
from engine.reclaim import Maintainer

MIB = 1 << 20
REGION = 64 << 10


def top(pool: Pool, volume_id: str) -> Path:
    return pool.layer_path(pool.get_volume(volume_id).top_layer)


def test_expect_detects_a_wrong_pattern(kit: Kit, pool: Pool) -> None:
    """The checking helpers themselves can fail: a wrong pattern, a wrong
    offset and a wrong size are all reported."""
    v = pool.create_volume("v", required_bytes=1 * MIB)
    kit.write(top(pool, v.id), 0xAA, 0, 1 * MIB)
    assert kit.reads(top(pool, v.id), 0xAA, 0, 1 * MIB)
    assert not kit.reads(top(pool, v.id), 0xAB, 0, 1 * MIB)
    assert not kit.reads(top(pool, v.id), 0x00, 0, REGION)
    with pytest.raises(AssertionError, match="does not read"):
        kit.expect_regions(top(pool, v.id), 1 * MIB, {r: 0xAA for r in range(15)})
    with pytest.raises(AssertionError, match="bytes, expected"):
        kit.expect_regions(top(pool, v.id), 2 * MIB, {r: 0xAA for r in range(16)})
    kit.expect_regions(top(pool, v.id), 1 * MIB, {r: 0xAA for r in range(16)})


def test_snapshot_overwrite_restore(kit: Kit, pool: Pool) -> None:
    v = pool.create_volume("v", required_bytes=2 * MIB)
    kit.write(top(pool, v.id), 0xAA, 0, 1 * MIB)
    s = pool.create_snapshot("s", v.id)
    assert s.source_volume_id == v.id and s.size_bytes == v.size_bytes == 2 * MIB
    kit.write(top(pool, v.id), 0xBB, 0, MIB // 2)
    kit.write(top(pool, v.id), 0xCC, 1 * MIB, MIB // 2)

    r = pool.create_volume("r", source=SnapshotSource(s.id))
    assert r.size_bytes == s.size_bytes and r.source == SnapshotSource(s.id)
    kit.expect(top(pool, r.id), 0xAA, 0, 1 * MIB)
    kit.expect(top(pool, r.id), 0x00, 1 * MIB, 1 * MIB)
    kit.expect(top(pool, v.id), 0xBB, 0, MIB // 2)
    kit.expect(top(pool, v.id), 0xAA, MIB // 2, MIB // 2)
    kit.expect(top(pool, v.id), 0xCC, 1 * MIB, MIB // 2)
    kit.expect(top(pool, v.id), 0x00, 3 * MIB // 2, MIB // 2)
    # The snapshot's own layer still reads the cut.
    snap_layer = pool.layer_path(pool.get_snapshot(s.id).layer)
    kit.expect(snap_layer, 0xAA, 0, 1 * MIB)
    kit.expect(snap_layer, 0x00, 1 * MIB, 1 * MIB)

    # The restored volume diverges without touching the snapshot or the source.
    kit.write(top(pool, r.id), 0xDD, 0, 1 * MIB)
    kit.expect(top(pool, r.id), 0xDD, 0, 1 * MIB)
    kit.expect(snap_layer, 0xAA, 0, 1 * MIB)
    kit.expect(top(pool, v.id), 0xBB, 0, MIB // 2)
    # A second restore still reads the snapshot.
    r2 = pool.create_volume("r2", source=SnapshotSource(s.id))
    kit.expect(top(pool, r2.id), 0xAA, 0, 1 * MIB)
    kit.check_pool(pool)


def test_clone_keeps_current_data_and_diverges(kit: Kit, pool: Pool) -> None:
    v = pool.create_volume("v", required_bytes=1 * MIB)
    kit.write(top(pool, v.id), 0x11, 0, 1 * MIB)
    s = pool.create_snapshot("s", v.id)
    kit.write(top(pool, v.id), 0x22, 0, MIB // 2)        # after the snapshot

    c = pool.create_volume("c", source=VolumeSource(v.id))
    assert c.source == VolumeSource(v.id) and c.size_bytes == v.size_bytes
    kit.expect(top(pool, c.id), 0x22, 0, MIB // 2)
    kit.expect(top(pool, c.id), 0x11, MIB // 2, MIB // 2)

    kit.write(top(pool, v.id), 0x33, 0, 1 * MIB)
    kit.write(top(pool, c.id), 0x44, MIB // 2, MIB // 2)
    kit.expect(top(pool, v.id), 0x33, 0, 1 * MIB)
    kit.expect(top(pool, c.id), 0x22, 0, MIB // 2)
    kit.expect(top(pool, c.id), 0x44, MIB // 2, MIB // 2)
    kit.expect_snapshot(pool, s.id, {r: 0x11 for r in range(16)})
    # Snapshot of the clone, restore of it: the clone's data.
    cs = pool.create_snapshot("cs", c.id)
    cr = pool.create_volume("cr", source=SnapshotSource(cs.id))
    kit.expect(top(pool, cr.id), 0x22, 0, MIB // 2)
    kit.expect(top(pool, cr.id), 0x44, MIB // 2, MIB // 2)
    kit.check_pool(pool)


def test_clone_to_a_larger_size(kit: Kit, pool: Pool) -> None:
    v = pool.create_volume("v", required_bytes=1 * MIB)
    kit.write(top(pool, v.id), 0x5A, 0, 1 * MIB)
    c = pool.create_volume("c", required_bytes=3 * MIB, source=VolumeSource(v.id))
    assert c.size_bytes == 3 * MIB
    kit.expect_regions(top(pool, c.id), 3 * MIB, {r: 0x5A for r in range(16)})
    kit.write(top(pool, c.id), 0x6B, 2 * MIB, 1 * MIB)
    kit.expect_regions(top(pool, c.id), 3 * MIB,
                       {**{r: 0x5A for r in range(16)}, **{r: 0x6B for r in range(32, 48)}})
    kit.expect_volume(pool, v.id, {r: 0x5A for r in range(16)})
    kit.check_pool(pool)


def test_restore_to_a_larger_size(kit: Kit, pool: Pool) -> None:
    v = pool.create_volume("v", required_bytes=1 * MIB)
    kit.write(top(pool, v.id), 0xAA, 0, 1 * MIB)
    s = pool.create_snapshot("s", v.id)
    r = pool.create_volume("r", required_bytes=4 * MIB, source=SnapshotSource(s.id))
    assert r.size_bytes == 4 * MIB
    assert kit.info(top(pool, r.id))["virtual-size"] == 4 * MIB
    kit.expect(top(pool, r.id), 0xAA, 0, 1 * MIB)
    kit.expect(top(pool, r.id), 0x00, 1 * MIB, 3 * MIB)
    kit.write(top(pool, r.id), 0xEE, 3 * MIB, 1 * MIB)
    kit.expect(top(pool, r.id), 0xEE, 3 * MIB, 1 * MIB)
    kit.expect(top(pool, r.id), 0x00, 1 * MIB, 2 * MIB)
    # Sizes that are not whole sectors are rounded up, never down.
    r2 = pool.create_volume("r2", required_bytes=2 * MIB + 1, source=SnapshotSource(s.id))
    assert r2.size_bytes == 2 * MIB + 512
    kit.expect(top(pool, r2.id), 0xAA, 0, 1 * MIB)
    kit.check_pool(pool)


def test_expand_keeps_data_and_new_area_reads_zeros(kit: Kit, pool: Pool) -> None:
    v = pool.create_volume("v", required_bytes=1 * MIB)
    kit.write(top(pool, v.id), 0xAA, 0, 1 * MIB)
    s = pool.create_snapshot("s", v.id)
    kit.write(top(pool, v.id), 0xBB, 0, REGION)
    e = pool.expand_volume(v.id, 3 * MIB)
    assert e.size_bytes == 3 * MIB == pool.get_volume(v.id).size_bytes
    assert kit.info(top(pool, v.id))["virtual-size"] == 3 * MIB
    kit.expect(top(pool, v.id), 0xBB, 0, REGION)
    kit.expect(top(pool, v.id), 0xAA, REGION, 1 * MIB - REGION)
    kit.expect(top(pool, v.id), 0x00, 1 * MIB, 2 * MIB)
    kit.expect_snapshot(pool, s.id, {r: 0xAA for r in range(16)})
    # Never shrinks; asking for less is a no-op.
    assert pool.expand_volume(v.id, 1 * MIB).size_bytes == 3 * MIB
    assert pool.expand_volume(v.id, 3 * MIB).size_bytes == 3 * MIB
    # The new area is usable, and a snapshot has the volume's new size.
    kit.write(top(pool, v.id), 0xCC, 2 * MIB, 1 * MIB)
    s2 = pool.create_snapshot("s2", v.id)
    assert s2.size_bytes == 3 * MIB
    r = pool.create_volume("r", source=SnapshotSource(s2.id))
    assert r.size_bytes == 3 * MIB
    kit.expect_regions(top(pool, r.id), 3 * MIB,
                       {0: 0xBB, **{i: 0xAA for i in range(1, 16)},
                        **{i: 0xCC for i in range(32, 48)}})
    kit.check_pool(pool)


def test_snapshot_size_and_creation_time_are_stable(kit: Kit, pool: Pool) -> None:
    v = pool.create_volume("v", required_bytes=3 * MIB)
    assert pool.create_volume("v", required_bytes=3 * MIB) == v
    assert pool.create_volume("v", required_bytes=1 * MIB) == v     # fits in what exists
    assert pool.get_volume(v.id) == v
    s = pool.create_snapshot("s", v.id)
    assert s.size_bytes == v.size_bytes == 3 * MIB
    again = pool.create_snapshot("s", v.id)
    assert again == s and again.created_ns == s.created_ns
    assert pool.get_snapshot(s.id).created_ns == s.created_ns
    assert pool.create_volume("v", required_bytes=3 * MIB).created_ns == v.created_ns
    r = pool.create_volume("r", source=SnapshotSource(s.id))
    assert pool.create_volume("r", source=SnapshotSource(s.id)) == r
    c = pool.create_volume("c", source=VolumeSource(v.id))
    assert pool.create_volume("c", source=VolumeSource(v.id)) == c
    # Retrying did not cut the source again.
    assert len(kit.catalog_layers(pool)) == len(os.listdir(pool.layout.layers))
    top_before = pool.get_volume(v.id).top_layer
    pool.create_volume("c", source=VolumeSource(v.id))
    assert pool.get_volume(v.id).top_layer == top_before
    # Reopening the pool keeps the times.
    root = pool.layout.root
    pool.close()
    reopened = kit.open(root)
    try:
        assert reopened.get_volume(v.id).created_ns == v.created_ns
        assert reopened.get_snapshot(s.id) == s
        again_v = reopened.create_volume("v", required_bytes=3 * MIB)
        assert (again_v.id, again_v.created_ns, again_v.size_bytes) == (v.id, v.created_ns, v.size_bytes)
    finally:
        reopened.close()


def test_snapshot_cost_is_independent_of_size(kit: Kit, pool: Pool) -> None:
    v = pool.create_volume("big", required_bytes=64 * MIB)
    old_top = top(pool, v.id)
    kit.write(old_top, 0xAA, 0, 64 * MIB)
    assert kit.allocated(old_top) >= 64 * MIB
    before = os.stat(old_top)
    files_before = set(os.listdir(pool.layout.layers))
    used_before = pool.capacity().used_bytes

    s = pool.create_snapshot("s", v.id)

    assert s.layer == v.top_layer
    snap_path = pool.layer_path(s.layer)
    after = os.stat(snap_path)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino), "the layer was copied"
    assert after.st_size == before.st_size
    new_top = top(pool, v.id)
    assert new_top != old_top
    assert set(os.listdir(pool.layout.layers)) - files_before == {new_top.name}
    assert kit.allocated(new_top) < 1 * MIB
    assert pool.capacity().used_bytes - used_before < 1 * MIB
    assert kit.info(new_top)["virtual-size"] == 64 * MIB
    kit.expect(new_top, 0xAA, 0, 64 * MIB)
    # A restore is just as cheap.
    r = pool.create_volume("r", source=SnapshotSource(s.id))
    assert kit.allocated(top(pool, r.id)) < 1 * MIB
    kit.check_pool(pool)


def test_restored_volume_survives_its_snapshot_and_source(kit: Kit, pool: Pool) -> None:
    v = pool.create_volume("v", required_bytes=1 * MIB)
    kit.write(top(pool, v.id), 0x77, 0, 1 * MIB)
    s = pool.create_snapshot("s", v.id)
    r = pool.create_volume("r", required_bytes=2 * MIB, source=SnapshotSource(s.id))
    c = pool.create_volume("c", source=VolumeSource(v.id))
    kit.write(top(pool, c.id), 0x78, 0, REGION)
    pool.delete_snapshot(s.id)
    pool.delete_volume(v.id)
    Maintainer(pool).run_once()
    kit.check_pool(pool)
    kit.check_idle(pool)
    kit.expect_volume(pool, r.id, {i: 0x77 for i in range(16)})
    kit.expect_volume(pool, c.id, {0: 0x78, **{i: 0x77 for i in range(1, 16)}})
