"""Port of csi-test pkg/sanity/controller.go:
DescribeSanity("Controller Service [Controller Server]").

Each test is one upstream ``It``; its docstring is "Describe / It(text)".
Capability gates are the upstream BeforeEach / in-spec ``Skip`` calls.
"""

from __future__ import annotations

import os
import time

import grpc
import pytest

import sanity_lib as S
from sanity_lib import r_fixture, sc_fixture  # noqa: F401  (fixtures)
from sanity_lib import RPC, csi_pb2

Code = grpc.StatusCode

#: The controller capabilities controller.go's "should return appropriate
#: capabilities" accepts. GET_SNAPSHOT is not in the newest stored upstream
#: text; csi-test#573 (v5.5, i.e. master after v5.4) adds GetSnapshot support
#: and a driver advertising it passes there, so it is accepted here too.
KNOWN_CONTROLLER_CAPABILITIES = {
    RPC.CREATE_DELETE_VOLUME,
    RPC.PUBLISH_UNPUBLISH_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.GET_CAPACITY,
    RPC.CREATE_DELETE_SNAPSHOT,
    RPC.LIST_SNAPSHOTS,
    RPC.PUBLISH_READONLY,
    RPC.CLONE_VOLUME,
    RPC.EXPAND_VOLUME,
    RPC.MODIFY_VOLUME,
    RPC.LIST_VOLUMES_PUBLISHED_NODES,
    RPC.GET_VOLUME,
    RPC.VOLUME_CONDITION,
    RPC.SINGLE_NODE_MULTI_WRITER,
    RPC.GET_SNAPSHOT,
}

#: The specs upstream marks XIt (pending) never run in csi-sanity.
RUN_PENDING = os.environ.get("QSNAP_SANITY_RUN_PENDING") == "1"

#: Upstream polls ReadyToUse forever with 5 s sleeps; we give up after this.
SNAPSHOT_READY_TIMEOUT = 120.0


def _list_volumes(r, **kw):
    return S.expect_ok(lambda: r.controller.ListVolumes(csi_pb2.ListVolumesRequest(**kw),
                                                        timeout=S.CALL_TIMEOUT))


# ---------------------------------------------------------------------------
# Describe("ControllerGetCapabilities")
# ---------------------------------------------------------------------------

def test_controller_get_capabilities_should_return_appropriate_capabilities(sc, r):
    """ControllerGetCapabilities / It("should return appropriate capabilities")."""
    caps = S.expect_ok(lambda: r.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest(), timeout=S.CALL_TIMEOUT))
    assert caps is not None
    for cap in caps.capabilities:
        assert cap.HasField("rpc"), f"capability without rpc: {cap}"
        assert cap.rpc.type in KNOWN_CONTROLLER_CAPABILITIES, (
            f"Unknown capability: {RPC.Type.Name(cap.rpc.type)}")


# ---------------------------------------------------------------------------
# Describe("GetCapacity")
# ---------------------------------------------------------------------------

def test_get_capacity_should_return_capacity_no_optional_values_added(sc, r):
    """GetCapacity / It("should return capacity (no optional values added)")."""
    S.require_controller_capability(sc, "GET_CAPACITY", "GetCapacity not supported")
    # Upstream only requires success: any int64, zero included, is valid.
    S.expect_ok(lambda: r.controller.GetCapacity(csi_pb2.GetCapacityRequest(),
                                                 timeout=S.CALL_TIMEOUT))


# ---------------------------------------------------------------------------
# Describe("ListVolumes")
# ---------------------------------------------------------------------------

def test_list_volumes_should_return_appropriate_values_no_optional_values_added(sc, r):
    """ListVolumes / It("should return appropriate values (no optional values added)")."""
    S.require_controller_capability(sc, "LIST_VOLUMES", "ListVolumes not supported")
    vols = _list_volumes(r)
    assert vols is not None
    for entry in vols.entries:
        S.verify_volume_info(entry.volume if entry.HasField("volume") else None)


def test_list_volumes_should_fail_when_an_invalid_starting_token_is_passed(sc, r):
    """ListVolumes / It("should fail when an invalid starting_token is passed") -> ABORTED."""
    S.require_controller_capability(sc, "LIST_VOLUMES", "ListVolumes not supported")
    S.expect_error_code(lambda: r.controller.ListVolumes(
        csi_pb2.ListVolumesRequest(starting_token="invalid-token"), timeout=S.CALL_TIMEOUT),
        Code.ABORTED)


def test_list_volumes_check_the_presence_of_new_volumes_and_absence_of_deleted_ones_in_the_volume_list(sc, r):
    """ListVolumes / It("check the presence of new volumes and absence of deleted ones in the volume list")."""
    S.require_controller_capability(sc, "LIST_VOLUMES", "ListVolumes not supported")
    total = len(_list_volumes(r).entries)

    # "creating a volume" -- upstream uses the plain, non-unique name "sanity".
    vol = r.must_create_volume(S.make_create_volume_req(sc, "sanity"))
    assert len(_list_volumes(r).entries) == total + 1

    # "deleting the volume"
    S.expect_ok(lambda: r.delete_volume(S.make_delete_volume_req(sc, vol.volume.volume_id)))
    assert len(_list_volumes(r).entries) == total


def test_list_volumes_pagination_should_detect_volumes_added_between_pages_and_accept_tokens_when_the_last_volume_from_a_page_is_deleted(sc, r):
    """ListVolumes / XIt("pagination should detect volumes added between pages and accept tokens
    when the last volume from a page is deleted") -- pending upstream."""
    S.require_controller_capability(sc, "LIST_VOLUMES", "ListVolumes not supported")
    if not RUN_PENDING:
        pytest.skip("upstream marks this spec XIt (pending, csi-test#223): csi-sanity never runs it; "
                    "QSNAP_SANITY_RUN_PENDING=1 runs the port")
    min_vol_count, max_entries = 3, 2
    existing: dict[str, bool] = {}
    vols = _list_volumes(r)
    initial = len(vols.entries)
    for entry in vols.entries:
        existing[entry.volume.volume_id] = True
    if min_vol_count <= initial:
        min_vol_count = initial
    else:
        # "creating required new volumes"
        for i in range(initial, min_vol_count):
            vol = S.expect_ok(lambda i=i: r.create_volume(S.make_create_volume_req(sc, f"sanity{i}")))
            existing[vol.volume.volume_id] = True

    vols = _list_volumes(r, max_entries=max_entries)
    assert len(vols.entries) == max_entries
    next_token = vols.next_token

    # "removing all listed volumes"
    for entry in vols.entries:
        assert existing.get(entry.volume.volume_id), entry.volume.volume_id
        S.expect_ok(lambda e=entry: r.delete_volume(S.make_delete_volume_req(sc, e.volume.volume_id)))
        existing[entry.volume.volume_id] = False

    # "creating a new volume"
    vol = r.must_create_volume(S.make_create_volume_req(sc, "new-addition"))
    existing[vol.volume.volume_id] = True

    vols = _list_volumes(r, starting_token=next_token)
    # May miss volumes, but must not return duplicates or deleted ones.
    assert len(vols.entries) <= min_vol_count - max_entries + 1
    for entry in vols.entries:
        assert existing.get(entry.volume.volume_id), entry.volume.volume_id
        existing[entry.volume.volume_id] = False


# ---------------------------------------------------------------------------
# Describe("CreateVolume")
# ---------------------------------------------------------------------------

def _require_create_delete_volume(sc):
    S.require_controller_capability(sc, "CREATE_DELETE_VOLUME", "CreateVolume not supported")


def test_create_volume_should_fail_when_no_name_is_provided(sc, r):
    """CreateVolume / It("should fail when no name is provided") -> INVALID_ARGUMENT."""
    _require_create_delete_volume(sc)
    req = csi_pb2.CreateVolumeRequest(secrets=sc.secrets.create_volume or {},
                                      parameters=sc.config.test_volume_parameters or {})
    S.expect_error_code(lambda: r.create_volume(req), Code.INVALID_ARGUMENT)


def test_create_volume_should_fail_when_no_volume_capabilities_are_provided(sc, r):
    """CreateVolume / It("should fail when no volume capabilities are provided") -> INVALID_ARGUMENT."""
    _require_create_delete_volume(sc)
    req = csi_pb2.CreateVolumeRequest(
        name=S.unique_string("sanity-controller-create-no-volume-capabilities"),
        secrets=sc.secrets.create_volume or {}, parameters=sc.config.test_volume_parameters or {})
    S.expect_error_code(lambda: r.create_volume(req), Code.INVALID_ARGUMENT)


def test_create_volume_should_return_appropriate_values_single_node_writer_no_capacity(sc, r):
    """CreateVolume / It("should return appropriate values SingleNodeWriter NoCapacity")."""
    _require_create_delete_volume(sc)
    # Upstream keeps MakeCreateVolumeReq's capacity range here (a FIXME there).
    r.must_create_volume(S.make_create_volume_req(
        sc, S.unique_string("sanity-controller-create-single-no-capacity")))


def test_create_volume_should_return_appropriate_values_single_node_writer_with_capacity_1gi(sc, r):
    """CreateVolume / It("should return appropriate values SingleNodeWriter WithCapacity 1Gi")."""
    _require_create_delete_volume(sc)
    req = S.make_create_volume_req(sc, S.unique_string("sanity-controller-create-single-with-capacity"))
    try:
        vol = r.create_volume(req)
    except grpc.RpcError as err:
        if err.code() in (Code.OUT_OF_RANGE, Code.UNIMPLEMENTED):
            pytest.skip(f"upstream skips on {err.code().name}: Skip(\"Required bytes not supported\")")
        raise AssertionError(f"unexpected error: {err.code().name}: {err.details()!r}") from None
    assert vol.HasField("volume")
    assert vol.volume.volume_id
    size = S.test_volume_size(sc)
    assert vol.volume.capacity_bytes >= size or vol.volume.capacity_bytes == 0, vol.volume.capacity_bytes


def test_create_volume_should_not_fail_when_requesting_to_create_a_volume_with_already_existing_name_and_same_capacity(sc, r):
    """CreateVolume / It("should not fail when requesting to create a volume with already existing
    name and same capacity")."""
    _require_create_delete_volume(sc)
    name = S.unique_string("sanity-controller-create-twice")
    size = S.test_volume_size(sc)
    vol1 = r.must_create_volume(S.make_create_volume_req(sc, name))
    assert vol1.volume.capacity_bytes >= size or vol1.volume.capacity_bytes == 0
    vol2 = r.must_create_volume(S.make_create_volume_req(sc, name))
    assert vol2.volume.capacity_bytes >= size or vol2.volume.capacity_bytes == 0
    assert vol1.volume.volume_id == vol2.volume.volume_id


def test_create_volume_should_fail_when_requesting_to_create_a_volume_with_already_existing_name_and_different_capacity(sc, r):
    """CreateVolume / It("should fail when requesting to create a volume with already existing name
    and different capacity") -> ALREADY_EXISTS."""
    _require_create_delete_volume(sc)
    name = S.unique_string("sanity-controller-create-twice-different")
    size1 = S.test_volume_size(sc)
    req1 = S.make_create_volume_req(sc, name)
    # Limit == required, so the first volume is strictly smaller than size2.
    req1.capacity_range.CopyFrom(csi_pb2.CapacityRange(required_bytes=size1, limit_bytes=size1))
    vol1 = r.must_create_volume(req1)
    if vol1.volume.capacity_bytes == 0:
        pytest.skip('upstream skips: Skip("capacity of the volume is unknown")')
    assert vol1.volume.capacity_bytes == size1

    size2 = 2 * S.test_volume_size(sc)
    req2 = S.make_create_volume_req(sc, name)
    req2.capacity_range.CopyFrom(csi_pb2.CapacityRange(required_bytes=size2, limit_bytes=size2))
    S.expect_error_code(lambda: r.create_volume(req2), Code.ALREADY_EXISTS)


def test_create_volume_should_not_fail_when_creating_volume_with_maximum_length_name(sc, r):
    """CreateVolume / It("should not fail when creating volume with maximum-length name")."""
    _require_create_delete_volume(sc)
    name = S.unique_string_with_length("sanity-controller-create-maxlen", S.MAX_NAME_LENGTH)
    assert len(name) == S.MAX_NAME_LENGTH
    size = S.test_volume_size(sc)
    vol = r.must_create_volume(S.make_create_volume_req(sc, name))
    assert vol.volume.capacity_bytes >= size or vol.volume.capacity_bytes == 0


def test_create_volume_should_create_volume_from_an_existing_source_snapshot(sc, r):
    """CreateVolume / It("should create volume from an existing source snapshot")."""
    _require_create_delete_volume(sc)
    S.require_controller_capability(sc, "CREATE_DELETE_SNAPSHOT", "Snapshot not supported")

    vol1 = r.must_create_volume(S.make_create_volume_req(sc, S.unique_string("sanity-controller-source-vol")))

    # "creating a snapshot from the volume", repeated until ReadyToUse.
    snap_req = S.make_create_snapshot_req(sc, S.unique_string("sanity-controller-snap-from-vol"),
                                          vol1.volume.volume_id)
    deadline = time.monotonic() + SNAPSHOT_READY_TIMEOUT
    while True:
        snap = r.must_create_snapshot(snap_req)
        if snap.snapshot.ready_to_use:
            break
        assert time.monotonic() < deadline, "snapshot never became ready_to_use"
        time.sleep(5)

    # "creating a volume from source snapshot"
    vol2_req = S.make_create_volume_req(sc, S.unique_string("sanity-controller-vol-from-snap"))
    vol2_req.volume_content_source.snapshot.snapshot_id = snap.snapshot.snapshot_id
    vol = S.expect_ok(lambda: r.create_volume(vol2_req))
    assert vol.volume.HasField("content_source"), (
        "CreateVolumeResponse.volume.content_source must be set for a volume created from a snapshot")


def test_create_volume_should_fail_when_the_volume_source_snapshot_is_not_found(sc, r):
    """CreateVolume / It("should fail when the volume source snapshot is not found") -> NOT_FOUND."""
    _require_create_delete_volume(sc)
    S.require_controller_capability(sc, "CREATE_DELETE_SNAPSHOT", "Snapshot not supported")
    req = S.make_create_volume_req(sc, S.unique_string("sanity-controller-vol-from-snap"))
    req.volume_content_source.snapshot.snapshot_id = "non-existing-snapshot-id"
    S.expect_error_code(lambda: r.create_volume(req), Code.NOT_FOUND)


def test_create_volume_should_create_volume_from_an_existing_source_volume(sc, r):
    """CreateVolume / It("should create volume from an existing source volume")."""
    _require_create_delete_volume(sc)
    S.require_controller_capability(sc, "CLONE_VOLUME", "Volume Cloning not supported")
    vol1 = r.must_create_volume(S.make_create_volume_req(sc, S.unique_string("sanity-controller-source-vol")))
    req = S.make_create_volume_req(sc, S.unique_string("sanity-controller-vol-from-vol"))
    req.volume_content_source.volume.volume_id = vol1.volume.volume_id
    S.expect_ok(lambda: r.create_volume(req))


def test_create_volume_should_fail_when_the_volume_source_volume_is_not_found(sc, r):
    """CreateVolume / It("should fail when the volume source volume is not found") -> NOT_FOUND."""
    _require_create_delete_volume(sc)
    S.require_controller_capability(sc, "CLONE_VOLUME", "Volume Cloning not supported")
    req = S.make_create_volume_req(sc, S.unique_string("sanity-controller-vol-from-snap"))
    req.volume_content_source.volume.volume_id = sc.id_gen.generate_unique_valid_volume_id()
    S.expect_error_code(lambda: r.create_volume(req), Code.NOT_FOUND)


def test_create_volume_should_create_volume_with_a_volume_attribute_class(sc, r):
    """CreateVolume / It("should create volume with a volume attribute class")."""
    _require_create_delete_volume(sc)
    S.require_controller_capability(sc, "MODIFY_VOLUME", "Modify volume not supported")
    req = S.make_create_volume_req(sc, S.unique_string("sanity-controller-vol-with-mutable-parameters"))
    req.mutable_parameters.update(sc.config.test_volume_mutable_parameters or {})
    S.expect_ok(lambda: r.create_volume(req))


def test_create_volume_should_not_create_volume_with_an_invalid_volume_attribute_class(sc, r):
    """CreateVolume / It("should not create volume with an invalid volume attribute class")
    -> INVALID_ARGUMENT."""
    _require_create_delete_volume(sc)
    S.require_controller_capability(sc, "MODIFY_VOLUME", "Modify Volume not supported")
    req = S.make_create_volume_req(sc, S.unique_string("sanity-controller-vol-with-mutable-parameters"))
    req.mutable_parameters.update({"XXX_FakeKey": "XXX_FakeValue"})
    S.expect_error_code(lambda: r.create_volume(req), Code.INVALID_ARGUMENT)


# ---------------------------------------------------------------------------
# Describe("DeleteVolume")
# ---------------------------------------------------------------------------

def _require_delete_volume(sc):
    S.require_controller_capability(sc, "CREATE_DELETE_VOLUME", "DeleteVolume not supported")


def test_delete_volume_should_fail_when_no_volume_id_is_provided(sc, r):
    """DeleteVolume / It("should fail when no volume id is provided") -> INVALID_ARGUMENT."""
    _require_delete_volume(sc)
    S.expect_error_code(lambda: r.delete_volume(
        csi_pb2.DeleteVolumeRequest(secrets=sc.secrets.delete_volume or {})), Code.INVALID_ARGUMENT)


def test_delete_volume_should_succeed_when_an_invalid_volume_id_is_used(sc, r):
    """DeleteVolume / It("should succeed when an invalid volume id is used")."""
    _require_delete_volume(sc)
    S.expect_ok(lambda: r.delete_volume(
        S.make_delete_volume_req(sc, sc.id_gen.generate_invalid_volume_id())))


def test_delete_volume_should_return_appropriate_values_no_optional_values_added(sc, r):
    """DeleteVolume / It("should return appropriate values (no optional values added)")."""
    _require_delete_volume(sc)
    vol = r.must_create_volume(S.make_create_volume_req(sc, S.unique_string("sanity-controller-create-appropriate")))
    S.expect_ok(lambda: r.delete_volume(S.make_delete_volume_req(sc, vol.volume.volume_id)))


# ---------------------------------------------------------------------------
# Describe("ValidateVolumeCapabilities") -- no capability gate upstream
# ---------------------------------------------------------------------------

def _validate(r, req):
    return r.controller.ValidateVolumeCapabilities(req, timeout=S.CALL_TIMEOUT)


def test_validate_volume_capabilities_should_fail_when_no_volume_id_is_provided(sc, r):
    """ValidateVolumeCapabilities / It("should fail when no volume id is provided") -> INVALID_ARGUMENT."""
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        secrets=sc.secrets.controller_validate_volume_capabilities or {})
    S.expect_error_code(lambda: _validate(r, req), Code.INVALID_ARGUMENT)


def test_validate_volume_capabilities_should_fail_when_no_volume_capabilities_are_provided(sc, r):
    """ValidateVolumeCapabilities / It("should fail when no volume capabilities are provided")
    -> INVALID_ARGUMENT."""
    vol = r.must_create_volume(S.make_create_volume_req(sc, S.unique_string("sanity-controller-validate-nocaps")))
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume.volume_id,
        secrets=sc.secrets.controller_validate_volume_capabilities or {})
    S.expect_error_code(lambda: _validate(r, req), Code.INVALID_ARGUMENT)


def test_validate_volume_capabilities_should_return_appropriate_values_no_optional_values_added(sc, r):
    """ValidateVolumeCapabilities / It("should return appropriate values (no optional values added)")."""
    vol = r.must_create_volume(S.make_create_volume_req(sc, S.unique_string("sanity-controller-validate")))
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume.volume_id, volume_capabilities=[S.snw_capability(sc)],
        secrets=sc.secrets.controller_validate_volume_capabilities or {})
    res = S.expect_ok(lambda: _validate(r, req))
    assert res is not None
    # If confirmation is provided then it is REQUIRED to provide the volume capabilities.
    if res.HasField("confirmed"):
        assert len(res.confirmed.volume_capabilities) > 0, res


def test_validate_volume_capabilities_should_fail_when_the_requested_volume_does_not_exist(sc, r):
    """ValidateVolumeCapabilities / It("should fail when the requested volume does not exist") -> NOT_FOUND."""
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=sc.id_gen.generate_unique_valid_volume_id(),
        volume_capabilities=[S.snw_capability(sc)],
        secrets=sc.secrets.controller_validate_volume_capabilities or {})
    S.expect_error_code(lambda: _validate(r, req), Code.NOT_FOUND)


# ---------------------------------------------------------------------------
# Describe("ControllerPublishVolume")
# ---------------------------------------------------------------------------

def _require_publish(sc, message="ControllerPublishVolume not supported"):
    S.require_controller_capability(sc, "PUBLISH_UNPUBLISH_VOLUME", message)


def _node_get_info(sc):
    ni = S.expect_ok(lambda: sc.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=S.CALL_TIMEOUT))
    assert ni is not None
    return ni


def test_controller_publish_volume_should_fail_when_no_volume_id_is_provided(sc, r):
    """ControllerPublishVolume / It("should fail when no volume id is provided") -> INVALID_ARGUMENT."""
    _require_publish(sc)
    req = csi_pb2.ControllerPublishVolumeRequest(secrets=sc.secrets.controller_publish_volume or {})
    S.expect_error_code(lambda: r.controller_publish_volume(req), Code.INVALID_ARGUMENT)


def test_controller_publish_volume_should_fail_when_no_node_id_is_provided(sc, r):
    """ControllerPublishVolume / It("should fail when no node id is provided") -> INVALID_ARGUMENT."""
    _require_publish(sc)
    req = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=sc.id_gen.generate_unique_valid_volume_id(),
        secrets=sc.secrets.controller_publish_volume or {})
    S.expect_error_code(lambda: r.controller_publish_volume(req), Code.INVALID_ARGUMENT)


def test_controller_publish_volume_should_fail_when_no_volume_capability_is_provided(sc, r):
    """ControllerPublishVolume / It("should fail when no volume capability is provided") -> INVALID_ARGUMENT."""
    _require_publish(sc)
    req = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=sc.id_gen.generate_unique_valid_volume_id(),
        node_id=sc.id_gen.generate_unique_valid_node_id(),
        secrets=sc.secrets.controller_publish_volume or {})
    S.expect_error_code(lambda: r.controller_publish_volume(req), Code.INVALID_ARGUMENT)


def test_controller_publish_volume_should_fail_when_publishing_more_volumes_than_the_node_max_attach_limit(sc, r):
    """ControllerPublishVolume / It("should fail when publishing more volumes than the node max attach limit")."""
    _require_publish(sc)
    if not sc.config.test_node_volume_attach_limit:
        pytest.skip('upstream skips unless --csi.testnodevolumeattachlimit: '
                    'Skip("testnodevolumeattachlimit not enabled")')
    info = _node_get_info(sc)
    if info.max_volumes_per_node <= 0:
        pytest.skip('upstream skips: Skip("No MaxVolumesPerNode")')
    nid = info.node_id
    assert nid
    for i in range(info.max_volumes_per_node):
        vol = r.must_create_volume(S.make_create_volume_req(
            sc, S.unique_string(f"sanity-max-attach-limit-vol-{i}")))
        r.must_controller_publish_volume(
            S.make_controller_publish_volume_req(sc, vol.volume.volume_id, nid))
    vol = r.must_create_volume(S.make_create_volume_req(sc, S.unique_string("sanity-max-attach-limit-vol+1")))
    with pytest.raises(grpc.RpcError):
        r.controller_publish_volume(S.make_controller_publish_volume_req(sc, vol.volume.volume_id, nid))


def test_controller_publish_volume_should_fail_when_the_volume_does_not_exist(sc, r):
    """ControllerPublishVolume / It("should fail when the volume does not exist") -> NOT_FOUND."""
    _require_publish(sc)
    req = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=sc.id_gen.generate_unique_valid_volume_id(),
        node_id=sc.id_gen.generate_unique_valid_node_id(),
        volume_capability=S.snw_capability(sc), readonly=False,
        secrets=sc.secrets.controller_publish_volume or {})
    S.expect_error_code(lambda: r.controller_publish_volume(req), Code.NOT_FOUND)


def test_controller_publish_volume_should_fail_when_the_node_does_not_exist(sc, r):
    """ControllerPublishVolume / It("should fail when the node does not exist") -> NOT_FOUND."""
    _require_publish(sc)
    vol = r.must_create_volume(S.make_create_volume_req(sc, S.unique_string("sanity-controller-wrong-node")))
    req = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vol.volume.volume_id, node_id=sc.id_gen.generate_unique_valid_node_id(),
        volume_capability=S.snw_capability(sc), readonly=False,
        secrets=sc.secrets.controller_publish_volume or {})
    S.expect_error_code(lambda: r.controller_publish_volume(req), Code.NOT_FOUND)


def test_controller_publish_volume_should_fail_when_the_volume_is_already_published_but_is_incompatible(sc, r):
    """ControllerPublishVolume / It("should fail when the volume is already published but is incompatible")
    -> ALREADY_EXISTS."""
    _require_publish(sc)
    S.require_controller_capability(sc, "PUBLISH_READONLY", "ControllerPublishVolume.readonly field not supported")
    vol = r.must_create_volume(S.make_create_volume_req(
        sc, S.unique_string("sanity-controller-published-incompatible")))
    nid = _node_get_info(sc).node_id
    assert nid
    req = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vol.volume.volume_id, node_id=nid, volume_capability=S.snw_capability(sc),
        readonly=False, secrets=sc.secrets.controller_publish_volume or {})
    r.must_controller_publish_volume(req)
    req.readonly = True  # publish again with different attributes
    S.expect_error_code(lambda: r.controller_publish_volume(req), Code.ALREADY_EXISTS)


# ---------------------------------------------------------------------------
# Describe("volume lifecycle")
# ---------------------------------------------------------------------------

def _volume_lifecycle(sc, r, count):
    """controller.go VolumeLifecycle: create, then ControllerPublish ``count`` times."""
    ni = _node_get_info(sc)
    assert ni.node_id
    req = S.make_create_volume_req(sc, S.unique_string(f"sanity-controller-publish-{count}"))
    if ni.HasField("accessible_topology"):
        req.accessibility_requirements.requisite.append(ni.accessible_topology)
    vol = r.must_create_volume(req)
    for _ in range(count):
        r.must_controller_publish_volume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vol.volume.volume_id, node_id=ni.node_id,
            volume_capability=S.snw_capability(sc), volume_context=vol.volume.volume_context,
            readonly=False, secrets=sc.secrets.controller_publish_volume or {}))


def test_volume_lifecycle_should_work(sc, r):
    """volume lifecycle / It("should work")."""
    _require_publish(sc, "Controller Publish, UnpublishVolume not supported")
    _volume_lifecycle(sc, r, 1)


def test_volume_lifecycle_should_be_idempotent(sc, r):
    """volume lifecycle / It("should be idempotent")."""
    _require_publish(sc, "Controller Publish, UnpublishVolume not supported")
    _volume_lifecycle(sc, r, sc.config.idempotent_count)


# ---------------------------------------------------------------------------
# Describe("ControllerUnpublishVolume")
# ---------------------------------------------------------------------------

def test_controller_unpublish_volume_should_fail_when_no_volume_id_is_provided(sc, r):
    """ControllerUnpublishVolume / It("should fail when no volume id is provided") -> INVALID_ARGUMENT."""
    _require_publish(sc, "ControllerUnpublishVolume not supported")
    req = csi_pb2.ControllerUnpublishVolumeRequest(secrets=sc.secrets.controller_unpublish_volume or {})
    S.expect_error_code(lambda: r.controller.ControllerUnpublishVolume(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)
