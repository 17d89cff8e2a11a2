//! What the pool did since it started: ensures cold and warm, sandboxes reaped, orphans removed
//! at reconcile, sandboxes recycled, and its containers by state. The pool owns these metric
//! families and registers them with the daemon's registry; [`PoolStats`] is the same figures as
//! a plain snapshot for the library's callers.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use super::spares::Fallback;
use super::SandboxPool;

/// The container states `zcbot_containers` always shows (zero when none is in it).
const STATES: [&str; 6] = [
    "running",
    "created",
    "exited",
    "paused",
    "restarting",
    "dead",
];

/// Counters of what the pool did since it started (the daemon exports them as metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Ensures that had to create or start a container.
    pub ensures_cold: u64,
    /// Ensures answered from memory with no Docker call.
    pub ensures_warm: u64,
    /// Containers removed by the idle reaper or by capacity eviction.
    pub reaped: u64,
    /// Containers removed at startup reconcile (stopped, stale, foreign image).
    pub orphans_removed: u64,
    /// Containers removed because a call's processes could not be shown stopped in place (a
    /// supervisor or channel helper that would not die, a sweep that failed).
    pub recycled: u64,
    /// Idle sandboxes paused (`ZCBOT_SANDBOX_PAUSE_AFTER`).
    pub paused: u64,
    /// Paused sandboxes resumed for a call.
    pub resumed: u64,
    /// New users' sandboxes that were warm spares (`ZCBOT_SPARES`).
    pub spare_claims: u64,
    /// New users' sandboxes started cold although spares were asked for (none ready, a failed
    /// claim, or a daemon that cannot claim).
    pub spare_fallbacks: u64,
    /// Of those, claims that failed half way (the spare removed).
    pub spare_claims_failed: u64,
}

type Labels = [(&'static str, &'static str); 1];

/// The pool's metric families; the pool increments the counters where things happen.
#[derive(Debug)]
pub(crate) struct PoolMetrics {
    pub(crate) ensures_cold: Counter,
    pub(crate) ensures_warm: Counter,
    pub(crate) reaped: Counter,
    pub(crate) orphans_removed: Counter,
    pub(crate) recycled: Counter,
    pub(crate) paused: Counter,
    pub(crate) resumed: Counter,
    pub(crate) spare_claims: Counter,
    /// Cold starts of new users although spares were asked for, by reason.
    spare_fallbacks: Family<Labels, Counter>,
    /// Spares ready to be claimed, set at each scrape.
    spares_ready: Gauge,
    /// `ensures_cold` and `ensures_warm` as one family by `kind`.
    ensures: Family<Labels, Counter>,
    /// Containers of this pool by Docker's state, set at each scrape.
    containers: Family<Labels, Gauge>,
}

impl Default for PoolMetrics {
    fn default() -> Self {
        let ensures = Family::<Labels, Counter>::default();
        let containers = Family::<Labels, Gauge>::default();
        // Every series exists from the start, so a scrape shows zero rather than nothing.
        for state in STATES {
            containers.get_or_create(&[("state", state)]).set(0);
        }
        PoolMetrics {
            ensures_cold: ensures.get_or_create_owned(&[("kind", "cold")]),
            ensures_warm: ensures.get_or_create_owned(&[("kind", "warm")]),
            reaped: Counter::default(),
            orphans_removed: Counter::default(),
            recycled: Counter::default(),
            paused: Counter::default(),
            resumed: Counter::default(),
            spare_claims: Counter::default(),
            spare_fallbacks: {
                let f = Family::<Labels, Counter>::default();
                for reason in Fallback::ALL {
                    drop(f.get_or_create(&[("reason", reason.as_str())]));
                }
                f
            },
            spares_ready: Gauge::default(),
            ensures,
            containers,
        }
    }
}

impl PoolMetrics {
    /// The counters as a snapshot.
    pub(crate) fn snapshot(&self) -> PoolStats {
        PoolStats {
            ensures_cold: self.ensures_cold.get(),
            ensures_warm: self.ensures_warm.get(),
            reaped: self.reaped.get(),
            orphans_removed: self.orphans_removed.get(),
            recycled: self.recycled.get(),
            paused: self.paused.get(),
            resumed: self.resumed.get(),
            spare_claims: self.spare_claims.get(),
            spare_fallbacks: Fallback::ALL
                .iter()
                .map(|r| {
                    self.spare_fallbacks
                        .get_or_create(&[("reason", r.as_str())])
                        .get()
                })
                .sum(),
            spare_claims_failed: self
                .spare_fallbacks
                .get_or_create(&[("reason", Fallback::ClaimFailed.as_str())])
                .get(),
        }
    }

    /// Counts a new user's cold start that a spare could not spare.
    pub(crate) fn fallback(&self, reason: Fallback) {
        self.spare_fallbacks
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    /// Sets `zcbot_containers` from the states of the pool's containers (one entry each).
    fn set_containers<'a>(&self, states: impl IntoIterator<Item = &'a str>) {
        let mut counts = [0i64; STATES.len()];
        for s in states {
            if let Some(i) = STATES.iter().position(|k| *k == s) {
                counts[i] += 1;
            }
        }
        for (state, n) in STATES.iter().zip(counts) {
            self.containers.get_or_create(&[("state", state)]).set(n);
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "zcbot_containers",
            "Sandbox containers of this pool by state",
            self.containers.clone(),
        );
        registry.register(
            "zcbot_ensures",
            "Sandbox ensures: cold created or started a container, warm reused one",
            self.ensures.clone(),
        );
        registry.register(
            "zcbot_reaped",
            "Sandboxes removed for idleness or capacity",
            self.reaped.clone(),
        );
        registry.register(
            "zcbot_orphans_removed",
            "Containers removed at startup reconcile",
            self.orphans_removed.clone(),
        );
        registry.register(
            "zcbot_sandboxes_paused",
            "Idle sandboxes paused (the cgroup freezer)",
            self.paused.clone(),
        );
        registry.register(
            "zcbot_sandboxes_resumed",
            "Paused sandboxes resumed for a call",
            self.resumed.clone(),
        );
        registry.register(
            "zcbot_spare_claims",
            "New users' sandboxes that were warm spares (ZCBOT_SPARES)",
            self.spare_claims.clone(),
        );
        registry.register(
            "zcbot_spare_fallbacks",
            "New users' sandboxes started cold although spares were asked for, by reason",
            self.spare_fallbacks.clone(),
        );
        registry.register(
            "zcbot_spares_ready",
            "Warm spares ready to be claimed",
            self.spares_ready.clone(),
        );
        registry.register(
            "zcbot_sandboxes_recycled",
            "Sandboxes removed because a call's processes could not be shown stopped in place",
            self.recycled.clone(),
        );
    }
}

impl SandboxPool {
    /// Adds the pool's families to the daemon's registry (counters without `_total`: the encoder
    /// appends it).
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.inner.counters.register(registry);
        if let Some(proxy) = &self.inner.egress {
            proxy.register_metrics(registry);
        }
    }

    /// Refreshes `zcbot_containers` from the engine, for a scrape. If the engine cannot list
    /// them, every state shows zero (as before the first scrape) and the failure is logged.
    pub async fn observe_containers(&self) {
        let list = match self.list().await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(error = %e, "could not list the sandboxes for /metrics");
                Vec::new()
            }
        };
        self.inner
            .counters
            .set_containers(list.iter().map(|s| s.state.as_str()));
        self.inner
            .counters
            .spares_ready
            .set(self.spares_ready() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    fn exposition(m: &PoolMetrics) -> String {
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn counters_show_in_the_snapshot_and_the_exposition() {
        let m = PoolMetrics::default();
        m.ensures_cold.inc();
        m.ensures_warm.inc_by(3);
        m.reaped.inc();
        m.paused.inc();
        assert_eq!(
            m.snapshot(),
            PoolStats {
                ensures_cold: 1,
                ensures_warm: 3,
                reaped: 1,
                orphans_removed: 0,
                recycled: 0,
                paused: 1,
                resumed: 0,
                spare_claims: 0,
                spare_fallbacks: 0,
                spare_claims_failed: 0,
            }
        );
        let text = exposition(&m);
        for line in [
            "zcbot_ensures_total{kind=\"cold\"} 1",
            "zcbot_ensures_total{kind=\"warm\"} 3",
            "zcbot_sandboxes_paused_total 1",
            "zcbot_sandboxes_resumed_total 0",
            "zcbot_reaped_total 1",
            "zcbot_orphans_removed_total 0",
            "zcbot_sandboxes_recycled_total 0",
            "zcbot_spare_fallbacks_total{reason=\"none_ready\"} 0",
            "zcbot_spares_ready 0",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn containers_are_counted_by_state_and_reset_at_each_scrape() {
        let m = PoolMetrics::default();
        let text = exposition(&m);
        for state in STATES {
            assert!(
                text.contains(&format!("zcbot_containers{{state=\"{state}\"}} 0")),
                "{state} missing in:\n{text}"
            );
        }
        m.set_containers(["running", "running", "exited", "removing"]);
        let text = exposition(&m);
        assert!(
            text.contains("zcbot_containers{state=\"running\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("zcbot_containers{state=\"exited\"} 1"),
            "{text}"
        );
        assert!(!text.contains("removing"), "{text}");
        m.set_containers(["exited"]);
        let text = exposition(&m);
        assert!(
            text.contains("zcbot_containers{state=\"running\"} 0"),
            "{text}"
        );
    }
}
