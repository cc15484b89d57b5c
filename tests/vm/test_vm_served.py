"""A guest whose disk is a volume the node serves (qemu-storage-daemon →
FUSE export → loop device, handed to the domain as a raw block device):
a CSI-style snapshot of the volume finds the domain by the device, freezes
the guest through its agent, and switches the layer through the storage
daemon's QMP; the snapshot's filesystem is clean without journal replay."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guest_lib import URI, Guest, Host, boot, domain_xml, fresh_dir, remove_domain  # noqa: E402
from guest_lib import host  # noqa: E402,F401  (fixture by name)
from test_vm_snapshots import _run, needs_recovery, read_file, to_raw  # noqa: E402

from engine.domains import DomainOwner  # noqa: E402
from engine.freeze import Freezer  # noqa: E402
from engine.guests import GuestQuiescer  # noqa: E402
from engine.model import Owner  # noqa: E402
from engine.node import BLOCK, Access, Node  # noqa: E402
from engine.pool import Pool  # noqa: E402
from engine.virt import Hypervisor  # noqa: E402

DISK_MIB = 64


@dataclass
class Served:
    pool: Pool
    node: Node
    hv: Hypervisor
    volume_id: str
    device: str
    vm: Guest


@pytest.fixture(scope="module")
def served(host: Host) -> Iterator[Served]:
    root = fresh_dir(f"served-pool-{os.getpid()}")
    run_dir = Path(tempfile.mkdtemp(prefix="qsnap-vm-served-", dir="/tmp"))
    pool = Pool.open(root / "pool")
    hv = Hypervisor(URI)
    pool.attach_owner(Owner.DOMAIN, DomainOwner(hv, pool.layout))
    pool.attach_quiescer(GuestQuiescer(Freezer(hv), root / "frozen.json"))
    node = Node(pool, run_dir)
    node.start()
    volume = pool.create_volume("served", required_bytes=DISK_MIB << 20)
    staging_path = run_dir / "stage"
    vm = None
    try:
        staging = node.stage(volume.id, staging_path, Access(BLOCK))
        made = _run(["mkfs.ext4", "-q", "-F", staging.device])
        assert made.returncode == 0, made.stderr
        name = f"qsnap-test-served-{os.getpid()}"
        disk = (f"<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
                f"<source dev='{staging.device}'/><target dev='vda' bus='virtio'/></disk>")
        xml = domain_xml(name, host.image / "vmlinuz", host.image / "initrd.gz", [],
                         root / "console.log", cmdline="console=ttyS0 quiet qsnap.writer=1",
                         extra_devices=disk)
        vm = boot(host, name, xml, root, Path(staging.device))
        yield Served(pool, node, hv, volume.id, staging.device, vm)
    finally:
        if vm is not None:
            remove_domain(vm.dom)
        # Every volume still served (a failed test may leave more than
        # this one), so that no loop device, mount or daemon outlives it.
        node.release_all()
        node.stop()
        node.shutdown()
        pool.close()
        hv.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def test_a_snapshot_of_a_served_volume_freezes_the_guest_that_uses_its_device(
        served: Served, tmp_path: Path) -> None:
    served.vm.sh("echo served > /mnt/data1/marker && sync /mnt/data1/marker")
    frozen: list[float] = []
    served.pool.add_observer(lambda event, s: frozen.append(s) if event == "frozen" else None)
    snapshot = served.pool.create_snapshot("served-s1", served.volume_id)
    assert snapshot.indications == ("Online", "GuestAgent")
    assert len(frozen) == 1
    assert served.vm.fsfreeze_status() == "thawed"
    # The storage daemon switched (the catalog's top is the one it serves,
    # still served: the guest keeps writing), and the cut is clean.
    assert served.pool.get_volume(served.volume_id).owner is Owner.SERVED
    raw = to_raw(served.pool, snapshot.layer, tmp_path / "served.raw")
    assert not needs_recovery(raw)
    fsck = _run(["e2fsck", "-fn", str(raw)])
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert read_file(raw, "/marker") == "served\n"
    before = int(served.vm.sh("wc -c < /mnt/data1/log"))
    served.vm.sh("sleep 0.5")
    assert int(served.vm.sh("wc -c < /mnt/data1/log")) > before
    print(f"\nserved volume: frozen window {frozen[0] * 1000:.1f} ms")


def test_policy_disabled_leaves_the_guest_running_and_says_so(served: Served) -> None:
    snapshot = served.pool.create_snapshot(
        "served-s2", served.volume_id, parameters={"qsnap.csi.dev/guest-agent": "disabled"})
    assert snapshot.indications == ("Online", "QuiesceDisabled")


def test_a_vm_on_a_served_disk_is_snapshotted_and_cloned_onto_a_served_disk(
        served: Served) -> None:
    from engine.vm import BLOCK_DEVICE, READY, VirtualMachines
    vms = VirtualMachines(served.pool, served.hv, served.node)
    served.vm.sh("echo vm-served > /mnt/data1/marker && sync /mnt/data1/marker")
    snap = vms.snapshot(served.vm.name, "vm-served")
    assert snap.status == READY and snap.indications == ("Online", "GuestAgent")
    assert [(d.target, d.volume_id, d.attachment) for d in snap.disks] == [
        ("vda", served.volume_id, BLOCK_DEVICE)]
    served.vm.sh("echo later > /mnt/data1/marker && sync /mnt/data1/marker")

    clone_name = f"qsnap-test-served-clone-{os.getpid()}"
    result = vms.clone(snap.id, clone_name, start=True)
    dom = served.hv.lookup(result.domain_uuid)
    try:
        # The clone logs its console to a file of its own (the original's is
        # busy while it runs).
        assert f"console-{clone_name}.log" in served.hv.xml(dom)
        clone = Guest(clone_name, result.domain_uuid, dom, served.vm.workdir, served.vm.disk,
                      served.vm.console, 0.0)
        clone.wait_agent(True, 120)
        assert clone.sh("cat /mnt/data1/marker") == "vm-served\n"
        # Its disk is the device the node serves for the clone's new volume.
        with served.pool.catalog.reading() as tx:
            staging = tx.staging(result.volumes["vda"])
        assert staging is not None and staging.access == "block"
        assert f"dev='{staging.device}'" in served.hv.xml(dom)
    finally:
        remove_domain(dom)
        served.node.unstage(result.volumes["vda"], vms._staging_path(result.volumes["vda"]))
    vms.delete(snap.id)
