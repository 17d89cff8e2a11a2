//! The `zcbot-sandbox` binary: parses the command line and hands off to `cli`.

use std::process::ExitCode;

mod cli;

/// A walk of a tenant's tree holds one descriptor per level (file calls on several workers at
/// once, a migration, every connection): take the soft limit up to the hard one, as servers do.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = cli::Cli::parse_with_settings();
    cli::init_logging(&args);
    raise_open_file_limit();
    match cli::run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
