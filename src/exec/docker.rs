//! The docker backend: every process call runs under the in-container supervisor
//! (`zcbot-supervise`) as the sandbox uid, reached by one of two transports
//! (`ZCBOT_EXEC_TRANSPORT`): over the user's persistent channel ([`super::channel`], the
//! default), or by one Docker exec per call (this module; also the channel's fallback).
//!
//! Docker has no API to kill an exec, and dropping the attached stream does not stop it. So a
//! call is stopped by signalling its supervisor, which kills the call's whole subtree (setsid and
//! double-fork escapes re-parent to it: it is a child subreaper):
//! - as root on the host: by the supervisor's host PID from `inspect_exec`, through a pidfd, after
//!   checking that the process's command line names this call (so a PID from another namespace or
//!   a recycled PID is never signalled);
//! - otherwise: by a second exec, `zcbot-supervise --signal CALL_ID`, as the sandbox uid.
//!
//! If the supervisor itself dies (the sandbox user can kill it: same uid), its orphans re-parent
//! to the container's init, and `zcbot-supervise --sweep` kills exactly those: every live call's
//! processes descend from a live supervisor. If even that fails, the container is recycled.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::channel::{ChannelAttempt, Channels, Unusable};
use super::file_calls::FileRunner;
use super::metrics::TransportStats;
use super::output::Capture;
use super::{base_env, new_call_id, ProcessOutcome, ProcessSpec};
use crate::config::Transport;
use crate::docker::Docker;
use crate::error::{Error, Result};
use crate::pool::{Lease, SandboxPool};
use crate::user::UserId;

/// Where the image installs the supervisor.
pub const SUPERVISOR: &str = "/usr/local/bin/zcbot-supervise";
/// How long after a stop signal the supervisor may take before the daemon's harder fallbacks.
pub(crate) const STOP_MARGIN: Duration = Duration::from_secs(3);
/// The supervisor's own deadline lies this far past the call's: it only fires if the daemon is
/// gone (crashed), so the call's processes never outlive it by much.
pub(crate) const BACKSTOP: Duration = Duration::from_secs(2);

/// Runs process calls in each user's sandbox.
pub struct DockerExecutor {
    pool: SandboxPool,
    files: FileRunner,
    transport: Transport,
    channels: Channels,
    stats: Arc<TransportStats>,
}

impl DockerExecutor {
    /// An executor on `pool`, with the pool's configured transport.
    pub fn new(pool: SandboxPool) -> Self {
        let stats = Arc::new(TransportStats::default());
        let cfg = pool.config();
        DockerExecutor {
            files: FileRunner::new(cfg.file_workers, cfg.file_timeout, cfg.file_max_entries),
            transport: cfg.transport,
            pool,
            channels: Channels::new(stats.clone()),
            stats,
        }
    }

    /// The configured transport.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// What the transports did (channel opens, deaths, fallbacks, latency per transport).
    pub fn stats(&self) -> &TransportStats {
        &self.stats
    }

    /// Closes every exec channel: each helper stops its calls and exits. For shutdown.
    pub fn close_channels(&self) {
        self.channels.close_all();
    }

    /// The pool it runs in.
    pub fn pool(&self) -> &SandboxPool {
        &self.pool
    }

    /// Where its file calls run.
    pub fn files(&self) -> &FileRunner {
        &self.files
    }

    /// Runs `spec` in `user`'s sandbox. If the container vanished or stopped behind the pool's
    /// back, the pool forgets it and the call runs once more on a fresh one. Over the channel, a
    /// call the channel lost before it started runs once more on a new channel, then by per-call
    /// exec.
    pub(crate) async fn run(
        &self,
        user: &UserId,
        spec: ProcessSpec,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome> {
        let started = std::time::Instant::now();
        let mut retried = false;
        let mut not_started = 0;
        loop {
            let lease = self.pool.lease(user).await?;
            // Host rules mode: a container restarted behind the pool's back has a fresh network
            // namespace without rules. One readlink tells; the retry re-installs them.
            let attempt = if !self.pool.rules_intact(lease.sandbox()) {
                tracing::warn!(container = %lease.sandbox().name, "the sandbox's network namespace changed (restarted?): re-installing its rules");
                Err(Attempt::Gone(lease.sandbox().container_id.clone()))
            } else if self.transport == Transport::Channel && not_started < 2 {
                match self.channels.get(&self.pool, &lease).await {
                    Ok(ch) => match ch.run(lease, &spec, cancel).await {
                        Ok(outcome) => {
                            self.stats.observe(true, started.elapsed());
                            return Ok(outcome);
                        }
                        Err(ChannelAttempt::Failed(e)) => return Err(e),
                        Err(ChannelAttempt::NotStarted) => {
                            // Twice: this container's channel keeps dying before calls start.
                            not_started += 1;
                            if not_started == 2 {
                                let lease = self.pool.lease(user).await?;
                                self.channels.back_off(&lease).await;
                            }
                            continue;
                        }
                    },
                    Err(Unusable::Gone(id)) => Err(Attempt::Gone(id)),
                    Err(Unusable::Fallback) => {
                        self.stats.fallbacks.inc();
                        self.run_once(lease, &spec, cancel).await
                    }
                }
            } else {
                if self.transport == Transport::Channel {
                    self.stats.fallbacks.inc();
                }
                self.run_once(lease, &spec, cancel).await
            };
            match attempt {
                Err(Attempt::Gone(container_id)) if !retried => {
                    tracing::info!(user = %user, "sandbox vanished behind the pool's back: recreating and retrying once");
                    self.pool.invalidate(user, &container_id);
                    retried = true;
                }
                Err(Attempt::Gone(_)) => {
                    return Err(Error::SandboxStart {
                        user: user.to_string(),
                        container: self.pool.container_name(user),
                        reason: "it vanished again right after being recreated".into(),
                        log: String::new(),
                    })
                }
                Err(Attempt::Failed(e)) => return Err(e),
                Ok(outcome) => {
                    self.stats.observe(false, started.elapsed());
                    return Ok(outcome);
                }
            }
        }
    }

    async fn run_once(
        &self,
        lease: Lease,
        spec: &ProcessSpec,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, Attempt> {
        let docker = self.pool.docker().clone();
        let cfg = self.pool.config();
        let container = lease.sandbox().name.clone();
        let container_id = lease.sandbox().container_id.clone();
        let call_id = new_call_id();
        let uid = format!("{}:{}", lease.sandbox().uid, lease.sandbox().gid);
        let backstop = spec.timeout + cfg.kill_grace + BACKSTOP;
        let mut cmd = vec![
            SUPERVISOR.to_owned(),
            "--call-id".into(),
            call_id.clone(),
            "--timeout-ms".into(),
            backstop.as_millis().to_string(),
            "--grace-ms".into(),
            cfg.kill_grace.as_millis().to_string(),
        ];
        if let Some(dir) = workdir_path(spec) {
            cmd.push("--workdir".into());
            cmd.push(dir);
        }
        if spec.program.is_some() {
            cmd.push("--stdin-program".into());
        }
        cmd.push("--".into());
        cmd.extend(spec.argv.iter().cloned());
        let env = base_env(&spec.env);

        // 404 or 409 before the process started: the container is gone or stopped; retry.
        let attempt = |e: Error| {
            if e.is_not_found() || e.is_conflict() {
                Attempt::Gone(container_id.clone())
            } else {
                Attempt::Failed(e)
            }
        };
        let Attached {
            id: exec_id,
            mut output,
            mut input,
        } = start_attached(
            &docker,
            &container,
            "an exec",
            cmd,
            &uid,
            env,
            spec.program.is_some(),
        )
        .await
        .map_err(attempt)?;
        // From here on the call's processes may be running: whatever ends this future kills them.
        let mut guard = StopGuard {
            call: Some(CallHandle {
                docker: docker.clone(),
                pool: self.pool.clone(),
                exec_id,
                call_id,
                container: container.clone(),
                uid,
                lease,
            }),
        };
        if let Some(program) = &spec.program {
            let fed = tokio::time::timeout(docker.timeout(), async {
                input.write_all(program).await?;
                input.shutdown().await
            })
            .await;
            if !matches!(fed, Ok(Ok(()))) {
                tracing::warn!(container = %container, "could not hand the program to the sandbox");
            }
        }
        drop(input);

        let mut stdout = Capture::new(cfg.output_cap);
        let mut stderr = Capture::new(cfg.output_cap);
        let deadline = tokio::time::Instant::now() + spec.timeout;
        let (mut timed_out, mut cancelled) = (false, false);
        let mut stop_deadline: Option<tokio::time::Instant> = None;
        let mut forced = false;
        loop {
            tokio::select! {
                item = output.next() => match item {
                    Some(Ok(bollard::container::LogOutput::StdErr { message })) => stderr.push(&message),
                    Some(Ok(other)) => stdout.push(&other.into_bytes()),
                    Some(Err(e)) => {
                        tracing::warn!(container = %container, error = %e, "exec stream broke");
                        break;
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline), if stop_deadline.is_none() => {
                    timed_out = true;
                    guard.call().stop().await;
                    stop_deadline = Some(tokio::time::Instant::now() + cfg.kill_grace + STOP_MARGIN);
                }
                _ = cancel.cancelled(), if stop_deadline.is_none() => {
                    cancelled = true;
                    guard.call().stop().await;
                    stop_deadline = Some(tokio::time::Instant::now() + cfg.kill_grace + STOP_MARGIN);
                }
                _ = sleep_until_opt(stop_deadline) => {
                    tracing::warn!(container = %container, "supervisor did not stop in time: forcing");
                    forced = true;
                    break;
                }
            }
        }
        drop(output);
        let call = guard.disarm();
        // The stream can end a moment before Docker records the exit: wait for it briefly.
        let mut inspected = None;
        for _ in 0..200 {
            inspected = docker
                .call(
                    || format!("inspect an exec in {container}"),
                    docker.raw().inspect_exec(&call.exec_id),
                )
                .await
                .ok();
            if forced || inspected.as_ref().and_then(|i| i.running) != Some(true) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let running = inspected.as_ref().and_then(|i| i.running).unwrap_or(false);
        let exit_code = inspected
            .as_ref()
            .and_then(|i| i.exit_code)
            .map(|c| c as i32);
        // 137: SIGKILL, which the supervisor never sends itself. It may have been killed (kill -9
        // from the sandbox, the OOM killer), leaving orphans: sweep them.
        if forced || running || exit_code.is_none_or(|c| c == 137) {
            call.force_cleanup(running || forced).await;
        }
        Ok(ProcessOutcome {
            exit_code,
            stdout: stdout.finish(),
            stderr: stderr.finish(),
            timed_out,
            cancelled,
        })
    }
}

/// The call's working directory in the container, when it is not /workspace itself.
pub(crate) fn workdir_path(spec: &ProcessSpec) -> Option<String> {
    (!spec.workdir.is_empty()).then(|| format!("/workspace/{}", spec.workdir.join("/")))
}

pub(crate) async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why one attempt did not produce an outcome.
enum Attempt {
    /// The container was gone before the call started: safe to retry.
    Gone(String),
    /// Anything else.
    Failed(Error),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Failed(e)
    }
}

/// Everything needed to stop one running call. Holds the lease, so the sandbox is not reaped while
/// the call's processes may live.
struct CallHandle {
    docker: Docker,
    pool: SandboxPool,
    exec_id: String,
    call_id: String,
    container: String,
    uid: String,
    lease: Lease,
}

impl CallHandle {
    /// Asks the supervisor to stop the call (SIGTERM; it kills its subtree).
    async fn stop(&self) {
        if self
            .signal_by_host_pid(&[libc::SIGCONT, libc::SIGTERM])
            .await
        {
            return;
        }
        let argv = [SUPERVISOR, "--signal", &self.call_id];
        if let Err(e) = run_collect(
            &self.docker,
            &self.container,
            &self.uid,
            &argv,
            self.docker.timeout(),
            4096,
        )
        .await
        {
            tracing::warn!(container = %self.container, error = %e, "could not signal the call's supervisor");
        }
    }

    /// Signals the supervisor by its host PID, if this process may and the PID really is this
    /// call's supervisor. Returns whether the signals were delivered.
    async fn signal_by_host_pid(&self, signals: &[libc::c_int]) -> bool {
        if !nix::unistd::geteuid().is_root() {
            return false;
        }
        let Ok(info) = self
            .docker
            .call(
                || "inspect an exec".to_owned(),
                self.docker.raw().inspect_exec(&self.exec_id),
            )
            .await
        else {
            return false;
        };
        let Some(pid) = info.pid.filter(|p| *p > 0) else {
            return false;
        };
        signal_verified(pid as i32, "--call-id", &self.call_id, signals)
    }

    /// The supervisor died or would not stop: kill it, then its orphans; recycle the container if
    /// that does not work.
    async fn force_cleanup(&self, supervisor_alive: bool) {
        if supervisor_alive {
            self.signal_by_host_pid(&[libc::SIGKILL]).await;
        }
        let argv = [SUPERVISOR, "--sweep"];
        let swept = run_collect(
            &self.docker,
            &self.container,
            &self.uid,
            &argv,
            self.docker.timeout(),
            4096,
        )
        .await;
        if !matches!(swept, Ok(ref c) if c.exit_code == Some(0)) {
            let user = self.lease.user().clone();
            tracing::warn!(user = %user, container = %self.container, "could not sweep a call's leftovers: recycling the sandbox");
            // By id: a replacement created meanwhile (and its other calls) is left alone.
            let id = &self.lease.sandbox().container_id;
            if let Err(e) = self.pool.recycle(&user, id).await {
                tracing::warn!(user = %user, error = %e, "could not recycle the sandbox");
            }
        }
    }
}

/// Stops the call if the future running it is dropped (caller gone): the processes must not
/// outlive the call.
struct StopGuard {
    call: Option<CallHandle>,
}

impl StopGuard {
    fn call(&self) -> &CallHandle {
        self.call.as_ref().expect("armed")
    }

    fn disarm(&mut self) -> CallHandle {
        self.call.take().expect("armed")
    }
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            call.stop().await;
            // Give the supervisor its grace, then make sure nothing is left.
            let grace = call.pool.config().kill_grace + STOP_MARGIN;
            let deadline = tokio::time::Instant::now() + grace;
            loop {
                let running = call
                    .docker
                    .call(
                        || "inspect an exec".to_owned(),
                        call.docker.raw().inspect_exec(&call.exec_id),
                    )
                    .await
                    .ok()
                    .and_then(|i| i.running);
                if running != Some(true) || tokio::time::Instant::now() >= deadline {
                    if running != Some(false) {
                        call.force_cleanup(true).await;
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
}

/// Sends `signals` to `pid` through a pidfd, after checking that its command line is our
/// supervisor with `flag id` (`--call-id` for a call, `--serve` for a channel's helper). The pidfd
/// pins the process, so the check and the signal concern the same one.
pub(crate) fn signal_verified(pid: i32, flag: &str, id: &str, signals: &[libc::c_int]) -> bool {
    // SAFETY: pidfd_open with a pid and no flags; returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return false;
    }
    // SAFETY: fd is a fresh descriptor we own.
    let pidfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    // The first two words: the binary, or an interpreter running a replacement of it (which must
    // be killable too: it is what the daemon started).
    let ours = args.iter().take(2).any(|a| a.ends_with(b"zcbot-supervise"))
        && args
            .windows(2)
            .any(|w| w[0] == flag.as_bytes() && w[1] == id.as_bytes());
    if !ours {
        return false;
    }
    let raw = std::os::fd::AsRawFd::as_raw_fd(&pidfd);
    signals.iter().all(|s| {
        // SAFETY: pidfd_send_signal on a descriptor we own, with no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                raw,
                *s,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            ) == 0
        }
    })
}

/// What an exec's attached stdout/stderr yield.
pub(crate) type Output =
    Pin<Box<dyn Stream<Item = std::result::Result<LogOutput, bollard::errors::Error>> + Send>>;
/// An exec's attached stdin.
pub(crate) type Input = Pin<Box<dyn AsyncWrite + Send>>;

/// A started exec with its streams attached.
pub(crate) struct Attached {
    pub(crate) id: String,
    pub(crate) output: Output,
    pub(crate) input: Input,
}

/// Creates and starts an exec of `cmd` in `container` as `user` (`uid:gid`), in /workspace with
/// exactly `env`, attached to its stdout and stderr, and to its stdin when `stdin`. `what` names
/// it in errors ("an exec", "the channel exec"). Every exec the daemon makes goes through here.
pub(crate) async fn start_attached(
    docker: &Docker,
    container: &str,
    what: &str,
    cmd: Vec<String>,
    user: &str,
    env: Vec<String>,
    stdin: bool,
) -> Result<Attached> {
    let created = docker
        .call(
            || format!("create {what} in {container}"),
            docker.raw().create_exec(
                container,
                CreateExecOptions {
                    cmd: Some(cmd),
                    user: Some(user.to_owned()),
                    env: Some(env),
                    working_dir: Some("/workspace".to_owned()),
                    attach_stdin: Some(stdin),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            ),
        )
        .await?;
    let started = docker
        .call(
            || format!("start {what} in {container}"),
            docker.raw().start_exec(&created.id, None),
        )
        .await?;
    let StartExecResults::Attached { output, input } = started else {
        return Err(Error::Docker {
            op: format!("attach to {what} in {container}"),
            source: bollard::errors::Error::DockerStreamError {
                error: "the engine started the exec detached".to_owned(),
            },
        });
    };
    Ok(Attached {
        id: created.id,
        output,
        input,
    })
}

/// What one short helper exec produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// The exit status from `inspect_exec`; None if Docker did not report one.
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

/// Runs a short, trusted helper command in `container` as `user` (`uid:gid`), collecting at most
/// `cap` bytes per stream, waiting at most `timeout`. Used for the supervisor's helper modes and
/// the smoke checks; it does not kill on timeout, so never use it for tool calls.
pub async fn run_collect(
    docker: &Docker,
    container: &str,
    user: &str,
    argv: &[&str],
    timeout: Duration,
    cap: usize,
) -> Result<ExecOutput> {
    let Attached {
        id: exec_id,
        mut output,
        ..
    } = start_attached(
        docker,
        container,
        "an exec",
        argv.iter().map(|s| s.to_string()).collect(),
        user,
        base_env(&Default::default()),
        false,
    )
    .await?;
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
            docker.raw().inspect_exec(&exec_id),
        )
        .await?;
    Ok(ExecOutput {
        exit_code: inspected.exit_code,
        stdout,
        stderr,
    })
}
