"""engine/qsd.py against a real qemu-storage-daemon: chains, FUSE exports
read and written with plain file I/O, live cuts under a writer, group cuts,
resize, stream and commit, a killed daemon, attaching to a running one, and
a clean stop.

Layer files are made the way qsnap makes them (``qcow2.write_image``) and
filled with qemu-io before the daemon opens them; afterwards they are only
read, with ``qemu-io -r -U`` / ``qemu-img map -U`` (shared, read-only), which
is safe while the daemon has them open.  Everything lives in one short
directory under /tmp (the QMP socket path is limited to 107 bytes), which
the fixtures unmount, kill and remove whatever a test leaves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("qemu.qmp")

from engine import qcow2  # noqa: E402
from engine.errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange  # noqa: E402
from engine.qsd import (ChainMismatch, Cut, DaemonDied, DaemonStartError,  # noqa: E402
                        DaemonState, QmpError, QmpTimeout, StorageDaemon, TopExported,
                        VolumeNotOpen, fuse_mounts, node_name)

QSD = shutil.which("qemu-storage-daemon")
QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")
pytestmark = pytest.mark.skipif(
    not (QSD and QEMU_IO and QEMU_IMG and os.path.exists("/dev/fuse")),
    reason="needs qemu-storage-daemon (qemu-system-common), qemu-utils and /dev/fuse")

KIB = 1 << 10
MIB = 1 << 20
SIZE = 64 * MIB
BLOCK = 64 * KIB
VOL_A = "v-" + "a" * 32
VOL_B = "v-" + "b" * 32


def layer_id(n: int) -> str:
    return f"l-{n:032x}"


# -- helpers -------------------------------------------------------------------

class Pool:
    """Layer files side by side in one directory, named ``<layer-id>.qcow2``
    and backed by bare file name, as in a qsnap pool."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(exist_ok=True)

    def path(self, layer: str) -> Path:
        return self.root / f"{layer}.qcow2"

    def make(self, layer: str, backing: str | None = None, size: int = SIZE) -> Path:
        path = self.path(layer)
        qcow2.write_image(path, size, f"{backing}.qcow2" if backing else None)
        return path

    def chain(self, *layers: str) -> list[tuple[str, Path]]:
        """``chain(top, ..., bottom)`` as open_chain takes it."""
        return [(layer, self.path(layer)) for layer in layers]


def qemu_io(path: Path, *commands: str, shared: bool = False) -> str:
    """Run qemu-io commands on a qcow2 file; ``shared`` reads it read-only
    while the daemon has it open."""
    argv = [QEMU_IO or "qemu-io", "-f", "qcow2"] + (["-r", "-U"] if shared else [])
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run(argv + [str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"qemu-io {commands} {path}:\n{output}"
    assert "verification failed" not in output and "Pattern verification" not in output, \
        f"qemu-io {commands} {path}:\n{output}"
    return output


def own_blocks(path: Path) -> set[int]:
    """64 KiB blocks with data in the image itself (qemu-img map depth 0)."""
    done = subprocess.run([QEMU_IMG or "qemu-img", "map", "--output=json", "-U", "-f", "qcow2",
                           str(path)], capture_output=True, text=True, timeout=60, check=True)
    blocks: set[int] = set()
    for extent in json.loads(done.stdout):
        if extent["depth"] == 0 and extent["data"]:
            blocks.update(range(extent["start"] // BLOCK,
                                (extent["start"] + extent["length"]) // BLOCK))
    return blocks


def backing_name(path: Path) -> str | None:
    done = subprocess.run([QEMU_IMG or "qemu-img", "info", "--output=json", "-U", "-f", "qcow2",
                           str(path)], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout).get("backing-filename")


def read(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def qsd_pid(run_dir: Path) -> int | None:
    """The pid of a live qemu-storage-daemon serving ``run_dir``."""
    try:
        pid = int((run_dir / "qsd.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError):
        return None
    if b"qemu-storage-daemon" not in cmdline or str(run_dir).encode() not in cmdline:
        return None
    state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    return None if state in (b"Z", b"X") else pid


def mounts_under(root: Path) -> list[Path]:
    return [m for m in fuse_mounts() if m == root or root in m.parents]


def wait_for(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def volume_nodes(daemon: StorageDaemon, volume_id: str) -> set[str]:
    prefix = node_name(volume_id, "x")[:13]
    return {n["node-name"] for n in daemon.qmp("query-named-block-nodes", {"flat": True})
            if n["node-name"].startswith(prefix)}


# -- fixtures ------------------------------------------------------------------

@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short directory for the socket, the layers and the mount points;
    afterwards no daemon, mount or file of the test is left."""
    root = Path(tempfile.mkdtemp(prefix="qsnap-qsd-", dir="/tmp"))
    yield root
    pid = qsd_pid(root)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: qsd_pid(root) is None)
    for mount in mounts_under(root):
        subprocess.run(["fusermount3", "-u", "-z", str(mount)], check=False, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pool(run_dir: Path) -> Pool:
    return Pool(run_dir / "layers")


@pytest.fixture
def daemon(run_dir: Path) -> Iterator[StorageDaemon]:
    """A started daemon; stopped (and checked clean) at teardown."""
    d = StorageDaemon(run_dir, timeout=15)
    assert d.ensure_running() is True
    yield d
    d.stop()
    d.close()
    assert qsd_pid(run_dir) is None
    assert mounts_under(run_dir) == []


# -- tests -------------------------------------------------------------------

def test_node_names_are_short_stable_and_per_volume() -> None:
    a = node_name(VOL_A, layer_id(1))
    assert a == node_name(VOL_A, layer_id(1))
    assert len(a) <= 31 and re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", a)
    # Same layer in two volumes: two nodes; same volume: one prefix.
    assert node_name(VOL_B, layer_id(1)) != a
    assert node_name(VOL_A, layer_id(2))[:13] == a[:13]


def test_open_export_read_write_close(daemon: StorageDaemon, pool: Pool, run_dir: Path) -> None:
    pool.make(layer_id(1))
    qemu_io(pool.path(layer_id(1)), "write -P 0xaa 0 1M")
    pool.make(layer_id(2), backing=layer_id(1))
    qemu_io(pool.path(layer_id(2)), "write -P 0xbb 1M 1M")
    chain = pool.chain(layer_id(2), layer_id(1))

    top = daemon.open_chain(VOL_A, chain, read_only=False)
    assert top == node_name(VOL_A, layer_id(2))
    assert daemon.open_chain(VOL_A, chain, read_only=False) == top       # idempotent
    assert daemon.chain(VOL_A) == [layer_id(2), layer_id(1)]
    with pytest.raises(ChainMismatch):
        daemon.open_chain(VOL_A, pool.chain(layer_id(1)), read_only=False)

    export = run_dir / "vol-a.raw"
    daemon.export_fuse(VOL_A, export, writable=True)
    daemon.export_fuse(VOL_A, export, writable=True)                     # idempotent
    assert export in fuse_mounts()
    assert daemon.exports() == {VOL_A: export}
    with pytest.raises(AlreadyExists):
        daemon.export_fuse(VOL_A, run_dir / "elsewhere.raw", writable=True)

    assert os.stat(export).st_size == SIZE
    assert read(export, 0, MIB) == b"\xaa" * MIB
    assert read(export, MIB, MIB) == b"\xbb" * MIB
    assert read(export, 2 * MIB, MIB) == bytes(MIB)
    write(export, 2 * MIB, b"\xcc" * BLOCK)
    assert read(export, 2 * MIB, BLOCK) == b"\xcc" * BLOCK
    # The write went into the top layer, not below.
    qemu_io(pool.path(layer_id(2)), f"read -P 0xcc {2 * MIB} {BLOCK}", shared=True)
    qemu_io(pool.path(layer_id(1)), f"read -P 0 {2 * MIB} {BLOCK}", shared=True)

    daemon.close_chain(VOL_A)                  # removes the export first
    daemon.close_chain(VOL_A)                  # idempotent
    assert export not in fuse_mounts() and not export.exists()
    assert daemon.exports() == {} and daemon.top_layer(VOL_A) is None
    with pytest.raises(VolumeNotOpen):
        daemon.chain(VOL_A)
    # Closed means released: qemu-io may open the top for writing again.
    qemu_io(pool.path(layer_id(2)), f"read -P 0xcc {2 * MIB} {BLOCK}", "write -P 1 0 512")


def test_read_only_chain(daemon: StorageDaemon, pool: Pool, run_dir: Path) -> None:
    pool.make(layer_id(1))
    qemu_io(pool.path(layer_id(1)), "write -P 0x5a 0 64k")
    daemon.open_chain(VOL_A, pool.chain(layer_id(1)), read_only=True)
    with pytest.raises(InvalidArgument):
        daemon.export_fuse(VOL_A, run_dir / "ro.raw", writable=True)
    daemon.export_fuse(VOL_A, run_dir / "ro.raw", writable=False)
    assert read(run_dir / "ro.raw", 0, BLOCK) == b"\x5a" * BLOCK
    with pytest.raises(OSError):
        write(run_dir / "ro.raw", 0, b"x")
    daemon.unexport(VOL_A)
    daemon.unexport(VOL_A)                     # idempotent
    assert not (run_dir / "ro.raw").exists()


class Writer(threading.Thread):
    """Writes block after block (pattern = block index % 250 + 1) through an
    export, each followed by fsync.  ``started`` counts writes begun,
    ``completed`` writes finished."""

    def __init__(self, export: Path, first_block: int, blocks: int) -> None:
        super().__init__(daemon=True)
        self.export = export
        self.first = first_block
        self.blocks = blocks
        self.started = 0
        self.completed = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    @staticmethod
    def pattern(i: int) -> int:
        return i % 250 + 1

    def run(self) -> None:
        try:
            fd = os.open(self.export, os.O_RDWR)
            try:
                for i in range(self.blocks):
                    if self.stop.is_set():
                        break
                    self.started = i + 1
                    os.pwrite(fd, bytes([self.pattern(i)]) * BLOCK, (self.first + i) * BLOCK)
                    os.fsync(fd)
                    self.completed = i + 1
            finally:
                os.close(fd)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def test_live_cut_while_writing(daemon: StorageDaemon, pool: Pool, run_dir: Path) -> None:
    pool.make(layer_id(1))
    daemon.open_chain(VOL_A, pool.chain(layer_id(1)), read_only=False)
    export = run_dir / "a.raw"
    daemon.export_fuse(VOL_A, export, writable=True)

    writer = Writer(export, first_block=0, blocks=SIZE // BLOCK)
    writer.start()
    assert wait_for(lambda: writer.completed >= 40 or not writer.is_alive())
    before = writer.completed                  # all finished before the cut began
    pool.make(layer_id(2), backing=layer_id(1))
    started = time.monotonic()
    daemon.cut([Cut(VOL_A, layer_id(2), pool.path(layer_id(2)))])
    cut_ms = (time.monotonic() - started) * 1000
    after = writer.started                     # writes from here began after the cut
    assert wait_for(lambda: writer.completed >= after + 40 or not writer.is_alive())
    writer.stop.set()
    writer.join(30)
    assert writer.error is None, writer.error
    total = writer.completed
    print(f"cut took {cut_ms:.1f} ms; {before} writes before, {total - after} after")

    # The export follows the new top, which the daemon reports as the top.
    assert daemon.top_layer(VOL_A) == layer_id(2)
    assert daemon.chain(VOL_A) == [layer_id(2), layer_id(1)]
    exports = {e["id"]: e["node-name"] for e in daemon.qmp("query-block-exports")}
    assert exports == {VOL_A: node_name(VOL_A, layer_id(2))}

    # Everything reads back through the export.
    for i in range(0, total, 7):
        assert read(export, i * BLOCK, BLOCK) == bytes([Writer.pattern(i)]) * BLOCK, i

    # The old layer holds exactly the pre-cut writes (those in flight during
    # the cut, [before, after), may be on either side); the new overlay holds
    # the rest.
    old, new = own_blocks(pool.path(layer_id(1))), own_blocks(pool.path(layer_id(2)))
    assert set(range(before)) <= old <= set(range(after))
    assert set(range(after, total)) <= new <= set(range(before, total))
    qemu_io(pool.path(layer_id(1)),
            *[f"read -P {Writer.pattern(i)} {i * BLOCK} {BLOCK}" for i in range(0, before, 5)],
            *[f"read -P 0 {i * BLOCK} {BLOCK}" for i in range(after, total, 5)], shared=True)
    # The old top is read-only in the daemon now.
    ro = {n["node-name"]: n["ro"] for n in daemon.qmp("query-named-block-nodes", {"flat": True})}
    assert ro[node_name(VOL_A, layer_id(1))] is True
    assert ro[node_name(VOL_A, layer_id(2))] is False


def test_group_cut_is_atomic(daemon: StorageDaemon, pool: Pool, run_dir: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    exports = {}
    for volume, base, fill in ((VOL_A, 1, 0xa1), (VOL_B, 11, 0xb1)):
        pool.make(layer_id(base))
        daemon.open_chain(volume, pool.chain(layer_id(base)), read_only=False)
        exports[volume] = run_dir / f"{volume}.raw"
        daemon.export_fuse(volume, exports[volume], writable=True)
        write(exports[volume], 0, bytes([fill]) * BLOCK)

    # A failing cut changes no volume and leaves no node behind: here the
    # second overlay does not exist, so its blockdev-add fails.
    pool.make(layer_id(2), backing=layer_id(1))
    with pytest.raises(QmpError):
        daemon.cut([Cut(VOL_A, layer_id(2), pool.path(layer_id(2))),
                    Cut(VOL_B, layer_id(12), pool.path(layer_id(12)))])
    assert daemon.top_layer(VOL_A) == layer_id(1) and daemon.chain(VOL_A) == [layer_id(1)]
    assert volume_nodes(daemon, VOL_A) == {node_name(VOL_A, layer_id(1))}

    # Here the transaction itself fails (QEMU rejects one action): neither
    # volume switches, although both overlays were added.
    pool.make(layer_id(12), backing=layer_id(11))
    real = StorageDaemon._snapshot_action

    def broken(top: str, overlay: str) -> dict[str, object]:
        action = real(top, overlay)
        if overlay == node_name(VOL_B, layer_id(12)):
            action["data"] = {"node": "no-such-node", "overlay": overlay}
        return action

    monkeypatch.setattr(StorageDaemon, "_snapshot_action", staticmethod(broken))
    with pytest.raises(QmpError, match="no-such-node"):
        daemon.cut([Cut(VOL_A, layer_id(2), pool.path(layer_id(2))),
                    Cut(VOL_B, layer_id(12), pool.path(layer_id(12)))])
    monkeypatch.undo()
    for volume, base in ((VOL_A, 1), (VOL_B, 11)):
        assert daemon.top_layer(volume) == layer_id(base)
        assert volume_nodes(daemon, volume) == {node_name(volume, layer_id(base))}

    # Both volumes in one transaction.
    daemon.cut([Cut(VOL_A, layer_id(2), pool.path(layer_id(2))),
                Cut(VOL_B, layer_id(12), pool.path(layer_id(12)))])
    assert daemon.top_layer(VOL_A) == layer_id(2)
    assert daemon.top_layer(VOL_B) == layer_id(12)
    write(exports[VOL_A], BLOCK, b"\xa2" * BLOCK)
    write(exports[VOL_B], BLOCK, b"\xb2" * BLOCK)
    assert own_blocks(pool.path(layer_id(1))) == {0}
    assert own_blocks(pool.path(layer_id(2))) == {1}
    assert own_blocks(pool.path(layer_id(11))) == {0}
    assert own_blocks(pool.path(layer_id(12))) == {1}
    assert read(exports[VOL_B], 0, 2 * BLOCK) == b"\xb1" * BLOCK + b"\xb2" * BLOCK

    with pytest.raises(InvalidArgument):
        daemon.cut([])
    with pytest.raises(InvalidArgument):
        daemon.cut([Cut(VOL_A, layer_id(3), pool.path(layer_id(3)))] * 2)
    with pytest.raises(InvalidArgument):      # already in the chain
        daemon.cut([Cut(VOL_A, layer_id(1), pool.path(layer_id(1)))])
    with pytest.raises(VolumeNotOpen):
        daemon.cut([Cut("v-" + "c" * 32, layer_id(3), pool.path(layer_id(3)))])


def test_resize_shows_through_the_export(daemon: StorageDaemon, pool: Pool,
                                         run_dir: Path) -> None:
    pool.make(layer_id(1))
    daemon.open_chain(VOL_A, pool.chain(layer_id(1)), read_only=False)
    export = run_dir / "a.raw"
    daemon.export_fuse(VOL_A, export, writable=True)
    daemon.resize(VOL_A, 2 * SIZE)
    # The kernel caches the file's attributes for a second (QEMU's FUSE
    # export replies with a 1 s attribute timeout).
    assert wait_for(lambda: os.stat(export).st_size == 2 * SIZE, timeout=5)
    write(export, 2 * SIZE - BLOCK, b"\x77" * BLOCK)
    assert read(export, 2 * SIZE - BLOCK, BLOCK) == b"\x77" * BLOCK
    with pytest.raises(InvalidArgument):
        daemon.resize(VOL_A, 1000)
    assert daemon.size(VOL_A) == 2 * SIZE
    daemon.resize(VOL_A, 2 * SIZE)             # same size: nothing to do
    # block_resize would shrink a qcow2 image (and drop data): refused.
    with pytest.raises(OutOfRange):
        daemon.resize(VOL_A, SIZE)
    assert daemon.size(VOL_A) == 2 * SIZE


def test_stream_and_commit_keep_content(daemon: StorageDaemon, pool: Pool,
                                        run_dir: Path) -> None:
    fills = {1: 0x11, 2: 0x22, 3: 0x33, 4: 0x44}
    for n, fill in fills.items():
        pool.make(layer_id(n), backing=layer_id(n - 1) if n > 1 else None)
        qemu_io(pool.path(layer_id(n)), f"write -P {fill} {(n - 1) * MIB} 1M")
    daemon.open_chain(VOL_A, pool.chain(*(layer_id(n) for n in (4, 3, 2, 1))), read_only=False)
    export = run_dir / "a.raw"
    daemon.export_fuse(VOL_A, export, writable=True)
    expected = b"".join(bytes([fills[n]]) * MIB for n in (1, 2, 3, 4)) + bytes(MIB)

    def content() -> bytes:
        return read(export, 0, 5 * MIB)

    assert content() == expected

    with pytest.raises(InvalidArgument):
        daemon.stream(VOL_A, layer_id(2), layer_id(3))          # base above the layer
    with pytest.raises(NotFound):
        daemon.commit(VOL_A, layer_id(9), layer_id(1))

    # Stream layer 2 into layer 3 (base: layer 1).
    daemon.stream(VOL_A, layer_id(3), layer_id(1))
    assert daemon.chain(VOL_A) == [layer_id(4), layer_id(3), layer_id(1)]
    assert content() == expected
    assert backing_name(pool.path(layer_id(3))) == f"{layer_id(1)}.qcow2"
    assert node_name(VOL_A, layer_id(2)) not in volume_nodes(daemon, VOL_A)

    # Commit layer 3 into layer 1: layer 4 now backs onto layer 1.
    daemon.commit(VOL_A, layer_id(3), layer_id(1))
    assert daemon.chain(VOL_A) == [layer_id(4), layer_id(1)]
    assert content() == expected
    assert backing_name(pool.path(layer_id(4))) == f"{layer_id(1)}.qcow2"
    qemu_io(pool.path(layer_id(1)), f"read -P 0x22 {MIB} 1M", f"read -P 0x33 {2 * MIB} 1M",
            shared=True)

    # QEMU 7.2 refuses block jobs on the top under a writable FUSE export
    # (stream into it, active commit) ...
    with pytest.raises(TopExported, match="cut first"):
        daemon.commit(VOL_A, layer_id(4), layer_id(1))
    with pytest.raises(TopExported):
        daemon.stream(VOL_A, layer_id(4), None)
    assert daemon.chain(VOL_A) == [layer_id(4), layer_id(1)]
    assert content() == expected

    # ... so cut first, then flatten below the new top.
    pool.make(layer_id(5), backing=layer_id(4))
    daemon.cut([Cut(VOL_A, layer_id(5), pool.path(layer_id(5)))])
    daemon.stream(VOL_A, layer_id(4), None)
    assert daemon.chain(VOL_A) == [layer_id(5), layer_id(4)]
    assert content() == expected
    assert backing_name(pool.path(layer_id(4))) is None
    assert volume_nodes(daemon, VOL_A) == {node_name(VOL_A, layer_id(5)),
                                           node_name(VOL_A, layer_id(4))}


def test_jobs_on_the_top_without_export(daemon: StorageDaemon, pool: Pool,
                                        run_dir: Path) -> None:
    for n, fill in ((1, 0x11), (2, 0x22), (3, 0x33)):
        pool.make(layer_id(n), backing=layer_id(n - 1) if n > 1 else None)
        qemu_io(pool.path(layer_id(n)), f"write -P {fill} {(n - 1) * MIB} 1M")
    daemon.open_chain(VOL_A, pool.chain(layer_id(3), layer_id(2), layer_id(1)),
                      read_only=False)
    # Stream into the top, then an active commit of the top into the base
    # (completed when ready): the base becomes the volume's writable top.
    daemon.stream(VOL_A, layer_id(3), layer_id(1))
    assert daemon.chain(VOL_A) == [layer_id(3), layer_id(1)]
    daemon.commit(VOL_A, layer_id(3), layer_id(1))
    assert daemon.chain(VOL_A) == [layer_id(1)]
    assert daemon.top_layer(VOL_A) == layer_id(1)
    export = run_dir / "a.raw"
    daemon.export_fuse(VOL_A, export, writable=True)
    assert read(export, 0, 3 * MIB) == b"\x11" * MIB + b"\x22" * MIB + b"\x33" * MIB
    write(export, 3 * MIB, b"\x44" * BLOCK)                    # the base is the writable top
    qemu_io(pool.path(layer_id(1)), f"read -P 0x44 {3 * MIB} {BLOCK}", shared=True)


def test_killed_daemon_restarts_and_reserves(daemon: StorageDaemon, pool: Pool,
                                             run_dir: Path) -> None:
    pool.make(layer_id(1))
    qemu_io(pool.path(layer_id(1)), "write -P 0x61 0 1M")
    pool.make(layer_id(2), backing=layer_id(1))
    chain = pool.chain(layer_id(2), layer_id(1))
    daemon.open_chain(VOL_A, chain, read_only=False)
    export = run_dir / "a.raw"
    daemon.export_fuse(VOL_A, export, writable=True)
    write(export, MIB, b"\x62" * MIB)
    first_pid = daemon.pid
    assert first_pid is not None

    os.kill(first_pid, signal.SIGKILL)
    with pytest.raises(DaemonDied):
        for _ in range(100):                   # the connection notices the death
            daemon.exports()
            time.sleep(0.02)
    assert daemon.state is DaemonState.FAILED and not daemon.alive()
    with pytest.raises(OSError):               # a dead mount: ENOTCONN
        os.stat(export)

    assert daemon.ensure_running() is True
    assert daemon.pid != first_pid
    assert daemon.exports() == {} and export not in fuse_mounts()
    with pytest.raises(VolumeNotOpen):
        daemon.chain(VOL_A)
    daemon.open_chain(VOL_A, chain, read_only=False)
    daemon.export_fuse(VOL_A, export, writable=True)
    assert read(export, 0, 2 * MIB) == b"\x61" * MIB + b"\x62" * MIB


def test_attach_to_a_running_daemon_then_stop(pool: Pool, run_dir: Path) -> None:
    first = StorageDaemon(run_dir, timeout=15)
    try:
        assert first.ensure_running() is True
        assert first.ensure_running() is False        # already running
        assert first.alive() and first.state is DaemonState.RUNNING
        pool.make(layer_id(1))
        pool.make(layer_id(2), backing=layer_id(1))
        old_chain = pool.chain(layer_id(2), layer_id(1))
        first.open_chain(VOL_A, old_chain, read_only=False)
        export = run_dir / "a.raw"
        first.export_fuse(VOL_A, export, writable=True)
        write(export, 0, b"\x42" * BLOCK)
        # The plugin dies right after a cut, before its catalog said so.
        pool.make(layer_id(3), backing=layer_id(2))
        first.cut([Cut(VOL_A, layer_id(3), pool.path(layer_id(3)))])
        pid = first.pid
    finally:
        first.close()                                 # the plugin goes away, QSD stays
    assert qsd_pid(run_dir) == pid

    second = StorageDaemon(run_dir, timeout=15)
    try:
        assert second.ensure_running() is False       # attached, not started
        assert second.pid == pid
        assert second.exports() == {VOL_A: export}
        assert second.top_layer(VOL_A) == layer_id(3)
        # Re-opening the old chain tells the caller where the daemon is;
        # re-opening the daemon's chain adopts it.
        with pytest.raises(ChainMismatch) as mismatch:
            second.open_chain(VOL_A, old_chain, read_only=False)
        assert mismatch.value.found == [layer_id(3), layer_id(2), layer_id(1)]
        new_chain = pool.chain(layer_id(3), layer_id(2), layer_id(1))
        assert second.open_chain(VOL_A, new_chain, read_only=False) == \
            node_name(VOL_A, layer_id(3))
        second.export_fuse(VOL_A, export, writable=True)
        assert read(export, 0, BLOCK) == b"\x42" * BLOCK
        write(export, BLOCK, b"\x43" * BLOCK)
        assert own_blocks(pool.path(layer_id(3))) == {1}

        second.stop()
        assert second.state is DaemonState.STOPPED and not second.alive()
        assert qsd_pid(run_dir) is None and not _alive(pid)
        assert mounts_under(run_dir) == [] and not export.exists()
        assert not (run_dir / "qmp.sock").exists() and not (run_dir / "qsd.pid").exists()
        with pytest.raises(DaemonDied):
            second.exports()
        second.stop()                                 # idempotent
    finally:
        second.close()


def test_open_chain_completes_a_partial_chain_and_drops_strays(
        daemon: StorageDaemon, pool: Pool) -> None:
    for n in (1, 2, 3):
        pool.make(layer_id(n), backing=layer_id(n - 1) if n > 1 else None)
    # A stray whose node name sorts before the bottom's, so that picking the
    # chain by name alone would pick the stray.
    stray = next(n for n in range(10, 1000)
                 if node_name(VOL_A, layer_id(n)) < node_name(VOL_A, layer_id(1)))
    pool.make(layer_id(stray), backing=layer_id(3))
    # What an interrupted open_chain and a cut that failed to clean up leave.
    for n in (1, stray):
        daemon.qmp("blockdev-add", {
            "driver": "qcow2", "node-name": node_name(VOL_A, layer_id(n)), "read-only": n == 1,
            "file": {"driver": "file", "filename": str(pool.path(layer_id(n)))},
            "backing": None})
    daemon.open_chain(VOL_A, pool.chain(layer_id(3), layer_id(2), layer_id(1)), read_only=False)
    assert volume_nodes(daemon, VOL_A) == {node_name(VOL_A, layer_id(n)) for n in (1, 2, 3)}
    assert daemon.top_layer(VOL_A) == layer_id(3)
    # Cutting to a layer whose stray node existed works as well.
    daemon.qmp("blockdev-add", {
        "driver": "qcow2", "node-name": node_name(VOL_A, layer_id(stray)),
        "file": {"driver": "file", "filename": str(pool.path(layer_id(stray)))},
        "backing": None})
    daemon.cut([Cut(VOL_A, layer_id(stray), pool.path(layer_id(stray)))])
    assert daemon.top_layer(VOL_A) == layer_id(stray)
    daemon.close_chain(VOL_A)
    assert volume_nodes(daemon, VOL_A) == set()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in (b"Z", b"X")


def test_hung_daemon_times_out_and_a_second_client_does_not_kill_it(run_dir: Path) -> None:
    d = StorageDaemon(run_dir, timeout=1)
    try:
        assert d.ensure_running() is True
        pid = d.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(QmpTimeout):
                d.exports()
        finally:
            os.kill(pid, signal.SIGCONT)
        assert d.exports() == {} and d.alive()          # answers again
        # QMP serves one client at a time: a second one cannot attach, and
        # must not take the silence for a dead daemon.
        with StorageDaemon(run_dir, timeout=1) as other:
            with pytest.raises(DaemonStartError, match="another client"):
                other.ensure_running()
        assert qsd_pid(run_dir) == pid and d.alive()
    finally:
        d.stop()
        d.close()
    assert qsd_pid(run_dir) is None


def test_start_failure_is_typed(run_dir: Path) -> None:
    with StorageDaemon(run_dir, binary="/nonexistent/qemu-storage-daemon") as d:
        with pytest.raises(DaemonStartError):
            d.ensure_running()
        assert d.state is DaemonState.FAILED
        with pytest.raises(DaemonDied):
            d.qmp("query-version")
    with pytest.raises(InvalidArgument):
        StorageDaemon(run_dir / ("x" * 120))


def test_a_prepared_cut_switches_with_one_transaction_or_is_abandoned_cleanly(
        daemon: StorageDaemon, pool: Pool, run_dir: Path) -> None:
    pool.make(layer_id(1))
    daemon.open_chain(VOL_A, pool.chain(layer_id(1)), read_only=False)
    export = run_dir / "a.raw"
    daemon.export_fuse(VOL_A, export, writable=True)
    write(export, 0, b"\x11" * BLOCK)
    chain_nodes = volume_nodes(daemon, VOL_A)

    # Prepared, then abandoned: the overlay node comes and goes, the chain
    # and its data stay as they were.
    pool.make(layer_id(2), backing=layer_id(1))
    cut2 = [Cut(VOL_A, layer_id(2), pool.path(layer_id(2)))]
    daemon.prepare_cut(cut2)
    assert volume_nodes(daemon, VOL_A) == chain_nodes | {node_name(VOL_A, layer_id(2))}
    assert daemon.chain(VOL_A) == [layer_id(1)]
    daemon.abandon_cut(cut2)
    daemon.abandon_cut(cut2)                  # nothing left to abandon: no error
    assert volume_nodes(daemon, VOL_A) == chain_nodes
    assert read(export, 0, BLOCK) == b"\x11" * BLOCK

    # Prepared, then cut: the prepared node becomes the top; writes land in it.
    pool.make(layer_id(3), backing=layer_id(1))
    cut3 = [Cut(VOL_A, layer_id(3), pool.path(layer_id(3)))]
    daemon.prepare_cut(cut3)
    daemon.cut(cut3)
    assert daemon.chain(VOL_A) == [layer_id(3), layer_id(1)]
    write(export, BLOCK, b"\x22" * BLOCK)
    assert wait_for(lambda: own_blocks(pool.path(layer_id(3))) == {1})
    assert own_blocks(pool.path(layer_id(1))) == {0}
    assert read(export, 0, 2 * BLOCK) == b"\x11" * BLOCK + b"\x22" * BLOCK
    assert volume_nodes(daemon, VOL_A) == chain_nodes | {node_name(VOL_A, layer_id(3))}
