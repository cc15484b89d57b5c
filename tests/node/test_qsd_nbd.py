"""engine/qsd.py's NBD export against a real qemu-storage-daemon: the export
serves the chain, takes writes into the top, follows a live cut, and goes
away cleanly.  Read and written with ``qemu-io`` over
``nbd+unix:///<volume>?socket=...`` -- no kernel NBD module is needed for
that (this machine has none)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("qemu.qmp")

from engine import qcow2  # noqa: E402
from engine.errors import AlreadyExists, FailedPrecondition  # noqa: E402
from engine.qsd import Cut, StorageDaemon, fuse_mounts  # noqa: E402

QSD = shutil.which("qemu-storage-daemon")
QEMU_IO = shutil.which("qemu-io")
pytestmark = pytest.mark.skipif(not (QSD and QEMU_IO),
                                reason="needs qemu-storage-daemon and qemu-io")

MIB = 1 << 20
SIZE = 64 * MIB
VOL = "v-" + "c" * 32
VOL2 = "v-" + "d" * 32


def layer(n: int) -> str:
    return f"l-{n:032x}"


def qemu_io(target: str, *commands: str, fmt: str = "raw", shared: bool = False) -> str:
    argv = [QEMU_IO or "qemu-io", "-f", fmt] + (["-r", "-U"] if shared else [])
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run(argv + [target], capture_output=True, text=True, timeout=60,
                          check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"qemu-io {commands} {target}:\n{out}"
    assert "verification failed" not in out and "Pattern verification" not in out, out
    return out


@pytest.fixture
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qsnap-nbd-", dir="/tmp"))
    yield d
    try:
        pid = int((d / "qsd.pid").read_text())
        if b"qemu-storage-daemon" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(root: Path) -> Iterator[StorageDaemon]:
    d = StorageDaemon(root, timeout=15)
    d.ensure_running()
    yield d
    d.stop()
    d.close()
    assert not (root / "nbd.sock").exists()


def make(root: Path, n: int, backing: int | None = None) -> Path:
    (root / "layers").mkdir(exist_ok=True)
    path = root / "layers" / f"{layer(n)}.qcow2"
    qcow2.write_image(path, SIZE, f"{layer(backing)}.qcow2" if backing is not None else None)
    return path


def test_nbd_export_serves_the_chain_and_follows_a_cut(daemon: StorageDaemon,
                                                       root: Path) -> None:
    base = make(root, 1)
    qemu_io(str(base), "write -P 0x11 0 1M", fmt="qcow2")
    top = make(root, 2, backing=1)
    daemon.open_chain(VOL, [(layer(2), top), (layer(1), base)], read_only=False)
    uri = daemon.export_nbd(VOL, writable=True)
    assert uri == f"nbd+unix:///{VOL}?socket={root / 'nbd.sock'}"
    assert daemon.export_nbd(VOL, writable=True) == uri                 # idempotent
    assert daemon.nbd_exports() == {VOL: uri}
    assert daemon.exports() == {}                                        # no FUSE export
    with pytest.raises(AlreadyExists):
        daemon.export_fuse(VOL, root / "vol.raw", writable=True)

    # The chain reads through the export; writes land in the top.
    qemu_io(uri, "read -P 0x11 0 1M", "write -P 0x22 1M 1M")
    qemu_io(str(top), "read -P 0x22 1M 1M", fmt="qcow2", shared=True)
    qemu_io(str(base), "read -P 0 1M 1M", fmt="qcow2", shared=True)

    # A live cut: the export follows the new top without being re-made.
    over = make(root, 3, backing=2)
    daemon.cut([Cut(VOL, layer(3), over)])
    assert daemon.top_layer(VOL) == layer(3)
    assert daemon.nbd_exports() == {VOL: uri}
    qemu_io(uri, "read -P 0x11 0 1M", "read -P 0x22 1M 1M", "write -P 0x33 2M 1M")
    qemu_io(str(over), "read -P 0x33 2M 1M", fmt="qcow2", shared=True)
    qemu_io(str(top), "read -P 0 2M 1M", fmt="qcow2", shared=True)     # the cut layer is frozen

    # Block jobs below the exported top work as with FUSE.
    daemon.commit(VOL, layer(2), layer(1))
    assert daemon.chain(VOL) == [layer(3), layer(1)]
    qemu_io(uri, "read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x33 2M 1M")

    daemon.close_chain(VOL)
    assert daemon.nbd_exports() == {}
    assert fuse_mounts().isdisjoint({root / "vol.raw"})


def test_nbd_exports_share_the_server_and_cut_together(daemon: StorageDaemon,
                                                               root: Path) -> None:
    a, b = make(root, 1), make(root, 2)
    daemon.open_chain(VOL, [(layer(1), a)], read_only=False)
    daemon.open_chain(VOL2, [(layer(2), b)], read_only=False)
    ua = daemon.export_nbd(VOL, writable=True)
    ub = daemon.export_nbd(VOL2, writable=True)
    qemu_io(ua, "write -P 0xaa 0 64k")
    qemu_io(ub, "write -P 0xbb 0 64k")
    qemu_io(ua, "read -P 0xaa 0 64k")
    qemu_io(ub, "read -P 0xbb 0 64k")

    # A group cut across both NBD-exported volumes, then growth of one.
    a2, b2 = make(root, 3, backing=1), make(root, 4, backing=2)
    daemon.cut([Cut(VOL, layer(3), a2), Cut(VOL2, layer(4), b2)])
    qemu_io(ua, "read -P 0xaa 0 64k", "write -P 0xa1 64k 64k")
    qemu_io(ub, "read -P 0xbb 0 64k")

    # QEMU 7.2's NBD export holds the node's size: growth is refused up front
    # (the kernel's NBD device could not follow anyway); without the export
    # the node grows, and a new export serves the new size.
    with pytest.raises(FailedPrecondition, match="NBD"):
        daemon.resize(VOL, 2 * SIZE)
    daemon.unexport(VOL)
    daemon.resize(VOL, 2 * SIZE)
    ua = daemon.export_nbd(VOL, writable=True)
    qemu_io(ua, f"write -P 0xcc {SIZE} 64k", f"read -P 0xcc {SIZE} 64k", "read -P 0xa1 64k 64k")

    # The export is removed with the volume and the server keeps serving.
    daemon.unexport(VOL)
    assert daemon.nbd_exports() == {VOL2: ub}
    qemu_io(ub, "read -P 0xbb 0 64k")


def test_nbd_export_survives_a_plugin_restart(root: Path) -> None:
    """A new daemon object attaches to the running daemon: the NBD server and
    export are still there, and exporting again is a no-op."""
    first = StorageDaemon(root, timeout=15)
    first.ensure_running()
    path = make(root, 1)
    first.open_chain(VOL, [(layer(1), path)], read_only=False)
    uri = first.export_nbd(VOL, writable=True)
    qemu_io(uri, "write -P 0x5a 0 64k")
    first.close()                                   # the plugin exits; the daemon runs on

    second = StorageDaemon(root, timeout=15)
    try:
        assert second.ensure_running() is False
        second.open_chain(VOL, [(layer(1), path)], read_only=False)
        assert second.export_nbd(VOL, writable=True) == uri
        qemu_io(uri, "read -P 0x5a 0 64k")
    finally:
        second.stop()
        second.close()
    deadline = time.monotonic() + 5
    while (root / "qsd.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not (root / "nbd.sock").exists()
