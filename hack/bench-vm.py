#!/usr/bin/env python3
"""Frozen window and whole online VM snapshot latency (issue 4's benchmark).

Boots the test guest (hack/guest/build.sh) under TCG with qsnap volumes as
disks (two by default) and a writer inside that appends and fsyncs a record every ~50 ms,
then takes N VM snapshots through engine/vm.py, each with one guest-agent
freeze and one libvirt switch of both disks.  Prints p50/p99 of the frozen
window (fsFreeze returned → fsThaw returned) and of the whole snapshot.

Usage (root, libvirtd running: hack/libvirt.sh start):
    .venv/bin/python hack/bench-vm.py [--snapshots 25] [--disks 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "vm"))

from engine.domains import DomainOwner  # noqa: E402
from engine.freeze import Freezer  # noqa: E402
from engine.guests import GuestQuiescer  # noqa: E402
from engine.model import Owner  # noqa: E402
from engine.pool import Pool  # noqa: E402
from engine.virt import Hypervisor  # noqa: E402
from engine.vm import VirtualMachines  # noqa: E402
from guest_lib import CACHE, URI, domain_xml, fill_ext4  # noqa: E402

DISK_MIB = 64


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ext4_volume(pool: Pool, name: str) -> Path:
    volume = pool.create_volume(name, required_bytes=DISK_MIB << 20)
    top = pool.layout.layer_path(volume.top_layer)
    fill_ext4(top, pool.layout.root, DISK_MIB)
    return top


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--snapshots", type=int, default=25)
    p.add_argument("--disks", type=int, default=2, choices=range(1, 9), metavar="1..8",
                   help="qsnap volumes attached to the VM (default: %(default)s)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.snapshots < 1:
        p.error("--snapshots must be positive")
    import libvirt
    import libvirt_qemu
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    image = CACHE / "image"
    subprocess.run([str(ROOT / "hack/guest/build.sh"), str(image)], check=True,
                   stdout=subprocess.DEVNULL)
    root = CACHE / f"bench-vm-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(mode=0o755, parents=True)
    state_file = root / "frozen.json"
    pool = Pool.open(root / "pool")
    root.chmod(0o755)
    (root / "pool").chmod(0o755)
    hv = Hypervisor(URI)
    pool.attach_owner(Owner.DOMAIN, DomainOwner(hv, pool.layout))
    pool.attach_quiescer(GuestQuiescer(Freezer(hv), state_file))
    vms = VirtualMachines(pool, hv)
    windows: list[float] = []
    pool.add_observer(lambda event, s: windows.append(s) if event == "frozen" else None)
    dom = None
    try:
        tops = [ext4_volume(pool, f"disk{i + 1}") for i in range(args.disks)]
        name = f"qsnap-bench-vm-{os.getpid()}"
        xml = domain_xml(name, image / "vmlinuz", image / "initrd.gz", tops,
                         root / "console.log", cmdline="console=ttyS0 quiet qsnap.writer=1")
        dom = hv.connection().createXML(xml, 0)
        deadline = time.monotonic() + 180
        while True:
            try:
                libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 2, 0)
                break
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise SystemExit("bench-vm: the guest's agent never answered")
                time.sleep(0.3)
        time.sleep(2)       # the writer is running
        whole: list[float] = []
        indications: set[tuple[str, ...]] = set()
        for i in range(args.snapshots):
            t0 = time.monotonic()
            snap = vms.snapshot(name, f"bench-{i}")
            whole.append(time.monotonic() - t0)
            indications.add(snap.indications)
            time.sleep(0.2)
        result = {
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{platform.platform()}",
            "command": " ".join(sys.argv),
            "snapshots": args.snapshots,
            "disks": args.disks,
            "indications": sorted(list(i) for i in indications),
            "frozen_window_ms": {"p50": percentile(windows, 0.5) * 1000,
                                 "p99": percentile(windows, 0.99) * 1000,
                                 "max": max(windows) * 1000,
                                 "mean": statistics.mean(windows) * 1000},
            "snapshot_ms": {"p50": percentile(whole, 0.5) * 1000,
                            "p99": percentile(whole, 0.99) * 1000,
                            "max": max(whole) * 1000},
        }
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            fw, sn = result["frozen_window_ms"], result["snapshot_ms"]
            print(f"{args.snapshots} online VM snapshots ({args.disks} disk(s), writer in the "
                  "guest, TCG)")
            print(f"  frozen window  p50 {fw['p50']:7.1f} ms  p99 {fw['p99']:7.1f} ms  "
                  f"max {fw['max']:7.1f} ms")
            print(f"  whole snapshot p50 {sn['p50']:7.1f} ms  p99 {sn['p99']:7.1f} ms  "
                  f"max {sn['max']:7.1f} ms")
            print(f"  indications: {result['indications']}")
        return 0
    finally:
        if dom is not None:
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass
        pool.close()
        hv.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
