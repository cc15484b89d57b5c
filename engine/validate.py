"""What the engine accepts as names, IDs, sizes and parameters.

IDs and names never become paths (layer files are named by IDs the engine
makes itself), but anything that could escape a directory or a log line is
refused anyway, so that a hostile value fails loudly and early.
"""

from __future__ import annotations

import re

from engine.errors import InvalidArgument, OutOfRange

MAX_NAME_BYTES = 128
SECTOR = 512
GIB = 1 << 30
TIB = 1 << 40
DEFAULT_VOLUME_SIZE = 1 * GIB
# qcow2 with 64 KiB clusters addresses up to 64 TiB with a 32 MiB L1 table
# (QEMU's limit on L1 size); larger requests cannot be honoured.
MAX_VOLUME_SIZE = 64 * TIB

VOLUME_ID = re.compile(r"^v-[0-9a-f]{32}$")
SNAPSHOT_ID = re.compile(r"^s-[0-9a-f]{32}$")
GROUP_ID = re.compile(r"^g-[0-9a-f]{32}$")
VM_SNAPSHOT_ID = re.compile(r"^m-[0-9a-f]{32}$")
_ID_PATTERNS = {"volume": VOLUME_ID, "snapshot": SNAPSHOT_ID, "group snapshot": GROUP_ID,
                "VM snapshot": VM_SNAPSHOT_ID}
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")

# Keys the Kubernetes sidecars add with --extra-create-metadata: accepted and
# kept, never interpreted.
K8S_PREFIX = "csi.storage.k8s.io/"


def _check_text(kind: str, value: str) -> None:
    if not value:
        raise InvalidArgument(f"{kind} is empty")
    raw = value.encode("utf-8", errors="surrogatepass")
    if len(raw) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{kind} is {len(raw)} bytes long; at most {MAX_NAME_BYTES} are allowed")
    if "\x00" in value or "/" in value or "\\" in value or value in (".", "..") or ".." in value:
        raise InvalidArgument(f"{kind} {value!r} contains a path separator, '..' or NUL")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidArgument(f"{kind} {value!r} contains control characters")


def check_name(kind: str, name: str) -> None:
    """A client-chosen name (volume or snapshot).

    :raises InvalidArgument: empty, over-long, path-like or with control characters.
    """
    _check_text(f"{kind} name", name)


def check_id(kind: str, value: str) -> bool:
    """Whether ``value`` is an ID the engine could have issued.

    :returns: False for a harmless value that can name nothing here (the
        caller reports it as not found).
    :raises InvalidArgument: the value is empty, over-long or path-like.
    """
    _check_text(f"{kind} ID", value)
    return bool(_ID_PATTERNS[kind].match(value))


def round_size(required: int, limit: int, *, floor: int = 0) -> int:
    """The size to provision for a capacity range.

    ``required`` and ``limit`` are the CSI capacity range (0 = unset);
    ``floor`` is a minimum the content demands (a restore cannot be smaller
    than its snapshot).  Sizes are whole 512-byte sectors.

    :raises InvalidArgument: a negative bound.
    :raises OutOfRange: no size satisfies the range.
    """
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity bounds must not be negative")
    if limit and required > limit:
        raise OutOfRange(f"required_bytes {required} exceeds limit_bytes {limit}")
    if required == 0 and floor == 0:
        size = DEFAULT_VOLUME_SIZE if not limit else min(DEFAULT_VOLUME_SIZE, limit)
        size -= size % SECTOR
        if size == 0:
            raise OutOfRange(f"limit_bytes {limit} is smaller than one sector ({SECTOR} bytes)")
    else:
        size = -(-max(required, floor) // SECTOR) * SECTOR
    if limit and size > limit:
        if floor > limit:
            raise OutOfRange(f"the content needs {floor} bytes but limit_bytes is {limit}")
        raise OutOfRange(f"{required} bytes rounded up to whole sectors ({size}) exceed limit_bytes {limit}")
    if size > MAX_VOLUME_SIZE:
        raise OutOfRange(f"{size} bytes exceed the largest volume qsnap makes ({MAX_VOLUME_SIZE})")
    return size


def check_parameters(kind: str, parameters: dict[str, str], known: frozenset[str]) -> None:
    """Refuse parameters qsnap does not know (Kubernetes' own are allowed).

    :raises InvalidArgument: an unknown key or a key with odd characters.
    """
    for key in parameters:
        if key.startswith(K8S_PREFIX):
            continue
        if key not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise InvalidArgument(f"unknown {kind} parameter {key!r} (qsnap accepts: {allowed})")


def flag(params: dict[str, str], key: str) -> bool:
    """A boolean parameter: "true" or "false" (absent: false).

    :raises InvalidArgument: any other value.
    """
    value = params.get(key, "false").strip().lower()
    if value not in ("true", "false"):
        raise InvalidArgument(f"parameter {key} must be \"true\" or \"false\", not {value!r}")
    return value == "true"
