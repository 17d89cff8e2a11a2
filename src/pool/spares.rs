//! Warm spares: started, hardened sandboxes with their rules in place that belong to no user yet,
//! so a new user's first call skips the container's creation and start.
//!
//! A spare's `/workspace` is an empty workspace slot ([`super::mounts`]). A claim, under the
//! user's gate: records the claim ([`super::claims`]), binds the user's folder onto the slot,
//! checks from the host that the container now shows that folder at `/workspace`, and renames
//! the container to the user's. Only then does any lease name the container: until a claim has
//! finished, no user's call can reach a spare, and a claim that fails after the mount removes
//! the container, so a spare that has seen one user's folder never serves another. The claim
//! runs as a task of its own, so a caller that goes away cannot stop it half way.
//!
//! Spares count against `ZCBOT_SANDBOX_MAX`, are never paused or reaped (they are not users),
//! carry a config hash of their own (without the user's parts), and are adopted at startup when
//! current and untouched. A replacement is made in the background after every claim.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use futures_util::future::BoxFuture;

use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use super::claims::ClaimLog;
use super::mounts::WorkspaceSlots;
use super::spec::{self, LABEL_CONFIG_HASH, LABEL_CREATED_AT};
use super::{blocking, Ready, Sandbox, SandboxPool, Slot, StartingGuard};
use crate::config::{Config, Runtime};
use crate::engine::{Created, Renamed, State};
use crate::error::{Error, Result};
use crate::user::UserId;
use crate::users_root::UserFolder;

/// Spares made at once.
const MAKE_PARALLEL: usize = 4;

/// A started spare with its rules in place.
#[derive(Debug, Clone)]
pub(crate) struct Spare {
    id: String,
    name: String,
    token: String,
    pid: i32,
    netns: Option<(i32, String)>,
    /// The uid and gid reserved for it (given to a brand-new user at the claim).
    uid: u32,
    gid: u32,
    /// Whether the warmer (if any) has seen it.
    warmed: bool,
}

/// A spare about to be offered, for the layer above the pool to prepare what a first call needs.
#[derive(Debug, Clone)]
pub struct WarmSpare {
    /// Docker's id (a claim renames the container; the id stays).
    pub container_id: String,
    /// The uid and gid reserved for the spare: a brand-new user that claims it runs as them.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
}

/// What the exec layer does to each spare before it is offered: start the exec channel's helper
/// as the spare's uid, so a brand-new user's first call skips that exec. The pool holds it weakly
/// (the exec layer holds the pool) and calls it from the spare maker, never from a claim.
pub trait SpareWarmer: Send + Sync {
    /// Prepares `spare`; failures are the warmer's to log (a cold first call follows).
    fn warm(&self, spare: WarmSpare) -> BoxFuture<'_, ()>;
}

/// Why a new user's first call did not run on a spare (`zcbot_spare_fallbacks{reason}`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fallback {
    /// Every spare was taken.
    NoneReady,
    /// This daemon cannot mount a folder into a started sandbox (not root, or gVisor).
    Unsupported,
    /// A claim failed half way; the spare was removed.
    ClaimFailed,
}

impl Fallback {
    pub(crate) const ALL: [Fallback; 3] = [
        Fallback::NoneReady,
        Fallback::Unsupported,
        Fallback::ClaimFailed,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Fallback::NoneReady => "none_ready",
            Fallback::Unsupported => "unsupported",
            Fallback::ClaimFailed => "claim_failed",
        }
    }
}

/// The pool's spares and what it needs to make and claim them.
pub(crate) struct Spares {
    state: parking_lot::Mutex<SpareState>,
    wake: tokio::sync::Notify,
    slots: Option<WorkspaceSlots>,
    pub(crate) claims: ClaimLog,
    /// Why this pool cannot make spares, if it cannot.
    unsupported: Option<String>,
    /// How many spares to keep; 0 until the maker runs (only the daemon's lifecycle task makes
    /// and claims spares, never a one-shot command).
    target: AtomicUsize,
    /// `ZCBOT_SPARES` asked for spares this pool cannot make: every new user counts a fallback.
    counting_unsupported: AtomicBool,
    /// The config hash every current spare carries.
    pub(crate) hash: String,
    /// What prepares each spare before it is offered (the exec channels), if anything.
    warmer: parking_lot::Mutex<Option<Weak<dyn SpareWarmer>>>,
}

#[derive(Default)]
struct SpareState {
    ready: Vec<Spare>,
    making: usize,
    /// Slots whose container is being created: none is swept before its container can exist.
    making_slots: HashSet<String>,
    /// Spares to remove whose removal failed (the engine answered an error): retried by the
    /// maker, and counted in the pool until gone.
    discards: Vec<Spare>,
    /// Containers of claims under way (neither ready nor a user's yet).
    claiming: HashSet<String>,
}

impl SpareState {
    /// Spares ready, being made or awaiting removal: places in the pool.
    fn held(&self) -> usize {
        self.ready.len() + self.making + self.discards.len()
    }
}

/// A claim under way of the spare with this container id, in [`SpareState`]'s `claiming` until
/// dropped.
struct Claiming<'a>(&'a Spares, String);

impl Drop for Claiming<'_> {
    fn drop(&mut self) {
        self.0.state.lock().claiming.remove(&self.1);
    }
}

/// What [`SandboxPool::sweep_slots`] read before listing the containers.
struct OnDisk {
    tokens: Vec<String>,
    /// Tokens of spares holding a uid.
    reserved: Vec<String>,
    claim_ids: Vec<String>,
    making: HashSet<String>,
}

/// What a claim came to.
enum Claim {
    Claimed(Sandbox),
    /// The spare was not used (the user already has a container, or its folder cannot be made
    /// ready: the bring-up that follows reports it); it goes back to the ready ones.
    NotUsed,
    /// It failed after the spare had the user's folder: the spare is removed.
    Failed(Error),
}

impl Spares {
    /// The spares of a pool with `config`, `hash` their config hash. A pool on a test engine
    /// (`real_host` false) makes none: its containers have no processes to mount into.
    pub(crate) fn open(config: &Config, hash: String, real_host: bool) -> Result<Self> {
        let claims = ClaimLog::open(&config.state_dir, &config.pool_id)?;
        let (slots, mut unsupported) = if !real_host {
            (None, Some("the pool runs on a test engine".into()))
        } else if nix::unistd::geteuid().is_root() {
            match WorkspaceSlots::open(&config.state_dir, &config.pool_id) {
                Ok(slots) => (Some(slots), None),
                Err(e) => (
                    None,
                    Some(format!("the workspace slots cannot be made: {e}")),
                ),
            }
        } else {
            (
                None,
                Some("mounting a user's folder into a started sandbox needs a root daemon".into()),
            )
        };
        if config.runtime == Runtime::Runsc && unsupported.is_none() {
            unsupported = Some(
                "under ZCBOT_SANDBOX_RUNTIME=runsc a folder mounted after the start does not reach the sandbox (gVisor serves its files from what it saw at start)".into(),
            );
        }
        Ok(Spares {
            state: parking_lot::Mutex::new(SpareState::default()),
            wake: tokio::sync::Notify::new(),
            slots,
            claims,
            unsupported,
            target: AtomicUsize::new(0),
            counting_unsupported: AtomicBool::new(false),
            hash,
            warmer: parking_lot::Mutex::new(None),
        })
    }

    /// Spares ready to be claimed now.
    pub(crate) fn ready(&self) -> usize {
        self.state.lock().ready.len()
    }

    /// Takes a ready spare out (for its place in the pool).
    pub(crate) fn take_ready(&self) -> Option<Spare> {
        self.state.lock().ready.pop()
    }

    /// Forgets the ready spares (their containers were removed).
    pub(crate) fn forget_ready(&self) {
        self.state.lock().ready.clear();
    }

    /// Spares ready or being made (they count against `ZCBOT_SANDBOX_MAX`).
    pub(crate) fn held(&self) -> usize {
        self.state.lock().held()
    }
}

/// A spare's tag in the uid map: `<pool>.<token>`.
fn uid_tag(pool: &str, token: &str) -> String {
    format!("{pool}.{token}")
}

impl SandboxPool {
    /// Sets what prepares each spare before it is offered (replacing an earlier one). Spares
    /// already ready are prepared at the maker's next pass.
    pub fn set_spare_warmer(&self, warmer: Weak<dyn SpareWarmer>) {
        *self.inner.spares.warmer.lock() = Some(warmer);
        self.inner.spares.wake.notify_one();
    }

    /// Has the warmer, if one is set, prepare `spare`; true if one was set.
    async fn warm(&self, spare: &Spare) -> bool {
        let warmer = self
            .inner
            .spares
            .warmer
            .lock()
            .as_ref()
            .and_then(Weak::upgrade);
        let Some(warmer) = warmer else {
            return false;
        };
        warmer
            .warm(WarmSpare {
                container_id: spare.id.clone(),
                uid: spare.uid,
                gid: spare.gid,
            })
            .await;
        true
    }

    /// Prepares ready spares the warmer has not seen (adopted at startup, or made before it was
    /// set). They are out of the ready list meanwhile (counted as being made), so no claim takes
    /// one half prepared.
    async fn warm_ready(&self) {
        let spares = &self.inner.spares;
        let gone = spares
            .warmer
            .lock()
            .as_ref()
            .is_none_or(|w| w.strong_count() == 0);
        if gone {
            return;
        }
        let cold: Vec<Spare> = {
            let mut st = spares.state.lock();
            let (cold, warm) = std::mem::take(&mut st.ready)
                .into_iter()
                .partition(|s: &Spare| !s.warmed);
            st.ready = warm;
            st.making += cold.len();
            cold
        };
        futures_util::future::join_all(cold.into_iter().map(|mut spare| async move {
            spare.warmed = self.warm(&spare).await;
            let mut st = spares.state.lock();
            st.making -= 1;
            st.ready.push(spare);
        }))
        .await;
    }

    /// Whether the container `id` is a ready spare, one being claimed, or a user's live sandbox
    /// here.
    pub fn holds_container(&self, id: &str) -> bool {
        {
            let st = self.inner.spares.state.lock();
            if st.claiming.contains(id) || st.ready.iter().chain(&st.discards).any(|s| s.id == id) {
                return true;
            }
        }
        self.inner.slots.iter().any(|slot| {
            slot.state
                .lock()
                .live
                .as_ref()
                .is_some_and(|s| s.container_id == id)
        })
    }

    /// Spares ready to be claimed now.
    pub fn spares_ready(&self) -> usize {
        self.inner.spares.ready()
    }

    /// Runs the spare maker until `stop`: keeps `ZCBOT_SPARES` spares (room allowing), woken by
    /// every claim, and every `ZCBOT_SANDBOX_REAP_EVERY` also releases the workspace slots of
    /// containers that are gone.
    pub(crate) async fn run_spare_maker(&self, stop: CancellationToken) {
        let spares = &self.inner.spares;
        let wanted = self.inner.config.spares;
        if wanted > 0 {
            match &spares.unsupported {
                Some(why) => {
                    tracing::warn!(reason = %why, "ZCBOT_SPARES: no warm spares here; every new user's first sandbox is started cold");
                    spares.counting_unsupported.store(true, Ordering::Relaxed);
                }
                None => spares.target.store(wanted, Ordering::Relaxed),
            }
        }
        let mut swept: Option<std::time::Instant> = None;
        loop {
            let retry = std::mem::take(&mut spares.state.lock().discards);
            for spare in retry {
                self.discard_spare(spare).await;
            }
            self.drop_dead_spares().await;
            self.warm_ready().await;
            self.fill_spares().await;
            // Every claim wakes the maker; the sweep (a listing) runs once a period.
            if swept.is_none_or(|at| at.elapsed() >= self.inner.config.reap_every) {
                self.sweep_slots().await;
                swept = Some(std::time::Instant::now());
            }
            tokio::select! {
                _ = spares.wake.notified() => {}
                _ = tokio::time::sleep(self.inner.config.reap_every) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Makes spares until there are `target` (ready or being made) or the pool has no room;
    /// stops at the first failure until the next wake.
    async fn fill_spares(&self) {
        loop {
            let n = self.reserve_spares();
            if n == 0 {
                return;
            }
            let results = futures_util::future::join_all((0..n).map(|_| self.make_spare())).await;
            let mut failed = false;
            for r in results {
                let mut st = self.inner.spares.state.lock();
                st.making -= 1;
                match r {
                    Ok(spare) => st.ready.push(spare),
                    Err(e) => {
                        failed = true;
                        drop(st);
                        tracing::warn!(error = %e, kind = e.kind(), "could not make a warm spare; trying again later");
                    }
                }
            }
            if failed {
                return;
            }
        }
    }

    /// Removes ready spares that no longer show their empty slot at `/workspace` (stopped or
    /// killed from outside), so they are replaced rather than claimed and failed.
    async fn drop_dead_spares(&self) {
        let spares = &self.inner.spares;
        let Some(slots) = spares.slots.clone() else {
            return;
        };
        let ready: Vec<(String, i32)> = spares
            .state
            .lock()
            .ready
            .iter()
            .map(|s| (s.token.clone(), s.pid))
            .collect();
        let dead = blocking(move || {
            Ok(ready
                .into_iter()
                .filter(|(token, pid)| !WorkspaceSlots::shows(*pid, &slots.path(token)))
                .map(|(token, _)| token)
                .collect::<Vec<_>>())
        })
        .await
        .unwrap_or_default();
        for token in dead {
            let spare = {
                let mut st = spares.state.lock();
                let Some(i) = st.ready.iter().position(|s| s.token == token) else {
                    continue;
                };
                st.ready.swap_remove(i)
            };
            tracing::info!(container = %spare.name, "a warm spare died: replacing it");
            self.discard_spare(spare).await;
        }
    }

    /// Reserves room for up to [`MAKE_PARALLEL`] more spares; returns how many.
    fn reserve_spares(&self) -> usize {
        let spares = &self.inner.spares;
        let target = spares.target.load(Ordering::Relaxed);
        if target == 0 {
            return 0;
        }
        let _admission = self.inner.admission.lock();
        let users = self.occupied_by_users();
        let mut st = spares.state.lock();
        let held = st.held();
        let room = self
            .inner
            .config
            .max_containers
            .saturating_sub(users + held);
        let n = target.saturating_sub(held).min(room).min(MAKE_PARALLEL);
        st.making += n;
        n
    }

    /// Makes one spare: a fresh slot, the container on it, started, its rules in place. Anything
    /// made is removed again if a step fails.
    async fn make_spare(&self) -> Result<Spare> {
        let spares = &self.inner.spares;
        let slots = spares.slots.clone().ok_or_else(|| Error::SandboxStart {
            user: "a warm spare".into(),
            container: String::new(),
            reason: "this pool cannot make spares".into(),
            log: String::new(),
        })?;
        let token = super::mounts::new_token()?;
        // Marked before the slot exists, until its container does (see sweep_slots_except).
        spares.state.lock().making_slots.insert(token.clone());
        let created = {
            let (slots, token) = (slots.clone(), token.clone());
            blocking(move || slots.create(&token)).await
        };
        let tag = uid_tag(&self.inner.config.pool_id, &token);
        let ids = match created {
            Ok(()) => {
                let (users, tag) = (self.inner.users.clone(), tag.clone());
                blocking(move || users.spare_ids(&tag)).await
            }
            Err(e) => Err(e),
        };
        let (uid, gid) = match ids {
            Ok(ids) => ids,
            Err(e) => {
                spares.state.lock().making_slots.remove(&token);
                self.release_slot(&token).await;
                return Err(e);
            }
        };
        let (mut body, hash) =
            self.inner
                .template
                .build_spare(&self.inner.config, &slots.path(&token), &token);
        if let Some(labels) = body.labels.as_mut() {
            labels.insert(LABEL_CONFIG_HASH.to_owned(), hash);
            labels.insert(
                LABEL_CREATED_AT.to_owned(),
                humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            );
        }
        let name = spec::spare_name(&self.inner.config.pool_id, &token);
        let made = async {
            let created = self.inner.engine.create(&name, &body).await;
            spares.state.lock().making_slots.remove(&token);
            match created? {
                Created::Created(_) => {}
                Created::NameTaken => {
                    return Err(Error::SandboxStart {
                        user: "a warm spare".into(),
                        container: name.clone(),
                        reason: "its name is taken (a fresh slot's name should be unique)".into(),
                        log: String::new(),
                    })
                }
            }
            self.inner.engine.start(&name).await?;
            self.wait_rules("a warm spare", &name).await
        }
        .await;
        match made {
            Ok(Ready { id, pid, netns }) => {
                let mut spare = Spare {
                    id,
                    name,
                    token,
                    pid,
                    netns,
                    uid,
                    gid,
                    warmed: false,
                };
                spare.warmed = self.warm(&spare).await;
                Ok(spare)
            }
            Err(e) => {
                let _ = self.remove_container(&name).await;
                self.release_slot(&token).await;
                Err(e)
            }
        }
    }

    /// A new user's sandbox from a spare, if one is ready and the claim works (the caller holds
    /// `user`'s gate, passed in; its slot has no sandbox). The claim runs as a task of its own
    /// that holds the gate and the slot's `starting` mark, and makes a claimed spare the slot's
    /// live sandbox itself: a caller that goes away (a dropped request) can stop neither the
    /// claim half way nor lose its result. Returns the sandbox (None: bring one up cold) and the
    /// gate.
    pub(super) async fn try_claim(
        &self,
        user: &UserId,
        slot: &Arc<Slot>,
        gate: OwnedMutexGuard<()>,
    ) -> (Option<Sandbox>, OwnedMutexGuard<()>) {
        let spares = &self.inner.spares;
        if user.is_internal() {
            return (None, gate);
        }
        if spares.target.load(Ordering::Relaxed) == 0 {
            if spares.counting_unsupported.load(Ordering::Relaxed) {
                self.inner.counters.fallback(Fallback::Unsupported);
            }
            return (None, gate);
        }
        let spare = {
            let _admission = self.inner.admission.lock();
            let mut st = spares.state.lock();
            let spare = st.ready.pop();
            if let Some(s) = &spare {
                st.claiming.insert(s.id.clone());
            }
            drop(st);
            if spare.is_some() {
                // Counted as this user's from now on, as it stops counting as a spare.
                slot.state.lock().starting = true;
            }
            spare
        };
        let Some(spare) = spare else {
            self.inner.counters.fallback(Fallback::NoneReady);
            return (None, gate);
        };
        spares.wake.notify_one();
        let pool = self.clone();
        let (task_user, task_slot) = (user.clone(), slot.clone());
        let joined = self
            .inner
            .tasks
            .spawn(async move {
                let _starting = StartingGuard(&task_slot);
                // Out of the claiming set however the task ends (its spare is then ready again,
                // a user's, or removed).
                let _claiming = Claiming(&pool.inner.spares, spare.id.clone());
                let claim = pool.claim(&task_user, spare).await;
                if let Claim::Claimed(sandbox) = &claim {
                    let persist = {
                        let mut st = task_slot.state.lock();
                        st.set_live(Some(sandbox.clone()));
                        st.paused = false;
                        super::touch(&mut st)
                    };
                    pool.persist(&task_user, persist);
                }
                (claim, gate)
            })
            .await;
        let (claimed, gate) = match joined {
            Ok(done) => done,
            Err(e) => {
                // The task panicked (its gate dropped with it): take the gate again.
                let gate = slot.gate.clone().lock_owned().await;
                let e = Error::io(
                    "claim a warm spare",
                    "-",
                    std::io::Error::other(e.to_string()),
                );
                (Claim::Failed(e), gate)
            }
        };
        match claimed {
            Claim::Claimed(sandbox) => (Some(sandbox), gate),
            Claim::NotUsed => (None, gate),
            Claim::Failed(e) => {
                tracing::warn!(user = %user, error = %e, "claiming a warm spare failed; starting a sandbox cold");
                self.inner.counters.fallback(Fallback::ClaimFailed);
                (None, gate)
            }
        }
    }

    /// The claim's steps (see the module docs); a failure after the mount removes the spare.
    async fn claim(&self, user: &UserId, spare: Spare) -> Claim {
        let spares = &self.inner.spares;
        let name = self.container_name(user);
        let tag = uid_tag(&self.inner.config.pool_id, &spare.token);
        // A spare goes back only while its uid is still its own: a brand-new user takes it in
        // the preparation, and the spare's helper then runs as that user's uid.
        let not_used = |spare: Spare| async {
            let held = {
                let (users, tag) = (self.inner.users.clone(), tag.clone());
                blocking(move || users.spare_ids_held(&tag)).await
            };
            if matches!(held, Ok(Some(ids)) if ids == (spare.uid, spare.gid)) {
                spares.state.lock().ready.push(spare);
            } else {
                self.discard_spare(spare).await;
            }
            Claim::NotUsed
        };
        if !matches!(self.inner.engine.inspect(&name).await, Ok(None)) {
            return not_used(spare).await;
        }
        let folder = {
            let (users, user, tag) = (self.inner.users.clone(), user.clone(), tag.clone());
            blocking(move || users.prepare_offered(&user, Some(&tag))).await
        };
        let Ok(folder) = folder else {
            return not_used(spare).await;
        };
        let Some(slots) = spares.slots.clone() else {
            return not_used(spare).await;
        };
        let recorded = {
            let (claims, id, user) = (spares.claims.clone(), spare.id.clone(), user.clone());
            blocking(move || claims.record(&id, &user)).await
        };
        if let Err(e) = recorded {
            spares.claims.forget(&spare.id);
            tracing::warn!(error = %e, "could not record a claim; starting a sandbox cold");
            return not_used(spare).await;
        }
        let mounted = {
            let (token, path, pid) = (spare.token.clone(), folder.path.clone(), spare.pid);
            blocking(move || {
                slots.bind(&token, &path)?;
                if WorkspaceSlots::shows(pid, &path) {
                    Ok(())
                } else {
                    Err(Error::io(
                        "check a claimed spare's /workspace",
                        &path,
                        std::io::Error::other(
                            "the container does not show the user's folder at /workspace",
                        ),
                    ))
                }
            })
            .await
        };
        let renamed = match mounted {
            Ok(()) => self
                .inner
                .engine
                .rename(&spare.id, &name)
                .await
                .map_err(Error::from),
            Err(e) => Err(e),
        };
        let failure = match renamed {
            Ok(Renamed::Renamed) => None,
            Ok(Renamed::NameTaken) => Some(Error::SandboxStart {
                user: user.to_string(),
                container: name.clone(),
                reason: "another container took the user's name during the claim".into(),
                log: String::new(),
            }),
            Ok(Renamed::Gone) => Some(Error::SandboxStart {
                user: user.to_string(),
                container: spare.name.clone(),
                reason: "the spare vanished during the claim".into(),
                log: String::new(),
            }),
            Err(e) => Some(e),
        };
        if let Some(e) = failure {
            self.discard_spare(spare).await;
            return Claim::Failed(e);
        }
        self.inner.counters.spare_claims.inc();
        let own_uid = folder.uid == spare.uid;
        tracing::info!(user = %user, container = %name, spare = %spare.name, own_uid, "claimed a warm spare");
        let ready = Ready {
            id: spare.id,
            pid: spare.pid,
            netns: spare.netns,
        };
        Claim::Claimed(ready.sandbox(user, &name, &spares.hash, &folder))
    }

    /// Removes a spare that may have seen a user's folder: the container first (by id), then its
    /// claim record and its slot. One the engine would not remove is kept on a list the maker
    /// retries (and counted in the pool meanwhile).
    pub(super) async fn discard_spare(&self, spare: Spare) {
        if let Err(e) = self.remove_container(&spare.id).await {
            tracing::warn!(container = %spare.name, error = %e, "could not remove a spare; retrying at the maker's next pass");
            self.inner.spares.state.lock().discards.push(spare);
            return;
        }
        self.inner.spares.claims.forget(&spare.id);
        self.release_slot(&spare.token).await;
    }

    /// Releases a spare's slot and its uid (unless a user took that uid).
    async fn release_slot(&self, token: &str) {
        let spares = &self.inner.spares;
        if let Some(slots) = spares.slots.clone() {
            let token = token.to_owned();
            let _ = blocking(move || {
                slots.release(&token);
                Ok(())
            })
            .await;
        }
        let (users, tag) = (
            self.inner.users.clone(),
            uid_tag(&self.inner.config.pool_id, token),
        );
        if let Err(e) = blocking(move || users.release_spare_ids(&tag)).await {
            tracing::warn!(error = %e, "could not release a spare's uid");
        }
    }

    /// Releases the slots, and forgets the claim records, of containers that are gone (removed
    /// by the reaper, by an operator, or in an earlier run).
    ///
    /// The slots and records on disk are read first, then the slots being made, then the
    /// containers: a slot read in the first step was marked as being made before it existed, so
    /// it is either still marked (kept) or its container was created before the listing (and is
    /// listed unless gone); a record is written for a container that exists already.
    pub(crate) async fn sweep_slots(&self) {
        let seen = self.on_disk().await;
        match self.list_ours().await {
            Ok(listed) => self.release_unlisted(seen, &listed).await,
            Err(e) => {
                tracing::debug!(error = %e, "could not list containers to sweep workspace slots")
            }
        }
    }

    /// [`SandboxPool::sweep_slots`] when nothing makes spares meanwhile (at startup, or after
    /// removing every container), with the pool's containers as listed.
    pub(crate) async fn sweep_slots_except(&self, listed: &[crate::engine::Listed]) {
        let seen = self.on_disk().await;
        self.release_unlisted(seen, listed).await;
    }

    /// The slots and claim records on disk, then the slots being made (in that order).
    async fn on_disk(&self) -> OnDisk {
        let spares = &self.inner.spares;
        let (slots, claims) = (spares.slots.clone(), spares.claims.clone());
        let (users, pool) = (self.inner.users.clone(), self.inner.config.pool_id.clone());
        let (tokens, claim_ids, reserved) = blocking(move || {
            let reserved = users
                .spare_reservations(&pool)
                .into_iter()
                .filter_map(|tag| Some(tag.strip_prefix(&format!("{pool}."))?.to_owned()))
                .collect();
            Ok((
                slots.map(|s| s.tokens()).unwrap_or_default(),
                claims.ids(),
                reserved,
            ))
        })
        .await
        .unwrap_or_default();
        let making = spares.state.lock().making_slots.clone();
        OnDisk {
            tokens,
            reserved,
            claim_ids,
            making,
        }
    }

    async fn release_unlisted(&self, seen: OnDisk, listed: &[crate::engine::Listed]) {
        let spares = &self.inner.spares;
        let live_tokens: HashSet<&str> = listed
            .iter()
            .filter_map(|c| c.labels.get(spec::LABEL_SPARE).map(String::as_str))
            .collect();
        let live_ids: HashSet<&str> = listed.iter().map(|c| c.id.as_str()).collect();
        for id in seen.claim_ids {
            if !live_ids.contains(id.as_str()) {
                spares.claims.forget(&id);
            }
        }
        let mut released = HashSet::new();
        for token in seen.tokens {
            if !live_tokens.contains(token.as_str()) && !seen.making.contains(&token) {
                self.release_slot(&token).await;
                released.insert(token);
            }
        }
        // Uids of spares whose slot went first (a crash between the two).
        for token in seen.reserved {
            if !live_tokens.contains(token.as_str())
                && !seen.making.contains(&token)
                && !released.contains(&token)
            {
                self.release_slot(&token).await;
            }
        }
    }

    /// Adopts a spare an earlier run left, if its slot is untouched and its uid still reserved
    /// for it (else it is removed).
    pub(super) async fn adopt_spare(&self, name: String, token: String, ready: Ready) -> bool {
        let spares = &self.inner.spares;
        let found = match spares.slots.clone() {
            Some(slots) => {
                let (token, pid) = (token.clone(), ready.pid);
                let (users, tag) = (
                    self.inner.users.clone(),
                    uid_tag(&self.inner.config.pool_id, &token),
                );
                blocking(move || {
                    Ok(match slots.is_pristine(&token, pid) {
                        true => users.spare_ids_held(&tag)?,
                        false => None,
                    })
                })
                .await
                .unwrap_or(None)
            }
            None => None,
        };
        let Some((uid, gid)) = found.filter(|_| spares.unsupported.is_none()) else {
            return false;
        };
        spares.state.lock().ready.push(Spare {
            id: ready.id,
            name,
            token,
            pid: ready.pid,
            netns: ready.netns,
            uid,
            gid,
            warmed: false,
        });
        true
    }

    /// A claimed spare of `user` that the pool finds (at startup, or in a bring-up that lost
    /// track of it) as its sandbox again: thawed if paused, its rules confirmed, and still showing
    /// the user's `folder` at `/workspace`. None if it is gone or shows anything else (the caller
    /// removes it).
    pub(super) async fn resume_claimed(
        &self,
        user: &UserId,
        name: &str,
        folder: &UserFolder,
        id: &str,
        state: State,
    ) -> Result<Option<Sandbox>> {
        if state == State::Paused && !self.inner.engine.unpause(id).await? {
            return Ok(None);
        }
        let ready = self.wait_rules(user.as_str(), name).await?;
        let (pid, path) = (ready.pid, folder.path.clone());
        let shows = blocking(move || Ok(WorkspaceSlots::shows(pid, &path)))
            .await
            .unwrap_or(false);
        Ok(shows.then(|| ready.sandbox(user, name, &self.inner.spares.hash, folder)))
    }
}
