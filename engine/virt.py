"""The one adapter that talks to libvirt (``libvirt-python``).

Everything the engine asks of a hypervisor goes through :class:`Hypervisor`:
finding the active domains whose disks use given files or devices, the
guest agent's ping and the filesystem freeze and thaw, disk-only external
snapshots (the only way to switch the top layer of a qcow2 chain a domain's
QEMU has open), block resizes, and reading, defining and starting domain
definitions.  libvirt's own exception never leaves this module: callers get
:class:`HypervisorUnavailable`, :class:`NoSuchDomain` or
:class:`DomainError` (which carries libvirt's error code and message).

The module imports libvirt lazily, so the rest of the engine (and a CSI
driver on a machine without libvirt) works without the package.  It holds
no global state; each :class:`Hypervisor` owns one connection.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import stat
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import EngineError, NotFound

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"
# After a failed connection, how long libvirt counts as unreachable without
# trying again.
RECONNECT_AFTER_S = 2.0


# -- errors ---------------------------------------------------------------

class HypervisorError(EngineError):
    """Base of the errors this adapter raises."""


class HypervisorUnavailable(HypervisorError):
    """The libvirt daemon cannot be reached at the configured URI (or
    libvirt-python is not installed)."""


class DomainError(HypervisorError):
    """A libvirt call on a domain failed.  ``code`` is libvirt's error code
    (``VIR_ERR_*``), ``detail`` its message."""

    def __init__(self, message: str, *, code: int = 0, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


class NoSuchDomain(NotFound, DomainError):
    """No domain with that name or UUID exists (any more)."""


def _libvirt() -> Any:
    """Import libvirt-python lazily.

    :raises HypervisorUnavailable: the package is not installed.
    """
    try:
        import libvirt
    except ImportError as e:
        raise HypervisorUnavailable(
            "libvirt-python is not installed (pip install libvirt-python)") from e
    # libvirt-python prints every error to stderr besides raising it; this
    # adapter turns each into an exception with the message, so the print
    # is noise (a driver without a running libvirtd would print one per cut).
    libvirt.registerErrorHandler(_ignore_error, None)
    return libvirt


def _ignore_error(_ctx: object, _err: object) -> None:
    return None


# -- domain XML -------------------------------------------------------------

def disk_sources(domain_xml: str) -> list[tuple[str, str]]:
    """``(target dev, source path)`` for every file or block source of a
    domain's disks, backing chain included (a domain that opens a volume's
    qcow2 layers directly names them in ``<backingStore>``)."""
    root = ET.fromstring(domain_xml)
    found: list[tuple[str, str]] = []
    for disk in root.iterfind("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        for source in disk.iter("source"):
            path = source.get("file") or source.get("dev")
            if path:
                found.append((dev, path))
    return found


@dataclass(frozen=True)
class Disk:
    """One disk of a domain definition, as far as qsnap cares."""

    target: str                # vda, sdb, ...
    device: str                # disk, cdrom, lun
    kind: str                  # file, block, network, ...
    source: str                # the top path ("" for network or empty disks)
    driver_type: str           # qcow2, raw, ...
    read_only: bool


def disks(domain_xml: str) -> list[Disk]:
    """Every ``<disk>`` of a domain definition, in definition order."""
    root = ET.fromstring(domain_xml)
    out: list[Disk] = []
    for disk in root.iterfind("./devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        driver = disk.find("driver")
        path = ""
        if source is not None:
            path = source.get("file") or source.get("dev") or ""
        out.append(Disk(target=target.get("dev", "") if target is not None else "",
                        device=disk.get("device", "disk"), kind=disk.get("type", "file"),
                        source=path,
                        driver_type=driver.get("type", "") if driver is not None else "",
                        read_only=disk.find("readonly") is not None))
    return out


def path_keys(path: str | os.PathLike[str]) -> set[tuple[Any, ...]]:
    """Identities of a file or device: its real path, and its inode or
    device number when it exists, so that a symlink, a bind mount or a
    second device node of the same disk all match."""
    path = os.fspath(path)
    keys: set[tuple[Any, ...]] = {("path", os.path.realpath(path))}
    try:
        st = os.stat(path)
    except OSError:
        return keys
    if stat.S_ISBLK(st.st_mode):
        keys.add(("blk", st.st_rdev))
    else:
        keys.add(("ino", st.st_dev, st.st_ino))
    return keys


# -- records ----------------------------------------------------------------

class DomainState(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    OTHER = "other"            # crashed, suspended to disk, being started, ...


@dataclass(frozen=True)
class DomainUse:
    """An active domain (running or paused) with disks on some of the
    given volumes."""

    name: str
    uuid: str
    volume_ids: tuple[str, ...]
    targets: tuple[str, ...]     # the domain's disk targets (vda, sdb, ...)
    # Targets whose *top* source is one of the volume's own qcow2 layer
    # files: the domain's QEMU has the top open, so only it may switch it.
    direct: tuple[tuple[str, str], ...] = ()   # (volume id, target)
    all_targets: tuple[str, ...] = ()          # every disk of the domain, in order

    def label(self) -> str:
        return f"domain {self.name} (volumes {', '.join(self.volume_ids)})"


# -- the adapter ------------------------------------------------------------

class Hypervisor:
    """One libvirt connection and the calls qsnap makes through it.

    :param uri: the libvirt URI (``qemu:///system`` by default).
    """

    def __init__(self, uri: str = DEFAULT_URI) -> None:
        self.uri = uri
        self._conn: Any = None
        self._conn_lock = threading.Lock()
        self._retry_at = 0.0
        self._last_failure = ""

    # -- connection --------------------------------------------------------

    def connection(self) -> Any:
        """The libvirt connection, opened on first use and reopened when it
        died (libvirtd restarted).

        :raises HypervisorUnavailable: libvirt cannot be reached.
        """
        libvirt = _libvirt()
        with self._conn_lock:
            if self._conn is None or not self._conn.isAlive():
                # A libvirt that is not there costs a few ms per attempt, and
                # every cut asks: after a failure, answer from memory for a
                # moment (a libvirtd that comes up is found within that).
                if time.monotonic() < self._retry_at:
                    raise HypervisorUnavailable(self._last_failure)
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as e:
                    self._conn = None
                    self._last_failure = (f"cannot connect to libvirt at {self.uri}: "
                                          f"{e.get_error_message()}")
                    self._retry_at = time.monotonic() + RECONNECT_AFTER_S
                    raise HypervisorUnavailable(self._last_failure) from e
            return self._conn

    def close(self) -> None:
        with self._conn_lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, what: str, e: Any) -> DomainError:
        libvirt = _libvirt()
        code = e.get_error_code()
        detail = e.get_error_message() or str(e)
        if code == libvirt.VIR_ERR_NO_DOMAIN:
            return NoSuchDomain(f"{what}: no such domain ({detail})", code=code, detail=detail)
        return DomainError(f"{what}: {detail}", code=code, detail=detail)

    @contextlib.contextmanager
    def _failing(self, what: str) -> Iterator[None]:
        """Raise a libvirt error from the block as :class:`DomainError`
        (:class:`NoSuchDomain` when the domain is gone) that says ``what``
        was being done."""
        try:
            yield
        except _libvirt().libvirtError as e:
            raise self._error(what, e) from e

    # -- lookup --------------------------------------------------------------

    def lookup(self, uuid: str) -> Any:
        """The domain with this UUID (never by name: a redefined domain of
        the same name is another machine).

        :raises NoSuchDomain: none.  :raises HypervisorUnavailable: no libvirt.
        """
        with self._failing(f"domain {uuid}"):
            return self.connection().lookupByUUIDString(uuid)

    def lookup_name(self, name: str) -> Any:
        """The domain named ``name``.

        :raises NoSuchDomain: none.  :raises HypervisorUnavailable: no libvirt.
        """
        with self._failing(f"domain {name}"):
            return self.connection().lookupByName(name)

    @staticmethod
    def name(dom: Any) -> str:
        try:
            return str(dom.name())
        except Exception:   # a dead connection must not hide the real error
            return "?"

    @staticmethod
    def uuid(dom: Any) -> str:
        return str(dom.UUIDString())

    def state(self, dom: Any) -> DomainState:
        """:raises DomainError: libvirt failed (NoSuchDomain: it is gone)."""
        libvirt = _libvirt()
        with self._failing(f"domain {self.name(dom)}"):
            state, _reason = dom.state()
        return {libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
                libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
                libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF}.get(state, DomainState.OTHER)

    @staticmethod
    def is_active(dom: Any) -> bool:
        try:
            return bool(dom.isActive())
        except Exception:
            return False

    def xml(self, dom: Any, *, inactive: bool = False) -> str:
        """The live definition, or the persistent one (``inactive``).

        :raises DomainError: libvirt failed.
        """
        libvirt = _libvirt()
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        with self._failing(f"domain {self.name(dom)}"):
            return str(dom.XMLDesc(flags))

    def is_persistent(self, dom: Any) -> bool:
        with self._failing(f"domain {self.name(dom)}"):
            return bool(dom.isPersistent())

    # -- discovery -----------------------------------------------------------

    def domains_using(self, volumes: Mapping[str, Iterable[str | os.PathLike[str]]], *,
                      tops: Mapping[str, str | os.PathLike[str]] | None = None,
                      stopped: bool = False) -> list[DomainUse]:
        """The active domains (running or paused) whose disks use any of the
        given paths.  ``volumes`` maps a volume ID to its paths: the device
        qsnap serves, and/or the volume's qcow2 layer files.  ``tops`` maps
        a volume ID to its top layer file: a disk whose top source is that
        file is listed in :attr:`DomainUse.direct`.  ``stopped``: look at
        the persistent definitions of the domains that are *not* running
        instead (what they will open when started).

        :raises HypervisorUnavailable: libvirt cannot be reached.
        """
        libvirt = _libvirt()
        wanted: dict[tuple[Any, ...], str] = {}
        for volume_id, paths in volumes.items():
            for p in paths:
                for key in path_keys(p):
                    wanted[key] = volume_id
        top_keys: dict[tuple[Any, ...], str] = {}
        for volume_id, top in (tops or {}).items():
            for key in path_keys(top):
                top_keys[key] = volume_id
        conn = self.connection()
        try:
            domains = conn.listAllDomains(
                libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE | libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT
                if stopped else libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as e:
            raise HypervisorUnavailable(f"listing domains at {self.uri}: {e.get_error_message()}") from e
        uses: list[DomainUse] = []
        for dom in domains:
            try:
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if stopped else 0)
                name, uuid = dom.name(), dom.UUIDString()
            except libvirt.libvirtError:
                continue    # it stopped while we looked: not a user any more
            volume_ids: list[str] = []
            targets: list[str] = []
            direct: list[tuple[str, str]] = []
            for target, source in disk_sources(xml):
                hits = {wanted[k] for k in path_keys(source) if k in wanted}
                for volume_id in sorted(hits):
                    if volume_id not in volume_ids:
                        volume_ids.append(volume_id)
                    if target and target not in targets:
                        targets.append(target)
            all_disks = disks(xml)
            for disk in all_disks:
                if not disk.source:
                    continue
                for volume_id in sorted({top_keys[k] for k in path_keys(disk.source)
                                         if k in top_keys}):
                    direct.append((volume_id, disk.target))
                    if volume_id not in volume_ids:
                        volume_ids.append(volume_id)
                    if disk.target not in targets:
                        targets.append(disk.target)
            if volume_ids:
                uses.append(DomainUse(name, uuid, tuple(volume_ids), tuple(targets),
                                      tuple(direct), tuple(d.target for d in all_disks)))
        return uses

    # -- guest agent -------------------------------------------------------

    def agent_ping(self, dom: Any, timeout_s: int) -> bool:
        """Whether the domain's guest agent answers ``guest-ping`` within
        ``timeout_s``.  Never raises: any failure means "no agent"."""
        libvirt = _libvirt()
        try:
            import libvirt_qemu
            libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-ping"}),
                                          max(1, int(timeout_s)), 0)
            return True
        except (ImportError, libvirt.libvirtError) as e:
            log.info("guest agent of domain %s does not answer: %s", self.name(dom), e)
            return False

    def fs_freeze(self, dom: Any) -> int:
        """Freeze every filesystem of the guest; the number frozen.

        :raises DomainError: the agent failed or is absent.
        """
        with self._failing(f"freezing domain {self.name(dom)}"):
            return int(dom.fsFreeze())

    def fs_thaw(self, dom: Any) -> None:
        """Thaw every filesystem of the guest (no mountpoint list: libvirt
        rejects one for thaw).

        :raises DomainError: the agent failed or is absent.
        """
        with self._failing(f"thawing domain {self.name(dom)}"):
            dom.fsThaw()

    # -- disks ---------------------------------------------------------------

    def disk_snapshot(self, dom: Any, overlays: Mapping[str, str | os.PathLike[str]], *,
                      quiesce: bool = False, targets: Iterable[str] | None = None) -> None:
        """Switch the given disks (target → overlay file qsnap made, backed
        by the disk's current top) in the domain's QEMU, atomically across
        them: a libvirt external disk-only snapshot with ``REUSE_EXT``,
        ``ATOMIC`` and ``NO_METADATA`` (qsnap's catalog is the record, not
        libvirt's).  Every other disk is listed with ``snapshot='no'``,
        because libvirt would otherwise give it an overlay of its own.
        ``quiesce`` adds libvirt's own agent freeze (``QUIESCE``) for callers
        that did not freeze the guest themselves.

        :raises DomainError: the switch did not happen (libvirt's snapshot
            is atomic: no disk changed).
        """
        libvirt = _libvirt()
        # The domain's disk targets; a caller that read them already passes
        # them (one XMLDesc less inside a guest's frozen window).
        known = list(targets) if targets is not None else [d.target for d in disks(self.xml(dom))]
        root = ET.Element("domainsnapshot")
        ET.SubElement(root, "description").text = "qsnap layer switch"
        disks_el = ET.SubElement(root, "disks")
        wanted = {t: os.fspath(p) for t, p in overlays.items()}
        missing = sorted(set(wanted) - set(known))
        if missing:
            raise DomainError(f"domain {self.name(dom)} has no disk {', '.join(missing)}")
        for target in known:
            el = ET.SubElement(disks_el, "disk", name=target)
            if target in wanted:
                el.set("snapshot", "external")
                el.set("type", "file")
                ET.SubElement(el, "driver", type="qcow2")
                ET.SubElement(el, "source", file=wanted[target])
            else:
                el.set("snapshot", "no")
        flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT)
        if quiesce:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        with self._failing(f"switching disks {', '.join(sorted(wanted))} of domain "
                           f"{self.name(dom)}"):
            dom.snapshotCreateXML(ET.tostring(root, encoding="unicode"), flags)

    def disk_tops(self, dom: Any) -> dict[str, str]:
        """Disk target → top source path ("" for none), from the live
        definition.

        :raises DomainError: libvirt failed.
        """
        return {d.target: d.source for d in disks(self.xml(dom))}

    def block_resize(self, dom: Any, target: str, size_bytes: int) -> None:
        """Grow a disk in the domain's QEMU (the guest sees the new size).

        :raises DomainError: libvirt refused.
        """
        libvirt = _libvirt()
        with self._failing(f"resizing disk {target} of domain {self.name(dom)}"):
            dom.blockResize(target, size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

    # -- definitions -----------------------------------------------------------

    def retarget_disks(self, dom: Any, sources: Mapping[str, str | os.PathLike[str]]) -> None:
        """Point disks of a stopped domain's persistent definition at new
        qcow2 files (target → path), dropping the backing chains libvirt
        recorded (it probes them again at start).

        :raises DomainError: the domain runs, has no such disk, or libvirt
            rejects the definition (nothing changed).
        """
        if self.is_active(dom):
            raise DomainError(f"domain {self.name(dom)} started: its disks are switched "
                              "through its QEMU, not its definition")
        root = ET.fromstring(self.xml(dom, inactive=True))
        wanted = {t: os.fspath(p) for t, p in sources.items()}
        seen: set[str] = set()
        for disk_el in root.iterfind("./devices/disk"):
            target = disk_el.find("target")
            dev = target.get("dev", "") if target is not None else ""
            if dev not in wanted:
                continue
            seen.add(dev)
            for old in disk_el.findall("backingStore"):
                disk_el.remove(old)
            source = disk_el.find("source")
            if source is None:
                source = ET.SubElement(disk_el, "source")
            source.attrib.clear()
            source.set("file", wanted[dev])
            disk_el.set("type", "file")
        missing = sorted(set(wanted) - seen)
        if missing:
            raise DomainError(f"domain {self.name(dom)} has no disk {', '.join(missing)}")
        self.define(ET.tostring(root, encoding="unicode"))

    def define(self, xml: str) -> Any:
        """Define (or redefine, same UUID) a persistent domain.

        :raises DomainError: libvirt rejected the definition.
        """
        with self._failing("defining a domain"):
            return self.connection().defineXML(xml)

    def start(self, dom: Any) -> None:
        """:raises DomainError: the domain did not start."""
        with self._failing(f"starting domain {self.name(dom)}"):
            dom.create()

    def destroy(self, dom: Any) -> None:
        """Power a domain off (a no-op when it is not running)."""
        with self._failing(f"stopping domain {self.name(dom)}"):
            if dom.isActive():
                dom.destroy()

    def undefine(self, dom: Any) -> None:
        """Remove a persistent definition (no storage is touched)."""
        libvirt = _libvirt()
        with self._failing(f"undefining domain {self.name(dom)}"):
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                              if hasattr(libvirt, "VIR_DOMAIN_UNDEFINE_NVRAM") else 0)
