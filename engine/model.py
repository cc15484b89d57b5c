"""Records the engine hands out.  Immutable snapshots of catalog rows:
holding one never locks anything, and it may be stale a moment later."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Generic, Protocol, TypeVar

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
    group_id: str = ""         # the group snapshot it was cut in, if any


@dataclass(frozen=True)
class GroupSnapshot:
    """Snapshots of several volumes cut at one instant (one freeze, one
    switch per owner): a CSI VolumeGroupSnapshot, or a VM's disks."""

    id: str
    name: str
    created_ns: int
    snapshot_ids: tuple[str, ...]
    parameters: dict[str, str] = field(default_factory=dict)
    indications: tuple[str, ...] = ()
    ready: bool = True


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


@dataclass(frozen=True)
class Staging:
    """A volume the node serves: where it is staged and how it is exposed.

    ``state`` is "staging" until every step of staging is done, "staged"
    after, and "unstaging" while it is being taken down; a restarted node
    finishes whichever it finds.
    """

    volume_id: str
    staging_path: str
    access: str                # "block" or "mount"
    fs_type: str
    mount_flags: tuple[str, ...]
    read_only: bool
    export_path: str           # the FUSE export file of qemu-storage-daemon
    device: str                # the loop device on the export ("" until attached)
    state: str


@dataclass(frozen=True)
class Publication:
    volume_id: str
    target_path: str
    read_only: bool


class TopOwner(Protocol):
    """Changes the top layer of volumes that a process other than qsnap has
    open: the only way such a layer may change (``Pool.attach_owner``)."""

    def claims(self, volume: Volume) -> bool:
        """Whether the owner must switch this volume although no process
        has its top open now (a stopped domain's definition names it)."""
        ...

    def prepare(self, cuts: list[tuple[Volume, str]]) -> None:
        """Do ahead of the switch, before any guest is frozen, whatever
        lookups the switch needs, so that the frozen window holds only the
        switch itself.  Changes nothing the owner serves.

        :raises EngineError: the switch could not happen (nothing changed).
        """
        ...

    def abandon(self, cuts: list[tuple[Volume, str]]) -> None:
        """Undo what :meth:`prepare` did for a cut that will not be switched
        (it failed, or the quiesce refused).  Never raises."""
        ...

    def switch(self, cuts: list[tuple[Volume, str]], *, freeze: bool) -> tuple[str, ...]:
        """Make each new layer (already written, backed by the volume's
        current top) the volume's top in the owning process, atomically
        across all of them.  ``freeze``: quiesce the volumes' filesystems
        around the switch.

        :returns: indications describing how the cut was taken.
        :raises EngineError: the switch did not happen (nothing changed).
        """
        ...

    def resize(self, volume: Volume, size_bytes: int) -> None:
        """Grow the volume's top in the owning process.

        :raises EngineError: the resize failed.
        """
        ...

    def commit(self, volume_id: str, layer_id: str, parent_id: str) -> None:
        """Write ``layer_id`` (below the volume's top) into its backing
        ``parent_id`` and back the layer above it onto the parent.

        :raises EngineError: the merge did not complete (the chain is as before).
        """
        ...

    def rebase(self, volume_id: str, layer_id: str, new_parent: str | None) -> None:
        """Copy into ``layer_id`` (below the volume's top) what the layers
        between it and ``new_parent`` hold, then back it onto ``new_parent``;
        content stays the same throughout.

        :raises EngineError: the merge did not complete (the chain is as before).
        """
        ...


class QuiesceSession(Protocol):
    """What a :class:`Quiescer` yields while the guests are quiet."""

    def check(self) -> None:
        """Raise if the quiet window is already over (its deadline passed);
        a cut switched after that is not application-consistent.

        :raises EngineError: the window is over.
        """
        ...

    def indications_for(self, volume_id: str) -> tuple[str, ...]:
        """How the quiescing went for the users of one volume."""
        ...

    def frozen_window_s(self) -> float | None:
        """The longest freeze → thaw window, once thawed (None: nothing froze)."""
        ...


class Quiescer(Protocol):
    """Quiets the users of volumes (guests, through their agents) around a
    cut: ``Pool.attach_quiescer``."""

    def quiesce(self, paths: Mapping[str, Sequence[Path | str]],
                parameters: Mapping[str, str]) -> AbstractContextManager[QuiesceSession]:
        """Quiesce every user of the given volumes (volume ID → the files
        and devices it is reached through) for the ``with`` block, and
        always release them.  ``parameters`` are the snapshot's.

        :raises EngineError: the policy forbids the cut, or the window was
            overrun (raised at the block's exit, after the release).
        """
        ...
