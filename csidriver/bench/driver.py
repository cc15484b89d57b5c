"""One CSI endpoint as the benchmark sees it.

:class:`Endpoint` wraps the CSI stubs with timed calls and keeps a
:class:`Tracker` of everything the run created, so that :meth:`Endpoint.cleanup`
can delete all of it at the end, after an error or after Ctrl-C.

A create call that was cut short (interrupted, timed out, connection lost)
may still have created its object on the driver, and CSI gives the client no
ID in that case.  The tracker therefore records every create *request*
before sending it; cleanup re-sends unfinished ones, relying on CSI's
idempotency by name to get the ID of whatever was made, and deletes it.
"""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csidriver.pb import csi_pb2, csi_pb2_grpc, qsnap_pb2, qsnap_pb2_grpc

# Codes after which a create request certainly made nothing: cleanup need
# not re-send it.  Anything else (DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE,
# an interrupt) leaves the outcome unknown.
DEFINITE_FAILURES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
})


def grpc_target(endpoint: str) -> str:
    """``unix:///run/x.sock``, ``unix:x.sock``, ``/run/x.sock`` or
    ``tcp://host:port`` → what grpc.insecure_channel takes."""
    if endpoint.startswith("tcp://"):
        return endpoint[len("tcp://"):]
    if endpoint.startswith("/"):
        return f"unix://{endpoint}"
    return endpoint


def rpc_error_text(error: grpc.RpcError) -> str:
    code = error.code()  # type: ignore[attr-defined]
    return f"{code.name if code else 'UNKNOWN'}: {error.details()}"  # type: ignore[attr-defined]


@dataclass(frozen=True)
class DriverInfo:
    """What the benchmark learned about a driver before running."""

    label: str
    endpoint: str
    name: str
    version: str
    qsnap: bool
    controller: frozenset[str]
    node: frozenset[str] | None
    node_id: str = ""
    node_note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "endpoint": self.endpoint, "name": self.name,
                "version": self.version, "qsnap_inspect": self.qsnap,
                "controller_capabilities": sorted(self.controller),
                "node_capabilities": None if self.node is None else sorted(self.node),
                "node_id": self.node_id, "node_note": self.node_note}


@dataclass
class Attachment:
    """A volume made usable on this machine through the Node service."""

    volume_id: str
    workdir: Path
    block: bool
    staging: Path | None = None
    controller_published: bool = False
    staged: bool = False
    published: bool = False
    publish_context: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> Path:
        return self.workdir / "target"

    @property
    def data_path(self) -> Path:
        """The file that holds the volume's bytes: the device itself for
        block access, a file inside the filesystem for mount access."""
        return self.target if self.block else self.target / "qsnap-bench.data"


@dataclass
class CleanupReport:
    """What cleanup deleted and what it could not."""

    deleted_volumes: int = 0
    deleted_snapshots: int = 0
    detached: int = 0
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"deleted_volumes": self.deleted_volumes,
                "deleted_snapshots": self.deleted_snapshots, "detached": self.detached,
                "failures": list(self.failures)}


class Tracker:
    """Thread-safe record of the objects a run created or may have created."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens = itertools.count()
        # dicts keep creation order, so cleanup can go newest first.
        self.volumes: dict[str, None] = {}
        self.snapshots: dict[str, None] = {}
        self.pending: dict[int, tuple[str, Any]] = {}
        self.attachments: dict[str, Attachment] = {}
        self.created = {"volume": 0, "snapshot": 0}

    def begin(self, kind: str, request: Any) -> int:
        with self._lock:
            token = next(self._tokens)
            self.pending[token] = (kind, request)
            return token

    def finish(self, token: int, kind: str | None = None, object_id: str = "") -> None:
        """The create behind ``token`` ended; ``object_id`` is what it made."""
        with self._lock:
            self.pending.pop(token, None)
            if kind == "volume":
                self.volumes[object_id] = None
            elif kind == "snapshot":
                self.snapshots[object_id] = None
            if kind is not None:
                self.created[kind] += 1

    def gone(self, kind: str, object_id: str) -> None:
        with self._lock:
            (self.volumes if kind == "volume" else self.snapshots).pop(object_id, None)

    def attached(self, att: "Attachment") -> None:
        with self._lock:
            self.attachments[att.volume_id] = att

    def detached(self, volume_id: str) -> None:
        with self._lock:
            self.attachments.pop(volume_id, None)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self.volumes), len(self.snapshots)


class Endpoint:
    """Timed CSI calls on one driver, with tracking of created objects.

    :param label: "target" or "baseline", used in names and reports.
    :param endpoint: the driver's CSI endpoint.
    :param timeout: seconds per call; copying drivers take minutes on large volumes.
    :param run_id: a short random tag put in every object name, so a run's
        objects are recognisable on the driver.
    :param block: create block volumes (else filesystem volumes).
    """

    def __init__(self, label: str, endpoint: str, *, timeout: float, run_id: str,
                 block: bool = True, fs_type: str = "ext4") -> None:
        self.label = label
        self.endpoint = endpoint
        self.timeout = timeout
        self.run_id = run_id
        self.block = block
        self.fs_type = fs_type
        self.channel = grpc.insecure_channel(grpc_target(endpoint), options=[
            # A page of 10 000 snapshots is a few MB, above gRPC's 4 MB default.
            ("grpc.max_receive_message_length", 256 << 20)])
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.inspect = qsnap_pb2_grpc.InspectStub(self.channel)
        self.tracker = Tracker()
        self._names = itertools.count(1)
        self.info: DriverInfo | None = None

    def close(self) -> None:
        self.channel.close()

    # -- discovery ---------------------------------------------------------

    def probe(self) -> DriverInfo:
        """Ask the driver who it is and what it can do.

        :raises grpc.RpcError: the driver does not answer Identity or
            ControllerGetCapabilities.
        """
        plugin = self.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=30)
        caps = self.controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=30)
        controller = frozenset(
            csi_pb2.ControllerServiceCapability.RPC.Type.Name(c.rpc.type) for c in caps.capabilities)
        node: frozenset[str] | None
        node_id, note = "", ""
        try:
            reply = self.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=30)
            node = frozenset(csi_pb2.NodeServiceCapability.RPC.Type.Name(c.rpc.type)
                             for c in reply.capabilities)
            node_id = self.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=30).node_id
        except grpc.RpcError as e:
            node, note = None, f"no Node service ({rpc_error_text(e)})"
        qsnap = True
        try:
            self.inspect.PoolStatus(qsnap_pb2.PoolStatusRequest(), timeout=30)
        except grpc.RpcError:
            qsnap = False
        self.info = DriverInfo(label=self.label, endpoint=self.endpoint, name=plugin.name,
                               version=plugin.vendor_version, qsnap=qsnap, controller=controller,
                               node=node, node_id=node_id, node_note=note)
        return self.info

    def can(self, capability: str) -> bool:
        return self.info is not None and capability in self.info.controller

    # -- creating ----------------------------------------------------------

    def name(self, kind: str) -> str:
        return f"qsnap-bench-{self.run_id}-{self.label}-{kind}-{next(self._names)}"

    def capability(self) -> Any:
        mode = csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)
        if self.block:
            return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                            access_mode=mode)
        return csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type=self.fs_type), access_mode=mode)

    def create_volume(self, size: int, *, snapshot_id: str = "",
                      volume_id: str = "") -> tuple[Any, float]:
        """CreateVolume: empty, restored from ``snapshot_id`` or cloned from
        ``volume_id``.  :returns: the Volume and the call's seconds."""
        request = csi_pb2.CreateVolumeRequest(
            name=self.name("restore" if snapshot_id else "clone" if volume_id else "vol"),
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[self.capability()])
        if snapshot_id:
            request.volume_content_source.snapshot.snapshot_id = snapshot_id
        elif volume_id:
            request.volume_content_source.volume.volume_id = volume_id
        return self._create("volume", request)

    def create_snapshot(self, volume_id: str) -> tuple[Any, float]:
        """CreateSnapshot.  :returns: the Snapshot and the call's seconds."""
        request = csi_pb2.CreateSnapshotRequest(name=self.name("snap"), source_volume_id=volume_id)
        return self._create("snapshot", request)

    def _create(self, kind: str, request: Any) -> tuple[Any, float]:
        call = self.controller.CreateVolume if kind == "volume" else self.controller.CreateSnapshot
        token = self.tracker.begin(kind, request)
        start = time.perf_counter()
        try:
            reply = call(request, timeout=self.timeout)
        except grpc.RpcError as e:
            if e.code() in DEFINITE_FAILURES:  # type: ignore[attr-defined]
                self.tracker.finish(token)
            raise
        seconds = time.perf_counter() - start
        made = reply.volume if kind == "volume" else reply.snapshot
        self.tracker.finish(token, kind, made.volume_id if kind == "volume" else made.snapshot_id)
        return made, seconds

    def wait_ready(self, snapshot: Any, *, poll: float = 0.05) -> float:
        """Wait until a snapshot is ready to use (cut-only drivers return it
        ready; uploading ones do not).  :returns: seconds waited."""
        if snapshot.ready_to_use:
            return 0.0
        start = time.perf_counter()
        deadline = start + self.timeout
        while time.perf_counter() < deadline:
            page = self.controller.ListSnapshots(
                csi_pb2.ListSnapshotsRequest(snapshot_id=snapshot.snapshot_id), timeout=self.timeout)
            if any(e.snapshot.ready_to_use for e in page.entries):
                return time.perf_counter() - start
            time.sleep(poll)
        raise TimeoutError(f"snapshot {snapshot.snapshot_id} not ready after {self.timeout:.0f}s")

    # -- deleting ----------------------------------------------------------

    def delete_volume(self, volume_id: str) -> float:
        """DeleteVolume; NOT_FOUND counts as deleted.  :returns: seconds."""
        start = time.perf_counter()
        try:
            self.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id),
                                         timeout=self.timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                raise
        seconds = time.perf_counter() - start
        self.tracker.gone("volume", volume_id)
        return seconds

    def delete_snapshot(self, snapshot_id: str) -> float:
        """DeleteSnapshot; NOT_FOUND counts as deleted.  :returns: seconds."""
        start = time.perf_counter()
        try:
            self.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id),
                                           timeout=self.timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                raise
        seconds = time.perf_counter() - start
        self.tracker.gone("snapshot", snapshot_id)
        return seconds

    # -- listing -----------------------------------------------------------

    def list_snapshots(self, page_size: int) -> tuple[int, int, float]:
        """List every snapshot, following next_token.

        :returns: (snapshots listed, pages, seconds for the whole listing).
        """
        token, count, pages = "", 0, 0
        start = time.perf_counter()
        while True:
            page = self.controller.ListSnapshots(
                csi_pb2.ListSnapshotsRequest(max_entries=page_size, starting_token=token),
                timeout=self.timeout)
            pages += 1
            count += len(page.entries)
            token = page.next_token
            if not token:
                return count, pages, time.perf_counter() - start

    def settle(self, pause: float, *, limit: float = 900.0,
               report: Callable[[str], None] | None = None) -> float:
        """Wait for the driver's background work after a bulk deletion, so
        the next measurement does not pay for the previous scenario's
        cleanup.  qsnap says when its reclaimer is done (PoolStatus: no
        garbage layers, no pending intents); other drivers get ``pause``
        seconds.  Reclaiming the 10 000-snapshot population takes qsnap
        minutes, hence the generous ``limit``.

        :param report: told how much work is left, now and then.
        :returns: seconds waited.
        """
        start = time.perf_counter()
        if self.info is None or not self.info.qsnap:
            time.sleep(pause)
            return time.perf_counter() - start
        quiet = 0
        while time.perf_counter() - start < limit:
            status = self.inspect.PoolStatus(qsnap_pb2.PoolStatusRequest(), timeout=self.timeout)
            # Quiet twice in a row: the maintainer is woken by a change and
            # records an intent only once it starts a merge, so one quiet
            # look right after a deletion can come before it got going.
            quiet = quiet + 1 if status.garbage_layers == 0 and status.pending_intents == 0 else 0
            if quiet == 2:
                break
            if report is not None and not quiet:
                report(f"{status.layers} layers, {status.garbage_layers} to reclaim now")
            time.sleep(0.03)
        return time.perf_counter() - start

    # -- node --------------------------------------------------------------

    def attach(self, volume: Any) -> Attachment:
        """Make a volume usable here: ControllerPublish (when the driver
        wants it), NodeStage (when it stages), NodePublish.

        :raises grpc.RpcError: a step failed (what succeeded is undone by
            :meth:`detach` or cleanup).
        """
        info = self.info
        assert info is not None and info.node is not None, "attach needs a Node service"
        workdir = Path(tempfile.mkdtemp(prefix="qsnap-bench-node-"))
        att = Attachment(volume_id=volume.volume_id, workdir=workdir, block=self.block)
        self.tracker.attached(att)
        cap = self.capability()
        context = dict(volume.volume_context)
        if "PUBLISH_UNPUBLISH_VOLUME" in info.controller:
            reply = self.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
                volume_id=volume.volume_id, node_id=info.node_id, volume_capability=cap,
                readonly=False, volume_context=context), timeout=self.timeout)
            att.controller_published = True
            att.publish_context = dict(reply.publish_context)
        if "STAGE_UNSTAGE_VOLUME" in info.node:
            att.staging = workdir / "staging"
            att.staging.mkdir()
            self.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=volume.volume_id, publish_context=att.publish_context,
                staging_target_path=str(att.staging), volume_capability=cap,
                volume_context=context), timeout=self.timeout)
            att.staged = True
        if not self.block:
            # A filesystem target is a directory the CO makes; a block
            # target is a file the driver makes.
            att.target.mkdir()
        self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume.volume_id, publish_context=att.publish_context,
            staging_target_path=str(att.staging) if att.staging else "",
            target_path=str(att.target), volume_capability=cap, readonly=False,
            volume_context=context), timeout=self.timeout)
        att.published = True
        return att

    def detach(self, att: Attachment) -> None:
        """Undo :meth:`attach`, step by step, as far as it got."""
        if att.published:
            self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=att.volume_id, target_path=str(att.target)), timeout=self.timeout)
            att.published = False
        if att.staged and att.staging is not None:
            self.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=att.volume_id, staging_target_path=str(att.staging)),
                timeout=self.timeout)
            att.staged = False
        if att.controller_published and self.info is not None:
            self.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
                volume_id=att.volume_id, node_id=self.info.node_id), timeout=self.timeout)
            att.controller_published = False
        # Only empty directories and what the driver left as a plain file or
        # link are removed: never recurse into a path that might still be a
        # mount of the volume.
        for path in (att.target, att.staging, att.workdir):
            if path is None:
                continue
            try:
                if path.is_symlink() or path.is_file():
                    path.unlink()
                elif path.is_dir():
                    path.rmdir()
            except OSError:
                pass
        self.tracker.detached(att.volume_id)

    # -- cleanup -----------------------------------------------------------

    def cleanup(self, *, workers: int = 8,
                progress: Callable[[int, int], None] | None = None) -> CleanupReport:
        """Delete everything this run created on the driver.

        Order: detach attached volumes; resolve unfinished creates; delete
        volumes (newest first, so clones and restores go before their
        sources), then snapshots; retry what failed once, since some
        drivers refuse to delete an object others still depend on.

        :param progress: called with (done, total) as deletions finish.
        """
        report = CleanupReport()
        for att in list(self.tracker.attachments.values()):
            try:
                self.detach(att)
                report.detached += 1
            except grpc.RpcError as e:
                report.failures.append(f"detach volume {att.volume_id}: {rpc_error_text(e)}")
        self._resolve_pending(report)
        total = sum(self.tracker.counts())
        done = [0]
        lock = threading.Lock()

        def one(kind: str, object_id: str) -> str | None:
            try:
                if kind == "volume":
                    self.delete_volume(object_id)
                else:
                    self.delete_snapshot(object_id)
            except grpc.RpcError as e:
                return f"delete {kind} {object_id}: {rpc_error_text(e)}"
            with lock:
                done[0] += 1
                if kind == "volume":
                    report.deleted_volumes += 1
                else:
                    report.deleted_snapshots += 1
                if progress is not None:
                    progress(done[0], total)
            return None

        errors: list[str] = []
        for _attempt in range(2):
            volumes = list(reversed(self.tracker.volumes))
            snapshots = list(reversed(self.tracker.snapshots))
            errors = [e for e in _parallel(functools.partial(one, "volume"), volumes, workers) if e]
            errors += [e for e in _parallel(functools.partial(one, "snapshot"), snapshots, workers)
                       if e]
            if not errors:
                break
        report.failures += errors
        return report

    def _resolve_pending(self, report: CleanupReport) -> None:
        """Re-send creates whose outcome is unknown; record what they made."""
        for token, (kind, request) in list(self.tracker.pending.items()):
            call = self.controller.CreateVolume if kind == "volume" else \
                self.controller.CreateSnapshot
            try:
                reply = call(request, timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() not in DEFINITE_FAILURES:  # type: ignore[attr-defined]
                    report.failures.append(f"unfinished create of {kind} {request.name}: "
                                           f"{rpc_error_text(e)}")
                self.tracker.finish(token)
                continue
            made = reply.volume.volume_id if kind == "volume" else reply.snapshot.snapshot_id
            self.tracker.finish(token, kind, made)


def _parallel(fn: Callable[[str], str | None], items: Iterable[str], workers: int) -> list[str | None]:
    items = list(items)
    if not items:
        return []
    if workers <= 1 or len(items) == 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    uname = os.uname()
    info: dict[str, Any] = {"hostname": uname.nodename, "kernel": uname.release,
                            "machine": uname.machine, "cpus": os.cpu_count(),
                            # Other work on the machine skews latencies: say how much there was.
                            "load_average": list(os.getloadavg())}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["memory_bytes"] = int(line.split()[1]) * 1024
                    break
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info
