"""qsnap.v1.VirtualMachines: whole-VM snapshots, restore and clone of
libvirt domains whose disks are qsnap volumes (``engine/vm.py``), for the
``qsnap vm`` CLI.

Thin: it checks that the request names what it works on, calls the engine
and translates its records; the engine's errors become status codes in
``csidriver/errors.py``.  A driver without libvirt (``--libvirt-uri none``)
has no engine object and answers FAILED_PRECONDITION to every call.
"""

from __future__ import annotations

import grpc

from csidriver.pb import qsnap_pb2, qsnap_pb2_grpc
from engine.errors import FailedPrecondition, InvalidArgument
from engine.vm import RestoreResult, VirtualMachines, VmSnapshot

LIBVIRT_OFF = "libvirt is turned off (--libvirt-uri none)"


def details_pb(snap: VmSnapshot) -> qsnap_pb2.VmSnapshotDetails:
    """A VM snapshot record as its message."""
    return qsnap_pb2.VmSnapshotDetails(
        snapshot_id=snap.id, name=snap.name, domain_name=snap.domain_name,
        domain_uuid=snap.domain_uuid, created_ns=snap.created_ns, status=snap.status,
        disks=[qsnap_pb2.VmDiskDetails(target=d.target, volume_id=d.volume_id,
                                       attachment=d.attachment, snapshot_id=d.snapshot_id,
                                       driver_type=d.driver_type) for d in snap.disks],
        excluded=[qsnap_pb2.ExcludedDiskDetails(target=d.target, source=d.source,
                                                reason=d.reason) for d in snap.excluded],
        warnings=list(snap.warnings), indications=list(snap.indications),
        group_snapshot_id=snap.group_id, error=snap.error, online=snap.online,
        domain_xml=snap.domain_xml)


def _restore_pb(result: RestoreResult) -> qsnap_pb2.RestoreVmResponse:
    return qsnap_pb2.RestoreVmResponse(domain_name=result.domain_name,
                                       domain_uuid=result.domain_uuid,
                                       volumes=result.volumes, replaced=result.replaced)


class VirtualMachinesService(qsnap_pb2_grpc.VirtualMachinesServicer):
    """:param vms: the engine's VM operations; None when the driver runs
        without libvirt."""

    def __init__(self, vms: VirtualMachines | None) -> None:
        self.vms = vms

    def _engine(self) -> VirtualMachines:
        """:raises FailedPrecondition: no libvirt."""
        if self.vms is None:
            raise FailedPrecondition(LIBVIRT_OFF)
        return self.vms

    def CreateVmSnapshot(self, request: qsnap_pb2.CreateVmSnapshotRequest,
                         context: grpc.ServicerContext) -> qsnap_pb2.VmSnapshotDetails:
        """:raises InvalidArgument: no domain or no name.
        :raises NotFound: no such domain.
        :raises FailedPrecondition: no libvirt; no qsnap disk; warnings not
            accepted.
        :raises AlreadyExists: the name is taken by a snapshot of other disks."""
        if not request.domain:
            raise InvalidArgument("domain is required")
        if not request.name:
            raise InvalidArgument("name is required")
        snap = self._engine().snapshot(request.domain, request.name,
                                       parameters=dict(request.parameters),
                                       accept_warnings=request.accept_warnings)
        return details_pb(snap)

    def ListVmSnapshots(self, request: qsnap_pb2.ListVmSnapshotsRequest,
                        context: grpc.ServicerContext) -> qsnap_pb2.ListVmSnapshotsResponse:
        """:raises FailedPrecondition: no libvirt."""
        return qsnap_pb2.ListVmSnapshotsResponse(
            snapshots=[details_pb(s) for s in self._engine().list(request.domain)])

    def GetVmSnapshot(self, request: qsnap_pb2.GetVmSnapshotRequest,
                      context: grpc.ServicerContext) -> qsnap_pb2.VmSnapshotDetails:
        """:raises InvalidArgument: no ID.
        :raises NotFound: no such VM snapshot."""
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        return details_pb(self._engine().get(request.snapshot_id))

    def DeleteVmSnapshot(self, request: qsnap_pb2.DeleteVmSnapshotRequest,
                         context: grpc.ServicerContext) -> qsnap_pb2.DeleteVmSnapshotResponse:
        """:raises InvalidArgument: no ID.
        :raises NotFound: no such VM snapshot (unlike CSI's DeleteSnapshot:
            a person typing an ID wants to hear about a typo)."""
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        self._engine().delete(request.snapshot_id)
        return qsnap_pb2.DeleteVmSnapshotResponse()

    def RestoreVm(self, request: qsnap_pb2.RestoreVmRequest,
                  context: grpc.ServicerContext) -> qsnap_pb2.RestoreVmResponse:
        """:raises InvalidArgument: no ID.
        :raises NotFound: no such VM snapshot.
        :raises FailedPrecondition: the domain runs (VmRunning); the
            snapshot is not Ready."""
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        return _restore_pb(self._engine().restore(request.snapshot_id))

    def CloneVm(self, request: qsnap_pb2.CloneVmRequest,
                context: grpc.ServicerContext) -> qsnap_pb2.RestoreVmResponse:
        """:raises InvalidArgument: no ID or no new name.
        :raises NotFound: no such VM snapshot.
        :raises AlreadyExists: a domain of that name exists.
        :raises FailedPrecondition: the snapshot is not Ready."""
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        if not request.new_name:
            raise InvalidArgument("new_name is required")
        return _restore_pb(self._engine().clone(request.snapshot_id, request.new_name,
                                                start=request.start))
