//! What a tool call costs, each figure next to its baseline measured in the same run (the machine
//! is shared and noisy, so only ratios within one run mean much). Run by `scripts/bench.sh`:
//! prints a table and writes it as JSON (path in ZCBOT_BENCH_JSON).
//!
//! Scenarios: 1 warm exec of `true`; 2 cold ensure; 3 warm ensure; 4 concurrency; 5 a pool of
//! many warm containers; 6 a call that prints 100 MiB; 7 the runtime column, runc vs runsc
//! (gVisor); 8 Python sessions; 9 live output (SSE) and background jobs; 10 staged idle (the
//! first call after a pause); 11 warm spares; 12 egress through the allowlist proxy. Percentiles come from an HDR histogram, after a warm-up, with the sample count stated.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use zcbot_sandbox::exec::Executor;
use zcbot_sandbox::server::{ServeOptions, Server};
use zcbot_sandbox::{Config, SandboxPool, UserId};

fn env_usize(k: &str, default: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()
}

/// Microseconds at p50/p90/p99 and the count.
fn summary(h: &Histogram<u64>) -> Value {
    json!({ "n": h.len(), "p50_us": h.value_at_quantile(0.5), "p90_us": h.value_at_quantile(0.9), "p99_us": h.value_at_quantile(0.99) })
}

fn row(name: &str, h: &Histogram<u64>, base: Option<&Histogram<u64>>) {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let ratio = base.map_or(String::new(), |b| {
        format!(
            "  x{:.3} of baseline p50",
            h.value_at_quantile(0.5) as f64 / b.value_at_quantile(0.5) as f64
        )
    });
    println!(
        "  {name:<46} n={:<6} p50 {:>9.3} ms  p90 {:>9.3} ms  p99 {:>9.3} ms{ratio}",
        h.len(),
        ms(0.5),
        ms(0.9),
        ms(0.99)
    );
}

fn record(h: &mut Histogram<u64>, since: Instant) {
    h.record(since.elapsed().as_micros().max(1) as u64).unwrap();
}

/// (user + system) CPU seconds of this process, and of its reaped children.
fn cpu_seconds() -> (f64, f64) {
    // SAFETY: rusage is plain integers (timevals and longs): all-zero is a valid value.
    let mut self_usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut child_usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the structs we own.
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut self_usage);
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut child_usage);
    }
    let secs = |u: &libc::rusage| {
        (u.ru_utime.tv_sec + u.ru_stime.tv_sec) as f64
            + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) as f64 / 1e6
    };
    (secs(&self_usage), secs(&child_usage))
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn mem_available_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap();
    s.lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn docker_cli(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Removes a bench pool's network and its host rules. The engine may still be detaching the
/// last removed container's endpoint for a moment, so a refusal is retried for up to 10 s and
/// then printed: a leftover network is named, never silent.
async fn remove_network(network: &str) {
    let mut last = String::new();
    for _ in 0..40 {
        let out = Command::new("docker")
            .args(["network", "rm", network])
            .output()
            .unwrap();
        last = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if out.status.success() || last.contains("not found") {
            last.clear();
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if !last.is_empty() {
        println!("  WARNING: network {network} left behind: {last}");
    }
    let _ = zcbot_sandbox::firewall::remove(&zcbot_sandbox::pool::network::bridge_name(network));
}

/// One HTTP/1.1 request over a fresh loopback connection, as a client without keep-alive would.
async fn http_post(addr: &str, path: &str, body: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// An HTTP/1.1 client that keeps its connection open between requests, as a real client would.
struct KeepAlive {
    s: tokio::io::BufReader<tokio::net::TcpStream>,
}

impl KeepAlive {
    async fn connect(addr: &str) -> Self {
        KeepAlive {
            s: tokio::io::BufReader::new(tokio::net::TcpStream::connect(addr).await.unwrap()),
        }
    }

    async fn post(&mut self, path: &str, body: &str) -> u16 {
        use tokio::io::AsyncBufReadExt;
        let req = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        self.s.get_mut().write_all(req.as_bytes()).await.unwrap();
        let (mut status, mut len) = (0u16, 0usize);
        let mut line = String::new();
        loop {
            line.clear();
            self.s.read_line(&mut line).await.unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if l.starts_with("HTTP/1.1 ") {
                status = l[9..12].parse().unwrap_or(0);
            } else if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).await.unwrap();
        status
    }
}

/// One streamed call (`Accept: text/event-stream`) on a fresh connection: when the first
/// `stdout` event arrived, when the stream ended, and how many bytes it carried.
async fn sse_call(addr: &str, path: &str, body: &str) -> (Duration, Duration, usize) {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: text/event-stream\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let t = Instant::now();
    s.write_all(req.as_bytes()).await.unwrap();
    let (mut first, mut total) = (None, 0usize);
    let mut window = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n;
        if first.is_none() {
            window.extend_from_slice(&buf[..n]);
            if window.windows(13).any(|w| w == b"event: stdout") {
                first = Some(t.elapsed());
            }
        }
    }
    (first.expect("a stdout event"), t.elapsed(), total)
}

/// A GET's body, on a fresh connection.
async fn get_body(addr: &str, path: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

struct Bench {
    id: String,
    root: std::path::PathBuf,
    network: String,
    config: Config,
}

impl Bench {
    /// A pool of its own (id, network, folders) whose sandboxes run under `runtime`.
    fn new(suffix: &str, runtime: &str) -> Self {
        let id = format!("bench{:x}{suffix}", std::process::id());
        let root = std::env::temp_dir().join(format!("zcbot-{id}"));
        let network = format!("zcbt-{id}");
        let vars = [
            ("ZCBOT_POOL_ID", id.clone()),
            ("ZCBOT_SANDBOX_NETWORK", network.clone()),
            ("ZCBOT_USERS_ROOT", root.join("users").display().to_string()),
            ("ZCBOT_STATE_DIR", root.join("state").display().to_string()),
            ("ZCBOT_SANDBOX_MAX", "1000".to_owned()),
            ("ZCBOT_USER_MAX_CALLS", "64".to_owned()),
            ("ZCBOT_LISTEN", "127.0.0.1:0".to_owned()),
            ("ZCBOT_SANDBOX_BACKEND", "docker".to_owned()),
            ("ZCBOT_SANDBOX_RUNTIME", runtime.to_owned()),
            // The library's pools and the in-process daemon's share these containers: no reaper
            // may pause one behind the others' backs (10 pauses by hand).
            ("ZCBOT_SANDBOX_PAUSE_AFTER", "0".to_owned()),
            // Spares only where 11 measures them (its own pool): elsewhere a new user's first
            // call is the cold path these scenarios measure.
            ("ZCBOT_SPARES", "0".to_owned()),
        ];
        let config = Config::from_lookup(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
                .or_else(|| std::env::var(k).ok())
        })
        .unwrap();
        Bench {
            id,
            root,
            network,
            config,
        }
    }

    fn user(i: usize) -> UserId {
        UserId::parse(&format!("u{i}")).unwrap()
    }

    /// The `docker run -d` flags equivalent to a pool container (the CLI baseline).
    fn docker_run_args(&self, name: &str, image: &str) -> Vec<String> {
        let ws = self.root.join("baseline");
        let pids = self.config.pids.to_string();
        std::fs::create_dir_all(&ws).unwrap();
        let mut a: Vec<String> = [
            "run",
            "-d",
            "--name",
            name,
            "--read-only",
            "--tmpfs",
            "/tmp:rw,nosuid,nodev,size=67108864,mode=1777",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges:true",
            "--pids-limit",
            &pids,
            "-m",
            "512m",
            "--memory-swap",
            "512m",
            "--cpus",
            "1",
            "--ipc",
            "private",
            "--cgroupns",
            "private",
            "--network",
            &self.config.network_name(),
            "-v",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(format!("{}:/workspace", ws.display()));
        a.extend([
            image.to_owned(),
            "--egress".into(),
            "none".into(),
            "--rules-by-host".into(),
        ]);
        a
    }
}

#[tokio::main]
async fn main() {
    let n_exec = env_usize("ZCBOT_BENCH_EXEC_N", 300);
    let n_cold = env_usize("ZCBOT_BENCH_COLD_N", 20);
    let n_scale = env_usize("ZCBOT_BENCH_SCALE", 200);
    let b = Bench::new("", "runc");
    let mut results = serde_json::Map::new();
    let started = Instant::now();
    let version = String::from_utf8_lossy(
        &Command::new("docker")
            .args(["version", "-f", "{{.Server.Version}}"])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_owned();
    println!(
        "zcbot-sandbox bench: {} cores, {} MiB, Docker Engine {version}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_available_kib() / 1024
    );
    results.insert("machine".into(), json!({ "cores": std::thread::available_parallelism().map_or(0, |n| n.get()), "docker": version }));

    let server = Server::start(b.config.clone(), ServeOptions::default())
        .await
        .expect("daemon starts");
    let addr = server.address().trim_start_matches("http://").to_owned();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));
    let executor = Executor::from_config(b.config.clone()).await.unwrap();
    let pool = executor.pool().unwrap().clone();
    // The same pool reached by one Docker exec per call (ZCBOT_EXEC_TRANSPORT=exec).
    let mut exec_config = b.config.clone();
    exec_config.transport = zcbot_sandbox::config::Transport::Exec;
    let per_call = Arc::new(Executor::from_config(exec_config).await.unwrap());
    let cancel = CancellationToken::new();
    let image_id = pool.image_id().to_owned();

    // 1. Warm exec of `true`, six ways, interleaved call by call on one warm container.
    println!("\n1. warm exec of `true` (one user, warm container), interleaved");
    let u0 = Bench::user(0);
    let c0 = pool.ensure(&u0).await.unwrap().name;
    let body = r#"{"command":"true"}"#;
    let path = format!("/v1/users/{u0}/tools/shell");
    let (mut lib, mut lib_exec, mut http, mut http_ka, mut cli, mut api) =
        (hist(), hist(), hist(), hist(), hist(), hist());
    let mut client = KeepAlive::connect(&addr).await;
    // Between two measured calls the engine may still be tearing down the previous exec (runc,
    // containerd) on this 2-core machine; a short pause keeps one method's leftover work from
    // being billed to the next one. Every method gets the same pause before it.
    let settle = || tokio::time::sleep(Duration::from_millis(20));
    for i in 0..(n_exec + 30) {
        let warm = i < 30;
        settle().await;
        let t = call_true(&executor, &u0).await;
        if !warm {
            record(&mut lib, t)
        }
        settle().await;
        let t = call_true(&per_call, &u0).await;
        if !warm {
            record(&mut lib_exec, t)
        }
        settle().await;
        let t = Instant::now();
        assert_eq!(http_post(&addr, &path, body).await, 200);
        if !warm {
            record(&mut http, t)
        }
        settle().await;
        let t = Instant::now();
        assert_eq!(client.post(&path, body).await, 200);
        if !warm {
            record(&mut http_ka, t)
        }
        settle().await;
        let t = Instant::now();
        assert!(docker_cli(&["exec", &c0, "true"]));
        if !warm {
            record(&mut cli, t)
        }
        settle().await;
        let t = Instant::now();
        zcbot_sandbox::exec::transport::run_collect(
            pool.engine().as_ref(),
            &c0,
            "1000:1000",
            &["true"],
            Duration::from_secs(30),
            1024,
        )
        .await
        .unwrap();
        if !warm {
            record(&mut api, t)
        }
    }
    row("library, channel transport (default)", &lib, Some(&cli));
    row("library, per-call exec transport", &lib_exec, Some(&cli));
    row(
        "HTTP API (serve, shell tool, keep-alive)",
        &http_ka,
        Some(&cli),
    );
    row(
        "HTTP API (serve, shell tool, new connection)",
        &http,
        Some(&cli),
    );
    row(
        "bare Docker API exec (create/start/inspect)",
        &api,
        Some(&cli),
    );
    row("baseline: docker exec <container> true (CLI)", &cli, None);
    let ratio =
        |h: &Histogram<u64>| h.value_at_quantile(0.5) as f64 / cli.value_at_quantile(0.5) as f64;
    println!(
        "  p50 as a fraction of the CLI's: channel library 1/{:.1}, HTTP keep-alive 1/{:.1}, per-call exec 1/{:.1}",
        1.0 / ratio(&lib),
        1.0 / ratio(&http_ka),
        1.0 / ratio(&lib_exec)
    );
    results.insert("warm_exec".into(), json!({ "library_channel": summary(&lib), "library_exec": summary(&lib_exec), "http_keepalive": summary(&http_ka), "http": summary(&http), "bare_api": summary(&api), "cli_baseline": summary(&cli) }));

    // 2. Cold ensure vs docker run -d with the same flags, interleaved.
    println!("\n2. cold ensure (create + start + rules in place) vs docker run -d, same flags");
    let (mut cold, mut run) = (hist(), hist());
    for i in 0..n_cold {
        let u = UserId::parse(&format!("cold{i}")).unwrap();
        let t = Instant::now();
        pool.ensure(&u).await.unwrap();
        record(&mut cold, t);
        pool.remove(&u).await.unwrap();
        let name = format!("zcbot-baseline-{}-{i}", b.id);
        let t = Instant::now();
        assert!(docker_cli(
            &b.docker_run_args(&name, &image_id)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        ));
        record(&mut run, t);
        docker_cli(&["rm", "-f", &name]);
    }
    row("cold ensure", &cold, Some(&run));
    row("baseline: docker run -d (CLI)", &run, None);
    results.insert(
        "cold_ensure".into(),
        json!({ "ensure": summary(&cold), "docker_run_baseline": summary(&run) }),
    );

    // 3. Warm ensure: no Docker round trip at all.
    println!("\n3. warm ensure (already running)");
    let before = pool.stats();
    let mut warm = hist();
    for _ in 0..100_000 {
        let t = Instant::now();
        pool.ensure(&u0).await.unwrap();
        h_ns(&mut warm, t);
    }
    let after = pool.stats();
    let p = |q| warm.value_at_quantile(q) as f64 / 1000.0;
    println!("  warm ensure  n={} p50 {:.3} us  p99 {:.3} us  cold ensures meanwhile: {} (no Docker call)", warm.len(), p(0.5), p(0.99), after.ensures_cold - before.ensures_cold);
    results.insert("warm_ensure".into(), json!({ "n": warm.len(), "p50_ns": warm.value_at_quantile(0.5), "p99_ns": warm.value_at_quantile(0.99), "docker_calls": after.ensures_cold - before.ensures_cold }));

    // 4. Concurrency: 50 users x 20 calls at 8/16/32 in flight, library vs CLI.
    println!("\n4. concurrency: 50 users x 20 calls of `true`");
    let users: Vec<UserId> = (0..50).map(Bench::user).collect();
    let mut names = Vec::new();
    for u in &users {
        names.push(pool.ensure(u).await.unwrap().name);
    }
    let executor = Arc::new(executor);
    // Every user's channel open before measuring (as it is after a user's first call).
    for u in &users {
        call_true(&executor, u).await;
    }
    let mut conc = serde_json::Map::new();
    for inflight in [8usize, 16, 32] {
        let exec_res = run_concurrent(inflight, &users, |u| {
            let ex = per_call.clone();
            async move { call_true(&ex, &u).await }
        })
        .await;
        let (lib_res, cli_res) = (
            run_concurrent(inflight, &users, |u| {
                let ex = executor.clone();
                async move { call_true(&ex, &u).await }
            })
            .await,
            run_concurrent(inflight, &users, |u| {
                let name = names[users.iter().position(|x| *x == u).unwrap()].clone();
                async move {
                    let t = Instant::now();
                    tokio::process::Command::new("docker")
                        .args(["exec", &name, "true"])
                        .output()
                        .await
                        .unwrap();
                    t
                }
            })
            .await,
        );
        let line = |name: &str, r: (f64, u64, f64)| {
            format!(
                "{name} {:>6.1} calls/s p99 {:>7.1} ms cpu {:>5.2} s/1000",
                r.0,
                r.1 as f64 / 1000.0,
                r.2
            )
        };
        println!(
            "  {inflight:>2} in flight: {} | {} | {} | channel/exec x{:.1}, channel/CLI x{:.1}",
            line("channel", lib_res),
            line("per-call exec", exec_res),
            line("CLI", cli_res),
            lib_res.0 / exec_res.0,
            lib_res.0 / cli_res.0
        );
        conc.insert(inflight.to_string(), json!({
            "library_channel": { "calls_per_s": lib_res.0, "p99_us": lib_res.1, "cpu_s_per_1000": lib_res.2 },
            "library_exec": { "calls_per_s": exec_res.0, "p99_us": exec_res.1, "cpu_s_per_1000": exec_res.2 },
            "cli": { "calls_per_s": cli_res.0, "p99_us": cli_res.1, "cpu_s_per_1000": cli_res.2 },
        }));
    }
    results.insert("concurrency".into(), Value::Object(conc));

    // 6. A call that prints 100 MiB: wall time and the daemon's peak RSS.
    println!("\n6. output: a call that prints 100 MiB (cap 1 MiB per stream)");
    let rss_before = status_kib("VmRSS:");
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // reset the peak
    let flood = || {
        zcbot_sandbox::exec::ToolCall::parse(
            "shell",
            json!({"command": "head -c 104857600 /dev/zero | tr '\\0' x"}),
        )
        .unwrap()
    };
    let t = Instant::now();
    let r = executor.run(&u0, flood(), &cancel).await.unwrap();
    let wall = t.elapsed();
    let peak = status_kib("VmHWM:");
    // The same over per-call exec, where the cap is applied here rather than in the container.
    let t = Instant::now();
    per_call.run(&u0, flood(), &cancel).await.unwrap();
    let wall_exec = t.elapsed();
    let peak_exec = status_kib("VmHWM:");
    let t = Instant::now();
    assert!(docker_cli(&[
        "exec",
        &c0,
        "sh",
        "-c",
        "head -c 104857600 /dev/zero | tr '\\0' x > /dev/null"
    ]));
    let base = t.elapsed();
    println!("  channel: wall {:.2} s (the same work with output discarded in the container: {:.2} s), truncated {}, RSS {} MiB before, peak {} MiB", wall.as_secs_f64(), base.as_secs_f64(), r.truncated.stdout, rss_before / 1024, peak / 1024);
    println!(
        "  per-call exec: wall {:.2} s, peak RSS {} MiB",
        wall_exec.as_secs_f64(),
        peak_exec / 1024
    );
    results.insert("output_100mib".into(), json!({ "wall_s": wall.as_secs_f64(), "exec_wall_s": wall_exec.as_secs_f64(), "discarded_in_container_s": base.as_secs_f64(), "rss_before_kib": rss_before, "peak_rss_kib": peak, "exec_peak_rss_kib": peak_exec }));

    // 8. Python sessions: a warm session's `pass` vs a stateless run_python `pass`, interleaved;
    // then pandas: the first call of a new session (import + groupby) vs the same code again.
    println!("\n8. Python sessions (one user, warm container and channel)");
    let py = |code: &str, session: Option<&str>| {
        let mut args = json!({ "code": code });
        if let Some(s) = session {
            args["session"] = json!(s);
        }
        zcbot_sandbox::exec::ToolCall::parse("run_python", args).unwrap()
    };
    let (mut in_session, mut stateless) = (hist(), hist());
    for i in 0..(n_exec + 30) {
        settle().await;
        let t = Instant::now();
        let r = executor
            .run(&u0, py("pass", Some("bench")), &cancel)
            .await
            .unwrap();
        assert_eq!(r.exit_code, Some(0));
        if i >= 30 {
            record(&mut in_session, t);
        }
        settle().await;
        let t = Instant::now();
        let r = executor.run(&u0, py("pass", None), &cancel).await.unwrap();
        assert_eq!(r.exit_code, Some(0));
        if i >= 30 {
            record(&mut stateless, t);
        }
    }
    row(
        "run_python `pass` in a warm session",
        &in_session,
        Some(&stateless),
    );
    row("baseline: stateless run_python `pass`", &stateless, None);
    let groupby = "import pandas as pd\npd.DataFrame({'k': list('abcab'), 'v': range(5)}).groupby('k').v.sum().to_dict()";
    let (mut first, mut second, mut fresh) = (hist(), hist(), hist());
    for i in 0..10 {
        let name = format!("pd{i}");
        let t = Instant::now();
        let r = executor
            .run(&u0, py(groupby, Some(&name)), &cancel)
            .await
            .unwrap();
        record(&mut first, t);
        assert!(
            r.session.as_ref().is_some_and(|s| s.session_started),
            "{r:?}"
        );
        let t = Instant::now();
        executor
            .run(&u0, py(groupby, Some(&name)), &cancel)
            .await
            .unwrap();
        record(&mut second, t);
        executor.end_session(&u0, &name).await.unwrap();
        let t = Instant::now();
        let r = executor.run(&u0, py(groupby, None), &cancel).await.unwrap();
        assert_eq!(r.exit_code, Some(0), "{r:?}");
        record(&mut fresh, t);
    }
    row(
        "pandas import + groupby, 2nd call in the session",
        &second,
        Some(&first),
    );
    row(
        "pandas import + groupby, stateless call",
        &fresh,
        Some(&first),
    );
    row(
        "baseline: the same, 1st call of a new session",
        &first,
        None,
    );
    results.insert("sessions".into(), json!({ "pass_in_session": summary(&in_session), "pass_stateless": summary(&stateless), "pandas_first": summary(&first), "pandas_second": summary(&second), "pandas_stateless": summary(&fresh) }));

    // 9. Live output: time to the first `stdout` event of a streamed call vs the plain call's
    // whole answer; the daemon's peak RSS while a call streams 100 MiB and while a background
    // job prints 100 MiB (every byte through its ring), against the RSS before.
    println!("\n9. live output (SSE) and background jobs (one user, warm container and channel)");
    let two = r#"{"command":"echo a; sleep 2; echo b"}"#;
    let (mut first_event, mut plain) = (hist(), hist());
    for _ in 0..10 {
        let (first, _, _) = sse_call(&addr, &path, two).await;
        first_event.record(first.as_micros().max(1) as u64).unwrap();
        let t = Instant::now();
        assert_eq!(KeepAlive::connect(&addr).await.post(&path, two).await, 200);
        record(&mut plain, t);
    }
    row(
        "SSE: first stdout event of `echo a; sleep 2; echo b`",
        &first_event,
        Some(&plain),
    );
    row("baseline: the plain call's whole answer", &plain, None);
    let rss_before = status_kib("VmRSS:");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let flood = r#"{"command":"head -c 104857600 /dev/zero | tr '\\0' x"}"#;
    let (_, wall, streamed) = sse_call(&addr, &path, flood).await;
    let peak_sse = status_kib("VmHWM:");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let job = r#"{"command":"head -c 104857600 /dev/zero | tr '\\0' x","background":true}"#;
    let t = Instant::now();
    assert_eq!(KeepAlive::connect(&addr).await.post(&path, job).await, 202);
    let jobs_path = format!("/v1/users/{u0}/jobs");
    while get_body(&addr, &jobs_path).await.contains("\"running\"") {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let job_wall = t.elapsed();
    let peak_job = status_kib("VmHWM:");
    println!(
        "  streaming 100 MiB: {:.2} s, {} KiB of events sent, daemon RSS {} MiB before, peak {} MiB; a job printing 100 MiB: {:.2} s, peak {} MiB",
        wall.as_secs_f64(),
        streamed / 1024,
        rss_before / 1024,
        peak_sse / 1024,
        job_wall.as_secs_f64(),
        peak_job / 1024
    );
    results.insert("live".into(), json!({ "first_event": summary(&first_event), "plain_answer": summary(&plain), "stream_100mib_wall_s": wall.as_secs_f64(), "stream_100mib_bytes": streamed, "rss_before_kib": rss_before, "stream_peak_rss_kib": peak_sse, "job_100mib_wall_s": job_wall.as_secs_f64(), "job_peak_rss_kib": peak_job }));

    // 10. Staged idle: the first call after a pause (the lease thaws the sandbox) vs a warm
    // call, interleaved, and vs the cold ensure of 2.
    println!("\n10. staged idle: the first call after a pause (one user, warm channel)");
    let (mut after_pause, mut warm_call) = (hist(), hist());
    for i in 0..(n_cold + 5) {
        let paused = pool.pause_idle(Duration::ZERO).await.unwrap();
        assert!(paused.contains(&u0.to_string()), "{paused:?}");
        settle().await;
        let t = call_true(&executor, &u0).await;
        if i >= 5 {
            record(&mut after_pause, t);
        }
        settle().await;
        let t = call_true(&executor, &u0).await;
        if i >= 5 {
            record(&mut warm_call, t);
        }
    }
    row("`true` right after a pause", &after_pause, Some(&warm_call));
    row(
        "`true` after a pause, vs the cold ensure of 2",
        &after_pause,
        Some(&cold),
    );
    row("baseline: a warm `true`", &warm_call, None);
    results.insert("staged_idle".into(), json!({ "after_pause": summary(&after_pause), "warm": summary(&warm_call), "cold_ensure": summary(&cold) }));

    // 11. Warm spares, on a pool of their own.
    println!("\n11. warm spares: a new user's first call");
    let column = spares_column(&executor, &b, &image_id, n_cold).await;
    results.insert("warm_spares".into(), column);

    // 5. Scale: many warm containers.
    println!("\n5. scale: {n_scale} warm containers");
    for u in &users {
        pool.remove(u).await.unwrap();
    }
    pool.remove(&u0).await.unwrap();
    let rss_empty = status_kib("VmRSS:");
    let scale_users: Vec<UserId> = (0..n_scale)
        .map(|i| UserId::parse(&format!("s{i}")).unwrap())
        .collect();
    let (create_s, mem_per) = open_warm(&executor, &scale_users).await;
    let rss_full = status_kib("VmRSS:");
    // A fresh owner process: what startup costs with that many containers.
    let fresh = SandboxPool::connect(b.config.clone()).await.unwrap();
    let t = Instant::now();
    let report = fresh.reconcile().await.unwrap();
    let reconcile_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let none = fresh.reap_idle(Duration::from_secs(3600)).await.unwrap();
    let pass_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    let all = fresh.reap_idle(Duration::from_nanos(1)).await.unwrap();
    let reap_all_s = t.elapsed().as_secs_f64();
    println!("  created in {create_s:.1} s (4 at a time, one call each: channel open); host memory per warm container {mem_per:.1} MiB (MemAvailable)");
    println!("  startup reconcile: {reconcile_s:.2} s ({} adopted); a reaper pass with nothing to reap: {pass_ms:.3} ms ({} reaped); reaping all: {reap_all_s:.2} s ({} reaped)", report.adopted.len(), none.len(), all.len());
    println!(
        "  daemon RSS with {n_scale} containers: {} MiB, with 0: {} MiB",
        rss_full / 1024,
        rss_empty / 1024
    );
    results.insert("scale".into(), json!({ "containers": n_scale, "create_s": create_s, "host_mib_per_container": mem_per, "reconcile_s": reconcile_s, "adopted": report.adopted.len(), "reap_pass_nothing_ms": pass_ms, "reap_all_s": reap_all_s, "rss_kib_full": rss_full, "rss_kib_empty": rss_empty }));

    // 7. The runtime column: runc vs runsc (gVisor), in this same run.
    println!("\n7. runtime: runc vs runsc (gVisor)");
    let n_mem = env_usize("ZCBOT_BENCH_RUNTIME_MEM_N", 20);
    let column = runtime_column(&executor, n_exec, n_cold, n_mem).await;
    results.insert("runtime".into(), column);

    // 12. Egress through the allowlist proxy vs direct.
    println!("\n12. egress: through the allowlist proxy vs direct");
    let n_egress = env_usize("ZCBOT_BENCH_EGRESS_N", 20);
    results.insert("egress".into(), egress_column(&b, n_egress).await);

    let _ = stop_tx.send(());
    let _ = served.await;
    pool.shutdown_all().await.unwrap();
    remove_network(&b.network).await;
    let _ = std::fs::remove_dir_all(&b.root);
    results.insert("took_s".into(), json!(started.elapsed().as_secs_f64()));
    println!("\nbench took {:.0} s", started.elapsed().as_secs_f64());
    if let Ok(path) = std::env::var("ZCBOT_BENCH_JSON") {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&Value::Object(results)).unwrap(),
        )
        .unwrap();
        println!("results: {path}");
    }
}

/// Busy CPU jiffies of the whole host (every core: user, nice, system, irq, softirq, steal).
fn host_busy_jiffies() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    f.iter().take(8).sum::<u64>() - f[3] - f[4]
}

/// Host CPU (in cores, from /proc/stat) over `secs` seconds of doing nothing here.
async fn host_cpu_over(secs: u64) -> f64 {
    let hz = 100.0; // USER_HZ
    let before = host_busy_jiffies();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    (host_busy_jiffies() - before) as f64 / hz / secs as f64
}

/// Scenario 11: warm spares (`ZCBOT_SPARES`) on a pool of their own, against `docker run -d` with
/// the same flags and against the cold path of `cold_ex` (spares off), interleaved; then 20 new
/// users at once with 20 spares vs with none; then the host memory and CPU of 20 spares, and of
/// 20 users' sandboxes running idle vs paused.
async fn spares_column(cold_ex: &Executor, b: &Bench, image_id: &str, n: usize) -> Value {
    let w = Bench::new("w", "runc");
    let mut cfg = w.config.clone();
    cfg.spares = 20;
    cfg.max_containers = 1000;
    let ex = Executor::from_config(cfg).await.unwrap();
    let pool = ex.pool().unwrap().clone();
    let cold_pool = cold_ex.pool().unwrap().clone();
    let wait_ready = |want: usize| {
        let pool = pool.clone();
        async move {
            let until = Instant::now() + Duration::from_secs(300);
            while pool.spares_ready() < want && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(pool.spares_ready() >= want, "spares did not come up");
        }
    };
    // Host memory and CPU with no spare, then with 20 (settled).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mem0 = mem_available_kib();
    let cpu0 = host_cpu_over(5).await;
    let t = Instant::now();
    let reaper = pool.spawn_reaper();
    wait_ready(20).await;
    let fill_s = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mem20 = mem_available_kib();
    let cpu20 = host_cpu_over(5).await;
    let mib_per_spare = (mem0.saturating_sub(mem20)) as f64 / 1024.0 / 20.0;
    println!("  20 spares made in {fill_s:.1} s; host memory {mib_per_spare:.1} MiB each; host CPU idle with 0: {cpu0:.3} cores, with 20 spares: {cpu20:.3} cores");

    // First call of a brand-new user: spare vs docker run -d vs the cold path, interleaved.
    let (mut spare, mut run, mut cold, mut claim) = (hist(), hist(), hist(), hist());
    for i in 0..n {
        // The claim alone: a new user's sandbox ready (ensure), no call yet.
        wait_ready(20).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let u = UserId::parse(&format!("claim{i}")).unwrap();
        let t = Instant::now();
        pool.ensure(&u).await.unwrap();
        record(&mut claim, t);
        pool.remove(&u).await.unwrap();
        wait_ready(20).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let u = UserId::parse(&format!("new{i}")).unwrap();
        let t = call_true(&ex, &u).await;
        record(&mut spare, t);
        pool.remove(&u).await.unwrap();
        let name = format!("zcbot-baseline-{}-s{i}", b.id);
        let t = Instant::now();
        assert!(docker_cli(
            &b.docker_run_args(&name, image_id)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        ));
        record(&mut run, t);
        docker_cli(&["rm", "-f", &name]);
        let u = UserId::parse(&format!("coldnew{i}")).unwrap();
        let t = call_true(cold_ex, &u).await;
        record(&mut cold, t);
        cold_pool.remove(&u).await.unwrap();
    }
    let claims = pool.stats().spare_claims;
    assert_eq!(
        claims as usize,
        2 * n,
        "every new user should have claimed a spare"
    );
    row(
        "claim: a new user's sandbox from a spare",
        &claim,
        Some(&run),
    );
    row(
        "first `true` of a new user, spare ready",
        &spare,
        Some(&run),
    );
    row(
        "first `true` of a new user, spare vs cold path",
        &spare,
        Some(&cold),
    );
    row(
        "cold path: first `true` of a new user, no spare",
        &cold,
        Some(&run),
    );
    row("baseline: docker run -d (CLI), same flags", &run, None);

    // 20 new users at once: 20 spares vs none.
    wait_ready(20).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (with, with_users) = burst(&ex, "burst").await;
    let (without, without_users) = burst(cold_ex, "coldburst").await;
    row("20 new users at once, 20 spares", &with, Some(&without));
    row("baseline: 20 new users at once, no spare", &without, None);

    // 20 users' sandboxes (the burst's, channels open) running idle vs paused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mem_running = mem_available_kib();
    let cpu_running = host_cpu_over(5).await;
    let paused = pool.pause_idle(Duration::ZERO).await.unwrap().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mem_paused = mem_available_kib();
    let cpu_paused = host_cpu_over(5).await;
    println!("  {paused} users' sandboxes (plus 20 spares) idle: host CPU running {cpu_running:.3} cores, paused {cpu_paused:.3}; MemAvailable running {} MiB, paused {} MiB", mem_running / 1024, mem_paused / 1024);

    drop(reaper);
    ex.close_channels();
    for u in &without_users {
        cold_pool.remove(u).await.unwrap();
    }
    drop(with_users);
    pool.shutdown_all().await.unwrap();
    zcbot_sandbox::pool::mounts::WorkspaceSlots::existing(&w.root.join("state"), &w.id)
        .release_all();
    remove_network(&w.network).await;
    let _ = std::fs::remove_dir_all(&w.root);
    json!({
        "claim": summary(&claim),
        "first_call_spare": summary(&spare),
        "first_call_cold": summary(&cold),
        "docker_run_baseline": summary(&run),
        "burst20_spares": summary(&with),
        "burst20_no_spares": summary(&without),
        "spares_fill_s": fill_s,
        "host_mib_per_spare": mib_per_spare,
        "host_cpu_cores_no_spares": cpu0,
        "host_cpu_cores_20_spares": cpu20,
        "idle_sandboxes": paused,
        "host_cpu_cores_idle_running": cpu_running,
        "host_cpu_cores_idle_paused": cpu_paused,
        "mem_available_kib_running": mem_running,
        "mem_available_kib_paused": mem_paused,
    })
}

/// 20 new users' first calls at once: each call's time from the common start.
async fn burst(ex: &Executor, prefix: &str) -> (Histogram<u64>, Vec<UserId>) {
    let users: Vec<UserId> = (0..20)
        .map(|i| UserId::parse(&format!("{prefix}{i}")).unwrap())
        .collect();
    let mut h = hist();
    let started = Instant::now();
    let outs = futures_util::future::join_all(users.iter().map(|u| async move {
        call_true(ex, u).await;
        started.elapsed()
    }))
    .await;
    for d in outs {
        h.record(d.as_micros().max(1) as u64).unwrap();
    }
    (h, users)
}

/// Makes a warm container for each of `users` as production holds it (one call made: its
/// channel open), 4 at a time. Returns the seconds that took and the host memory each container
/// costs (MemAvailable before and after, once the machine settled for 2 s), in MiB.
async fn open_warm(ex: &Arc<Executor>, users: &[UserId]) -> (f64, f64) {
    let before = mem_available_kib();
    let t = Instant::now();
    run_concurrent_once(4, users, |u| {
        let ex = ex.clone();
        async move {
            call_true(&ex, &u).await;
        }
    })
    .await;
    let took = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per = before.saturating_sub(mem_available_kib()) as f64 / users.len() as f64 / 1024.0;
    (took, per)
}

/// One call of `true` through `ex`; returns when it started, for the caller to time it.
async fn call_true(ex: &Executor, user: &UserId) -> Instant {
    call_argv(ex, user, &["true"]).await
}

/// One call of `argv` through `ex`, which must exit 0; returns when it started.
async fn call_argv(ex: &Executor, user: &UserId, argv: &[&str]) -> Instant {
    let t = Instant::now();
    let r = ex
        .run_argv(
            user,
            argv.iter().map(|a| a.to_string()).collect(),
            None,
            None,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(0), "{argv:?}: {r:?}");
    t
}

/// Scenario 7: the same warm calls, cold ensures and warm containers under runc (the pool of
/// the other scenarios) and under runsc (a second pool), interleaved, against `docker exec` under
/// runc. The issue's target: a warm channel call under runsc at most 1/3 of that `docker exec`.
/// Says so and records a skip when the engine has no runsc (scripts/register-runsc.sh).
async fn runtime_column(runc: &Arc<Executor>, n_exec: usize, n_cold: usize, n_mem: usize) -> Value {
    let rpool = runc.pool().unwrap();
    let known = rpool.engine().runtimes().await.unwrap();
    if !known.names.iter().any(|n| n == "runsc") {
        println!("  SKIPPED: the engine has no runtime \"runsc\"; scripts/register-runsc.sh registers it");
        return json!({ "skipped": "the engine has no runtime runsc" });
    }
    let g = Bench::new("g", "runsc");
    let gvisor = Arc::new(Executor::from_config(g.config.clone()).await.unwrap());
    let gpool = gvisor.pool().unwrap();
    let u = UserId::parse("rt0").unwrap();
    let rc = rpool.ensure(&u).await.unwrap().name;
    let gc = gpool.ensure(&u).await.unwrap().name;

    // Warm calls, six ways, interleaved call by call, each after the same settling pause.
    let labels = [
        "runc: channel, true",
        "runsc: channel, true",
        "runc: channel, python3 -c pass",
        "runsc: channel, python3 -c pass",
        "runsc: docker exec <container> true (CLI)",
        "baseline: runc, docker exec <container> true (CLI)",
    ];
    let mut h: Vec<Histogram<u64>> = labels.iter().map(|_| hist()).collect();
    for i in 0..(n_exec + 30) {
        for (k, h) in h.iter_mut().enumerate() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let t = match k {
                0 => call_argv(runc, &u, &["true"]).await,
                1 => call_argv(&gvisor, &u, &["true"]).await,
                2 => call_argv(runc, &u, &["python3", "-c", "pass"]).await,
                3 => call_argv(&gvisor, &u, &["python3", "-c", "pass"]).await,
                _ => {
                    let t = Instant::now();
                    assert!(docker_cli(&[
                        "exec",
                        if k == 4 { &gc } else { &rc },
                        "true"
                    ]));
                    t
                }
            };
            if i >= 30 {
                record(h, t);
            }
        }
    }
    let cli = &h[5];
    for (label, hh) in labels.iter().zip(&h) {
        row(label, hh, (!std::ptr::eq(hh, cli)).then_some(cli));
    }
    let frac = h[1].value_at_quantile(0.5) as f64 / cli.value_at_quantile(0.5) as f64;
    println!(
        "  warm channel call under runsc: 1/{:.1} of docker exec under runc (target: 1/3 or less: {})",
        1.0 / frac,
        if frac <= 1.0 / 3.0 { "met" } else { "MISSED" }
    );
    rpool.remove(&u).await.unwrap();
    gpool.remove(&u).await.unwrap();

    // Cold ensure, alternating runtimes.
    let (mut cold_runc, mut cold_runsc) = (hist(), hist());
    for i in 0..n_cold {
        let u = UserId::parse(&format!("rc{i}")).unwrap();
        for (pool, h) in [(rpool, &mut cold_runc), (gpool, &mut cold_runsc)] {
            let t = Instant::now();
            pool.ensure(&u).await.unwrap();
            record(h, t);
            pool.remove(&u).await.unwrap();
        }
    }
    row("cold ensure, runsc", &cold_runsc, Some(&cold_runc));
    row("cold ensure, runc", &cold_runc, None);

    // Host memory per warm container (channel open), n_mem of each, one runtime at a time.
    let mut mem = Vec::new();
    for (name, ex) in [("runc", runc), ("runsc", &gvisor)] {
        let users: Vec<UserId> = (0..n_mem)
            .map(|i| UserId::parse(&format!("rm{i}")).unwrap())
            .collect();
        let (_, per) = open_warm(ex, &users).await;
        println!("  host memory per warm container with its channel, {name}: {per:.1} MiB (MemAvailable, {n_mem} containers)");
        mem.push(per);
        for u in &users {
            ex.pool().unwrap().remove(u).await.unwrap();
        }
    }

    gpool.shutdown_all().await.unwrap();
    remove_network(&g.network).await;
    let _ = std::fs::remove_dir_all(&g.root);
    json!({
        "warm": {
            "runc_channel_true": summary(&h[0]), "runsc_channel_true": summary(&h[1]),
            "runc_channel_python": summary(&h[2]), "runsc_channel_python": summary(&h[3]),
            "runsc_cli_true": summary(&h[4]), "runc_cli_true_baseline": summary(&h[5]),
        },
        "runsc_channel_true_vs_runc_cli": frac,
        "cold_ensure": { "runc": summary(&cold_runc), "runsc": summary(&cold_runsc) },
        "host_mib_per_warm_container": { "containers": n_mem, "runc": mem[0], "runsc": mem[1] },
    })
}

fn h_ns(h: &mut Histogram<u64>, since: Instant) {
    h.record(since.elapsed().as_nanos().max(1) as u64).unwrap();
}

/// Runs 20 calls per user, `inflight` at a time. Returns (calls/s, p99 us, CPU s per 1000 calls),
/// CPU counting this process and the child processes it reaped (the CLI's docker processes).
async fn run_concurrent<F, Fut>(inflight: usize, users: &[UserId], call: F) -> (f64, u64, f64)
where
    F: Fn(UserId) -> Fut,
    Fut: std::future::Future<Output = Instant> + Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(inflight));
    let (s0, c0) = cpu_seconds();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for round in 0..20 {
        for u in users {
            let _ = round;
            let permit = sem.clone().acquire_owned().await.unwrap();
            let fut = call(u.clone());
            tasks.push(tokio::spawn(async move {
                let t = fut.await;
                drop(permit);
                t.elapsed()
            }));
        }
    }
    let mut h = hist();
    for t in tasks {
        h.record(t.await.unwrap().as_micros().max(1) as u64)
            .unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let (s1, c1) = cpu_seconds();
    let calls = h.len() as f64;
    (
        calls / secs,
        h.value_at_quantile(0.99),
        ((s1 - s0) + (c1 - c0)) / calls * 1000.0,
    )
}

async fn run_concurrent_once<F, Fut>(inflight: usize, users: &[UserId], call: F)
where
    F: Fn(UserId) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(inflight));
    let mut tasks = Vec::new();
    for u in users {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let fut = call(u.clone());
        tasks.push(tokio::spawn(async move {
            fut.await;
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// What one sample measures, in Python inside a container: the time to a tiny answer on a new
/// connection (setup: connect, request, first and only bytes), then a 10 MiB download. Prints
/// both, in seconds. `{opener}` is urllib's default (the proxy from the environment) or one
/// without a proxy; `{base}` is the site's URL.
const EGRESS_SAMPLE: &str = r#"
import time, urllib.request
opener = {opener}
t0 = time.perf_counter()
assert opener.open("{base}/small", timeout=30).read() == b"ok"
t1 = time.perf_counter()
n = len(opener.open("{base}/big", timeout=60).read())
t2 = time.perf_counter()
assert n == 10 << 20, n
print(t1 - t0, t2 - t1)
"#;

/// The site both paths fetch from: 2 bytes at /small, 10 MiB at /big, HTTP/1.1.
const EGRESS_SITE: &str = r#"
import http.server
BIG = b"x" * (10 << 20)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = BIG if self.path == "/big" else b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 80), H).serve_forever()
"#;

/// Scenario 12: a 10 MiB download and a connection's setup through the egress proxy (an
/// allowlist sandbox, by name) against the same from a container of the same image on the site's
/// own network with no proxy, interleaved sample by sample. The site is local (a container on a
/// test network), so the figures are the proxy's own cost, not the internet's.
async fn egress_column(b: &Bench, n: usize) -> Value {
    let net = format!("zcbb-{}-net", b.id);
    let site = format!("zcbb-{}-site", b.id);
    let direct = format!("zcbb-{}-direct", b.id);
    let image = b.config.image.clone();
    assert!(docker_cli(&[
        "network",
        "create",
        "--label",
        "io.zcbot.test=1",
        &net
    ]));
    assert!(docker_cli(&[
        "run",
        "-d",
        "--name",
        &site,
        "--network",
        &net,
        "--entrypoint",
        "python3",
        &image,
        "-c",
        EGRESS_SITE,
    ]));
    assert!(docker_cli(&[
        "run",
        "-d",
        "--name",
        &direct,
        "--network",
        &net,
        "--read-only",
        "--cap-drop",
        "ALL",
        "--entrypoint",
        "sleep",
        &image,
        "infinity",
    ]));
    let ip = String::from_utf8_lossy(
        &Command::new("docker")
            .args([
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                &site,
            ])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_owned();
    let e = Bench::new("e", "runc");
    let mut cfg = e.config.clone();
    cfg.egress = zcbot_sandbox::config::Egress::Allowlist;
    cfg.egress_allow = vec!["site.bench".parse().unwrap()];
    cfg.egress_network = net.clone();
    cfg.egress_resolve = vec![("site.bench".to_owned(), ip.parse().unwrap())];
    let ex = Executor::from_config(cfg).await.unwrap();
    let u = UserId::parse("eg0").unwrap();
    let proxied = EGRESS_SAMPLE
        .replace("{opener}", "urllib.request.build_opener()")
        .replace("{base}", "http://site.bench");
    let plain = EGRESS_SAMPLE
        .replace(
            "{opener}",
            "urllib.request.build_opener(urllib.request.ProxyHandler({}))",
        )
        .replace("{base}", &format!("http://{ip}"));
    let labels = [
        "proxy: setup",
        "direct: setup",
        "proxy: 10 MiB",
        "direct: 10 MiB",
    ];
    let mut h: Vec<Histogram<u64>> = labels.iter().map(|_| hist()).collect();
    let parse = |out: &str| -> (u64, u64) {
        let mut it = out.split_whitespace().map(|s| s.parse::<f64>().unwrap());
        let (s, d) = (it.next().unwrap(), it.next().unwrap());
        ((s * 1e6) as u64, (d * 1e6) as u64)
    };
    for i in 0..(n + 3) {
        let r = ex
            .run_argv(
                &u,
                vec!["python3".into(), "-c".into(), proxied.clone()],
                None,
                None,
                &CancellationToken::new(),
            )
            .await
            .unwrap();
        assert_eq!(r.exit_code, Some(0), "{r:?}");
        let (ps, pd) = parse(&r.stdout);
        let out = Command::new("docker")
            .args(["exec", &direct, "python3", "-c", &plain])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (ds, dd) = parse(&String::from_utf8_lossy(&out.stdout));
        if i >= 3 {
            for (k, v) in [ps, ds, pd, dd].into_iter().enumerate() {
                h[k].record(v.max(1)).unwrap();
            }
        }
    }
    row(labels[0], &h[0], Some(&h[1]));
    row(labels[1], &h[1], None);
    row(labels[2], &h[2], Some(&h[3]));
    row(labels[3], &h[3], None);
    let mib_s = |h: &Histogram<u64>| 10.0 / (h.value_at_quantile(0.5) as f64 / 1e6);
    println!(
        "  10 MiB at p50: {:.0} MiB/s through the proxy, {:.0} MiB/s direct ({n} samples each, interleaved)",
        mib_s(&h[2]),
        mib_s(&h[3])
    );
    let pool = ex.pool().unwrap();
    pool.shutdown_all().await.unwrap();
    docker_cli(&[
        "rm",
        "-f",
        &site,
        &direct,
        &zcbot_sandbox::pool::egress::proxy_name(&e.id),
    ]);
    remove_network(&e.network).await;
    docker_cli(&["network", "rm", &net]);
    let _ = std::fs::remove_dir_all(&e.root);
    json!({
        "samples": n,
        "proxy_setup_us": summary(&h[0]),
        "direct_setup_us": summary(&h[1]),
        "proxy_10mib_us": summary(&h[2]),
        "direct_10mib_us": summary(&h[3]),
        "proxy_mib_s_p50": mib_s(&h[2]),
        "direct_mib_s_p50": mib_s(&h[3]),
    })
}
