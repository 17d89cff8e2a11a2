"""The asyncio client: the same surface as the blocking one, with ``await``."""

from __future__ import annotations

import asyncio
from typing import IO, Any, AsyncGenerator, AsyncIterator, Dict, List, Literal, Mapping, Optional, Union

import httpx

from . import _core
from ._core import Timeout
from ._errors import from_response
from ._sync import _job_args
from ._types import Event, Job, Readiness, SandboxInfo, SessionInfo, ToolResult
from ._uploads import CHUNK, AsyncUploadData, file_length

__all__ = ["AsyncClient", "AsyncUser", "AsyncEventStream"]


class AsyncClient:
    """The asyncio twin of ``Client`` (same arguments, timeouts and errors). Use one per event
    loop, and ``await close()`` it (or ``async with``)."""

    def __init__(
        self,
        base_url: str = _core.DEFAULT_URL,
        token: Optional[str] = None,
        timeout: Union[float, httpx.Timeout] = 30.0,
        *,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        url, uds = _core.split_base_url(base_url)
        if transport is None and uds is not None:
            transport = httpx.AsyncHTTPTransport(uds=uds)
        self._timeout = _core.short_timeout(timeout)
        self._http = httpx.AsyncClient(
            base_url=url,
            headers=_core.headers(token),
            timeout=self._timeout,
            transport=transport,
            limits=httpx.Limits(keepalive_expiry=_core.KEEPALIVE_EXPIRY),
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        timeout: Optional[httpx.Timeout] = None,
        **kw: Any,
    ) -> httpx.Response:
        resp = await self._http.request(method, path, json=json, timeout=timeout or self._timeout, **kw)
        _core.ensure_ok(resp)
        return resp

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        return _core.load_json(await self._request(method, path, **kw))

    def user(self, user: str) -> "AsyncUser":
        """A handle on one user's sandbox, sessions, jobs and files (no request is made)."""
        return AsyncUser(self, user)

    async def health(self) -> bool:
        """True when the daemon's process answers (``/healthz``); raises otherwise."""
        return bool(_core.load_json(await self._request("GET", "/healthz")).get("status") == "ok")

    async def ready(self) -> Readiness:
        """The readiness report; a not-ready daemon's 503 report is returned, not raised."""
        resp = await self._http.get("/readyz", timeout=self._timeout)
        if resp.status_code == 503:
            try:
                return Readiness.from_json(_core.load_json(resp))
            except Exception:
                pass
        _core.ensure_ok(resp)
        return Readiness.from_json(_core.load_json(resp))

    async def sandboxes(self) -> List[SandboxInfo]:
        """The pool's sandboxes (warm spares included)."""
        return [SandboxInfo.from_json(s) for s in await self._json("GET", "/v1/sandboxes")]

    async def reap(self) -> List[str]:
        """Reaps idle sandboxes now; the users whose sandbox went."""
        return list((await self._json("POST", "/v1/reap")).get("reaped") or [])

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncUser:
    """One user's side of the API, async. See ``User`` for what each method does."""

    def __init__(self, client: AsyncClient, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"AsyncUser({self.name!r})"

    def _path(self, *parts: str) -> str:
        return _core.user_path(self.name, *parts)

    async def call(self, tool: str, args: Mapping[str, Any], call_id: Optional[str] = None) -> ToolResult:
        """Runs any tool with raw JSON arguments."""
        body = dict(args)
        if call_id is not None:
            body["call_id"] = call_id
        c = self.client
        resp = await c._request(
            "POST", self._path("tools", tool), json=body, timeout=_core.call_timeout(c._timeout)
        )
        return _core.tool_result(resp)

    async def shell(
        self,
        command: str,
        timeout: Optional[Timeout] = None,
        workdir: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        call_id: Optional[str] = None,
    ) -> ToolResult:
        """Runs ``sh -c command``; a failure of the command is a result, not an exception."""
        return await self.call(
            "shell", _core.body(command=command, timeout=timeout, workdir=workdir, env=env), call_id
        )

    async def run_python(
        self,
        code: str,
        timeout: Optional[Timeout] = None,
        session: Optional[str] = None,
        workdir: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        call_id: Optional[str] = None,
    ) -> ToolResult:
        """Runs Python code, fresh or in a named session (see ``User.run_python``)."""
        return await self.call(
            "run_python",
            _core.body(code=code, timeout=timeout, session=session, workdir=workdir, env=env),
            call_id,
        )

    async def read_file(self, path: str, offset: Optional[int] = None, limit: Optional[int] = None) -> ToolResult:
        return await self.call("read_file", _core.body(path=path, offset=offset, limit=limit))

    async def write_file(self, path: str, content: Union[str, bytes], append: bool = False) -> ToolResult:
        return await self.call("write_file", _core.write_body(path, content, append))

    async def list_dir(self, path: str = ".") -> ToolResult:
        return await self.call("list_dir", {"path": path})

    async def delete_path(self, path: str) -> ToolResult:
        return await self.call("delete_path", {"path": path})

    def stream(self, tool: str, args: Mapping[str, Any], call_id: Optional[str] = None) -> "AsyncEventStream":
        """Runs any tool answered as events (``async for``). Use ``async with`` so the connection
        is closed (and the call cancelled) if you stop early: an abandoned async iterator is
        only closed when the garbage collector gets to it."""
        return AsyncEventStream(self.client, "POST", self._path("tools", tool), _core.stream_body(args, call_id))

    def stream_shell(
        self,
        command: str,
        timeout: Optional[Timeout] = None,
        workdir: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        call_id: Optional[str] = None,
    ) -> "AsyncEventStream":
        return self.stream("shell", _core.body(command=command, timeout=timeout, workdir=workdir, env=env), call_id)

    def stream_python(
        self,
        code: str,
        timeout: Optional[Timeout] = None,
        session: Optional[str] = None,
        workdir: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        call_id: Optional[str] = None,
    ) -> "AsyncEventStream":
        return self.stream(
            "run_python",
            _core.body(code=code, timeout=timeout, session=session, workdir=workdir, env=env),
            call_id,
        )

    async def cancel(self, call_id: str) -> None:
        """Cancels this user's call in flight; ``NotFound`` (``unknown_call``) if none."""
        await self.client._request("DELETE", self._path("calls", call_id))

    async def upload(self, path: str, data: AsyncUploadData) -> int:
        """Streams bytes, a binary file object (read in a worker thread), an iterable or an async
        iterable of bytes to ``path``. Returns bytes written."""
        c = self.client
        headers: Dict[str, str] = {"content-type": "application/octet-stream"}
        content: Union[bytes, AsyncIterator[bytes]]
        if isinstance(data, (bytes, bytearray, memoryview)):
            content = bytes(data)
        elif isinstance(data, str):
            raise TypeError("upload takes bytes; encode text first (or use write_file)")
        elif hasattr(data, "read"):
            f: IO[bytes] = data  # type: ignore[assignment]
            length = await asyncio.to_thread(file_length, f)
            if length is not None:
                headers["content-length"] = str(length)
            content = _file_pieces(f)
        elif hasattr(data, "__aiter__"):
            content = _async_pieces(data)
        else:
            content = _sync_pieces(data)
        resp = await c._request(
            "PUT",
            _core.file_path(self.name, path),
            content=content,
            headers=headers,
            timeout=_core.call_timeout(c._timeout),
        )
        return int(_core.load_json(resp).get("bytes_written", 0))

    async def download_to(self, path: str, fileobj: IO[bytes]) -> int:
        """Streams a file into ``fileobj`` (its ``write`` is called directly, so keep it a fast
        in-memory or local file); returns its size. A body cut short raises."""
        n = 0
        async for chunk in self.iter_download(path):
            fileobj.write(chunk)
            n += len(chunk)
        return n

    async def iter_download(self, path: str) -> AsyncIterator[bytes]:
        """A file's bytes as they arrive (an async generator: finish or ``aclose()`` it)."""
        c = self.client
        url = _core.file_path(self.name, path)
        async with c._http.stream("GET", url, timeout=_core.stream_timeout(c._timeout)) as resp:
            if resp.status_code >= 300:
                await resp.aread()
                raise from_response(resp.status_code, resp.content)
            n = 0
            async for chunk in resp.aiter_bytes(CHUNK):
                n += len(chunk)
                yield chunk
            _core.check_length(resp, n)

    async def download(self, path: str) -> bytes:
        """A file's bytes, in memory."""
        out = bytearray()
        async for chunk in self.iter_download(path):
            out += chunk
        return bytes(out)

    async def start_job(
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
        """Starts a background job and returns at once (see ``User.start_job``)."""
        args = _job_args(tool, command, code)
        args.update(_core.body(timeout=timeout, workdir=workdir, env=env))
        args["background"] = True
        if job_id is not None:
            args["call_id"] = job_id
        return Job.from_json(await self.client._json("POST", self._path("tools", tool), json=args))

    async def jobs(self) -> List[Job]:
        return _core.jobs_list(await self.client._json("GET", self._path("jobs")))

    async def job(self, job_id: str) -> Job:
        return Job.from_json(await self.client._json("GET", self._path("jobs", job_id)))

    async def kill_job(self, job_id: str) -> Job:
        c = self.client
        return Job.from_json(
            await c._json("DELETE", self._path("jobs", job_id), timeout=_core.call_timeout(c._timeout))
        )

    def follow_job(self, job_id: str) -> "AsyncEventStream":
        return AsyncEventStream(self.client, "GET", self._path("jobs", job_id), None)

    async def sessions(self) -> List[SessionInfo]:
        d = await self.client._json("GET", self._path("sessions"))
        return [SessionInfo.from_json(s) for s in d.get("sessions") or []]

    async def end_session(self, name: str) -> None:
        c = self.client
        await c._request("DELETE", self._path("sessions", name), timeout=_core.call_timeout(c._timeout))

    async def sandbox(self) -> SandboxInfo:
        return SandboxInfo.from_json(await self.client._json("GET", self._path("sandbox")))

    async def remove_sandbox(self) -> str:
        c = self.client
        d = await c._json("DELETE", self._path("sandbox"), timeout=_core.call_timeout(c._timeout))
        return str(d.get("removed", ""))


async def _file_pieces(f: IO[bytes]) -> AsyncIterator[bytes]:
    while True:
        piece = await asyncio.to_thread(f.read, CHUNK)
        if not piece:
            return
        if isinstance(piece, str):
            raise TypeError("upload needs a file opened in binary mode ('rb')")
        yield bytes(piece)


async def _async_pieces(data: Any) -> AsyncIterator[bytes]:
    async for piece in data:
        yield bytes(piece)


async def _sync_pieces(data: Any) -> AsyncIterator[bytes]:
    for piece in data:
        yield bytes(piece)


class AsyncEventStream:
    """The async twin of ``EventStream``: ``async for`` it, inside ``async with``."""

    def __init__(self, client: AsyncClient, method: str, path: str, body: Optional[Dict[str, Any]]) -> None:
        self._client = client
        self._method = method
        self._path = path
        self._body = body
        self._state = _core.StreamState()
        self._gen: Optional[AsyncGenerator[Event, None]] = None

    @property
    def call_id(self) -> Optional[str]:
        return self._state.call_id

    @property
    def result(self) -> Optional[ToolResult]:
        return self._state.result

    @property
    def job(self) -> Optional[Job]:
        return self._state.job

    async def _run(self) -> AsyncGenerator[Event, None]:
        c = self._client
        st = self._state
        async with c._http.stream(
            self._method,
            self._path,
            params={"stream": "1"},
            json=self._body,
            headers={"accept": _core.EVENT_STREAM},
            timeout=_core.stream_timeout(c._timeout),
        ) as resp:
            if resp.status_code >= 300:
                await resp.aread()
                raise from_response(resp.status_code, resp.content)
            if not _core.is_event_stream(resp):
                await resp.aread()
                for ev in _core.plain_answer_events(resp):
                    yield ev
                st.done = True
                return
            async for chunk in resp.aiter_bytes():
                for ev in st.events(chunk):
                    yield ev
                if st.error is not None:
                    raise st.error
                if st.done:
                    return
        raise st.ended_early()

    def __aiter__(self) -> "AsyncEventStream":
        return self

    async def __anext__(self) -> Event:
        if self._gen is None:
            self._gen = self._run()
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Stops reading and closes the connection (a streamed call is then cancelled)."""
        if self._gen is not None:
            await self._gen.aclose()

    async def __aenter__(self) -> "AsyncEventStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
