//! The seam between the docker backend's policy and the ways a call reaches a sandbox.
//!
//! A [`Transport`] runs one process call in the leased sandbox under the in-container supervisor
//! (`zcbot-supervise`): [`super::per_call::PerCallExec`] makes one engine exec per call,
//! [`super::channel::Channels`] multiplexes calls over one long-lived exec per container. Both stop
//! a call through [`super::stop`] and answer an [`Attempt`] the policy in
//! [`super::docker::DockerExecutor`] acts on (retry on a fresh container, fall back to per-call
//! exec). Helper execs (the supervisor's `--signal` and `--sweep` modes, the smoke checks) go
//! through [`run_collect`].

use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{base_env, ProcessOutcome, ProcessSpec};
use crate::engine::{Attached, Chunk, Engine, EngineError, ExecSpec, ExecStart, Op};
use crate::error::{Error, Result};
use crate::pool::Lease;

/// Where the image installs the supervisor.
pub const SUPERVISOR: &str = "/usr/local/bin/zcbot-supervise";
/// How long after a stop signal the supervisor may take before the daemon's harder fallbacks.
pub(crate) const STOP_MARGIN: Duration = Duration::from_secs(3);
/// The supervisor's own deadline lies this far past the call's: it only fires if the daemon is
/// gone (crashed), so the call's processes never outlive it by much.
pub(crate) const BACKSTOP: Duration = Duration::from_secs(2);

/// Why one attempt at a call produced no outcome.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// The container (this id) was gone or stopped before the call started: recreate, retry.
    Gone(String),
    /// The channel died before the call started: safe to run it again.
    NotStarted,
    /// This transport cannot serve the container now: use per-call exec.
    Fallback,
    /// Anything else: the call's error.
    Failed(Error),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Failed(e)
    }
}

/// One way of running a call in the leased sandbox. The transport holds the lease until the
/// call's processes are known dead (see [`super::stop::StopGuard`]).
pub(crate) trait Transport: Send + Sync {
    /// Runs `spec` in the lease's container.
    fn run<'a>(
        &'a self,
        lease: Lease,
        spec: &'a ProcessSpec,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, std::result::Result<ProcessOutcome, Attempt>>;
}

/// The start of a supervised command: the supervisor, the call's id, its deadline and the grace
/// its processes get between SIGTERM and SIGKILL. The caller adds options, `--` and the argv.
pub(crate) fn supervisor_command(call_id: &str, timeout: Duration, grace: Duration) -> Vec<String> {
    vec![
        SUPERVISOR.to_owned(),
        "--call-id".into(),
        call_id.to_owned(),
        "--timeout-ms".into(),
        timeout.as_millis().to_string(),
        "--grace-ms".into(),
        grace.as_millis().to_string(),
    ]
}

/// The call's working directory in the container, when it is not /workspace itself.
pub(crate) fn workdir_path(spec: &ProcessSpec) -> Option<String> {
    (!spec.workdir.is_empty()).then(|| format!("/workspace/{}", spec.workdir.join("/")))
}

/// The exec of `cmd` in /workspace as `user` (`uid:gid`) with exactly `env`.
pub(crate) fn exec_spec(cmd: Vec<String>, user: &str, env: Vec<String>, stdin: bool) -> ExecSpec {
    ExecSpec {
        cmd,
        user: user.to_owned(),
        env,
        workdir: "/workspace".to_owned(),
        stdin,
    }
}

/// What one short helper exec produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// The exit status the engine reported; None if it did not report one.
    pub exit_code: Option<i64>,
    /// Standard output, up to the cap.
    pub stdout: Vec<u8>,
    /// Standard error, up to the cap.
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// Standard output as text (lossy), trimmed.
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_owned()
    }

    /// Standard error as text (lossy), trimmed.
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_owned()
    }
}

/// What a helper exec found.
#[derive(Debug)]
pub enum Helper {
    /// It ran (whatever its exit status).
    Ran(ExecOutput),
    /// The container is not there or not running: nothing ran.
    ContainerGone,
}

impl Helper {
    /// What it printed, or an error saying `container` is not running.
    pub fn ran(self, container: &str) -> Result<ExecOutput> {
        match self {
            Helper::Ran(out) => Ok(out),
            Helper::ContainerGone => Err(Error::CallStart {
                container: container.to_owned(),
                reason: "the container is not there or not running".to_owned(),
            }),
        }
    }
}

/// Runs `zcbot-supervise --sweep` in `container` as `uid` (`uid:gid`): kills the orphans of
/// supervisors that died. True when it did, or when the container (and its processes) is gone.
pub(crate) async fn sweep(engine: &dyn Engine, container: &str, uid: &str) -> bool {
    let argv = [SUPERVISOR, "--sweep"];
    match run_collect(engine, container, uid, &argv, engine.timeout(), 4096).await {
        Ok(Helper::Ran(out)) => out.exit_code == Some(0),
        Ok(Helper::ContainerGone) => true,
        Err(_) => false,
    }
}

/// Runs a short, trusted helper command in `container` as `user` (`uid:gid`), collecting at most
/// `cap` bytes per stream, waiting at most `timeout`. Used for the supervisor's helper modes and
/// the smoke checks; it does not kill on timeout, so never use it for tool calls.
pub async fn run_collect(
    engine: &dyn Engine,
    container: &str,
    user: &str,
    argv: &[&str],
    timeout: Duration,
    cap: usize,
) -> Result<Helper> {
    let cmd = argv.iter().map(|s| s.to_string()).collect();
    let spec = exec_spec(cmd, user, base_env(&Default::default()), false);
    let Attached {
        id: exec_id,
        mut output,
        ..
    } = match engine.exec(container, spec).await? {
        ExecStart::Attached(a) => a,
        ExecStart::ContainerGone => return Ok(Helper::ContainerGone),
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let read = tokio::time::timeout(timeout, async {
        while let Some(item) = output.next().await {
            let (buf, bytes) = match item? {
                Chunk::Stderr(b) => (&mut stderr, b),
                Chunk::Stdout(b) => (&mut stdout, b),
            };
            let room = cap.saturating_sub(buf.len());
            buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
        Ok::<(), EngineError>(())
    })
    .await;
    match read {
        Err(_) => {
            return Err(EngineError::Timeout {
                op: Op::ReadExec,
                target: format!("{container} ({argv:?})"),
                after: timeout,
            }
            .into())
        }
        Ok(r) => r?,
    }
    let state = engine.exec_state(&exec_id).await?;
    Ok(Helper::Ran(ExecOutput {
        exit_code: state.and_then(|s| s.exit_code),
        stdout,
        stderr,
    }))
}
