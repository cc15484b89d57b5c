"""Quiescing the guests that use volumes around a cut: the pool's
:class:`~engine.model.Quiescer`, built on the freeze rules of
``engine/freeze.py`` and the libvirt adapter of ``engine/virt.py``.

The pool hands over, per volume, every path a guest could reach it by (the
top layer file, the device the node serves, block publications); the
domains whose disks use any of them are frozen for the switch and thawed
right after it.  The snapshot's parameters choose the policy
(``qsnap.csi.dev/guest-agent``) and the deadline
(``qsnap.csi.dev/freeze-deadline``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from engine.freeze import (Freezer, FreezeSession, GuestAgentUnavailable, Policy,
                           parse_deadline)
from engine.pool import FREEZE_DEADLINE, GUEST_AGENT
from engine.virt import HypervisorUnavailable

log = logging.getLogger(__name__)

# How often "libvirt is unreachable" is logged when snapshots keep coming.
_UNREACHABLE_LOG_EVERY_S = 300.0


class GuestQuiescer:
    """Freezes the guests of running domains around cuts.

    :param freezer: the freeze coordinator (its hypervisor connection is
        used for discovery too).
    :param state_file: where the domains being frozen are recorded, so
        that a restarted driver thaws them (:meth:`recover`).
    """

    def __init__(self, freezer: Freezer, state_file: Path) -> None:
        self.freezer = freezer
        self.state_file = state_file
        self._lock = threading.Lock()
        self._last_unreachable_log = 0.0

    def recover(self) -> list[str]:
        """Thaw every guest a previous driver left frozen (it died inside a
        freeze).  Returns the names of the domains thawed; a libvirt that
        cannot be reached leaves the record for the next attempt.

        :raises ThawFailed: a running guest could not be thawed.
        """
        if not self.state_file.exists():
            return []
        try:
            thawed = self.freezer.thaw_leftovers(self.state_file)
        except HypervisorUnavailable as e:
            log.error("guests recorded as frozen in %s cannot be thawed yet: %s",
                      self.state_file, e)
            return []
        for name in thawed:
            log.warning("domain %s: thawed, a previous driver left it frozen", name)
        return thawed

    @contextlib.contextmanager
    def quiesce(self, paths: Mapping[str, Sequence[Path | str]],
                parameters: Mapping[str, str]) -> Iterator[FreezeSession]:
        """Freeze the guests using the volumes for the ``with`` block.

        :raises InvalidArgument: a bad policy or deadline parameter.
        :raises GuestAgentUnavailable: policy required, and libvirt or an
            agent does not answer.
        :raises FreezeError: see :meth:`Freezer.frozen`.
        """
        policy = Policy.parse(parameters.get(GUEST_AGENT))
        deadline_s = parse_deadline(parameters.get(FREEZE_DEADLINE))
        self.recover()
        try:
            uses = self.freezer.domains_using(paths)
        except HypervisorUnavailable as e:
            if policy is Policy.REQUIRED:
                raise GuestAgentUnavailable(
                    f"policy required, but libvirt cannot be asked which guests use the "
                    f"volume: {e}") from e
            self._log_unreachable(e)
            uses = []
        # Freezes are serialised (cuts of volumes no guest uses are not):
        # two cuts freezing one guest would thaw it under each other, and
        # the state file records one session.
        with self._lock if uses else contextlib.nullcontext():
            with self.freezer.frozen(uses, deadline_s=deadline_s, policy=policy,
                                     state_file=self.state_file) as session:
                yield session

    def _log_unreachable(self, e: Exception) -> None:
        now = time.monotonic()
        if now - self._last_unreachable_log >= _UNREACHABLE_LOG_EVERY_S:
            self._last_unreachable_log = now
            log.warning("libvirt cannot be reached (%s): snapshots are taken without asking "
                        "guests to freeze (logged every %.0f s)", e, _UNREACHABLE_LOG_EVERY_S)
