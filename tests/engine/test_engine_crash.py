"""Crash injection at every crash point of the engine.

For each point an operation runs in a child process (``crash_child.py``)
that dies with ``os._exit(137)`` the moment the engine reaches the point.
The test process then reopens the pool, which runs recovery, and checks:

* no intent and no temporary file is left, the layer files are exactly the
  catalog's layers, every header names its catalog parent and every depth
  matches the real chain (``Kit.check_pool``);
* everything written before the operation reads back unchanged;
* the operation happened completely or not at all (for "not at all" the
  catalog is exactly as before), and which of the two is what the
  recovery rules promise for that point;
* retrying the operation succeeds and gives the finished result.

The crash points are discovered from the engine's source, so a new point
without a scenario here fails ``test_every_crash_point_has_a_scenario``.
"""

from __future__ import annotations

import dataclasses

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine.model import SnapshotSource, VolumeSource
from engine.pool import Pool
from engine.reclaim import Maintainer

MIB = 1 << 20
REGION = 64 << 10
ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("crash_child.py")
CRASH_EXIT = 137


# -- discovering the crash points ---------------------------------------------------

def discover_crash_points() -> set[str]:
    """Every name the engine can pass to ``_crash_point``: string literals,
    plus ``f"{kind}:after-intent"`` in ``_begin`` expanded over every kind
    passed to ``_begin("...")``.  Any other form of call is an error, so a
    new kind of crash point cannot slip through unnoticed."""
    points: set[str] = set()
    kinds: set[str] = set()
    for path in sorted((ROOT / "engine").glob("*.py")):
        text = path.read_text()
        kinds |= set(re.findall(r'_begin\(\s*"([^"]+)"', text))
        for match in re.finditer(r"(?<!def )_crash_point\(([^)]*)\)", text):
            arg = match.group(1).strip()
            literal = re.fullmatch(r'"([^"{}]+)"', arg)
            if literal:
                points.add(literal.group(1))
            elif arg == 'f"{kind}:after-intent"':
                points.add("{kind}:after-intent")
            else:
                raise AssertionError(f"{path.name}: crash point {arg!r} is not a form this test "
                                     "knows how to enumerate")
    if "{kind}:after-intent" in points:
        points.remove("{kind}:after-intent")
        assert kinds, "the after-intent crash point exists but no _begin kinds were found"
        points |= {f"{kind}:after-intent" for kind in kinds}
    return points


# -- the scenarios ---------------------------------------------------------------------

@dataclass
class World:
    """What exists before the crashing operation, and what it must read."""

    ids: dict[str, str] = field(default_factory=dict)           # name -> volume/snapshot ID
    contents: dict[str, dict[int, int]] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)        # labels for layer IDs
    extra: dict[str, Any] = field(default_factory=dict)


def top(pool: Pool, volume_id: str) -> Path:
    return pool.layer_path(pool.get_volume(volume_id).top_layer)


def by_name(pool: Pool, name: str) -> Any:
    for v in pool.list_volumes().items:
        if v.name == name:
            return v
    for s in pool.list_snapshots().items:
        if s.name == name:
            return s
    return None


def base_world(kit, pool: Pool) -> World:
    """A 2 MiB volume "vol" with data, its snapshot "s1", and data written
    after the snapshot."""
    w = World()
    vol = pool.create_volume("vol", required_bytes=2 * MIB)
    w.ids["vol"] = vol.id
    kit.write_regions(top(pool, vol.id), {r: 0xA1 for r in range(16)})
    s1 = pool.create_snapshot("s1", vol.id)
    w.ids["s1"] = s1.id
    w.layers["s1"] = s1.layer
    kit.write_regions(top(pool, vol.id), {0: 0xB3, 16: 0xB2})
    w.contents["s1"] = {r: 0xA1 for r in range(16)}
    w.contents["vol"] = {**w.contents["s1"], 0: 0xB3, 16: 0xB2}
    return w


def check_world(kit, pool: Pool, w: World) -> None:
    for name, regions in w.contents.items():
        if name not in w.ids:
            continue
        if w.ids[name].startswith("s-"):
            kit.expect_snapshot(pool, w.ids[name], regions)
        else:
            kit.expect_volume(pool, w.ids[name], regions)


class Scenario:
    """One operation to crash.  Subclasses say how to set it up, how to
    tell whether it happened, what "done" looks like, and how to retry."""

    config: dict[str, Any] = {}

    def prepare(self, kit, pool: Pool, w: World) -> dict[str, Any]:
        raise NotImplementedError

    def happened(self, pool: Pool, w: World) -> bool:
        raise NotImplementedError

    def check_done(self, kit, pool: Pool, w: World) -> None:
        raise NotImplementedError

    def retry(self, kit, pool: Pool, w: World) -> None:
        raise NotImplementedError


class CreateEmpty(Scenario):
    def prepare(self, kit, pool, w):
        return {"op": "create_volume", "name": "new", "required_bytes": 1 * MIB}

    def happened(self, pool, w):
        return by_name(pool, "new") is not None

    def check_done(self, kit, pool, w):
        new = by_name(pool, "new")
        assert new.size_bytes == 1 * MIB and new.source is None
        assert kit.catalog_layers(pool)[new.top_layer].parent is None
        kit.expect_volume(pool, new.id, {})
        w.extra.setdefault("new", new)
        assert (new.id, new.created_ns) == (w.extra["new"].id, w.extra["new"].created_ns)

    def retry(self, kit, pool, w):
        v = pool.create_volume("new", required_bytes=1 * MIB)
        assert by_name(pool, "new") == v


class CreateRestore(Scenario):
    def prepare(self, kit, pool, w):
        return {"op": "create_volume", "name": "new", "required_bytes": 3 * MIB,
                "source": ["snapshot", w.ids["s1"]]}

    def happened(self, pool, w):
        return by_name(pool, "new") is not None

    def check_done(self, kit, pool, w):
        new = by_name(pool, "new")
        assert new.size_bytes == 3 * MIB and new.source == SnapshotSource(w.ids["s1"])
        assert kit.catalog_layers(pool)[new.top_layer].parent == w.layers["s1"]
        kit.expect_volume(pool, new.id, w.contents["s1"])
        w.extra.setdefault("new", new)
        assert (new.id, new.created_ns) == (w.extra["new"].id, w.extra["new"].created_ns)

    def retry(self, kit, pool, w):
        v = pool.create_volume("new", required_bytes=3 * MIB, source=SnapshotSource(w.ids["s1"]))
        assert by_name(pool, "new") == v


class Snapshot(Scenario):
    def prepare(self, kit, pool, w):
        w.layers["cut"] = pool.get_volume(w.ids["vol"]).top_layer
        return {"op": "create_snapshot", "name": "s2", "volume": w.ids["vol"]}

    def happened(self, pool, w):
        return by_name(pool, "s2") is not None

    def check_done(self, kit, pool, w):
        s2 = by_name(pool, "s2")
        assert s2.layer == w.layers["cut"] and s2.size_bytes == 2 * MIB
        layers = kit.catalog_layers(pool)
        vol = pool.get_volume(w.ids["vol"])
        assert vol.top_layer != s2.layer and layers[vol.top_layer].parent == s2.layer
        assert layers[s2.layer].read_only
        kit.expect_snapshot(pool, s2.id, w.contents["vol"])
        w.extra.setdefault("s2", s2)
        assert s2 == w.extra["s2"]

    def retry(self, kit, pool, w):
        s2 = pool.create_snapshot("s2", w.ids["vol"])
        assert pool.get_snapshot(s2.id) == s2


class Clone(Scenario):
    def prepare(self, kit, pool, w):
        w.layers["cut"] = pool.get_volume(w.ids["vol"]).top_layer
        return {"op": "create_volume", "name": "c", "source": ["volume", w.ids["vol"]]}

    def happened(self, pool, w):
        return by_name(pool, "c") is not None

    def check_done(self, kit, pool, w):
        c = by_name(pool, "c")
        assert c.source == VolumeSource(w.ids["vol"]) and c.size_bytes == 2 * MIB
        layers = kit.catalog_layers(pool)
        vol = pool.get_volume(w.ids["vol"])
        cut = w.layers["cut"]
        assert layers[cut].read_only
        assert vol.top_layer != cut and layers[vol.top_layer].parent == cut
        assert c.top_layer != cut and layers[c.top_layer].parent == cut
        kit.expect_volume(pool, c.id, w.contents["vol"])
        w.extra.setdefault("c", c)
        assert (c.id, c.created_ns) == (w.extra["c"].id, w.extra["c"].created_ns)

    def retry(self, kit, pool, w):
        c = pool.create_volume("c", source=VolumeSource(w.ids["vol"]))
        assert by_name(pool, "c") == c


class Expand(Scenario):
    def prepare(self, kit, pool, w):
        return {"op": "expand_volume", "volume": w.ids["vol"], "required_bytes": 4 * MIB}

    def happened(self, pool, w):
        return pool.get_volume(w.ids["vol"]).size_bytes == 4 * MIB

    def check_done(self, kit, pool, w):
        assert kit.info(top(pool, w.ids["vol"]))["virtual-size"] == 4 * MIB
        kit.expect_volume(pool, w.ids["vol"], w.contents["vol"])   # new area reads zeros

    def retry(self, kit, pool, w):
        assert pool.expand_volume(w.ids["vol"], 4 * MIB).size_bytes == 4 * MIB


class MergeCommit(Scenario):
    """s1 deleted: its layer is needed only by the volume's small top,
    which the maintainer commits into it."""

    grow = False

    def prepare(self, kit, pool, w):
        if self.grow:
            # The top grows past its parent, so the commit must grow the parent.
            pool.expand_volume(w.ids["vol"], 4 * MIB)
            kit.write_regions(top(pool, w.ids["vol"]), {40: 0xE4})
            w.contents["vol"][40] = 0xE4
        pool.delete_snapshot(w.ids.pop("s1"))
        w.contents.pop("s1")
        return {"op": "maintain"}

    def happened(self, pool, w):
        return pool.get_volume(w.ids["vol"]).top_layer == w.layers["s1"]

    def check_done(self, kit, pool, w):
        assert set(kit.catalog_layers(pool)) == {w.layers["s1"]}

    def retry(self, kit, pool, w):
        Maintainer(pool).run_once()


class MergeCommitGrown(MergeCommit):
    grow = True


class RebaseFlatten(Scenario):
    """Depth cap 2 and two snapshots: the volume's top is one layer too
    deep and is rebased onto the root layer."""

    config = {"depth_cap": 2}

    def prepare(self, kit, pool, w):
        s2 = pool.create_snapshot("s2", w.ids["vol"])
        w.ids["s2"] = s2.id
        w.layers["s2"] = s2.layer
        w.contents["s2"] = dict(w.contents["vol"])
        kit.write_regions(top(pool, w.ids["vol"]), {17: 0xC4})
        w.contents["vol"][17] = 0xC4
        assert kit.catalog_layers(pool)[pool.get_volume(w.ids["vol"]).top_layer].depth == 3
        return {"op": "maintain", "config": self.config}

    def happened(self, pool, w):
        vol_top = pool.get_volume(w.ids["vol"]).top_layer
        return kit_layers(pool)[vol_top].parent == w.layers["s1"]

    def check_done(self, kit, pool, w):
        layers = kit.catalog_layers(pool)
        vol_top = pool.get_volume(w.ids["vol"]).top_layer
        assert layers[vol_top].parent == w.layers["s1"] and layers[vol_top].depth == 2
        assert max(layer.depth for layer in layers.values()) <= 2

    def retry(self, kit, pool, w):
        Maintainer(pool).run_once()


class CommitRepoint(Scenario):
    """s1 (the base) deleted while s2 (cut after it) and the volume's top
    sit on it: s2's layer is committed into s1's, which takes its place,
    and the volume's top is repointed onto it (rebasing past a base would
    copy the whole base)."""

    def prepare(self, kit, pool, w):
        s2 = pool.create_snapshot("s2", w.ids["vol"])
        w.ids["s2"] = s2.id
        w.layers["s2"] = s2.layer
        w.contents["s2"] = dict(w.contents["vol"])
        kit.write_regions(top(pool, w.ids["vol"]), {17: 0xC4})
        w.contents["vol"][17] = 0xC4
        pool.delete_snapshot(w.ids.pop("s1"))
        w.contents.pop("s1")
        return {"op": "maintain"}

    def happened(self, pool, w):
        return pool.get_snapshot(w.ids["s2"]).layer == w.layers["s1"]

    def check_done(self, kit, pool, w):
        layers = kit.catalog_layers(pool)
        vol_top = pool.get_volume(w.ids["vol"]).top_layer
        assert layers[vol_top].parent == w.layers["s1"] and layers[vol_top].depth == 2
        assert layers[w.layers["s1"]].depth == 1

    def retry(self, kit, pool, w):
        Maintainer(pool).run_once()
        assert w.layers["s2"] not in kit.catalog_layers(pool)


class RebaseCollapse(Scenario):
    """s2 deleted while s3 (cut after it, holding more data than s2) and the
    volume's top sit on it: s3's layer, which has a child, is rebased past
    s2's layer onto s1's."""

    def prepare(self, kit, pool, w):
        s2 = pool.create_snapshot("s2", w.ids["vol"])
        kit.write_regions(top(pool, w.ids["vol"]), {r: 0xC5 for r in range(20, 26)})
        w.contents["vol"].update({r: 0xC5 for r in range(20, 26)})
        s3 = pool.create_snapshot("s3", w.ids["vol"])
        w.ids["s3"] = s3.id
        w.layers["s3"] = s3.layer
        w.contents["s3"] = dict(w.contents["vol"])
        kit.write_regions(top(pool, w.ids["vol"]), {17: 0xC4})
        w.contents["vol"][17] = 0xC4
        pool.delete_snapshot(s2.id)
        return {"op": "maintain"}

    def happened(self, pool, w):
        return kit_layers(pool)[w.layers["s3"]].parent == w.layers["s1"]

    def check_done(self, kit, pool, w):
        layers = kit.catalog_layers(pool)
        assert layers[w.layers["s3"]].parent == w.layers["s1"] and layers[w.layers["s3"]].depth == 2

    def retry(self, kit, pool, w):
        Maintainer(pool).run_once()


class Reclaim(Scenario):
    """A deleted volume and its deleted snapshot: two layers to reclaim,
    the top first (its parent only becomes garbage once the top's row is
    gone)."""

    def prepare(self, kit, pool, w):
        gone = pool.create_volume("gone", required_bytes=1 * MIB)
        kit.write_regions(top(pool, gone.id), {0: 0x99})
        gone_s = pool.create_snapshot("gone-s", gone.id)
        kit.write_regions(top(pool, gone.id), {1: 0x98})
        w.layers["gone-base"] = gone_s.layer
        w.layers["gone"] = pool.get_volume(gone.id).top_layer
        pool.delete_snapshot(gone_s.id)
        pool.delete_volume(gone.id)
        return {"op": "maintain"}

    def happened(self, pool, w):
        return not pool.layer_path(w.layers["gone"]).exists()

    def check_done(self, kit, pool, w):
        layers = kit.catalog_layers(pool)
        assert w.layers["gone"] not in layers and w.layers["gone-base"] not in layers
        assert not pool.layer_path(w.layers["gone-base"]).exists()

    def retry(self, kit, pool, w):
        Maintainer(pool).run_once()


def kit_layers(pool: Pool) -> dict[str, Any]:
    with pool.catalog.reading() as tx:
        return {layer.id: layer for layer in tx.all_layers()}


# point -> (scenario name, whether recovery must leave the operation done)
CASES: list[tuple[str, str, bool]] = [
    ("create:after-intent", "create-empty", False),
    ("create:after-intent", "create-restore", False),
    ("create:after-file", "create-empty", True),
    ("create:after-file", "create-restore", True),
    ("create:after-commit", "create-empty", True),
    ("create:after-commit", "create-restore", True),
    ("snapshot:after-intent", "snapshot", False),
    ("snapshot:after-file", "snapshot", True),
    ("snapshot:after-commit", "snapshot", True),
    ("clone:after-intent", "clone", False),
    ("clone:after-origin-file", "clone", False),
    ("clone:after-clone-file", "clone", True),
    ("clone:after-commit", "clone", True),
    ("expand:after-intent", "expand", False),
    ("expand:after-file", "expand", True),
    # An interrupted commit is forgotten (the child still covers every
    # cluster it wrote) and redone by the next pass.
    ("merge-commit:after-intent", "merge-commit", False),
    ("merge-commit:after-file", "merge-commit", False),
    ("merge-commit:after-intent", "merge-commit-grown", False),
    ("merge-commit:after-file", "merge-commit-grown", False),
    # Once every child names the parent, the commit was complete: finished.
    ("merge-commit:after-intent", "commit-repoint", False),
    ("merge-commit:after-file", "commit-repoint", False),
    ("merge-commit:after-repoint", "commit-repoint", True),
    ("merge-rebase:after-intent", "rebase-flatten", False),
    ("merge-rebase:after-file", "rebase-flatten", True),
    ("merge-rebase:after-intent", "rebase-collapse", False),
    ("merge-rebase:after-file", "rebase-collapse", True),
    ("reclaim:after-unlink", "reclaim", True),
]

SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "create-empty": CreateEmpty,
    "create-restore": CreateRestore,
    "snapshot": Snapshot,
    "clone": Clone,
    "expand": Expand,
    "merge-commit": MergeCommit,
    "merge-commit-grown": MergeCommitGrown,
    "rebase-flatten": RebaseFlatten,
    "rebase-collapse": RebaseCollapse,
    "commit-repoint": CommitRepoint,
    "reclaim": Reclaim,
}


def test_every_crash_point_has_a_scenario() -> None:
    discovered = discover_crash_points()
    assert len(discovered) >= 17
    assert discovered == {point for point, _, _ in CASES}


def catalog_state(pool: Pool) -> tuple[Any, ...]:
    with pool.catalog.reading() as tx:
        layers = {layer.id: layer for layer in tx.all_layers()}
        volumes = {v.id: v for _, v in tx.volumes_page(0, 1 << 30)}
        snapshots = {s.id: s for _, s in tx.snapshots_page(0, 1 << 30)}
    return layers, volumes, snapshots


def _without_sizes(state: tuple[Any, ...]) -> tuple[Any, ...]:
    layers, volumes, snapshots = state
    return ({k: dataclasses.replace(v, virtual_size=0) for k, v in layers.items()},
            volumes, snapshots)


def run_child(root: Path, point: str, spec: dict[str, Any]) -> None:
    done = subprocess.run([sys.executable, str(CHILD), str(root), point, json.dumps(spec)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == CRASH_EXIT, (
        f"the child did not crash at {point} (exit {done.returncode}):\n"
        f"{done.stdout}\n{done.stderr}")


@pytest.mark.parametrize("point,scenario,done", CASES,
                         ids=[f"{p}[{s}]" for p, s, _ in CASES])
def test_crash_and_recover(kit, tmp_path: Path, point: str, scenario: str, done: bool) -> None:
    sc = SCENARIOS[scenario]()
    root = tmp_path / "pool"
    pool = kit.open(root, **sc.config)
    w = base_world(kit, pool)
    spec = sc.prepare(kit, pool, w)
    spec["config"] = sc.config
    check_world(kit, pool, w)
    kit.check_pool(pool)
    before = catalog_state(pool)
    assert not sc.happened(pool, w)
    pool.close()

    run_child(root, point, spec)

    pool = kit.open(root, **sc.config)          # recovery runs here
    try:
        # A reclaim interrupted between unlink and row deletion leaves an
        # unreferenced row whose file is gone; the next pass drops it.
        kit.check_pool(pool, missing_garbage_ok=(point == "reclaim:after-unlink"))
        check_world(kit, pool, w)
        happened = sc.happened(pool, w)
        assert happened == done, (f"after a crash at {point} the operation "
                                  f"{'happened' if happened else 'did not happen'}")
        if happened:
            if scenario != "reclaim":
                sc.check_done(kit, pool, w)
        else:
            after = catalog_state(pool)
            if point.startswith("merge-commit"):
                # Undoing a commit keeps the parent's growth (only its child
                # reads the parent, and reads the same); the catalog then
                # records the file's real size, which check_pool verified.
                after, before = _without_sizes(after), _without_sizes(before)
            assert after == before, "a half-done operation changed the catalog"

        sc.retry(kit, pool, w)
        assert sc.happened(pool, w), "retrying the operation did not complete it"
        sc.check_done(kit, pool, w)
        kit.check_pool(pool)
        check_world(kit, pool, w)
        if spec["op"] == "maintain":
            kit.check_idle(pool)
    finally:
        pool.close()

    # And once more from a clean start: nothing was left for recovery.
    pool = kit.open(root, **sc.config)
    try:
        kit.check_pool(pool)
        check_world(kit, pool, w)
    finally:
        pool.close()
