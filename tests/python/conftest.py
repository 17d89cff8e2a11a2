"""A real daemon for the tests: `zcbot-sandbox serve` with the Docker backend, on a pool, network
and folders of this run's own (so runs can follow each other and run side by side), with a token
(so auth is exercised). Docker missing or the binary missing is a failure, never a skip."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from zcbot_sandbox import Client

#: The daemon's stderr log of this run, shown with every failed test (and kept if one failed).
_LOGS: List[Path] = []
_FAILED: List[str] = []


def _fail(msg: str) -> None:
    pytest.fail(msg, pytrace=False)


def _binary() -> str:
    b = os.environ.get("ZCBOT_SANDBOX_BIN", "")
    if not b:
        _fail("ZCBOT_SANDBOX_BIN is not set: point it at the zcbot-sandbox binary (scripts/test-python.sh does)")
    if not (os.path.isfile(b) and os.access(b, os.X_OK)):
        _fail(f"ZCBOT_SANDBOX_BIN={b} is not an executable file: run `cargo build` first")
    return b


def _require_docker() -> None:
    try:
        p = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        _fail(f"Docker is required by these tests and is not reachable ({e}); they fail rather than skip")
    if p.returncode != 0:
        _fail(f"Docker is required by these tests and is not reachable: {p.stderr.strip()}")


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(lines[-n:])


@dataclass
class Daemon:
    url: str
    token: str
    pool_id: str
    network: str
    env: Dict[str, str]
    root: Path
    log: Path
    proc: "subprocess.Popen[bytes]"
    binary: str
    extra: List[str] = field(default_factory=list)

    def client(self, token: Optional[str] = None) -> Client:
        return Client(self.url, token=self.token if token is None else token)


def _clean_env() -> Dict[str, str]:
    """The caller's environment without its ZCBOT_ settings (but the image and runtime, which a
    caller may choose): the daemon under test must not pick up a developer's config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZCBOT_")}
    for var in ("ZCBOT_SANDBOX_IMAGE", "ZCBOT_SANDBOX_RUNTIME"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    return env


def start_daemon(binary: str, env: Dict[str, str], log: Path, timeout: float = 240.0) -> "tuple[subprocess.Popen[bytes], str]":
    """Starts `serve` and returns it with the address its first stdout line names."""
    errf = open(log, "wb")
    proc = subprocess.Popen([binary, "serve"], env=env, stdout=subprocess.PIPE, stderr=errf, stdin=subprocess.DEVNULL)
    errf.close()
    assert proc.stdout is not None
    first: List[bytes] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    line = first[0].decode(errors="replace") if first else ""
    if "listening on " not in line:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        _fail(
            f"the daemon did not start within {timeout:.0f} s (exit {proc.returncode}); stdout: {line!r}\n"
            f"--- its stderr ---\n{_tail(log, 200)}"
        )
    # Keep draining stdout: a daemon whose reader went away is never tested by accident.
    threading.Thread(target=lambda: shutil.copyfileobj(proc.stdout, open(os.devnull, "wb")), daemon=True).start()  # type: ignore[misc]
    addr = line.split("listening on ", 1)[1].split()[0]
    return proc, addr


def stop_daemon(proc: "subprocess.Popen[bytes]") -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run(cmd: List[str], env: Optional[Dict[str, str]] = None, timeout: float = 180) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out: {e}")


@contextlib.contextmanager
def pool_daemon(extra: Optional[Dict[str, str]] = None) -> Iterator[Daemon]:
    """A daemon on a pool of its own (Docker backend, with a token), `extra` set over its
    environment; its containers, rules, network and folders are removed at the end."""
    binary = _binary()
    _require_docker()
    pool_id = "tpy" + secrets.token_hex(4)
    network = f"zcbt-{pool_id}"
    root = Path(tempfile.mkdtemp(prefix=f"zcbot-pytest-{pool_id}-"))
    token = secrets.token_urlsafe(24)
    env = _clean_env()
    env.update(
        {
            "ZCBOT_SANDBOX_BACKEND": "docker",
            "ZCBOT_LISTEN": "127.0.0.1:0",
            "ZCBOT_POOL_ID": pool_id,
            "ZCBOT_SANDBOX_NETWORK": network,
            "ZCBOT_USERS_ROOT": str(root / "users"),
            "ZCBOT_STATE_DIR": str(root / "state"),
            "ZCBOT_SPARES": "0",
            "ZCBOT_DOCKER_TIMEOUT": "60s",
            "ZCBOT_SANDBOX_START_TIMEOUT": "60s",
            "ZCBOT_API_TOKEN": token,
        }
    )
    env.update(extra or {})
    log = Path(tempfile.gettempdir()) / f"zcbot-pytest-{pool_id}.log"
    _LOGS.append(log)
    proc = None
    try:
        proc, addr = start_daemon(binary, env, log)
        yield Daemon(
            url=addr, token=token, pool_id=pool_id, network=network, env=env, root=root, log=log, proc=proc, binary=binary
        )
    finally:
        if proc is not None:
            stop_daemon(proc)
        cleanup_pool(binary, env, pool_id, network)
        shutil.rmtree(root, ignore_errors=True)
        if proc is not None and proc.returncode not in (0, None):
            print(f"\nthe daemon exited with {proc.returncode}; its stderr:\n{_tail(log, 200)}")
        if _FAILED or proc is None or proc.returncode != 0:
            print(f"\nthe daemon's log is kept: {log}")
        else:
            log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    with pool_daemon() as d:
        yield d


def cleanup_pool(binary: str, env: Dict[str, str], pool_id: str, network: str) -> None:
    """Everything the pool made on the host: its containers, its host firewall rules, its
    network. Each step is tried whatever the one before did."""
    problems = []
    rm = _run([binary, "rm", "--all"], env=env)
    if rm.returncode != 0:
        problems.append(f"zcbot-sandbox rm --all: {rm.stderr.strip()}")
    # A witness and a backstop: nothing labelled with this pool may stay.
    left = _run(["docker", "ps", "-aq", "--filter", f"label=io.zcbot.pool={pool_id}"]).stdout.split()
    if left:
        problems.append(f"containers left after rm --all: {left}")
        _run(["docker", "rm", "-f", *left])
    net = _run([binary, "net", "down"], env=env)
    if net.returncode != 0:
        problems.append(f"zcbot-sandbox net down: {net.stderr.strip()}")
    for name in (network, f"{network}-public"):
        nr = _run(["docker", "network", "rm", name])
        if nr.returncode != 0 and "not found" not in nr.stderr.lower():
            problems.append(f"docker network rm {name}: {nr.stderr.strip()}")
    if problems:
        print("\ncleanup of pool " + pool_id + ":\n  " + "\n  ".join(problems))


@pytest.fixture(scope="session")
def client(daemon: Daemon) -> Iterator[Client]:
    with daemon.client() as c:
        yield c


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: "pytest.CallInfo[None]") -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        _FAILED.append(item.nodeid)
    if rep.failed and _LOGS:
        rep.sections.append(("daemon stderr (last lines)", _tail(_LOGS[-1])))
