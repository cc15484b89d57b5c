"""Freezing guests' filesystems through the QEMU guest agent around a cut.

Every libvirt call goes through the libvirt adapter (``engine/virt.py``);
this module holds the freeze's rules:

* a guest is **always** thawed: ``dom.fsThaw()`` runs in a ``finally``, with
  no mountpoint list (libvirt rejects a list for thaw), and a watchdog
  thread thaws at the deadline even while the caller is still inside the
  ``with`` block;
* before the first freeze the domains about to be frozen are written to a
  small JSON state file; it is removed only once every one of them is
  thawed, so a driver that died in between can thaw them when it restarts
  (:meth:`Freezer.thaw_leftovers`);
* a guest without an answering agent is never waited on: availability is a
  ``guest-ping`` with a short timeout, and the policy decides whether the
  cut goes on crash-consistent (``preferred``) or fails (``required``).

No global state: each :class:`Freezer` has its own hypervisor connection,
each :meth:`Freezer.frozen` call its own session and watchdog.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import EngineError, FailedPrecondition, InvalidArgument
from engine.virt import (DEFAULT_URI, DomainError, DomainState, DomainUse, Hypervisor,
                         HypervisorUnavailable, NoSuchDomain, disk_sources)

__all__ = ["DEFAULT_URI", "DomainUse", "Freezer", "FreezeSession", "HypervisorUnavailable",
           "Indication", "Policy", "disk_sources", "parse_deadline"]

log = logging.getLogger(__name__)

# Long enough for an agent under TCG that is busy flushing; short enough
# that a dead agent costs the snapshot little (libvirt itself waits ~5 s).
DEFAULT_PING_TIMEOUT_S = 2
# The failure deadline's default (issue 4: "default 5m").
DEFAULT_DEADLINE_S = 300.0
STATE_VERSION = 1


# -- errors ---------------------------------------------------------------

class FreezeError(EngineError):
    """libvirt or a guest agent failed while coordinating a freeze."""


class GuestAgentUnavailable(FailedPrecondition, FreezeError):
    """Policy ``required``, and a domain's guest agent does not answer (or
    the domain is paused, so no agent can freeze it)."""


class FreezeFailed(FreezeError):
    """Policy ``required``, the agent answered, but freezing failed."""


class FreezeDeadlineExceeded(FreezeError):
    """The deadline passed while guests were frozen: the watchdog thawed
    them, and a cut made in the window is not application-consistent.
    ``indications`` holds what happened, ``QuiesceTimeout`` included."""

    def __init__(self, message: str, *, indications: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.indications = indications


class ThawFailed(FreezeError):
    """A guest could not be thawed; its domain stays in the state file so
    that :meth:`Freezer.thaw_leftovers` retries."""


class FreezeStateCorrupt(FreezeError):
    """The freeze state file cannot be read; an operator must check the
    domains it may name (``virsh domfsfreeze``/``domfsthaw``)."""


# -- vocabulary -------------------------------------------------------------

class Policy(str, enum.Enum):
    """How a snapshot treats a guest agent (a VolumeSnapshotClass parameter)."""

    REQUIRED = "required"      # no agent or a failed freeze fails the snapshot
    PREFERRED = "preferred"    # freeze when possible, else crash-consistent
    DISABLED = "disabled"      # never freeze

    @classmethod
    def parse(cls, text: str | None) -> Policy:
        """``None`` or empty gives ``preferred``.

        :raises InvalidArgument: not one of required/preferred/disabled.
        """
        if not text:
            return cls.PREFERRED
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise InvalidArgument(
                f"guest agent policy {text!r}: use required, preferred or disabled") from None


class Indication(str, enum.Enum):
    """What happened to a domain around a cut (recorded per snapshot)."""

    ONLINE = "Online"                  # the domain was running (or paused): a live cut
    GUEST_AGENT = "GuestAgent"         # the agent froze the guest's filesystems
    NO_GUEST_AGENT = "NoGuestAgent"    # no agent answered: crash-consistent
    QUIESCE_FAILED = "QuiesceFailed"   # the agent answered but the freeze failed
    QUIESCE_TIMEOUT = "QuiesceTimeout"  # the deadline passed while frozen
    PAUSED = "Paused"                  # the domain was paused: not frozen
    QUIESCE_DISABLED = "QuiesceDisabled"  # policy disabled: not frozen


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_deadline(text: str | None) -> float | None:
    """The failure deadline in seconds: ``30s``, ``5m``, ``1h``, ``500ms``, a
    bare number (seconds); ``0`` means none (``None``); empty gives 5 m.

    :raises InvalidArgument: anything else.
    """
    if text is None or not str(text).strip():
        return DEFAULT_DEADLINE_S
    m = _DURATION.match(str(text))
    if not m:
        raise InvalidArgument(f"deadline {text!r}: use e.g. 30s, 5m, a number of seconds, or 0")
    value = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return None if value == 0 else value


# -- records ----------------------------------------------------------------

@dataclass
class DomainFreeze:
    """The outcome for one domain in a freeze session."""

    use: DomainUse
    indications: list[Indication] = field(default_factory=list)
    frozen_filesystems: int = 0
    freeze_s: float = 0.0        # how long dom.fsFreeze() took
    thaw_s: float = 0.0          # how long dom.fsThaw() took
    frozen_at: float | None = None   # monotonic, when the freeze returned
    thawed_at: float | None = None   # monotonic, when the thaw returned
    error: str = ""

    @property
    def frozen_window_s(self) -> float | None:
        """Freeze returned → thaw returned, if the domain was frozen."""
        if self.frozen_at is None or self.thawed_at is None:
            return None
        return self.thawed_at - self.frozen_at


@dataclass
class FreezeSession:
    """What :meth:`Freezer.frozen` yields; read it inside and after the block."""

    policy: Policy
    deadline_s: float | None
    started_at: float
    domains: list[DomainFreeze] = field(default_factory=list)
    expired: bool = False

    @property
    def indications(self) -> tuple[str, ...]:
        """The union over all domains, in a stable order."""
        seen = {i for d in self.domains for i in d.indications}
        return tuple(i.value for i in Indication if i in seen)

    def remaining_s(self) -> float | None:
        if self.deadline_s is None:
            return None
        return self.deadline_s - (time.monotonic() - self.started_at)

    def indications_for(self, volume_id: str) -> tuple[str, ...]:
        """The union over the domains that use one volume."""
        seen = {i for d in self.domains if volume_id in d.use.volume_ids for i in d.indications}
        return tuple(i.value for i in Indication if i in seen)

    def frozen_window_s(self) -> float | None:
        """The longest freeze → thaw window among the domains (after the
        block; None when nothing was frozen)."""
        windows = [w for d in self.domains if (w := d.frozen_window_s) is not None]
        return max(windows) if windows else None

    def check(self) -> None:
        """Call before committing a cut made inside the block.

        :raises FreezeDeadlineExceeded: the watchdog has already thawed.
        """
        if self.expired:
            raise FreezeDeadlineExceeded(
                f"the freeze deadline of {self.deadline_s:g}s passed; the guests were thawed",
                indications=self.indications)


# -- the adapter ------------------------------------------------------------

class Freezer:
    """Coordinates guest freezes through one libvirt connection.

    :param hypervisor: the libvirt adapter, or a URI to open one on
        (``qemu:///system`` by default); a URI-made one is closed by
        :meth:`close`.
    :param ping_timeout_s: how long an agent may take to answer ``guest-ping``.
    """

    def __init__(self, hypervisor: Hypervisor | str = DEFAULT_URI, *,
                 ping_timeout_s: int = DEFAULT_PING_TIMEOUT_S) -> None:
        self._owns_hypervisor = isinstance(hypervisor, str)
        self.hypervisor = Hypervisor(hypervisor) if isinstance(hypervisor, str) else hypervisor
        self.ping_timeout_s = max(1, int(ping_timeout_s))

    @property
    def uri(self) -> str:
        return self.hypervisor.uri

    def close(self) -> None:
        if self._owns_hypervisor:
            self.hypervisor.close()

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def domains_using(self, volumes: Mapping[str, Iterable[str | os.PathLike[str]]]
                      ) -> list[DomainUse]:
        """The active domains whose disks use any of the given paths
        (:meth:`Hypervisor.domains_using`).

        :raises HypervisorUnavailable: libvirt cannot be reached.
        """
        return self.hypervisor.domains_using(volumes)

    # -- freezing ------------------------------------------------------------

    @contextlib.contextmanager
    def frozen(self, uses: Iterable[DomainUse], *, deadline_s: float | None,
               policy: Policy, state_file: Path) -> Iterator[FreezeSession]:
        """Freeze the filesystems of every domain in ``uses`` for the
        duration of the ``with`` block; always thaw.

        ``deadline_s`` (``None`` or 0: none) counts from entry: when it
        passes, a watchdog thread thaws every guest even if the block is
        still running, :attr:`FreezeSession.expired` turns true, and the
        block's exit raises :class:`FreezeDeadlineExceeded`.

        Domains that are not active get nothing (no ``Online``).  A paused
        domain is not frozen (``Online``, ``Paused``).  Policy ``disabled``:
        ``Online``, ``QuiesceDisabled``.  Otherwise a domain whose agent does
        not answer gets ``NoGuestAgent`` (policy ``preferred``) and one whose
        freeze fails ``QuiesceFailed``; a frozen one gets ``GuestAgent``.

        :raises GuestAgentUnavailable: policy required, a domain has no
            answering agent or is paused (nothing was frozen or all is thawed).
        :raises FreezeFailed: policy required, a freeze failed (all thawed).
        :raises FreezeDeadlineExceeded: the deadline passed (all thawed).
        :raises ThawFailed: a guest could not be thawed; it stays recorded
            in ``state_file`` for :meth:`thaw_leftovers`.
        :raises HypervisorUnavailable: libvirt cannot be reached.
        """
        hv = self.hypervisor
        if deadline_s is not None and deadline_s <= 0:
            deadline_s = None
        session = FreezeSession(policy=policy, deadline_s=deadline_s,
                                started_at=time.monotonic())
        to_freeze: list[tuple[DomainFreeze, Any]] = []
        for use in uses:
            try:
                dom = hv.lookup(use.uuid)
                state = hv.state(dom)
            except NoSuchDomain:
                # A transient domain that stopped since it was found.
                log.info("%s no longer exists: offline cut, no freeze", use.label())
                continue
            except DomainError as e:
                raise FreezeError(f"{use.label()}: {e.detail}") from e
            if state not in (DomainState.RUNNING, DomainState.PAUSED):
                log.info("%s is not running: offline cut, no freeze", use.label())
                continue
            result = DomainFreeze(use, [Indication.ONLINE])
            session.domains.append(result)
            if state is DomainState.PAUSED:
                result.indications.append(Indication.PAUSED)
                if policy is Policy.REQUIRED:
                    raise GuestAgentUnavailable(
                        f"{use.label()} is paused: its guest agent cannot freeze it "
                        "(policy required); resume it or use policy preferred")
                continue
            if policy is Policy.DISABLED:
                result.indications.append(Indication.QUIESCE_DISABLED)
                continue
            if not hv.agent_ping(dom, self.ping_timeout_s):
                if policy is Policy.REQUIRED:
                    raise GuestAgentUnavailable(
                        f"{use.label()}: the guest agent does not answer (policy required); "
                        "start qemu-ga in the guest or use policy preferred")
                log.warning("%s: no guest agent, the cut is crash-consistent", use.label())
                result.indications.append(Indication.NO_GUEST_AGENT)
                continue
            to_freeze.append((result, dom))

        if not to_freeze:
            yield session
            return

        # Recorded before the first freeze: a crash from here on leaves a
        # file naming every guest that may be frozen.
        _write_state(state_file, self.uri, [r.use for r, _ in to_freeze])
        lock = threading.Lock()
        needs_thaw: list[tuple[DomainFreeze, Any]] = []
        stop = threading.Event()

        def thaw_all(why: str) -> list[str]:
            failures: list[str] = []
            with lock:
                while needs_thaw:
                    result, dom = needs_thaw[0]
                    try:
                        self._thaw(dom, result, why)
                    except ThawFailed as e:
                        failures.append(str(e))
                    needs_thaw.pop(0)
            return failures

        watchdog_failures: list[str] = []

        def watchdog() -> None:
            # The deadline counts from entry, agent pings included.
            remaining = session.remaining_s()
            assert remaining is not None
            if stop.wait(max(0.0, remaining)):
                return
            with lock:
                session.expired = True
            log.error("freeze deadline of %gs passed: thawing %s", deadline_s,
                      ", ".join(r.use.label() for r, _ in to_freeze))
            watchdog_failures.extend(thaw_all("deadline"))

        dog: threading.Thread | None = None
        if deadline_s is not None:
            dog = threading.Thread(target=watchdog, name="qsnap-freeze-watchdog", daemon=True)
            dog.start()
        failures: list[str] = []
        try:
            for result, dom in to_freeze:
                with lock:
                    if session.expired:
                        break
                    # Listed before the call: a freeze that times out in
                    # libvirt may still complete in the guest later.
                    needs_thaw.append((result, dom))
                self._freeze(dom, result, policy)
            if session.expired:
                session.check()
            yield session
        finally:
            stop.set()
            if dog is not None:
                dog.join()
            failures = thaw_all("done") + watchdog_failures
            if session.expired:
                for result, _ in to_freeze:
                    if Indication.QUIESCE_TIMEOUT not in result.indications:
                        result.indications.append(Indication.QUIESCE_TIMEOUT)
            if not failures:
                with contextlib.suppress(FileNotFoundError):
                    state_file.unlink()
            else:
                # Logged here too: an exception already propagating from
                # the block would otherwise hide that a guest stays frozen.
                log.error("guests left frozen, recorded in %s: %s", state_file,
                          "; ".join(failures))
        if failures:
            raise ThawFailed("; ".join(failures) + f" (recorded in {state_file})")
        session.check()

    def _freeze(self, dom: Any, result: DomainFreeze, policy: Policy) -> None:
        """Freeze one domain's filesystems; record the outcome in ``result``.

        :raises FreezeFailed: the freeze failed and the policy is required.
        """
        t0 = time.monotonic()
        try:
            count = self.hypervisor.fs_freeze(dom)
        except DomainError as e:
            result.freeze_s = time.monotonic() - t0
            result.error = e.detail
            if policy is Policy.REQUIRED:
                raise FreezeFailed(
                    f"{result.use.label()}: freezing its filesystems failed: {result.error}") from e
            log.warning("%s: freeze failed (%s); the cut is crash-consistent",
                        result.use.label(), result.error)
            result.indications.append(Indication.QUIESCE_FAILED)
            return
        result.frozen_at = time.monotonic()
        result.freeze_s = result.frozen_at - t0
        result.frozen_filesystems = int(count)
        result.indications.append(Indication.GUEST_AGENT)
        log.info("%s: froze %d filesystem(s) in %.1f ms", result.use.label(), count,
                 result.freeze_s * 1000)

    def _thaw(self, dom: Any, result: DomainFreeze | None, why: str) -> None:
        """Thaw every filesystem of a domain (no mountpoint list: libvirt
        does not support one for thaw).  A domain that is no longer running
        has nothing to thaw.

        :raises ThawFailed: the agent did not thaw it.
        """
        hv = self.hypervisor
        label = result.use.label() if result else f"domain {hv.name(dom)}"
        t0 = time.monotonic()
        try:
            hv.fs_thaw(dom)
        except DomainError as e:
            if not hv.is_active(dom):
                log.info("%s stopped while frozen: nothing to thaw", label)
                return
            raise ThawFailed(f"{label}: thaw failed: {e.detail}") from e
        if result is not None:
            result.thawed_at = time.monotonic()
            result.thaw_s = result.thawed_at - t0
        log.info("%s: thawed (%s) in %.1f ms", label, why, (time.monotonic() - t0) * 1000)

    def thaw_leftovers(self, state_file: Path) -> list[str]:
        """Thaw every domain a previous freezer recorded in ``state_file``
        (a driver that died while guests were frozen) and remove the file.
        Domains that no longer exist or run are skipped.  Returns the names
        of the domains thawed.

        :raises FreezeStateCorrupt: the file cannot be parsed.
        :raises ThawFailed: a running domain could not be thawed (the file
            is kept, naming only the domains still to thaw).
        :raises HypervisorUnavailable: libvirt cannot be reached.
        """
        hv = self.hypervisor
        try:
            raw = json.loads(state_file.read_text())
            recorded = [DomainUse(d["name"], d["uuid"], tuple(d["volume_ids"]), ())
                        for d in raw["domains"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FreezeStateCorrupt(f"freeze state {state_file} is unreadable: {e}") from e
        if raw.get("uri") not in (None, self.uri):
            log.warning("freeze state %s was written for %s; thawing through %s",
                        state_file, raw.get("uri"), self.uri)
        thawed: list[str] = []
        left: list[DomainUse] = []
        errors: list[str] = []
        for use in recorded:
            try:
                dom = hv.lookup(use.uuid)
            except NoSuchDomain:
                log.info("%s recorded as frozen no longer exists", use.label())
                continue
            except DomainError as e:
                errors.append(str(e))
                left.append(use)
                continue
            if not hv.is_active(dom):
                continue
            try:
                self._thaw(dom, None, "left over by a previous freezer")
                log.warning("%s was left frozen by a previous freezer: thawed", use.label())
                thawed.append(use.name)
            except ThawFailed as e:
                errors.append(str(e))
                left.append(use)
        if left:
            _write_state(state_file, self.uri, left)
            raise ThawFailed("; ".join(errors) + f" (still recorded in {state_file})")
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()
        return thawed


def _write_state(state_file: Path, uri: str, uses: list[DomainUse]) -> None:
    """Write the freeze state atomically and durably (temp file, fsync,
    rename, fsync of the directory): it must exist before the first freeze.

    :raises FreezeError: the file cannot be written (nothing was frozen).
    """
    doc = {
        "version": STATE_VERSION,
        "uri": uri,
        "pid": os.getpid(),
        "written_at": time.time(),
        "domains": [{"name": u.name, "uuid": u.uuid, "volume_ids": list(u.volume_ids)}
                    for u in uses],
    }
    tmp = state_file.with_name(state_file.name + ".tmp")
    try:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(doc, indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, state_file)
        dfd = os.open(state_file.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise FreezeError(f"cannot record the freeze state in {state_file}: {e}") from e
