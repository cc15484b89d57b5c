"""The one adapter that runs ``qemu-img``.

Every call passes an argument list (never a shell), names the image format
and the backing format explicitly, and turns a failure into a typed engine
error.  Backing-file names stored inside an image are never followed: the
engine knows each layer's parent from its catalog and passes it here, and
:meth:`QemuImg.info` reads an image with ``--backing-chain`` off so that a
tampered header cannot make qemu-img open an arbitrary file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ImageError, PoolFull

log = logging.getLogger(__name__)

QCOW2 = "qcow2"


@dataclass(frozen=True)
class ImageInfo:
    virtual_size: int
    actual_size: int            # bytes the file occupies on its filesystem
    backing_filename: str | None
    backing_format: str | None
    cluster_size: int
    dirty: bool


@dataclass(frozen=True)
class MapExtent:
    start: int
    length: int
    depth: int
    data: bool
    zero: bool


class QemuImg:
    """Runs ``qemu-img`` as a child process.

    :param binary: the qemu-img executable (found on ``PATH`` by default).
    :param timeout: seconds any single call may take before it is killed.
    """

    def __init__(self, binary: str | None = None, *, timeout: float = 3600.0) -> None:
        found = binary or shutil.which("qemu-img")
        if not found:
            raise ImageError("qemu-img is not installed (Debian package qemu-utils)")
        self.binary = found
        self.timeout = timeout

    # -- running ---------------------------------------------------------

    def _run(self, args: list[str], *, what: str) -> str:
        """Run ``qemu-img args``; return stdout.

        :raises PoolFull: the command failed with ENOSPC / EDQUOT.
        :raises ImageError: any other failure (a missing image included: the
            catalog named it, so its absence is damage, not a caller's
            mistake), with stderr attached.
        """
        command = [self.binary, *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=self.timeout, check=False,
                                  env={**os.environ, "LC_ALL": "C"})
        except subprocess.TimeoutExpired as e:
            raise ImageError(f"{what}: qemu-img did not finish in {self.timeout:.0f}s",
                             command=command) from e
        if done.returncode != 0:
            stderr = done.stderr.strip()
            lowered = stderr.lower()
            if "no space left" in lowered or "disk quota exceeded" in lowered:
                raise PoolFull(f"{what}: the pool's filesystem is full ({stderr})")
            raise ImageError(f"{what} failed: {stderr or 'exit ' + str(done.returncode)}",
                             command=command, stderr=stderr, returncode=done.returncode)
        return done.stdout

    def version(self) -> str:
        """The first line of ``qemu-img --version``.

        :raises ImageError: qemu-img cannot run.
        """
        return self._run(["--version"], what="qemu-img --version").splitlines()[0]

    # -- reading ---------------------------------------------------------

    def info(self, path: Path) -> ImageInfo:
        """Header facts of one image, without opening its backing chain.

        :raises ImageError: no such file, or not a readable qcow2 image.
        """
        out = self._run(["info", "--output=json", "-f", QCOW2, "-U", str(path)],
                        what=f"inspect {path.name}")
        raw = json.loads(out)
        fmt = raw.get("format-specific", {}).get("data", {})
        return ImageInfo(
            virtual_size=int(raw["virtual-size"]),
            actual_size=int(raw.get("actual-size", 0)),
            backing_filename=raw.get("backing-filename"),
            backing_format=raw.get("backing-filename-format"),
            cluster_size=int(raw.get("cluster-size", 65536)),
            dirty=bool(raw.get("dirty-flag", False)) or bool(fmt.get("corrupt", False)),
        )

    def map(self, path: Path) -> list[MapExtent]:
        """Allocation map of an image over its whole chain (depth 0 = the
        image's own clusters).

        :raises ImageError: the image or a backing file cannot be read.
        """
        out = self._run(["map", "--output=json", "-f", QCOW2, "-U", str(path)],
                        what=f"map {path.name}")
        return [MapExtent(int(e["start"]), int(e["length"]), int(e["depth"]),
                          bool(e["data"]), bool(e["zero"])) for e in json.loads(out)]

    def check(self, path: Path) -> None:
        """Consistency check of one image's metadata.

        :raises ImageError: qemu-img reports corruption or leaks.
        """
        self._run(["check", "-q", "-f", QCOW2, "-U", str(path)], what=f"check {path.name}")

    # -- writing (only on closed images) ---------------------------------

    def create(self, path: Path, size_bytes: int, *, backing: Path | None = None) -> None:
        """Create a thin qcow2 image; with ``backing`` an empty overlay on it.

        The backing file is named relative to the new image's directory so a
        pool stays valid when its directory moves, and ``-u`` keeps qemu-img
        from opening the backing file: the engine already knows its size and
        format, and the backing image may be in use by another process.

        :raises PoolFull: no room for the new file.
        :raises ImageError: qemu-img failed otherwise.
        """
        args = ["create", "-q", "-f", QCOW2, "-o", "lazy_refcounts=off"]
        if backing is not None:
            rel = os.path.relpath(backing, path.parent)
            args += ["-u", "-b", rel, "-F", QCOW2]
        args += [str(path), str(size_bytes)]
        self._run(args, what=f"create {path.name}")

    def resize(self, path: Path, size_bytes: int) -> None:
        """Grow a closed image to ``size_bytes``.

        :raises ImageError: qemu-img failed.
        """
        self._run(["resize", "-q", "-f", QCOW2, str(path), str(size_bytes)],
                  what=f"resize {path.name}")

    def commit(self, top: Path, base: Path) -> None:
        """Write the clusters of ``top`` into its direct backing ``base``
        without emptying ``top`` (``-d``): afterwards both read the same.

        :raises ImageError: qemu-img failed.
        """
        self._run(["commit", "-q", "-f", QCOW2, "-d", "-b", str(base), str(top)],
                  what=f"commit {top.name} into {base.name}")

    def rebase(self, image: Path, new_backing: Path | None) -> None:
        """Safe rebase: copy into ``image`` every cluster where its current
        view differs from the view over ``new_backing`` (``None`` flattens),
        then repoint its header.  The image reads the same before, during
        and after; an interrupted rebase leaves the old header in place.

        :raises ImageError: qemu-img failed.
        """
        args = ["rebase", "-q", "-f", QCOW2]
        if new_backing is None:
            args += ["-b", ""]
        else:
            args += ["-b", os.path.relpath(new_backing, image.parent), "-F", QCOW2]
        self._run(args + [str(image)], what=f"rebase {image.name}")

    def set_backing(self, image: Path, backing: Path) -> None:
        """Unsafe (header-only) rebase: name ``backing`` as the image's
        backing file without comparing data.  Only correct when ``backing``
        reads exactly like the old backing file.

        :raises ImageError: qemu-img failed.
        """
        self._run(["rebase", "-q", "-u", "-f", QCOW2,
                   "-b", os.path.relpath(backing, image.parent), "-F", QCOW2, str(image)],
                  what=f"repoint {image.name}")


def is_enospc(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


# QEMU's image locking (block/file-posix.c): a process that holds a
# permission on an image takes a shared OFD lock on byte 100 + bit; one that
# refuses to share a permission locks byte 200 + bit.  Bit 0 is "consistent
# read", bit 1 "write".  The bytes are the same for qemu-img, QEMU and
# qemu-storage-daemon, so they tell whether anyone has an image open.
_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200
_PERM_CONSISTENT_READ = 0
_PERM_WRITE = 1
_F_OFD_GETLK = 36                     # Linux; absent from Python's fcntl module
_FLOCK = struct.Struct("hh4xqqi4x")   # struct flock on 64-bit Linux


@dataclass(frozen=True)
class ImageLocks:
    """Which of QEMU's image locks some process holds on a file."""

    writer: bool     # someone has it open for writing (a top layer in use)
    reader: bool     # someone reads it, as a top or as a backing layer

    @property
    def in_use(self) -> bool:
        return self.writer or self.reader


def image_locks(path: Path) -> ImageLocks:
    """Probe QEMU's locks on an image without taking any (``F_OFD_GETLK``
    only reports).  A missing file is not in use.  Costs one open and two
    fcntl calls: cheap enough for every cut."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return ImageLocks(False, False)

    def held(byte: int) -> bool:
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
        l_type = _FLOCK.unpack(fcntl.fcntl(fd, _F_OFD_GETLK, probe))[0]
        return bool(l_type != fcntl.F_UNLCK)

    try:
        return ImageLocks(writer=held(_LOCK_PERM_BASE + _PERM_WRITE),
                          reader=held(_LOCK_PERM_BASE + _PERM_CONSISTENT_READ))
    finally:
        os.close(fd)
