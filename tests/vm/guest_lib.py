"""A real guest for the VM tests: built by ``hack/guest/build.sh``, run by a
libvirtd that ``hack/libvirt.sh`` starts when none answers, booted under TCG
as a transient ``<domain type='qemu'>`` with one ext4 qcow2 data disk and
the guest agent channel, and reached through the agent (``guest-exec``).

One guest boots per test session (``guest`` fixture) and the tests reuse it;
each test gets it thawed and with an answering agent (``vm`` fixture).

This file is not a conftest (a second ``conftest`` module name would clash
with the suite's): the test module imports the fixtures from it by name.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

URI = os.environ.get("QSNAP_LIBVIRT_URI", "qemu:///system")
CACHE = Path(os.environ.get("QSNAP_GUEST_CACHE", "/var/tmp/qsnap-guest"))
BOOT_TIMEOUT_S = 120.0
DISK_MIB = 64


@dataclass
class Guest:
    """A running test guest: its libvirt domain and the agent helpers."""

    name: str
    uuid: str
    dom: Any
    workdir: Path
    disk: Path            # the qcow2 data disk (vda in the guest, /mnt/data1)
    console: Path
    boot_s: float         # domain start → first answered guest-ping

    def agent(self, command: str, arguments: dict[str, Any] | None = None,
              timeout_s: int = 10) -> Any:
        """Run one agent command; return its ``return`` value."""
        import libvirt_qemu
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        reply = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(request), timeout_s, 0)
        return json.loads(reply)["return"]

    def ping(self, timeout_s: int = 2) -> bool:
        import libvirt
        try:
            self.agent("guest-ping", timeout_s=timeout_s)
            return True
        except libvirt.libvirtError:
            return False

    def wait_agent(self, up: bool = True, timeout_s: float = 60.0) -> float:
        """Wait until the agent answers (``up``) or stops answering; return
        the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.ping() == up:
                return time.monotonic() - t0
            time.sleep(0.2)
        raise AssertionError(f"guest agent of {self.name} still {'silent' if up else 'answering'} "
                             f"after {timeout_s:.0f}s; console:\n{self.console_tail()}")

    def fsfreeze_status(self) -> str:
        """``frozen`` or ``thawed``: allowed while frozen, unlike guest-exec."""
        return str(self.agent("guest-fsfreeze-status"))

    def spawn(self, script: str) -> int:
        """Start ``sh -c script`` in the guest; return its pid."""
        ret = self.agent("guest-exec", {"path": "/bin/sh", "arg": ["-c", script],
                                        "capture-output": True})
        return int(ret["pid"])

    def status(self, pid: int) -> dict[str, Any]:
        return dict(self.agent("guest-exec-status", {"pid": pid}))

    def wait(self, pid: int, timeout_s: float = 60.0) -> tuple[int, str, str]:
        """Wait for a spawned command; return exit code, stdout, stderr."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            st = self.status(pid)
            if st.get("exited"):
                out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
                return int(st.get("exitcode", -1)), out, err
            time.sleep(0.1)
        raise AssertionError(f"guest command {pid} still running after {timeout_s:.0f}s")

    def sh(self, script: str, timeout_s: float = 60.0) -> str:
        """Run ``sh -c script`` in the guest; return stdout; fail on a
        non-zero exit."""
        code, out, err = self.wait(self.spawn(script), timeout_s)
        assert code == 0, f"guest: {script!r} exited {code}: {err}"
        return out

    def console_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no console log: {e})"


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)


def domain_xml(name: str, kernel: Path, initrd: Path, disks: list[Path], console: Path, *,
               agent_channel: bool = True, cmdline: str = "console=ttyS0 quiet",
               extra_devices: str = "") -> str:
    """A transient TCG domain booting the test guest's kernel and initramfs."""
    disk_xml = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{d}'/><target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
        for i, d in enumerate(disks))
    channel = ("<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>"
               "</channel>") if agent_channel else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>384</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>{shutil.which('qemu-system-x86_64')}</emulator>
    {disk_xml}
    {channel}
    {extra_devices}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def _mkfs_raw(raw: Path, mib: int) -> None:
    with open(raw, "wb") as f:
        f.truncate(mib << 20)
    done = _run(["mkfs.ext4", "-q", "-F", "-L", "qsnapdata", str(raw)], 120)
    assert done.returncode == 0, f"mkfs.ext4 failed: {done.stderr}"


def make_ext4_qcow2(path: Path, mib: int = DISK_MIB) -> None:
    """An ext4 data disk made on the host: mkfs.ext4 on a raw file, then
    converted to qcow2 (the guest has no mkfs)."""
    raw = path.with_suffix(".raw")
    _mkfs_raw(raw, mib)
    done = _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                120)
    assert done.returncode == 0, f"qemu-img convert failed: {done.stderr}"
    raw.unlink()
    # QEMU runs as libvirt-qemu; libvirt's dynamic ownership relabels the
    # file, but a world-writable mode keeps it usable if that is turned off.
    path.chmod(0o666)


def fill_ext4(top: Path | str, scratch: Path, mib: int = DISK_MIB) -> None:
    """Write an empty ext4 filesystem into an existing qcow2 image (a
    closed volume's top): made on a raw file in ``scratch``, copied in
    with ``qemu-img convert -n``."""
    raw = scratch / f"{Path(top).stem}.raw"
    _mkfs_raw(raw, mib)
    done = _run(["qemu-img", "convert", "-n", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                 str(top)], 120)
    assert done.returncode == 0, f"qemu-img convert failed: {done.stderr}"
    raw.unlink()


def fresh_dir(name: str) -> Path:
    """An empty directory ``CACHE/name`` that libvirt-qemu can traverse
    (mode 0755), for pools and consoles of VM tests."""
    CACHE.mkdir(parents=True, exist_ok=True)
    CACHE.chmod(0o755)
    path = CACHE / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return path


def remove_domain(dom: Any) -> bool:
    """Power a test domain off and undefine it if persistent; False if
    libvirt refused (it is gone already, or libvirtd went away)."""
    import libvirt
    try:
        if dom.isActive():
            dom.destroy()       # a transient domain is gone with this
        if dom.isPersistent():
            dom.undefine()
    except libvirt.libvirtError:
        return False
    return True


def _destroy_stale_guests(conn: Any) -> None:
    """Destroy (and undefine) test guests of test processes that died
    without cleaning up (a domain outlives both its creator and libvirtd),
    and their run directories.  Only names this module's users make
    (``qsnap-test...-PID``) are touched."""
    for dom in conn.listAllDomains(0):
        prefix, _, pid = dom.name().rpartition("-")
        if prefix.startswith("qsnap-test") and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            if remove_domain(dom):
                shutil.rmtree(CACHE / f"run-{pid}", ignore_errors=True)


@dataclass
class Host:
    """A machine that can boot the test guest: its image and libvirt."""

    image: Path            # vmlinuz and initrd.gz
    conn: Any              # a libvirt connection


@pytest.fixture(scope="session")
def host() -> Iterator[Host]:
    """Build the guest image and start libvirt if needed (stopped at the
    end if it was started here); skip, saying why, where no guest can boot."""
    if os.geteuid() != 0:
        pytest.skip("VM tests need root (libvirtd, qemu:///system)")
    try:
        import libvirt
    except ImportError:
        pytest.skip("libvirt-python is not installed (pip install -e '.[test]')")
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("virsh", "libvirt-clients"),
                          ("libvirtd", "libvirt-daemon-system"), ("mkfs.ext4", "e2fsprogs")):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (Debian package {package}; hack/install.sh)")

    CACHE.mkdir(parents=True, exist_ok=True)
    CACHE.chmod(0o755)    # libvirt-qemu must traverse to the kernel and disks
    image = CACHE / "image"
    built = _run([str(ROOT / "hack/guest/build.sh"), str(image)], 300)
    if built.returncode != 0:
        pytest.skip(f"no test guest can be built here: {built.stderr.strip()}")

    libvirt_sh = str(ROOT / "hack/libvirt.sh")
    answered_before = _run(["virsh", "-c", URI, "version"], 30).returncode == 0
    if not answered_before:
        started = _run([libvirt_sh, "start"], 90)
        if started.returncode != 0:
            pytest.skip(f"libvirtd cannot be started here: {started.stderr.strip()}")
    # libvirt-python prints every error to stderr by default; the tests
    # expect many (pings of a silent agent) and read them from exceptions.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(URI)
    _destroy_stale_guests(conn)
    try:
        yield Host(image, conn)
    finally:
        conn.close()
        if not answered_before:
            _run([libvirt_sh, "stop"], 60)


def boot(host: Host, name: str, xml: str, workdir: Path, disk: Path, *,
         define: bool = False) -> Guest:
    """Start a domain from ``xml`` (transient, or defined first) and wait
    for its agent; skip if libvirt cannot start a TCG guest here."""
    import libvirt
    t0 = time.monotonic()
    try:
        if define:
            dom = host.conn.defineXML(xml)
            dom.create()
        else:
            dom = host.conn.createXML(xml, 0)
    except libvirt.libvirtError as e:
        pytest.skip(f"libvirt cannot start a TCG guest here: {e.get_error_message()}")
    vm = Guest(name, dom.UUIDString(), dom, workdir, disk, workdir / "console.log", 0.0)
    vm.wait_agent(True, BOOT_TIMEOUT_S)
    vm.boot_s = time.monotonic() - t0
    print(f"\nguest {name} booted in {vm.boot_s:.1f}s (domain start to guest-ping)")
    return vm


@pytest.fixture(scope="session")
def guest(host: Host) -> Iterator[Guest]:
    """One guest for the whole session, on a plain qcow2 data disk."""
    workdir = fresh_dir(f"run-{os.getpid()}")
    disk = workdir / "data1.qcow2"
    make_ext4_qcow2(disk)
    console = workdir / "console.log"
    name = f"qsnap-test-{os.getpid()}"
    vm = None
    try:
        xml = domain_xml(name, host.image / "vmlinuz", host.image / "initrd.gz", [disk], console,
                         cmdline="console=ttyS0 quiet qsnap.writer=1")
        vm = boot(host, name, xml, workdir, disk)
        yield vm
    finally:
        if vm is not None:
            remove_domain(vm.dom)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def vm(guest: Guest) -> Iterator[Guest]:
    """The session's guest, with its agent answering and its filesystems
    thawed before and after the test (a failed test leaves nothing frozen)."""
    guest.wait_agent(True, 60)
    guest.dom.fsThaw()
    yield guest
    guest.wait_agent(True, 60)
    guest.dom.fsThaw()
