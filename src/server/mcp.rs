//! The Model Context Protocol endpoint, `/v1/users/{user}/mcp`: the same tools as the HTTP API,
//! run as the user the path names, for agents that speak MCP (streamable HTTP, served by the
//! official Rust SDK, `rmcp`).
//!
//! Stateless: every request stands alone (rmcp's `NeverSessionManager`), so a client cannot make
//! the daemon keep anything, and the user is read from each request's own path. A call goes
//! through what an API call does: the token (the router's middleware), the user's call slots,
//! the executor's limits, the metrics and the log. It is cancelled when its client closes the
//! request's stream (the cancellation of the 2026-07-28 protocol, and a disconnect for older
//! ones) and at shutdown. With a `progressToken`, the output is sent as progress notifications as
//! it is printed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, InitializeResult,
    ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ProgressToken,
    RequestParamsMeta, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData as McpError, Peer, RoleServer, ServerHandler};
use serde_json::{json, Value};

use super::routes::{finished, transfer_slot, ClientGone};
use super::{ApiError, AppState};
use crate::exec::catalog::{self, ToolSpec};
use crate::exec::live::{Cursor, LiveOutput, Stream};
use crate::exec::{new_call_id, ToolCall, ToolResult};
use crate::user::UserId;

/// The most output one progress notification carries.
const PROGRESS_BYTES: usize = 16 << 10;
/// The least time between two progress notifications of one call.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// How often an idle response stream sends a keep-alive.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// The largest progress token (as JSON) the output is sent with: it is copied into every
/// notification, so a huge one would multiply the traffic; a call with a larger one just runs
/// without progress.
const MAX_PROGRESS_TOKEN: usize = 256;

/// The tower service the router mounts at `/v1/users/{user}/mcp`.
pub(super) fn service(
    state: Arc<AppState>,
) -> StreamableHttpService<McpTools, NeverSessionManager> {
    let cfg = state.executor_config();
    // The SDK's own token is left alone: at the end of the shutdown grace the calls are
    // cancelled (`all_calls`) and each answers `cancelled` on its stream, which then ends; cutting
    // the streams instead would lose those answers.
    let mut config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_max_request_body_bytes(cfg.max_body)
        // As the API's event streams: a client that vanished shows up within seconds.
        .with_sse_keep_alive(Some(KEEP_ALIVE));
    if state.token_hash.is_some() {
        // The bearer token already stands between a browser and this route: the SDK's check of
        // `Host` against loopback names (against DNS rebinding) would only refuse a daemon
        // reached by its real name. Without a token the daemon is on loopback, and it stays on.
        config = config.disable_allowed_hosts();
    }
    // The configuration is fixed for the daemon's life: the tools are described once, not at
    // each request (the SDK looks a tool up on every `tools/call` to check its headers).
    let tools: Arc<[Tool]> = catalog::tools(cfg).into_iter().map(to_mcp).collect();
    StreamableHttpService::new(
        move || {
            Ok(McpTools {
                state: state.clone(),
                tools: tools.clone(),
            })
        },
        Arc::new(NeverSessionManager::default()),
        config,
    )
}

/// The MCP server of one request.
#[derive(Clone)]
pub(super) struct McpTools {
    state: Arc<AppState>,
    /// The catalogue, as MCP spells it.
    tools: Arc<[Tool]>,
}

fn to_mcp(t: ToolSpec) -> Tool {
    let schema = match t.parameters {
        Value::Object(map) => map,
        _ => Default::default(),
    };
    Tool::new(t.name, t.description, Arc::new(schema))
}

impl ServerHandler for McpTools {
    fn get_info(&self) -> ServerConfig {
        let mut info = InitializeResult::new(ServerCapabilities::builder().enable_tools().build())
            .with_instructions(
                "Tools that run in this user's own sandbox: a Linux container with a persistent \
                 folder, /workspace. shell and run_python run programs there; the file tools \
                 read and write that folder.",
            );
        info.server_info.name = "zcbot-sandbox".into();
        info.server_info.version = env!("CARGO_PKG_VERSION").into();
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.tools.to_vec()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tools.iter().find(|t| t.name == name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let user = user_of(&context)?;
        // The SDK moves a request's `_meta` into its context; the params keep it in some versions.
        let progress = request
            .progress_token()
            .or_else(|| context.meta.get_progress_token())
            .filter(|t| serde_json::to_string(t).map_or(0, |s| s.len()) <= MAX_PROGRESS_TOKEN);
        let name = request.name.to_string();
        let args = Value::Object(request.arguments.unwrap_or_default());
        Ok(
            match self.run(&user, &name, args, progress, &context).await {
                Ok(r) => result(r),
                Err(e) => refused(&e),
            }
            .into(),
        )
    }
}

impl McpTools {
    /// Runs one call as the API would, but for where its answer and its output go.
    async fn run(
        &self,
        user: &str,
        name: &str,
        args: Value,
        progress: Option<ProgressToken>,
        context: &RequestContext<RoleServer>,
    ) -> Result<ToolResult, ApiError> {
        let st = &*self.state;
        let call = ToolCall::parse(name, args).map_err(|e| super::routes::counted(st, e))?;
        if call.background() {
            return Err(super::routes::counted(
                st,
                ApiError::new(
                    axum::http::StatusCode::BAD_REQUEST,
                    "bad_call",
                    "background is not offered over MCP: a tool call answers with its result",
                ),
            ));
        }
        let call = st
            .executor
            .prepare(call)
            .map_err(|e| super::routes::counted(st, e))?;
        let (user, _slot) = transfer_slot(&self.state, user)?;
        let tool = call.tool();
        let call_id = new_call_id();
        let cancel = st.all_calls.child_token();
        // The request's token is cancelled when its client closes the stream; the call's own
        // token is a child of the daemon's (shutdown), so the two are joined here.
        let _link = {
            let cancel = cancel.clone();
            let closed = context.ct.clone();
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                closed.cancelled().await;
                cancel.cancel();
            }))
        };
        let started = Instant::now();
        let gone = ClientGone::armed(st, &user, &call_id, tool);
        let result = match progress {
            None => st.executor.run_prepared_call(&user, call, &cancel).await,
            Some(token) => {
                let live = LiveOutput::new(st.executor_config().output_cap);
                let run = st.executor.run_live(&user, call, &cancel, live.clone());
                let mut progress = Progress::new(live, context.peer.clone(), token);
                let r = {
                    tokio::pin!(run);
                    tokio::select! {
                        r = &mut run => r,
                        // The follower never ends by itself: it waits on the output.
                        _ = progress.follow() => run.await,
                    }
                };
                // What was printed last, before the result that carries it all.
                progress.send_new().await;
                r
            }
        };
        gone.disarm();
        finished(st, &user, &call_id, tool, started, result)
    }
}

/// The user the request's path names (`/v1/users/{user}/mcp`), checked as every route checks it.
fn user_of(context: &RequestContext<RoleServer>) -> Result<String, McpError> {
    let path = context
        .extensions
        .get::<axum::http::request::Parts>()
        .map(|p| p.uri.path().to_owned())
        .unwrap_or_default();
    let user = path
        .strip_prefix("/v1/users/")
        .and_then(|rest| rest.strip_suffix("/mcp"))
        .unwrap_or_default();
    UserId::parse(user)
        .map(|u| u.as_str().to_owned())
        .map_err(|e| McpError::invalid_params(e.to_string(), None))
}

/// Sends a call's output as it is printed: `notifications/progress` whose `message` is the new
/// text (stderr's marked) and whose `progress` counts the bytes so far.
struct Progress {
    live: Arc<LiveOutput>,
    peer: Peer<RoleServer>,
    token: ProgressToken,
    changed: tokio::sync::watch::Receiver<u64>,
    cursor: Cursor,
    /// The start of a character cut at the end of the last read, per stream.
    carry: [Vec<u8>; 2],
    sent: u64,
}

impl Progress {
    fn new(live: Arc<LiveOutput>, peer: Peer<RoleServer>, token: ProgressToken) -> Self {
        Progress {
            changed: live.watch(),
            live,
            peer,
            token,
            cursor: Cursor::default(),
            carry: [Vec::new(), Vec::new()],
            sent: 0,
        }
    }

    /// Sends output as it comes, at most every [`PROGRESS_EVERY`]; never returns (dropped with
    /// the call).
    async fn follow(&mut self) {
        loop {
            self.send_new().await;
            if self.changed.changed().await.is_err() {
                return std::future::pending().await;
            }
            tokio::time::sleep(PROGRESS_EVERY).await;
        }
    }

    /// Sends what was printed since the last notification.
    async fn send_new(&mut self) {
        self.changed.borrow_and_update();
        for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            loop {
                let piece = self.live.read(&mut self.cursor, stream, PROGRESS_BYTES);
                if piece.bytes.is_empty() {
                    break;
                }
                let mut bytes = std::mem::take(&mut self.carry[i]);
                bytes.extend_from_slice(&piece.bytes);
                let cut = crate::exec::output::utf8_cut_back(&bytes);
                self.carry[i] = bytes.split_off(cut);
                if bytes.is_empty() {
                    continue;
                }
                self.sent += bytes.len() as u64;
                let text = String::from_utf8_lossy(&bytes);
                let message = match stream {
                    Stream::Stdout => text.into_owned(),
                    Stream::Stderr => format!("[stderr] {text}"),
                };
                let note = ProgressNotificationParam::new(self.token.clone(), self.sent as f64)
                    .with_message(message);
                // A client that went away ends the call through its token, not here.
                let _ = self.peer.notify_progress(note).await;
            }
        }
    }
}

/// A result as a model reads it: the output as text (what a person at a terminal would see) and
/// the whole result as structured content. A process that failed, timed out or was cancelled is
/// an error result, so that the model is told.
fn result(r: ToolResult) -> CallToolResult {
    // A process that did not exit 0 (a session whose interpreter was lost has no exit code).
    let failed = r.timed_out || r.cancelled || (r.data.is_none() && r.exit_code != Some(0));
    let text = render(&r);
    let structured = serde_json::to_value(&r).unwrap_or(Value::Null);
    let mut out = if failed {
        CallToolResult::error(vec![ContentBlock::text(text)])
    } else {
        CallToolResult::success(vec![ContentBlock::text(text)])
    };
    out.structured_content = Some(structured);
    out
}

/// A call the daemon refused or could not run: the API's error, as an error result the model
/// reads (a protocol error would reach it as an opaque failure).
fn refused(e: &ApiError) -> CallToolResult {
    let body = e.stream_body();
    let mut out = CallToolResult::error(vec![ContentBlock::text(format!(
        "{}: {}",
        e.kind, e.message
    ))]);
    out.structured_content = Some(body);
    out
}

/// The text of a result: the file tool's answer, or the output and how the process ended.
fn render(r: &ToolResult) -> String {
    use crate::exec::ToolData;
    let mut text = String::new();
    match &r.data {
        Some(ToolData::Read(read)) => match &read.content_base64 {
            None => text.push_str(&read.content),
            Some(_) => text.push_str(&format!(
                "({} bytes that are not text; content_base64 in the structured result)",
                read.bytes_read
            )),
        },
        Some(data) => text.push_str(&json!(data).to_string()),
        None => {
            text.push_str(&r.stdout);
            if !r.stderr.is_empty() {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str("[stderr]\n");
                text.push_str(&r.stderr);
            }
            if let Some(session) = &r.session {
                if let Some(value) = &session.value {
                    text.push_str(&format!("\n[value] {value}"));
                }
                if let Some(err) = &session.error {
                    text.push_str(&format!("\n[error] {}: {}", err.name, err.value));
                }
            }
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            if r.timed_out {
                text.push_str("[timed out: every process it started was killed]");
            } else if r.cancelled {
                text.push_str("[cancelled]");
            } else if let Some(code) = r.exit_code {
                text.push_str(&format!("[exit code {code}]"));
            }
        }
    }
    if r.truncated.stdout || r.truncated.stderr {
        text.push_str("\n[output over the cap: its middle was dropped]");
    }
    text
}
