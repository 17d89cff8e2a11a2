//! Warm exec latency of `true`: through the DockerExecutor (supervisor included) next to the
//! docker CLI's `docker exec <container> true`, interleaved call by call in the same run, on the
//! same warm container.
//!
//! Run: `cargo run --release --example exec_latency [N]` after scripts/build-image.sh. It uses its
//! own pool id, network and folders and removes them at the end. The transport is
//! `ZCBOT_EXEC_TRANSPORT` (default channel). With `ZCBOT_PROFILE_ONLY=1` it makes only the
//! library calls, back to back, for a system-wide profiler to watch (see BENCH.md).

use std::process::Command;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use zcbot_sandbox::config::Backend;
use zcbot_sandbox::exec::Executor;
use zcbot_sandbox::{Config, UserId};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(name: &str, mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let (p50, p90, p99) = (pct(&v, 0.5), pct(&v, 0.9), pct(&v, 0.99));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name:<40} n={:<4} p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms",
        v.len(),
        ms(p50),
        ms(p90),
        ms(p99)
    );
    (p50, p90)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let id = format!("lat{:x}", std::process::id());
    let root = std::env::temp_dir().join(format!("zcbot-{id}"));
    let network = format!("zcbt-{id}");
    let vars = [
        ("ZCBOT_POOL_ID", id.clone()),
        ("ZCBOT_SANDBOX_NETWORK", network.clone()),
        ("ZCBOT_USERS_ROOT", root.join("users").display().to_string()),
        ("ZCBOT_STATE_DIR", root.join("state").display().to_string()),
    ];
    let mut config = Config::from_lookup(|k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(k).ok())
    })?;
    config.backend = Backend::Docker;
    let executor = Executor::from_config(config).await?;
    let pool = executor.pool().expect("docker backend").clone();
    let user = UserId::parse("bench")?;
    let container = pool.ensure(&user).await?.name;
    let cancel = CancellationToken::new();
    let argv = || vec!["true".to_owned()];

    for _ in 0..20 {
        executor
            .run_argv(&user, argv(), None, None, &cancel)
            .await?;
        Command::new("docker")
            .args(["exec", &container, "true"])
            .output()?;
    }
    let transport = format!("{:?}", pool.config().transport).to_lowercase();
    if std::env::var("ZCBOT_PROFILE_ONLY").is_ok_and(|v| v == "1") {
        let mut ours = Vec::with_capacity(n);
        let started = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            executor
                .run_argv(&user, argv(), None, None, &cancel)
                .await?;
            ours.push(t.elapsed());
        }
        let took = started.elapsed();
        summary(&format!("DockerExecutor ({transport}), alone"), ours);
        println!("{n} calls in {:.2} s", took.as_secs_f64());
    } else {
        interleaved(&executor, &user, &container, &transport, n).await?;
    }

    pool.shutdown_all().await?;
    Command::new("docker")
        .args(["network", "rm", &network])
        .output()?;
    let _ = zcbot_sandbox::firewall::remove(&zcbot_sandbox::pool::network::bridge_name(&network));
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

async fn interleaved(
    executor: &Executor,
    user: &UserId,
    container: &str,
    transport: &str,
    n: usize,
) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let argv = || vec!["true".to_owned()];
    let (mut ours, mut cli) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        let r = executor.run_argv(user, argv(), None, None, &cancel).await?;
        ours.push(t.elapsed());
        anyhow::ensure!(r.exit_code == Some(0), "true failed: {r:?}");
        let t = Instant::now();
        let ok = Command::new("docker")
            .args(["exec", container, "true"])
            .output()?
            .status
            .success();
        cli.push(t.elapsed());
        anyhow::ensure!(ok, "docker exec failed");
    }
    println!("warm `true`, {n} calls each, interleaved, after 20 warm-up calls each\n");
    let (o50, o90) = summary(&format!("DockerExecutor ({transport})"), ours);
    let (c50, c90) = summary("docker exec <container> true (CLI)", cli);
    println!(
        "\nratio DockerExecutor / docker CLI: p50 {:.2}, p90 {:.2}",
        o50.as_secs_f64() / c50.as_secs_f64(),
        o90.as_secs_f64() / c90.as_secs_f64()
    );
    Ok(())
}
