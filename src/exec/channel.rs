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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use zcbot_supervise::proto::{self, Decoder, Start};

use super::session::{self, SessionInfo, SessionOutcome};

use super::live::{self, Tap};
use super::metrics::TransportStats;
use super::output::Capture;
use super::stop::{drive, signal_verified, CallStop, StopGuard};
use super::transport::{
    exec_spec, sweep, workdir_path, Attempt, Transport, BACKSTOP, STOP_MARGIN, SUPERVISOR,
};
use super::{ProcessOutcome, ProcessSpec};
use crate::engine::{Attached, Chunk, ExecStart, Input, Output, SharedEngine};
use crate::error::Error;
use crate::pool::{Lease, SandboxPool, SpareWarmer, WarmSpare};
use crate::user::UserId;

/// How long a container whose channel failed to open is served by per-call exec instead.
pub const FAILED_BACKOFF: Duration = Duration::from_secs(30);
/// The longest the helper may take to greet after its exec started.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of the helper's own stderr is kept for messages.
const HELPER_STDERR: usize = 2048;
/// A session's supervisor's own deadline: a backstop for a daemon gone without closing the
/// channel (the helper then stops everything anyway, on its input's end).
const SESSION_BACKSTOP: Duration = Duration::from_secs(7 * 24 * 3600);
/// A session being ended gets this long between SIGTERM and SIGKILL: its state is lost either way.
const SESSION_KILL_GRACE: Duration = Duration::from_millis(100);
/// Where a call runs unless it names a folder under it.
const WORKSPACE: &str = "/workspace";
/// A warm spare's helper older than this is dropped if the pool no longer holds its container.
const WARM_PRUNE_AFTER: Duration = Duration::from_secs(60);
/// How often a channel looks for idle sessions.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Each user's channel, opened on first use: the channel transport.
pub(crate) struct Channels {
    pool: SandboxPool,
    slots: DashMap<UserId, Arc<tokio::sync::Mutex<Slot>>>,
    /// Helpers started in warm spares (by container id), as the spare's reserved uid: the first
    /// call of the user that claims one takes it, if that user's uid is the spare's.
    warm: DashMap<String, (Instant, parking_lot::Mutex<Helper>)>,
    stats: Arc<TransportStats>,
}

/// A helper that greeted, not yet serving any user (its frames are read once it is a channel).
struct Helper {
    uid: String,
    exec_id: String,
    channel_id: String,
    output: Output,
    input: Input,
    decoder: Decoder,
}

#[derive(Default)]
struct Slot {
    channel: Option<Arc<Channel>>,
    /// A container whose channel failed, and when: its calls use per-call exec for a while.
    failed: Option<(String, Instant)>,
}

impl Transport for Channels {
    fn run<'a>(
        &'a self,
        lease: Lease,
        spec: &'a ProcessSpec,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<ProcessOutcome, Attempt>> {
        async move {
            let channel = self.get(&lease).await?;
            channel.run(lease, spec, cancel).await
        }
        .boxed()
    }
}

impl SpareWarmer for Channels {
    fn warm(&self, spare: WarmSpare) -> BoxFuture<'_, ()> {
        self.warm_spare(spare).boxed()
    }
}

impl Channels {
    pub(crate) fn new(pool: SandboxPool, stats: Arc<TransportStats>) -> Self {
        Channels {
            pool,
            slots: DashMap::new(),
            warm: DashMap::new(),
            stats,
        }
    }

    /// Starts a helper in a warm spare, as its reserved uid, for the first call of the user that
    /// claims it. At most one per container; one that cannot start is logged and left (the first
    /// call then opens a channel as usual).
    async fn warm_spare(&self, spare: WarmSpare) {
        // Each is taken by a first call or dropped with its container's death; these are the
        // ones a lost death event left (a claim in flight is neither ready nor live for a moment:
        // only old ones go).
        self.warm.retain(|id, (started, _)| {
            started.elapsed() < WARM_PRUNE_AFTER || self.pool.holds_container(id)
        });
        let uid = ids(spare.uid, spare.gid);
        let target = spare.container_id.clone();
        match Helper::start(self.pool.engine(), &target, &uid).await {
            Ok(Some(helper)) => {
                self.stats.warmed.inc();
                self.warm.insert(
                    spare.container_id,
                    (Instant::now(), parking_lot::Mutex::new(helper)),
                );
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(container = %target, error = %e, "could not start a warm spare's helper; its first call opens one")
            }
        }
    }

    /// The live channel into the lease's container, opening one if needed. [`Attempt::Gone`]
    /// when the container is not running, [`Attempt::Fallback`] when no channel can be had.
    async fn get(&self, lease: &Lease) -> Result<Arc<Channel>, Attempt> {
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
                return Err(Attempt::Fallback);
            }
        }
        if let Some(old) = st.channel.take() {
            old.die(
                "replaced by a channel into the user's current container".into(),
                true,
            );
        }
        self.prune();
        if let Some((_, (_, helper))) = self.warm.remove(container_id) {
            let helper = helper.into_inner();
            let uid = ids(lease.sandbox().uid, lease.sandbox().gid);
            if helper.uid == uid {
                self.stats.opens.inc();
                self.stats.warm_taken.inc();
                let ch = Channel::assemble(&self.pool, lease, helper, self.stats.clone());
                st.failed = None;
                st.channel = Some(ch.clone());
                return Ok(ch);
            }
            // A returning user (a uid of its own): the spare's helper ends with its input.
            tracing::debug!(user = %user, "the claimed spare's helper runs as another uid; opening the user's own");
            drop(helper);
        }
        match Channel::open(&self.pool, lease, self.stats.clone()).await {
            Ok(Some(ch)) => {
                self.stats.opens.inc();
                st.failed = None;
                st.channel = Some(ch.clone());
                Ok(ch)
            }
            Ok(None) => Err(Attempt::Gone(container_id.clone())),
            Err(e) => {
                tracing::warn!(user = %user, error = %e, "could not open the exec channel: this sandbox's calls use per-call exec for {}", humantime::format_duration(FAILED_BACKOFF));
                st.failed = Some((container_id.clone(), Instant::now()));
                Err(Attempt::Fallback)
            }
        }
    }

    /// Runs `code` in the user's Python session `name` over the lease's channel (a session lives
    /// in the channel's helper, whatever `ZCBOT_EXEC_TRANSPORT` says for calls).
    pub(crate) async fn run_session(
        &self,
        lease: Lease,
        name: &str,
        code: &str,
        timeout: Duration,
        tap: Option<&Tap>,
        cancel: &CancellationToken,
    ) -> Result<(ProcessOutcome, SessionOutcome), Attempt> {
        let channel = match self.get(&lease).await {
            Err(Attempt::Fallback) => {
                return Err(Attempt::Failed(Error::SessionsUnavailable {
                    reason: format!(
                        "the exec channel into sandbox {} could not be opened (see the daemon's \
                         log; it is tried again {} after it failed); calls without a session \
                         still run",
                        lease.sandbox().name,
                        humantime::format_duration(FAILED_BACKOFF)
                    ),
                }))
            }
            other => other?,
        };
        channel
            .run_session(lease, name, code, timeout, tap, cancel)
            .await
    }

    /// The user's live channel, if any (nothing is opened).
    async fn current(&self, user: &UserId) -> Option<Arc<Channel>> {
        let slot = self.slots.get(user)?.clone();
        let st = slot.lock().await;
        st.channel.clone().filter(|ch| ch.alive())
    }

    /// The user's Python sessions.
    pub(crate) async fn sessions(&self, user: &UserId) -> Vec<SessionInfo> {
        match self.current(user).await {
            Some(ch) => ch.sessions(),
            None => Vec::new(),
        }
    }

    /// Ends the user's session `name`; false when there is none.
    pub(crate) async fn end_session(&self, user: &UserId, name: &str) -> bool {
        match self.current(user).await {
            Some(ch) => ch.end_session(name).await,
            None => false,
        }
    }

    /// Makes the lease's container serve by per-call exec for a while (its channel keeps dying
    /// before calls start).
    pub(crate) async fn back_off(&self, lease: &Lease) {
        let slot = self.slots.entry(lease.user().clone()).or_default().clone();
        let mut st = slot.lock().await;
        st.failed = Some((lease.sandbox().container_id.clone(), Instant::now()));
        // A live channel here was opened meanwhile by another call and works: it stays (and
        // serves that user while it lives); only a dead one is let go.
        if st.channel.as_ref().is_some_and(|ch| !ch.alive()) {
            st.channel = None;
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

    /// The container `container_id` died: its channel dies too, ending its calls and closing its
    /// exec stream (which the engine may leave open under gVisor).
    pub(crate) async fn container_gone(&self, container_id: &str) {
        self.warm.remove(container_id);
        let slots: Vec<_> = self.slots.iter().map(|s| s.value().clone()).collect();
        for slot in slots {
            let mut st = slot.lock().await;
            if st
                .channel
                .as_ref()
                .is_some_and(|ch| ch.container_id == container_id)
            {
                if let Some(ch) = st.channel.take() {
                    ch.die("the sandbox died".into(), false);
                }
            }
        }
    }

    /// Closes every channel (the daemon is stopping): each helper stops its calls and exits.
    pub(crate) fn close_all(&self) {
        self.warm.clear();
        for slot in self.slots.iter() {
            if let Ok(mut st) = slot.try_lock() {
                if let Some(ch) = st.channel.take() {
                    ch.die("the daemon is closing its channels".into(), true);
                }
            }
        }
    }
}

/// How a call on the channel ended, with what it printed (and, for a session run, its reply).
struct End {
    kind: EndKind,
    stdout: Capture,
    stderr: Capture,
    reply: Option<Vec<u8>>,
    /// A session run's session had ended when the run's end arrived (the helper reports the
    /// session's end first).
    session_gone: bool,
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
    /// A session run's reply as it arrives (None for a call).
    reply: Option<Vec<u8>>,
    /// A session run's session (its helper id).
    session: Option<u64>,
    done: oneshot::Sender<End>,
}

/// A call about to be sent: its id and end's receiver (from `register`), the frames that start
/// it, and for a session run the hold on its session.
struct Outgoing {
    id: u64,
    rx: oneshot::Receiver<End>,
    frame: Vec<u8>,
    session: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// A call's end as [`Channel::exchange`] hands it back.
struct Done {
    end: End,
    timed_out: bool,
    cancelled: bool,
}

/// One Python session living in the channel's helper.
struct SessionEntry {
    name: String,
    /// The id its OPEN_SESSION frame carried: the helper's name for it.
    id: u64,
    started: SystemTime,
    /// Wall clock for the listing, monotonic for the idle limit.
    last_used: parking_lot::Mutex<(SystemTime, Instant)>,
    rss: AtomicU64,
    /// Held by the call running code in it (one at a time).
    busy: Arc<tokio::sync::Mutex<()>>,
    /// Cancelled when the helper reports the session's end.
    ended: CancellationToken,
    /// Why the helper could not start it.
    failure: parking_lot::Mutex<Option<String>>,
}

/// A channel's sessions: by name, those a run may use; by id, every one the helper still runs
/// (an ended or idle session leaves the names at once, so its name is free for a new one, and
/// stays by id until the helper reports its end).
#[derive(Default)]
struct Sessions {
    by_name: HashMap<String, Arc<SessionEntry>>,
    by_id: HashMap<u64, Arc<SessionEntry>>,
}

impl Sessions {
    /// Takes `name` off the names (the helper still runs it until it reports its end).
    fn retire(&mut self, name: &str) -> Option<Arc<SessionEntry>> {
        self.by_name.remove(name)
    }
}

impl SessionEntry {
    fn info(&self) -> SessionInfo {
        SessionInfo {
            name: self.name.clone(),
            started: session::rfc3339(self.started),
            last_used: session::rfc3339(self.last_used.lock().0),
            memory_bytes: self.rss.load(Ordering::Relaxed),
            running: self.busy.try_lock().is_err(),
        }
    }
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
    engine: SharedEngine,
    pool: SandboxPool,
    stats: Arc<TransportStats>,
    writer: tokio::sync::Mutex<Option<Input>>,
    calls: parking_lot::Mutex<HashMap<u64, Pending>>,
    /// The Python sessions in this channel's helper: they end with the channel.
    sessions: parking_lot::Mutex<Sessions>,
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

    /// Starts the helper in the lease's container and waits for its greeting. None: the
    /// container is not running.
    async fn open(
        pool: &SandboxPool,
        lease: &Lease,
        stats: Arc<TransportStats>,
    ) -> Result<Option<Arc<Channel>>, Error> {
        let uid = ids(lease.sandbox().uid, lease.sandbox().gid);
        let Some(helper) = Helper::start(pool.engine(), &lease.sandbox().name, &uid).await? else {
            return Ok(None);
        };
        Ok(Some(Channel::assemble(pool, lease, helper, stats)))
    }

    /// The channel of `lease`'s user over a helper that greeted; its frames are read from now.
    fn assemble(
        pool: &SandboxPool,
        lease: &Lease,
        helper: Helper,
        stats: Arc<TransportStats>,
    ) -> Arc<Channel> {
        let container = lease.sandbox().name.clone();
        let Helper {
            uid,
            exec_id,
            channel_id,
            output,
            input,
            decoder,
        } = helper;
        let channel = Arc::new(Channel {
            user: lease.user().clone(),
            container: container.clone(),
            container_id: lease.sandbox().container_id.clone(),
            uid,
            exec_id,
            channel_id,
            engine: pool.engine().clone(),
            pool: pool.clone(),
            stats,
            writer: tokio::sync::Mutex::new(Some(input)),
            calls: parking_lot::Mutex::new(HashMap::new()),
            sessions: parking_lot::Mutex::new(Sessions::default()),
            dead: CancellationToken::new(),
            reason: parking_lot::Mutex::new(None),
            cleaned: CancellationToken::new(),
        });
        tracing::debug!(user = %channel.user, container = %container, "exec channel open");
        pool.tasks()
            .spawn(channel.clone().read_loop(output, decoder));
        channel
    }
}

impl Helper {
    /// Starts `zcbot-supervise --serve` as `uid` in `container` (a name or an id) and waits for
    /// its greeting. None: the container is not running.
    async fn start(
        engine: &SharedEngine,
        container: &str,
        uid: &str,
    ) -> Result<Option<Helper>, Error> {
        let channel_id = super::new_call_id();
        let cmd = vec![
            SUPERVISOR.to_owned(),
            "--serve".to_owned(),
            channel_id.clone(),
        ];
        let mut spec = exec_spec(cmd, uid, super::base_env(&Default::default()), true);
        // Not `/workspace`: a warm spare's is closed (mode 000) until a claim mounts the user's
        // folder on it, and a helper sitting in it would keep the covered slot as its directory.
        spec.workdir = "/".to_owned();
        let Attached {
            id: exec_id,
            mut output,
            input,
        } = match engine.exec(container, spec).await? {
            ExecStart::Attached(a) => a,
            ExecStart::ContainerGone => return Ok(None),
        };
        let mut decoder = Decoder::new(proto::MAX_FROM_HELPER);
        let mut stderr = Vec::new();
        let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
            loop {
                match output.next().await {
                    Some(Ok(Chunk::Stderr(b))) => keep_some(&mut stderr, &b),
                    Some(Ok(Chunk::Stdout(b))) => decoder.push(&b),
                    Some(Err(e)) => return Err(format!("stream error: {e}")),
                    None => return Err("the helper exited before greeting".to_owned()),
                }
                let frame = match decoder.next_frame() {
                    Ok(None) => continue,
                    Ok(Some(f)) => f,
                    Err(e) => return Err(format!("malformed greeting: {e}")),
                };
                return match proto::FromHelper::decode(frame) {
                    Ok((_, proto::FromHelper::Hello { .. })) => Ok(()),
                    Ok((_, other)) => {
                        Err(format!("it sent {} first", proto::kind_name(other.kind())))
                    }
                    // Names both versions and says to rebuild the image.
                    Err(e @ proto::ProtoError::Version { .. }) => Err(e.to_string()),
                    Err(e) => Err(format!("malformed greeting: {e}")),
                };
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
            return Err(helper_error(container, &reason));
        }
        Ok(Some(Helper {
            uid: uid.to_owned(),
            exec_id,
            channel_id,
            output,
            input,
            decoder,
        }))
    }
}

impl Channel {
    /// Routes the helper's frames to the calls until the stream ends or breaks the protocol.
    async fn read_loop(self: Arc<Self>, mut output: Output, mut decoder: Decoder) {
        let mut stderr = Vec::new();
        // (reason, whether it can be a normal end: the container removed or stopped by the pool)
        let mut idle_check = tokio::time::interval(IDLE_CHECK);
        idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (reason, expected) = loop {
            if let Err(reason) = self.dispatch(&mut decoder) {
                break (reason, false);
            }
            tokio::select! {
                _ = idle_check.tick() => {
                    // On a task of its own: this loop must keep reading while it writes.
                    if !self.sessions.lock().by_name.is_empty() {
                        let ch = self.clone();
                        self.pool.tasks().spawn(async move { ch.end_idle_sessions().await });
                    }
                }
                item = output.next() => match item {
                    Some(Ok(Chunk::Stderr(b))) => keep_some(&mut stderr, &b),
                    Some(Ok(Chunk::Stdout(b))) => decoder.push(&b),
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
        use proto::{FromHelper, Stream};
        while let Some(f) = decoder
            .next_frame()
            .map_err(|e| format!("malformed frame from the helper: {e}"))?
        {
            let (id, msg) = FromHelper::decode(f)
                .map_err(|e| format!("malformed frame from the helper: {e}"))?;
            let mut calls = self.calls.lock();
            match msg {
                FromHelper::Hello { .. } => {
                    return Err("the helper greeted a second time".to_owned());
                }
                FromHelper::Started { .. } => {
                    if let Some(p) = calls.get_mut(&id) {
                        p.started = true;
                    }
                }
                FromHelper::Output { stream, bytes } => {
                    if let Some(p) = calls.get_mut(&id) {
                        p.started = true;
                        match stream {
                            Stream::Stdout => p.stdout.push(&bytes),
                            Stream::Stderr => p.stderr.push(&bytes),
                        }
                    }
                }
                FromHelper::Skipped { stream, n } => {
                    if let Some(p) = calls.get_mut(&id) {
                        match stream {
                            Stream::Stdout => p.stdout.skip(n),
                            Stream::Stderr => p.stderr.skip(n),
                        }
                    }
                }
                FromHelper::Exit { status, signaled } => match calls.remove(&id) {
                    Some(p) => {
                        let gone = p
                            .session
                            .is_some_and(|s| !self.sessions.lock().by_id.contains_key(&s));
                        p.finish(EndKind::Exit { status, signaled }, gone)
                    }
                    None => self.session_ended(id),
                },
                FromHelper::Failed { reason } => match calls.remove(&id) {
                    Some(p) => p.finish(EndKind::Failed(reason), false),
                    None => {
                        tracing::warn!(user = %self.user, container = %self.container, reason = %reason, "a Python session could not start");
                        if let Some(entry) = self.sessions.lock().by_id.get(&id) {
                            *entry.failure.lock() = Some(reason);
                        }
                        self.session_ended(id)
                    }
                },
                FromHelper::Reply { bytes } => {
                    let Some(reply) = calls.get_mut(&id).and_then(|p| p.reply.as_mut()) else {
                        return Err("the helper sent a reply for no session run".to_owned());
                    };
                    if reply.len() + bytes.len() > proto::MAX_REPLY {
                        return Err(format!(
                            "a session's reply is above the bound of {} bytes",
                            proto::MAX_REPLY
                        ));
                    }
                    reply.extend_from_slice(&bytes);
                }
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
        let sessions = std::mem::take(&mut *self.sessions.lock());
        for entry in sessions.by_id.into_values() {
            entry.ended.cancel();
        }
        let pending: Vec<Pending> = self.calls.lock().drain().map(|(_, p)| p).collect();
        if expected && pending.is_empty() {
            tracing::debug!(user = %self.user, container = %self.container, reason = %reason, "exec channel closed");
        } else {
            self.stats.deaths.inc();
            tracing::warn!(user = %self.user, container = %self.container, calls = pending.len(), reason = %reason, "exec channel died");
        }
        // A call not yet reported started may still have been forked (the helper queues its
        // STARTED frame after the fork): every pending call counts for the sweep.
        let in_flight = !pending.is_empty();
        for p in pending {
            let started = p.started;
            p.finish(EndKind::Lost { started }, true);
        }
        let ch = self.clone();
        self.pool
            .tasks()
            .spawn(async move { ch.clean_up(in_flight).await });
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
            match self.engine.exec_state(&self.exec_id).await {
                Ok(Some(state)) if state.running && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Ok(Some(state)) => break state.running,
                Ok(None) => {
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
            if let Ok(Some(state)) = self.engine.exec_state(&self.exec_id).await {
                if let Some(pid) = state.pid.filter(|p| *p > 0) {
                    killed =
                        signal_verified(pid as i32, "--serve", &self.channel_id, &[libc::SIGKILL]);
                }
            }
        }
        let swept = !(calls_in_flight || running)
            || sweep(self.engine.as_ref(), &self.container, &uid).await;
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
        let timeout = self.engine.timeout();
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

    /// A fresh call id, registered with its end's receiver; [`Attempt::NotStarted`] when the
    /// channel is dead.
    fn register(
        &self,
        session: Option<u64>,
        tap: Option<&Tap>,
    ) -> Result<(u64, oneshot::Receiver<End>), Attempt> {
        let (tx, rx) = oneshot::channel();
        let mut calls = self.calls.lock();
        if !self.alive() {
            return Err(Attempt::NotStarted);
        }
        let mut id = random_id();
        while id == 0 || calls.contains_key(&id) {
            id = random_id();
        }
        let cap = self.pool.config().output_cap;
        calls.insert(id, Pending::new(cap, tx, session, tap));
        Ok((id, rx))
    }

    /// Runs one call over the channel.
    async fn run(
        self: &Arc<Self>,
        lease: Lease,
        spec: &ProcessSpec,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, Attempt> {
        let cfg = self.pool.config();
        let (id, rx) = self.register(None, spec.tap.as_ref())?;
        let start = Start {
            timeout_ms: (spec.timeout + cfg.kill_grace + BACKSTOP).as_millis() as u64,
            grace_ms: cfg.kill_grace.as_millis() as u64,
            // A job's daemon keeps its latest output: the helper holds nothing back.
            cap: if spec.tap.as_ref().is_some_and(|t| t.all) {
                proto::NO_CAP
            } else {
                cfg.output_cap as u64
            },
            // Always named: the helper's own directory is `/` (a warm spare's helper started
            // before the user's folder was on `/workspace`), so a call resolves it afresh.
            workdir: workdir_path(spec)
                .unwrap_or_else(|| WORKSPACE.to_owned())
                .into_bytes(),
            argv: spec.argv.iter().map(|a| a.clone().into_bytes()).collect(),
            env: super::base_env(&spec.env)
                .into_iter()
                .map(String::into_bytes)
                .collect(),
            program: spec.program.clone(),
        };
        let mut frame = Vec::new();
        proto::ToHelper::Start(start).encode(id, &mut frame);
        let done = self
            .exchange(
                lease,
                Outgoing {
                    id,
                    rx,
                    frame,
                    session: None,
                },
                spec.timeout,
                cancel,
            )
            .await?;
        let exit_code = match done.end.kind {
            EndKind::Exit { status, signaled } => {
                if signaled {
                    tracing::info!(user = %self.user, container = %self.container, status, "a call's supervisor was killed inside the sandbox; the helper swept its orphans");
                }
                Some(status)
            }
            EndKind::Failed(reason) => {
                return Err(Attempt::Failed(Error::CallStart {
                    container: self.container.clone(),
                    reason,
                }))
            }
            // Only after a timeout or cancel (see exchange): the call is stopped either way.
            EndKind::Lost { .. } => None,
        };
        Ok(ProcessOutcome {
            exit_code,
            stdout: done.end.stdout.finish(),
            stderr: done.end.stderr.finish(),
            timed_out: done.timed_out,
            cancelled: done.cancelled,
        })
    }

    /// Sends `frame` (which starts call `id`, registered with `rx`) and drives the call to its
    /// end: its timeout and `cancel` send CANCEL, a dropped future stops it from its guard, a
    /// helper that does not stop it in time kills the channel. The lease is held until the call's
    /// processes are known gone. A call the channel lost is an error (retried when it had not
    /// started), except after a timeout or cancel, where it is the stop the caller asked for.
    async fn exchange(
        self: &Arc<Self>,
        lease: Lease,
        out: Outgoing,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Done, Attempt> {
        let Outgoing {
            id,
            mut rx,
            frame,
            session,
        } = out;
        // From here the call may run: whatever ends this future stops it.
        let grace = self.pool.config().kill_grace + STOP_MARGIN;
        let call = ChannelCall {
            channel: self.clone(),
            id,
            _session: session,
        };
        let guard = StopGuard::new(call, lease, grace, self.pool.tasks().clone());
        self.send(frame).await;

        let ended = drive(&mut rx, timeout, cancel, grace, || guard.call().stop()).await;
        let end = match ended.value {
            Some(end) => end.ok(),
            None => {
                // The helper did not stop the call: the channel dies, which ends every call on it
                // (this one as lost) and kills the helper and their processes.
                self.die("the helper did not stop a call in time".into(), false);
                (&mut rx).await.ok()
            }
        };
        let (_, lease) = guard.disarm();
        let (timed_out, cancelled) = (ended.timed_out, ended.cancelled);
        let Some(end) = end else {
            // The sender is only dropped with the channel's state: treat as lost.
            self.await_cleanup().await;
            return Err(Attempt::Failed(self.lost()));
        };
        let result = match end.kind {
            EndKind::Exit { .. } | EndKind::Failed(_) => Ok(()),
            EndKind::Lost { .. } if timed_out || cancelled => {
                self.await_cleanup().await;
                Ok(())
            }
            EndKind::Lost { started: false } => {
                // Its START may have reached the helper, which may have forked the call before
                // dying: run it again only once the dead channel's leftovers are swept.
                self.await_cleanup().await;
                Err(Attempt::NotStarted)
            }
            EndKind::Lost { started: true } => {
                self.await_cleanup().await;
                Err(Attempt::Failed(self.lost()))
            }
        };
        // The call's processes are known gone (ended, or the dead channel cleaned up).
        drop(lease);
        result.map(|()| Done {
            end,
            timed_out,
            cancelled,
        })
    }

    /// Runs `code` in the user's Python session `name`, starting it if it is not running.
    pub(crate) async fn run_session(
        self: &Arc<Self>,
        lease: Lease,
        name: &str,
        code: &str,
        timeout: Duration,
        tap: Option<&Tap>,
        cancel: &CancellationToken,
    ) -> Result<(ProcessOutcome, SessionOutcome), Attempt> {
        let cfg = self.pool.config();
        let (entry, busy, opened) = self.session_for(name)?;
        let mut frames = Vec::new();
        if opened {
            let mut env = super::base_env(&Default::default());
            env.extend(session::KERNEL_ENV.iter().map(|(k, v)| format!("{k}={v}")));
            env.extend(
                self.pool
                    .sandbox_env()
                    .iter()
                    .map(|(k, v)| format!("{k}={v}")),
            );
            let start = Start {
                // The session lives until it is ended: its supervisor's own deadline is only a
                // backstop against a daemon that vanished without closing the channel.
                timeout_ms: SESSION_BACKSTOP.as_millis() as u64,
                grace_ms: SESSION_KILL_GRACE.as_millis() as u64,
                cap: cfg.output_cap as u64,
                workdir: WORKSPACE.as_bytes().to_vec(),
                argv: vec![b"python3".to_vec()],
                env: env.into_iter().map(String::into_bytes).collect(),
                program: Some(session::KERNEL.as_bytes().to_vec()),
            };
            proto::ToHelper::OpenSession(start).encode(entry.id, &mut frames);
        }
        let (id, rx) = match self.register(Some(entry.id), tap) {
            Ok(r) => r,
            Err(e) => {
                entry.ended.cancel();
                return Err(e);
            }
        };
        proto::ToHelper::Run(proto::Run {
            session: entry.id,
            grace_ms: cfg.kill_grace.as_millis() as u64,
            cap: cfg.output_cap as u64,
            code: code.as_bytes().to_vec(),
        })
        .encode(id, &mut frames);
        let done = self
            .exchange(
                lease,
                Outgoing {
                    id,
                    rx,
                    frame: frames,
                    session: Some(busy),
                },
                timeout,
                cancel,
            )
            .await;
        let now = (SystemTime::now(), Instant::now());
        *entry.last_used.lock() = now;
        let done = done?;
        let mut outcome = SessionOutcome {
            session_started: opened,
            ..SessionOutcome::default()
        };
        let exit_code = match done.end.kind {
            EndKind::Failed(reason) => {
                let reason = entry.failure.lock().take().unwrap_or(reason);
                return Err(Attempt::Failed(Error::CallStart {
                    container: self.container.clone(),
                    reason: format!("the Python session could not run the code: {reason}"),
                }));
            }
            EndKind::Exit { status, .. } => {
                outcome.session_restarted = done.end.session_gone;
                match &done.end.reply {
                    Some(reply) if !outcome.session_restarted => {
                        let rss = outcome.read_reply(reply);
                        entry.rss.store(rss, Ordering::Relaxed);
                        Some(i32::from(outcome.error.is_some()))
                    }
                    _ => Some(status),
                }
            }
            EndKind::Lost { .. } => {
                outcome.session_restarted = true;
                None
            }
        };
        if outcome.session_restarted {
            tracing::info!(user = %self.user, session = %entry.name, "a Python session was killed (its code did not stop in time) or exited");
        }
        let process = ProcessOutcome {
            exit_code,
            stdout: done.end.stdout.finish(),
            stderr: done.end.stderr.finish(),
            timed_out: done.timed_out,
            cancelled: done.cancelled,
        };
        Ok((process, outcome))
    }

    /// The session `name` and its busy guard, opening it (true) when it is not running. Typed
    /// errors when it is busy or the user has the most sessions allowed.
    fn session_for(
        &self,
        name: &str,
    ) -> Result<(Arc<SessionEntry>, tokio::sync::OwnedMutexGuard<()>, bool), Attempt> {
        let cfg = self.pool.config();
        let mut table = self.sessions.lock();
        if !self.alive() {
            return Err(Attempt::NotStarted);
        }
        table.by_name.retain(|_, e| !e.ended.is_cancelled());
        if let Some(entry) = table.by_name.get(name) {
            // Taken under the table's lock: nobody can run in a session before it is opened.
            let busy = entry.busy.clone().try_lock_owned().map_err(|_| {
                Attempt::Failed(Error::SessionBusy {
                    user: self.user.to_string(),
                    name: name.to_owned(),
                })
            })?;
            // Used from now: the idle ender checks this under the same lock.
            *entry.last_used.lock() = (SystemTime::now(), Instant::now());
            return Ok((entry.clone(), busy, false));
        }
        if table.by_name.len() >= cfg.python_sessions_max {
            return Err(Attempt::Failed(Error::TooManySessions {
                user: self.user.to_string(),
                max: cfg.python_sessions_max,
            }));
        }
        // Not checked against the calls' ids (dispatch takes the calls' lock, then this one): a
        // collision of 64 random bits is refused by the helper, not run as something else.
        let mut id = random_id();
        while id == 0 || table.by_id.contains_key(&id) {
            id = random_id();
        }
        let entry = Arc::new(SessionEntry {
            name: name.to_owned(),
            id,
            started: SystemTime::now(),
            last_used: parking_lot::Mutex::new((SystemTime::now(), Instant::now())),
            rss: AtomicU64::new(0),
            busy: Arc::new(tokio::sync::Mutex::new(())),
            ended: CancellationToken::new(),
            failure: parking_lot::Mutex::new(None),
        });
        let busy = entry
            .busy
            .clone()
            .try_lock_owned()
            .expect("a new session's lock is free");
        table.by_name.insert(name.to_owned(), entry.clone());
        table.by_id.insert(id, entry.clone());
        Ok((entry, busy, true))
    }

    /// The helper reported the end of `id`, a session (or a call already ended).
    fn session_ended(&self, id: u64) {
        let mut table = self.sessions.lock();
        if let Some(entry) = table.by_id.remove(&id) {
            entry.ended.cancel();
            if table.by_name.get(&entry.name).is_some_and(|e| e.id == id) {
                table.by_name.remove(&entry.name);
            }
        }
    }

    /// The sessions running in this channel's helper.
    pub(crate) fn sessions(&self) -> Vec<SessionInfo> {
        let mut list: Vec<SessionInfo> = self
            .sessions
            .lock()
            .by_name
            .values()
            .filter(|e| !e.ended.is_cancelled())
            .map(|e| e.info())
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Ends the session `name` (its whole process tree, a run in it included); false when there
    /// is none. Its name is free at once.
    pub(crate) async fn end_session(self: &Arc<Self>, name: &str) -> bool {
        let entry = self.sessions.lock().retire(name);
        match entry.filter(|e| !e.ended.is_cancelled()) {
            Some(entry) => {
                self.stop_session(&entry).await;
                true
            }
            None => false,
        }
    }

    /// Asks the helper to kill a session and waits for its end (bounded: the channel dies,
    /// ending it, if the helper does not answer).
    async fn stop_session(self: &Arc<Self>, entry: &SessionEntry) {
        let mut frame = Vec::new();
        proto::ToHelper::Cancel.encode(entry.id, &mut frame);
        if self.send(frame).await {
            let bound = SESSION_KILL_GRACE + STOP_MARGIN;
            let _ = tokio::time::timeout(bound, entry.ended.cancelled()).await;
        }
    }

    /// Ends the sessions that ran no code for `ZCBOT_PYTHON_SESSION_IDLE`. Each is taken off the
    /// names with its run lock held, so a run racing this either got it first (and the session
    /// is not idle) or starts a new session.
    async fn end_idle_sessions(self: &Arc<Self>) {
        let idle = self.pool.config().python_session_idle;
        let stale: Vec<(Arc<SessionEntry>, tokio::sync::OwnedMutexGuard<()>)> = {
            let mut table = self.sessions.lock();
            let names: Vec<String> = table
                .by_name
                .values()
                .filter(|e| e.last_used.lock().1.elapsed() >= idle)
                .map(|e| e.name.clone())
                .collect();
            names
                .into_iter()
                .filter_map(|name| {
                    let busy = table
                        .by_name
                        .get(&name)?
                        .busy
                        .clone()
                        .try_lock_owned()
                        .ok()?;
                    table.retire(&name).map(|e| (e, busy))
                })
                .collect()
        };
        for (entry, _busy) in stale {
            tracing::info!(user = %self.user, session = %entry.name, "ending an idle Python session (ZCBOT_PYTHON_SESSION_IDLE)");
            self.stop_session(&entry).await;
        }
    }

    fn lost(&self) -> Error {
        Error::ChannelLost {
            user: self.user.to_string(),
            container: self.container.clone(),
            reason: self.reason(),
            removed_by: None,
        }
    }

    async fn await_cleanup(&self) {
        let bound = self.engine.timeout() * 2 + STOP_MARGIN + self.pool.config().kill_grace;
        let _ = tokio::time::timeout(bound, self.cleaned.cancelled()).await;
    }

    async fn cancel_call(self: &Arc<Self>, id: u64) {
        let mut frame = Vec::new();
        proto::ToHelper::Cancel.encode(id, &mut frame);
        self.send(frame).await;
    }
}

impl Pending {
    fn new(
        cap: usize,
        done: oneshot::Sender<End>,
        session: Option<u64>,
        tap: Option<&Tap>,
    ) -> Self {
        Pending {
            stdout: Capture::tapped(cap, tap, live::Stream::Stdout),
            stderr: Capture::tapped(cap, tap, live::Stream::Stderr),
            started: false,
            reply: session.map(|_| Vec::new()),
            session,
            done,
        }
    }

    fn finish(self, kind: EndKind, session_gone: bool) {
        let _ = self.done.send(End {
            kind,
            stdout: self.stdout,
            stderr: self.stderr,
            reply: self.reply,
            session_gone,
        });
    }
}

/// One call on a channel, to stop it.
struct ChannelCall {
    channel: Arc<Channel>,
    id: u64,
    /// A session run's hold on its session: released only once the run is known to have ended
    /// (a dropped request's run is still being interrupted meanwhile).
    _session: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl CallStop for ChannelCall {
    fn stop(&self) -> BoxFuture<'_, ()> {
        self.channel.cancel_call(self.id).boxed()
    }

    /// Gone: its end arrived (its entry left the table), or the channel died and was cleaned up.
    fn wait_gone(&self, until: tokio::time::Instant) -> BoxFuture<'_, bool> {
        async move {
            loop {
                if !self.channel.alive() {
                    let left = until.saturating_duration_since(tokio::time::Instant::now());
                    return tokio::time::timeout(left, self.channel.cleaned.cancelled())
                        .await
                        .is_ok();
                }
                if !self.channel.calls.lock().contains_key(&self.id) {
                    return true;
                }
                if tokio::time::Instant::now() >= until {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        .boxed()
    }

    fn force(&self) -> BoxFuture<'_, ()> {
        async move {
            self.channel.die(
                "the helper did not stop a dropped call in time".into(),
                false,
            );
            self.channel.await_cleanup().await;
        }
        .boxed()
    }
}

/// `uid:gid`, as an exec names the user it runs as.
fn ids(uid: u32, gid: u32) -> String {
    format!("{uid}:{gid}")
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
