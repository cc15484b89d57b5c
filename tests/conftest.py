"""Shared fixtures: the real CSI server as a subprocess, reached over its
unix socket, and a qemu-io helper to put data into (and check data in)
layer files.

The server is started exactly as an operator would start it
(``python -m csidriver ...``), so the tests cover argument parsing, the
listener, signal handling and the engine together.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
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

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
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
    """

    def __init__(self, workdir: Path, pool_root: Path, extra_args: list[str] | None = None,
                 nodeid: str = "test-node", endpoint: str | None = None) -> None:
        self.workdir = workdir
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

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "csidriver", "--endpoint", self.endpoint,
                "--pool", str(self.pool_root), "--nodeid", self.nodeid,
                "--log-level", "debug", *self.extra_args]

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
                process.kill()
                process.wait()
        return process.returncode

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


DriverFactory = Callable[..., Driver]


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
