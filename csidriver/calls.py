"""How every RPC of the Controller and GroupController services opens: the
capability it needs is advertised, and no other call is operating on the
same object right now (csi-driver-host-path's shape).

The two services share one :class:`~engine.locks.KeyedLock` of in-flight
calls, so that a group cut and a CreateSnapshot or DeleteVolume of one of
its volumes answer each other ``ABORTED`` instead of queueing in the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from engine.errors import InvalidArgument
from engine.locks import KeyedLock


class CallGate:
    """The opening checks of a service's RPCs.

    :param capabilities: the RPC capability types the service advertises.
    :param name: the capability type's name, for messages.
    :param ops: the keyed lock of in-flight calls (shared between services).
    """

    def __init__(self, capabilities: frozenset[int], name: Callable[[int], str],
                 ops: KeyedLock | None = None) -> None:
        self.capabilities = capabilities
        self._name = name
        self.ops = ops if ops is not None else KeyedLock()

    def check_capability(self, rpc: int) -> None:
        """:raises InvalidArgument: the RPC's capability is not advertised."""
        if rpc not in self.capabilities:
            raise InvalidArgument(f"capability {self._name(rpc)} is not supported")

    @contextmanager
    def exclusive(self, *keys: str) -> Iterator[None]:
        """:raises Busy: another call is operating on one of ``keys`` (ABORTED)."""
        with self.ops.hold(keys, wait=False):
            yield
