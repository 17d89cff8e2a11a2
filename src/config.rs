//! `Config`: every environment variable the pool reads, its default, and its validation.
//!
//! Read once at startup with [`Config::from_env`]; a bad value is an error naming the variable and
//! the value, so an operator never runs with a setting they did not mean. An empty variable counts
//! as unset.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::error::{Error, Result};

/// Validated settings of one pool. Build it with [`Config::from_env`] or [`Config::from_lookup`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `ZCBOT_SANDBOX_IMAGE`: the sandbox image (default `zcbot-sandbox:latest`).
    pub image: String,
    /// `ZCBOT_USERS_ROOT`: host folder with one folder per user, each bind-mounted at `/workspace`
    /// (default `/var/lib/zcbot-sandbox/users`).
    pub users_root: PathBuf,
    /// `ZCBOT_STATE_DIR`: where the pool keeps its durable last-activity record
    /// (default `/var/lib/zcbot-sandbox/state`).
    pub state_dir: PathBuf,
    /// `ZCBOT_SANDBOX_NETWORK`: the internal bridge network (default `zcbot-sandbox-net`).
    pub network: String,
    /// `ZCBOT_POOL_ID`: separates pools on one host; a pool only ever touches containers labelled
    /// with its own id (default `default`).
    pub pool_id: String,
    /// `ZCBOT_SANDBOX_IDLE`: a container idle this long is reaped (default 5m).
    pub idle: Duration,
    /// `ZCBOT_SANDBOX_REAP_EVERY`: how often the reaper looks (default 60s).
    pub reap_every: Duration,
    /// `ZCBOT_SANDBOX_MEMORY`: memory limit in bytes; swap is set equal, so no swap (default 512MiB).
    pub memory_bytes: i64,
    /// `ZCBOT_SANDBOX_CPUS`: CPU limit in cores (default 1.0).
    pub cpus: f64,
    /// `ZCBOT_SANDBOX_PIDS`: most processes in one container (default 256).
    pub pids: i64,
    /// `ZCBOT_SANDBOX_TMPFS_SIZE`: size of the container's `/tmp` tmpfs in bytes (default 64MiB).
    pub tmpfs_bytes: i64,
    /// `ZCBOT_SANDBOX_UID`: `uid:gid` every tenant runs as when the daemon cannot give each its
    /// own (not root), and the owner whose folders a root daemon migrates to the tenants' own
    /// uids (default 1000:1000, the single uid of earlier releases).
    pub uid: u32,
    /// The gid half of `ZCBOT_SANDBOX_UID`.
    pub gid: u32,
    /// `ZCBOT_SANDBOX_UID_RANGE`: `FIRST-LAST`, the host uids (and gids) tenants get, one each,
    /// allocated once and kept in the state folder (default 200000-299999). No host account may
    /// use them: the daemon refuses to start if one does.
    pub uid_range: UidRange,
    /// `ZCBOT_SANDBOX_DISK`: bytes one user's folder may hold, enforced by the kernel where the
    /// users root allows it (btrfs with quotas; default 1GiB).
    pub disk_bytes: u64,
    /// `ZCBOT_REQUIRE_DISK_QUOTA`: refuse to start when the users root cannot enforce
    /// `ZCBOT_SANDBOX_DISK` (default off: start with a loud warning).
    pub require_disk_quota: bool,
    /// `ZCBOT_FILE_TIMEOUT`: the deadline of one file tool call (default 30s).
    pub file_timeout: Duration,
    /// `ZCBOT_FILE_MAX_ENTRIES`: folder entries one file call may visit (default 1000000).
    pub file_max_entries: u64,
    /// `ZCBOT_FILE_WORKERS`: file calls running at once on the host, all users together
    /// (default 8; each user has at most 2 of them).
    pub file_workers: usize,
    /// `ZCBOT_HTTP_HEADER_TIMEOUT`: how long a client may take to send a request's headers
    /// (default 10s).
    pub http_header_timeout: Duration,
    /// `ZCBOT_HTTP_BODY_TIMEOUT`: how long a client may take to send a request's body, once its
    /// headers are in (default 30s).
    pub http_body_timeout: Duration,
    /// `ZCBOT_HTTP_IDLE_TIMEOUT`: how long a kept-alive connection may sit idle between requests
    /// (default 60s).
    pub http_idle_timeout: Duration,
    /// `ZCBOT_HTTP_MAX_CONNECTIONS`: open connections at most; more are refused at once with 503
    /// (default 1024).
    pub http_max_connections: usize,
    /// `ZCBOT_SANDBOX_MAX`: most containers at once (default 100).
    pub max_containers: usize,
    /// `ZCBOT_PG_IPS`: database addresses the sandbox must never reach (comma or space separated).
    pub pg_ips: Vec<IpNet>,
    /// `ZCBOT_SANDBOX_BLOCK_CIDRS`: more ranges the sandbox must never reach.
    pub block_cidrs: Vec<IpNet>,
    /// `DOCKER_HOST`: the engine's address (default the local unix socket).
    pub docker_host: Option<String>,
    /// `ZCBOT_DOCKER_TIMEOUT`: deadline of every single Docker call (default 30s).
    pub docker_timeout: Duration,
    /// `ZCBOT_SANDBOX_START_TIMEOUT`: how long a new container may take to report its rules in
    /// place (default 30s).
    pub start_timeout: Duration,
    /// `ZCBOT_SANDBOX_BACKEND`: where `shell` and `run_python` run (default `host`).
    pub backend: Backend,
    /// `ZCBOT_EXEC_TRANSPORT`: how process calls reach the sandbox (default `channel`).
    pub transport: Transport,
    /// `ZCBOT_EXEC_TIMEOUT`: a call's timeout when the caller gives none (default 120s).
    pub exec_timeout: Duration,
    /// `ZCBOT_EXEC_TIMEOUT_MAX`: the longest timeout a caller may ask for (default 600s).
    pub exec_timeout_max: Duration,
    /// `ZCBOT_OUTPUT_CAP`: bytes kept per output stream, head and tail (default 1MiB).
    pub output_cap: usize,
    /// `ZCBOT_KILL_GRACE`: time between SIGTERM and SIGKILL when a call is stopped (default 500ms).
    pub kill_grace: Duration,
    /// `ZCBOT_LISTEN`: where `serve` listens: `HOST:PORT`, or a unix socket as an absolute path or
    /// `unix:PATH` (default `127.0.0.1:8787`).
    pub listen: Listen,
    /// `ZCBOT_API_TOKEN`: when set, every request needs `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    /// `ZCBOT_MAX_BODY`: the largest request body (default 4MiB).
    pub max_body: usize,
    /// `ZCBOT_USER_MAX_CALLS`: calls one user may have in flight (default 4); more get 429.
    pub user_max_calls: usize,
    /// `ZCBOT_SHUTDOWN_GRACE`: how long calls in flight may finish after SIGTERM (default 30s).
    pub shutdown_grace: Duration,
    /// `ZCBOT_REQUIRE_HOST_FIREWALL`: refuse to start when the host firewall cannot be installed
    /// (default off: start with a loud warning).
    pub require_host_firewall: bool,
    /// `ZCBOT_SELF_CHECK`: at startup (docker backend), a probe sandbox tries the network escapes
    /// and the daemon refuses to start if any succeeds (default 1).
    pub self_check: bool,
    /// `ZCBOT_SANDBOX_EGRESS`: `none` (default; no way out at all) or `public` (public addresses
    /// only, on a separate non-internal network).
    pub egress: Egress,
    /// `ZCBOT_CONTAINER_RULES`: who installs each container's own rules: `host` (the daemon,
    /// through the container's network namespace; needs root), `entry` (the container, which then
    /// keeps NET_ADMIN), or `auto` (default: host when the daemon is root).
    pub container_rules: RulesSetting,
}

/// The `ZCBOT_CONTAINER_RULES` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulesSetting {
    /// Host when the daemon is root, else entry.
    Auto,
    /// Always from the host (startup fails without root).
    Host,
    /// Always by the entry.
    Entry,
}

/// What a sandbox may reach beyond itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Nothing: an internal network and default-deny rules.
    None,
    /// Public addresses only: every private, local, reserved range and the host are rejected.
    Public,
}

impl Egress {
    /// The word used in variables and the entry's arguments.
    pub fn as_str(self) -> &'static str {
        match self {
            Egress::None => "none",
            Egress::Public => "public",
        }
    }
}

impl Config {
    /// The Docker network the sandboxes use: `ZCBOT_SANDBOX_NETWORK`, or
    /// `<ZCBOT_SANDBOX_NETWORK>-public` for the public egress policy (a different network, since
    /// it cannot be internal).
    pub fn network_name(&self) -> String {
        match self.egress {
            Egress::None => self.network.clone(),
            Egress::Public => format!("{}-public", self.network),
        }
    }
}

/// The uids a pool gives its tenants (gid = uid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    /// First uid of the range.
    pub first: u32,
    /// Last uid of the range (inclusive).
    pub last: u32,
}

impl UidRange {
    /// How many uids the range holds.
    pub(crate) fn len(&self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    /// Whether `uid` lies in the range.
    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "http://{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Where tool calls run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// On the host, as the daemon's user: for development; isolates nothing.
    Host,
    /// In the user's sandbox container.
    Docker,
}

/// How the docker backend reaches a sandbox for a process call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// One Docker exec per call (50-70 ms of engine work each).
    Exec,
    /// Calls multiplexed over one long-lived exec per container (about a millisecond each);
    /// falls back to `Exec` for a call when the channel cannot be opened.
    Channel,
}

/// Every variable [`Config`] reads (a test holds RUN.md to documenting each one).
pub const VARIABLES: &[&str] = &[
    "ZCBOT_SANDBOX_IMAGE",
    "ZCBOT_USERS_ROOT",
    "ZCBOT_STATE_DIR",
    "ZCBOT_SANDBOX_NETWORK",
    "ZCBOT_POOL_ID",
    "ZCBOT_SANDBOX_IDLE",
    "ZCBOT_SANDBOX_REAP_EVERY",
    "ZCBOT_SANDBOX_MEMORY",
    "ZCBOT_SANDBOX_CPUS",
    "ZCBOT_SANDBOX_PIDS",
    "ZCBOT_SANDBOX_TMPFS_SIZE",
    "ZCBOT_SANDBOX_UID",
    "ZCBOT_SANDBOX_UID_RANGE",
    "ZCBOT_SANDBOX_DISK",
    "ZCBOT_REQUIRE_DISK_QUOTA",
    "ZCBOT_FILE_TIMEOUT",
    "ZCBOT_FILE_MAX_ENTRIES",
    "ZCBOT_FILE_WORKERS",
    "ZCBOT_HTTP_HEADER_TIMEOUT",
    "ZCBOT_HTTP_IDLE_TIMEOUT",
    "ZCBOT_HTTP_BODY_TIMEOUT",
    "ZCBOT_HTTP_MAX_CONNECTIONS",
    "ZCBOT_SANDBOX_MAX",
    "ZCBOT_PG_IPS",
    "ZCBOT_SANDBOX_BLOCK_CIDRS",
    "DOCKER_HOST",
    "ZCBOT_DOCKER_TIMEOUT",
    "ZCBOT_SANDBOX_START_TIMEOUT",
    "ZCBOT_SANDBOX_BACKEND",
    "ZCBOT_EXEC_TRANSPORT",
    "ZCBOT_EXEC_TIMEOUT",
    "ZCBOT_EXEC_TIMEOUT_MAX",
    "ZCBOT_OUTPUT_CAP",
    "ZCBOT_KILL_GRACE",
    "ZCBOT_LISTEN",
    "ZCBOT_API_TOKEN",
    "ZCBOT_MAX_BODY",
    "ZCBOT_USER_MAX_CALLS",
    "ZCBOT_SHUTDOWN_GRACE",
    "ZCBOT_REQUIRE_HOST_FIREWALL",
    "ZCBOT_SELF_CHECK",
    "ZCBOT_SANDBOX_EGRESS",
    "ZCBOT_CONTAINER_RULES",
];

impl Config {
    /// Reads and validates every variable from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads and validates every variable through `get` (tests pass a map here).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let (uid, gid) = parse_var(&get, "ZCBOT_SANDBOX_UID", "1000:1000", parse_uid_gid)?;
        let exec_timeout = parse_var(&get, "ZCBOT_EXEC_TIMEOUT", "120s", parse_duration)?;
        let exec_timeout_max = parse_var(&get, "ZCBOT_EXEC_TIMEOUT_MAX", "600s", parse_duration)?;
        if exec_timeout > exec_timeout_max {
            return Err(Error::Config {
                var: "ZCBOT_EXEC_TIMEOUT",
                value: humantime::format_duration(exec_timeout).to_string(),
                reason: "must not be longer than ZCBOT_EXEC_TIMEOUT_MAX".into(),
            });
        }
        let uid_range = parse_var(
            &get,
            "ZCBOT_SANDBOX_UID_RANGE",
            "200000-299999",
            parse_uid_range,
        )?;
        if uid_range.contains(uid) {
            // The old single owner's folders would look like some tenant's own.
            return Err(Error::Config {
                var: "ZCBOT_SANDBOX_UID_RANGE",
                value: uid_range.to_string(),
                reason: format!("must not hold ZCBOT_SANDBOX_UID ({uid})"),
            });
        }
        let listen = parse_var(&get, "ZCBOT_LISTEN", "127.0.0.1:8787", parse_listen)?;
        let api_token = get("ZCBOT_API_TOKEN");
        if let Listen::Tcp(addr) = &listen {
            if !addr.ip().is_loopback() && api_token.is_none() {
                return Err(Error::Config {
                    var: "ZCBOT_LISTEN",
                    value: addr.to_string(),
                    reason:
                        "anyone who reaches the API can run code as any user: listening beyond \
                             loopback needs ZCBOT_API_TOKEN"
                            .into(),
                });
            }
        }
        if api_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(Error::Config {
                var: "ZCBOT_API_TOKEN",
                value: "(hidden)".into(),
                reason: "must be at least 16 characters".into(),
            });
        }
        Ok(Config {
            image: parse_var(&get, "ZCBOT_SANDBOX_IMAGE", "zcbot-sandbox:latest", |v| {
                if v.chars().any(char::is_whitespace) {
                    Err("an image reference has no spaces".into())
                } else {
                    Ok(v.to_owned())
                }
            })?,
            users_root: parse_var(
                &get,
                "ZCBOT_USERS_ROOT",
                "/var/lib/zcbot-sandbox/users",
                parse_abs_path,
            )?,
            state_dir: parse_var(
                &get,
                "ZCBOT_STATE_DIR",
                "/var/lib/zcbot-sandbox/state",
                parse_abs_path,
            )?,
            network: parse_var(&get, "ZCBOT_SANDBOX_NETWORK", "zcbot-sandbox-net", |v| {
                docker_name(v, 56).map(str::to_owned)
            })?,
            pool_id: parse_var(&get, "ZCBOT_POOL_ID", "default", parse_pool_id)?,
            idle: parse_var(&get, "ZCBOT_SANDBOX_IDLE", "5m", parse_duration)?,
            reap_every: parse_var(&get, "ZCBOT_SANDBOX_REAP_EVERY", "60s", parse_duration)?,
            memory_bytes: parse_var(&get, "ZCBOT_SANDBOX_MEMORY", "512MiB", |v| {
                parse_bytes(v, 6 << 20)
            })?,
            cpus: parse_var(&get, "ZCBOT_SANDBOX_CPUS", "1.0", parse_cpus)?,
            pids: parse_var(&get, "ZCBOT_SANDBOX_PIDS", "256", |v| {
                parse_int(v, 8, 1 << 22)
            })?,
            tmpfs_bytes: parse_var(&get, "ZCBOT_SANDBOX_TMPFS_SIZE", "64MiB", |v| {
                parse_bytes(v, 1 << 20)
            })?,
            uid,
            gid,
            uid_range,
            disk_bytes: parse_var(&get, "ZCBOT_SANDBOX_DISK", "1GiB", |v| {
                parse_bytes(v, 16 << 20).map(|n| n as u64)
            })?,
            require_disk_quota: parse_var(&get, "ZCBOT_REQUIRE_DISK_QUOTA", "0", parse_bool)?,
            file_timeout: parse_var(&get, "ZCBOT_FILE_TIMEOUT", "30s", parse_duration)?,
            file_max_entries: parse_var(&get, "ZCBOT_FILE_MAX_ENTRIES", "1000000", |v| {
                parse_int(v, 100, 1 << 40).map(|n| n as u64)
            })?,
            file_workers: parse_var(&get, "ZCBOT_FILE_WORKERS", "8", |v| {
                parse_int(v, 1, 1024).map(|n| n as usize)
            })?,
            http_header_timeout: parse_var(
                &get,
                "ZCBOT_HTTP_HEADER_TIMEOUT",
                "10s",
                parse_duration,
            )?,
            http_body_timeout: parse_var(&get, "ZCBOT_HTTP_BODY_TIMEOUT", "30s", parse_duration)?,
            http_idle_timeout: parse_var(&get, "ZCBOT_HTTP_IDLE_TIMEOUT", "60s", parse_duration)?,
            http_max_connections: parse_var(&get, "ZCBOT_HTTP_MAX_CONNECTIONS", "1024", |v| {
                parse_int(v, 1, 1_000_000).map(|n| n as usize)
            })?,
            max_containers: parse_var(&get, "ZCBOT_SANDBOX_MAX", "100", |v| {
                parse_int(v, 1, 100_000).map(|n| n as usize)
            })?,
            pg_ips: parse_var(&get, "ZCBOT_PG_IPS", "", parse_cidr_list)?,
            block_cidrs: parse_var(&get, "ZCBOT_SANDBOX_BLOCK_CIDRS", "", parse_cidr_list)?,
            docker_host: get("DOCKER_HOST"),
            docker_timeout: parse_var(&get, "ZCBOT_DOCKER_TIMEOUT", "30s", parse_duration)?,
            start_timeout: parse_var(&get, "ZCBOT_SANDBOX_START_TIMEOUT", "30s", parse_duration)?,
            backend: parse_var(&get, "ZCBOT_SANDBOX_BACKEND", "host", |v| match v {
                "host" => Ok(Backend::Host),
                "docker" => Ok(Backend::Docker),
                _ => Err("must be host or docker".into()),
            })?,
            transport: parse_var(&get, "ZCBOT_EXEC_TRANSPORT", "channel", |v| match v {
                "exec" => Ok(Transport::Exec),
                "channel" => Ok(Transport::Channel),
                _ => Err("must be exec or channel".into()),
            })?,
            exec_timeout,
            exec_timeout_max,
            output_cap: parse_var(&get, "ZCBOT_OUTPUT_CAP", "1MiB", |v| {
                parse_bytes(v, 1024).map(|n| n as usize)
            })?,
            kill_grace: parse_var(&get, "ZCBOT_KILL_GRACE", "500ms", parse_duration)?,
            listen,
            api_token,
            max_body: parse_var(&get, "ZCBOT_MAX_BODY", "4MiB", |v| {
                parse_bytes(v, 1024).map(|n| n as usize)
            })?,
            user_max_calls: parse_var(&get, "ZCBOT_USER_MAX_CALLS", "4", |v| {
                parse_int(v, 1, 10_000).map(|n| n as usize)
            })?,
            shutdown_grace: parse_var(&get, "ZCBOT_SHUTDOWN_GRACE", "30s", parse_duration)?,
            require_host_firewall: parse_var(&get, "ZCBOT_REQUIRE_HOST_FIREWALL", "0", parse_bool)?,
            self_check: parse_var(&get, "ZCBOT_SELF_CHECK", "1", parse_bool)?,
            container_rules: parse_var(&get, "ZCBOT_CONTAINER_RULES", "auto", |v| match v {
                "auto" => Ok(RulesSetting::Auto),
                "host" => Ok(RulesSetting::Host),
                "entry" => Ok(RulesSetting::Entry),
                _ => Err("must be auto, host or entry".into()),
            })?,
            egress: parse_var(&get, "ZCBOT_SANDBOX_EGRESS", "none", |v| match v {
                "none" => Ok(Egress::None),
                "public" => Ok(Egress::Public),
                _ => Err("must be none or public".into()),
            })?,
        })
    }

    /// The engine address used for connecting and quoted in errors.
    pub fn docker_host_display(&self) -> String {
        self.docker_host
            .clone()
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned())
    }
}

fn parse_var<T>(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: &str,
    parse: impl Fn(&str) -> std::result::Result<T, String>,
) -> Result<T> {
    let value = get(var).unwrap_or_else(|| default.to_owned());
    parse(value.trim()).map_err(|reason| Error::Config { var, value, reason })
}

fn parse_bool(v: &str) -> std::result::Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => Err("must be 1 or 0".into()),
    }
}

fn parse_listen(v: &str) -> std::result::Result<Listen, String> {
    if let Some(path) = v.strip_prefix("unix:") {
        return parse_abs_path(path).map(Listen::Unix);
    }
    if v.starts_with('/') {
        return parse_abs_path(v).map(Listen::Unix);
    }
    v.parse()
        .map(Listen::Tcp)
        .map_err(|_| "write HOST:PORT (e.g. 127.0.0.1:8787) or a unix socket path".into())
}

fn parse_duration(v: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(v)
        .map_err(|e| format!("{e}; write a duration such as 90s, 5m or 1h"))?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

fn parse_abs_path(v: &str) -> std::result::Result<PathBuf, String> {
    let p = PathBuf::from(v);
    if !p.is_absolute() {
        return Err("must be an absolute path".into());
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err("must not contain '..'".into());
    }
    Ok(p)
}

fn parse_int(v: &str, min: i64, max: i64) -> std::result::Result<i64, String> {
    let n: i64 = v
        .parse()
        .map_err(|_| format!("must be a whole number from {min} to {max}"))?;
    if !(min..=max).contains(&n) {
        return Err(format!("must be a whole number from {min} to {max}"));
    }
    Ok(n)
}

/// Sizes follow Docker's convention: a bare number is bytes, and every unit is binary
/// (k = KiB = KB = 1024 bytes; likewise m, g).
pub(crate) fn parse_bytes(v: &str, min: i64) -> std::result::Result<i64, String> {
    let hint = "write a size such as 512MiB, 512m, 1g or 1073741824";
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: i64 = num.parse().map_err(|_| hint.to_owned())?;
    let mult: i64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(hint.to_owned()),
    };
    let bytes = n.checked_mul(mult).ok_or_else(|| "too large".to_owned())?;
    if bytes < min {
        return Err(format!("must be at least {min} bytes"));
    }
    Ok(bytes)
}

fn parse_cpus(v: &str) -> std::result::Result<f64, String> {
    let cpus: f64 = v
        .parse()
        .map_err(|_| "must be a number of cores such as 0.5 or 2".to_owned())?;
    let host = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if !(0.01..=host).contains(&cpus) {
        return Err(format!(
            "must be from 0.01 to {host} (this host's core count)"
        ));
    }
    Ok(cpus)
}

fn parse_uid_gid(v: &str) -> std::result::Result<(u32, u32), String> {
    let hint = "write UID:GID such as 1000:1000 (root, uid 0, is refused)";
    let (u, g) = v.split_once(':').unwrap_or((v, v));
    let uid: u32 = u.parse().map_err(|_| hint.to_owned())?;
    let gid: u32 = g.parse().map_err(|_| hint.to_owned())?;
    if uid == 0 || gid == 0 {
        return Err(hint.to_owned());
    }
    Ok((uid, gid))
}

fn parse_uid_range(v: &str) -> std::result::Result<UidRange, String> {
    let hint = "write FIRST-LAST such as 200000-299999 (ids no host account uses, above 65535)";
    let (a, b) = v.split_once('-').ok_or_else(|| hint.to_owned())?;
    let first: u32 = a.trim().parse().map_err(|_| hint.to_owned())?;
    let last: u32 = b.trim().parse().map_err(|_| hint.to_owned())?;
    // Below 65536 live the distribution's and the site's accounts (and nobody, 65534);
    // u32::MAX is the kernel's "no id" and must never be handed out.
    if first < 65_536 || last < first || last == u32::MAX {
        return Err(hint.to_owned());
    }
    Ok(UidRange { first, last })
}

/// A byte count as an operator writes it (`1 GiB`, `512 MiB`, `1000 bytes`).
pub fn format_bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} bytes")
}

fn parse_pool_id(v: &str) -> std::result::Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 32
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(v.to_owned())
    } else {
        Err("1 to 32 characters of a-z, 0-9 and '-', starting with a letter or digit".into())
    }
}

fn docker_name(v: &str, max: usize) -> std::result::Result<&str, String> {
    let ok = !v.is_empty()
        && v.len() <= max
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(v)
    } else {
        Err(format!(
            "1 to {max} characters of letters, digits, '_', '.' and '-', starting with a letter or digit"
        ))
    }
}

/// A list of addresses or CIDR ranges, comma or space separated; a bare address is one host.
fn parse_cidr_list(v: &str) -> std::result::Result<Vec<IpNet>, String> {
    v.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR range"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.image, "zcbot-sandbox:latest");
        assert_eq!(c.network, "zcbot-sandbox-net");
        assert_eq!(c.idle, Duration::from_secs(300));
        assert_eq!(c.reap_every, Duration::from_secs(60));
        assert_eq!(c.memory_bytes, 512 << 20);
        assert_eq!(c.cpus, 1.0);
        assert_eq!(c.pids, 256);
        assert_eq!((c.uid, c.gid), (1000, 1000));
        assert_eq!(c.pool_id, "default");
        assert!(c.pg_ips.is_empty() && c.block_cidrs.is_empty());
        assert_eq!(c.backend, Backend::Host);
        assert_eq!(c.exec_timeout, Duration::from_secs(120));
        assert_eq!(c.output_cap, 1 << 20);
        assert_eq!(c.listen, Listen::Tcp("127.0.0.1:8787".parse().unwrap()));
        assert!(c.api_token.is_none());
        assert_eq!(
            c.uid_range,
            UidRange {
                first: 200_000,
                last: 299_999
            }
        );
        assert_eq!(c.disk_bytes, 1 << 30);
        assert!(!c.require_disk_quota);
        assert_eq!(c.file_timeout, Duration::from_secs(30));
        assert_eq!(c.http_max_connections, 1024);
        assert_eq!(format_bytes(c.disk_bytes), "1 GiB");
    }

    #[test]
    fn listening_beyond_loopback_needs_a_token() {
        let token = "0123456789abcdef0123";
        let c = cfg(&[("ZCBOT_LISTEN", "0.0.0.0:9000"), ("ZCBOT_API_TOKEN", token)]).unwrap();
        assert_eq!(c.api_token.as_deref(), Some(token));
        let c = cfg(&[("ZCBOT_LISTEN", "unix:/run/zcbot.sock")]).unwrap();
        assert_eq!(c.listen, Listen::Unix("/run/zcbot.sock".into()));
        let err = cfg(&[("ZCBOT_API_TOKEN", "short")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ZCBOT_API_TOKEN") && !err.contains("short"),
            "{err}"
        );
    }

    #[test]
    fn parses_units_and_lists() {
        let c = cfg(&[
            ("ZCBOT_SANDBOX_IDLE", "90s"),
            ("ZCBOT_SANDBOX_MEMORY", "1g"),
            ("ZCBOT_SANDBOX_TMPFS_SIZE", "16m"),
            ("ZCBOT_SANDBOX_UID", "1234"),
            ("ZCBOT_PG_IPS", "10.1.2.3, fd00::5"),
            ("ZCBOT_SANDBOX_BLOCK_CIDRS", "203.0.113.7/24 2001:db8::/32"),
            ("ZCBOT_SANDBOX_MAX", ""),
        ])
        .unwrap();
        assert_eq!(c.idle, Duration::from_secs(90));
        assert_eq!(c.memory_bytes, 1 << 30);
        assert_eq!(c.tmpfs_bytes, 16 << 20);
        assert_eq!((c.uid, c.gid), (1234, 1234));
        assert_eq!(c.max_containers, 100, "empty means unset");
        assert_eq!(
            c.pg_ips,
            vec![
                "10.1.2.3/32".parse::<IpNet>().unwrap(),
                "fd00::5/128".parse().unwrap()
            ]
        );
        assert_eq!(c.block_cidrs[0], "203.0.113.0/24".parse::<IpNet>().unwrap());
    }

    #[test]
    fn bad_values_name_the_variable_and_value() {
        for (var, value) in [
            ("ZCBOT_SANDBOX_IDLE", "soon"),
            ("ZCBOT_SANDBOX_IDLE", "0s"),
            ("ZCBOT_SANDBOX_MEMORY", "lots"),
            ("ZCBOT_SANDBOX_MEMORY", "1k"),
            ("ZCBOT_SANDBOX_CPUS", "0"),
            ("ZCBOT_SANDBOX_CPUS", "9999"),
            ("ZCBOT_SANDBOX_PIDS", "-1"),
            ("ZCBOT_SANDBOX_UID", "0:0"),
            ("ZCBOT_SANDBOX_UID", "bob"),
            ("ZCBOT_SANDBOX_MAX", "0"),
            ("ZCBOT_USERS_ROOT", "relative/dir"),
            ("ZCBOT_USERS_ROOT", "/srv/../etc"),
            ("ZCBOT_SANDBOX_NETWORK", "bad name"),
            ("ZCBOT_POOL_ID", "Has.Dot"),
            ("ZCBOT_PG_IPS", "10.0.0.1,db.example"),
            ("ZCBOT_SANDBOX_BACKEND", "podman"),
            ("ZCBOT_OUTPUT_CAP", "10"),
            ("ZCBOT_EXEC_TIMEOUT", "1h"),
            ("ZCBOT_LISTEN", "0.0.0.0:8787"),
            ("ZCBOT_LISTEN", "localhost"),
            ("ZCBOT_USER_MAX_CALLS", "0"),
            ("ZCBOT_SANDBOX_EGRESS", "open"),
            ("ZCBOT_SANDBOX_UID_RANGE", "1000-2000"),
            ("ZCBOT_SANDBOX_UID_RANGE", "300000-200000"),
            ("ZCBOT_SANDBOX_UID_RANGE", "lots"),
            ("ZCBOT_SANDBOX_UID_RANGE", "999-299999"),
            ("ZCBOT_SANDBOX_DISK", "1k"),
            ("ZCBOT_FILE_WORKERS", "0"),
            ("ZCBOT_HTTP_MAX_CONNECTIONS", "0"),
            ("ZCBOT_HTTP_HEADER_TIMEOUT", "never"),
        ] {
            let err = cfg(&[(var, value)]).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(var) && msg.contains(value),
                "{var}={value}: {msg}"
            );
            assert_eq!(err.kind(), "config");
        }
    }
}
