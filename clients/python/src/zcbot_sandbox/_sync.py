"""The blocking client."""

from __future__ import annotations

import io
from typing import IO, Any, BinaryIO, Dict, Generator, Iterable, Iterator, List, Literal, Mapping, Optional, Union

import httpx

from . import _core
from ._core import Timeout
from ._errors import BadRequest, from_response
from ._types import Event, Job, Readiness, SandboxInfo, SessionInfo, ToolResult
from ._uploads import CHUNK, UploadData, file_length, read_chunks

__all__ = ["Client", "User", "EventStream"]


class Client:
    """A connection pool to one zcbot-sandbox daemon.

    ``base_url`` is ``http://host:port`` or ``unix:/path/to.sock``. ``token`` is the daemon's
    ``ZCBOT_API_TOKEN`` (sent as ``Authorization: Bearer``). ``timeout`` bounds requests the
    daemon answers at once (seconds, or an ``httpx.Timeout``); tool calls and uploads keep its
    connect and write limits but have no read timeout, because a call may rightly run for its whole
    tool timeout (minutes) and the daemon bounds it itself; event streams and downloads time out
    after 60 s of silence (the daemon sends a keep-alive every 2 s).

    Thread-safe: share one client, and close it (or use ``with``) when done. Errors the daemon
    answers raise ``SandboxError`` subclasses; network failures raise ``httpx.TransportError``.
    """

    def __init__(
        self,
        base_url: str = _core.DEFAULT_URL,
        token: Optional[str] = None,
        timeout: Union[float, httpx.Timeout] = 30.0,
        *,
        transport: Optional[httpx.BaseTransport] = None,
    ) -> None:
        url, uds = _core.split_base_url(base_url)
        if transport is None and uds is not None:
            transport = httpx.HTTPTransport(uds=uds)
        self._timeout = _core.short_timeout(timeout)
        self._http = httpx.Client(
            base_url=url,
            headers=_core.headers(token),
            timeout=self._timeout,
            transport=transport,
            limits=httpx.Limits(keepalive_expiry=_core.KEEPALIVE_EXPIRY),
        )

    # -- plumbing

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        timeout: Optional[httpx.Timeout] = None,
        **kw: Any,
    ) -> httpx.Response:
        resp = self._http.request(method, path, json=json, timeout=timeout or self._timeout, **kw)
        _core.ensure_ok(resp)
        return resp

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return _core.load_json(self._request(method, path, **kw))

    # -- the client's own routes

    def user(self, user: str) -> "User":
        """A handle on one user's sandbox, sessions, jobs and files (no request is made)."""
        return User(self, user)

    def health(self) -> bool:
        """True when the daemon's process answers (``/healthz``); raises otherwise."""
        return bool(_core.load_json(self._request("GET", "/healthz")).get("status") == "ok")

    def ready(self) -> Readiness:
        """The readiness report. A daemon that is not ready answers 503 with the same report:
        that is returned (``ready=False``, see ``failed``), not raised."""
        resp = self._http.get("/readyz", timeout=self._timeout)
        if resp.status_code == 503:
            try:
                return Readiness.from_json(_core.load_json(resp))
            except Exception:
                pass
        _core.ensure_ok(resp)
        return Readiness.from_json(_core.load_json(resp))

    def sandboxes(self) -> List[SandboxInfo]:
        """The pool's sandboxes (warm spares included: ``spare=True``, empty ``user``)."""
        return [SandboxInfo.from_json(s) for s in self._json("GET", "/v1/sandboxes")]

    def reap(self) -> List[str]:
        """Reaps idle sandboxes now; the users whose sandbox went."""
        return list(self._json("POST", "/v1/reap").get("reaped") or [])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class User:
    """One user's side of the API. Cheap: make one per request if you like."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"User({self.name!r})"

    def _path(self, *parts: str) -> str:
        return _core.user_path(self.name, *parts)

    # -- tool calls

    def call(self, tool: str, args: Mapping[str, Any], call_id: Optional[str] = None) -> ToolResult:
        """Runs any tool with raw JSON arguments (the typed methods below are built on it)."""
        body = dict(args)
        if call_id is not None:
            body["call_id"] = call_id
        c = self.client
        resp = c._request(
            "POST", self._path("tools", tool), json=body, timeout=_core.call_timeout(c._timeout)
        )
        return _core.tool_result(resp)

    def shell(
        self,
        command: str,
        timeout: Optional[Timeout] = None,
        workdir: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        call_id: Optional[str] = None,
    ) -> ToolResult:
        """Runs ``sh -c command`` in the user's sandbox and returns once it has ended.

        A non-zero exit, a timeout (``timed_out``) or a cancel (``cancelled``) is a result, not an
        exception: the agent usually wants to see it.
        """
        return self.call("shell", _core.body(command=command, timeout=timeout, workdir=workdir, env=env), call_id)

    def run_python(
        self,
        code: str,
        timeout: Optional[Timeout] = None,
        session: Optional[str] = None,
        workdir: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        call_id: Optional[str] = None,
    ) -> ToolResult:
        """Runs Python code: a fresh ``python3`` each time, or with ``session`` in the user's
        long-lived interpreter of that name (state persists; ``value``, ``error``, ``results`` are
        then set). ``workdir``/``env`` are refused with a session (it keeps its own)."""
        return self.call(
            "run_python",
            _core.body(code=code, timeout=timeout, session=session, workdir=workdir, env=env),
            call_id,
        )

    def read_file(self, path: str, offset: Optional[int] = None, limit: Optional[int] = None) -> ToolResult:
        """Reads up to ``limit`` bytes (at most the daemon's output cap) from ``offset``; the
        result's ``file`` has them (``.content`` text, ``.data`` exact bytes, ``.eof``)."""
        return self.call("read_file", _core.body(path=path, offset=offset, limit=limit))

    def write_file(self, path: str, content: Union[str, bytes], append: bool = False) -> ToolResult:
        """Writes text or bytes (bytes go as base64), creating parent folders. For big files
        ``upload`` streams instead of holding the whole body as JSON."""
        return self.call("write_file", _core.write_body(path, content, append))

    def list_dir(self, path: str = ".") -> ToolResult:
        """Lists a folder; the result's ``listing`` has the entries sorted by name."""
        return self.call("list_dir", {"path": path})

    def delete_path(self, path: str) -> ToolResult:
        """Deletes a file, a symlink (never its target) or a folder recursively."""
        return self.call("delete_path", {"path": path})

    # -- live output

    def stream(self, tool: str, args: Mapping[str, Any], call_id: Optional[str] = None) -> "EventStream":
        """Runs any tool answered as events: ``Started``, ``Output``..., then ``Result``.

        The request goes out when iteration starts. Closing the stream early (``close()``,
        leaving its ``with`` block, or breaking out and dropping it) closes the connection, which
        cancels the call on the daemon.
        """
        return EventStream(self.client, "POST", self._path("tools", tool), _core.stream_body(args, call_id))

    def stream_shell(
        self,
        command: str,
        timeout: Optional[Timeout] = None,
        workdir: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        call_id: Optional[str] = None,
    ) -> "EventStream":
        """``shell`` with its output as it is printed (see ``stream``)."""
        return self.stream("shell", _core.body(command=command, timeout=timeout, workdir=workdir, env=env), call_id)

    def stream_python(
        self,
        code: str,
        timeout: Optional[Timeout] = None,
        session: Optional[str] = None,
        workdir: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        call_id: Optional[str] = None,
    ) -> "EventStream":
        """``run_python`` with its output as it is printed (see ``stream``)."""
        return self.stream(
            "run_python",
            _core.body(code=code, timeout=timeout, session=session, workdir=workdir, env=env),
            call_id,
        )

    def cancel(self, call_id: str) -> None:
        """Cancels this user's call in flight; the call then answers with ``cancelled=True``.
        Raises ``NotFound`` (``unknown_call``) when no such call is running (yet, or any more)."""
        self.client._request("DELETE", self._path("calls", call_id))

    # -- files, streamed

    def upload(self, path: str, data: UploadData) -> int:
        """Writes ``data`` (bytes, a binary file object, or an iterable of bytes) to ``path``,
        streamed; the old file is replaced only once the body is whole. Returns bytes written."""
        c = self.client
        headers: Dict[str, str] = {"content-type": "application/octet-stream"}
        content: Union[bytes, Iterable[bytes]]
        if isinstance(data, (bytes, bytearray, memoryview)):
            content = bytes(data)
        elif isinstance(data, str):
            raise TypeError("upload takes bytes; encode text first (or use write_file)")
        elif hasattr(data, "read"):
            f: IO[bytes] = data  # type: ignore[assignment]
            length = file_length(f)
            if length is not None:
                headers["content-length"] = str(length)
            content = read_chunks(f)
        else:
            content = (bytes(piece) for piece in data)
        resp = c._request(
            "PUT",
            _core.file_path(self.name, path),
            content=content,
            headers=headers,
            timeout=_core.call_timeout(c._timeout),
        )
        return int(_core.load_json(resp).get("bytes_written", 0))

    def download_to(self, path: str, fileobj: Union[BinaryIO, IO[bytes]]) -> int:
        """Streams a file into ``fileobj`` (anything with ``write(bytes)``); returns its size.
        A body cut short raises (never a silently truncated file)."""
        n = 0
        for chunk in self.iter_download(path):
            fileobj.write(chunk)
            n += len(chunk)
        return n

    def iter_download(self, path: str) -> Iterator[bytes]:
        """A file's bytes as they arrive (a generator: finish it or ``close()`` it, which closes
        the connection)."""
        c = self.client
        url = _core.file_path(self.name, path)
        with c._http.stream("GET", url, timeout=_core.stream_timeout(c._timeout)) as resp:
            if resp.status_code >= 300:
                resp.read()
                raise from_response(resp.status_code, resp.content)
            n = 0
            for chunk in resp.iter_bytes(CHUNK):
                n += len(chunk)
                yield chunk
            _core.check_length(resp, n)

    def download(self, path: str) -> bytes:
        """A file's bytes (kept in memory: prefer ``download_to`` for big ones)."""
        buf = io.BytesIO()
        self.download_to(path, buf)
        return buf.getvalue()

    # -- background jobs

    def start_job(
        self,
        tool: Literal["shell", "run_python"],
        *,
        command: Optional[str] = None,
        code: Optional[str] = None,
        timeout: Optional[Timeout] = None,
        workdir: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        job_id: Optional[str] = None,
    ) -> Job:
        """Starts ``shell`` (``command``) or stateless ``run_python`` (``code``) as a background
        job and returns at once. It runs on after this request; its timeout defaults to and is
        bounded by the daemon's ZCBOT_JOB_TIMEOUT. ``job_id`` is yours or a new one."""
        args = _job_args(tool, command, code)
        args.update(_core.body(timeout=timeout, workdir=workdir, env=env))
        args["background"] = True
        if job_id is not None:
            args["call_id"] = job_id
        return Job.from_json(self.client._json("POST", self._path("tools", tool), json=args))

    def jobs(self) -> List[Job]:
        """The user's jobs, oldest first, without their output."""
        return _core.jobs_list(self.client._json("GET", self._path("jobs")))

    def job(self, job_id: str) -> Job:
        """One job with its latest output."""
        return Job.from_json(self.client._json("GET", self._path("jobs", job_id)))

    def kill_job(self, job_id: str) -> Job:
        """Kills a running job's whole process tree and returns it once ended (still
        ``running`` if it had not ended within the daemon's kill grace + 5 s: the kill goes on);
        the daemon then forgets it (the answer is its last record); an ended job is just
        forgotten."""
        c = self.client
        return Job.from_json(c._json("DELETE", self._path("jobs", job_id), timeout=_core.call_timeout(c._timeout)))

    def follow_job(self, job_id: str) -> "EventStream":
        """A job's output as events: ``Started`` (``job_id``), what it has kept, its output as it
        comes, then ``JobEnded``. Following never affects the job; closing the stream just stops
        following. Takes one of the user's call slots while it follows."""
        return EventStream(self.client, "GET", self._path("jobs", job_id), None)

    # -- sessions and the sandbox

    def sessions(self) -> List[SessionInfo]:
        """The user's Python sessions."""
        d = self.client._json("GET", self._path("sessions"))
        return [SessionInfo.from_json(s) for s in d.get("sessions") or []]

    def end_session(self, name: str) -> None:
        """Ends a session (its interpreter and everything it started are killed); ``NotFound``
        (``no_such_session``) when there is none."""
        self.client._request("DELETE", self._path("sessions", name), timeout=_core.call_timeout(self.client._timeout))

    def sandbox(self) -> SandboxInfo:
        """The user's sandbox; ``NotFound`` (``no_sandbox``) when it has none right now."""
        return SandboxInfo.from_json(self.client._json("GET", self._path("sandbox")))

    def remove_sandbox(self) -> str:
        """Removes the user's sandbox now (its files stay); returns the container's name."""
        c = self.client
        d = c._json("DELETE", self._path("sandbox"), timeout=_core.call_timeout(c._timeout))
        return str(d.get("removed", ""))


def _job_args(tool: str, command: Optional[str], code: Optional[str]) -> Dict[str, Any]:
    if tool == "shell" and command is not None and code is None:
        return {"command": command}
    if tool == "run_python" and code is not None and command is None:
        return {"code": code}
    raise BadRequest("bad_call", "a shell job takes command=, a run_python job takes code=", None)


class EventStream:
    """An event stream of a call or a followed job: iterate it for ``Event``s.

    ``Started`` comes first, then ``Output`` (stdout/stderr, as printed), then ``Result`` (a call)
    or ``JobEnded`` (a job). An ``error`` event raises its ``SandboxError``; so does a call the
    daemon refused before it ran. After the end, ``result`` (or ``job``) holds it. Use it in a
    ``with`` block, or call ``close()``: closing before the end closes the connection, which
    cancels a streamed call.
    """

    def __init__(self, client: Client, method: str, path: str, body: Optional[Dict[str, Any]]) -> None:
        self._client = client
        self._method = method
        self._path = path
        self._body = body
        self._state = _core.StreamState()
        self._gen: Optional[Generator[Event, None, None]] = None

    @property
    def call_id(self) -> Optional[str]:
        """The call's id (or the job's), once ``Started`` has come."""
        return self._state.call_id

    @property
    def result(self) -> Optional[ToolResult]:
        return self._state.result

    @property
    def job(self) -> Optional[Job]:
        return self._state.job

    def _run(self) -> Generator[Event, None, None]:
        c = self._client
        st = self._state
        with c._http.stream(
            self._method,
            self._path,
            params={"stream": "1"},
            json=self._body,
            headers={"accept": _core.EVENT_STREAM},
            timeout=_core.stream_timeout(c._timeout),
        ) as resp:
            if resp.status_code >= 300:
                resp.read()
                raise from_response(resp.status_code, resp.content)
            if not _core.is_event_stream(resp):
                resp.read()
                for ev in _core.plain_answer_events(resp):
                    yield ev
                st.done = True
                return
            for chunk in resp.iter_bytes():
                for ev in st.events(chunk):
                    yield ev
                if st.error is not None:
                    raise st.error
                if st.done:
                    return
        raise st.ended_early()

    def __iter__(self) -> "EventStream":
        return self

    def __next__(self) -> Event:
        if self._gen is None:
            self._gen = self._run()
        return next(self._gen)

    def close(self) -> None:
        """Stops reading and closes the connection (a streamed call is then cancelled)."""
        if self._gen is not None:
            self._gen.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
