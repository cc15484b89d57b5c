"""The pool: volumes, snapshots and layers, and the operations on them.

Every operation that touches more than one thing follows the same shape:

1. one catalog transaction records the *intent* (what will be made, which
   existing layers it leans on);
2. files are made under temporary names and published by an atomic rename;
3. one catalog transaction applies the change and drops the intent.

A crash between steps leaves an intent behind; :meth:`Pool.open` finishes
it when every file it names exists and undoes it otherwise, so no file is
orphaned and no layer dangles.  Deleting never removes a file on the
request path: it drops a reference, and the reclaimer (``engine/reclaim.py``)
removes layers nobody refers to any more.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from engine import cut, qcow2, validate
from engine.catalog import Catalog, Intent, Tx
from engine.errors import (AlreadyExists, Busy, CatalogCorrupt, InUse, InvalidArgument,
                           NotFound, PoolFull)
from engine.freeze import Policy, parse_deadline
from engine.layout import Layout, PoolLock, new_id
from engine.locks import KeyedLock
from engine.model import (Capacity, ContentSource, GroupSnapshot, Layer, LayerInfo, Owner, Page,
                          Quiescer, Snapshot, SnapshotSource, TopOwner, Volume, VolumeSource)
from engine.qemu_img import QemuImg, image_locks

log = logging.getLogger(__name__)

# Whatever record a catalog lookup returns (see Pool._get).
_Record = TypeVar("_Record")

CrashHook = Callable[[str], None]

VOLUME_PARAMETERS: frozenset[str] = frozenset()
# "true": freeze the staged filesystem (fsfreeze) around the cut of a served
# volume, for filesystem-consistent snapshots of non-VM workloads.
FSFREEZE = cut.FSFREEZE
# How a snapshot treats the guest agents of domains using its volumes:
# "required", "preferred" (default) or "disabled" (engine/freeze.py).
GUEST_AGENT = cut.GUEST_AGENT
# How long guests may stay frozen before the snapshot fails: "30s", "5m", a
# bare number of seconds, "0" for no deadline; 5m by default.
FREEZE_DEADLINE = "qsnap.csi.dev/freeze-deadline"
SNAPSHOT_PARAMETERS: frozenset[str] = frozenset({FSFREEZE, GUEST_AGENT, FREEZE_DEADLINE})


@dataclass(frozen=True)
class PoolConfig:
    """Tunables of a pool.

    :param depth_cap: longest backing chain a layer may keep; past it the
        maintainer merges layers in the background.
    :param quota_bytes: optional cap on the sum of volume sizes (thin
        provisioning never overcommits past it).
    :param reserve_bytes: free space the pool's filesystem must keep;
        requests that create files fail with PoolFull below it.
    """

    depth_cap: int = 16
    quota_bytes: int | None = None
    reserve_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.depth_cap < 2:
            raise InvalidArgument("depth cap must be at least 2")
        if self.quota_bytes is not None and self.quota_bytes <= 0:
            raise InvalidArgument("quota must be positive")
        if self.reserve_bytes < 0:
            raise InvalidArgument("reserve must not be negative")


def _now_ns() -> int:
    return time.time_ns()


def _vkey(volume_id: str) -> str:
    return f"volume:{volume_id}"


def _skey(snapshot_id: str) -> str:
    return f"snapshot:{snapshot_id}"


def top_file_key(volume_id: str) -> str:
    """The lock on the file of a volume's top: taken by the requests and
    merges that open it (expansion, a merge rewriting it), not by cuts,
    which only write new files."""
    return f"volume-top:{volume_id}"


class Pool:
    """A pool of qcow2 layers under one directory, with its catalog.

    Use :meth:`open`; call :meth:`close` when done.  All methods are safe
    to call from many threads: calls on one volume or snapshot are
    serialised, calls on different ones run in parallel.
    """

    def __init__(self, layout: Layout, catalog: Catalog, lock: PoolLock, qemu_img: QemuImg,
                 config: PoolConfig, crash_hook: CrashHook | None) -> None:
        self.layout = layout
        self.catalog = catalog
        self.config = config
        self.qemu_img = qemu_img
        self._lock = lock
        self._crash_hook = crash_hook
        self.locks = KeyedLock()
        self._listeners: list[Callable[[], None]] = []
        self._observers: list[Callable[[str, float], None]] = []
        self._owners: dict[Owner, TopOwner] = {}
        self._quiescer: Quiescer | None = None

    # -- life cycle ------------------------------------------------------

    @classmethod
    def open(cls, root: Path, *, config: PoolConfig | None = None, qemu_img: QemuImg | None = None,
             crash_hook: CrashHook | None = None) -> "Pool":
        """Open (creating if needed) the pool at ``root`` and recover it.

        :raises Busy: another process has the pool open.
        :raises CatalogCorrupt: the catalog cannot be used.
        :raises ImageError: qemu-img is missing.
        """
        layout = Layout(root)
        layout.prepare()
        lock = PoolLock(layout.lockfile)
        try:
            catalog = Catalog(layout.catalog)
            pool = cls(layout, catalog, lock, qemu_img or QemuImg(), config or PoolConfig(),
                       crash_hook)
            pool.recover()
        except BaseException:
            lock.release()
            raise
        return pool

    def close(self) -> None:
        self.catalog.close()
        self._lock.release()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every change that may create work for the
        maintainer (a deletion, a deeper chain)."""
        self._listeners.append(listener)

    def attach_owner(self, owner: Owner, handler: TopOwner) -> None:
        """Route cuts and resizes of volumes owned by ``owner`` through
        ``handler`` (the node's qemu-storage-daemon, a libvirt domain)."""
        self._owners[owner] = handler

    def attach_quiescer(self, quiescer: Quiescer) -> None:
        """Quiesce the users of volumes (guests) around every cut."""
        self._quiescer = quiescer

    def owner_of(self, owner: Owner) -> TopOwner:
        """The handler attached for ``owner``.

        :raises InUse: none is attached in this process.
        """
        handler = self._owners.get(owner)
        if handler is None:
            raise InUse(f"no connection to the {owner.value} owner in this process")
        return handler

    def add_observer(self, observer: Callable[[str, float], None]) -> None:
        """Call ``observer(event, seconds)`` with the duration of timed
        steps; today ``"cut"``: a snapshot's or clone's cut, intent to commit."""
        self._observers.append(observer)

    def _observe(self, event: str, seconds: float) -> None:
        for observer in self._observers:
            observer(event, seconds)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    def _crash_point(self, name: str) -> None:
        # Tests inject crashes here; in production the hook is None.
        if self._crash_hook is not None:
            self._crash_hook(name)

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        with self.locks.hold(keys):
            yield

    # -- reading ---------------------------------------------------------

    def get_volume(self, volume_id: str) -> Volume:
        """:raises NotFound: no such volume.  :raises InvalidArgument: a path-like ID."""
        return self._get("volume", volume_id, lambda tx: tx.volume(volume_id))

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        """:raises NotFound: no such snapshot.  :raises InvalidArgument: a path-like ID."""
        return self._get("snapshot", snapshot_id, lambda tx: tx.snapshot(snapshot_id))

    def _get(self, kind: str, object_id: str, fetch: Callable[[Tx], _Record | None]) -> _Record:
        """The catalog's record of one object, looked up by ``fetch`` only
        when ``object_id`` is an ID the engine could have issued.

        :raises NotFound: no such object.  :raises InvalidArgument: a path-like ID.
        """
        if validate.check_id(kind, object_id):
            with self.catalog.reading() as tx:
                found = fetch(tx)
            if found is not None:
                return found
        raise NotFound(f"{kind} {object_id} does not exist")

    def list_volumes(self, starting_token: str = "", max_entries: int = 0) -> Page[Volume]:
        """One page of volumes in creation order.

        :raises InvalidArgument: a negative ``max_entries``.
        :raises Busy: ``starting_token`` was not issued by this pool (CSI: ABORTED).
        """
        after, limit = _page_args(starting_token, max_entries)
        with self.catalog.reading() as tx:
            rows = tx.volumes_page(after, limit + 1)
        return _page(rows, limit)

    def list_snapshots(self, starting_token: str = "", max_entries: int = 0, *,
                       snapshot_id: str = "", source_volume_id: str = "") -> Page[Snapshot]:
        """One page of snapshots in creation order, optionally filtered.

        An ID that cannot exist gives an empty page, as CSI asks.

        :raises InvalidArgument: a negative ``max_entries`` or a path-like ID.
        :raises Busy: ``starting_token`` was not issued by this pool.
        """
        after, limit = _page_args(starting_token, max_entries)
        if snapshot_id and not validate.check_id("snapshot", snapshot_id):
            return Page([])
        if source_volume_id and not validate.check_id("volume", source_volume_id):
            return Page([])
        with self.catalog.reading() as tx:
            rows = tx.snapshots_page(after, limit + 1, snapshot_id=snapshot_id or None,
                                     source=source_volume_id or None)
        return _page(rows, limit)

    def volume_chain(self, volume_id: str) -> list[LayerInfo]:
        """The volume's layers, top first, as they are on disk.

        :raises NotFound: no such volume.
        """
        volume = self.get_volume(volume_id)
        return self._layer_infos(volume.top_layer)

    def snapshot_chain(self, snapshot_id: str) -> list[LayerInfo]:
        """The snapshot's layers, its own first.

        :raises NotFound: no such snapshot.
        """
        snapshot = self.get_snapshot(snapshot_id)
        return self._layer_infos(snapshot.layer)

    def _layer_infos(self, layer_id: str) -> list[LayerInfo]:
        with self.catalog.reading() as tx:
            chain = tx.chain(layer_id)
        infos = []
        for layer in chain:
            path = self.layout.layer_path(layer.id)
            try:
                allocated = os.stat(path).st_blocks * 512
            except FileNotFoundError:
                allocated = 0
            infos.append(LayerInfo(layer.id, str(path), layer.depth, layer.virtual_size,
                                   allocated, layer.read_only))
        return infos

    def layer_path(self, layer_id: str) -> Path:
        return self.layout.layer_path(layer_id)

    def capacity(self) -> Capacity:
        """What the pool can still hold.  Volumes are thin: a volume's size
        counts against the quota when there is one, while the filesystem's
        free space bounds what can actually be written."""
        st = os.statvfs(self.layout.root)
        fs_total = st.f_blocks * st.f_frsize
        fs_free = max(0, st.f_bavail * st.f_frsize - self.config.reserve_bytes)
        used = self._used_bytes()
        with self.catalog.reading() as tx:
            provisioned = tx.provisioned_bytes()
        available = fs_free
        total = fs_total
        if self.config.quota_bytes is not None:
            available = min(available, max(0, self.config.quota_bytes - provisioned))
            total = self.config.quota_bytes
        return Capacity(available_bytes=available, total_bytes=total, used_bytes=used,
                        maximum_volume_size=min(available, validate.MAX_VOLUME_SIZE),
                        provisioned_bytes=provisioned)

    def _used_bytes(self) -> int:
        total = 0
        with os.scandir(self.layout.layers) as entries:
            for entry in entries:
                try:
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
                except FileNotFoundError:
                    pass
        return total

    def _check_room(self, grow_by: int) -> None:
        """:raises PoolFull: the filesystem is below its reserve, or the
        quota cannot take ``grow_by`` more provisioned bytes."""
        st = os.statvfs(self.layout.root)
        free = st.f_bavail * st.f_frsize
        if free <= self.config.reserve_bytes:
            raise PoolFull(f"the pool's filesystem has {free} bytes free, below its reserve of "
                           f"{self.config.reserve_bytes}: delete volumes or snapshots, or grow it")
        if self.config.quota_bytes is not None and grow_by:
            with self.catalog.reading() as tx:
                provisioned = tx.provisioned_bytes()
            if provisioned + grow_by > self.config.quota_bytes:
                raise PoolFull(f"{grow_by} more bytes would exceed the pool's quota "
                               f"({provisioned} of {self.config.quota_bytes} provisioned)")

    # -- volumes ---------------------------------------------------------

    def create_volume(self, name: str, *, required_bytes: int = 0, limit_bytes: int = 0,
                      source: ContentSource | None = None,
                      parameters: dict[str, str] | None = None,
                      capabilities: str = "") -> Volume:
        """Create a volume, or return the one already made under ``name``.

        Empty: a thin image.  From a snapshot: an empty overlay on the
        snapshot's layer.  From a volume (clone): the source is cut first,
        then the clone is an overlay on the cut layer.  No data is copied.

        :raises InvalidArgument: a bad name, size or parameter.
        :raises AlreadyExists: ``name`` exists with another size, source,
            parameters or capabilities.
        :raises NotFound: the source does not exist.
        :raises OutOfRange: the capacity range cannot be met.
        :raises PoolFull: no room in the pool.
        :raises InUse: the clone source is open by an owner qsnap cannot cut through yet.
        """
        validate.check_name("volume", name)
        params = dict(parameters or {})
        validate.check_parameters("volume", params, VOLUME_PARAMETERS)
        keys = [f"volume-name:{name}"]
        if isinstance(source, SnapshotSource):
            keys.append(_skey(source.snapshot_id))
        elif isinstance(source, VolumeSource):
            keys.append(_vkey(source.volume_id))
        with self.hold(*keys):
            with self.catalog.reading() as tx:
                existing = tx.volume_by_name(name)
            if existing is not None:
                return _same_volume(existing, required_bytes, limit_bytes, source, params,
                                    capabilities)
            if isinstance(source, SnapshotSource):
                snapshot = self.get_snapshot(source.snapshot_id)
                size = validate.round_size(required_bytes, limit_bytes, floor=snapshot.size_bytes)
                self._check_room(size)
                return self._create(name, size, source, params, capabilities,
                                    backing=snapshot.layer)
            if isinstance(source, VolumeSource):
                origin = self.get_volume(source.volume_id)
                size = validate.round_size(required_bytes, limit_bytes, floor=origin.size_bytes)
                self._check_room(size)
                return self._clone(name, size, origin, params, capabilities)
            size = validate.round_size(required_bytes, limit_bytes)
            self._check_room(size)
            return self._create(name, size, None, params, capabilities, backing=None)

    def _create(self, name: str, size: int, source: ContentSource | None, params: dict[str, str],
                capabilities: str, *, backing: str | None) -> Volume:
        now = _now_ns()
        layer_id = new_id("l")
        volume = Volume(id=new_id("v"), name=name, size_bytes=size, created_ns=now,
                        top_layer=layer_id, source=source, parameters=params,
                        capabilities=capabilities)
        body = {"volume": _volume_body(volume), "layer": layer_id, "backing": backing}
        pins = (backing,) if backing else ()
        intent = self._begin("create", body, new=(layer_id,), pins=pins)
        self._make_layer(layer_id, size, backing)
        self._crash_point("create:after-file")
        with self.catalog.transaction() as tx:
            deeper = self._apply_create(tx, intent, body)
        log.info("volume %s: created %s (%d bytes%s)", volume.id, name, size,
                 f", on layer {backing}" if backing else "")
        self._crash_point("create:after-commit")
        if deeper:
            self._notify()
        return volume

    def _apply_create(self, tx: Tx, intent: int, body: dict[str, Any]) -> bool:
        volume = _volume_from_body(body["volume"])
        depth = 1
        if body["backing"]:
            depth = tx.need_layer(body["backing"]).depth + 1
        tx.add_layer(Layer(body["layer"], body["backing"], depth, volume.size_bytes, False),
                     volume.created_ns)
        tx.add_volume(volume)
        tx.drop_intent(intent)
        return depth > self.config.depth_cap

    def _clone(self, name: str, size: int, origin: Volume, params: dict[str, str],
               capabilities: str) -> Volume:
        handler = self._handler(origin)
        started = time.monotonic()
        now = _now_ns()
        origin_top = new_id("l")
        clone_top = new_id("l")
        volume = Volume(id=new_id("v"), name=name, size_bytes=size, created_ns=now,
                        top_layer=clone_top, source=VolumeSource(origin.id), parameters=params,
                        capabilities=capabilities)
        body = {"volume": _volume_body(volume), "origin": origin.id,
                "cut": origin.top_layer, "origin_top": origin_top, "clone_top": clone_top,
                "origin_size": origin.size_bytes}
        intent = self._begin("clone", body, new=(origin_top, clone_top), pins=(origin.top_layer,))
        self._make_layer(origin_top, origin.size_bytes, origin.top_layer)
        self._crash_point("clone:after-origin-file")
        self._make_layer(clone_top, size, origin.top_layer)
        self._crash_point("clone:after-clone-file")
        if handler is not None:
            self._switch(handler, intent, [(origin, origin_top)], freeze=False)
        with self.catalog.transaction() as tx:
            self._apply_clone(tx, intent, body)
        self._observe("cut", time.monotonic() - started)
        log.info("volume %s: cloned from volume %s at layer %s", volume.id, origin.id,
                 origin.top_layer)
        self._crash_point("clone:after-commit")
        self._notify()
        return volume

    def _apply_clone(self, tx: Tx, intent: int, body: dict[str, Any]) -> None:
        volume = _volume_from_body(body["volume"])
        cut = tx.need_layer(body["cut"])
        origin = tx.volume(body["origin"])
        if origin is None or origin.top_layer != cut.id:
            raise CatalogCorrupt(f"clone intent {intent}: volume {body['origin']} moved away "
                                 f"from layer {cut.id} while the clone was in progress")
        tx.set_read_only(cut.id)
        tx.add_layer(Layer(body["origin_top"], cut.id, cut.depth + 1, body["origin_size"], False),
                     volume.created_ns)
        tx.set_top(origin.id, body["origin_top"])
        tx.add_layer(Layer(body["clone_top"], cut.id, cut.depth + 1, volume.size_bytes, False),
                     volume.created_ns)
        tx.add_volume(volume)
        tx.drop_intent(intent)

    def delete_volume(self, volume_id: str) -> None:
        """Delete a volume.  Its snapshots and clones keep the layers they
        need; the rest is reclaimed in the background.

        :raises NotFound: no such volume (CSI callers treat this as done).
        :raises InUse: the volume is open (served or attached to a domain).
        """
        if not validate.check_id("volume", volume_id):
            raise NotFound(f"volume {volume_id} does not exist")
        with self.hold(_vkey(volume_id)):
            # Probed outside the transaction: the probe may wait for the
            # maintainer, which needs the catalog to finish.
            self._require_closed(self.get_volume(volume_id))
            with self.catalog.transaction() as tx:
                volume = tx.volume(volume_id)
                if volume is None:
                    raise NotFound(f"volume {volume_id} does not exist")
                if volume.owner is not Owner.CLOSED:
                    raise InUse(f"volume {volume.id} is open ({volume.owner.value}); "
                                "release it before this operation")
                tx.drop_volume(volume_id)
        log.info("volume %s: deleted (%s); its layers are reclaimed when unreferenced",
                 volume_id, volume.name)
        self._notify()

    def expand_volume(self, volume_id: str, required_bytes: int, limit_bytes: int = 0) -> Volume:
        """Grow a volume to at least ``required_bytes``; never shrinks.

        :raises NotFound: no such volume.
        :raises OutOfRange: the range cannot be met.
        :raises PoolFull: the quota cannot take the growth.
        :raises InUse: the volume is open by an owner.
        """
        if not validate.check_id("volume", volume_id):
            raise NotFound(f"volume {volume_id} does not exist")
        with self.hold(_vkey(volume_id), top_file_key(volume_id)):
            volume = self.get_volume(volume_id)
            if required_bytes <= volume.size_bytes and (not limit_bytes or volume.size_bytes <= limit_bytes):
                return volume
            size = validate.round_size(required_bytes, limit_bytes, floor=volume.size_bytes)
            if size == volume.size_bytes:
                return volume
            handler = self._handler(volume, top_held=True)
            self._check_room(size - volume.size_bytes)
            body = {"volume": volume.id, "layer": volume.top_layer,
                    "old_size": volume.size_bytes, "new_size": size}
            intent = self._begin("expand", body, pins=(volume.top_layer,))
            if handler is not None:
                handler.resize(volume, size)
            else:
                self.qemu_img.resize(self.layout.layer_path(volume.top_layer), size)
            self._crash_point("expand:after-file")
            with self.catalog.transaction() as tx:
                self._apply_expand(tx, intent, body)
            log.info("volume %s: expanded from %d to %d bytes", volume.id, volume.size_bytes, size)
            return replace(volume, size_bytes=size)

    def _apply_expand(self, tx: Tx, intent: int, body: dict[str, Any]) -> None:
        tx.set_volume_size(body["volume"], body["new_size"])
        tx.set_layer_size(body["layer"], body["new_size"])
        tx.drop_intent(intent)

    # -- snapshots -------------------------------------------------------

    def create_snapshot(self, name: str, source_volume_id: str, *,
                        parameters: dict[str, str] | None = None) -> Snapshot:
        """Cut a snapshot of a volume, or return the one already made under
        ``name``.  The volume's top layer becomes the snapshot's read-only
        layer and the volume continues on a new empty overlay: the same
        cost at any size.  Guests using the volume are frozen around the
        switch when a quiescer is attached (:meth:`attach_quiescer`).

        :raises InvalidArgument: a bad name or parameter.
        :raises AlreadyExists: ``name`` exists for another volume or parameters.
        :raises NotFound: no such volume.
        :raises PoolFull: no room for the overlay.
        :raises InUse: the volume is open by an owner qsnap cannot cut through.
        :raises EngineError: the quiescer refused or overran (see engine/freeze.py).
        """
        validate.check_name("snapshot", name)
        params = self._snapshot_parameters(parameters)
        if not validate.check_id("volume", source_volume_id):
            raise NotFound(f"volume {source_volume_id} does not exist")
        with self.hold(f"snapshot-name:{name}", _vkey(source_volume_id)):
            with self.catalog.reading() as tx:
                existing = tx.snapshot_by_name(name)
            if existing is not None:
                if existing.source_volume_id != source_volume_id or existing.parameters != params:
                    raise AlreadyExists(f"snapshot {name} already exists (ID {existing.id}) for "
                                        f"volume {existing.source_volume_id} with other arguments")
                return existing
            volume = self.get_volume(source_volume_id)
            self._check_room(0)
            [snapshot] = cut.cut_volumes(self, [(name, volume)], params)
            return snapshot

    def create_group_snapshot(self, name: str, volume_ids: list[str], *,
                              parameters: dict[str, str] | None = None) -> GroupSnapshot:
        """Cut snapshots of several volumes at one instant, or return the
        group already made under ``name``.  One quiesce covers every guest
        using them, and each owner switches its volumes in one atomic step
        (the node's storage daemon in one QMP ``transaction``, a domain in
        one libvirt snapshot); closed volumes switch together in the
        catalog's commit.

        :raises InvalidArgument: a bad name or parameter, no volumes, or a
            volume named twice.
        :raises AlreadyExists: ``name`` exists with other volumes or parameters.
        :raises NotFound: a volume does not exist.
        :raises PoolFull: no room for the overlays.
        :raises InUse: a volume is open by an owner qsnap cannot cut through.
        """
        validate.check_name("group snapshot", name)
        params = self._snapshot_parameters(parameters)
        if not volume_ids:
            raise InvalidArgument("a group snapshot needs at least one volume")
        if len(set(volume_ids)) != len(volume_ids):
            raise InvalidArgument("a group snapshot names a volume twice")
        for volume_id in volume_ids:
            if not validate.check_id("volume", volume_id):
                raise NotFound(f"volume {volume_id} does not exist")
        keys = [f"group-name:{name}"] + [_vkey(v) for v in sorted(volume_ids)]
        with self.hold(*keys):
            with self.catalog.reading() as tx:
                existing = tx.group_by_name(name)
                members = tx.group_members(existing.id) if existing else []
            if existing is not None:
                sources = sorted(m.source_volume_id for m in members)
                if sources != sorted(volume_ids) or existing.parameters != params:
                    raise AlreadyExists(f"group snapshot {name} already exists (ID {existing.id}) "
                                        "for other volumes or parameters")
                return existing
            volumes = [self.get_volume(v) for v in volume_ids]
            self._check_room(0)
            group = GroupSnapshot(id=new_id("g"), name=name, created_ns=0, snapshot_ids=(),
                                  parameters=params)
            snapshots = cut.cut_volumes(self, [(f"{group.id}-{v.id}", v) for v in volumes],
                                        params, group=group)
            with self.catalog.reading() as tx:
                made = tx.group(group.id)
            assert made is not None and len(made.snapshot_ids) == len(snapshots)
            return made

    def get_group_snapshot(self, group_id: str) -> GroupSnapshot:
        """:raises NotFound: no such group snapshot.  :raises InvalidArgument: a path-like ID."""
        return self._get("group snapshot", group_id, lambda tx: tx.group(group_id))

    def group_snapshot_by_name(self, name: str) -> GroupSnapshot | None:
        """The group snapshot made under ``name``, if any."""
        with self.catalog.reading() as tx:
            return tx.group_by_name(name)

    def delete_group_snapshot(self, group_id: str) -> None:
        """Delete a group snapshot and every snapshot cut in it.

        :raises NotFound: no such group snapshot (CSI callers treat this as done).
        """
        if not validate.check_id("group snapshot", group_id):
            raise NotFound(f"group snapshot {group_id} does not exist")
        with self.hold(f"group:{group_id}"):
            with self.catalog.transaction() as tx:
                group = tx.group(group_id)
                if group is None:
                    raise NotFound(f"group snapshot {group_id} does not exist")
                for snapshot_id in group.snapshot_ids:
                    tx.drop_snapshot(snapshot_id)
                tx.drop_group(group_id)
        log.info("group snapshot %s: deleted (%s) with snapshots %s", group_id, group.name,
                 ", ".join(group.snapshot_ids) or "none")
        self._notify()

    def _snapshot_parameters(self, parameters: dict[str, str] | None) -> dict[str, str]:
        """Validated snapshot parameters (values too, so that a bad one fails
        before anything is cut).

        :raises InvalidArgument: an unknown key or a bad value.
        """
        params = dict(parameters or {})
        validate.check_parameters("snapshot", params, SNAPSHOT_PARAMETERS)
        validate.flag(params, FSFREEZE)
        Policy.parse(params.get(GUEST_AGENT))
        parse_deadline(params.get(FREEZE_DEADLINE))
        return params

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot.  Its layer stays while volumes depend on it.

        :raises NotFound: no such snapshot (CSI callers treat this as done).
        """
        if not validate.check_id("snapshot", snapshot_id):
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        with self.hold(_skey(snapshot_id)):
            with self.catalog.transaction() as tx:
                snapshot = tx.snapshot(snapshot_id)
                if snapshot is None:
                    raise NotFound(f"snapshot {snapshot_id} does not exist")
                tx.drop_snapshot(snapshot_id)
        log.info("snapshot %s: deleted (%s)", snapshot_id, snapshot.name)
        self._notify()

    # -- shared steps ----------------------------------------------------

    def _handler(self, volume: Volume, *, top_held: bool = False) -> TopOwner | None:
        """Who must change the volume's top: None when qsnap may itself.

        :raises InUse: the volume is open by an owner this process has no
            way to reach.
        """
        volume = self._true_owner(volume, top_held=top_held)
        domains = self._owners.get(Owner.DOMAIN)
        if volume.owner is Owner.CLOSED:
            # A stopped domain whose definition names the top must be
            # pointed at the new top, or it would start on the snapshot's
            # layer.
            return domains if domains is not None and domains.claims(volume) else None
        if volume.owner is Owner.DOMAIN and domains is None:
            raise InUse(f"volume {volume.id}: its top layer is open for writing by another "
                        "process, and this driver has no connection to libvirt to switch it "
                        "through")
        if volume.owner not in self._owners:
            raise InUse(f"volume {volume.id} is open ({volume.owner.value}) and this driver "
                        "has no connection to its owner")
        return self._owners[volume.owner]

    def _true_owner(self, volume: Volume, *, top_held: bool = False) -> Volume:
        """The volume with the owner QEMU's image locks show.  The catalog's
        owner is a record; the locks are the truth for closed and
        domain-owned tops: a closed volume whose top a process holds for
        writing (a domain that opened it directly) becomes domain-owned, so
        that merges leave its chain alone, and a domain-owned one nobody
        holds any more is closed again.  A change is recorded."""
        if volume.owner not in (Owner.CLOSED, Owner.DOMAIN):
            return volume
        writer = self._top_open(volume, top_held=top_held or volume.owner is Owner.DOMAIN)
        owner = Owner.DOMAIN if writer else Owner.CLOSED
        if owner is not volume.owner:
            with self.catalog.transaction() as tx:
                tx.set_owner(volume.id, owner)
            log.info("volume %s: %s", volume.id, "a process has its top open for writing: "
                     "domain-owned" if writer else "no process has its top open any more: closed")
        return replace(volume, owner=owner)

    def _switch(self, handler: TopOwner, intent: int, cuts: list[tuple[Volume, str]], *,
                freeze: bool) -> tuple[str, ...]:
        """Switch tops through the owner; on failure undo the intent's files
        (the owner has not switched, so nothing refers to them) and re-raise."""
        try:
            indications = handler.switch(cuts, freeze=freeze)
        except BaseException:
            with self.catalog.reading() as tx:
                made = [r["layer"] for r in tx.all(
                    "SELECT layer FROM intent_layers WHERE intent_id = ? AND role = 'new'",
                    (intent,))]
            for layer in made:
                self.layout.unlink(layer)
            self._drop_intent(intent)
            raise
        return indications

    def _top_open(self, volume: Volume, *, top_held: bool = False) -> bool:
        """Whether a process has the volume's top open for writing (QEMU's
        image locks).  The maintainer's own qemu-img may hold it for a
        moment while it rewrites the top (under the top file's lock): then
        wait for it and look again, unless the caller holds that lock."""
        top = self.layout.layer_path(volume.top_layer)
        if not image_locks(top).writer:
            return False
        if top_held:
            return True
        with self.hold(top_file_key(volume.id)):
            return image_locks(top).writer

    def _require_closed(self, volume: Volume) -> None:
        """:raises InUse: a process has the volume's top open (the node's
        storage daemon, a domain: see :meth:`_true_owner`), or a stopped
        domain's definition names it."""
        volume = self._true_owner(volume)
        if volume.owner is Owner.DOMAIN:
            raise InUse(f"volume {volume.id} is open: a process (a domain's QEMU?) has its top "
                        "layer open for writing; release it before this operation")
        if volume.owner is not Owner.CLOSED:
            raise InUse(f"volume {volume.id} is open ({volume.owner.value}); "
                        "release it before this operation")
        domains = self._owners.get(Owner.DOMAIN)
        if domains is not None and domains.claims(volume):
            raise InUse(f"volume {volume.id} is in use: a stopped domain's definition names its "
                        "top layer as a disk; detach it or undefine the domain first")

    def _begin(self, kind: str, body: dict[str, Any], *, new: tuple[str, ...] = (),
               pins: tuple[str, ...] = ()) -> int:
        with self.catalog.transaction() as tx:
            intent = tx.add_intent(kind, body, _now_ns(), new=new, pins=pins)
        self._crash_point(f"{kind}:after-intent")
        return intent

    def _make_layer(self, layer_id: str, size: int, backing: str | None) -> None:
        """Create an empty layer file under a temporary name, then publish it.

        :raises PoolFull: the filesystem is full.
        :raises CatalogCorrupt: the backing layer's file is missing.
        """
        if backing and not self.layout.layer_path(backing).exists():
            # The direct writer never opens the backing file, so check here:
            # an overlay on a missing file would hide the damage.
            raise CatalogCorrupt(f"layer file {self.layout.layer_path(backing)} is missing")
        tmp = self.layout.temp_path(layer_id)
        # Layers sit side by side, so the backing name is the bare file
        # name: the pool stays valid if its directory moves.
        backing_name = self.layout.layer_path(backing).name if backing else None
        try:
            qcow2.write_image(tmp, size, backing_name)
            self.layout.publish(layer_id)
        except OSError as e:
            self.layout.unlink(layer_id)
            if e.errno in (28, 122):  # ENOSPC, EDQUOT
                raise PoolFull(f"no room for layer {layer_id}: {e}") from e
            raise
        except BaseException:
            self.layout.unlink(layer_id)
            raise

    # -- recovery --------------------------------------------------------

    def recover(self) -> None:
        """Finish or undo every intent a crash left behind, drop temporary
        files, and remove layer files the catalog does not know.

        :raises CatalogCorrupt: an intent contradicts the catalog.
        """
        for tmp in self.layout.temp_files():
            tmp.unlink(missing_ok=True)
        with self.catalog.reading() as tx:
            intents = tx.intents()
        for intent in intents:
            self._recover(intent)
        with self.catalog.reading() as tx:
            known = {layer.id for layer in tx.all_layers()}
            planned = tx.intent_new_layers()
        for layer_id in self.layout.layer_files() - known - planned:
            log.warning("layer %s: file without a catalog entry, removing it", layer_id)
            self.layout.unlink(layer_id)
        if intents:
            self.layout.sync_dir()

    def _recover(self, intent: Intent) -> None:
        files = {
            "create": lambda b: [b["layer"]],
            "clone": lambda b: [b["origin_top"], b["clone_top"]],
            "snapshot": lambda b: b["new_tops"] if "new_tops" in b else [b["new_top"]],
        }
        body = intent.body
        if intent.kind == "snapshot" and "snapshot" in body:    # written before group snapshots
            body = {"snapshots": [body["snapshot"]], "new_tops": [body["new_top"]]}
        if intent.kind in files:
            made = files[intent.kind](body)
            unswitched = cut.unswitched(self, body) if intent.kind == "snapshot" else []
            if unswitched and all(self.layout.layer_path(layer).exists() for layer in made):
                # An owner still writes the old top: the crash came before its
                # switch.  Nothing may claim the new files for those volumes.
                switched = [s["source"] for s in body["snapshots"]
                            if s["source"] not in unswitched]
                cut.abandon(self, intent.id, body, switched)
                log.info("recovery: undid snapshot intent %d: volumes %s were never switched",
                         intent.id, ", ".join(unswitched))
            elif all(self.layout.layer_path(layer).exists() for layer in made):
                apply = {"create": self._apply_create, "clone": self._apply_clone,
                         "snapshot": lambda tx, i, b: cut.apply(self, tx, i, b)}[intent.kind]
                with self.catalog.transaction() as tx:
                    apply(tx, intent.id, body)
                log.info("recovery: finished %s intent %d (%s)", intent.kind, intent.id,
                         _subject(intent))
            else:
                for layer in made:
                    self.layout.unlink(layer)
                self._drop_intent(intent.id)
                log.info("recovery: undid %s intent %d (%s)", intent.kind, intent.id,
                         _subject(intent))
        elif intent.kind == "expand":
            size = self.qemu_img.info(self.layout.layer_path(body["layer"])).virtual_size
            if size == body["new_size"]:
                with self.catalog.transaction() as tx:
                    self._apply_expand(tx, intent.id, body)
                log.info("recovery: finished expansion of volume %s", body["volume"])
            else:
                self._drop_intent(intent.id)
                log.info("recovery: undid expansion of volume %s", body["volume"])
        else:
            from engine.reclaim import recover_merge
            recover_merge(self, intent)

    def _drop_intent(self, intent_id: int) -> None:
        with self.catalog.transaction() as tx:
            tx.drop_intent(intent_id)


def _subject(intent: Intent) -> str:
    body = intent.body
    if "volume" in body and isinstance(body["volume"], dict):
        return f"volume {body['volume']['id']}"
    if "snapshot" in body:
        return f"snapshot {body['snapshot']['id']}"
    return ", ".join(f"{k}={v}" for k, v in body.items())


# -- idempotency -------------------------------------------------------------

def _same_volume(existing: Volume, required: int, limit: int, source: ContentSource | None,
                 params: dict[str, str], capabilities: str) -> Volume:
    """Return ``existing`` when a repeated CreateVolume asks for the same
    thing; raise AlreadyExists when it asks for something else."""
    reasons = []
    if existing.source != source:
        reasons.append("another content source")
    if existing.parameters != params:
        reasons.append("other parameters")
    if capabilities and existing.capabilities and existing.capabilities != capabilities:
        reasons.append("other capabilities")
    if required > existing.size_bytes or (limit and existing.size_bytes > limit):
        reasons.append(f"a capacity range its {existing.size_bytes} bytes do not fit")
    if reasons:
        raise AlreadyExists(f"volume {existing.name} already exists (ID {existing.id}) with "
                            + ", ".join(reasons))
    return existing


# -- pagination --------------------------------------------------------------

_TOKEN = re.compile(r"[0-9]{1,18}")


def _page_args(token: str, max_entries: int) -> tuple[int, int]:
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    after = 0
    if token:
        if not _TOKEN.fullmatch(token):
            raise Busy(f"starting_token {token!r} was not issued by this driver")
        after = int(token)
    limit = max_entries or 1_000_000_000
    return after, limit


def _page(rows: list[tuple[int, Any]], limit: int) -> Page[Any]:
    if len(rows) > limit:
        return Page([item for _, item in rows[:limit]], next_token=str(rows[limit][0]))
    return Page([item for _, item in rows])


# -- intent bodies -----------------------------------------------------------

def _volume_body(v: Volume) -> dict[str, Any]:
    kind = "snapshot" if isinstance(v.source, SnapshotSource) else \
        "volume" if isinstance(v.source, VolumeSource) else None
    source_id = v.source.snapshot_id if isinstance(v.source, SnapshotSource) else \
        v.source.volume_id if isinstance(v.source, VolumeSource) else None
    return {"id": v.id, "name": v.name, "size": v.size_bytes, "created_ns": v.created_ns,
            "top": v.top_layer, "source_kind": kind, "source_id": source_id,
            "parameters": v.parameters, "capabilities": v.capabilities}


def _volume_from_body(b: dict[str, Any]) -> Volume:
    source: ContentSource | None = None
    if b["source_kind"] == "snapshot":
        source = SnapshotSource(b["source_id"])
    elif b["source_kind"] == "volume":
        source = VolumeSource(b["source_id"])
    return Volume(id=b["id"], name=b["name"], size_bytes=b["size"], created_ns=b["created_ns"],
                  top_layer=b["top"], source=source, parameters=b["parameters"],
                  capabilities=b["capabilities"])
