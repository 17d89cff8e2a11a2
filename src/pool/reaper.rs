//! What happens to containers over time: the startup reconcile that adopts or removes what an
//! earlier run left, the idle reaper, and the status listing both the CLI and the API show.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::spec::{self, LABEL_CONFIG_HASH, LABEL_CREATED_AT, LABEL_MANAGED_BY};
use super::{summary_user, Sandbox, SandboxPool, Slot};
use crate::engine::{Filter, Listed, State};
use crate::error::Result;
use crate::user::UserId;

/// How many idle sandboxes one reaper pass removes at a time.
const REAP_PARALLEL: usize = 8;

/// What the startup reconcile found and did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ReconcileReport {
    /// Users whose running, current container was adopted.
    pub adopted: Vec<String>,
    /// Containers removed, each with the reason.
    pub removed: Vec<(String, String)>,
    /// Containers with our name prefix but without our labels: reported, left alone.
    pub foreign: Vec<String>,
    /// Unclaimed warm spares adopted as spares.
    pub spares: usize,
}

/// What a container with a spare's label is.
enum SpareKind {
    /// Claimed by this user, whose folder is ready.
    Claimed(UserId, crate::users_root::UserFolder),
    /// Not claimed: a spare in this slot.
    Unclaimed(String),
}

/// One sandbox as `ps` and `GET /v1/sandboxes` show it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SandboxStatus {
    /// The user.
    pub user: String,
    /// The container's name.
    pub name: String,
    /// Docker's container id.
    pub container_id: String,
    /// Docker's state: running, exited, created, ...
    pub state: String,
    /// Seconds since the user's last activity.
    pub idle_secs: u64,
    /// Calls in flight in this process.
    pub in_flight: usize,
    /// Whether its config hash matches the pool's current config (false: stale, recreated on the
    /// next ensure or removed at the next reconcile).
    pub config_current: bool,
    /// A warm spare no user has claimed yet (`user` is empty; `idle_secs` counts from its start).
    pub spare: bool,
}

impl SandboxPool {
    /// The startup pass: adopts every running container of this pool whose config hash is current
    /// (its entry's ready line confirmed), and removes the rest (stopped, stale hash, foreign image,
    /// bad labels). Containers with our name prefix but without our labels are reported in the
    /// log and left alone.
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        self.load_existing(true).await
    }

    /// Loads running containers of this pool into memory without removing anything (for one-shot
    /// CLI commands that must not change what they were not asked to).
    pub async fn adopt_running(&self) -> Result<ReconcileReport> {
        self.load_existing(false).await
    }

    async fn load_existing(&self, remove: bool) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let ours = self.list_ours().await?;
        let mut to_adopt = Vec::new();
        let mut to_remove = Vec::new();
        let mut spares = Vec::new();
        for c in &ours {
            let name = c.name.clone();
            if c.labels.contains_key(spec::LABEL_SPARE) {
                match self.judge_spare(c).await {
                    Ok(SpareKind::Claimed(user, folder)) => {
                        to_adopt.push((user, name, folder, c.clone()))
                    }
                    // A one-shot command leaves unclaimed spares to the daemon.
                    Ok(SpareKind::Unclaimed(_)) if !remove => {}
                    Ok(SpareKind::Unclaimed(token)) => spares.push((name, token, c.clone())),
                    Err(reason) => to_remove.push((name, reason)),
                }
                continue;
            }
            let verdict = match summary_user(c) {
                None => Err("its user label is missing or invalid".to_owned()),
                Some(user) => self.judge(c, &user, &name).await.map(|f| (user, f)),
            };
            match verdict {
                // A sandbox an earlier run (or the daemon, for a one-shot command) paused is
                // thawed to be adopted: its entry's ready line is checked as for any other, and
                // the daemon's reaper pauses it again once idle.
                Ok((user, folder)) if c.state == State::Paused => {
                    match self.inner.engine.unpause(&c.id).await {
                        Ok(_) => to_adopt.push((user, name, folder, c.clone())),
                        Err(e) => to_remove
                            .push((name, format!("it is paused and cannot be resumed: {e}"))),
                    }
                }
                Ok((user, folder)) => to_adopt.push((user, name, folder, c.clone())),
                Err(reason) => to_remove.push((name, reason)),
            }
        }

        // Confirm the rules are in place (the entry's ready line) before adopting.
        let checked: Vec<_> = futures_util::stream::iter(to_adopt)
            .map(|(user, name, folder, c)| async move {
                let hash = label(&c, LABEL_CONFIG_HASH).unwrap_or_default();
                let res = if c.labels.contains_key(spec::LABEL_SPARE) {
                    self.adopt_claimed(&user, &name, &folder, &c).await
                } else {
                    self.wait_ready(&user, &name, &hash, &folder).await
                };
                (user, name, c, res)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for (user, name, c, res) in checked {
            match res {
                Ok(sandbox) => {
                    self.adopt(&user, sandbox, &c);
                    report.adopted.push(user.to_string());
                }
                // wait_ready already removed it.
                Err(e) => report.removed.push((name, e.to_string())),
            }
        }

        // Unclaimed spares: adopted while current, untouched and wanted, up to ZCBOT_SPARES and
        // within ZCBOT_SANDBOX_MAX beside the users' sandboxes adopted.
        let wanted = self.inner.config.spares.min(
            self.inner
                .config
                .max_containers
                .saturating_sub(report.adopted.len()),
        );
        for (name, token, c) in spares {
            if report.spares >= wanted {
                to_remove.push((
                    name,
                    "more spares than ZCBOT_SPARES (or room under ZCBOT_SANDBOX_MAX)".to_owned(),
                ));
                continue;
            }
            if c.state == State::Paused && self.inner.engine.unpause(&c.id).await.is_err() {
                to_remove.push((name, "it is paused and cannot be resumed".to_owned()));
                continue;
            }
            match self.wait_rules("a warm spare", &name).await {
                Ok(ready) => {
                    if self.adopt_spare(name.clone(), token, ready).await {
                        report.spares += 1;
                    } else {
                        to_remove.push((
                            name,
                            "its workspace slot is not as a spare leaves it, or this pool cannot claim spares".to_owned(),
                        ));
                    }
                }
                Err(e) => report.removed.push((name, e.to_string())),
            }
        }

        if remove {
            let removed: Vec<_> = futures_util::stream::iter(to_remove)
                .map(|(name, reason)| async move {
                    let res = self.remove_container(&name).await;
                    (name, reason, res)
                })
                .buffer_unordered(16)
                .collect()
                .await;
            for (name, reason, res) in removed {
                res?;
                tracing::info!(container = %name, %reason, "removed a sandbox left by an earlier run");
                self.inner.counters.orphans_removed.inc();
                report.removed.push((name, reason));
            }
        }

        if remove {
            // Slots and claim records of containers that are gone (this run made none yet).
            let listed = self.list_ours().await?;
            self.sweep_slots_except(&listed).await;
        }

        for name in self.foreign_containers().await? {
            tracing::warn!(container = %name, "a container has the sandbox name prefix but not our labels: leaving it alone");
            report.foreign.push(name);
        }
        report.adopted.sort();
        Ok(report)
    }

    /// Why an existing container of ours cannot be adopted as it is, if it cannot; else the
    /// user's folder, ready. The folder is prepared (a migration may walk it) only for a running
    /// container whose name is right: one about to be removed costs nothing on the host.
    async fn judge(
        &self,
        c: &Listed,
        user: &UserId,
        name: &str,
    ) -> std::result::Result<crate::users_root::UserFolder, String> {
        if name != self.container_name(user) {
            return Err(format!(
                "its name does not match its user label (expected {})",
                self.container_name(user)
            ));
        }
        if c.state != State::Running && c.state != State::Paused {
            return Err(format!("it is not running ({})", c.state.as_str()));
        }
        let folder = self
            .prepare_workspace(user)
            .await
            .map_err(|e| format!("its user folder cannot be prepared: {e}"))?;
        let (_, hash) = self.inner.template.build(&self.inner.config, user, &folder);
        if label(c, LABEL_CONFIG_HASH).as_deref() != Some(hash.as_str()) {
            return Err(
                "its config hash is stale (image, limits, mounts, uid or rules changed)".into(),
            );
        }
        Ok(folder)
    }

    /// What a container with a spare's label is, or why it must go. A spare claimed for a user
    /// has the claim record and the user's name; one with a record but not the name was cut
    /// short half way through its claim, and may have a user's folder: never a spare again.
    async fn judge_spare(&self, c: &Listed) -> std::result::Result<SpareKind, String> {
        let token = label(c, spec::LABEL_SPARE).unwrap_or_default();
        if !super::mounts::valid_token(&token) {
            return Err("its spare label does not name a workspace slot".into());
        }
        if label(c, LABEL_CONFIG_HASH).as_deref() != Some(self.inner.spares.hash.as_str()) {
            return Err("its config hash is stale (image, limits, mounts or rules changed)".into());
        }
        if c.state != State::Running && c.state != State::Paused {
            return Err(format!("it is not running ({})", c.state.as_str()));
        }
        match self.inner.spares.claims.user_of(&c.id) {
            Some(user) if c.name == self.container_name(&user) => {
                let folder = self
                    .prepare_workspace(&user)
                    .await
                    .map_err(|e| format!("its user folder cannot be prepared: {e}"))?;
                Ok(SpareKind::Claimed(user, folder))
            }
            Some(_) => Err("its claim was cut short (it may hold a user's folder)".into()),
            None if c.name == spec::spare_name(&self.inner.config.pool_id, &token) => {
                Ok(SpareKind::Unclaimed(token))
            }
            None => Err("a spare renamed without a claim record".into()),
        }
    }

    /// A claimed spare an earlier run left, ready for adoption (see
    /// [`SandboxPool::resume_claimed`]); one that cannot be is removed, as a failed start is.
    async fn adopt_claimed(
        &self,
        user: &UserId,
        name: &str,
        folder: &crate::users_root::UserFolder,
        c: &Listed,
    ) -> Result<Sandbox> {
        match self
            .resume_claimed(user, name, folder, &c.id, c.state)
            .await?
        {
            Some(sandbox) => Ok(sandbox),
            None => Err(self
                .fail_start(
                    user.as_str(),
                    name,
                    "a claimed spare that is gone or no longer shows its user's folder".into(),
                    String::new(),
                )
                .await),
        }
    }

    fn adopt(&self, user: &UserId, sandbox: Sandbox, c: &Listed) {
        let last = self
            .inner
            .activity
            .last(user)
            .or_else(|| {
                label(c, LABEL_CREATED_AT).and_then(|s| humantime::parse_rfc3339_weak(&s).ok())
            })
            .unwrap_or_else(SystemTime::now);
        let slot = self.slot(user);
        let mut st = slot.state.lock();
        st.set_live(Some(sandbox));
        st.paused = false;
        st.last_active = last;
        st.persisted = Some(last);
    }

    async fn foreign_containers(&self) -> Result<Vec<String>> {
        let filter = Filter::NameContains(spec::NAME_PREFIX.to_owned());
        let all = self.inner.engine.list(&filter).await?;
        Ok(all
            .iter()
            .filter(|c| label(c, LABEL_MANAGED_BY).is_none())
            .map(|c| c.name.clone())
            .filter(|n| n.starts_with(spec::NAME_PREFIX))
            .collect())
    }

    /// Removes every sandbox idle longer than `idle` with no call in flight; returns their users.
    /// A sandbox whose gate is held (being started or removed) is not idle and is skipped.
    pub async fn reap_idle(&self, idle: Duration) -> Result<Vec<String>> {
        let now = SystemTime::now();
        let candidates = self.slots_where(|st| {
            st.live.is_some() && st.in_flight == 0 && idle_for(st.last_active, now) > idle
        });
        // Removals run a few at a time: each is ~100 ms of engine work, mostly waiting.
        let results: Vec<Result<Option<String>>> =
            futures_util::stream::iter(candidates.into_iter().map(|(user, slot)| async move {
                let Ok(_gate) = slot.gate.clone().try_lock_owned() else {
                    return Ok(None);
                };
                let taken = {
                    let mut st = slot.state.lock();
                    let still_idle = st.in_flight == 0
                        && !st.starting
                        && idle_for(st.last_active, SystemTime::now()) > idle;
                    if still_idle {
                        st.paused = false;
                        st.take_live()
                    } else {
                        None
                    }
                };
                let Some(sandbox) = taken else {
                    return Ok(None);
                };
                self.inner
                    .removals
                    .record(&sandbox.container_id, super::Remover::Reaper);
                self.remove_container(&sandbox.name).await?;
                self.inner.activity.forget(&user);
                self.inner.counters.reaped.inc();
                tracing::info!(user = %user, container = %sandbox.name, "reaped idle sandbox");
                Ok(Some(user.to_string()))
            }))
            .buffer_unordered(REAP_PARALLEL)
            .collect()
            .await;
        users_of(results)
    }

    /// Pauses every sandbox idle longer than `after` with no lease held (no call, job or running
    /// session code); returns their users. The paused flag is set under the slot's state lock
    /// with the same check a warm lease makes, so a call either got its lease first (and the
    /// sandbox is not paused) or finds the flag and waits for the gate, which the pause holds,
    /// then resumes it.
    pub async fn pause_idle(&self, after: Duration) -> Result<Vec<String>> {
        let now = SystemTime::now();
        let idle = |st: &super::SlotState, now| {
            st.live.is_some()
                && !st.paused
                && !st.starting
                && st.in_flight == 0
                && idle_for(st.last_active, now) > after
        };
        let candidates = self.slots_where(|st| idle(st, now));
        let results: Vec<Result<Option<String>>> =
            futures_util::stream::iter(candidates.into_iter().map(|(user, slot)| async move {
                let Ok(_gate) = slot.gate.clone().try_lock_owned() else {
                    return Ok(None);
                };
                let target = {
                    let mut st = slot.state.lock();
                    if idle(&st, SystemTime::now()) {
                        st.paused = true;
                        st.live
                            .as_ref()
                            .map(|s| (s.container_id.clone(), s.name.clone()))
                    } else {
                        None
                    }
                };
                let Some((id, name)) = target else {
                    return Ok(None);
                };
                match self.inner.engine.pause(&id).await {
                    Ok(true) => {
                        self.inner.counters.paused.inc();
                        tracing::info!(user = %user, container = %name, "paused idle sandbox");
                        Ok(Some(user.to_string()))
                    }
                    Ok(false) => {
                        // Gone behind our back: the next lease brings up a new one.
                        let mut st = slot.state.lock();
                        st.paused = false;
                        st.set_live(None);
                        Ok(None)
                    }
                    // The engine may have frozen it all the same (an answer lost or late): it
                    // stays marked, and the next lease thaws it (a thaw of a running container
                    // is no error).
                    Err(e) => Err(e.into()),
                }
            }))
            .buffer_unordered(REAP_PARALLEL)
            .collect()
            .await;
        users_of(results)
    }

    /// Starts the background reaper (on the pool's task tracker): every
    /// `ZCBOT_SANDBOX_REAP_EVERY` it pauses sandboxes idle longer than `ZCBOT_SANDBOX_PAUSE_AFTER`
    /// (when that is set and shorter than the idle limit), removes sandboxes idle longer than
    /// `ZCBOT_SANDBOX_IDLE` and forgets users with nothing left. Beside it runs the spare maker
    /// (`ZCBOT_SPARES`). Both stop when the returned handle is dropped, between passes: a pass
    /// under way finishes, so no sandbox is left taken out of service but not removed.
    pub fn spawn_reaper(&self) -> ReaperHandle {
        let pool = self.clone();
        let every = self.inner.config.reap_every;
        let idle = self.inner.config.idle;
        let pause_after = self.inner.config.pause_after.filter(|after| *after < idle);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        {
            let pool = self.clone();
            let stop = stop.clone();
            self.inner
                .tasks
                .spawn(async move { pool.run_spare_maker(stop).await });
        }
        let task = self.inner.tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.cancelled() => return,
                }
                pool.firewall().refresh().await;
                if let Some(after) = pause_after {
                    if let Err(e) = pool.pause_idle(after).await {
                        tracing::warn!(error = %e, kind = e.kind(), "pausing idle sandboxes failed; retrying next period");
                    }
                }
                if let Err(e) = pool.reap_idle(idle).await {
                    tracing::warn!(error = %e, kind = e.kind(), "reaper pass failed; retrying next period");
                }
                pool.prune_slots();
            }
        });
        ReaperHandle { task, stop }
    }

    /// Every container of this pool as Docker reports it, with what this process knows of it.
    pub async fn list(&self) -> Result<Vec<SandboxStatus>> {
        let now = SystemTime::now();
        let mut out: Vec<SandboxStatus> = self
            .list_ours()
            .await?
            .iter()
            .filter_map(|c| {
                let spare_hash = self.inner.spares.hash.as_str();
                let is_spare = c.labels.contains_key(spec::LABEL_SPARE);
                let Some(user) = self.owner_of(c) else {
                    // An unclaimed spare (or one cut short in its claim): no user yet.
                    let created = label(c, LABEL_CREATED_AT)
                        .and_then(|s| humantime::parse_rfc3339_weak(&s).ok())
                        .unwrap_or(now);
                    return is_spare.then(|| SandboxStatus {
                        user: String::new(),
                        name: c.name.clone(),
                        container_id: c.id.clone(),
                        state: c.state.as_str().to_owned(),
                        idle_secs: idle_for(created, now).as_secs(),
                        in_flight: 0,
                        config_current: label(c, LABEL_CONFIG_HASH).as_deref() == Some(spare_hash),
                        spare: true,
                    });
                };
                let name = c.name.clone();
                let (in_flight, last) = self
                    .inner
                    .slots
                    .get(&user)
                    .and_then(|slot| {
                        let st = slot.state.lock();
                        st.live.is_some().then_some((st.in_flight, st.last_active))
                    })
                    .map_or((0, None), |(n, at)| (n, Some(at)));
                let last = last
                    .or_else(|| self.inner.activity.last(&user))
                    .or_else(|| {
                        label(c, LABEL_CREATED_AT)
                            .and_then(|s| humantime::parse_rfc3339_weak(&s).ok())
                    })
                    .unwrap_or(now);
                // The uid the container was made for (its folder is not touched to list it).
                let (uid, gid) = label(c, spec::LABEL_UID)
                    .and_then(|v| {
                        let (u, g) = v.split_once(':')?;
                        Some((u.parse().ok()?, g.parse().ok()?))
                    })
                    .unwrap_or((0, 0));
                let folder = crate::users_root::UserFolder {
                    path: self.workspace(&user),
                    uid,
                    gid,
                };
                let (_, hash) = self
                    .inner
                    .template
                    .build(&self.inner.config, &user, &folder);
                let hash = if is_spare {
                    spare_hash.to_owned()
                } else {
                    hash
                };
                Some(SandboxStatus {
                    user: user.to_string(),
                    name,
                    container_id: c.id.clone(),
                    state: c.state.as_str().to_owned(),
                    idle_secs: idle_for(last, now).as_secs(),
                    in_flight,
                    config_current: label(c, LABEL_CONFIG_HASH).as_deref() == Some(hash.as_str()),
                    spare: false,
                })
            })
            .collect();
        out.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(out)
    }
}

/// Stops the background reaper when dropped.
pub struct ReaperHandle {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl ReaperHandle {
    /// Whether the reaper task is still running (for readiness checks).
    pub fn is_alive(&self) -> bool {
        !self.task.is_finished()
    }
}

impl Drop for ReaperHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl SandboxPool {
    /// The users (and slots) whose state satisfies `pred` now: a pass's candidates, each checked
    /// again under its gate before anything is done to it.
    fn slots_where(&self, pred: impl Fn(&super::SlotState) -> bool) -> Vec<(UserId, Arc<Slot>)> {
        self.inner
            .slots
            .iter()
            .filter(|e| pred(&e.value().state.lock()))
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }
}

/// The users a pass acted on, sorted; the first error if any step failed (every step has run).
fn users_of(results: Vec<Result<Option<String>>>) -> Result<Vec<String>> {
    let mut users = Vec::new();
    for r in results {
        if let Some(user) = r? {
            users.push(user);
        }
    }
    users.sort();
    Ok(users)
}

fn idle_for(last: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(last).unwrap_or_default()
}

fn label(c: &Listed, key: &str) -> Option<String> {
    c.labels.get(key).cloned()
}
