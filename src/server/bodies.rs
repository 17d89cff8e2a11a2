//! The JSON bodies the API answers with that no library type already is: typed here so that the
//! handlers and the OpenAPI document use one definition.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::exec::jobs::JobView;
use crate::exec::session::SessionInfo;

/// A call was told to stop.
#[derive(Serialize, ToSchema)]
pub(super) struct Cancelled {
    /// The call's id; the call itself answers with `cancelled: true`.
    pub(super) cancelled: String,
}

/// A user's background jobs, oldest first, without their output.
#[derive(Serialize, ToSchema)]
pub(super) struct Jobs {
    pub(super) jobs: Vec<JobView>,
}

/// A user's Python sessions.
#[derive(Serialize, ToSchema)]
pub(super) struct Sessions {
    pub(super) sessions: Vec<SessionInfo>,
}

/// A session that was ended.
#[derive(Serialize, ToSchema)]
pub(super) struct Ended {
    /// Its name.
    pub(super) ended: String,
}

/// A sandbox that was removed.
#[derive(Serialize, ToSchema)]
pub(super) struct Removed {
    /// The container's name.
    pub(super) removed: String,
}

/// The users whose idle sandboxes were removed.
#[derive(Serialize, ToSchema)]
pub(super) struct Reaped {
    pub(super) reaped: Vec<String>,
}

/// The process answers.
#[derive(Serialize, ToSchema)]
pub(super) struct Health {
    /// Always `ok`.
    pub(super) status: &'static str,
}

/// Whether the daemon can serve, check by check.
#[derive(Serialize, ToSchema)]
pub(super) struct Readiness {
    /// No check failed.
    pub(super) ready: bool,
    /// `host` or `docker`.
    pub(super) backend: crate::config::Backend,
    /// Each check's outcome as text.
    pub(super) checks: BTreeMap<&'static str, String>,
    /// Each check's state: `ok`, `degraded` (a protection run without by choice) or `failed`.
    pub(super) states: BTreeMap<&'static str, &'static str>,
}

/// A file that was uploaded.
#[derive(Serialize, ToSchema)]
pub(super) struct Uploaded {
    /// The path as given.
    pub(super) path: String,
    /// Bytes written.
    pub(super) bytes_written: u64,
}

/// The tools, in the shape the `format` asked for: pass `tools` to the model as is.
#[derive(Serialize, ToSchema)]
pub(super) struct Tools {
    /// One entry per tool: `{"type": "function", "function": {name, description, parameters}}`
    /// (openai), `{name, description, input_schema}` (anthropic) or `{name, description,
    /// inputSchema}` (mcp).
    #[schema(value_type = Vec<Object>)]
    pub(super) tools: Vec<serde_json::Value>,
}

/// A user's egress list (allowlist mode) and what went through the proxy for it since the daemon
/// started.
#[derive(Serialize, ToSchema)]
pub(super) struct EgressPolicy {
    pub(super) user: String,
    /// The hosts the user may reach now: its own list, or the pool's.
    pub(super) allow: Vec<String>,
    /// The pool's list (`ZCBOT_EGRESS_ALLOW`): the most a user may be given.
    pub(super) pool: Vec<String>,
    /// Whether the backend narrowed the user's list.
    pub(super) narrowed: bool,
    pub(super) connections: EgressConnections,
    pub(super) bytes: EgressBytes,
}

/// Connections through the proxy, by verdict.
#[derive(Serialize, ToSchema)]
pub(super) struct EgressConnections {
    pub(super) allowed: u64,
    pub(super) refused: u64,
}

/// Bytes relayed by the proxy: `up` from the sandbox, `down` to it.
#[derive(Serialize, ToSchema)]
pub(super) struct EgressBytes {
    pub(super) up: u64,
    pub(super) down: u64,
}

/// The body of `PUT /v1/users/{user}/egress`.
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EgressSet {
    /// Host patterns (`example.org`, `*.example.org`, optional `:port`), each within the pool's
    /// list; an empty list allows nothing.
    #[schema(max_items = 256)]
    pub(crate) allow: Vec<String>,
}
