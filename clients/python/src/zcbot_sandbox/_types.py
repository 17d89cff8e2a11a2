"""The API's answers as dataclasses.

Each type has ``from_json`` that reads the daemon's JSON leniently: fields the daemon adds later are
ignored (and kept in ``raw`` where a caller may want them), so a newer daemon does not break an
older client.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from ._errors import ProtocolError, SandboxError, from_error_body

__all__ = [
    "Truncated",
    "FileRead",
    "Written",
    "DirEntry",
    "Listing",
    "Deleted",
    "ToolData",
    "PythonError",
    "RichResult",
    "ToolResult",
    "Job",
    "SessionInfo",
    "SandboxInfo",
    "Readiness",
    "Started",
    "Output",
    "Result",
    "JobEnded",
    "Event",
]


def _b64(text: Optional[str]) -> Optional[bytes]:
    return None if text is None else base64.b64decode(text)


def _exact(text: Optional[str], b64: Optional[str]) -> bytes:
    """The exact bytes of a text field whose ``*_base64`` twin is present only for non-UTF-8."""
    if b64 is not None:
        return base64.b64decode(b64)
    return (text or "").encode("utf-8")


def _need(d: Any, what: str) -> Dict[str, Any]:
    if not isinstance(d, dict):
        raise ProtocolError("protocol", f"expected a JSON object for {what}, got {type(d).__name__}")
    return d


@dataclass(frozen=True)
class Truncated:
    """Which output streams lost their middle to the daemon's output cap."""

    stdout: bool = False
    stderr: bool = False


@dataclass(frozen=True)
class FileRead:
    """What ``read_file`` returns. ``content`` is text (U+FFFD for invalid UTF-8); ``data`` is
    always the exact bytes."""

    content: str
    size: int
    offset: int
    bytes_read: int
    eof: bool
    content_base64: Optional[str] = None

    @property
    def data(self) -> bytes:
        """The exact bytes read (the daemon sends base64 only when they are not UTF-8)."""
        return _exact(self.content, self.content_base64)


@dataclass(frozen=True)
class Written:
    """What ``write_file`` returns."""

    bytes_written: int


@dataclass(frozen=True)
class DirEntry:
    """One ``list_dir`` entry. ``kind`` is ``file``, ``dir``, ``symlink`` or ``other``."""

    name: str
    kind: str
    size: int


@dataclass(frozen=True)
class Listing:
    """What ``list_dir`` returns: entries sorted by name, ``truncated`` when there were more."""

    entries: List[DirEntry]
    truncated: bool

    @property
    def names(self) -> List[str]:
        return [e.name for e in self.entries]


@dataclass(frozen=True)
class Deleted:
    """What ``delete_path`` returns: the path removed and how many entries went with it."""

    deleted: str
    entries: int


ToolData = Union[FileRead, Written, Listing, Deleted]


def _tool_data(d: Any) -> Union[ToolData, Dict[str, Any], None]:
    # The daemon's ToolData is serde-untagged: the shape tells which one it is. Note that both
    # list_dir and delete_path have "entries" (a list vs a count).
    if d is None:
        return None
    if not isinstance(d, dict):
        return {"value": d}
    if "content" in d:
        return FileRead(
            content=d["content"],
            size=int(d.get("size", 0)),
            offset=int(d.get("offset", 0)),
            bytes_read=int(d.get("bytes_read", 0)),
            eof=bool(d.get("eof", False)),
            content_base64=d.get("content_base64"),
        )
    if "bytes_written" in d:
        return Written(bytes_written=int(d["bytes_written"]))
    if "deleted" in d:
        return Deleted(deleted=d["deleted"], entries=int(d.get("entries", 0)))
    if isinstance(d.get("entries"), list):
        return Listing(
            entries=[
                DirEntry(name=e["name"], kind=e.get("kind", "other"), size=int(e.get("size", 0)))
                for e in d["entries"]
            ],
            truncated=bool(d.get("truncated", False)),
        )
    return d  # a shape this client does not know yet


@dataclass(frozen=True)
class PythonError:
    """An exception a session's code raised (its traceback is in ``stderr``)."""

    name: str
    value: str


@dataclass(frozen=True)
class RichResult:
    """A figure or rich form of a session's value. ``data`` is base64 for PNG and JPEG."""

    mime: str
    data: str

    @property
    def content(self) -> bytes:
        """The bytes: base64-decoded for PNG/JPEG, UTF-8 text for the rest."""
        if self.mime in ("image/png", "image/jpeg"):
            return base64.b64decode(self.data)
        return self.data.encode("utf-8")


@dataclass(frozen=True)
class ToolResult:
    """The result of one tool call.

    ``exit_code`` is None for file tools and for a call that timed out or was cancelled. The
    session fields (``value``, ``error``, ``results``, ``results_dropped``, ``session_started``,
    ``session_restarted``) are set only by ``run_python`` with a session: ``session_started`` is
    None otherwise, which tells the two apart.
    """

    tool: str
    exit_code: Optional[int]
    stdout: str
    stderr: str
    timed_out: bool
    cancelled: bool
    truncated: Truncated
    duration_ms: int
    stdout_base64: Optional[str] = None
    stderr_base64: Optional[str] = None
    data: Union[ToolData, Dict[str, Any], None] = None
    value: Optional[str] = None
    error: Optional[PythonError] = None
    results: List[RichResult] = field(default_factory=list)
    results_dropped: int = 0
    session_started: Optional[bool] = None
    session_restarted: Optional[bool] = None
    #: The call's id (from ``x-zcbot-call-id`` or the stream's ``started`` event), when known.
    call_id: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """It ran to the end and succeeded: exit code 0 (or a file tool), no timeout, no
        cancel, no Python exception."""
        if self.timed_out or self.cancelled or self.error is not None:
            return False
        if self.tool in ("shell", "run_python"):
            return self.exit_code == 0
        return True

    @property
    def stdout_bytes(self) -> bytes:
        """The exact bytes of stdout (``stdout`` has U+FFFD where they are not UTF-8)."""
        return _exact(self.stdout, self.stdout_base64)

    @property
    def stderr_bytes(self) -> bytes:
        """The exact bytes of stderr."""
        return _exact(self.stderr, self.stderr_base64)

    def _data(self, cls: type, what: str) -> Any:
        if not isinstance(self.data, cls):
            raise TypeError(f"this {self.tool} result carries no {what} (data is {self.data!r})")
        return self.data

    @property
    def file(self) -> FileRead:
        """``data`` of a ``read_file`` result (TypeError for any other)."""
        return self._data(FileRead, "file read")  # type: ignore[no-any-return]

    @property
    def written(self) -> Written:
        """``data`` of a ``write_file`` result."""
        return self._data(Written, "write")  # type: ignore[no-any-return]

    @property
    def listing(self) -> Listing:
        """``data`` of a ``list_dir`` result."""
        return self._data(Listing, "listing")  # type: ignore[no-any-return]

    @property
    def deleted(self) -> Deleted:
        """``data`` of a ``delete_path`` result."""
        return self._data(Deleted, "deletion")  # type: ignore[no-any-return]

    @classmethod
    def from_json(cls, d: Any, call_id: Optional[str] = None) -> "ToolResult":
        d = _need(d, "a tool result")
        t = d.get("truncated") or {}
        err = d.get("error")
        return cls(
            tool=d.get("tool", ""),
            exit_code=d.get("exit_code"),
            stdout=d.get("stdout", ""),
            stderr=d.get("stderr", ""),
            timed_out=bool(d.get("timed_out", False)),
            cancelled=bool(d.get("cancelled", False)),
            truncated=Truncated(bool(t.get("stdout", False)), bool(t.get("stderr", False))),
            duration_ms=int(d.get("duration_ms", 0)),
            stdout_base64=d.get("stdout_base64"),
            stderr_base64=d.get("stderr_base64"),
            data=_tool_data(d.get("data")),
            value=d.get("value"),
            error=PythonError(err.get("name", ""), err.get("value", ""))
            if isinstance(err, dict)
            else None,
            results=[RichResult(r.get("mime", ""), r.get("data", "")) for r in d.get("results") or []],
            results_dropped=int(d.get("results_dropped", 0)),
            session_started=d.get("session_started"),
            session_restarted=d.get("session_restarted"),
            call_id=call_id,
            raw=d,
        )


@dataclass(frozen=True)
class Job:
    """A background job. ``state`` is ``running``, ``exited``, ``timed_out``, ``killed`` or
    ``failed``. ``stdout``/``stderr`` are the latest output, present when one job was asked for
    (not in ``jobs()``); ``*_dropped`` bytes came before them. ``error`` says why a ``failed`` job
    could not run (raise it if you like)."""

    job_id: str
    tool: str
    state: str
    exit_code: Optional[int]
    started: str
    duration_ms: int
    ended: Optional[str] = None
    error: Optional[SandboxError] = field(default=None, compare=False)
    stdout: Optional[str] = None
    stderr: Optional[str] = None
    stdout_base64: Optional[str] = None
    stderr_base64: Optional[str] = None
    stdout_dropped: Optional[int] = None
    stderr_dropped: Optional[int] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def stdout_bytes(self) -> Optional[bytes]:
        return None if self.stdout is None else _exact(self.stdout, self.stdout_base64)

    @property
    def stderr_bytes(self) -> Optional[bytes]:
        return None if self.stderr is None else _exact(self.stderr, self.stderr_base64)

    @classmethod
    def from_json(cls, d: Any) -> "Job":
        d = _need(d, "a job")
        return cls(
            job_id=d.get("job_id", ""),
            tool=d.get("tool", ""),
            state=d.get("state", ""),
            exit_code=d.get("exit_code"),
            started=d.get("started", ""),
            duration_ms=int(d.get("duration_ms", 0)),
            ended=d.get("ended"),
            error=from_error_body({"error": d["error"]}, None) if d.get("error") else None,
            stdout=d.get("stdout"),
            stderr=d.get("stderr"),
            stdout_base64=d.get("stdout_base64"),
            stderr_base64=d.get("stderr_base64"),
            stdout_dropped=d.get("stdout_dropped"),
            stderr_dropped=d.get("stderr_dropped"),
            raw=d,
        )


@dataclass(frozen=True)
class SessionInfo:
    """A user's Python session. Times are RFC 3339 (UTC); memory as of its last call."""

    name: str
    started: str
    last_used: str
    memory_bytes: int
    running: bool

    @classmethod
    def from_json(cls, d: Any) -> "SessionInfo":
        d = _need(d, "a session")
        return cls(
            name=d.get("name", ""),
            started=d.get("started", ""),
            last_used=d.get("last_used", ""),
            memory_bytes=int(d.get("memory_bytes", 0)),
            running=bool(d.get("running", False)),
        )


@dataclass(frozen=True)
class SandboxInfo:
    """One sandbox of the pool. ``state`` is Docker's (``running``, ``paused``...); ``spare`` is a
    warm container no user has claimed (its ``user`` is empty)."""

    user: str
    name: str
    container_id: str
    state: str
    idle_secs: int
    in_flight: int
    config_current: bool
    spare: bool = False

    @classmethod
    def from_json(cls, d: Any) -> "SandboxInfo":
        d = _need(d, "a sandbox")
        return cls(
            user=d.get("user", ""),
            name=d.get("name", ""),
            container_id=d.get("container_id", ""),
            state=d.get("state", ""),
            idle_secs=int(d.get("idle_secs", 0)),
            in_flight=int(d.get("in_flight", 0)),
            config_current=bool(d.get("config_current", True)),
            spare=bool(d.get("spare", False)),
        )


@dataclass(frozen=True)
class Readiness:
    """``GET /readyz``: each check's text and state (``ok``, ``degraded``, ``failed``)."""

    ready: bool
    backend: str
    checks: Dict[str, str]
    states: Dict[str, str]

    @property
    def failed(self) -> Dict[str, str]:
        """The checks that failed, with their text."""
        return {k: self.checks.get(k, "") for k, s in self.states.items() if s == "failed"}

    @classmethod
    def from_json(cls, d: Any) -> "Readiness":
        d = _need(d, "readiness")
        return cls(
            ready=bool(d.get("ready", False)),
            backend=str(d.get("backend", "")),
            checks=dict(d.get("checks") or {}),
            states=dict(d.get("states") or {}),
        )


# Events of a streamed call or a followed job.


@dataclass(frozen=True)
class Started:
    """The first event: the call's id (or the job's id when following a job) and its tool."""

    tool: str
    call_id: Optional[str] = None
    job_id: Optional[str] = None


@dataclass(frozen=True)
class Output:
    """Output as the process printed it. ``text`` is UTF-8 text (a character split across reads is
    sent whole); ``data`` the exact bytes. ``missed`` counts bytes a slow job follower lost."""

    stream: str  # "stdout" or "stderr"
    text: str
    data: bytes
    missed: int = 0


@dataclass(frozen=True)
class Result:
    """The last event of a streamed call: the same result a plain call returns. Only the head of
    each stream (half the daemon's output cap) goes out live; the kept tail is in here."""

    result: ToolResult


@dataclass(frozen=True)
class JobEnded:
    """The last event of a followed job: the job as it ended."""

    job: Job


Event = Union[Started, Output, Result, JobEnded]
