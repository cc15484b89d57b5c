"""Depth merges: chains longer than the cap are flattened, layers only one
child needs are collapsed (commit or rebase), and every volume and
snapshot reads exactly what it did; the catalog's depth column always
agrees with the backing chain qemu-img sees."""

from __future__ import annotations

from pathlib import Path

from engine.model import SnapshotSource
from engine.pool import Pool
from engine.reclaim import Maintainer

MIB = 1 << 20
REGION = 64 << 10
CAP = 4


def top(pool: Pool, volume_id: str) -> Path:
    return pool.layer_path(pool.get_volume(volume_id).top_layer)


def max_depth(kit, pool: Pool) -> int:
    return max(layer.depth for layer in kit.catalog_layers(pool).values())


def test_depth_cap_flatten_then_collapse(kit, pool_root: Path) -> None:
    pool = kit.open(pool_root, depth_cap=CAP)
    try:
        v = pool.create_volume("v", required_bytes=1 * MIB)
        model: dict[int, int] = {}
        snaps: list[tuple[str, dict[int, int]]] = []
        for i in range(12):
            # A region of its own and one overwritten every time.
            change = {i: 0x20 + i, 15: 0x40 + i}
            kit.write_regions(top(pool, v.id), change)
            model.update(change)
            snaps.append((pool.create_snapshot(f"s{i}", v.id).id, dict(model)))
        kit.write_regions(top(pool, v.id), {13: 0x7F})
        model[13] = 0x7F
        r = pool.create_volume("r", source=SnapshotSource(snaps[11][0]))
        kit.write_regions(top(pool, r.id), {14: 0x6E})
        restored = {**snaps[11][1], 14: 0x6E}

        assert pool.volume_chain(v.id)[0].depth == 13 == kit.chain_length(top(pool, v.id))
        assert max_depth(kit, pool) == 13
        kit.check_pool(pool)

        def check_all() -> None:
            kit.check_pool(pool)          # includes: depth column == qemu-img chain length
            kit.check_idle(pool)
            assert max_depth(kit, pool) <= CAP
            kit.expect_volume(pool, v.id, model)
            kit.expect_volume(pool, r.id, restored)
            for sid, content in snaps:
                kit.expect_snapshot(pool, sid, content)
            for info in pool.volume_chain(v.id):
                assert info.depth <= CAP

        maintainer = Maintainer(pool)
        maintainer.run_once()
        assert maintainer.stats.merges["flatten"] > 0
        check_all()

        # The volume still takes writes and snapshots after the merges.
        kit.write_regions(top(pool, v.id), {12: 0x55})
        model[12] = 0x55

        # Delete every other snapshot, starting with the oldest: after the
        # flattening above this leaves layers that only one child needs,
        # some collapsed by committing the child into them, some by
        # rebasing the child past them.
        deleted = snaps[0::2]
        snaps = snaps[1::2]
        for sid, _ in deleted:
            pool.delete_snapshot(sid)
        layers_before = kit.catalog_layers(pool)
        kept_layers = {sid: pool.get_snapshot(sid).layer for sid, _ in snaps}
        maintainer.run_once()
        assert maintainer.stats.merges["collapse"] > 0
        layers_after = kit.catalog_layers(pool)
        assert len(layers_after) < len(layers_before)
        committed = [sid for sid, layer in kept_layers.items()
                     if pool.get_snapshot(sid).layer != layer]
        rebased = [lid for lid, layer in layers_after.items()
                   if lid in layers_before and layers_before[lid].parent != layer.parent]
        assert committed, "no collapse committed a child into its parent"
        assert rebased, "no collapse rebased a child past its parent"
        check_all()

        s_new = pool.create_snapshot("after", v.id)
        snaps.append((s_new.id, dict(model)))
        again = pool.create_volume("again", source=SnapshotSource(snaps[0][0]))
        kit.expect_volume(pool, again.id, snaps[0][1])
        maintainer.run_once()
        check_all()
        kit.expect_volume(pool, again.id, snaps[0][1])
    finally:
        pool.close()


def test_collapse_commits_a_small_child_into_its_parent(kit, pool: Pool) -> None:
    v = pool.create_volume("v", required_bytes=2 * MIB)
    kit.write(top(pool, v.id), 0xA0, 0, 1 * MIB)
    s = pool.create_snapshot("s", v.id)
    old_top = pool.get_volume(v.id).top_layer
    kit.write(top(pool, v.id), 0xA1, 0, REGION)
    pool.delete_snapshot(s.id)
    Maintainer(pool).run_once()
    # The parent took the child's place; the child was reclaimed.
    assert pool.get_volume(v.id).top_layer == s.layer
    assert old_top not in kit.catalog_layers(pool)
    assert not pool.layer_path(old_top).exists()
    assert kit.catalog_layers(pool)[s.layer].read_only is False
    kit.check_pool(pool)
    kit.check_idle(pool)
    kit.expect_volume(pool, v.id, {0: 0xA1, **{r: 0xA0 for r in range(1, 16)}})
    kit.write(top(pool, v.id), 0xA2, 1 * MIB, REGION)
    kit.expect_volume(pool, v.id, {0: 0xA1, **{r: 0xA0 for r in range(1, 16)}, 16: 0xA2})


def test_collapse_commit_into_a_smaller_parent(kit, pool: Pool) -> None:
    """The child was expanded past its parent's size: the commit must grow
    the parent and keep the new area's content."""
    v = pool.create_volume("v", required_bytes=1 * MIB)
    kit.write(top(pool, v.id), 0xB0, 0, 1 * MIB)
    s = pool.create_snapshot("s", v.id)
    pool.expand_volume(v.id, 2 * MIB)
    kit.write(top(pool, v.id), 0xB1, 1 * MIB + REGION, REGION)
    pool.delete_snapshot(s.id)
    Maintainer(pool).run_once()
    assert pool.get_volume(v.id).top_layer == s.layer
    kit.check_pool(pool)
    kit.check_idle(pool)
    kit.expect_volume(pool, v.id, {**{r: 0xB0 for r in range(16)}, 17: 0xB1})


def test_collapse_never_rebases_past_a_base(kit, pool: Pool) -> None:
    """A large child on a base: rebasing it onto nothing would copy the
    whole base, so the child is committed into the base instead, however
    large it is."""
    v = pool.create_volume("v", required_bytes=2 * MIB)
    kit.write(top(pool, v.id), 0xC0, 0, REGION)
    s = pool.create_snapshot("s", v.id)
    child = pool.get_volume(v.id).top_layer
    kit.write(top(pool, v.id), 0xC1, REGION, 1 * MIB)
    pool.delete_snapshot(s.id)
    Maintainer(pool).run_once()
    # The base takes the child's place as the top; the child is gone.
    assert pool.get_volume(v.id).top_layer == s.layer
    layers = kit.catalog_layers(pool)
    assert set(layers) == {s.layer} and layers[s.layer].parent is None
    assert layers[s.layer].depth == 1 and not layers[s.layer].read_only
    assert not pool.layer_path(child).exists()
    kit.check_pool(pool)
    kit.check_idle(pool)
    kit.expect_volume(pool, v.id, {0: 0xC0, **{r: 0xC1 for r in range(1, 17)}})


def test_collapse_rebases_a_middle_layer(kit, pool: Pool) -> None:
    """A deleted snapshot between two others: the later snapshot's layer
    (which has a child of its own) is rebased past it."""
    v = pool.create_volume("v", required_bytes=1 * MIB)
    kit.write(top(pool, v.id), 0xD0, 0, 1 * MIB)
    s0 = pool.create_snapshot("s0", v.id)
    kit.write(top(pool, v.id), 0xD1, 0, REGION)
    s1 = pool.create_snapshot("s1", v.id)
    # s2's layer holds more than s1's: rebasing it is the cheaper merge.
    kit.write(top(pool, v.id), 0xD2, REGION, 2 * REGION)
    s2 = pool.create_snapshot("s2", v.id)
    kit.write(top(pool, v.id), 0xD3, 2 * REGION, REGION)
    pool.delete_snapshot(s1.id)
    Maintainer(pool).run_once()
    layers = kit.catalog_layers(pool)
    assert s1.layer not in layers
    assert layers[s2.layer].parent == s0.layer and layers[s2.layer].depth == 2
    kit.check_pool(pool)
    kit.check_idle(pool)
    base = {r: 0xD0 for r in range(16)}
    kit.expect_snapshot(pool, s0.id, base)
    kit.expect_snapshot(pool, s2.id, {**base, 0: 0xD1, 1: 0xD2, 2: 0xD2})
    kit.expect_volume(pool, v.id, {**base, 0: 0xD1, 1: 0xD2, 2: 0xD3})
    # Deleting the first snapshot too: everything folds, contents unchanged.
    pool.delete_snapshot(s0.id)
    Maintainer(pool).run_once()
    kit.check_pool(pool)
    kit.check_idle(pool)
    kit.expect_snapshot(pool, s2.id, {**base, 0: 0xD1, 1: 0xD2, 2: 0xD2})
    kit.expect_volume(pool, v.id, {**base, 0: 0xD1, 1: 0xD2, 2: 0xD3})
