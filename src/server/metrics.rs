//! The daemon's metrics: one `prometheus-client` registry, made here, into which each component
//! registers the families it owns and observes (the pool its counters and containers by state,
//! the executor its transports, the acceptor its connections, and this module the per-call
//! figures). Nothing below the server knows the registry exists beyond `register`.
//!
//! `prometheus-client` encodes OpenMetrics text, which Prometheus asks for. Plain clients (curl,
//! `promtool check metrics`, older scrapers) read the Prometheus text format 0.0.4, where a
//! counter's family carries its `_total` name and there is no `# EOF`: [`Exposition`] serves
//! whichever the `Accept` header prefers, converting the one encoding.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::ConnectionStats;
use crate::exec::metrics::{latency_histogram, TransportStats};
use crate::pool::SandboxPool;

/// The content type of OpenMetrics text, as `prometheus-client` encodes it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

type CallLabels = [(&'static str, String); 2];
type KindLabel = [(&'static str, String); 1];
type StateLabel = [(&'static str, &'static str); 1];

/// What the daemon counts per call, and the registry of every component's families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    exec: Family<CallLabels, Histogram, fn() -> Histogram>,
    errors: Family<KindLabel, Counter>,
    timeouts: Counter,
    cancels: Counter,
    in_flight: Gauge,
    streamed: Counter,
    jobs_running: Gauge,
    jobs_ended: Family<StateLabel, Counter>,
}

impl Metrics {
    /// The daemon's registry: its own families, the acceptor's, and those of the pool and the
    /// transports when the backend has them (the host backend has neither).
    pub fn new(
        pool: Option<&SandboxPool>,
        transports: Option<&TransportStats>,
        connections: &ConnectionStats,
    ) -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            exec: Family::new_with_constructor(latency_histogram),
            errors: Family::default(),
            timeouts: Counter::default(),
            cancels: Counter::default(),
            in_flight: Gauge::default(),
            streamed: Counter::default(),
            jobs_running: Gauge::default(),
            jobs_ended: Family::default(),
        };
        let mut registry = Registry::default();
        connections.register(&mut registry);
        if let Some(pool) = pool {
            pool.register_metrics(&mut registry);
        }
        m.register(&mut registry);
        if let Some(t) = transports {
            t.register(&mut registry);
        }
        m.registry = registry;
        m
    }

    /// The server's own families (counters without `_total`: the encoder appends it).
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "zcbot_timeouts",
            "Calls that hit their timeout",
            self.timeouts.clone(),
        );
        registry.register(
            "zcbot_cancels",
            "Calls cancelled (API, client gone, shutdown)",
            self.cancels.clone(),
        );
        registry.register(
            "zcbot_calls_in_flight",
            "Calls running now",
            self.in_flight.clone(),
        );
        registry.register(
            "zcbot_streamed_calls",
            "Calls answered as Server-Sent Events",
            self.streamed.clone(),
        );
        registry.register(
            "zcbot_jobs_running",
            "Background jobs running now",
            self.jobs_running.clone(),
        );
        registry.register(
            "zcbot_jobs_ended",
            "Background jobs ended, by how (exited, timed_out, killed, failed)",
            self.jobs_ended.clone(),
        );
        registry.register(
            "zcbot_errors",
            "Requests that failed, by error kind",
            self.errors.clone(),
        );
        registry.register(
            "zcbot_exec_duration_seconds",
            "Wall time of tool calls",
            self.exec.clone(),
        );
    }

    /// A call stopped because its client went away (it never reaches `observe_call`).
    pub fn client_gone(&self) {
        self.cancels.inc();
    }

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
            self.timeouts.inc();
        }
        if cancelled {
            self.cancels.inc();
        }
        self.exec
            .get_or_create(&[("tool", tool.to_owned()), ("backend", backend.to_owned())])
            .observe(took.as_secs_f64());
    }

    /// A request failed with an error of `kind` (one of the API's fixed kinds).
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&[("kind", kind.to_owned())])
            .inc();
    }

    /// A call started (+1) or ended (-1).
    pub fn in_flight(&self, delta: i64) {
        self.in_flight.inc_by(delta);
    }

    /// A call is answered as events.
    pub fn streamed(&self) {
        self.streamed.inc();
    }

    /// A background job started.
    pub fn job_started(&self) {
        self.jobs_running.inc();
    }

    /// A background job ended as `state` (a `JobState`'s name).
    pub fn job_ended(&self, state: &'static str) {
        self.jobs_running.dec();
        self.jobs_ended.get_or_create(&[("state", state)]).inc();
    }

    /// The exposition in the format `accept` (an HTTP `Accept` header) prefers: its content type
    /// and body.
    pub fn exposition(&self, accept: &str) -> Result<(&'static str, String), std::fmt::Error> {
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(if wants_openmetrics(accept) {
            (OPENMETRICS, text)
        } else {
            (PROMETHEUS_TEXT, to_prometheus_text(&text))
        })
    }
}

/// Whether an `Accept` header lists OpenMetrics text as acceptable (Prometheus does, first).
fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
    })
}

/// OpenMetrics text as the Prometheus text format 0.0.4: a counter family named `x` with samples
/// `x_total` becomes the family `x_total` (0.0.4 names a family by its samples), and the `# EOF`
/// and `# UNIT` lines, which 0.0.4 does not have, are dropped. Gauges and histograms without
/// exemplars (all this daemon registers) are the same in both.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "].into_iter().find_map(|p| {
            let (name, rest) = line.strip_prefix(p)?.split_once(' ')?;
            counters.contains(name).then_some((p, name, rest))
        });
        match descriptor {
            Some((p, name, rest)) => {
                out.push_str(p);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        let (content_type, body) = m.exposition("").unwrap();
        assert_eq!(content_type, PROMETHEUS_TEXT);
        body
    }

    #[test]
    fn calls_are_counted_by_tool_and_backend_in_cumulative_buckets() {
        let m = Metrics::new(None, None, &ConnectionStats::default());
        m.observe_call("shell", "docker", Duration::from_millis(70), false, false);
        m.observe_call("shell", "docker", Duration::from_secs(2), true, false);
        m.observe_call("read_file", "docker", Duration::from_millis(1), false, true);
        let text = text(&m);
        for line in [
            "zcbot_exec_duration_seconds_bucket{le=\"0.05\",tool=\"shell\",backend=\"docker\"} 0",
            "zcbot_exec_duration_seconds_bucket{le=\"0.1\",tool=\"shell\",backend=\"docker\"} 1",
            "zcbot_exec_duration_seconds_bucket{le=\"2.5\",tool=\"shell\",backend=\"docker\"} 2",
            "zcbot_exec_duration_seconds_bucket{le=\"+Inf\",tool=\"shell\",backend=\"docker\"} 2",
            "zcbot_exec_duration_seconds_count{tool=\"shell\",backend=\"docker\"} 2",
            "zcbot_exec_duration_seconds_count{tool=\"read_file\",backend=\"docker\"} 1",
            "zcbot_timeouts_total 1",
            "zcbot_cancels_total 1",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn errors_in_flight_and_connections_are_exposed() {
        let connections = ConnectionStats::default();
        let m = Metrics::new(None, None, &connections);
        m.error("invalid_user");
        m.error("invalid_user");
        m.error("not_found");
        m.in_flight(1);
        m.in_flight(1);
        m.in_flight(-1);
        m.job_started();
        m.job_started();
        m.job_ended("killed");
        m.streamed();
        connections.refused.inc();
        connections.open.inc();
        let text = text(&m);
        for line in [
            "zcbot_errors_total{kind=\"invalid_user\"} 2",
            "zcbot_errors_total{kind=\"not_found\"} 1",
            "zcbot_calls_in_flight 1",
            "zcbot_jobs_running 1",
            "zcbot_jobs_ended_total{state=\"killed\"} 1",
            "zcbot_streamed_calls_total 1",
            "zcbot_http_connections_open 1",
            "zcbot_http_connections_refused_total 1",
            "zcbot_http_connections_timed_out_total 0",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn the_transports_register_into_the_daemons_registry() {
        let t = TransportStats::default();
        t.opens.inc();
        let text = text(&Metrics::new(None, Some(&t), &ConnectionStats::default()));
        assert!(text.contains("zcbot_channel_opens_total 1"), "{text}");
        assert!(
            text.contains("zcbot_transport_duration_seconds_count{transport=\"exec\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn counter_families_carry_their_sample_name_in_the_text_format() {
        let m = Metrics::new(None, None, &ConnectionStats::default());
        m.cancels.inc();
        let text = text(&m);
        assert!(
            text.contains(
                "# HELP zcbot_cancels_total Calls cancelled (API, client gone, shutdown).\n\
                 # TYPE zcbot_cancels_total counter\n\
                 zcbot_cancels_total 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE zcbot_calls_in_flight gauge\nzcbot_calls_in_flight 0\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("# TYPE zcbot_cancels counter"), "{text}");
    }

    #[test]
    fn openmetrics_is_served_to_whoever_asks_for_it() {
        let m = Metrics::new(None, None, &ConnectionStats::default());
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let (content_type, body) = m.exposition(prometheus).unwrap();
        assert_eq!(content_type, OPENMETRICS);
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert!(body.contains("# TYPE zcbot_cancels counter\nzcbot_cancels_total 0\n"));
        for accept in [
            "",
            "*/*",
            "text/plain",
            "text/plain;version=0.0.4, application/openmetrics-text;q=0",
        ] {
            assert_eq!(m.exposition(accept).unwrap().0, PROMETHEUS_TEXT, "{accept}");
        }
    }
}
