"""Human sizes and times: ``10G`` in, ``10.0 GiB`` out."""

from __future__ import annotations

import datetime as dt
import re

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"512"``, ``"64M"``, ``"1.5GiB"``, ``"10g"`` → bytes (binary units).

    :raises ValueError: not a size.
    """
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 512, 64M, 1.5G, 10GiB)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_ns(ns: int) -> str:
    """Nanoseconds since the epoch → ISO 8601 UTC with microseconds."""
    if not ns:
        return "-"
    when = dt.datetime.fromtimestamp(ns / 1e9, tz=dt.timezone.utc)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")
