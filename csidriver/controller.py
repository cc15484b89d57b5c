"""CSI Controller service: volumes and snapshots, translated to the engine.

Every RPC opens the same way (as csi-driver-host-path does): is the RPC's
capability advertised, are the required fields there and well formed, then
one engine call, which is idempotent by name.  The engine decides what
exists and how big it is; this layer only checks the CSI-level shape of a
request and turns records into messages.  Errors are raised, never turned
into status codes here: ``csidriver/errors.py`` maps them for every RPC.

Concurrency: the engine serialises calls on one object (blocking).  CSI asks
that a second call on an object that is already being operated on return
ABORTED instead, so that the CO backs off and retries; every call that
changes something first takes the object's keys in a non-blocking
:class:`KeyedLock` (``Busy`` → ABORTED).  Reads take no lock.

Secrets fields are accepted and ignored: qsnap needs no credentials, and
the request bodies are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import wrappers_pb2

from csidriver.errors import RpcError, unimplemented
from csidriver.calls import CallGate
from csidriver.pb import csi_pb2, csi_pb2_grpc
from engine import pool as engine_pool
from engine import validate
from engine.errors import InvalidArgument, NotFound
from engine.locks import KeyedLock
from engine.model import ContentSource, Snapshot, SnapshotSource, Volume, VolumeSource
from engine.pool import Pool

log = logging.getLogger(__name__)

RPC = csi_pb2.ControllerServiceCapability.RPC
Mode = csi_pb2.VolumeCapability.AccessMode

# What the controller serves, advertised by ControllerGetCapabilities and
# checked at the top of each RPC.  VOLUME_CONDITION is real: a volume whose
# backing chain has a missing layer file is reported abnormal.
CAPABILITIES: tuple[csi_pb2.ControllerServiceCapability.RPC.Type, ...] = (
    RPC.CREATE_DELETE_VOLUME,
    RPC.CREATE_DELETE_SNAPSHOT,
    RPC.LIST_SNAPSHOTS,
    RPC.GET_SNAPSHOT,
    RPC.CLONE_VOLUME,
    RPC.EXPAND_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.GET_CAPACITY,
    RPC.GET_VOLUME,
    RPC.VOLUME_CONDITION,
    RPC.SINGLE_NODE_MULTI_WRITER,
)

# Volumes live in one node's pool: only single-node modes can be honoured.
SUPPORTED_MODES: frozenset[int] = frozenset({
    Mode.SINGLE_NODE_WRITER,
    Mode.SINGLE_NODE_READER_ONLY,
    Mode.SINGLE_NODE_SINGLE_WRITER,
    Mode.SINGLE_NODE_MULTI_WRITER,
})
# "" lets the node pick its default filesystem.
FS_TYPES: tuple[str, ...] = ("", "ext4", "xfs")
# The topology segment of a node: a volume lives in one node's pool, so it is
# accessible from exactly that node (NodeGetInfo reports the same segment).
TOPOLOGY_KEY = "topology.qsnap.csi.dev/node"


@dataclass(frozen=True)
class Access:
    """One volume capability reduced to what qsnap acts on.

    Mount flags and the mount group are deliberately left out: they belong
    to a publish, not to the volume, and mount flags may carry secrets, so
    they must not end up in the catalog (which stores :meth:`text`).
    """

    kind: str        # "block" or "mount"
    fs_type: str
    mode: int

    def text(self) -> str:
        mode = Mode.Mode.Name(self.mode)
        if self.kind == "block":
            return f"block:{mode}"
        return f"mount/{self.fs_type}:{mode}" if self.fs_type else f"mount:{mode}"

    def unsupported(self) -> str:
        """Why qsnap cannot serve this capability, or "" when it can."""
        if self.mode not in SUPPORTED_MODES:
            return (f"access mode {Mode.Mode.Name(self.mode)} needs several nodes; qsnap volumes "
                    "live on one node (use a SINGLE_NODE_* mode)")
        if self.kind == "mount" and self.fs_type not in FS_TYPES:
            return (f"fs_type {self.fs_type!r} is not supported "
                    f"(qsnap formats {', '.join(repr(f) for f in FS_TYPES)})")
        return ""


def parse_capability(cap: csi_pb2.VolumeCapability) -> Access:
    """:raises InvalidArgument: no access type or no (or an unknown) access mode."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise InvalidArgument("a volume capability has neither block nor mount access type")
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        raise InvalidArgument("a volume capability has no access mode")
    if cap.access_mode.mode not in Mode.Mode.values():
        raise InvalidArgument(f"unknown access mode {cap.access_mode.mode}")
    fs_type = cap.mount.fs_type if kind == "mount" else ""
    return Access(kind, fs_type, cap.access_mode.mode)


def parse_capabilities(caps: Iterable[csi_pb2.VolumeCapability]) -> list[Access]:
    """:raises InvalidArgument: the list is empty or a capability is malformed."""
    parsed = [parse_capability(c) for c in caps]
    if not parsed:
        raise InvalidArgument("volume_capabilities is required")
    return parsed


def canonical(accesses: Iterable[Access]) -> str:
    """Order-independent text of a capability set: the engine compares it
    to decide whether a repeated CreateVolume asks for the same volume."""
    return ",".join(sorted({a.text() for a in accesses}))


def _needs_node_expansion(stored: str) -> bool:
    # A filesystem must be grown on the node; a raw block device is done
    # once the image is bigger.  Without a record, assume a filesystem.
    parts = [p for p in stored.split(",") if p]
    return not parts or any(p.startswith("mount") for p in parts)


def _require(value: str, field: str) -> str:
    """:raises InvalidArgument: ``value`` is empty."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


def _source_pb(source: ContentSource | None) -> csi_pb2.VolumeContentSource | None:
    if isinstance(source, SnapshotSource):
        return csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=source.snapshot_id))
    if isinstance(source, VolumeSource):
        return csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=source.volume_id))
    return None


def fill_snapshot(msg: csi_pb2.Snapshot, s: Snapshot) -> csi_pb2.Snapshot:
    """Set ``msg``'s fields from ``s``.  Filling a message in place is about
    three times faster than building nested messages, which shows when a
    ListSnapshots page holds thousands."""
    msg.size_bytes = s.size_bytes
    msg.snapshot_id = s.id
    msg.source_volume_id = s.source_volume_id
    # Exact: creation_time must not change between repeated calls.
    msg.creation_time.seconds, msg.creation_time.nanos = divmod(s.created_ns, 1_000_000_000)
    msg.ready_to_use = s.ready
    if s.group_id:
        msg.group_snapshot_id = s.group_id
    return msg


def snapshot_pb(s: Snapshot) -> csi_pb2.Snapshot:
    return fill_snapshot(csi_pb2.Snapshot(), s)


class Controller(csi_pb2_grpc.ControllerServicer):
    """:param pool: the open pool.
    :param drivername: prefixes the volume context keys.
    :param nodeid: the node whose pool holds the volumes.
    :param ops: the keyed lock of in-flight calls, shared with the
        GroupController so that calls of both on one volume exclude each other.
    """

    def __init__(self, pool: Pool, drivername: str, nodeid: str,
                 ops: KeyedLock | None = None) -> None:
        self.pool = pool
        # Small and stable: the same for every call on every volume of this
        # node, so a repeated CreateVolume returns an identical Volume.
        self.volume_context = {f"{drivername}/node": nodeid}
        self.nodeid = nodeid
        self.topology = csi_pb2.Topology(segments={TOPOLOGY_KEY: nodeid})
        self.gate = CallGate(frozenset(CAPABILITIES), RPC.Type.Name, ops)

    # -- shared steps ----------------------------------------------------

    def _here(self, topology: csi_pb2.Topology) -> bool:
        """Whether a topology names this node (other keys are not ours to judge)."""
        return topology.segments.get(TOPOLOGY_KEY) == self.nodeid

    def _check_topology(self, requirement: csi_pb2.TopologyRequirement) -> None:
        """A volume can only be made in this node's pool.  The spec lets
        ``preferred`` only narrow ``requisite``; given alone it is the CO's
        whole wish list (csi-provisioner sends only the selected node), so
        it is held to the same rule.

        :raises RpcError: RESOURCE_EXHAUSTED, the spec's answer when the
            volume cannot be made accessible from any requested topology.
        """
        wanted = list(requirement.requisite) or list(requirement.preferred)
        if wanted and not any(self._here(t) for t in wanted):
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"qsnap volumes live on the node that creates them; this is node "
                           f"{self.nodeid!r} ({TOPOLOGY_KEY}), which none of the "
                           "accessibility requirements names")

    def _volume_pb(self, v: Volume) -> csi_pb2.Volume:
        msg = csi_pb2.Volume(capacity_bytes=v.size_bytes, volume_id=v.id,
                             volume_context=self.volume_context,
                             accessible_topology=[self.topology])
        source = _source_pb(v.source)
        if source is not None:
            msg.content_source.CopyFrom(source)
        return msg

    def _missing_layers(self, volume_id: str) -> list[str]:
        """Layer files of the volume's chain that are not on disk.

        :raises NotFound: the volume is gone.
        """
        missing = [info.id for info in self.pool.volume_chain(volume_id)
                   if not Path(info.path).exists()]
        if missing:
            # A merge may have replaced a layer (and the reclaimer removed
            # its file) between reading the chain and looking at the files:
            # only a file missing from a fresh reading of the chain counts.
            fresh = self.pool.volume_chain(volume_id)
            missing = [info.id for info in fresh if not Path(info.path).exists()]
        return missing

    def _condition(self, v: Volume) -> csi_pb2.VolumeCondition:
        """:raises NotFound: the volume is gone."""
        missing = self._missing_layers(v.id)
        if missing:
            log.error("volume %s: layer file(s) missing: %s", v.id, ", ".join(missing))
            return csi_pb2.VolumeCondition(
                abnormal=True,
                message=f"layer file(s) of the backing chain missing: {', '.join(missing)}")
        return csi_pb2.VolumeCondition(abnormal=False, message="backing chain complete")

    # -- volumes ---------------------------------------------------------

    def CreateVolume(self, request: csi_pb2.CreateVolumeRequest,
                     context: grpc.ServicerContext) -> csi_pb2.CreateVolumeResponse:
        """Create a volume (empty, from a snapshot, or a clone of a volume),
        or return the one already made under the same name.

        :raises InvalidArgument: a missing or malformed field, an
            unsupported capability, mutable parameters.
        :raises AlreadyExists: the name exists with other arguments.
        :raises NotFound: the content source does not exist.
        :raises OutOfRange: the capacity range cannot be met.
        :raises PoolFull: no room (RESOURCE_EXHAUSTED).
        :raises RpcError: RESOURCE_EXHAUSTED when the accessibility
            requirements leave out this node (restores and clones are made
            in the source's pool, which is this node's, too).
        :raises Busy: a call on the same name or source is in progress (ABORTED).
        """
        self.gate.check_capability(RPC.CREATE_DELETE_VOLUME)
        name = _require(request.name, "name")
        accesses = parse_capabilities(request.volume_capabilities)
        for access in accesses:
            if reason := access.unsupported():
                raise InvalidArgument(reason)
        if len({a.kind for a in accesses}) > 1:
            raise InvalidArgument("a volume is either a block device or a filesystem, "
                                  "not both: ask for block or mount access, not both")
        if request.mutable_parameters:
            raise InvalidArgument("qsnap has no mutable parameters (MODIFY_VOLUME is not supported)")
        self._check_topology(request.accessibility_requirements)
        source: ContentSource | None = None
        keys = [f"volume-name:{name}"]
        if request.HasField("volume_content_source"):
            kind = request.volume_content_source.WhichOneof("type")
            if kind == "snapshot":
                self.gate.check_capability(RPC.CREATE_DELETE_SNAPSHOT)
                source = SnapshotSource(_require(request.volume_content_source.snapshot.snapshot_id,
                                                 "volume_content_source.snapshot.snapshot_id"))
            elif kind == "volume":
                self.gate.check_capability(RPC.CLONE_VOLUME)
                source = VolumeSource(_require(request.volume_content_source.volume.volume_id,
                                               "volume_content_source.volume.volume_id"))
                # A clone cuts its source, which changes the source volume.
                keys.append(f"volume:{source.volume_id}")
            else:
                raise InvalidArgument("volume_content_source names neither a snapshot nor a volume")
        required = request.capacity_range.required_bytes
        limit = request.capacity_range.limit_bytes
        with self.gate.exclusive(*keys):
            volume = self.pool.create_volume(name, required_bytes=required, limit_bytes=limit,
                                             source=source, parameters=dict(request.parameters),
                                             capabilities=canonical(accesses))
        return csi_pb2.CreateVolumeResponse(volume=self._volume_pb(volume))

    def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest,
                     context: grpc.ServicerContext) -> csi_pb2.DeleteVolumeResponse:
        """Delete a volume; an unknown ID is already deleted (OK).

        :raises InvalidArgument: no ID, or a path-like one.
        :raises InUse: the volume is open: staged on the node or attached to
            a VM (FAILED_PRECONDITION).
        :raises Busy: a call on the same volume is in progress (ABORTED).
        """
        self.gate.check_capability(RPC.CREATE_DELETE_VOLUME)
        volume_id = _require(request.volume_id, "volume_id")
        with self.gate.exclusive(f"volume:{volume_id}"):
            try:
                self.pool.delete_volume(volume_id)
            except NotFound:
                log.info("volume %s: does not exist, DeleteVolume is already done", volume_id)
        return csi_pb2.DeleteVolumeResponse()

    def ControllerPublishVolume(self, request: csi_pb2.ControllerPublishVolumeRequest,
                                context: grpc.ServicerContext
                                ) -> csi_pb2.ControllerPublishVolumeResponse:
        """:raises RpcError: always UNIMPLEMENTED (no PUBLISH_UNPUBLISH_VOLUME):
        volumes are node-local and need no attach step."""
        raise unimplemented("ControllerPublishVolume")

    def ControllerUnpublishVolume(self, request: csi_pb2.ControllerUnpublishVolumeRequest,
                                  context: grpc.ServicerContext
                                  ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        """:raises RpcError: always UNIMPLEMENTED (no PUBLISH_UNPUBLISH_VOLUME)."""
        raise unimplemented("ControllerUnpublishVolume")

    def ValidateVolumeCapabilities(self, request: csi_pb2.ValidateVolumeCapabilitiesRequest,
                                   context: grpc.ServicerContext
                                   ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        """Confirm the capabilities (and context, parameters) when qsnap can
        serve all of them for this volume; otherwise answer unconfirmed with
        the reason.

        :raises InvalidArgument: no ID, no capabilities, a malformed capability.
        :raises NotFound: no such volume.
        """
        volume_id = _require(request.volume_id, "volume_id")
        accesses = parse_capabilities(request.volume_capabilities)
        volume = self.pool.get_volume(volume_id)
        reasons = [r for a in accesses if (r := a.unsupported())]
        if request.volume_context and dict(request.volume_context) != self.volume_context:
            reasons.append(f"volume_context differs from the volume's ({self.volume_context})")
        if request.parameters and dict(request.parameters) != volume.parameters:
            reasons.append("parameters differ from the ones the volume was created with")
        if request.mutable_parameters:
            reasons.append("qsnap has no mutable parameters")
        if reasons:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(reasons))
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    def ListVolumes(self, request: csi_pb2.ListVolumesRequest,
                    context: grpc.ServicerContext) -> csi_pb2.ListVolumesResponse:
        """One page of volumes, each with its condition.

        :raises InvalidArgument: a negative max_entries.
        :raises Busy: a starting_token this driver did not issue (ABORTED).
        """
        self.gate.check_capability(RPC.LIST_VOLUMES)
        page = self.pool.list_volumes(request.starting_token, request.max_entries)
        entries = []
        for volume in page.items:
            try:
                condition = self._condition(volume)
            except NotFound:
                continue  # deleted since the page was read: it is no longer a volume
            status = csi_pb2.ListVolumesResponse.VolumeStatus(volume_condition=condition)
            entries.append(csi_pb2.ListVolumesResponse.Entry(volume=self._volume_pb(volume),
                                                             status=status))
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=page.next_token)

    def GetCapacity(self, request: csi_pb2.GetCapacityRequest,
                    context: grpc.ServicerContext) -> csi_pb2.GetCapacityResponse:
        """What a new volume can still get.  Capabilities qsnap cannot serve,
        and a topology that is not this node's, have no capacity at all (0).

        :raises InvalidArgument: a malformed capability or an unknown parameter.
        """
        self.gate.check_capability(RPC.GET_CAPACITY)
        accesses = [parse_capability(c) for c in request.volume_capabilities]
        validate.check_parameters("volume", dict(request.parameters),
                                  engine_pool.VOLUME_PARAMETERS)
        minimum = wrappers_pb2.Int64Value(value=validate.SECTOR)
        elsewhere = request.HasField("accessible_topology") and \
            not self._here(request.accessible_topology)
        if elsewhere or any(a.unsupported() for a in accesses):
            return csi_pb2.GetCapacityResponse(available_capacity=0,
                                               maximum_volume_size=wrappers_pb2.Int64Value(value=0),
                                               minimum_volume_size=minimum)
        capacity = self.pool.capacity()
        return csi_pb2.GetCapacityResponse(
            available_capacity=capacity.available_bytes,
            maximum_volume_size=wrappers_pb2.Int64Value(value=capacity.maximum_volume_size),
            minimum_volume_size=minimum)

    def ControllerGetCapabilities(self, request: csi_pb2.ControllerGetCapabilitiesRequest,
                                  context: grpc.ServicerContext
                                  ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        """Never fails."""
        caps = [csi_pb2.ControllerServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES]
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=caps)

    def ControllerExpandVolume(self, request: csi_pb2.ControllerExpandVolumeRequest,
                               context: grpc.ServicerContext
                               ) -> csi_pb2.ControllerExpandVolumeResponse:
        """Grow a volume (never shrinks; a size it already has is OK).

        :raises InvalidArgument: no ID, no capacity range, a bad capability.
        :raises NotFound: no such volume.
        :raises OutOfRange: the range cannot be met (e.g. a limit below the
            current size).
        :raises PoolFull: the quota cannot take the growth.
        :raises InUse: the volume is open by a VM (FAILED_PRECONDITION); a
            volume staged on this node grows online, through its
            qemu-storage-daemon.
        :raises Busy: a call on the same volume is in progress (ABORTED).
        """
        self.gate.check_capability(RPC.EXPAND_VOLUME)
        volume_id = _require(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        access: Access | None = None
        if request.HasField("volume_capability"):
            access = parse_capability(request.volume_capability)
            if reason := access.unsupported():
                raise InvalidArgument(reason)
        with self.gate.exclusive(f"volume:{volume_id}"):
            volume = self.pool.expand_volume(volume_id, request.capacity_range.required_bytes,
                                             request.capacity_range.limit_bytes)
        node = access.kind == "mount" if access else _needs_node_expansion(volume.capabilities)
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=volume.size_bytes,
                                                      node_expansion_required=node)

    def ControllerGetVolume(self, request: csi_pb2.ControllerGetVolumeRequest,
                            context: grpc.ServicerContext
                            ) -> csi_pb2.ControllerGetVolumeResponse:
        """A volume and its condition.

        :raises InvalidArgument: no ID, or a path-like one.
        :raises NotFound: no such volume.
        """
        self.gate.check_capability(RPC.GET_VOLUME)
        volume = self.pool.get_volume(_require(request.volume_id, "volume_id"))
        status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
            volume_condition=self._condition(volume))
        return csi_pb2.ControllerGetVolumeResponse(volume=self._volume_pb(volume), status=status)

    def ControllerModifyVolume(self, request: csi_pb2.ControllerModifyVolumeRequest,
                               context: grpc.ServicerContext
                               ) -> csi_pb2.ControllerModifyVolumeResponse:
        """:raises RpcError: always UNIMPLEMENTED (no MODIFY_VOLUME: qsnap
        has no mutable parameters)."""
        raise unimplemented("ControllerModifyVolume")

    # -- snapshots -------------------------------------------------------

    def CreateSnapshot(self, request: csi_pb2.CreateSnapshotRequest,
                       context: grpc.ServicerContext) -> csi_pb2.CreateSnapshotResponse:
        """Cut a snapshot, or return the one already made under the name.

        :raises InvalidArgument: no name or source, a bad name or parameter.
        :raises AlreadyExists: the name exists for another volume or parameters.
        :raises NotFound: no such source volume.
        :raises PoolFull: no room for the new overlay (RESOURCE_EXHAUSTED).
        :raises InUse: the volume is open by a VM (FAILED_PRECONDITION); a
            staged volume is cut live through the node's qemu-storage-daemon.
        :raises Busy: a call on the same name or volume is in progress (ABORTED).
        """
        self.gate.check_capability(RPC.CREATE_DELETE_SNAPSHOT)
        name = _require(request.name, "name")
        volume_id = _require(request.source_volume_id, "source_volume_id")
        # The cut moves the volume onto a new top: it changes the volume.
        with self.gate.exclusive(f"snapshot-name:{name}", f"volume:{volume_id}"):
            snapshot = self.pool.create_snapshot(name, volume_id,
                                                 parameters=dict(request.parameters))
        return csi_pb2.CreateSnapshotResponse(snapshot=snapshot_pb(snapshot))

    def DeleteSnapshot(self, request: csi_pb2.DeleteSnapshotRequest,
                       context: grpc.ServicerContext) -> csi_pb2.DeleteSnapshotResponse:
        """Delete a snapshot; an unknown ID is already deleted (OK).

        :raises InvalidArgument: no ID, or a path-like one.
        :raises Busy: a call on the same snapshot is in progress (ABORTED).
        """
        self.gate.check_capability(RPC.CREATE_DELETE_SNAPSHOT)
        snapshot_id = _require(request.snapshot_id, "snapshot_id")
        with self.gate.exclusive(f"snapshot:{snapshot_id}"):
            try:
                self.pool.delete_snapshot(snapshot_id)
            except NotFound:
                log.info("snapshot %s: does not exist, DeleteSnapshot is already done",
                         snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(self, request: csi_pb2.ListSnapshotsRequest,
                      context: grpc.ServicerContext) -> csi_pb2.ListSnapshotsResponse:
        """One page of snapshots, optionally only one ID or one source
        volume; IDs that do not exist give an empty page.

        :raises InvalidArgument: a negative max_entries, a path-like ID.
        :raises Busy: a starting_token this driver did not issue (ABORTED).
        """
        self.gate.check_capability(RPC.LIST_SNAPSHOTS)
        page = self.pool.list_snapshots(request.starting_token, request.max_entries,
                                        snapshot_id=request.snapshot_id,
                                        source_volume_id=request.source_volume_id)
        response = csi_pb2.ListSnapshotsResponse(next_token=page.next_token)
        add = response.entries.add
        for snapshot in page.items:
            fill_snapshot(add().snapshot, snapshot)
        return response

    def GetSnapshot(self, request: csi_pb2.GetSnapshotRequest,
                    context: grpc.ServicerContext) -> csi_pb2.GetSnapshotResponse:
        """:raises InvalidArgument: no ID, or a path-like one.
        :raises NotFound: no such snapshot."""
        self.gate.check_capability(RPC.GET_SNAPSHOT)
        snapshot = self.pool.get_snapshot(_require(request.snapshot_id, "snapshot_id"))
        return csi_pb2.GetSnapshotResponse(snapshot=snapshot_pb(snapshot))
