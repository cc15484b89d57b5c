"""Records the engine hands out.  Immutable snapshots of catalog rows:
holding one never locks anything, and it may be stale a moment later."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class Owner(str, enum.Enum):
    """Who may change a volume's writable top layer right now.

    Only CLOSED tops may be changed with qemu-img; a served or domain-owned
    top is changed only through the process that has it open.
    """

    CLOSED = "closed"
    SERVED = "served"     # the node's qemu-storage-daemon has it open
    DOMAIN = "domain"     # a libvirt domain's QEMU has it open


@dataclass(frozen=True)
class SnapshotSource:
    snapshot_id: str


@dataclass(frozen=True)
class VolumeSource:
    volume_id: str


ContentSource = SnapshotSource | VolumeSource


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    size_bytes: int
    created_ns: int
    top_layer: str
    owner: Owner = Owner.CLOSED
    source: ContentSource | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    capabilities: str = ""     # canonical text of the requested capabilities


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    source_volume_id: str
    size_bytes: int
    created_ns: int            # the moment of the cut
    layer: str
    ready: bool = True
    parameters: dict[str, str] = field(default_factory=dict)
    indications: tuple[str, ...] = ()


@dataclass(frozen=True)
class Layer:
    id: str
    parent: str | None
    depth: int                 # 1 for a layer without backing
    virtual_size: int
    read_only: bool


@dataclass(frozen=True)
class LayerInfo:
    """A layer as seen on disk, for people (``qsnap volume show``)."""

    id: str
    path: str
    depth: int
    virtual_size: int
    allocated_bytes: int
    read_only: bool


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_token: str = ""


@dataclass(frozen=True)
class Capacity:
    available_bytes: int       # what a new volume may still use
    total_bytes: int           # the pool's filesystem (or quota) size
    used_bytes: int            # bytes the pool's layer files occupy
    maximum_volume_size: int
    provisioned_bytes: int     # sum of volume virtual sizes
