//! The persistent exec channel: one long-lived Docker exec per container, running
//! `zcbot-supervise --serve` as the sandbox uid, over which every process call of that user is
//! multiplexed with length-prefixed frames (`zcbot_supervise::proto`).
//!
//! A per-call Docker exec costs 50-70 ms of engine work (runc: create, setns, start); a call over
//! the channel costs two forks and execs inside the container. Each call still runs under its own
//! `zcbot-supervise` (own session, subreaper, whole-subtree kill, backstop deadline), forked by the
//! server, so the guarantees are those of the per-call exec.
//!
//! The channel is untrusted: the sandbox user has the helper's uid and may kill it, or run
//! something else in its place. So every frame is bounded, anything malformed kills the channel,
//! each user has their own channel (nothing is shared between users), and what a compromised
//! channel can do is lie about that user's own calls. When a channel dies, calls that had not
//! started are retried once on a new channel, calls that had are failed with
//! [`Error::ChannelLost`] after their processes are killed, and the next call opens a new
//! channel. A container whose channel cannot be opened (or keeps dying before calls start) serves
//! its calls by per-call exec for [`FAILED_BACKOFF`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::container::LogOutput;
use dashmap::DashMap;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use zcbot_supervise::proto::{self, Decoder, Start};

use super::docker::{
    run_collect, signal_verified, start_attached, Attached, Input, Output, BACKSTOP, STOP_MARGIN,
    SUPERVISOR,
};
use super::metrics::TransportStats;
use super::output::Capture;
use super::{ProcessOutcome, ProcessSpec};
use crate::docker::Docker;
use crate::error::Error;
use crate::pool::{Lease, SandboxPool};
use crate::user::UserId;

/// How long a container whose channel failed to open is served by per-call exec instead.
pub const FAILED_BACKOFF: Duration = Duration::from_secs(30);
/// The longest the helper may take to greet after its exec started.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of the helper's own stderr is kept for messages.
const HELPER_STDERR: usize = 2048;

/// Each user's channel, opened on first use.
pub(crate) struct Channels {
    slots: DashMap<UserId, Arc<tokio::sync::Mutex<Slot>>>,
    stats: Arc<TransportStats>,
}

#[derive(Default)]
struct Slot {
    channel: Option<Arc<Channel>>,
    /// A container whose channel failed, and when: its calls use per-call exec for a while.
    failed: Option<(String, Instant)>,
}

/// Why a channel could not be used for a call.
pub(crate) enum Unusable {
    /// The container is gone or stopped: recreate it and retry.
    Gone(String),
    /// The channel cannot be opened (or is backing off): use per-call exec.
    Fallback,
}

impl Channels {
    pub(crate) fn new(stats: Arc<TransportStats>) -> Self {
        Channels {
            slots: DashMap::new(),
            stats,
        }
    }

    /// The live channel into the lease's container, opening one if needed.
    pub(crate) async fn get(
        &self,
        pool: &SandboxPool,
        lease: &Lease,
    ) -> Result<Arc<Channel>, Unusable> {
        let user = lease.user();
        let container_id = &lease.sandbox().container_id;
        let slot = self.slots.entry(user.clone()).or_default().clone();
        let mut st = slot.lock().await;
        if let Some(ch) = &st.channel {
            if ch.alive() && &ch.container_id == container_id {
                return Ok(ch.clone());
            }
        }
        if let Some((failed_id, at)) = &st.failed {
            if failed_id == container_id && at.elapsed() < FAILED_BACKOFF {
                return Err(Unusable::Fallback);
            }
        }
        if let Some(old) = st.channel.take() {
            old.die(
                "replaced by a channel into the user's current container".into(),
                true,
            );
        }
        self.prune();
        match Channel::open(pool, lease, self.stats.clone()).await {
            Ok(ch) => {
                self.stats.opens.inc();
                st.failed = None;
                st.channel = Some(ch.clone());
                Ok(ch)
            }
            Err(e) if e.is_not_found() || e.is_conflict() => {
                Err(Unusable::Gone(container_id.clone()))
            }
            Err(e) => {
                tracing::warn!(user = %user, error = %e, "could not open the exec channel: this sandbox's calls use per-call exec for {}", humantime::format_duration(FAILED_BACKOFF));
                st.failed = Some((container_id.clone(), Instant::now()));
                Err(Unusable::Fallback)
            }
        }
    }

    /// Makes the lease's container serve by per-call exec for a while (its channel keeps dying
    /// before calls start).
    pub(crate) async fn back_off(&self, lease: &Lease) {
        let slot = self.slots.entry(lease.user().clone()).or_default().clone();
        let mut st = slot.lock().await;
        st.failed = Some((lease.sandbox().container_id.clone(), Instant::now()));
        if let Some(ch) = st.channel.take() {
            ch.die("backing off to per-call exec".into(), true);
        }
    }

    /// Drops the slots of users whose channel is dead and that nobody is using, so the map does
    /// not grow with every user ever seen.
    fn prune(&self) {
        self.slots.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || slot.try_lock().map_or(true, |st| {
                    st.channel.as_ref().is_some_and(|c| c.alive()) || st.failed.is_some()
                })
        });
    }

    /// Closes every channel (the daemon is stopping): each helper stops its calls and exits.
    pub(crate) fn close_all(&self) {
        for slot in self.slots.iter() {
            if let Ok(mut st) = slot.try_lock() {
                if let Some(ch) = st.channel.take() {
                    ch.die("the daemon is closing its channels".into(), true);
                }
            }
        }
    }
}

/// How a call on the channel ended, with what it printed.
struct End {
    kind: EndKind,
    stdout: Capture,
    stderr: Capture,
}

enum EndKind {
    Exit { status: i32, signaled: bool },
    Failed(String),
    Lost { started: bool },
}

struct Pending {
    stdout: Capture,
    stderr: Capture,
    started: bool,
    done: oneshot::Sender<End>,
}

/// Why one call over the channel produced no outcome.
pub(crate) enum ChannelAttempt {
    /// The channel died before the call started: safe to run it again.
    NotStarted,
    /// Anything else.
    Failed(Error),
}

/// One open channel into one container.
pub(crate) struct Channel {
    user: UserId,
    container: String,
    container_id: String,
    /// `uid:gid` of the tenant, which the helper and every exec into the container run as.
    uid: String,
    exec_id: String,
    channel_id: String,
    docker: Docker,
    pool: SandboxPool,
    stats: Arc<TransportStats>,
    writer: tokio::sync::Mutex<Option<Input>>,
    calls: parking_lot::Mutex<HashMap<u64, Pending>>,
    dead: CancellationToken,
    reason: parking_lot::Mutex<Option<String>>,
    /// Cancelled once a dead channel's leftovers were cleaned up.
    cleaned: CancellationToken,
}

impl Channel {
    fn alive(&self) -> bool {
        !self.dead.is_cancelled()
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .clone()
            .unwrap_or_else(|| "closed".to_owned())
    }

    /// Starts the helper in the lease's container and waits for its greeting.
    async fn open(
        pool: &SandboxPool,
        lease: &Lease,
        stats: Arc<TransportStats>,
    ) -> Result<Arc<Channel>, Error> {
        let docker = pool.docker().clone();
        let container = lease.sandbox().name.clone();
        let uid = format!("{}:{}", lease.sandbox().uid, lease.sandbox().gid);
        let channel_id = super::new_call_id();
        let Attached {
            id: exec_id,
            mut output,
            input,
        } = start_attached(
            &docker,
            &container,
            "the channel exec",
            vec![
                SUPERVISOR.to_owned(),
                "--serve".to_owned(),
                channel_id.clone(),
            ],
            &uid,
            super::base_env(&Default::default()),
            true,
        )
        .await?;
        let mut decoder = Decoder::new(proto::MAX_FROM_HELPER);
        let mut stderr = Vec::new();
        let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
            loop {
                match output.next().await {
                    Some(Ok(LogOutput::StdErr { message })) => keep_some(&mut stderr, &message),
                    Some(Ok(other)) => decoder.push(&other.into_bytes()),
                    Some(Err(e)) => return Err(format!("stream error: {e}")),
                    None => return Err("the helper exited before greeting".to_owned()),
                }
                match decoder.next_frame() {
                    Ok(None) => continue,
                    Ok(Some(f)) if f.kind == proto::HELLO && f.payload.len() == 8 => {
                        let version = u32::from_be_bytes(f.payload[..4].try_into().expect("4"));
                        if version != proto::VERSION {
                            return Err(format!(
                                "the helper speaks protocol {version}, this daemon {}: rebuild the image",
                                proto::VERSION
                            ));
                        }
                        return Ok(());
                    }
                    Ok(Some(f)) => return Err(format!("it sent frame kind {} first", f.kind)),
                    Err(e) => return Err(format!("malformed greeting: {e}")),
                }
            }
        })
        .await;
        let problem = match hello {
            Ok(Ok(())) => None,
            Ok(Err(reason)) => Some(reason),
            Err(_) => Some(format!(
                "no greeting within {}",
                humantime::format_duration(HELLO_TIMEOUT)
            )),
        };
        if let Some(reason) = problem {
            let said = String::from_utf8_lossy(&stderr).trim().to_owned();
            let reason = if said.is_empty() {
                reason
            } else {
                format!("{reason}; it said: {said}")
            };
            return Err(helper_error(&container, &reason));
        }
        let channel = Arc::new(Channel {
            user: lease.user().clone(),
            container: container.clone(),
            container_id: lease.sandbox().container_id.clone(),
            uid,
            exec_id,
            channel_id,
            docker,
            pool: pool.clone(),
            stats,
            writer: tokio::sync::Mutex::new(Some(input)),
            calls: parking_lot::Mutex::new(HashMap::new()),
            dead: CancellationToken::new(),
            reason: parking_lot::Mutex::new(None),
            cleaned: CancellationToken::new(),
        });
        tracing::debug!(user = %channel.user, container = %container, "exec channel open");
        tokio::spawn(channel.clone().read_loop(output, decoder));
        Ok(channel)
    }

    /// Routes the helper's frames to the calls until the stream ends or breaks the protocol.
    async fn read_loop(self: Arc<Self>, mut output: Output, mut decoder: Decoder) {
        let mut stderr = Vec::new();
        // (reason, whether it can be a normal end: the container removed or stopped by the pool)
        let (reason, expected) = loop {
            if let Err(reason) = self.dispatch(&mut decoder) {
                break (reason, false);
            }
            tokio::select! {
                item = output.next() => match item {
                    Some(Ok(LogOutput::StdErr { message })) => keep_some(&mut stderr, &message),
                    Some(Ok(other)) => decoder.push(&other.into_bytes()),
                    Some(Err(e)) => break (format!("stream error: {e}"), false),
                    None => {
                        let said = String::from_utf8_lossy(&stderr).trim().to_owned();
                        break if said.is_empty() {
                            ("the helper exited".to_owned(), true)
                        } else {
                            (format!("the helper exited saying: {said}"), true)
                        };
                    }
                },
                _ = self.dead.cancelled() => break (self.reason(), true),
            }
        };
        drop(output);
        self.die(reason, expected);
    }

    /// Handles every complete frame; an error is a reason to kill the channel.
    fn dispatch(&self, decoder: &mut Decoder) -> Result<(), String> {
        while let Some(f) = decoder
            .next_frame()
            .map_err(|e| format!("malformed frame from the helper: {e}"))?
        {
            let mut r = proto::Reader::new(&f.payload);
            let bad = |e: proto::ProtoError| format!("malformed frame kind {}: {e}", f.kind);
            let mut calls = self.calls.lock();
            match f.kind {
                proto::STARTED => {
                    r.u32().map_err(bad)?;
                    r.end().map_err(bad)?;
                    if let Some(p) = calls.get_mut(&f.id) {
                        p.started = true;
                    }
                }
                proto::OUTPUT => {
                    let stream = r.u8().map_err(bad)?;
                    let bytes = r.rest();
                    if let Some(p) = calls.get_mut(&f.id) {
                        p.started = true;
                        match stream {
                            1 => p.stdout.push(bytes),
                            2 => p.stderr.push(bytes),
                            other => return Err(format!("output for stream {other}")),
                        }
                    }
                }
                proto::SKIPPED => {
                    let stream = r.u8().map_err(bad)?;
                    let n = r.u64().map_err(bad)?;
                    r.end().map_err(bad)?;
                    if let Some(p) = calls.get_mut(&f.id) {
                        match stream {
                            1 => p.stdout.skip(n),
                            2 => p.stderr.skip(n),
                            other => return Err(format!("skip count for stream {other}")),
                        }
                    }
                }
                proto::EXIT => {
                    let status = r.i32().map_err(bad)?;
                    let signaled = r.u8().map_err(bad)? != 0;
                    r.end().map_err(bad)?;
                    if let Some(p) = calls.remove(&f.id) {
                        let kind = EndKind::Exit { status, signaled };
                        p.finish(kind);
                    }
                }
                proto::FAILED => {
                    let reason: String = String::from_utf8_lossy(r.rest())
                        .chars()
                        .take(512)
                        .collect();
                    if let Some(p) = calls.remove(&f.id) {
                        p.finish(EndKind::Failed(reason));
                    }
                }
                other => return Err(format!("unexpected frame kind {other} from the helper")),
            }
        }
        Ok(())
    }

    /// Marks the channel dead (first reason wins), hands every call in flight its end, and
    /// cleans up what the helper may have left. `expected`: an end that is normal when no call is
    /// in flight (the pool removed the container, the daemon closes or replaces the channel);
    /// only the others are counted and logged as deaths.
    fn die(self: &Arc<Self>, reason: String, expected: bool) {
        {
            let mut r = self.reason.lock();
            if r.is_some() {
                return;
            }
            *r = Some(reason.clone());
        }
        self.dead.cancel();
        let pending: Vec<Pending> = self.calls.lock().drain().map(|(_, p)| p).collect();
        if expected && pending.is_empty() {
            tracing::debug!(user = %self.user, container = %self.container, reason = %reason, "exec channel closed");
        } else {
            self.stats.deaths.inc();
            tracing::warn!(user = %self.user, container = %self.container, calls = pending.len(), reason = %reason, "exec channel died");
        }
        let in_flight = pending.iter().any(|p| p.started);
        for p in pending {
            let started = p.started;
            p.finish(EndKind::Lost { started });
        }
        let ch = self.clone();
        tokio::spawn(async move { ch.clean_up(in_flight).await });
    }

    /// After death: the helper must be gone and no call's process left. Closing its input makes a
    /// sane helper stop every call and exit; otherwise its host PID is killed (as root), orphans
    /// are swept, and a container where that is not enough is recycled.
    async fn clean_up(self: Arc<Self>, calls_in_flight: bool) {
        self.writer.lock().await.take();
        let cfg = self.pool.config();
        let uid = self.uid.clone();
        let deadline = Instant::now() + cfg.kill_grace + STOP_MARGIN;
        let running = loop {
            match self
                .docker
                .call(
                    || "inspect the channel exec".to_owned(),
                    self.docker.raw().inspect_exec(&self.exec_id),
                )
                .await
            {
                Ok(info) if info.running == Some(true) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Ok(info) => break info.running == Some(true),
                Err(e) if e.is_not_found() => {
                    // The container (and the exec with it) is gone.
                    self.cleaned.cancel();
                    return;
                }
                // The engine did not answer: do what does not depend on the answer (the sweep
                // below), but do not recycle a sandbox over a hiccup.
                Err(_) => break false,
            }
        };
        let mut killed = !running;
        if running && nix::unistd::geteuid().is_root() {
            if let Ok(info) = self
                .docker
                .call(
                    || "inspect the channel exec".to_owned(),
                    self.docker.raw().inspect_exec(&self.exec_id),
                )
                .await
            {
                if let Some(pid) = info.pid.filter(|p| *p > 0) {
                    killed =
                        signal_verified(pid as i32, "--serve", &self.channel_id, &[libc::SIGKILL]);
                }
            }
        }
        let mut swept = true;
        if calls_in_flight || running {
            let argv = [SUPERVISOR, "--sweep"];
            let out = run_collect(
                &self.docker,
                &self.container,
                &uid,
                &argv,
                self.docker.timeout(),
                4096,
            )
            .await;
            swept = match out {
                Ok(o) => o.exit_code == Some(0),
                Err(e) => e.is_not_found() || e.is_conflict(),
            };
        }
        if !killed || !swept {
            tracing::warn!(user = %self.user, container = %self.container, "a dead channel's helper or calls could not be stopped: recycling the sandbox");
            if let Err(e) = self.pool.recycle(&self.user, &self.container_id).await {
                tracing::warn!(user = %self.user, error = %e, "could not recycle the sandbox");
            }
        }
        self.cleaned.cancel();
    }

    /// Writes one frame; a write that fails or stalls kills the channel.
    async fn send(self: &Arc<Self>, frame: Vec<u8>) -> bool {
        let timeout = self.docker.timeout();
        let mut writer = self.writer.lock().await;
        let Some(w) = writer.as_mut() else {
            return false;
        };
        let wrote = tokio::time::timeout(timeout, async {
            w.write_all(&frame).await?;
            w.flush().await
        })
        .await;
        drop(writer);
        match wrote {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                self.die(format!("writing to the helper failed: {e}"), false);
                false
            }
            Err(_) => {
                self.die(
                    format!(
                        "the helper took no input for {}",
                        humantime::format_duration(timeout)
                    ),
                    false,
                );
                false
            }
        }
    }

    /// Runs one call over the channel.
    pub(crate) async fn run(
        self: &Arc<Self>,
        lease: Lease,
        spec: &ProcessSpec,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, ChannelAttempt> {
        let cfg = self.pool.config();
        let (tx, mut rx) = oneshot::channel();
        let id = {
            let mut calls = self.calls.lock();
            if !self.alive() {
                return Err(ChannelAttempt::NotStarted);
            }
            let mut id = random_id();
            while id == 0 || calls.contains_key(&id) {
                id = random_id();
            }
            calls.insert(
                id,
                Pending {
                    stdout: Capture::new(cfg.output_cap),
                    stderr: Capture::new(cfg.output_cap),
                    started: false,
                    done: tx,
                },
            );
            id
        };
        let start = Start {
            timeout_ms: (spec.timeout + cfg.kill_grace + BACKSTOP).as_millis() as u64,
            grace_ms: cfg.kill_grace.as_millis() as u64,
            cap: cfg.output_cap as u64,
            workdir: super::docker::workdir_path(spec)
                .map(String::into_bytes)
                .unwrap_or_default(),
            argv: spec.argv.iter().map(|a| a.clone().into_bytes()).collect(),
            env: super::base_env(&spec.env)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
            program: spec.program.clone(),
        };
        let mut frame = Vec::new();
        proto::encode(&mut frame, proto::START, id, &start.encode());
        // From here the call may run: whatever ends this future stops it.
        let mut guard = CallGuard {
            channel: Some(self.clone()),
            id,
            _lease: lease,
        };
        self.send(frame).await;

        let deadline = tokio::time::Instant::now() + spec.timeout;
        let (mut timed_out, mut cancelled) = (false, false);
        let mut stop_at: Option<tokio::time::Instant> = None;
        let end = loop {
            let stopping = timed_out || cancelled;
            tokio::select! {
                end = &mut rx => break end.ok(),
                _ = tokio::time::sleep_until(deadline), if !stopping => {
                    timed_out = true;
                    self.cancel_call(id).await;
                    stop_at = Some(tokio::time::Instant::now() + cfg.kill_grace + STOP_MARGIN);
                }
                _ = cancel.cancelled(), if !stopping => {
                    cancelled = true;
                    self.cancel_call(id).await;
                    stop_at = Some(tokio::time::Instant::now() + cfg.kill_grace + STOP_MARGIN);
                }
                _ = super::docker::sleep_until_opt(stop_at) => {
                    self.die("the helper did not stop a call in time".into(), false);
                    stop_at = None;
                }
            }
        };
        guard.channel = None;
        let Some(end) = end else {
            // The sender is only dropped with the channel's state: treat as lost.
            return Err(ChannelAttempt::Failed(self.lost()));
        };
        let outcome = |exit_code: Option<i32>, end: End| ProcessOutcome {
            exit_code,
            stdout: end.stdout.finish(),
            stderr: end.stderr.finish(),
            timed_out,
            cancelled,
        };
        match end.kind {
            EndKind::Exit { status, signaled } => {
                if signaled {
                    tracing::info!(user = %self.user, container = %self.container, status, "a call's supervisor was killed inside the sandbox; the helper swept its orphans");
                }
                Ok(outcome(Some(status), end))
            }
            EndKind::Failed(reason) => Err(ChannelAttempt::Failed(Error::CallStart {
                container: self.container.clone(),
                reason,
            })),
            EndKind::Lost { .. } if timed_out || cancelled => {
                self.await_cleanup().await;
                Ok(outcome(None, end))
            }
            EndKind::Lost { started: false } => Err(ChannelAttempt::NotStarted),
            EndKind::Lost { started: true } => {
                self.await_cleanup().await;
                Err(ChannelAttempt::Failed(self.lost()))
            }
        }
    }

    fn lost(&self) -> Error {
        Error::ChannelLost {
            user: self.user.to_string(),
            container: self.container.clone(),
            reason: self.reason(),
        }
    }

    async fn await_cleanup(&self) {
        let bound = self.docker.timeout() * 2 + STOP_MARGIN + self.pool.config().kill_grace;
        let _ = tokio::time::timeout(bound, self.cleaned.cancelled()).await;
    }

    async fn cancel_call(self: &Arc<Self>, id: u64) {
        let mut frame = Vec::new();
        proto::encode(&mut frame, proto::CANCEL, id, &[]);
        self.send(frame).await;
    }
}

impl Pending {
    fn finish(self, kind: EndKind) {
        let _ = self.done.send(End {
            kind,
            stdout: self.stdout,
            stderr: self.stderr,
        });
    }
}

/// Stops the call if the future running it is dropped (caller gone): its processes must not
/// outlive it. Holds the lease until then, so the sandbox is not reaped under the call.
struct CallGuard {
    channel: Option<Arc<Channel>>,
    id: u64,
    _lease: Lease,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let Some(ch) = self.channel.take() else {
            return;
        };
        ch.calls.lock().remove(&self.id);
        let id = self.id;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { ch.cancel_call(id).await });
        }
    }
}

fn helper_error(container: &str, reason: &str) -> Error {
    Error::CallStart {
        container: container.to_owned(),
        reason: format!("the exec channel's helper did not come up: {reason}"),
    }
}

fn keep_some(buf: &mut Vec<u8>, bytes: &[u8]) {
    let room = HELPER_STDERR.saturating_sub(buf.len());
    buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

fn random_id() -> u64 {
    u64::from_str_radix(&super::new_call_id(), 16).unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64
    })
}
