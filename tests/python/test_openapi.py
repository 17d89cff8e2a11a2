"""The HTTP API against its own OpenAPI document: what the document says, and schemathesis's
standard checks run against a live daemon (no 5xx, every answer, error and header as documented,
bad input refused, good input accepted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import httpx
import pytest

from conftest import Daemon, pool_daemon

HERE = Path(__file__).resolve().parent


def get(daemon: Daemon, path: str, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {daemon.token}", **kw.pop("headers", {})}
    return httpx.get(daemon.url + path, headers=headers, timeout=60, **kw)


def test_the_document_is_openapi_3_1_and_names_every_tool_route(daemon: Daemon) -> None:
    r = get(daemon, "/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc: Dict[str, Any] = r.json()
    assert doc["openapi"].startswith("3.1")
    tools = [t["function"]["name"] for t in get(daemon, "/v1/tools").json()["tools"]]
    assert tools == ["shell", "run_python", "read_file", "write_file", "list_dir", "delete_path"]
    for tool in tools:
        op = doc["paths"][f"/v1/users/{{user}}/tools/{tool}"]["post"]
        assert "401" in op["responses"], f"{tool}: a daemon with a token documents 401"
        assert {"200", "400", "503"} <= set(op["responses"]), tool
    # With a token, every route requires it.
    assert doc["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    # The files routes are there although their path has any depth.
    assert {"get", "put"} <= set(doc["paths"]["/v1/users/{user}/files/{path}"])


def test_tool_schemas_come_in_each_model_apis_shape(daemon: Daemon) -> None:
    openai = get(daemon, "/v1/tools").json()["tools"]
    anthropic = get(daemon, "/v1/tools", params={"format": "anthropic"}).json()["tools"]
    mcp = get(daemon, "/v1/tools", params={"format": "mcp"}).json()["tools"]
    assert len(openai) == len(anthropic) == len(mcp) == 6
    for o, a, m in zip(openai, anthropic, mcp):
        assert o["type"] == "function"
        f = o["function"]
        assert f["name"] == a["name"] == m["name"]
        assert f["parameters"] == a["input_schema"] == m["inputSchema"]
        assert f["parameters"]["type"] == "object" and f["description"]
        assert "$ref" not in str(f["parameters"]), "a model API takes no references"
    shell = openai[0]["function"]["parameters"]
    assert shell["required"] == ["command"] and shell["additionalProperties"] is False
    bad = get(daemon, "/v1/tools", params={"format": "gemini"})
    assert bad.status_code == 400 and bad.json()["error"]["kind"] == "bad_query"


def test_the_tool_schema_is_what_the_daemon_accepts(daemon: Daemon) -> None:
    """A model that follows the schema gets a result; one that strays gets a 400 naming it."""
    h = {"Authorization": f"Bearer {daemon.token}"}
    url = f"{daemon.url}/v1/users/schema-user/tools/shell"
    ok = httpx.post(url, json={"command": "echo hi", "timeout": 10}, headers=h, timeout=120)
    assert ok.status_code == 200 and ok.json()["stdout"] == "hi\n"
    stray = httpx.post(url, json={"command": "echo hi", "cmd": "x"}, headers=h, timeout=60)
    assert stray.status_code == 400 and "cmd" in stray.json()["error"]["message"]


def test_wrong_methods_and_unknown_routes_answer_the_json_error(daemon: Daemon) -> None:
    r = get(daemon, "/v1/users/alice/tools/shell")
    assert r.status_code == 405 and r.json()["error"]["kind"] == "method_not_allowed"
    r = get(daemon, "/v1/no-such-route")
    assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found"
    h = {"Authorization": f"Bearer {daemon.token}"}
    r = httpx.post(f"{daemon.url}/v1/users/alice/tools/no_such_tool", json={}, headers=h)
    assert r.status_code == 404 and r.json()["error"]["kind"] == "unknown_tool"


def test_the_api_passes_schemathesis_against_a_live_daemon(tmp_path: Path) -> None:
    # Calls end within 5 s whatever the fuzzer sends, so that its 30 s request timeout is never
    # the daemon's fault.
    extra = {"ZCBOT_EXEC_TIMEOUT": "5s", "ZCBOT_EXEC_TIMEOUT_MAX": "5s"}
    with pool_daemon(extra) as d:
        st = Path(sys.executable).parent / "st"
        env = dict(os.environ, SCHEMATHESIS_HOOKS="fuzz_hooks", PYTHONPATH=str(HERE))
        cmd = [
            str(st),
            "--config-file",
            str(HERE / "schemathesis.toml"),
            "run",
            f"{d.url}/openapi.json",
            "-H",
            f"Authorization: Bearer {d.token}",
            "--request-timeout",
            "30",
            "--workers",
            "2",
            "--max-examples",
            os.environ.get("ZCBOT_FUZZ_EXAMPLES", "100"),
            "--no-color",
        ]
        # Run from a folder of this test's own: schemathesis keeps a cache where it runs.
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
        out = run.stdout + run.stderr
        assert run.returncode == 0, f"schemathesis found problems:\n{out[-20000:]}"
        # A positive control: it really ran every operation of the document (but the document's
        # own route, which schemathesis leaves out).
        doc = httpx.get(f"{d.url}/openapi.json", headers={"Authorization": f"Bearer {d.token}"}).json()
        n = sum(1 for item in doc["paths"].values() for m in item if m in ("get", "put", "post", "delete"))
        assert n > 20 and f"Tested: {n - 1}" in out, out[-3000:]
        print(out[-1500:])


@pytest.mark.parametrize("path", ["/openapi.json", "/v1/tools"])
def test_the_document_and_the_tools_need_the_token_too(daemon: Daemon, path: str) -> None:
    r = httpx.get(daemon.url + path)
    assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized"
