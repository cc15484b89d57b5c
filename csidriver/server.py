"""The driver process: opens the pool, starts its maintainer and the node
side (re-serving staged volumes), and serves CSI Identity, Controller and
Node, qsnap's Inspect and VirtualMachines and the standard gRPC health
service on one endpoint until SIGTERM or SIGINT.

``python -m csidriver --help`` (or ``qsnap serve --help``) lists the flags.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import re
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from csidriver.controller import Controller
from csidriver.errors import ErrorInterceptor, wrap_handler
from csidriver.group import GroupController
from csidriver.identity import Identity
from csidriver.inspect import Inspect
from csidriver.metrics import Metrics
from csidriver.node import NodeService
from csidriver.pb import csi_pb2, csi_pb2_grpc, qsnap_pb2, qsnap_pb2_grpc
from csidriver.units import parse_size
from csidriver.vms import VirtualMachinesService
from engine.domains import DomainOwner
from engine.devices import detect_transports
from engine.errors import EngineError, FailedPrecondition, InvalidArgument
from engine.freeze import Freezer
from engine.guests import GuestQuiescer
from engine.layout import default_root
from engine.locks import KeyedLock
from engine.model import Owner
from engine.node import Node
from engine.pool import Pool, PoolConfig
from engine.reclaim import Maintainer, MaintenanceStats
from engine.virt import DEFAULT_URI, Hypervisor
from engine.vm import VirtualMachines

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "unix:///run/qsnap/csi.sock"
DEFAULT_DRIVERNAME = "qsnap.csi.dev"
# The QSD's socket and FUSE exports: must outlive a plugin restart (the QSD
# keeps serving) but not a reboot, hence under /run.
DEFAULT_RUN_DIR = Path("/run/qsnap/node")
# The CSI spec's driver names: at most 63 characters, alphanumerics with
# dashes and dots between, alphanumeric at both ends.
DRIVERNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$")
WORKERS = 16
# In-flight RPCs get this long to finish on SIGTERM; the CO retries the rest.
GRACE_SECONDS = 10.0
# Request fields that identify what an RPC works on.  None of them is ever a
# secret; request bodies as a whole are never logged (secrets, mount flags).
LOGGED_FIELDS: tuple[str, ...] = ("volume_id", "snapshot_id", "source_volume_id",
                                  "group_snapshot_id", "domain", "name")
# Under --run-dir: the guests being frozen, for a restarted driver to thaw.
FREEZE_STATE_FILE = "frozen-guests.json"

# Polled every few seconds by sidecars: logged at DEBUG to keep the log useful.
QUIET_RPCS: frozenset[str] = frozenset({"Probe", "Check", "Watch", "GetPluginInfo",
                                        "GetPluginCapabilities", "ControllerGetCapabilities"})


@dataclass(frozen=True)
class Options:
    endpoint: str
    pool_root: Path
    nodeid: str
    drivername: str
    config: PoolConfig
    log_level: str
    metrics_address: str = "0.0.0.0"
    metrics_port: int | None = None
    run_dir: Path = DEFAULT_RUN_DIR
    max_volumes: int = 0
    libvirt_uri: str = DEFAULT_URI     # "" : no libvirt (no guest freeze, no domain owner)
    transport: str = "auto"            # how the node exposes volumes: auto, nbd or fuse


@dataclass(frozen=True)
class Endpoint:
    """Where to listen: ``address`` in gRPC's syntax, and the unix socket's
    path (None for TCP)."""

    address: str
    socket: Path | None


def parse_endpoint(text: str) -> Endpoint:
    """``unix:///abs/path.sock`` or ``tcp://host:port``.

    :raises ValueError: any other form.
    """
    if text.startswith("unix://"):
        path = text[len("unix://"):]
        if not path.startswith("/"):
            raise ValueError(f"endpoint {text!r}: a unix socket path must be absolute "
                             "(unix:///run/qsnap/csi.sock)")
        return Endpoint(f"unix://{path}", Path(path))
    if text.startswith("tcp://"):
        hostport = text[len("tcp://"):]
        host, sep, port = hostport.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"endpoint {text!r}: expected tcp://host:port")
        return Endpoint(f"{host or '[::]'}:{port}", None)
    raise ValueError(f"endpoint {text!r}: expected unix:///path or tcp://host:port")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qsnap serve",
                                description="Serve qsnap's CSI driver on one endpoint.")
    p.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT") or DEFAULT_ENDPOINT,
                   help="unix:///path/csi.sock or tcp://host:port "
                        "(default: $CSI_ENDPOINT, else %(default)s)")
    p.add_argument("--pool", type=Path, default=None,
                   help="pool directory (default: $QSNAP_POOL, /var/lib/qsnap for root, "
                        "else ~/.local/state/qsnap)")
    p.add_argument("--nodeid", default=socket.gethostname(),
                   help="this node's ID (default: the host name, %(default)s)")
    p.add_argument("--drivername", default=DEFAULT_DRIVERNAME,
                   help="CSI driver name (default: %(default)s)")
    p.add_argument("--depth-cap", type=int, default=16,
                   help="longest backing chain before background flattening (default: 16)")
    p.add_argument("--quota", type=_size, default=None,
                   help="cap on the sum of volume sizes, e.g. 500G (default: none)")
    p.add_argument("--reserve", type=_size, default=64 << 20,
                   help="free space the pool's filesystem keeps, e.g. 1G (default: 64M)")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                   help="the node's run directory: qemu-storage-daemon socket, pid file and "
                        "FUSE exports; keep it across plugin restarts (default: %(default)s)")
    p.add_argument("--max-volumes", type=int, default=0,
                   help="volumes this node may have staged, reported to the CO by NodeGetInfo "
                        "(default: 0, no limit)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port at /metrics (default: off)")
    p.add_argument("--metrics-address", default="0.0.0.0",
                   help="address the metrics endpoint listens on (default: %(default)s)")
    p.add_argument("--libvirt-uri", default=os.environ.get("QSNAP_LIBVIRT_URI", DEFAULT_URI),
                   help="libvirt to ask which guests use a volume (frozen around cuts through "
                        "their agents) and to switch disks domains opened directly; 'none' "
                        "turns it off (default: %(default)s)")
    p.add_argument("--transport", default="auto", choices=["auto", "nbd", "fuse"],
                   help="how the node exposes a served volume as a block device: nbd "
                        "(kernel nbd + nbd-client), fuse (FUSE export + loop device), or auto: "
                        "nbd where the kernel has it, else fuse (default: %(default)s)")
    p.add_argument("--log-level", default="info", type=str.lower,
                   choices=["debug", "info", "warning", "error"])
    return p


def parse_args(argv: list[str] | None) -> Options:
    """Parse flags; exits with status 2 and a message on bad ones."""
    p = _parser()
    args = p.parse_args(argv)
    try:
        parse_endpoint(args.endpoint)
        config = PoolConfig(depth_cap=args.depth_cap, quota_bytes=args.quota,
                            reserve_bytes=args.reserve)
    except (ValueError, InvalidArgument) as e:
        p.error(str(e))
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        p.error("--metrics-port must be between 0 and 65535")
    if not args.nodeid:
        p.error("--nodeid must not be empty")
    if args.max_volumes < 0:
        p.error("--max-volumes must not be negative")
    if not args.run_dir.is_absolute():
        p.error("--run-dir must be an absolute path")
    if not DRIVERNAME.match(args.drivername):
        p.error(f"--drivername {args.drivername!r} is not a CSI driver name (at most 63 "
                "characters: letters, digits, '-' and '.', a letter or digit at both ends)")
    return Options(endpoint=args.endpoint, pool_root=args.pool or default_root(),
                   nodeid=args.nodeid, drivername=args.drivername, config=config,
                   log_level=args.log_level, metrics_address=args.metrics_address,
                   metrics_port=args.metrics_port, run_dir=args.run_dir,
                   max_volumes=args.max_volumes,
                   libvirt_uri="" if args.libvirt_uri.lower() in ("", "none") else args.libvirt_uri,
                   transport=args.transport)


# -- logging interceptor -----------------------------------------------------

def _subject(request: Any) -> str:
    fields = getattr(request, "DESCRIPTOR", None)
    if fields is None:
        return ""
    parts = []
    for name in LOGGED_FIELDS:
        if name in fields.fields_by_name:
            value = getattr(request, name)
            if value:
                shown = value if value.isprintable() and len(value) <= 160 else repr(value[:160])
                parts.append(f"{name}={shown}")
    return " ".join(parts)


RpcObserver = Callable[[str, str, float], None]


class LoggingInterceptor(grpc.ServerInterceptor):
    """One log line per RPC: method, the IDs or name it works on, the status
    code and the duration in milliseconds; and the same facts to
    ``observer(method, code, seconds)`` (the metrics) when one is given."""

    def __init__(self, observer: RpcObserver | None = None) -> None:
        self._observer = observer

    def _log(self, rpc: str, request: Any, context: grpc.ServicerContext, start: float,
             failed: bool) -> None:
        code = context.code()  # type: ignore[attr-defined]
        if code is None:
            code = grpc.StatusCode.INTERNAL if failed else grpc.StatusCode.OK
        seconds = time.monotonic() - start
        ms = seconds * 1000
        if self._observer is not None:
            self._observer(rpc.rsplit("/", 1)[-1], code.name, seconds)
        level = logging.DEBUG if rpc.rsplit("/", 1)[-1] in QUIET_RPCS else logging.INFO
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            level = logging.ERROR
        subject = _subject(request)
        log.log(level, "rpc %s%s code=%s ms=%.1f", rpc, f" {subject}" if subject else "",
                code.name, ms)

    def _unary(self, behavior: Callable[[Any, grpc.ServicerContext], Any],
               rpc: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        def logged(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            failed = True
            try:
                response = behavior(request, context)
                failed = False
                return response
            finally:
                self._log(rpc, request, context, start, failed)
        return logged

    def _stream(self, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
                rpc: str) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def logged(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.monotonic()
            failed = True
            try:
                yield from behavior(request, context)
                failed = False
            finally:
                self._log(rpc, request, context, start, failed)
        return logged

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                       grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails
                          ) -> grpc.RpcMethodHandler | None:
        rpc = handler_call_details.method.lstrip("/")
        return wrap_handler(continuation(handler_call_details), rpc, self._unary, self._stream)


# -- the unix socket -----------------------------------------------------------

def prepare_socket(path: Path) -> None:
    """Create the socket's directory and remove a stale socket file.

    :raises RuntimeError: the path is not a socket, or a live server
        listens on it (replacing either would break someone else).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise RuntimeError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)
        log.info("removed stale socket %s", path)
        return
    except FileNotFoundError:
        return
    finally:
        probe.close()
    raise RuntimeError(f"another server is listening on {path}")


# -- the server ----------------------------------------------------------------

Registration = tuple[Callable[[Any, grpc.Server], None], Any]


def services(pool: Pool, node: Node, options: Options, stats: MaintenanceStats,
             vms: VirtualMachines | None = None) -> list[Registration]:
    """Every servicer this process serves, with the function that registers it.
    ``vms``: the VM operations, None without libvirt (the service then
    answers FAILED_PRECONDITION)."""
    # One set of in-flight keys for both: a group cut and a single cut (or
    # a deletion) of the same volume answer each other ABORTED.
    ops = KeyedLock()
    return [
        (csi_pb2_grpc.add_IdentityServicer_to_server,
         Identity(options.drivername, pool, options.nodeid)),
        (csi_pb2_grpc.add_ControllerServicer_to_server,
         Controller(pool, options.drivername, options.nodeid, ops=ops)),
        (csi_pb2_grpc.add_GroupControllerServicer_to_server, GroupController(pool, ops=ops)),
        (csi_pb2_grpc.add_NodeServicer_to_server,
         NodeService(node, pool, options.nodeid, max_volumes=options.max_volumes)),
        (qsnap_pb2_grpc.add_InspectServicer_to_server, Inspect(pool, stats)),
        (qsnap_pb2_grpc.add_VirtualMachinesServicer_to_server, VirtualMachinesService(vms)),
    ]


# Service names the health service reports on, besides the overall "".
HEALTH_SERVICES: tuple[str, ...] = (
    csi_pb2.DESCRIPTOR.services_by_name["Identity"].full_name,
    csi_pb2.DESCRIPTOR.services_by_name["Controller"].full_name,
    csi_pb2.DESCRIPTOR.services_by_name["GroupController"].full_name,
    csi_pb2.DESCRIPTOR.services_by_name["Node"].full_name,
    qsnap_pb2.DESCRIPTOR.services_by_name["Inspect"].full_name,
    qsnap_pb2.DESCRIPTOR.services_by_name["VirtualMachines"].full_name,
)


class DriverServer:
    """The pool, its maintainer, the node side and the gRPC server, started
    and stopped together."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.endpoint = parse_endpoint(options.endpoint)
        self.pool: Pool | None = None
        self.maintainer: Maintainer | None = None
        self.node: Node | None = None
        self.hypervisor: Hypervisor | None = None
        self.vms: VirtualMachines | None = None
        self.metrics: Metrics | None = None
        self.server: grpc.Server | None = None
        self.health = health.HealthServicer()
        self._socket_inode: int | None = None

    def start(self) -> None:
        """Open the pool, re-serve the staged volumes and start serving.

        :raises EngineError: the pool cannot be opened (Busy: another driver
            has it), or the node's run directory cannot be used.
        :raises RuntimeError: the endpoint cannot be used.
        :raises OSError: the socket's directory cannot be made.
        """
        o = self.options
        self.pool = Pool.open(o.pool_root, config=o.config)
        log.info("pool %s open (depth cap %d, quota %s, reserve %d bytes)", self.pool.layout.root,
                 o.config.depth_cap, o.config.quota_bytes or "none", o.config.reserve_bytes)
        self.maintainer = Maintainer(self.pool)
        self.maintainer.start()
        # Work left from before a restart (deletions whose layers were not
        # reclaimed yet) is picked up now rather than at the first interval.
        self.maintainer.wake()
        # Attached to the pool now (cuts of served volumes go through it),
        # started once the endpoint is ours: a driver that cannot listen
        # must not have started a qemu-storage-daemon.
        self.node = Node(self.pool, o.run_dir, transports=_transports(o.transport))
        if o.libvirt_uri:
            self._attach_libvirt(o.libvirt_uri, o.run_dir / FREEZE_STATE_FILE)
            assert self.hypervisor is not None
            self.vms = VirtualMachines(self.pool, self.hypervisor, self.node)
            try:
                self.vms.recover()   # VM snapshots a dead driver left Progressing
            except EngineError as e:
                log.error("VM snapshots left in progress could not be settled: %s", e)
        observer: RpcObserver | None = None
        if o.metrics_port is not None:
            self.metrics = Metrics(self.pool, self.maintainer.stats)
            self.metrics.serve(o.metrics_address, o.metrics_port)
            observer = self.metrics.observe_rpc
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="csi"),
            interceptors=[LoggingInterceptor(observer), ErrorInterceptor()],
            # Two drivers on one TCP port must fail, not share the traffic.
            options=[("grpc.so_reuseport", 0)])
        self.server = server
        for register, servicer in services(self.pool, self.node, o, self.maintainer.stats,
                                           self.vms):
            register(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.endpoint.socket is not None:
            prepare_socket(self.endpoint.socket)
        try:
            port = server.add_insecure_port(self.endpoint.address)
        except RuntimeError as e:
            raise RuntimeError(f"cannot listen on {o.endpoint}: {e}") from e
        if port == 0:
            raise RuntimeError(f"cannot listen on {o.endpoint}")
        try:
            self.node.start()
        except EngineError as e:
            # Each volume that could not be re-served is logged by the node;
            # the others are served, and NodeStageVolume repairs the rest.
            # Refusing to start would take every volume's service down for
            # one broken volume.
            log.error("node %s: not every staged volume could be re-served: %s", o.nodeid, e)
        server.start()
        if self.endpoint.socket is not None:
            self._socket_inode = self.endpoint.socket.stat().st_ino
        for name in ("", *HEALTH_SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s as %s on %s (node %s)", ", ".join(HEALTH_SERVICES), o.drivername,
                 o.endpoint, o.nodeid)

    def stop(self) -> None:
        """Stop serving, then the maintainer and the node's supervisor, then
        close the pool.  Safe to call after a failed :meth:`start`.  The
        qemu-storage-daemon keeps running: staged volumes stay usable while
        the plugin restarts, and the next start adopts it."""
        self.health.enter_graceful_shutdown()
        if self.server is not None:
            self.server.stop(GRACE_SECONDS).wait()
            self.server = None
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.maintainer is not None:
            self.maintainer.stop()
            self.maintainer = None
        if self.node is not None:
            self.node.stop()
            # Hang up QMP (its event loop must end before the interpreter
            # does); the daemon keeps serving and the next start attaches.
            self.node.qsd.close()
            self.node = None
        self.vms = None
        if self.hypervisor is not None:
            self.hypervisor.close()
            self.hypervisor = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self._remove_socket()
        log.info("stopped")

    def _attach_libvirt(self, uri: str, state_file: Path) -> None:
        """Route cuts of domain-opened volumes through libvirt and freeze
        guests around every cut; first thaw any guest a previous driver
        left frozen.  libvirt need not run now: it is asked at each cut."""
        assert self.pool is not None
        self.hypervisor = Hypervisor(uri)
        self.pool.attach_owner(Owner.DOMAIN, DomainOwner(self.hypervisor, self.pool.layout))
        quiescer = GuestQuiescer(Freezer(self.hypervisor), state_file)
        self.pool.attach_quiescer(quiescer)
        try:
            quiescer.recover()
        except EngineError as e:
            log.error("guests a previous driver froze could not all be thawed: %s", e)
        log.info("libvirt at %s: guests are frozen around cuts through their agents", uri)

    def _remove_socket(self) -> None:
        path = self.endpoint.socket
        if path is None or self._socket_inode is None:
            return
        try:
            # Only our own socket: a successor may already have replaced it.
            if path.lstat().st_ino == self._socket_inode:
                path.unlink()
        except FileNotFoundError:
            pass
        self._socket_inode = None


def _transports(choice: str) -> list[str] | None:
    """The transports the node may use for ``--transport``.

    :raises FailedPrecondition: nbd was asked for and the kernel has none.
    """
    if choice == "auto":
        return None
    if choice == "nbd" and "nbd" not in detect_transports():
        raise FailedPrecondition("--transport nbd: this kernel has no nbd devices "
                                 "(modprobe nbd, or use --transport auto)")
    return [choice]


def main(argv: list[str] | None = None) -> int:
    """Run the driver until SIGTERM or SIGINT.

    :returns: 0 after a clean shutdown, 1 when the driver cannot start
        (bad flags exit with 2 from argparse).
    """
    options = parse_args(argv)
    logging.basicConfig(level=options.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    # SIGUSR1 dumps every thread's stack to the log: how to see where a
    # driver that does not stop (or answer) is stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: stop.set())
    driver = DriverServer(options)
    try:
        driver.start()
    except (EngineError, RuntimeError, OSError) as e:
        log.error("cannot start: %s", e)
        driver.stop()
        return 1
    # Wait in slices: CPython runs a Python signal handler only in the main
    # thread, and a signal the kernel delivers to another thread (gRPC's,
    # the daemon adapter's) does not wake a main thread blocked in an
    # untimed lock wait, so an untimed wait could sleep through SIGTERM.
    while not stop.wait(0.5):
        pass
    log.info("signal received, shutting down")
    driver.stop()
    return 0
