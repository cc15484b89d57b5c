"""A plain-text progress bar on stderr.

On a terminal it redraws one line in place (``\\r``) at most ten times a
second; into a file or pipe it writes a line when the phase changes (at most
one every two seconds), so logs stay readable; notes always print.  Thread-safe: the concurrency
scenario advances it from many callers.
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

WIDTH = 30


class Progress:
    """Progress over an estimated number of work units.

    :param total: estimated units (one per RPC, one per 64 MiB filled or
        read); the bar never passes 100 % when the estimate is short.
    :param enabled: False draws nothing, notes still print.
    """

    def __init__(self, total: float, stream: TextIO, *, enabled: bool = True,
                 interactive: bool | None = None) -> None:
        self.total = max(total, 1.0)
        self.stream = stream
        self.enabled = enabled
        self.interactive = stream.isatty() if interactive is None else interactive
        self._done = 0.0
        self._label = ""
        self._start = time.monotonic()
        self._drawn_at = 0.0
        self._drawn_label = ""
        self._line_shown = False
        self._lock = threading.Lock()

    def advance(self, units: float = 1.0, label: str | None = None) -> None:
        with self._lock:
            self._done += units
            if label is not None:
                self._label = label
            self._draw()

    def phase(self, label: str) -> None:
        with self._lock:
            self._label = label
            self._draw(force=True)

    def note(self, text: str) -> None:
        """Print a message on its own line, above the bar."""
        with self._lock:
            self._clear()
            print(text, file=self.stream, flush=True)
            self._draw(force=True)

    def finish(self) -> None:
        with self._lock:
            self._clear()

    def _bar(self) -> str:
        fraction = min(self._done / self.total, 1.0)
        filled = int(fraction * WIDTH)
        elapsed = int(time.monotonic() - self._start)
        return (f"[{'#' * filled}{'.' * (WIDTH - filled)}] {fraction * 100:3.0f}%  "
                f"{elapsed // 60:02d}:{elapsed % 60:02d}  {self._label}")

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.interactive:
            if not force and now - self._drawn_at < 0.1:
                return
            self.stream.write("\r\x1b[K" + self._bar()[:200])
            self.stream.flush()
            self._line_shown = True
        else:
            if self._label == self._drawn_label or now - self._drawn_at < 2.0:
                return
            self.stream.write(self._bar() + "\n")
            self.stream.flush()
            self._drawn_label = self._label
        self._drawn_at = now

    def _clear(self) -> None:
        if self.enabled and self.interactive and self._line_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._line_shown = False
