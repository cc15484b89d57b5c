"""Idempotency, errors, capacity, pagination and the pool lock, at the
engine level."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import validate
from engine.errors import (AlreadyExists, Busy, InvalidArgument, NotFound, OutOfRange,
                           PoolFull)
from engine.model import SnapshotSource, VolumeSource
from engine.pool import Pool, PoolConfig

MIB = 1 << 20
K8S = "csi.storage.k8s.io/pvc/name"
MISSING_VOLUME = "v-" + "0" * 32
MISSING_SNAPSHOT = "s-" + "0" * 32

BAD_TEXT = ["a/b", "/abs", "..", "a..b", "x\x00y", "n" * 129, "é" * 65, "", "back\\slash",
            "tab\there"]


def layer_files(pool: Pool) -> set[str]:
    return set(os.listdir(pool.layout.layers))


# -- idempotency ---------------------------------------------------------------

def test_create_volume_is_idempotent(pool: Pool) -> None:
    v = pool.create_volume("v", required_bytes=2 * MIB, parameters={K8S: "pvc"},
                           capabilities="mount")
    files = layer_files(pool)
    assert pool.create_volume("v", required_bytes=2 * MIB, parameters={K8S: "pvc"},
                              capabilities="mount") == v
    assert pool.create_volume("v", required_bytes=2 * MIB, limit_bytes=4 * MIB,
                              parameters={K8S: "pvc"}, capabilities="mount") == v
    assert layer_files(pool) == files
    assert [x.id for x in pool.list_volumes().items] == [v.id]


def test_create_volume_with_other_arguments_already_exists(pool: Pool) -> None:
    v = pool.create_volume("v", required_bytes=2 * MIB, parameters={K8S: "pvc"},
                           capabilities="mount")
    s = pool.create_snapshot("s", v.id)
    other = pool.create_volume("other", required_bytes=1 * MIB)
    with pytest.raises(AlreadyExists):
        pool.create_volume("v", required_bytes=3 * MIB, parameters={K8S: "pvc"})
    with pytest.raises(AlreadyExists):
        pool.create_volume("v", required_bytes=1 * MIB, limit_bytes=1 * MIB,
                           parameters={K8S: "pvc"})
    with pytest.raises(AlreadyExists):
        pool.create_volume("v", required_bytes=2 * MIB, parameters={K8S: "other"})
    with pytest.raises(AlreadyExists):
        pool.create_volume("v", required_bytes=2 * MIB)
    with pytest.raises(AlreadyExists):
        pool.create_volume("v", required_bytes=2 * MIB, parameters={K8S: "pvc"},
                           capabilities="block")
    with pytest.raises(AlreadyExists):
        pool.create_volume("v", required_bytes=2 * MIB, parameters={K8S: "pvc"},
                           source=SnapshotSource(s.id))
    with pytest.raises(AlreadyExists):
        pool.create_volume("v", required_bytes=2 * MIB, parameters={K8S: "pvc"},
                           source=VolumeSource(other.id))
    r = pool.create_volume("r", source=SnapshotSource(s.id))
    with pytest.raises(AlreadyExists):
        pool.create_volume("r")
    with pytest.raises(AlreadyExists):
        pool.create_volume("r", source=VolumeSource(v.id))
    s2 = pool.create_snapshot("s2", v.id)
    with pytest.raises(AlreadyExists):
        pool.create_volume("r", source=SnapshotSource(s2.id))
    assert pool.create_volume("r", source=SnapshotSource(s.id)) == r


def test_create_snapshot_is_idempotent(pool: Pool) -> None:
    v = pool.create_volume("v", required_bytes=1 * MIB)
    w = pool.create_volume("w", required_bytes=1 * MIB)
    s = pool.create_snapshot("s", v.id, parameters={"csi.storage.k8s.io/volumesnapshot/name": "x"})
    top = pool.get_volume(v.id).top_layer
    files = layer_files(pool)
    again = pool.create_snapshot("s", v.id,
                                 parameters={"csi.storage.k8s.io/volumesnapshot/name": "x"})
    assert again == s
    assert pool.get_volume(v.id).top_layer == top, "a retry cut the volume again"
    assert layer_files(pool) == files
    with pytest.raises(AlreadyExists):
        pool.create_snapshot("s", w.id, parameters={"csi.storage.k8s.io/volumesnapshot/name": "x"})
    with pytest.raises(AlreadyExists):
        pool.create_snapshot("s", v.id)
    assert [x.id for x in pool.list_snapshots().items] == [s.id]


# -- not found -----------------------------------------------------------------

@pytest.mark.parametrize("volume_id", [MISSING_VOLUME, "pvc-123", "s-" + "1" * 32])
def test_missing_volume(pool: Pool, volume_id: str) -> None:
    with pytest.raises(NotFound):
        pool.get_volume(volume_id)
    with pytest.raises(NotFound):
        pool.delete_volume(volume_id)
    with pytest.raises(NotFound):
        pool.expand_volume(volume_id, 2 * MIB)
    with pytest.raises(NotFound):
        pool.create_snapshot("s", volume_id)
    with pytest.raises(NotFound):
        pool.create_volume("c", source=VolumeSource(volume_id))
    with pytest.raises(NotFound):
        pool.volume_chain(volume_id)
    assert pool.list_snapshots(source_volume_id=volume_id).items == []
    assert layer_files(pool) == set()


@pytest.mark.parametrize("snapshot_id", [MISSING_SNAPSHOT, "snap-1", "v-" + "1" * 32])
def test_missing_snapshot(pool: Pool, snapshot_id: str) -> None:
    with pytest.raises(NotFound):
        pool.get_snapshot(snapshot_id)
    with pytest.raises(NotFound):
        pool.delete_snapshot(snapshot_id)
    with pytest.raises(NotFound):
        pool.create_volume("r", source=SnapshotSource(snapshot_id))
    with pytest.raises(NotFound):
        pool.snapshot_chain(snapshot_id)
    assert pool.list_snapshots(snapshot_id=snapshot_id).items == []
    assert layer_files(pool) == set()


def test_deleted_objects_are_not_found(pool: Pool) -> None:
    v = pool.create_volume("v", required_bytes=1 * MIB)
    s = pool.create_snapshot("s", v.id)
    pool.delete_snapshot(s.id)
    pool.delete_volume(v.id)
    with pytest.raises(NotFound):
        pool.get_volume(v.id)
    with pytest.raises(NotFound):
        pool.delete_volume(v.id)
    with pytest.raises(NotFound):
        pool.get_snapshot(s.id)
    with pytest.raises(NotFound):
        pool.delete_snapshot(s.id)
    with pytest.raises(NotFound):
        pool.create_volume("r", source=SnapshotSource(s.id))
    # The names are free again.
    v2 = pool.create_volume("v", required_bytes=1 * MIB)
    assert v2.id != v.id
    s2 = pool.create_snapshot("s", v2.id)
    assert s2.id != s.id


# -- out of range ---------------------------------------------------------------

def test_out_of_range(pool: Pool) -> None:
    with pytest.raises(OutOfRange):
        pool.create_volume("v", required_bytes=2 * MIB, limit_bytes=1 * MIB)
    with pytest.raises(OutOfRange):
        pool.create_volume("v", required_bytes=validate.MAX_VOLUME_SIZE + 1)
    with pytest.raises(OutOfRange):
        pool.create_volume("v", required_bytes=1 * MIB + 1, limit_bytes=1 * MIB + 100)
    with pytest.raises(OutOfRange):
        pool.create_volume("v", limit_bytes=100)              # less than one sector
    assert layer_files(pool) == set()
    # Only a limit: the default size capped by it.
    small = pool.create_volume("small", limit_bytes=3 * MIB)
    assert small.size_bytes == 3 * MIB

    v = pool.create_volume("v", required_bytes=4 * MIB)
    s = pool.create_snapshot("s", v.id)
    with pytest.raises(OutOfRange):
        pool.create_volume("r", required_bytes=1 * MIB, limit_bytes=2 * MIB,
                           source=SnapshotSource(s.id))
    with pytest.raises(OutOfRange):
        pool.create_volume("r", limit_bytes=4 * MIB - 512, source=SnapshotSource(s.id))
    with pytest.raises(OutOfRange):
        pool.create_volume("c", limit_bytes=2 * MIB, source=VolumeSource(v.id))
    with pytest.raises(OutOfRange):
        pool.create_volume("r", required_bytes=validate.MAX_VOLUME_SIZE + 512,
                           source=SnapshotSource(s.id))
    # A restore without bounds gets the snapshot's size; a smaller request is raised to it.
    assert pool.create_volume("r", required_bytes=1 * MIB,
                              source=SnapshotSource(s.id)).size_bytes == 4 * MIB
    with pytest.raises(OutOfRange):
        pool.expand_volume(v.id, validate.MAX_VOLUME_SIZE + 1)
    with pytest.raises(OutOfRange):
        pool.expand_volume(v.id, 8 * MIB, limit_bytes=6 * MIB)
    assert pool.get_volume(v.id).size_bytes == 4 * MIB


def test_largest_volume(kit, pool: Pool) -> None:
    """MAX_VOLUME_SIZE is accepted and usable end to end; one byte more is not."""
    size = validate.MAX_VOLUME_SIZE
    v = pool.create_volume("max", required_bytes=size)
    assert v.size_bytes == size
    last = size - (64 << 10)
    kit.write(pool.layer_path(v.top_layer), 0xEF, last, 64 << 10)
    s = pool.create_snapshot("s", v.id)
    r = pool.create_volume("r", source=SnapshotSource(s.id))
    assert r.size_bytes == size
    kit.expect(pool.layer_path(r.top_layer), 0xEF, last, 64 << 10)
    kit.expect(pool.layer_path(r.top_layer), 0x00, 0, 1 * MIB)
    with pytest.raises(OutOfRange):
        pool.create_volume("r2", required_bytes=size + 1, source=SnapshotSource(s.id))
    small = pool.create_volume("small", required_bytes=1 * MIB)
    assert pool.expand_volume(small.id, size).size_bytes == size
    kit.check_pool(pool)


# -- invalid arguments ----------------------------------------------------------

@pytest.mark.parametrize("bad", BAD_TEXT, ids=repr)
def test_invalid_names(pool: Pool, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        pool.create_volume(bad, required_bytes=1 * MIB)
    v = pool.create_volume("ok", required_bytes=1 * MIB)
    with pytest.raises(InvalidArgument):
        pool.create_snapshot(bad, v.id)
    assert [x.name for x in pool.list_volumes().items] == ["ok"]
    assert pool.list_snapshots().items == []


@pytest.mark.parametrize("bad", BAD_TEXT, ids=repr)
def test_invalid_ids(pool: Pool, bad: str) -> None:
    v = pool.create_volume("ok", required_bytes=1 * MIB)
    s = pool.create_snapshot("s", v.id)
    files = layer_files(pool)
    calls = [
        lambda: pool.get_volume(bad),
        lambda: pool.get_snapshot(bad),
        lambda: pool.delete_volume(bad),
        lambda: pool.delete_snapshot(bad),
        lambda: pool.expand_volume(bad, 2 * MIB),
        lambda: pool.create_snapshot("s2", bad),
        lambda: pool.create_volume("r", source=SnapshotSource(bad)),
        lambda: pool.create_volume("c", source=VolumeSource(bad)),
    ]
    if bad:  # an empty filter means "no filter"
        calls += [lambda: pool.list_snapshots(snapshot_id=bad),
                  lambda: pool.list_snapshots(source_volume_id=bad)]
    for i, call in enumerate(calls):
        with pytest.raises(InvalidArgument):
            call()
            pytest.fail(f"call {i} accepted {bad!r}")
    assert layer_files(pool) == files
    assert pool.get_snapshot(s.id) == s


def test_longest_name_is_accepted(pool: Pool) -> None:
    name = "n" * validate.MAX_NAME_BYTES
    v = pool.create_volume(name, required_bytes=1 * MIB)
    assert pool.get_volume(v.id).name == name
    s = pool.create_snapshot("é" * 64, v.id)
    assert pool.get_snapshot(s.id).name == "é" * 64


def test_invalid_sizes_and_parameters(pool: Pool) -> None:
    with pytest.raises(InvalidArgument):
        pool.create_volume("v", required_bytes=-1)
    with pytest.raises(InvalidArgument):
        pool.create_volume("v", limit_bytes=-1)
    with pytest.raises(InvalidArgument):
        pool.create_volume("v", required_bytes=1 * MIB, parameters={"unknown": "x"})
    v = pool.create_volume("v", required_bytes=1 * MIB)
    with pytest.raises(InvalidArgument):
        pool.create_snapshot("s", v.id, parameters={"unknown": "x"})
    with pytest.raises(InvalidArgument):
        pool.list_volumes(max_entries=-1)
    with pytest.raises(InvalidArgument):
        pool.list_snapshots(max_entries=-1)
    for config in ({"depth_cap": 1}, {"quota_bytes": 0}, {"reserve_bytes": -1}):
        with pytest.raises(InvalidArgument):
            PoolConfig(**config)


# -- capacity --------------------------------------------------------------------

def test_quota(kit, pool_root: Path) -> None:
    pool = kit.open(pool_root, quota_bytes=5 * MIB, reserve_bytes=0)
    try:
        cap = pool.capacity()
        assert (cap.total_bytes, cap.available_bytes, cap.provisioned_bytes) == (5 * MIB, 5 * MIB, 0)
        v = pool.create_volume("v", required_bytes=3 * MIB)
        assert pool.capacity().available_bytes == 2 * MIB
        assert pool.capacity().maximum_volume_size == 2 * MIB
        files = layer_files(pool)
        with pytest.raises(PoolFull):
            pool.create_volume("w", required_bytes=3 * MIB)
        s = pool.create_snapshot("s", v.id)            # thin: a snapshot provisions nothing
        files = layer_files(pool)
        with pytest.raises(PoolFull):
            pool.create_volume("r", source=SnapshotSource(s.id))
        with pytest.raises(PoolFull):
            pool.create_volume("c", source=VolumeSource(v.id))
        with pytest.raises(PoolFull):
            pool.expand_volume(v.id, 6 * MIB)
        assert layer_files(pool) == files, "a refused request left files behind"
        assert pool.get_volume(v.id).size_bytes == 3 * MIB
        assert pool.list_volumes().items == [pool.get_volume(v.id)]
        # What fits still works, and an existing volume is returned even when full.
        w = pool.create_volume("w", required_bytes=2 * MIB)
        assert pool.capacity().available_bytes == 0
        assert pool.create_volume("w", required_bytes=2 * MIB) == w
        assert pool.create_volume("v", required_bytes=3 * MIB).id == v.id
        with pytest.raises(PoolFull):
            pool.create_volume("x", required_bytes=512)
        # Deleting gives the quota back at once.
        pool.delete_volume(w.id)
        assert pool.expand_volume(v.id, 5 * MIB).size_bytes == 5 * MIB
        kit.check_pool(pool)
    finally:
        pool.close()


def test_reserve_larger_than_free_space(kit, pool_root: Path) -> None:
    pool = kit.open(pool_root)
    v = pool.create_volume("v", required_bytes=1 * MIB)
    s = pool.create_snapshot("s", v.id)
    pool.close()
    st = os.statvfs(pool_root)
    reserve = st.f_bavail * st.f_frsize + (1 << 30)
    pool = kit.open(pool_root, reserve_bytes=reserve)
    try:
        files = layer_files(pool)
        assert pool.capacity().available_bytes == 0
        with pytest.raises(PoolFull):
            pool.create_volume("w", required_bytes=1 * MIB)
        with pytest.raises(PoolFull):
            pool.create_snapshot("s2", v.id)
        with pytest.raises(PoolFull):
            pool.create_volume("r", source=SnapshotSource(s.id))
        with pytest.raises(PoolFull):
            pool.create_volume("c", source=VolumeSource(v.id))
        with pytest.raises(PoolFull):
            pool.expand_volume(v.id, 2 * MIB)
        assert layer_files(pool) == files
        # Reads, retries of finished requests and deletes still work.
        assert pool.create_snapshot("s", v.id) == s
        assert pool.create_volume("v", required_bytes=1 * MIB).id == v.id
        pool.delete_snapshot(s.id)
        kit.check_pool(pool)
    finally:
        pool.close()


# -- pagination -------------------------------------------------------------------

def test_volume_pagination(pool: Pool) -> None:
    ids = [pool.create_volume(f"v{i}", required_bytes=1 * MIB).id for i in range(7)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = pool.list_volumes(token, 3)
        pages += 1
        assert len(page.items) <= 3
        seen += [v.id for v in page.items]
        if not page.next_token:
            break
        token = page.next_token
    assert pages == 3 and seen == ids
    assert [v.id for v in pool.list_volumes().items] == ids
    assert [v.id for v in pool.list_volumes(max_entries=7).items] == ids
    assert pool.list_volumes(max_entries=7).next_token == ""
    # Deleting the first entry of the next page between calls skips nothing else.
    first = pool.list_volumes("", 3)
    pool.delete_volume(ids[3])
    rest = pool.list_volumes(first.next_token, 0)
    assert [v.id for v in first.items + rest.items] == ids[:3] + ids[4:]


def test_snapshot_pagination_and_filters(pool: Pool) -> None:
    a = pool.create_volume("a", required_bytes=1 * MIB)
    b = pool.create_volume("b", required_bytes=1 * MIB)
    snaps = [pool.create_snapshot(f"s{i}", (a if i % 2 else b).id) for i in range(8)]
    of_a = [s.id for s in snaps if s.source_volume_id == a.id]
    seen: list[str] = []
    token = ""
    while True:
        page = pool.list_snapshots(token, 3, source_volume_id=a.id)
        seen += [s.id for s in page.items]
        if not page.next_token:
            break
        token = page.next_token
    assert seen == of_a
    all_ids: list[str] = []
    token = ""
    while True:
        page = pool.list_snapshots(token, 5)
        all_ids += [s.id for s in page.items]
        if not page.next_token:
            break
        token = page.next_token
    assert all_ids == [s.id for s in snaps]
    assert pool.list_snapshots(snapshot_id=snaps[5].id).items == [snaps[5]]
    assert pool.list_snapshots(snapshot_id=snaps[5].id, source_volume_id=b.id).items == []


@pytest.mark.parametrize("token", ["abc", "-1", "1" * 19, "1.5", " 1", "0x10", "²", "1²"],
                         ids=repr)
def test_bad_page_token_is_busy(pool: Pool, token: str) -> None:
    pool.create_volume("v", required_bytes=1 * MIB)
    with pytest.raises(Busy):
        pool.list_volumes(token, 1)
    with pytest.raises(Busy):
        pool.list_snapshots(token, 1)


# -- the pool lock ----------------------------------------------------------------

def test_second_open_is_busy(kit, pool_root: Path) -> None:
    first = kit.open(pool_root)
    try:
        with pytest.raises(Busy):
            Pool.open(pool_root)
        with pytest.raises(Busy):
            Pool.open(pool_root / ".")
        # Another process is refused too.
        child = subprocess.run(
            [sys.executable, "-c",
             "import sys; sys.path.insert(0, sys.argv[1]);"
             "from pathlib import Path; from engine.pool import Pool; from engine.errors import Busy\n"
             "try:\n    Pool.open(Path(sys.argv[2]))\nexcept Busy:\n    sys.exit(3)\nsys.exit(0)",
             str(Path(__file__).resolve().parents[2]), str(pool_root)],
            capture_output=True, text=True, timeout=60)
        assert child.returncode == 3, child.stderr
        # The refused opens did not disturb the open pool.
        v = first.create_volume("v", required_bytes=1 * MIB)
        assert first.get_volume(v.id) == v
    finally:
        first.close()
    second = kit.open(pool_root)
    try:
        assert second.get_volume(v.id) == v
        with pytest.raises(Busy):
            Pool.open(pool_root)
    finally:
        second.close()
