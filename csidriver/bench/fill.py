"""Putting data into volumes, and reading it back as a checksum.

CSI has no call that writes a volume, so the benchmark reaches the bytes one
of three ways, per driver:

``node``
    The driver's Node service: NodeStage/NodePublish the volume as a block
    device on this machine, write or read it, unpublish.  Used by default
    when the driver has a Node service.
``qsnap``
    qsnap's own hook: a closed qsnap volume is a chain of qcow2 files whose
    top is named by ``Inspect.DescribeVolume``; the data is written into the
    top with ``qemu-io`` and read back through the chain with ``qemu-img``.
    Used by default when the endpoint answers qsnap's Inspect service.
a command (``--fill-hook CMD`` / ``--checksum-hook CMD``)
    Run as an argument list (``shlex`` splitting, no shell) with the
    environment: ``QSNAP_VOLUME_ID``, ``QSNAP_SIZE_BYTES``,
    ``QSNAP_ENDPOINT``, ``QSNAP_VOLUME_CONTEXT`` (JSON), and for fills
    ``QSNAP_FILL_BYTES`` (write this many bytes from offset 0) and
    ``QSNAP_SEED`` (different seeds must give different data); for
    checksums ``QSNAP_CHECKSUM_BYTES`` (hash this many bytes from offset 0)
    and the hook prints a hex digest as the first word of its output.  Any
    digest works as long as the same hook computes both sides of a comparison.

The data is non-repeating (:class:`Pattern`): no two 4 KiB blocks of a fill
are equal, and fills with different seeds differ in every block, so neither
deduplication nor compression can make a copying driver look faster than it is.
"""

from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import json
import os
import random
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from csidriver.bench.driver import Endpoint
from csidriver.pb import qsnap_pb2

BLOCK = 4096
CHUNK = 64 << 20            # bytes generated and written per step
CHECKSUM_WINDOW = 256 << 20  # bytes qemu-img converts per step when reading back
F_SETPIPE_SZ = 1031          # Linux fcntl; a larger pipe halves the context switches

Progress = Callable[[int], None]


class DataError(Exception):
    """Filling or reading a volume failed."""


@dataclass(frozen=True)
class FillResult:
    """One fill: how much, how long, and the SHA-256 of the bytes written."""

    bytes: int
    seconds: float
    digest: str


class Pattern:
    """Non-repeating data from a seed.

    A pseudo-random buffer of :data:`CHUNK` bytes made once from the seed;
    every 4 KiB block gets its absolute block number and the seed stamped
    into its first 16 bytes.  Stamping is a few strided copies per chunk, so
    the pattern costs about one memory pass: a 64 GiB fill is bounded by the
    disk, not by Python.
    """

    def __init__(self, seed: int, chunk: int = CHUNK) -> None:
        if chunk % BLOCK:
            raise ValueError(f"chunk {chunk} is not a multiple of {BLOCK}")
        self.seed = seed
        self.chunk = chunk
        self._buffer = bytearray(random.Random(seed).randbytes(chunk))
        seed_bytes = (seed & (2**64 - 1)).to_bytes(8, "little")
        for j in range(8):
            self._buffer[8 + j::BLOCK] = seed_bytes[j:j + 1] * (chunk // BLOCK)

    def chunks(self, length: int) -> Iterator[tuple[int, memoryview]]:
        """``(offset, data)`` pieces covering bytes ``[0, length)``.

        The yielded view is reused: consume it before asking for the next.
        """
        view = memoryview(self._buffer)
        for offset in range(0, length, self.chunk):
            first = offset // BLOCK
            stamps = array.array("Q", range(first, first + self.chunk // BLOCK)).tobytes()
            for j in range(8):
                self._buffer[j::BLOCK] = stamps[j::8]
            yield offset, view[:min(self.chunk, length - offset)]


def chunk_for(length: int) -> int:
    """The chunk for a fill of ``length`` bytes: :data:`CHUNK`, or less for
    small fills (making the 64 MiB random buffer takes half a second)."""
    return min(CHUNK, max(BLOCK, -(-length // BLOCK) * BLOCK))


class Filler(Protocol):
    """Writes a pattern into a volume."""

    description: str

    def fill(self, volume: Any, length: int, seed: int, progress: Progress) -> FillResult:
        """Write ``length`` bytes of :class:`Pattern` (``seed``) from offset 0."""
        ...


class Checksummer(Protocol):
    """Reads a volume back as a digest."""

    description: str

    def checksum(self, volume: Any, length: int, progress: Progress) -> str:
        """A digest of the volume's first ``length`` bytes."""
        ...


# -- qsnap: qemu-io into the top layer, qemu-img through the chain ----------

class QsnapData:
    """The built-in hook for qsnap: the volume must be closed (not served)."""

    description = "qsnap (qemu-io into the volume's top qcow2 layer)"

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    @staticmethod
    def missing_tools() -> list[str]:
        return [tool for tool in ("qemu-io", "qemu-img") if shutil.which(tool) is None]

    def _top(self, volume_id: str) -> str:
        details = self.endpoint.inspect.DescribeVolume(
            qsnap_pb2.DescribeVolumeRequest(volume_id=volume_id), timeout=self.endpoint.timeout)
        if not details.chain:
            raise DataError(f"volume {volume_id} has no layers")
        path = details.chain[0].path
        if not os.path.exists(path):
            raise DataError(f"volume {volume_id}: its top layer {path} is not on this machine "
                            "(the qsnap fill hook needs the pool's files locally)")
        return path

    def fill(self, volume: Any, length: int, seed: int, progress: Progress) -> FillResult:
        path = self._top(volume.volume_id)
        pattern = Pattern(seed, chunk_for(length))
        digest = hashlib.sha256()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="qsnap-bench-fill-") as tmp:
            # One FIFO per chunk: qemu-io's `write -s FILE` reads FILE up to
            # the length and the next command opens the next FIFO, so a chunk
            # can never be read by the wrong command.  Nothing touches the disk
            # but the layer itself.
            offsets = list(range(0, length, pattern.chunk))
            commands: list[str] = []
            for k, offset in enumerate(offsets):
                fifo = os.path.join(tmp, f"c{k}")
                os.mkfifo(fifo, 0o600)
                commands += ["-c", f"write -s {fifo} {offset} {min(pattern.chunk, length - offset)}"]
            log_path = os.path.join(tmp, "qemu-io.log")
            with open(log_path, "w+b") as log:
                proc = subprocess.Popen(["qemu-io", "-f", "qcow2", *commands, path],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=log)
                try:
                    for k, (offset, data) in enumerate(pattern.chunks(length)):
                        digest.update(data)
                        fifo = os.path.join(tmp, f"c{k}")
                        _feed(fifo, data, proc, log_path)
                        os.unlink(fifo)
                        progress(len(data))
                    code = proc.wait()
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                log.seek(0)
                output = log.read().decode(errors="replace")
            if code != 0 or "failed" in output:
                raise DataError(f"qemu-io writing {path} exited with {code}: {_tail(output)}")
        return FillResult(length, time.perf_counter() - start, digest.hexdigest())

    def checksum(self, volume: Any, length: int, progress: Progress) -> str:
        path = self._top(volume.volume_id)
        digest = hashlib.sha256()
        # Windows go through tmpfs when there is one: RAM, not the disk
        # under test; each is deleted before the next is made.
        scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(prefix="qsnap-bench-sum-", dir=scratch) as tmp:
            out = os.path.join(tmp, "window.raw")
            for offset in range(0, length, CHECKSUM_WINDOW):
                size = min(CHECKSUM_WINDOW, length - offset)
                # A raw node with offset/size over the qcow2 chain is a
                # window of the guest-visible disk.
                spec = {"driver": "raw", "offset": offset, "size": size,
                        "file": {"driver": "qcow2", "file": {"driver": "file", "filename": path}}}
                # -U: the maintainer may hold a lock on a layer of the chain
                # while merging; merges never change what the chain reads.
                done = subprocess.run(["qemu-img", "convert", "-U", "-O", "raw",
                                       "json:" + json.dumps(spec), out],
                                      stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      check=False)
                if done.returncode != 0:
                    raise DataError(f"qemu-img reading {path} at {offset}: {_tail(done.stderr)}")
                with open(out, "rb") as f:
                    _hash_file(f.fileno(), size, digest)
                os.unlink(out)
                progress(size)
        return digest.hexdigest()


def _feed(fifo: str, data: memoryview, proc: subprocess.Popen[bytes], log_path: str) -> None:
    """Write ``data`` into a FIFO once qemu-io opens it for reading.

    The open is non-blocking and polled, so a qemu-io that died before
    reaching this chunk is noticed instead of blocking forever.
    """
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        if proc.poll() is not None:
            raise DataError(f"qemu-io exited with {proc.returncode} before reading its data: "
                            f"{_tail(Path(log_path).read_text(errors='replace'))}")
        time.sleep(0.001)
    try:
        os.set_blocking(fd, True)
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default size works, slower
        sent = 0
        while sent < len(data):
            sent += os.write(fd, data[sent:])
    except BrokenPipeError as e:
        raise DataError(f"qemu-io stopped reading: "
                        f"{_tail(Path(log_path).read_text(errors='replace'))}") from e
    finally:
        os.close(fd)


def _hash_file(fd: int, length: int, digest: Any) -> None:
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    left = length
    while left > 0:
        n = os.readv(fd, [view[:min(left, len(buffer))]])
        if n == 0:
            # Past the end of what the reader produced: the rest reads as
            # zeros (a sparse tail, or a mount-mode file not yet written).
            zeros = bytes(min(left, len(buffer)))
            while left > 0:
                digest.update(zeros[:min(left, len(zeros))])
                left -= min(left, len(zeros))
            return
        digest.update(view[:n])
        left -= n


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"


# -- node: the driver's own Node service -------------------------------------

class NodeData:
    """Reads and writes through NodeStage/NodePublish of a block volume."""

    description = "node (NodeStageVolume + NodePublishVolume, block device)"

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def fill(self, volume: Any, length: int, seed: int, progress: Progress) -> FillResult:
        pattern = Pattern(seed, chunk_for(length))
        digest = hashlib.sha256()
        start = time.perf_counter()
        att = self.endpoint.attach(volume)
        try:
            fd = os.open(att.data_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                for offset, data in pattern.chunks(length):
                    digest.update(data)
                    written = 0
                    while written < len(data):
                        written += os.pwrite(fd, data[written:], offset + written)
                    progress(len(data))
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            self.endpoint.detach(att)
        return FillResult(length, time.perf_counter() - start, digest.hexdigest())

    def checksum(self, volume: Any, length: int, progress: Progress) -> str:
        digest = hashlib.sha256()
        att = self.endpoint.attach(volume)
        try:
            fd = os.open(att.data_path, os.O_RDONLY)
            try:
                _hash_file(fd, length, digest)
            finally:
                os.close(fd)
            progress(length)
        finally:
            self.endpoint.detach(att)
        return digest.hexdigest()


# -- hooks: a command per driver ----------------------------------------------

class HookData:
    """A user's command (see the module docstring for its contract)."""

    def __init__(self, command: str, endpoint: Endpoint) -> None:
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("an empty hook command")
        self.endpoint = endpoint
        self.description = f"hook ({command})"

    def _run(self, volume: Any, extra: dict[str, str]) -> str:
        env = {**os.environ, "QSNAP_VOLUME_ID": volume.volume_id,
               "QSNAP_SIZE_BYTES": str(volume.capacity_bytes),
               "QSNAP_ENDPOINT": self.endpoint.endpoint,
               "QSNAP_VOLUME_CONTEXT": json.dumps(dict(volume.volume_context)), **extra}
        try:
            done = subprocess.run(self.argv, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, check=False)
        except OSError as e:
            raise DataError(f"hook {self.argv[0]}: {e}") from e
        if done.returncode != 0:
            raise DataError(f"hook {shlex.join(self.argv)} exited with {done.returncode}: "
                            f"{_tail(done.stderr or done.stdout)}")
        return done.stdout

    def fill(self, volume: Any, length: int, seed: int, progress: Progress) -> FillResult:
        start = time.perf_counter()
        self._run(volume, {"QSNAP_FILL_BYTES": str(length), "QSNAP_SEED": str(seed)})
        progress(length)
        return FillResult(length, time.perf_counter() - start, "")

    def checksum(self, volume: Any, length: int, progress: Progress) -> str:
        words = self._run(volume, {"QSNAP_CHECKSUM_BYTES": str(length)}).split()
        if not words:
            raise DataError(f"checksum hook {shlex.join(self.argv)} printed nothing")
        progress(length)
        return words[0]


# -- choosing -------------------------------------------------------------------

def choose(spec: str, endpoint: Endpoint, what: str) -> tuple[Filler | Checksummer | None, str]:
    """Pick how to fill (``what="fill"``) or checksum volumes of a driver.

    :param spec: ``auto``, ``none``, ``node``, ``qsnap`` or a command.
    :returns: (the method or None, why there is none).
    :raises ValueError: an explicit choice the driver cannot serve.
    """
    info = endpoint.info
    assert info is not None, "probe the endpoint first"
    node_ok = info.node is not None and endpoint.block
    qsnap_ok = info.qsnap and not QsnapData.missing_tools()
    if spec == "none":
        return None, f"{what} disabled (--{what}-hook none)"
    if spec == "node":
        if not node_ok:
            raise ValueError(f"{info.label}: --{what}-hook node needs a Node service and block "
                             f"access ({info.node_note or 'mount access chosen'})")
        return NodeData(endpoint), ""
    if spec == "qsnap":
        if not info.qsnap:
            raise ValueError(f"{info.label}: --{what}-hook qsnap needs a qsnap driver; "
                             f"{info.endpoint} does not answer qsnap's Inspect service")
        if QsnapData.missing_tools():
            raise ValueError(f"--{what}-hook qsnap needs {', '.join(QsnapData.missing_tools())} "
                             "(Debian package qemu-utils)")
        return QsnapData(endpoint), ""
    if spec != "auto":
        return HookData(spec, endpoint), ""
    if node_ok:
        return NodeData(endpoint), ""
    if qsnap_ok:
        return QsnapData(endpoint), ""
    if info.qsnap:
        return None, (f"qsnap's {what} hook needs {', '.join(QsnapData.missing_tools())} "
                      "(Debian package qemu-utils)")
    return None, (f"{info.name or info.endpoint} has no Node service and no --{what}-hook "
                  "was given")
