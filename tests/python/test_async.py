"""The asyncio client against the same real daemon (each test runs its own event loop)."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any, Awaitable, Callable, List, Tuple, TypeVar

import pytest

from zcbot_sandbox import (
    AsyncClient,
    BadRequest,
    Forbidden,
    JobEnded,
    NotFound,
    Output,
    Result,
    Started,
    Unauthorized,
)

T = TypeVar("T")


async def retry(fn: Callable[[], Awaitable[T]], on: type, seconds: float = 10.0) -> T:
    end = time.monotonic() + seconds
    while True:
        try:
            return await fn()
        except on:  # type: ignore[misc]
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.05)


def run(daemon: Any, body: Callable[[AsyncClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.url, token=daemon.token) as c:
            await body(c)

    asyncio.run(main())


def test_async_shell_python_and_files(daemon: Any) -> None:
    async def body(c: AsyncClient) -> None:
        assert await c.health()
        bob = c.user("bob")
        r = await bob.shell("echo hi; exit 5")
        assert (r.stdout, r.exit_code) == ("hi\n", 5)
        s = "a" + secrets.token_hex(3)
        await bob.run_python("y = 'kept'", session=s)
        assert (await bob.run_python("y", session=s)).value == "'kept'"
        await bob.end_session(s)
        blob = bytes(range(256)) * 1000
        assert (await bob.write_file("f.bin", blob)).written.bytes_written == len(blob)
        assert (await bob.read_file("f.bin")).file.data == blob
        assert (await bob.list_dir(".")).listing.names.count("f.bin") == 1
        assert await bob.upload("up/g.bin", blob) == len(blob)

        async def pieces():  # type: ignore[no-untyped-def]
            for i in range(0, len(blob), 50_000):
                yield blob[i : i + 50_000]

        assert await bob.upload("up/h.bin", pieces()) == len(blob)
        assert await bob.download("up/h.bin") == blob
        assert (await bob.delete_path("up")).deleted.entries == 3
        t = await bob.shell("sleep 20", timeout=0.5)
        assert t.timed_out

    run(daemon, body)


def test_async_streaming(daemon: Any) -> None:
    async def body(c: AsyncClient) -> None:
        bob = c.user("bob")
        seen: List[Tuple[float, Any]] = []
        async with bob.stream_shell("echo a; sleep 1; echo b") as events:
            async for ev in events:
                seen.append((time.monotonic(), ev))
        assert isinstance(seen[0][1], Started) and isinstance(seen[-1][1], Result)
        t_a = next(t for t, ev in seen if isinstance(ev, Output) and "a" in ev.text)
        assert seen[-1][0] - t_a > 0.5, "'a' was not live"
        assert events.result is not None and events.result.stdout == "a\nb\n"
        job = await bob.start_job("shell", command="echo j1; sleep 0.5; echo j2")
        async with bob.follow_job(job.job_id) as follow:
            evs = [ev async for ev in follow]
        assert isinstance(evs[-1], JobEnded) and evs[-1].job.stdout == "j1\nj2\n"

    run(daemon, body)


def test_async_cancel_from_another_task(daemon: Any) -> None:
    async def body(c: AsyncClient) -> None:
        bob = c.user("bob")
        cid = "ac-" + secrets.token_hex(4)
        t0 = time.monotonic()
        call = asyncio.create_task(bob.shell("sleep 60", call_id=cid))
        await retry(lambda: bob.cancel(cid), NotFound, seconds=15)
        r = await asyncio.wait_for(call, 30)
        assert r.cancelled and time.monotonic() - t0 < 20

    run(daemon, body)


def test_async_errors(daemon: Any) -> None:
    async def body(c: AsyncClient) -> None:
        bob = c.user("bob")
        with pytest.raises(Forbidden) as e:
            await bob.read_file("../x")
        assert e.value.kind == "path_refused"
        with pytest.raises(NotFound) as e2:
            await bob.end_session("nope-" + secrets.token_hex(3))
        assert e2.value.kind == "no_such_session"
        with pytest.raises(BadRequest):
            async with bob.stream("shell", {"command": 1}) as events:
                async for _ in events:
                    pass
        with pytest.raises(NotFound) as e3:
            async with bob.stream("read_file", {"path": "missing-" + secrets.token_hex(3)}) as events:
                async for _ in events:
                    pass
        assert e3.value.kind == "not_found"

    run(daemon, body)

    async def bad() -> None:
        async with AsyncClient(daemon.url, token="wrong") as c:
            with pytest.raises(Unauthorized) as e:
                await c.user("bob").shell("true")
            assert e.value.kind == "unauthorized"

    asyncio.run(bad())
