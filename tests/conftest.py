"""Shared fixtures: the real CSI server as a subprocess, reached over its
unix socket, and a qemu-io helper to put data into (and check data in)
layer files.

The server is started exactly as an operator would start it
(``python -m csidriver ...``), so the tests cover argument parsing, the
listener, signal handling and the engine together.

Each server gets its own node run directory (``--run-dir``, short, under
/tmp).  The qemu-storage-daemon a server starts there outlives the server
by design, so the fixtures take down what a server's node side left
(:func:`release_node`): mounts on its loop devices, its FUSE exports, the
loop devices and the daemon -- only those of that run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The repository root, so that ``engine`` and ``csidriver`` import without
# an installed package (and the server subprocess finds them too).
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Test modules import this file's helpers as ``from rootconf import ...``:
# under its own module name, ``conftest``, a conftest.py collected later
# (tests/engine/) replaces it in sys.modules.
sys.modules.setdefault("rootconf", sys.modules[__name__])

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# Every call gets this deadline unless it sets its own, so that a hung
# server fails one test instead of hanging the run.
CALL_TIMEOUT = 60.0


def _code_recorder() -> Any:
    """A client interceptor that adds the default deadline and records the
    status code of every unary call (the fixtures assert no UNKNOWN)."""
    import grpc

    class Details(grpc.ClientCallDetails):
        def __init__(self, base: grpc.ClientCallDetails) -> None:
            self.method = base.method
            self.timeout = CALL_TIMEOUT if base.timeout is None else base.timeout
            self.metadata = base.metadata
            self.credentials = base.credentials
            self.wait_for_ready = base.wait_for_ready
            self.compression = base.compression

    class Recorder(grpc.UnaryUnaryClientInterceptor):
        def __init__(self) -> None:
            self.codes: list[tuple[str, grpc.StatusCode]] = []

        def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                                  request: Any) -> Any:
            outcome = continuation(Details(client_call_details), request)
            self.codes.append((client_call_details.method, outcome.code()))
            return outcome

    return Recorder()


class Driver:
    """One running ``python -m csidriver`` process and stubs to talk to it.

    :param workdir: a short directory for the socket and the server's log
        (unix socket paths are limited to 107 bytes, pytest's tmp paths can
        be longer).
    :param pool_root: the pool directory the server manages.
    :param extra_args: more command-line flags (``--quota``, ``--reserve``...).
    :param endpoint: ``unix:///path`` or ``tcp://host:port``; by default
        ``csi.sock`` in ``workdir``.
    :param run_dir: the node's run directory (``--run-dir``); by default
        ``run`` in ``workdir``.
    """

    def __init__(self, workdir: Path, pool_root: Path, extra_args: list[str] | None = None,
                 nodeid: str = "test-node", endpoint: str | None = None,
                 run_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.run_dir = run_dir or workdir / "run"
        self.endpoint = endpoint or f"unix://{workdir / 'csi.sock'}"
        # The socket file (None for a TCP endpoint).
        self.socket: Path | None = (Path(self.endpoint.removeprefix("unix://"))
                                    if self.endpoint.startswith("unix://") else None)
        self.pool_root = pool_root
        self.nodeid = nodeid
        self.extra_args = list(extra_args or [])
        self.log_path = workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.calls: list[tuple[str, Any]] = []   # (method, status code) of every call
        self._raw_channel: Any = None
        self.channel: Any = None
        self.identity: Any = None
        self.controller: Any = None
        self.inspect: Any = None
        self.health: Any = None
        self.node: Any = None

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "csidriver", "--endpoint", self.endpoint,
                "--pool", str(self.pool_root), "--nodeid", self.nodeid,
                "--run-dir", str(self.run_dir), "--log-level", "debug", *self.extra_args]

    def start(self) -> None:
        """Start the server and wait until Probe says it is ready.

        :raises RuntimeError: the server exited or did not get ready in time
            (the message carries the server's log).
        """
        import grpc
        from grpc_health.v1 import health_pb2_grpc

        from csidriver.pb import csi_pb2, csi_pb2_grpc, qsnap_pb2_grpc

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        env.pop("CSI_ENDPOINT", None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        recorder = _code_recorder()
        recorder.codes = self.calls   # shared across restarts
        # CSI's tcp:// prefix is for the server; gRPC clients dial host:port.
        target = self.endpoint.removeprefix("tcp://")
        self._raw_channel = grpc.insecure_channel(target)
        self.channel = grpc.intercept_channel(self._raw_channel, recorder)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.inspect = qsnap_pb2_grpc.InspectStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                reply = self.identity.Probe(csi_pb2.ProbeRequest(), timeout=2)
                if reply.ready.value:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not get ready in {START_TIMEOUT}s:\n{self.log()}")

    def stop(self) -> int | None:
        """SIGTERM the server and wait for it (SIGKILL after a timeout).

        :returns: the exit status, or None if it was not running.
        """
        if self._raw_channel is not None:
            self._raw_channel.close()
            self._raw_channel = None
            self.channel = None
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # Leave the stuck threads' stacks in the log, then kill.
                process.send_signal(signal.SIGUSR1)
                time.sleep(0.5)
                process.kill()
                process.wait()
                sys.stderr.write(f"server did not stop in {STOP_TIMEOUT:.0f}s; its log ends:\n"
                                 + self.log_path.read_text(errors="replace")[-6000:])
        return process.returncode

    def kill(self) -> None:
        """SIGKILL the server (no shutdown at all) and wait for it to go."""
        if self._raw_channel is not None:
            self._raw_channel.close()
            self._raw_channel = None
            self.channel = None
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self, extra_args: list[str] | None = None) -> None:
        """Stop the server and start it again on the same pool and socket;
        ``extra_args`` replaces the extra flags when given."""
        self.stop()
        if extra_args is not None:
            self.extra_args = list(extra_args)
        self.start()

    def unknown_calls(self) -> list[str]:
        """Methods that answered UNKNOWN: the driver must never do that."""
        import grpc
        return [method for method, code in self.calls if code == grpc.StatusCode.UNKNOWN]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


# -- what a server's node side leaves behind ----------------------------------

def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60,
                          stdin=subprocess.DEVNULL)


def loops_under(root: Path) -> dict[str, str]:
    """Loop devices whose backing file is (or was) under ``root``:
    ``{"/dev/loop3": "/run/.../exports/v-..."}``."""
    done = _run("losetup", "--json", "--list", "--output", "NAME,BACK-FILE")
    if not done.stdout.strip():
        return {}
    prefix = os.path.realpath(root) + "/"
    found = {}
    for row in json.loads(done.stdout)["loopdevices"]:
        back = (row.get("back-file") or "").removesuffix(" (deleted)")
        if back.startswith(prefix):
            found[row["name"]] = back
    return found


def mountinfo() -> list[dict[str, str]]:
    """``/proc/self/mountinfo`` as dicts (point, root, source, fstype, majmin)."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            sep = fields.index("-", 6)
            entries.append({"point": re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)),
                                            fields[4]),
                            "root": fields[3], "majmin": fields[2],
                            "fstype": fields[sep + 1], "source": fields[sep + 2]})
    return entries


def mounts_of(run_dir: Path) -> list[str]:
    """Mount points that belong to a node run directory: its FUSE exports,
    and every mount of one of its loop devices (staged filesystems and
    their binds, and binds of the device nodes)."""
    loops = loops_under(run_dir)
    numbers = set()
    for name in loops:
        with contextlib.suppress(OSError):
            rdev = os.stat(name).st_rdev
            numbers.add(f"{os.major(rdev)}:{os.minor(rdev)}")
    names = {"/" + os.path.basename(n) for n in loops}
    prefix = os.path.realpath(run_dir) + "/"
    return [m["point"] for m in mountinfo()
            if m["point"].startswith(prefix) or m["majmin"] in numbers
            or (m["fstype"] == "devtmpfs" and m["root"] in names)]


def daemons_of(run_dir: Path) -> list[int]:
    """PIDs of qemu-storage-daemon processes working in ``run_dir``."""
    want = os.path.realpath(run_dir)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-storage-daemon") \
                and any(want.encode() in arg for arg in argv):
            pids.append(int(entry.name))
    return pids


def unmount_under(root: Path) -> list[str]:
    """Lazily unmount everything mounted at or below ``root`` (deepest
    first) and return the mount points: a test's staging and target paths,
    before its directory is removed."""
    prefix = os.path.realpath(root)
    points = [m["point"] for m in mountinfo()
              if m["point"] == prefix or m["point"].startswith(prefix + "/")]
    for point in reversed(points):
        _run("umount", "--lazy", "--no-canonicalize", point)
    return points


def release_node(run_dir: Path) -> list[str]:
    """Take down what a node side left in ``run_dir`` and return what was
    found, in an order that finds everything: the mounts of its loop
    devices (lazily: the filesystem may be busy or its device dead), then
    the loop devices -- while the FUSE exports they are bound to are still
    mounted, since a loop on a detached file shows "/" and is found by
    nobody -- then the qemu-storage-daemon, then its FUSE exports.
    Touches nothing of other run directories."""
    found: list[str] = []
    exports_prefix = os.path.realpath(run_dir) + "/"
    for point in reversed(mounts_of(run_dir)):
        if not point.startswith(exports_prefix):
            found.append(f"mount {point}")
            _run("umount", "--lazy", "--no-canonicalize", point)
    for name in loops_under(run_dir):
        # Detached at once, or (still open by a lazily unmounted filesystem)
        # marked to detach itself on its last close.
        found.append(f"loop {name}")
        _run("losetup", "--detach", name)
    for pid in daemons_of(run_dir):
        found.append(f"qemu-storage-daemon {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    for point in reversed(mounts_of(run_dir)):
        found.append(f"mount {point}")
        _run("umount", "--lazy", "--no-canonicalize", point)
    return found


# -- Node service calls, shared by tests/node and tests/sanity ----------------

def mount_cap(fs_type: str = "", flags: tuple[str, ...] = (), mode: int = 1) -> Any:
    """A mount VolumeCapability (mode 1: SINGLE_NODE_WRITER)."""
    from csidriver.pb import csi_pb2
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def block_cap(mode: int = 1) -> Any:
    """A block VolumeCapability (mode 1: SINGLE_NODE_WRITER)."""
    from csidriver.pb import csi_pb2
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def create_volume(d: Driver, name: str, size: int, cap: Any, source: Any = None) -> str:
    """CreateVolume; ``source`` is a VolumeContentSource.  Returns the ID."""
    from csidriver.pb import csi_pb2
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=size))
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return d.controller.CreateVolume(req).volume.volume_id


def stage(d: Driver, volume_id: str, staging: Path, cap: Any) -> None:
    from csidriver.pb import csi_pb2
    d.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), volume_capability=cap))


def unstage(d: Driver, volume_id: str, staging: Path) -> None:
    from csidriver.pb import csi_pb2
    d.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging)))


def publish(d: Driver, volume_id: str, staging: Path, target: Path, cap: Any,
            readonly: bool = False) -> None:
    from csidriver.pb import csi_pb2
    d.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
        volume_capability=cap, readonly=readonly))


def unpublish(d: Driver, volume_id: str, target: Path) -> None:
    from csidriver.pb import csi_pb2
    d.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume_id, target_path=str(target)))


def run(driver: Driver, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``qsnap --endpoint <driver> ARGV``: (exit status, stdout, stderr)."""
    from csidriver import cli
    code = cli.main(["--endpoint", driver.endpoint, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(driver: Driver, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """``qsnap --endpoint <driver> --json ARGV``, which must succeed: its output."""
    code, out, err = run(driver, capsys, "--json", *argv)
    assert code == 0, err
    return json.loads(out)


def code_of(call: Callable[..., Any], *args: Any) -> Any:
    """The gRPC status code ``call(*args)`` ends with (OK when it succeeds)."""
    import grpc
    try:
        call(*args)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def file_content(index: int, size: int = 16 * 1024) -> bytes:
    """What :class:`Writer` puts in its ``index``-th file."""
    return (f"{index:08d}".encode() * (size // 8 + 1))[:size]


class Writer(threading.Thread):
    """A workload: writes ``f00000001``, ``f00000002``... into ``directory``,
    each file fsynced and then the directory, until :meth:`finish`.
    ``done`` counts the files that were durable when it was last read; a
    write error ends the thread and is kept in ``error``."""

    def __init__(self, directory: Path, size: int = 16 * 1024) -> None:
        super().__init__(name=f"writer-{directory.name}", daemon=True)
        self.directory = directory
        self.size = size
        self.done = 0
        self.error: OSError | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                while not self._halt.is_set():
                    index = self.done + 1
                    fd = os.open(self.directory / f"f{index:08d}",
                                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    try:
                        os.write(fd, file_content(index, self.size))
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.fsync(dir_fd)
                    self.done = index
            finally:
                os.close(dir_fd)
        except OSError as e:
            self.error = e

    def wait_for(self, files: int, timeout: float = 60.0) -> None:
        """Block until at least ``files`` files are durable.

        :raises AssertionError: the writer failed or is too slow.
        """
        deadline = time.monotonic() + timeout
        while self.done < files:
            assert self.error is None, f"the writer failed: {self.error}"
            assert time.monotonic() < deadline, f"only {self.done} files in {timeout}s"
            time.sleep(0.01)

    def finish(self) -> int:
        """Stop writing; returns the number of durable files."""
        self._halt.set()
        self.join(60)
        assert not self.is_alive(), "the writer hangs"
        return self.done


def check_files(directory: Path, count: int, size: int = 16 * 1024) -> None:
    """The first ``count`` files of a :class:`Writer` are there, whole."""
    for index in range(1, count + 1):
        path = directory / f"f{index:08d}"
        assert path.read_bytes() == file_content(index, size), f"{path} differs"


DriverFactory = Callable[..., Driver]


@pytest.fixture
def node_paths() -> Iterator[Path]:
    """A short directory for a test's staging and target paths.  Removed
    at the end, after whatever a failed test left mounted in it has been
    unmounted (this runs before the server fixtures' teardown)."""
    root = Path(tempfile.mkdtemp(prefix="qn-", dir="/tmp"))
    yield root
    unmount_under(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def driver_factory(tmp_path: Path) -> Iterator[DriverFactory]:
    """Start servers with extra flags: ``driver_factory("--quota", "1G")``.

    Each call gets its own pool and socket unless ``pool_root``,
    ``workdir`` or ``endpoint`` say otherwise; ``start=False`` returns the
    server unstarted.  All are stopped at teardown.
    """
    started: list[Driver] = []
    workdirs: list[Path] = []

    def make(*extra_args: str, pool_root: Path | None = None, workdir: Path | None = None,
             endpoint: str | None = None, start: bool = True) -> Driver:
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="qsnap-csi-", dir="/tmp"))
        workdirs.append(workdir)
        pool = pool_root or tmp_path / f"pool{len(started)}"
        d = Driver(workdir, pool, list(extra_args), endpoint=endpoint)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    failed_logs = []
    for d in started:
        code = d.stop()
        if code not in (0, None):
            failed_logs.append(f"server exited with {code}:\n{d.log()}")
        if d.unknown_calls():
            failed_logs.append(f"calls answered UNKNOWN: {d.unknown_calls()}\n{d.log()}")
    for d in started:
        release_node(d.run_dir)
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)
    # A server that does not stop cleanly on SIGTERM is a bug worth failing on.
    assert not failed_logs, "\n".join(failed_logs)


@pytest.fixture
def driver(driver_factory: DriverFactory) -> Driver:
    """A fresh server on an empty pool, for one test."""
    return driver_factory()


@pytest.fixture(scope="module")
def module_driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    """One server shared by a module's tests (they must not assume an empty pool)."""
    workdir = Path(tempfile.mkdtemp(prefix="qsnap-csi-", dir="/tmp"))
    d = Driver(workdir, tmp_path_factory.mktemp("pool") / "pool")
    d.start()
    yield d
    code = d.stop()
    release_node(d.run_dir)
    shutil.rmtree(workdir, ignore_errors=True)
    assert code == 0, f"server exited with {code}:\n{d.log()}"
    assert not d.unknown_calls(), f"calls answered UNKNOWN: {d.unknown_calls()}"


QemuIo = Callable[[str | Path, str], str]


@pytest.fixture
def qemu_io() -> QemuIo:
    """``qemu_io(path, "write -P 0xaa 0 1M")``: run one qemu-io command on a
    qcow2 file, assert it succeeded, return its output."""
    binary = shutil.which("qemu-io")
    if binary is None:
        pytest.skip("qemu-io is not installed (Debian package qemu-utils)")

    def run(path: str | Path, command: str) -> str:
        done = subprocess.run([binary, "-f", "qcow2", "-c", command, str(path)],
                              capture_output=True, text=True, timeout=120, check=False)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"qemu-io -c {command!r} {path} failed:\n{output}"
        # Older qemu-io exits 0 even when a pattern does not match.
        assert "verification failed" not in output, f"qemu-io -c {command!r} {path}:\n{output}"
        return output

    return run
