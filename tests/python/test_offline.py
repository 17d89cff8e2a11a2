"""What needs no daemon: the event-stream parser, error mapping of odd answers, base URLs."""

from __future__ import annotations

import json

import httpx
import pytest

from zcbot_sandbox import (
    Client,
    Deleted,
    Listing,
    NotFound,
    Output,
    ProtocolError,
    Result,
    SandboxError,
    Started,
    ToolResult,
    Unavailable,
)
from zcbot_sandbox._core import SSEParser, split_base_url

STREAM = (
    b": keep-alive\n\n"
    b'event: started\ndata: {"call_id":"c1","tool":"shell"}\n\n'
    b'event: stdout\r\ndata: {"text":"a\xc3\xa9\\n"}\r\n\r\n'
    b'event: stderr\rdata: {"text":"\\ufffd","base64":"/w=="}\r\r'
    b'event: result\ndata: {"tool":"shell","exit_code":0,"stdout":"a\xc3\xa9\\n","stderr":"\\ufffd",'
    b'"stderr_base64":"/w==","timed_out":false,"cancelled":false,'
    b'"truncated":{"stdout":false,"stderr":false},"duration_ms":3}\n\n'
)


def test_the_parser_handles_any_split_and_every_line_ending() -> None:
    whole = SSEParser().feed(STREAM)
    assert [n for n, _ in whole] == ["started", "stdout", "stderr", "result"]
    for cut in range(1, len(STREAM)):
        p = SSEParser()
        assert p.feed(STREAM[:cut]) + p.feed(STREAM[cut:]) == whole, cut
    p = SSEParser()
    assert sum((p.feed(bytes([b])) for b in STREAM), []) == whole


def _mock(handler) -> Client:  # type: ignore[no-untyped-def]
    return Client("http://daemon.test", token="t", transport=httpx.MockTransport(handler))


def test_a_stream_becomes_typed_events() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        assert req.headers["authorization"] == "Bearer t"
        assert req.url.params["stream"] == "1"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=STREAM)

    with _mock(handler) as c:
        evs = list(c.user("u").stream_shell("x"))
    assert evs[0] == Started(tool="shell", call_id="c1")
    assert evs[1] == Output("stdout", "aé\n", "aé\n".encode())
    assert isinstance(evs[2], Output) and evs[2].data == b"\xff"
    assert isinstance(evs[3], Result) and evs[3].result.call_id == "c1" and evs[3].result.stderr_bytes == b"\xff"


def test_an_error_event_raises_after_the_output_before_it() -> None:
    body = (
        b'event: started\ndata: {"call_id":"c","tool":"read_file"}\n\n'
        b'event: stdout\ndata: {"text":"x"}\n\n'
        b'event: error\ndata: {"error":{"kind":"not_found","message":"no such file"}}\n\n'
    )
    with _mock(lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)) as c:
        got = []
        with pytest.raises(NotFound) as e:
            for ev in c.user("u").stream("read_file", {"path": "p"}):
                got.append(ev)
    assert [type(g) for g in got] == [Started, Output]
    assert (e.value.kind, e.value.status) == ("not_found", 404)


def test_an_error_event_says_its_own_status() -> None:
    # A kind the client's table does not know: the status the event carries picks the class.
    body = (
        b'event: started\ndata: {"call_id":"c","tool":"shell"}\n\n'
        b'event: error\ndata: {"error":{"kind":"sandbox_gone","message":"removed"},"status":503}\n\n'
    )
    with _mock(lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)) as c:
        with pytest.raises(Unavailable) as e:
            list(c.user("u").stream_shell("x"))
    assert (e.value.kind, e.value.status) == ("sandbox_gone", 503)


def test_a_stream_cut_before_its_result_raises() -> None:
    body = b'event: started\ndata: {"call_id":"c","tool":"shell"}\n\n'
    with _mock(lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)) as c:
        with pytest.raises(ProtocolError) as e:
            list(c.user("u").stream_shell("x"))
    assert e.value.kind == "stream_ended"


def test_a_non_json_error_still_raises_with_its_status() -> None:
    with _mock(lambda r: httpx.Response(502, content=b"<html>bad gateway</html>")) as c:
        with pytest.raises(Unavailable) as e:
            c.user("u").shell("x")
    assert (e.value.kind, e.value.status) == ("http_502", 502) and "bad gateway" in e.value.message
    with _mock(lambda r: httpx.Response(418, content=b"")) as c:
        with pytest.raises(SandboxError) as e2:
            c.health()
    assert type(e2.value) is SandboxError and e2.value.kind == "http_418"


def test_tool_data_shapes() -> None:
    base = {"tool": "t", "exit_code": None, "stdout": "", "stderr": "", "timed_out": False, "cancelled": False,
            "truncated": {"stdout": False, "stderr": False}, "duration_ms": 1}
    listing = ToolResult.from_json({**base, "data": {"entries": [{"name": "a", "kind": "file", "size": 1}], "truncated": False}})
    assert isinstance(listing.data, Listing) and listing.listing.names == ["a"]
    deleted = ToolResult.from_json({**base, "data": {"deleted": "d", "entries": 3}})
    assert deleted.data == Deleted("d", 3)
    with pytest.raises(TypeError):
        _ = deleted.listing
    future = ToolResult.from_json({**base, "data": {"something_new": 1}, "new_field": 2})
    assert future.data == {"something_new": 1} and future.raw["new_field"] == 2
    assert json.loads(json.dumps(future.raw)) == future.raw


def test_base_urls() -> None:
    assert split_base_url("http://127.0.0.1:8787/") == ("http://127.0.0.1:8787", None)
    assert split_base_url("unix:/run/zcbot.sock") == ("http://zcbot-sandbox", "/run/zcbot.sock")
    assert split_base_url("unix:///run/zcbot.sock") == ("http://zcbot-sandbox", "/run/zcbot.sock")


def test_path_segments_cannot_change_the_route() -> None:
    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.url.raw_path.decode())
        return httpx.Response(200, json={"ended": "x"})

    with _mock(handler) as c:
        c.user("u").end_session("a/../../b")
        c.user("u").upload("dir/a b#?.txt", b"")
        c.user("..").upload("../x/./y", b"")
    assert seen == [
        "/v1/users/u/sessions/a%2F..%2F..%2Fb",
        "/v1/users/u/files/dir/a%20b%23%3F.txt",
        "/v1/users/%2E%2E/files/%2E%2E/x/%2E/y",
    ]


def test_a_background_call_is_not_streamed() -> None:
    with _mock(lambda r: httpx.Response(500)) as c:
        with pytest.raises(ValueError):
            c.user("u").stream("shell", {"command": "x", "background": True})


def test_a_long_event_line_cut_into_many_reads_is_parsed_in_linear_time() -> None:
    import time

    line = b'event: result\ndata: {"stdout": "' + b"\\u0001" * (2 << 20) + b'"}\n\n'
    p = SSEParser()
    started = time.monotonic()
    events = []
    for i in range(0, len(line), 4096):
        events += p.feed(line[i : i + 4096])
    took = time.monotonic() - started
    assert len(events) == 1 and events[0][0] == "result" and len(events[0][1]) > 12 << 20
    # Quadratic rescanning took tens of seconds here; one pass over 12 MiB takes well under one.
    assert took < 5, f"{took:.1f} s"


def test_line_ends_split_across_reads() -> None:
    p = SSEParser()
    got = []
    for piece in [b"event: a\r", b"\ndata: 1\r", b"\r", b"event: b\n", b"data: 2\n", b"\n"]:
        got += p.feed(piece)
    assert got == [("a", "1"), ("b", "2")]
