//! The docker backend: every process call runs under the in-container supervisor
//! (`zcbot-supervise`) as the tenant's uid, reached by one of two transports
//! (`ZCBOT_EXEC_TRANSPORT`): over the user's persistent channel ([`super::channel`], the
//! default), or by one engine exec per call ([`super::per_call`], also the channel's fallback).
//!
//! This module is the policy only: which transport serves a call, and what happens when an attempt
//! fails (a container gone behind the pool's back is recreated and the call runs once more; a call
//! the channel lost before it started runs again on a new channel, then by per-call exec). How a
//! call runs and is stopped is the transports' business ([`super::transport`], [`super::stop`]).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::channel::Channels;
use super::file_calls::FileRunner;
use super::live::Tap;
use super::metrics::TransportStats;
use super::output::Capture;
use super::per_call::PerCallExec;
use super::session::{SessionInfo, SessionOutcome};
use super::transport::{Attempt, Transport};
use super::{ProcessOutcome, ProcessSpec};
use crate::config::Transport as TransportSetting;
use crate::error::{Error, Result};
use crate::pool::SandboxPool;
use crate::user::UserId;

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Kills the channel of every container of the pool that dies. Holds the channels weakly: it
/// ends with them.
fn follow_deaths(
    pool: &SandboxPool,
    channels: std::sync::Weak<Channels>,
) -> tokio::task::AbortHandle {
    let mut deaths = pool.deaths();
    tokio::spawn(async move {
        loop {
            match deaths.recv().await {
                Ok(id) => match channels.upgrade() {
                    Some(channels) => channels.container_gone(&id).await,
                    None => return,
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    })
    .abort_handle()
}

/// Runs process calls in each user's sandbox.
pub struct DockerExecutor {
    pool: SandboxPool,
    files: FileRunner,
    transport: TransportSetting,
    channels: Arc<Channels>,
    /// Closes the channel of a container that died between calls (the engine may leave its
    /// stream open under gVisor); aborted with the executor.
    _deaths: AbortOnDrop,
    per_call: PerCallExec,
    stats: Arc<TransportStats>,
}

impl DockerExecutor {
    /// An executor on `pool`, with the pool's configured transport.
    pub fn new(pool: SandboxPool) -> Self {
        let stats = Arc::new(TransportStats::default());
        let channels = Arc::new(Channels::new(pool.clone(), stats.clone()));
        let cfg = pool.config();
        if cfg.transport == TransportSetting::Channel {
            let warmer: std::sync::Weak<dyn crate::pool::SpareWarmer> =
                Arc::downgrade(&channels) as _;
            pool.set_spare_warmer(warmer);
        }
        DockerExecutor {
            files: FileRunner::new(cfg.file_workers, cfg.file_timeout, cfg.file_max_entries),
            transport: cfg.transport,
            _deaths: AbortOnDrop(follow_deaths(&pool, Arc::downgrade(&channels))),
            channels,
            per_call: PerCallExec::new(pool.clone()),
            pool,
            stats,
        }
    }

    /// The configured transport.
    pub fn transport(&self) -> TransportSetting {
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
        let mut spec = spec;
        // The proxy's address in allowlist mode; a call's own variables win.
        for (k, v) in self.pool.sandbox_env() {
            spec.env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let mut retried = false;
        let mut not_started = 0;
        // A background job runs over the channel whatever the setting: the helper kills its
        // processes when the daemon that started it goes away (DESIGN.md, "Background jobs").
        let job = spec.tap.as_ref().is_some_and(|t| t.all);
        let mut per_call = self.transport == TransportSetting::Exec && !job;
        let no_channel = |why: &str| Error::JobUnavailable {
            reason: format!(
                "the exec channel into sandbox {} {why}; a background job needs it: try again",
                self.pool.container_name(user)
            ),
        };
        loop {
            let lease = self.pool.lease(user).await?;
            let container_id = lease.sandbox().container_id.clone();
            let died = self.pool.death_of(&container_id);
            // Host rules mode: a container restarted behind the pool's back has a fresh network
            // namespace without rules. One readlink tells; the retry re-installs them.
            let attempt = if !self.pool.rules_intact(lease.sandbox()) {
                tracing::warn!(container = %lease.sandbox().name, "the sandbox's network namespace changed (restarted?): re-installing its rules");
                Err(Attempt::Gone(lease.sandbox().container_id.clone()))
            } else {
                let run = async {
                    if per_call {
                        self.per_call.run(lease, &spec, cancel).await
                    } else {
                        self.channels.run(lease, &spec, cancel).await
                    }
                };
                tokio::select! {
                    biased;
                    attempt = run => attempt,
                    () = died.cancelled() => return self.died_during(user, &container_id).await,
                }
            };
            match attempt {
                // Killed by a signal in a sandbox removed on purpose: that is its death, whose
                // event can come after the exec's end.
                Ok(outcome)
                    if outcome.exit_code.is_some_and(|c| c >= 128)
                        && self.pool.removal_noted(&container_id) =>
                {
                    return self.died_during(user, &container_id).await;
                }
                Ok(outcome) => {
                    self.stats.observe(!per_call, started.elapsed());
                    return Ok(outcome);
                }
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
                Err(Attempt::NotStarted) => {
                    // Twice: this container's channel keeps dying before calls start.
                    not_started += 1;
                    if not_started == 2 && job {
                        return Err(no_channel("died twice before the job started"));
                    }
                    if not_started == 2 {
                        let lease = self.pool.lease(user).await?;
                        self.channels.back_off(&lease).await;
                        per_call = true;
                        self.stats.fallbacks.inc();
                    }
                }
                Err(Attempt::Fallback) if job => {
                    return Err(no_channel("could not be opened (see the log)"));
                }
                Err(Attempt::Fallback) => {
                    per_call = true;
                    self.stats.fallbacks.inc();
                }
                Err(Attempt::Failed(e)) => return Err(self.said_removed(e, &container_id)),
            }
        }
    }

    /// A channel that died because its sandbox was removed on purpose says so (the engine's
    /// event of the death may come after the channel's end).
    fn said_removed(&self, e: Error, container_id: &str) -> Error {
        match e {
            Error::ChannelLost {
                user,
                container,
                reason,
                removed_by: None,
            } => Error::ChannelLost {
                user,
                container,
                reason,
                removed_by: self.pool.removed_by(container_id),
            },
            e => e,
        }
    }

    /// Runs `code` in `user`'s Python session `name` (see [`super::session`]). A container gone
    /// behind the pool's back is recreated and a run the channel lost before it started runs once
    /// more (in a new session: the result says `session_started`).
    pub(crate) async fn run_session(
        &self,
        user: &UserId,
        name: &str,
        code: &str,
        timeout: std::time::Duration,
        tap: Option<&Tap>,
        cancel: &CancellationToken,
    ) -> Result<(ProcessOutcome, SessionOutcome)> {
        let mut retried = false;
        loop {
            let lease = self.pool.lease(user).await?;
            let container_id = lease.sandbox().container_id.clone();
            let attempt = self
                .channels
                .run_session(lease, name, code, timeout, tap, cancel)
                .await;
            match attempt {
                Ok(done) => return Ok(done),
                Err(Attempt::Failed(e)) => return Err(self.said_removed(e, &container_id)),
                Err(Attempt::Gone(container_id)) if !retried => {
                    self.pool.invalidate(user, &container_id);
                    retried = true;
                }
                Err(Attempt::NotStarted) if !retried => retried = true,
                Err(_) => {
                    return Err(Error::SessionsUnavailable {
                        reason: format!(
                            "the exec channel into sandbox {} died twice before the code ran: \
                             try again",
                            self.pool.container_name(user)
                        ),
                    })
                }
            }
        }
    }

    /// The user's Python sessions.
    pub(crate) async fn sessions(&self, user: &UserId) -> Vec<SessionInfo> {
        self.channels.sessions(user).await
    }

    /// Ends the user's session `name`; false when there is none.
    pub(crate) async fn end_session(&self, user: &UserId, name: &str) -> bool {
        self.channels.end_session(user, name).await
    }

    /// The container died under a running call (the call's future, dropped, leaves its clean-up
    /// to its stop guard). Out of memory, or gVisor's kernel giving up at the process limit, the
    /// call ends as killed (137, as the kernel's OOM kill of a process does under runc) and says
    /// why; otherwise it is lost. The next call gets a
    /// fresh sandbox: the call is never run again by itself, it may have done half its work.
    async fn died_during(&self, user: &UserId, container_id: &str) -> Result<ProcessOutcome> {
        self.channels.container_gone(container_id).await;
        self.pool.invalidate(user, container_id);
        let container = self.pool.container_name(user);
        // Removed on purpose (by this process or another): the call says by whom.
        let removed_by = self.pool.removed_by(container_id);
        let inspected = self.pool.engine().inspect(container_id).await;
        let gone = matches!(inspected, Ok(None));
        let (oom, exit) = match inspected {
            // The engine keeps OOMKilled set once any process of the container was OOM-killed:
            // only a death by SIGKILL (137) is the OOM killer's.
            Ok(Some(c)) if removed_by.is_none() => {
                (c.oom_killed && c.exit_code == Some(137), c.exit_code)
            }
            _ => (false, None),
        };
        tracing::warn!(user = %user, container = %container, oom, exit, "the sandbox died during a call");
        let cfg = self.pool.config();
        // gVisor's kernel exits with a status of its own (not a signal's 128+N) when it cannot go
        // on: in practice, when the pids limit refuses it a host thread.
        let gvisor_gave_up = cfg.runtime == crate::config::Runtime::Runsc
            && exit.is_some_and(|code| code != 0 && code < 128);
        let note = if oom {
            format!(
                "zcbot: the sandbox ran out of memory (its limit is {} bytes, \
                 ZCBOT_SANDBOX_MEMORY) and was stopped with everything running in it; the next \
                 call starts a fresh one\n",
                cfg.memory_bytes
            )
        } else if gvisor_gave_up {
            format!(
                "zcbot: the sandbox's kernel (gVisor) stopped (status {}), most likely at its \
                 process limit (ZCBOT_SANDBOX_PIDS={}), with everything running in it; the next \
                 call starts a fresh one\n",
                exit.unwrap_or_default(),
                cfg.pids
            )
        } else {
            return Err(Error::ChannelLost {
                user: user.to_string(),
                container,
                reason: "the sandbox stopped during the call (stopped or killed from outside)"
                    .into(),
                removed_by: removed_by
                    .or_else(|| gone.then(|| "from outside zcbot-sandbox (docker rm?)".to_owned())),
            });
        };
        let mut stderr = Capture::new(cfg.output_cap);
        stderr.push(note.as_bytes());
        Ok(ProcessOutcome {
            exit_code: Some(137),
            stdout: Capture::new(cfg.output_cap).finish(),
            stderr: stderr.finish(),
            timed_out: false,
            cancelled: false,
        })
    }
}
