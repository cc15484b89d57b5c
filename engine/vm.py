"""Whole-VM snapshots of libvirt domains whose disks are qsnap volumes:
snapshot, list, show, restore, clone and delete.

A VM snapshot is one group cut of every qsnap disk of the domain (one guest
freeze, one atomic switch per owner, see ``Pool.create_group_snapshot``)
plus a copy of the domain's definition and a record of which disks were
included and which were not.  Its record lives in the pool's catalog and
moves Progressing → Ready or Failed; a driver that died in between finds
it Progressing at start and settles it from what the catalog holds.

A disk is a qsnap disk when its top source is a volume's top layer file
(the domain's QEMU opens the chain directly: attachment ``file``) or the
device the node serves the volume on (attachment ``block``).  Restore and
clone make new volumes from the disk snapshots (O(1) overlays), point the
definition's disks at them, and define the domain; nothing is deleted: the
volumes a restore replaces are reported for the caller to keep or delete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import validate
from engine.errors import EngineError, FailedPrecondition, InvalidArgument, NotFound
from engine.layout import new_id
from engine.model import SnapshotSource, Volume
from engine.node import BLOCK, Access, Node
from engine.pool import Pool
from engine.virt import DomainState, Hypervisor, disks, path_keys

log = logging.getLogger(__name__)

PROGRESSING = "Progressing"
READY = "Ready"
FAILED = "Failed"

FILE = "file"      # the domain opens the volume's qcow2 top directly
BLOCK_DEVICE = "block"   # the domain uses the device the node serves


class VmRunning(FailedPrecondition):
    """The operation needs the VM stopped."""


@dataclass(frozen=True)
class VmDisk:
    """A disk of the VM that the snapshot includes."""

    target: str
    volume_id: str
    attachment: str            # FILE or BLOCK_DEVICE
    snapshot_id: str = ""      # the disk's snapshot once cut
    driver_type: str = ""      # the definition's <driver type> (qcow2 or raw)


@dataclass(frozen=True)
class ExcludedDisk:
    target: str
    source: str
    reason: str


@dataclass(frozen=True)
class VmSnapshot:
    id: str
    name: str
    domain_name: str
    domain_uuid: str
    created_ns: int
    status: str                # PROGRESSING, READY or FAILED
    disks: tuple[VmDisk, ...]
    excluded: tuple[ExcludedDisk, ...] = ()
    warnings: tuple[str, ...] = ()
    indications: tuple[str, ...] = ()
    group_id: str = ""
    error: str = ""
    domain_xml: str = ""       # the definition restore and clone start from
    online: bool = False       # the domain was running at the cut

    @property
    def ready(self) -> bool:
        return self.status == READY

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> VmSnapshot:
        return cls(**{**r, "disks": tuple(VmDisk(**d) for d in r["disks"]),
                      "excluded": tuple(ExcludedDisk(**d) for d in r["excluded"]),
                      "warnings": tuple(r["warnings"]), "indications": tuple(r["indications"])})


@dataclass(frozen=True)
class RestoreResult:
    """What a restore or clone made."""

    domain_name: str
    domain_uuid: str
    volumes: dict[str, str] = field(default_factory=dict)    # target → new volume ID
    replaced: dict[str, str] = field(default_factory=dict)   # target → volume no longer used


class VirtualMachines:
    """VM-level operations over a pool, libvirt and (for served disks) the
    node.

    :param pool: the pool holding the VMs' volumes.
    :param hypervisor: the libvirt adapter.
    :param node: the node serving volumes; needed only for disks attached
        as served block devices.
    """

    def __init__(self, pool: Pool, hypervisor: Hypervisor, node: Node | None = None) -> None:
        self.pool = pool
        self.hypervisor = hypervisor
        self.node = node
        self._lock = threading.Lock()

    # -- records ---------------------------------------------------------

    def _save(self, snap: VmSnapshot) -> None:
        with self.pool.catalog.transaction() as tx:
            tx.put_vm_snapshot(snap.id, snap.name, snap.domain_uuid, snap.created_ns,
                               snap.to_record())

    def get(self, snapshot_id: str) -> VmSnapshot:
        """:raises NotFound: no such VM snapshot."""
        if not validate.check_id("VM snapshot", snapshot_id):
            raise NotFound(f"VM snapshot {snapshot_id} does not exist")
        with self.pool.catalog.reading() as tx:
            record = tx.vm_snapshot(snapshot_id)
        if record is None:
            raise NotFound(f"VM snapshot {snapshot_id} does not exist")
        return VmSnapshot.from_record(record)

    def list(self, domain: str = "") -> list[VmSnapshot]:
        """All VM snapshots, or one domain's (by name or UUID; a domain
        that no longer exists is matched by the name recorded)."""
        with self.pool.catalog.reading() as tx:
            records = [VmSnapshot.from_record(r) for r in tx.vm_snapshots()]
        if not domain:
            return records
        return [r for r in records if domain in (r.domain_name, r.domain_uuid)]

    def recover(self) -> None:
        """Settle records a dead driver left Progressing: Ready when their
        group snapshot exists (the cut committed), else Failed."""
        for snap in self.list():
            if snap.status != PROGRESSING:
                continue
            group = self.pool.group_snapshot_by_name(_group_name(snap))
            if group is None:
                self._save(dataclasses.replace(snap, status=FAILED,
                                               error="the driver stopped before the cut"))
                log.warning("VM snapshot %s: interrupted before the cut, marked Failed", snap.id)
                continue
            self._save(self._ready(dataclasses.replace(snap, group_id=group.id),
                                   group.snapshot_ids, group.indications))
            log.info("VM snapshot %s: its cut had committed, marked Ready", snap.id)

    # -- snapshot --------------------------------------------------------

    def snapshot(self, domain: str, name: str, *, parameters: dict[str, str] | None = None,
                 accept_warnings: bool = False) -> VmSnapshot:
        """Snapshot every qsnap disk of a VM at one instant, with one guest
        freeze (when it runs), and keep a copy of its definition.
        Idempotent by (domain, name).

        :raises NotFound: no such domain.
        :raises FailedPrecondition: the VM has no qsnap disk, or some disks
            cannot be included and ``accept_warnings`` is false (the error
            lists them).
        :raises AlreadyExists: the name is taken by a snapshot of other disks.
        :raises EngineError: the cut failed (the record says Failed).
        """
        validate.check_name("VM snapshot", name)
        dom = self._domain(domain)
        uuid = self.hypervisor.uuid(dom)
        with self._lock:
            with self.pool.catalog.reading() as tx:
                existing = tx.vm_snapshot_by_name(uuid, name)
            if existing is not None:
                snap = VmSnapshot.from_record(existing)
                if snap.status != FAILED:
                    return snap
                self._delete_record(snap)       # a failed attempt: try again
            state = self.hypervisor.state(dom)
            online = state in (DomainState.RUNNING, DomainState.PAUSED)
            included, excluded, warnings = self._classify(dom, online)
            if not included:
                raise FailedPrecondition(
                    f"domain {self.hypervisor.name(dom)} has no qsnap volume as a disk" +
                    (": " + "; ".join(f"{d.target}: {d.reason}" for d in excluded)
                     if excluded else ""))
            if warnings and not accept_warnings:
                raise FailedPrecondition(
                    "; ".join(warnings) + " (accept the warnings to snapshot the other disks)")
            persistent = self.hypervisor.is_persistent(dom)
            snap = VmSnapshot(id=new_id("m"), name=name, domain_name=self.hypervisor.name(dom),
                              domain_uuid=uuid, created_ns=time.time_ns(), status=PROGRESSING,
                              disks=tuple(included), excluded=tuple(excluded),
                              warnings=tuple(warnings), group_id="",
                              domain_xml=self.hypervisor.xml(dom, inactive=persistent),
                              online=online)
            self._save(snap)
            try:
                group = self.pool.create_group_snapshot(
                    _group_name(snap), [d.volume_id for d in included], parameters=parameters)
            except EngineError as e:
                self._save(dataclasses.replace(snap, status=FAILED, error=str(e)))
                log.error("VM snapshot %s of domain %s failed: %s", snap.id, snap.domain_name, e)
                raise
            snap = self._ready(dataclasses.replace(snap, group_id=group.id), group.snapshot_ids,
                               group.indications)
            self._save(snap)
        log.info("VM snapshot %s (%s) of domain %s: disks %s (%s)%s", snap.id, name,
                 snap.domain_name, ", ".join(d.target for d in snap.disks),
                 ", ".join(snap.indications),
                 f"; excluded {', '.join(d.target for d in excluded)}" if excluded else "")
        return snap

    def _ready(self, snap: VmSnapshot, snapshot_ids: tuple[str, ...],
               indications: tuple[str, ...]) -> VmSnapshot:
        by_volume = {self.pool.get_snapshot(s).source_volume_id: s for s in snapshot_ids}
        disks_ = tuple(dataclasses.replace(d, snapshot_id=by_volume.get(d.volume_id, ""))
                       for d in snap.disks)
        return dataclasses.replace(snap, status=READY, disks=disks_, indications=indications)

    def _classify(self, dom: Any, online: bool
                  ) -> tuple[list[VmDisk], list[ExcludedDisk], list[str]]:
        """Which disks are qsnap volumes, which are not, and the warnings
        the user must accept (disks that cannot be included)."""
        tops, devices = self._volume_index()
        live = disks(self.hypervisor.xml(dom))
        persistent: set[str] | None = None
        if online and self.hypervisor.is_persistent(dom):
            persistent = {d.target for d in disks(self.hypervisor.xml(dom, inactive=True))}
        included: list[VmDisk] = []
        excluded: list[ExcludedDisk] = []
        warnings: list[str] = []
        for disk in live:
            if disk.device != "disk":
                excluded.append(ExcludedDisk(disk.target, disk.source, f"a {disk.device}"))
                continue
            keys = path_keys(disk.source) if disk.source else set()
            volume_id = next((tops[k] for k in keys if k in tops), None)
            attachment = FILE
            if volume_id is None:
                volume_id = next((devices[k] for k in keys if k in devices), None)
                attachment = BLOCK_DEVICE
            if volume_id is None:
                excluded.append(ExcludedDisk(disk.target, disk.source, "not a qsnap volume"))
                continue
            if persistent is not None and disk.target not in persistent:
                reason = "hot-plugged: absent from the persistent definition"
                excluded.append(ExcludedDisk(disk.target, disk.source, reason))
                warnings.append(f"disk {disk.target} (volume {volume_id}) is {reason}, so a "
                                "restore could not attach it; it is left out")
                continue
            included.append(VmDisk(disk.target, volume_id, attachment,
                                   driver_type=disk.driver_type))
        return included, excluded, warnings

    def _volume_index(self) -> tuple[dict[tuple[Any, ...], str], dict[tuple[Any, ...], str]]:
        """Path identities of every volume's top file, and of every device
        the node serves, to the volume ID."""
        tops: dict[tuple[Any, ...], str] = {}
        devices: dict[tuple[Any, ...], str] = {}
        with self.pool.catalog.reading() as tx:
            rows = tx.all("SELECT id, top FROM volumes")
            stagings = tx.stagings()
        for row in rows:
            for key in path_keys(self.pool.layout.layer_path(row["top"])):
                tops[key] = row["id"]
        for staging in stagings:
            if staging.device:
                for key in path_keys(staging.device):
                    devices[key] = staging.volume_id
        return tops, devices

    # -- restore and clone -----------------------------------------------

    def restore(self, snapshot_id: str) -> RestoreResult:
        """Put the VM back to a snapshot: new volumes from its disk
        snapshots, the definition from the snapshot with its disks on them.
        Only while the VM is stopped.  The volumes the VM used until now
        are not deleted; they are reported in ``replaced``.

        :raises NotFound: no such VM snapshot.
        :raises VmRunning: the domain is running.
        :raises FailedPrecondition: the snapshot is not Ready.
        """
        snap = self._usable(snapshot_id)
        current: dict[str, str] = {}
        try:
            dom = self.hypervisor.lookup(snap.domain_uuid)
        except NotFound:
            dom = None      # undefined since: defined again from the snapshot
        if dom is not None:
            if self.hypervisor.is_active(dom):
                raise VmRunning(f"domain {snap.domain_name} is running: stop it before restoring "
                                f"VM snapshot {snap.id}")
            tops, devices = self._volume_index()
            for disk in disks(self.hypervisor.xml(dom, inactive=True)):
                keys = path_keys(disk.source) if disk.source else set()
                volume_id = next((tops.get(k) or devices.get(k) for k in keys
                                  if k in tops or k in devices), None)
                if volume_id:
                    current[disk.target] = volume_id
        tag = new_id("r")[2:14]
        volumes = self._materialise(snap, f"{snap.domain_name}-restore-{tag}")
        xml = self._rewrite(snap, volumes)
        new_dom = self.hypervisor.define(xml)
        replaced = {t: v for t, v in current.items() if volumes.get(t) != v}
        log.info("VM snapshot %s: domain %s restored on volumes %s; replaced volumes %s kept",
                 snap.id, snap.domain_name, ", ".join(f"{t}={v}" for t, v in volumes.items()),
                 ", ".join(replaced.values()) or "none")
        return RestoreResult(self.hypervisor.name(new_dom), self.hypervisor.uuid(new_dom),
                             volumes, replaced)

    def clone(self, snapshot_id: str, new_name: str, *, start: bool = False) -> RestoreResult:
        """A new VM from a snapshot: new volumes, and the snapshot's
        definition under a new name, a new UUID and new MAC addresses.

        :raises NotFound: no such VM snapshot.
        :raises AlreadyExists: a domain named ``new_name`` exists.
        :raises FailedPrecondition: the snapshot is not Ready.
        """
        from engine.errors import AlreadyExists
        validate.check_name("domain", new_name)
        snap = self._usable(snapshot_id)
        try:
            self.hypervisor.lookup_name(new_name)
            raise AlreadyExists(f"a domain named {new_name} exists")
        except NotFound:
            pass
        volumes = self._materialise(snap, f"{new_name}-clone")
        xml = self._rewrite(snap, volumes, new_name=new_name)
        dom = self.hypervisor.define(xml)
        if start:
            self.hypervisor.start(dom)
        log.info("VM snapshot %s: cloned into domain %s (%s) on volumes %s", snap.id, new_name,
                 self.hypervisor.uuid(dom), ", ".join(volumes.values()))
        return RestoreResult(new_name, self.hypervisor.uuid(dom), volumes, {})

    def _usable(self, snapshot_id: str) -> VmSnapshot:
        snap = self.get(snapshot_id)
        if snap.status != READY:
            raise FailedPrecondition(f"VM snapshot {snap.id} is {snap.status}"
                                     + (f": {snap.error}" if snap.error else ""))
        return snap

    def _materialise(self, snap: VmSnapshot, prefix: str) -> dict[str, str]:
        """A new volume per disk snapshot (served, for block attachments);
        target → volume ID."""
        out: dict[str, str] = {}
        for disk in snap.disks:
            volume = self.pool.create_volume(f"{prefix}-{disk.target}",
                                             source=SnapshotSource(disk.snapshot_id))
            if disk.attachment == BLOCK_DEVICE:
                self._serve(volume)
            out[disk.target] = volume.id
        return out

    def _serve(self, volume: Volume) -> None:
        if self.node is None:
            raise FailedPrecondition(f"volume {volume.id} must be served as a block device, and "
                                     "this driver has no node service")
        self.node.stage(volume.id, self._staging_path(volume.id), Access(BLOCK))

    def _staging_path(self, volume_id: str) -> Path:
        assert self.node is not None
        return self.node.run_dir / "vm-disks" / volume_id

    def _source_for(self, disk: VmDisk, volume_id: str) -> tuple[str, str]:
        """(disk type, source path) for a disk on ``volume_id``."""
        if disk.attachment == BLOCK_DEVICE:
            with self.pool.catalog.reading() as tx:
                staging = tx.staging(volume_id)
            if staging is None or not staging.device:
                raise FailedPrecondition(f"volume {volume_id} is not served")
            return "block", staging.device
        volume = self.pool.get_volume(volume_id)
        return "file", os.fspath(self.pool.layout.layer_path(volume.top_layer))

    def _rewrite(self, snap: VmSnapshot, volumes: dict[str, str], *,
                 new_name: str | None = None) -> str:
        """The snapshot's definition with its disks on ``volumes``; for a
        clone also a new name, no UUID and no MAC addresses (libvirt makes
        new ones)."""
        root = ET.fromstring(snap.domain_xml)
        for disk_el in root.iterfind("./devices/disk"):
            target = disk_el.find("target")
            dev = target.get("dev", "") if target is not None else ""
            disk = next((d for d in snap.disks if d.target == dev), None)
            if disk is None or dev not in volumes:
                continue
            kind, path = self._source_for(disk, volumes[dev])
            disk_el.set("type", kind)
            for old in disk_el.findall("source") + disk_el.findall("backingStore"):
                disk_el.remove(old)
            source = ET.Element("source", {"file" if kind == "file" else "dev": path})
            disk_el.insert(1 if disk_el.find("driver") is not None else 0, source)
        if new_name is not None:
            name_el = root.find("name")
            if name_el is None:
                raise InvalidArgument("the snapshot's domain definition has no name")
            name_el.text = new_name
            for el in root.findall("uuid"):
                root.remove(el)
            for iface in root.iterfind("./devices/interface"):
                for mac in iface.findall("mac"):
                    iface.remove(mac)
            # Files a character device writes (a serial console log) belong
            # to one VM: the clone writes its own, next to the original's.
            for kind in ("serial", "console", "parallel", "channel"):
                for dev in root.iterfind(f"./devices/{kind}"):
                    source = dev.find("source")
                    if dev.get("type") == "file" and source is not None and source.get("path"):
                        source.set("path", _renamed(source.get("path", ""), new_name))
        return ET.tostring(root, encoding="unicode")

    # -- delete ----------------------------------------------------------

    def delete(self, snapshot_id: str) -> None:
        """Delete a VM snapshot: its disk snapshots and its record.  Volumes
        restored or cloned from it are not touched.

        :raises NotFound: no such VM snapshot.
        """
        with self._lock:
            self._delete_record(self.get(snapshot_id))

    def _delete_record(self, snap: VmSnapshot) -> None:
        group = self.pool.group_snapshot_by_name(_group_name(snap))
        if group is not None:
            try:
                self.pool.delete_group_snapshot(group.id)
            except NotFound:
                pass
        with self.pool.catalog.transaction() as tx:
            tx.drop_vm_snapshot(snap.id)
        log.info("VM snapshot %s (%s) of domain %s: deleted", snap.id, snap.name,
                 snap.domain_name)

    def _domain(self, domain: str) -> Any:
        """A domain by UUID or name.

        :raises NotFound: none.
        """
        if not domain:
            raise InvalidArgument("no domain given")
        try:
            return self.hypervisor.lookup(domain)
        except NotFound:
            return self.hypervisor.lookup_name(domain)
        except EngineError:
            # Not a UUID at all: libvirt refuses to parse it; try the name.
            return self.hypervisor.lookup_name(domain)


def _group_name(snap: VmSnapshot) -> str:
    """The name of a VM snapshot's group snapshot: known before the cut, so
    that a record left Progressing finds its group (or its absence)."""
    return f"vm-{snap.id}"


def _renamed(path: str, new_name: str) -> str:
    """``/dir/console.log`` → ``/dir/console-NEW_NAME.log``."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{new_name}{p.suffix}"))
