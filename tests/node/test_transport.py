"""Choosing how a served volume becomes a block device: NBD where the kernel
has it (and nbd-client is installed), FUSE export + loop device otherwise.

What runs for real here: detection on a fake /sys + /proc tree, the choice a
Node makes, the nbd-client command lines, and the attach/detach logic of
engine/devices.py against a fake sysfs and a stand-in nbd-client.  Staging
over a real kernel NBD device needs the nbd module, which this machine's
kernel lacks: that test is skipped with the reason.  (tests/node/test_qsd_nbd.py
checks the daemon's NBD export itself, through qemu-io.)
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.devices import (DeviceError, Devices, detect_transports, nbd_client_args, nbd_uri,
                            parse_nbd_uri)
from engine.errors import InvalidArgument
from engine.node import BLOCK, MOUNT, Access, Node
from engine.pool import Pool

MIB = 1 << 20


def fake_root(tmp: Path, *, nbd: bool) -> Path:
    """A /sys + /proc + /dev tree with FUSE and loop, and nbd if asked."""
    (tmp / "proc").mkdir(parents=True)
    (tmp / "proc/filesystems").write_text("nodev\tsysfs\nnodev\tfuse\n\text4\n")
    (tmp / "dev").mkdir()
    (tmp / "dev/fuse").touch()
    (tmp / "dev/loop-control").touch()
    (tmp / "sys/module/loop").mkdir(parents=True)
    if nbd:
        (tmp / "sys/module/nbd").mkdir(parents=True)
    return tmp


class NoNbdClient(Devices):
    def has_tool(self, name: str) -> bool:
        return name != "nbd-client" and super().has_tool(name)


class WithNbdClient(Devices):
    def has_tool(self, name: str) -> bool:
        return name == "nbd-client" or super().has_tool(name)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool.open(tmp_path / "pool")
    yield p
    p.close()


# -- detection and choice ----------------------------------------------------------

def test_without_the_nbd_module_the_node_serves_through_fuse(tmp_path: Path, pool: Pool) -> None:
    assert detect_transports(fake_root(tmp_path / "a", nbd=False)) == ["fuse"]
    assert detect_transports(fake_root(tmp_path / "b", nbd=True)) == ["nbd", "fuse"]

    node = Node(pool, tmp_path / "run", transports=detect_transports(
        fake_root(tmp_path / "c", nbd=False)), devices=WithNbdClient())
    assert node.transport == "fuse"


def test_nbd_is_preferred_only_with_nbd_client(tmp_path: Path, pool: Pool) -> None:
    with_module = detect_transports(fake_root(tmp_path / "a", nbd=True))
    assert Node(pool, tmp_path / "r1", transports=with_module,
                devices=WithNbdClient()).transport == "nbd"
    assert Node(pool, tmp_path / "r2", transports=with_module,
                devices=NoNbdClient()).transport == "fuse"
    # vduse alone is detected but not used: FUSE + loop.
    assert Node(pool, tmp_path / "r3", transports=["vduse", "fuse"],
                devices=WithNbdClient()).transport == "fuse"


def test_this_machine_chooses_what_its_kernel_has(tmp_path: Path, pool: Pool) -> None:
    node = Node(pool, tmp_path / "run")
    has_nbd = Path("/sys/module/nbd").exists() and node.devices.has_tool("nbd-client")
    assert node.transport == ("nbd" if has_nbd else "fuse")


# -- nbd-client command lines and URIs ---------------------------------------------

def test_nbd_client_arguments() -> None:
    sock = Path("/run/qsnap/node/qsd/nbd.sock")
    assert nbd_client_args(sock, "v-1", "/dev/nbd3", read_only=False) == [
        "-unix", str(sock), "/dev/nbd3", "-name", "v-1", "-block-size", "4096"]
    assert nbd_client_args(sock, "v-1", "/dev/nbd12", read_only=True)[-1] == "-readonly"
    for device in ("/dev/loop0", "/dev/nbd", "nbd0", "/dev/nbd0p1", "/dev/nbd0 -d"):
        with pytest.raises(InvalidArgument):
            nbd_client_args(sock, "v-1", device, read_only=False)
    with pytest.raises(InvalidArgument):
        nbd_client_args(Path("relative.sock"), "v-1", "/dev/nbd0", read_only=False)
    for name in ("", "-d", "a b"):
        with pytest.raises(InvalidArgument):
            nbd_client_args(sock, name, "/dev/nbd0", read_only=False)


def test_nbd_uri_round_trip() -> None:
    uri = nbd_uri(Path("/run/q/nbd.sock"), "v-abc")
    assert uri == "nbd+unix:///v-abc?socket=/run/q/nbd.sock"
    assert parse_nbd_uri(uri) == (Path("/run/q/nbd.sock"), "v-abc")
    for bad in ("/run/exports/v-abc", "nbd+unix:///v-abc", "nbd+unix:///?socket=/s",
                "nbd+unix:///v?socket=rel", "nbd://host/v"):
        with pytest.raises(InvalidArgument):
            parse_nbd_uri(bad)


# -- attach and detach against a fake sysfs and a stand-in nbd-client --------------

FAKE_CLIENT = """#!{python}
import os, sys
args = sys.argv[1:]
sysfs = {sysfs!r}
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
if args[0] == "-d":
    os.unlink(os.path.join(sysfs, "block", os.path.basename(args[1]), "pid"))
    sys.exit(0)
device = os.path.basename(args[2])
if device in {busy!r}:
    sys.stderr.write("Error: Failed to setup device, check dmesg\\nError: Device or resource busy\\n")
    sys.exit(1)
with open(os.path.join(sysfs, "block", device, "pid"), "w") as f:
    f.write("1\\n")
"""


@pytest.fixture
def fake_nbd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Devices, Path, Path]:
    sysfs = tmp_path / "sys"
    for i in range(4):
        (sysfs / "block" / f"nbd{i}").mkdir(parents=True)
    (sysfs / "block" / "loop0").mkdir()
    (sysfs / "block" / "nbd0" / "pid").write_text("77\n")      # someone else's
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls"
    client = bindir / "nbd-client"
    client.write_text(FAKE_CLIENT.format(python=sys.executable, sysfs=str(sysfs),
                                         log=str(log), busy=["nbd1"]))
    client.chmod(client.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return Devices(sys_root=sysfs, timeout=30), sysfs, log


def test_attach_takes_a_free_device_and_detach_disconnects(
        fake_nbd: tuple[Devices, Path, Path]) -> None:
    devices, _, log = fake_nbd
    sock = Path("/run/q/nbd.sock")
    assert devices.nbd_devices() == {"/dev/nbd0": True, "/dev/nbd1": False,
                                     "/dev/nbd2": False, "/dev/nbd3": False}
    # nbd0 is connected (skipped), nbd1 is taken meanwhile (busy: next one).
    device = devices.attach_nbd(sock, "v-1", read_only=False)
    assert device == "/dev/nbd2" and devices.nbd_connected(device)
    # The device a volume had before is preferred when free.
    assert devices.attach_nbd(sock, "v-2", read_only=True, prefer="/dev/nbd3") == "/dev/nbd3"
    assert devices.detach_nbd("/dev/nbd2") is True
    assert devices.detach_nbd("/dev/nbd2") is False                   # idempotent
    assert not devices.nbd_connected("/dev/nbd2")
    calls = log.read_text().splitlines()
    assert calls == [
        f"-unix {sock} /dev/nbd1 -name v-1 -block-size 4096",
        f"-unix {sock} /dev/nbd2 -name v-1 -block-size 4096",
        f"-unix {sock} /dev/nbd3 -name v-2 -block-size 4096 -readonly",
        "-d /dev/nbd2",
    ]


def test_attach_without_nbd_devices_says_why(tmp_path: Path) -> None:
    (tmp_path / "block" / "loop0").mkdir(parents=True)
    with pytest.raises(DeviceError, match="nbd kernel module is not loaded"):
        Devices(sys_root=tmp_path).attach_nbd(Path("/s"), "v-1", read_only=False)


def test_all_devices_busy(fake_nbd: tuple[Devices, Path, Path]) -> None:
    devices, sysfs, _ = fake_nbd
    for i in (2, 3):
        (sysfs / "block" / f"nbd{i}" / "pid").write_text("1\n")
    with pytest.raises(DeviceError, match="no free NBD device"):
        devices.attach_nbd(Path("/s"), "v-1", read_only=False)


# -- the real thing ---------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.skipif(shutil.which("nbd-client", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
                    is None, reason="nbd-client is not installed (Debian package nbd-client)")
@pytest.mark.skipif(not Path("/sys/module/nbd").exists(),
                    reason="no nbd module in this kernel")
def test_stage_over_a_kernel_nbd_device(pool: Pool) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="qsnap-nbd-", dir="/tmp"))
    node = Node(pool, run_dir, transports=["nbd", "fuse"])
    assert node.transport == "nbd"
    node.start()
    block = pool.create_volume("nbd-block", required_bytes=64 * MIB)
    fs = pool.create_volume("nbd-fs", required_bytes=64 * MIB)
    try:
        staging = node.stage(block.id, run_dir / "b", Access(BLOCK))
        assert staging.export_path.startswith("nbd+unix://")
        assert staging.device.startswith("/dev/nbd")
        with open(staging.device, "r+b", buffering=0) as f:
            f.write(b"\xab" * MIB)
            os.fsync(f.fileno())
        pool.create_snapshot("nbd-snap", block.id)            # a live cut over NBD
        with open(staging.device, "rb", buffering=0) as f:
            assert f.read(MIB) == b"\xab" * MIB

        mounted = node.stage(fs.id, run_dir / "m", Access(MOUNT, "ext4"))
        (run_dir / "m" / "file").write_text("over nbd")
        # A restarted daemon: the node reconnects the devices (same paths
        # where free) and remounts.
        pid = node.qsd.pid
        assert pid is not None
        os.kill(pid, 9)
        node.recover()
        assert (run_dir / "m" / "file").read_text() == "over nbd"
        assert node._staging(fs.id).device == mounted.device
    finally:
        for volume in (block, fs):
            with pool.catalog.reading() as tx:
                staging_now = tx.staging(volume.id)
            if staging_now is not None:
                node.unstage(volume.id, Path(staging_now.staging_path))
        node.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not any(connected for d, connected in Devices().nbd_devices().items()
                   if (run_dir / "nbd" / Path(d).name).exists())
