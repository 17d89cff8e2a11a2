//! Running a command inside a sandbox through the Docker exec API.
//!
//! This is the primitive the smoke check uses: one exec as a named user, output collected up to a
//! cap, the exit status read from `inspect_exec` (never parsed from output), the whole bounded by a
//! deadline. The full tool executor (timeouts that kill whole process trees, cancel, host backend)
//! builds on it.

use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecResults};
use futures_util::StreamExt;

use crate::docker::Docker;
use crate::error::{Error, Result};

/// The environment every exec starts from: nothing of the host's leaks in.
pub const BASE_ENV: &[&str] = &[
    "PATH=/usr/local/bin:/usr/bin:/bin",
    "HOME=/workspace",
    "LANG=C.UTF-8",
];

/// What one exec produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// The exit status from `inspect_exec`; None if Docker did not report one.
    pub exit_code: Option<i64>,
    /// Standard output, up to the cap.
    pub stdout: Vec<u8>,
    /// Standard error, up to the cap.
    pub stderr: Vec<u8>,
}

impl Captured {
    /// Standard output as text (lossy), trimmed.
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_owned()
    }

    /// Standard error as text (lossy), trimmed.
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_owned()
    }
}

/// Runs `argv` in `container` as `user` (`uid:gid`), collecting at most `cap` bytes per stream,
/// and waits at most `timeout` for it to finish. On timeout the process is *not* killed here:
/// use this only for short, trusted commands.
pub async fn run_collect(
    docker: &Docker,
    container: &str,
    user: &str,
    argv: &[&str],
    timeout: Duration,
    cap: usize,
) -> Result<Captured> {
    let raw = docker.raw();
    let created = docker
        .call(
            || format!("create an exec in {container}"),
            raw.create_exec(
                container,
                CreateExecOptions {
                    cmd: Some(argv.iter().map(|s| s.to_string()).collect()),
                    user: Some(user.to_owned()),
                    env: Some(BASE_ENV.iter().map(|s| s.to_string()).collect()),
                    working_dir: Some("/workspace".to_owned()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            ),
        )
        .await?;
    let started = docker
        .call(
            || format!("start an exec in {container}"),
            raw.start_exec(&created.id, None),
        )
        .await?;
    let StartExecResults::Attached { mut output, .. } = started else {
        return Err(Error::Docker {
            op: format!("attach to an exec in {container}"),
            source: bollard::errors::Error::DockerStreamError {
                error: "the engine started the exec detached".to_owned(),
            },
        });
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let read = tokio::time::timeout(timeout, async {
        while let Some(item) = output.next().await {
            let item =
                item.map_err(|e| docker.classify(format!("read an exec in {container}"), e))?;
            let (buf, bytes) = match item {
                bollard::container::LogOutput::StdErr { message } => (&mut stderr, message),
                other => (&mut stdout, other.into_bytes()),
            };
            let room = cap.saturating_sub(buf.len());
            buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
        Ok::<(), Error>(())
    })
    .await;
    match read {
        Err(_) => {
            return Err(Error::DockerTimeout {
                op: format!("the exec {argv:?} in {container}"),
                after: timeout,
            })
        }
        Ok(r) => r?,
    }
    let inspected = docker
        .call(
            || format!("inspect an exec in {container}"),
            raw.inspect_exec(&created.id),
        )
        .await?;
    Ok(Captured {
        exit_code: inspected.exit_code,
        stdout,
        stderr,
    })
}
