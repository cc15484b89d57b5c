"""Volumes whose top layer a libvirt domain's QEMU has open directly (its
disk is the volume's qcow2 file): the pool's :class:`~engine.model.TopOwner`
for ``Owner.DOMAIN``.

Such a top may only change through that QEMU.  A cut becomes a libvirt
external disk-only snapshot onto the overlay qsnap already wrote
(``REUSE_EXT``), atomic across one domain's disks; afterwards the domain's
live definition must name the new overlay as the disk's top, or the switch
is reported as failed so that the catalog never disagrees with the domain.
A resize is libvirt's ``blockResize``.  Merges of such a chain wait until
the domain lets go of it (the reclaimer skips domain-owned chains).
"""

from __future__ import annotations

import logging
import os
import threading

from engine.errors import EngineError, InUse
from engine.layout import Layout
from engine.model import Volume
from engine.virt import DomainError, DomainUse, Hypervisor, HypervisorUnavailable

log = logging.getLogger(__name__)

# Prepared lookups kept at most (a cut abandoned between prepare and switch
# leaves its entry behind).
_PREPARED_MAX = 64


def _key(cuts: list[tuple[Volume, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((v.id, layer) for v, layer in cuts)


class SwitchIncomplete(EngineError):
    """Some domains switched their disks and a later one failed.
    ``switched`` names the volumes that are on their new tops."""

    def __init__(self, message: str, *, switched: tuple[str, ...]) -> None:
        super().__init__(message)
        self.switched = switched


class DomainOwner:
    """Switches and grows tops that libvirt domains have open.

    :param hypervisor: the libvirt adapter.
    :param layout: the pool's paths (a volume's top file is how its domain
        disk is found).
    """

    def __init__(self, hypervisor: Hypervisor, layout: Layout) -> None:
        self.hypervisor = hypervisor
        self.layout = layout
        # Lookups done by prepare() for the switch that follows, by cut.
        self._prepared: dict[tuple[tuple[str, str], ...],
                             dict[str, tuple[DomainUse, str]]] = {}
        self._prepared_lock = threading.Lock()

    def _users(self, volumes: list[Volume]) -> dict[str, tuple[DomainUse, str]]:
        """Volume ID → (the domain, its disk target) that has the volume's
        top open.

        :raises InUse: a top is open by something that is not a domain at
            this libvirt, or by two domains.
        :raises HypervisorUnavailable: libvirt cannot be reached.
        """
        tops = {v.id: self.layout.layer_path(v.top_layer) for v in volumes}
        found: dict[str, tuple[DomainUse, str]] = {}
        for use in self.hypervisor.domains_using({}, tops=tops):
            for volume_id, target in use.direct:
                if volume_id in found and found[volume_id][0].uuid != use.uuid:
                    raise InUse(f"volume {volume_id} is open by two domains, "
                                f"{found[volume_id][0].name} and {use.name}")
                found[volume_id] = (use, target)
        missing = [v for v in tops if v not in found]
        if missing:
            raise InUse(f"volume {', '.join(missing)} is open: a process has its top layer open "
                        f"for writing, and no domain at {self.hypervisor.uri} uses it")
        return found

    def prepare(self, cuts: list[tuple[Volume, str]]) -> None:
        """Find the domains and disks of the volumes before the guests are
        frozen (listing domains and reading their definitions takes longer
        than the switch itself).

        :raises InUse: a volume's top is open by no domain, or by two.
        """
        users = self._lookup([v for v, _ in cuts])
        with self._prepared_lock:
            if len(self._prepared) > _PREPARED_MAX:     # cuts abandoned after prepare
                self._prepared.clear()
            self._prepared[_key(cuts)] = users

    def _lookup(self, volumes: list[Volume]) -> dict[str, tuple[DomainUse, str]]:
        try:
            return self._users(volumes)
        except HypervisorUnavailable as e:
            raise InUse(f"volumes {', '.join(v.id for v in volumes)} are open by a domain, "
                        f"and libvirt cannot be reached to switch them: {e}") from e

    def switch(self, cuts: list[tuple[Volume, str]], *, freeze: bool) -> tuple[str, ...]:
        """Switch each volume to its new layer in the domain that has it
        open: one libvirt snapshot per domain, atomic across its disks.
        ``freeze`` (host fsfreeze of a staged filesystem) has no meaning
        here: guests are frozen through their agents by the quiescer.

        :raises InUse: a volume's top is open by no domain, or by two.
        :raises SwitchIncomplete: a later domain failed after earlier ones
            switched.
        :raises DomainError: the (first) domain refused; nothing changed.
        """
        with self._prepared_lock:
            users = self._prepared.pop(_key(cuts), None)
        if users is None:
            users = self._lookup([v for v, _ in cuts])
        per_domain: dict[str, tuple[DomainUse, dict[str, str], list[str]]] = {}
        for volume, layer in cuts:
            use, target = users[volume.id]
            entry = per_domain.setdefault(use.uuid, (use, {}, []))
            entry[1][target] = os.fspath(self.layout.layer_path(layer))
            entry[2].append(volume.id)
        switched: list[str] = []
        for use, overlays, volume_ids in per_domain.values():
            try:
                dom = self.hypervisor.lookup(use.uuid)
                self.hypervisor.disk_snapshot(dom, overlays, targets=use.all_targets or None)
                tops = self.hypervisor.disk_tops(dom)
                for target, path in overlays.items():
                    now = tops.get(target, "")
                    if os.path.realpath(now) != os.path.realpath(path):
                        raise DomainError(f"domain {use.name}: disk {target} is on {now} after "
                                          f"the switch, not {path}")
            except EngineError as e:
                if switched:
                    raise SwitchIncomplete(f"{e} (volumes {', '.join(switched)} had switched "
                                           "already)", switched=tuple(switched)) from e
                raise
            switched.extend(volume_ids)
            log.info("domain %s: switched disks %s to new layers (volumes %s)", use.name,
                     ", ".join(sorted(overlays)), ", ".join(volume_ids))
        return ("Online",)

    def resize(self, volume: Volume, size_bytes: int) -> None:
        """Grow the volume's disk in the domain (the guest sees it at once).

        :raises InUse: no domain has the volume's top open.
        :raises DomainError: libvirt refused.
        """
        use, target = self._users([volume])[volume.id]
        self.hypervisor.block_resize(self.hypervisor.lookup(use.uuid), target, size_bytes)
        log.info("volume %s: grown to %d bytes in domain %s (disk %s)", volume.id, size_bytes,
                 use.name, target)

    def commit(self, volume_id: str, layer_id: str, parent_id: str) -> None:
        """:raises InUse: always; merges of a domain's chain wait for it to stop."""
        raise InUse(f"volume {volume_id} is open by a domain: its chain is merged once the "
                    "domain stops")

    def rebase(self, volume_id: str, layer_id: str, new_parent: str | None) -> None:
        """:raises InUse: always; merges of a domain's chain wait for it to stop."""
        raise InUse(f"volume {volume_id} is open by a domain: its chain is merged once the "
                    "domain stops")
