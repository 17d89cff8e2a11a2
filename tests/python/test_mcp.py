"""The MCP endpoint through the official Python MCP client (the `mcp` package): the same tools as
the HTTP API, run as the user the URL names, with the token, the output as progress notifications,
and a cancelled call's processes killed."""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any, List, Optional

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import Daemon


def mcp_client(daemon: Daemon, user: str, token: Optional[str] = None) -> Client:
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {daemon.token if token is None else token}"},
        timeout=httpx2.Timeout(120.0),
    )
    return Client(streamable_http_client(f"{daemon.url}/v1/users/{user}/mcp", http_client=http))


def api(daemon: Daemon, method: str, path: str, **kw: Any) -> httpx.Response:
    h = {"Authorization": f"Bearer {daemon.token}"}
    return httpx.request(method, daemon.url + path, headers=h, timeout=120, **kw)


def text_of(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def sleepers(container: str, needle: str) -> List[str]:
    out = subprocess.run(["docker", "top", container, "-eo", "pid,args"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if needle in line]


def test_tools_list_is_the_apis_tools(daemon: Daemon) -> None:
    async def main() -> Any:
        async with mcp_client(daemon, "mcp-list") as c:
            return await c.list_tools()

    listed = asyncio.run(main())
    http = api(daemon, "GET", "/v1/tools", params={"format": "mcp"}).json()["tools"]
    assert [t.name for t in listed.tools] == [t["name"] for t in http]
    for t, h in zip(listed.tools, http):
        assert t.description == h["description"]
        assert t.input_schema == h["inputSchema"], t.name


def test_a_call_runs_as_the_user_the_url_names(daemon: Daemon) -> None:
    async def main() -> Any:
        async with mcp_client(daemon, "mcp-alice") as c:
            wrote = await c.call_tool("write_file", {"path": "from-mcp.txt", "content": "hello"})
            ran = await c.call_tool("shell", {"command": "cat from-mcp.txt; echo; id -u"})
            failed = await c.call_tool("shell", {"command": "echo oops >&2; exit 3"})
            bad = await c.call_tool("shell", {"cmd": "ls"})
            return wrote, ran, failed, bad

    wrote, ran, failed, bad = asyncio.run(main())
    assert not wrote.is_error, text_of(wrote)
    assert not ran.is_error, text_of(ran)
    stdout = ran.structured_content["stdout"]
    assert stdout.startswith("hello\n") and "[exit code 0]" in text_of(ran)
    # The same user through the HTTP API sees the file and runs as the same uid.
    r = api(daemon, "POST", "/v1/users/mcp-alice/tools/shell", json={"command": "id -u"}).json()
    assert stdout.split()[-1] == r["stdout"].strip()
    # Another user does not see it.
    other = api(daemon, "POST", "/v1/users/mcp-bob/tools/read_file", json={"path": "from-mcp.txt"})
    assert other.status_code == 404
    # A failing command is an error result the model reads, with its output and exit code.
    assert failed.is_error and "oops" in text_of(failed) and "[exit code 3]" in text_of(failed)
    assert failed.structured_content["exit_code"] == 3
    # Bad arguments are refused as the API refuses them, named.
    assert bad.is_error and "bad_call" in text_of(bad) and "cmd" in text_of(bad)


def test_output_arrives_as_progress_before_the_result(daemon: Daemon) -> None:
    seen: List[tuple] = []

    async def on_progress(progress: float, total: Optional[float], message: Optional[str]) -> None:
        seen.append((time.monotonic(), progress, message or ""))

    async def main() -> Any:
        async with mcp_client(daemon, "mcp-progress") as c:
            r = await c.call_tool(
                "shell",
                {"command": "echo first; sleep 2; echo second"},
                progress_callback=on_progress,
            )
            return time.monotonic(), r

    ended, r = asyncio.run(main())
    assert not r.is_error and r.structured_content["stdout"] == "first\nsecond\n"
    firsts = [t for t, _, m in seen if "first" in m]
    assert firsts, f"no progress carried the first line: {seen}"
    assert ended - firsts[0] > 1.0, "the first line came only with the result"
    assert any("second" in m for _, _, m in seen)
    progress = [p for _, p, _ in seen]
    assert progress == sorted(progress), "progress goes forward"


def test_a_cancelled_call_takes_its_processes_with_it(daemon: Daemon) -> None:
    user = "mcp-cancel"
    container = f"zcbot-sandbox-{daemon.pool_id}.{user}"
    api(daemon, "POST", f"/v1/users/{user}/tools/shell", json={"command": "true"})
    before = api(daemon, "GET", "/metrics").text

    async def main() -> None:
        async with mcp_client(daemon, user) as c:
            call = asyncio.create_task(c.call_tool("shell", {"command": "sleep 7301"}))
            deadline = time.monotonic() + 30
            while not sleepers(container, "sleep 7301"):
                assert time.monotonic() < deadline, "the call never started"
                await asyncio.sleep(0.1)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while sleepers(container, "sleep 7301") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sleepers(container, "sleep 7301"), "the cancelled call's process survived"
    after = api(daemon, "GET", "/metrics").text

    def cancels(text: str) -> int:
        return int(next(line for line in text.splitlines() if line.startswith("zcbot_cancels_total")).split()[1])

    assert cancels(after) == cancels(before) + 1


def test_the_token_and_the_user_id_are_checked(daemon: Daemon) -> None:
    async def with_token(token: str) -> Any:
        async with mcp_client(daemon, "mcp-auth", token=token) as c:
            return await c.list_tools()

    # The client reports the refusal its own way (an MCP error); the raw request below shows what
    # the daemon answered.
    with pytest.raises(Exception) as refused:
        asyncio.run(with_token("not-the-token"))
    assert not isinstance(refused.value, (OSError, httpx2.TransportError)), repr(refused.value)
    # Positive control: the right token on the same URL.
    assert asyncio.run(with_token(daemon.token)).tools
    # What the client saw: the API's own 401, before anything MCP.
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "shell", "arguments": {"command": "true"}}}
    headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}
    r = httpx.post(f"{daemon.url}/v1/users/mcp-auth/mcp", json=call, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
    # A user id that breaks the rule runs nothing: a JSON-RPC error that says why.
    headers["Authorization"] = f"Bearer {daemon.token}"
    r = httpx.post(f"{daemon.url}/v1/users/Not_A_User/mcp", json=call, headers=headers)
    assert r.status_code == 200 and "invalid user id" in r.text, r.text
