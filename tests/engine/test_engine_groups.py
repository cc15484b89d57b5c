"""Group cuts and the guest-freeze parameters at the engine level, on real
qcow2 files (no libvirt: the pool has no quiescer attached here)."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from engine.errors import AlreadyExists, FailedPrecondition, InUse, InvalidArgument, NotFound
from engine.model import SnapshotSource
from engine.pool import Pool
from engine.qemu_img import image_locks

MIB = 1 << 20


def test_a_group_cut_freezes_every_volume_at_one_instant(pool: Pool, kit) -> None:  # type: ignore[no-untyped-def]
    a = pool.create_volume("a", required_bytes=4 * MIB)
    b = pool.create_volume("b", required_bytes=4 * MIB)
    kit.write(pool.layer_path(a.top_layer), 0x11, 0, MIB)
    kit.write(pool.layer_path(b.top_layer), 0x22, 0, MIB)
    group = pool.create_group_snapshot("g1", [a.id, b.id])
    assert pool.create_group_snapshot("g1", [b.id, a.id]) == group      # idempotent
    members = [pool.get_snapshot(s) for s in group.snapshot_ids]
    assert {m.source_volume_id for m in members} == {a.id, b.id}
    assert {m.created_ns for m in members} == {members[0].created_ns}
    assert all(m.group_id == group.id and m.indications == ("Offline",) for m in members)
    assert group.indications == ("Offline",)
    # Writes after the cut stay out of it.
    for v, pattern in ((a, 0x33), (b, 0x44)):
        kit.write(pool.layer_path(pool.get_volume(v.id).top_layer), pattern, 0, MIB)
    for m, pattern in zip(sorted(members, key=lambda m: m.source_volume_id != a.id),
                          (0x11, 0x22)):
        restored = pool.create_volume(f"r-{m.id}", source=SnapshotSource(m.id))
        assert kit.reads(pool.layer_path(restored.top_layer), pattern, 0, MIB)
    with pytest.raises(AlreadyExists):
        pool.create_group_snapshot("g1", [a.id])
    pool.delete_group_snapshot(group.id)
    with pytest.raises(NotFound):
        pool.get_group_snapshot(group.id)
    assert all(s.group_id != group.id for s in pool.list_snapshots().items)


def test_group_arguments_are_checked_before_anything_is_cut(pool: Pool) -> None:
    a = pool.create_volume("a", required_bytes=MIB)
    with pytest.raises(InvalidArgument, match="at least one"):
        pool.create_group_snapshot("g", [])
    with pytest.raises(InvalidArgument, match="twice"):
        pool.create_group_snapshot("g", [a.id, a.id])
    with pytest.raises(NotFound):
        pool.create_group_snapshot("g", [a.id, "v-" + "0" * 32])
    assert pool.list_snapshots().items == []
    assert pool.get_volume(a.id).top_layer == a.top_layer


@pytest.mark.parametrize("params, message", [
    ({"qsnap.csi.dev/guest-agent": "sometimes"}, "required, preferred or disabled"),
    ({"qsnap.csi.dev/freeze-deadline": "5 minutes"}, "deadline"),
    ({"qsnap.csi.dev/fsfreeze": "yes"}, "true"),
])
def test_bad_freeze_parameters_are_invalid(pool: Pool, params: dict[str, str],
                                           message: str) -> None:
    a = pool.create_volume("a", required_bytes=MIB)
    with pytest.raises(InvalidArgument, match=message):
        pool.create_snapshot("s", a.id, parameters=params)
    with pytest.raises(InvalidArgument, match=message):
        pool.create_group_snapshot("g", [a.id], parameters=params)


def test_policy_required_fails_where_no_guest_can_be_asked(pool: Pool) -> None:
    a = pool.create_volume("a", required_bytes=MIB)
    with pytest.raises(FailedPrecondition, match="--libvirt-uri none"):
        pool.create_snapshot("s", a.id, parameters={"qsnap.csi.dev/guest-agent": "required"})
    assert pool.list_snapshots().items == []
    assert pool.layout.layer_files() == {a.top_layer}
    snap = pool.create_snapshot("s", a.id, parameters={"qsnap.csi.dev/guest-agent": "preferred",
                                                       "qsnap.csi.dev/freeze-deadline": "30s"})
    assert snap.indications == ("Offline",)


def test_a_top_another_process_writes_is_never_cut_behind_its_back(pool: Pool,
                                                                  pool_root: Path) -> None:
    a = pool.create_volume("a", required_bytes=MIB)
    top = pool.layer_path(a.top_layer)
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(top)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not image_locks(top).writer:
            assert time.monotonic() < deadline, "qemu-io did not open the image"
            time.sleep(0.05)
        with pytest.raises(InUse, match="open for writing"):
            pool.create_snapshot("s", a.id)
        with pytest.raises(InUse, match="is open"):
            pool.delete_volume(a.id)
    finally:
        holder.communicate(b"quit\n", timeout=30)
    assert pool.layout.layer_files() == {a.top_layer}
    pool.create_snapshot("s", a.id)


def test_a_version_1_catalog_is_migrated(pool_root: Path) -> None:
    pool = Pool.open(pool_root)
    a = pool.create_volume("a", required_bytes=MIB)
    snap = pool.create_snapshot("s", a.id)
    pool.close()
    db = sqlite3.connect(pool_root / "catalog.db")
    with db:
        # What a version 1 catalog looked like: no group column, no tables.
        db.execute("ALTER TABLE snapshots DROP COLUMN group_id")
        db.execute("DROP TABLE groups")
        db.execute("DROP TABLE vm_snapshots")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    db.close()
    pool = Pool.open(pool_root)
    try:
        assert pool.get_snapshot(snap.id).group_id == ""
        group = pool.create_group_snapshot("g", [a.id])
        assert pool.get_group_snapshot(group.id).snapshot_ids == group.snapshot_ids
    finally:
        pool.close()
