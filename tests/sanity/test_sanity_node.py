"""Port of csi-test pkg/sanity/node.go: DescribeSanity("Node Service").

Each test is one upstream ``It``; its docstring is "Describe / It(text)".
The Describe-level BeforeEach capability checks are the first lines of each
test.  Every spec runs twice, with the test volume capability's access type
``mount`` and ``block`` (csi-sanity's ``--csi.testvolumeaccesstype``), on the
module's one server.  Staging and target paths are upstream's
``sc.StagingPath`` and ``sc.TargetPath + "/target"``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import sanity_lib as S
from sanity_lib import csi_pb2

Code = grpc.StatusCode
NodeRPC = csi_pb2.NodeServiceCapability.RPC
ServiceType = csi_pb2.PluginCapability.Service.Type

#: node.go "should return appropriate capabilities": the accepted types.
KNOWN_NODE_CAPABILITIES = {
    NodeRPC.UNKNOWN,
    NodeRPC.STAGE_UNSTAGE_VOLUME,
    NodeRPC.GET_VOLUME_STATS,
    NodeRPC.EXPAND_VOLUME,
    NodeRPC.VOLUME_CONDITION,
    NodeRPC.SINGLE_NODE_MULTI_WRITER,
    NodeRPC.VOLUME_MOUNT_GROUP,
}

#: node.go's NodeStageVolume BeforeEach: a publish context device upstream sends.
MOCK_DEVICE = "/dev/mock"


@pytest.fixture(name="sc", scope="module", params=["mount", "block"])
def sc_fixture(request: pytest.FixtureRequest, module_driver: Any) -> Iterator[S.SanityContext]:
    """The TestContext with the test volume access type of this run."""
    workdir = Path(tempfile.mkdtemp(prefix="qsnap-sanity-"))
    target, staging = workdir / "csi-mount", workdir / "csi-staging"
    target.mkdir()
    staging.mkdir()
    config = dataclasses.replace(S.TestConfig.from_env(), test_volume_access_type=request.param)
    yield S.SanityContext(module_driver, str(target), str(staging), config)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(name="r")
def r_fixture(sc: S.SanityContext) -> Iterator[S.Resources]:
    """node.go's BeforeEach builds Resources with a NodeClient; AfterEach cleans up."""
    yield from S._resources(sc, with_node=True)


# ---------------------------------------------------------------------------
# The Describe's BeforeEach and its helper closures
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Support:
    """What node.go's BeforeEach finds out."""

    provides_controller_service: bool
    controller_publish: bool
    node_stage: bool
    node_volume_stats: bool
    node_expansion: bool
    controller_expansion: bool


def _support(sc: S.SanityContext) -> Support:
    plugin = S.plugin_capabilities(sc.identity)
    controller = ServiceType.CONTROLLER_SERVICE in plugin
    node = S.node_capabilities(sc.node)
    return Support(
        provides_controller_service=controller,
        controller_publish=controller and S.is_controller_capability_supported(
            sc.controller, S.RPC.PUBLISH_UNPUBLISH_VOLUME),
        node_stage=NodeRPC.STAGE_UNSTAGE_VOLUME in node,
        node_volume_stats=NodeRPC.GET_VOLUME_STATS in node,
        node_expansion=NodeRPC.EXPAND_VOLUME in node,
        controller_expansion=S.is_controller_capability_supported(sc.controller,
                                                                  S.RPC.EXPAND_VOLUME))


def _node_get_info(sc: S.SanityContext) -> csi_pb2.NodeGetInfoResponse:
    nid = S.expect_ok(lambda: sc.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(),
                                                  timeout=S.CALL_TIMEOUT))
    assert nid is not None
    assert nid.node_id
    return nid


def _create_volume(sc: S.SanityContext, r: S.Resources, name: str) -> csi_pb2.CreateVolumeResponse:
    """node.go createVolume: "creating a single node writer volume for expansion"."""
    return r.must_create_volume(S.make_create_volume_req(sc, name))


def _controller_publish_volume(sc, r, support, vol, nid):
    """node.go controllerPublishVolume (nothing without PUBLISH_UNPUBLISH_VOLUME)."""
    if not support.controller_publish:
        return None
    return r.must_controller_publish_volume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vol.volume.volume_id, node_id=nid.node_id,
        volume_capability=S.snw_capability(sc), volume_context=vol.volume.volume_context,
        readonly=False, secrets=sc.secrets.controller_publish_volume or {}))


def _node_stage_volume(sc, support, vol, conpubvol):
    """node.go nodeStageVolume."""
    if not support.node_stage:
        return None
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume.volume_id, volume_capability=S.snw_capability(sc),
        staging_target_path=sc.staging_path, volume_context=vol.volume.volume_context,
        secrets=sc.secrets.node_stage_volume or {})
    if conpubvol is not None:
        req.publish_context.update(conpubvol.publish_context)
    rsp = S.expect_ok(lambda: sc.node.NodeStageVolume(req, timeout=S.CALL_TIMEOUT))
    assert rsp is not None
    return rsp


def _node_publish_volume(sc, support, vol, conpubvol):
    """node.go nodePublishVolume."""
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume.volume_id, target_path=sc.target_path + "/target",
        staging_target_path=sc.staging_path if support.node_stage else "",
        volume_capability=S.snw_capability(sc), volume_context=vol.volume.volume_context,
        secrets=sc.secrets.node_publish_volume or {})
    if conpubvol is not None:
        req.publish_context.update(conpubvol.publish_context)
    rsp = S.expect_ok(lambda: sc.node.NodePublishVolume(req, timeout=S.CALL_TIMEOUT))
    assert rsp is not None
    return rsp


def _run_controller_test(sc, r, support: Support, count: int) -> None:
    """node.go runControllerTest."""
    name = S.unique_string(f"sanity-node-full-{count}")

    # "getting node information"
    ni = _node_get_info(sc)
    req = S.make_create_volume_req(sc, name)
    if ni.HasField("accessible_topology"):
        # "Topology requirements are honored if provided by the driver"
        req.accessibility_requirements.requisite.append(ni.accessible_topology)

    # "creating a single node writer volume"
    vol = r.must_create_volume(req)

    conpubvol = None
    if support.controller_publish:
        conpubvol = S.expect_ok(lambda: r.controller_publish_volume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=vol.volume.volume_id, node_id=ni.node_id,
                volume_capability=S.snw_capability(sc),
                volume_context=vol.volume.volume_context, readonly=False,
                secrets=sc.secrets.controller_publish_volume or {})))
        assert conpubvol is not None
    if support.node_stage:
        for _ in range(count):
            # "node staging volume"
            stage = csi_pb2.NodeStageVolumeRequest(
                volume_id=vol.volume.volume_id, volume_capability=S.snw_capability(sc),
                staging_target_path=sc.staging_path, volume_context=vol.volume.volume_context,
                publish_context=conpubvol.publish_context if conpubvol else {},
                secrets=sc.secrets.node_stage_volume or {})
            assert S.expect_ok(lambda: sc.node.NodeStageVolume(stage, timeout=S.CALL_TIMEOUT)) \
                is not None
    staging_path = sc.staging_path if support.node_stage else ""
    for _ in range(count):
        # "publishing the volume on a node"
        publish = csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume.volume_id, target_path=sc.target_path + "/target",
            staging_target_path=staging_path, volume_capability=S.snw_capability(sc),
            volume_context=vol.volume.volume_context,
            publish_context=conpubvol.publish_context if conpubvol else {},
            secrets=sc.secrets.node_publish_volume or {})
        assert S.expect_ok(lambda: sc.node.NodePublishVolume(publish, timeout=S.CALL_TIMEOUT)) \
            is not None

    if support.node_volume_stats:
        # "Get node volume stats"
        stats = S.expect_ok(lambda: sc.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=vol.volume.volume_id, volume_path=sc.target_path + "/target"),
            timeout=S.CALL_TIMEOUT))
        assert stats.usage, f"no usage in {stats}"


# ---------------------------------------------------------------------------
# Describe("NodeGetCapabilities")
# ---------------------------------------------------------------------------

def test_node_get_capabilities_should_return_appropriate_capabilities(sc, r):
    """NodeGetCapabilities / It("should return appropriate capabilities")."""
    _support(sc)
    # "checking successful response"
    caps = S.expect_ok(lambda: sc.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(),
                                                           timeout=S.CALL_TIMEOUT))
    assert caps is not None
    for cap in caps.capabilities:
        assert cap.HasField("rpc"), f"capability without rpc: {cap}"
        assert cap.rpc.type in KNOWN_NODE_CAPABILITIES, f"Unknown capability: {cap.rpc.type}"


# ---------------------------------------------------------------------------
# Describe("NodeGetInfo")
# ---------------------------------------------------------------------------

def test_node_get_info_should_return_appropriate_values(sc, r):
    """NodeGetInfo / It("should return appropriate values")."""
    _support(sc)
    accessibility_constraint_supported = \
        ServiceType.VOLUME_ACCESSIBILITY_CONSTRAINTS in S.plugin_capabilities(sc.identity)
    ninfo = S.expect_ok(lambda: sc.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(),
                                                    timeout=S.CALL_TIMEOUT))
    assert ninfo is not None
    assert ninfo.node_id
    assert not ninfo.max_volumes_per_node < 0
    if accessibility_constraint_supported:
        assert ninfo.HasField("accessible_topology")


# ---------------------------------------------------------------------------
# Describe("NodePublishVolume")
# ---------------------------------------------------------------------------

def test_node_publish_volume_should_fail_when_no_volume_id_is_provided(sc, r):
    """NodePublishVolume / It("should fail when no volume id is provided") -> INVALID_ARGUMENT."""
    _support(sc)
    req = csi_pb2.NodePublishVolumeRequest(secrets=sc.secrets.node_publish_volume or {})
    S.expect_error_code(lambda: sc.node.NodePublishVolume(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


def test_node_publish_volume_should_fail_when_no_target_path_is_provided(sc, r):
    """NodePublishVolume / It("should fail when no target path is provided") -> INVALID_ARGUMENT."""
    _support(sc)
    req = csi_pb2.NodePublishVolumeRequest(volume_id=sc.id_gen.generate_unique_valid_volume_id(),
                                           secrets=sc.secrets.node_publish_volume or {})
    S.expect_error_code(lambda: sc.node.NodePublishVolume(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


def test_node_publish_volume_should_fail_when_no_volume_capability_is_provided(sc, r):
    """NodePublishVolume / It("should fail when no volume capability is provided") -> INVALID_ARGUMENT."""
    _support(sc)
    req = csi_pb2.NodePublishVolumeRequest(volume_id=sc.id_gen.generate_unique_valid_volume_id(),
                                           target_path=sc.target_path + "/target",
                                           secrets=sc.secrets.node_publish_volume or {})
    S.expect_error_code(lambda: sc.node.NodePublishVolume(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


# ---------------------------------------------------------------------------
# Describe("NodeUnpublishVolume")
# ---------------------------------------------------------------------------

def test_node_unpublish_volume_should_fail_when_no_volume_id_is_provided(sc, r):
    """NodeUnpublishVolume / It("should fail when no volume id is provided") -> INVALID_ARGUMENT."""
    _support(sc)
    S.expect_error_code(lambda: sc.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(),
                                                            timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


def test_node_unpublish_volume_should_fail_when_no_target_path_is_provided(sc, r):
    """NodeUnpublishVolume / It("should fail when no target path is provided") -> INVALID_ARGUMENT."""
    _support(sc)
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=sc.id_gen.generate_unique_valid_volume_id())
    S.expect_error_code(lambda: sc.node.NodeUnpublishVolume(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


def test_node_unpublish_volume_should_remove_target_path(sc, r):
    """NodeUnpublishVolume / It("should remove target path")."""
    support = _support(sc)
    # Upstream skips when a custom CreateTargetPathCmd/CreateTargetDir has no
    # matching check; this port has neither (the driver makes the path).
    name = S.unique_string("sanity-node-unpublish-volume")
    vol = _create_volume(sc, r, name)
    volid = vol.volume.volume_id
    volpath = sc.target_path + "/target"

    # "Getting a node id"
    nid = _node_get_info(sc)

    # "Staging and publishing a volume"
    conpubvol = _controller_publish_volume(sc, r, support, vol, nid)
    _node_stage_volume(sc, support, vol, conpubvol)
    _node_publish_volume(sc, support, vol, conpubvol)

    # "Checking the target path exists"
    assert S.check_path(volpath) != S.PATH_IS_NOT_FOUND, (
        f"path {volpath!r} should have been created by CSI driver and the test config should "
        "be enabling testing for that path")

    # "Unpublishing the volume"
    S.expect_ok(lambda: sc.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volid, target_path=volpath), timeout=S.CALL_TIMEOUT))

    # "Checking the target path was removed"
    assert S.check_path(volpath) == S.PATH_IS_NOT_FOUND, (
        f"path {volpath!r} should have been removed by the CSI driver during NodeUnpublishVolume")


# ---------------------------------------------------------------------------
# Describe("NodeStageVolume")
# ---------------------------------------------------------------------------

def _require_node_stage(support: Support) -> None:
    if not support.node_stage:
        pytest.skip('driver does not advertise STAGE_UNSTAGE_VOLUME, upstream sanity skips this '
                    'spec too (upstream: Skip("NodeStageVolume not supported"))')


def test_node_stage_volume_should_fail_when_no_volume_id_is_provided(sc, r):
    """NodeStageVolume / It("should fail when no volume id is provided") -> INVALID_ARGUMENT."""
    _require_node_stage(_support(sc))
    req = csi_pb2.NodeStageVolumeRequest(
        staging_target_path=sc.staging_path, volume_capability=S.snw_capability(sc),
        publish_context={"device": MOCK_DEVICE}, secrets=sc.secrets.node_stage_volume or {})
    S.expect_error_code(lambda: sc.node.NodeStageVolume(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


def test_node_stage_volume_should_fail_when_no_staging_target_path_is_provided(sc, r):
    """NodeStageVolume / It("should fail when no staging target path is provided") -> INVALID_ARGUMENT."""
    _require_node_stage(_support(sc))
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=sc.id_gen.generate_unique_valid_volume_id(),
        volume_capability=S.snw_capability(sc), publish_context={"device": MOCK_DEVICE},
        secrets=sc.secrets.node_stage_volume or {})
    S.expect_error_code(lambda: sc.node.NodeStageVolume(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


def test_node_stage_volume_should_fail_when_no_volume_capability_is_provided(sc, r):
    """NodeStageVolume / It("should fail when no volume capability is provided") -> INVALID_ARGUMENT."""
    _require_node_stage(_support(sc))
    # "creating a single node writer volume"
    name = S.unique_string("sanity-node-stage-nocaps")
    vol = r.must_create_volume(S.make_create_volume_req(sc, name))
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume.volume_id, staging_target_path=sc.staging_path,
        publish_context={"device": MOCK_DEVICE}, secrets=sc.secrets.node_stage_volume or {})
    S.expect_error_code(lambda: sc.node.NodeStageVolume(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


# ---------------------------------------------------------------------------
# Describe("NodeUnstageVolume")
# ---------------------------------------------------------------------------

def _require_node_unstage(support: Support) -> None:
    if not support.node_stage:
        pytest.skip('driver does not advertise STAGE_UNSTAGE_VOLUME, upstream sanity skips this '
                    'spec too (upstream: Skip("NodeUnstageVolume not supported"))')


def test_node_unstage_volume_should_fail_when_no_volume_id_is_provided(sc, r):
    """NodeUnstageVolume / It("should fail when no volume id is provided") -> INVALID_ARGUMENT."""
    _require_node_unstage(_support(sc))
    req = csi_pb2.NodeUnstageVolumeRequest(staging_target_path=sc.staging_path)
    S.expect_error_code(lambda: sc.node.NodeUnstageVolume(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


def test_node_unstage_volume_should_fail_when_no_staging_target_path_is_provided(sc, r):
    """NodeUnstageVolume / It("should fail when no staging target path is provided") -> INVALID_ARGUMENT."""
    _require_node_unstage(_support(sc))
    req = csi_pb2.NodeUnstageVolumeRequest(volume_id=sc.id_gen.generate_unique_valid_volume_id())
    S.expect_error_code(lambda: sc.node.NodeUnstageVolume(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


# ---------------------------------------------------------------------------
# Describe("NodeGetVolumeStats")
# ---------------------------------------------------------------------------

def _require_volume_stats(support: Support) -> None:
    if not support.node_volume_stats:
        pytest.skip('driver does not advertise GET_VOLUME_STATS, upstream sanity skips this '
                    'spec too (upstream: Skip("NodeGetVolume not supported"))')


def test_node_get_volume_stats_should_fail_when_no_volume_id_is_provided(sc, r):
    """NodeGetVolumeStats / It("should fail when no volume id is provided") -> INVALID_ARGUMENT."""
    _require_volume_stats(_support(sc))
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_path="some/path")
    S.expect_error_code(lambda: sc.node.NodeGetVolumeStats(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


def test_node_get_volume_stats_should_fail_when_no_volume_path_is_provided(sc, r):
    """NodeGetVolumeStats / It("should fail when no volume path is provided") -> INVALID_ARGUMENT."""
    _require_volume_stats(_support(sc))
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=sc.id_gen.generate_unique_valid_volume_id())
    S.expect_error_code(lambda: sc.node.NodeGetVolumeStats(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


def test_node_get_volume_stats_should_fail_when_volume_is_not_found(sc, r):
    """NodeGetVolumeStats / It("should fail when volume is not found") -> NOT_FOUND."""
    _require_volume_stats(_support(sc))
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=sc.id_gen.generate_unique_valid_volume_id(),
                                            volume_path="some/path")
    S.expect_error_code(lambda: sc.node.NodeGetVolumeStats(req, timeout=S.CALL_TIMEOUT),
                        Code.NOT_FOUND)


def test_node_get_volume_stats_should_fail_when_volume_does_not_exist_on_the_specified_path(sc, r):
    """NodeGetVolumeStats / It("should fail when volume does not exist on the specified path") -> NOT_FOUND."""
    support = _support(sc)
    _require_volume_stats(support)
    name = S.unique_string("sanity-node-get-volume-stats")
    vol = _create_volume(sc, r, name)

    # "getting a node id"
    nid = _node_get_info(sc)
    conpubvol = _controller_publish_volume(sc, r, support, vol, nid)
    _node_stage_volume(sc, support, vol, conpubvol)
    _node_publish_volume(sc, support, vol, conpubvol)

    # "Get node volume stats"
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume.volume_id,
                                            volume_path="some/path")
    S.expect_error_code(lambda: sc.node.NodeGetVolumeStats(req, timeout=S.CALL_TIMEOUT),
                        Code.NOT_FOUND)


# ---------------------------------------------------------------------------
# Describe("NodeExpandVolume")
# ---------------------------------------------------------------------------

def _require_node_expansion(support: Support) -> None:
    if not support.node_expansion:
        pytest.skip('driver does not advertise EXPAND_VOLUME (node), upstream sanity skips this '
                    'spec too (upstream: Skip("NodeExpandVolume not supported"))')


def test_node_expand_volume_should_fail_when_no_volume_id_is_provided(sc, r):
    """NodeExpandVolume / It("should fail when no volume id is provided") -> INVALID_ARGUMENT."""
    _require_node_expansion(_support(sc))
    req = csi_pb2.NodeExpandVolumeRequest(volume_path=sc.target_path,
                                          volume_capability=S.snw_capability(sc))
    S.expect_error_code(lambda: sc.node.NodeExpandVolume(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


def test_node_expand_volume_should_fail_when_no_volume_path_is_provided(sc, r):
    """NodeExpandVolume / It("should fail when no volume path is provided") -> INVALID_ARGUMENT."""
    _require_node_expansion(_support(sc))
    name = S.unique_string("sanity-node-expand-volume-valid-id")
    vol = _create_volume(sc, r, name)
    req = csi_pb2.NodeExpandVolumeRequest(volume_id=vol.volume.volume_id,
                                          volume_capability=S.snw_capability(sc))
    S.expect_error_code(lambda: sc.node.NodeExpandVolume(req, timeout=S.CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT)


def test_node_expand_volume_should_fail_when_volume_is_not_found(sc, r):
    """NodeExpandVolume / It("should fail when volume is not found") -> NOT_FOUND."""
    _require_node_expansion(_support(sc))
    req = csi_pb2.NodeExpandVolumeRequest(volume_id=sc.id_gen.generate_unique_valid_volume_id(),
                                          volume_path="some/path")
    S.expect_error_code(lambda: sc.node.NodeExpandVolume(req, timeout=S.CALL_TIMEOUT),
                        Code.NOT_FOUND)


def test_node_expand_volume_should_work_if_node_expand_is_called_after_node_publish(sc, r):
    """NodeExpandVolume / It("should work if node-expand is called after node-publish")."""
    support = _support(sc)
    _require_node_expansion(support)
    name = S.unique_string("sanity-node-expand-volume")
    vol = _create_volume(sc, r, name)

    if support.controller_expansion:
        # "controller expanding the volume"
        exp_req = csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vol.volume.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=S.test_volume_expand_size(sc)),
            secrets=sc.secrets.controller_expand_volume or {})
        rsp = S.expect_ok(lambda: sc.controller.ControllerExpandVolume(exp_req,
                                                                       timeout=S.CALL_TIMEOUT))
        assert rsp is not None
        assert rsp.capacity_bytes == S.test_volume_expand_size(sc)

    # "getting a node id"
    nid = _node_get_info(sc)
    conpubvol = _controller_publish_volume(sc, r, support, vol, nid)
    _node_stage_volume(sc, support, vol, conpubvol)
    _node_publish_volume(sc, support, vol, conpubvol)

    # "expanding the volume on a node"
    S.expect_ok(lambda: sc.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol.volume.volume_id, volume_path=sc.target_path + "/target",
        capacity_range=csi_pb2.CapacityRange(required_bytes=S.test_volume_expand_size(sc))),
        timeout=S.CALL_TIMEOUT))


# ---------------------------------------------------------------------------
# The Describe's own Its
# ---------------------------------------------------------------------------

def test_node_service_should_work(sc, r):
    """Node Service / It("should work")."""
    support = _support(sc)
    if not support.provides_controller_service:
        pytest.skip('upstream skips: Skip("Controller Service not provided: CreateVolume not '
                    'supported")')
    # "runControllerTest"
    _run_controller_test(sc, r, support, 1)


def test_node_service_should_be_idempotent(sc, r):
    """Node Service / It("should be idempotent")."""
    support = _support(sc)
    if not support.provides_controller_service:
        pytest.skip('upstream skips: Skip("Controller Service not provided: CreateVolume not '
                    'supported")')
    if sc.config.idempotent_count <= 0:
        pytest.skip('upstream skips: Skip("Config.IdempotentCount is zero or negative, skip tests")')
    # "runControllerTest with Idempotent count"
    _run_controller_test(sc, r, support, sc.config.idempotent_count)


# The staging and target directories are shared by every spec (as upstream's
# sc.StagingPath / sc.TargetPath): a spec that leaves something mounted there
# would break the next one, so say so where it happens.
@pytest.fixture(autouse=True)
def _nothing_left_mounted(sc: S.SanityContext, r: S.Resources) -> Iterator[None]:
    yield
    # Runs before r's cleanup (fixtures tear down in reverse order), so only
    # check after the cleanup calls: do them here and let r's be no-ops.
    errors = r.cleanup()
    assert not errors, "resource cleanup failed:\n" + "\n".join(errors)
    mounted = [p for p in (sc.staging_path, sc.target_path + "/target")
               if os.path.ismount(p) or S.is_mountpoint(p)]
    assert not mounted, f"still mounted after the cleanup: {mounted}"
