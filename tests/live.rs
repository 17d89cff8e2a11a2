//! Live output (Server-Sent Events) and background jobs against the real Docker Engine, through
//! the daemon binary, as a client sees them: `curl -N` reads the event streams. Witnesses: `ps`
//! in the sandbox through the docker CLI.

mod common;

use std::time::{Duration, Instant};

use common::{exec_as, http, Daemon, TestPool};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use zcbot_sandbox::UserId;

/// One event as the client saw it: when (since the request was sent), its name, its data.
#[derive(Debug)]
struct Seen {
    at: Duration,
    name: String,
    data: Value,
}

/// A streaming request by curl, its events read as they arrive.
struct Events {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    sent: Instant,
}

impl Events {
    /// `POST` (with `body`) or `GET` (without) `path` asking for `text/event-stream` (by the
    /// header, or by the path's own `stream=1`).
    fn open(addr: &str, path: &str, body: Option<Value>) -> Events {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.arg("-sSN");
        if !path.contains("stream=1") {
            cmd.args(["-H", "Accept: text/event-stream"]);
        }
        if let Some(body) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(body.to_string());
        }
        cmd.arg(format!("http://{addr}{path}"))
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("curl");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Events {
            child,
            lines,
            sent: Instant::now(),
        }
    }

    /// The next event, None at the end of the stream (60 s at most).
    async fn next(&mut self) -> Option<Seen> {
        let (mut name, mut data) = (String::new(), String::new());
        loop {
            let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
                .await
                .expect("an event within 60 s")
                .unwrap()?;
            if let Some(v) = line.strip_prefix("event: ") {
                name = v.to_owned();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            } else if line.is_empty() && !name.is_empty() {
                return Some(Seen {
                    at: self.sent.elapsed(),
                    name,
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
            // Anything else: a keep-alive comment.
        }
    }

    /// Every event up to the end of the stream.
    async fn all(&mut self) -> Vec<Seen> {
        let mut seen = Vec::new();
        while let Some(e) = self.next().await {
            seen.push(e);
        }
        seen
    }

    /// The client goes away.
    async fn close(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// The text of every `stream` event, in order.
fn text(events: &[Seen], stream: &str) -> String {
    events
        .iter()
        .filter(|e| e.name == stream)
        .map(|e| e.data["text"].as_str().unwrap())
        .collect()
}

/// The sandbox's processes whose command line contains `needle`.
fn processes(container: &str, needle: &str) -> Vec<String> {
    let (_, out, _) = exec_as(container, "0:0", "ps -eo args=");
    out.lines()
        .filter(|l| l.contains(needle) && !l.contains("ps -eo"))
        .map(str::to_owned)
        .collect()
}

/// How many of the sandbox's processes run exactly `cmdline` (not a shell that mentions it).
fn running(container: &str, cmdline: &str) -> usize {
    let (_, out, _) = exec_as(container, "0:0", "ps -eo args=");
    out.lines().filter(|l| l.trim() == cmdline).count()
}

/// Waits up to `secs` for `cond`.
async fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cond()
}

/// Starts `command` as a background shell job, which must be accepted; the job as answered.
async fn job(d: &Daemon, user: &UserId, command: &str) -> Value {
    let (status, job) = d
        .tool(
            user,
            "shell",
            json!({"command": command, "background": true}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    job
}

async fn get_json(d: &Daemon, path: &str) -> (u16, Value) {
    let (status, _, body) = http(&d.addr, "GET", path, None).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// The first line arrives while the command still runs, and the last event is the result the
/// plain call returns; under both transport settings, for a shell call and a session.
async fn streams_output_as_it_is_printed(transport: &str) {
    let mut t = TestPool::new(&format!("sse{transport}"));
    t.set("ZCBOT_EXEC_TRANSPORT", transport);
    let d = Daemon::start(&mut t);
    let user = t.user("u");
    // Warm: the sandbox exists, so the timing below is the call's alone.
    assert_eq!(
        d.tool(&user, "shell", json!({"command": "true"})).await.0,
        200
    );

    let path = format!("/v1/users/{user}/tools/shell");
    let mut ev = Events::open(
        &d.addr,
        &path,
        Some(json!({"command": "echo a; sleep 2; echo b"})),
    );
    let events = ev.all().await;
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names.first(), Some(&"started"), "{events:?}");
    assert_eq!(names.last(), Some(&"result"), "{events:?}");
    let first_out = events.iter().find(|e| e.name == "stdout").unwrap();
    assert_eq!(first_out.data["text"], "a\n", "{events:?}");
    let last = events.last().unwrap().at;
    assert!(
        last.saturating_sub(first_out.at) >= Duration::from_millis(1500),
        "the first line came {:?} after the request, the result {last:?}: not live",
        first_out.at
    );
    assert_eq!(text(&events, "stdout"), "a\nb\n");
    let result = &events.last().unwrap().data;
    assert_eq!(result["stdout"], "a\nb\n", "{result}");
    assert_eq!(result["exit_code"], 0, "{result}");
    assert!(events.last().unwrap().at >= Duration::from_secs(2));

    // stderr too, and ?stream=1 without the header; a session run streams as well. (How the
    // output is cut into events is the pipes' business: compare the streams' text.)
    let mut ev = Events::open(
        &d.addr,
        &format!("/v1/users/{user}/tools/run_python?stream=1"),
        Some(
            json!({"code": "import sys\nprint('out')\nprint('err', file=sys.stderr)\n6*7", "session": "s"}),
        ),
    );
    let events = ev.all().await;
    assert_eq!(text(&events, "stdout"), "out\n", "{events:?}");
    assert_eq!(text(&events, "stderr"), "err\n", "{events:?}");
    let last = events.last().unwrap();
    assert_eq!(
        (last.name.as_str(), last.data["value"].as_str()),
        ("result", Some("42")),
        "{events:?}"
    );

    // A call that cannot run ends with an error event; a bad call is refused before any stream.
    let (status, _, body) = http(
        &d.addr,
        "POST",
        &format!("/v1/users/{user}/tools/shell?stream=1"),
        Some(json!({"command": "true", "timeout": -1}).to_string()),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bad_call"), "{body}");
}

#[tokio::test]
async fn sse_streams_output_as_it_is_printed_over_the_channel() {
    streams_output_as_it_is_printed("channel").await;
}

#[tokio::test]
async fn sse_streams_output_as_it_is_printed_over_per_call_exec() {
    streams_output_as_it_is_printed("exec").await;
}

/// Only the head of a stream (half the cap) goes out live; the result carries head and tail as
/// the plain call does. A binary byte streams as base64.
#[tokio::test]
async fn sse_streams_the_head_and_the_result_keeps_the_cap() {
    let mut t = TestPool::new("ssecap");
    t.set("ZCBOT_OUTPUT_CAP", "4KiB");
    let d = Daemon::start(&mut t);
    let user = t.user("u");
    let path = format!("/v1/users/{user}/tools/shell");
    let cmd = "head -c 100000 /dev/zero | tr '\\0' x; printf '\\377' >&2";
    let mut ev = Events::open(&d.addr, &path, Some(json!({ "command": cmd })));
    let events = ev.all().await;
    let live = text(&events, "stdout");
    assert_eq!(live, "x".repeat(2048), "only the head streams");
    let err = events.iter().find(|e| e.name == "stderr").unwrap();
    assert_eq!(err.data["base64"], "/w==", "{err:?}");
    let result = &events.last().unwrap().data;
    assert_eq!(result["truncated"]["stdout"], true, "{result}");
    assert!(result["stdout"].as_str().unwrap().contains("bytes omitted"));
}

/// A streaming client that goes away stops the call: its processes are killed (positive
/// control: they were seen running), and the user's slot is free again.
#[tokio::test]
async fn an_sse_client_going_away_cancels_the_call() {
    for transport in ["channel", "exec"] {
        let mut t = TestPool::new(&format!("ssegone{transport}"));
        t.set("ZCBOT_EXEC_TRANSPORT", transport)
            .set("ZCBOT_USER_MAX_CALLS", "1");
        let d = Daemon::start(&mut t);
        let user = t.user("u");
        let container = t.container_name(&user);
        let path = format!("/v1/users/{user}/tools/shell");
        let mut ev = Events::open(
            &d.addr,
            &path,
            Some(json!({"command": "echo go; exec sleep 4242"})),
        );
        assert_eq!(ev.next().await.unwrap().name, "started");
        assert_eq!(ev.next().await.unwrap().data["text"], "go\n");
        assert_eq!(running(&container, "sleep 4242"), 1, "{transport}");
        ev.close().await;
        assert!(
            eventually(15, || processes(&container, "sleep 4242").is_empty()).await,
            "{transport}: the call outlived its client"
        );
        // The only slot is free: the next call runs.
        let (status, r) = d
            .tool(&user, "shell", json!({"command": "echo next"}))
            .await;
        assert_eq!((status, r["stdout"].as_str()), (200, Some("next\n")), "{r}");
    }
}

/// A job answers at once, outlives its caller, shows its output so far, can be followed live,
/// and DELETE kills its whole tree (positive control: seen running, with a child it forked).
#[tokio::test]
async fn a_job_survives_its_caller_and_is_killed_by_delete() {
    let mut t = TestPool::new("jobs");
    let d = Daemon::start(&mut t);
    let user = t.user("u");
    let container = t.container_name(&user);
    let started = Instant::now();
    let job = job(
        &d,
        &user,
        "sleep 4343 & while :; do echo tick; sleep 0.2; done",
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(job["state"], "running", "{job}");
    let id = job["job_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/users/{user}/jobs/{id}");

    assert!(eventually(10, || running(&container, "sleep 4343") == 1).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, v) = get_json(&d, &path).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("running")), "{v}");
    assert!(
        v["stdout"].as_str().unwrap().starts_with("tick\ntick\n"),
        "{v}"
    );
    let (_, list) = get_json(&d, &format!("/v1/users/{user}/jobs")).await;
    assert_eq!(list["jobs"][0]["job_id"], id.as_str(), "{list}");
    assert!(list["jobs"][0].get("stdout").is_none(), "{list}");
    // Another user sees nothing of it.
    let (status, _) = get_json(&d, &format!("/v1/users/other/jobs/{id}")).await;
    assert_eq!(status, 404);

    // A follower sees what the ring holds, then new ticks, then the end.
    let mut ev = Events::open(&d.addr, &format!("{path}?stream=1"), None);
    assert_eq!(ev.next().await.unwrap().name, "started");
    let mut ticks = 0;
    while ticks < 10 {
        let e = ev.next().await.unwrap();
        assert_eq!(e.name, "stdout", "{e:?}");
        ticks += e.data["text"].as_str().unwrap().matches("tick").count();
    }

    let (status, _, body) = http(&d.addr, "DELETE", &path, None).await;
    assert_eq!(status, 200, "{body}");
    let killed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(killed["state"], "killed", "{killed}");
    assert!(
        processes(&container, "sleep 4343").is_empty() && processes(&container, "tick").is_empty(),
        "DELETE answered with the job's processes alive: {:?}",
        processes(&container, "")
    );
    let rest = ev.all().await;
    let last = rest.last().unwrap();
    assert_eq!(
        (last.name.as_str(), last.data["state"].as_str()),
        ("result", Some("killed"))
    );
    // A DELETE deletes: the answer above was the job's last record.
    assert_eq!(get_json(&d, &path).await.0, 404);
    assert_eq!(http(&d.addr, "DELETE", &path, None).await.0, 404);
    let (_, _, metrics) = http(&d.addr, "GET", "/metrics", None).await;
    for line in [
        "zcbot_jobs_running 0",
        "zcbot_jobs_ended_total{state=\"killed\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing in:\n{metrics}");
    }
}

/// Exit codes, the job's own timeout, stateless run_python, the per-user limit, refusals; over
/// the per-call exec setting (jobs take the channel whatever it says).
#[tokio::test]
async fn jobs_end_report_and_are_limited() {
    let mut t = TestPool::new("jobends");
    t.set("ZCBOT_USER_MAX_JOBS", "2")
        .set("ZCBOT_JOB_TIMEOUT", "1h")
        .set("ZCBOT_EXEC_TRANSPORT", "exec");
    let d = Daemon::start(&mut t);
    let user = t.user("u");
    let path = |job: &Value| format!("/v1/users/{user}/jobs/{}", job["job_id"].as_str().unwrap());
    let until_ended = |job: Value| {
        let (d, path) = (&d, path(&job));
        async move {
            let until = Instant::now() + Duration::from_secs(30);
            loop {
                let v = get_json(d, &path).await.1;
                if v["state"] != "running" || Instant::now() > until {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };

    let (status, long) = d
        .tool(
            &user,
            "shell",
            json!({"command": "echo early; exec sleep 300", "background": true, "call_id": "long"}),
        )
        .await;
    assert_eq!(
        (status, long["job_id"].as_str()),
        (202, Some("long")),
        "{long}"
    );
    // A follower that joins a quiet job gets what it printed at once, not at its end.
    let until = Instant::now() + Duration::from_secs(20);
    while get_json(&d, &path(&long)).await.1["stdout"] != "early\n" && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ev = Events::open(&d.addr, &format!("{}?stream=1", path(&long)), None);
    assert_eq!(ev.next().await.unwrap().name, "started");
    let early = ev.next().await.unwrap();
    assert_eq!(
        (early.name.as_str(), early.data["text"].as_str()),
        ("stdout", Some("early\n"))
    );
    assert!(early.at < Duration::from_secs(5), "{early:?}");
    ev.close().await;
    // The same id again is a conflict while the record exists.
    let (status, r) = d
        .tool(
            &user,
            "shell",
            json!({"command": "true", "background": true, "call_id": "long"}),
        )
        .await;
    assert_eq!(
        (status, r["error"]["kind"].as_str()),
        (409, Some("call_id_in_use")),
        "{r}"
    );
    let (status, timed) = d
        .tool(
            &user,
            "run_python",
            json!({"code": "import time\ntime.sleep(30)", "timeout": 1, "background": true}),
        )
        .await;
    assert_eq!(status, 202, "{timed}");
    // Two running: a third is refused.
    let (status, r) = d
        .tool(
            &user,
            "shell",
            json!({"command": "true", "background": true}),
        )
        .await;
    assert_eq!(
        (status, r["error"]["kind"].as_str()),
        (429, Some("too_many_jobs")),
        "{r}"
    );
    let timed = until_ended(timed).await;
    assert_eq!(timed["state"], "timed_out", "{timed}");
    // A slot is free again.
    let exited = job(&d, &user, "echo done; echo oops >&2; exit 3").await;
    let exited = until_ended(exited).await;
    assert_eq!(
        (exited["state"].as_str(), exited["exit_code"].as_i64()),
        (Some("exited"), Some(3)),
        "{exited}"
    );
    assert_eq!(
        (exited["stdout"].as_str(), exited["stderr"].as_str()),
        (Some("done\n"), Some("oops\n"))
    );
    assert_eq!(http(&d.addr, "DELETE", &path(&long), None).await.0, 200);

    // Refused before anything starts: a timeout over the job limit, a session in the background.
    let (status, r) = d
        .tool(
            &user,
            "shell",
            json!({"command": "true", "timeout": "2h", "background": true}),
        )
        .await;
    assert_eq!(status, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ZCBOT_JOB_TIMEOUT"),
        "{r}"
    );
    let (status, r) = d
        .tool(
            &user,
            "run_python",
            json!({"code": "1", "session": "s", "background": true}),
        )
        .await;
    assert_eq!(status, 400, "{r}");
    let (status, _) = get_json(&d, &format!("/v1/users/{user}/jobs/nope")).await;
    assert_eq!(status, 404);
}

/// A running job keeps its sandbox from the reaper (positive control: once it has ended, the
/// idle sandbox is reaped).
#[tokio::test]
async fn a_running_job_keeps_its_sandbox_from_the_reaper() {
    let mut t = TestPool::new("jobreap");
    t.set("ZCBOT_SANDBOX_IDLE", "1s")
        .set("ZCBOT_SANDBOX_REAP_EVERY", "1h");
    let d = Daemon::start(&mut t);
    let user = t.user("u");
    let container = t.container_name(&user);
    let job = job(&d, &user, "sleep 6").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(http(&d.addr, "POST", "/v1/reap", None).await.0, 200);
    assert!(
        t.containers().contains(&container),
        "reaped under a running job"
    );
    let path = format!("/v1/users/{user}/jobs/{}", job["job_id"].as_str().unwrap());
    let until = Instant::now() + Duration::from_secs(15);
    while get_json(&d, &path).await.1["state"] == "running" && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(http(&d.addr, "POST", "/v1/reap", None).await.0, 200);
    assert!(
        eventually(10, || !t.containers().contains(&container)).await,
        "the idle sandbox was not reaped after its job ended"
    );
}

/// A daemon killed outright does not orphan a job's processes: the channel's helper sees its
/// daemon gone and kills them (positive control: seen running before). The next daemon adopts
/// the sandbox and knows no such job.
#[tokio::test]
async fn a_daemon_killed_outright_takes_its_jobs_processes_with_it() {
    let mut t = TestPool::new("jobrestart");
    let mut d = Daemon::start(&mut t);
    let user = t.user("u");
    let container = t.container_name(&user);
    let job = job(&d, &user, "setsid sleep 4545 & sleep 4646").await;
    assert!(
        eventually(10, || running(&container, "sleep 4545") == 1
            && running(&container, "sleep 4646") == 1)
        .await
    );
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    assert!(
        eventually(15, || processes(&container, "sleep 4").is_empty()).await,
        "a job's processes outlived the daemon: {:?}",
        processes(&container, "sleep")
    );
    let d2 = Daemon::start(&mut t);
    let (status, v) = get_json(
        &d2,
        &format!("/v1/users/{user}/jobs/{}", job["job_id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(
        (status, v["error"]["kind"].as_str()),
        (404, Some("no_such_job")),
        "{v}"
    );
    drop(d);

    // A graceful shutdown kills a running job at once (it holds no connection to wait for).
    let (status, job) = d2
        .tool(
            &user,
            "shell",
            json!({"command": "sleep 4747", "background": true}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    assert!(eventually(10, || running(&container, "sleep 4747") == 1).await);
    let stopping = Instant::now();
    drop(d2); // SIGTERM, then waits for the exit
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        stopping.elapsed()
    );
    assert!(processes(&container, "sleep 4747").is_empty());
}

/// A tenant flooding the daemon with everything this change gives it (its most jobs, each
/// printing without end, and followers streaming them) does not stall another tenant: each of
/// the bystander's calls answers, a streamed one too, within a bound far above a warm call's few
/// milliseconds (a liveness bound, not a performance claim; BENCH.md has the figures), and the
/// attacker's followers are bounded by its call slots. Positive control: the flood really ran
/// (megabytes dropped from the jobs' rings).
#[tokio::test]
async fn a_tenant_flooding_jobs_and_followers_does_not_stall_another() {
    let mut t = TestPool::new("jobflood");
    t.set("ZCBOT_USER_MAX_CALLS", "2");
    let d = Daemon::start(&mut t);
    let (attacker, bystander) = (t.user("a"), t.user("b"));
    assert_eq!(
        d.tool(&bystander, "shell", json!({"command": "true"}))
            .await
            .0,
        200
    );
    let mut jobs = Vec::new();
    for _ in 0..4 {
        jobs.push(job(&d, &attacker, "yes flood-flood-flood-flood").await);
    }
    let path = |j: &Value| {
        format!(
            "/v1/users/{attacker}/jobs/{}",
            j["job_id"].as_str().unwrap()
        )
    };
    let mut followers: Vec<Events> = jobs
        .iter()
        .take(2)
        .map(|j| Events::open(&d.addr, &format!("{}?stream=1", path(j)), None))
        .collect();
    for f in &mut followers {
        assert_eq!(f.next().await.unwrap().name, "started");
    }
    // Followers hold the attacker's call slots: a third is refused, the bystander's are its own.
    let (status, _, body) = http(
        &d.addr,
        "GET",
        &format!("{}?stream=1", path(&jobs[2])),
        None,
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too_many_calls"), "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = Instant::now();
        let (status, r) = d
            .tool(&bystander, "shell", json!({"command": format!("echo {i}")}))
            .await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(
            (status, r["stdout"].as_str()),
            (200, Some(format!("{i}\n").as_str())),
            "{r}"
        );
    }
    let mut ev = Events::open(
        &d.addr,
        &format!("/v1/users/{bystander}/tools/shell"),
        Some(json!({"command": "echo live"})),
    );
    let events = ev.all().await;
    assert_eq!(text(&events, "stdout"), "live\n", "{events:?}");
    eprintln!("slowest bystander call during the flood: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(3),
        "a bystander's call took {slowest:?} during the flood"
    );

    let (_, flooded) = get_json(&d, &path(&jobs[0])).await;
    assert_eq!(flooded["state"], "running", "{}", flooded["state"]);
    let dropped = flooded["stdout_dropped"].as_u64().unwrap();
    assert!(
        dropped > 10 << 20,
        "the flood did not run: {dropped} bytes dropped"
    );
    for j in &jobs {
        let (status, _, body) = http(&d.addr, "DELETE", &path(j), None).await;
        assert_eq!(status, 200, "{body}");
    }
    for f in followers {
        f.close().await;
    }
}
