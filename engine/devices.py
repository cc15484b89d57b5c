"""The one adapter for host block-device and filesystem tools.

The node plugin serves a volume as a regular file (a qemu-storage-daemon
FUSE export), turns it into a block device with a loop device, makes a
filesystem on it when it is blank, mounts it at the CSI staging path and
bind-mounts it to publish targets.  Every host-side step of that goes
through :class:`Devices`: ``losetup``, ``blkid``/``wipefs``, ``mkfs.ext4``/
``mkfs.xfs``, ``mount``/``umount``, ``fsfreeze``, ``resize2fs``/``e2fsck``/
``xfs_growfs``, ``dumpe2fs``/``xfs_db`` (filesystem sizes), ``blockdev``
and ``nbd-client`` (kernel NBD devices, where the kernel has them), plus
``os.statvfs`` and the parsing of ``/proc/self/mountinfo``.
:func:`detect_transports` says which ways of exposing a volume as a block
device this kernel offers.

Rules kept by every call:

* tools run from argument lists (never a shell), with ``LC_ALL=C`` so their
  messages can be recognised, stdin closed so that none of them can stop to
  ask a question, and a timeout;
* a failing command raises a typed engine error (:class:`DeviceError`
  carries the command and its stderr; ENOSPC becomes
  :class:`~engine.errors.PoolFull`);
* loop devices are shared with every other process on the machine: they are
  taken with ``losetup -f --show`` and only a device still backed by our
  file is ever detached;
* loop devices are buffered (``--direct-io=off``): direct I/O on a
  qemu-storage-daemon FUSE export corrupts data;
* a device that carries any signature, or any data in its first or last
  MiB, is never formatted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.errors import (FailedPrecondition, ImageError, InUse, InvalidArgument, NotFound,
                           PoolFull)

log = logging.getLogger(__name__)

#: Transports in the node plugin's order of preference.
TRANSPORTS = ("nbd", "vduse", "fuse")

#: Filesystems the driver makes and mounts.
FILESYSTEMS = ("ext4", "xfs")

# Where sbin tools live when the caller's PATH lacks them (a non-login root
# shell, a minimal container image).
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")

_PACKAGES = {
    "losetup": "util-linux", "blkid": "util-linux", "wipefs": "util-linux",
    "mount": "mount", "umount": "mount", "fsfreeze": "util-linux", "blockdev": "util-linux",
    "mkfs.ext4": "e2fsprogs", "resize2fs": "e2fsprogs", "e2fsck": "e2fsprogs",
    "dumpe2fs": "e2fsprogs", "mkfs.xfs": "xfsprogs", "xfs_growfs": "xfsprogs",
    "xfs_db": "xfsprogs", "nbd-client": "nbd-client",
}

#: The scheme of a qemu-storage-daemon NBD export on a unix socket.
NBD_SCHEME = "nbd+unix://"
# The kernel's NBD block size for served volumes: the filesystems qsnap makes
# use 4 KiB blocks, and smaller requests only multiply round trips.
_NBD_BLOCK_SIZE = 4096

# A mount flag is one option word, optionally with a value.  Commas would
# smuggle extra options past validation; quotes, spaces and control
# characters have no business in an option the driver passes through.
_FLAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(=[A-Za-z0-9_.:/@+%-]+)?")

# Options that change what ``mount`` does rather than how the filesystem
# behaves: they would turn a filesystem mount into a bind or move of
# another path, set up a loop device of their own, or run a helper.
# ``ro``/``rw`` are expressed by ``read_only``.
_FORBIDDEN_FLAGS = frozenset({
    "bind", "rbind", "move", "remount", "loop", "offset", "sizelimit", "encryption",
    "helper", "rw", "ro",
})

# Bytes at each end of a device that must read as zeros before it counts as
# blank: data without a known signature (a raw block-mode workload's) is
# still data.
_BLANK_PROBE = 1 << 20

_DELETED = " (deleted)"

# capability(7) number; the resize ioctl of ext4 checks it.
_CAP_SYS_RESOURCE = 24


class DeviceError(ImageError):
    """A host device or filesystem tool failed in a way the driver cannot
    attribute to the caller.  Carries the command, its stderr and exit code."""


class DeviceBusy(InUse, DeviceError):
    """The device, mount or filesystem is held by someone else right now
    (a process with files open on a mount, a filesystem already frozen, a
    loop device still open elsewhere)."""


class NotBlank(FailedPrecondition):
    """A device that is to be formatted already carries data.

    :ivar device: the device.
    :ivar found: what was found (signature types, or a note about data).
    """

    def __init__(self, device: str, found: Sequence[str]) -> None:
        super().__init__(f"{device} is not blank ({', '.join(found)}); "
                         "refusing to make a filesystem over existing data")
        self.device = device
        self.found = list(found)


@dataclass(frozen=True)
class LoopDevice:
    name: str                     # /dev/loopN
    backing_file: Path | None     # None when the device is free
    backing_deleted: bool         # the kernel marks a deleted backing file
    backing_inode: int | None
    backing_major_minor: str | None   # "major:minor" of the backing file's filesystem
    read_only: bool
    direct_io: bool
    autoclear: bool


@dataclass(frozen=True)
class MountInfo:
    """One line of ``/proc/self/mountinfo`` (paths unescaped)."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str                     # the path inside the filesystem that is mounted
    mount_point: str
    options: tuple[str, ...]      # per-mount options (ro/rw, noatime, nosuid...)
    fs_type: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


@dataclass(frozen=True)
class Usage:
    bytes_total: int
    bytes_used: int
    bytes_available: int          # for unprivileged users (excludes reserved blocks)
    inodes_total: int
    inodes_used: int
    inodes_free: int


# -- kernel feature detection ----------------------------------------------

def detect_transports(root: Path = Path("/")) -> list[str]:
    """The transports this kernel offers for exposing a served volume as a
    block device, in order of preference (a subset of :data:`TRANSPORTS`).

    * ``nbd``: the nbd module is loaded (``/sys/module/nbd``) or its device
      nodes exist (``/dev/nbd0``);
    * ``vduse``: ``/dev/vduse/control`` exists (or the vduse module/class
      is registered);
    * ``fuse``: FUSE in ``/proc/filesystems`` with ``/dev/fuse`` present
      (or its misc device registered), and loop devices available
      (``/dev/loop-control`` or ``/sys/module/loop``) -- the FUSE transport
      is FUSE export plus loop device.

    Nothing is loaded or created: a module that is merely installable does
    not count, because loading it is the operator's decision.

    :param root: the filesystem root to inspect (tests pass a fake tree).
    """
    def exists(rel: str) -> bool:
        return (root / rel).exists()

    found: list[str] = []
    if exists("sys/module/nbd") or _is_block_device(root / "dev/nbd0"):
        found.append("nbd")
    if exists("dev/vduse/control") or exists("sys/class/vduse/control") \
            or exists("sys/module/vduse"):
        found.append("vduse")
    try:
        filesystems = (root / "proc/filesystems").read_text()
    except OSError:
        filesystems = ""
    has_fuse = any(line.split()[-1:] == ["fuse"] for line in filesystems.splitlines())
    fuse_dev = exists("dev/fuse") or exists("sys/class/misc/fuse")
    loop = exists("dev/loop-control") or exists("sys/module/loop")
    if has_fuse and fuse_dev and loop:
        found.append("fuse")
    return found


def nbd_uri(socket: Path, name: str) -> str:
    """``nbd+unix:///<name>?socket=<socket>``: an NBD export on a unix socket,
    as QEMU's tools write it."""
    return f"{NBD_SCHEME}/{name}?socket={socket}"


def parse_nbd_uri(uri: str) -> tuple[Path, str]:
    """The socket and export name of an ``nbd+unix://`` URI.

    :raises InvalidArgument: not such a URI, or no socket or name in it.
    """
    if not uri.startswith(NBD_SCHEME + "/"):
        raise InvalidArgument(f"{uri!r} is not an nbd+unix:// URI")
    name, sep, query = uri[len(NBD_SCHEME) + 1:].partition("?socket=")
    if not sep or not name or "/" in name or not query.startswith("/"):
        raise InvalidArgument(f"{uri!r} does not name an export and an absolute socket path")
    return Path(query), name


def nbd_client_args(socket: Path, name: str, device: str, *, read_only: bool) -> list[str]:
    """The arguments of ``nbd-client`` that connect ``device`` (``/dev/nbdN``)
    to the export ``name`` on a unix socket.  nbd-client 3.17+ configures
    the device through netlink by default: the kernel then keeps the
    connection on its own, with no client process, so the device survives
    a restart of the node plugin.

    :raises InvalidArgument: a device that is not ``/dev/nbdN``, a relative
        socket path, or an export name that could be read as an option.
    """
    if not _NBD_DEVICE.fullmatch(device):
        raise InvalidArgument(f"{device!r} is not an NBD device (/dev/nbdN)")
    if not socket.is_absolute():
        raise InvalidArgument(f"NBD socket {socket} is not an absolute path")
    if not name or name.startswith("-") or any(c.isspace() for c in name):
        raise InvalidArgument(f"NBD export name {name!r} is not valid")
    args = ["-unix", str(socket), device, "-name", name, "-block-size", str(_NBD_BLOCK_SIZE)]
    if read_only:
        args.append("-readonly")
    return args


_NBD_DEVICE = re.compile(r"/dev/nbd[0-9]+")


def _is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        return False


# -- mountinfo ---------------------------------------------------------------

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo (mangle()
    # in fs/proc_namespace.c); the rest of a path is passed through raw.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Parse the text of a ``mountinfo`` file (``proc(5)``), in mount order.

    :raises DeviceError: a line does not have the documented shape.
    """
    entries: list[MountInfo] = []
    for line in text.splitlines():
        if not line:
            continue
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            entries.append(MountInfo(
                mount_id=int(fields[0]), parent_id=int(fields[1]),
                major=int(major), minor=int(minor),
                root=_unescape(fields[3]), mount_point=_unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                fs_type=_unescape(fields[sep + 1]), source=_unescape(fields[sep + 2]),
                super_options=tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else (),
            ))
        except (ValueError, IndexError) as e:
            raise DeviceError(f"unreadable mountinfo line: {line!r}") from e
    return entries


# -- the adapter -------------------------------------------------------------

class Devices:
    """Runs the host's block-device and filesystem tools.

    Holds no state beyond its configuration, so one instance can be shared
    by threads.

    :param timeout: seconds any single command may take before it is killed.
    :param mountinfo: the mountinfo file to read (``/proc/self/mountinfo``).
    :param sys_root: where sysfs is (tests pass a fake tree).
    """

    def __init__(self, *, timeout: float = 600.0,
                 mountinfo: Path = Path("/proc/self/mountinfo"),
                 sys_root: Path = Path("/sys")) -> None:
        self.timeout = timeout
        self.mountinfo_path = mountinfo
        self.sys_root = sys_root

    # -- running ---------------------------------------------------------

    def _tool(self, name: str) -> str:
        path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN)
        found = shutil.which(name, path=path)
        if not found:
            raise DeviceError(f"{name} is not installed (Debian package {_PACKAGES[name]})")
        return found

    def _run(self, tool: str, args: list[str], *, what: str,
             ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
        """Run ``tool args``; return the finished process.

        :raises PoolFull: the command failed with ENOSPC / EDQUOT.
        :raises DeviceError: any other failure (exit code not in ``ok``,
            timeout), with the command and stderr attached.
        """
        command = [self._tool(tool), *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False,
                                  stdin=subprocess.DEVNULL, timeout=self.timeout,
                                  env={**os.environ, "LC_ALL": "C"})
        except subprocess.TimeoutExpired as e:
            raise DeviceError(f"{what}: {tool} did not finish in {self.timeout:.0f}s",
                              command=command) from e
        if done.returncode not in ok:
            stderr = (done.stderr.strip() or done.stdout.strip())
            lowered = stderr.lower()
            if "no space left on device" in lowered or "disk quota exceeded" in lowered:
                raise PoolFull(f"{what}: the pool's filesystem is full ({stderr})")
            raise DeviceError(f"{what} failed: {stderr or 'exit ' + str(done.returncode)}",
                              command=command, stderr=stderr, returncode=done.returncode)
        return done

    # -- loop devices ----------------------------------------------------

    def attach_loop(self, path: Path, *, read_only: bool, attempts: int = 8) -> str:
        """Attach ``path`` to a free loop device (buffered, never direct
        I/O) and return the device, e.g. ``/dev/loop3``.

        Always takes a new device: callers that must not attach twice look
        first with :meth:`find_loops`.  Another process can grab the free
        device ``losetup -f`` picked before we configure it (EBUSY); the
        attach is then retried with a fresh pick.

        :raises NotFound: ``path`` does not exist.
        :raises InvalidArgument: ``path`` is not a regular file.
        :raises DeviceError: losetup failed (also after ``attempts`` EBUSY
            races, or when no loop device can be had).
        """
        path = Path(os.path.abspath(path))  # absolute: never read as an option
        try:
            mode = path.stat().st_mode
        except FileNotFoundError as e:
            raise NotFound(f"cannot attach {path}: no such file") from e
        except OSError as e:
            raise DeviceError(f"cannot attach {path}: {e.strerror}") from e
        if not stat.S_ISREG(mode):
            raise InvalidArgument(f"cannot attach {path}: not a regular file")
        args = ["--find", "--show", "--direct-io=off"]
        if read_only:
            args.append("--read-only")
        args.append(str(path))
        delay = 0.02
        for attempt in range(1, attempts + 1):
            try:
                done = self._run("losetup", args, what=f"attach {path} to a loop device")
            except DeviceError as e:
                if attempt < attempts and "device or resource busy" in e.stderr.lower():
                    log.debug("loop device taken by another process while attaching %s; "
                              "retrying (%d/%d)", path, attempt, attempts)
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                raise
            device = done.stdout.strip()
            log.info("attached %s to %s%s", path, device, " read-only" if read_only else "")
            return device
        raise AssertionError("unreachable: the last attempt returns or raises")

    def list_loops(self) -> list[LoopDevice]:
        """Every loop device that has a backing file.

        :raises DeviceError: losetup failed or printed something unreadable.
        """
        done = self._run("losetup", ["--json", "--list", "--output", _LOOP_COLUMNS],
                         what="list loop devices")
        return _parse_loops(done.stdout)

    def find_loops(self, path: Path, *, include_stale: bool = False) -> list[str]:
        """The loop devices backed by the file at ``path``.

        A device counts when its backing file has this path *and* is the
        same file (device and inode) as the one there now.  With
        ``include_stale`` a device whose backing file merely had this path
        counts too: one left on a FUSE export that has since been restarted
        or deleted -- ours to clean up, but not one to serve from.

        :raises DeviceError: losetup failed.
        """
        want = Path(os.path.realpath(path))
        try:
            st: os.stat_result | None = os.stat(want)
        except OSError:
            st = None
        return [loop.name for loop in self.list_loops()
                if loop.backing_file == want
                and (include_stale or (not loop.backing_deleted and _same_file(loop, st)))]

    def loop_backing(self, device: str) -> Path | None:
        """The file behind a loop device; ``None`` when the device is free
        or does not exist.  A deleted backing file is reported by the path
        it had.

        :raises DeviceError: ``device`` is not a loop device, or losetup
            failed.
        """
        info = self._loop(device)
        return info.backing_file if info else None

    def _loop(self, device: str) -> LoopDevice | None:
        if not os.path.exists(device):
            return None
        done = self._run("losetup", ["--json", "--list", "--output", _LOOP_COLUMNS, device],
                         what=f"inspect {device}")
        loops = _parse_loops(done.stdout)
        return loops[0] if loops else None

    def detach_loop(self, device: str, *, expected_backing: Path,
                    settle: float = 5.0) -> bool:
        """Detach ``device`` if, and only if, it is still backed by the file
        at ``expected_backing`` (stale or live).  Returns ``True`` when this
        call detached it, ``False`` when there was nothing of ours to
        detach (the device is free, gone, or now backs another file --
        someone else's, never touched).

        The check and the detach cannot race with another process reusing
        the device: we hold the device open across both, and the kernel
        does not release (or re-bind) a loop device that is still open; it
        marks it to detach on last close instead, which is our close.

        :raises DeviceBusy: the device is still bound after ``settle``
            seconds because another opener (a mount, a process) holds it;
            the kernel detaches it when that opener lets go.
        :raises DeviceError: ``device`` is not a loop device, or losetup
            failed.
        """
        want = Path(os.path.realpath(expected_backing))
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise DeviceError(f"cannot open {device}: {e.strerror}") from e
        try:
            info = self._loop(device)
            if info is None or info.backing_file is None:
                return False
            if info.backing_file != want:
                log.warning("not detaching %s: it backs %s now, not %s",
                            device, info.backing_file, want)
                return False
            self._run("losetup", ["--detach", device], what=f"detach {device}")
        finally:
            os.close(fd)
        deadline = time.monotonic() + settle
        while True:
            info = self._loop(device)
            if info is None or info.backing_file != want:
                log.info("detached %s from %s", device, want)
                return True
            if time.monotonic() >= deadline:
                raise DeviceBusy(f"{device} is still open by another user (mounted?); "
                                 "the kernel detaches it on last close")
            time.sleep(0.02)

    def set_loop_capacity(self, device: str) -> int:
        """Make a loop device take the current size of its backing file
        (after the file grew) and return the device's new size in bytes.

        :raises DeviceError: the device is not a bound loop device.
        """
        self._run("losetup", ["--set-capacity", device], what=f"refresh the size of {device}")
        return self.device_size(device)

    # -- NBD devices -----------------------------------------------------

    def nbd_devices(self) -> dict[str, bool]:
        """The kernel's NBD devices, ``/dev/nbdN`` -> connected.  A device
        is connected while ``/sys/block/nbdN/pid`` exists (the kernel makes
        it when a connection starts and removes it when it ends)."""
        found: dict[str, bool] = {}
        try:
            names = os.listdir(self.sys_root / "block")
        except OSError:
            return found
        for name in names:
            if _NBD_DEVICE.fullmatch("/dev/" + name):
                found["/dev/" + name] = (self.sys_root / "block" / name / "pid").exists()
        return dict(sorted(found.items(), key=lambda kv: int(kv[0][8:])))

    def nbd_connected(self, device: str) -> bool:
        return self.nbd_devices().get(device, False)

    def attach_nbd(self, socket: Path, name: str, *, read_only: bool,
                   prefer: str | None = None) -> str:
        """Connect a free kernel NBD device to the export ``name`` on the
        unix ``socket`` and return it (``/dev/nbdN``).  ``prefer`` (the
        device a volume had before a restart) is tried first when free.
        Another process may take the device picked meanwhile: the next free
        one is tried.

        :raises DeviceError: no NBD devices (the nbd module is not loaded),
            none free, nbd-client is missing, or it failed.
        """
        devices = self.nbd_devices()
        if not devices:
            raise DeviceError("no NBD devices: the nbd kernel module is not loaded")
        free = [d for d, connected in devices.items() if not connected]
        if prefer in free:
            free.remove(prefer)
            free.insert(0, prefer)
        last: DeviceError | None = None
        for device in free:
            args = nbd_client_args(socket, name, device, read_only=read_only)
            try:
                self._run("nbd-client", args, what=f"connect {device} to NBD export {name}")
            except DeviceError as e:
                lowered = e.stderr.lower()
                if "busy" in lowered or "already" in lowered or "in use" in lowered:
                    last = e
                    continue          # taken by someone else meanwhile
                raise
            log.info("connected %s to NBD export %s%s", device, name,
                     " read-only" if read_only else "")
            return device
        raise DeviceError(f"no free NBD device for export {name}"
                          + (f" ({last.stderr})" if last else ""))

    def detach_nbd(self, device: str, *, settle: float = 5.0) -> bool:
        """Disconnect an NBD device (``nbd-client -d``); True if this call
        disconnected it, False if it was not connected.  The caller makes
        sure the device is its own (the kernel does not say which export a
        device serves).

        :raises DeviceBusy: still connected after ``settle`` seconds.
        :raises DeviceError: nbd-client failed.
        """
        if not _NBD_DEVICE.fullmatch(device):
            raise InvalidArgument(f"{device!r} is not an NBD device (/dev/nbdN)")
        if not self.nbd_connected(device):
            return False
        self._run("nbd-client", ["-d", device], what=f"disconnect {device}")
        deadline = time.monotonic() + settle
        while self.nbd_connected(device):
            if time.monotonic() >= deadline:
                raise DeviceBusy(f"{device} is still connected {settle:.0f}s after the"
                                 " disconnect")
            time.sleep(0.02)
        log.info("disconnected %s", device)
        return True

    def has_tool(self, name: str) -> bool:
        try:
            self._tool(name)
        except DeviceError:
            return False
        return True

    # -- filesystems -----------------------------------------------------

    def signatures(self, device: str) -> list[str]:
        """Every filesystem, RAID or partition-table signature on a device,
        by type.  Two probes are combined: ``blkid -p`` (superblocks and
        partition tables, bypassing blkid's cache) and ``wipefs -n``, which
        also reports signatures with a bad checksum.

        :raises NotFound: no such device.
        :raises DeviceError: a probe failed, or found ambivalent signatures
            (reported as an error rather than guessing).
        """
        self._require_block_device(device)
        found: list[str] = []
        # blkid: 0 = found, 2 = nothing identified (anything else is an error).
        done = self._run("blkid", ["--probe", "--output", "export", device],
                         what=f"probe {device}", ok=(0, 2))
        for line in done.stdout.splitlines():
            key, _, value = line.partition("=")
            if key in ("TYPE", "PTTYPE") and value:
                found.append(value)
        done = self._run("wipefs", ["--no-act", "--json", device], what=f"probe {device}")
        if done.stdout.strip():
            try:
                listed = json.loads(done.stdout).get("signatures", [])
            except json.JSONDecodeError as e:
                raise DeviceError(f"probe {device}: unreadable wipefs output",
                                  stderr=done.stdout) from e
            found.extend(str(sig.get("type")) for sig in listed)
        return list(dict.fromkeys(found))

    def is_blank(self, device: str) -> bool:
        """True when the device carries no signature (see
        :meth:`signatures`) and its first and last MiB read as zeros.

        :raises NotFound: no such device.
        :raises DeviceError: a probe or the read failed.
        """
        return not self._blank_findings(device)

    def _blank_findings(self, device: str) -> list[str]:
        found = self.signatures(device)
        if not found and self._has_data(device):
            found.append("data without a known signature")
        return found

    def _has_data(self, device: str) -> bool:
        try:
            with open(device, "rb", buffering=0) as f:
                size = f.seek(0, os.SEEK_END)
                for offset in sorted({0, max(0, size - _BLANK_PROBE)}):
                    f.seek(offset)
                    chunk = f.read(min(_BLANK_PROBE, size))
                    if chunk.count(0) != len(chunk):
                        return True
        except OSError as e:
            raise DeviceError(f"cannot read {device}: {e.strerror}") from e
        return False

    def filesystem_type(self, device: str) -> str | None:
        """The filesystem on a device (``"ext4"``, ``"xfs"``...), or
        ``None`` when there is none (a partition table is not a filesystem).

        :raises NotFound: no such device.
        :raises DeviceError: blkid failed or found ambivalent signatures.
        """
        self._require_block_device(device)
        done = self._run("blkid", ["--probe", "--output", "export", device],
                         what=f"probe {device}", ok=(0, 2))
        for line in done.stdout.splitlines():
            key, _, value = line.partition("=")
            if key == "TYPE" and value:
                return value
        return None

    def make_filesystem(self, device: str, fs_type: str) -> None:
        """Make an ``ext4`` or ``xfs`` filesystem on a blank device.

        The blank check (:meth:`is_blank`) is ours to make: ``mkfs.ext4``
        with no terminal formats over an existing filesystem without asking.
        Discard is skipped because a blank device already reads as zeros
        and discarding a thin image through FUSE is wasted work.

        :raises InvalidArgument: ``fs_type`` is not ext4 or xfs.
        :raises NotBlank: the device carries a signature or data.
        :raises NotFound: no such device.
        :raises PoolFull: the backing store ran out of space.
        :raises DeviceError: mkfs failed otherwise (e.g. xfs needs 300 MiB).
        """
        _check_fs_type(fs_type)
        found = self._blank_findings(device)
        if found:
            raise NotBlank(device, found)
        if fs_type == "ext4":
            # 4 KiB blocks whatever the size: under 512 MiB mke2fs would pick
            # 1 KiB blocks, four times the block I/O through FUSE for a
            # volume that may be grown far beyond its first size.
            self._run("mkfs.ext4", ["-q", "-b", "4096", "-E", "nodiscard", device],
                      what=f"make an ext4 filesystem on {device}")
        else:
            self._run("mkfs.xfs", ["-q", "-K", device],
                      what=f"make an xfs filesystem on {device}")
        log.info("made %s on %s", fs_type, device)

    def filesystem_size(self, device: str, fs_type: str) -> tuple[int, int]:
        """How far the filesystem on ``device`` reaches, from its superblock:
        ``(bytes, block size)``.  Compared with :meth:`device_size` it says
        whether the filesystem is smaller than its device (the volume grew
        while the filesystem was not mounted).  ``dumpe2fs -h`` for ext4,
        ``xfs_db -r`` (read-only) for xfs; both read a mounted device too.

        :raises InvalidArgument: ``fs_type`` is not ext4 or xfs.
        :raises NotFound: no such device.
        :raises DeviceError: the tool failed, or its answer has no size.
        """
        _check_fs_type(fs_type)
        self._require_block_device(device)
        what = f"read the {fs_type} superblock on {device}"
        if fs_type == "ext4":
            done = self._run("dumpe2fs", ["-h", device], what=what)
            sep = ":"
            keys = ("Block count", "Block size")
        else:
            done = self._run("xfs_db", ["-r", "-c", "sb 0", "-c", "print dblocks blocksize",
                                        device], what=what)
            sep = "="
            keys = ("dblocks", "blocksize")
        fields = {key.strip(): value.strip() for key, _, value in
                  (line.partition(sep) for line in done.stdout.splitlines())}
        try:
            blocks, block_size = (int(fields[k]) for k in keys)
        except (KeyError, ValueError) as e:
            raise DeviceError(f"{what}: no size in the answer", stderr=done.stdout) from e
        return blocks * block_size, block_size

    def grow_filesystem(self, device: str, mountpoint: Path | None, fs_type: str) -> None:
        """Grow the filesystem on ``device`` to the device's size.  Growing
        to the size it already has is a no-op.

        Mounted (``mountpoint`` given), the grow is online: ``resize2fs`` on
        the device for ext4, ``xfs_growfs`` on the mountpoint for xfs.
        Online ext4 growth needs ``CAP_SYS_RESOURCE`` (the kernel checks it
        in the resize ioctl); a process without it gets a
        :class:`DeviceError` that says so.  Unmounted (``mountpoint`` None),
        only ext4 can grow: ``e2fsck -f -p`` (which resize2fs insists on
        after a mount) and then ``resize2fs``.

        :raises InvalidArgument: ``fs_type`` is not ext4 or xfs.
        :raises FailedPrecondition: ``mountpoint`` is not a mount of
            ``device`` with that type; or, unmounted, the device is mounted
            somewhere after all, or the filesystem is xfs.
        :raises PoolFull: the backing store ran out of space.
        :raises DeviceError: the check or resize tool failed.
        """
        _check_fs_type(fs_type)
        if mountpoint is None:
            self._grow_unmounted(device, fs_type)
            return
        info = self.mount_info(mountpoint)
        if info is None or not self._is_device_of(device, info):
            raise FailedPrecondition(f"{mountpoint} is not a mount of {device}")
        if info.fs_type != fs_type:
            raise FailedPrecondition(f"{mountpoint} holds {info.fs_type}, not {fs_type}")
        what = f"grow the filesystem on {device}"
        if fs_type == "xfs":
            self._run("xfs_growfs", [info.mount_point], what=what)
        else:
            try:
                self._run("resize2fs", [device], what=what)
            except DeviceError as e:
                if "permission denied" in e.stderr.lower() and not _has_capability(_CAP_SYS_RESOURCE):
                    raise DeviceError(
                        f"{what}: online ext4 resize needs CAP_SYS_RESOURCE, which this process "
                        "lacks; grant it to the node plugin or grow the filesystem unmounted",
                        command=e.command, stderr=e.stderr, returncode=e.returncode) from e
                raise
        log.info("grew %s on %s (online at %s)", fs_type, device, info.mount_point)

    def _grow_unmounted(self, device: str, fs_type: str) -> None:
        self._require_block_device(device)
        if fs_type == "xfs":
            raise FailedPrecondition(f"xfs on {device} can only grow while mounted")
        # e2fsck on a mounted filesystem would corrupt it.
        mounted = [m.mount_point for m in self.mounts() if self._is_device_of(device, m)]
        if mounted:
            raise FailedPrecondition(f"{device} is mounted at {', '.join(mounted)}")
        # e2fsck -p: 0 = clean, 1 = errors fixed; anything else needs an operator.
        self._run("e2fsck", ["-f", "-p", device], what=f"check the filesystem on {device}",
                  ok=(0, 1))
        self._run("resize2fs", [device], what=f"grow the filesystem on {device}")
        log.info("grew %s on %s (unmounted)", fs_type, device)

    # -- mounts ----------------------------------------------------------

    def mounts(self) -> list[MountInfo]:
        """Every mount this process sees, in mount order.

        :raises DeviceError: the mountinfo file cannot be read.
        """
        try:
            text = self.mountinfo_path.read_text(errors="surrogateescape")
        except OSError as e:
            raise DeviceError(f"cannot read {self.mountinfo_path}: {e.strerror}") from e
        return parse_mountinfo(text)

    def mount_info(self, path: Path) -> MountInfo | None:
        """The topmost mount at ``path`` (``None`` when it is not a
        mountpoint).  Symbolic links in ``path`` are resolved, as the kernel
        did when the mount was made; a path below a dead FUSE mount still
        resolves.

        :raises DeviceError: the mountinfo file cannot be read.
        """
        want = os.path.realpath(path)
        found = None
        for entry in self.mounts():
            if entry.mount_point == want:
                found = entry  # later lines are mounted on top of earlier ones
        return found

    def is_mountpoint(self, path: Path) -> bool:
        """Whether something is mounted at ``path`` (bind mounts within one
        filesystem included, which ``os.path.ismount`` misses).

        :raises DeviceError: the mountinfo file cannot be read.
        """
        return self.mount_info(path) is not None

    def mount_source(self, path: Path) -> str | None:
        """The source (``/dev/loop3``...) of the topmost mount at ``path``,
        or ``None`` when it is not a mountpoint.

        :raises DeviceError: the mountinfo file cannot be read.
        """
        info = self.mount_info(path)
        return info.source if info else None

    def mount(self, device: str, target: Path, fs_type: str, flags: Sequence[str], *,
              read_only: bool) -> None:
        """Mount the filesystem on ``device`` at the directory ``target``.

        Idempotent: a target that already has ``device`` mounted with the
        same type and read-only state is left as it is (``flags`` are not
        compared).  XFS is always mounted with ``nouuid``, because a restore
        or clone carries the UUID of its source and both may be mounted on
        one node.

        :param flags: mount options, each one plain word or ``word=value``;
            see :func:`validate_mount_flags`.
        :raises InvalidArgument: a bad flag or ``fs_type``.
        :raises NotFound: the device or the target does not exist.
        :raises FailedPrecondition: ``target`` is a mountpoint of something
            else or with another read-only state; or a read-write mount of a
            read-only device was asked for.
        :raises DeviceError: mount failed (a wrong option for the filesystem
            also ends here: the kernel does not say which one).
        """
        _check_fs_type(fs_type)
        options = validate_mount_flags(flags)
        self._require_block_device(device)
        target = self._require_path(target, directory=True)
        existing = self.mount_info(target)
        if existing is not None:
            if (self._is_device_of(device, existing) and existing.fs_type == fs_type
                    and existing.read_only == read_only):
                return
            raise FailedPrecondition(
                f"{target} already has {existing.source} ({existing.fs_type}, "
                f"{'ro' if existing.read_only else 'rw'}) mounted")
        if fs_type == "xfs" and "nouuid" not in options:
            options.append("nouuid")
        if read_only:
            options.insert(0, "ro")
        # --read-write: without it mount(8) quietly falls back to a
        # read-only mount on a write-protected device.
        args = ["-t", fs_type] + ([] if read_only else ["--read-write"])
        if options:
            args += ["-o", ",".join(options)]
        args += ["--source", device, "--target", str(target)]
        try:
            self._run("mount", args, what=f"mount {device} at {target}")
        except DeviceError as e:
            if "write-protected" in e.stderr:
                raise FailedPrecondition(f"{device} is read-only; it cannot be mounted "
                                         "read-write") from e
            raise
        log.info("mounted %s (%s) at %s with %s", device, fs_type, target, options)

    def bind_mount(self, source: Path, target: Path, *, read_only: bool) -> None:
        """Bind-mount ``source`` (a directory, or a device node for block
        access) at ``target`` (a directory, or a file for a device node).

        A read-only bind needs a second step: the kernel ignores ``ro`` on
        the bind itself, so the new mount is remounted ``bind,ro``; if that
        fails the bind is undone rather than left writable.  Idempotent: a
        target that is already a mount of ``source`` with the same
        read-only state is left as it is.

        A read-only bind of a *device node* does not make the device
        read-only: the kernel lets a device node on a read-only mount be
        opened and written.  Read-only block access needs a read-only loop
        device (:meth:`attach_loop` with ``read_only``).

        :raises NotFound: ``source`` or ``target`` does not exist.
        :raises FailedPrecondition: ``target`` is a mountpoint of something
            else or with another read-only state.
        :raises DeviceError: mount failed.
        """
        source = self._require_path(source, directory=None)
        target = self._require_path(target, directory=None)
        existing = self.mount_info(target)
        if existing is not None:
            if _same_inode(source, target) and existing.read_only == read_only:
                return
            raise FailedPrecondition(f"{target} already has another mount "
                                     f"({existing.source}, {'ro' if existing.read_only else 'rw'})")
        self._run("mount", ["--bind", str(source), str(target)],
                  what=f"bind {source} to {target}")
        if read_only:
            try:
                self._run("mount", ["-o", "remount,bind,ro", str(target)],
                          what=f"make the bind mount at {target} read-only")
            except Exception:
                self._run("umount", [str(target)], what=f"undo the bind mount at {target}")
                raise
        log.info("bound %s to %s%s", source, target, " read-only" if read_only else "")

    def unmount(self, target: Path, *, lazy: bool = False, max_layers: int = 16) -> None:
        """Unmount everything mounted at ``target`` (stacked mounts too).
        Idempotent: a path that is not a mountpoint, or does not exist, is
        left alone.  The path recorded in mountinfo is passed without
        canonicalisation, so a dead FUSE mount below it does not get in the
        way.

        :param lazy: detach the mount even while in use (``umount -l``);
            only on explicit request, since the filesystem then lives on
            unseen until its last user goes.
        :raises DeviceBusy: the mount is in use (and ``lazy`` is off).
        :raises DeviceError: umount failed otherwise, or more than
            ``max_layers`` mounts are stacked at ``target``.
        """
        for _ in range(max_layers):
            info = self.mount_info(target)
            if info is None:
                return
            args = ["--no-canonicalize"] + (["--lazy"] if lazy else []) + [info.mount_point]
            try:
                self._run("umount", args, what=f"unmount {info.mount_point}")
            except DeviceError as e:
                lowered = e.stderr.lower()
                if "not mounted" in lowered:
                    continue  # somebody else unmounted it meanwhile
                if "target is busy" in lowered or "device or resource busy" in lowered:
                    raise DeviceBusy(f"{info.mount_point} is in use: {e.stderr}",
                                     command=e.command, stderr=e.stderr,
                                     returncode=e.returncode) from e
                raise
            log.info("unmounted %s%s", info.mount_point, " (lazily)" if lazy else "")
        if self.mount_info(target) is not None:
            raise DeviceError(f"more than {max_layers} mounts are stacked at {target}")

    # -- freezing --------------------------------------------------------

    def freeze(self, mountpoint: Path) -> None:
        """Freeze the filesystem mounted at ``mountpoint``: writers block
        until :meth:`thaw`.  Only a mountpoint is accepted, because
        ``fsfreeze`` on any other directory freezes the filesystem that
        contains it (possibly the root filesystem).

        :raises FailedPrecondition: ``mountpoint`` is not a mountpoint.
        :raises DeviceBusy: the filesystem is frozen already.
        :raises DeviceError: fsfreeze failed otherwise.
        """
        info = self._require_mountpoint(mountpoint)
        try:
            self._run("fsfreeze", ["--freeze", info.mount_point], what=f"freeze {mountpoint}")
        except DeviceError as e:
            if "device or resource busy" in e.stderr.lower():
                raise DeviceBusy(f"{mountpoint} is frozen already", command=e.command,
                                 stderr=e.stderr, returncode=e.returncode) from e
            raise
        log.info("froze %s", info.mount_point)

    def thaw(self, mountpoint: Path) -> None:
        """Thaw the filesystem mounted at ``mountpoint``.  Idempotent: a
        filesystem that is not frozen is left alone.

        :raises FailedPrecondition: ``mountpoint`` is not a mountpoint.
        :raises DeviceError: fsfreeze failed.
        """
        info = self._require_mountpoint(mountpoint)
        try:
            self._run("fsfreeze", ["--unfreeze", info.mount_point], what=f"thaw {mountpoint}")
        except DeviceError as e:
            # The kernel answers EINVAL for a filesystem that is not frozen.
            if "invalid argument" in e.stderr.lower():
                return
            raise
        log.info("thawed %s", info.mount_point)

    @contextlib.contextmanager
    def frozen(self, mountpoint: Path) -> Iterator[None]:
        """Keep the filesystem at ``mountpoint`` frozen for the body of a
        ``with`` block, and thaw it however the block ends.  A freeze that
        fails (or times out, and may still complete in the kernel) is
        followed by a thaw too, so no path leaves the filesystem frozen.

        :raises: what :meth:`freeze` and :meth:`thaw` raise.
        """
        try:
            self.freeze(mountpoint)
        except DeviceBusy:
            raise  # frozen by someone else: theirs to thaw
        except BaseException:
            with contextlib.suppress(Exception):
                self.thaw(mountpoint)
            raise
        try:
            yield
        finally:
            # A failing thaw outranks the body's own exception (which stays
            # attached as its context): a frozen filesystem stalls every writer.
            self.thaw(mountpoint)

    # -- sizes -----------------------------------------------------------

    def usage(self, path: Path) -> Usage:
        """Space and inodes of the filesystem holding ``path``.

        :raises NotFound: ``path`` does not exist.
        :raises DeviceError: statvfs failed (e.g. a dead FUSE mount).
        """
        try:
            st = os.statvfs(path)
        except FileNotFoundError as e:
            raise NotFound(f"{path} does not exist") from e
        except OSError as e:
            raise DeviceError(f"statvfs {path}: {e.strerror}") from e
        return Usage(
            bytes_total=st.f_blocks * st.f_frsize,
            bytes_used=(st.f_blocks - st.f_bfree) * st.f_frsize,
            bytes_available=st.f_bavail * st.f_frsize,
            inodes_total=st.f_files,
            inodes_used=st.f_files - st.f_ffree,
            inodes_free=st.f_ffree,
        )

    def device_size(self, device: str) -> int:
        """Size of a block device in bytes.

        :raises NotFound: no such device.
        :raises DeviceError: blockdev failed.
        """
        self._require_block_device(device)
        done = self._run("blockdev", ["--getsize64", device], what=f"size of {device}")
        try:
            return int(done.stdout.strip())
        except ValueError as e:
            raise DeviceError(f"size of {device}: unreadable answer {done.stdout!r}") from e

    # -- helpers ---------------------------------------------------------

    def _require_block_device(self, device: str) -> None:
        try:
            mode = os.stat(device).st_mode
        except FileNotFoundError as e:
            raise NotFound(f"{device} does not exist") from e
        except OSError as e:
            raise DeviceError(f"cannot stat {device}: {e.strerror}") from e
        if not stat.S_ISBLK(mode):
            raise InvalidArgument(f"{device} is not a block device")

    def _require_path(self, path: Path, *, directory: bool | None) -> Path:
        path = Path(os.path.abspath(path))  # absolute: never read as an option
        try:
            mode = path.stat().st_mode
        except FileNotFoundError as e:
            raise NotFound(f"{path} does not exist") from e
        except OSError as e:
            raise DeviceError(f"cannot stat {path}: {e.strerror}") from e
        if directory and not stat.S_ISDIR(mode):
            raise InvalidArgument(f"{path} is not a directory")
        return path

    def _require_mountpoint(self, mountpoint: Path) -> MountInfo:
        info = self.mount_info(mountpoint)
        if info is None:
            raise FailedPrecondition(f"{mountpoint} is not a mountpoint")
        return info

    @staticmethod
    def _is_device_of(device: str, info: MountInfo) -> bool:
        try:
            rdev = os.stat(device).st_rdev
        except OSError:
            return False
        return (os.major(rdev), os.minor(rdev)) == (info.major, info.minor)


def validate_mount_flags(flags: Sequence[str]) -> list[str]:
    """Check mount flags and return them as a new list.

    Each flag must be one plain option word (``noatime``, ``data=ordered``,
    ``commit=30``): no commas (which would add options past this check),
    spaces, quotes or control characters.  Flags that change what
    ``mount`` does rather than how the filesystem behaves (``bind``,
    ``move``, ``remount``, ``loop``, ``offset=``, ``helper=``, userspace
    ``X-``/``x-`` options) are refused, and so are ``ro``/``rw``: the
    read-only state is the ``read_only`` argument.

    :raises InvalidArgument: a flag is refused (the message names it).
    """
    checked: list[str] = []
    for flag in flags:
        if not isinstance(flag, str) or not _FLAG.fullmatch(flag):
            raise InvalidArgument(f"mount flag {flag!r} is not a plain option word")
        key = flag.partition("=")[0]
        if key.lower() in _FORBIDDEN_FLAGS or key[:2].lower() == "x-":
            raise InvalidArgument(f"mount flag {flag!r} is not allowed")
        checked.append(flag)
    return checked


_LOOP_COLUMNS = "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,RO,DIO,AUTOCLEAR"


def _parse_loops(text: str) -> list[LoopDevice]:
    # losetup prints nothing at all (not an empty list) when no device is
    # bound, pads BACK-MAJ:MIN with spaces, and gives a free device a null
    # backing file.
    if not text.strip():
        return []
    try:
        rows = json.loads(text)["loopdevices"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DeviceError("unreadable losetup output", stderr=text) from e
    loops: list[LoopDevice] = []
    for row in rows:
        back = row.get("back-file")
        deleted = bool(back) and back.endswith(_DELETED)
        if deleted:
            back = back[: -len(_DELETED)]
        majmin = (row.get("back-maj:min") or "").strip() or None
        ino = row.get("back-ino")
        loops.append(LoopDevice(
            name=row["name"], backing_file=Path(back) if back else None,
            backing_deleted=deleted,
            backing_inode=int(ino) if ino not in (None, "") else None,
            backing_major_minor=majmin, read_only=_flag(row.get("ro")),
            direct_io=_flag(row.get("dio")), autoclear=_flag(row.get("autoclear")),
        ))
    return loops


def _flag(value: object) -> bool:
    # Booleans in losetup's JSON are true/false in util-linux >= 2.37 and
    # "0"/"1" strings before that.
    return value in (True, 1, "1")


def _same_file(loop: LoopDevice, st: os.stat_result | None) -> bool:
    if st is None:
        return False
    majmin = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    return loop.backing_inode == st.st_ino and loop.backing_major_minor == majmin


def _same_inode(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _has_capability(number: int) -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return True   # cannot tell: let the tool's own message stand
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> number & 1)
    return True


def _check_fs_type(fs_type: str) -> None:
    if fs_type not in FILESYSTEMS:
        raise InvalidArgument(f"filesystem type {fs_type!r} is not supported "
                              f"(one of {', '.join(FILESYSTEMS)})")
