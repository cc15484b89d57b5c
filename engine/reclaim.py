"""Reference counting, reclaiming and depth merges: the pool's background
work.  Nothing here runs on a request's path.

A layer is *garbage* when no volume has it as its top, no snapshot points at
it, no layer is backed by it and no unfinished intent pins it.  Garbage
cannot gain references again, so the reclaimer removes its file and then its
row; a crash in between leaves a row whose file is gone, which the next
pass drops.

Merges keep every volume's and snapshot's content as it is:

* **collapse** — a layer that only one child still needs (its snapshot was
  deleted) is merged with that child: the child is committed into it when
  the child is the smaller of the two (the usual case: a small overlay on a
  large base), otherwise the child is rebased past it;
* **flatten** — a layer deeper than the cap is rebased onto an ancestor at
  half the cap, copying only the clusters the skipped layers changed.

Both work on closed images only, with qemu-img's content-preserving modes,
and each is an intent so a crash in the middle is finished or undone.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.catalog import Intent, Tx
from engine.errors import Busy, EngineError
from engine.model import Layer, Owner
from engine.pool import top_file_key
from engine.qemu_img import image_locks

if TYPE_CHECKING:
    from engine.pool import Pool

log = logging.getLogger(__name__)

# Layers with no owner, no snapshot, and exactly one child.
_COLLAPSIBLE = """
SELECT l.id FROM layers l
WHERE NOT EXISTS (SELECT 1 FROM volumes v WHERE v.top = l.id)
  AND NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.layer = l.id)
  AND NOT EXISTS (SELECT 1 FROM intent_layers i WHERE i.layer = l.id)
  AND (SELECT COUNT(*) FROM layers c WHERE c.parent = l.id) = 1
ORDER BY l.depth
"""

# Every layer in the chain of a volume that an owner other than qsnap has
# open, with that volume: (layer, volume id, volume owner, volume top).
_OPEN_LAYERS = """
WITH RECURSIVE up(id, volume, owner, top) AS (
    SELECT top, id, owner, top FROM volumes WHERE owner != 'closed'
    UNION
    SELECT l.parent, up.volume, up.owner, up.top FROM layers l JOIN up ON l.id = up.id
    WHERE l.parent IS NOT NULL)
SELECT id, volume, owner, top FROM up
"""


@dataclass(frozen=True)
class _Opener:
    """A volume whose owner has a layer open."""

    volume_id: str
    owner: Owner
    top: str


@dataclass
class MaintenanceStats:
    """Running totals, read by metrics and ``qsnap pool``."""

    reclaimed_layers: int = 0
    merges: dict[str, int] = field(default_factory=lambda: {"collapse": 0, "flatten": 0})
    passes: int = 0
    last_error: str = ""


def reclaim(pool: "Pool") -> int:
    """Remove every garbage layer (repeatedly: removing one may make its
    parent garbage).  Returns how many were removed."""
    removed = 0
    while True:
        with pool.catalog.reading() as tx:
            garbage = tx.garbage()
        if not garbage:
            return removed
        for layer_id in garbage:
            # Garbage never regains a reference, so removing the file before
            # the row is safe; the reverse order could orphan the file.
            pool.layout.unlink(layer_id)
            pool._crash_point("reclaim:after-unlink")
            with pool.catalog.transaction() as tx:
                if layer_id in tx.garbage():
                    tx.drop_layer(layer_id)
                    removed += 1
            log.info("layer %s: reclaimed", layer_id)


def _openers(pool: "Pool") -> dict[str, list[_Opener]]:
    """Layer → the owned volumes whose chains include it."""
    out: dict[str, list[_Opener]] = {}
    with pool.catalog.reading() as tx:
        for r in tx.all(_OPEN_LAYERS):
            out.setdefault(r["id"], []).append(_Opener(r["volume"], Owner(r["owner"]), r["top"]))
    return out


@dataclass(frozen=True)
class _Route:
    """Who performs a merge: qemu-img on closed files (``via`` None), or
    the owner of the one volume that has the layers open."""

    via: _Opener | None


def _route(pool: "Pool", openers: dict[str, list[_Opener]], layers: list[str]) -> _Route | None:
    """How layers can be merged; None when they cannot be now: open by
    several volumes (each holds the files; a write would conflict), by an
    owner through which qsnap cannot merge, or, for layers the catalog
    calls closed, by any process at all (a domain that opened a volume's
    files directly and has not been seen by a cut yet)."""
    found = {o.volume_id: o for layer in layers for o in openers.get(layer, [])}
    if not found:
        for layer in layers:
            if image_locks(pool.layout.layer_path(layer)).in_use:
                log.info("layer %s: open by a process qsnap does not own; merge postponed", layer)
                return None
        return _Route(None)
    if len(found) > 1:
        return None
    (opener,) = found.values()
    return _Route(opener) if opener.owner is Owner.SERVED else None


def _holders(pool: "Pool", layers: list[str]) -> list[str]:
    """Lock keys of the top files among ``layers``.

    Only those need excluding: expansion is the one request that opens an
    existing layer file (the top).  Cuts, restores and clones only write new
    files, and a merge re-checks the references in its final transaction,
    so it needs no lock against them.  One exception: a cut that finds its
    top's QEMU image lock held takes this key to tell a merge's qemu-img
    (which holds it) from a domain's QEMU, so every merge that opens a top
    must hold it.
    """
    keys: list[str] = []
    with pool.catalog.reading() as tx:
        for layer in layers:
            keys += [top_file_key(r["id"])
                     for r in tx.all("SELECT id FROM volumes WHERE top = ?", (layer,))]
    return keys


def _allocated(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def merge_step(pool: "Pool") -> str | None:
    """Do one merge if one is due and its objects are free.

    :returns: "collapse" or "flatten" when a merge was done, else None.
    """
    openers = _openers(pool)
    with pool.catalog.reading() as tx:
        collapsible = [r["id"] for r in tx.all(_COLLAPSIBLE)]
        deep = [r["id"] for r in tx.all("SELECT id FROM layers WHERE depth = ? ORDER BY created_ns",
                                        (pool.config.depth_cap + 1,))]
    for parent_id in collapsible:
        if _collapse(pool, parent_id, openers):
            return "collapse"
    for layer_id in deep:
        if _flatten(pool, layer_id, openers):
            return "flatten"
    return None


def _collapse(pool: "Pool", parent_id: str, openers: dict[str, list[_Opener]]) -> bool:
    with pool.catalog.reading() as tx:
        parent = tx.layer(parent_id)
        children = tx.children(parent_id)
        if parent is None or len(children) != 1:
            return False
        child = children[0]
        grandchildren = tx.children(child.id)
    # Grandchildren are rewritten too (their backing moves to the parent).
    route = _route(pool, openers, [child.id, parent_id, *(g.id for g in grandchildren)])
    if route is None:
        return False
    if route.via is not None and route.via.top == child.id:
        # QEMU cannot rewrite the top of a writable export; after the next
        # cut the child is no longer the top and the merge goes ahead.
        return False
    # Copy the smaller side: commit the child into the parent when the child
    # holds less (the usual case, a snapshot's overlay on a big base), else
    # rebase the child past the parent.  Rebasing onto a base's absence
    # would copy the whole base.  Through a served volume only a commit
    # with exactly one grandchild (the chain of that volume) is possible.
    child_path = pool.layout.layer_path(child.id)
    parent_path = pool.layout.layer_path(parent_id)
    commit = _allocated(child_path) <= _allocated(parent_path) or parent.parent is None
    if route.via is not None and len(grandchildren) != 1:
        commit = False
    try:
        # The grandchildren's headers are rewritten too: one may be a top.
        with pool.locks.hold(_holders(pool, [child.id, parent_id,
                                             *(g.id for g in grandchildren)]), wait=False):
            if commit:
                _commit_down(pool, child, parent, grandchildren, via=route.via)
            else:
                _rebase(pool, child, parent.parent, reason="collapse", via=route.via)
    except Busy:
        return False
    return True


def _commit_down(pool: "Pool", child: Layer, parent: Layer, grandchildren: list[Layer], *,
                 via: _Opener | None = None) -> None:
    """Commit ``child`` into its only-needed ``parent``; the parent then
    takes the child's place (volume top, snapshot layer, and backing of the
    child's children, whose headers are repointed: the parent now reads
    exactly like the child)."""
    body = {"child": child.id, "parent": parent.id,
            "grandchildren": [g.id for g in grandchildren]}
    intent = pool._begin("merge-commit", body,
                         pins=(child.id, parent.id, *(g.id for g in grandchildren)))
    child_path = pool.layout.layer_path(child.id)
    parent_path = pool.layout.layer_path(parent.id)
    if via is not None:
        # A block-commit job below the exported top; QEMU repoints the
        # overlay above the child in the daemon and in its header.
        pool.owner_of(via.owner).commit(via.volume_id, child.id, parent.id)
        pool._crash_point("merge-commit:after-file")
    else:
        if parent.virtual_size < child.virtual_size:
            # Grow the parent first so the child's clusters past its end
            # fit; the child reads zeros there from the parent either way.
            pool.qemu_img.resize(parent_path, child.virtual_size)
        pool.qemu_img.commit(child_path, parent_path)
        pool._crash_point("merge-commit:after-file")
        for grandchild in grandchildren:
            pool.qemu_img.set_backing(pool.layout.layer_path(grandchild.id), parent_path)
            pool._crash_point("merge-commit:after-repoint")
    with pool.catalog.transaction() as tx:
        done = _finish_commit(tx, intent, child.id, parent.id, [g.id for g in grandchildren],
                              max(parent.virtual_size, child.virtual_size))
    log.info("layer %s: %s into %s (depth %d -> %d)%s", child.id,
             "committed" if done else "commit cut short (references changed)", parent.id,
             child.depth, parent.depth, f" through volume {via.volume_id}" if via else "")


def _finish_commit(tx: Tx, intent: int, child_id: str, parent_id: str, repointed: list[str],
                   parent_size: int) -> bool:
    """Record a completed commit: the repointed children follow their
    headers and, unless the parent gained other references meanwhile, the
    parent takes the child's place.  Drops the intent.

    :returns: whether the parent took the child's place.
    """
    for grandchild in repointed:
        tx.reparent(grandchild, parent_id)
    if tx.references(parent_id)[:2] != (0, 0) or tx.pinned_elsewhere(parent_id, intent):
        # Every cluster the commit wrote is covered by the child, so
        # everything still reads the same; the child simply stays.
        tx.set_layer_size(parent_id, parent_size)
        tx.drop_intent(intent)
        return False
    child = tx.need_layer(child_id)
    tx.retarget_top(child_id, parent_id)
    tx.retarget_snapshots(child_id, parent_id)
    tx.run("UPDATE layers SET read_only = ?, virtual_size = ? WHERE id = ?",
           (int(child.read_only), child.virtual_size, parent_id))
    tx.drop_intent(intent)
    return True


def _rebase(pool: "Pool", layer: Layer, new_parent: str | None, *, reason: str,
            via: _Opener | None = None) -> None:
    """Rebase ``layer`` onto ``new_parent`` (None: make it standalone),
    then record the new parent: with qemu-img's safe mode on closed files,
    or through ``via``'s owner (a block-stream job with ``new_parent`` as
    its base) when that volume has the chain open."""
    body = {"layer": layer.id, "old_parent": layer.parent, "new_parent": new_parent,
            "reason": reason}
    pins = tuple(x for x in (layer.id, layer.parent, new_parent) if x)
    intent = pool._begin("merge-rebase", body, pins=pins)
    if via is not None:
        pool.owner_of(via.owner).rebase(via.volume_id, layer.id, new_parent)
    else:
        target = pool.layout.layer_path(new_parent) if new_parent else None
        pool.qemu_img.rebase(pool.layout.layer_path(layer.id), target)
    pool._crash_point("merge-rebase:after-file")
    with pool.catalog.transaction() as tx:
        tx.reparent(layer.id, new_parent)
        tx.drop_intent(intent)
    log.info("layer %s: rebased from %s onto %s (%s%s)", layer.id, layer.parent,
             new_parent or "nothing", reason,
             f", through volume {via.volume_id}'s {via.owner.value} owner" if via else "")


def _flatten(pool: "Pool", layer_id: str, openers: dict[str, list[_Opener]]) -> bool:
    target_depth = max(1, pool.config.depth_cap // 2)
    with pool.catalog.reading() as tx:
        chain = tx.chain(layer_id)
    route = _route(pool, openers, [x.id for x in chain])
    if route is None or len(chain) < 2:
        return False
    if route.via is not None and route.via.top == chain[0].id:
        # The exported top cannot be rewritten: shorten the chain under it
        # instead, by rebasing its parent.
        chain = chain[1:]
    layer = chain[0]
    ancestor = next((x for x in chain if x.depth == target_depth), None)
    if ancestor is None or ancestor.id == layer.parent or ancestor.id == layer.id:
        return False
    try:
        with pool.locks.hold(_holders(pool, [layer.id]), wait=False):
            _rebase(pool, layer, ancestor.id, reason="flatten", via=route.via)
    except Busy:
        return False
    return True


def recover_merge(pool: "Pool", intent: Intent) -> None:
    """Finish or undo a merge a crash interrupted.

    A commit leaves the child reading the same whether or not it finished,
    so it is simply forgotten (the next pass redoes it).  A rebase is
    finished when the layer's header already names the new parent.
    """
    body: dict[str, Any] = intent.body
    if intent.kind == "merge-commit":
        # A child's header is repointed only after the commit completed, so
        # once every child names the parent the commit is finished and is
        # recorded as such; children that name it already follow their
        # headers either way; anything less is forgotten and redone by a
        # later pass.  The parent may have been grown before the commit: the
        # catalog must say how big the file is.
        parent_path = pool.layout.layer_path(body["parent"])
        parent_size = pool.qemu_img.info(parent_path).virtual_size
        grandchildren = body.get("grandchildren", [])
        moved = []
        for grandchild in grandchildren:
            path = pool.layout.layer_path(grandchild)
            if pool.qemu_img.info(path).backing_filename == os.path.relpath(parent_path, path.parent):
                moved.append(grandchild)
        with pool.catalog.transaction() as tx:
            if grandchildren and len(moved) == len(grandchildren):
                _finish_commit(tx, intent.id, body["child"], body["parent"], moved, parent_size)
                log.info("recovery: finished merge of %s into %s", body["child"], body["parent"])
                return
            tx.set_layer_size(body["parent"], parent_size)
            for grandchild in moved:
                tx.reparent(grandchild, body["parent"])
            tx.drop_intent(intent.id)
        log.info("recovery: forgot interrupted merge of %s into %s (%d children repointed)",
                 body["child"], body["parent"], len(moved))
        return
    if intent.kind != "merge-rebase":
        raise EngineError(f"intent {intent.id} has unknown kind {intent.kind!r}")
    path = pool.layout.layer_path(body["layer"])
    header = pool.qemu_img.info(path).backing_filename
    expected = (os.path.relpath(pool.layout.layer_path(body["new_parent"]), path.parent)
                if body["new_parent"] else None)
    if header == expected:
        with pool.catalog.transaction() as tx:
            tx.reparent(body["layer"], body["new_parent"])
            tx.drop_intent(intent.id)
        log.info("recovery: finished rebase of %s onto %s", body["layer"], body["new_parent"])
    else:
        pool._drop_intent(intent.id)
        log.info("recovery: undid rebase of %s (header still names its old parent)", body["layer"])


class Maintainer:
    """Runs reclaim and merges in a background thread, woken by the pool
    after changes and every ``interval`` seconds regardless."""

    def __init__(self, pool: "Pool", *, interval: float = 30.0) -> None:
        self.pool = pool
        self.interval = interval
        self.stats = MaintenanceStats()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._run_lock = threading.Lock()
        pool.on_change(self.wake)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="qsnap-maintainer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def wake(self) -> None:
        self._idle.clear()
        self._wake.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every change so far has been processed."""
        return self._idle.wait(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.run_once()
            except EngineError as e:
                self.stats.last_error = str(e)
                log.error("maintenance pass failed: %s", e)
            except Exception as e:  # keep the thread alive; the next pass retries
                self.stats.last_error = repr(e)
                log.exception("maintenance pass crashed")
            if not self._wake.is_set():
                self._idle.set()

    def run_once(self) -> None:
        """One full pass: reclaim, then merge until nothing is due."""
        with self._run_lock:
            self.stats.passes += 1
            self.stats.reclaimed_layers += reclaim(self.pool)
            while (kind := merge_step(self.pool)) is not None:
                self.stats.merges[kind] += 1
                self.stats.reclaimed_layers += reclaim(self.pool)
