"""engine.devices against the real kernel: loop devices on sparse files in
temporary directories, ext4 and xfs made on them, real mounts, binds,
freezes and online grows.  Nothing is mocked.

Loop devices are shared with every other process on the machine, so a test
only ever detaches the devices it attached itself (the ``host`` fixture
records them and removes them, and every mount, at teardown -- also when
the test fails).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.devices import (DeviceBusy, DeviceError, Devices, NotBlank, detect_transports,
                            parse_mountinfo, validate_mount_flags)
from engine.errors import FailedPrecondition, InUse, InvalidArgument, NotFound

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/loop-control").exists()
    or shutil.which("mkfs.xfs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None,
    reason="needs root, loop devices, e2fsprogs and xfsprogs")

MiB = 1 << 20
EXT4_SIZE = 64 * MiB
XFS_SIZE = 320 * MiB     # mkfs.xfs refuses anything under 300 MB


class Host:
    """Makes backing files, loop devices and mounts for one test and
    removes all of them (only those) in :meth:`cleanup`."""

    def __init__(self, devices: Devices, workdir: Path) -> None:
        self.dev = devices
        self.workdir = workdir
        self.loops: list[tuple[str, Path]] = []
        self.targets: list[Path] = []

    def image(self, name: str, size: int) -> Path:
        path = self.workdir / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def attach(self, path: Path, *, read_only: bool = False) -> str:
        device = self.dev.attach_loop(path, read_only=read_only)
        self.loops.append((device, path))
        return device

    def blank(self, name: str, size: int = EXT4_SIZE) -> tuple[str, Path]:
        path = self.image(name, size)
        return self.attach(path), path

    def formatted(self, name: str, fs_type: str) -> tuple[str, Path]:
        device, path = self.blank(name, XFS_SIZE if fs_type == "xfs" else EXT4_SIZE)
        self.dev.make_filesystem(device, fs_type)
        return device, path

    def directory(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def track(self, target: Path) -> Path:
        """Record a mount target (before mounting, so that a half-done
        mount is cleaned up as well)."""
        self.targets.append(target)
        return target

    def mount(self, device: str, name: str, fs_type: str, flags: list[str] | None = None,
              *, read_only: bool = False) -> Path:
        target = self.track(self.directory(name))
        self.dev.mount(device, target, fs_type, flags or [], read_only=read_only)
        return target

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        for target in reversed(self.targets):
            try:
                if self.dev.is_mountpoint(target):
                    # A frozen filesystem would hang the writer threads (and
                    # a bound device node cannot be thawed at all).
                    with contextlib.suppress(Exception):
                        self.dev.thaw(target)
                    try:
                        self.dev.unmount(target)
                    except DeviceBusy:
                        self.dev.unmount(target, lazy=True)
            except Exception as e:  # keep going: the loops must go too
                problems.append(f"unmount {target}: {e}")
        for device, path in reversed(self.loops):
            try:
                self.dev.detach_loop(device, expected_backing=path)
            except Exception as e:
                problems.append(f"detach {device}: {e}")
        return problems


@pytest.fixture
def devices() -> Devices:
    return Devices(timeout=60)


@pytest.fixture
def host(devices: Devices, tmp_path: Path) -> Iterator[Host]:
    h = Host(devices, tmp_path)
    try:
        yield h
    finally:
        problems = h.cleanup()
    assert not problems, problems


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def pread(path: Path | str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def pwrite(path: Path | str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# -- kernel features ---------------------------------------------------------

def test_detect_transports_on_this_kernel() -> None:
    found = detect_transports()
    assert found == [t for t in ("nbd", "vduse", "fuse") if t in found]  # preference order
    assert ("fuse" in found) == Path("/dev/fuse").exists()
    if not Path("/sys/module/nbd").exists() and not Path("/dev/nbd0").exists():
        assert "nbd" not in found


def test_detect_transports_reads_the_tree(tmp_path: Path) -> None:
    def touch(rel: str) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()

    assert detect_transports(tmp_path) == []
    touch("proc/filesystems")
    (tmp_path / "proc/filesystems").write_text("nodev\tsysfs\nnodev\tfuse\nnodev\tfusectl\n\text4\n")
    touch("dev/fuse")
    assert detect_transports(tmp_path) == []        # no loop devices: no fuse+loop
    touch("dev/loop-control")
    assert detect_transports(tmp_path) == ["fuse"]
    (tmp_path / "sys/module/nbd").mkdir(parents=True)
    touch("dev/vduse/control")
    assert detect_transports(tmp_path) == ["nbd", "vduse", "fuse"]
    (tmp_path / "proc/filesystems").write_text("nodev\tfusectl\n")   # fusectl is not fuse
    assert detect_transports(tmp_path) == ["nbd", "vduse"]


# -- loop devices ------------------------------------------------------------

def test_attach_two_detach_one(host: Host, devices: Devices) -> None:
    dev_a, a = host.blank("a.img")
    dev_b, b = host.blank("b.img")
    assert dev_a != dev_b
    assert devices.find_loops(a) == [dev_a]
    assert devices.find_loops(b) == [dev_b]
    assert devices.loop_backing(dev_a) == a.resolve()
    loops = {loop.name: loop for loop in devices.list_loops()}
    assert not loops[dev_a].direct_io and not loops[dev_a].read_only  # buffered, never direct I/O

    assert devices.detach_loop(dev_a, expected_backing=a) is True
    assert devices.find_loops(a) == []
    assert devices.loop_backing(dev_a) != a.resolve()
    assert devices.find_loops(b) == [dev_b]
    assert devices.device_size(dev_b) == EXT4_SIZE
    # Idempotent: nothing of ours is left on dev_a.
    assert devices.detach_loop(dev_a, expected_backing=a) is False


def test_detach_never_touches_another_file(host: Host, devices: Devices) -> None:
    dev_a, a = host.blank("a.img")
    dev_b, b = host.blank("b.img")
    assert devices.detach_loop(dev_b, expected_backing=a) is False
    assert devices.find_loops(b) == [dev_b]
    assert devices.find_loops(a) == [dev_a]


def test_detach_while_held_open_is_reported(host: Host, devices: Devices) -> None:
    device, path = host.blank("a.img")
    fd = os.open(device, os.O_RDONLY)
    try:
        with pytest.raises(DeviceBusy) as caught:
            devices.detach_loop(device, expected_backing=path, settle=0.2)
        assert isinstance(caught.value, InUse)
        assert devices.find_loops(path) == [device]   # still bound, marked to go on last close
    finally:
        os.close(fd)
    assert devices.detach_loop(device, expected_backing=path) in (True, False)
    assert devices.find_loops(path) == []


def test_same_file_attached_twice_and_read_only(host: Host, devices: Devices) -> None:
    path = host.image("a.img", EXT4_SIZE)
    rw = host.attach(path)
    ro = host.attach(path, read_only=True)
    assert sorted(devices.find_loops(path)) == sorted([rw, ro])
    loops = {loop.name: loop for loop in devices.list_loops()}
    assert loops[ro].read_only and not loops[rw].read_only
    # The kernel lets a read-only loop device be opened for writing; the
    # write itself is refused.
    fd = os.open(ro, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as caught:
            os.write(fd, b"x" * 4096)
        assert caught.value.errno in (errno.EPERM, errno.EROFS, errno.EACCES)
    finally:
        os.close(fd)


def test_stale_loop_of_a_replaced_file(host: Host, devices: Devices) -> None:
    device, path = host.blank("a.img")
    path.unlink()
    host.image("a.img", EXT4_SIZE)     # a new file at the same path
    assert devices.find_loops(path) == []
    assert devices.find_loops(path, include_stale=True) == [device]
    assert devices.detach_loop(device, expected_backing=path) is True
    assert devices.find_loops(path, include_stale=True) == []


def test_attach_refuses_missing_and_non_files(host: Host, devices: Devices, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        devices.attach_loop(tmp_path / "missing.img", read_only=False)
    with pytest.raises(InvalidArgument):
        devices.attach_loop(tmp_path, read_only=False)
    with pytest.raises(DeviceError):
        devices.loop_backing("/dev/null")


# -- filesystems -------------------------------------------------------------

@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_blank_until_formatted(host: Host, devices: Devices, fs_type: str) -> None:
    device, _ = host.blank("v.img", XFS_SIZE if fs_type == "xfs" else EXT4_SIZE)
    assert devices.is_blank(device)
    assert devices.filesystem_type(device) is None
    devices.make_filesystem(device, fs_type)
    assert not devices.is_blank(device)
    assert devices.filesystem_type(device) == fs_type
    assert fs_type in devices.signatures(device)


def test_never_formats_over_a_filesystem(host: Host, devices: Devices) -> None:
    device, _ = host.formatted("v.img", "ext4")
    target = host.mount(device, "m", "ext4")
    write_file(target / "keep", b"precious" * 1000)
    devices.unmount(target)
    for fs_type in ("xfs", "ext4"):
        with pytest.raises(NotBlank) as caught:
            devices.make_filesystem(device, fs_type)
        assert isinstance(caught.value, FailedPrecondition)
        assert "ext4" in caught.value.found
    devices.mount(device, target, "ext4", [], read_only=False)
    assert (target / "keep").read_bytes() == b"precious" * 1000


@pytest.mark.parametrize("offset", [0, 8192, EXT4_SIZE - 4096])
def test_never_formats_over_raw_data(host: Host, devices: Devices, offset: int) -> None:
    device, _ = host.blank("v.img")
    data = os.urandom(4096)
    pwrite(device, offset, data)
    assert devices.signatures(device) == []
    assert not devices.is_blank(device)
    with pytest.raises(NotBlank):
        devices.make_filesystem(device, "ext4")
    assert pread(device, offset, 4096) == data


def test_partition_table_is_not_blank(host: Host, devices: Devices) -> None:
    # A DOS partition table written by hand (no fdisk needed): one Linux
    # partition from sector 2048 to the end, and the 0x55AA boot signature.
    path = host.image("v.img", EXT4_SIZE)
    sectors = EXT4_SIZE // 512 - 2048
    entry = (bytes([0x00, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little")
             + sectors.to_bytes(4, "little"))
    pwrite(path, 446, entry)
    pwrite(path, 510, b"\x55\xaa")
    device = host.attach(path)
    assert "dos" in devices.signatures(device)
    assert devices.filesystem_type(device) is None
    with pytest.raises(NotBlank) as caught:
        devices.make_filesystem(device, "xfs")
    assert "dos" in caught.value.found


@pytest.mark.parametrize("fs_type", ["btrfs", "vfat", "ext3", "ext4 -F", ""])
def test_only_ext4_and_xfs(host: Host, devices: Devices, fs_type: str) -> None:
    device, _ = host.blank("v.img")
    with pytest.raises(InvalidArgument):
        devices.make_filesystem(device, fs_type)
    assert devices.is_blank(device)


def test_missing_device(devices: Devices, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        devices.is_blank(str(tmp_path / "nodev"))
    with pytest.raises(InvalidArgument):
        devices.device_size(str(tmp_path))


# -- mounts ------------------------------------------------------------------

def test_mount_with_flags(host: Host, devices: Devices) -> None:
    device, _ = host.formatted("v.img", "ext4")
    target = host.mount(device, "stage", "ext4", ["noatime", "nodev", "commit=30"])
    info = devices.mount_info(target)
    assert info is not None
    assert "noatime" in info.options and "nodev" in info.options and not info.read_only
    assert info.fs_type == "ext4"
    assert devices.is_mountpoint(target)
    assert devices.mount_source(target) == device
    write_file(target / "f", b"data")
    # Idempotent: the same mount again is a no-op, not a second layer.
    devices.mount(device, target, "ext4", ["noatime"], read_only=False)
    assert sum(m.mount_point == str(target) for m in devices.mounts()) == 1
    with pytest.raises(FailedPrecondition):
        devices.mount(device, target, "ext4", [], read_only=True)
    other, _ = host.formatted("w.img", "ext4")
    with pytest.raises(FailedPrecondition):
        devices.mount(other, target, "ext4", [], read_only=False)


def test_read_only_mount_refuses_writes(host: Host, devices: Devices) -> None:
    device, _ = host.formatted("v.img", "ext4")
    target = host.mount(device, "stage", "ext4", read_only=True)
    info = devices.mount_info(target)
    assert info is not None and info.read_only
    with pytest.raises(OSError) as caught:
        write_file(target / "f", b"x")
    assert caught.value.errno == errno.EROFS


def test_read_only_device_is_never_mounted_read_write(host: Host, devices: Devices) -> None:
    device, path = host.formatted("v.img", "ext4")
    ro_device = host.attach(path, read_only=True)
    devices.detach_loop(device, expected_backing=path)
    target = host.track(host.directory("stage"))
    with pytest.raises(FailedPrecondition):
        devices.mount(ro_device, target, "ext4", [], read_only=False)
    assert not devices.is_mountpoint(target)
    devices.mount(ro_device, target, "ext4", [], read_only=True)
    assert devices.mount_info(target).read_only   # type: ignore[union-attr]


def test_xfs_clones_with_one_uuid_mount_together(host: Host, devices: Devices) -> None:
    device, path = host.formatted("v.img", "xfs")
    clone = host.workdir / "clone.img"
    subprocess.run(["cp", "--sparse=always", str(path), str(clone)], check=True)
    clone_device = host.attach(clone)
    host.mount(device, "a", "xfs")
    b = host.mount(clone_device, "b", "xfs")
    write_file(b / "f", b"x")


@pytest.mark.parametrize("flag", [
    "noatime,suid", "ro,exec", "noatime,", ",", "", " noatime", "a b", "noatime\n",
    "data=ordered,exec", 'context="x"', "-o", "--bind", "bind", "rbind", "move", "remount",
    "loop", "offset=0", "helper=evil", "X-mount.mkdir", "x-systemd.automount", "rw", "ro",
    "uid=0;id", "noatime\x00",
])
def test_mount_flag_injection_refused(host: Host, devices: Devices, flag: str) -> None:
    device, _ = host.formatted("v.img", "ext4")
    target = host.track(host.directory("stage"))
    with pytest.raises(InvalidArgument):
        devices.mount(device, target, "ext4", ["noatime", flag], read_only=False)
    assert not devices.is_mountpoint(target)


def test_plain_flags_pass_validation() -> None:
    flags = ["noatime", "nodiratime", "data=ordered", "commit=30", "errors=remount-ro",
             "discard", "logbufs=8", "inode64"]
    assert validate_mount_flags(flags) == flags


def test_bind_mounts_rw_and_ro(host: Host, devices: Devices) -> None:
    device, _ = host.formatted("v.img", "ext4")
    stage = host.mount(device, "stage", "ext4")
    rw = host.track(host.directory("pub-rw"))
    ro = host.track(host.directory("pub-ro"))
    devices.bind_mount(stage, rw, read_only=False)
    devices.bind_mount(stage, ro, read_only=True)
    devices.bind_mount(stage, ro, read_only=True)   # idempotent
    assert sum(m.mount_point == str(ro) for m in devices.mounts()) == 1

    write_file(rw / "via-rw", b"hello")
    assert (stage / "via-rw").read_bytes() == b"hello"
    assert (ro / "via-rw").read_bytes() == b"hello"
    with pytest.raises(OSError) as caught:
        write_file(ro / "via-ro", b"x")
    assert caught.value.errno == errno.EROFS
    info = devices.mount_info(ro)
    assert info is not None and info.read_only
    assert not devices.mount_info(stage).read_only    # type: ignore[union-attr]
    write_file(stage / "still-writable", b"y")
    with pytest.raises(FailedPrecondition):
        devices.bind_mount(stage, ro, read_only=False)

    devices.unmount(ro)
    devices.unmount(rw)
    assert devices.is_mountpoint(stage)


def test_bind_mount_of_a_device_node(host: Host, devices: Devices) -> None:
    device, _ = host.blank("v.img")
    node = host.workdir / "block-target"
    node.touch()
    host.track(node)
    devices.bind_mount(Path(device), node, read_only=False)
    assert devices.is_mountpoint(node)
    assert os.stat(node).st_rdev == os.stat(device).st_rdev
    pwrite(node, 0, b"through the bind")
    assert pread(device, 0, 16) == b"through the bind"


def test_unmount_idempotent(host: Host, devices: Devices, tmp_path: Path) -> None:
    device, _ = host.formatted("v.img", "ext4")
    target = host.mount(device, "stage", "ext4")
    devices.unmount(target)
    assert not devices.is_mountpoint(target)
    devices.unmount(target)
    devices.unmount(tmp_path / "never-mounted-or-made")
    devices.unmount(host.directory("plain-dir"))


def test_unmount_busy_then_lazy(host: Host, devices: Devices) -> None:
    device, _ = host.formatted("v.img", "ext4")
    target = host.mount(device, "stage", "ext4")
    with open(target / "open-file", "wb") as f:
        with pytest.raises(DeviceBusy):
            devices.unmount(target)
        assert devices.is_mountpoint(target)
        devices.unmount(target, lazy=True)
        assert not devices.is_mountpoint(target)


def test_unmount_removes_stacked_mounts(host: Host, devices: Devices) -> None:
    device, _ = host.formatted("v.img", "ext4")
    stage = host.mount(device, "stage", "ext4")
    target = host.track(host.directory("pub"))
    for _ in range(3):
        subprocess.run(["mount", "--bind", str(stage), str(target)], check=True)
    assert sum(m.mount_point == str(target) for m in devices.mounts()) == 3
    devices.unmount(target)
    assert not devices.is_mountpoint(target)
    assert devices.is_mountpoint(stage)


def test_mountpoint_with_escaped_characters(host: Host, devices: Devices) -> None:
    device, _ = host.formatted("v.img", "ext4")
    target = host.mount(device, "a b\tc\\d", "ext4")
    assert "\\040" in Path("/proc/self/mountinfo").read_text()
    assert devices.is_mountpoint(target)
    assert devices.mount_source(target) == device
    devices.unmount(target)
    assert not devices.is_mountpoint(target)


def test_parse_mountinfo() -> None:
    text = ("36 35 98:0 /mnt1 /mnt\\0402 rw,noatime master:1 shared:7 - ext3 /dev/root "
            "rw,errors=continue\n"
            "40 36 7:3 / /srv/a\\011b ro,relatime - xfs /dev/loop3 ro,nouuid\n")
    first, second = parse_mountinfo(text)
    assert (first.mount_id, first.parent_id, first.major, first.minor) == (36, 35, 98, 0)
    assert first.root == "/mnt1" and first.mount_point == "/mnt 2"
    assert first.options == ("rw", "noatime") and not first.read_only
    assert first.fs_type == "ext3" and first.source == "/dev/root"
    assert first.super_options == ("rw", "errors=continue")
    assert second.mount_point == "/srv/a\tb" and second.read_only and second.source == "/dev/loop3"
    with pytest.raises(DeviceError):
        parse_mountinfo("garbage line\n")


# -- freezing ----------------------------------------------------------------

def start_writer(path: Path) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def write() -> None:
        write_file(path, b"w" * 65536)
        done.set()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread, done


def test_freeze_blocks_writers_until_thaw(host: Host, devices: Devices) -> None:
    device, _ = host.formatted("v.img", "ext4")
    target = host.mount(device, "stage", "ext4")
    devices.freeze(target)
    try:
        thread, done = start_writer(target / "during-freeze")
        assert not done.wait(0.5), "a write completed on a frozen filesystem"
        with pytest.raises(DeviceBusy):
            devices.freeze(target)
    finally:
        devices.thaw(target)
    assert done.wait(10), "the write did not complete after the thaw"
    thread.join(5)
    assert (target / "during-freeze").read_bytes() == b"w" * 65536
    devices.thaw(target)   # idempotent


def test_frozen_context_thaws_on_exception(host: Host, devices: Devices) -> None:
    device, _ = host.formatted("v.img", "xfs")
    target = host.mount(device, "stage", "xfs")
    with pytest.raises(RuntimeError):
        with devices.frozen(target):
            thread, done = start_writer(target / "f")
            assert not done.wait(0.3)
            raise RuntimeError("the snapshot failed")
    assert done.wait(10), "the context manager left the filesystem frozen"
    thread.join(5)
    with devices.frozen(target):
        pass
    _, done = start_writer(target / "g")
    assert done.wait(10)


def test_freeze_only_a_mountpoint(host: Host, devices: Devices) -> None:
    # A subdirectory of our own mount: if the check were missing, fsfreeze
    # would freeze our test filesystem (and teardown thaws it), never the
    # machine's root filesystem.
    device, _ = host.formatted("v.img", "ext4")
    target = host.mount(device, "stage", "ext4")
    sub = target / "sub"
    sub.mkdir()
    with pytest.raises(FailedPrecondition):
        devices.freeze(sub)
    with pytest.raises(FailedPrecondition):
        with devices.frozen(sub):
            pass
    _, done = start_writer(target / "f")
    assert done.wait(10)


# -- sizes -------------------------------------------------------------------

def df_size(path: Path) -> int:
    out = subprocess.run(["df", "-B1", "--output=size", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])


def has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def enlarge(devices: Devices, device: str, path: Path, before: int, after: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(after)
    assert devices.device_size(device) == before      # the loop keeps its old size...
    assert devices.set_loop_capacity(device) == after  # ...until told


@pytest.mark.parametrize("fs_type,before,after", [
    ("ext4", EXT4_SIZE, 3 * EXT4_SIZE),
    ("xfs", XFS_SIZE, 2 * XFS_SIZE),
])
def test_grow_online_after_enlarging_the_backing_file(host: Host, devices: Devices, fs_type: str,
                                                      before: int, after: int) -> None:
    device, path = host.formatted("v.img", fs_type)
    target = host.mount(device, "stage", fs_type)
    write_file(target / "keep", b"k" * 4096)
    small = devices.usage(target).bytes_total
    assert small == df_size(target)

    enlarge(devices, device, path, before, after)
    if fs_type == "ext4" and not has_cap_sys_resource():
        # This machine drops CAP_SYS_RESOURCE, which ext4's resize ioctl
        # demands: the failure must say so (the unmounted grow is below).
        with pytest.raises(DeviceError, match="CAP_SYS_RESOURCE"):
            devices.grow_filesystem(device, target, fs_type)
        assert devices.usage(target).bytes_total == small
        pytest.skip("online ext4 resize needs CAP_SYS_RESOURCE, which this process lacks")
    devices.grow_filesystem(device, target, fs_type)
    grown = devices.usage(target).bytes_total
    assert grown == df_size(target)
    assert grown - small > (after - before) * 0.9
    assert (target / "keep").read_bytes() == b"k" * 4096
    devices.grow_filesystem(device, target, fs_type)   # nothing left to grow: a no-op


def test_grow_ext4_unmounted(host: Host, devices: Devices) -> None:
    device, path = host.formatted("v.img", "ext4")
    target = host.mount(device, "stage", "ext4")
    write_file(target / "keep", b"k" * 4096)
    small = devices.usage(target).bytes_total
    enlarge(devices, device, path, EXT4_SIZE, 3 * EXT4_SIZE)
    with pytest.raises(FailedPrecondition):
        devices.grow_filesystem(device, None, "ext4")   # still mounted: no e2fsck
    devices.unmount(target)
    devices.grow_filesystem(device, None, "ext4")
    devices.grow_filesystem(device, None, "ext4")       # a no-op the second time
    devices.mount(device, target, "ext4", [], read_only=False)
    grown = devices.usage(target).bytes_total
    assert grown == df_size(target)
    assert grown - small > 2 * EXT4_SIZE * 0.9
    assert (target / "keep").read_bytes() == b"k" * 4096


def test_grow_checks_its_arguments(host: Host, devices: Devices) -> None:
    device, _ = host.formatted("v.img", "ext4")
    other, _ = host.formatted("w.img", "ext4")
    xfs, _ = host.formatted("x.img", "xfs")
    target = host.mount(device, "stage", "ext4")
    with pytest.raises(FailedPrecondition):
        devices.grow_filesystem(other, target, "ext4")
    with pytest.raises(FailedPrecondition):
        devices.grow_filesystem(device, target, "xfs")
    with pytest.raises(InvalidArgument):
        devices.grow_filesystem(device, target, "btrfs")
    with pytest.raises(FailedPrecondition):
        devices.grow_filesystem(xfs, None, "xfs")      # xfs grows only mounted


def test_usage_numbers(host: Host, devices: Devices, tmp_path: Path) -> None:
    device, _ = host.formatted("v.img", "ext4")
    target = host.mount(device, "stage", "ext4")
    empty = devices.usage(target)
    assert 0.8 * EXT4_SIZE < empty.bytes_total <= EXT4_SIZE
    assert 0 < empty.bytes_used < empty.bytes_total
    assert 0 < empty.bytes_available <= empty.bytes_total - empty.bytes_used
    assert empty.inodes_total == empty.inodes_used + empty.inodes_free
    assert empty.inodes_used > 0

    write_file(target / "f", os.urandom(4 * MiB))
    full = devices.usage(target)
    assert full.bytes_total == empty.bytes_total
    assert 4 * MiB <= full.bytes_used - empty.bytes_used < 5 * MiB
    assert full.inodes_used == empty.inodes_used + 1
    with pytest.raises(NotFound):
        devices.usage(tmp_path / "missing")
