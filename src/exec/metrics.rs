//! What the docker backend's transports did: channel life cycle (opens, deaths, fallbacks to
//! per-call exec) and the wall time of process calls by the transport that served them. The
//! executor owns these metric families and registers them with the daemon's registry; nothing
//! here knows about the server.
//!
//! The latency buckets live here too, at the lowest layer that observes a latency, so the
//! server's per-call histogram uses the same set.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of every latency histogram's buckets. From half a millisecond (a warm
/// call over the channel) to ten minutes (the longest call timeout).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 600.0,
];

/// A histogram over [`LATENCY_BUCKETS`]: the constructor of every latency family.
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
}

/// The `transport` label of `zcbot_transport_duration_seconds`.
type TransportLabel = [(&'static str, &'static str); 1];

/// What the docker backend's transports did. Cheap handles: clones count into the same figures.
#[derive(Debug, Clone)]
pub struct TransportStats {
    /// Channels opened.
    pub opens: Counter,
    /// Channels that died (helper gone, container gone, malformed or stalled stream).
    pub deaths: Counter,
    /// Calls served by per-call exec although the channel transport is configured.
    pub fallbacks: Counter,
    /// Helpers started in warm spares ahead of a claim.
    pub warmed: Counter,
    /// Channels made of a warm spare's helper (a brand-new user's first call without an exec).
    pub warm_taken: Counter,
    /// Wall time of process calls served over the channel.
    pub channel: Histogram,
    /// Wall time of process calls served by per-call exec.
    pub exec: Histogram,
    /// The family `channel` and `exec` belong to, for registration.
    duration: Family<TransportLabel, Histogram, fn() -> Histogram>,
}

impl Default for TransportStats {
    fn default() -> Self {
        let duration: Family<TransportLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        // Both series exist from the start, so a scrape shows an unused transport as zero.
        TransportStats {
            opens: Counter::default(),
            deaths: Counter::default(),
            fallbacks: Counter::default(),
            warmed: Counter::default(),
            warm_taken: Counter::default(),
            channel: duration.get_or_create_owned(&[("transport", "channel")]),
            exec: duration.get_or_create_owned(&[("transport", "exec")]),
            duration,
        }
    }
}

impl TransportStats {
    /// Records one finished call on the transport that served it.
    pub(crate) fn observe(&self, over_channel: bool, took: Duration) {
        let h = if over_channel {
            &self.channel
        } else {
            &self.exec
        };
        h.observe(took.as_secs_f64());
    }

    /// Adds the transports' families to the daemon's registry. Counters are registered without
    /// `_total`: the encoder appends it.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "zcbot_channel_opens",
            "Exec channels opened (one long-lived exec per container)",
            self.opens.clone(),
        );
        registry.register(
            "zcbot_channel_deaths",
            "Exec channels that died (helper killed, container gone, malformed or stalled stream)",
            self.deaths.clone(),
        );
        registry.register(
            "zcbot_channel_fallbacks",
            "Process calls served by per-call exec because the channel could not be used",
            self.fallbacks.clone(),
        );
        registry.register(
            "zcbot_channel_warm_started",
            "Exec channel helpers started in warm spares ahead of a claim",
            self.warmed.clone(),
        );
        registry.register(
            "zcbot_channel_warm_taken",
            "Exec channels made of a warm spare's helper (a new user's first call without an exec)",
            self.warm_taken.clone(),
        );
        registry.register(
            "zcbot_transport_duration_seconds",
            "Wall time of process calls by the transport that served them",
            self.duration.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn calls_are_counted_on_the_transport_that_served_them() {
        let t = TransportStats::default();
        t.opens.inc_by(2);
        t.fallbacks.inc();
        t.observe(true, Duration::from_micros(1500));
        t.observe(false, Duration::from_millis(60));
        let mut registry = Registry::default();
        t.register(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "zcbot_channel_opens_total 2",
            "zcbot_channel_deaths_total 0",
            "zcbot_channel_fallbacks_total 1",
            "zcbot_transport_duration_seconds_bucket{le=\"0.001\",transport=\"channel\"} 0",
            "zcbot_transport_duration_seconds_bucket{le=\"0.0025\",transport=\"channel\"} 1",
            "zcbot_transport_duration_seconds_bucket{le=\"0.05\",transport=\"exec\"} 0",
            "zcbot_transport_duration_seconds_bucket{le=\"0.1\",transport=\"exec\"} 1",
            "zcbot_transport_duration_seconds_count{transport=\"channel\"} 1",
            "zcbot_transport_duration_seconds_count{transport=\"exec\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }
}
