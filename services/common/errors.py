"""The one error boundary: domain exceptions -> gRPC status codes.

Handlers raise these; `ErrorBoundary` (a server interceptor) turns them, and anything
unexpected, into a deliberate status. Nothing crosses the wire as UNKNOWN.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


class ServiceError(Exception):
    """Base of errors that map to one gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def details(self) -> list[Any]:
        return []


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def details(self) -> list[Any]:
        violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.problem)
        return [error_details_pb2.BadRequest(field_violations=[violation])]


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, kind: str, ident: str, hint: str = ""):
        super().__init__(f"{kind} {ident!r} not found" + (f"; {hint}" if hint else ""))
        self.kind = kind
        self.ident = ident

    def details(self) -> list[Any]:
        return [error_details_pb2.ResourceInfo(resource_type=self.kind, resource_name=self.ident)]


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(f"{message}; retry in {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s

    def details(self) -> list[Any]:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(self.retry_after_s * 1000))
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


DOMAIN = "productinaction.v1"  # google.rpc.ErrorInfo's domain for the reasons below


class AlreadyExists(ServiceError):
    """`reason` (an ErrorInfo detail) says what exists, so a program need not read the message:
    REQUEST_RUNNING (the request id is in flight), REQUEST_STORED (its images are stored), OBJECT_STORED
    (a storage key holds other bytes)."""

    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def details(self) -> list[Any]:
        return [error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)]


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str, list[Any]]:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message, exc.details()
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", []
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", []


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message, details = to_status(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=exc)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details:
        status.details.add().Pack(detail)
    rich = rpc_status.to_status(status)
    metadata = tuple(rich.trailing_metadata)
    if isinstance(exc, ResourceExhausted):
        # Plain-text twin of RetryInfo for clients that do not decode rich status details.
        metadata += (("retry-after-ms", str(int(exc.retry_after_s * 1000))),)
    await context.abort_with_status(_Status(rich.code, rich.details, metadata))


def _is_abort(exc: BaseException) -> bool:
    # grpc.aio's own abort signal must pass through untouched.
    return type(exc).__name__ == "AbortError" or isinstance(exc, asyncio.CancelledError)


@dataclass(frozen=True)
class _Malformed:
    """A request whose bytes did not decode; the handler answers it with INVALID_ARGUMENT."""

    problem: str


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    # grpc decodes before any handler or interceptor code runs, and a decode error there becomes
    # UNKNOWN with a traceback; decoding to a marker brings it inside the boundary.
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            return _Malformed(f"{type(exc).__name__}: {exc}")

    return decode


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Malformed):
        log.warning("malformed request refused: %s", request.problem)
        raise InvalidArgument("request", f"not a valid protobuf message of this method ({request.problem})")


def _wrap_unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_decoded(request)
            return await fn(request, context)
        except BaseException as exc:
            if _is_abort(exc):
                raise
            await abort(context, exc)

    return handler


def _wrap_stream(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            _check_decoded(request)
            async for item in fn(request, context):
                yield item
        except BaseException as exc:
            if _is_abort(exc) or isinstance(exc, GeneratorExit):
                raise
            await abort(context, exc)

    return handler


class ErrorBoundary(grpc.aio.ServerInterceptor):
    """Wraps every handler, unary and streaming, so exceptions become deliberate statuses.

    Streaming handlers may be async generators or coroutines that call `context.write` (the
    generator's Generate does, to bound how long a write may wait for a stalled reader).
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        deserialize = _safe_deserializer(handler.request_deserializer)
        if handler.unary_unary and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream and inspect.iscoroutinefunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _wrap_unary(handler.unary_stream),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        return handler
