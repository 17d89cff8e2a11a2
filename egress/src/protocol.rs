//! The control protocol between the daemon and the proxy, and the proxy's configuration.
//!
//! Why here and not in `proxy`: the daemon builds commands and the configuration and reads
//! reports with these very types, without pulling tokio or a DNS resolver (it depends on this
//! crate with `default-features = false`). The wire format is JSON, one object per line.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::pattern::{normalize_host, truncate_chars, Pattern, MAX_NAME_LEN, MAX_PATTERNS};

/// Longest command line the proxy accepts on stdin; longer ones are skipped with an error.
pub const MAX_COMMAND_LINE: usize = 256 * 1024;
/// Longest `method` kept in a report.
pub const MAX_METHOD_LEN: usize = 32;

/// A command from the daemon, on the proxy's stdin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Forget every client.
    Reset {
        /// Echoed in the `ack`.
        seq: u64,
    },
    /// The client connecting from `ip` is `user`, with this effective allowlist. Replaces any
    /// previous entry for `ip`. Connections already open keep the list they started with.
    Set {
        /// Echoed in the `ack`.
        seq: u64,
        /// The sandbox's source address on the internal network.
        ip: IpAddr,
        /// Reported in `conn` lines; the per-user connection cap counts by this name.
        user: String,
        /// Patterns as strings (see [`crate::pattern`]); one bad pattern rejects the command.
        allow: Vec<Pattern>,
    },
    /// Forget the client at `ip`.
    Drop {
        /// Echoed in the `ack`.
        seq: u64,
        /// The address to forget.
        ip: IpAddr,
    },
}

impl Command {
    /// The command's sequence number.
    pub fn seq(&self) -> u64 {
        match self {
            Self::Reset { seq } | Self::Set { seq, .. } | Self::Drop { seq, .. } => *seq,
        }
    }

    /// Parse one command line. On failure, the `seq` (if the line had one readable) and a
    /// message, ready for a [`Report::Error`].
    pub fn parse_line(line: &str) -> Result<Self, (Option<u64>, String)> {
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| (None, format!("command is not valid JSON: {e}")))?;
        let seq = value.get("seq").and_then(serde_json::Value::as_u64);
        let cmd: Command =
            serde_json::from_value(value).map_err(|e| (seq, format!("bad command: {e}")))?;
        if let Command::Set { allow, user, .. } = &cmd {
            if allow.len() > MAX_PATTERNS {
                return Err((
                    seq,
                    format!(
                        "bad command: {} patterns; at most {MAX_PATTERNS} are allowed",
                        allow.len()
                    ),
                ));
            }
            if user.is_empty() || user.len() > 256 {
                return Err((seq, "bad command: user must be 1..=256 bytes".to_string()));
            }
        }
        Ok(cmd)
    }
}

/// A line the proxy writes on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    /// Once, when the proxy listens.
    Ready {
        /// The address it listens on.
        listen: SocketAddr,
    },
    /// A command was applied.
    Ack {
        /// The command's `seq`.
        seq: u64,
    },
    /// A command line could not be parsed or applied; the state is unchanged.
    Error {
        /// The command's `seq` if it could be read.
        seq: Option<u64>,
        /// What was wrong.
        message: String,
    },
    /// One per client connection.
    Conn(ConnReport),
    /// `count` `conn` reports were dropped because stdout was not read fast enough; sent
    /// before the next report that gets through.
    Dropped {
        /// How many reports were lost.
        count: u64,
    },
}

/// Allowed or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The connection was relayed to the destination.
    Allowed,
    /// The connection was refused; see the reason.
    Refused,
}

/// Why a connection ended as it did. Always present; `ok` for allowed connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Allowed and relayed.
    Ok,
    /// The source address is not in the client table.
    UnknownClient,
    /// The user already has `max_conns_per_user` connections open.
    TooManyConnections,
    /// Unparsable or oversized head, a smuggling attempt, or the header timeout.
    BadRequest,
    /// The destination is not on the allowlist.
    NotAllowed,
    /// The destination was an IP address.
    IpLiteral,
    /// After CONNECT: no TLS ClientHello with a server name (or one spanning records).
    NoSni,
    /// After CONNECT: the ClientHello names another host than the CONNECT line.
    SniMismatch,
    /// The name resolves to a blocked range or to a host address.
    BlockedAddress,
    /// DNS gave no address (or timed out).
    ResolveFailed,
    /// No checked address accepted a connection within the timeout.
    ConnectFailed,
}

impl Reason {
    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::UnknownClient => "unknown_client",
            Self::TooManyConnections => "too_many_connections",
            Self::BadRequest => "bad_request",
            Self::NotAllowed => "not_allowed",
            Self::IpLiteral => "ip_literal",
            Self::NoSni => "no_sni",
            Self::SniMismatch => "sni_mismatch",
            Self::BlockedAddress => "blocked_address",
            Self::ResolveFailed => "resolve_failed",
            Self::ConnectFailed => "connect_failed",
        }
    }
}

/// The report of one client connection. Never carries the payload, nor the path or query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnReport {
    /// The user of the client, `null` for an unknown client.
    pub user: Option<String>,
    /// The client's source address.
    pub client: IpAddr,
    /// The destination host (at most 253 characters), `null` when the refusal came before
    /// the request head was read or understood.
    pub host: Option<String>,
    /// The destination port, when known.
    pub port: Option<u16>,
    /// The request method (at most 32 characters), when known.
    pub method: Option<String>,
    /// Allowed or refused.
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason,
    /// Bytes relayed client → server (including the rewritten head of a plain request).
    pub up: u64,
    /// Bytes relayed server → client.
    pub down: u64,
    /// Duration of the connection from accept to close, in milliseconds.
    pub ms: u64,
}

impl ConnReport {
    /// A report for a connection from `client` about which nothing else is known yet.
    pub fn new(client: IpAddr) -> Self {
        Self {
            user: None,
            client,
            host: None,
            port: None,
            method: None,
            verdict: Verdict::Refused,
            reason: Reason::BadRequest,
            up: 0,
            down: 0,
            ms: 0,
        }
    }

    /// Set `host`, truncated to 253 characters (it may come from a hostile client).
    pub fn set_host(&mut self, host: &str) {
        self.host = Some(truncate_chars(host, MAX_NAME_LEN));
    }

    /// Set `method`, truncated to 32 characters.
    pub fn set_method(&mut self, method: &str) {
        self.method = Some(truncate_chars(method, MAX_METHOD_LEN));
    }
}

/// A static name → address override (see [`ProxyConfig::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticAddr {
    /// The host name (normalised when the config is validated).
    pub name: String,
    /// One address it resolves to; list the name again for more.
    pub ip: IpAddr,
}

/// The proxy's whole configuration, given as one JSON document in `ZCBOT_EGRESS_CONFIG`.
/// Every field has a default; unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Where to listen. Default `0.0.0.0:3128`.
    pub listen: SocketAddr,
    /// Static overrides: a name listed here resolves ONLY to these addresses, and they skip
    /// the blocked-range check (an operator's and a test's knob). Default empty.
    pub resolve: Vec<StaticAddr>,
    /// CIDRs a DNS answer may not point into (e.g. `"10.0.0.0/8"`). Default empty; the
    /// unspecified ranges `0.0.0.0/8` and `::/128` are always blocked.
    pub blocked: Vec<IpNet>,
    /// Addresses of the host (and the proxy itself) a DNS answer may not point to.
    pub host_addrs: Vec<IpAddr>,
    /// Concurrent connections per user. Default 64.
    pub max_conns_per_user: u32,
    /// Time to receive the request head and, for CONNECT, the TLS ClientHello, counted from
    /// accept. Default 10000.
    pub header_timeout_ms: u64,
    /// A relayed connection with no byte in either direction for this long is closed.
    /// Default 300000.
    pub idle_timeout_ms: u64,
    /// Time to connect to the destination, all its addresses together. Default 10000.
    pub connect_timeout_ms: u64,
    /// Largest request head. Default 16384.
    pub max_header_bytes: usize,
    /// Time for one DNS resolution. Default 5000.
    pub dns_timeout_ms: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 3128)),
            resolve: Vec::new(),
            blocked: Vec::new(),
            host_addrs: Vec::new(),
            max_conns_per_user: 64,
            header_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            connect_timeout_ms: 10_000,
            max_header_bytes: 16_384,
            dns_timeout_ms: 5_000,
        }
    }
}

impl ProxyConfig {
    /// Parse and validate the JSON document.
    pub fn from_json(s: &str) -> Result<Self, String> {
        let cfg: Self = serde_json::from_str(s).map_err(|e| format!("invalid config: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check ranges and the override names.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("header_timeout_ms", self.header_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("dns_timeout_ms", self.dns_timeout_ms),
            ("max_conns_per_user", u64::from(self.max_conns_per_user)),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("invalid config: {name} must be greater than 0"));
            }
        }
        if !(1024..=1024 * 1024).contains(&self.max_header_bytes) {
            return Err("invalid config: max_header_bytes must be in 1024..=1048576".to_string());
        }
        for entry in &self.resolve {
            normalize_host(&entry.name)
                .map_err(|e| format!("invalid config: resolve name: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        let set = Command::parse_line(
            r#"{"seq":3,"op":"set","ip":"172.18.0.5","user":"alice","allow":["pypi.org","*.pythonhosted.org"]}"#,
        )
        .unwrap();
        match &set {
            Command::Set { seq, allow, .. } => {
                assert_eq!(*seq, 3);
                assert_eq!(allow[1].to_string(), "*.pythonhosted.org");
            }
            other => panic!("{other:?}"),
        }
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(Command::parse_line(&json).unwrap(), set);
        assert_eq!(
            Command::parse_line(r#"{"seq":1,"op":"reset"}"#).unwrap(),
            Command::Reset { seq: 1 }
        );
        assert_eq!(
            Command::parse_line(r#"{"seq":2,"op":"drop","ip":"::1"}"#)
                .unwrap()
                .seq(),
            2
        );
    }

    #[test]
    fn bad_commands_keep_seq_when_readable() {
        let (seq, msg) = Command::parse_line(
            r#"{"seq":9,"op":"set","ip":"172.18.0.5","user":"a","allow":["a.*.b"]}"#,
        )
        .unwrap_err();
        assert_eq!(seq, Some(9));
        assert!(msg.contains("a.*.b"), "{msg}");
        assert_eq!(Command::parse_line("nope").unwrap_err().0, None);
        assert_eq!(
            Command::parse_line(r#"{"seq":4,"op":"explode"}"#)
                .unwrap_err()
                .0,
            Some(4)
        );
    }

    #[test]
    fn reports_serialize_as_documented() {
        let mut c = ConnReport::new("172.18.0.5".parse().unwrap());
        c.user = Some("alice".into());
        c.set_host(&"h".repeat(400));
        c.port = Some(443);
        c.set_method("CONNECT");
        c.verdict = Verdict::Allowed;
        c.reason = Reason::Ok;
        assert_eq!(c.host.as_ref().unwrap().len(), 253);
        let v: serde_json::Value = serde_json::to_value(Report::Conn(c)).unwrap();
        assert_eq!(v["kind"], "conn");
        assert_eq!(v["verdict"], "allowed");
        assert_eq!(v["reason"], "ok");
        assert_eq!(v["client"], "172.18.0.5");
        let e = serde_json::to_string(&Report::Error {
            seq: None,
            message: "x".into(),
        })
        .unwrap();
        assert_eq!(e, r#"{"kind":"error","seq":null,"message":"x"}"#);
        assert_eq!(
            serde_json::to_string(&Report::Ack { seq: 7 }).unwrap(),
            r#"{"kind":"ack","seq":7}"#
        );
        for r in [Reason::UnknownClient, Reason::SniMismatch, Reason::Ok] {
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                serde_json::Value::from(r.as_str())
            );
        }
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = ProxyConfig::from_json("{}").unwrap();
        assert_eq!(c, ProxyConfig::default());
        assert_eq!(c.listen.to_string(), "0.0.0.0:3128");
        let c = ProxyConfig::from_json(
            r#"{"resolve":[{"name":"allowed.test","ip":"127.0.0.1"}],"blocked":["127.0.0.0/8","fc00::/7"],"host_addrs":["172.17.0.1"]}"#,
        )
        .unwrap();
        assert_eq!(c.blocked.len(), 2);
        assert!(ProxyConfig::from_json(r#"{"bogus":1}"#).is_err());
        assert!(ProxyConfig::from_json(r#"{"idle_timeout_ms":0}"#).is_err());
        assert!(ProxyConfig::from_json(r#"{"blocked":["nope"]}"#).is_err());
        assert!(
            ProxyConfig::from_json(r#"{"resolve":[{"name":"1.2.3.4","ip":"127.0.0.1"}]}"#).is_err()
        );
    }
}
