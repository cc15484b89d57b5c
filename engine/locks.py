"""Per-ID locks: calls on different objects run in parallel, calls on one
object never interleave."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from engine.errors import Busy


class KeyedLock:
    """A lock per key, created on first use and dropped when released.

    Several keys are always taken in sorted order, so two callers that
    need overlapping sets cannot deadlock.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: dict[str, threading.Lock] = {}
        self._waiters: dict[str, int] = {}

    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            lock = self._held.setdefault(key, threading.Lock())
            self._waiters[key] = self._waiters.get(key, 0) + 1
            return lock

    def _release(self, key: str, lock: threading.Lock, acquired: bool) -> None:
        with self._guard:
            if acquired:
                lock.release()
            self._waiters[key] -= 1
            if self._waiters[key] == 0:
                del self._waiters[key]
                del self._held[key]

    @contextmanager
    def hold(self, keys: Iterable[str], *, wait: bool = True) -> Iterator[None]:
        """Hold every key in ``keys`` for the duration of the block.

        :param wait: if false, fail at once instead of waiting.
        :raises Busy: ``wait`` is false and another caller holds a key.
        """
        taken: list[tuple[str, threading.Lock]] = []
        try:
            for key in sorted(set(keys)):
                lock = self._lock_for(key)
                if not lock.acquire(blocking=wait):
                    self._release(key, lock, acquired=False)
                    raise Busy(f"an operation on {key} is already in progress")
                taken.append((key, lock))
            yield
        finally:
            for key, lock in reversed(taken):
                self._release(key, lock, acquired=True)

    def busy(self, key: str) -> bool:
        """Whether some caller holds or waits for ``key`` right now."""
        with self._guard:
            return key in self._held
