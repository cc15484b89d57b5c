"""The cut: one or several volumes switched to new overlays at one instant,
the step every snapshot, group snapshot and VM snapshot goes through.

The shape (``docs/design.md``, "Guests around a cut"): one intent naming
every new snapshot and overlay; the overlay files; each owner's
``prepare()``; the quiescer's freeze of the guests using the volumes; each
owner's atomic ``switch()``; the thaw; one catalog transaction.  Only the
switches happen while guests are frozen.  A failure before any switch
removes every new file; one after an owner switched keeps those volumes'
new tops (without snapshots) so that the catalog never disagrees with a
process that has a volume open.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import validate
from engine.catalog import Tx
from engine.errors import CatalogCorrupt
from engine.freeze import GuestAgentUnavailable, Policy
from engine.layout import new_id
from engine.model import GroupSnapshot, Layer, QuiesceSession, Snapshot, TopOwner, Volume
from engine.qemu_img import image_locks

if TYPE_CHECKING:
    from engine.pool import Pool

log = logging.getLogger(__name__)

# Snapshot parameters the cut reads (the pool validates them).
FSFREEZE = "qsnap.csi.dev/fsfreeze"
GUEST_AGENT = "qsnap.csi.dev/guest-agent"


def cut_volumes(pool: Pool, items: list[tuple[str, Volume]], params: dict[str, str], *,
         group: GroupSnapshot | None = None) -> list[Snapshot]:
    """Cut every volume in ``items`` (name, volume) at one instant; the
    caller holds their locks.  Files first, then one quiesce around the
    owners' switches only, then one catalog commit.  A failure before
    any switch removes every new file; one after some owner switched
    commits those volumes' new tops without snapshots (their cut layers
    are merged away later) and removes the rest: nothing half-made
    stays, and no volume's catalog top disagrees with its owner."""
    started = time.monotonic()
    fsfreeze = validate.flag(params, FSFREEZE)
    handlers = [pool._handler(volume) for _, volume in items]
    now = time.time_ns()
    group_id = group.id if group else ""
    snapshots = [Snapshot(id=new_id("s"), name=name, source_volume_id=volume.id,
                          size_bytes=volume.size_bytes, created_ns=now,
                          layer=volume.top_layer, parameters=params, group_id=group_id)
                 for name, volume in items]
    new_tops = [new_id("l") for _ in items]
    body: dict[str, Any] = {"snapshots": [snapshot_body(s) for s in snapshots],
                            "new_tops": new_tops, "switched": []}
    if group is not None:
        body["group"] = {"id": group.id, "name": group.name, "created_ns": now,
                         "parameters": params, "indications": []}
    intent = pool._begin("snapshot", body, new=tuple(new_tops),
                         pins=tuple(v.top_layer for _, v in items))
    switched: list[str] = []
    prepared: list[tuple[TopOwner, list[tuple[Volume, str]]]] = []
    try:
        for (_, volume), new_top in zip(items, new_tops):
            pool._make_layer(new_top, volume.size_bytes, volume.top_layer)
        pool._crash_point("snapshot:after-file")
        by_owner: dict[int, tuple[TopOwner, list[tuple[Volume, str]]]] = {}
        for (_, volume), new_top, handler in zip(items, new_tops, handlers):
            if handler is not None:
                by_owner.setdefault(id(handler), (handler, []))[1].append((volume, new_top))
        for handler, cuts in by_owner.values():
            handler.prepare(cuts)
            prepared.append((handler, cuts))
        owner_marks: dict[str, tuple[str, ...]] = {}
        with _quiesced(pool, [v for _, v in items], params) as session:
            session.check()
            for handler, cuts in by_owner.values():
                marks = handler.switch(cuts, freeze=fsfreeze)
                for volume, _ in cuts:
                    owner_marks[volume.id] = marks
                    switched.append(volume.id)
        window = session.frozen_window_s()
    except BaseException as exc:
        # An owner that failed part-way says which volumes it switched.
        switched.extend(getattr(exc, "switched", ()))
        for handler, cuts in prepared:
            unswitched = [(v, layer) for v, layer in cuts if v.id not in switched]
            if unswitched:
                handler.abandon(unswitched)
        abandon(pool, intent, body, switched)
        raise
    for i, snapshot in enumerate(snapshots):
        marks = list(owner_marks.get(snapshot.source_volume_id, ()))
        marks += session.indications_for(snapshot.source_volume_id)
        snapshots[i] = replace(snapshot, indications=order_indications(
            marks, online="Online" in marks))
    body["snapshots"] = [snapshot_body(s) for s in snapshots]
    if group is not None:
        body["group"]["indications"] = list(order_indications(
            [i for s in snapshots for i in s.indications], online=False))
    with pool.catalog.transaction() as tx:
        deeper = apply(pool, tx, intent, body)
    pool._observe("cut", time.monotonic() - started)
    if window is not None:
        pool._observe("frozen", window)
    for snapshot in snapshots:
        log.info("snapshot %s: cut %s of volume %s at layer %s (%s)%s", snapshot.id,
                 snapshot.name, snapshot.source_volume_id, snapshot.layer,
                 ", ".join(snapshot.indications),
                 f" in group {group.id}" if group else "")
    pool._crash_point("snapshot:after-commit")
    if deeper:
        pool._notify()
    return snapshots

@contextmanager
def _quiesced(pool: Pool, volumes: list[Volume], params: dict[str, str]) -> Iterator[QuiesceSession]:
    """The attached quiescer's session for these volumes, or a session
    that quiets nothing."""
    if pool._quiescer is None:
        if Policy.parse(params.get(GUEST_AGENT)) is Policy.REQUIRED:
            raise GuestAgentUnavailable(
                "policy required, but this driver does not talk to libvirt (--libvirt-uri "
                "none), so no guest can be frozen")
        yield _NO_QUIESCE
        return
    paths = {v.id: _access_paths(pool, v) for v in volumes}
    with pool._quiescer.quiesce(paths, params) as session:
        yield session

def _access_paths(pool: Pool, volume: Volume) -> list[Path | str]:
    """Every file or device through which a process may use the volume:
    its top layer file, the device the node serves, and block
    publications (device nodes bind-mounted elsewhere)."""
    paths: list[Path | str] = [pool.layout.layer_path(volume.top_layer)]
    with pool.catalog.reading() as tx:
        staging = tx.staging(volume.id)
        publications = tx.publications(volume.id) if staging else []
    if staging is not None:
        if staging.device:
            paths.append(staging.device)
        if staging.access == "block":
            paths.append(staging.staging_path)
            paths.extend(p.target_path for p in publications)
    return paths

def abandon(pool: Pool, intent: int, body: dict[str, Any], switched: list[str]) -> None:
    """Undo a cut that failed: volumes an owner already switched keep
    their new top (recorded without a snapshot), every other new file is
    removed, and the intent goes."""
    keep = {}
    for snap, new_top in zip(body["snapshots"], body["new_tops"]):
        if snap["source"] in switched:
            keep[new_top] = snap
    for new_top in body["new_tops"]:
        if new_top not in keep:
            pool.layout.unlink(new_top)
    with pool.catalog.transaction() as tx:
        for new_top, snap in keep.items():
            cut = tx.need_layer(snap["layer"])
            tx.set_read_only(cut.id)
            tx.add_layer(Layer(new_top, cut.id, cut.depth + 1, snap["size"], False),
                         snap["created_ns"])
            tx.set_top(snap["source"], new_top)
            log.warning("snapshot %s: volume %s was switched to layer %s before the cut "
                        "failed; no snapshot is recorded, the cut layer is merged away later",
                        snap["id"], snap["source"], new_top)
        tx.drop_intent(intent)
    if keep:
        pool._notify()

def apply(pool: Pool, tx: Tx, intent: int, body: dict[str, Any]) -> bool:
    if "snapshot" in body:      # an intent written before group snapshots
        body = {"snapshots": [body["snapshot"]], "new_tops": [body["new_top"]]}
    deeper = False
    group = body.get("group")
    if group is not None:
        tx.add_group(GroupSnapshot(id=group["id"], name=group["name"],
                                   created_ns=group["created_ns"], snapshot_ids=(),
                                   parameters=group["parameters"],
                                   indications=tuple(group["indications"])))
    for snap, new_top in zip(body["snapshots"], body["new_tops"]):
        snapshot = snapshot_from_body(snap)
        volume = tx.volume(snapshot.source_volume_id)
        cut = tx.need_layer(snapshot.layer)
        if volume is None or volume.top_layer != cut.id:
            raise CatalogCorrupt(f"snapshot intent {intent}: volume {snapshot.source_volume_id} "
                                 f"moved away from layer {cut.id} during the cut")
        tx.set_read_only(cut.id)
        tx.add_layer(Layer(new_top, cut.id, cut.depth + 1, snapshot.size_bytes, False),
                     snapshot.created_ns)
        tx.set_top(volume.id, new_top)
        tx.add_snapshot(snapshot)
        deeper = deeper or cut.depth + 1 > pool.config.depth_cap
    tx.drop_intent(intent)
    return deeper


def unswitched(pool: Pool, body: dict[str, Any]) -> list[str]:
    """Volumes of a snapshot intent whose old top a process still holds
    open for writing: their owner never switched to the new top.  (When
    nobody holds either file the new top is kept: it may hold writes
    made after a switch, and over an unswitched volume it is empty.)"""
    return [s["source"] for s in body["snapshots"]
            if image_locks(pool.layout.layer_path(s["layer"])).writer]


class _NoQuiesce:
    """The session when no quiescer is attached: nothing is quiet, nothing
    can overrun."""

    def check(self) -> None:
        pass

    def indications_for(self, volume_id: str) -> tuple[str, ...]:
        return ()

    def frozen_window_s(self) -> float | None:
        return None


_NO_QUIESCE = _NoQuiesce()

# The order indications are shown in: how the cut was taken first, then
# what the guests did, then host-side detail.
_INDICATION_ORDER = ("Online", "Offline", "GuestAgent", "NoGuestAgent", "QuiesceFailed",
                     "QuiesceTimeout", "QuiesceDisabled", "Paused", "FilesystemFrozen")


def order_indications(marks: list[str] | tuple[str, ...], *, online: bool) -> tuple[str, ...]:
    """``marks`` without duplicates in a stable order, with ``Online`` or
    ``Offline`` (never both)."""
    seen = set(marks)
    if online or "Online" in seen:
        seen.add("Online")
        seen.discard("Offline")
    elif not seen:
        seen.add("Offline")
    rank = {name: i for i, name in enumerate(_INDICATION_ORDER)}
    return tuple(sorted(seen, key=lambda m: (rank.get(m, len(rank)), m)))


# -- intent bodies -----------------------------------------------------------

def snapshot_body(s: Snapshot) -> dict[str, Any]:
    return {"id": s.id, "name": s.name, "source": s.source_volume_id, "size": s.size_bytes,
            "created_ns": s.created_ns, "layer": s.layer, "parameters": s.parameters,
            "indications": list(s.indications), "group_id": s.group_id}


def snapshot_from_body(b: dict[str, Any]) -> Snapshot:
    return Snapshot(id=b["id"], name=b["name"], source_volume_id=b["source"], size_bytes=b["size"],
                    created_ns=b["created_ns"], layer=b["layer"], parameters=b["parameters"],
                    indications=tuple(b.get("indications", ())), group_id=b.get("group_id", ""))
