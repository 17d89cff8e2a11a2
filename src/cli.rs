//! Subcommand handlers: parse, call the library, render. No logic of their own.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use zcbot_sandbox::exec::{Executor, ToolCall, ToolResult};
use zcbot_sandbox::server::{ServeOptions, Server};
use zcbot_sandbox::{smoke, Config, SandboxPool, UserId};

/// One long-lived, hardened Docker container per chat-agent user.
///
/// Every setting comes from ZCBOT_* environment variables (see RUN.md); `serve` also takes each
/// one as a flag (`serve --help`).
#[derive(Parser, Debug)]
#[command(name = "zcbot-sandbox", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The whole parse, for the settings `serve` was given as flags.
    #[arg(skip)]
    matches: ArgMatches,
}

impl Cli {
    /// Parses the command line, with every setting added to `serve` as a flag (exits with clap's
    /// usage message on a bad command line, as `Parser::parse` does).
    pub fn parse_with_settings() -> Self {
        let matches = Cli::command()
            .mut_subcommand("serve", Config::flags)
            .get_matches();
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        cli.matches = matches;
        cli
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: the HTTP API on ZCBOT_LISTEN (default 127.0.0.1:8787) or a unix socket.
    /// SIGTERM/SIGINT: stop accepting, let calls finish for ZCBOT_SHUTDOWN_GRACE, cancel the rest.
    /// Every setting is also a flag here, which wins over its variable.
    Serve {
        /// Remove every sandbox of the pool on exit (default: keep them warm for the next start).
        #[arg(long)]
        remove_on_exit: bool,
    },
    /// The host firewall for the sandbox network: up (install or repair), down (remove), status.
    Net {
        /// up, down or status.
        #[arg(value_parser = ["up", "down", "status"])]
        action: String,
    },
    /// List this pool's sandboxes: user, container, state, idle time, config current or stale.
    Ps {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make sure a user's sandbox runs (create, start or recreate it as needed).
    Ensure {
        /// The user id.
        #[arg(long)]
        user: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove one user's sandbox (--user U), or every sandbox of this pool (--all).
    #[command(group(clap::ArgGroup::new("which").required(true).args(["user", "all"])))]
    Rm {
        /// The user whose sandbox to remove.
        #[arg(long)]
        user: Option<String>,
        /// Remove every sandbox of this pool.
        #[arg(long)]
        all: bool,
    },
    /// Tear the pool down: remove its sandboxes (any state), its network if the pool made it,
    /// and that network's host firewall chains. Stop the pool's daemon first (it would make them
    /// again for the next call).
    Down,
    /// Remove sandboxes idle longer than --idle (default ZCBOT_SANDBOX_IDLE). Calls in flight in a
    /// running daemon are invisible here: while a daemon serves the pool, use its API instead.
    Reap {
        /// Idle time: seconds (90) or with a unit (90s, 5m).
        #[arg(long, value_parser = zcbot_sandbox::config::parse_duration)]
        idle: Option<Duration>,
    },
    /// Run a command for a user through the configured backend (ZCBOT_SANDBOX_BACKEND), as that
    /// argument vector with no shell around it. Prints the streams and exits with the command's
    /// status (124 on timeout).
    Exec {
        /// The user id.
        #[arg(long)]
        user: String,
        /// Timeout: seconds (30) or with a unit (30s, 2m) (default ZCBOT_EXEC_TIMEOUT).
        #[arg(long, value_parser = zcbot_sandbox::config::parse_duration)]
        timeout: Option<Duration>,
        /// Working directory under /workspace.
        #[arg(long)]
        workdir: Option<String>,
        /// Print the result as JSON instead of the streams.
        #[arg(long)]
        json: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Run a Python program for a user (FILE, or - for stdin) through the configured backend.
    Python {
        /// The user id.
        #[arg(long)]
        user: String,
        /// Timeout: seconds (30) or with a unit (30s, 2m) (default ZCBOT_EXEC_TIMEOUT).
        #[arg(long, value_parser = zcbot_sandbox::config::parse_duration)]
        timeout: Option<Duration>,
        /// Print the result as JSON instead of the streams.
        #[arg(long)]
        json: bool,
        /// The program file, or - to read it from stdin.
        file: String,
    },
    /// Print the seccomp profile sandboxes get (Docker's JSON): to review it, or to try a
    /// program under it with `docker run --security-opt seccomp=FILE`.
    Seccomp {
        /// The profile for ZCBOT_CONTAINER_RULES=entry (the entry may open netfilter sockets).
        #[arg(long)]
        entry_rules: bool,
        /// The profile for this runtime: runc or runsc (default ZCBOT_SANDBOX_RUNTIME).
        #[arg(long, value_parser = ["runc", "runsc"])]
        runtime: Option<String>,
    },
    /// Check a live sandbox: image, non-root, read-only root, egress rules, blocked addresses,
    /// removal. One PASS/FAIL line per check; exits non-zero on any FAIL.
    Smoke {
        /// The user id to run the check as (its sandbox is removed at the end).
        #[arg(long, default_value = "zcbot-smoke")]
        user: String,
    },
}

/// Logs go to stderr: human format on a terminal, JSON with ZCBOT_LOG_FORMAT=json; RUST_LOG filters.
/// The daemon logs at info by default; a one-shot command at warn, since its output is the
/// answer and an info line per step is noise there.
pub fn init_logging(cli: &Cli) {
    let default = match cli.command {
        Command::Serve { .. } => "zcbot_sandbox=info",
        _ => "zcbot_sandbox=warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("ZCBOT_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

async fn pool() -> Result<SandboxPool> {
    let config = Config::from_env()?;
    Ok(SandboxPool::connect_guest(config).await?)
}

/// Runs one subcommand; the exit code says how it went.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve { remove_on_exit } => {
            let config = match cli.matches.subcommand_matches("serve") {
                Some(flags) => Config::from_env_and_flags(flags)?,
                None => Config::from_env()?,
            };
            let backend = config.backend;
            let server = Server::start(config, ServeOptions { remove_on_exit }).await?;
            let address = server.address();
            // Best effort: a closed stdout must never take the daemon down.
            use std::io::Write;
            let mut out = std::io::stdout();
            let _ = writeln!(
                out,
                "zcbot-sandbox: listening on {address} (backend {backend:?})"
            );
            let _ = match address.strip_prefix("unix:") {
                Some(path) => writeln!(
                    out,
                    "try: curl --unix-socket {path} -s http://x/v1/users/demo/tools/shell -d '{{\"command\":\"id\"}}'"
                ),
                None => writeln!(
                    out,
                    "try: curl -s {address}/v1/users/demo/tools/shell -d '{{\"command\":\"id\"}}'"
                ),
            };
            let _ = out.flush();
            server.run(shutdown_signal()).await?;
        }
        Command::Seccomp {
            entry_rules,
            runtime,
        } => {
            let runtime = match runtime.as_deref() {
                Some("runsc") => zcbot_sandbox::config::Runtime::Runsc,
                Some(_) => zcbot_sandbox::config::Runtime::Runc,
                None => Config::from_env()?.runtime,
            };
            let netfilter = if entry_rules {
                zcbot_sandbox::seccomp::Netfilter::ForEntry
            } else {
                zcbot_sandbox::seccomp::Netfilter::Refused
            };
            let profile = zcbot_sandbox::seccomp::profile(netfilter, runtime);
            println!(
                "{}",
                serde_json::to_string_pretty(&profile).expect("a JSON value always prints")
            );
        }
        Command::Net { action } => {
            let config = Config::from_env()?;
            let network = config.network_name();
            let bridge = zcbot_sandbox::pool::network::bridge_name(&network);
            let outcome = match action.as_str() {
                "up" => {
                    let blocked = zcbot_sandbox::pool::spec::blocklist(
                        &config,
                        &zcbot_sandbox::pool::spec::host_addresses(),
                    );
                    let proxy = match config.egress {
                        zcbot_sandbox::config::Egress::Allowlist => {
                            Some(zcbot_sandbox::pool::egress::running_proxy(&config).await?)
                        }
                        _ => None,
                    };
                    zcbot_sandbox::firewall::install(&bridge, config.egress, &blocked, proxy)
                        .map(|_| "installed")
                }
                "down" => zcbot_sandbox::firewall::remove(&bridge).map(|_| "removed"),
                _ => zcbot_sandbox::firewall::check(&bridge).map(|_| "in place"),
            };
            match outcome {
                Ok(what) => println!("host firewall for {network} ({bridge}): {what}"),
                Err(e) => bail!("host firewall for {network} ({bridge}): {e}"),
            }
        }
        Command::Ps { json } => {
            let pool = pool().await?;
            let list = pool.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("host firewall: {}", pool.host_firewall());
                println!("container rules: {}", pool.rules_mode());
                println!(
                    "{:<24} {:<14} {:<10} {:>10} {:>9}  CONFIG",
                    "USER", "CONTAINER", "STATE", "IDLE", "IN_FLIGHT"
                );
                for s in list {
                    println!(
                        "{:<24} {:<14} {:<10} {:>10} {:>9}  {}",
                        if s.spare { "(spare)" } else { &s.user },
                        &s.container_id[..s.container_id.len().min(12)],
                        s.state,
                        humantime::format_duration(Duration::from_secs(s.idle_secs)).to_string(),
                        s.in_flight,
                        if s.config_current { "current" } else { "stale" }
                    );
                }
            }
        }
        Command::Ensure { user, json } => {
            let user = UserId::parse(&user)?;
            let started = std::time::Instant::now();
            let sandbox = pool().await?.ensure(&user).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sandbox)?);
            } else {
                println!(
                    "{} running ({}) for user {} [{} ms]",
                    sandbox.name,
                    &sandbox.container_id[..12.min(sandbox.container_id.len())],
                    sandbox.user,
                    started.elapsed().as_millis()
                );
            }
        }
        Command::Rm { user, all } => {
            let pool = pool().await?;
            if all {
                let n = pool.shutdown_all().await?;
                println!("removed {n} sandbox(es)");
            } else if let Some(user) = user {
                let user = UserId::parse(&user)?;
                if pool
                    .remove_by(&user, zcbot_sandbox::pool::Remover::Operator)
                    .await?
                {
                    println!("removed {}", pool.container_name(&user));
                } else {
                    println!("{} had no sandbox", user);
                }
            } else {
                bail!("say --user U or --all");
            }
        }
        Command::Down => {
            let config = Config::from_env()?;
            let report = zcbot_sandbox::pool::down::down(&config).await?;
            println!(
                "removed {} sandbox(es) of pool {}",
                report.containers, config.pool_id
            );
            for line in report.lines {
                println!("{line}");
            }
        }
        Command::Reap { idle } => {
            let pool = pool().await?;
            let idle = idle.unwrap_or(pool.config().idle);
            pool.adopt_running().await?;
            let reaped = pool.reap_idle(idle).await?;
            println!(
                "reaped {} sandbox(es) idle longer than {}{}",
                reaped.len(),
                humantime::format_duration(idle),
                if reaped.is_empty() {
                    String::new()
                } else {
                    format!(": {}", reaped.join(", "))
                }
            );
        }
        Command::Exec {
            user,
            timeout,
            workdir,
            json,
            argv,
        } => {
            let user = UserId::parse(&user)?;
            let config = Config::from_env()?;
            warn_if_host_backend(&config);
            let executor = Executor::guest(config).await?;
            let result = with_ctrl_c(|cancel| async move {
                executor
                    .run_argv(&user, argv, timeout, workdir, &cancel)
                    .await
            })
            .await?;
            return Ok(render(&result, json));
        }
        Command::Python {
            user,
            timeout,
            json,
            file,
        } => {
            let user = UserId::parse(&user)?;
            let code = if file == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
            };
            let mut args = serde_json::json!({ "code": code });
            if let Some(t) = timeout {
                args["timeout"] = serde_json::json!(t.as_secs_f64());
            }
            let call = ToolCall::parse("run_python", args)?;
            let config = Config::from_env()?;
            warn_if_host_backend(&config);
            let executor = Executor::guest(config).await?;
            let result =
                with_ctrl_c(|cancel| async move { executor.run(&user, call, &cancel).await })
                    .await?;
            return Ok(render(&result, json));
        }
        Command::Smoke { user } => {
            let user = UserId::parse(&user)?;
            let pool = match pool().await {
                Ok(p) => p,
                Err(e) => {
                    println!("FAIL setup: {e:#}");
                    return Ok(ExitCode::from(1));
                }
            };
            let checks = smoke::run(&pool, &user, |c| println!("{c}")).await;
            let failed = checks.iter().filter(|c| !c.passed()).count();
            println!("{} passed, {} failed", checks.len() - failed, failed);
            if failed > 0 {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `exec` and `python` on the host backend (the default) run the command right here, as whoever
/// runs the CLI (often root): a user who expected a sandbox must not learn that from its effects.
fn warn_if_host_backend(config: &Config) {
    if config.backend != zcbot_sandbox::config::Backend::Host {
        return;
    }
    let uid = nix::unistd::geteuid();
    let who = if uid.is_root() {
        "root".to_owned()
    } else {
        format!("uid {uid}")
    };
    eprintln!(
        "zcbot-sandbox: WARNING: ZCBOT_SANDBOX_BACKEND is host (the default when unset): this runs \
         on this host as {who}, NOT isolated (development only). Set ZCBOT_SANDBOX_BACKEND=docker \
         to run it in the user's sandbox."
    );
}

/// Runs `f` with a token that Ctrl-C cancels (the call's processes are killed, not orphaned).
async fn with_ctrl_c<F, Fut, T>(f: F) -> T
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let watcher = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            trigger.cancel();
        }
    });
    let out = f(cancel).await;
    watcher.abort();
    out
}

/// Prints a result and picks the exit code: the command's, 124 on timeout, 130 when cancelled.
fn render(result: &ToolResult, json: bool) -> ExitCode {
    use std::io::Write;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(result).unwrap_or_default()
        );
    } else {
        let out = std::io::stdout();
        let mut out = out.lock();
        let _ = out.write_all(result.stdout.as_bytes());
        let _ = out.flush();
        let _ = std::io::stderr().write_all(result.stderr.as_bytes());
        if result.timed_out {
            eprintln!(
                "zcbot-sandbox: timed out after {} ms; its processes were killed",
                result.duration_ms
            );
        }
    }
    let code = if result.timed_out {
        124
    } else if result.cancelled {
        130
    } else {
        result.exit_code.unwrap_or(1).clamp(0, 255)
    };
    ExitCode::from(code as u8)
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
