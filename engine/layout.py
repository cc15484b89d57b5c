"""Where a pool keeps its files, and how a layer file comes into being.

A pool directory holds ``catalog.db`` (with its WAL files), ``layers/``
with one ``<layer-id>.qcow2`` per layer, and ``.lock``, which one process at
a time holds so that two drivers never manage the same pool.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import uuid
from pathlib import Path

from engine.errors import Busy, InvalidArgument

LAYER_FILE = re.compile(r"^l-[0-9a-f]{32}\.qcow2$")


def default_root() -> Path:
    """``$QSNAP_POOL`` if set; ``/var/lib/qsnap`` for root; else the user's
    state directory (``$XDG_STATE_HOME/qsnap`` or ``~/.local/state/qsnap``)."""
    env = os.environ.get("QSNAP_POOL")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/qsnap")
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "qsnap"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Layout:
    """Paths inside one pool directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.layers = self.root / "layers"
        self.catalog = self.root / "catalog.db"
        self.lockfile = self.root / ".lock"

    def prepare(self) -> None:
        """Create the directories.

        :raises InvalidArgument: the root exists and is not a directory.
        """
        if self.root.exists() and not self.root.is_dir():
            raise InvalidArgument(f"pool root {self.root} is not a directory")
        self.layers.mkdir(parents=True, exist_ok=True)

    def layer_path(self, layer_id: str) -> Path:
        return self.layers / f"{layer_id}.qcow2"

    def temp_path(self, layer_id: str) -> Path:
        return self.layers / f"{layer_id}.qcow2.tmp"

    def layer_files(self) -> set[str]:
        """IDs of the layer files present (temporary files excluded)."""
        return {name[: -len(".qcow2")] for name in os.listdir(self.layers)
                if LAYER_FILE.match(name)}

    def temp_files(self) -> list[Path]:
        return [self.layers / n for n in os.listdir(self.layers) if n.endswith(".qcow2.tmp")]

    def sync_dir(self) -> None:
        fd = os.open(self.layers, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def publish(self, layer_id: str) -> None:
        """Make a finished temporary file the layer's file, durably: its data
        is synced before the rename and the directory after it, so the final
        name exists only for a complete image."""
        tmp = self.temp_path(layer_id)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.layer_path(layer_id))
        self.sync_dir()

    def unlink(self, layer_id: str) -> None:
        """Remove a layer's file and any temporary file; missing is fine."""
        for path in (self.layer_path(layer_id), self.temp_path(layer_id)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


class PoolLock:
    """An exclusive ``flock`` on the pool's lock file for this process's
    lifetime.  The kernel drops it when the process dies, so a crashed
    driver never blocks its successor."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(self._fd, 64).decode(errors="replace").strip()
            os.close(self._fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy(f"pool {path.parent} is in use by another qsnap process"
                           f" (pid {holder or 'unknown'})") from e
            raise
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
