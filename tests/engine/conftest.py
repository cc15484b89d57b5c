"""Fixtures for the engine tests: pools in temporary directories, qemu-io
to put byte patterns into layer files and read them back, and a checker
for the invariants every pool must keep between operations.

Everything runs against the real ``qemu-img`` and ``qemu-io``; nothing is
mocked.  Content is tracked in 64 KiB *regions*: a test (or the model in
the property tests) records which byte pattern it wrote into each region,
every other region must read as zeros.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

# The repository root (tests/engine/conftest.py -> ../..), so that ``engine``
# imports without an installed package.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.catalog import _GARBAGE  # noqa: E402
from engine.pool import Pool, PoolConfig  # noqa: E402

KIB = 1 << 10
MIB = 1 << 20
REGION = 64 * KIB

# Layers no volume or snapshot needs but exactly one child does: the
# maintainer must have merged every one of them when it is idle.
COLLAPSIBLE = """
SELECT l.id FROM layers l
WHERE NOT EXISTS (SELECT 1 FROM volumes v WHERE v.top = l.id)
  AND NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.layer = l.id)
  AND (SELECT COUNT(*) FROM layers c WHERE c.parent = l.id) = 1
"""


class Kit:
    """Helpers shared by the engine tests (handed out by the ``kit`` fixture)."""

    def __init__(self) -> None:
        qemu_io = shutil.which("qemu-io")
        qemu_img = shutil.which("qemu-img")
        if qemu_io is None or qemu_img is None:
            pytest.fail("qemu-img and qemu-io are required (Debian package qemu-utils)")
        self.qemu_io = qemu_io
        self.qemu_img = qemu_img

    # -- pools -----------------------------------------------------------

    @staticmethod
    def open(root: Path, **config: Any) -> Pool:
        return Pool.open(root, config=PoolConfig(**config))

    # -- data ------------------------------------------------------------

    def _io(self, path: Path, commands: list[str], *, read_only: bool) -> tuple[int, str]:
        argv = [self.qemu_io, "-f", "qcow2"]
        if read_only:
            argv.append("-r")
        for command in commands:
            argv += ["-c", command]
        done = subprocess.run(argv + [str(path)], capture_output=True, text=True, timeout=120,
                              check=False)
        return done.returncode, done.stdout + done.stderr

    def write(self, path: Path, pattern: int, offset: int, length: int) -> None:
        """Fill ``length`` bytes at ``offset`` of the image with ``pattern``."""
        rc, out = self._io(path, [f"write -P {pattern:#04x} {offset} {length}"], read_only=False)
        assert rc == 0 and "wrote" in out and "failed" not in out.lower(), \
            f"qemu-io write into {path} failed (exit {rc}):\n{out}"

    def write_regions(self, path: Path, regions: Mapping[int, int]) -> None:
        """Write several 64 KiB regions in one qemu-io run."""
        commands = [f"write -P {p:#04x} {r * REGION} {REGION}" for r, p in sorted(regions.items())]
        rc, out = self._io(path, commands, read_only=False)
        assert rc == 0 and out.count("wrote") == len(commands) and "failed" not in out.lower(), \
            f"qemu-io write into {path} failed (exit {rc}):\n{out}"

    def reads(self, path: Path, pattern: int, offset: int, length: int) -> bool:
        """Whether the image reads ``pattern`` over the range (checks both
        qemu-io's exit status and its output)."""
        rc, out = self._io(path, [f"read -P {pattern:#04x} {offset} {length}"], read_only=True)
        ok = rc == 0 and "verification failed" not in out and "read " in out
        return ok

    def expect(self, path: Path, pattern: int, offset: int, length: int) -> None:
        rc, out = self._io(path, [f"read -P {pattern:#04x} {offset} {length}"], read_only=True)
        assert rc == 0 and "verification failed" not in out and "read " in out, \
            f"{path.name} does not read {pattern:#04x} at [{offset}, +{length}) (exit {rc}):\n{out}"

    def expect_regions(self, path: Path, size: int, regions: Mapping[int, int]) -> None:
        """The image is ``size`` bytes long and reads ``regions[i]`` in every
        64 KiB region ``i`` listed and zeros everywhere else."""
        virtual = self.info(path)["virtual-size"]
        assert virtual == size, f"{path.name} is {virtual} bytes, expected {size}"
        assert all(r * REGION < size for r in regions), f"model regions past {size}: {regions}"
        # One read command per run of equal patterns, all in one qemu-io run.
        commands = []
        nregions = -(-size // REGION)
        start = 0
        while start < nregions:
            pattern = regions.get(start, 0)
            end = start + 1
            while end < nregions and regions.get(end, 0) == pattern:
                end += 1
            length = min(end * REGION, size) - start * REGION
            commands.append(f"read -P {pattern:#04x} {start * REGION} {length}")
            start = end
        rc, out = self._io(path, commands, read_only=True)
        assert rc == 0 and "verification failed" not in out and out.count("read ") == len(commands), \
            (f"{path.name} does not read as expected (exit {rc});\nexpected {dict(sorted(regions.items()))}"
             f"\n{out}")

    def expect_volume(self, pool: Pool, volume_id: str, regions: Mapping[int, int]) -> None:
        volume = pool.get_volume(volume_id)
        self.expect_regions(pool.layer_path(volume.top_layer), volume.size_bytes, regions)

    def expect_snapshot(self, pool: Pool, snapshot_id: str, regions: Mapping[int, int]) -> None:
        snapshot = pool.get_snapshot(snapshot_id)
        self.expect_regions(pool.layer_path(snapshot.layer), snapshot.size_bytes, regions)

    # -- images ----------------------------------------------------------

    def info(self, path: Path) -> dict[str, Any]:
        done = subprocess.run([self.qemu_img, "info", "--output=json", "-f", "qcow2", "-U",
                               str(path)], capture_output=True, text=True, timeout=60, check=True)
        return json.loads(done.stdout)

    def chain_length(self, path: Path) -> int:
        """How many images ``qemu-img info --backing-chain`` finds."""
        done = subprocess.run([self.qemu_img, "info", "--backing-chain", "--output=json", "-U",
                               str(path)], capture_output=True, text=True, timeout=60, check=True)
        return len(json.loads(done.stdout))

    @staticmethod
    def allocated(path: Path) -> int:
        return os.stat(path).st_blocks * 512

    # -- invariants ------------------------------------------------------

    @staticmethod
    def catalog_layers(pool: Pool) -> dict[str, Any]:
        with pool.catalog.reading() as tx:
            return {layer.id: layer for layer in tx.all_layers()}

    @staticmethod
    def query(pool: Pool, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with pool.catalog.reading() as tx:
            return [tuple(row) for row in tx.all(sql, args)]

    def check_pool(self, pool: Pool, *, missing_garbage_ok: bool = False) -> None:
        """The invariants a pool keeps whenever no operation is running.

        * no intents are left, no temporary files;
        * the layer files are exactly the catalog's layers (the directory
          holds nothing else); with ``missing_garbage_ok`` a garbage row
          whose file is already gone is tolerated (a reclaim interrupted
          between unlink and row deletion, which the next pass finishes);
        * every layer file's header names exactly its catalog parent, and
          the depth column equals the length of the real backing chain;
        * every volume's top and every snapshot's layer exists, a volume's
          size is its top file's virtual size, and a layer's recorded
          virtual size is its file's.
        """
        layers = self.catalog_layers(pool)
        with pool.catalog.reading() as tx:
            intents = tx.intents()
            volumes = [v for _, v in tx.volumes_page(0, 1 << 30)]
            snapshots = [s for _, s in tx.snapshots_page(0, 1 << 30)]
            garbage = set(tx.garbage())
        assert intents == [], f"intents left: {intents}"
        names = sorted(os.listdir(pool.layout.layers))
        assert not [n for n in names if n.endswith(".tmp")], f"temporary files left: {names}"
        files = {n[: -len(".qcow2")] for n in names if n.endswith(".qcow2")}
        assert len(files) == len(names), f"unexpected files in the layers directory: {names}"
        assert files - set(layers) == set(), f"layer files without a catalog row: {files - set(layers)}"
        missing = set(layers) - files
        if missing_garbage_ok:
            assert missing <= garbage, f"referenced layers without a file: {missing - garbage}"
        else:
            assert missing == set(), f"catalog layers without a file: {missing}"
        for layer_id, layer in layers.items():
            if layer_id in missing:
                continue
            path = pool.layer_path(layer_id)
            info = self.info(path)
            expected = (os.path.relpath(pool.layer_path(layer.parent), path.parent)
                        if layer.parent else None)
            assert info.get("backing-filename") == expected, \
                f"layer {layer_id}: header names {info.get('backing-filename')!r}, catalog parent {expected!r}"
            if layer.parent:
                assert layer.parent in layers, f"layer {layer_id}: parent {layer.parent} not in catalog"
            assert self.chain_length(path) == layer.depth, \
                f"layer {layer_id}: catalog depth {layer.depth}, real chain {self.chain_length(path)}"
            assert info["virtual-size"] == layer.virtual_size, \
                f"layer {layer_id}: catalog size {layer.virtual_size}, file {info['virtual-size']}"
        for volume in volumes:
            assert volume.top_layer in layers and volume.top_layer not in missing, volume
            assert layers[volume.top_layer].virtual_size == volume.size_bytes, volume
            assert not layers[volume.top_layer].read_only, volume
        for snapshot in snapshots:
            assert snapshot.layer in layers and snapshot.layer not in missing, snapshot
            assert layers[snapshot.layer].virtual_size == snapshot.size_bytes, snapshot

    def check_idle(self, pool: Pool) -> None:
        """After a maintenance pass: nothing left to reclaim or collapse."""
        assert self.query(pool, _GARBAGE) == [], "garbage left after maintenance"
        assert self.query(pool, COLLAPSIBLE) == [], "collapsible layers left after maintenance"


@pytest.fixture(scope="session")
def kit() -> Kit:
    return Kit()


@pytest.fixture
def pool_root(tmp_path: Path) -> Path:
    return tmp_path / "pool"


@pytest.fixture
def pool(pool_root: Path) -> Iterator[Pool]:
    """A fresh pool with the default configuration."""
    p = Pool.open(pool_root)
    yield p
    p.close()
