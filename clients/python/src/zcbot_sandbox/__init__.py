"""Python client for zcbot-sandbox: run LLM agents' tool calls (shell, Python, files) in one
hardened Docker sandbox per user, through the daemon's HTTP API.

    from zcbot_sandbox import Client

    with Client("http://127.0.0.1:8787", token="...") as client:
        alice = client.user("alice")
        r = alice.shell("echo hi")
        print(r.exit_code, r.stdout)

``AsyncClient`` is the same with ``await``. Errors the daemon answers raise ``SandboxError``
subclasses (``kind``, ``message``, ``status``); network failures stay ``httpx.TransportError``.
"""

from ._async import AsyncClient, AsyncEventStream, AsyncUser
from ._core import Timeout
from ._errors import (
    KIND_STATUS,
    BadRequest,
    Conflict,
    DiskFull,
    Forbidden,
    NotFound,
    ProtocolError,
    SandboxError,
    ServerError,
    TooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from ._sync import Client, EventStream, User
from ._types import (
    Deleted,
    DirEntry,
    Event,
    FileRead,
    Job,
    JobEnded,
    Listing,
    Output,
    PythonError,
    Readiness,
    Result,
    RichResult,
    SandboxInfo,
    SessionInfo,
    Started,
    ToolData,
    ToolResult,
    Truncated,
    Written,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "User",
    "EventStream",
    "AsyncClient",
    "AsyncUser",
    "AsyncEventStream",
    "Timeout",
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
    "ToolResult",
    "Truncated",
    "ToolData",
    "FileRead",
    "Written",
    "DirEntry",
    "Listing",
    "Deleted",
    "PythonError",
    "RichResult",
    "Job",
    "SessionInfo",
    "SandboxInfo",
    "Readiness",
    "Event",
    "Started",
    "Output",
    "Result",
    "JobEnded",
]
