from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeVolumeRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class DescribeSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class LayerDetails(_message.Message):
    __slots__ = ("id", "path", "depth", "virtual_size", "allocated_bytes", "read_only")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    depth: int
    virtual_size: int
    allocated_bytes: int
    read_only: bool
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ..., depth: _Optional[int] = ..., virtual_size: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., read_only: _Optional[bool] = ...) -> None: ...

class VolumeDetails(_message.Message):
    __slots__ = ("volume_id", "name", "size_bytes", "allocated_bytes", "created_ns", "owner", "source_snapshot_id", "source_volume_id", "chain", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_NS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    name: str
    size_bytes: int
    allocated_bytes: int
    created_ns: int
    owner: str
    source_snapshot_id: str
    source_volume_id: str
    chain: _containers.RepeatedCompositeFieldContainer[LayerDetails]
    parameters: _containers.ScalarMap[str, str]
    def __init__(self, volume_id: _Optional[str] = ..., name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., created_ns: _Optional[int] = ..., owner: _Optional[str] = ..., source_snapshot_id: _Optional[str] = ..., source_volume_id: _Optional[str] = ..., chain: _Optional[_Iterable[_Union[LayerDetails, _Mapping]]] = ..., parameters: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SnapshotDetails(_message.Message):
    __slots__ = ("snapshot_id", "name", "source_volume_id", "size_bytes", "allocated_bytes", "created_ns", "ready_to_use", "chain", "indications", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_NS_FIELD_NUMBER: _ClassVar[int]
    READY_TO_USE_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    INDICATIONS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    name: str
    source_volume_id: str
    size_bytes: int
    allocated_bytes: int
    created_ns: int
    ready_to_use: bool
    chain: _containers.RepeatedCompositeFieldContainer[LayerDetails]
    indications: _containers.RepeatedScalarFieldContainer[str]
    parameters: _containers.ScalarMap[str, str]
    def __init__(self, snapshot_id: _Optional[str] = ..., name: _Optional[str] = ..., source_volume_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., created_ns: _Optional[int] = ..., ready_to_use: _Optional[bool] = ..., chain: _Optional[_Iterable[_Union[LayerDetails, _Mapping]]] = ..., indications: _Optional[_Iterable[str]] = ..., parameters: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PoolStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolStatusResponse(_message.Message):
    __slots__ = ("root", "total_bytes", "available_bytes", "used_bytes", "provisioned_bytes", "volumes", "snapshots", "layers", "garbage_layers", "max_depth", "depth_cap", "pending_intents", "reclaimed_layers", "collapse_merges", "flatten_merges", "maintenance_error")
    ROOT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROVISIONED_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    GARBAGE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    DEPTH_CAP_FIELD_NUMBER: _ClassVar[int]
    PENDING_INTENTS_FIELD_NUMBER: _ClassVar[int]
    RECLAIMED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    COLLAPSE_MERGES_FIELD_NUMBER: _ClassVar[int]
    FLATTEN_MERGES_FIELD_NUMBER: _ClassVar[int]
    MAINTENANCE_ERROR_FIELD_NUMBER: _ClassVar[int]
    root: str
    total_bytes: int
    available_bytes: int
    used_bytes: int
    provisioned_bytes: int
    volumes: int
    snapshots: int
    layers: int
    garbage_layers: int
    max_depth: int
    depth_cap: int
    pending_intents: int
    reclaimed_layers: int
    collapse_merges: int
    flatten_merges: int
    maintenance_error: str
    def __init__(self, root: _Optional[str] = ..., total_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., provisioned_bytes: _Optional[int] = ..., volumes: _Optional[int] = ..., snapshots: _Optional[int] = ..., layers: _Optional[int] = ..., garbage_layers: _Optional[int] = ..., max_depth: _Optional[int] = ..., depth_cap: _Optional[int] = ..., pending_intents: _Optional[int] = ..., reclaimed_layers: _Optional[int] = ..., collapse_merges: _Optional[int] = ..., flatten_merges: _Optional[int] = ..., maintenance_error: _Optional[str] = ...) -> None: ...

class CreateVmSnapshotRequest(_message.Message):
    __slots__ = ("domain", "name", "parameters", "accept_warnings")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_WARNINGS_FIELD_NUMBER: _ClassVar[int]
    domain: str
    name: str
    parameters: _containers.ScalarMap[str, str]
    accept_warnings: bool
    def __init__(self, domain: _Optional[str] = ..., name: _Optional[str] = ..., parameters: _Optional[_Mapping[str, str]] = ..., accept_warnings: _Optional[bool] = ...) -> None: ...

class ListVmSnapshotsRequest(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    def __init__(self, domain: _Optional[str] = ...) -> None: ...

class ListVmSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[VmSnapshotDetails]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[VmSnapshotDetails, _Mapping]]] = ...) -> None: ...

class GetVmSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class DeleteVmSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class DeleteVmSnapshotResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VmDiskDetails(_message.Message):
    __slots__ = ("target", "volume_id", "attachment", "snapshot_id", "driver_type")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    DRIVER_TYPE_FIELD_NUMBER: _ClassVar[int]
    target: str
    volume_id: str
    attachment: str
    snapshot_id: str
    driver_type: str
    def __init__(self, target: _Optional[str] = ..., volume_id: _Optional[str] = ..., attachment: _Optional[str] = ..., snapshot_id: _Optional[str] = ..., driver_type: _Optional[str] = ...) -> None: ...

class ExcludedDiskDetails(_message.Message):
    __slots__ = ("target", "source", "reason")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    target: str
    source: str
    reason: str
    def __init__(self, target: _Optional[str] = ..., source: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class VmSnapshotDetails(_message.Message):
    __slots__ = ("snapshot_id", "name", "domain_name", "domain_uuid", "created_ns", "status", "disks", "excluded", "warnings", "indications", "group_snapshot_id", "error", "online", "domain_xml")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_NAME_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_UUID_FIELD_NUMBER: _ClassVar[int]
    CREATED_NS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DISKS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    INDICATIONS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_XML_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    name: str
    domain_name: str
    domain_uuid: str
    created_ns: int
    status: str
    disks: _containers.RepeatedCompositeFieldContainer[VmDiskDetails]
    excluded: _containers.RepeatedCompositeFieldContainer[ExcludedDiskDetails]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    indications: _containers.RepeatedScalarFieldContainer[str]
    group_snapshot_id: str
    error: str
    online: bool
    domain_xml: str
    def __init__(self, snapshot_id: _Optional[str] = ..., name: _Optional[str] = ..., domain_name: _Optional[str] = ..., domain_uuid: _Optional[str] = ..., created_ns: _Optional[int] = ..., status: _Optional[str] = ..., disks: _Optional[_Iterable[_Union[VmDiskDetails, _Mapping]]] = ..., excluded: _Optional[_Iterable[_Union[ExcludedDiskDetails, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., indications: _Optional[_Iterable[str]] = ..., group_snapshot_id: _Optional[str] = ..., error: _Optional[str] = ..., online: _Optional[bool] = ..., domain_xml: _Optional[str] = ...) -> None: ...

class RestoreVmRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class CloneVmRequest(_message.Message):
    __slots__ = ("snapshot_id", "new_name", "start")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_NAME_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    new_name: str
    start: bool
    def __init__(self, snapshot_id: _Optional[str] = ..., new_name: _Optional[str] = ..., start: _Optional[bool] = ...) -> None: ...

class RestoreVmResponse(_message.Message):
    __slots__ = ("domain_name", "domain_uuid", "volumes", "replaced")
    class VolumesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ReplacedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DOMAIN_NAME_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_UUID_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    domain_name: str
    domain_uuid: str
    volumes: _containers.ScalarMap[str, str]
    replaced: _containers.ScalarMap[str, str]
    def __init__(self, domain_name: _Optional[str] = ..., domain_uuid: _Optional[str] = ..., volumes: _Optional[_Mapping[str, str]] = ..., replaced: _Optional[_Mapping[str, str]] = ...) -> None: ...
