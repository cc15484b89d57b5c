"""VM snapshots end to end: a real guest under TCG whose two disks are qsnap
volumes (the domain's QEMU opens their qcow2 tops directly), with a writer
running inside; qsnap freezes it through qemu-ga, switches both disks
through libvirt in one atomic step, and restores and clones the VM.

What is checked, on the real parts: the snapshot's filesystems are clean
without a journal replay (``dumpe2fs`` shows no ``needs_recovery``,
``e2fsck -fn`` passes); the catalog names the tops the domain really uses;
a guest without an agent gives a crash-consistent snapshot that still
restores; an overrun deadline fails the snapshot, thaws the guest and
leaves no file behind; a driver killed while the guest is frozen leaves a
record from which the restarted one thaws it; a restored and a cloned VM
boot and see the data of the moment of the snapshot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guest_lib import (ROOT, URI, Guest, Host, boot, domain_xml, fill_ext4,  # noqa: E402
                       fresh_dir, host, remove_domain)  # noqa: F401  (fixture by name)

from engine.domains import DomainOwner  # noqa: E402
from engine.errors import FailedPrecondition, InUse  # noqa: E402
from engine.freeze import Freezer, FreezeDeadlineExceeded  # noqa: E402
from engine.guests import GuestQuiescer  # noqa: E402
from engine.model import Owner, SnapshotSource  # noqa: E402
from engine.pool import Pool  # noqa: E402
from engine.virt import Hypervisor, disks  # noqa: E402
from engine.vm import FAILED, READY, VirtualMachines, VmRunning  # noqa: E402

DISK_MIB = 64
MAC = "52:54:00:51:4e:01"


@dataclass
class Bench:
    """The pool directory, the VM on two of its volumes, and names."""

    root: Path
    state_file: Path
    vm: Guest
    volumes: tuple[str, str]
    name: str


def open_pool(root: Path, state_file: Path) -> tuple[Pool, Hypervisor, VirtualMachines]:
    pool = Pool.open(root)
    hv = Hypervisor(URI)
    pool.attach_owner(Owner.DOMAIN, DomainOwner(hv, pool.layout))
    quiescer = GuestQuiescer(Freezer(hv), state_file)
    pool.attach_quiescer(quiescer)
    quiescer.recover()
    return pool, hv, VirtualMachines(pool, hv)


@pytest.fixture
def vms(bench: Bench) -> Iterator[tuple[Pool, Hypervisor, VirtualMachines]]:
    pool, hv, vms_ = open_pool(bench.root, bench.state_file)
    try:
        yield pool, hv, vms_
    finally:
        pool.close()
        hv.close()


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def ext4_volume(pool: Pool, name: str) -> str:
    """A volume holding an empty ext4 filesystem (made on the host: the
    guest has no mkfs), written into its closed top."""
    volume = pool.create_volume(name, required_bytes=DISK_MIB << 20)
    fill_ext4(pool.layout.layer_path(volume.top_layer), pool.layout.root, DISK_MIB)
    return volume.id


@pytest.fixture(scope="module")
def bench(host: Host) -> Iterator[Bench]:
    root = fresh_dir(f"pool-{os.getpid()}")
    state_file = root.parent / f"frozen-{os.getpid()}.json"
    pool = Pool.open(root)
    try:
        v1, v2 = ext4_volume(pool, "disk1"), ext4_volume(pool, "disk2")
        tops = [pool.layout.layer_path(pool.get_volume(v).top_layer) for v in (v1, v2)]
    finally:
        pool.close()
    name = f"qsnap-test-vm-{os.getpid()}"
    iface = (f"<interface type='user'><mac address='{MAC}'/><model type='virtio'/>"
             "</interface>")
    xml = domain_xml(name, host.image / "vmlinuz", host.image / "initrd.gz", tops,
                     root / "console.log", cmdline="console=ttyS0 quiet qsnap.writer=1",
                     extra_devices=iface)
    vm = boot(host, name, xml, root, tops[0])
    try:
        yield Bench(root, state_file, vm, (v1, v2), name)
    finally:
        for dom in host.conn.listAllDomains(0):
            if dom.name().startswith("qsnap-test-") and dom.name().endswith(f"-{os.getpid()}") \
                    and dom.name() != f"qsnap-test-{os.getpid()}":
                remove_domain(dom)
        shutil.rmtree(root, ignore_errors=True)
        state_file.unlink(missing_ok=True)


# -- helpers -------------------------------------------------------------------

def domain_tops(hv: Hypervisor, uuid: str) -> dict[str, str]:
    return {d.target: os.path.realpath(d.source) for d in disks(hv.xml(hv.lookup(uuid)))}


def catalog_tops(pool: Pool, volumes: tuple[str, ...]) -> dict[str, str]:
    return {t: os.path.realpath(pool.layout.layer_path(pool.get_volume(v).top_layer))
            for t, v in zip(("vda", "vdb"), volumes)}


def to_raw(pool: Pool, layer_id: str, out: Path) -> Path:
    """The content of a layer with its backing chain, as a raw image."""
    done = _run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                 str(pool.layout.layer_path(layer_id)), str(out)])
    assert done.returncode == 0, done.stderr
    return out


def needs_recovery(raw: Path) -> bool:
    done = _run(["dumpe2fs", "-h", str(raw)])
    assert done.returncode == 0, done.stderr
    features = re.search(r"^Filesystem features:\s*(.*)$", done.stdout, re.M)
    assert features, done.stdout
    return "needs_recovery" in features.group(1).split()


def read_file(raw: Path, path: str) -> str:
    done = _run(["debugfs", "-R", f"cat {path}", str(raw)])
    assert done.returncode == 0, done.stderr
    return done.stdout


def no_orphans(pool: Pool) -> None:
    with pool.catalog.reading() as tx:
        known = {layer.id for layer in tx.all_layers()}
        intents = tx.intents()
    assert intents == []
    assert pool.layout.layer_files() == known


def markers(vm: Guest, text: str) -> None:
    vm.sh(f"for d in /mnt/data1 /mnt/data2; do echo {text} > $d/marker && sync $d/marker; done")


# -- the cases -------------------------------------------------------------------

def test_online_snapshot_freezes_once_and_cuts_both_disks_together(
        bench: Bench, vms: tuple[Pool, Hypervisor, VirtualMachines], tmp_path: Path) -> None:
    pool, hv, vm_ops = vms
    frozen: list[float] = []
    pool.add_observer(lambda event, s: frozen.append(s) if event == "frozen" else None)
    markers(bench.vm, "before")
    snap = vm_ops.snapshot(bench.name, "s1")
    markers(bench.vm, "after")

    assert snap.status == READY and snap.ready and snap.online
    assert snap.indications == ("Online", "GuestAgent")
    assert [d.target for d in snap.disks] == ["vda", "vdb"]
    assert {d.volume_id for d in snap.disks} == set(bench.volumes)
    assert snap.excluded == () and snap.warnings == ()
    members = [pool.get_snapshot(d.snapshot_id) for d in snap.disks]
    assert len({m.created_ns for m in members}) == 1 and all(m.group_id for m in members)
    assert len(frozen) == 1 and 0 < frozen[0] < 10
    # The catalog names the tops the domain's QEMU really writes now.
    assert catalog_tops(pool, bench.volumes) == domain_tops(hv, bench.vm.uuid)
    assert all(pool.get_volume(v).owner is Owner.DOMAIN for v in bench.volumes)
    # Frozen through the agent: clean without replaying the journal, and the
    # data of the moment is there.
    for member in members:
        raw = to_raw(pool, member.layer, tmp_path / f"{member.id}.raw")
        assert not needs_recovery(raw)
        fsck = _run(["e2fsck", "-fn", str(raw)])
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert read_file(raw, "/marker") == "before\n"
    assert vm_ops.snapshot(bench.name, "s1") == snap        # idempotent by name
    assert [s.id for s in vm_ops.list(bench.name)] == [snap.id]
    assert bench.vm.fsfreeze_status() == "thawed"
    print(f"\nfrozen window {frozen[0] * 1000:.1f} ms")


def test_without_an_agent_the_snapshot_is_crash_consistent_and_restores(
        bench: Bench, vms: tuple[Pool, Hypervisor, VirtualMachines], tmp_path: Path) -> None:
    pool, _hv, vm_ops = vms
    markers(bench.vm, "noagent")
    bench.vm.spawn("echo 15 > /run/qga.pause; sleep 0.5; kill $(pidof qemu-ga)")
    bench.vm.wait_agent(False, 20)
    try:
        snap = vm_ops.snapshot(bench.name, "s2")
        assert snap.status == READY
        assert snap.indications == ("Online", "NoGuestAgent")
        with pytest.raises(FailedPrecondition, match="does not answer"):
            vm_ops.snapshot(bench.name, "s2-required",
                            parameters={"qsnap.csi.dev/guest-agent": "required"})
        assert vm_ops.list(bench.name)[-1].status == FAILED
    finally:
        bench.vm.wait_agent(True, 60)
    # Crash-consistent: a new volume from it holds the data once the
    # journal is replayed.
    disk = snap.disks[0]
    restored = pool.create_volume("from-s2", source=SnapshotSource(disk.snapshot_id))
    raw = to_raw(pool, restored.top_layer, tmp_path / "s2.raw")
    fsck = _run(["e2fsck", "-fy", str(raw)])
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
    assert read_file(raw, "/marker") == "noagent\n"
    pool.delete_volume(restored.id)


def test_an_overrun_deadline_fails_the_snapshot_thaws_and_leaves_nothing(
        bench: Bench, vms: tuple[Pool, Hypervisor, VirtualMachines]) -> None:
    pool, hv, vm_ops = vms
    snapshots_before = {s.id for s in pool.list_snapshots().items}
    real = hv.disk_snapshot

    def slow_switch(dom: Any, overlays: Any, **kw: Any) -> None:
        # A switch that takes longer than the guest may stay frozen.
        time.sleep(2.0)
        real(dom, overlays, **kw)

    hv.disk_snapshot = slow_switch  # type: ignore[method-assign]
    t0 = time.monotonic()
    with pytest.raises(FreezeDeadlineExceeded, match="deadline of 1s"):
        vm_ops.snapshot(bench.name, "s3", parameters={"qsnap.csi.dev/freeze-deadline": "1s"})
    took = time.monotonic() - t0
    hv.disk_snapshot = real  # type: ignore[method-assign]
    assert bench.vm.fsfreeze_status() == "thawed"
    failed = vm_ops.list(bench.name)[-1]
    assert failed.name == "s3" and failed.status == FAILED and "deadline" in failed.error
    assert {s.id for s in pool.list_snapshots().items} == snapshots_before
    # The domain did switch (late): its volumes keep the new tops, no
    # snapshot records them, and no file is orphaned.
    assert catalog_tops(pool, bench.volumes) == domain_tops(hv, bench.vm.uuid)
    no_orphans(pool)
    assert not bench.state_file.exists()
    print(f"\ndeadline 1s overrun: failed after {took:.1f}s")


def test_a_paused_domain_is_cut_online_without_a_freeze(
        bench: Bench, vms: tuple[Pool, Hypervisor, VirtualMachines]) -> None:
    _pool, _hv, vm_ops = vms
    bench.vm.dom.suspend()
    try:
        snap = vm_ops.snapshot(bench.name, "paused")
    finally:
        bench.vm.dom.resume()
    assert snap.status == READY and snap.online
    assert snap.indications == ("Online", "Paused")
    vm_ops.delete(snap.id)


def test_a_hung_agent_is_thawed_at_the_deadline_and_the_snapshot_fails(
        bench: Bench, vms: tuple[Pool, Hypervisor, VirtualMachines]) -> None:
    pool, hv, vm_ops = vms
    snapshots_before = {s.id for s in pool.list_snapshots().items}
    tops_before = catalog_tops(pool, bench.volumes)
    real = hv.fs_freeze

    def freeze_a_hung_agent(dom: Any) -> int:
        # The agent answered the ping; now it hangs (SIGSTOP) before the
        # freeze reaches it, and comes back 6 s later.  libvirt waits for
        # it, the watchdog's thaw waits behind that call, and the freeze
        # the agent finally runs must still be undone.
        bench.vm.spawn("sleep 0.2; p=$(pidof qemu-ga); kill -STOP $p; sleep 6; kill -CONT $p")
        time.sleep(0.8)
        return real(dom)

    hv.fs_freeze = freeze_a_hung_agent  # type: ignore[method-assign]
    t0 = time.monotonic()
    try:
        with pytest.raises(FreezeDeadlineExceeded, match="deadline of 2s"):
            vm_ops.snapshot(bench.name, "hung", parameters={"qsnap.csi.dev/freeze-deadline": "2s"})
    finally:
        hv.fs_freeze = real  # type: ignore[method-assign]
    took = time.monotonic() - t0
    bench.vm.wait_agent(True, 30)
    assert bench.vm.fsfreeze_status() == "thawed"
    failed = vm_ops.list(bench.name)[-1]
    assert failed.name == "hung" and failed.status == FAILED and "deadline" in failed.error
    # The deadline passed before any switch: nothing was cut or left.
    assert {s.id for s in pool.list_snapshots().items} == snapshots_before
    assert catalog_tops(pool, bench.volumes) == tops_before == domain_tops(hv, bench.vm.uuid)
    no_orphans(pool)
    assert not bench.state_file.exists()
    print(f"\nhung agent: deadline 2s, failed and thawed after {took:.1f}s")


KILLED_DRIVER = """
import os, sys
sys.path.insert(0, sys.argv[1] + "/tests/vm")
from pathlib import Path
from engine.domains import DomainOwner
import test_vm_snapshots as t

class DiesInTheWindow(DomainOwner):
    def switch(self, cuts, *, freeze):
        print("frozen", flush=True)
        os._exit(9)         # the driver dies with the guest frozen

pool, hv, vms = t.open_pool(Path(sys.argv[2]), Path(sys.argv[3]))
pool.attach_owner(t.Owner.DOMAIN, DiesInTheWindow(hv, pool.layout))
vms.snapshot(sys.argv[4], "killed")
"""


def test_a_driver_killed_while_the_guest_is_frozen_thaws_it_when_restarted(
        bench: Bench) -> None:
    done = subprocess.run(
        [sys.executable, "-c", KILLED_DRIVER, str(ROOT), str(bench.root), str(bench.state_file),
         bench.name], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 9 and done.stdout == "frozen\n", done.stderr
    assert bench.state_file.exists()
    assert bench.vm.fsfreeze_status() == "frozen"
    # The restarted driver: recovery undoes the cut (the domain still
    # writes the old tops) and thaws the guest.
    pool, hv, vm_ops = open_pool(bench.root, bench.state_file)
    try:
        assert bench.vm.fsfreeze_status() == "thawed"
        assert not bench.state_file.exists()
        assert catalog_tops(pool, bench.volumes) == domain_tops(hv, bench.vm.uuid)
        no_orphans(pool)
        vm_ops.recover()
        assert [s.status for s in vm_ops.list(bench.name) if s.name == "killed"] == [FAILED]
    finally:
        pool.close()
        hv.close()


def test_restore_and_clone_boot_on_the_data_of_the_snapshot(
        host: Host, bench: Bench, vms: tuple[Pool, Hypervisor, VirtualMachines]) -> None:
    pool, hv, vm_ops = vms
    [s1] = [s for s in vm_ops.list(bench.name) if s.name == "s1"]
    with pytest.raises(VmRunning, match="stop it"):
        vm_ops.restore(s1.id)
    bench.vm.dom.destroy()      # transient: the domain is gone with it

    restored = vm_ops.restore(s1.id)
    assert (restored.domain_name, restored.domain_uuid) == (bench.name, bench.vm.uuid)
    assert set(restored.volumes) == {"vda", "vdb"} and restored.replaced == {}
    dom = hv.lookup(restored.domain_uuid)
    hv.start(dom)
    again = Guest(bench.name, restored.domain_uuid, dom, bench.root, bench.vm.disk,
                  bench.root / "console.log", 0.0)
    again.wait_agent(True, 120)
    assert again.sh("cat /mnt/data1/marker /mnt/data2/marker") == "before\nbefore\n"
    # A disk hot-plugged into the running, now persistent domain is not in
    # its persistent definition: a restore could not attach it, so the
    # snapshot leaves it out, and only once the user accepts that.
    import libvirt
    hot = pool.create_volume("hot", required_bytes=16 << 20)
    dom.attachDeviceFlags(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{pool.layout.layer_path(hot.top_layer)}'/>"
        f"<target dev='vdc' bus='virtio'/></disk>", libvirt.VIR_DOMAIN_AFFECT_LIVE)
    with pytest.raises(FailedPrecondition, match="vdc .*hot-plugged"):
        vm_ops.snapshot(bench.name, "hotplug")
    accepted = vm_ops.snapshot(bench.name, "hotplug", accept_warnings=True)
    assert accepted.status == READY and [d.target for d in accepted.disks] == ["vda", "vdb"]
    assert [(d.target, d.reason) for d in accepted.excluded] == [
        ("vdc", "hot-plugged: absent from the persistent definition")]
    assert accepted.warnings and "vdc" in accepted.warnings[0]
    # Restoring the stopped, now persistent VM again reports the volumes it
    # stops using; they are kept.
    hv.destroy(dom)
    offline = vm_ops.snapshot(bench.name, "offline")
    assert offline.status == READY and not offline.online
    assert offline.indications == ("Offline",)
    # The stopped domain's definition follows its volumes to their new tops
    # (it would otherwise start on the snapshot's layers).
    assert {d.target: os.path.realpath(d.source) for d in disks(hv.xml(dom, inactive=True))} \
        == catalog_tops(pool, (restored.volumes["vda"], restored.volumes["vdb"]))
    second = vm_ops.restore(s1.id)
    assert second.replaced == restored.volumes
    assert all(pool.get_volume(v) for v in second.replaced.values())
    with pytest.raises(InUse, match="stopped domain"):
        pool.delete_volume(second.volumes["vda"])

    clone_name = f"qsnap-test-clone-{os.getpid()}"
    cloned = vm_ops.clone(s1.id, clone_name, start=True)
    assert cloned.domain_uuid != bench.vm.uuid
    clone_dom = hv.lookup(cloned.domain_uuid)
    clone = Guest(clone_name, cloned.domain_uuid, clone_dom, bench.root, bench.vm.disk,
                  bench.root / "console.log", 0.0)
    clone.wait_agent(True, 120)
    assert clone.sh("cat /mnt/data1/marker /mnt/data2/marker") == "before\nbefore\n"
    macs = re.findall(r"<mac address='([^']+)'", hv.xml(clone_dom))
    assert macs and MAC not in macs
    assert set(cloned.volumes.values()).isdisjoint(second.volumes.values())
    hv.destroy(clone_dom)

    vm_ops.delete(s1.id)
    assert s1.id not in {s.id for s in vm_ops.list()}
    assert all(pool.get_volume(v) for v in cloned.volumes.values())   # clones keep their data
