"""The blocking client against a real daemon (Docker backend): what a user of the library sees."""

from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Callable, List, Tuple, TypeVar

import pytest

from zcbot_sandbox import (
    BadRequest,
    Client,
    Conflict,
    Forbidden,
    JobEnded,
    NotFound,
    Output,
    Result,
    SandboxError,
    Started,
    ToolResult,
    Unauthorized,
    User,
)

T = TypeVar("T")


def retry(fn: Callable[[], T], on: type, seconds: float = 10.0) -> T:
    """fn() until it stops raising `on` (or the time is up, then the last error is raised)."""
    end = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except on:  # type: ignore[misc]
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def alice(client: Client) -> User:
    return client.user("alice")


def uid() -> str:
    return secrets.token_hex(4)


# -- the daemon and the client's own routes


def test_health_ready_and_the_pool(client: Client, alice: User) -> None:
    assert client.health() is True
    ready = client.ready()
    assert ready.backend == "docker"
    assert ready.ready, f"the daemon is not ready: {ready.failed}"
    assert ready.states.get("docker") == "ok"
    alice.shell("true")
    mine = [s for s in client.sandboxes() if s.user == "alice"]
    assert len(mine) == 1 and mine[0].state == "running"
    info = alice.sandbox()
    assert info.user == "alice" and info.container_id == mine[0].container_id
    assert isinstance(client.reap(), list)


def test_a_wrong_token_is_unauthorized(daemon) -> None:  # type: ignore[no-untyped-def]
    with daemon.client(token="not-the-token") as bad:
        with pytest.raises(Unauthorized) as e:
            bad.user("alice").shell("echo never")
        assert e.value.kind == "unauthorized" and e.value.status == 401
        with pytest.raises(Unauthorized):
            bad.health()
    with Client(daemon.url) as none:
        with pytest.raises(Unauthorized):
            none.health()
    # Positive control: the right token on the same route.
    with daemon.client() as good:
        assert good.user("alice").shell("echo yes").stdout == "yes\n"


# -- shell


def test_shell_output_and_exit_code(alice: User) -> None:
    r = alice.shell("echo out; echo err >&2; exit 3")
    assert (r.tool, r.stdout, r.stderr, r.exit_code) == ("shell", "out\n", "err\n", 3)
    assert not r.ok and not r.timed_out and not r.cancelled
    ok = alice.shell("printf 'x=%s' \"$X\"; pwd", env={"X": "1"}, workdir=".")
    assert ok.exit_code == 0 and ok.ok
    assert ok.stdout == "x=1/workspace\n"
    cid = "c-" + uid()
    assert alice.shell("true", call_id=cid).call_id == cid


def test_non_utf8_output_keeps_its_exact_bytes(alice: User) -> None:
    r = alice.shell(r"printf 'a\377b'")
    assert r.stdout_bytes == b"a\xffb"
    assert r.stdout_base64 is not None
    assert alice.shell("printf abc").stdout_base64 is None


def test_a_timeout_kills_the_call(alice: User) -> None:
    t0 = time.monotonic()
    r = alice.shell("echo started; sleep 30", timeout=1)
    took = time.monotonic() - t0
    assert r.timed_out and r.exit_code is None and not r.ok
    assert r.stdout == "started\n"
    assert took < 15, took
    # Control: the same command within its timeout; and a duration string.
    r = alice.shell("sleep 0.2; echo done", timeout="5s")
    assert not r.timed_out and r.exit_code == 0 and r.stdout == "done\n"


# -- Python


def test_run_python_without_a_session(alice: User) -> None:
    r = alice.run_python("import sys\nprint(6*7)\nsys.exit(2)")
    assert r.stdout == "42\n" and r.exit_code == 2
    assert r.session_started is None and r.value is None


def test_a_python_session_keeps_its_state(alice: User) -> None:
    name = "s" + uid()
    first = alice.run_python("x = 41\nimport math", session=name)
    assert first.session_started is True and first.exit_code == 0 and first.value is None
    second = alice.run_python("x + 1", session=name)
    assert second.session_started is False and second.session_restarted is False
    assert second.value == "42"
    boom = alice.run_python("1/0", session=name)
    assert boom.error is not None and boom.error.name == "ZeroDivisionError"
    assert boom.exit_code == 1 and "ZeroDivisionError" in boom.stderr and not boom.ok
    assert alice.run_python("x", session=name).value == "41", "an exception keeps the state"
    assert name in [s.name for s in alice.sessions()]
    # A session keeps its own directory and environment: those arguments are refused with it.
    with pytest.raises(BadRequest) as e:
        alice.run_python("1", session=name, workdir="tmp")
    assert e.value.kind == "bad_call"
    alice.end_session(name)
    assert name not in [s.name for s in alice.sessions()]
    assert alice.run_python("'x' in dir()", session=name).value == "False"
    alice.end_session(name)


def test_ending_an_unknown_session_is_not_found(alice: User) -> None:
    with pytest.raises(NotFound) as e:
        alice.end_session("never-started-" + uid())
    assert e.value.kind == "no_such_session" and e.value.status == 404


# -- file tools


def test_write_and_read_text_and_bytes(alice: User) -> None:
    d = "rw-" + uid()
    w = alice.write_file(f"{d}/a.txt", "héllo\n")
    assert w.written.bytes_written == len("héllo\n".encode())
    r = alice.read_file(f"{d}/a.txt")
    assert r.file.content == "héllo\n" and r.file.eof and r.file.content_base64 is None
    alice.write_file(f"{d}/a.txt", "more\n", append=True)
    assert alice.read_file(f"/workspace/{d}/a.txt").file.content == "héllo\nmore\n"
    blob = bytes(range(256)) * 4
    assert alice.write_file(f"{d}/b.bin", blob).written.bytes_written == len(blob)
    got = alice.read_file(f"{d}/b.bin")
    assert got.file.data == blob and got.file.size == len(blob) and got.file.content_base64 is not None
    part = alice.read_file(f"{d}/b.bin", offset=10, limit=5).file
    assert part.data == blob[10:15] and part.offset == 10 and part.bytes_read == 5 and not part.eof
    # The sandbox sees the same file.
    assert alice.shell(f"wc -c < {d}/b.bin").stdout.strip() == str(len(blob))


def test_list_dir_and_delete_path(alice: User) -> None:
    d = "ls-" + uid()
    alice.write_file(f"{d}/b.txt", "bb")
    alice.write_file(f"{d}/a.txt", "a")
    alice.write_file(f"{d}/sub/c.txt", "c")
    listing = alice.list_dir(d).listing
    assert listing.names == ["a.txt", "b.txt", "sub"] and not listing.truncated
    kinds = {e.name: (e.kind, e.size) for e in listing.entries}
    assert kinds["a.txt"] == ("file", 1) and kinds["b.txt"] == ("file", 2) and kinds["sub"][0] == "dir"
    gone = alice.delete_path(f"{d}/sub").deleted
    assert gone.entries == 2
    assert alice.list_dir(d).listing.names == ["a.txt", "b.txt"]
    assert alice.delete_path(d).deleted.entries == 3
    with pytest.raises(NotFound) as e:
        alice.list_dir(d)
    assert e.value.kind == "not_found"


def test_a_path_out_of_the_workspace_is_refused(alice: User) -> None:
    for call in (
        lambda: alice.read_file("../x"),
        lambda: alice.write_file("../x", "no"),
        lambda: alice.read_file("/etc/passwd"),
        lambda: alice.download("../x"),
    ):
        with pytest.raises(Forbidden) as e:
            call()
        assert e.value.kind == "path_refused" and e.value.status == 403
    # Control: a path inside is fine.
    alice.write_file("inside.txt", "yes")
    assert alice.read_file("inside.txt").file.content == "yes"


# -- transfers


def test_upload_and_download_binary(alice: User, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = "tx-" + uid()
    blob = bytes(range(256)) * 4096 * 2 + os.urandom(12345)  # 2 MiB of every byte value, and noise
    assert alice.upload(f"{d}/blob.bin", blob) == len(blob)
    assert alice.download(f"{d}/blob.bin") == blob
    assert alice.shell(f"sha256sum {d}/blob.bin").stdout.split()[0] == __import__("hashlib").sha256(blob).hexdigest()
    # From a file object, and from an iterator of pieces.
    src = tmp_path / "src.bin"
    src.write_bytes(blob)
    with open(src, "rb") as f:
        assert alice.upload(f"{d}/from-file.bin", f) == len(blob)
    pieces = (blob[i : i + 100_000] for i in range(0, len(blob), 100_000))
    assert alice.upload(f"{d}/from-iter.bin", pieces) == len(blob)
    out = tmp_path / "out.bin"
    with open(out, "wb") as f:
        assert alice.download_to(f"{d}/from-iter.bin", f) == len(blob)
    assert out.read_bytes() == blob
    assert b"".join(alice.iter_download(f"{d}/from-file.bin")) == blob
    # An upload replaces the file; an empty one makes it empty.
    assert alice.upload(f"{d}/blob.bin", b"") == 0
    assert alice.download(f"{d}/blob.bin") == b""
    with pytest.raises(NotFound):
        alice.download(f"{d}/missing.bin")


# -- live output


def test_streaming_yields_output_before_the_result(alice: User) -> None:
    seen: List[Tuple[float, object]] = []
    with alice.stream_shell("echo a; sleep 1; echo b >&2; echo c") as events:
        for ev in events:
            seen.append((time.monotonic(), ev))
    kinds = [type(ev).__name__ for _, ev in seen]
    assert kinds[0] == "Started" and kinds[-1] == "Result", kinds
    started = seen[0][1]
    assert isinstance(started, Started) and started.tool == "shell" and started.call_id
    first_a = next(t for t, ev in seen if isinstance(ev, Output) and "a" in ev.text)
    t_result = seen[-1][0]
    assert t_result - first_a > 0.5, "'a' came with the result, not live"
    out = "".join(ev.text for _, ev in seen if isinstance(ev, Output) and ev.stream == "stdout")
    err = "".join(ev.text for _, ev in seen if isinstance(ev, Output) and ev.stream == "stderr")
    assert (out, err) == ("a\nc\n", "b\n")
    res = seen[-1][1]
    assert isinstance(res, Result) and res.result.stdout == "a\nc\n" and res.result.exit_code == 0
    assert events.result is res.result and events.result.call_id == started.call_id


def test_streamed_python_and_exact_bytes(alice: User) -> None:
    events = list(alice.stream_python("import sys\nsys.stdout.buffer.write(b'x\\xffy')\nsys.stdout.flush()"))
    data = b"".join(ev.data for ev in events if isinstance(ev, Output))
    assert data == b"x\xffy"
    assert isinstance(events[-1], Result) and events[-1].result.stdout_bytes == b"x\xffy"


def test_stream_errors_raise(alice: User) -> None:
    # Refused before it runs: a plain 400, raised when iteration starts.
    with pytest.raises(BadRequest) as e:
        list(alice.stream("shell", {"command": "true", "nope": 1}))
    assert e.value.kind == "bad_call"
    # Failed while running: an `error` event, raised as the same class as a plain call's.
    with pytest.raises(NotFound) as e2:
        list(alice.stream("read_file", {"path": "no-such-file-" + uid()}))
    assert e2.value.kind == "not_found" and e2.value.status == 404
    # Control: the same route with a file that is there.
    alice.write_file("here.txt", "here")
    last = list(alice.stream("read_file", {"path": "here.txt"}))[-1]
    assert isinstance(last, Result) and last.result.file.content == "here"


def test_closing_a_stream_cancels_the_call(alice: User) -> None:
    cid = "s-" + uid()
    events = alice.stream_shell("echo go; sleep 60", call_id=cid)
    assert isinstance(next(events), Started)
    assert events.call_id == cid
    # While it runs, its id is taken.
    with pytest.raises(Conflict) as e:
        alice.shell("true", call_id=cid)
    assert e.value.kind == "call_id_in_use"
    events.close()
    # The daemon sees the connection go and cancels the call: the id is free again soon.
    r = retry(lambda: alice.shell("echo free", call_id=cid), Conflict, seconds=10)
    assert r.stdout == "free\n"


def test_cancel_from_another_thread(alice: User) -> None:
    cid = "k-" + uid()
    box: List[ToolResult] = []
    errors: List[BaseException] = []

    def run() -> None:
        try:
            box.append(alice.shell("sleep 60", call_id=cid))
        except BaseException as e:  # noqa: B036 - reported by the test
            errors.append(e)

    t0 = time.monotonic()
    th = threading.Thread(target=run)
    th.start()
    # DELETE before the call is registered answers 404: retry until it is.
    retry(lambda: alice.cancel(cid), NotFound, seconds=15)
    th.join(30)
    assert not th.is_alive() and not errors, errors
    r = box[0]
    assert r.cancelled and not r.timed_out and r.exit_code is None and not r.ok
    assert time.monotonic() - t0 < 20
    with pytest.raises(NotFound) as e:
        alice.cancel(cid)
    assert e.value.kind == "unknown_call"


# -- background jobs


def test_a_background_job_runs_and_is_followed(alice: User) -> None:
    jid = "j-" + uid()
    job = alice.start_job("shell", command="echo one; sleep 1; echo two; exit 4", job_id=jid)
    assert job.job_id == jid and job.state == "running" and job.running
    assert jid in [j.job_id for j in alice.jobs()]
    with pytest.raises(Conflict) as e:
        alice.start_job("shell", command="true", job_id=jid)
    assert e.value.kind == "call_id_in_use"
    with alice.follow_job(jid) as events:
        evs = list(events)
    assert isinstance(evs[0], Started) and evs[0].job_id == jid
    assert "".join(ev.text for ev in evs if isinstance(ev, Output)) == "one\ntwo\n"
    end = evs[-1]
    assert isinstance(end, JobEnded) and end.job.state == "exited" and end.job.exit_code == 4
    assert events.job == end.job
    done = alice.job(jid)
    assert done.state == "exited" and done.stdout == "one\ntwo\n" and done.ended
    # Following an ended job gives what it kept, then its end.
    again = list(alice.follow_job(jid))
    assert isinstance(again[-1], JobEnded) and again[-1].job.exit_code == 4
    py = alice.start_job("run_python", code="print(sum(range(10)))")
    end2 = list(alice.follow_job(py.job_id))[-1]
    assert isinstance(end2, JobEnded) and end2.job.stdout == "45\n"


def test_a_job_is_killed(alice: User) -> None:
    job = alice.start_job("shell", command="echo up; sleep 60")
    deadline = time.monotonic() + 30
    while alice.job(job.job_id).stdout != "up\n":
        assert time.monotonic() < deadline, "the job never printed"
        time.sleep(0.05)
    t0 = time.monotonic()
    killed = alice.kill_job(job.job_id)
    assert killed.state == "killed" and time.monotonic() - t0 < 15
    assert killed.stdout == "up\n", "the answer is the job's last record"
    # A DELETE deletes.
    with pytest.raises(NotFound) as e:
        alice.job(job.job_id)
    assert e.value.kind == "no_such_job"


# -- the sandbox itself


def test_removing_a_sandbox(client: Client) -> None:
    carol = client.user("carol")
    carol.write_file("keep.txt", "kept")
    carol.shell("true")
    assert carol.sandbox().user == "carol"
    name = carol.remove_sandbox()
    assert "carol" in name
    with pytest.raises(NotFound) as e:
        carol.sandbox()
    assert e.value.kind == "no_sandbox"
    # The files stay; the next call makes a new sandbox.
    assert carol.shell("cat keep.txt").stdout == "kept"
    carol.remove_sandbox()


def test_an_invalid_user_is_a_bad_request(client: Client) -> None:
    with pytest.raises(BadRequest) as e:
        client.user("Not Valid").shell("true")
    assert e.value.kind == "invalid_user"
    with pytest.raises(SandboxError):
        client.user("x/../y").shell("true")
