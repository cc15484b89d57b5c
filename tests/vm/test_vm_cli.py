"""``qsnap vm`` end to end: a driver on the real libvirt, a TCG guest booted
on the tops of two volumes made through CSI CreateVolume, and the CLI
(``cli.main`` in-process, ``--endpoint`` of that driver) snapshotting it
online with a guest freeze, listing and showing the snapshot, refusing to
restore the running VM, restoring the stopped one and cloning it; the
started clone sees the data written before the snapshot, not after.

The driver runs as ``tests/conftest.py``'s ``driver_factory`` starts it,
with the pool under /var/tmp/qsnap-guest (mode 0755: QEMU runs as
libvirt-qemu and must traverse to the tops).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guest_lib import (CACHE, URI, Guest, Host, boot, domain_xml, fill_ext4,  # noqa: E402
                       host, remove_domain)  # noqa: F401  (fixture by name)

from rootconf import run, run_json  # noqa: E402
from csidriver.pb import csi_pb2, qsnap_pb2  # noqa: E402

if TYPE_CHECKING:
    from conftest import Driver, DriverFactory

DISK_MIB = 64
MAC = "52:54:00:51:4e:02"


def ext4_volume(driver: Driver, name: str, scratch: Path) -> tuple[str, str]:
    """A volume made with CSI CreateVolume holding an empty ext4 filesystem
    (made on the host and written into its closed top): (ID, top path)."""
    volume_id = driver.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=DISK_MIB << 20),
        volume_capabilities=[csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))])).volume.volume_id
    top = driver.inspect.DescribeVolume(
        qsnap_pb2.DescribeVolumeRequest(volume_id=volume_id)).chain[0].path
    fill_ext4(top, scratch, DISK_MIB)
    return volume_id, top


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = CACHE / f"vmcli-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    (path / "pool").mkdir(mode=0o755, parents=True)
    for p in (CACHE, path, path / "pool"):
        p.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_qsnap_vm_snapshot_restore_and_clone_a_running_guest(
        host: Host, driver_factory: DriverFactory, workdir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import libvirt
    driver = driver_factory("--libvirt-uri", URI, pool_root=workdir / "pool")
    (v1, top1), (v2, top2) = (ext4_volume(driver, n, workdir) for n in ("vmcli-1", "vmcli-2"))
    name = f"qsnap-test-vmcli-{os.getpid()}"
    clone_name = f"qsnap-test-vmcli-clone-{os.getpid()}"
    iface = f"<interface type='user'><mac address='{MAC}'/><model type='virtio'/></interface>"
    xml = domain_xml(name, host.image / "vmlinuz", host.image / "initrd.gz",
                     [Path(top1), Path(top2)], workdir / "console.log", extra_devices=iface)
    try:
        with capsys.disabled():     # boot's timing must not mix with the CLI's output
            vm = boot(host, name, xml, workdir, Path(top1))
        vm.sh("for d in /mnt/data1 /mnt/data2; do echo before > $d/marker; done; sync")

        snap = run_json(driver, capsys, "vm", "snapshot", name, "s1")
        vm.sh("for d in /mnt/data1 /mnt/data2; do echo after > $d/marker; done; sync")
        assert snap["status"] == "Ready" and snap["online"] and snap["error"] == ""
        assert snap["indications"] == ["Online", "GuestAgent"]
        assert [(d["target"], d["volume_id"], d["attachment"]) for d in snap["disks"]] == \
            [("vda", v1, "file"), ("vdb", v2, "file")]
        assert all(d["snapshot_id"] for d in snap["disks"])
        assert snap["excluded"] == [] and snap["warnings"] == []
        assert (snap["domain"], snap["domain_uuid"]) == (name, vm.uuid)
        assert run_json(driver, capsys, "vm", "list", name) == [snap]
        code, out, _ = run(driver, capsys, "vm", "list", name)
        assert code == 0 and out.splitlines()[1].split()[:5] == \
            [snap["id"], "s1", name, "Ready", "vda,vdb"]
        code, out, _ = run(driver, capsys, "vm", "show", snap["id"])
        assert code == 0
        for text in ("status:              Ready", "online:              yes",
                     "indications:         Online, GuestAgent", v1, v2):
            assert text in out, out

        code, _, err = run(driver, capsys, "vm", "restore", snap["id"])
        assert code == 1 and "FAILED_PRECONDITION" in err and "stop it" in err
        vm.dom.destroy()        # transient: gone with it

        restored = run_json(driver, capsys, "vm", "restore", snap["id"])
        assert (restored["domain"], restored["domain_uuid"]) == (name, vm.uuid)
        assert set(restored["volumes"]) == {"vda", "vdb"} and restored["replaced"] == {}
        assert not host.conn.lookupByUUIDString(vm.uuid).isActive()

        code, out, err = run(driver, capsys, "vm", "clone", snap["id"], clone_name, "--start")
        assert code == 0, err
        assert out.startswith(f"cloned and started domain {clone_name} (")
        assert "volumes:\n  vda = v-" in out and "\n  vdb = v-" in out
        assert run_json(driver, capsys, "vm", "list") == [snap]    # a clone is no snapshot
        clone_dom = host.conn.lookupByName(clone_name)
        assert clone_dom.UUIDString() != vm.uuid
        clone = Guest(clone_name, clone_dom.UUIDString(), clone_dom, workdir, Path(top1),
                      workdir / "console.log", 0.0)
        clone.wait_agent(True, 120)
        assert clone.sh("cat /mnt/data1/marker /mnt/data2/marker") == "before\nbefore\n"
        macs = re.findall(r"<mac address='([^']+)'", clone_dom.XMLDesc(0))
        assert macs and MAC not in macs
        clone_dom.destroy()

        code, out, _ = run(driver, capsys, "vm", "delete", snap["id"])
        assert code == 0
        assert run(driver, capsys, "vm", "show", snap["id"])[0] == 1
    finally:
        for dom_name in (name, clone_name):
            try:
                remove_domain(host.conn.lookupByName(dom_name))
            except libvirt.libvirtError:
                pass            # never defined, or gone already
        refused = {}
        for entry in driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries:
            try:
                driver.controller.DeleteVolume(
                    csi_pb2.DeleteVolumeRequest(volume_id=entry.volume.volume_id))
            except grpc.RpcError as e:
                refused[entry.volume.volume_id] = e.details()
        # Every domain is gone: the volumes it had open are closed again and
        # deletable (the catalog's "domain" owner is re-checked against the
        # image locks).
        driver.stop()
        assert refused == {}, refused
