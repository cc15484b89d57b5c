"""engine/freeze.py against a real guest: libvirtd, QEMU under TCG, qemu-ga
in a busybox initramfs, an ext4 data disk with a writer running inside.

What is checked: a freeze really blocks writes in the guest and the thaw
releases them; a guest without an agent is handled per policy; the watchdog
thaws at the deadline while the caller hangs; a freezer that dies while a
guest is frozen leaves a state file from which the guest is thawed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guest_lib import ROOT, URI, Guest, guest, host, vm  # noqa: E402,F401  (fixtures by name)

from engine.errors import InvalidArgument  # noqa: E402
from engine.freeze import (Freezer, FreezeDeadlineExceeded, FreezeStateCorrupt,  # noqa: E402
                           GuestAgentUnavailable, Policy, disk_sources, parse_deadline)


@pytest.fixture
def freezer() -> Iterator[Freezer]:
    f = Freezer(URI)
    yield f
    f.close()


# -- without a guest ---------------------------------------------------------

def test_deadline_and_policy_parameters() -> None:
    assert parse_deadline("30s") == 30
    assert parse_deadline("5m") == 300
    assert parse_deadline("500ms") == 0.5
    assert parse_deadline("12") == 12
    assert parse_deadline("0") is None
    assert parse_deadline("") == 300
    assert Policy.parse(None) is Policy.PREFERRED
    assert Policy.parse("Required") is Policy.REQUIRED
    for bad in ("5 minutes", "-1", "1d"):
        with pytest.raises(InvalidArgument):
            parse_deadline(bad)
    with pytest.raises(InvalidArgument, match="required, preferred or disabled"):
        Policy.parse("sometimes")


def test_disk_sources_include_block_devices_and_backing_chains() -> None:
    xml = """<domain><devices>
      <disk type='file'><source file='/p/top.qcow2'/>
        <backingStore type='file'><source file='/p/base.qcow2'/><backingStore/></backingStore>
        <target dev='vda'/></disk>
      <disk type='block'><source dev='/dev/loop7'/><target dev='vdb'/></disk>
      <disk type='network'><source protocol='nbd' name='x'/><target dev='vdc'/></disk>
    </devices></domain>"""
    assert disk_sources(xml) == [("vda", "/p/top.qcow2"), ("vda", "/p/base.qcow2"),
                                 ("vdb", "/dev/loop7")]


def test_an_unreadable_state_file_is_reported_not_guessed(tmp_path: Path) -> None:
    state = tmp_path / "freeze.json"
    assert Freezer("test:///default").thaw_leftovers(state) == []    # no file: nothing to do
    state.write_text("{not json")
    with pytest.raises(FreezeStateCorrupt, match="unreadable"):
        Freezer("test:///default").thaw_leftovers(state)
    assert state.exists()


# -- with the guest -----------------------------------------------------------

def test_finds_the_domain_by_its_disk_path_or_a_symlink(vm: Guest, freezer: Freezer,
                                                        tmp_path: Path) -> None:
    link = tmp_path / "link.qcow2"
    link.symlink_to(vm.disk)
    uses = freezer.domains_using({"vol-a": [link], "vol-b": [tmp_path / "nothing"]})
    assert [(u.name, u.volume_ids, u.targets) for u in uses] == [(vm.name, ("vol-a",), ("vda",))]


def test_freeze_blocks_guest_writes_until_thaw(vm: Guest, freezer: Freezer,
                                               tmp_path: Path) -> None:
    # guest-exec is refused while the agent has the guest frozen, so the
    # probe starts before the freeze: it appends and fsyncs a record every
    # 0.1 s and notes the guest's uptime after each one in /tmp (a ramfs,
    # never frozen).  A freeze shows up as one long gap.
    probe = vm.spawn("rm -f /tmp/probe.t; i=0; while [ $i -lt 30 ]; do "
                     "echo $i >> /mnt/data1/probe && sync /mnt/data1/probe; "
                     "cut -d' ' -f1 /proc/uptime >> /tmp/probe.t; usleep 100000; "
                     "i=$((i+1)); done")
    time.sleep(0.5)
    log_before = int(vm.sh("wc -c < /mnt/data1/log"))
    state = tmp_path / "freeze.json"
    [use] = freezer.domains_using({"vol-1": [vm.disk]})
    hold_s = 2.5
    with freezer.frozen([use], deadline_s=30, policy=Policy.PREFERRED,
                        state_file=state) as session:
        assert state.exists()
        assert session.indications == ("Online", "GuestAgent")
        assert session.domains[0].frozen_filesystems == 1    # /mnt/data1
        assert vm.fsfreeze_status() == "frozen"
        time.sleep(hold_s)
        session.check()
    result = session.domains[0]
    assert not state.exists()
    assert vm.fsfreeze_status() == "thawed"
    code, out, err = vm.wait(probe, 60)
    assert code == 0, err
    stamps = [float(x) for x in vm.sh("cat /tmp/probe.t").split()]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert max(gaps) >= hold_s - 0.7, f"no write was held up by the freeze: gaps {gaps}"
    # The writer inside goes on after the thaw.
    time.sleep(0.5)
    assert int(vm.sh("wc -c < /mnt/data1/log")) > log_before
    print(f"\nfsFreeze {result.freeze_s * 1000:.1f} ms, fsThaw {result.thaw_s * 1000:.1f} ms, "
          f"longest blocked guest write {max(gaps):.2f}s for a {hold_s}s hold")


def test_without_an_agent_preferred_is_crash_consistent_required_fails(
        vm: Guest, freezer: Freezer, tmp_path: Path) -> None:
    # init restarts qemu-ga after the pause it finds in /run/qga.pause.
    vm.spawn("echo 15 > /run/qga.pause; sleep 0.5; kill $(pidof qemu-ga)")
    vm.wait_agent(False, 20)
    [use] = freezer.domains_using({"vol-1": [vm.disk]})
    state = tmp_path / "freeze.json"
    with freezer.frozen([use], deadline_s=30, policy=Policy.PREFERRED,
                        state_file=state) as session:
        assert session.indications == ("Online", "NoGuestAgent")
        assert not state.exists()
    with pytest.raises(GuestAgentUnavailable, match="does not answer"):
        with freezer.frozen([use], deadline_s=30, policy=Policy.REQUIRED, state_file=state):
            pytest.fail("entered the block without an agent under policy required")
    with freezer.frozen([use], deadline_s=30, policy=Policy.DISABLED,
                        state_file=state) as session:
        assert session.indications == ("Online", "QuiesceDisabled")
    assert not state.exists()
    vm.wait_agent(True, 60)


def test_a_hung_agent_is_not_waited_on(vm: Guest, freezer: Freezer, tmp_path: Path) -> None:
    # SIGSTOP keeps the agent's port open but nothing answers: the case
    # where libvirt alone would wait ~5 s per call.  The guest's shell
    # resumes it later.
    vm.spawn("sleep 0.5; p=$(pidof qemu-ga); kill -STOP $p; sleep 10; kill -CONT $p")
    time.sleep(1.5)
    [use] = freezer.domains_using({"vol-1": [vm.disk]})
    state = tmp_path / "freeze.json"
    t0 = time.monotonic()
    with freezer.frozen([use], deadline_s=30, policy=Policy.PREFERRED,
                        state_file=state) as session:
        assert session.indications == ("Online", "NoGuestAgent")
    took = time.monotonic() - t0
    assert took < freezer.ping_timeout_s + 1.5, f"waited {took:.1f}s on a hung agent"
    with pytest.raises(GuestAgentUnavailable):
        with freezer.frozen([use], deadline_s=30, policy=Policy.REQUIRED, state_file=state):
            pytest.fail("entered the block with a hung agent under policy required")
    assert not state.exists()
    vm.wait_agent(True, 60)
    print(f"\nhung agent detected in {took:.2f}s")


def test_watchdog_thaws_at_the_deadline_while_the_caller_hangs(
        vm: Guest, freezer: Freezer, tmp_path: Path) -> None:
    [use] = freezer.domains_using({"vol-1": [vm.disk]})
    state = tmp_path / "freeze.json"
    deadline = 1.5
    with pytest.raises(FreezeDeadlineExceeded) as caught:
        with freezer.frozen([use], deadline_s=deadline, policy=Policy.REQUIRED,
                            state_file=state) as session:
            assert vm.fsfreeze_status() == "frozen"
            t0 = time.monotonic()
            # The caller "hangs" past the deadline; the watchdog must act
            # without it.
            while vm.fsfreeze_status() == "frozen" and time.monotonic() - t0 < 10:
                time.sleep(0.1)
            thawed_after = time.monotonic() - session.started_at
            assert vm.fsfreeze_status() == "thawed"
            assert session.expired
            time.sleep(0.5)
    assert deadline <= thawed_after < deadline + 3
    assert "QuiesceTimeout" in caught.value.indications
    assert "GuestAgent" in caught.value.indications
    assert not state.exists()


CRASHING_FREEZER = """
import os, sys
from pathlib import Path
from engine.freeze import Freezer, Policy
f = Freezer(sys.argv[1])
[use] = f.domains_using({"vol-1": [sys.argv[2]]})
with f.frozen([use], deadline_s=0, policy=Policy.REQUIRED, state_file=Path(sys.argv[3])):
    sys.stdout.write("frozen\\n")
    sys.stdout.flush()
    os._exit(9)     # the driver dies with the guest frozen
"""


def test_a_restarted_freezer_thaws_what_a_dead_one_left_frozen(
        vm: Guest, freezer: Freezer, tmp_path: Path) -> None:
    state = tmp_path / "freeze.json"
    done = subprocess.run([sys.executable, "-c", CRASHING_FREEZER, URI, str(vm.disk), str(state)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 9 and done.stdout == "frozen\n", done.stderr
    assert state.exists()
    assert vm.fsfreeze_status() == "frozen"
    assert freezer.thaw_leftovers(state) == [vm.name]
    assert vm.fsfreeze_status() == "thawed"
    assert not state.exists()
    assert freezer.thaw_leftovers(state) == []
