"""qsnap.v1.Inspect: what CSI messages have no room for (names, backing
chains, allocation, pool bookkeeping), for the ``qsnap`` CLI and for tests.
Read-only: nothing here changes the pool."""

from __future__ import annotations

import grpc

from csidriver.pb import qsnap_pb2, qsnap_pb2_grpc
from engine.errors import InvalidArgument
from engine.model import LayerInfo, SnapshotSource, VolumeSource
from engine.pool import Pool
from engine.reclaim import MaintenanceStats

def _layers_pb(chain: list[LayerInfo]) -> list[qsnap_pb2.LayerDetails]:
    return [qsnap_pb2.LayerDetails(id=layer.id, path=layer.path, depth=layer.depth,
                                   virtual_size=layer.virtual_size,
                                   allocated_bytes=layer.allocated_bytes,
                                   read_only=layer.read_only)
            for layer in chain]


class Inspect(qsnap_pb2_grpc.InspectServicer):
    """:param pool: the open pool.
    :param stats: the background maintainer's running totals."""

    def __init__(self, pool: Pool, stats: MaintenanceStats) -> None:
        self.pool = pool
        self.stats = stats

    def DescribeVolume(self, request: qsnap_pb2.DescribeVolumeRequest,
                       context: grpc.ServicerContext) -> qsnap_pb2.VolumeDetails:
        """:raises InvalidArgument: no ID, or a path-like one.
        :raises NotFound: no such volume."""
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        volume = self.pool.get_volume(request.volume_id)
        chain = self.pool.volume_chain(volume.id)
        return qsnap_pb2.VolumeDetails(
            volume_id=volume.id, name=volume.name, size_bytes=volume.size_bytes,
            allocated_bytes=sum(layer.allocated_bytes for layer in chain),
            created_ns=volume.created_ns, owner=volume.owner.value,
            source_snapshot_id=(volume.source.snapshot_id
                                if isinstance(volume.source, SnapshotSource) else ""),
            source_volume_id=(volume.source.volume_id
                              if isinstance(volume.source, VolumeSource) else ""),
            chain=_layers_pb(chain), parameters=volume.parameters)

    def DescribeSnapshot(self, request: qsnap_pb2.DescribeSnapshotRequest,
                         context: grpc.ServicerContext) -> qsnap_pb2.SnapshotDetails:
        """:raises InvalidArgument: no ID, or a path-like one.
        :raises NotFound: no such snapshot."""
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        snapshot = self.pool.get_snapshot(request.snapshot_id)
        chain = self.pool.snapshot_chain(snapshot.id)
        return qsnap_pb2.SnapshotDetails(
            snapshot_id=snapshot.id, name=snapshot.name,
            source_volume_id=snapshot.source_volume_id, size_bytes=snapshot.size_bytes,
            allocated_bytes=chain[0].allocated_bytes if chain else 0,
            created_ns=snapshot.created_ns, ready_to_use=snapshot.ready,
            chain=_layers_pb(chain), indications=list(snapshot.indications),
            parameters=snapshot.parameters)

    def PoolStatus(self, request: qsnap_pb2.PoolStatusRequest,
                   context: grpc.ServicerContext) -> qsnap_pb2.PoolStatusResponse:
        """Counts from one catalog reading plus the pool's capacity.

        ``total_bytes`` and ``available_bytes`` are the engine's capacity:
        the quota when one is set, and free space net of the reserve.
        """
        capacity = self.pool.capacity()
        with self.pool.catalog.reading() as tx:
            volumes = tx.count("volumes")
            snapshots = tx.count("snapshots")
            layers = tx.all_layers()
            garbage = len(tx.garbage())
            intents = tx.count("intents")
        return qsnap_pb2.PoolStatusResponse(
            root=str(self.pool.layout.root), total_bytes=capacity.total_bytes,
            available_bytes=capacity.available_bytes, used_bytes=capacity.used_bytes,
            provisioned_bytes=capacity.provisioned_bytes, volumes=volumes, snapshots=snapshots,
            layers=len(layers), garbage_layers=garbage,
            max_depth=max((layer.depth for layer in layers), default=0),
            depth_cap=self.pool.config.depth_cap, pending_intents=intents,
            reclaimed_layers=self.stats.reclaimed_layers,
            collapse_merges=self.stats.merges["collapse"],
            flatten_merges=self.stats.merges["flatten"],
            maintenance_error=self.stats.last_error)
