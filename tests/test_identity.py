"""The Identity service, the health service and the server process itself
(flags, endpoint handling, signals), against the real server."""

from __future__ import annotations

import ctypes
import os
import re
import socket
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2

from csidriver.pb import csi_pb2
from csidriver.server import parse_args, parse_endpoint

if TYPE_CHECKING:
    # Only for annotations: several test directories have a conftest.py, so
    # "conftest" is not a module name to import at run time.
    from conftest import Driver, DriverFactory

ROOT = Path(__file__).resolve().parent.parent

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion

# csi-sanity's check of a driver name (identity.go).
NAME = re.compile(r"^[a-zA-Z][A-Za-z0-9-.\_]{0,61}[a-zA-Z]$")


def _version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def _run_server(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the server expecting it to exit on its own (it cannot start)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "csidriver", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


# -- Identity ---------------------------------------------------------------------

def test_plugin_info(driver: Driver) -> None:
    info = driver.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "qsnap.csi.dev"
    assert NAME.match(info.name) and len(info.name) <= 63
    assert info.vendor_version == _version()
    assert info.manifest["node"] == "test-node"


def test_plugin_info_custom_name(driver_factory: DriverFactory) -> None:
    d = driver_factory("--drivername", "snap.example.org")
    assert d.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()).name == "snap.example.org"
    # The name also prefixes the volume context keys.
    cap = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    vol = d.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="v", volume_capabilities=[cap],
        capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 20))).volume
    assert dict(vol.volume_context) == {"snap.example.org/node": "test-node"}


def test_plugin_capabilities(driver: Driver) -> None:
    caps = driver.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in caps.capabilities if c.HasField("service")}
    expansions = {c.volume_expansion.type for c in caps.capabilities
                  if c.HasField("volume_expansion")}
    # Volumes live on one node and say so with a topology segment; group
    # snapshots are served by the GroupController (tests/test_group_controller.py).
    assert services == {Service.CONTROLLER_SERVICE, Service.GROUP_CONTROLLER_SERVICE,
                        Service.VOLUME_ACCESSIBILITY_CONSTRAINTS}
    # Served volumes grow through qemu-storage-daemon while in use.
    assert expansions == {Expansion.ONLINE}


def test_probe_ready(driver: Driver) -> None:
    for _ in range(3):   # the second and third use the cached qemu-img check
        reply = driver.identity.Probe(csi_pb2.ProbeRequest())
        assert reply.HasField("ready") and reply.ready.value is True


# -- health ---------------------------------------------------------------------

@pytest.mark.parametrize("service", ["", "csi.v1.Identity", "csi.v1.Controller",
                                     "qsnap.v1.Inspect"])
def test_health_serving(driver: Driver, service: str) -> None:
    reply = driver.health.Check(health_pb2.HealthCheckRequest(service=service))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_unknown_service(driver: Driver) -> None:
    with pytest.raises(grpc.RpcError) as e:
        driver.health.Check(health_pb2.HealthCheckRequest(service="csi.v1.NoSuchService"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# -- the process ----------------------------------------------------------------

def test_sigterm_stops_cleanly_and_removes_socket(driver: Driver) -> None:
    assert driver.socket is not None and driver.socket.is_socket()
    assert driver.stop() == 0
    assert not driver.socket.exists()
    assert "stopped" in driver.log()


def test_sigint_stops_cleanly(driver: Driver) -> None:
    assert driver.process is not None
    driver.process.send_signal(2)
    assert driver.process.wait(15) == 0


def test_sigterm_to_any_thread_stops_it(driver: Driver) -> None:
    """The kernel hands a process-directed signal to any thread that does
    not block it; CPython runs the handler in the main thread only.  Send
    SIGTERM straight to a worker thread (tgkill): the driver must still stop."""
    assert driver.process is not None
    pid = driver.process.pid
    workers = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert workers, "the driver runs gRPC and daemon threads"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, workers[-1], 15) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")
    assert driver.process.wait(15) == 0


def test_restart_keeps_state(driver: Driver) -> None:
    cap = csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    req = csi_pb2.CreateVolumeRequest(name="keep", volume_capabilities=[cap])
    before = driver.controller.CreateVolume(req).volume
    driver.restart()
    assert driver.controller.CreateVolume(req).volume == before


def test_stale_socket_is_replaced(driver_factory: DriverFactory) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="qsnap-stale-", dir="/tmp"))
    stale = workdir / "csi.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()   # the file stays, nobody listens: what a killed driver leaves
    d = driver_factory(workdir=workdir)
    assert "removed stale socket" in d.log()
    assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value


def test_socket_directory_is_created(driver_factory: DriverFactory) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="qsnap-dir-", dir="/tmp"))
    d = driver_factory(endpoint=f"unix://{workdir}/a/b/csi.sock", workdir=workdir)
    assert d.socket == workdir / "a" / "b" / "csi.sock"
    assert d.socket.is_socket()


def test_refuses_live_socket(driver: Driver, tmp_path: Path) -> None:
    # Another pool, the same socket: the running server must not be hijacked.
    done = _run_server("--endpoint", driver.endpoint, "--pool", str(tmp_path / "other"))
    assert done.returncode == 1
    assert "another server is listening" in done.stderr
    assert driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value


def test_refuses_non_socket_path(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("precious")
    done = _run_server("--endpoint", f"unix://{path}", "--pool", str(tmp_path / "pool"))
    assert done.returncode == 1
    assert "is not a socket" in done.stderr
    assert path.read_text() == "precious"


def test_refuses_pool_in_use(driver: Driver, tmp_path: Path) -> None:
    done = _run_server("--endpoint", f"unix://{tmp_path}/other.sock",
                       "--pool", str(driver.pool_root))
    assert done.returncode == 1
    assert "in use by another qsnap process" in done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--depth-cap", "1"], "depth cap must be at least 2"),
    (["--quota", "lots"], "not a size"),
    (["--quota", "0"], "quota must be positive"),
    (["--endpoint", "http://x"], "expected unix:///path or tcp://host:port"),
    (["--endpoint", "unix://relative.sock"], "must be absolute"),
    (["--drivername", "bad/name"], "is not a CSI driver name"),
    (["--drivername", "x" * 64], "is not a CSI driver name"),
    (["--nodeid", ""], "--nodeid must not be empty"),
    (["--transport", "vduse"], "invalid choice"),
])
def test_bad_flags_exit_2(tmp_path: Path, flags: list[str], message: str) -> None:
    done = _run_server("--pool", str(tmp_path / "pool"), *flags)
    assert done.returncode == 2
    assert message in done.stderr


def test_tcp_endpoint(driver_factory: DriverFactory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = driver_factory(endpoint=f"tcp://127.0.0.1:{port}")
    assert d.socket is None
    assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    assert f"on tcp://127.0.0.1:{port}" in d.log()


# -- flag parsing (in process) ----------------------------------------------------

def test_parse_endpoint() -> None:
    unix = parse_endpoint("unix:///run/qsnap/csi.sock")
    assert unix.address == "unix:///run/qsnap/csi.sock"
    assert unix.socket == Path("/run/qsnap/csi.sock")
    tcp = parse_endpoint("tcp://0.0.0.0:10000")
    assert tcp.address == "0.0.0.0:10000" and tcp.socket is None
    for bad in ("", "/run/csi.sock", "unix://csi.sock", "tcp://host", "tcp://host:port"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_parse_args_defaults_and_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CSI_ENDPOINT", raising=False)
    monkeypatch.setenv("QSNAP_POOL", "/srv/pool")
    o = parse_args([])
    assert o.endpoint == "unix:///run/qsnap/csi.sock"
    assert o.pool_root == Path("/srv/pool")
    assert o.nodeid == socket.gethostname()
    assert o.drivername == "qsnap.csi.dev"
    assert o.config.depth_cap == 16
    assert o.config.quota_bytes is None
    assert o.config.reserve_bytes == 64 << 20
    o = parse_args(["--quota", "10G", "--reserve", "1G", "--depth-cap", "8"])
    assert o.config.quota_bytes == 10 << 30
    assert o.config.reserve_bytes == 1 << 30
    assert o.config.depth_cap == 8
    monkeypatch.setenv("CSI_ENDPOINT", "unix:///tmp/from-env.sock")
    assert parse_args([]).endpoint == "unix:///tmp/from-env.sock"
    assert o.transport == "auto" and o.libvirt_uri == "qemu:///system"
    assert parse_args(["--transport", "fuse", "--libvirt-uri", "none"]).transport == "fuse"
    assert parse_args(["--libvirt-uri", "none"]).libvirt_uri == ""


@pytest.mark.skipif(Path("/sys/module/nbd").exists(), reason="this kernel has nbd")
def test_transport_nbd_without_nbd_in_the_kernel_refuses_to_start(tmp_path: Path) -> None:
    done = _run_server("--pool", str(tmp_path / "pool"), "--transport", "nbd",
                       "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 1
    assert "--transport nbd: this kernel has no nbd devices" in done.stderr


def test_cached_check_caches_success_only() -> None:
    from csidriver.identity import CachedCheck
    now = [0.0]
    calls: list[float] = []
    failing = [False]

    def check() -> None:
        calls.append(now[0])
        if failing[0]:
            raise RuntimeError("qemu-img is gone")

    cached = CachedCheck(check, ttl=10.0, clock=lambda: now[0])
    cached()
    cached()
    assert len(calls) == 1
    now[0] = 11.0
    failing[0] = True
    for _ in range(2):   # a failure is never remembered
        with pytest.raises(RuntimeError):
            cached()
    assert len(calls) == 3
    failing[0] = False
    cached()
    cached()
    assert len(calls) == 4
