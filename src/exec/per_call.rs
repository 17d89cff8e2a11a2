//! Per-call exec: one engine exec per call, running the in-container supervisor as the tenant's
//! uid (`ZCBOT_EXEC_TRANSPORT=exec`, and the channel's fallback).
//!
//! The engine has no API to kill an exec, and dropping the attached stream does not stop it. So a
//! call is stopped by signalling its supervisor, which kills the call's whole subtree (setsid and
//! double-fork escapes re-parent to it: it is a child subreaper):
//! - as root on the host: by the supervisor's host PID from the exec's state, through a pidfd,
//!   after checking that the process's command line names this call (so a PID from another
//!   namespace or a recycled PID is never signalled);
//! - otherwise: by a second exec, `zcbot-supervise --signal CALL_ID`, as the tenant's uid.
//!
//! If the supervisor itself dies (the sandbox user can kill it: same uid), its orphans re-parent
//! to the container's init, and `zcbot-supervise --sweep` kills exactly those: every live call's
//! processes descend from a live supervisor. If even that fails, the container is recycled (by
//! id: a replacement and its calls are left alone).

use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::live::Stream;
use super::output::Capture;
use super::stop::{drive, signal_verified, CallStop, StopGuard};
use super::transport::{
    exec_spec, run_collect, supervisor_command, sweep, workdir_path, Attempt, Transport, BACKSTOP,
    STOP_MARGIN, SUPERVISOR,
};
use super::{base_env, new_call_id, ProcessOutcome, ProcessSpec};
use crate::engine::{Attached, Chunk, ExecStart, SharedEngine};
use crate::pool::{Lease, SandboxPool};
use crate::user::UserId;

/// Runs each call by its own engine exec.
pub(crate) struct PerCallExec {
    pool: SandboxPool,
}

impl PerCallExec {
    pub(crate) fn new(pool: SandboxPool) -> Self {
        PerCallExec { pool }
    }
}

impl Transport for PerCallExec {
    fn run<'a>(
        &'a self,
        lease: Lease,
        spec: &'a ProcessSpec,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<ProcessOutcome, Attempt>> {
        self.run_once(lease, spec, cancel).boxed()
    }
}

impl PerCallExec {
    async fn run_once(
        &self,
        lease: Lease,
        spec: &ProcessSpec,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, Attempt> {
        let engine = self.pool.engine().clone();
        let cfg = self.pool.config();
        let container = lease.sandbox().name.clone();
        let container_id = lease.sandbox().container_id.clone();
        let call_id = new_call_id();
        let uid = format!("{}:{}", lease.sandbox().uid, lease.sandbox().gid);
        let backstop = spec.timeout + cfg.kill_grace + BACKSTOP;
        let mut cmd = supervisor_command(&call_id, backstop, cfg.kill_grace);
        if let Some(dir) = workdir_path(spec) {
            cmd.push("--workdir".into());
            cmd.push(dir);
        }
        if spec.program.is_some() {
            cmd.push("--stdin-program".into());
        }
        cmd.push("--".into());
        cmd.extend(spec.argv.iter().cloned());
        let exec = exec_spec(cmd, &uid, base_env(&spec.env), spec.program.is_some());
        let Attached {
            id: exec_id,
            mut output,
            mut input,
        } = match engine
            .exec(&container, exec)
            .await
            .map_err(|e| Attempt::Failed(e.into()))?
        {
            ExecStart::Attached(a) => a,
            // Gone or stopped before the process started: recreate and retry.
            ExecStart::ContainerGone => return Err(Attempt::Gone(container_id)),
        };
        // From here on the call's processes may be running: whatever ends this future kills them.
        let grace = cfg.kill_grace + STOP_MARGIN;
        let call = ExecCall {
            engine: engine.clone(),
            pool: self.pool.clone(),
            exec_id,
            call_id,
            container: container.clone(),
            container_id,
            user: lease.user().clone(),
            uid,
        };
        let guard = StopGuard::new(call, lease, grace, self.pool.tasks().clone());
        if let Some(program) = &spec.program {
            let fed = tokio::time::timeout(engine.timeout(), async {
                input.write_all(program).await?;
                input.shutdown().await
            })
            .await;
            if !matches!(fed, Ok(Ok(()))) {
                tracing::warn!(container = %container, "could not hand the program to the sandbox");
            }
        }
        drop(input);

        let tap = spec.tap.as_ref();
        let mut stdout = Capture::tapped(cfg.output_cap, tap, Stream::Stdout);
        let mut stderr = Capture::tapped(cfg.output_cap, tap, Stream::Stderr);
        let read = async {
            while let Some(item) = output.next().await {
                match item {
                    Ok(Chunk::Stderr(b)) => stderr.push(&b),
                    Ok(Chunk::Stdout(b)) => stdout.push(&b),
                    Err(e) => {
                        tracing::warn!(container = %container, error = %e, "exec stream broke");
                        break;
                    }
                }
            }
        };
        let ended = drive(read, spec.timeout, cancel, grace, || guard.call().stop()).await;
        let forced = ended.value.is_none();
        if forced {
            tracing::warn!(container = %container, "supervisor did not stop in time: forcing");
        }
        drop(output);
        // Still armed: a caller that goes away during this clean-up leaves it to the guard.
        let call = guard.call();
        // The stream can end a moment before the engine records the exit: wait for it briefly.
        let mut state = None;
        for _ in 0..200 {
            state = engine.exec_state(&call.exec_id).await.ok().flatten();
            if forced || !state.is_some_and(|s| s.running) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let running = state.is_some_and(|s| s.running);
        let exit_code = state.and_then(|s| s.exit_code).map(|c| c as i32);
        // Killed (137) or no trustworthy status (see `UNTRUSTED_STATUS`): the supervisor may be
        // alive still or dead without its clean-up, leaving orphans: kill it and sweep them.
        if forced || running || exit_code.is_none_or(|c| c == 137 || c == UNTRUSTED_STATUS) {
            call.force_cleanup().await;
        }
        // The call's processes are known gone: the lease may go.
        drop(guard.disarm());
        Ok(ProcessOutcome {
            exit_code,
            stdout: stdout.finish(),
            stderr: stderr.finish(),
            timed_out: ended.timed_out,
            cancelled: ended.cancelled,
        })
    }
}

/// The status Docker 20.10 records for an exec whose attached stream failed, whatever its
/// process did: seen for a dropped call whose supervisor was still running (and was killed a
/// moment later by its tenant, leaving orphans). Never proof that the call's processes are gone.
const UNTRUSTED_STATUS: i32 = 126;

/// Everything needed to stop one call made by its own exec.
struct ExecCall {
    engine: SharedEngine,
    pool: SandboxPool,
    exec_id: String,
    call_id: String,
    container: String,
    container_id: String,
    user: UserId,
    uid: String,
}

impl ExecCall {
    /// Asks the supervisor to stop the call (SIGTERM; it kills its subtree).
    async fn request_stop(&self) {
        if self
            .signal_by_host_pid(&[libc::SIGCONT, libc::SIGTERM])
            .await
        {
            return;
        }
        let argv = [SUPERVISOR, "--signal", &self.call_id];
        let engine = self.engine.as_ref();
        let signalled = run_collect(
            engine,
            &self.container,
            &self.uid,
            &argv,
            engine.timeout(),
            4096,
        )
        .await;
        if let Err(e) = signalled {
            tracing::warn!(container = %self.container, error = %e, "could not signal the call's supervisor");
        }
    }

    /// Signals the supervisor by its host PID, if this process may and the PID really is this
    /// call's supervisor. Returns whether the signals were delivered.
    async fn signal_by_host_pid(&self, signals: &[libc::c_int]) -> bool {
        match self.engine.exec_state(&self.exec_id).await {
            Ok(Some(state)) => self.signal_pid(state.pid, signals),
            _ => false,
        }
    }

    /// Sends `signals` to `pid` if this process may (root) and it is this call's live supervisor
    /// (a verified pidfd). Signal 0 asks whether it is alive.
    fn signal_pid(&self, pid: Option<i64>, signals: &[libc::c_int]) -> bool {
        let Some(pid) = pid.filter(|p| *p > 0) else {
            return false;
        };
        nix::unistd::geteuid().is_root()
            && signal_verified(pid as i32, "--call-id", &self.call_id, signals)
    }

    /// The supervisor died or would not stop: kill it if it still runs, then its orphans; recycle
    /// the container if that does not work.
    async fn force_cleanup(&self) {
        self.signal_by_host_pid(&[libc::SIGKILL]).await;
        if !sweep(self.engine.as_ref(), &self.container, &self.uid).await {
            tracing::warn!(container = %self.container, "could not sweep a call's leftovers: recycling the sandbox");
            if let Err(e) = self.pool.recycle(&self.user, &self.container_id).await {
                tracing::warn!(container = %self.container, error = %e, "could not recycle the sandbox");
            }
        }
    }
}

impl CallStop for ExecCall {
    fn stop(&self) -> BoxFuture<'_, ()> {
        self.request_stop().boxed()
    }

    fn wait_gone(&self, until: Instant) -> BoxFuture<'_, bool> {
        async move {
            loop {
                match self.engine.exec_state(&self.exec_id).await {
                    // Ended by itself. Killed (137, which the supervisor never sends), with no
                    // status or an untrusted one, or still alive by its PID although the engine
                    // says it ended: its orphans may live on: not gone until swept (`force`).
                    Ok(Some(s)) if !s.running => {
                        let trusted = s
                            .exit_code
                            .is_some_and(|c| c != 137 && c != i64::from(UNTRUSTED_STATUS));
                        return trusted && !self.signal_pid(s.pid, &[0]);
                    }
                    // The exec, and its container, are gone.
                    Ok(None) => return true,
                    _ if Instant::now() >= until => return false,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        .boxed()
    }

    fn force(&self) -> BoxFuture<'_, ()> {
        self.force_cleanup().boxed()
    }
}
