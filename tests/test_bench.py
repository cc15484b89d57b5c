"""``qsnap bench`` against real drivers on small sizes.

The target is the real qsnap driver (the ``driver`` fixture), reached through
its Node service when it has one and through qsnap's qemu-io hook otherwise
(and always in the baseline test).  A Node service of another driver, the
command hooks and ``--baseline`` are exercised against :class:`CopyDriver`,
a small copying driver in the style of the reference hostpath driver (a
volume is a file, a snapshot a copy), served in this process.

Every test ends by checking, through the drivers themselves, that nothing
the benchmark created is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from csidriver import bench
from csidriver.pb import csi_pb2, csi_pb2_grpc, qsnap_pb2

if TYPE_CHECKING:
    from conftest import Driver

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
RPC = csi_pb2.ControllerServiceCapability.RPC
NodeRPC = csi_pb2.NodeServiceCapability.RPC

# Small everything: the tests check the tool's behaviour, not the figures.
SMALL = ["--sizes", "16M", "--iterations", "2", "--depth", "5", "--depth-repeats", "2",
         "--volume-size", "16M", "--list", "10,50", "--list-repeats", "2",
         "--concurrency", "1,4", "--per-caller", "3", "--settle", "0", "--no-progress"]


# -- a copying driver --------------------------------------------------------------

class CopyDriver(csi_pb2_grpc.IdentityServicer, csi_pb2_grpc.ControllerServicer,
                 csi_pb2_grpc.NodeServicer):
    """Volumes are sparse files, snapshots and clones full copies; NodePublish
    of a block volume is a symlink to its file.  Idempotent by name, as CSI
    asks, so the benchmark's cleanup of interrupted creates works on it."""

    def __init__(self, root: Path, *, node: bool) -> None:
        self.root = root
        self.node = node
        self.lock = threading.Lock()
        self.volumes: dict[str, tuple[str, int]] = {}       # id -> (name, size)
        self.snapshots: dict[str, tuple[str, str, int]] = {}  # id -> (name, source, size)
        self.order: list[str] = []                          # snapshot ids, creation order
        (root / "data").mkdir(parents=True)

    def path(self, object_id: str) -> Path:
        return self.root / "data" / object_id

    # Identity
    def GetPluginInfo(self, request: Any, context: Any) -> Any:
        return csi_pb2.GetPluginInfoResponse(name="copy.test.csi", vendor_version="1")

    def GetPluginCapabilities(self, request: Any, context: Any) -> Any:
        return csi_pb2.GetPluginCapabilitiesResponse()

    def Probe(self, request: Any, context: Any) -> Any:
        return csi_pb2.ProbeResponse()

    # Controller
    def ControllerGetCapabilities(self, request: Any, context: Any) -> Any:
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=RPC(type=t)) for t in
            (RPC.CREATE_DELETE_VOLUME, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS,
             RPC.CLONE_VOLUME)])

    def CreateVolume(self, request: Any, context: Any) -> Any:
        with self.lock:
            for vid, (name, size) in self.volumes.items():
                if name == request.name:
                    return csi_pb2.CreateVolumeResponse(
                        volume=csi_pb2.Volume(volume_id=vid, capacity_bytes=size))
            vid = "cv-" + uuid.uuid4().hex
            size = request.capacity_range.required_bytes or MIB
            source = request.volume_content_source
            if source.HasField("snapshot"):
                shutil.copyfile(self.path(source.snapshot.snapshot_id), self.path(vid))
            elif source.HasField("volume"):
                shutil.copyfile(self.path(source.volume.volume_id), self.path(vid))
            else:
                with open(self.path(vid), "wb") as f:
                    f.truncate(size)
            self.volumes[vid] = (request.name, size)
            return csi_pb2.CreateVolumeResponse(
                volume=csi_pb2.Volume(volume_id=vid, capacity_bytes=size))

    def DeleteVolume(self, request: Any, context: Any) -> Any:
        with self.lock:
            if self.volumes.pop(request.volume_id, None) is not None:
                self.path(request.volume_id).unlink()
        return csi_pb2.DeleteVolumeResponse()

    def CreateSnapshot(self, request: Any, context: Any) -> Any:
        with self.lock:
            for sid, (name, source, size) in self.snapshots.items():
                if name == request.name:
                    return csi_pb2.CreateSnapshotResponse(snapshot=csi_pb2.Snapshot(
                        snapshot_id=sid, source_volume_id=source, size_bytes=size,
                        ready_to_use=True))
            if request.source_volume_id not in self.volumes:
                context.abort(grpc.StatusCode.NOT_FOUND, "no such volume")
            sid = "cs-" + uuid.uuid4().hex
            shutil.copyfile(self.path(request.source_volume_id), self.path(sid))
            size = self.volumes[request.source_volume_id][1]
            self.snapshots[sid] = (request.name, request.source_volume_id, size)
            self.order.append(sid)
            return csi_pb2.CreateSnapshotResponse(snapshot=csi_pb2.Snapshot(
                snapshot_id=sid, source_volume_id=request.source_volume_id, size_bytes=size,
                ready_to_use=True))

    def DeleteSnapshot(self, request: Any, context: Any) -> Any:
        with self.lock:
            if self.snapshots.pop(request.snapshot_id, None) is not None:
                self.order.remove(request.snapshot_id)
                self.path(request.snapshot_id).unlink()
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(self, request: Any, context: Any) -> Any:
        with self.lock:
            ids = [s for s in self.order if not request.snapshot_id or s == request.snapshot_id]
            start = int(request.starting_token or 0)
            end = start + request.max_entries if request.max_entries else len(ids)
            page = ids[start:end]
            entries = [csi_pb2.ListSnapshotsResponse.Entry(snapshot=csi_pb2.Snapshot(
                snapshot_id=s, source_volume_id=self.snapshots[s][1],
                size_bytes=self.snapshots[s][2], ready_to_use=True)) for s in page]
            return csi_pb2.ListSnapshotsResponse(
                entries=entries, next_token=str(end) if end < len(ids) else "")

    # Node
    def NodeGetCapabilities(self, request: Any, context: Any) -> Any:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=NodeRPC(type=NodeRPC.STAGE_UNSTAGE_VOLUME))])

    def NodeGetInfo(self, request: Any, context: Any) -> Any:
        return csi_pb2.NodeGetInfoResponse(node_id="copy-node")

    def NodeStageVolume(self, request: Any, context: Any) -> Any:
        assert os.path.isdir(request.staging_target_path)
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, request: Any, context: Any) -> Any:
        return csi_pb2.NodeUnstageVolumeResponse()

    def NodePublishVolume(self, request: Any, context: Any) -> Any:
        assert request.volume_capability.HasField("block")
        os.symlink(self.path(request.volume_id), request.target_path)
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request: Any, context: Any) -> Any:
        Path(request.target_path).unlink(missing_ok=True)
        return csi_pb2.NodeUnpublishVolumeResponse()


class CopyServer:
    """A :class:`CopyDriver` on a unix socket in a short temporary directory."""

    def __init__(self, *, node: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qsnap-copy-", dir="/tmp"))
        self.driver = CopyDriver(self.dir, node=node)
        self.endpoint = f"unix://{self.dir}/csi.sock"
        self.server = grpc.server(ThreadPoolExecutor(max_workers=16))
        csi_pb2_grpc.add_IdentityServicer_to_server(self.driver, self.server)
        csi_pb2_grpc.add_ControllerServicer_to_server(self.driver, self.server)
        if node:
            csi_pb2_grpc.add_NodeServicer_to_server(self.driver, self.server)
        self.server.add_insecure_port(self.endpoint)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in (self.dir / "data").iterdir())


@pytest.fixture
def copy_node() -> Iterator[CopyServer]:
    server = CopyServer(node=True)
    yield server
    server.stop()


@pytest.fixture
def copy_plain() -> Iterator[CopyServer]:
    server = CopyServer(node=False)
    yield server
    server.stop()


# -- helpers ---------------------------------------------------------------------

def run_bench(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = bench.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_qsnap_empty(driver: Driver) -> None:
    """Nothing of the benchmark's is left, asked three ways."""
    status = driver.inspect.PoolStatus(qsnap_pb2.PoolStatusRequest(), timeout=10)
    assert (status.volumes, status.snapshots) == (0, 0)
    volumes = driver.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=10)
    assert list(volumes.entries) == []
    snapshots = driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=10)
    assert list(snapshots.entries) == []


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


# -- the tests -------------------------------------------------------------------

def test_bench_against_qsnap(driver: Driver, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    report, page = tmp_path / "r.json", tmp_path / "r.html"
    code, out, err = run_bench(capsys, "--endpoint", driver.endpoint, *SMALL,
                               "--json", str(report), "--html", str(page))
    assert code == 0, out + err
    doc = load(report)

    assert doc["schema"] == "qsnap-bench/1"
    target = doc["drivers"]["target"]
    assert target["qsnap_inspect"] is True
    # Data goes through the Node service when the driver has one, else
    # through qsnap's own qemu-io hook.
    has_node = target["node_capabilities"] is not None
    assert target["fill"].startswith("node" if has_node else "qsnap")
    assert doc["config"]["sizes"] == [16 * MIB]
    ops = {(r["scenario"], r["op"]) for r in doc["results"]}
    assert {("sizes", op) for op in ("CreateVolume", "CreateSnapshot", "restore", "clone",
                                     "DeleteSnapshot", "DeleteVolume")} <= ops
    assert {("depth", "CreateSnapshot"), ("depth", "restore"), ("list", "ListSnapshots"),
            ("concurrency", "CreateSnapshot")} <= ops
    for r in doc["results"]:
        s = r["stats"]
        assert s["n"] == len(r["samples"]) > 0
        assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    filled = [r for r in doc["results"] if r["scenario"] == "sizes" and r["filled"]]
    assert filled and all(r["stats"]["n"] == 2 for r in filled)
    assert sorted({r["depth"] for r in doc["results"] if r["scenario"] == "depth"}) == \
        [1, 2, 3, 4, 5]
    assert {x["count"]: x["listed"] for x in doc["listings"]} == {10: 10, 50: 50}
    assert sorted(t["concurrency"] for t in doc["throughput"]) == [1, 4]
    assert all(t["calls"] == t["concurrency"] * 3 and t["per_second"] > 0
               for t in doc["throughput"])

    # The restore of a filled volume reads back exactly what was snapshotted.
    [check] = doc["verifications"]
    assert check["ok"] and check["restored_digest"] == check["snapshot_digest"]
    assert check["fill_digest"] == check["snapshot_digest"]
    assert check["source_head_digest"] != check["restored_head_digest"]

    assert len(doc["targets"]) == 5
    assert {t["status"] for t in doc["targets"]} <= {"met", "MISSED", "not measured"}
    assert doc["errors"] == []
    if "STAGE_UNSTAGE_VOLUME" in (target["node_capabilities"] or []):
        assert doc["skipped"] == []
        [write] = [r for r in doc["results"] if r["scenario"] == "write"]
        assert write["stats"]["n"] == 2
    else:
        assert [s["scenario"] for s in doc["skipped"]] == ["write"]
        assert "Node service" in doc["skipped"][0]["text"]
        assert "skipping write" in err

    cleanup = doc["cleanup"]["target"]
    assert cleanup["left_volumes"] == cleanup["left_snapshots"] == 0
    assert cleanup["created_snapshots"] >= 50 and cleanup["failures"] == []
    assert_qsnap_empty(driver)

    html = page.read_text()
    assert html.count("<svg") >= 6
    for title in ("latency vs volume size", "n-th snapshot", "latency CDF",
                  "throughput vs concurrency", "ListSnapshots"):
        assert title in html
    # Self-contained: no scripts, stylesheets or images from anywhere.
    assert "<script" not in html and "<link" not in html and "src=" not in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html

    assert "CreateSnapshot" in out and "P50" in out and "qsnap targets" in out
    assert "all deleted" in out


def test_baseline_through_the_node_service(driver: Driver, copy_node: CopyServer,
                                           tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "r.json"
    # The target's data goes through qsnap's qemu-io hook here, whether or
    # not the driver has a Node service, so that path stays covered.
    code, out, err = run_bench(capsys, "--endpoint", driver.endpoint,
                               "--baseline", copy_node.endpoint, *SMALL,
                               "--scenarios", "sizes,depth,concurrency,write",
                               "--fill-hook", "qsnap", "--checksum-hook", "qsnap",
                               "--json", str(report), "--html", str(tmp_path / "r.html"))
    assert code == 0, out + err
    doc = load(report)
    assert doc["drivers"]["target"]["fill"].startswith("qsnap")
    assert doc["drivers"]["target"]["checksum"].startswith("qsnap")
    assert doc["drivers"]["baseline"]["name"] == "copy.test.csi"
    assert doc["drivers"]["baseline"]["fill"].startswith("node")
    drivers = {r["driver"] for r in doc["results"]}
    assert drivers == {"target", "baseline"}
    assert {v["driver"]: v["ok"] for v in doc["verifications"]} == {"target": True,
                                                                  "baseline": True}
    # Snapshots while a writer runs, on the baseline's Node service.
    [write] = [r for r in doc["results"] if r["scenario"] == "write" and r["driver"] == "baseline"]
    assert write["stats"]["n"] == 2
    assert any(w["driver"] == "baseline" and w["bytes"] > 0 for w in doc["writer"])
    ratios = {(c["scenario"], c["op"], c["case"]) for c in doc["comparison"]}
    assert ("sizes", "CreateSnapshot", "16.0 MiB filled") in ratios
    assert ("concurrency", "snapshots/s", "4 callers") in ratios
    assert "BASELINE P50" in out and "BASE/TARGET" in out
    assert copy_node.leftovers() == []
    assert_qsnap_empty(driver)


HOOK = textwrap.dedent("""
    import hashlib, os, sys
    from csidriver.bench.fill import Pattern
    path = os.path.join(sys.argv[1], "data", os.environ["QSNAP_VOLUME_ID"])
    assert os.environ["QSNAP_ENDPOINT"].startswith("unix://")
    if sys.argv[2] == "fill":
        with open(path, "r+b") as f:
            for offset, data in Pattern(int(os.environ["QSNAP_SEED"]), 1 << 20).chunks(
                    int(os.environ["QSNAP_FILL_BYTES"])):
                f.seek(offset)
                f.write(data)
    else:
        with open(path, "rb") as f:
            print(hashlib.sha256(f.read(int(os.environ["QSNAP_CHECKSUM_BYTES"]))).hexdigest())
""")


def test_fill_and_checksum_hooks(copy_plain: CopyServer, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    command = f"{sys.executable} {hook} {copy_plain.dir}"
    report = tmp_path / "r.json"
    code, out, err = run_bench(capsys, "--endpoint", copy_plain.endpoint, *SMALL,
                               "--scenarios", "sizes,list,write",
                               "--fill-hook", f"{command} fill",
                               "--checksum-hook", f"{command} checksum", "--json", str(report))
    assert code == 0, out + err
    doc = load(report)
    assert doc["drivers"]["target"]["qsnap_inspect"] is False
    assert doc["drivers"]["target"]["fill"].startswith("hook (")
    [check] = doc["verifications"]
    assert check["ok"]
    assert {s["scenario"] for s in doc["skipped"]} == {"write"}
    assert copy_plain.leftovers() == []


def test_without_a_way_to_fill_only_empty_volumes_are_measured(
        copy_plain: CopyServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_bench(capsys, "--endpoint", copy_plain.endpoint, *SMALL,
                               "--scenarios", "sizes", "--json", str(tmp_path / "r.json"))
    assert code == 0, out + err
    doc = load(tmp_path / "r.json")
    assert not any(r["filled"] for r in doc["results"])
    assert any("filled volumes" in s["text"] and "--fill-hook" in s["text"]
               for s in doc["skipped"])
    assert copy_plain.leftovers() == []


def test_unusable_arguments_and_endpoints(copy_plain: CopyServer, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_bench(capsys, "--endpoint", copy_plain.endpoint, "--fill-hook", "qsnap",
                             "--no-progress")
    assert code == 2 and "Inspect" in err
    code, _, err = run_bench(capsys, "--endpoint", f"unix://{tmp_path}/nothing.sock",
                             "--no-progress")
    assert code == 1 and "cannot talk to the driver" in err
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "big"])


def test_interrupt_deletes_everything(driver: Driver, tmp_path: Path) -> None:
    """SIGINT in the middle of making the list population: the run stops,
    deletes what it made (creates in flight included) and exits 130."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    report = tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "csidriver.cli", "bench", "--endpoint", driver.endpoint,
         "--scenarios", "list", "--volume-size", "16M", "--list", "100000", "--workers", "4",
         "--json", str(report)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Interrupt once a few hundred snapshots exist.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = driver.inspect.PoolStatus(qsnap_pb2.PoolStatusRequest(), timeout=10)
            if status.snapshots >= 200:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("the benchmark made no snapshots in 30 s")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err
    doc = load(report)
    assert doc["interrupted"] is True
    cleanup = doc["cleanup"]["target"]
    assert cleanup["left_volumes"] == cleanup["left_snapshots"] == 0
    assert cleanup["deleted_snapshots"] >= 200
    assert_qsnap_empty(driver)
