"""Port of csi-test pkg/sanity/identity.go: DescribeSanity("Identity Service").

Upstream runs each spec against the node connection and, when a separate
controller endpoint is configured, the controller connection too; qsnap
serves both on one socket, so there is one connection.
"""

from __future__ import annotations

import re

import sanity_lib as S
from sanity_lib import sc_fixture  # noqa: F401  (fixture)
from sanity_lib import csi_pb2

ServiceType = csi_pb2.PluginCapability.Service.Type
ExpansionType = csi_pb2.PluginCapability.VolumeExpansion.Type

#: The service types identity.go accepts.
KNOWN_SERVICES = {
    ServiceType.CONTROLLER_SERVICE,
    ServiceType.VOLUME_ACCESSIBILITY_CONSTRAINTS,
    ServiceType.GROUP_CONTROLLER_SERVICE,
    ServiceType.SNAPSHOT_METADATA_SERVICE,
}
KNOWN_EXPANSIONS = {ExpansionType.ONLINE, ExpansionType.OFFLINE}

#: identity.go's plugin name pattern (a Go raw string: the class also admits
#: a literal backslash).
PLUGIN_NAME = re.compile(r"^[a-zA-Z][A-Za-z0-9\-\\._]{0,61}[a-zA-Z]$")


def test_identity_get_plugin_capabilities_should_return_appropriate_capabilities(sc):
    """Identity Service / GetPluginCapabilities / It("should return appropriate capabilities")."""
    res = S.expect_ok(lambda: sc.identity.GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest(), timeout=S.CALL_TIMEOUT))
    assert res is not None
    for cap in res.capabilities:
        kind = cap.WhichOneof("type")
        if kind == "service":
            assert cap.service.type in KNOWN_SERVICES, (
                f"Unknown service: {ServiceType.Name(cap.service.type)}")
        elif kind == "volume_expansion":
            assert cap.volume_expansion.type in KNOWN_EXPANSIONS, (
                f"Unknown volume expansion mode: {ExpansionType.Name(cap.volume_expansion.type)}")
        else:
            raise AssertionError(f"Unknown capability: {cap}")


def test_identity_probe_should_return_appropriate_information(sc):
    """Identity Service / Probe / It("should return appropriate information")."""
    # Upstream first requires no error, then accepts OK or FAILED_PRECONDITION
    # as the status -- with no error that is always OK.
    res = S.expect_ok(lambda: sc.identity.Probe(csi_pb2.ProbeRequest(), timeout=S.CALL_TIMEOUT))
    assert res is not None
    if res.HasField("ready"):
        assert res.ready.value in (True, False)


def test_identity_get_plugin_info_should_return_appropriate_information(sc):
    """Identity Service / GetPluginInfo / It("should return appropriate information")."""
    res = S.expect_ok(lambda: sc.identity.GetPluginInfo(
        csi_pb2.GetPluginInfoRequest(), timeout=S.CALL_TIMEOUT))
    assert res is not None
    assert len(res.name) != 0
    assert len(res.name) <= 63
    assert PLUGIN_NAME.match(res.name), f"plugin name {res.name!r} does not match {PLUGIN_NAME.pattern}"
