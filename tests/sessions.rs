//! Python sessions (`run_python` with `"session"`) against the real Docker Engine: state kept
//! between calls, a final expression's value, exceptions, a timeout that interrupts and keeps the
//! state, a runaway session killed and reported, the per-user limit, the idle end, rich results
//! (a matplotlib figure as PNG), the routes that list and end sessions, and both transport
//! settings. Witnesses: `ps` through the docker CLI.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{exec_as, tenant_uid, Daemon, TestPool};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use zcbot_sandbox::exec::{Executor, ToolCall, ToolResult};
use zcbot_sandbox::{Error, UserId};

async fn executor(t: &TestPool) -> Executor {
    let mut cfg = t.config();
    cfg.backend = zcbot_sandbox::config::Backend::Docker;
    Executor::from_config(cfg).await.expect("docker executor")
}

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
    let r = try_py(ex, user, session, code, 60.0, &CancellationToken::new())
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
    let ex = executor(&t).await;
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
