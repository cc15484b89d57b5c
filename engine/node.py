"""Serving volumes on this node: qemu-storage-daemon, loop devices, mounts.

A staged volume is *served*: the node's one qemu-storage-daemon (QSD) has
its backing chain open and exports its top, and a kernel block device serves
that export; for mount access a filesystem on it is mounted at the staging
path.  Two transports, chosen per staging and recorded in its
``export_path``:

* ``nbd`` where the kernel has the nbd module and ``nbd-client`` is
  installed: an NBD export on the QSD's unix socket (``export_path`` is its
  ``nbd+unix://`` URI), connected to a ``/dev/nbdN`` (netlink: the kernel
  holds the connection, no client process).  No FUSE hop.
* ``fuse`` everywhere else: a FUSE export file (``export_path``) and a
  buffered loop device on it.

vduse is detected (:func:`engine.devices.detect_transports`) but not used
yet: a vduse-capable node serves through nbd or FUSE.  Publishing bind-mounts the
staging mount (or the device node) onto the workload's target path.

While served, the volume's owner is SERVED and only the QSD's QMP may change
its chain: :class:`Node` is the pool's :class:`~engine.model.TopOwner` for
served volumes, so snapshots, clones and expansions of a volume in use go
through it and the workload keeps running.

Every step is recorded in the catalog (``stagings``, ``publications``), so
:meth:`Node.recover` can bring a node back after the plugin or the QSD was
killed: it re-serves every staged volume from the catalog and finishes any
unstaging that was interrupted.  A supervisor thread does the same the
moment the QSD dies.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from engine.devices import NBD_SCHEME, DeviceError, Devices, detect_transports, parse_nbd_uri
from engine.errors import AlreadyExists, EngineError, FailedPrecondition, InvalidArgument, NotFound
from engine.model import Owner, Publication, Staging, Volume
from engine.pool import Pool
from engine.qsd import Cut, StorageDaemon, is_dead_mount

log = logging.getLogger(__name__)

BLOCK = "block"
MOUNT = "mount"
FS_TYPES = ("ext4", "xfs")
DEFAULT_FS = "ext4"
# How long a grown image may take to show its size through the FUSE export:
# the kernel caches the export's attributes (about a second).
EXPORT_SIZE_TIMEOUT = 10.0
NBD = "nbd"
FUSE = "fuse"


@dataclass(frozen=True)
class Access:
    """How a volume is exposed: a block device, or a filesystem."""

    kind: str                       # BLOCK or MOUNT
    fs_type: str = ""               # MOUNT only; "" means the default (ext4)
    mount_flags: tuple[str, ...] = ()
    read_only: bool = False

    def __post_init__(self) -> None:
        if self.kind not in (BLOCK, MOUNT):
            raise InvalidArgument(f"access type must be block or mount, not {self.kind!r}")
        if self.kind == MOUNT and self.fs_type and self.fs_type not in FS_TYPES:
            raise InvalidArgument(f"filesystem {self.fs_type!r} is not supported "
                                  f"(qsnap makes {', '.join(FS_TYPES)})")
        if self.kind == BLOCK and (self.fs_type or self.mount_flags):
            raise InvalidArgument("a block volume takes no filesystem type or mount flags")

    @property
    def filesystem(self) -> str:
        return self.fs_type or DEFAULT_FS


@dataclass(frozen=True)
class VolumeStats:
    bytes_total: int
    bytes_used: int
    bytes_available: int
    inodes_total: int = 0
    inodes_used: int = 0
    inodes_free: int = 0
    abnormal: bool = False
    message: str = "volume is served and healthy"


class Node:
    """The node side of a pool.

    :param pool: the open pool; the node attaches itself as its SERVED owner.
    :param run_dir: where the QSD's socket, pid file and FUSE exports live
        (``/run/qsnap/node``); must survive a plugin restart but not a reboot.
    """

    def __init__(self, pool: Pool, run_dir: Path, *, qsd: StorageDaemon | None = None,
                 devices: Devices | None = None, supervise_interval: float = 1.0,
                 transports: list[str] | None = None) -> None:
        self.pool = pool
        self.run_dir = run_dir
        self.exports = run_dir / "exports"
        # Which NBD devices are ours, and for which volume: the kernel does
        # not say which export an NBD device serves.
        self.nbd_records = run_dir / "nbd"
        self.qsd = qsd or StorageDaemon(run_dir / "qsd")
        self.devices = devices or Devices()
        self.transports = detect_transports() if transports is None else list(transports)
        self.transport = self._choose_transport()
        self._interval = supervise_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        pool.attach_owner(Owner.SERVED, self)

    def _choose_transport(self) -> str:
        """The transport new stagings use: nbd where the kernel has it and
        nbd-client is installed, FUSE + loop otherwise.  Stagings keep the
        transport they were made with (their ``export_path`` says which)."""
        if NBD in self.transports:
            if self.devices.has_tool("nbd-client"):
                log.info("serving volumes over NBD (kernel nbd devices)")
                return NBD
            log.warning("the kernel has nbd but nbd-client is not installed (Debian package "
                        "nbd-client): serving volumes through FUSE and loop devices")
        if "vduse" in self.transports:
            log.info("the kernel has vduse, which qsnap does not use yet")
        log.info("serving volumes through FUSE exports and loop devices")
        return FUSE

    # -- life cycle ------------------------------------------------------

    def start(self) -> None:
        """Recover every staged volume, then watch the QSD.

        :raises EngineError: a volume could not be re-served (logged per volume;
            the others are served regardless).
        """
        self.exports.mkdir(parents=True, exist_ok=True)
        try:
            self.recover()
        finally:
            # Watch the QSD even when a volume could not be re-served: the
            # others are served, and they need the supervisor as much.
            self._thread = threading.Thread(target=self._supervise,
                                            name="qsnap-node-supervisor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop watching.  The QSD keeps serving: staged volumes stay usable
        while the plugin restarts."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def release_all(self) -> None:
        """Unpublish and unstage every volume this node serves.  For tools
        and tests that own the node for their run (a driver that stops
        keeps serving its volumes instead).

        :raises EngineError: a volume could not be taken down.
        """
        with self.pool.catalog.reading() as tx:
            staged = tx.stagings()
        for staging in staged:
            for publication in self._publications(staging.volume_id):
                self.unpublish(staging.volume_id, Path(publication.target_path))
            self.unstage(staging.volume_id, Path(staging.staging_path))

    def shutdown(self) -> None:
        """Stop watching and stop the QSD (only when nothing is staged)."""
        self.stop()
        with self.pool.catalog.reading() as tx:
            staged = tx.stagings()
        if staged:
            raise FailedPrecondition(f"{len(staged)} volumes are still staged")
        self.qsd.stop()

    def _supervise(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if not self.qsd.alive() and self._any_staged():
                    log.error("qemu-storage-daemon died: re-serving every staged volume")
                    self.recover()
            except Exception:  # keep watching; the next round retries
                log.exception("re-serving after a qemu-storage-daemon failure failed")

    def recover(self) -> None:
        """Bring every volume in the catalog's stagings back to its state.

        Volumes being unstaged are taken down; the others are re-served:
        QSD chain and export, loop device, mount, publications.  When the QSD
        was restarted the old FUSE files, loop devices and mounts are dead
        and are replaced (same paths; the kernel picks the loop device).
        """
        with self.pool.catalog.reading() as tx:
            stagings = tx.stagings()
        # A dead daemon's FUSE exports are still mounted (answering ENOTCONN)
        # until ensure_running() removes them; only until then do the loop
        # devices on them show the export's path and can be found and
        # detached.  Afterwards they show "/" and would be left behind.
        for staging in stagings:
            if staging.device and not _is_nbd(staging) and \
                    is_dead_mount(Path(staging.export_path)):
                try:
                    with self.pool.hold(f"volume:{staging.volume_id}"):
                        self._drop_stale_device(staging)
                except EngineError as e:
                    log.warning("volume %s: taking down the dead export's devices: %s",
                                staging.volume_id, e)
        if not stagings:
            # Nothing to serve: the daemon starts with the first staging.
            return
        fresh = self.qsd.ensure_running()
        failures = []
        for staging in stagings:
            try:
                with self.pool.hold(f"volume:{staging.volume_id}"):
                    if staging.state == "unstaging":
                        self._take_down(staging)
                    else:
                        self._serve(staging, restarted=fresh)
            except EngineError as e:
                failures.append(f"{staging.volume_id}: {e}")
                log.error("volume %s: cannot re-serve: %s", staging.volume_id, e)
        if failures:
            raise FailedPrecondition("cannot re-serve " + "; ".join(failures))

    # -- stage / unstage -------------------------------------------------

    def stage(self, volume_id: str, staging_path: Path, access: Access) -> Staging:
        """Serve a volume and, for mount access, mount it at ``staging_path``.

        Idempotent: staging again with the same arguments repairs whatever
        is missing and returns.

        :raises NotFound: no such volume.
        :raises AlreadyExists: staged with other arguments or at another path.
        :raises NotBlank: mount access asked for another filesystem than the
            device holds (a device with data is never formatted).
        :raises EngineError: a tool failed.
        """
        with self.pool.hold(f"volume:{volume_id}"):
            volume = self.pool.get_volume(volume_id)
            with self.pool.catalog.reading() as tx:
                current = tx.staging(volume_id)
            wanted = Staging(volume_id=volume.id, staging_path=str(staging_path),
                             access=access.kind, fs_type=access.fs_type if access.kind == MOUNT else "",
                             mount_flags=access.mount_flags, read_only=access.read_only,
                             export_path=(self.qsd.nbd_uri(volume.id) if self.transport == NBD
                                          else str(self.exports / volume.id)),
                             device="", state="staging")
            if current is not None:
                if current.state == "unstaging":
                    self._take_down(current)
                elif _same_staging(current, wanted):
                    return self._serve(current, restarted=False)
                else:
                    raise AlreadyExists(f"volume {volume_id} is staged at {current.staging_path} "
                                        f"as {current.access} with other arguments")
            if volume.owner is not Owner.CLOSED:
                raise FailedPrecondition(f"volume {volume_id} is open by {volume.owner.value}")
            with self.pool.catalog.transaction() as tx:
                tx.put_staging(wanted)
                tx.set_owner(volume_id, Owner.SERVED)
            log.info("volume %s: staging at %s (%s, over %s)", volume_id, staging_path,
                     access.kind, self.transport)
            try:
                return self._serve(wanted, restarted=False)
            except BaseException:
                self._undo_first_staging(wanted)
                raise

    def _undo_first_staging(self, staging: Staging) -> None:
        """Take down what a first staging that failed made.  A refused
        NodeStageVolume (data of another filesystem, mkfs failing) is often
        final for the CO, which then never unstages: left staged, the volume
        would keep a loop device and a QSD chain and could not be deleted."""
        undo = replace(staging, state="unstaging")
        try:
            with self.pool.catalog.transaction() as tx:
                tx.put_staging(undo)
            self._take_down(undo)
        except EngineError as e:
            # Recorded as unstaging: recover() finishes the take-down.
            log.error("volume %s: undoing the failed staging: %s", staging.volume_id, e)

    def unstage(self, volume_id: str, staging_path: Path) -> None:
        """Stop serving a volume; afterwards no mount, loop device, FUSE
        export or QSD node of it is left.  Idempotent.

        :raises FailedPrecondition: it is still published somewhere, or
            staged at another path.
        """
        with self.pool.hold(f"volume:{volume_id}"):
            with self.pool.catalog.reading() as tx:
                current = tx.staging(volume_id)
                published = tx.publications(volume_id)
            if current is None:
                return
            if current.staging_path != str(staging_path):
                raise FailedPrecondition(f"volume {volume_id} is staged at {current.staging_path}, "
                                         f"not {staging_path}")
            if published:
                raise FailedPrecondition(f"volume {volume_id} is still published at "
                                         + ", ".join(p.target_path for p in published))
            current = replace(current, state="unstaging")
            with self.pool.catalog.transaction() as tx:
                tx.put_staging(current)
            self._take_down(current)

    def _serve(self, staging: Staging, *, restarted: bool) -> Staging:
        """Make every layer of serving exist (idempotent); mark staged."""
        volume = self.pool.get_volume(staging.volume_id)
        # A daemon started here (it died and the supervisor has not noticed
        # yet) leaves every device on the old one dead.
        restarted = self.qsd.ensure_running() or restarted
        # A cut the catalog recorded but the QSD did not make yet is finished
        # first, so that opening the chain finds the QSD and catalog agreeing.
        self._reconcile_top(volume)
        chain = [(layer.id, Path(layer.path)) for layer in self.pool.volume_chain(volume.id)]
        self.qsd.open_chain(volume.id, chain, read_only=False)
        if _is_nbd(staging):
            self.qsd.export_nbd(volume.id, writable=True)
            device = self._nbd_for(staging, restarted=restarted)
        else:
            export = Path(staging.export_path)
            self.qsd.export_fuse(volume.id, export, writable=True)
            device = self._loop_for(staging, export)
        if staging.access == MOUNT:
            self._mount(staging, device)
        for publication in self._publications(volume.id):
            self._publish_one(staging, device, publication, refresh=restarted)
        staging = replace(staging, device=device, state="staged")
        with self.pool.catalog.transaction() as tx:
            tx.put_staging(staging)
        log.info("volume %s: served at %s (%s)", volume.id, device, staging.staging_path)
        return staging

    def _reconcile_top(self, volume: Volume) -> None:
        """After a crash between writing a cut's overlay and recording it,
        the catalog may name an overlay the QSD has not switched to yet:
        recovery rolled the cut forward, so finish the switch here."""
        actual = self.qsd.top_layer(volume.id)
        if actual is None or actual == volume.top_layer:
            return
        with self.pool.catalog.reading() as tx:
            top = tx.need_layer(volume.top_layer)
        if top.parent != actual:
            raise FailedPrecondition(f"volume {volume.id}: qemu-storage-daemon serves layer "
                                     f"{actual}, the catalog says {volume.top_layer}")
        log.info("volume %s: finishing an interrupted cut onto layer %s", volume.id, top.id)
        self.qsd.cut([Cut(volume.id, top.id, self.pool.layer_path(top.id))])

    def _loops(self, export: Path, *, read_only: bool) -> list[str]:
        """Live loop devices on ``export`` opened read-only (or read-write)."""
        names = set(self.devices.find_loops(export))
        return [loop.name for loop in self.devices.list_loops()
                if loop.name in names and loop.read_only == read_only]

    def _loop_for(self, staging: Staging, export: Path) -> str:
        # A read-only staging gets a read-only loop device: a read-only
        # mount or bind of a device node alone does not stop writes to it.
        live = self._loops(export, read_only=staging.read_only)
        if staging.device and staging.device in live:
            return staging.device
        if live:
            return live[0]
        # The recorded device, if any, is backed by a dead FUSE file (the
        # QSD was restarted): take down what sits on it, then detach it.
        if staging.device:
            self._drop_stale_device(staging)
        return self.devices.attach_loop(export, read_only=staging.read_only)

    def _stale_device_of(self, staging: Staging, source: str | None) -> bool:
        """Whether ``source`` is a loop device this volume used before its
        export was restarted (backed by the export's old file, or by
        nothing once that file's mount is gone)."""
        if _is_nbd(staging):
            return bool(source) and (source == staging.device
                                     or source in self._nbd_of(staging.volume_id))
        if not source or not source.startswith("/dev/loop"):
            return False
        if source in self.devices.find_loops(Path(staging.export_path), include_stale=True):
            return True
        return self.devices.loop_backing(source) in (None, Path("/"))

    def _read_only_loop(self, staging: Staging) -> str:
        """The read-only loop device read-only block publications of a
        writable staging share (made on first use)."""
        if _is_nbd(staging):
            live = [d for d, ro in self._nbd_of(staging.volume_id).items() if ro]
            return live[0] if live else self._attach_nbd(staging, read_only=True)
        export = Path(staging.export_path)
        live = self._loops(export, read_only=True)
        return live[0] if live else self.devices.attach_loop(export, read_only=True)

    def _drop_stale_device(self, staging: Staging) -> None:
        for publication in self._publications(staging.volume_id):
            self.devices.unmount(Path(publication.target_path), lazy=True)
        if staging.access == MOUNT:
            self.devices.unmount(Path(staging.staging_path), lazy=True)
        if _is_nbd(staging):
            self._detach_nbds(staging.volume_id)
            return
        for stale in self.devices.find_loops(Path(staging.export_path), include_stale=True):
            try:
                self.devices.detach_loop(stale, expected_backing=Path(staging.export_path))
            except EngineError as e:
                log.warning("volume %s: stale loop device %s not detached yet: %s",
                            staging.volume_id, stale, e)

    def _mount(self, staging: Staging, device: str) -> None:
        """Mount the volume's filesystem (made first on a blank device) at
        the staging path.  A filesystem smaller than its device -- the
        volume was expanded while it was not staged -- is grown here, as the
        CSI spec allows for offline expansion: ext4 before it is mounted
        (``e2fsck -f -p`` and ``resize2fs``, which need no CAP_SYS_RESOURCE),
        xfs once mounted (``xfs_growfs`` only grows a mounted filesystem).
        A read-only staging grows nothing."""
        target = Path(staging.staging_path)
        info = self.devices.mount_info(target)
        source = self.devices.mount_source(target) if info is not None else None
        if source == device:
            # A retried stage after xfs_growfs failed finds the mount made.
            if info is not None and info.fs_type == "xfs" and self._smaller_than_device(
                    staging, device, "xfs"):
                self._grow_at_stage(staging, device, "xfs", target)
            return
        if info is not None:
            if not self._stale_device_of(staging, source):
                # Never unmount what someone else put there.
                raise FailedPrecondition(f"{target} already has a mount of {source or 'something'}"
                                         f" that is not volume {staging.volume_id}'s device")
            # A dead mount of the device from before a QSD restart.
            self.devices.unmount(target, lazy=True)
        fs_type = staging.fs_type or DEFAULT_FS
        grow = False
        if self.devices.is_blank(device):
            log.info("volume %s: making %s on blank %s", staging.volume_id, fs_type, device)
            self.devices.make_filesystem(device, fs_type)
        else:
            found = self.devices.filesystem_type(device)
            if staging.fs_type and found != staging.fs_type:
                raise FailedPrecondition(f"volume {staging.volume_id} holds {found or 'data'}, "
                                         f"not {staging.fs_type}; it is never reformatted")
            fs_type = found or fs_type
            grow = found in FS_TYPES and self._smaller_than_device(staging, device, fs_type)
            if grow and fs_type == "ext4":
                self._grow_at_stage(staging, device, fs_type, None)
        target.mkdir(parents=True, exist_ok=True)
        self.devices.mount(device, target, fs_type, list(staging.mount_flags),
                           read_only=staging.read_only)
        if grow and fs_type == "xfs":
            self._grow_at_stage(staging, device, fs_type, target)

    def _smaller_than_device(self, staging: Staging, device: str, fs_type: str) -> bool:
        """Whether the filesystem ends at least one of its blocks before the
        device does (and the staging may write to grow it)."""
        fs_bytes, block = self.devices.filesystem_size(device, fs_type)
        device_bytes = self.devices.device_size(device)
        if device_bytes - fs_bytes < block:
            return False
        if staging.read_only:
            log.info("volume %s: its %s spans %d of the device's %d bytes; staged read-only, "
                     "it is not grown", staging.volume_id, fs_type, fs_bytes, device_bytes)
            return False
        log.info("volume %s: its %s spans %d of the device's %d bytes (expanded while not "
                 "staged); growing it", staging.volume_id, fs_type, fs_bytes, device_bytes)
        return True

    def _grow_at_stage(self, staging: Staging, device: str, fs_type: str,
                       mountpoint: Path | None) -> None:
        started = time.monotonic()
        self.devices.grow_filesystem(device, mountpoint, fs_type)
        log.info("volume %s: grew %s to its device's size at stage (%s, %.0f ms)",
                 staging.volume_id, fs_type, "online" if mountpoint else "before mounting",
                 (time.monotonic() - started) * 1000)

    def _take_down(self, staging: Staging) -> None:
        for publication in self._publications(staging.volume_id):
            self.devices.unmount(Path(publication.target_path))
        if staging.access == MOUNT:
            self.devices.unmount(Path(staging.staging_path))
        if _is_nbd(staging):
            # Before the export goes: QEMU removes an NBD export only once
            # no client is connected.
            self._detach_nbds(staging.volume_id)
        else:
            export = Path(staging.export_path)
            for device in self.devices.find_loops(export, include_stale=True):
                self.devices.detach_loop(device, expected_backing=export)
        if self.qsd.alive():
            self.qsd.unexport(staging.volume_id)
            self.qsd.close_chain(staging.volume_id)
        if not _is_nbd(staging):
            Path(staging.export_path).unlink(missing_ok=True)
        with self.pool.catalog.transaction() as tx:
            for publication in tx.publications(staging.volume_id):
                tx.drop_publication(staging.volume_id, publication.target_path)
            tx.drop_staging(staging.volume_id)
            tx.set_owner(staging.volume_id, Owner.CLOSED)
        log.info("volume %s: unstaged from %s", staging.volume_id, staging.staging_path)

    # -- publish / unpublish ---------------------------------------------

    def publish(self, volume_id: str, staging_path: Path, target: Path, *,
                read_only: bool) -> None:
        """Expose a staged volume at ``target``: a bind mount of the staged
        filesystem (a directory) or of the device node (a file).  Idempotent.

        :raises FailedPrecondition: the volume is not staged at ``staging_path``.
        :raises AlreadyExists: ``target`` is published with the other read-only mode.
        """
        with self.pool.hold(f"volume:{volume_id}"):
            staging = self._staged(volume_id, staging_path)
            publication = Publication(volume_id, str(target), read_only)
            for existing in self._publications(volume_id):
                if existing.target_path == str(target) and existing.read_only != read_only:
                    raise AlreadyExists(f"volume {volume_id} is already published at {target} "
                                        f"{'read-only' if existing.read_only else 'read-write'}")
            self._publish_one(staging, staging.device, publication, refresh=False)
            with self.pool.catalog.transaction() as tx:
                tx.put_publication(publication)
            log.info("volume %s: published at %s%s", volume_id, target,
                     " read-only" if read_only else "")

    def _publish_one(self, staging: Staging, device: str, publication: Publication, *,
                     refresh: bool) -> None:
        target = Path(publication.target_path)
        if staging.access == MOUNT:
            source = Path(staging.staging_path)
        elif publication.read_only and not staging.read_only:
            source = Path(self._read_only_loop(staging))
        else:
            source = Path(device)
        if refresh:
            self.devices.unmount(target, lazy=True)
        # bind_mount is idempotent for the same source and refuses a target
        # that holds anything else.
        if staging.access == MOUNT:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch(exist_ok=True)
        self.devices.bind_mount(source, target, read_only=publication.read_only)

    def unpublish(self, volume_id: str, target: Path) -> None:
        """Undo :meth:`publish` and remove ``target``.  Idempotent.

        :raises NotFound: the volume does not exist.
        """
        with self.pool.hold(f"volume:{volume_id}"):
            self.pool.get_volume(volume_id)
            self.devices.unmount(target)
            if target.is_dir():
                target.rmdir()
            elif target.exists():
                target.unlink()
            with self.pool.catalog.transaction() as tx:
                tx.drop_publication(volume_id, str(target))
                staging = tx.staging(volume_id)
                remaining = tx.publications(volume_id)
            if (staging is not None and staging.access == BLOCK and not staging.read_only
                    and not any(p.read_only for p in remaining)):
                # The last read-only publication of a writable block volume
                # is gone: its read-only loop device goes too.
                if _is_nbd(staging):
                    self._detach_nbds(volume_id, read_only=True)
                else:
                    export = Path(staging.export_path)
                    for loop in self._loops(export, read_only=True):
                        self.devices.detach_loop(loop, expected_backing=export)
            log.info("volume %s: unpublished from %s", volume_id, target)

    # -- stats and expansion ---------------------------------------------

    def stats(self, volume_id: str, path: Path) -> VolumeStats:
        """Usage of a staged or published volume at ``path``.

        :raises NotFound: no such volume, or ``path`` is not where it is
            staged or published.
        """
        staging = self._staging(volume_id)
        paths = {staging.staging_path, *(p.target_path for p in self._publications(volume_id))}
        if str(path) not in paths:
            raise NotFound(f"volume {volume_id} is not staged or published at {path}")
        condition = self._condition(staging)
        if staging.access == BLOCK:
            size = self.devices.device_size(staging.device) if not condition else 0
            return VolumeStats(size, 0, 0, abnormal=bool(condition),
                               message=condition or "volume is served and healthy")
        usage = self.devices.usage(path)
        return VolumeStats(usage.bytes_total, usage.bytes_used, usage.bytes_available,
                           usage.inodes_total, usage.inodes_used, usage.inodes_free,
                           abnormal=bool(condition),
                           message=condition or "volume is served and healthy")

    def _condition(self, staging: Staging) -> str:
        if not self.qsd.alive():
            return "qemu-storage-daemon is not running; the node is re-serving the volume"
        if _is_nbd(staging):
            if not self.devices.nbd_connected(staging.device):
                return f"NBD device {staging.device} is no longer connected"
            return ""
        if staging.device not in self.devices.find_loops(Path(staging.export_path)):
            return f"loop device {staging.device} no longer serves the volume"
        return ""

    def expand(self, volume_id: str, path: Path) -> int:
        """Grow the staged filesystem (or nothing, for block) to the volume's
        size; the controller has grown the image already.

        :returns: the device's size in bytes.
        :raises NotFound: the volume is not staged or published at ``path``.
        """
        with self.pool.hold(f"volume:{volume_id}"):
            staging = self._staging(volume_id)
            paths = {staging.staging_path, *(p.target_path for p in self._publications(volume_id))}
            if str(path) not in paths:
                raise NotFound(f"volume {volume_id} is not staged or published at {path}")
            volume = self.pool.get_volume(volume_id)
            size = self._refresh_device(staging, volume.size_bytes)
            if staging.access == MOUNT:
                fs_type = self.devices.filesystem_type(staging.device) or staging.fs_type \
                    or DEFAULT_FS
                fs_bytes, block = self.devices.filesystem_size(staging.device, fs_type)
                if size - fs_bytes >= block:
                    self.devices.grow_filesystem(staging.device, Path(staging.staging_path),
                                                 fs_type)
                else:
                    # Grown at stage already (offline expansion): an online
                    # resize2fs would need CAP_SYS_RESOURCE for nothing.
                    log.info("volume %s: the %s already spans the device", volume_id, fs_type)
            log.info("volume %s: node expansion to %d bytes done", volume_id, size)
            return size

    # -- TopOwner: changes the pool routes here ------------------------------

    def claims(self, volume: Volume) -> bool:
        """Served volumes are recorded as such in the catalog."""
        return False

    def prepare(self, cuts: list[tuple[Volume, str]]) -> None:
        """Add the overlays' nodes to the storage daemon ahead of the
        switch: the switch is then one QMP ``transaction``, and a guest
        frozen around it waits for that only."""
        self.qsd.prepare_cut([Cut(volume.id, layer, self.pool.layer_path(layer))
                              for volume, layer in cuts])

    def abandon(self, cuts: list[tuple[Volume, str]]) -> None:
        """Remove the nodes :meth:`prepare` added for a cut that will not
        happen.  Never raises."""
        self.qsd.abandon_cut([Cut(volume.id, layer, self.pool.layer_path(layer))
                              for volume, layer in cuts])

    def switch(self, cuts: list[tuple[Volume, str]], *, freeze: bool) -> tuple[str, ...]:
        """Cut served volumes through the QSD, atomically across them; with
        ``freeze``, their staged filesystems are frozen around the switch and
        always thawed."""
        indications = ["Online"]
        with ExitStack() as frozen:
            if freeze:
                # Only staged filesystems can be frozen here; a block volume's
                # user (a guest) is quiesced by the pool's quiescer instead.
                mounts = [s for s in (self._staging(v.id) for v, _ in cuts) if s.access == MOUNT]
                for staging in mounts:
                    frozen.enter_context(self.devices.frozen(Path(staging.staging_path)))
                if mounts:
                    indications.append("FilesystemFrozen")
            self.qsd.cut([Cut(volume.id, layer, self.pool.layer_path(layer))
                          for volume, layer in cuts])
        return tuple(indications)

    def resize(self, volume: Volume, size_bytes: int) -> None:
        self.qsd.resize(volume.id, size_bytes)
        staging = self._staging(volume.id)
        if staging.device:
            self._refresh_device(staging, size_bytes)

    def _refresh_device(self, staging: Staging, size_bytes: int) -> int:
        """Make the loop device take the export's new size and return the
        device's size.  ``losetup --set-capacity`` reads the size of the
        FUSE file, which the kernel caches for about a second after
        ``block_resize``: wait until the export shows ``size_bytes`` first,
        or the device keeps its old size.

        An NBD device keeps the size it was connected with (the export
        cannot grow while exported, see :meth:`StorageDaemon.resize`): its
        size is returned as it is.

        :raises DeviceError: the export does not grow in time.
        """
        if _is_nbd(staging):
            return self.devices.device_size(staging.device)
        export = Path(staging.export_path)
        deadline = time.monotonic() + EXPORT_SIZE_TIMEOUT
        while (shown := os.stat(export).st_size) < size_bytes:
            if time.monotonic() > deadline:
                raise DeviceError(f"volume {staging.volume_id}: the export {export} still shows "
                                  f"{shown} bytes, not {size_bytes}, {EXPORT_SIZE_TIMEOUT:.0f}s "
                                  "after the resize")
            time.sleep(0.05)
        return self.devices.set_loop_capacity(staging.device)

    def rebase(self, volume_id: str, layer_id: str, new_parent: str | None) -> None:
        self.qsd.stream(volume_id, layer_id, new_parent)

    def commit(self, volume_id: str, layer_id: str, parent_id: str) -> None:
        self.qsd.commit(volume_id, layer_id, parent_id)

    # -- NBD devices -------------------------------------------------------

    def _nbd_for(self, staging: Staging, *, restarted: bool) -> str:
        """The volume's NBD device: the connected one if the daemon is the
        one it was connected to, else a new connection (the old device
        first, so the device path stays the same where the kernel allows)."""
        live = [d for d, ro in self._nbd_of(staging.volume_id).items()
                if ro == staging.read_only]
        if not restarted:
            if staging.device in live:
                return staging.device
            if live:
                return live[0]
        elif live or staging.device:
            # Connected to a daemon that is gone: its I/O fails.  What sits
            # on it goes, then the device is disconnected and reconnected.
            self._drop_stale_device(staging)
        return self._attach_nbd(staging, read_only=staging.read_only)

    def _attach_nbd(self, staging: Staging, *, read_only: bool) -> str:
        socket, name = parse_nbd_uri(staging.export_path)
        prefer = staging.device if staging.device.startswith("/dev/nbd") else None
        device = self.devices.attach_nbd(socket, name, read_only=read_only, prefer=prefer)
        self.nbd_records.mkdir(parents=True, exist_ok=True)
        record = self.nbd_records / Path(device).name
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"volume_id": staging.volume_id, "read_only": read_only}))
        os.replace(tmp, record)
        return device

    def _nbd_of(self, volume_id: str) -> dict[str, bool]:
        """The volume's connected NBD devices (device -> read-only), from
        the node's records; records of devices no longer connected are
        dropped."""
        found: dict[str, bool] = {}
        try:
            names = sorted(os.listdir(self.nbd_records))
        except FileNotFoundError:
            return found
        connected = self.devices.nbd_devices()
        for name in names:
            if name.endswith(".tmp"):
                continue
            path = self.nbd_records / name
            try:
                raw = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable NBD record %s: %s", path, e)
                continue
            device = "/dev/" + name
            if not connected.get(device):
                path.unlink(missing_ok=True)
            elif raw.get("volume_id") == volume_id:
                found[device] = bool(raw.get("read_only"))
        return found

    def _detach_nbds(self, volume_id: str, *, read_only: bool | None = None) -> None:
        """Disconnect the volume's NBD devices (only the read-only ones, or
        only the writable ones, when ``read_only`` says so)."""
        for device, ro in self._nbd_of(volume_id).items():
            if read_only is None or ro == read_only:
                self.devices.detach_nbd(device)
                (self.nbd_records / Path(device).name).unlink(missing_ok=True)

    # -- helpers ---------------------------------------------------------

    def _staging(self, volume_id: str) -> Staging:
        with self.pool.catalog.reading() as tx:
            staging = tx.staging(volume_id)
        if staging is None:
            self.pool.get_volume(volume_id)
            raise NotFound(f"volume {volume_id} is not staged on this node")
        return staging

    def _staged(self, volume_id: str, staging_path: Path) -> Staging:
        self.pool.get_volume(volume_id)
        with self.pool.catalog.reading() as tx:
            staging = tx.staging(volume_id)
        if staging is None or staging.state != "staged":
            raise FailedPrecondition(f"volume {volume_id} is not staged")
        if staging.staging_path != str(staging_path):
            raise FailedPrecondition(f"volume {volume_id} is staged at {staging.staging_path}, "
                                     f"not {staging_path}")
        return staging

    def _any_staged(self) -> bool:
        with self.pool.catalog.reading() as tx:
            return bool(tx.stagings())

    def _publications(self, volume_id: str) -> list[Publication]:
        with self.pool.catalog.reading() as tx:
            return tx.publications(volume_id)


def _is_nbd(staging: Staging) -> bool:
    """Whether the staging is served over NBD (its export is a URI)."""
    return staging.export_path.startswith(NBD_SCHEME)


def _same_staging(a: Staging, b: Staging) -> bool:
    return (a.staging_path, a.access, a.fs_type, tuple(a.mount_flags), a.read_only) == \
        (b.staging_path, b.access, b.fs_type, tuple(b.mount_flags), b.read_only)
