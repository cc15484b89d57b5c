"""Port of csi-test pkg/sanity/controller.go:
DescribeSanity("ExpandVolume [Controller Server]") and
DescribeSanity("ModifyVolume [Controller Server]").

Upstream builds the Resources of these two suites without a node client, so
their cleanup never calls the Node service (fixture ``r_controller_only``).
"""

from __future__ import annotations

import grpc

import sanity_lib as S
from sanity_lib import r_controller_only_fixture, sc_fixture  # noqa: F401  (fixtures)
from sanity_lib import csi_pb2

Code = grpc.StatusCode


def _expand(r, req):
    return r.controller.ControllerExpandVolume(req, timeout=S.CALL_TIMEOUT)


def _modify(r, req):
    return r.controller.ControllerModifyVolume(req, timeout=S.CALL_TIMEOUT)


# ---------------------------------------------------------------------------
# DescribeSanity("ExpandVolume [Controller Server]")
# ---------------------------------------------------------------------------

def _require_expand(sc):
    S.require_controller_capability(sc, "EXPAND_VOLUME", "ControllerExpandVolume not supported")


def test_expand_volume_should_fail_if_no_volume_id_is_given(sc, r_controller_only):
    """ExpandVolume [Controller Server] / It("should fail if no volume id is given") -> INVALID_ARGUMENT."""
    _require_expand(sc)
    req = S.make_expand_volume_req(sc, "")
    S.expect_error_code(lambda: _expand(r_controller_only, req), Code.INVALID_ARGUMENT)


def test_expand_volume_should_fail_if_no_capacity_range_is_given(sc, r_controller_only):
    """ExpandVolume [Controller Server] / It("should fail if no capacity range is given") -> INVALID_ARGUMENT."""
    _require_expand(sc)
    # Upstream leaves volume_id empty here too.
    req = csi_pb2.ControllerExpandVolumeRequest(volume_id="",
                                                secrets=sc.secrets.controller_expand_volume or {})
    S.expect_error_code(lambda: _expand(r_controller_only, req), Code.INVALID_ARGUMENT)


def test_expand_volume_should_work(sc, r_controller_only):
    """ExpandVolume [Controller Server] / It("should work")."""
    _require_expand(sc)
    r = r_controller_only
    vol = r.must_create_volume(S.make_create_volume_req(sc, S.unique_string("sanity-expand-volume")))
    rsp = S.expect_ok(lambda: _expand(r, S.make_expand_volume_req(sc, vol.volume.volume_id)))
    assert rsp is not None
    assert rsp.capacity_bytes == S.test_volume_expand_size(sc), (
        f"capacity_bytes {rsp.capacity_bytes} != TestVolumeExpandSize {S.test_volume_expand_size(sc)}")


# ---------------------------------------------------------------------------
# DescribeSanity("ModifyVolume [Controller Server]")
# ---------------------------------------------------------------------------

FAKE_MUTABLE = {"XXX_FakeKey": "XXX_FakeValue"}


def _require_modify(sc):
    S.require_controller_capability(sc, "MODIFY_VOLUME", "ControllerModifyVolume not supported")


def test_modify_volume_should_fail_if_no_volume_id_is_given(sc, r_controller_only):
    """ModifyVolume [Controller Server] / It("should fail if no volume id is given") -> INVALID_ARGUMENT."""
    _require_modify(sc)
    req = S.make_modify_volume_req(sc, "")
    S.expect_error_code(lambda: _modify(r_controller_only, req), Code.INVALID_ARGUMENT)


def test_modify_volume_should_fail_if_volume_does_not_exist(sc, r_controller_only):
    """ModifyVolume [Controller Server] / It("should fail if volume does not exist") -> NOT_FOUND."""
    _require_modify(sc)
    req = S.make_modify_volume_req(sc, "non-existing-volume-id")
    S.expect_error_code(lambda: _modify(r_controller_only, req), Code.NOT_FOUND)


def test_modify_volume_should_fail_if_specified_mutable_parameters_are_not_supported_by_the_volume(sc, r_controller_only):
    """ModifyVolume [Controller Server] / It("should fail if specified mutable parameters are not
    supported by the volume") -> INVALID_ARGUMENT."""
    _require_modify(sc)
    r = r_controller_only
    vol = r.must_create_volume(S.make_create_volume_req(sc, S.unique_string("sanity-modify-volume-unsupported")))
    req = csi_pb2.ControllerModifyVolumeRequest(
        volume_id=vol.volume.volume_id, mutable_parameters=FAKE_MUTABLE,
        secrets=sc.secrets.controller_modify_volume or {})
    S.expect_error_code(lambda: _modify(r, req), Code.INVALID_ARGUMENT)


def test_modify_volume_should_modify_a_volume_created_without_a_volume_attribute_class(sc, r_controller_only):
    """ModifyVolume [Controller Server] / It("should modify a volume created without a volume attribute class")."""
    _require_modify(sc)
    r = r_controller_only
    vol = r.must_create_volume(S.make_create_volume_req(sc, S.unique_string("sanity-modify-volume")))
    rsp = S.expect_ok(lambda: _modify(r, S.make_modify_volume_req(sc, vol.volume.volume_id)))
    assert rsp is not None


def test_modify_volume_should_modify_a_volume_created_with_a_volume_attribute_class(sc, r_controller_only):
    """ModifyVolume [Controller Server] / It("should modify a volume created with a volume attribute class")."""
    _require_modify(sc)
    r = r_controller_only
    req = S.make_create_volume_req(sc, S.unique_string("sanity-modify-volume-with-vac"))
    req.mutable_parameters.update(sc.config.test_volume_mutable_parameters or {})
    vol = r.must_create_volume(req)
    rsp = S.expect_ok(lambda: _modify(r, S.make_modify_volume_req(sc, vol.volume.volume_id)))
    assert rsp is not None


def test_modify_volume_should_fail_to_modify_a_volume_created_with_a_volume_attribute_class_if_new_mutable_parameters_are_not_supported_by_volume(sc, r_controller_only):
    """ModifyVolume [Controller Server] / It("should fail to modify a volume created with a volume
    attribute class if new mutable parameters are not supported by volume") -> INVALID_ARGUMENT."""
    _require_modify(sc)
    r = r_controller_only
    create = S.make_create_volume_req(sc, S.unique_string("sanity-modify-volume-with-vac-not-supported"))
    create.mutable_parameters.update(sc.config.test_volume_mutable_parameters or {})
    vol = r.must_create_volume(create)
    req = csi_pb2.ControllerModifyVolumeRequest(
        volume_id=vol.volume.volume_id, mutable_parameters=FAKE_MUTABLE,
        secrets=sc.secrets.controller_modify_volume or {})
    S.expect_error_code(lambda: _modify(r, req), Code.INVALID_ARGUMENT)
