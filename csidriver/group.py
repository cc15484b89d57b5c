"""CSI GroupController service: group snapshots, translated to the engine.

A group snapshot cuts several volumes at one instant (one guest freeze, one
switch per owner: see ``Pool.create_group_snapshot``).  Its members are
ordinary snapshots: each can be restored on its own, and ListSnapshots
shows them with ``group_snapshot_id`` set.

Every RPC has the shape of the Controller's (``csidriver/controller.py``):
is the capability advertised, are the fields there, then one engine call,
idempotent by name.  Errors are raised, never turned into status codes here:
``csidriver/errors.py`` maps them for every RPC.

``snapshot_ids`` in DeleteVolumeGroupSnapshot and GetVolumeGroupSnapshot:
qsnap does not need them (the group knows its members), and the spec asks
a plugin that can detect a mismatch to report it, with INVALID_ARGUMENT
("Snapshot list mismatch" in both RPCs' error tables).  An empty list is
taken as "not given": csi-sanity deletes and gets groups without one.

Secrets fields are accepted and ignored, as in the Controller.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc

from csidriver.controller import fill_snapshot
from csidriver.calls import CallGate
from csidriver.pb import csi_pb2, csi_pb2_grpc
from engine.errors import InvalidArgument, NotFound
from engine.locks import KeyedLock
from engine.model import GroupSnapshot, Snapshot
from engine.pool import Pool

log = logging.getLogger(__name__)

RPC = csi_pb2.GroupControllerServiceCapability.RPC

CAPABILITIES: tuple[csi_pb2.GroupControllerServiceCapability.RPC.Type, ...] = (
    RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT,
)


def _require(value: str, field: str) -> str:
    """:raises InvalidArgument: ``value`` is empty."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


def _mismatch(given: Iterable[str], members: Iterable[str], *, ignore: Iterable[str] = ()) -> str:
    """Why ``given`` is not the group's member list ("" when it is).

    Order does not matter; IDs in ``ignore`` (snapshots that no longer
    exist anywhere) are left out of the comparison.
    """
    skip = set(ignore)
    want = set(members)
    got = set(given) - skip
    extra = sorted(got - want)
    missing = sorted(want - got)
    reasons = []
    if extra:
        reasons.append(f"not members of the group: {', '.join(extra)}")
    if missing:
        reasons.append(f"members not named: {', '.join(missing)}")
    return "; ".join(reasons)


class GroupController(csi_pb2_grpc.GroupControllerServicer):
    """:param pool: the open pool.
    :param ops: the non-blocking keyed lock of in-flight calls; share the
        Controller's so that a group cut and a CreateSnapshot or
        DeleteVolume of one of its volumes answer ABORTED to each other
        rather than queue in the engine.
    """

    def __init__(self, pool: Pool, ops: KeyedLock | None = None) -> None:
        self.pool = pool
        self.gate = CallGate(frozenset(CAPABILITIES), RPC.Type.Name, ops)

    # -- shared steps ----------------------------------------------------

    def _members(self, group: GroupSnapshot) -> list[Snapshot]:
        """The group's snapshots as they are now.  A member deleted on its
        own (DeleteSnapshot) between reading the group and its members is
        left out: it is no longer a snapshot."""
        members = []
        for snapshot_id in group.snapshot_ids:
            try:
                members.append(self.pool.get_snapshot(snapshot_id))
            except NotFound:
                continue
        return members

    def _group_pb(self, group: GroupSnapshot) -> csi_pb2.VolumeGroupSnapshot:
        members = self._members(group)
        msg = csi_pb2.VolumeGroupSnapshot(group_snapshot_id=group.id)
        for member in members:
            fill_snapshot(msg.snapshots.add(), member)
        # Exact: creation_time must not change between repeated calls.
        msg.creation_time.seconds, msg.creation_time.nanos = divmod(group.created_ns,
                                                                    1_000_000_000)
        # The spec: false if any member is not ready.
        msg.ready_to_use = group.ready and all(m.ready for m in members)
        return msg

    # -- RPCs --------------------------------------------------------------

    def GroupControllerGetCapabilities(
            self, request: csi_pb2.GroupControllerGetCapabilitiesRequest,
            context: grpc.ServicerContext) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        """Never fails."""
        caps = [csi_pb2.GroupControllerServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES]
        return csi_pb2.GroupControllerGetCapabilitiesResponse(capabilities=caps)

    def CreateVolumeGroupSnapshot(self, request: csi_pb2.CreateVolumeGroupSnapshotRequest,
                                  context: grpc.ServicerContext
                                  ) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        """Cut every source volume at one instant, or return the group
        already made under the name with the same volumes and parameters.

        :raises InvalidArgument: no name, no volumes, a volume named twice,
            a bad name or parameter.
        :raises AlreadyExists: the name exists with other volumes or parameters.
        :raises NotFound: a source volume does not exist.
        :raises PoolFull: no room for the new overlays (RESOURCE_EXHAUSTED).
        :raises InUse: a volume is open by an owner qsnap cannot cut
            through (FAILED_PRECONDITION).
        :raises EngineError: a guest agent policy refused or a freeze
            deadline passed (engine/freeze.py; mapped in csidriver/errors.py).
        :raises Busy: a call on the same name or one of the volumes is in
            progress (ABORTED).
        """
        self.gate.check_capability(RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT)
        name = _require(request.name, "name")
        volume_ids = list(request.source_volume_ids)
        if not volume_ids:
            raise InvalidArgument("source_volume_ids is required")
        if any(not v for v in volume_ids):
            raise InvalidArgument("source_volume_ids contains an empty ID")
        # The cut moves every volume onto a new top: it changes each of them.
        keys = [f"group-name:{name}"] + [f"volume:{v}" for v in volume_ids]
        with self.gate.exclusive(*keys):
            group = self.pool.create_group_snapshot(name, volume_ids,
                                                    parameters=dict(request.parameters))
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=self._group_pb(group))

    def DeleteVolumeGroupSnapshot(self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest,
                                  context: grpc.ServicerContext
                                  ) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        """Delete a group snapshot and its member snapshots; an unknown ID
        is already deleted (OK).

        :raises InvalidArgument: no ID, a path-like one, or ``snapshot_ids``
            that are not the group's members (IDs of snapshots that no
            longer exist are tolerated: a retry after they went is done).
        :raises Busy: a call on the same group is in progress (ABORTED).
        """
        self.gate.check_capability(RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT)
        group_id = _require(request.group_snapshot_id, "group_snapshot_id")
        given = list(request.snapshot_ids)
        with self.gate.exclusive(f"group:{group_id}"):
            try:
                group = self.pool.get_group_snapshot(group_id)
            except NotFound:
                log.info("group snapshot %s: does not exist, DeleteVolumeGroupSnapshot is "
                         "already done", group_id)
                return csi_pb2.DeleteVolumeGroupSnapshotResponse()
            if given:
                gone = [s for s in given if s not in group.snapshot_ids and self._gone(s)]
                if reason := _mismatch(given, group.snapshot_ids, ignore=gone):
                    raise InvalidArgument(f"snapshot_ids do not match group snapshot "
                                          f"{group_id}: {reason}")
            try:
                self.pool.delete_group_snapshot(group_id)
            except NotFound:
                log.info("group snapshot %s: deleted meanwhile", group_id)
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()

    def _gone(self, snapshot_id: str) -> bool:
        """Whether no snapshot has this ID (any more).

        :raises InvalidArgument: an empty or path-like ID.
        """
        try:
            self.pool.get_snapshot(snapshot_id)
        except NotFound:
            return True
        return False

    def GetVolumeGroupSnapshot(self, request: csi_pb2.GetVolumeGroupSnapshotRequest,
                               context: grpc.ServicerContext
                               ) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        """A group snapshot and its members as they are now.

        :raises InvalidArgument: no ID, a path-like one, or ``snapshot_ids``
            that are not exactly the group's members.
        :raises NotFound: no such group snapshot.
        """
        self.gate.check_capability(RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT)
        group_id = _require(request.group_snapshot_id, "group_snapshot_id")
        group = self.pool.get_group_snapshot(group_id)
        if request.snapshot_ids:
            if reason := _mismatch(request.snapshot_ids, group.snapshot_ids):
                raise InvalidArgument(f"snapshot_ids do not match group snapshot {group_id}: "
                                      f"{reason}")
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=self._group_pb(group))
