//! Python sessions (`run_python` with `"session"`) against the real Docker Engine: state kept
//! between calls, a final expression's value, exceptions, a timeout that interrupts and keeps the
//! state, a runaway session killed and reported, the per-user limit, the idle end, rich results
//! (a matplotlib figure as PNG), the routes that list and end sessions, and both transport
//! settings. Witnesses: `ps` through the docker CLI.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{docker_executor, exec_as, tenant_uid, Daemon, TestPool};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use zcbot_sandbox::exec::{Executor, ToolCall, ToolResult};
use zcbot_sandbox::{Error, UserId};

async fn try_py(
    ex: &Executor,
    user: &UserId,
    session: &str,
    code: &str,
    timeout: f64,
    cancel: &CancellationToken,
) -> Result<ToolResult, Error> {
    let call = ToolCall::parse(
        "run_python",
        json!({ "code": code, "session": session, "timeout": timeout }),
    )
    .unwrap();
    ex.run(user, call, cancel).await
}

async fn py(ex: &Executor, user: &UserId, session: &str, code: &str) -> Value {
    py_within(ex, user, session, code, 60.0).await
}

/// A session call with a timeout of `secs`, as JSON.
async fn py_within(ex: &Executor, user: &UserId, session: &str, code: &str, secs: f64) -> Value {
    let r = try_py(ex, user, session, code, secs, &CancellationToken::new())
        .await
        .unwrap();
    serde_json::to_value(r).unwrap()
}

/// The sandbox's processes whose command line contains `needle` (as root: every uid).
fn processes(container: &str, needle: &str) -> Vec<String> {
    let (_, out, _) = exec_as(container, "0:0", "ps -eo pid=,user=,args=");
    out.lines()
        .filter(|l| l.contains(needle) && !l.contains("ps -eo"))
        .map(str::to_owned)
        .collect()
}

async fn until_gone(container: &str, needle: &str, within: Duration) -> Vec<String> {
    let until = Instant::now() + within;
    loop {
        let left = processes(container, needle);
        if left.is_empty() || Instant::now() > until {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_session_keeps_its_state_and_shows_values_and_exceptions() {
    let t = TestPool::new("sstate");
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let first = py(
        &ex,
        &user,
        "main",
        "import os\nx = 41\nf = open('notes.txt', 'w')",
    )
    .await;
    assert_eq!(first["session_started"], true, "{first}");
    assert_eq!(first["exit_code"], 0, "{first}");
    assert!(first.get("value").is_none(), "{first}");
    let second = py(
        &ex,
        &user,
        "main",
        "f.write('kept'); f.close()\nprint(x)\nx + 1",
    )
    .await;
    assert_eq!(second["session_started"], false, "{second}");
    assert_eq!(second["stdout"], "41\n", "{second}");
    assert_eq!(second["value"], "42", "{second}");
    assert_eq!(
        std::fs::read_to_string(t.root.join("users").join(user.as_str()).join("notes.txt"))
            .unwrap(),
        "kept"
    );
    // An exception: its traceback (the cell's line, none of the interpreter's own frames) in
    // stderr, its name and text in the result; the state stays.
    let err = py(
        &ex,
        &user,
        "main",
        "y = 1\n\ndef f():\n    return 1 / 0\n\nf()",
    )
    .await;
    assert_eq!(err["exit_code"], 1, "{err}");
    assert_eq!(err["error"]["name"], "ZeroDivisionError", "{err}");
    assert_eq!(err["error"]["value"], "division by zero", "{err}");
    let tb = err["stderr"].as_str().unwrap();
    assert!(
        tb.contains("return 1 / 0") && tb.contains("<cell-3>"),
        "{tb}"
    );
    assert!(!tb.contains("/proc/self/fd"), "kernel frames shown: {tb}");
    let after = py(&ex, &user, "main", "(x, y, os.getuid(), 'pandas' in dir())").await;
    let container = t.container_name(&user);
    assert_eq!(
        after["value"],
        format!("(41, 1, {}, False)", tenant_uid(&container)),
        "{after}"
    );
    // A syntax error is an exception like any other.
    let bad = py(&ex, &user, "main", "def (").await;
    assert_eq!(bad["error"]["name"], "SyntaxError", "{bad}");
    // Another name is another interpreter; no session is the stateless call of before.
    let other = py(&ex, &user, "other", "x").await;
    assert_eq!(other["error"]["name"], "NameError", "{other}");
    let call = ToolCall::parse("run_python", json!({ "code": "print(x)" })).unwrap();
    let stateless = ex
        .run(&user, call, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(stateless.exit_code, Some(1));
    assert!(stateless.stderr.contains("NameError"), "{stateless:?}");
    let v = serde_json::to_value(&stateless).unwrap();
    assert!(v.get("session_started").is_none(), "{v}");
    // Imports persist: the second use costs nothing like the first.
    let t0 = Instant::now();
    py(&ex, &user, "main", "import pandas as pd").await;
    let first_import = t0.elapsed();
    let t0 = Instant::now();
    let df = py(
        &ex,
        &user,
        "main",
        "df = pd.DataFrame({'k': ['a', 'b', 'a'], 'v': [1, 2, 3]})\ndf.groupby('k').v.sum().to_dict()",
    )
    .await;
    assert_eq!(df["value"], "{'a': 4, 'b': 2}", "{df}");
    assert!(
        df["results"][0]["mime"].is_null() || df["results"].as_array().is_some(),
        "{df}"
    );
    eprintln!(
        "import pandas {first_import:?}, then a groupby {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn a_timeout_or_cancel_interrupts_the_code_and_keeps_the_state() {
    let t = TestPool::new("sintr");
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    py(&ex, &user, "s", "import time\nkept = [1, 2]").await;
    let started = Instant::now();
    let loop_ = "while True:\n    kept.append(0)\n    time.sleep(0.01)";
    let r = py_within(&ex, &user, "s", loop_, 1.0).await;
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(r["exit_code"], Value::Null, "{r}");
    assert_eq!(r["error"]["name"], "KeyboardInterrupt", "{r}");
    assert_eq!(r["session_restarted"], false, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let after = py(&ex, &user, "s", "kept[:2], len(kept) > 10").await;
    assert_eq!(after["value"], "([1, 2], True)", "{after}");
    assert_eq!(after["session_started"], false, "{after}");

    // A cancel does the same.
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.cancel();
    });
    let r = try_py(&ex, &user, "s", "time.sleep(30)", 60.0, &cancel)
        .await
        .unwrap();
    assert!(r.cancelled, "{r:?}");
    let r = serde_json::to_value(r).unwrap();
    assert_eq!(r["error"]["name"], "KeyboardInterrupt", "{r}");
    assert_eq!(py(&ex, &user, "s", "kept[0]").await["value"], "1");
}

#[tokio::test]
async fn a_runaway_session_is_killed_with_everything_it_started_and_reported() {
    let t = TestPool::new("srun");
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let container = t.container_name(&user);
    py(
        &ex,
        &user,
        "wild",
        "import signal, subprocess\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n\
         lost = 1\np = subprocess.Popen(['sleep', '1001'], start_new_session=True)",
    )
    .await;
    // The positive control: the escaped child runs, beside the session's interpreter.
    assert_eq!(processes(&container, "sleep 1001").len(), 1);
    let started = Instant::now();
    let r = py_within(&ex, &user, "wild", "while True:\n    pass", 1.0).await;
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(r["session_restarted"], true, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert!(
        until_gone(&container, "sleep 1001", Duration::from_secs(5))
            .await
            .is_empty(),
        "the session's escaped child outlived it"
    );
    let next = py(&ex, &user, "wild", "lost").await;
    assert_eq!(next["session_started"], true, "{next}");
    assert_eq!(next["error"]["name"], "NameError", "{next}");
    // The interpreter exiting by itself is a restart too.
    let r = py(&ex, &user, "wild", "import os\nos._exit(3)").await;
    assert_eq!(r["session_restarted"], true, "{r}");
    assert_eq!(r["exit_code"], 3, "{r}");
    // The channel and the user's other calls were never disturbed.
    let call = ToolCall::parse("shell", json!({ "command": "echo ok" })).unwrap();
    let ok = ex
        .run(&user, call, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(ok.stdout, "ok\n");
    let s = ex.transport_stats().unwrap();
    assert_eq!((s.opens.get(), s.deaths.get()), (1, 0));
}

#[tokio::test]
async fn sessions_are_listed_limited_busy_one_at_a_time_and_ended() {
    let mut t = TestPool::new("slist");
    t.set("ZCBOT_PYTHON_SESSIONS_MAX", "2");
    let ex = std::sync::Arc::new(docker_executor(&t).await);
    let user = t.user("u");
    let container = t.container_name(&user);
    py(&ex, &user, "a", "a = bytearray(30 << 20)").await;
    py(&ex, &user, "b", "b = 2").await;
    let full = try_py(&ex, &user, "c", "1", 10.0, &CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(full.kind(), "too_many_sessions", "{full}");
    let list = ex.sessions(&user).await;
    let names: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(list[0].memory_bytes > 30 << 20, "{list:?}");
    assert!(list[1].memory_bytes > 0 && list[1].memory_bytes < list[0].memory_bytes);
    assert!(!list[0].running);

    // One call at a time in a session: the second is refused, not queued.
    let (ex2, user2) = (ex.clone(), user.clone());
    let slow = tokio::spawn(async move {
        try_py(
            &ex2,
            &user2,
            "b",
            "import time\ntime.sleep(5)",
            20.0,
            &CancellationToken::new(),
        )
        .await
    });
    let until = Instant::now() + Duration::from_secs(10);
    while !ex.sessions(&user).await[1].running && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ex.sessions(&user).await[1].running);
    let busy = try_py(&ex, &user, "b", "1", 10.0, &CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(busy.kind(), "session_busy", "{busy}");
    assert!(slow.await.unwrap().unwrap().exit_code == Some(0));

    // Ending one kills its interpreter and frees its place.
    let before = processes(&container, "python3").len();
    ex.end_session(&user, "a").await.unwrap();
    assert_eq!(
        ex.end_session(&user, "a").await.unwrap_err().kind(),
        "no_such_session"
    );
    assert_eq!(processes(&container, "python3").len(), before - 1);
    let names: Vec<String> = ex
        .sessions(&user)
        .await
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["b"]);
    let again = py(&ex, &user, "c", "1").await;
    assert_eq!(again["session_started"], true);

    // Bad names and arguments a session cannot take change nothing.
    for args in [
        json!({"code": "1", "session": "Bad"}),
        json!({"code": "1", "session": ""}),
        json!({"code": "1", "session": "a".repeat(33)}),
        json!({"code": "1", "session": "../x"}),
        json!({"code": "1", "session": "d", "env": {"A": "1"}}),
        json!({"code": "1", "session": "d", "workdir": "sub"}),
    ] {
        let call = ToolCall::parse("run_python", args.clone()).unwrap();
        let e = ex
            .run(&user, call, &CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "bad_call", "{args}: {e}");
    }
    assert_eq!(ex.sessions(&user).await.len(), 2);
}

#[tokio::test]
async fn idle_sessions_are_ended() {
    let mut t = TestPool::new("sidle");
    t.set("ZCBOT_PYTHON_SESSION_IDLE", "1s");
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let container = t.container_name(&user);
    py(&ex, &user, "nap", "x = 1").await;
    // The positive control: the interpreter runs until the idle limit and the next check.
    assert_eq!(processes(&container, "python3").len(), 1);
    let until = Instant::now() + Duration::from_secs(15);
    while !ex.sessions(&user).await.is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        ex.sessions(&user).await.is_empty(),
        "the idle session is still listed"
    );
    assert!(until_gone(&container, "python3", Duration::from_secs(5))
        .await
        .is_empty());
    let again = py(&ex, &user, "nap", "x").await;
    assert_eq!(again["session_started"], true);
    assert_eq!(again["error"]["name"], "NameError");
}

#[tokio::test]
async fn figures_and_rich_objects_come_back_bounded() {
    let t = TestPool::new("srich");
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let plot = py(
        &ex,
        &user,
        "plots",
        "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')\nplt.show()",
    )
    .await;
    let results = plot["results"]
        .as_array()
        .unwrap_or_else(|| panic!("{plot}"));
    assert_eq!(results.len(), 1, "{plot}");
    assert_eq!(results[0]["mime"], "image/png");
    let png = base64::engine::general_purpose::STANDARD
        .decode(results[0]["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 2000, "{}", png.len());
    assert!(
        !plot["stderr"].as_str().unwrap().contains("non-interactive"),
        "{plot}"
    );
    // Shown figures are closed: the next call returns none.
    let none = py(&ex, &user, "plots", "1").await;
    assert!(none.get("results").is_none(), "{none}");

    let html = py(
        &ex,
        &user,
        "plots",
        "class T:\n    def _repr_html_(self): return '<b>hi</b>'\n    def _repr_markdown_(self): return '**hi**'\nT()",
    )
    .await;
    let kinds: Vec<(&str, &str)> = html["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["mime"].as_str().unwrap(), r["data"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [("text/html", "<b>hi</b>"), ("text/markdown", "**hi**")]
    );

    // Twenty figures: sixteen come back, the rest are counted and noted.
    let many = py(
        &ex,
        &user,
        "plots",
        "for i in range(20):\n    plt.figure()\n    plt.plot([i, 0])",
    )
    .await;
    assert_eq!(
        many["results"].as_array().unwrap().len(),
        16,
        "{}",
        many["stderr"]
    );
    assert_eq!(many["results_dropped"], 4);
    assert!(many["stderr"]
        .as_str()
        .unwrap()
        .contains("4 rich result(s) dropped"));
}

#[tokio::test]
async fn session_output_is_capped_like_a_calls() {
    let mut t = TestPool::new("scap");
    t.set("ZCBOT_OUTPUT_CAP", "64KiB");
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let r = py(
        &ex,
        &user,
        "big",
        "import sys, os\nprint('a' * (1 << 20))\nos.write(2, b'raw\\n')\nsys.stdout.write('end')",
    )
    .await;
    let out = r["stdout"].as_str().unwrap();
    assert!(out.len() < 70_000 && out.ends_with("end"), "{}", out.len());
    assert_eq!(r["truncated"]["stdout"], true);
    assert_eq!(r["stderr"], "raw\n");
    // A thread left printing after its call ended does not break the session.
    py(
        &ex,
        &user,
        "big",
        "import threading, time\ndef chatter():\n    while True:\n        print('late'); time.sleep(0.01)\nthreading.Thread(target=chatter, daemon=True).start()",
    )
    .await;
    let r = py(&ex, &user, "big", "2 + 2").await;
    assert_eq!(r["value"], "4");
}

#[tokio::test]
async fn sessions_work_over_the_per_call_exec_setting_and_the_http_api() {
    let mut t = TestPool::new("shttp");
    t.set("ZCBOT_EXEC_TRANSPORT", "exec");
    let d = Daemon::start(&mut t);
    let user = t.user("u");
    let (status, r) = d
        .tool(
            &user,
            "run_python",
            json!({"code": "n = 7", "session": "web"}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let (_, r) = d
        .tool(
            &user,
            "run_python",
            json!({"code": "n * 6", "session": "web"}),
        )
        .await;
    assert_eq!(r["value"], "42", "{r}");
    let (status, _, body) =
        common::http(&d.addr, "GET", &format!("/v1/users/{user}/sessions"), None).await;
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["sessions"][0]["name"], "web", "{list}");
    assert!(list["sessions"][0]["started"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let (status, _, body) = common::http(
        &d.addr,
        "DELETE",
        &format!("/v1/users/{user}/sessions/web"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = common::http(
        &d.addr,
        "DELETE",
        &format!("/v1/users/{user}/sessions/web"),
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no_such_session"), "{body}");
    let (_, r) = d
        .tool(&user, "run_python", json!({"code": "n", "session": "web"}))
        .await;
    assert_eq!(r["session_started"], true, "{r}");
    assert_eq!(r["error"]["name"], "NameError", "{r}");
    // A session when the user has reached ZCBOT_PYTHON_SESSIONS_MAX is a typed 429.
    for i in 0..3 {
        d.tool(
            &user,
            "run_python",
            json!({"code": "1", "session": format!("s{i}")}),
        )
        .await;
    }
    let (status, r) = d
        .tool(&user, "run_python", json!({"code": "1", "session": "s9"}))
        .await;
    assert_eq!(status, 429, "{r}");
    assert_eq!(r["error"]["kind"], "too_many_sessions", "{r}");
}

#[tokio::test]
async fn a_session_whose_supervisor_is_killed_or_whose_child_floods_does_not_stall_the_helper() {
    let t = TestPool::new("ssup");
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let container = t.container_name(&user);
    // A child that never stops writing to the session's output: the run still ends, at once.
    let started = Instant::now();
    let r = py(
        &ex,
        &user,
        "noisy",
        "import subprocess\nflood = subprocess.Popen(['yes'])\n'done'",
    )
    .await;
    assert_eq!(r["value"], "'done'", "{}", r["value"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let call = ToolCall::parse("shell", json!({ "command": "echo ok" })).unwrap();
    let ok = ex
        .run(&user, call, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(ok.stdout, "ok\n");
    ex.end_session(&user, "noisy").await.unwrap();
    assert!(until_gone(&container, "yes", Duration::from_secs(5))
        .await
        .is_empty());

    // The tenant kills the session's supervisor: the interpreter, orphaned and still holding the
    // helper's pipes, is killed and the run says the session is gone.
    py(&ex, &user, "orphan", "import os\nstate = 1").await;
    let r = py(
        &ex,
        &user,
        "orphan",
        "os.kill(os.getppid(), 9)\nimport time\ntime.sleep(60)",
    )
    .await;
    assert_eq!(r["session_restarted"], true, "{r}");
    let next = py(&ex, &user, "orphan", "state").await;
    assert_eq!(next["session_started"], true, "{next}");
    assert_eq!(
        processes(&container, "python3").len(),
        1,
        "{:?}",
        processes(&container, "python3")
    );
    let s = ex.transport_stats().unwrap();
    assert_eq!((s.opens.get(), s.deaths.get()), (1, 0));
}
