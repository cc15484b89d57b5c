"""CSI Node service: staging, publishing, stats and growth of served volumes.

A staged volume is served by the node's qemu-storage-daemon and exposed as a
loop device (``engine/node.py`` does all of that); this layer checks the
CSI-level shape of each request and makes one engine call.  Every RPC opens
the same way: required fields, the paths (absolute, no ``..``, never inside
the pool or the node's run directory), the volume capability, then the
engine.  Errors are raised, never turned into status codes here:
``csidriver/errors.py`` maps them for every RPC.

Concurrency: like the controller, every call that changes something takes
the volume's key in a non-blocking :class:`KeyedLock`, so a second call on a
volume that is being staged, published or grown answers ABORTED and the CO
retries.  Stats take no lock.

Secrets, the publish context and the volume context are accepted and
ignored: qsnap needs no credentials, and a volume is found by its ID.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import grpc

from csidriver.controller import TOPOLOGY_KEY, Access, parse_capability
from csidriver.pb import csi_pb2, csi_pb2_grpc
from engine import node as engine_node
from engine.devices import validate_mount_flags
from engine.errors import FailedPrecondition, InvalidArgument, OutOfRange
from engine.locks import KeyedLock
from engine.model import Staging
from engine.node import Node, VolumeStats
from engine.pool import Pool

log = logging.getLogger(__name__)

RPC = csi_pb2.NodeServiceCapability.RPC
Mode = csi_pb2.VolumeCapability.AccessMode
Usage = csi_pb2.VolumeUsage

# What the node serves, advertised by NodeGetCapabilities.
# SINGLE_NODE_MULTI_WRITER: the SINGLE_NODE_SINGLE_WRITER and
# SINGLE_NODE_MULTI_WRITER access modes are understood (see NodePublishVolume).
CAPABILITIES: tuple[csi_pb2.NodeServiceCapability.RPC.Type, ...] = (
    RPC.STAGE_UNSTAGE_VOLUME,
    RPC.GET_VOLUME_STATS,
    RPC.EXPAND_VOLUME,
    RPC.VOLUME_CONDITION,
    RPC.SINGLE_NODE_MULTI_WRITER,
)

# Modes in which the workload only reads: staged and published read-only.
READ_ONLY_MODES: frozenset[int] = frozenset({Mode.SINGLE_NODE_READER_ONLY,
                                             Mode.MULTI_NODE_READER_ONLY})


def _require(value: str, field: str) -> str:
    """:raises InvalidArgument: ``value`` is empty."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


def _within(path: PurePosixPath, root: PurePosixPath) -> bool:
    return path == root or root in path.parents


def check_path(value: str, field: str, *, forbidden: tuple[Path, ...]) -> Path:
    """A staging or target path as the engine takes it (normalised).

    The CO owns these paths, but the driver mounts onto them as root: a
    relative path, ``..`` or a path inside the pool or the node's run
    directory (the layer files, the FUSE exports) would let a request
    mount over qsnap's own files.  Symbolic links are followed for the
    containment check, as ``mount`` would follow them.

    :raises InvalidArgument: empty, relative, with a NUL byte or ``..``,
        the root directory, or inside one of ``forbidden``.
    """
    _require(value, field)
    if "\0" in value:
        raise InvalidArgument(f"{field} contains a NUL byte")
    path = PurePosixPath(value)
    if not path.is_absolute():
        raise InvalidArgument(f"{field} {value!r} must be an absolute path")
    if ".." in path.parts:
        raise InvalidArgument(f"{field} {value!r} must not contain '..'")
    if path == PurePosixPath("/"):
        raise InvalidArgument(f"{field} must not be the root directory")
    resolved = PurePosixPath(os.path.realpath(path))
    for root in forbidden:
        roots = {PurePosixPath(root), PurePosixPath(os.path.realpath(root))}
        if any(_within(p, r) for p in (path, resolved) for r in roots):
            raise InvalidArgument(f"{field} {value!r} is inside {root}, which belongs to qsnap")
    return Path(path)


def engine_access(access: Access, cap: csi_pb2.VolumeCapability) -> engine_node.Access:
    """The engine's view of a staging capability.

    :raises InvalidArgument: an unsupported mode or filesystem, a refused
        mount flag, or a volume mount group (VOLUME_MOUNT_GROUP is not
        advertised).
    """
    if reason := access.unsupported():
        raise InvalidArgument(reason)
    read_only = access.mode in READ_ONLY_MODES
    if access.kind == "block":
        return engine_node.Access(engine_node.BLOCK, read_only=read_only)
    if cap.mount.volume_mount_group:
        raise InvalidArgument("volume_mount_group is not supported (no VOLUME_MOUNT_GROUP "
                              "capability)")
    flags = tuple(validate_mount_flags(list(cap.mount.mount_flags)))
    return engine_node.Access(engine_node.MOUNT, fs_type=access.fs_type, mount_flags=flags,
                              read_only=read_only)


def usage_pb(stats: VolumeStats, *, block: bool) -> list[csi_pb2.VolumeUsage]:
    """Bytes (and, for a filesystem, inodes) of a volume.  For a block
    volume only the total is known: what the workload uses of it is its
    own business."""
    if block:
        return [Usage(unit=Usage.BYTES, total=stats.bytes_total)]
    return [Usage(unit=Usage.BYTES, total=stats.bytes_total, used=stats.bytes_used,
                  available=stats.bytes_available),
            Usage(unit=Usage.INODES, total=stats.inodes_total, used=stats.inodes_used,
                  available=stats.inodes_free)]


class NodeService(csi_pb2_grpc.NodeServicer):
    """:param node: the started engine node (QSD, loop devices, mounts).
    :param pool: the open pool the node serves from.
    :param nodeid: this node's ID, also the value of its topology segment.
    :param max_volumes: reported as ``max_volumes_per_node`` (0: no limit).
    """

    def __init__(self, node: Node, pool: Pool, nodeid: str, *, max_volumes: int = 0) -> None:
        self.node = node
        self.pool = pool
        self.nodeid = nodeid
        self.max_volumes = max_volumes
        # Staging and target paths must never point into these.
        self.protected: tuple[Path, ...] = (pool.layout.root, node.run_dir)
        self._ops = KeyedLock()

    # -- shared steps ----------------------------------------------------

    @contextmanager
    def _exclusive(self, volume_id: str) -> Iterator[None]:
        """:raises Busy: another call is operating on the volume (ABORTED)."""
        with self._ops.hold([f"volume:{volume_id}"], wait=False):
            yield

    def _path(self, value: str, field: str) -> Path:
        return check_path(value, field, forbidden=self.protected)

    def _staging(self, volume_id: str) -> Staging | None:
        with self.pool.catalog.reading() as tx:
            return tx.staging(volume_id)

    def _check_not_taken(self, volume_id: str, path: Path) -> None:
        """Another volume staged or published at ``path`` keeps it: mounting
        there would hide (or, as a stale mount, take down) that volume.

        :raises FailedPrecondition: ``path`` is in use by another volume.
        """
        with self.pool.catalog.reading() as tx:
            for other in tx.stagings():
                if other.volume_id == volume_id:
                    continue
                used = {other.staging_path,
                        *(p.target_path for p in tx.publications(other.volume_id))}
                if str(path) in used:
                    raise FailedPrecondition(f"{path} is in use by volume {other.volume_id}")

    # -- stage / unstage -------------------------------------------------

    def NodeStageVolume(self, request: csi_pb2.NodeStageVolumeRequest,
                        context: grpc.ServicerContext) -> csi_pb2.NodeStageVolumeResponse:
        """Serve a volume; for mount access make its filesystem (only on a
        blank device) and mount it at the staging path.  Idempotent.

        :raises InvalidArgument: a missing field, a bad path, an unsupported
            capability or mount flag.
        :raises NotFound: no such volume.
        :raises AlreadyExists: staged at another path or with another
            capability.
        :raises FailedPrecondition: the volume holds data of another
            filesystem type, or is open by a VM; or another volume is
            staged or published at the staging path.
        :raises Busy: a call on the volume is in progress (ABORTED).
        """
        volume_id = _require(request.volume_id, "volume_id")
        staging = self._path(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        access = engine_access(parse_capability(request.volume_capability),
                               request.volume_capability)
        with self._exclusive(volume_id):
            self._check_not_taken(volume_id, staging)
            staged = self.node.stage(volume_id, staging, access)
        log.info("volume %s: staged at %s on %s", volume_id, staging, staged.device)
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, request: csi_pb2.NodeUnstageVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodeUnstageVolumeResponse:
        """Stop serving a volume: afterwards no mount, loop device, FUSE
        export or QSD node of it is left.  Idempotent.

        :raises InvalidArgument: a missing field or a bad path.
        :raises NotFound: no such volume.
        :raises FailedPrecondition: still published, or staged at another path.
        :raises Busy: a call on the volume is in progress (ABORTED).
        """
        volume_id = _require(request.volume_id, "volume_id")
        staging = self._path(request.staging_target_path, "staging_target_path")
        with self._exclusive(volume_id):
            self.pool.get_volume(volume_id)
            self.node.unstage(volume_id, staging)
        return csi_pb2.NodeUnstageVolumeResponse()

    # -- publish / unpublish ---------------------------------------------

    def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodePublishVolumeResponse:
        """Bind the staged filesystem (a directory) or the device node (a
        file) onto the target path, read-only when asked or when the mode is
        a reader-only one.  Idempotent.

        :raises InvalidArgument: a missing field, a bad path, an unsupported
            capability, or a capability of the other access type than the
            volume is staged with.
        :raises NotFound: no such volume.
        :raises FailedPrecondition: the volume is not staged at
            ``staging_target_path``; or it is SINGLE_NODE_SINGLE_WRITER and
            already published at another target; or another volume is
            staged or published at the target.
        :raises AlreadyExists: the target is published with the other
            read-only state.
        :raises Busy: a call on the volume is in progress (ABORTED).
        """
        volume_id = _require(request.volume_id, "volume_id")
        target = self._path(request.target_path, "target_path")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        # STAGE_UNSTAGE_VOLUME is advertised, so the CO must pass it.
        staging = self._path(request.staging_target_path, "staging_target_path")
        access = parse_capability(request.volume_capability)
        if reason := access.unsupported():
            raise InvalidArgument(reason)
        if _within(PurePosixPath(target), PurePosixPath(staging)) \
                or _within(PurePosixPath(staging), PurePosixPath(target)):
            raise InvalidArgument(f"target_path {target} and staging_target_path {staging} "
                                  "must not contain each other")
        read_only = request.readonly or access.mode in READ_ONLY_MODES
        with self._exclusive(volume_id):
            self.pool.get_volume(volume_id)
            self._check_not_taken(volume_id, target)
            staged = self._staging(volume_id)
            if staged is not None:
                if staged.access != access.kind:
                    raise InvalidArgument(f"volume {volume_id} is staged for {staged.access} "
                                          f"access, not {access.kind}")
                # A filesystem mounted read-only stays read-only in every bind.
                read_only = read_only or staged.read_only
                if access.mode == Mode.SINGLE_NODE_SINGLE_WRITER:
                    self._check_single_writer(volume_id, target)
            self.node.publish(volume_id, staging, target, read_only=read_only)
        return csi_pb2.NodePublishVolumeResponse()

    def _check_single_writer(self, volume_id: str, target: Path) -> None:
        """:raises FailedPrecondition: published at another target already."""
        with self.pool.catalog.reading() as tx:
            elsewhere = [p.target_path for p in tx.publications(volume_id)
                         if p.target_path != str(target)]
        if elsewhere:
            raise FailedPrecondition(f"volume {volume_id} is SINGLE_NODE_SINGLE_WRITER and "
                                     f"already published at {', '.join(elsewhere)}")

    def NodeUnpublishVolume(self, request: csi_pb2.NodeUnpublishVolumeRequest,
                            context: grpc.ServicerContext
                            ) -> csi_pb2.NodeUnpublishVolumeResponse:
        """Unmount the target path and remove it.  Idempotent: a target that
        is not published is already done.

        :raises InvalidArgument: a missing field or a bad path, or the
            volume's staging path given as a target.
        :raises NotFound: no such volume.
        :raises FailedPrecondition: the target is in use (busy mount).
        :raises Busy: a call on the volume is in progress (ABORTED).
        """
        volume_id = _require(request.volume_id, "volume_id")
        target = self._path(request.target_path, "target_path")
        with self._exclusive(volume_id):
            self.pool.get_volume(volume_id)
            staged = self._staging(volume_id)
            if staged is not None and staged.staging_path == str(target):
                # Unpublishing there would unmount the staged filesystem
                # from under every other publication.
                raise InvalidArgument(f"target_path {target} is volume {volume_id}'s staging "
                                      "path; use NodeUnstageVolume")
            self.node.unpublish(volume_id, target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # -- stats and expansion ---------------------------------------------

    def NodeGetVolumeStats(self, request: csi_pb2.NodeGetVolumeStatsRequest,
                           context: grpc.ServicerContext
                           ) -> csi_pb2.NodeGetVolumeStatsResponse:
        """Bytes and inodes of a staged or published filesystem, bytes of a
        block volume, and the volume's condition.

        :raises InvalidArgument: a missing field.
        :raises NotFound: no such volume, or it is not staged or published
            at ``volume_path``.
        """
        volume_id = _require(request.volume_id, "volume_id")
        # Any other path than one the volume is at is NOT_FOUND (the spec's
        # answer), relative ones included: they cannot be where it is.
        path = Path(PurePosixPath(_require(request.volume_path, "volume_path")))
        stats = self.node.stats(volume_id, path)
        staged = self._staging(volume_id)
        block = staged is not None and staged.access == engine_node.BLOCK
        condition = csi_pb2.VolumeCondition(abnormal=stats.abnormal, message=stats.message)
        if stats.abnormal:
            log.warning("volume %s: abnormal: %s", volume_id, stats.message)
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage_pb(stats, block=block),
                                                  volume_condition=condition)

    def NodeExpandVolume(self, request: csi_pb2.NodeExpandVolumeRequest,
                         context: grpc.ServicerContext) -> csi_pb2.NodeExpandVolumeResponse:
        """Make the device take the volume's new size and grow its
        filesystem online (ControllerExpandVolume has grown the image).

        :raises InvalidArgument: a missing field, a malformed capability.
        :raises NotFound: no such volume, or not staged or published at
            ``volume_path``.
        :raises OutOfRange: the device is smaller than ``required_bytes``
            (the controller has not grown it) or bigger than ``limit_bytes``.
        :raises DeviceError: the grow tool failed -- online ext4 growth needs
            CAP_SYS_RESOURCE, and the message says so (INTERNAL).
        :raises Busy: a call on the volume is in progress (ABORTED).
        """
        volume_id = _require(request.volume_id, "volume_id")
        path = Path(PurePosixPath(_require(request.volume_path, "volume_path")))
        if request.HasField("volume_capability"):
            access = parse_capability(request.volume_capability)
            if reason := access.unsupported():
                raise InvalidArgument(reason)
        required = request.capacity_range.required_bytes
        limit = request.capacity_range.limit_bytes
        if required < 0 or limit < 0:
            raise InvalidArgument("capacity_range must not be negative")
        with self._exclusive(volume_id):
            size = self.node.expand(volume_id, path)
        if required and size < required:
            raise OutOfRange(f"volume {volume_id} is {size} bytes, less than the {required} "
                             "asked for: grow it with ControllerExpandVolume first")
        if limit and size > limit:
            raise OutOfRange(f"volume {volume_id} is {size} bytes, more than the limit {limit}")
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    # -- the node --------------------------------------------------------

    def NodeGetCapabilities(self, request: csi_pb2.NodeGetCapabilitiesRequest,
                            context: grpc.ServicerContext
                            ) -> csi_pb2.NodeGetCapabilitiesResponse:
        """Never fails."""
        caps = [csi_pb2.NodeServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES]
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=caps)

    def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest,
                    context: grpc.ServicerContext) -> csi_pb2.NodeGetInfoResponse:
        """The node ID, the volume limit and the node's topology segment,
        which every volume of this node's pool reports.  Never fails."""
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.nodeid, max_volumes_per_node=self.max_volumes,
            accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: self.nodeid}))

