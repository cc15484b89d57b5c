"""qsnap.v1.VirtualMachines and ``qsnap vm`` without a guest.

A driver with ``--libvirt-uri none`` answers FAILED_PRECONDITION to every
call (arguments are checked first).  A driver on libvirt's test driver
(``test:///FILE``: an in-process fake hypervisor loaded from a node XML,
one instance per connection) has a shut-off domain whose disks are qsnap
volumes, so the whole path runs for real except QEMU: the domain is found,
its disks are classified, both are cut offline in one group, and restore
and clone define domains on new volumes.  The running-guest path (freeze,
libvirt's disk switch, booting a restore and a clone) is
tests/vm/test_vm_cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from rootconf import run, run_json  # noqa: E402
from csidriver.pb import csi_pb2, qsnap_pb2, qsnap_pb2_grpc

if TYPE_CHECKING:
    from conftest import Driver, DriverFactory

pytest.importorskip("libvirt")

NO_SUCH = "m-" + "0" * 32
UUID = "6a4c1f0e-7d2b-4c59-9a7e-0c1d2e3f4a5b"
MAC = "52:54:00:aa:bb:01"


def fails(driver: Driver, capsys: pytest.CaptureFixture[str], code: str, *argv: str) -> str:
    """Run a command that must fail with a gRPC ``code``; return stderr."""
    status, _, err = run(driver, capsys, *argv)
    assert status == 1 and f"qsnap: {code}:" in err, err
    return err


def vms(driver: Driver) -> Any:
    return qsnap_pb2_grpc.VirtualMachinesStub(driver.channel)


def code_of(call: Any, request: Any) -> grpc.StatusCode:
    try:
        call(request)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_arguments_are_checked_and_without_libvirt_every_call_is_refused(
        driver_factory: DriverFactory, capsys: pytest.CaptureFixture[str]) -> None:
    from grpc_health.v1 import health_pb2
    driver = driver_factory("--libvirt-uri", "none")
    stub = vms(driver)
    invalid = [
        (stub.CreateVmSnapshot, qsnap_pb2.CreateVmSnapshotRequest(name="s")),
        (stub.CreateVmSnapshot, qsnap_pb2.CreateVmSnapshotRequest(domain="d")),
        (stub.GetVmSnapshot, qsnap_pb2.GetVmSnapshotRequest()),
        (stub.DeleteVmSnapshot, qsnap_pb2.DeleteVmSnapshotRequest()),
        (stub.RestoreVm, qsnap_pb2.RestoreVmRequest()),
        (stub.CloneVm, qsnap_pb2.CloneVmRequest(new_name="copy")),
        (stub.CloneVm, qsnap_pb2.CloneVmRequest(snapshot_id=NO_SUCH)),
    ]
    for call, request in invalid:
        assert code_of(call, request) == grpc.StatusCode.INVALID_ARGUMENT, request
    for argv in (["vm", "list"], ["vm", "list", "some-domain"], ["vm", "snapshot", "d", "s"],
                 ["vm", "show", NO_SUCH], ["vm", "restore", NO_SUCH],
                 ["vm", "clone", NO_SUCH, "copy", "--start"], ["vm", "delete", NO_SUCH]):
        err = fails(driver, capsys, "FAILED_PRECONDITION", *argv)
        assert "libvirt is turned off (--libvirt-uri none)" in err
    # The service is there (and healthy) all the same.
    reply = driver.health.Check(health_pb2.HealthCheckRequest(service="qsnap.v1.VirtualMachines"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(SystemExit):
        run(driver, capsys, "vm", "snapshot", "d", "s", "--param", "novalue")


def _node_xml(tops: list[str]) -> str:
    """libvirt test-driver node: ``vm1`` (shut off) on two qsnap tops plus a
    disk and a cdrom that are not qsnap volumes; ``plain`` (running) on no
    qsnap volume."""
    disks = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{top}'/><target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
        for i, top in enumerate(tops))
    return f"""<node>
<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
  <name>vm1</name><uuid>{UUID}</uuid><memory>65536</memory>
  <os><type>hvm</type></os>
  <devices>
    {disks}
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/var/lib/elsewhere/scratch.img'/><target dev='vdc' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>
    <interface type='user'><mac address='{MAC}'/></interface>
  </devices>
  <test:runstate>5</test:runstate>
</domain>
<domain type='test'>
  <name>plain</name><memory>65536</memory><os><type>hvm</type></os>
  <devices><disk type='file' device='disk'><source file='/var/lib/elsewhere/plain.img'/>
    <target dev='vda' bus='virtio'/></disk></devices>
</domain>
</node>
"""


def test_snapshot_list_show_restore_clone_delete_on_libvirts_test_driver(
        driver_factory: DriverFactory, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    node = tmp_path / "node.xml"
    # libvirt is first asked at the first VM call: the node file can still
    # be written once the volumes (and so their tops' paths) exist.
    driver = driver_factory("--libvirt-uri", f"test://{node}")
    volumes = [run_json(driver, capsys, "volume", "create", n, "--size", "4M")["id"]
               for n in ("disk1", "disk2")]
    tops = [run_json(driver, capsys, "volume", "show", v)["chain"][0]["path"] for v in volumes]
    node.write_text(_node_xml(tops))

    fails(driver, capsys, "NOT_FOUND", "vm", "snapshot", "nosuch", "s1")
    err = fails(driver, capsys, "FAILED_PRECONDITION", "vm", "snapshot", "plain", "s1")
    assert "has no qsnap volume as a disk" in err and "vda: not a qsnap volume" in err

    snap = run_json(driver, capsys, "vm", "snapshot", "vm1", "s1",
                    "--param", "qsnap.csi.dev/freeze-deadline=30s")
    assert snap["id"].startswith("m-") and snap["name"] == "s1"
    assert (snap["domain"], snap["domain_uuid"]) == ("vm1", UUID)
    assert snap["status"] == "Ready" and not snap["online"] and snap["error"] == ""
    assert snap["indications"] == ["Offline"]
    assert [(d["target"], d["volume_id"], d["attachment"], d["driver_type"])
            for d in snap["disks"]] == [("vda", volumes[0], "file", "qcow2"),
                                        ("vdb", volumes[1], "file", "qcow2")]
    assert {(x["target"], x["reason"]) for x in snap["excluded"]} == {
        ("vdc", "not a qsnap volume"), ("hdc", "a cdrom")}
    assert snap["warnings"] == [] and snap["group_snapshot_id"].startswith("g-")
    # Its disk snapshots are CSI snapshots of the group.
    for disk in snap["disks"]:
        member = run_json(driver, capsys, "snapshot", "show", disk["snapshot_id"])
        assert member["source_volume_id"] == disk["volume_id"]
        assert member["group_snapshot_id"] == snap["group_snapshot_id"]
        assert member["parameters"] == {"qsnap.csi.dev/freeze-deadline": "30s"}

    # Idempotent by (domain, name), by name or UUID.
    assert run_json(driver, capsys, "vm", "snapshot", UUID, "s1",
                    "--param", "qsnap.csi.dev/freeze-deadline=30s") == snap
    assert run_json(driver, capsys, "vm", "show", snap["id"]) == snap
    assert run_json(driver, capsys, "vm", "list") == [snap]
    assert run_json(driver, capsys, "vm", "list", "vm1") == [snap]
    assert run_json(driver, capsys, "vm", "list", UUID) == [snap]
    assert run_json(driver, capsys, "vm", "list", "plain") == []

    code, out, _ = run(driver, capsys, "vm", "list")
    head, row = out.splitlines()
    assert head.split() == ["ID", "NAME", "DOMAIN", "STATUS", "DISKS", "CREATED", "INDICATIONS"]
    assert row.split()[:5] == [snap["id"], "s1", "vm1", "Ready", "vda,vdb"]
    assert row.split()[-1] == "Offline"
    code, out, _ = run(driver, capsys, "vm", "show", snap["id"])
    assert code == 0
    for text in ("status:              Ready", "online:              no",
                 "indications:         Offline", "disks (included):", volumes[0],
                 snap["disks"][1]["snapshot_id"], "excluded:", "vdc", "not a qsnap volume",
                 "/var/lib/elsewhere/scratch.img", "hdc", "a cdrom", "warnings:\n  -"):
        assert text in out, out
    code, out, _ = run(driver, capsys, "vm", "show", snap["id"], "--xml")
    assert code == 0 and "<name>vm1</name>" in out and tops[0] in out

    restored = run_json(driver, capsys, "vm", "restore", snap["id"])
    assert (restored["domain"], restored["domain_uuid"]) == ("vm1", UUID)
    assert set(restored["volumes"]) == {"vda", "vdb"}
    assert set(restored["volumes"].values()).isdisjoint(volumes)
    for disk in snap["disks"]:
        made = run_json(driver, capsys, "volume", "show", restored["volumes"][disk["target"]])
        assert made["source_snapshot_id"] == disk["snapshot_id"]
    # Restored again: the volumes of the first restore are replaced, kept
    # and reported.
    code, out, _ = run(driver, capsys, "vm", "restore", snap["id"])
    assert code == 0 and out.startswith(f"restored domain vm1 ({UUID}) from VM snapshot")
    assert "replaced (kept" in out
    assert all(f"{t} = {v}" in out for t, v in restored["volumes"].items())

    cloned = run_json(driver, capsys, "vm", "clone", snap["id"], "vm1-copy", "--start")
    assert cloned["domain"] == "vm1-copy" and cloned["domain_uuid"] not in ("", UUID)
    assert set(cloned["volumes"]) == {"vda", "vdb"} and cloned["replaced"] == {}
    assert set(cloned["volumes"].values()).isdisjoint(restored["volumes"].values())
    fails(driver, capsys, "ALREADY_EXISTS", "vm", "clone", snap["id"], "vm1-copy")
    fails(driver, capsys, "INVALID_ARGUMENT", "vm", "clone", snap["id"], "bad/name")

    for argv in (["vm", "show", NO_SUCH], ["vm", "show", "not-an-id"],
                 ["vm", "restore", NO_SUCH], ["vm", "clone", NO_SUCH, "x"],
                 ["vm", "delete", NO_SUCH]):
        fails(driver, capsys, "NOT_FOUND", *argv)

    code, out, _ = run(driver, capsys, "vm", "delete", snap["id"])
    assert code == 0 and out == f"deleted VM snapshot {snap['id']} and its disk snapshots\n"
    assert run_json(driver, capsys, "vm", "list") == []
    assert run_json(driver, capsys, "snapshot", "list") == []
    fails(driver, capsys, "NOT_FOUND", "vm", "show", snap["id"])
    # Restored and cloned volumes keep their data: they are still there.
    listed = {v["id"] for v in run_json(driver, capsys, "volume", "list")}
    assert listed >= {*volumes, *restored["volumes"].values(), *cloned["volumes"].values()}
    # Every RPC above answered with a mapped code, never UNKNOWN.
    assert driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
