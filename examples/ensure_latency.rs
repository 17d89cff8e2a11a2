//! Measures cold `ensure` (create + start + rules in place) and warm `ensure` (already running),
//! with a baseline measured in the same run, interleaved: a `docker run -d` with the same
//! hardening flags (what a CLI-driven sandbox pays), timed until the container reports running.
//!
//! Run: `cargo run --release --example ensure_latency [COLD_N] [WARM_N]` (scripts/test.sh builds
//! the image first). It uses its own pool id, network and folders and removes them at the end.

use std::process::Command;
use std::time::{Duration, Instant};

use zcbot_sandbox::{Config, SandboxPool, UserId};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(name: &str, mut v: Vec<Duration>) -> Duration {
    v.sort();
    let (p50, p90) = (pct(&v, 0.5), pct(&v, 0.9));
    println!(
        "{name:<44} n={:<5} p50 {:>12.1} us   p90 {:>12.1} us",
        v.len(),
        p50.as_secs_f64() * 1e6,
        p90.as_secs_f64() * 1e6
    );
    p50
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let cold_n = args.first().copied().unwrap_or(20);
    let warm_n = args.get(1).copied().unwrap_or(10_000);
    let id = format!("bench{:x}", std::process::id());
    let root = std::env::temp_dir().join(format!("zcbot-{id}"));
    let network = format!("zcbt-{id}");
    let vars = [
        ("ZCBOT_POOL_ID", id.clone()),
        ("ZCBOT_SANDBOX_NETWORK", network.clone()),
        ("ZCBOT_USERS_ROOT", root.join("users").display().to_string()),
        ("ZCBOT_STATE_DIR", root.join("state").display().to_string()),
        ("ZCBOT_SANDBOX_MAX", "1000".to_owned()),
    ];
    let config = Config::from_lookup(|k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(k).ok())
    })?;
    let image = config.image.clone();
    let pool = SandboxPool::connect(config).await?;
    println!(
        "engine API {}, image {}",
        pool.engine().api_version(),
        image
    );

    let baseline_dir = root.join("baseline");
    std::fs::create_dir_all(&baseline_dir)?;
    let mut cold = Vec::new();
    let mut cli = Vec::new();
    for i in 0..cold_n {
        let user = UserId::parse(&format!("u{i}"))?;
        let t = Instant::now();
        pool.ensure(&user).await?;
        cold.push(t.elapsed());

        let name = format!("zcbot-baseline-{id}-{i}");
        let t = Instant::now();
        let ok = Command::new("docker")
            .args(["run", "-d", "--name", &name, "--read-only", "--tmpfs"])
            .arg("/tmp:rw,nosuid,nodev,size=67108864,mode=1777")
            .args(["--cap-drop", "ALL", "--cap-add", "NET_ADMIN"])
            .args([
                "--security-opt",
                "no-new-privileges:true",
                "--pids-limit",
                "128",
            ])
            .args([
                "-m",
                "512m",
                "--memory-swap",
                "512m",
                "--cpus",
                "1",
                "--ipc",
                "private",
            ])
            .args(["--network", &network, "-v"])
            .arg(format!("{}:/workspace", baseline_dir.display()))
            .args([&image, "--egress", "none"])
            .output()?
            .status
            .success();
        cli.push(t.elapsed());
        anyhow::ensure!(ok, "baseline docker run failed");
        Command::new("docker").args(["rm", "-f", &name]).output()?;
    }

    let user = UserId::parse("u0")?;
    let mut warm = Vec::with_capacity(warm_n);
    for _ in 0..warm_n {
        let t = Instant::now();
        pool.ensure(&user).await?;
        warm.push(t.elapsed());
    }

    println!();
    let c = summary("cold ensure (create+start+rules ready)", cold);
    let b = summary("baseline: docker run -d, same flags (CLI)", cli);
    let w = summary("warm ensure (running, in memory)", warm);
    println!();
    println!(
        "cold ensure / docker run -d : {:.2}",
        c.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "warm ensure / docker run -d : {:.6}",
        w.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "warm ensure Docker round trips: 0 (stats: {:?})",
        pool.stats()
    );

    pool.shutdown_all().await?;
    Command::new("docker")
        .args(["network", "rm", &network])
        .output()?;
    let _ = zcbot_sandbox::firewall::remove(&zcbot_sandbox::pool::network::bridge_name(&network));
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
