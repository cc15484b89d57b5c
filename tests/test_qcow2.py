"""The direct qcow2 writer must produce exactly what qemu-img creates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from engine import qcow2
from engine.errors import InvalidArgument
from engine.qemu_img import QemuImg

SIZES = [512, 1 << 20, 1_000_000_512, 1 << 30, 3 * (1 << 30) + 512, 64 << 40]
BACKINGS = [None, "base.qcow2", "l-0123456789abcdef0123456789abcdef.qcow2"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("backing", BACKINGS)
def test_identical_to_qemu_img(tmp_path: Path, size: int, backing: str | None) -> None:
    reference = tmp_path / "reference.qcow2"
    ours = tmp_path / "ours.qcow2"
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=off"]
    if backing:
        args += ["-u", "-b", backing, "-F", "qcow2"]
    subprocess.run(args + [str(reference), str(size)], check=True)
    qcow2.write_image(ours, size, backing)
    assert ours.read_bytes() == reference.read_bytes()


def test_overlay_reads_through_to_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qcow2.write_image(base, 8 << 20)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 1M", str(base)],
                   check=True, capture_output=True)
    qcow2.write_image(top, 16 << 20, "base.qcow2")
    img = QemuImg()
    img.check(top)
    info = img.info(top)
    assert (info.virtual_size, info.backing_filename, info.backing_format) == \
        (16 << 20, "base.qcow2", "qcow2")
    done = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 1M",
                           "-c", "read -P 0 12M 1M", str(top)], capture_output=True, text=True)
    assert done.returncode == 0 and "verification failed" not in done.stdout, done.stdout


@pytest.mark.parametrize("size", [0, 511, -512, (64 << 40) + 512])
def test_refuses_sizes_it_cannot_lay_out(tmp_path: Path, size: int) -> None:
    with pytest.raises(InvalidArgument):
        qcow2.write_image(tmp_path / "x.qcow2", size)
    assert not (tmp_path / "x.qcow2").exists()


def test_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        qcow2.write_image(path, 1 << 20)
    assert path.read_bytes() == b"precious"
