"""What the sync and async clients share: URLs, request bodies, timeouts, the event-stream parser
and the translation of events. No I/O here."""

from __future__ import annotations

import base64
import datetime
import json
import re
from typing import Any, Dict, List, Optional, Tuple, Union
from urllib.parse import quote

import httpx

from ._errors import ProtocolError, SandboxError, from_error_body, from_response
from ._types import Event, Job, JobEnded, Output, Result, Started, ToolResult

#: A tool call's timeout: seconds, a duration the daemon parses (``"2m"``), or a timedelta.
Timeout = Union[int, float, str, datetime.timedelta]

DEFAULT_URL = "http://127.0.0.1:8787"

#: How long an event stream may stay silent before the connection counts as dead. The daemon
#: sends a comment every 2 s while nothing else goes out, so this is far above any healthy gap.
STREAM_SILENCE = 60.0

#: Kept-alive connections are dropped after this long unused. The daemon closes idle ones after
#: ZCBOT_HTTP_IDLE_TIMEOUT (60 s by default); reusing one it is closing at that very moment would
#: fail a request that was never seen, so the client lets go well before.
KEEPALIVE_EXPIRY = 20.0

EVENT_STREAM = "text/event-stream"


def split_base_url(base_url: str) -> Tuple[str, Optional[str]]:
    """``(http base URL, unix socket path or None)``. ``unix:/run/zcbot.sock`` talks HTTP over
    that socket (the host in the URL is then a placeholder)."""
    if base_url.startswith("unix:"):
        path = base_url[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError("unix: base_url needs a socket path, e.g. unix:/run/zcbot.sock")
        return "http://zcbot-sandbox", path
    return base_url.rstrip("/"), None


def headers(token: Optional[str]) -> Dict[str, str]:
    h = {"user-agent": "zcbot-sandbox-client-python/0.1"}
    if token:
        h["authorization"] = f"Bearer {token}"
    return h


def short_timeout(timeout: Union[float, httpx.Timeout, None]) -> httpx.Timeout:
    """The timeout of requests the daemon answers at once (lists, health, cancel...)."""
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout)


#: How long a tool call may go without a byte of its answer: far past any call the daemon lets
#: run (its ZCBOT_EXEC_TIMEOUT_MAX is 10 minutes by default, plus a sandbox start), so it only
#: ends a wait on a connection that died without closing (a host gone, a NAT that forgot it).
CALL_SILENCE = 1800.0


def call_timeout(short: httpx.Timeout) -> httpx.Timeout:
    """For a tool call: a read timeout of CALL_SILENCE. A call may rightly run for its whole
    timeout plus a sandbox start, and the daemon bounds it itself; connecting, sending and waiting
    for a pooled connection keep their limits."""
    return httpx.Timeout(connect=short.connect, read=CALL_SILENCE, write=short.write, pool=short.pool)


def stream_timeout(short: httpx.Timeout) -> httpx.Timeout:
    """For an event stream: silence longer than STREAM_SILENCE means a dead connection."""
    return httpx.Timeout(connect=short.connect, read=STREAM_SILENCE, write=short.write, pool=short.pool)


def seg(s: str) -> str:
    """One path segment, percent-encoded whole: neither a ``/`` in it nor a dot segment (which URL
    normalisation, httpx's or a proxy's, would resolve away) can change the route."""
    q = quote(s, safe="")
    return q.replace(".", "%2E") if q in (".", "..") else q


def user_path(user: str, *parts: str) -> str:
    return "/v1/users/" + seg(user) + "".join("/" + seg(p) for p in parts)


def file_path(user: str, path: str) -> str:
    """The files route for a workspace path; its slashes stay slashes. An absolute path under
    ``/workspace`` works as in the file tools."""
    if not path or path.strip("/") == "":
        raise ValueError("a file path is needed")
    # Dot segments are percent-encoded: URL normalisation (httpx's, or a proxy's) would otherwise
    # resolve them away before the daemon sees them, and "a/../b" must mean to the files route
    # exactly what it means to the file tools (where the daemon judges it).
    return user_path(user) + "/files/" + "/".join(seg(p) for p in path.split("/"))


def timeout_json(t: Optional[Timeout]) -> Union[float, int, str, None]:
    if t is None:
        return None
    if isinstance(t, datetime.timedelta):
        return t.total_seconds()
    if isinstance(t, bool):
        raise TypeError("timeout must be seconds, a duration string or a timedelta")
    return t


def body(**args: Any) -> Dict[str, Any]:
    """A tool call's JSON body: the arguments that were given (None leaves one out)."""
    out: Dict[str, Any] = {}
    for k, v in args.items():
        if v is None:
            continue
        if k == "timeout":
            v = timeout_json(v)
        elif k == "env":
            v = {str(a): str(b) for a, b in dict(v).items()}
        out[k] = v
    return out


def stream_body(args: Any, call_id: Optional[str]) -> Dict[str, Any]:
    b = dict(args)
    if b.get("background"):
        # The daemon answers a job start as JSON whatever Accept says: there is no stream to read.
        raise ValueError("a background job is not streamed: use start_job(), then follow_job()")
    if call_id is not None:
        b["call_id"] = call_id
    return b


def write_body(path: str, content: Union[str, bytes, bytearray, memoryview], append: bool) -> Dict[str, Any]:
    if isinstance(content, str):
        b: Dict[str, Any] = {"path": path, "content": content}
    elif isinstance(content, (bytes, bytearray, memoryview)):
        b = {"path": path, "content_base64": base64.b64encode(bytes(content)).decode("ascii")}
    else:
        raise TypeError(f"content must be str or bytes, not {type(content).__name__}")
    if append:
        b["append"] = True
    return b


def load_json(resp: httpx.Response) -> Any:
    try:
        return json.loads(resp.content)
    except ValueError as e:
        raise ProtocolError(
            "protocol", f"the daemon answered {resp.status_code} with a body that is not JSON: {e}", resp.status_code
        ) from None


def ensure_ok(resp: httpx.Response) -> None:
    """Raises the API's error for a non-2xx answer whose body has been read."""
    if resp.status_code >= 300:
        raise from_response(resp.status_code, resp.content)


def check_length(resp: httpx.Response, n: int) -> None:
    """A download that got fewer (or more) bytes than announced raises: the daemon ends a body
    at ZCBOT_TRANSFER_TIMEOUT, and a cut file must never pass for a whole one."""
    declared = resp.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) != n:
        raise ProtocolError("short_download", f"got {n} of {declared} bytes: the transfer was cut", resp.status_code)


def tool_result(resp: httpx.Response) -> ToolResult:
    return ToolResult.from_json(load_json(resp), call_id=resp.headers.get("x-zcbot-call-id"))


def is_event_stream(resp: httpx.Response) -> bool:
    ctype: str = resp.headers.get("content-type", "")
    return ctype.split(";")[0].strip().lower() == EVENT_STREAM


#: A line end in an event stream: CRLF, LF or CR.
_LINE_END = re.compile(rb"\r\n|\r|\n")
#: The longest event line accepted: a result with both output streams at the daemon's largest cap,
#: every byte escaped, and a session's rich results, fit well within it.
MAX_EVENT_LINE = 256 << 20


class SSEParser:
    """Server-Sent Events, per the HTML spec: lines end with CRLF, LF or CR; ``event`` and
    ``data`` fields; a blank line dispatches; comment lines (``:``) are keep-alives. Fed raw
    bytes as they arrive, so a line or a character split across reads is handled."""

    def __init__(self) -> None:
        # The pieces of a line not yet ended, joined once it ends: each byte is looked at once,
        # however the line is cut into reads (a result event is one line of megabytes).
        self._partial: List[bytes] = []
        self._partial_len = 0
        self._event = ""
        self._data: List[str] = []
        self._has_data = False
        self._skip_lf = False

    def feed(self, chunk: bytes) -> List[Tuple[str, str]]:
        out: List[Tuple[str, str]] = []
        start = 0
        if self._skip_lf and chunk:
            # A CR ended the last read: a LF opening this one belongs to it.
            self._skip_lf = False
            if chunk[:1] == b"\n":
                start = 1
        for m in _LINE_END.finditer(chunk, start):
            self._partial.append(chunk[start : m.start()])
            self._line(b"".join(self._partial), out)
            self._partial, self._partial_len = [], 0
            start = m.end()
            if m.group() == b"\r" and start == len(chunk):
                self._skip_lf = True
        rest = chunk[start:]
        if rest:
            self._partial.append(rest)
            self._partial_len += len(rest)
            if self._partial_len > MAX_EVENT_LINE:
                raise ProtocolError(
                    "protocol", f"an event line longer than {MAX_EVENT_LINE} bytes: not the daemon's stream"
                )
        return out

    def _line(self, raw: bytes, out: List[Tuple[str, str]]) -> None:
        line = raw.decode("utf-8", "replace")
        if line == "":
            if self._has_data:
                out.append((self._event or "message", "\n".join(self._data)))
            self._event, self._data, self._has_data = "", [], False
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
            self._has_data = True
        # id and retry mean nothing here.


def to_event(name: str, data: str) -> Optional[Event]:
    """One SSE event as a typed event; None for one this client does not know (ignored, so that a
    newer daemon's events do not break it). An ``error`` event raises."""
    if name not in ("started", "stdout", "stderr", "result", "error"):
        return None
    try:
        d = json.loads(data)
    except ValueError:
        raise ProtocolError("protocol", f"a {name} event whose data is not JSON: {data[:200]!r}") from None
    if name == "error":
        err = from_error_body(d, None)
        raise err if err is not None else ProtocolError("protocol", f"an error event of unknown shape: {data[:200]!r}")
    if not isinstance(d, dict):
        raise ProtocolError("protocol", f"a {name} event whose data is not an object: {data[:200]!r}")
    if name == "started":
        return Started(tool=d.get("tool", ""), call_id=d.get("call_id"), job_id=d.get("job_id"))
    if name in ("stdout", "stderr"):
        text = d.get("text", "")
        b64 = d.get("base64")
        raw = base64.b64decode(b64) if b64 is not None else text.encode("utf-8")
        return Output(stream=name, text=text, data=raw, missed=int(d.get("missed", 0)))
    # result: a tool result for a call, the job for a followed job.
    if "job_id" in d and "state" in d:
        return JobEnded(Job.from_json(d))
    return Result(ToolResult.from_json(d))


class StreamState:
    """What an event stream has seen: the call id, and the end (result or error)."""

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.call_id: Optional[str] = None
        self.result: Optional[ToolResult] = None
        self.job: Optional[Job] = None
        self.done = False
        #: The error an ``error`` event carried: raised after the events that came before it.
        self.error: Optional[SandboxError] = None

    def events(self, chunk: bytes) -> List[Event]:
        out: List[Event] = []
        for name, data in self.parser.feed(chunk):
            if self.done:
                break
            try:
                ev = to_event(name, data)
            except SandboxError as e:
                self.done = True
                self.error = e
                break
            if ev is None:
                continue
            if isinstance(ev, Started):
                self.call_id = ev.call_id or ev.job_id
            elif isinstance(ev, Result):
                if ev.result.call_id is None and self.call_id is not None:
                    ev = Result(_with_call_id(ev.result, self.call_id))
                self.result = ev.result
                self.done = True
            elif isinstance(ev, JobEnded):
                self.job = ev.job
                self.done = True
            out.append(ev)
        return out

    def ended_early(self) -> ProtocolError:
        return ProtocolError("stream_ended", "the event stream ended before its result (the daemon went away?)")


def _with_call_id(r: ToolResult, call_id: str) -> ToolResult:
    import dataclasses

    return dataclasses.replace(r, call_id=call_id)


def plain_answer_events(resp: httpx.Response) -> List[Event]:
    """A 2xx answer that is not an event stream (a daemon that answered as JSON): its result as
    the one event."""
    d = load_json(resp)
    if isinstance(d, dict) and "job_id" in d and "state" in d:
        return [JobEnded(Job.from_json(d))]
    return [Result(tool_result(resp))]


def jobs_list(d: Any) -> List[Job]:
    return [Job.from_json(j) for j in (d.get("jobs") if isinstance(d, dict) else None) or []]

