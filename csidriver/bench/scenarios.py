"""The benchmark's scenarios, run against one or two drivers.

With a baseline driver every scenario alternates between the two drivers
per iteration (target, baseline, target, ...), so slow drift of the machine
(page cache, other load, thermal) falls on both equally.

Each scenario deletes what it made before the next one starts, so objects
left by one (10 000 snapshots, a 64 GiB volume) do not slow the next; the
final cleanup in ``main`` catches whatever an error or Ctrl-C left behind.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from csidriver.bench.driver import Endpoint, rpc_error_text
from csidriver.bench.fill import CHUNK, Checksummer, DataError, Filler, Pattern
from csidriver.bench.progress import Progress
from csidriver.bench.results import (FillRecord, Listing, Note, Results, SeriesKey, Throughput,
                                     Verification)
from csidriver.units import format_size

GIB = 1 << 30
SCENARIOS = ("sizes", "depth", "list", "concurrency", "write")
# Failures that end one driver's part of a scenario, not the run.
_FAILURES = (grpc.RpcError, DataError, TimeoutError, OSError, threading.BrokenBarrierError)

T = TypeVar("T")


def _wait(future: Future[None]) -> None:
    """``future.result()`` in slices: a Python signal handler (Ctrl-C)
    runs only in the main thread, and a signal the kernel hands another
    thread does not wake a main thread in an untimed wait."""
    while True:
        try:
            future.result(timeout=0.2)
            return
        except FutureTimeout:
            continue


@dataclass(frozen=True)
class Config:
    """What to run; defaults are the issue's.

    :param sizes: volume sizes of the ``sizes`` scenario.
    :param iterations: samples per measurement in ``sizes`` and ``write``.
    :param fill: also measure volumes filled with data (not only empty ones).
    :param verify: check one restore per filled size against the snapshot's checksum.
    :param depth: snapshots in a row on one volume (``depth`` scenario).
    :param depth_repeats: volumes the depth series is repeated on (samples per depth).
    :param volume_size: size of the volumes in depth, list, concurrency, write.
    :param list_counts: snapshot counts ListSnapshots is timed at.
    :param list_repeats: timed listings per count.
    :param page_size: ListSnapshots max_entries (0: the driver decides).
    :param list_per_volume: snapshots per volume when making the list
        population; short chains keep a depth-capped driver from merging
        in the background while listing is timed.
    :param concurrency: numbers of parallel callers.
    :param per_caller: snapshots each caller takes.
    :param workers: parallel calls when making and deleting populations.
    :param settle: seconds to let a driver without qsnap's PoolStatus finish
        background work after each scenario's cleanup.
    :param scenarios: which scenarios run, in order.
    :param seed: seed of the fill pattern.
    """

    sizes: tuple[int, ...] = (1 * GIB, 16 * GIB)
    iterations: int = 10
    fill: bool = True
    verify: bool = True
    depth: int = 50
    depth_repeats: int = 5
    volume_size: int = 1 * GIB
    list_counts: tuple[int, ...] = (10, 1000, 10000)
    list_repeats: int = 5
    page_size: int = 500
    list_per_volume: int = 15
    concurrency: tuple[int, ...] = (1, 8, 32)
    per_caller: int = 10
    workers: int = 8
    settle: float = 1.0
    scenarios: tuple[str, ...] = SCENARIOS
    seed: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "iterations": self.iterations, "fill": self.fill,
                "verify": self.verify, "depth": self.depth, "depth_repeats": self.depth_repeats,
                "volume_size": self.volume_size, "list_counts": list(self.list_counts),
                "list_repeats": self.list_repeats, "page_size": self.page_size,
                "list_per_volume": self.list_per_volume, "concurrency": list(self.concurrency),
                "per_caller": self.per_caller, "workers": self.workers, "settle": self.settle,
                "scenarios": list(self.scenarios), "seed": self.seed}


@dataclass
class Side:
    """One driver under test and how its volumes' data is reached."""

    endpoint: Endpoint
    filler: Filler | None
    filler_note: str
    checksummer: Checksummer | None
    checksummer_note: str

    @property
    def label(self) -> str:
        return self.endpoint.label


def estimate_units(config: Config, sides: Sequence[Side]) -> float:
    """Work units of a run, for the progress bar: one per RPC, one per
    64 MiB written or read (the same units the scenarios advance by)."""
    total = 0.0
    for side in sides:
        rpcs = 6 if side.endpoint.can("CLONE_VOLUME") else 5
        if "sizes" in config.scenarios:
            for size in config.sizes:
                total += 1 + config.iterations * rpcs
                if config.fill and side.filler is not None:
                    total += 1 + config.iterations * rpcs + size / CHUNK
                    if config.verify and side.checksummer is not None:
                        total += 2 * size / CHUNK + 3
        if "depth" in config.scenarios:
            total += config.depth_repeats * (1 + 3 * config.depth)
        if "list" in config.scenarios and config.list_counts:
            biggest = max(config.list_counts)
            total += biggest + biggest / max(config.list_per_volume, 1)
            total += len(config.list_counts) * config.list_repeats
        if "concurrency" in config.scenarios:
            total += sum(c * (config.per_caller + 1) for c in config.concurrency)
        if "write" in config.scenarios and side.endpoint.info and side.endpoint.info.node:
            total += config.iterations + 4
    return total


class Runner:
    """Runs the configured scenarios and records into ``results``.

    :param stop: set when the run must end (Ctrl-C): worker threads finish
        their current call and return.
    """

    def __init__(self, config: Config, sides: Sequence[Side], results: Results,
                 progress: Progress, stop: threading.Event) -> None:
        self.config = config
        self.sides = list(sides)
        self.results = results
        self.progress = progress
        self.stop = stop
        self._failed: set[tuple[str, str]] = set()
        # SHA-256 of each full fill, by (driver, size): the verification
        # checks the volume reads back as what was written.
        self._fill_digests: dict[tuple[str, int], str] = {}

    def run(self) -> None:
        self._settle()
        for scenario in self.config.scenarios:
            getattr(self, f"run_{scenario}")()

    # -- shared ------------------------------------------------------------

    def _ok(self, side: Side, scenario: str) -> bool:
        return (side.label, scenario) not in self._failed

    @contextmanager
    def _guard(self, side: Side, scenario: str, what: str) -> Iterator[None]:
        """Record a failure of one driver in one scenario and stop that
        driver's part of the scenario; the other driver and the other
        scenarios go on."""
        try:
            yield
        except _FAILURES as e:
            text = rpc_error_text(e) if isinstance(e, grpc.RpcError) else f"{type(e).__name__}: {e}"
            self.results.record("errors", Note(side.label, scenario, f"{what}: {text}"))
            self.progress.note(f"qsnap bench: {side.label}: {scenario}: {what} failed: {text}")
            self._failed.add((side.label, scenario))

    def _skip(self, side: Side, scenario: str, reason: str) -> None:
        self.results.record("skipped", Note(side.label, scenario, reason))
        self.progress.note(f"qsnap bench: {side.label}: skipping {scenario}: {reason}")

    def _sample(self, side: Side, scenario: str, op: str, seconds: float, **params: Any) -> None:
        self.results.add(SeriesKey(side.label, scenario, op, **params), seconds)
        self.progress.advance(1)

    def _tidy(self, scenario: str) -> None:
        """Delete what the scenario made, on every driver, and let the
        drivers finish the background work that causes."""
        for side in self.sides:
            self.progress.phase(f"{scenario}: {side.label}: deleting what the scenario made")
            report = side.endpoint.cleanup(workers=self.config.workers)
            for failure in report.failures:
                self.results.record("errors", Note(side.label, scenario, f"cleanup: {failure}"))
        self._settle()

    def _quiesce(self, side: Side) -> None:
        """Let a qsnap driver finish merging what the last deletion left, so
        the next call is timed on a quiet driver rather than queued behind
        a merge of the benchmark's own making.  (The depth and concurrency
        scenarios do not wait: there the background work is the point.)
        Drivers that cannot tell are not waited for."""
        try:
            side.endpoint.settle(0.0)
        except grpc.RpcError:
            pass  # the next timed call reports a dead driver

    def _settle(self) -> None:
        for side in self.sides:
            text = f"{side.label}: waiting for the driver's background work"
            self.progress.phase(text)
            try:
                side.endpoint.settle(self.config.settle,
                                     report=lambda left: self.progress.phase(f"{text}: {left}"))
            except grpc.RpcError:
                pass  # settling is a courtesy; the next RPC reports a dead driver

    def _bytes_progress(self, nbytes: int) -> None:
        self.progress.advance(nbytes / CHUNK)

    # -- sizes: every RPC across volume sizes, empty and filled ---------------

    def run_sizes(self) -> None:
        """Every RPC across sizes, on empty volumes, then on filled ones.

        All sizes' source volumes exist (and are filled) before timing
        starts, and the iterations then alternate between sizes (and
        drivers): a comparison across sizes, like one across drivers, must
        not depend on what else the machine did minutes apart.  That needs
        the sum of the sizes on disk at once when filled.
        """
        cfg = self.config
        for side in self.sides:
            if cfg.fill and side.filler is None:
                self._skip(side, "sizes", f"filled volumes: {side.filler_note}")
            if cfg.fill and cfg.verify and side.filler is not None and side.checksummer is None:
                self._skip(side, "sizes", f"restore verification: {side.checksummer_note}")
        for filled in ((False, True) if cfg.fill else (False,)):
            sides = [s for s in self.sides if self._ok(s, "sizes")
                     and (not filled or s.filler is not None)]
            state = "filled" if filled else "empty"
            sources: dict[tuple[str, int], Any] = {}
            for size in cfg.sizes:
                for side in sides:
                    with self._guard(side, "sizes", f"source volume of {format_size(size)}"):
                        sources[side.label, size] = self._source(side, size, filled)
            if filled and cfg.verify:
                for size in cfg.sizes:
                    for side in sides:
                        if (side.label, size) in sources and side.checksummer is not None \
                                and self._ok(side, "sizes"):
                            with self._guard(side, "sizes", f"verifying {format_size(size)}"):
                                self._verify(side, sources[side.label, size], size)
            for i in range(cfg.iterations):
                for size in cfg.sizes:
                    for side in sides:
                        if (side.label, size) not in sources or not self._ok(side, "sizes"):
                            continue
                        self.progress.phase(f"sizes {state}: {side.label}: {format_size(size)}, "
                                            f"iteration {i + 1}/{cfg.iterations}")
                        with self._guard(side, "sizes",
                                         f"{format_size(size)} {state} iteration {i + 1}"):
                            self._sizes_iteration(side, sources[side.label, size], size, filled)
            self._tidy("sizes")

    def _source(self, side: Side, size: int, filled: bool) -> Any:
        """The volume the iterations snapshot, filled when asked."""
        self.progress.phase(f"sizes: {side.label}: source volume of {format_size(size)}")
        source, _ = side.endpoint.create_volume(size)
        self.progress.advance(1)
        if filled:
            assert side.filler is not None
            self.progress.phase(f"sizes: {side.label}: filling {format_size(source.capacity_bytes)}")
            result = side.filler.fill(source, source.capacity_bytes, self.config.seed,
                                      self._bytes_progress)
            self.results.record("fills", FillRecord(side.label, size, result.bytes,
                                                    result.seconds, side.filler.description))
            self._fill_digests[side.label, size] = result.digest
        return source

    def _sizes_iteration(self, side: Side, source: Any, size: int, filled: bool) -> None:
        ep = side.endpoint
        params = {"size_bytes": size, "filled": filled}
        self._quiesce(side)
        volume, seconds = ep.create_volume(size)
        self._sample(side, "sizes", "CreateVolume", seconds, **params)
        snapshot, seconds = ep.create_snapshot(source.volume_id)
        self._sample(side, "sizes", "CreateSnapshot", seconds, **params)
        ep.wait_ready(snapshot)
        restored, seconds = ep.create_volume(size, snapshot_id=snapshot.snapshot_id)
        self._sample(side, "sizes", "restore", seconds, **params)
        # DeleteVolume is timed on the restored volume: for a copying
        # driver it holds the snapshot's data, so it shows the cost of data.
        self._sample(side, "sizes", "DeleteVolume", ep.delete_volume(restored.volume_id), **params)
        self._sample(side, "sizes", "DeleteSnapshot", ep.delete_snapshot(snapshot.snapshot_id),
                     **params)
        # The clone comes after the snapshot is gone, and everything is
        # deleted by the end: each iteration leaves the source as it found
        # it, so iterations are independent samples and none pays for chain
        # structure an earlier one left (on qsnap, a snapshot layer deleted
        # under a later cut is merged by copying the base: see BENCHMARKS.md).
        self._quiesce(side)
        if ep.can("CLONE_VOLUME"):
            clone, seconds = ep.create_volume(size, volume_id=source.volume_id)
            self._sample(side, "sizes", "clone", seconds, **params)
            ep.delete_volume(clone.volume_id)
        ep.delete_volume(volume.volume_id)

    def _verify(self, side: Side, source: Any, size: int) -> None:
        """One untimed round that checks a restore: checksum the source,
        snapshot it, overwrite the start of the source, restore the
        snapshot, and compare.  Its full reads stay out of the timed
        iterations."""
        assert side.checksummer is not None and side.filler is not None
        ep = side.endpoint
        self.progress.phase(f"sizes filled: {side.label}: verifying a restore of "
                            f"{format_size(size)}")
        start = time.perf_counter()
        length = source.capacity_bytes
        expected = side.checksummer.checksum(source, length, self._bytes_progress)
        snapshot, _ = ep.create_snapshot(source.volume_id)
        ep.wait_ready(snapshot)
        head = min(length, CHUNK)
        # The source moves on after the cut: the restore must not see this.
        side.filler.fill(source, head, self.config.seed + 1, self._bytes_progress)
        restored, _ = ep.create_volume(size, snapshot_id=snapshot.snapshot_id)
        restored_digest = side.checksummer.checksum(restored, length, self._bytes_progress)
        source_head = side.checksummer.checksum(source, head, self._bytes_progress)
        restored_head = side.checksummer.checksum(restored, head, self._bytes_progress)
        ep.delete_volume(restored.volume_id)
        ep.delete_snapshot(snapshot.snapshot_id)
        check = Verification(driver=side.label, size_bytes=size, snapshot_digest=expected,
                             restored_digest=restored_digest,
                             fill_digest=self._fill_digests.get((side.label, size), ""),
                             head_bytes=head, source_head_digest=source_head,
                             restored_head_digest=restored_head,
                             seconds=time.perf_counter() - start)
        self.results.record("verifications", check)
        if not check.ok:
            self.progress.note(f"qsnap bench: {side.label}: restore verification FAILED at "
                               f"{format_size(size)}: {check.as_dict()}")

    # -- depth: the n-th snapshot on one volume --------------------------------

    def run_depth(self) -> None:
        cfg = self.config
        for repeat in range(cfg.depth_repeats):
            volumes: dict[str, Any] = {}
            for side in self.sides:
                if self._ok(side, "depth"):
                    with self._guard(side, "depth", "volume"):
                        volumes[side.label], _ = side.endpoint.create_volume(cfg.volume_size)
                        self.progress.advance(1)
            for depth in range(1, cfg.depth + 1):
                for side in self.sides:
                    if side.label not in volumes or not self._ok(side, "depth"):
                        continue
                    self.progress.phase(f"depth: {side.label}: snapshot {depth}/{cfg.depth}, "
                                        f"volume {repeat + 1}/{cfg.depth_repeats}")
                    with self._guard(side, "depth", f"snapshot {depth}"):
                        self._depth_step(side, volumes[side.label], depth)
            self._tidy("depth")

    def _depth_step(self, side: Side, volume: Any, depth: int) -> None:
        ep = side.endpoint
        snapshot, seconds = ep.create_snapshot(volume.volume_id)
        self._sample(side, "depth", "CreateSnapshot", seconds, depth=depth)
        ep.wait_ready(snapshot)
        restored, seconds = ep.create_volume(self.config.volume_size,
                                             snapshot_id=snapshot.snapshot_id)
        self._sample(side, "depth", "restore", seconds, depth=depth)
        ep.delete_volume(restored.volume_id)
        self.progress.advance(1)

    # -- list: ListSnapshots at 10 / 1 000 / 10 000 snapshots -------------------

    def run_list(self) -> None:
        cfg = self.config
        made = {side.label: 0 for side in self.sides}
        grown: dict[str, tuple[int, float]] = {}
        for count in sorted(set(cfg.list_counts)):
            for side in self.sides:
                if not self._ok(side, "list"):
                    continue
                self.progress.phase(f"list: {side.label}: making {count} snapshots")
                with self._guard(side, "list", f"making {count} snapshots"):
                    start = time.perf_counter()
                    self._grow(side, count - made[side.label])
                    grown[side.label] = (count - made[side.label], time.perf_counter() - start)
                    made[side.label] = count
            for repeat in range(cfg.list_repeats):
                for side in self.sides:
                    if not self._ok(side, "list"):
                        continue
                    self.progress.phase(f"list: {side.label}: listing {count} snapshots "
                                        f"({repeat + 1}/{cfg.list_repeats})")
                    with self._guard(side, "list", f"listing {count} snapshots"):
                        listed, pages, seconds = side.endpoint.list_snapshots(cfg.page_size)
                        self._sample(side, "list", "ListSnapshots", seconds, count=count)
                        if repeat == 0:
                            added, seconds = grown.get(side.label, (0, 0.0))
                            self.results.record("listings", Listing(
                                side.label, count, listed, pages, added, seconds))
        self._tidy("list")

    def _grow(self, side: Side, snapshots: int) -> None:
        """Add ``snapshots`` snapshots, ``list_per_volume`` per new volume, in parallel."""
        per = max(1, self.config.list_per_volume)
        groups = [per] * (snapshots // per) + ([snapshots % per] if snapshots % per else [])
        ep = side.endpoint

        def make(group: int) -> None:
            volume, _ = ep.create_volume(self.config.volume_size)
            self.progress.advance(1)
            for _ in range(group):
                if self.stop.is_set():
                    return
                ep.create_snapshot(volume.volume_id)
                self.progress.advance(1)

        self._parallel(make, groups, self.config.workers)

    def _parallel(self, fn: Callable[[T], None], items: Sequence[T], workers: int) -> None:
        """Run ``fn`` over ``items`` on ``workers`` threads.

        The first error stops the items not yet started and is raised once
        the running ones finish; Ctrl-C (in this, the main thread) does the
        same and sets ``self.stop`` so loops inside ``fn`` end early too.
        """
        if not items:
            return
        halt = threading.Event()

        def guarded(item: T) -> None:
            if halt.is_set() or self.stop.is_set():
                return
            try:
                fn(item)
            except BaseException:
                halt.set()
                raise

        pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(items))))
        try:
            futures: list[Future[None]] = [pool.submit(guarded, item) for item in items]
            for future in futures:
                _wait(future)
        except KeyboardInterrupt:
            self.stop.set()
            raise
        finally:
            halt.set()
            pool.shutdown(wait=True, cancel_futures=True)

    # -- concurrency: N callers on N volumes ------------------------------------

    def run_concurrency(self) -> None:
        for callers in self.config.concurrency:
            for side in self.sides:
                if not self._ok(side, "concurrency"):
                    continue
                self.progress.phase(f"concurrency: {side.label}: {callers} callers")
                with self._guard(side, "concurrency", f"{callers} callers"):
                    self._concurrent(side, callers)
                self._tidy("concurrency")

    def _concurrent(self, side: Side, callers: int) -> None:
        cfg = self.config
        ep = side.endpoint
        volumes: list[Any] = []
        lock = threading.Lock()

        def make(_index: int) -> None:
            volume, _seconds = ep.create_volume(cfg.volume_size)
            with lock:
                volumes.append(volume)
            self.progress.advance(1)

        self._parallel(make, list(range(callers)), cfg.workers)
        barrier = threading.Barrier(callers + 1)
        calls: list[float] = []
        errors: list[str] = []

        def caller(volume: Any) -> None:
            try:
                barrier.wait(timeout=60)
            except threading.BrokenBarrierError:
                return
            for _ in range(cfg.per_caller):
                if self.stop.is_set():
                    return
                try:
                    _, seconds = ep.create_snapshot(volume.volume_id)
                except grpc.RpcError as e:
                    with lock:
                        errors.append(rpc_error_text(e))
                    continue
                with lock:
                    calls.append(seconds)
                self._sample(side, "concurrency", "CreateSnapshot", seconds, concurrency=callers)

        threads = [threading.Thread(target=caller, args=(v,), name=f"bench-caller-{i}", daemon=True)
                   for i, v in enumerate(volumes)]
        for thread in threads:
            thread.start()
        try:
            barrier.wait(timeout=60)
            start = time.perf_counter()
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
            wall = time.perf_counter() - start
        except BaseException:
            self.stop.set()
            barrier.abort()
            for thread in threads:
                thread.join()
            raise
        self.results.record("throughput", Throughput(side.label, callers, len(calls), wall,
                                                     len(errors)))
        if errors:
            self.results.record("errors", Note(side.label, "concurrency",
                                               f"{len(errors)} of {callers * cfg.per_caller} "
                                               f"CreateSnapshot calls failed, e.g. {errors[0]}"))

    # -- write: snapshots while a writer runs (needs the Node service) -----------

    def run_write(self) -> None:
        for side in self.sides:
            info = side.endpoint.info
            assert info is not None
            if info.node is None:
                self._skip(side, "write", f"snapshot-while-writing needs the Node service: "
                                          f"{info.node_note}")
                continue
            if "STAGE_UNSTAGE_VOLUME" not in info.node:
                self._skip(side, "write", "the Node service does not offer STAGE_UNSTAGE_VOLUME")
                continue
            self.progress.phase(f"write: {side.label}: snapshots while writing")
            with self._guard(side, "write", "snapshot while writing"):
                self._while_writing(side)
            self._tidy("write")

    def _while_writing(self, side: Side) -> None:
        cfg = self.config
        ep = side.endpoint
        volume, _ = ep.create_volume(cfg.volume_size)
        att = ep.attach(volume)
        self.progress.advance(2)
        done = threading.Event()
        written = [0]
        failure: list[BaseException] = []
        pattern = Pattern(cfg.seed + 2, 1 << 20)

        def writer() -> None:
            # 1 MiB writes at pseudo-random offsets, flushed every 16, so the
            # snapshot always meets data in flight.
            try:
                fd = os.open(att.data_path, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    blocks = max(1, volume.capacity_bytes // (1 << 20))
                    n = 0
                    while not done.is_set():
                        for _, data in pattern.chunks(1 << 20):
                            os.pwrite(fd, data, ((n * 2654435761) % blocks) << 20)
                        n += 1
                        written[0] += 1 << 20
                        if n % 16 == 0:
                            os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                failure.append(e)

        thread = threading.Thread(target=writer, name="bench-writer", daemon=True)
        thread.start()
        start = time.perf_counter()
        try:
            time.sleep(0.2)
            for i in range(cfg.iterations):
                if failure:
                    break
                snapshot, seconds = ep.create_snapshot(volume.volume_id)
                self._sample(side, "write", "CreateSnapshot", seconds)
                time.sleep(0.05)
        finally:
            done.set()
            thread.join()
            elapsed = time.perf_counter() - start
            ep.detach(att)
            self.progress.advance(2)
        self.results.extras.setdefault("writer", []).append(
            {"driver": side.label, "bytes": written[0], "seconds": elapsed})
        if failure:
            raise failure[0]
