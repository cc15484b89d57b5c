#!/usr/bin/env python3
"""Throughput of a served volume against its raw qcow2 file, with one tool.

`qemu-img bench` runs the same I/O pattern (queue depth 16) on (a) the
volume's top qcow2 file, closed, opened by qemu-img itself with the cache
mode qemu-storage-daemon uses (writeback), and (b) the block device the node
serves for it (qemu-storage-daemon FUSE export -> loop device), opened with
O_DIRECT so the loop device's own page cache does not flatter it; at chain
depth 1 and at the depth cap, with every byte of the volume written.  Patterns:
sequential 1 MiB reads and writes, and 4 KiB reads and writes strided
through the volume (qemu-img bench has no random mode; a 1 MiB + 4 KiB
stride touches a new cluster each time, which is what random I/O costs a
qcow2).  Run as root on an idle machine:

    .venv/bin/python hack/bench-serve.py [--size 1G] [--depth-cap 16]

With ``--cuts N`` it measures live-cut latency instead: an ext4 volume is
staged, a writer appends 64 KiB and fsyncs in a loop on it, and N snapshots
are taken through the engine (``Pool.create_snapshot``, what CreateSnapshot
runs), ``--interval`` seconds apart.  Each cut is broken down into the
engine's own time, the node's switch, and each QMP command the switch sends:

    .venv/bin/python hack/bench-serve.py --cuts 40 [--size 1G]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import threading
import time
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csidriver.units import parse_size  # noqa: E402
from engine.node import BLOCK, Access, Node  # noqa: E402
from engine.pool import Pool, PoolConfig  # noqa: E402

STRIDE = (1 << 20) + 4096


def patterns(size: int) -> list[tuple[str, list[str], bool]]:
    """(name, qemu-img bench count/size/step arguments, write?) for a volume
    of ``size`` bytes; every pattern stays inside the volume."""
    seq = str(min(1024, size // (1 << 20)))
    strided = str(min(8192, size // STRIDE - 1))
    return [
        ("seq read 1M", ["-c", seq, "-s", "1M"], False),
        ("seq write 1M", ["-c", seq, "-s", "1M"], True),
        ("strided read 4K", ["-c", strided, "-s", "4K", "-S", str(STRIDE)], False),
        ("strided write 4K", ["-c", strided, "-s", "4K", "-S", str(STRIDE)], True),
    ]


def bench(target: str, fmt: str, args: list[str], write: bool, *, cache: str) -> float:
    """MiB/s of one qemu-img bench run."""
    subprocess.run(["sync"], check=True)
    cmd = ["qemu-img", "bench", "-f", fmt, "-t", cache, "-d", "16", *args]
    if write:
        cmd += ["-w", "--pattern", "90"]
    done = subprocess.run(cmd + [target], capture_output=True, text=True, check=True)
    seconds = float(re.search(r"Run completed in ([0-9.]+) seconds", done.stdout)[1])  # type: ignore[index]
    count = int(args[args.index("-c") + 1])
    size = parse_size(args[args.index("-s") + 1])
    return count * size / seconds / (1 << 20)


@contextmanager
def scratch_node(prefix: str, config: PoolConfig | None = None
                 ) -> Iterator[tuple[Path, Pool, Node]]:
    """A pool and a started node in a scratch directory under /tmp; every
    served volume, the daemon and the directory are gone afterwards."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    pool = Pool.open(work / "pool", config=config)
    node = Node(pool, work / "run")
    node.start()
    try:
        yield work, pool, node
    finally:
        node.stop()
        node.release_all()
        node.shutdown()
        pool.close()
        shutil.rmtree(work, ignore_errors=True)


def _ms(values: list[float], q: float) -> str:
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:7.2f}"


def live_cuts(size: int, count: int, interval: float, *, idle: bool = False) -> int:
    """Live-cut latency under an fsync-heavy writer, with a breakdown."""
    from engine.node import MOUNT
    from engine.qsd import StorageDaemon

    timings: dict[str, list[float]] = {}
    local = threading.local()

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
            if not getattr(local, "on", False):
                return fn(*a, **kw)
            started = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timings.setdefault(name, []).append(time.perf_counter() - started)
        return wrapper

    original_qmp = StorageDaemon.qmp

    def qmp(self, command, arguments=None, **kw):  # type: ignore[no-untyped-def]
        return timed(f"  qmp {command}", original_qmp)(self, command, arguments, **kw)

    StorageDaemon.qmp = qmp  # type: ignore[method-assign]
    Node.switch = timed("node.switch (QSD cut)", Node.switch)  # type: ignore[method-assign]

    stop = threading.Event()
    written = [0]
    with scratch_node("qsnap-bench-cut-") as (work, pool, node):
        try:
            volume = pool.create_volume("cut-bench", required_bytes=size)
            staging = work / "stage"
            node.stage(volume.id, staging, Access(MOUNT, "ext4"))
            print(f"volume served over {node.transport}; device {node._staging(volume.id).device}")

            def writer() -> None:
                block = os.urandom(64 << 10)
                fd = os.open(staging / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    while not stop.is_set():
                        os.write(fd, block)
                        os.fsync(fd)
                        written[0] += len(block)
                        if written[0] % (size // 2) < len(block):
                            os.ftruncate(fd, 0)          # stay inside the volume
                finally:
                    os.close(fd)

            thread = threading.Thread(target=writer, daemon=True)
            if not idle:
                thread.start()
            time.sleep(1.0)
            totals: list[float] = []
            local.on = True
            started_all = time.monotonic()
            for i in range(count):
                started = time.perf_counter()
                pool.create_snapshot(f"cut-{i}", volume.id)
                totals.append(time.perf_counter() - started)
                time.sleep(interval)
            local.on = False
            elapsed = time.monotonic() - started_all
            stop.set()
            if not idle:
                thread.join()
            print(f"{count} cuts while the writer wrote "
                  f"{written[0] / (1 << 20) / elapsed:.0f} MiB/s (64 KiB + fsync per write)")
            print(f"{'step':34} {'n':>4} {'min':>7} {'p50':>7} {'p90':>7} {'max':>7}  (ms)")
            rows = [("create_snapshot (whole cut)", totals)] + sorted(timings.items())
            for name, values in rows:
                print(f"{name:34} {len(values):>4} {_ms(values, 0):>7} {_ms(values, 0.5):>7}"
                      f" {_ms(values, 0.9):>7} {max(values) * 1000:7.2f}")
            print(f"mean whole cut {statistics.mean(totals) * 1000:.2f} ms")
        finally:
            stop.set()    # the writer ends before the node goes
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="2G", help="volume size (default 2G)")
    p.add_argument("--depth-cap", type=int, default=16)
    p.add_argument("--cuts", type=int, default=0, help="measure N live cuts instead")
    p.add_argument("--idle", action="store_true", help="with --cuts: no writer")
    p.add_argument("--interval", type=float, default=0.05,
                   help="seconds between cuts (default 0.05)")
    args = p.parse_args()
    size = parse_size(args.size)
    if args.cuts:
        return live_cuts(size, args.cuts, args.interval, idle=args.idle)
    print(f"{'pattern':18} {'depth':>5} {'raw qcow2 MiB/s':>16} {'served MiB/s':>13} {'served/raw':>10}")
    config = PoolConfig(depth_cap=args.depth_cap)
    with scratch_node("qsnap-bench-serve-", config) as (work, pool, node):
        for depth in (1, args.depth_cap):
            volume = pool.create_volume(f"bench-{depth}", required_bytes=size)
            # Every byte written, a slice per layer: reads cross the whole
            # chain and none is answered from an unallocated cluster.
            for i in range(depth):
                top = pool.layer_path(pool.get_volume(volume.id).top_layer)
                start, length, chunk = i * (size // depth), size // depth, 256 << 20
                commands = []
                for offset in range(start, start + length, chunk):
                    n = min(chunk, start + length - offset)
                    commands += ["-c", f"write -P {i + 1} {offset} {n}"]
                subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(top)],
                               check=True, capture_output=True)
                if i < depth - 1:
                    pool.create_snapshot(f"b{depth}-{i}", volume.id)
            top = pool.layer_path(pool.get_volume(volume.id).top_layer)
            # The daemon opens images with QEMU's default cache mode
            # (writeback, through the host page cache): the raw side uses it too.
            raw = {name: bench(str(top), "qcow2", a, w, cache="writeback")
                   for name, a, w in patterns(size)}
            node.stage(volume.id, work / f"stage{depth}", Access(BLOCK))
            device = node._staging(volume.id).device
            for name, a, w in patterns(size):
                served = bench(device, "raw", a, w, cache="none")
                print(f"{name:18} {depth:>5} {raw[name]:>16.0f} {served:>13.0f} "
                      f"{served / raw[name]:>9.0%}")
            node.unstage(volume.id, work / f"stage{depth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
