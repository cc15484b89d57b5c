"""CSI Identity service: who the plugin is, what it serves, whether it is ready."""

from __future__ import annotations

import logging
import threading
import time
import tomllib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import grpc
from google.protobuf import wrappers_pb2

from csidriver.pb import csi_pb2, csi_pb2_grpc
from engine.errors import EngineError
from engine.pool import Pool

log = logging.getLogger(__name__)

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion

# What this plugin serves.  The Node service has no capability of its own:
# VOLUME_ACCESSIBILITY_CONSTRAINTS says that volumes carry the topology
# segment NodeGetInfo reports (a volume lives in one node's pool).
# GROUP_CONTROLLER_SERVICE: group snapshots (csidriver/group.py), served on
# the same endpoint; the CO's snapshotter looks for it before calling it.
SERVICES: tuple[csi_pb2.PluginCapability.Service.Type, ...] = (
    Service.CONTROLLER_SERVICE,
    Service.GROUP_CONTROLLER_SERVICE,
    Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
)
# A staged volume grows while in use: the node's qemu-storage-daemon resizes
# the open image (block_resize) and NodeExpandVolume grows the filesystem.
EXPANSION: csi_pb2.PluginCapability.VolumeExpansion.Type = Expansion.ONLINE

# How long a successful qemu-img check is trusted: Probe is called every few
# seconds by the liveness sidecar and must stay cheap.
QEMU_CHECK_TTL = 10.0


def package_version() -> str:
    """qsnap's version: from the installed distribution, else from the
    source tree's pyproject.toml (running from a checkout)."""
    try:
        return metadata.version("qsnap")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        with open(pyproject, "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


class CachedCheck:
    """Remembers a successful check for ``ttl`` seconds; failures are never
    cached, so recovery is noticed on the next call.

    :param check: raises on failure.
    """

    def __init__(self, check: Callable[[], object], ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._check = check
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._ok_until = 0.0

    def __call__(self) -> None:
        """:raises Exception: whatever the check raises."""
        with self._lock:
            if self._clock() < self._ok_until:
                return
        self._check()
        with self._lock:
            self._ok_until = self._clock() + self._ttl


class Identity(csi_pb2_grpc.IdentityServicer):
    """:param name: the driver name (``--drivername``).
    :param pool: the open pool Probe checks.
    :param nodeid: reported in the manifest, to tell nodes apart in logs.
    """

    def __init__(self, name: str, pool: Pool, nodeid: str) -> None:
        self.name = name
        self.version = package_version()
        self.pool = pool
        self.nodeid = nodeid
        self._qemu_img_runs = CachedCheck(pool.qemu_img.version, QEMU_CHECK_TTL)

    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,
                      context: grpc.ServicerContext) -> csi_pb2.GetPluginInfoResponse:
        """Never fails."""
        return csi_pb2.GetPluginInfoResponse(name=self.name, vendor_version=self.version,
                                             manifest={"node": self.nodeid})

    def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest,
                              context: grpc.ServicerContext
                              ) -> csi_pb2.GetPluginCapabilitiesResponse:
        """Never fails."""
        caps = [csi_pb2.PluginCapability(service=Service(type=t)) for t in SERVICES]
        caps.append(csi_pb2.PluginCapability(volume_expansion=Expansion(type=EXPANSION)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request: csi_pb2.ProbeRequest,
              context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        """Ready when the pool's catalog can be read and qemu-img runs.

        Never fails: a broken dependency is reported as ``ready: false``
        (and logged) so that a liveness probe restarts the driver.
        """
        try:
            with self.pool.catalog.reading() as tx:
                tx.count("volumes")
        except Exception as e:  # any failure to read means "not ready", whatever its type
            log.warning("probe: the pool catalog at %s cannot be read: %s",
                        self.pool.layout.catalog, e)
            return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=False))
        try:
            self._qemu_img_runs()
        except EngineError as e:
            log.warning("probe: qemu-img does not run: %s", e)
            return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=False))
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
