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
import time

from engine.errors import EngineError, InUse
from engine.layout import Layout
from engine.model import Volume
from engine.qemu_img import image_locks
from engine.virt import DomainError, DomainUse, Hypervisor, HypervisorUnavailable

log = logging.getLogger(__name__)

# Prepared lookups kept at most (a cut abandoned between prepare and switch
# leaves its entry behind).
_PREPARED_MAX = 64
# How often "libvirt is unreachable" is logged when cuts keep coming.
_UNREACHABLE_LOG_EVERY_S = 300.0


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
        self._unreachable_logged = -_UNREACHABLE_LOG_EVERY_S

    def claims(self, volume: Volume) -> bool:
        """Whether a stopped domain's persistent definition names the
        volume's top file as a disk: a cut must then point that definition
        at the new top, or the domain would start on the snapshot's layer.
        A libvirt that cannot be reached claims nothing (logged).
        """
        try:
            return bool(self._defined_users([volume]))
        except HypervisorUnavailable as e:
            now = time.monotonic()
            if now - self._unreachable_logged >= _UNREACHABLE_LOG_EVERY_S:
                self._unreachable_logged = now
                log.warning("volume %s: libvirt cannot be reached to check stopped domains' "
                            "definitions (logged every %.0f s): %s", volume.id,
                            _UNREACHABLE_LOG_EVERY_S, e)
            return False

    def _defined_users(self, volumes: list[Volume]) -> dict[str, list[tuple[DomainUse, str]]]:
        """Volume ID → (stopped domain, disk target) pairs whose persistent
        definitions name the volume's top file.

        :raises HypervisorUnavailable: libvirt cannot be reached.
        """
        tops = {v.id: self.layout.layer_path(v.top_layer) for v in volumes}
        found: dict[str, list[tuple[DomainUse, str]]] = {}
        for use in self.hypervisor.domains_using({}, tops=tops, stopped=True):
            for volume_id, target in use.direct:
                found.setdefault(volume_id, []).append((use, target))
        return found

    def _users(self, volumes: list[Volume], *, require: bool = False
               ) -> dict[str, tuple[DomainUse, str]]:
        """Volume ID → (the running domain, its disk target) that has the
        volume's top open.

        :raises InUse: a top is open by two domains, or (``require``) a
            volume's top is open by no running domain at this libvirt.
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
        if missing and require:
            raise InUse(f"volume {', '.join(missing)} is open: a process has its top layer open "
                        f"for writing, and no domain at {self.hypervisor.uri} uses it")
        return found

    def prepare(self, cuts: list[tuple[Volume, str]]) -> None:
        """Find the domains and disks of the volumes before the guests are
        frozen (listing domains and reading their definitions takes longer
        than the switch itself).

        :raises InUse: a volume's top is open by no domain, or by two.
        """
        users = self._lookup([v for v, _ in cuts], running_only=False)
        with self._prepared_lock:
            if len(self._prepared) > _PREPARED_MAX:     # never switched nor abandoned
                self._prepared.clear()
            self._prepared[_key(cuts)] = users

    def abandon(self, cuts: list[tuple[Volume, str]]) -> None:
        """Forget the lookups :meth:`prepare` made for a cut that will not
        be switched."""
        with self._prepared_lock:
            self._prepared.pop(_key(cuts), None)

    def _lookup(self, volumes: list[Volume], *, running_only: bool = False
                ) -> dict[str, tuple[DomainUse, str]]:
        try:
            return self._users(volumes, require=running_only)
        except HypervisorUnavailable as e:
            # The lock says a process writes the top; without libvirt
            # nobody can tell whether it is a domain, let alone switch it.
            raise InUse(f"volume {', '.join(v.id for v in volumes)} is open: a process has its "
                        f"top layer open for writing, and libvirt cannot be reached to find "
                        f"the domain that holds it: {e}") from e

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
        stopped = [(v, layer) for v, layer in cuts if v.id not in users]
        held = [v.id for v, _ in stopped
                if image_locks(self.layout.layer_path(v.top_layer)).writer]
        if held:
            raise InUse(f"volume {', '.join(held)} is open: a process has its top layer open "
                        f"for writing, and no domain at {self.hypervisor.uri} uses it")
        if stopped:
            self._retarget_definitions(stopped)
            cuts = [(v, layer) for v, layer in cuts if v.id in users]
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
        return ("Online",) if cuts else ()

    def _retarget_definitions(self, cuts: list[tuple[Volume, str]]) -> None:
        """Point the stopped domains that name the volumes' tops at the new
        layers (before the catalog commits the cut: a domain started in
        between opens the new layer, backed by the old one).

        :raises InUse: libvirt cannot be reached.
        :raises DomainError: libvirt refused a definition.
        """
        try:
            defined = self._defined_users([v for v, _ in cuts])
        except HypervisorUnavailable as e:
            raise InUse(f"libvirt cannot be reached to update the domains that use volumes "
                        f"{', '.join(v.id for v, _ in cuts)}: {e}") from e
        per_domain: dict[str, tuple[DomainUse, dict[str, str]]] = {}
        for volume, layer in cuts:
            if volume.id not in defined:
                # Nobody holds the top and no definition names it (the
                # domain let go since it was seen): the catalog's commit is
                # the whole switch, as for a closed volume.
                log.info("volume %s: no domain uses its top any more", volume.id)
                continue
            for use, target in defined[volume.id]:
                per_domain.setdefault(use.uuid, (use, {}))[1][target] = os.fspath(
                    self.layout.layer_path(layer))
        for use, sources in per_domain.values():
            self.hypervisor.retarget_disks(self.hypervisor.lookup(use.uuid), sources)
            log.info("domain %s (stopped): disks %s now on the volumes' new tops", use.name,
                     ", ".join(sorted(sources)))

    def resize(self, volume: Volume, size_bytes: int) -> None:
        """Grow the volume's disk in the domain (the guest sees it at once).

        :raises InUse: no domain has the volume's top open, or libvirt
            cannot be reached to find it.
        :raises DomainError: libvirt refused.
        """
        use, target = self._lookup([volume], running_only=True)[volume.id]
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
