//! Tool execution through both backends, against the real Docker Engine. Witnesses: `ps` in the
//! container (docker CLI) and on the host.

mod common;

use std::time::{Duration, Instant};

use common::{call, docker, docker_executor, exec_as, TestPool};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use zcbot_sandbox::exec::{Executor, ToolCall, ToolResult};
use zcbot_sandbox::{Config, UserId};

async fn sh(ex: &Executor, user: &UserId, command: &str) -> ToolResult {
    call(ex, user, "shell", json!({ "command": command })).await
}

/// Every test that runs processes in a sandbox, once per transport (`ZCBOT_EXEC_TRANSPORT`).
macro_rules! over_both_transports {
    ($($name:ident),* $(,)?) => {
        mod over_channel {
            $(#[tokio::test]
            async fn $name() {
                super::$name("channel").await
            })*
        }
        mod over_exec {
            $(#[tokio::test]
            async fn $name() {
                super::$name("exec").await
            })*
        }
    };
}

over_both_transports!(
    shell_runs_as_the_sandbox_user_in_workspace_with_a_clean_environment,
    workdir_is_confined_to_workspace,
    a_timeout_kills_every_process_of_the_call_even_escaped_ones,
    cancel_kills_the_calls_processes_and_says_so,
    a_dropped_call_still_kills_its_processes,
    a_dropped_call_whose_supervisor_was_killed_leaves_no_orphans,
    another_call_of_the_same_user_survives_a_timeout,
    output_is_capped_head_and_tail_under_a_fast_flood,
    binary_output_is_returned_losslessly,
    file_tools_never_follow_links_planted_from_inside_the_sandbox,
    file_tools_work_on_the_same_folder_the_sandbox_sees,
    run_python_writes_nothing_on_the_host_even_with_planted_links,
    bad_calls_are_refused_and_run_nothing,
    a_container_removed_behind_the_pools_back_is_recreated_and_the_call_retried,
    a_killed_supervisor_leaves_no_orphans,
    a_container_restarted_behind_the_pools_back_gets_its_rules_before_the_next_call,
    a_python_traceback_names_the_callers_code_not_a_descriptor,
);

/// What a failing stateless program prints, on an executor: the traceback names `<run_python>`
/// with the failing line, and nothing of the way the program was fed.
async fn python_tracebacks_name_the_program(ex: &Executor, user: &UserId) {
    let code = "import sys\n\ndef f():\n    return 1 / 0\n\nf()\n";
    let r = call(ex, user, "run_python", json!({ "code": code })).await;
    assert_eq!(r.exit_code, Some(1), "{r:?}");
    let tb = &r.stderr;
    assert!(
        tb.contains("File \"<run_python>\", line 6, in <module>")
            && tb.contains("File \"<run_python>\", line 4, in f")
            && tb.contains("return 1 / 0")
            && tb.contains("ZeroDivisionError"),
        "{tb}"
    );
    assert!(
        !tb.contains("/proc/self/fd") && !tb.contains("<string>") && !tb.contains("<stdin>"),
        "{tb}"
    );
    let r = call(ex, user, "run_python", json!({"code": "x = 1\ny = (\n"})).await;
    assert_eq!(r.exit_code, Some(1), "{r:?}");
    assert!(
        r.stderr.contains("File \"<run_python>\", line 2") && r.stderr.contains("SyntaxError"),
        "{r:?}"
    );
    assert!(!r.stderr.contains("<string>"), "{r:?}");
    // The program's own names only: nothing of the way it was started leaks into them.
    let r = call(
        ex,
        user,
        "run_python",
        json!({"code": "print(sorted(k for k in globals() if not k.startswith('__')), __name__)"}),
    )
    .await;
    assert_eq!(r.stdout, "[] __main__\n", "{r:?}");
}

async fn a_python_traceback_names_the_callers_code_not_a_descriptor(transport: &str) {
    let mut t = TestPool::new("xtb");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    python_tracebacks_name_the_program(&ex, &t.user("u")).await;
}

/// The sandbox user's processes other than `ps` itself, as the docker CLI sees them.
fn user_processes(container: &str) -> Vec<String> {
    let uid = common::tenant_uid(container);
    let (_, out, _) = exec_as(
        container,
        &common::tenant(container),
        &format!("ps -u {uid} -o pid=,ppid=,args="),
    );
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("ps -u "))
        .map(str::to_owned)
        .collect()
}

/// Waits up to `within` for no user process matching `needle` to be left.
async fn gone(container: &str, needle: &str, within: Duration) -> Vec<String> {
    let until = Instant::now() + within;
    loop {
        let left: Vec<String> = user_processes(container)
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect();
        if left.is_empty() || Instant::now() > until {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn shell_runs_as_the_sandbox_user_in_workspace_with_a_clean_environment(transport: &str) {
    let mut t = TestPool::new("xenv");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    std::env::set_var("ZCBOT_TEST_HOST_SECRET", "must-not-leak");
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let r = call(
        &ex,
        &user,
        "shell",
        json!({"command": "id -u; pwd; env", "env": {"FOO": "bar baz"}}),
    )
    .await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    let mut lines = r.stdout.lines();
    let uid = common::tenant_uid(&t.container_name(&user));
    assert_ne!(uid, "1000", "each tenant has a uid of its own");
    assert_eq!(lines.next(), Some(uid.as_str()));
    assert_eq!(lines.next(), Some("/workspace"));
    assert!(r.stdout.contains("FOO=bar baz"), "{}", r.stdout);
    assert!(r.stdout.contains("HOME=/workspace"), "{}", r.stdout);
    assert!(
        !r.stdout.contains("must-not-leak"),
        "a host variable leaked: {}",
        r.stdout
    );
    assert!(!r.stdout.contains("ZCBOT_USERS_ROOT"), "{}", r.stdout);

    let r = call(
        &ex,
        &user,
        "run_python",
        json!({"code": "import os\nprint(os.getuid(), os.getcwd())"}),
    )
    .await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str()),
        (Some(0), format!("{uid} /workspace\n").as_str()),
        "{r:?}"
    );
    let r = sh(&ex, &user, "echo out; echo err >&2; exit 3").await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (Some(3), "out\n", "err\n")
    );
}

async fn workdir_is_confined_to_workspace(transport: &str) {
    let mut t = TestPool::new("xwd");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    call(
        &ex,
        &user,
        "write_file",
        json!({"path": "sub/dir/f.txt", "content": "x"}),
    )
    .await;
    for wd in ["sub/dir", "/workspace/sub/dir", "sub/../sub/dir"] {
        let r = call(
            &ex,
            &user,
            "shell",
            json!({"command": "pwd; ls", "workdir": wd}),
        )
        .await;
        assert_eq!(r.stdout, "/workspace/sub/dir\nf.txt\n", "{wd}: {r:?}");
    }
    for wd in ["../", "/etc", "sub/../../x", "/workspacex"] {
        let err = ex
            .run(
                &user,
                ToolCall::parse("shell", json!({"command": "pwd", "workdir": wd})).unwrap(),
                &CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "bad_call", "{wd}: {err}");
    }
    let r = call(
        &ex,
        &user,
        "shell",
        json!({"command": "pwd", "workdir": "missing"}),
    )
    .await;
    assert_eq!(r.exit_code, Some(126), "{r:?}");
    assert!(
        r.stderr
            .contains("working directory /workspace/missing: no such folder"),
        "{r:?}"
    );
    let r = call(
        &ex,
        &user,
        "run_python",
        json!({"code": "print(1)", "workdir": "sub/dir/f.txt"}),
    )
    .await;
    assert_eq!(r.exit_code, Some(126), "{r:?}");
    assert!(
        r.stderr.contains("/workspace/sub/dir/f.txt: not a folder"),
        "{r:?}"
    );
    // A PATH of the call's own that holds no sh or python3: the call says so, naming it.
    for (tool, args, program) in [
        ("shell", json!({"command": "true"}), "sh"),
        ("run_python", json!({"code": "print(1)"}), "python3"),
    ] {
        let mut args = args;
        args["env"] = json!({"PATH": "/nowhere:/workspace"});
        let r = call(&ex, &user, tool, args).await;
        assert_eq!(r.exit_code, Some(127), "{r:?}");
        assert!(
            r.stderr.contains(&format!(
                "cannot run {program}: not found on the call's PATH (/nowhere:/workspace)"
            )),
            "{tool}: {r:?}"
        );
    }
}

async fn a_timeout_kills_every_process_of_the_call_even_escaped_ones(transport: &str) {
    let mut t = TestPool::new("xtimeout");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let container = ex.pool().unwrap().ensure(&user).await.unwrap().name;
    // Parent, child, background grandchild, a setsid escape and a double fork, all ignoring TERM.
    let command = r#"trap '' TERM
sleep 1001 &
(sleep 1002 &)
setsid sh -c "trap '' TERM; sleep 1003" &
(sh -c "trap '' TERM; sleep 1004 & sleep 1005" &)
sh -c "sleep 1006"
"#;
    let started = Instant::now();
    let r = call(
        &ex,
        &user,
        "shell",
        json!({"command": command, "timeout": 1}),
    )
    .await;
    let took = started.elapsed();
    assert!(r.timed_out && !r.cancelled, "{r:?}");
    assert_eq!(r.exit_code, None);
    // 1 s timeout + 0.5 s grace, and room for a slow exec under gVisor: a call that waited for
    // any of its sleeps would take over 1000 s.
    assert!(took < Duration::from_millis(4500), "took {took:?}");
    let left = gone(&container, "sleep 100", Duration::from_millis(100)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

async fn cancel_kills_the_calls_processes_and_says_so(transport: &str) {
    let mut t = TestPool::new("xcancel");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let container = ex.pool().unwrap().ensure(&user).await.unwrap().name;
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        trigger.cancel();
    });
    let call = ToolCall::parse(
        "shell",
        json!({"command": "setsid sleep 2001 & sleep 2002; echo never"}),
    )
    .unwrap();
    let r = ex.run(&user, call, &cancel).await.unwrap();
    assert!(r.cancelled && !r.timed_out, "{r:?}");
    assert!(!r.stdout.contains("never"));
    let left = gone(&container, "sleep 200", Duration::from_millis(100)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

async fn a_dropped_call_still_kills_its_processes(transport: &str) {
    let mut t = TestPool::new("xdrop");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let container = ex.pool().unwrap().ensure(&user).await.unwrap().name;
    let call = ToolCall::parse(
        "shell",
        json!({"command": "(setsid sleep 3001 &); sleep 3002"}),
    )
    .unwrap();
    let cancel = CancellationToken::new();
    // The caller gives up (an HTTP client that went away): the future is dropped mid-call.
    let dropped =
        tokio::time::timeout(Duration::from_millis(800), ex.run(&user, call, &cancel)).await;
    assert!(dropped.is_err());
    let left = gone(&container, "sleep 300", Duration::from_secs(5)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The call kills its own supervisor when asked to stop, leaving an escaped child, and the caller
/// goes away: the clean-up of the dropped call must sweep that orphan before letting the sandbox
/// go. (Found by review: the drop path took "the exec ended" for "its processes are gone".)
async fn a_dropped_call_whose_supervisor_was_killed_leaves_no_orphans(transport: &str) {
    let mut t = TestPool::new("xdropkill");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let container = ex.pool().unwrap().ensure(&user).await.unwrap().name;
    let call = ToolCall::parse(
        "shell",
        json!({"command": "(setsid sh -c 'trap \"\" TERM; exec sleep 6001' >/dev/null 2>&1 &); \
                trap 'kill -9 $PPID' TERM; while :; do sleep 0.1; done", "timeout": 60}),
    )
    .unwrap();
    let cancel = CancellationToken::new();
    // The call runs until its escaped child shows in the sandbox (or 20 s pass), then is dropped.
    // (Boxed: dropping a pinned reference would leave the call itself running.)
    let mut run = Box::pin(ex.run(&user, call, &cancel));
    let until = Instant::now() + Duration::from_secs(20);
    let seen = loop {
        tokio::select! {
            r = &mut run => panic!("the call ended by itself: {r:?}"),
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        let c = container.clone();
        let seen = tokio::task::spawn_blocking(move || user_processes(&c))
            .await
            .unwrap();
        if seen.iter().any(|p| p.contains("sleep 6001")) || Instant::now() > until {
            break seen;
        }
    };
    drop(run);
    // Positive control: the escaped child ran, so "nothing left" below means it was killed.
    assert!(
        seen.iter().any(|p| p.contains("sleep 6001")),
        "the escaped child never started: {seen:?}"
    );
    let left = gone(&container, "sleep 600", Duration::from_secs(10)).await;
    assert!(left.is_empty(), "orphans outlived a dropped call: {left:?}");
}

async fn another_call_of_the_same_user_survives_a_timeout(transport: &str) {
    let mut t = TestPool::new("xpeer");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let (slow, doomed) = tokio::join!(
        sh(&ex, &user, "sleep 2.5; echo survived"),
        call(
            &ex,
            &user,
            "shell",
            json!({"command": "sleep 4001", "timeout": 1})
        ),
    );
    assert!(doomed.timed_out);
    assert_eq!(
        (slow.exit_code, slow.stdout.as_str()),
        (Some(0), "survived\n"),
        "{slow:?}"
    );
}

async fn output_is_capped_head_and_tail_under_a_fast_flood(transport: &str) {
    let mut t = TestPool::new("xflood");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    t.set("ZCBOT_OUTPUT_CAP", "64KiB");
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let r = sh(
        &ex,
        &user,
        "echo START; yes | head -c 50000000; echo; echo END; echo ERR >&2",
    )
    .await;
    assert_eq!(r.exit_code, Some(0), "{:?}", r.stderr);
    assert!(r.truncated.stdout && !r.truncated.stderr);
    assert!(r.stdout.starts_with("START\ny\n"), "head kept");
    assert!(r.stdout.ends_with("y\n\nEND\n"), "tail kept");
    assert!(r.stdout.contains("bytes omitted"));
    assert!(r.stdout.len() < 64 * 1024 + 100, "{}", r.stdout.len());
    assert_eq!(r.stderr, "ERR\n");
}

async fn binary_output_is_returned_losslessly(transport: &str) {
    let mut t = TestPool::new("xbin");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let r = sh(&ex, &user, r"printf '\377\376ok'").await;
    assert_eq!(r.stdout_base64.as_deref(), Some("//5vaw=="), "{r:?}");
    assert!(r.stdout.ends_with("ok"));
}

async fn file_tools_never_follow_links_planted_from_inside_the_sandbox(transport: &str) {
    let mut t = TestPool::new("xlinks");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let host_outside = t.root.join("outside");
    std::fs::create_dir_all(&host_outside).unwrap();
    std::fs::write(host_outside.join("secret"), "host secret").unwrap();
    let o = host_outside.display();
    // Planted by the sandbox user, between two calls, from inside the container.
    let r = sh(&ex, &user, &format!(
        "ln -s /etc/passwd pw && ln -s / root && ln -s {o} out && mkdir -p mid && ln -s ../../../../../.. mid/up && ln -s {o}/secret target && echo planted"
    ))
    .await;
    assert_eq!(r.stdout, "planted\n", "{r:?}");
    let host_passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let run = |tool: &'static str, args: Value| {
        let ex = &ex;
        let user = &user;
        async move {
            ex.run(
                user,
                ToolCall::parse(tool, args).unwrap(),
                &CancellationToken::new(),
            )
            .await
        }
    };
    for path in [
        "pw",
        "root/etc/passwd",
        "out/secret",
        "mid/up/etc/passwd",
        "target",
        "../../outside/secret",
    ] {
        match run("read_file", json!({"path": path})).await {
            Ok(r) => {
                let data = serde_json::to_string(&r.data).unwrap();
                assert!(
                    !data.contains("host secret")
                        && !data.contains(host_passwd.lines().next().unwrap()),
                    "read {path}: {data}"
                );
                panic!("read {path} was allowed: {data}");
            }
            Err(e) => assert_eq!(e.kind(), "path_refused", "{path}: {e}"),
        }
    }
    for path in [
        "root/tmp/zcbot-pwned",
        "out/new",
        "mid/up/tmp/zcbot-pwned",
        "target",
    ] {
        let err = run("write_file", json!({"path": path, "content": "pwned"}))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "path_refused", "{path}: {err}");
    }
    for path in ["out", "root", "mid/up"] {
        let err = run("list_dir", json!({"path": path})).await.unwrap_err();
        assert_eq!(err.kind(), "path_refused", "{path}: {err}");
    }
    for path in ["out/secret", "mid/up/tmp"] {
        let err = run("delete_path", json!({"path": path})).await.unwrap_err();
        assert_eq!(err.kind(), "path_refused", "{path}: {err}");
    }
    // Deleting the link itself removes the link, not its target.
    run("delete_path", json!({"path": "out"})).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(host_outside.join("secret")).unwrap(),
        "host secret"
    );
    assert!(!host_outside.join("new").exists());
    assert!(!std::path::Path::new("/tmp/zcbot-pwned").exists());
    // A hard link to a file outside cannot even be made from inside.
    let r = sh(&ex, &user, "ln /etc/passwd hl 2>&1; echo rc=$?").await;
    assert!(!r.stdout.contains("rc=0"), "{r:?}");
}

async fn file_tools_work_on_the_same_folder_the_sandbox_sees(transport: &str) {
    let mut t = TestPool::new("xfiles");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let w = call(
        &ex,
        &user,
        "write_file",
        json!({"path": "notes/a.txt", "content": "from host\n"}),
    )
    .await;
    assert_eq!(serde_json::to_value(&w.data).unwrap()["bytes_written"], 10);
    // Owners by Python's stat (fstatat): Debian 12's runsc refuses coreutils' statx flags, so
    // `ls -l` cannot list under it (DESIGN.md, runsc).
    let r = sh(
        &ex,
        &user,
        "cat notes/a.txt; echo more >> notes/a.txt; python3 -c \"import os; s=os.stat('notes/a.txt'); print('owner', s.st_uid, s.st_gid)\"",
    )
    .await;
    assert!(r.stdout.starts_with("from host\n"), "{r:?}");
    assert!(
        r.stdout.contains(&{
            let uid = common::tenant_uid(&t.container_name(&user));
            format!("owner {uid} {uid}")
        }),
        "host-written files belong to the sandbox user: {}",
        r.stdout
    );
    let read = call(
        &ex,
        &user,
        "read_file",
        json!({"path": "/workspace/notes/a.txt"}),
    )
    .await;
    assert_eq!(
        serde_json::to_value(&read.data).unwrap()["content"],
        "from host\nmore\n"
    );
    let list = call(&ex, &user, "list_dir", json!({"path": "notes"})).await;
    assert_eq!(
        serde_json::to_value(&list.data).unwrap()["entries"][0]["name"],
        "a.txt"
    );
    call(&ex, &user, "delete_path", json!({"path": "notes"})).await;
    let r = sh(&ex, &user, "ls").await;
    assert_eq!(r.stdout, "");
}

async fn run_python_writes_nothing_on_the_host_even_with_planted_links(transport: &str) {
    let mut t = TestPool::new("xpy");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let outside = t.root.join("outside-py");
    std::fs::create_dir_all(&outside).unwrap();
    let o = outside.display();
    sh(
        &ex,
        &user,
        &format!("ln -s {o} .zcbot_tmp; ln -s {o} tmp; mkdir -p .cache; ln -s {o} .cache/zcbot"),
    )
    .await;
    let ws = ex.pool().unwrap().workspace(&user);
    let before: Vec<_> = std::fs::read_dir(&ws)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let r = call(
        &ex,
        &user,
        "run_python",
        json!({"code": "import sys\nprint('ran', sys.argv[0])"}),
    )
    .await;
    assert_eq!(r.stdout, "ran <run_python>\n", "{r:?}");
    let after: Vec<_> = std::fs::read_dir(&ws)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        before.len(),
        after.len(),
        "run_python created files in the workspace"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "run_python wrote through a planted link"
    );
    // Cancelled and timed-out runs leave nothing either.
    let r = call(
        &ex,
        &user,
        "run_python",
        json!({"code": "import time\ntime.sleep(60)", "timeout": 1}),
    )
    .await;
    assert!(r.timed_out);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

async fn bad_calls_are_refused_and_run_nothing(transport: &str) {
    let mut t = TestPool::new("xbad");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    t.set("ZCBOT_EXEC_TIMEOUT_MAX", "10s")
        .set("ZCBOT_EXEC_TIMEOUT", "5s");
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    assert_eq!(
        ToolCall::parse("format_disk", json!({}))
            .unwrap_err()
            .kind(),
        "unknown_tool"
    );
    for (tool, args) in [
        (
            "shell",
            json!({"command": "touch /workspace/ran", "timeout": 11}),
        ),
        (
            "shell",
            json!({"command": "touch /workspace/ran", "timeout": "forever"}),
        ),
        (
            "shell",
            json!({"command": "touch /workspace/ran", "timeout": -1}),
        ),
        (
            "shell",
            json!({"command": "touch /workspace/ran", "env": {"BAD-NAME": "x"}}),
        ),
        ("shell", json!({"command": "touch /workspace/ran\u{0}"})),
        ("read_file", json!({"path": "x", "limit": 1_000_000_000u64})),
        (
            "shell",
            json!({"command": format!("touch /workspace/ran #{}", "x".repeat(1 << 20))}),
        ),
        (
            "run_python",
            json!({"code": format!("open('/workspace/ran', 'w')\n#{}", "x".repeat(16 << 20))}),
        ),
    ] {
        let err = ex
            .run(
                &user,
                ToolCall::parse(tool, args.clone()).unwrap(),
                &CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "bad_call", "{tool} {args}: {err}");
    }
    assert!(!ex.pool().unwrap().workspace(&user).join("ran").exists());
    assert!(
        t.containers().is_empty(),
        "a refused call must not even create a sandbox"
    );
}

async fn a_container_removed_behind_the_pools_back_is_recreated_and_the_call_retried(
    transport: &str,
) {
    let mut t = TestPool::new("xgone");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let first = ex.pool().unwrap().ensure(&user).await.unwrap();
    docker(&["rm", "-f", &first.name]);
    let r = sh(&ex, &user, "echo still works").await;
    assert_eq!(r.stdout, "still works\n", "{r:?}");
    let now = ex.pool().unwrap().ensure(&user).await.unwrap();
    assert_ne!(now.container_id, first.container_id);
    // Stopped rather than removed: the same.
    docker(&["stop", "-t", "0", &now.name]);
    let r = sh(&ex, &user, "echo again").await;
    assert_eq!(r.stdout, "again\n", "{r:?}");
}

async fn a_killed_supervisor_leaves_no_orphans(transport: &str) {
    let mut t = TestPool::new("xsupkill");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let container = ex.pool().unwrap().ensure(&user).await.unwrap().name;
    let victim = call(
        &ex,
        &user,
        "shell",
        json!({"command": "setsid sleep 5001 & sleep 5002", "timeout": 60}),
    );
    let killer = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        // The sandbox user kills the other call's supervisor outright.
        // (slee[p]: the pattern must not match this call's own command line.)
        // Found through the process tree (sleep 5002 <- sh <- supervisor): over the channel the
        // supervisor is a fork of the helper, whose command line does not name the call.
        sh(
            &ex,
            &user,
            "until s=$(pgrep -x -f 'sleep 5002'); do sleep 0.1; done; p=$(ps -o ppid= -p $s); kill -9 $(ps -o ppid= -p $p); echo done",
        )
        .await
    };
    let (v, k) = tokio::join!(victim, killer);
    assert_eq!(k.stdout, "done\n");
    assert_eq!(v.exit_code, Some(137), "{v:?}");
    let left = gone(&container, "sleep 500", Duration::from_secs(3)).await;
    assert!(
        left.is_empty(),
        "orphans of the killed supervisor survived: {left:?}"
    );
    assert_eq!(sh(&ex, &user, "echo next").await.stdout, "next\n");
}

#[tokio::test]
async fn the_backend_switch_never_falls_back_to_the_host() {
    let t = TestPool::new("xswitch");
    let mut cfg = t.config();
    assert!(matches!(
        Executor::from_config(cfg.clone()).await.unwrap(),
        Executor::Host(_)
    ));
    cfg.backend = zcbot_sandbox::config::Backend::Docker;
    assert!(matches!(
        Executor::from_config(cfg.clone()).await.unwrap(),
        Executor::Docker(_)
    ));
    let err = Config::from_lookup(|k| (k == "ZCBOT_SANDBOX_BACKEND").then(|| "vm".to_owned()))
        .unwrap_err();
    assert!(err.to_string().contains("ZCBOT_SANDBOX_BACKEND"), "{err}");
    cfg.docker_host = Some("unix:///nonexistent/docker.sock".into());
    let err = Executor::from_config(cfg)
        .await
        .err()
        .expect("no silent fallback");
    assert_eq!(err.kind(), "docker_unreachable", "{err}");
}

#[tokio::test]
async fn host_backend_keeps_the_guarantees_that_need_no_container() {
    let t = TestPool::new("xhost");
    std::env::set_var("ZCBOT_TEST_HOST_SECRET2", "must-not-leak");
    let ex = Executor::from_config(t.config()).await.unwrap();
    let user = t.user("u");
    let r = sh(&ex, &user, "pwd; env").await;
    let ws = t.root.join("users").join(user.as_str());
    assert!(
        r.stdout.starts_with(&format!("{}\n", ws.display())),
        "{r:?}"
    );
    assert!(!r.stdout.contains("must-not-leak"), "{}", r.stdout);
    let r = call(&ex, &user, "run_python", json!({"code": "print(6*7)"})).await;
    assert_eq!(r.stdout, "42\n");
    python_tracebacks_name_the_program(&ex, &user).await;
    let r = call(
        &ex,
        &user,
        "shell",
        json!({"command": "true", "env": {"PATH": "/nowhere"}}),
    )
    .await;
    assert_eq!(r.exit_code, Some(127), "{r:?}");
    assert!(
        r.stderr
            .contains("cannot run sh: not found on the call's PATH (/nowhere)"),
        "{r:?}"
    );
    let marker = format!("zcbot-host-{}", t.pool_id);
    let r = call(
        &ex,
        &user,
        "shell",
        json!({"command": format!("sh -c 'sleep 600; : {marker}' & sleep 601"), "timeout": 1}),
    )
    .await;
    assert!(r.timed_out);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.contains(&marker),
        "host process group survived the timeout"
    );
    // The same confined file tools.
    std::os::unix::fs::symlink("/etc", ws.join("etc")).unwrap();
    let err = ex
        .run(
            &user,
            ToolCall::parse("read_file", json!({"path": "etc/passwd"})).unwrap(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "path_refused");
}

async fn a_container_restarted_behind_the_pools_back_gets_its_rules_before_the_next_call(
    transport: &str,
) {
    let mut t = TestPool::new("xrestart");
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let ex = docker_executor(&t).await;
    let user = t.user("u");
    let sb = ex.pool().unwrap().ensure(&user).await.unwrap();
    docker(&["restart", "-t", "0", &sb.name]);
    // Control: the restart gave it a fresh network namespace, with no rules in it.
    let (_, before, _) = common::netns_exec(&sb.name, "iptables -S OUTPUT | head -1");
    assert_eq!(before, "-P OUTPUT ACCEPT");
    let r = sh(&ex, &user, "echo ok").await;
    assert_eq!(r.stdout, "ok\n", "{r:?}");
    let (_, after, _) = common::netns_exec(&sb.name, "iptables -S OUTPUT | head -1");
    assert_eq!(
        after, "-P OUTPUT DROP",
        "the call ran without the rules back in place"
    );
}

#[tokio::test]
async fn the_cli_says_loudly_when_exec_and_python_run_on_the_host() {
    let t = TestPool::new("xhostcli");
    let run = |args: &[&str], backend: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_zcbot-sandbox"));
        cmd.args(args)
            .envs(t.env())
            .env_remove("ZCBOT_SANDBOX_BACKEND")
            .stdin(std::process::Stdio::null());
        if let Some(b) = backend {
            cmd.env("ZCBOT_SANDBOX_BACKEND", b);
        }
        cmd.output().unwrap()
    };
    let user = t.user("u");
    for args in [
        vec!["exec", "--user", user.as_str(), "--", "echo", "ran"],
        vec!["python", "--user", user.as_str(), "-"],
    ] {
        let out = run(&args, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("NOT isolated") && stderr.contains("ZCBOT_SANDBOX_BACKEND=docker"),
            "{args:?} ran on the host without a word: {stderr}"
        );
    }
    // The warning is on stderr only: --json output stays machine-readable.
    let out = run(
        &[
            "exec",
            "--user",
            user.as_str(),
            "--json",
            "--",
            "echo",
            "ran",
        ],
        Some("host"),
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["stdout"], "ran\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT isolated"));
    // The docker backend says nothing of the kind.
    let out = run(
        &["exec", "--user", user.as_str(), "--", "echo", "ran"],
        Some("docker"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ran\n", "{stderr}");
    assert!(!stderr.contains("NOT isolated"), "{stderr}");
}

#[tokio::test]
async fn a_bare_number_is_seconds_in_the_api_and_the_cli_alike() {
    // The host backend: what is tested is the reading of the timeout, not the sandbox.
    let t = TestPool::new("xsecs");
    let ex = Executor::from_config(t.config()).await.unwrap();
    let user = t.user("u");
    for timeout in [json!(1), json!("1"), json!("1s"), json!("1000ms")] {
        let started = Instant::now();
        let r = call(
            &ex,
            &user,
            "shell",
            json!({"command": "sleep 5", "timeout": timeout}),
        )
        .await;
        assert!(r.timed_out, "{timeout}: {r:?}");
        assert!(started.elapsed() < Duration::from_secs(4), "{timeout}");
    }
    for timeout in ["1", "1s"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_zcbot-sandbox"))
            .args(["exec", "--user", user.as_str(), "--timeout", timeout])
            .args(["--", "sleep", "5"])
            .envs(t.env())
            .env_remove("ZCBOT_SANDBOX_BACKEND")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(124),
            "--timeout {timeout}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And a variable: ZCBOT_EXEC_TIMEOUT=1 is the default timeout of one second.
    let mut t = t;
    t.set("ZCBOT_EXEC_TIMEOUT", "1");
    let ex = Executor::from_config(t.config()).await.unwrap();
    let r = call(&ex, &user, "shell", json!({"command": "sleep 5"})).await;
    assert!(r.timed_out, "{r:?}");
}

#[tokio::test]
async fn a_bad_timeout_says_what_a_timeout_is_and_its_bound_in_a_line() {
    let mut t = TestPool::new("xbadtime");
    t.set("ZCBOT_EXEC_TIMEOUT_MAX", "10m");
    let ex = Executor::from_config(t.config()).await.unwrap();
    for timeout in [
        json!(true),
        json!([30]),
        json!({"secs": 30}),
        json!(1e308),
        json!(-1),
        json!(0),
        json!(601),
        json!("11m"),
        json!("forever"),
        json!("x".repeat(10_000)),
    ] {
        let err = ToolCall::parse("shell", json!({"command": "true", "timeout": timeout}))
            .and_then(|call| ex.prepare(call).map(|_| ()))
            .unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.kind(), "bad_call", "{timeout}: {msg}");
        assert!(
            msg.contains("seconds") && msg.contains("duration string"),
            "{timeout}: {msg}"
        );
        assert!(msg.contains("ZCBOT_EXEC_TIMEOUT_MAX"), "{timeout}: {msg}");
        assert!(
            !msg.contains("TimeoutArg") && !msg.contains("untagged"),
            "{msg}"
        );
        assert!(msg.len() < 240, "{timeout}: {} bytes: {msg}", msg.len());
    }
    // Where the value's type was right, the bound is the configured one.
    let err = ToolCall::parse("shell", json!({"command": "true", "timeout": 1e308}))
        .and_then(|call| ex.prepare(call).map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("1e308") && err.contains("10m"), "{err}");
}
