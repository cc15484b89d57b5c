"""What a benchmark run measured: records, and the container that collects them."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from csidriver.bench.stats import Summary


@dataclass(frozen=True)
class SeriesKey:
    """What one latency series measured.  Fields that do not apply are 0."""

    driver: str
    scenario: str
    op: str
    size_bytes: int = 0
    filled: bool = False
    depth: int = 0
    count: int = 0
    concurrency: int = 0

    def without_driver(self) -> tuple[Any, ...]:
        return (self.scenario, self.op, self.size_bytes, self.filled, self.depth, self.count,
                self.concurrency)


@dataclass(frozen=True)
class Throughput:
    """Calls completed by ``concurrency`` callers over a wall-clock span."""

    driver: str
    concurrency: int
    calls: int
    seconds: float
    errors: int

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Verification:
    """A restore checked against the snapshot's content.

    ``snapshot_digest``: the source volume read just before the snapshot.
    ``restored_digest``: the restored volume read in full.  The head digests
    cover the region overwritten on the source after the cut: they must
    differ, which shows the restore did not just follow the live volume.
    """

    driver: str
    size_bytes: int
    snapshot_digest: str
    restored_digest: str
    fill_digest: str
    head_bytes: int
    source_head_digest: str
    restored_head_digest: str
    seconds: float

    @property
    def ok(self) -> bool:
        return (self.restored_digest == self.snapshot_digest
                and self.source_head_digest != self.restored_head_digest
                and (not self.fill_digest or self.fill_digest == self.snapshot_digest))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class FillRecord:
    driver: str
    size_bytes: int
    bytes: int
    seconds: float
    method: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_per_second": self.bytes / self.seconds if self.seconds else 0}


@dataclass(frozen=True)
class Listing:
    """One full ListSnapshots walk: how many entries, over how many pages;
    and how long making the snapshots added for this count took (volumes
    included, ``workers`` calls in parallel)."""

    driver: str
    count: int
    listed: int
    pages: int
    added: int
    add_seconds: float


@dataclass(frozen=True)
class Note:
    """A scenario skipped or failed for a driver, and why."""

    driver: str
    scenario: str
    text: str


@dataclass
class Results:
    """Everything measured, collected from many threads."""

    samples: dict[SeriesKey, list[float]] = field(default_factory=lambda: defaultdict(list))
    throughput: list[Throughput] = field(default_factory=list)
    verifications: list[Verification] = field(default_factory=list)
    fills: list[FillRecord] = field(default_factory=list)
    listings: list[Listing] = field(default_factory=list)
    skipped: list[Note] = field(default_factory=list)
    errors: list[Note] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, key: SeriesKey, seconds: float) -> None:
        with self._lock:
            self.samples[key].append(seconds)

    def record(self, kind: str, item: Any) -> None:
        """Append ``item`` to the list attribute ``kind`` (``"fills"``, ...)."""
        with self._lock:
            getattr(self, kind).append(item)

    def summaries(self) -> dict[SeriesKey, Summary]:
        with self._lock:
            return {k: Summary.of(v) for k, v in self.samples.items() if v}

    def has_samples(self) -> bool:
        with self._lock:
            return any(self.samples.values())
