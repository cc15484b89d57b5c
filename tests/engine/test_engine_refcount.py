"""Reference-counted deletion: volumes, snapshots, restores and clones
deleted in every kind of order, the maintainer reclaiming what nobody
needs while every survivor keeps its content; and a model-based test of
random operation sequences against a pure-Python model of the contents."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)

from engine.model import SnapshotSource, VolumeSource
from engine.pool import Pool, PoolConfig
from engine.reclaim import Maintainer

MIB = 1 << 20
REGION = 64 << 10


def write(kit, pool: Pool, volume_id: str, regions: dict[int, int]) -> None:
    kit.write_regions(pool.layer_path(pool.get_volume(volume_id).top_layer), regions)


def assert_empty(kit, pool: Pool) -> None:
    assert os.listdir(pool.layout.layers) == []
    assert kit.catalog_layers(pool) == {}
    assert pool.list_volumes().items == [] and pool.list_snapshots().items == []
    assert pool.capacity().used_bytes == 0 and pool.capacity().provisioned_bytes == 0


# -- every order -----------------------------------------------------------------

def build_world(kit, pool: Pool) -> tuple[dict[str, str], dict[str, dict[int, int]]]:
    """V, its snapshot S1, R restored from S1 (larger), C cloned from V,
    S2 a snapshot of C; each written to after it was made."""
    ids: dict[str, str] = {}
    v = pool.create_volume("V", required_bytes=1 * MIB)
    ids["V"] = v.id
    write(kit, pool, v.id, {r: 0x10 for r in range(8)})
    ids["S1"] = pool.create_snapshot("S1", v.id).id
    write(kit, pool, v.id, {r: 0x11 for r in range(4)})
    ids["R"] = pool.create_volume("R", required_bytes=2 * MIB, source=SnapshotSource(ids["S1"])).id
    write(kit, pool, ids["R"], {20: 0x12})
    ids["C"] = pool.create_volume("C", source=VolumeSource(v.id)).id
    write(kit, pool, ids["C"], {5: 0x13})
    write(kit, pool, v.id, {6: 0x14})
    ids["S2"] = pool.create_snapshot("S2", ids["C"]).id
    write(kit, pool, ids["C"], {7: 0x15})
    base = {r: 0x10 for r in range(8)}
    expected = {
        "S1": dict(base),
        "V": {**base, **{r: 0x11 for r in range(4)}, 6: 0x14},
        "R": {**base, 20: 0x12},
        "C": {**base, **{r: 0x11 for r in range(4)}, 5: 0x13, 7: 0x15},
        "S2": {**base, **{r: 0x11 for r in range(4)}, 5: 0x13},
    }
    return ids, expected


def check_survivors(kit, pool: Pool, ids: dict[str, str], expected: dict[str, dict[int, int]],
                    alive: set[str]) -> None:
    for name in sorted(alive):
        if name.startswith("S"):
            kit.expect_snapshot(pool, ids[name], expected[name])
        else:
            kit.expect_volume(pool, ids[name], expected[name])


ORDERS = [
    ("V", "S1", "R", "C", "S2"),     # volume before its snapshot, source before its clone
    ("S1", "R", "V", "S2", "C"),     # snapshot before the volume restored from it
    ("S2", "C", "R", "S1", "V"),
    ("C", "V", "S1", "S2", "R"),     # clone first, then its source
    ("R", "S2", "S1", "V", "C"),
    ("S1", "S2", "V", "C", "R"),     # every snapshot first
    ("V", "C", "S2", "S1", "R"),     # every volume but the restore first
]


@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_delete_in_order_maintaining_after_each(kit, pool: Pool, order: tuple[str, ...]) -> None:
    ids, expected = build_world(kit, pool)
    maintainer = Maintainer(pool)
    alive = set(ids)
    check_survivors(kit, pool, ids, expected, alive)
    for name in order:
        if name.startswith("S"):
            pool.delete_snapshot(ids[name])
        else:
            pool.delete_volume(ids[name])
        alive.discard(name)
        maintainer.run_once()
        kit.check_pool(pool)
        kit.check_idle(pool)
        check_survivors(kit, pool, ids, expected, alive)
    assert_empty(kit, pool)


@pytest.mark.parametrize("order", [ORDERS[0], ORDERS[3], ORDERS[6]], ids="-".join)
def test_delete_in_order_maintaining_once(kit, pool: Pool, order: tuple[str, ...]) -> None:
    ids, expected = build_world(kit, pool)
    alive = set(ids)
    for name in order[:-1]:
        if name.startswith("S"):
            pool.delete_snapshot(ids[name])
        else:
            pool.delete_volume(ids[name])
        alive.discard(name)
    Maintainer(pool).run_once()
    kit.check_pool(pool)
    kit.check_idle(pool)
    check_survivors(kit, pool, ids, expected, alive)
    assert len(kit.catalog_layers(pool)) == 1, "one volume or snapshot left needs one layer"
    last = order[-1]
    (pool.delete_snapshot if last.startswith("S") else pool.delete_volume)(ids[last])
    Maintainer(pool).run_once()
    assert_empty(kit, pool)


def test_reclaim_removes_nothing_still_needed(kit, pool: Pool) -> None:
    """Without deletions a maintenance pass removes no file and changes no content."""
    ids, expected = build_world(kit, pool)
    files = set(os.listdir(pool.layout.layers))
    Maintainer(pool).run_once()
    assert set(os.listdir(pool.layout.layers)) == files
    check_survivors(kit, pool, ids, expected, set(ids))
    kit.check_pool(pool)


# -- model-based -----------------------------------------------------------------

@dataclass
class Content:
    size: int
    regions: dict[int, int] = field(default_factory=dict)

    def copy(self, size: int | None = None) -> "Content":
        return Content(size or self.size, dict(self.regions))


class PoolMachine(RuleBasedStateMachine):
    """Random operations on a real pool, mirrored on a model of which byte
    pattern each 64 KiB region of each volume and snapshot holds."""

    kit = None
    base: Path | None = None

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="model-", dir=self.base))
        self.pool = Pool.open(self.root, config=PoolConfig(depth_cap=2))
        self.maintainer = Maintainer(self.pool)
        self.volumes: dict[str, Content] = {}
        self.snapshots: dict[str, Content] = {}
        self.names = itertools.count()
        self.patterns = itertools.cycle(range(1, 256))

    def _pick(self, table: dict[str, Content], i: int) -> str:
        keys = sorted(table)
        return keys[i % len(keys)]

    def _name(self, prefix: str) -> str:
        return f"{prefix}{next(self.names)}"

    # -- operations ------------------------------------------------------

    @rule(regions=st.sampled_from([8, 16]))
    def create(self, regions: int) -> None:
        v = self.pool.create_volume(self._name("v"), required_bytes=regions * REGION)
        assert v.size_bytes == regions * REGION
        self.volumes[v.id] = Content(v.size_bytes)

    @precondition(lambda self: self.volumes)
    @rule(i=st.integers(0, 1000), where=st.lists(st.integers(0, 1000), min_size=1, max_size=3))
    def write(self, i: int, where: list[int]) -> None:
        vid = self._pick(self.volumes, i)
        content = self.volumes[vid]
        nregions = content.size // REGION
        chosen = {w % nregions: next(self.patterns) for w in where}
        self.kit.write_regions(self.pool.layer_path(self.pool.get_volume(vid).top_layer), chosen)
        content.regions.update(chosen)

    @precondition(lambda self: self.volumes)
    @rule(i=st.integers(0, 1000))
    def snapshot(self, i: int) -> None:
        vid = self._pick(self.volumes, i)
        s = self.pool.create_snapshot(self._name("s"), vid)
        assert s.size_bytes == self.volumes[vid].size
        self.snapshots[s.id] = self.volumes[vid].copy()

    @precondition(lambda self: self.snapshots)
    @rule(i=st.integers(0, 1000), extra=st.sampled_from([0, 0, 4]))
    def restore(self, i: int, extra: int) -> None:
        sid = self._pick(self.snapshots, i)
        size = self.snapshots[sid].size + extra * REGION
        v = self.pool.create_volume(self._name("r"), required_bytes=size,
                                    source=SnapshotSource(sid))
        assert v.size_bytes == size
        self.volumes[v.id] = self.snapshots[sid].copy(size)

    @precondition(lambda self: self.volumes)
    @rule(i=st.integers(0, 1000), extra=st.sampled_from([0, 0, 4]))
    def clone(self, i: int, extra: int) -> None:
        vid = self._pick(self.volumes, i)
        size = self.volumes[vid].size + extra * REGION
        v = self.pool.create_volume(self._name("c"), required_bytes=size,
                                    source=VolumeSource(vid))
        assert v.size_bytes == size
        self.volumes[v.id] = self.volumes[vid].copy(size)

    @precondition(lambda self: self.volumes)
    @rule(i=st.integers(0, 1000), extra=st.sampled_from([4, 8]))
    def expand(self, i: int, extra: int) -> None:
        vid = self._pick(self.volumes, i)
        content = self.volumes[vid]
        if content.size >= 48 * REGION:
            return
        v = self.pool.expand_volume(vid, content.size + extra * REGION)
        content.size += extra * REGION
        assert v.size_bytes == content.size

    @precondition(lambda self: self.volumes)
    @rule(i=st.integers(0, 1000))
    def delete_volume(self, i: int) -> None:
        vid = self._pick(self.volumes, i)
        self.pool.delete_volume(vid)
        del self.volumes[vid]

    @precondition(lambda self: self.snapshots)
    @rule(i=st.integers(0, 1000))
    def delete_snapshot(self, i: int) -> None:
        sid = self._pick(self.snapshots, i)
        self.pool.delete_snapshot(sid)
        del self.snapshots[sid]

    @rule()
    def reopen(self) -> None:
        """Closing and reopening a clean pool (recovery included) changes nothing."""
        with self.pool.catalog.reading() as tx:
            layers = sorted(tx.all_layers(), key=lambda layer: layer.id)
        files = sorted(os.listdir(self.pool.layout.layers))
        self.pool.close()
        self.pool = Pool.open(self.root, config=PoolConfig(depth_cap=2))
        self.maintainer = Maintainer(self.pool)
        with self.pool.catalog.reading() as tx:
            assert sorted(tx.all_layers(), key=lambda layer: layer.id) == layers
        assert sorted(os.listdir(self.pool.layout.layers)) == files

    @rule()
    def maintain(self) -> None:
        self.maintainer.run_once()
        self.check_everything()
        self.kit.check_idle(self.pool)
        assert max((layer.depth for layer in self.kit.catalog_layers(self.pool).values()),
                   default=0) <= self.pool.config.depth_cap

    # -- checks ----------------------------------------------------------

    def check_everything(self) -> None:
        self.kit.check_pool(self.pool)
        for vid, content in self.volumes.items():
            self.kit.expect_volume(self.pool, vid, content.regions)
            assert self.pool.get_volume(vid).size_bytes == content.size
        for sid, content in self.snapshots.items():
            self.kit.expect_snapshot(self.pool, sid, content.regions)

    @invariant()
    def catalog_matches_model(self) -> None:
        with self.pool.catalog.reading() as tx:
            assert tx.intents() == []
        assert {v.id for v in self.pool.list_volumes().items} == set(self.volumes)
        assert {s.id for s in self.pool.list_snapshots().items} == set(self.snapshots)

    def teardown(self) -> None:
        try:
            self.maintainer.run_once()
            self.check_everything()
            for sid in list(self.snapshots):
                self.pool.delete_snapshot(sid)
            for vid in list(self.volumes):
                self.pool.delete_volume(vid)
            self.maintainer.run_once()
            assert_empty(self.kit, self.pool)
        finally:
            self.pool.close()
            shutil.rmtree(self.root, ignore_errors=True)


def test_random_operations_against_a_model(kit, tmp_path: Path) -> None:
    PoolMachine.kit = kit
    PoolMachine.base = tmp_path
    run_state_machine_as_test(
        PoolMachine,
        settings=settings(max_examples=15, stateful_step_count=40, deadline=None,
                          database=None, derandomize=False,
                          suppress_health_check=list(HealthCheck)))
