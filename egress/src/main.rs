//! `zcbot-egress`: the allowlist egress proxy. Configuration in `ZCBOT_EGRESS_CONFIG` (JSON),
//! commands on stdin, reports on stdout, errors on stderr. See the library's documentation.

use std::process::ExitCode;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use zcbot_egress::protocol::{ProxyConfig, Report};
use zcbot_egress::proxy::{Dns, Proxy, ReportSink};

const USAGE: &str = "\
usage: zcbot-egress

The allowlist egress proxy of zcbot sandboxes.
  configuration  ZCBOT_EGRESS_CONFIG: one JSON object (ProxyConfig; `{}` for the defaults)
  stdin          commands, one JSON object per line (reset / set / drop)
  stdout         reports, one JSON object per line (ready / ack / error / conn / dropped)
Exit status: 0 on SIGTERM/SIGINT, 1 on a runtime failure, 2 on a bad configuration.
";

/// Capacity of the report channel (reports waiting for stdout).
const REPORT_QUEUE: usize = 4096;

/// Descriptors for every user's connections (two each): the soft limit up to the hard one,
/// whatever the engine's default soft limit is.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn main() -> ExitCode {
    raise_open_file_limit();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if let Some(a) = args.first() {
        eprintln!("zcbot-egress: unexpected argument {a:?}\n{USAGE}");
        return ExitCode::from(2);
    }
    let raw = match std::env::var("ZCBOT_EGRESS_CONFIG") {
        Ok(s) => s,
        Err(_) => {
            eprintln!(
                "zcbot-egress: ZCBOT_EGRESS_CONFIG is not set (a JSON object; `{{}}` for the defaults)"
            );
            return ExitCode::from(2);
        }
    };
    let config = match ProxyConfig::from_json(&raw) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("zcbot-egress: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zcbot-egress: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(run(config));
    // Exit at once: the blocking stdin reader would hold up a runtime shutdown.
    std::process::exit(code);
}

async fn run(config: ProxyConfig) -> i32 {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("zcbot-egress: cannot install signal handlers");
            return 1;
        }
    };
    let (sink, rx) = ReportSink::channel(REPORT_QUEUE);
    tokio::spawn(write_reports(rx));
    let proxy = match Proxy::new(config.clone(), sink.clone(), Dns::System) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("zcbot-egress: {e}");
            return 1;
        }
    };
    let listener = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("zcbot-egress: cannot listen on {}: {e}", config.listen);
            return 1;
        }
    };
    let listen = listener.local_addr().unwrap_or(config.listen);
    sink.report_reliably(Report::Ready { listen }).await;
    let control = proxy.clone();
    tokio::spawn(async move { control.control(tokio::io::stdin()).await });
    tokio::select! {
        _ = proxy.serve(listener) => 1,
        _ = term.recv() => 0,
        _ = int.recv() => 0,
    }
}

/// The one writer of stdout, so lines never interleave. If stdout fails (the daemon went
/// away), reports are drained and lost.
async fn write_reports(mut rx: mpsc::Receiver<Report>) {
    let mut out = tokio::io::stdout();
    while let Some(r) = rx.recv().await {
        let Ok(mut line) = serde_json::to_vec(&r) else {
            continue;
        };
        line.push(b'\n');
        if out.write_all(&line).await.is_ok() {
            let _ = out.flush().await;
        }
    }
}
