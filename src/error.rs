//! The library's error type: one variant per failure a caller can tell apart and act on.
//!
//! Every message says what happened and, where there is one, what to do about it.
//!
//! **Each error's text includes its cause, and no error reports a `source()` as well**: the API,
//! the logs and the CLI all print `to_string()`, and a printer that also walks the source chain
//! (anyhow's `{:#}`) would print the cause twice ("Address already in use (os error 98): Address
//! already in use (os error 98)"). A foreign error is turned into text with
//! [`crate::text::error_chain`], which keeps its causes once.

use std::path::PathBuf;
use std::time::Duration;

pub(crate) mod file;
pub use file::{FileError, Problem, Refusal};

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the pool, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A user id failed validation; nothing touched Docker or the file system.
    #[error("invalid user id {input:?}: {reason}")]
    InvalidUser {
        /// The rejected input, as given.
        input: String,
        /// Which rule it broke.
        reason: &'static str,
    },

    /// An environment variable held a value the pool cannot use.
    #[error("invalid {var}={value:?}: {reason}")]
    Config {
        /// The variable's name.
        var: &'static str,
        /// The bad value.
        value: String,
        /// What a good value looks like.
        reason: String,
    },

    /// The container engine failed, timed out or could not be reached.
    #[error(transparent)]
    Engine(#[from] EngineError),

    /// The sandbox image is not present on this engine.
    #[error("sandbox image {image} not found: build it with scripts/build-image.sh (or set ZCBOT_SANDBOX_IMAGE)")]
    ImageMissing {
        /// The image reference looked up.
        image: String,
    },

    /// The engine has no runtime of the name `ZCBOT_SANDBOX_RUNTIME` asks for.
    #[error("the container engine has no runtime named {runtime} (it has: {}): install it (Debian: apt-get install runsc) and register it in /etc/docker/daemon.json under \"runtimes\", then reload dockerd with SIGHUP; scripts/register-runsc.sh does all three, RUN.md shows the lines. Or set ZCBOT_SANDBOX_RUNTIME=runc", registered.join(", "))]
    RuntimeMissing {
        /// The runtime asked for.
        runtime: &'static str,
        /// The runtimes the engine has.
        registered: Vec<String>,
    },

    /// A network of the configured name exists with settings the pool will not run sandboxes on.
    #[error("network {name} exists but {reason}: remove it (docker network rm {name}) or set ZCBOT_SANDBOX_NETWORK to another name")]
    NetworkMismatch {
        /// The network's name.
        name: String,
        /// Which setting differs.
        reason: String,
    },

    /// A sandbox container did not come up with its rules in place.
    #[error(
        "sandbox {container} for user {user} failed to start: {reason}{}",
        fmt_log(log)
    )]
    SandboxStart {
        /// The user whose sandbox failed.
        user: String,
        /// The container's name.
        container: String,
        /// What went wrong.
        reason: String,
        /// The tail of the container's log (the entry's own words).
        log: String,
    },

    /// The host firewall could not be installed and `ZCBOT_REQUIRE_HOST_FIREWALL` demands it.
    #[error("the host firewall for the sandbox network could not be installed: {reason} (run the daemon as root, or unset ZCBOT_REQUIRE_HOST_FIREWALL to run with the in-container rules only)")]
    HostFirewall {
        /// Why it could not be installed.
        reason: String,
    },

    /// The startup self-check saw an escape succeed (or could not run): the daemon refuses to serve.
    #[error("startup self-check failed, refusing to serve: {failures}")]
    SelfCheck {
        /// The failed checks, each with what was seen.
        failures: String,
    },

    /// The egress proxy (allowlist mode) could not be started, reached or told of a sandbox.
    #[error("egress proxy: {reason} (check `docker logs` of the proxy container; a restart of the daemon makes it again)")]
    EgressProxy {
        /// What went wrong.
        reason: String,
    },

    /// A per-user egress list names a host the pool's list does not allow.
    #[error("{pattern} is not within the pool's egress list ({pool}): a user's list can only narrow ZCBOT_EGRESS_ALLOW")]
    EgressNotSubset {
        /// The pattern that is not covered.
        pattern: String,
        /// The pool's list.
        pool: String,
    },

    /// Per-user egress lists exist only in allowlist mode.
    #[error("the pool's egress mode is {mode}: per-user egress lists need ZCBOT_SANDBOX_EGRESS=allowlist")]
    EgressOff {
        /// The pool's mode.
        mode: &'static str,
    },

    /// The pool holds `ZCBOT_SANDBOX_MAX` containers and none of them is idle.
    #[error("pool full: {max} sandboxes are running and every one has a call in flight; retry later or raise ZCBOT_SANDBOX_MAX")]
    PoolFull {
        /// The configured maximum.
        max: usize,
    },

    /// A tool call's arguments are invalid; nothing ran.
    #[error("bad {tool} call: {reason}")]
    BadCall {
        /// The tool called.
        tool: String,
        /// What is wrong with its arguments.
        reason: String,
    },

    /// No tool has that name; nothing ran.
    #[error("unknown tool {name:?}: the tools are shell, run_python, read_file, write_file, list_dir and delete_path")]
    UnknownTool {
        /// The name asked for.
        name: String,
    },

    /// A file tool refused a path, or the operation on it failed: typed by class (not found,
    /// refused, disk full, I/O, ...), see [`FileError`].
    #[error(transparent)]
    File(#[from] FileError),

    /// A file call asked for more than a limit allows (a path too long or too deep, a tree too
    /// deep or too large to walk). What it did before the limit stands; the rest is untouched.
    #[error("{path}: over the {limit} limit: {detail}")]
    FileLimit {
        /// The path as the caller gave it (shortened).
        path: String,
        /// The limit that tripped.
        limit: &'static str,
        /// What was asked and what is allowed.
        detail: String,
    },

    /// A file call stopped at its deadline or was cancelled. What it did stands; the rest is
    /// untouched. The executor reports it as a result with `timed_out` or `cancelled` set.
    #[error("{path}: {} ({progress})", if *cancelled { "cancelled".to_owned() } else { format!("stopped after {} (ZCBOT_FILE_TIMEOUT)", humantime::format_duration(*after)) })]
    FileStopped {
        /// The path as the caller gave it (shortened).
        path: String,
        /// Cancelled (true) or out of time (false).
        cancelled: bool,
        /// The call's deadline.
        after: Duration,
        /// What the call had done when it stopped.
        progress: String,
    },

    /// A file upload or download is larger than `ZCBOT_MAX_FILE`; nothing was written.
    #[error("{path}: {size} bytes is over the {max}-byte limit of one file transfer (ZCBOT_MAX_FILE): split it, or read it in parts with read_file's offset and limit")]
    FileTooLarge {
        /// The path as the caller gave it (shortened).
        path: String,
        /// The file's size, or how much had arrived when the limit was passed.
        size: u64,
        /// The limit.
        max: u64,
    },

    /// An upload's body did not arrive whole (the client stopped sending, went away, or took
    /// longer than allowed); nothing was written and the old file, if any, is whole.
    #[error(
        "{path}: the upload did not arrive whole ({reason}); nothing was written: send it again"
    )]
    UploadBroken {
        /// The path as the caller gave it (shortened).
        path: String,
        /// What happened to the body.
        reason: String,
    },

    /// Per-user disk quotas are required (`ZCBOT_REQUIRE_DISK_QUOTA=1`) and cannot be enforced.
    #[error("per-user disk quotas cannot be enforced: {reason} (prepare a users root as RUN.md says, or unset ZCBOT_REQUIRE_DISK_QUOTA)")]
    DiskQuota {
        /// Why not.
        reason: String,
    },

    /// The exec channel to the sandbox died while the call ran (helper killed, container removed
    /// or restarted, stream error). The call's processes were killed; nothing of it is left.
    /// When someone removed the sandbox on purpose it says who, and not to run the call again
    /// blindly: the removal was meant, and the call may have done part of its work.
    #[error("{}", match removed_by {
        Some(by) => format!("sandbox {container} of user {user} was removed {by} while the call was running; its processes went with it. What the call did before that stands: check before running it again (the next call gets a fresh sandbox)"),
        None => format!("the exec channel to sandbox {container} of user {user} died while the call was running ({reason}); its processes were killed: run the call again"),
    })]
    ChannelLost {
        /// The user whose call it was.
        user: String,
        /// The container's name.
        container: String,
        /// Why the channel died.
        reason: String,
        /// Who removed the sandbox, when that is why (see [`crate::pool::Remover`]).
        removed_by: Option<String>,
    },

    /// A Python session is running other code; the call did not run.
    #[error("Python session {name:?} of user {user} is running another call: wait for it to end, cancel it, or use another session name")]
    SessionBusy {
        /// The user.
        user: String,
        /// The session's name.
        name: String,
    },

    /// The user has `ZCBOT_PYTHON_SESSIONS_MAX` sessions; the call did not run.
    #[error("user {user} has {max} Python sessions, the most allowed (ZCBOT_PYTHON_SESSIONS_MAX): end one (DELETE /v1/users/{user}/sessions/NAME) or reuse a name")]
    TooManySessions {
        /// The user.
        user: String,
        /// The limit.
        max: usize,
    },

    /// No session of that name is running.
    #[error("user {user} has no Python session named {name:?} (it ended, or was never started)")]
    NoSuchSession {
        /// The user.
        user: String,
        /// The name asked for.
        name: String,
    },

    /// Python sessions cannot be served here (the host backend, or a sandbox whose exec channel
    /// cannot be opened).
    #[error("Python sessions are unavailable: {reason}")]
    SessionsUnavailable {
        /// Why, and what to do.
        reason: String,
    },

    /// The user has `ZCBOT_USER_MAX_JOBS` jobs running; nothing started.
    #[error("user {user} has {max} background jobs running, the most allowed (ZCBOT_USER_MAX_JOBS): wait for one to end or kill one (DELETE /v1/users/{user}/jobs/ID)")]
    TooManyJobs {
        /// The user.
        user: String,
        /// The limit.
        max: usize,
    },

    /// No job of that id is known for the user.
    #[error("user {user} has no background job {id:?} (a finished job is kept until more newer ones end, and none survives a daemon restart)")]
    NoSuchJob {
        /// The user.
        user: String,
        /// The id asked for.
        id: String,
    },

    /// The user already has a job of that id (the `call_id` given).
    #[error("user {user} already has a background job {id:?}: give another call_id, or DELETE the old job first")]
    JobIdInUse {
        /// The user.
        user: String,
        /// The id.
        id: String,
    },

    /// A background job could not be started here.
    #[error("background jobs are unavailable: {reason}")]
    JobUnavailable {
        /// Why, and what to do.
        reason: String,
    },

    /// The sandbox could not start the call's process (its process limit reached, say).
    #[error("sandbox {container} could not start the call: {reason}")]
    CallStart {
        /// The container's name.
        container: String,
        /// What the in-container helper said.
        reason: String,
    },

    /// A host file or folder operation failed.
    #[error("{op} {path}: {error}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error (in the text, so not a `source()`: see the module docs).
        error: std::io::Error,
    },
}

fn fmt_log(log: &str) -> String {
    if log.trim().is_empty() {
        String::new()
    } else {
        format!("; its log ends with:\n{}", log.trim_end())
    }
}

impl Error {
    /// A short, stable name for the kind of failure (used in logs, metrics and API errors).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidUser { .. } => "invalid_user",
            Error::Config { .. } => "config",
            Error::Engine(e) => e.kind(),
            Error::ImageMissing { .. } => "image_missing",
            Error::RuntimeMissing { .. } => "runtime_missing",
            Error::NetworkMismatch { .. } => "network_mismatch",
            Error::SandboxStart { .. } => "sandbox_start",
            Error::PoolFull { .. } => "pool_full",
            Error::EgressProxy { .. } => "egress_proxy",
            Error::EgressNotSubset { .. } => "egress_not_subset",
            Error::EgressOff { .. } => "egress_off",
            Error::HostFirewall { .. } => "host_firewall",
            Error::SelfCheck { .. } => "self_check",
            Error::BadCall { .. } => "bad_call",
            Error::UnknownTool { .. } => "unknown_tool",
            Error::File(e) => e.kind(),
            Error::FileLimit { .. } => "file_limit",
            Error::FileStopped { .. } => "file_stopped",
            Error::FileTooLarge { .. } => "file_too_large",
            Error::UploadBroken { .. } => "bad_body",
            Error::DiskQuota { .. } => "disk_quota",
            Error::Io { .. } => "io",
            Error::ChannelLost {
                removed_by: Some(_),
                ..
            } => "sandbox_removed",
            Error::ChannelLost { .. } => "channel_lost",
            Error::CallStart { .. } => "call_start",
            Error::SessionBusy { .. } => "session_busy",
            Error::TooManySessions { .. } => "too_many_sessions",
            Error::NoSuchSession { .. } => "no_such_session",
            Error::SessionsUnavailable { .. } => "sessions_unavailable",
            Error::TooManyJobs { .. } => "too_many_jobs",
            Error::NoSuchJob { .. } => "no_such_job",
            Error::JobIdInUse { .. } => "call_id_in_use",
            Error::JobUnavailable { .. } => "jobs_unavailable",
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            error,
        }
    }
}

/// What was being asked of the container engine when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The version handshake.
    Handshake,
    /// A ping.
    Ping,
    /// Read the engine's system information (its runtimes).
    Info,
    /// Inspect an image.
    InspectImage,
    /// List networks.
    ListNetworks,
    /// Create a network.
    CreateNetwork,
    /// Remove a network.
    RemoveNetwork,
    /// Inspect a container.
    Inspect,
    /// Create a container.
    Create,
    /// Start a container.
    Start,
    /// Remove a container.
    Remove,
    /// Pause a container.
    Pause,
    /// Unpause a container.
    Unpause,
    /// Rename a container.
    Rename,
    /// List containers.
    List,
    /// Read a container's log.
    ReadLog,
    /// Create an exec.
    CreateExec,
    /// Start (and attach to) an exec.
    StartExec,
    /// Read an exec's output.
    ReadExec,
    /// Inspect an exec.
    InspectExec,
    /// Follow the engine's events.
    Events,
    /// Connect a container to a network.
    ConnectNetwork,
    /// Attach to a container's standard streams.
    Attach,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Handshake => "the version handshake with",
            Op::Ping => "ping",
            Op::Info => "read the system information of",
            Op::InspectImage => "inspect image",
            Op::ListNetworks => "list networks named",
            Op::CreateNetwork => "create network",
            Op::RemoveNetwork => "remove network",
            Op::Inspect => "inspect container",
            Op::Create => "create container",
            Op::Start => "start container",
            Op::Remove => "remove container",
            Op::Pause => "pause container",
            Op::Unpause => "unpause container",
            Op::Rename => "rename container",
            Op::List => "list containers",
            Op::ReadLog => "read the log of",
            Op::CreateExec => "create an exec in",
            Op::StartExec => "start an exec in",
            Op::ReadExec => "read an exec in",
            Op::InspectExec => "inspect exec",
            Op::Events => "follow the events of containers labelled",
            Op::ConnectNetwork => "connect to a network the container",
            Op::Attach => "attach to container",
        })
    }
}

/// A failure of the container engine: the operation (typed) and its target, and what happened.
/// Answers a caller branches on (not found, name taken, removal in progress) are not errors: the
/// engine facade returns them as typed results.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine could not be reached at all.
    #[error("Docker daemon not reachable at {host}: is dockerd running, and may this user open its socket? ({detail})")]
    Unreachable {
        /// The address tried (DOCKER_HOST or the default socket).
        host: String,
        /// What the client saw.
        detail: String,
    },

    /// A call did not answer within its deadline: the engine is hung or overloaded.
    #[error("Docker did not answer {op} {target} within {}: the daemon may be hung or overloaded (raise ZCBOT_DOCKER_TIMEOUT if it is only slow)", humantime::format_duration(*after))]
    Timeout {
        /// What was being done.
        op: Op,
        /// To what.
        target: String,
        /// The deadline that passed.
        after: Duration,
    },

    /// The engine answered with an error.
    #[error("Docker failed to {op} {target}: {message}")]
    Failed {
        /// What was being done.
        op: Op,
        /// To what.
        target: String,
        /// The engine's HTTP status, when it answered with one.
        status: Option<u16>,
        /// What the engine said.
        message: String,
    },
}

impl EngineError {
    /// The API's error kind: `docker_unreachable`, `docker_timeout` or `docker`.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::Unreachable { .. } => "docker_unreachable",
            EngineError::Timeout { .. } => "docker_timeout",
            EngineError::Failed { .. } => "docker",
        }
    }

    /// Whether the engine is unavailable (unreachable or hung), as opposed to refusing a request.
    pub fn is_unavailable(&self) -> bool {
        !matches!(self, EngineError::Failed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_printer_of_the_whole_chain_shows_an_os_error_once() {
        let busy = std::io::Error::from_raw_os_error(98);
        let err = Error::io("listen on", "127.0.0.1:8787", busy);
        let printed = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(printed.matches("os error 98").count(), 1, "{printed}");
        assert!(
            printed.starts_with("listen on 127.0.0.1:8787: "),
            "{printed}"
        );
    }
}
