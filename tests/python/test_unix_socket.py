"""`unix:/path` base URLs, against a daemon listening on a unix socket. It runs the host backend
(no Docker, no isolation: only harmless commands here), which is all a transport test needs."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Tuple

import pytest

from zcbot_sandbox import AsyncClient, Client, Unauthorized

from conftest import _binary, _clean_env, start_daemon, stop_daemon


@pytest.fixture(scope="module")
def socket_daemon() -> Iterator[Tuple[str, str]]:
    binary = _binary()
    root = Path(tempfile.mkdtemp(prefix="zcbot-pytest-uds-"))
    sock = root / "zcbot.sock"
    token = secrets.token_urlsafe(16)
    env = _clean_env()
    env.update(
        {
            "ZCBOT_SANDBOX_BACKEND": "host",
            "ZCBOT_LISTEN": f"unix:{sock}",
            "ZCBOT_USERS_ROOT": str(root / "users"),
            "ZCBOT_STATE_DIR": str(root / "state"),
            "ZCBOT_API_TOKEN": token,
        }
    )
    proc, addr = start_daemon(binary, env, root / "stderr.log", timeout=60)
    try:
        assert addr == f"unix:{sock}", addr
        yield addr, token
    finally:
        stop_daemon(proc)
        shutil.rmtree(root, ignore_errors=True)


def test_a_unix_socket_base_url(socket_daemon: Tuple[str, str]) -> None:
    addr, token = socket_daemon
    with Client(addr, token=token) as c:
        assert c.health()
        r = c.user("uds").shell("echo over-the-socket")
        assert r.stdout == "over-the-socket\n" and r.exit_code == 0
    with Client(addr, token="wrong") as bad:
        with pytest.raises(Unauthorized):
            bad.health()

    async def main() -> Any:
        async with AsyncClient(addr, token=token) as ac:
            return (await ac.user("uds").shell("echo async")).stdout

    assert asyncio.run(main()) == "async\n"
