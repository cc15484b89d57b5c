"""Port of csi-test pkg/sanity/groupcontroller.go: DescribeSanity("GroupController
Service [GroupController Server]") and ("GroupController Service
[GroupController VolumeGroupSnapshots]").

Both upstream blocks skip unless the plugin advertises GROUP_CONTROLLER_SERVICE;
the second also unless the group controller advertises
CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT.  The IDs are the ID generator's
invalid *volume* ID, as upstream passes them.
"""

from __future__ import annotations

import grpc
import pytest

import sanity_lib as S
from sanity_lib import sc_fixture  # noqa: F401  (fixture)
from sanity_lib import csi_pb2

GroupRPC = csi_pb2.GroupControllerServiceCapability.RPC.Type
ServiceType = csi_pb2.PluginCapability.Service.Type


def _require_group_controller(sc: S.SanityContext) -> None:
    """The BeforeEach of both blocks: skip without the service."""
    res = S.expect_ok(lambda: sc.identity.GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest(), timeout=S.CALL_TIMEOUT))
    assert res is not None
    if not any(c.WhichOneof("type") == "service"
               and c.service.type == ServiceType.GROUP_CONTROLLER_SERVICE
               for c in res.capabilities):
        pytest.skip("driver does not advertise GROUP_CONTROLLER_SERVICE, upstream sanity skips "
                    "this spec too (upstream: Skip('GroupControllerService not supported'))")


def _group_capabilities(sc: S.SanityContext) -> list[int]:
    """groupcontroller.go isGroupControllerCapabilitySupported's query."""
    caps = S.expect_ok(lambda: sc.group_controller.GroupControllerGetCapabilities(
        csi_pb2.GroupControllerGetCapabilitiesRequest(), timeout=S.CALL_TIMEOUT))
    assert caps is not None
    types = []
    for cap in caps.capabilities:
        assert cap.HasField("rpc"), f"capability without rpc: {cap}"
        types.append(cap.rpc.type)
    return types


@pytest.fixture
def gsc(sc: S.SanityContext) -> S.SanityContext:
    """The second block's BeforeEach."""
    _require_group_controller(sc)
    if GroupRPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT not in _group_capabilities(sc):
        pytest.skip("driver does not advertise CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT, upstream "
                    "sanity skips this spec too (upstream: Skip('VolumeGroupSnapshots not "
                    "supported'))")
    return sc


def test_group_controller_get_capabilities_should_return_appropriate_capabilities(sc):
    """GroupController Service [GroupController Server] / GroupControllerGetCapabilities /
    It("should return appropriate capabilities")."""
    _require_group_controller(sc)
    for cap_type in _group_capabilities(sc):
        assert cap_type == GroupRPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT, (
            f"Unknown capability: {cap_type}")


def test_create_volume_group_snapshot_should_fail_when_no_name_is_provided(gsc):
    """GroupController Service [GroupController VolumeGroupSnapshots] /
    CreateVolumeGroupSnapshot / It("should fail when no name is provided")."""
    S.expect_error_code(lambda: gsc.group_controller.CreateVolumeGroupSnapshot(
        csi_pb2.CreateVolumeGroupSnapshotRequest(
            secrets=S._maybe(gsc.secrets.create_snapshot)), timeout=S.CALL_TIMEOUT),
        grpc.StatusCode.INVALID_ARGUMENT)


def test_get_volume_group_snapshot_should_fail_when_no_volume_id_is_provided(gsc):
    """GroupController Service [GroupController VolumeGroupSnapshots] /
    GetVolumeGroupSnapshot / It("should fail when no volume id is provided")."""
    S.expect_error_code(lambda: gsc.group_controller.GetVolumeGroupSnapshot(
        csi_pb2.GetVolumeGroupSnapshotRequest(
            secrets=S._maybe(gsc.secrets.list_snapshots)), timeout=S.CALL_TIMEOUT),
        grpc.StatusCode.INVALID_ARGUMENT)


def test_get_volume_group_snapshot_should_fail_when_an_invalid_volume_id_is_used(gsc):
    """GroupController Service [GroupController VolumeGroupSnapshots] /
    GetVolumeGroupSnapshot / It("should fail when an invalid volume id is used")."""
    S.expect_error_code(lambda: gsc.group_controller.GetVolumeGroupSnapshot(
        csi_pb2.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=gsc.id_gen.generate_invalid_volume_id(),
            secrets=S._maybe(gsc.secrets.list_snapshots)), timeout=S.CALL_TIMEOUT),
        grpc.StatusCode.NOT_FOUND)


def test_delete_volume_group_snapshot_should_fail_when_no_volume_id_is_provided(gsc):
    """GroupController Service [GroupController VolumeGroupSnapshots] /
    DeleteVolumeGroupSnapshot / It("should fail when no volume id is provided")."""
    S.expect_error_code(lambda: gsc.group_controller.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(
            secrets=S._maybe(gsc.secrets.delete_snapshot)), timeout=S.CALL_TIMEOUT),
        grpc.StatusCode.INVALID_ARGUMENT)


def test_delete_volume_group_snapshot_should_succeed_when_an_invalid_volume_id_is_used(gsc):
    """GroupController Service [GroupController VolumeGroupSnapshots] /
    DeleteVolumeGroupSnapshot / It("should succeed when an invalid volume id is used")."""
    S.expect_ok(lambda: gsc.group_controller.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=gsc.id_gen.generate_invalid_volume_id(),
            secrets=S._maybe(gsc.secrets.delete_snapshot)), timeout=S.CALL_TIMEOUT))
