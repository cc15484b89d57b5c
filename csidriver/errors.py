"""The one place where failures become gRPC status codes.

Servicers raise: engine errors (``engine.errors``) for everything the engine
decides, and :class:`RpcError` for the few answers that are the gRPC layer's
own (UNIMPLEMENTED for RPCs qsnap does not serve).  :class:`ErrorInterceptor`
catches whatever a handler raises and aborts the call with the mapped code,
so the mapping is applied to every RPC of every service without each method
having to remember it.

Rules:

* every engine error class maps to exactly one code (looked up along the
  exception's MRO, so a subclass such as ``InUse`` inherits its parent's
  code unless it has its own entry);
* nothing ever leaves as UNKNOWN: an unexpected exception is logged here
  with its traceback and reaches the client as INTERNAL with a short
  message naming the RPC, never the traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from engine.domains import SwitchIncomplete
from engine.errors import (AlreadyExists, Busy, CatalogCorrupt, EngineError, FailedPrecondition,
                           ImageError, InUse, InvalidArgument, NotFound, OutOfRange, PoolFull)
from engine.freeze import (FreezeDeadlineExceeded, FreezeFailed, FreezeStateCorrupt,
                           GuestAgentUnavailable, ThawFailed)
from engine.virt import DomainError, HypervisorUnavailable

log = logging.getLogger(__name__)

# Most specific classes are found first because the lookup walks the MRO.
ENGINE_CODES: dict[type[EngineError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    PoolFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InUse: grpc.StatusCode.FAILED_PRECONDITION,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Busy: grpc.StatusCode.ABORTED,
    ImageError: grpc.StatusCode.INTERNAL,
    CatalogCorrupt: grpc.StatusCode.INTERNAL,
    # Guests around a cut (engine/freeze.py): the policy's refusals are the
    # caller's to fix; an overrun deadline may pass on a retry; a guest
    # that stays frozen or a broken record needs an operator.
    GuestAgentUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    FreezeFailed: grpc.StatusCode.FAILED_PRECONDITION,
    FreezeDeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ThawFailed: grpc.StatusCode.INTERNAL,
    FreezeStateCorrupt: grpc.StatusCode.INTERNAL,
    HypervisorUnavailable: grpc.StatusCode.UNAVAILABLE,
    SwitchIncomplete: grpc.StatusCode.INTERNAL,
    DomainError: grpc.StatusCode.INTERNAL,
    EngineError: grpc.StatusCode.INTERNAL,
}

# Engine errors that mean "the driver or its host is broken", not "the
# request was wrong": the client gets INTERNAL, the log gets the details.
_INTERNAL_PREFIX = {
    ImageError: "image tool failure",
    CatalogCorrupt: "the pool's catalog needs an operator",
    ThawFailed: "a guest may still be frozen",
    DomainError: "hypervisor failure",
}


class RpcError(Exception):
    """A gRPC-layer answer that no engine error expresses.

    :param code: the status code to return.
    :param message: the text for the client.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def unimplemented(rpc: str) -> RpcError:
    """The answer for an RPC qsnap deliberately does not serve."""
    return RpcError(grpc.StatusCode.UNIMPLEMENTED, f"{rpc} is not supported by qsnap")


def status_for(exc: BaseException, rpc: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception.

    Never returns UNKNOWN or OK.  Unexpected exceptions become INTERNAL with
    a message that names only the exception type (the traceback is logged
    by the caller, see :func:`abort_for`).
    """
    if isinstance(exc, RpcError):
        return exc.code, exc.message
    if isinstance(exc, EngineError):
        for cls in type(exc).__mro__:
            code = ENGINE_CODES.get(cls)  # type: ignore[arg-type]
            if code is not None:
                prefix = next((p for c, p in _INTERNAL_PREFIX.items() if isinstance(exc, c)), "")
                message = str(exc) or type(exc).__name__
                return code, f"{prefix}: {message}" if prefix else message
    where = f" in {rpc}" if rpc else ""
    return grpc.StatusCode.INTERNAL, (f"internal error{where} ({type(exc).__name__}); "
                                      "the driver's log has the details")


def abort_for(context: grpc.ServicerContext, exc: BaseException, rpc: str) -> None:
    """Abort the call for ``exc`` (always raises).

    Logs at a level that matches who is at fault: a refused request is
    the client's business (DEBUG), an internal failure is ours (ERROR, with
    the traceback, which the client never sees).
    """
    code, message = status_for(exc, rpc)
    if code is grpc.StatusCode.INTERNAL:
        if isinstance(exc, ImageError) and exc.command:
            log.error("%s failed: %s (command: %s)", rpc, exc, " ".join(exc.command), exc_info=exc)
        elif isinstance(exc, EngineError):
            log.error("%s failed: %s", rpc, exc, exc_info=exc)
        else:
            log.error("%s crashed: %r", rpc, exc, exc_info=exc)
    else:
        log.debug("%s refused with %s: %s", rpc, code.name, message)
    context.abort(code, message)


def _aborted(context: grpc.ServicerContext) -> bool:
    # context.abort() records a code and raises a bare Exception; such an
    # exception is the call's answer already and must pass through untouched.
    code = context.code()  # type: ignore[attr-defined]
    return code is not None and code is not grpc.StatusCode.OK


Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _guard_unary(behavior: Behavior, rpc: str) -> Behavior:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as exc:
            if _aborted(context):
                raise
            abort_for(context, exc, rpc)
    return guarded


def _guard_stream(behavior: Behavior, rpc: str) -> Behavior:
    def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request, context)
        except Exception as exc:
            if _aborted(context):
                raise
            abort_for(context, exc, rpc)
    return guarded


def wrap_handler(handler: grpc.RpcMethodHandler | None, rpc: str,
                 unary: Callable[[Behavior, str], Behavior],
                 stream: Callable[[Behavior, str], Behavior]) -> grpc.RpcMethodHandler | None:
    """A copy of ``handler`` whose behaviour is wrapped (unary-request RPCs
    only: CSI, Inspect and health have no client-streaming calls)."""
    if handler is None:
        return None
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary, rpc),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream, rpc),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Applies :func:`status_for` to every RPC the server serves."""

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                       grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails
                          ) -> grpc.RpcMethodHandler | None:
        rpc = handler_call_details.method.rsplit("/", 1)[-1]
        return wrap_handler(continuation(handler_call_details), rpc, _guard_unary, _guard_stream)
