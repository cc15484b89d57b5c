"""The wire contract: generated stubs are fresh, and csi.proto is CSI v1.12.0.

Every expected name and number below was taken from the upstream CSI spec
v1.12.0 (container-storage-interface/spec, csi.proto as compiled by protoc),
not from proto/csi.proto: a renumbered or renamed field, a dropped RPC or a
lost ``csi_secret`` marker would break kubelet and the CSI sidecars, which
talk to us with their own copy of the upstream definitions.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # noqa: E402

from csidriver.pb import csi_pb2, qsnap_pb2  # noqa: E402

PB_DIR = ROOT / "csidriver" / "pb"
GEN_SCRIPT = ROOT / "hack" / "gen-proto.sh"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

FILE = csi_pb2.DESCRIPTOR


# ---------------------------------------------------------------------------
# (a) committed stubs == fresh generation
# ---------------------------------------------------------------------------

def _generated_files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def test_stubs_are_fresh(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(GEN_SCRIPT), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (
        f"hack/gen-proto.sh failed (exit {result.returncode}):\n"
        f"{result.stdout}\n{result.stderr}"
    )
    fresh = _generated_files(tmp_path / "csidriver" / "pb")
    committed = _generated_files(PB_DIR)
    assert fresh, "hack/gen-proto.sh generated nothing"

    hint = ("the generated stubs in csidriver/pb/ are stale: run hack/gen-proto.sh "
            "(with grpcio-tools==1.85.1) and commit the result")
    assert sorted(committed) == sorted(fresh), (
        f"{hint}\n  committed: {sorted(committed)}\n  generated: {sorted(fresh)}")
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{hint}\n  differing files: {stale}"


def test_stubs_import_as_package_modules() -> None:
    grpc_src = (PB_DIR / "csi_pb2_grpc.py").read_text()
    assert "from csidriver.pb import csi_pb2 as " in grpc_src
    qsnap_grpc_src = (PB_DIR / "qsnap_pb2_grpc.py").read_text()
    assert "from csidriver.pb import qsnap_pb2 as " in qsnap_grpc_src


# ---------------------------------------------------------------------------
# (b) csi.proto is wire-compatible with CSI v1.12.0
# ---------------------------------------------------------------------------

# sha256 of upstream v1.12.0 csi.proto's FileDescriptorProto as protoc emits
# it, canonicalised by _canonical_digest (file name, file options such as
# go_package, json_name and source info removed). It pins every message,
# enum, field, number, type, label, oneof, option, service and method.
UPSTREAM_V1_12_DIGEST = "8d1c758cf28129dc254dbf5aaec768761aef5b5387a25d31cf3952cbdded905c"


def _canonical_digest(serialized: bytes) -> str:
    # Parse with a FileDescriptorProto class from a private pool: in the
    # default pool csi_pb2 registered csi_secret/alpha_* as known extensions,
    # which changes the order options are re-serialised in.
    pool = descriptor_pool.DescriptorPool()
    dproto = descriptor_pb2.FileDescriptorProto()
    descriptor_pb2.DESCRIPTOR.CopyToProto(dproto)
    pool.Add(dproto)
    cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("google.protobuf.FileDescriptorProto"))
    fd = cls()
    fd.ParseFromString(serialized)
    for name in ("name", "options", "source_code_info"):
        fd.ClearField(name)

    def strip(msg) -> None:
        for field in msg.field:
            field.ClearField("json_name")
        for nested in msg.nested_type:
            strip(nested)

    for msg in fd.message_type:
        strip(msg)
    for ext in fd.extension:
        ext.ClearField("json_name")
    return hashlib.sha256(fd.SerializeToString(deterministic=True)).hexdigest()


def test_whole_descriptor_matches_upstream_v1_12() -> None:
    assert _canonical_digest(FILE.serialized_pb) == UPSTREAM_V1_12_DIGEST, (
        "proto/csi.proto no longer has exactly the structure of CSI v1.12.0 "
        "(names, numbers, types, options); the spot checks below say where")


def test_package_and_imports() -> None:
    assert FILE.package == "csi.v1"
    proto = descriptor_pb2.FileDescriptorProto()
    FILE.CopyToProto(proto)
    assert proto.syntax == "proto3"
    assert sorted(d.name for d in FILE.dependencies) == [
        "google/protobuf/descriptor.proto",
        "google/protobuf/timestamp.proto",
        "google/protobuf/wrappers.proto",
    ]


# service -> methods, in upstream order; (name, server_streaming)
SERVICES: dict[str, list[tuple[str, bool]]] = {
    "Identity": [
        ("GetPluginInfo", False),
        ("GetPluginCapabilities", False),
        ("Probe", False),
    ],
    "Controller": [
        ("CreateVolume", False),
        ("DeleteVolume", False),
        ("ControllerPublishVolume", False),
        ("ControllerUnpublishVolume", False),
        ("ValidateVolumeCapabilities", False),
        ("ListVolumes", False),
        ("GetCapacity", False),
        ("ControllerGetCapabilities", False),
        ("CreateSnapshot", False),
        ("DeleteSnapshot", False),
        ("ListSnapshots", False),
        ("GetSnapshot", False),
        ("ControllerExpandVolume", False),
        ("ControllerGetVolume", False),
        ("ControllerModifyVolume", False),
    ],
    "GroupController": [
        ("GroupControllerGetCapabilities", False),
        ("CreateVolumeGroupSnapshot", False),
        ("DeleteVolumeGroupSnapshot", False),
        ("GetVolumeGroupSnapshot", False),
    ],
    "SnapshotMetadata": [
        ("GetMetadataAllocated", True),
        ("GetMetadataDelta", True),
    ],
    "Node": [
        ("NodeStageVolume", False),
        ("NodeUnstageVolume", False),
        ("NodePublishVolume", False),
        ("NodeUnpublishVolume", False),
        ("NodeGetVolumeStats", False),
        ("NodeExpandVolume", False),
        ("NodeGetCapabilities", False),
        ("NodeGetInfo", False),
    ],
}


def test_services_and_methods() -> None:
    assert list(FILE.services_by_name) == list(SERVICES)
    for service_name, methods in SERVICES.items():
        service = FILE.services_by_name[service_name]
        assert service.full_name == f"csi.v1.{service_name}"
        got = [(m.name, m.server_streaming) for m in service.methods]
        assert got == methods, service_name
        for m in service.methods:
            assert not m.client_streaming, m.full_name
            # Every CSI RPC Foo takes FooRequest and returns FooResponse.
            assert m.input_type.full_name == f"csi.v1.{m.name}Request", m.full_name
            assert m.output_type.full_name == f"csi.v1.{m.name}Response", m.full_name


# All top-level messages of upstream v1.12.0 csi.proto.
TOP_LEVEL_MESSAGES = {
    "GetPluginInfoRequest", "GetPluginInfoResponse",
    "GetPluginCapabilitiesRequest", "GetPluginCapabilitiesResponse",
    "PluginCapability", "ProbeRequest", "ProbeResponse",
    "CreateVolumeRequest", "VolumeContentSource", "CreateVolumeResponse",
    "VolumeCapability", "CapacityRange", "Volume", "TopologyRequirement",
    "Topology", "DeleteVolumeRequest", "DeleteVolumeResponse",
    "ControllerPublishVolumeRequest", "ControllerPublishVolumeResponse",
    "ControllerUnpublishVolumeRequest", "ControllerUnpublishVolumeResponse",
    "ValidateVolumeCapabilitiesRequest", "ValidateVolumeCapabilitiesResponse",
    "ListVolumesRequest", "ListVolumesResponse",
    "ControllerGetVolumeRequest", "ControllerGetVolumeResponse",
    "ControllerModifyVolumeRequest", "ControllerModifyVolumeResponse",
    "GetCapacityRequest", "GetCapacityResponse",
    "ControllerGetCapabilitiesRequest", "ControllerGetCapabilitiesResponse",
    "ControllerServiceCapability",
    "CreateSnapshotRequest", "CreateSnapshotResponse", "Snapshot",
    "DeleteSnapshotRequest", "DeleteSnapshotResponse",
    "ListSnapshotsRequest", "ListSnapshotsResponse",
    "GetSnapshotRequest", "GetSnapshotResponse",
    "ControllerExpandVolumeRequest", "ControllerExpandVolumeResponse",
    "NodeStageVolumeRequest", "NodeStageVolumeResponse",
    "NodeUnstageVolumeRequest", "NodeUnstageVolumeResponse",
    "NodePublishVolumeRequest", "NodePublishVolumeResponse",
    "NodeUnpublishVolumeRequest", "NodeUnpublishVolumeResponse",
    "NodeGetVolumeStatsRequest", "NodeGetVolumeStatsResponse",
    "VolumeUsage", "VolumeCondition",
    "NodeGetCapabilitiesRequest", "NodeGetCapabilitiesResponse",
    "NodeServiceCapability", "NodeGetInfoRequest", "NodeGetInfoResponse",
    "NodeExpandVolumeRequest", "NodeExpandVolumeResponse",
    "GroupControllerGetCapabilitiesRequest", "GroupControllerGetCapabilitiesResponse",
    "GroupControllerServiceCapability",
    "CreateVolumeGroupSnapshotRequest", "CreateVolumeGroupSnapshotResponse",
    "VolumeGroupSnapshot",
    "DeleteVolumeGroupSnapshotRequest", "DeleteVolumeGroupSnapshotResponse",
    "GetVolumeGroupSnapshotRequest", "GetVolumeGroupSnapshotResponse",
    "BlockMetadata",
    "GetMetadataAllocatedRequest", "GetMetadataAllocatedResponse",
    "GetMetadataDeltaRequest", "GetMetadataDeltaResponse",
}


def test_top_level_messages() -> None:
    assert len(TOP_LEVEL_MESSAGES) == 79
    assert set(FILE.message_types_by_name) == TOP_LEVEL_MESSAGES
    assert set(FILE.enum_types_by_name) == {"BlockMetadataType"}


# message -> {field name: number}; the complete field set of each message.
FIELDS: dict[str, dict[str, int]] = {
    "GetPluginInfoResponse": {"name": 1, "vendor_version": 2, "manifest": 3},
    "PluginCapability": {"service": 1, "volume_expansion": 2},
    "ProbeResponse": {"ready": 1},
    "CreateVolumeRequest": {
        "name": 1, "capacity_range": 2, "volume_capabilities": 3, "parameters": 4,
        "secrets": 5, "volume_content_source": 6, "accessibility_requirements": 7,
        "mutable_parameters": 8,
    },
    "CreateVolumeResponse": {"volume": 1},
    "VolumeContentSource": {"snapshot": 1, "volume": 2},
    "VolumeContentSource.SnapshotSource": {"snapshot_id": 1},
    "VolumeContentSource.VolumeSource": {"volume_id": 1},
    "VolumeCapability": {"block": 1, "mount": 2, "access_mode": 3},
    "VolumeCapability.MountVolume": {"fs_type": 1, "mount_flags": 2, "volume_mount_group": 3},
    "VolumeCapability.AccessMode": {"mode": 1},
    "CapacityRange": {"required_bytes": 1, "limit_bytes": 2},
    "Volume": {
        "capacity_bytes": 1, "volume_id": 2, "volume_context": 3, "content_source": 4,
        "accessible_topology": 5,
    },
    "TopologyRequirement": {"requisite": 1, "preferred": 2},
    "Topology": {"segments": 1},
    "DeleteVolumeRequest": {"volume_id": 1, "secrets": 2},
    "ControllerPublishVolumeRequest": {
        "volume_id": 1, "node_id": 2, "volume_capability": 3, "readonly": 4,
        "secrets": 5, "volume_context": 6,
    },
    "ControllerPublishVolumeResponse": {"publish_context": 1},
    "ControllerUnpublishVolumeRequest": {"volume_id": 1, "node_id": 2, "secrets": 3},
    "ValidateVolumeCapabilitiesRequest": {
        "volume_id": 1, "volume_context": 2, "volume_capabilities": 3, "parameters": 4,
        "secrets": 5, "mutable_parameters": 6,
    },
    "ValidateVolumeCapabilitiesResponse": {"confirmed": 1, "message": 2},
    "ListVolumesRequest": {"max_entries": 1, "starting_token": 2},
    "ListVolumesResponse": {"entries": 1, "next_token": 2},
    "ListVolumesResponse.Entry": {"volume": 1, "status": 2},
    "ControllerGetVolumeResponse": {"volume": 1, "status": 2},
    "ControllerModifyVolumeRequest": {"volume_id": 1, "secrets": 2, "mutable_parameters": 3},
    "GetCapacityRequest": {"volume_capabilities": 1, "parameters": 2, "accessible_topology": 3},
    "GetCapacityResponse": {
        "available_capacity": 1, "maximum_volume_size": 2, "minimum_volume_size": 3,
    },
    "ControllerServiceCapability": {"rpc": 1},
    "ControllerServiceCapability.RPC": {"type": 1},
    "CreateSnapshotRequest": {"source_volume_id": 1, "name": 2, "secrets": 3, "parameters": 4},
    "CreateSnapshotResponse": {"snapshot": 1},
    "Snapshot": {
        "size_bytes": 1, "snapshot_id": 2, "source_volume_id": 3, "creation_time": 4,
        "ready_to_use": 5, "group_snapshot_id": 6,
    },
    "DeleteSnapshotRequest": {"snapshot_id": 1, "secrets": 2},
    "ListSnapshotsRequest": {
        "max_entries": 1, "starting_token": 2, "source_volume_id": 3, "snapshot_id": 4,
        "secrets": 5,
    },
    "ListSnapshotsResponse": {"entries": 1, "next_token": 2},
    "ListSnapshotsResponse.Entry": {"snapshot": 1},
    "GetSnapshotRequest": {"snapshot_id": 1, "secrets": 2},
    "GetSnapshotResponse": {"snapshot": 1},
    "ControllerExpandVolumeRequest": {
        "volume_id": 1, "capacity_range": 2, "secrets": 3, "volume_capability": 4,
    },
    "ControllerExpandVolumeResponse": {"capacity_bytes": 1, "node_expansion_required": 2},
    "NodeStageVolumeRequest": {
        "volume_id": 1, "publish_context": 2, "staging_target_path": 3,
        "volume_capability": 4, "secrets": 5, "volume_context": 6,
    },
    "NodeUnstageVolumeRequest": {"volume_id": 1, "staging_target_path": 2},
    "NodePublishVolumeRequest": {
        "volume_id": 1, "publish_context": 2, "staging_target_path": 3, "target_path": 4,
        "volume_capability": 5, "readonly": 6, "secrets": 7, "volume_context": 8,
    },
    "NodeUnpublishVolumeRequest": {"volume_id": 1, "target_path": 2},
    "NodeGetVolumeStatsRequest": {"volume_id": 1, "volume_path": 2, "staging_target_path": 3},
    "NodeGetVolumeStatsResponse": {"usage": 1, "volume_condition": 2},
    "VolumeUsage": {"available": 1, "total": 2, "used": 3, "unit": 4},
    "VolumeCondition": {"abnormal": 1, "message": 2},
    "NodeServiceCapability": {"rpc": 1},
    "NodeGetInfoResponse": {"node_id": 1, "max_volumes_per_node": 2, "accessible_topology": 3},
    "NodeExpandVolumeRequest": {
        "volume_id": 1, "volume_path": 2, "capacity_range": 3, "staging_target_path": 4,
        "volume_capability": 5, "secrets": 6,
    },
    "NodeExpandVolumeResponse": {"capacity_bytes": 1},
    # GroupController
    "GroupControllerGetCapabilitiesResponse": {"capabilities": 1},
    "GroupControllerServiceCapability": {"rpc": 1},
    "GroupControllerServiceCapability.RPC": {"type": 1},
    "CreateVolumeGroupSnapshotRequest": {
        "name": 1, "source_volume_ids": 2, "secrets": 3, "parameters": 4,
    },
    "CreateVolumeGroupSnapshotResponse": {"group_snapshot": 1},
    "VolumeGroupSnapshot": {
        "group_snapshot_id": 1, "snapshots": 2, "creation_time": 3, "ready_to_use": 4,
    },
    "DeleteVolumeGroupSnapshotRequest": {"group_snapshot_id": 1, "snapshot_ids": 2, "secrets": 3},
    "GetVolumeGroupSnapshotRequest": {"group_snapshot_id": 1, "snapshot_ids": 2, "secrets": 3},
    "GetVolumeGroupSnapshotResponse": {"group_snapshot": 1},
    # SnapshotMetadata
    "BlockMetadata": {"byte_offset": 1, "size_bytes": 2},
    "GetMetadataAllocatedRequest": {
        "snapshot_id": 1, "starting_offset": 2, "max_results": 3, "secrets": 4,
    },
    "GetMetadataAllocatedResponse": {
        "block_metadata_type": 1, "volume_capacity_bytes": 2, "block_metadata": 3,
    },
    "GetMetadataDeltaRequest": {
        "base_snapshot_id": 1, "target_snapshot_id": 2, "starting_offset": 3,
        "max_results": 4, "secrets": 5,
    },
    "GetMetadataDeltaResponse": {
        "block_metadata_type": 1, "volume_capacity_bytes": 2, "block_metadata": 3,
    },
}


def _message(path: str):
    top, *nested = path.split(".")
    desc = FILE.message_types_by_name[top]
    for name in nested:
        desc = desc.nested_types_by_name[name]
    return desc


@pytest.mark.parametrize("path", sorted(FIELDS))
def test_field_numbers(path: str) -> None:
    got = {f.name: f.number for f in _message(path).fields}
    assert got == FIELDS[path]


FD = descriptor_pb2.FieldDescriptorProto

# Field types where a mismatch would still parse but corrupt values.
FIELD_TYPES: dict[str, int | str] = {
    "CapacityRange.required_bytes": FD.TYPE_INT64,
    "CapacityRange.limit_bytes": FD.TYPE_INT64,
    "Volume.capacity_bytes": FD.TYPE_INT64,
    "Volume.volume_id": FD.TYPE_STRING,
    "Snapshot.size_bytes": FD.TYPE_INT64,
    "Snapshot.creation_time": "google.protobuf.Timestamp",
    "Snapshot.ready_to_use": FD.TYPE_BOOL,
    "ListSnapshotsRequest.max_entries": FD.TYPE_INT32,
    "ListVolumesRequest.max_entries": FD.TYPE_INT32,
    "ProbeResponse.ready": "google.protobuf.BoolValue",
    "GetCapacityResponse.available_capacity": FD.TYPE_INT64,
    "GetCapacityResponse.maximum_volume_size": "google.protobuf.Int64Value",
    "NodeGetInfoResponse.max_volumes_per_node": FD.TYPE_INT64,
    "VolumeUsage.available": FD.TYPE_INT64,
    "ControllerPublishVolumeRequest.readonly": FD.TYPE_BOOL,
    "BlockMetadata.byte_offset": FD.TYPE_INT64,
    "BlockMetadata.size_bytes": FD.TYPE_INT64,
    "GetMetadataAllocatedRequest.starting_offset": FD.TYPE_INT64,
    "GetMetadataAllocatedRequest.max_results": FD.TYPE_INT32,
    "GetMetadataDeltaResponse.block_metadata_type": "csi.v1.BlockMetadataType",
    "VolumeGroupSnapshot.creation_time": "google.protobuf.Timestamp",
}


@pytest.mark.parametrize("path", sorted(FIELD_TYPES))
def test_field_types(path: str) -> None:
    message, field_name = path.rsplit(".", 1)
    field = _message(message).fields_by_name[field_name]
    want = FIELD_TYPES[path]
    if isinstance(want, str):
        target = field.message_type or field.enum_type
        assert target is not None and target.full_name == want
    else:
        assert field.type == want


ONEOFS: dict[str, dict[str, set[str]]] = {
    "PluginCapability": {"type": {"service", "volume_expansion"}},
    "VolumeContentSource": {"type": {"snapshot", "volume"}},
    "VolumeCapability": {"access_type": {"block", "mount"}},
    "ControllerServiceCapability": {"type": {"rpc"}},
    "NodeServiceCapability": {"type": {"rpc"}},
    "GroupControllerServiceCapability": {"type": {"rpc"}},
}


@pytest.mark.parametrize("path", sorted(ONEOFS))
def test_oneofs(path: str) -> None:
    got = {o.name: {f.name for f in o.fields} for o in _message(path).oneofs}
    assert got == ONEOFS[path]


# enum -> {value name: number}; the complete value set.
ENUMS: dict[str, dict[str, int]] = {
    "PluginCapability.Service.Type": {
        "UNKNOWN": 0, "CONTROLLER_SERVICE": 1, "VOLUME_ACCESSIBILITY_CONSTRAINTS": 2,
        "GROUP_CONTROLLER_SERVICE": 3, "SNAPSHOT_METADATA_SERVICE": 4,
    },
    "PluginCapability.VolumeExpansion.Type": {"UNKNOWN": 0, "ONLINE": 1, "OFFLINE": 2},
    "VolumeCapability.AccessMode.Mode": {
        "UNKNOWN": 0, "SINGLE_NODE_WRITER": 1, "SINGLE_NODE_READER_ONLY": 2,
        "MULTI_NODE_READER_ONLY": 3, "MULTI_NODE_SINGLE_WRITER": 4,
        "MULTI_NODE_MULTI_WRITER": 5, "SINGLE_NODE_SINGLE_WRITER": 6,
        "SINGLE_NODE_MULTI_WRITER": 7,
    },
    "ControllerServiceCapability.RPC.Type": {
        "UNKNOWN": 0, "CREATE_DELETE_VOLUME": 1, "PUBLISH_UNPUBLISH_VOLUME": 2,
        "LIST_VOLUMES": 3, "GET_CAPACITY": 4, "CREATE_DELETE_SNAPSHOT": 5,
        "LIST_SNAPSHOTS": 6, "CLONE_VOLUME": 7, "PUBLISH_READONLY": 8,
        "EXPAND_VOLUME": 9, "LIST_VOLUMES_PUBLISHED_NODES": 10, "VOLUME_CONDITION": 11,
        "GET_VOLUME": 12, "SINGLE_NODE_MULTI_WRITER": 13, "MODIFY_VOLUME": 14,
        "GET_SNAPSHOT": 15,
    },
    "VolumeUsage.Unit": {"UNKNOWN": 0, "BYTES": 1, "INODES": 2},
    "NodeServiceCapability.RPC.Type": {
        "UNKNOWN": 0, "STAGE_UNSTAGE_VOLUME": 1, "GET_VOLUME_STATS": 2,
        "EXPAND_VOLUME": 3, "VOLUME_CONDITION": 4, "SINGLE_NODE_MULTI_WRITER": 5,
        "VOLUME_MOUNT_GROUP": 6,
    },
    "GroupControllerServiceCapability.RPC.Type": {
        "UNKNOWN": 0, "CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT": 1,
    },
    "BlockMetadataType": {"UNKNOWN": 0, "FIXED_LENGTH": 1, "VARIABLE_LENGTH": 2},
}


def _enum(path: str):
    *owner, name = path.split(".")
    if not owner:
        return FILE.enum_types_by_name[name]
    return _message(".".join(owner)).enum_types_by_name[name]


@pytest.mark.parametrize("path", sorted(ENUMS))
def test_enum_values(path: str) -> None:
    got = {v.name: v.number for v in _enum(path).values}
    assert got == ENUMS[path]


def test_extension_numbers() -> None:
    want = {
        "csi_secret": (1059, "google.protobuf.FieldOptions"),
        "alpha_field": (1060, "google.protobuf.FieldOptions"),
        "alpha_enum": (1060, "google.protobuf.EnumOptions"),
        "alpha_enum_value": (1060, "google.protobuf.EnumValueOptions"),
        "alpha_message": (1060, "google.protobuf.MessageOptions"),
        "alpha_method": (1060, "google.protobuf.MethodOptions"),
        "alpha_service": (1060, "google.protobuf.ServiceOptions"),
    }
    got = {name: (ext.number, ext.containing_type.full_name)
           for name, ext in FILE.extensions_by_name.items()}
    assert got == want
    for name in want:
        assert FILE.extensions_by_name[name].type == FD.TYPE_BOOL


# Every field upstream marks [(csi_secret) = true] (all named "secrets").
SECRET_FIELDS = {
    f"{message}.secrets" for message in (
        "CreateVolumeRequest", "DeleteVolumeRequest",
        "ControllerPublishVolumeRequest", "ControllerUnpublishVolumeRequest",
        "ValidateVolumeCapabilitiesRequest", "ControllerModifyVolumeRequest",
        "CreateSnapshotRequest", "DeleteSnapshotRequest", "ListSnapshotsRequest",
        "GetSnapshotRequest", "ControllerExpandVolumeRequest",
        "NodeStageVolumeRequest", "NodePublishVolumeRequest", "NodeExpandVolumeRequest",
        "CreateVolumeGroupSnapshotRequest", "DeleteVolumeGroupSnapshotRequest",
        "GetVolumeGroupSnapshotRequest",
        "GetMetadataAllocatedRequest", "GetMetadataDeltaRequest",
    )
}


def _all_messages():
    def walk(desc):
        yield desc
        for nested in desc.nested_types:
            yield from walk(nested)
    for desc in FILE.message_types_by_name.values():
        yield from walk(desc)


def test_csi_secret_marks_exactly_the_upstream_secret_fields() -> None:
    secret = csi_pb2.csi_secret
    opts = csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name["secrets"].GetOptions()
    assert opts.Extensions[secret] is True

    marked = {
        f"{m.full_name.removeprefix('csi.v1.')}.{f.name}"
        for m in _all_messages() for f in m.fields
        if f.GetOptions().Extensions[secret]
    }
    assert marked == SECRET_FIELDS


def test_alpha_markers() -> None:
    """Spot checks of v1.12's maturity markers (ControllerModifyVolume is GA)."""
    controller = FILE.services_by_name["Controller"]
    alpha_methods = {m.name for m in controller.methods
                     if m.GetOptions().Extensions[csi_pb2.alpha_method]}
    assert alpha_methods == {"GetSnapshot", "ControllerGetVolume"}
    assert FILE.services_by_name["SnapshotMetadata"].GetOptions().Extensions[
        csi_pb2.alpha_service]
    assert not FILE.services_by_name["GroupController"].GetOptions().Extensions[
        csi_pb2.alpha_service]

    rpc_type = _enum("ControllerServiceCapability.RPC.Type")
    alpha_values = {v.name for v in rpc_type.values
                    if v.GetOptions().Extensions[csi_pb2.alpha_enum_value]}
    assert alpha_values == {"VOLUME_CONDITION", "GET_VOLUME", "SINGLE_NODE_MULTI_WRITER",
                            "GET_SNAPSHOT"}

    alpha_messages = {m.name for m in FILE.message_types_by_name.values()
                      if m.GetOptions().Extensions[csi_pb2.alpha_message]}
    assert alpha_messages == {"ControllerGetVolumeRequest", "ControllerGetVolumeResponse",
                              "GetSnapshotRequest", "GetSnapshotResponse", "VolumeCondition"}


def test_messages_round_trip_on_the_wire() -> None:
    """A message built with the stubs decodes field by field as upstream numbers say."""
    req = csi_pb2.CreateSnapshotRequest(
        source_volume_id="vol-1", name="snap-a", secrets={"k": "v"}, parameters={"p": "q"})
    raw = req.SerializeToString(deterministic=True)
    # field 1 (LEN) "vol-1", then field 2 (LEN) "snap-a"
    assert raw.startswith(b"\x0a\x05vol-1\x12\x06snap-a")
    assert csi_pb2.CreateSnapshotRequest.FromString(raw) == req


# ---------------------------------------------------------------------------
# qsnap.proto: our own extension service
# ---------------------------------------------------------------------------

QSNAP_FIELDS: dict[str, dict[str, int]] = {
    "DescribeVolumeRequest": {"volume_id": 1},
    "DescribeSnapshotRequest": {"snapshot_id": 1},
    "LayerDetails": {
        "id": 1, "path": 2, "depth": 3, "virtual_size": 4, "allocated_bytes": 5,
        "read_only": 6,
    },
    "VolumeDetails": {
        "volume_id": 1, "name": 2, "size_bytes": 3, "allocated_bytes": 4, "created_ns": 5,
        "owner": 6, "source_snapshot_id": 7, "source_volume_id": 8, "chain": 9,
        "parameters": 10,
    },
    "SnapshotDetails": {
        "snapshot_id": 1, "name": 2, "source_volume_id": 3, "size_bytes": 4,
        "allocated_bytes": 5, "created_ns": 6, "ready_to_use": 7, "chain": 8,
        "indications": 9, "parameters": 10,
    },
    "PoolStatusRequest": {},
    "PoolStatusResponse": {
        "root": 1, "total_bytes": 2, "available_bytes": 3, "used_bytes": 4,
        "provisioned_bytes": 5, "volumes": 6, "snapshots": 7, "layers": 8,
        "garbage_layers": 9, "max_depth": 10, "depth_cap": 11, "pending_intents": 12,
        "reclaimed_layers": 13, "collapse_merges": 14, "flatten_merges": 15,
        "maintenance_error": 16,
    },
    "CreateVmSnapshotRequest": {"domain": 1, "name": 2, "parameters": 3, "accept_warnings": 4},
    "ListVmSnapshotsRequest": {"domain": 1},
    "ListVmSnapshotsResponse": {"snapshots": 1},
    "GetVmSnapshotRequest": {"snapshot_id": 1},
    "DeleteVmSnapshotRequest": {"snapshot_id": 1},
    "DeleteVmSnapshotResponse": {},
    "VmDiskDetails": {
        "target": 1, "volume_id": 2, "attachment": 3, "snapshot_id": 4, "driver_type": 5,
    },
    "ExcludedDiskDetails": {"target": 1, "source": 2, "reason": 3},
    "VmSnapshotDetails": {
        "snapshot_id": 1, "name": 2, "domain_name": 3, "domain_uuid": 4, "created_ns": 5,
        "status": 6, "disks": 7, "excluded": 8, "warnings": 9, "indications": 10,
        "group_snapshot_id": 11, "error": 12, "online": 13, "domain_xml": 14,
    },
    "RestoreVmRequest": {"snapshot_id": 1},
    "CloneVmRequest": {"snapshot_id": 1, "new_name": 2, "start": 3},
    "RestoreVmResponse": {"domain_name": 1, "domain_uuid": 2, "volumes": 3, "replaced": 4},
}


def test_qsnap_inspect_service() -> None:
    qfile = qsnap_pb2.DESCRIPTOR
    assert qfile.package == "qsnap.v1"
    assert list(qfile.services_by_name) == ["Inspect", "VirtualMachines"]
    methods = {m.name: (m.input_type.name, m.output_type.name)
               for m in qfile.services_by_name["Inspect"].methods}
    assert methods == {
        "DescribeVolume": ("DescribeVolumeRequest", "VolumeDetails"),
        "DescribeSnapshot": ("DescribeSnapshotRequest", "SnapshotDetails"),
        "PoolStatus": ("PoolStatusRequest", "PoolStatusResponse"),
    }
    assert set(qfile.message_types_by_name) == set(QSNAP_FIELDS)
    for name, fields in QSNAP_FIELDS.items():
        got = {f.name: f.number for f in qfile.message_types_by_name[name].fields}
        assert got == fields, name


def test_qsnap_virtual_machines_service() -> None:
    service = qsnap_pb2.DESCRIPTOR.services_by_name["VirtualMachines"]
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {
        "CreateVmSnapshot": ("CreateVmSnapshotRequest", "VmSnapshotDetails"),
        "ListVmSnapshots": ("ListVmSnapshotsRequest", "ListVmSnapshotsResponse"),
        "GetVmSnapshot": ("GetVmSnapshotRequest", "VmSnapshotDetails"),
        "DeleteVmSnapshot": ("DeleteVmSnapshotRequest", "DeleteVmSnapshotResponse"),
        "RestoreVm": ("RestoreVmRequest", "RestoreVmResponse"),
        "CloneVm": ("CloneVmRequest", "RestoreVmResponse"),
    }
    assert not any(m.client_streaming or m.server_streaming for m in service.methods)
    maps = {(name, f.name) for name, message in qsnap_pb2.DESCRIPTOR.message_types_by_name.items()
            for f in message.fields if f.message_type is not None
            and f.message_type.GetOptions().map_entry}
    assert {m for m in maps if m[0] in ("CreateVmSnapshotRequest", "RestoreVmResponse")} == {
        ("CreateVmSnapshotRequest", "parameters"), ("RestoreVmResponse", "volumes"),
        ("RestoreVmResponse", "replaced")}
