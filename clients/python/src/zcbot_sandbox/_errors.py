"""The API's errors as exceptions.

Every error the daemon answers is ``{"error": {"kind", "message"}}`` with a status. The class is
chosen by status, so callers can catch the broad case (``NotFound``) and look at ``kind`` for the
precise one (``no_such_session``, ``not_found``, ``no_such_job``...).

Network failures (connection refused, a connect timeout, a connection cut mid-answer) are *not*
wrapped: they stay ``httpx.TransportError`` subclasses, so that the difference between "the daemon
said no" and "the daemon could not be reached" is never blurred.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Type

__all__ = [
    "SandboxError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "TooLarge",
    "TooManyRequests",
    "ServerError",
    "Unavailable",
    "DiskFull",
    "ProtocolError",
    "KIND_STATUS",
]


class SandboxError(Exception):
    """An error the daemon answered (or, for ``ProtocolError``, an answer that broke the API).

    ``status`` is the HTTP status. For an ``error`` event inside an event stream (the stream itself
    was a 200), it is the status the same error has as a plain answer, which the event carries
    (``KIND_STATUS`` guesses it for a daemon too old to say), so that a streamed call and a plain
    one raise the same class.
    """

    def __init__(self, kind: str, message: str, status: Optional[int] = None) -> None:
        super().__init__(kind, message, status)
        self.kind = kind
        self.message = message
        self.status = status

    def __str__(self) -> str:
        where = f" (HTTP {self.status})" if self.status is not None else ""
        return f"{self.kind}{where}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, message={self.message!r}, status={self.status!r})"

    def __reduce__(self) -> Any:
        return (type(self), (self.kind, self.message, self.status))


class BadRequest(SandboxError):
    """400: bad arguments, JSON, user id or path (``bad_call``, ``invalid_user``, ``file``...)."""


class Unauthorized(SandboxError):
    """401: missing or wrong token (kind ``unauthorized``)."""


class Forbidden(SandboxError):
    """403: the path leaves the workspace or names something not allowed (``path_refused``)."""


class NotFound(SandboxError):
    """404: no such file, session, job, call, sandbox, tool or route."""


class Conflict(SandboxError):
    """409: ``call_id_in_use``, ``session_busy``, ``file_conflict`` (run it again)."""


class TooLarge(SandboxError):
    """413: ``file_too_large`` or ``body_too_large``."""


class TooManyRequests(SandboxError):
    """429: the user is at a limit (calls, sessions or jobs); retry once something ended."""


class ServerError(SandboxError):
    """5xx not covered by a narrower class: a fault on the host, not the caller's."""


class Unavailable(ServerError):
    """502/503/504: pool full, Docker unreachable, sandbox failed to start, channel lost...

    Usually worth a retry later.
    """


class DiskFull(ServerError):
    """507: the user's folder is at its quota (``disk_full``)."""


class ProtocolError(SandboxError):
    """The answer did not follow the API (a stream that ended without a result, bad JSON...)."""


_BY_STATUS: Dict[int, Type[SandboxError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    429: TooManyRequests,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
    507: DiskFull,
}

#: The status each error kind answers with (RUN.md, "Statuses"): used for ``error`` events of an
#: event stream, which arrive inside a 200 answer.
KIND_STATUS: Dict[str, int] = {
    **dict.fromkeys(
        ["invalid_user", "bad_json", "bad_query", "bad_call", "bad_body", "file_limit", "file"], 400
    ),
    "unauthorized": 401,
    **dict.fromkeys(["path_refused", "cross_origin", "bad_host"], 403),
    **dict.fromkeys(
        ["unknown_tool", "not_found", "no_such_session", "no_such_job", "unknown_call", "no_sandbox"],
        404,
    ),
    "method_not_allowed": 405,
    **dict.fromkeys(["session_busy", "call_id_in_use", "file_conflict", "sandbox_removed"], 409),
    "route_moved": 410,
    **dict.fromkeys(["file_too_large", "body_too_large"], 413),
    **dict.fromkeys(["too_many_calls", "too_many_sessions", "too_many_jobs"], 429),
    "channel_lost": 502,
    **dict.fromkeys(
        [
            "file_stopped",
            "sessions_unavailable",
            "jobs_unavailable",
            "pool_full",
            "image_missing",
            "runtime_missing",
            "network_mismatch",
            "sandbox_start",
            "host_firewall",
            "self_check",
            "disk_quota",
            "call_start",
            "docker_unreachable",
            "docker_timeout",
            "too_many_connections",
        ],
        503,
    ),
    "disk_full": 507,
}


def error_class(status: Optional[int]) -> Type[SandboxError]:
    """The exception class for a status (``SandboxError`` itself for one without its own)."""
    if status is None:
        return SandboxError
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls
    if status >= 500:
        return ServerError
    return SandboxError


def make_error(kind: str, message: str, status: Optional[int]) -> SandboxError:
    """The exception for an error with this kind and status."""
    return error_class(status)(kind, message, status)


def from_error_body(body: Any, status: Optional[int]) -> Optional[SandboxError]:
    """The exception an ``{"error": {"kind", "message"}}`` object stands for, if it is one."""
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("kind"), str):
        return None
    kind = err["kind"]
    message = err.get("message")
    if status is None:
        # A stream's error event says its status; older daemons did not (then the table guesses).
        given = body.get("status")
        status = given if isinstance(given, int) and not isinstance(given, bool) else KIND_STATUS.get(kind)
    return make_error(kind, message if isinstance(message, str) else "", status)


def from_response(status: int, content: bytes) -> SandboxError:
    """The exception for a non-2xx answer; a body that is not the API's JSON error still gives
    one, of kind ``http_<status>``, carrying the start of the body as its message."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    err = from_error_body(body, status)
    if err is not None:
        return err
    text = content[:500].decode("utf-8", "replace").strip()
    return make_error(f"http_{status}", text or f"HTTP {status} with no error body", status)
