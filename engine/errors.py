"""The engine's one exception family.

Every failure the engine reports to a caller is an :class:`EngineError`
subclass.  The CSI layer maps each class to exactly one gRPC status code in
one place (``csidriver/errors.py``); nothing else in the engine knows about
gRPC.  Messages are written for the person reading the client's error, so
they name the object and say what to do where that is known.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidArgument(EngineError):
    """A request is malformed: a bad ID, size, name or parameter."""


class NotFound(EngineError):
    """The named volume, snapshot or layer does not exist."""


class AlreadyExists(EngineError):
    """The name is taken by an object made from other arguments."""


class OutOfRange(EngineError):
    """A size cannot be satisfied within the requested bounds."""


class PoolFull(EngineError):
    """The pool's filesystem or its quota has no room for the request."""


class FailedPrecondition(EngineError):
    """The object is in a state that forbids the request (for example it is
    open by another process)."""


class InUse(FailedPrecondition):
    """The object is open by an owner that must release it first."""


class Busy(EngineError):
    """Another operation holds the object right now; retrying later works."""


class ImageError(EngineError):
    """An image tool (qemu-img, QMP) failed in a way the engine cannot
    attribute to the caller.  Carries the command and its stderr."""

    def __init__(self, message: str, *, command: list[str] | None = None,
                 stderr: str = "", returncode: int | None = None) -> None:
        super().__init__(message)
        self.command = command or []
        self.stderr = stderr
        self.returncode = returncode


class CatalogCorrupt(EngineError):
    """The catalog contradicts itself or the files on disk in a way recovery
    cannot resolve without an operator."""
