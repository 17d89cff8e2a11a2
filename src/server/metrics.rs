//! The daemon's metrics, rendered in the Prometheus text format. A handful of counters and one
//! histogram do not need a metrics library: atomics and a short-held lock.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::ConnectionStats;
use crate::exec::channel::{TransportStats, LATENCY_BUCKETS};
use crate::pool::PoolStats;

/// Upper bounds (seconds) of the exec latency histogram's buckets.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 600.0,
];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// What the daemon counts.
#[derive(Default)]
pub struct Metrics {
    exec: Mutex<BTreeMap<(String, String), Histogram>>,
    errors: Mutex<BTreeMap<String, u64>>,
    timeouts: AtomicU64,
    cancels: AtomicU64,
    in_flight: AtomicI64,
}

impl Metrics {
    /// A call finished (any outcome that produced a result).
    pub fn observe_call(
        &self,
        tool: &str,
        backend: &str,
        took: Duration,
        timed_out: bool,
        cancelled: bool,
    ) {
        if timed_out {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        if cancelled {
            self.cancels.fetch_add(1, Ordering::Relaxed);
        }
        let secs = took.as_secs_f64();
        let mut exec = self.exec.lock();
        let h = exec
            .entry((tool.to_owned(), backend.to_owned()))
            .or_default();
        if h.counts.is_empty() {
            h.counts = vec![0; BUCKETS.len()];
        }
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    /// A request failed with an error of `kind`.
    pub fn error(&self, kind: &str) {
        *self.errors.lock().entry(kind.to_owned()).or_default() += 1;
    }

    /// A call started (+1) or ended (-1).
    pub fn in_flight(&self, delta: i64) {
        self.in_flight.fetch_add(delta, Ordering::Relaxed);
    }

    /// The text exposition, with the pool's figures (None for the host backend).
    pub fn render(
        &self,
        pool: Option<(PoolStats, BTreeMap<String, u64>)>,
        transports: Option<&TransportStats>,
        connections: &ConnectionStats,
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP zcbot_http_connections_open HTTP connections open now."
        );
        let _ = writeln!(out, "# TYPE zcbot_http_connections_open gauge");
        let _ = writeln!(
            out,
            "zcbot_http_connections_open {}",
            connections.open.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "zcbot_http_connections_refused_total",
            "Connections refused at ZCBOT_HTTP_MAX_CONNECTIONS.",
            connections.refused.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "zcbot_http_connections_timed_out_total",
            "Connections closed for slow headers or idleness.",
            connections.timed_out.load(Ordering::Relaxed),
        );
        let (stats, states) = pool.unwrap_or_default();
        let _ = writeln!(
            out,
            "# HELP zcbot_containers Sandbox containers of this pool by state."
        );
        let _ = writeln!(out, "# TYPE zcbot_containers gauge");
        for state in [
            "running",
            "created",
            "exited",
            "paused",
            "restarting",
            "dead",
        ] {
            let n = states.get(state).copied().unwrap_or(0);
            let _ = writeln!(out, "zcbot_containers{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP zcbot_ensures_total Sandbox ensures: cold created or started a container, warm reused one.");
        let _ = writeln!(out, "# TYPE zcbot_ensures_total counter");
        let _ = writeln!(
            out,
            "zcbot_ensures_total{{kind=\"cold\"}} {}",
            stats.ensures_cold
        );
        let _ = writeln!(
            out,
            "zcbot_ensures_total{{kind=\"warm\"}} {}",
            stats.ensures_warm
        );
        counter(
            &mut out,
            "zcbot_reaped_total",
            "Sandboxes removed for idleness or capacity.",
            stats.reaped,
        );
        counter(
            &mut out,
            "zcbot_orphans_removed_total",
            "Containers removed at startup reconcile.",
            stats.orphans_removed,
        );
        counter(
            &mut out,
            "zcbot_sandboxes_recycled_total",
            "Sandboxes removed because a call's processes could not be shown stopped in place.",
            stats.recycled,
        );
        counter(
            &mut out,
            "zcbot_timeouts_total",
            "Calls that hit their timeout.",
            self.timeouts.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "zcbot_cancels_total",
            "Calls cancelled (API, client gone, shutdown).",
            self.cancels.load(Ordering::Relaxed),
        );
        let _ = writeln!(out, "# HELP zcbot_calls_in_flight Calls running now.");
        let _ = writeln!(out, "# TYPE zcbot_calls_in_flight gauge");
        let _ = writeln!(
            out,
            "zcbot_calls_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP zcbot_errors_total Requests that failed, by error kind."
        );
        let _ = writeln!(out, "# TYPE zcbot_errors_total counter");
        for (kind, n) in self.errors.lock().iter() {
            let _ = writeln!(out, "zcbot_errors_total{{kind=\"{kind}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP zcbot_exec_duration_seconds Wall time of tool calls."
        );
        let _ = writeln!(out, "# TYPE zcbot_exec_duration_seconds histogram");
        for ((tool, backend), h) in self.exec.lock().iter() {
            let labels = format!("tool=\"{tool}\",backend=\"{backend}\"");
            for (bound, n) in BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(
                    out,
                    "zcbot_exec_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "zcbot_exec_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "zcbot_exec_duration_seconds_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(
                out,
                "zcbot_exec_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        if let Some(t) = transports {
            render_transports(&mut out, t);
        }
        out
    }
}

/// The docker backend's transports: channel life cycle and latency per transport.
fn render_transports(out: &mut String, t: &TransportStats) {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    counter(
        out,
        "zcbot_channel_opens_total",
        "Exec channels opened (one long-lived exec per container).",
        get(&t.opens),
    );
    counter(
        out,
        "zcbot_channel_deaths_total",
        "Exec channels that died (helper killed, container gone, malformed or stalled stream).",
        get(&t.deaths),
    );
    counter(
        out,
        "zcbot_channel_fallbacks_total",
        "Process calls served by per-call exec because the channel could not be used.",
        get(&t.fallbacks),
    );
    let name = "zcbot_transport_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Wall time of process calls by the transport that served them."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (transport, h) in [("channel", &t.channel), ("exec", &t.exec)] {
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&h.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{transport=\"{transport}\",le=\"{bound}\"}} {}",
                get(n)
            );
        }
        let count = get(&h.count);
        let _ = writeln!(
            out,
            "{name}_bucket{{transport=\"{transport}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "{name}_sum{{transport=\"{transport}\"}} {}",
            get(&h.sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{transport=\"{transport}\"}} {count}");
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe_call("shell", "docker", Duration::from_millis(70), false, false);
        m.observe_call("shell", "docker", Duration::from_secs(2), true, false);
        let text = m.render(None, None, &ConnectionStats::default());
        assert!(text.contains("zcbot_exec_duration_seconds_bucket{tool=\"shell\",backend=\"docker\",le=\"0.1\"} 1"), "{text}");
        assert!(text.contains(
            "zcbot_exec_duration_seconds_bucket{tool=\"shell\",backend=\"docker\",le=\"2.5\"} 2"
        ));
        assert!(
            text.contains("zcbot_exec_duration_seconds_count{tool=\"shell\",backend=\"docker\"} 2")
        );
        assert!(text.contains("zcbot_timeouts_total 1"));
    }

    #[test]
    fn transport_figures_are_rendered_per_transport() {
        let t = TransportStats::default();
        t.opens.fetch_add(2, Ordering::Relaxed);
        t.fallbacks.fetch_add(1, Ordering::Relaxed);
        t.observe(true, Duration::from_micros(1500));
        t.observe(false, Duration::from_millis(60));
        let text = Metrics::default().render(None, Some(&t), &ConnectionStats::default());
        for line in [
            "zcbot_channel_opens_total 2",
            "zcbot_channel_deaths_total 0",
            "zcbot_channel_fallbacks_total 1",
            "zcbot_transport_duration_seconds_bucket{transport=\"channel\",le=\"0.002\"} 1",
            "zcbot_transport_duration_seconds_bucket{transport=\"exec\",le=\"0.05\"} 0",
            "zcbot_transport_duration_seconds_bucket{transport=\"exec\",le=\"0.1\"} 1",
            "zcbot_transport_duration_seconds_count{transport=\"channel\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }
}
