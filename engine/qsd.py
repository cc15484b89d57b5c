"""The one adapter for qemu-storage-daemon (QSD): its process and its QMP.

One QSD serves every volume of a node, so that several volumes can be cut
atomically in one QMP ``transaction``.  This module starts it (or attaches
to one that outlived a previous node plugin), opens each served volume's
chain in it, exports volumes through FUSE, cuts, resizes, streams and
commits, and stops it.  QMP is spoken through the ``qemu.qmp`` library; its
coroutines run on a private event-loop thread, so callers get a synchronous,
thread-safe API.

Rules the code keeps, and why:

* **Every layer is added explicitly.**  A volume's chain is built bottom up
  with ``"backing": <node below>`` (``null`` at the bottom), so QEMU never
  follows a backing name stored in an image header: the catalog says which
  layer backs which, as for ``qemu-img`` (``engine/qemu_img.py``).
* **One node per layer per volume.**  Volumes that share read-only layers
  open them once each; each chain can be torn down on its own.  Node names
  are derived from ``(volume_id, layer_id)``, so after a plugin restart the
  nodes of a volume are found again in a running QSD (QEMU allows at most
  31 characters and a strict alphabet, so the IDs are hashed).
* **The QSD is the truth about what it has open.**  The in-memory chain of
  each volume is a cache for the fast path (a cut is two QMP round trips);
  after a restart :meth:`StorageDaemon.open_chain` adopts the nodes it finds
  and :meth:`StorageDaemon.top_layer` reads the QSD's view.
* **The daemon outlives the plugin.**  It runs in its own session, so a
  killed plugin leaves volumes served; the next plugin attaches through the
  pidfile and the QMP socket.
* **Block jobs always name their base**, because ``block-commit`` without
  one merges the whole chain into the bottom image.

Run directory: ``qmp.sock`` (QMP), ``nbd.sock`` (the NBD server, started
with the first NBD export), ``qsd.pid`` (QEMU's pidfile), ``qsd.log`` (the
daemon's stdout and stderr) and ``exports/<volume-id>`` (where each FUSE
export is mounted: QMP's ``query-block-exports`` does not say, and a stale
mount must be found after the daemon died).

Exports are FUSE files (:meth:`StorageDaemon.export_fuse`) or NBD exports on
the daemon's unix socket (:meth:`StorageDaemon.export_nbd`), one kind per
volume: QEMU 7.2 refuses a writable FUSE export and an NBD export of the same
node side by side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate

from engine.devices import nbd_uri, parse_mountinfo
from engine.errors import (AlreadyExists, Busy, EngineError, FailedPrecondition, ImageError,
                           InvalidArgument, NotFound, OutOfRange)

log = logging.getLogger(__name__)

T = TypeVar("T")

SOCKET = "qmp.sock"
NBD_SOCKET = "nbd.sock"
PIDFILE = "qsd.pid"
LOGFILE = "qsd.log"
EXPORTS = "exports"

# QEMU ids (export, job): a letter, then letters, digits, '-', '.', '_'.
_QEMU_ID = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")
# sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# query-named-block-nodes returns one JSON line that grows with the number of
# nodes and the depth of chains (each node's filename nests its backing
# chain); asyncio's default line limit of 64 KiB is far too small.
_READ_LIMIT = 64 << 20
# Job states in which a job no longer changes anything.
_JOB_CONCLUDED = "concluded"
_JOB_READY = "ready"


# -- errors ------------------------------------------------------------------

class QsdError(ImageError):
    """Base of every failure of the storage daemon or of its QMP."""


class DaemonStartError(QsdError):
    """The daemon could not be started, or a running one could not be
    reached through its QMP socket."""


class DaemonDied(QsdError):
    """The daemon exited, or its QMP connection broke, before a call was
    answered.  Whether the call took effect is unknown: call
    :meth:`StorageDaemon.ensure_running`, then re-open every volume."""


class QmpTimeout(QsdError):
    """QMP did not answer within the timeout.  Whether the command took
    effect is unknown; the daemon may be hung."""


class QmpError(QsdError):
    """QEMU refused a QMP command.

    :ivar qmp_command: the command's name.
    :ivar error_class: QMP's error class (almost always ``GenericError``).
    :ivar desc: QEMU's human-readable description.
    """

    def __init__(self, qmp_command: str, error_class: str, desc: str, *,
                 context: str = "") -> None:
        where = f"{context}: " if context else ""
        super().__init__(f"{where}QMP {qmp_command} failed: {desc} ({error_class})",
                         command=[qmp_command], stderr=desc)
        self.qmp_command = qmp_command
        self.error_class = error_class
        self.desc = desc


class JobFailed(QsdError):
    """A block job (stream, commit) ended with an error; the chain is as it
    was before the job."""

    def __init__(self, message: str, *, job_id: str, error: str) -> None:
        super().__init__(message, command=[job_id], stderr=error)
        self.job_id = job_id
        self.error = error


class TopExported(QmpError):
    """QEMU 7.2 refuses a block job on a volume's top (stream into it, or
    an active commit) while a writable FUSE export holds the top: the export
    keeps the RESIZE permission, which the job's node must not share.  Cut
    first, then merge below the new top."""


class ChainMismatch(QsdError):
    """The daemon has a volume open with another chain than the caller
    expects (for example after a crash in the middle of a cut).

    :ivar expected: layer IDs the caller asked for, top first.
    :ivar found: layer IDs the daemon has open, top first (a layer whose
        file name does not identify it appears as its node name).
    """

    def __init__(self, message: str, *, expected: list[str], found: list[str]) -> None:
        super().__init__(message)
        self.expected = expected
        self.found = found


class VolumeNotOpen(NotFound):
    """The volume has no chain open in this daemon object; open it first
    (after a plugin restart :meth:`StorageDaemon.open_chain` adopts the
    chain a running daemon still has)."""


# -- public records ----------------------------------------------------------

class DaemonState(enum.Enum):
    """This object's view of its daemon."""
    STOPPED = "stopped"      # none started or attached (or detached again)
    STARTING = "starting"    # starting or attaching
    RUNNING = "running"      # QMP connected
    FAILED = "failed"        # the daemon died or its QMP broke: ensure_running()


@dataclass(frozen=True)
class Cut:
    """One volume's part of an atomic cut: ``new_path`` is an existing empty
    overlay (``qcow2.write_image``) whose header names the volume's current
    top as its backing file."""
    volume_id: str
    new_layer_id: str
    new_path: Path


def node_name(volume_id: str, layer_id: str) -> str:
    """The QEMU node name of one layer of one volume.

    25 characters: ``n``, 12 hex digits of the volume's hash (so the nodes
    of a volume can be listed by prefix) and 12 of the pair's hash.
    """
    return _volume_prefix(volume_id) + _digest(volume_id + "\0" + layer_id)


def _volume_prefix(volume_id: str) -> str:
    return "n" + _digest(volume_id)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:12]


def _check_volume_id(volume_id: str) -> None:
    # The volume ID is also the export's ID and part of job IDs, which QEMU
    # restricts; engine volume IDs (v-<hex>) always qualify.
    if not _QEMU_ID.match(volume_id):
        raise InvalidArgument(f"volume ID {volume_id!r} cannot name a QEMU export")


def _check_layer_id(layer_id: str) -> None:
    if not layer_id or "\0" in layer_id or "/" in layer_id:
        raise InvalidArgument(f"layer ID {layer_id!r} is not valid")


# -- internal records ----------------------------------------------------------

@dataclass(frozen=True)
class _Layer:
    layer_id: str
    path: Path
    node: str


@dataclass
class _Volume:
    volume_id: str
    layers: list[_Layer]     # top first
    read_only: bool
    # Overlay nodes added ahead of a cut (prepare_cut), by layer ID: in the
    # daemon, not yet in the chain.
    prepared: dict[str, _Layer] = field(default_factory=dict)

    @property
    def top(self) -> _Layer:
        return self.layers[0]

    def index(self, layer_id: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.layer_id == layer_id:
                return i
        raise NotFound(f"volume {self.volume_id}: layer {layer_id} is not in its open chain")


@dataclass(frozen=True)
class _Node:
    """One format node as ``query-named-block-nodes`` reports it."""
    name: str
    filename: str            # QEMU's filename for the node (``json:{...}`` when
                             # its backing is not the header's)
    backing: str | None      # the backing node's filename
    path: Path | None        # the image file
    read_only: bool


@dataclass(frozen=True)
class _ExportRecord:
    path: Path
    writable: bool
    created: bool            # export_fuse created the mount-point file


class _Process:
    """The daemon's process: our child, or one found through the pidfile."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.popen = popen

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None      # also reaps our child
        return _pid_alive(self.pid)

    def describe_exit(self) -> str:
        if self.popen is not None and self.popen.returncode is not None:
            code = self.popen.returncode
            return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return "exited"


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a killed daemon that is not
    our child stays a zombie until its parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    # The state follows the parenthesised command name, which may contain ')'.
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


class _LoopThread:
    """A private asyncio event loop on its own thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait for its result.

        :raises concurrent.futures.TimeoutError: no result in ``timeout``
            seconds (the coroutine is cancelled).
        """
        # Waiting for the loop from the loop's own thread would deadlock.
        assert threading.current_thread() is not self.thread
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
        self.loop.close()


class _VolumeLocks:
    """A lock per volume, taken with a deadline: a block job holds its
    volume's lock for its whole run, and a cut must not wait for it forever."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def hold(self, volume_ids: Sequence[str], timeout: float) -> Iterator[None]:
        """Hold every volume's lock (taken in sorted order: no deadlock).

        :raises Busy: a lock was not free within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        taken: list[threading.Lock] = []
        try:
            for volume_id in sorted(set(volume_ids)):
                with self._guard:
                    lock = self._locks.setdefault(volume_id, threading.Lock())
                if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    raise Busy(f"volume {volume_id} is busy (a block job or another call"
                               f" holds it); retry later")
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()


# -- mounts ------------------------------------------------------------------

def fuse_mounts() -> set[Path]:
    """Mount points of FUSE file systems in this process's mount namespace."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        mounts = parse_mountinfo(f.read())
    return {Path(m.mount_point) for m in mounts if m.fs_type.startswith("fuse")}


def is_dead_mount(path: Path) -> bool:
    """Whether ``path`` is a FUSE mount whose daemon is gone."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def _lazy_unmount(path: Path) -> None:
    """Detach a (typically dead) FUSE mount.  Lazy, because a loop device or
    an open descriptor may still hold the dead file."""
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    commands = ([[fusermount, "-u", "-z", str(path)]] if fusermount else []) + \
        [["umount", "-l", str(path)]]
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode == 0:
            return
        log.debug("%s: %s", " ".join(command), done.stderr.strip())
    if path in fuse_mounts():
        raise QsdError(f"cannot unmount the stale FUSE export at {path}")


# -- the daemon --------------------------------------------------------------

class StorageDaemon:
    """The node's qemu-storage-daemon and its QMP.

    All methods are synchronous and thread-safe; calls on different volumes
    run in parallel, calls on one volume are serialised.  Unless a method
    says otherwise it can raise :class:`DaemonDied`, :class:`QmpTimeout`
    and :class:`QmpError` (QEMU refused), and :class:`DaemonDied` if the
    daemon is not running (call :meth:`ensure_running` first).

    :param run_dir: holds ``qmp.sock``, ``qsd.pid``, ``qsd.log`` and the
        export records; created if missing.  Keep it short: a unix socket
        path has at most 107 bytes.
    :param binary: the qemu-storage-daemon executable (``PATH`` by default).
    :param timeout: seconds a QMP call (and waiting for a volume that
        another call holds) may take.
    :param start_timeout: seconds to wait for a new daemon's QMP socket.
    :param stop_timeout: seconds ``stop`` waits after ``quit`` before it
        kills the daemon.
    :param job_timeout: seconds a stream or commit job may run before it is
        cancelled (None: no limit).
    """

    def __init__(self, run_dir: Path, *, binary: str | None = None, timeout: float = 30.0,
                 start_timeout: float = 10.0, stop_timeout: float = 10.0,
                 job_timeout: float | None = None) -> None:
        self.run_dir = Path(os.path.abspath(run_dir))
        self.socket = self.run_dir / SOCKET
        self.nbd_socket = self.run_dir / NBD_SOCKET
        self.pidfile = self.run_dir / PIDFILE
        self.logfile = self.run_dir / LOGFILE
        self.records = self.run_dir / EXPORTS
        if len(os.fsencode(self.socket)) > _MAX_SOCKET_PATH:
            raise InvalidArgument(f"QMP socket path {self.socket} is longer than"
                                  f" {_MAX_SOCKET_PATH} bytes; use a shorter run directory")
        self.binary = binary or shutil.which("qemu-storage-daemon") or ""
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.job_timeout = job_timeout

        self._state = DaemonState.STOPPED
        self._process: _Process | None = None
        self._client: QMPClient | None = None
        # _life serialises start, attach, stop; _guard protects the small
        # shared fields (state, client, volumes) for short moments only.
        self._life = threading.Lock()
        self._guard = threading.Lock()
        self._volumes: dict[str, _Volume] = {}
        self._locks = _VolumeLocks()
        self._loop = _LoopThread(f"qsd-qmp:{self.run_dir.name}")

    # -- life cycle ------------------------------------------------------

    @property
    def state(self) -> DaemonState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def alive(self) -> bool:
        """Whether the daemon runs and its QMP connection is up.  A daemon
        found dead moves the state to FAILED.  Never raises."""
        with self._guard:
            if self._state is not DaemonState.RUNNING:
                return False
            process, client = self._process, self._client
        ok = (process is not None and process.alive() and client is not None
              and client.runstate is Runstate.RUNNING)
        if not ok:
            self._mark_failed("found dead")
        return ok

    def ensure_running(self) -> bool:
        """Make sure a daemon serves this run directory.

        Attaches to a live daemon found through the pidfile (one that
        outlived the previous node plugin), else starts a new one.

        :returns: True if a new daemon was started: nothing is open in it,
            and the caller must re-open and re-export every served volume.
            False if the daemon was already running or was attached to.
        :raises DaemonStartError: the binary is missing, the daemon exited
            at start, or a running daemon's QMP socket does not answer (it is
            left running: :meth:`stop` kills it).
        """
        with self._life:
            if self.alive():
                return False
            self._drop_client()
            pid = self._pid_from_file()
            with self._guard:
                self._state = DaemonState.STARTING
            try:
                if pid is not None:
                    self._attach(pid)
                    return False
                self._start()
                return True
            except BaseException:
                with self._guard:
                    self._state = DaemonState.FAILED
                self._drop_client()
                raise

    def _attach(self, pid: int) -> None:
        try:
            client = self._connect(self.timeout)
        except DaemonStartError as e:
            raise DaemonStartError(
                f"qemu-storage-daemon (pid {pid}) runs for {self.run_dir} but its QMP socket"
                f" does not answer ({e}); is another client connected? stop() kills it") from e
        with self._guard:
            self._client = client
            self._process = _Process(pid)
            self._state = DaemonState.RUNNING
        log.info("attached to qemu-storage-daemon pid %d (%s)", pid, self.run_dir)

    def _start(self) -> None:
        if not self.binary:
            raise DaemonStartError("qemu-storage-daemon is not installed"
                                   " (Debian package qemu-system-common)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()
        with self._guard:
            self._volumes.clear()
        # QEMU option values escape ',' by doubling it.
        sock = str(self.socket).replace(",", ",,")
        argv = [self.binary,
                "--chardev", f"socket,id=qmp,path={sock},server=on,wait=off",
                "--monitor", "chardev=qmp",
                "--pidfile", str(self.pidfile)]
        with open(self.logfile, "ab") as logf:
            # Its own session: a signal to the plugin's process group (or the
            # plugin's death) must not take the served volumes down with it.
            try:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, cwd="/",
                                         start_new_session=True,
                                         env={**os.environ, "LC_ALL": "C"})
            except OSError as e:
                raise DaemonStartError(f"cannot run {self.binary}: {e}", command=argv) from e
        process = _Process(popen.pid, popen)
        deadline = time.monotonic() + self.start_timeout
        try:
            while not self.socket.exists():
                if not process.alive():
                    raise DaemonStartError(f"qemu-storage-daemon {process.describe_exit()} at"
                                           f" start: {self._log_tail()}")
                if time.monotonic() > deadline:
                    raise DaemonStartError(f"qemu-storage-daemon did not open {self.socket} in"
                                           f" {self.start_timeout:.0f}s: {self._log_tail()}")
                time.sleep(0.005)
            # The socket file appears at bind(), a moment before listen():
            # a connection refused in between is retried until the deadline.
            while True:
                try:
                    client = self._connect(max(0.5, deadline - time.monotonic()))
                    break
                except DaemonStartError:
                    if not process.alive() or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        except BaseException:
            _kill(process)
            raise
        with self._guard:
            self._process = process
            self._client = client
            self._state = DaemonState.RUNNING
        log.info("started qemu-storage-daemon pid %d (%s)", popen.pid, self.run_dir)

    def _connect(self, timeout: float) -> QMPClient:
        """Connect and negotiate capabilities.

        :raises DaemonStartError: no answer in ``timeout`` seconds.
        """
        async def connect() -> QMPClient:
            client = QMPClient(f"qsd:{self.run_dir.name}", readbuflen=_READ_LIMIT)
            await asyncio.wait_for(client.connect(str(self.socket)), timeout)
            return client

        try:
            return self._loop.run(connect(), timeout + 5)
        except (QMPError, OSError, asyncio.TimeoutError,
                concurrent.futures.TimeoutError) as e:
            raise DaemonStartError(f"cannot connect to {self.socket}: {e!r}") from e

    def stop(self) -> None:
        """Stop the daemon: ``quit`` through QMP, wait, kill after
        ``stop_timeout``.  Also stops a daemon this object never attached to
        but that the pidfile names.  Afterwards no process, FUSE mount,
        socket or pidfile is left.  Never raises for a daemon that is
        already gone.

        :raises QsdError: a stale FUSE mount cannot be removed.
        """
        with self._life:
            process = self._process
            if process is None:
                pid = self._pid_from_file()
                process = _Process(pid) if pid is not None else None
            client = self._client
            if client is not None and process is not None and process.alive():
                try:
                    self._execute(client, "quit", None, min(self.timeout, self.stop_timeout))
                except DaemonDied:
                    pass                # it hung up before answering: it is quitting
                except QsdError as e:
                    log.warning("qemu-storage-daemon did not take quit: %s", e)
            if process is not None:
                deadline = time.monotonic() + self.stop_timeout
                while process.alive() and time.monotonic() < deadline:
                    time.sleep(0.01)
                if process.alive():
                    log.warning("qemu-storage-daemon pid %d ignored quit; killing it", process.pid)
                    _kill(process)
            self._drop_client()
            self._clean_leftovers()
            with self._guard:
                self._process = None
                self._volumes.clear()
                self._state = DaemonState.STOPPED
            if process is not None:
                log.info("stopped qemu-storage-daemon pid %d (%s)", process.pid, self.run_dir)

    def detach(self) -> None:
        """Close the QMP connection and leave the daemon running (what a
        plugin that exits does): a new object attaches to it.  Never raises."""
        with self._life:
            self._drop_client()
            with self._guard:
                self._process = None
                self._volumes.clear()
                self._state = DaemonState.STOPPED

    def close(self) -> None:
        """Detach and end the event-loop thread; the object is unusable
        afterwards.  The daemon keeps running (see :meth:`stop`)."""
        self.detach()
        self._loop.close()

    def __enter__(self) -> StorageDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drop_client(self) -> None:
        with self._guard:
            client, self._client = self._client, None
        if client is None:
            return

        async def disconnect() -> None:
            with contextlib.suppress(Exception):
                await client.disconnect()

        with contextlib.suppress(Exception):
            self._loop.run(disconnect(), 5)

    def _pid_from_file(self) -> int | None:
        """The pid in the pidfile if it names a live daemon serving this run
        directory (a recycled pid must not be attached to or killed)."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            return None
        sock = str(self.socket).replace(",", ",,").encode()
        if (argv and b"qemu-storage-daemon" in os.path.basename(argv[0])
                and any(b"path=" + sock + b"," in arg for arg in argv) and _pid_alive(pid)):
            return pid
        return None

    def _clean_leftovers(self) -> None:
        """What a dead daemon leaves: FUSE mounts that answer ENOTCONN,
        export records, the socket and the pidfile."""
        mounted = fuse_mounts()
        for volume_id, record in self._records().items():
            if record.path in mounted:
                log.info("volume %s: removing the stale FUSE mount %s", volume_id, record.path)
                _lazy_unmount(record.path)
            if record.created:
                with contextlib.suppress(FileNotFoundError):
                    record.path.unlink()
            self._drop_record(volume_id)
        for path in (self.socket, self.nbd_socket, self.pidfile):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _log_tail(self, limit: int = 2000) -> str:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                return f.read().decode(errors="replace").strip() or "(empty log)"
        except FileNotFoundError:
            return "(no log)"

    def _mark_failed(self, why: str) -> None:
        with self._guard:
            if self._state is not DaemonState.RUNNING:
                return
            self._state = DaemonState.FAILED
            self._volumes.clear()
        log.error("qemu-storage-daemon (%s) %s", self.run_dir, why)

    # -- QMP -------------------------------------------------------------

    def _execute(self, client: QMPClient, command: str, arguments: dict[str, Any] | None,
                 timeout: float, context: str = "") -> Any:
        async def execute() -> Any:
            return await asyncio.wait_for(client.execute(command, arguments), timeout)

        try:
            return self._loop.run(execute(), timeout + 5)
        except ExecuteError as e:
            raise QmpError(command, e.error_class, str(e), context=context) from e
        except (asyncio.TimeoutError, concurrent.futures.TimeoutError) as e:
            raise QmpTimeout(f"{context + ': ' if context else ''}QMP {command} got no answer"
                             f" in {timeout:.0f}s", command=[command]) from e
        except (ExecInterruptedError, QMPError, EOFError, OSError) as e:
            # The connection broke: the daemon died (the usual case) or
            # closed the socket.  qemu.qmp cannot tell whether the command ran.
            process = self._process
            if process is None:
                why = "is not attached"
            elif _wait_dead(process, 1.0):
                why = process.describe_exit()
            else:
                why = "lost its QMP connection"
            if command != "quit":
                self._mark_failed(why)
            raise DaemonDied(f"{context + ': ' if context else ''}qemu-storage-daemon {why}"
                             f" during {command}: {self._log_tail(500)}",
                             command=[command]) from e

    def qmp(self, command: str, arguments: dict[str, Any] | None = None, *,
            timeout: float | None = None, context: str = "") -> Any:
        """Run one QMP command and return its ``return`` value.  For
        commands this class has no method for (queries, debugging).

        :raises DaemonDied: the daemon is not running or died.
        :raises QmpTimeout: no answer in ``timeout`` (default: the object's).
        :raises QmpError: QEMU refused the command.
        """
        with self._guard:
            state, client = self._state, self._client
        if state is not DaemonState.RUNNING or client is None:
            raise DaemonDied(f"{context + ': ' if context else ''}qemu-storage-daemon for"
                             f" {self.run_dir} is {state.value}; call ensure_running()",
                             command=[command])
        log.debug("QMP %s %s", command, arguments or "")
        return self._execute(client, command, arguments, timeout or self.timeout, context)

    # -- discovering what the daemon has open ----------------------------

    def _nodes(self, volume_id: str) -> dict[str, _Node]:
        """The volume's format nodes in the daemon, by name."""
        prefix = _volume_prefix(volume_id)
        found: dict[str, _Node] = {}
        for raw in self.qmp("query-named-block-nodes", {"flat": True}, context=f"volume {volume_id}"):
            name = raw.get("node-name", "")
            if name.startswith(prefix) and len(name) == 25 and raw.get("drv") == "qcow2":
                filename = raw.get("file", "")
                found[name] = _Node(name, filename, raw.get("backing_file"),
                                    _image_path(filename), bool(raw.get("ro")))
        return found

    def _export_node(self, volume_id: str) -> str | None:
        export = self._export(volume_id)
        return str(export.get("node-name")) if export is not None else None

    def _export(self, volume_id: str) -> dict[str, Any] | None:
        """The volume's export as ``query-block-exports`` reports it
        (``type`` is ``fuse`` or ``nbd``)."""
        for export in self.qmp("query-block-exports", context=f"volume {volume_id}"):
            if export.get("id") == volume_id:
                return dict(export)
        return None

    def _daemon_chain(self, volume_id: str, prefer: frozenset[str] = frozenset()
                      ) -> tuple[list[_Node], list[_Node]]:
        """The volume's chain as the daemon has it (top first) and its other
        nodes ("strays", such as an overlay a failed cut could not remove).

        The top is the exported node if there is an export, else, among the
        nodes that no other node of the volume uses as backing, the one
        whose chain has the most nodes named in ``prefer``, then the longest.
        Nodes are linked by QEMU's filenames: a node's ``backing_file`` is
        its backing node's ``file``.
        """
        nodes = self._nodes(volume_id)
        if not nodes:
            return [], []
        by_filename = {n.filename: n for n in nodes.values()}

        def walk(top: _Node) -> list[_Node]:
            chain = [top]
            while chain[-1].backing in by_filename and len(chain) <= len(nodes):
                chain.append(by_filename[chain[-1].backing])
            return chain

        exported = self._export_node(volume_id)
        if exported in nodes:
            chain = walk(nodes[exported])
        else:
            used = {by_filename[n.backing].name for n in nodes.values() if n.backing in by_filename}
            roots = sorted((n for n in nodes.values() if n.name not in used), key=lambda n: n.name)
            chain = max((walk(r) for r in roots), default=[],
                        key=lambda c: (sum(n.name in prefer for n in c), len(c)))
        on_chain = {n.name for n in chain}
        return chain, [n for n in nodes.values() if n.name not in on_chain]

    def _layer_of(self, volume_id: str, node: _Node) -> str:
        """The layer ID of a node: from this object's chain if known, else the
        image's file name (``<layer-id>.qcow2``, as in ``engine/layout.py``)
        if it hashes to the node's name, else the node name itself."""
        volume = self._volumes.get(volume_id)
        if volume is not None:
            for layer in volume.layers:
                if layer.node == node.name:
                    return layer.layer_id
        if node.path is not None:
            candidate = node.path.name.removesuffix(".qcow2")
            if node_name(volume_id, candidate) == node.name:
                return candidate
        return node.name

    def top_layer(self, volume_id: str) -> str | None:
        """The layer the daemon serves as the volume's top (its export's
        node, else the top of its open chain), read from the daemon itself:
        after a crash in the middle of a cut it says which side the daemon
        is on.

        :returns: the layer ID, or None if the daemon has nothing of the
            volume open.
        """
        _check_volume_id(volume_id)
        chain, _ = self._daemon_chain(volume_id)
        return self._layer_of(volume_id, chain[0]) if chain else None

    def chain(self, volume_id: str) -> list[str]:
        """The volume's open chain (layer IDs, top first) as this object
        knows it.

        :raises VolumeNotOpen: the volume is not open here.
        """
        return [layer.layer_id for layer in self._volume(volume_id).layers]

    def _volume(self, volume_id: str) -> _Volume:
        _check_volume_id(volume_id)
        with self._guard:
            volume = self._volumes.get(volume_id)
        if volume is None:
            raise VolumeNotOpen(f"volume {volume_id} is not open in the storage daemon")
        return volume

    # -- chains ----------------------------------------------------------

    def _add_node(self, volume_id: str, layer: _Layer, backing: str | None, *,
                  read_only: bool) -> None:
        options: dict[str, Any] = {
            "driver": "qcow2", "node-name": layer.node, "read-only": read_only,
            "file": {"driver": "file", "filename": str(layer.path)},
            # Explicit, so that QEMU never opens the backing file named in
            # the header: the caller's chain is the truth.
            "backing": backing,
        }
        if not read_only:
            # Let a workload's discard free clusters of its own layer.
            options["discard"] = "unmap"
        self.qmp("blockdev-add", options,
                 context=f"volume {volume_id}: open layer {layer.layer_id}")

    def _del_nodes(self, volume_id: str, names: Sequence[str], *, strict: bool) -> None:
        """blockdev-del in the given order (parents before their backing);
        a node that is already gone is fine.  With ``strict`` false, other
        failures are logged instead of raised (cleanup after a failure)."""
        for name in names:
            try:
                self.qmp("blockdev-del", {"node-name": name}, context=f"volume {volume_id}")
            except QsdError as e:
                if isinstance(e, QmpError) and "Failed to find node" in e.desc:
                    continue
                if strict:
                    raise
                log.warning("volume %s: cannot remove node %s: %s", volume_id, name, e)

    def open_chain(self, volume_id: str, chain: Sequence[tuple[str, Path]], *,
                   read_only: bool) -> str:
        """Open a volume's chain in the daemon.

        Each layer becomes a node added from the bottom up with its backing
        node named explicitly; the top is writable unless ``read_only``, the
        layers below are read-only.  Idempotent: if the chain is open (in
        this object, or in a daemon this object attached to) it is adopted;
        a partly opened chain is completed.

        :param chain: ``[(layer_id, path)]``, top first.
        :returns: the top's node name.
        :raises InvalidArgument: an empty chain, a layer twice, a bad ID.
        :raises ChainMismatch: the volume is open with another chain (see
            :meth:`top_layer`; :meth:`close_chain` clears it).
        :raises QmpError: QEMU cannot open a layer (nothing stays open).
        """
        _check_volume_id(volume_id)
        if not chain:
            raise InvalidArgument(f"volume {volume_id}: an empty chain cannot be opened")
        wanted = []
        for layer_id, path in chain:
            _check_layer_id(layer_id)
            wanted.append(_Layer(layer_id, Path(os.path.abspath(path)),
                                 node_name(volume_id, layer_id)))
        if len({layer.layer_id for layer in wanted}) != len(wanted):
            raise InvalidArgument(f"volume {volume_id}: a layer appears twice in its chain")
        wanted_ids = [layer.layer_id for layer in wanted]

        with self._locks.hold([volume_id], self.timeout):
            with self._guard:
                known = self._volumes.get(volume_id)
            if known is not None:
                if known.layers == wanted and known.read_only == read_only:
                    return known.top.node
                raise ChainMismatch(
                    f"volume {volume_id} is open with layers {self.chain(volume_id)}"
                    f" ({'read-only' if known.read_only else 'writable'}), not {wanted_ids}",
                    expected=wanted_ids, found=self.chain(volume_id))

            # Adopt what a running daemon already has (plugin restart), and
            # drop what an interrupted call left dangling.
            found, strays = self._daemon_chain(volume_id,
                                               frozenset(layer.node for layer in wanted))
            orphans = _top_down([n for n in strays if n.name not in {w.node for w in wanted}])
            if orphans:
                log.warning("volume %s: removing stray nodes %s", volume_id, orphans)
                self._del_nodes(volume_id, orphans, strict=False)
            present = len(found)
            if present:
                matches = ([n.name for n in found] == [w.node for w in wanted[-present:]]
                           and all(n.path == w.path for n, w in zip(found, wanted[-present:]))
                           and (present < len(wanted) or found[0].read_only == read_only))
                if not matches:
                    found_ids = [self._layer_of(volume_id, n) for n in found]
                    raise ChainMismatch(
                        f"volume {volume_id}: the storage daemon has layers {found_ids} open,"
                        f" the caller asks for {wanted_ids} ({'read-only' if read_only else 'writable'})",
                        expected=wanted_ids, found=found_ids)
                log.info("volume %s: adopting %d open layer(s) from the storage daemon",
                         volume_id, present)

            added: list[str] = []
            try:
                for i in range(len(wanted) - present - 1, -1, -1):
                    below = wanted[i + 1].node if i + 1 < len(wanted) else None
                    self._add_node(volume_id, wanted[i], below, read_only=read_only or i > 0)
                    added.append(wanted[i].node)
            except BaseException:
                self._del_nodes(volume_id, list(reversed(added)), strict=False)
                raise
            with self._guard:
                self._volumes[volume_id] = _Volume(volume_id, wanted, read_only)
            if added:
                log.info("volume %s: opened %s (%s)", volume_id, wanted_ids,
                         "read-only" if read_only else "writable")
            return wanted[0].node

    def close_chain(self, volume_id: str) -> None:
        """Remove the volume's export (if any), then its nodes from the top
        down.  Works from the daemon's own view, so it also closes a chain
        this object never opened.  Idempotent.

        :raises QmpError: QEMU refuses (for example a block job runs).
        """
        _check_volume_id(volume_id)
        with self._locks.hold([volume_id], self.timeout):
            self._unexport(volume_id)
            chain, strays = self._daemon_chain(volume_id)
            self._del_nodes(volume_id, _top_down(strays + chain), strict=True)
            with self._guard:
                self._volumes.pop(volume_id, None)
            if chain or strays:
                log.info("volume %s: closed %d node(s)", volume_id, len(chain) + len(strays))

    # -- exports ---------------------------------------------------------

    def _record_path(self, volume_id: str) -> Path:
        return self.records / volume_id

    def _records(self) -> dict[str, _ExportRecord]:
        found: dict[str, _ExportRecord] = {}
        try:
            names = os.listdir(self.records)
        except FileNotFoundError:
            return found
        for name in names:
            if name.endswith(".tmp"):
                continue
            try:
                raw = json.loads((self.records / name).read_text())
                found[name] = _ExportRecord(Path(raw["path"]), bool(raw["writable"]),
                                            bool(raw["created"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring unreadable export record %s: %s", name, e)
        return found

    def _write_record(self, volume_id: str, record: _ExportRecord) -> None:
        self.records.mkdir(parents=True, exist_ok=True)
        tmp = self.records / f"{volume_id}.tmp"
        tmp.write_text(json.dumps({"path": str(record.path), "writable": record.writable,
                                   "created": record.created}))
        os.replace(tmp, self._record_path(volume_id))

    def _drop_record(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._record_path(volume_id).unlink()

    def export_fuse(self, volume_id: str, path: Path, *, writable: bool) -> None:
        """Export the volume's top node as a raw image at ``path`` through
        FUSE.  ``path`` must be a regular file or missing (then it is created,
        and removed again by :meth:`unexport`); a dead mount left there by a
        killed daemon is removed first.  After a cut the export follows the
        new top by itself.  Idempotent.

        :raises VolumeNotOpen: the volume's chain is not open.
        :raises InvalidArgument: a writable export of a read-only chain, or
            ``path`` is not a regular file.
        :raises AlreadyExists: the volume is exported elsewhere or otherwise.
        """
        path = Path(os.path.abspath(path))
        with self._locks.hold([volume_id], self.timeout):
            volume = self._volume(volume_id)
            if writable and volume.read_only:
                raise InvalidArgument(f"volume {volume_id} is open read-only; it cannot be"
                                      f" exported writable")
            if self._export_node(volume_id) is not None:
                record = self._records().get(volume_id)
                if record is not None and record.path == path and record.writable == writable:
                    return
                where = f"at {record.path} ({'writable' if record.writable else 'read-only'})" \
                    if record else "(unknown path)"
                raise AlreadyExists(f"volume {volume_id} is already exported {where}")
            if is_dead_mount(path):
                # Left by a killed daemon; a live mount (another export) is
                # left alone and QEMU refuses to mount over it.
                log.info("volume %s: removing the stale FUSE mount %s", volume_id, path)
                _lazy_unmount(path)
            created = False
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.close(fd)
                created = True
            except FileExistsError:
                if not path.is_file():
                    raise InvalidArgument(f"FUSE export target {path} is not a regular file")
            # Recorded before the export exists, so that a crash right after
            # block-export-add still leaves a record of the mount to clean.
            self._write_record(volume_id, _ExportRecord(path, writable, created))
            try:
                self.qmp("block-export-add", {
                    "type": "fuse", "id": volume_id, "node-name": volume.top.node,
                    "mountpoint": str(path), "writable": writable, "growable": False,
                }, context=f"volume {volume_id}: export at {path}")
            except BaseException:
                self._drop_record(volume_id)
                if created:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                raise
            log.info("volume %s: exported %s at %s", volume_id,
                     "writable" if writable else "read-only", path)

    def nbd_uri(self, volume_id: str) -> str:
        """The NBD URI of the volume's export (``nbd+unix:///<volume-id>?socket=``),
        as ``qemu-io``, ``qemu-img`` and :func:`parse_nbd_uri` take it."""
        _check_volume_id(volume_id)
        return nbd_uri(self.nbd_socket, volume_id)

    def _ensure_nbd_server(self) -> None:
        """Start the daemon's NBD server on ``nbd.sock`` unless it runs
        (it survives a plugin restart with the daemon; QMP has no query for
        it, so "already running" is the answer that it does)."""
        try:
            self.qmp("nbd-server-start",
                     {"addr": {"type": "unix", "data": {"path": str(self.nbd_socket)}}},
                     context="start the NBD server")
        except QmpError as e:
            if "already running" not in e.desc:
                raise
            return
        log.info("NBD server listening on %s", self.nbd_socket)

    def export_nbd(self, volume_id: str, *, writable: bool) -> str:
        """Export the volume's top node over NBD, named after the volume, on
        the daemon's unix socket (started with the first NBD export), and
        return the export's URI (:meth:`nbd_uri`).  After a cut the export
        follows the new top by itself, as a FUSE export does.  Idempotent.

        A volume has one export: QEMU 7.2 refuses an NBD export next to a
        writable FUSE export of the same node.  An existing NBD export is
        taken as it is: QMP does not report whether it is writable (the node
        exports writable and makes read-only devices read-only on its side).

        :raises VolumeNotOpen: the volume's chain is not open.
        :raises InvalidArgument: a writable export of a read-only chain.
        :raises AlreadyExists: the volume is exported through FUSE.
        """
        with self._locks.hold([volume_id], self.timeout):
            volume = self._volume(volume_id)
            if writable and volume.read_only:
                raise InvalidArgument(f"volume {volume_id} is open read-only; it cannot be"
                                      f" exported writable")
            existing = self._export(volume_id)
            if existing is not None:
                if existing.get("type") == "nbd":
                    return self.nbd_uri(volume_id)
                raise AlreadyExists(f"volume {volume_id} is already exported through"
                                    f" {existing.get('type')}")
            self._ensure_nbd_server()
            self.qmp("block-export-add", {
                "type": "nbd", "id": volume_id, "node-name": volume.top.node,
                "name": volume_id, "writable": writable,
            }, context=f"volume {volume_id}: NBD export")
            log.info("volume %s: exported %s over NBD at %s", volume_id,
                     "writable" if writable else "read-only", self.nbd_uri(volume_id))
            return self.nbd_uri(volume_id)

    def nbd_exports(self) -> dict[str, str]:
        """The daemon's NBD exports: volume ID -> URI."""
        return {str(e.get("id")): self.nbd_uri(str(e.get("id")))
                for e in self.qmp("query-block-exports")
                if e.get("type") == "nbd" and not e.get("shutting-down")}

    def unexport(self, volume_id: str) -> None:
        """Remove the volume's export: FUSE (and the file ``export_fuse``
        created) or NBD.  Idempotent.

        Removing a FUSE export unmounts it at once even if the file is open:
        a loop device on it must be detached first, or its I/O fails with
        ENOTCONN.  An NBD export is removed only once no client is connected
        (``block-export-del`` in its safe mode): disconnect the kernel's NBD
        devices first.
        """
        _check_volume_id(volume_id)
        with self._locks.hold([volume_id], self.timeout):
            self._unexport(volume_id)

    def _unexport(self, volume_id: str) -> None:
        if self._export_node(volume_id) is not None:
            try:
                self.qmp("block-export-del", {"id": volume_id}, context=f"volume {volume_id}")
            except QmpError as e:
                if "not found" not in e.desc:
                    raise
            # Deletion is asynchronous in QEMU ("shutting-down"): wait until
            # the export is gone so that a new one may take the same path.
            deadline = time.monotonic() + self.timeout
            while self._export_node(volume_id) is not None:
                if time.monotonic() > deadline:
                    raise QmpTimeout(f"volume {volume_id}: the export did not go away in"
                                     f" {self.timeout:.0f}s")
                time.sleep(0.01)
            log.info("volume %s: export removed", volume_id)
        record = self._records().get(volume_id)
        if record is not None:
            if record.path in fuse_mounts():
                _lazy_unmount(record.path)
            if record.created:
                with contextlib.suppress(FileNotFoundError):
                    record.path.unlink()
            self._drop_record(volume_id)

    def exports(self) -> dict[str, Path]:
        """The daemon's FUSE exports: volume ID -> mount point (NBD exports:
        :meth:`nbd_exports`)."""
        records = self._records()
        found: dict[str, Path] = {}
        for export in self.qmp("query-block-exports"):
            volume_id = str(export.get("id"))
            if export.get("shutting-down") or export.get("type") != "fuse":
                continue
            if volume_id in records:
                found[volume_id] = records[volume_id].path
            else:
                log.warning("export %s has no record of its mount point", volume_id)
        return found

    # -- cuts ------------------------------------------------------------

    def _check_cuts(self, cuts: Sequence[Cut]) -> list[str]:
        if not cuts:
            raise InvalidArgument("a cut needs at least one volume")
        volume_ids = [c.volume_id for c in cuts]
        if len(set(volume_ids)) != len(volume_ids):
            raise InvalidArgument("a volume appears twice in one cut")
        for c in cuts:
            _check_volume_id(c.volume_id)
            _check_layer_id(c.new_layer_id)
        return volume_ids

    def prepare_cut(self, cuts: Sequence[Cut]) -> None:
        """Add the cuts' overlay nodes now, so that :meth:`cut` is one QMP
        ``transaction`` (and a guest frozen around it waits for that only).
        Changes nothing the volumes serve.  :meth:`abandon_cut` removes the
        nodes again if the cut does not follow.

        :raises InvalidArgument: no cuts, a volume twice, a bad ID.
        :raises VolumeNotOpen: a volume is not open.
        :raises Busy: a volume is held by a block job past the timeout.
        :raises QmpError: QEMU cannot open an overlay (none stays added).
        """
        volume_ids = self._check_cuts(cuts)
        with self._locks.hold(volume_ids, self.timeout):
            volumes = [self._volume(c.volume_id) for c in cuts]
            added: list[tuple[str, str]] = []
            try:
                for c, volume in zip(cuts, volumes):
                    if volume.read_only or c.new_layer_id in volume.prepared:
                        continue        # cut() reports a read-only volume
                    overlay = _Layer(c.new_layer_id, Path(os.path.abspath(c.new_path)),
                                     node_name(c.volume_id, c.new_layer_id))
                    self._add_overlay(c.volume_id, overlay)
                    added.append((c.volume_id, overlay.node))
                    with self._guard:
                        volume.prepared[c.new_layer_id] = overlay
            except BaseException:
                for (volume_id, node), volume in zip(added, volumes):
                    self._del_nodes(volume_id, [node], strict=False)
                with self._guard:
                    for c, volume in zip(cuts, volumes):
                        volume.prepared.pop(c.new_layer_id, None)
                raise

    def abandon_cut(self, cuts: Sequence[Cut]) -> None:
        """Remove the overlay nodes :meth:`prepare_cut` added for cuts that
        will not happen.  Never raises (a node that cannot be removed is
        logged; closing the chain removes it later)."""
        for c in cuts:
            with self._guard:
                volume = self._volumes.get(c.volume_id)
                overlay = volume.prepared.pop(c.new_layer_id, None) if volume else None
            if overlay is None:
                continue
            try:
                with self._locks.hold([c.volume_id], self.timeout):
                    self._del_nodes(c.volume_id, [overlay.node], strict=False)
            except EngineError as e:
                log.warning("volume %s: overlay node of layer %s not removed: %s", c.volume_id,
                            c.new_layer_id, e)

    def cut(self, cuts: Sequence[Cut]) -> None:
        """Switch each volume to its new overlay, atomically across all of
        them: the overlays are added as nodes (``"backing": null``: the
        current top becomes their backing), then ONE ``transaction`` of
        ``blockdev-snapshot`` actions puts every overlay on its volume's
        top.  Either all volumes switch or none does.  Exports follow the
        new tops; the old tops become read-only.

        If the daemon dies or does not answer during the cut, the outcome is
        unknown: the volumes' chains are forgotten, and re-opening them says
        (:class:`ChainMismatch`, :meth:`top_layer`) which side the daemon is on.

        :raises InvalidArgument: no cuts, a volume twice, a layer already in
            its chain.
        :raises FailedPrecondition: a volume is open read-only.
        :raises VolumeNotOpen: a volume is not open.
        :raises Busy: a volume is held by a block job past the timeout.
        :raises QmpError: QEMU refused; no volume changed and the added
            overlay nodes are removed again.
        """
        volume_ids = self._check_cuts(cuts)
        with self._locks.hold(volume_ids, self.timeout):
            volumes = [self._volume(c.volume_id) for c in cuts]
            for c, volume in zip(cuts, volumes):
                if volume.read_only:
                    raise FailedPrecondition(f"volume {c.volume_id} is open read-only; its"
                                             f" content cannot change, cut it closed instead")
                if any(layer.layer_id == c.new_layer_id for layer in volume.layers):
                    raise InvalidArgument(f"volume {c.volume_id}: layer {c.new_layer_id} is"
                                          f" already in its chain")
            overlays = [_Layer(c.new_layer_id, Path(os.path.abspath(c.new_path)),
                               node_name(c.volume_id, c.new_layer_id)) for c in cuts]
            added: list[tuple[str, str]] = []          # (volume_id, node)
            actions: list[dict[str, Any]] = []
            try:
                for c, volume, overlay in zip(cuts, volumes, overlays):
                    with self._guard:
                        prepared = volume.prepared.pop(c.new_layer_id, None)
                    if prepared is None:
                        self._add_overlay(c.volume_id, overlay)
                    added.append((c.volume_id, overlay.node))
                    actions.append(self._snapshot_action(volume.top.node, overlay.node))
                started = time.monotonic()
                self.qmp("transaction", {"actions": actions},
                         context=f"cut volumes {', '.join(volume_ids)}")
                log.info("cut %s in %.1f ms", ", ".join(
                    f"volume {c.volume_id} -> layer {c.new_layer_id}" for c in cuts),
                    (time.monotonic() - started) * 1000)
            except (DaemonDied, QmpTimeout):
                # Unknown outcome: forget the chains; open_chain() adopts them
                # again from the daemon, top_layer() says which side won.
                with self._guard:
                    for volume_id in volume_ids:
                        self._volumes.pop(volume_id, None)
                raise
            except BaseException:
                for volume_id, node in added:
                    self._del_nodes(volume_id, [node], strict=False)
                raise
            with self._guard:
                for volume, overlay in zip(volumes, overlays):
                    volume.layers.insert(0, overlay)

    @staticmethod
    def _snapshot_action(top: str, overlay: str) -> dict[str, Any]:
        return {"type": "blockdev-snapshot", "data": {"node": top, "overlay": overlay}}

    def _add_overlay(self, volume_id: str, overlay: _Layer) -> None:
        """Add a cut's overlay node; a stray one with its name (left by a cut
        whose cleanup failed) is replaced.

        :raises ChainMismatch: the daemon has the layer in the volume's chain
            already (this object's view is stale: open the chain again).
        """
        try:
            self._add_node(volume_id, overlay, None, read_only=False)
            return
        except QmpError as e:
            if "Duplicate" not in e.desc:
                raise
        chain, _ = self._daemon_chain(volume_id)
        if overlay.node in {n.name for n in chain}:
            raise ChainMismatch(f"volume {volume_id}: layer {overlay.layer_id} is already in the"
                                f" daemon's chain", expected=self.chain(volume_id),
                                found=[self._layer_of(volume_id, n) for n in chain])
        log.warning("volume %s: replacing the stray node of layer %s", volume_id,
                    overlay.layer_id)
        self._del_nodes(volume_id, [overlay.node], strict=True)
        self._add_node(volume_id, overlay, None, read_only=False)

    # -- size ------------------------------------------------------------

    def size(self, volume_id: str) -> int:
        """The volume's virtual size in bytes, as the daemon sees its top.

        :raises VolumeNotOpen: the volume is not open.
        """
        volume = self._volume(volume_id)
        return self._virtual_size(volume_id, volume.top.node)

    def _virtual_size(self, volume_id: str, node: str) -> int:
        for raw in self.qmp("query-named-block-nodes", {"flat": True},
                            context=f"volume {volume_id}"):
            if raw.get("node-name") == node:
                return int(raw["image"]["virtual-size"])
        raise VolumeNotOpen(f"volume {volume_id}: node {node} is not open in the daemon")

    def resize(self, volume_id: str, size: int) -> None:
        """Grow the volume's top node to ``size`` bytes (``block_resize``);
        the same size is a no-op.  The FUSE export shows the new size once
        the kernel's attribute cache expires (about a second).

        :raises InvalidArgument: not a positive multiple of 512.
        :raises OutOfRange: smaller than the volume (``block_resize`` would
            shrink a qcow2 image and drop the data past the new end).
        :raises FailedPrecondition: the volume is exported over NBD (QEMU
            7.2 refuses to resize an NBD-exported node).
        :raises QmpError: QEMU refused.
        """
        if size <= 0 or size % 512:
            raise InvalidArgument(f"volume {volume_id}: size {size} is not a positive"
                                  f" multiple of 512")
        with self._locks.hold([volume_id], self.timeout):
            volume = self._volume(volume_id)
            current = self._virtual_size(volume_id, volume.top.node)
            if size < current:
                raise OutOfRange(f"volume {volume_id}: {size} bytes is smaller than its"
                                 f" {current} bytes; volumes only grow")
            if size == current:
                return
            export = self._export(volume_id)
            if export is not None and export.get("type") == "nbd":
                # QEMU 7.2's NBD export does not share the RESIZE permission
                # (block_resize answers "Permission conflict"), and an NBD
                # client cannot learn a new size while connected anyway.
                raise FailedPrecondition(
                    f"volume {volume_id} is exported over NBD, which cannot grow while"
                    f" exported; unstage it, expand it, and stage it again (the filesystem"
                    f" grows at stage)")
            self.qmp("block_resize", {"node-name": volume.top.node, "size": size},
                     context=f"volume {volume_id}: resize to {size}")
            log.info("volume %s: resized from %d to %d bytes", volume_id, current, size)

    # -- block jobs ------------------------------------------------------

    def stream(self, volume_id: str, layer_id: str, base_layer_id: str | None) -> None:
        """Copy into ``layer_id`` the data of the layers between it and
        ``base_layer_id`` (``block-stream`` with ``base-node``), then make
        the base its backing; None as base copies everything below and
        leaves the layer without backing.  Content is unchanged throughout.
        The skipped layers' nodes are removed; their files are untouched.
        The layer's header names the base by its path relative to the
        layer's directory.

        Holds the volume for the job's duration (a cut waits or gets Busy).

        :raises NotFound: a layer is not in the open chain.
        :raises InvalidArgument: the base is not below the layer.
        :raises TopExported: ``layer_id`` is the top of a volume exported
            writable (QEMU 7.2 refuses; see the class).
        :raises JobFailed: the job ended with an error, or ran past
            ``job_timeout`` and was cancelled (chain unchanged).
        """
        with self._locks.hold([volume_id], self.timeout):
            volume = self._volume(volume_id)
            li = volume.index(layer_id)
            bi = volume.index(base_layer_id) if base_layer_id is not None else len(volume.layers)
            if bi <= li:
                raise InvalidArgument(f"volume {volume_id}: base {base_layer_id} is not below"
                                      f" layer {layer_id}")
            if bi == li + 1:
                return                                   # nothing in between
            layer = volume.layers[li]
            arguments: dict[str, Any] = {"device": layer.node}
            if base_layer_id is not None:
                base = volume.layers[bi]
                arguments["base-node"] = base.node
                # Without it QEMU writes its own name for the base, which is
                # a json: description when nodes were added explicitly.
                arguments["backing-file"] = os.path.relpath(base.path, layer.path.parent)
            with self._forget_on_unknown(volume_id):
                self._run_job(volume_id, "stream", f"stream.{volume_id}", arguments,
                              what=f"stream into layer {layer_id} down to "
                                   f"{base_layer_id or 'the bottom'}", touches_top=li == 0)
            dropped = volume.layers[li + 1:bi]
            with self._guard:
                volume.layers[li + 1:bi] = []
            self._del_nodes(volume_id, [x.node for x in dropped], strict=False)

    def commit(self, volume_id: str, top_layer_id: str, base_layer_id: str) -> None:
        """Write the data of ``top_layer_id`` and the layers between it and
        ``base_layer_id`` into the base (``block-commit`` with explicit
        ``top-node`` and ``base-node``, never without a base); the layer
        above the top then backs onto the base (its header names the base by
        relative path).  If the top is the volume's top, this is an active
        commit: it is completed when ready and the base becomes the volume's
        top.  Nodes of the merged layers are removed; files are untouched.

        :raises NotFound: a layer is not in the open chain.
        :raises InvalidArgument: the base is not below the top.
        :raises TopExported: an active commit of a volume exported writable
            (QEMU 7.2 refuses; see the class).
        :raises QmpError: QEMU refused (also: the base is open in another
            volume, whose content a commit would change).
        :raises JobFailed: the job ended with an error, or ran past
            ``job_timeout`` and was cancelled (chain unchanged).
        """
        with self._locks.hold([volume_id], self.timeout):
            volume = self._volume(volume_id)
            ti = volume.index(top_layer_id)
            bi = volume.index(base_layer_id)
            if bi <= ti:
                raise InvalidArgument(f"volume {volume_id}: base {base_layer_id} is not below"
                                      f" layer {top_layer_id}")
            top, base = volume.layers[ti], volume.layers[bi]
            arguments: dict[str, Any] = {"device": volume.top.node, "top-node": top.node,
                                         "base-node": base.node}
            if ti > 0:
                # QEMU rewrites the header of the layer above the top.
                above = volume.layers[ti - 1]
                arguments["backing-file"] = os.path.relpath(base.path, above.path.parent)
            with self._forget_on_unknown(volume_id):
                self._run_job(volume_id, "commit", f"commit.{volume_id}", arguments,
                              what=f"commit layer {top_layer_id} into {base_layer_id}",
                              touches_top=ti == 0, active=ti == 0)
            dropped = volume.layers[ti:bi]
            with self._guard:
                volume.layers[ti:bi] = []
            self._del_nodes(volume_id, [x.node for x in dropped], strict=False)

    @contextlib.contextmanager
    def _forget_on_unknown(self, volume_id: str) -> Iterator[None]:
        """If the daemon died or stopped answering, nobody knows the chain:
        forget it, so that the next call must open (adopt) it again."""
        try:
            yield
        except (DaemonDied, QmpTimeout):
            with self._guard:
                self._volumes.pop(volume_id, None)
            raise

    def _run_job(self, volume_id: str, kind: str, job_id: str, arguments: dict[str, Any], *,
                 what: str, touches_top: bool, active: bool = False) -> None:
        """Start a block job, wait for it (completing an active commit when
        it is ready), log progress, dismiss it, raise its error.

        :param touches_top: the job writes into the volume's top.
        :param active: an active commit (completed when ready).
        """
        context = f"volume {volume_id}: {what}"
        for job in self.qmp("query-jobs", context=context):
            if job.get("id") == job_id:
                # Left by a plugin that died while waiting for it.
                if job.get("status") != _JOB_CONCLUDED:
                    raise Busy(f"{context}: job {job_id} from an earlier call still runs")
                self.qmp("job-dismiss", {"id": job_id}, context=context)
        try:
            self.qmp(f"block-{kind}", {**arguments, "job-id": job_id, "auto-dismiss": False},
                     context=context)
        except QmpError as e:
            if touches_top and "Permission conflict" in e.desc and \
                    self._export_node(volume_id) is not None:
                raise TopExported(e.qmp_command, e.error_class, e.desc + "; a block job on"
                                  " the top of a volume with a writable export is refused:"
                                  " cut first, then merge below the new top",
                                  context=context) from e
            raise
        log.info("%s: job %s started", context, job_id)
        started = time.monotonic()
        last_log = started
        cancelled = False
        job_timeout_passed = False
        completed = False
        pause = 0.01
        while True:
            job = next((j for j in self.qmp("query-jobs", context=context)
                        if j.get("id") == job_id), None)
            if job is None:
                raise JobFailed(f"{context}: job {job_id} vanished", job_id=job_id,
                                error="vanished")
            status = job.get("status")
            done, total = int(job.get("current-progress", 0)), int(job.get("total-progress", 0))
            if status == _JOB_CONCLUDED:
                self.qmp("job-dismiss", {"id": job_id}, context=context)
                if cancelled:
                    raise JobFailed(f"{context}: job cancelled after {self.job_timeout:.0f}s",
                                    job_id=job_id, error="timeout")
                error = job.get("error")
                if error:
                    raise JobFailed(f"{context}: job failed: {error}", job_id=job_id,
                                    error=str(error))
                log.info("%s: done (%d bytes in %.1fs)", context, total,
                         time.monotonic() - started)
                return
            if status == _JOB_READY and active and not completed and not cancelled:
                # An active commit mirrors new writes until told to pivot.
                self.qmp("job-complete", {"id": job_id}, context=context)
                completed = True
            now = time.monotonic()
            if now - last_log >= 2.0:
                percent = 100.0 * done / total if total else 0.0
                log.info("%s: %s %d/%d bytes (%.0f%%)", context, status, done, total, percent)
                last_log = now
            if (self.job_timeout is not None and not cancelled and not job_timeout_passed
                    and now - started > self.job_timeout):
                log.warning("%s: job ran %.0fs, cancelling it", context, now - started)
                try:
                    self.qmp("job-cancel", {"id": job_id}, context=context)
                    cancelled = True
                except QmpError as e:
                    # Too late to cancel: it is finishing on its own.
                    log.info("%s: not cancelled: %s", context, e.desc)
                    job_timeout_passed = True
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


def _top_down(nodes: Sequence[_Node]) -> list[str]:
    """Node names ordered so that every node comes before its backing node
    (QEMU refuses to delete a node that is still some node's backing)."""
    remaining = list(nodes)
    ordered: list[str] = []
    while remaining:
        used = {n.backing for n in remaining}
        free = [n for n in remaining if n.filename not in used] or remaining[:1]
        ordered += [n.name for n in free]
        remaining = [n for n in remaining if n not in free]
    return ordered


def _wait_dead(process: _Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _kill(process: _Process) -> None:
    """SIGKILL the daemon and wait until it is gone (reaped, if our child)."""
    try:
        os.kill(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if process.popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(10)
        return
    _wait_dead(process, 10)


def _image_path(filename: str) -> Path | None:
    """The image file of a format node from QEMU's filename for it: a plain
    path, or ``json:{... "file": {"driver": "file", "filename": P}}`` when
    the node's backing was given explicitly."""
    if not filename.startswith("json:"):
        return Path(filename) if filename else None
    try:
        spec = json.loads(filename[len("json:"):])
    except ValueError:
        return None
    child = spec.get("file") if isinstance(spec, dict) else None
    if isinstance(child, dict) and isinstance(child.get("filename"), str):
        return Path(child["filename"])
    return None


__all__ = [
    "ChainMismatch", "Cut", "DaemonDied", "DaemonStartError", "DaemonState", "JobFailed",
    "QmpError", "QmpTimeout", "QsdError", "StorageDaemon", "TopExported", "VolumeNotOpen",
    "fuse_mounts", "node_name",
]
