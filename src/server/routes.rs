//! The API's routes: translate requests into library calls and results into JSON. No logic of
//! their own beyond that, the call registry and the per-user limit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::bodies::{
    Cancelled, EgressBytes, EgressConnections, EgressPolicy, EgressSet, Ended, Health, Jobs,
    Readiness, Reaped, Removed, Sessions, Tools, Uploaded,
};
use super::calls::CANCEL_WAIT;
use super::openapi::{
    ApiDoc, ErrorBody, PathCall, PythonCall, ReadFileCall, ShellCall, StreamQuery, UserPath,
    WriteFileCall,
};
use super::sse::StreamEvent;
use super::{auth, sse, ApiError, AppState};
use crate::check::Check;
use crate::exec::jobs::{JobRun, JobState, JobView};
use crate::exec::live::LiveOutput;
use crate::exec::{new_call_id, Prepared, ToolCall, ToolResult};
use crate::pool::reaper::SandboxStatus;
use crate::user::UserId;

type ApiResult<T = Response> = Result<T, ApiError>;

/// How long a DELETE of a job waits past the kill grace for its processes to be gone.
const KILL_WAIT_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The documented routes: each handler's `#[utoipa::path]` is both its route and its operation
/// in the document, so neither can be changed without the other.
fn api() -> (Router<Arc<AppState>>, utoipa::openapi::OpenApi) {
    use utoipa::OpenApi as _;
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(shell))
        .routes(routes!(run_python))
        .routes(routes!(read_file))
        .routes(routes!(write_file))
        .routes(routes!(list_dir))
        .routes(routes!(delete_path))
        .routes(routes!(cancel_call))
        .routes(routes!(list_jobs))
        .routes(routes!(get_job, kill_job))
        .routes(routes!(list_sessions))
        .routes(routes!(end_session))
        .routes(routes!(list_sandboxes))
        .routes(routes!(get_sandbox, remove_sandbox))
        .routes(routes!(get_egress, set_egress, reset_egress))
        .routes(routes!(reap))
        .routes(routes!(list_tools))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .split_for_parts()
}

/// The document as this daemon serves it (the bearer scheme only when it has a token).
pub(super) fn document(token: bool) -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi as _;
    let (_, mut doc) = api();
    // The files routes take a path of any depth, which an OpenAPI path template cannot say: they
    // are routed by hand below and documented from their handlers here.
    doc.merge(FilesDoc::openapi());
    super::openapi::finish(doc, token)
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(get_file, put_file))]
struct FilesDoc;

pub(super) fn router(state: Arc<AppState>) -> Router {
    let max_body = state.executor_config().max_body;
    let (documented, _) = api();
    documented
        // MCP (streamable HTTP), outside the document: the MCP specification describes it, and
        // its errors are JSON-RPC's.
        .route_service("/v1/users/{user}/mcp", super::mcp::service(state.clone()))
        // Only an unknown tool gets here (each tool has its route above): its own 404.
        .route("/v1/users/{user}/tools/{tool}", post(unknown_tool))
        .route("/v1/calls/{call_id}", delete(cancel_call_moved))
        .route(
            "/v1/users/{user}/files/{*path}",
            get(get_file)
                .put(put_file)
                // The upload takes the raw body (no ZCBOT_MAX_BODY: the Body extractor has no
                // limit) and bounds it by ZCBOT_MAX_FILE as it arrives; said here for the reader.
                .layer(DefaultBodyLimit::disable()),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route: GET /openapi.json lists them (RUN.md explains them)",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method: GET /openapi.json lists each route's methods",
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

pub(super) fn counted(state: &AppState, e: impl Into<ApiError>) -> ApiError {
    let e = e.into();
    state.metrics.error(&e.kind);
    e
}

fn valid_call_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Holds one of the user's call slots and the call's registry entry; releases both however the
/// request ends (finished, failed, or dropped because the client went away). Owned, so that a
/// download's body can hold its slot until the last byte is sent.
pub(super) struct InFlight {
    state: Arc<AppState>,
    user: UserId,
    call_id: Option<String>,
    /// Whether the call took one of its user's slots (and counts as in flight).
    counted: bool,
}

impl InFlight {
    /// Takes one of `user`'s slots (`ZCBOT_USER_MAX_CALLS`), or says the user has none free.
    fn take_slot(&mut self) -> Result<(), ApiError> {
        let st = &*self.state;
        let user = &self.user;
        let limit = st.executor_config().user_max_calls;
        let mut n = st.per_user.entry(user.clone()).or_insert(0);
        if *n >= limit {
            drop(n);
            return Err(counted(
                st,
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_calls",
                    format!(
                        "user {user} already has {limit} calls in flight (ZCBOT_USER_MAX_CALLS)"
                    ),
                ),
            ));
        }
        *n += 1;
        drop(n);
        self.counted = true;
        st.metrics.in_flight(1);
        Ok(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(id) = self.call_id.take() {
            self.state.calls.remove(&self.user, &id);
        }
        if !self.counted {
            return;
        }
        if let Some(mut n) = self.state.per_user.get_mut(&self.user) {
            *n = n.saturating_sub(1);
        }
        self.state.per_user.remove_if(&self.user, |_, n| *n == 0);
        self.state.metrics.in_flight(-1);
    }
}

/// What each tool route takes and answers (the body differs; the rest is common).
type ToolRequest = (
    State<Arc<AppState>>,
    Path<String>,
    RawQuery,
    HeaderMap,
    Result<Bytes, BytesRejection>,
);

/// Declares one tool's route: its operation in the document and a handler that runs the tool.
/// `background` adds the 202 of a tool that can start a job.
macro_rules! tool_route {
    ($handler:ident, $tool:tt, $path:tt, $body:ident, $summary:tt, background) => {
        tool_route!($handler, $tool, $path, $body, $summary, [(
            status = 202,
            description = "`background`: the job started; follow it at Location",
            body = JobView,
            headers(("location" = String, description = "The job's route"))
        ),]);
    };
    ($handler:ident, $tool:tt, $path:tt, $body:ident, $summary:tt, [$($extra:tt)*]) => {
        #[utoipa::path(
            post, path = $path, tag = "tools", summary = $summary,
            params(UserPath, StreamQuery),
            request_body(content = $body, description = "The tool's arguments, and `call_id`"),
            responses(
                (status = 200, description = "The result; with `stream` or `Accept: \
                    text/event-stream`, Server-Sent Events (`started`, `stdout`, `stderr`) that \
                    end in `result` carrying it (or `error`)", content(
                    (ToolResult = "application/json"), (StreamEvent = "text/event-stream")),
                    headers(("x-zcbot-call-id" = String, description = "The call's id"))),
                $($extra)*
                (status = 400, description = "Bad arguments, JSON, user id or path, or a file \
                    call over a limit (`bad_call`, `bad_json`, `invalid_user`, `file`, \
                    `file_limit`)", body = ErrorBody),
                (status = 403, description = "The path leaves the workspace (`path_refused`)",
                    body = ErrorBody),
                (status = 404, description = "A file, folder or session that is not there",
                    body = ErrorBody),
                (status = 409, description = "`call_id_in_use`, `session_busy`, \
                    `file_conflict`, `sandbox_removed` (removed while the call ran: it may have \
                    done part of its work)", body = ErrorBody),
                (status = 413, description = "The body is over ZCBOT_MAX_BODY \
                    (`body_too_large`)", body = ErrorBody),
                (status = 429, description = "The user's calls, sessions or jobs are at their \
                    limit (`too_many_calls`, `too_many_sessions`, `too_many_jobs`)",
                    body = ErrorBody),
                (status = 502, description = "The sandbox's exec channel died during the call \
                    (`channel_lost`): it may have run in part", body = ErrorBody),
                (status = 507, description = "The user's folder is at its quota (`disk_full`)",
                    body = ErrorBody),
            )
        )]
        async fn $handler(
            state: State<Arc<AppState>>,
            Path(user): Path<String>,
            query: RawQuery,
            headers: HeaderMap,
            body: Result<Bytes, BytesRejection>,
        ) -> ApiResult {
            call_tool((state, Path(user), query, headers, body), $tool).await
        }
    };
}

tool_route!(
    shell,
    "shell",
    "/v1/users/{user}/tools/shell",
    ShellCall,
    "Run a shell command in the user's sandbox",
    background
);
tool_route!(
    run_python,
    "run_python",
    "/v1/users/{user}/tools/run_python",
    PythonCall,
    "Run Python code in the user's sandbox, in a session or afresh",
    background
);
tool_route!(
    read_file,
    "read_file",
    "/v1/users/{user}/tools/read_file",
    ReadFileCall,
    "Read (part of) a file of the user's folder",
    []
);
tool_route!(
    write_file,
    "write_file",
    "/v1/users/{user}/tools/write_file",
    WriteFileCall,
    "Write a file of the user's folder, from text or base64",
    []
);
tool_route!(
    list_dir,
    "list_dir",
    "/v1/users/{user}/tools/list_dir",
    PathCall,
    "List a folder of the user's folder",
    []
);
tool_route!(
    delete_path,
    "delete_path",
    "/v1/users/{user}/tools/delete_path",
    PathCall,
    "Delete a file or a folder tree of the user's folder",
    []
);

/// `POST /v1/users/{user}/tools/{tool}` for a tool that does not exist.
async fn unknown_tool(
    State(state): State<Arc<AppState>>,
    Path((user, tool)): Path<(String, String)>,
) -> ApiResult {
    UserId::parse(&user).map_err(|e| counted(&state, e))?;
    let e = match ToolCall::parse(&tool, json!({})) {
        Err(e) if e.kind() == "unknown_tool" => e.into(),
        // A known name that reached this route was written another way (percent-encoded).
        _ => ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_tool",
            format!("no route for the tool as written: name it plainly, POST /v1/users/{user}/tools/{tool}"),
        ),
    };
    Err(counted(&state, e))
}

async fn call_tool(request: ToolRequest, tool: &str) -> ApiResult {
    let (State(state), Path(user), RawQuery(query), headers, body) = request;
    let st = &*state;
    let body = body.map_err(|r| {
        let e = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                r.status(),
                "body_too_large",
                format!(
                    "the body is over ZCBOT_MAX_BODY ({} bytes): write large or binary files \
                     with PUT /v1/users/{{user}}/files/{{path}}, which streams them",
                    st.executor_config().max_body
                ),
            )
        } else {
            ApiError::new(
                r.status(),
                "bad_body",
                format!("the body could not be read: {}", r.body_text()),
            )
        };
        counted(st, e)
    })?;
    let user = UserId::parse(&user).map_err(|e| counted(st, e))?;
    let streamed = sse::wanted(&headers, query.as_deref()).map_err(|e| counted(st, e))?;
    let mut args: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            counted(
                st,
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_json",
                    format!("the body is not JSON: {e}"),
                ),
            )
        })?
    };
    let Some(obj) = args.as_object_mut() else {
        return Err(counted(
            st,
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                "the body must be a JSON object of the tool's arguments",
            ),
        ));
    };
    let call_id = match obj.remove("call_id") {
        None => new_call_id(),
        Some(Value::String(id)) if valid_call_id(&id) => id,
        Some(_) => {
            return Err(counted(
                st,
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_call",
                    "call_id must be 1 to 64 characters of letters, digits, '-', '_' and '.'",
                ),
            ))
        }
    };
    let call = ToolCall::parse(tool, args).map_err(|e| counted(st, e))?;
    let background = call.background();
    // Refused here (a bad call, or a job on the host backend), before a stream or a job could
    // answer 2xx.
    let call = st.executor.prepare(call).map_err(|e| counted(st, e))?;
    if background {
        return start_job(&state, user, call_id, call);
    }

    // The registry (a duplicate id is a conflict whatever the load), then the per-user limit;
    // the guard undoes what was done.
    let cancel = st.all_calls.child_token();
    if !st.calls.insert(&user, &call_id, cancel.clone()) {
        return Err(counted(
            st,
            ApiError::new(
                StatusCode::CONFLICT,
                "call_id_in_use",
                format!("user {user} already has a call with id {call_id} in flight"),
            ),
        ));
    }
    let mut in_flight = InFlight {
        state: state.clone(),
        user: user.clone(),
        call_id: Some(call_id.clone()),
        counted: false,
    };
    in_flight.take_slot()?;

    if streamed {
        return Ok(stream_call(
            state.clone(),
            user,
            call_id,
            call,
            cancel,
            in_flight,
        ));
    }
    let started = Instant::now();
    let tool = call.tool();
    let gone = ClientGone::armed(st, &user, &call_id, tool);
    let result = st.executor.run_prepared_call(&user, call, &cancel).await;
    gone.disarm();
    let r = finished(st, &user, &call_id, tool, started, result)?;
    let mut resp = Json(r).into_response();
    if let Ok(v) = HeaderValue::from_str(&call_id) {
        resp.headers_mut().insert("x-zcbot-call-id", v);
    }
    Ok(resp)
}

/// Says so when a call ends because its client went away: dropped with the request (or the event
/// stream's body), which stops the call and kills its processes, before its answer was ready.
pub(super) struct ClientGone<'a> {
    state: &'a AppState,
    user: &'a UserId,
    call_id: &'a str,
    tool: &'static str,
    started: Instant,
    armed: bool,
}

impl<'a> ClientGone<'a> {
    pub(super) fn armed(
        state: &'a AppState,
        user: &'a UserId,
        call_id: &'a str,
        tool: &'static str,
    ) -> Self {
        ClientGone {
            state,
            user,
            call_id,
            tool,
            started: Instant::now(),
            armed: true,
        }
    }

    /// The call ran to its end (whatever it answers).
    pub(super) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ClientGone<'_> {
    fn drop(&mut self) {
        // A panic unwinding through the call is not a client that went away.
        if self.armed && !std::thread::panicking() {
            self.state.metrics.client_gone();
            tracing::info!(user = %self.user, tool = self.tool, call_id = %self.call_id,
                after_ms = self.started.elapsed().as_millis() as u64,
                "call cancelled: the client went away before its answer");
        }
    }
}

/// Counts and logs a call's end; the result, or the error as the API answers it.
pub(super) fn finished(
    st: &AppState,
    user: &UserId,
    call_id: &str,
    tool: &str,
    started: Instant,
    result: crate::Result<crate::exec::ToolResult>,
) -> Result<crate::exec::ToolResult, ApiError> {
    // Where it ran: the file tools run on the host whatever the backend.
    let backend_name = match st.executor.backend() {
        _ if crate::exec::is_file_tool(tool) => "host",
        crate::config::Backend::Host => "host",
        crate::config::Backend::Docker => "docker",
    };
    match result {
        Ok(r) => {
            st.metrics.observe_call(
                &r.tool,
                backend_name,
                started.elapsed(),
                r.timed_out,
                r.cancelled,
            );
            let container = st.executor.pool().map(|p| p.container_name(user));
            tracing::info!(user = %user, tool = %r.tool, call_id = %call_id, container = container.as_deref().unwrap_or("-"),
                duration_ms = r.duration_ms, exit_code = ?r.exit_code, timed_out = r.timed_out,
                cancelled = r.cancelled, "call finished");
            Ok(r)
        }
        Err(e) => {
            tracing::warn!(user = %user, tool = %tool, call_id = %call_id, kind = e.kind(), error = %e, "call failed");
            Err(counted(st, e))
        }
    }
}

/// Answers a call as Server-Sent Events (see `sse`): `started`, its output's head as it is
/// printed, then `result` with the JSON the plain call returns, or `error`. The body owns the
/// call: a client that goes away stops it, and its slot and registry entry go with the body.
fn stream_call(
    state: Arc<AppState>,
    user: UserId,
    call_id: String,
    call: Prepared,
    cancel: tokio_util::sync::CancellationToken,
    in_flight: InFlight,
) -> Response {
    let cfg = state.executor_config();
    state.metrics.streamed();
    // Only the head streams (at most half the cap per stream): the ring never drops a byte.
    let live = LiveOutput::new(cfg.output_cap);
    let tool = call.tool();
    let first = sse::event("started", &json!({ "call_id": call_id, "tool": tool }));
    let follower = live.clone();
    let end = async move {
        let started = Instant::now();
        let st = &*state;
        let gone = ClientGone::armed(st, &user, &call_id, tool);
        let result = st.executor.run_live(&user, call, &cancel, live).await;
        gone.disarm();
        match finished(st, &user, &call_id, tool, started, result) {
            Ok(r) => sse::event("result", &json!(r)),
            Err(e) => sse::event("error", &e.stream_body()),
        }
    };
    sse::follow(follower, first, Box::pin(end), in_flight)
}

/// Starts a background job (`background: true`): answers 202 at once with the job, its id
/// (the call's `call_id` when one was given) and where to follow it.
fn start_job(state: &Arc<AppState>, user: UserId, id: String, call: Prepared) -> ApiResult {
    let st = &**state;
    let tool = call.tool();
    let runner = state.clone();
    let who = user.clone();
    let run: JobRun = Box::new(move |live, cancel| {
        Box::pin(async move {
            let st = &*runner;
            let result = st.executor.run_live(&who, call, &cancel, live).await;
            st.metrics.job_ended(JobState::of(&result).name());
            match &result {
                Ok(r) => tracing::info!(user = %who, tool = %r.tool, exit_code = ?r.exit_code,
                    timed_out = r.timed_out, killed = r.cancelled, duration_ms = r.duration_ms, "job ended"),
                Err(e) => tracing::warn!(user = %who, kind = e.kind(), error = %e, "job failed"),
            }
            result
        })
    });
    let job = st
        .jobs
        .start(&user, id, tool, run)
        .map_err(|e| counted(st, e))?;
    st.metrics.job_started();
    tracing::info!(user = %user, tool, job_id = job.id(), "job started");
    let mut resp = (StatusCode::ACCEPTED, Json(job.view(false))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/users/{user}/jobs/{}", job.id())) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// `GET /v1/users/{user}/jobs`.
#[utoipa::path(get, path = "/v1/users/{user}/jobs", tag = "jobs", params(UserPath),
    summary = "The user's background jobs, oldest first, without their output",
    responses(
        (status = 200, body = Jobs),
        (status = 400, description = "A bad user id (`invalid_user`)", body = ErrorBody),
    ))]
async fn list_jobs(State(state): State<Arc<AppState>>, Path(user): Path<String>) -> ApiResult {
    let user = UserId::parse(&user).map_err(|e| counted(&state, e))?;
    Ok(Json(Jobs {
        jobs: state.jobs.list(&user),
    })
    .into_response())
}

/// `GET /v1/users/{user}/jobs/{id}`: the job with its latest output; as events with `stream=1`
/// (or `Accept: text/event-stream`): what its rings hold, then its output as it comes, then
/// `result` with the job once it has ended. Following never affects the job; a follower takes
/// one of the user's call slots.
#[utoipa::path(get, path = "/v1/users/{user}/jobs/{id}", tag = "jobs",
    params(UserPath, ("id" = String, Path, description = "The job's id"), StreamQuery),
    summary = "One job with its latest output, or its output as events until it ends",
    responses(
        (status = 200, description = "The job; with `stream`, Server-Sent Events ending in \
            `result` with it", content((JobView = "application/json"),
            (StreamEvent = "text/event-stream"))),
        (status = 400, description = "A bad user id or `stream` value", body = ErrorBody),
        (status = 404, description = "No such job (`no_such_job`)", body = ErrorBody),
        (status = 429, description = "A follower needs one of the user's call slots",
            body = ErrorBody),
    ))]
async fn get_job(
    State(state): State<Arc<AppState>>,
    Path((user, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult {
    let user = UserId::parse(&user).map_err(|e| counted(&state, e))?;
    let streamed = sse::wanted(&headers, query.as_deref()).map_err(|e| counted(&state, e))?;
    let job = state.jobs.get(&user, &id).map_err(|e| counted(&state, e))?;
    if !streamed {
        return Ok(Json(job.view(true)).into_response());
    }
    // A follower holds one of the user's call slots while it follows: followers are bounded.
    let (_, slot) = transfer_slot(&state, user.as_str())?;
    let first = sse::event(
        "started",
        &json!({ "job_id": job.id(), "tool": job.tool() }),
    );
    let live = job.live().clone();
    let end = async move {
        job.ended().await;
        sse::event("result", &json!(job.view(true)))
    };
    Ok(sse::follow(live, first, Box::pin(end), slot))
}

/// `DELETE /v1/users/{user}/jobs/{id}`: kills a running job's whole process tree and answers
/// once it has ended (202 if it has not within the kill grace and a margin); forgets the ended
/// job.
#[utoipa::path(delete, path = "/v1/users/{user}/jobs/{id}", tag = "jobs",
    params(UserPath, ("id" = String, Path, description = "The job's id")),
    summary = "Kill a running job's whole process tree and forget it; forget an ended one",
    responses(
        (status = 200, description = "The job's last record, ended; it is gone", body = JobView),
        (status = 202, description = "Still running after the kill grace: the kill goes on",
            body = JobView),
        (status = 400, description = "A bad user id", body = ErrorBody),
        (status = 404, description = "No such job (`no_such_job`)", body = ErrorBody),
    ))]
async fn kill_job(
    State(state): State<Arc<AppState>>,
    Path((user, id)): Path<(String, String)>,
) -> ApiResult {
    let user = UserId::parse(&user).map_err(|e| counted(&state, e))?;
    let cfg = state.executor_config();
    let wait = cfg.kill_grace + KILL_WAIT_MARGIN;
    let job = state
        .jobs
        .kill(&user, &id, wait)
        .await
        .map_err(|e| counted(&state, e))?;
    tracing::info!(user = %user, job_id = %id, state = ?job.state, "job deleted through the API");
    // Still running after the wait: the kill goes on (202); the job's record will say when.
    let status = if job.state == JobState::Running {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(job)).into_response())
}

/// The user a transfer is for, and one of its call slots, held while the transfer runs.
pub(super) fn transfer_slot(
    state: &Arc<AppState>,
    user: &str,
) -> Result<(UserId, InFlight), ApiError> {
    let user = UserId::parse(user).map_err(|e| counted(state, e))?;
    let mut slot = InFlight {
        state: state.clone(),
        user: user.clone(),
        call_id: None,
        counted: false,
    };
    slot.take_slot()?;
    Ok((user, slot))
}

/// `PUT /v1/users/{user}/files/{path}`: the raw body becomes the file (see `exec::transfer`).
/// Takes one of the user's call slots while it runs.
#[utoipa::path(put, path = "/v1/users/{user}/files/{path}", tag = "files",
    params(UserPath, ("path" = String, Path,
        description = "The file, under the user's folder (any depth)")),
    summary = "Write the raw body to a file, streamed, replacing it only once whole",
    request_body(content = Option<Vec<u8>>, content_type = "application/octet-stream",
        description = "The file's bytes (none: an empty file)"),
    responses(
        (status = 200, body = Uploaded),
        (status = 400, description = "A bad user id or path, or the body broke off or was \
            too slow (`bad_body`)", body = ErrorBody),
        (status = 403, description = "The path leaves the workspace (`path_refused`)",
            body = ErrorBody),
        (status = 404, description = "Not there", body = ErrorBody),
        (status = 409, description = "The tree changed under the call", body = ErrorBody),
        (status = 413, description = "Over ZCBOT_MAX_FILE (`file_too_large`)", body = ErrorBody),
        (status = 429, description = "The user's call slots are all taken", body = ErrorBody),
        (status = 507, description = "The user's folder is at its quota (`disk_full`)",
            body = ErrorBody),
    ))]
async fn put_file(
    State(state): State<Arc<AppState>>,
    Path((user, path)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult {
    let st = &*state;
    let (user, _slot) = transfer_slot(&state, &user)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let cancel = st.all_calls.child_token();
    let started = Instant::now();
    let written = st
        .executor
        .upload(&user, &path, declared, body.into_data_stream(), &cancel)
        .await
        .map_err(|e| {
            tracing::warn!(user = %user, kind = e.kind(), error = %e, "upload failed");
            counted(st, e)
        })?;
    tracing::info!(user = %user, bytes = written, duration_ms = started.elapsed().as_millis() as u64, "file uploaded");
    Ok(Json(Uploaded {
        path,
        bytes_written: written,
    })
    .into_response())
}

/// `GET /v1/users/{user}/files/{path}`: the file's bytes, streamed, with a content type guessed
/// from its name. Served as an attachment that a browser will neither sniff nor run: the bytes
/// are the tenant's. Holds one of the user's call slots until the body is sent or dropped, and
/// ends the body at `ZCBOT_TRANSFER_TIMEOUT` (the client then sees it short of its length).
#[utoipa::path(get, path = "/v1/users/{user}/files/{path}", tag = "files",
    params(UserPath, ("path" = String, Path,
        description = "The file, under the user's folder (any depth)")),
    summary = "Stream a file back, as an attachment typed by its name",
    responses(
        (status = 200, description = "The file's bytes", content((Vec<u8> = "*/*"))),
        (status = 400, description = "A bad user id or path", body = ErrorBody),
        (status = 403, description = "The path leaves the workspace or is not a regular file",
            body = ErrorBody),
        (status = 404, description = "Not there", body = ErrorBody),
        (status = 409, description = "The tree changed under the call", body = ErrorBody),
        (status = 413, description = "Over ZCBOT_MAX_FILE (`file_too_large`)", body = ErrorBody),
        (status = 429, description = "The user's call slots are all taken", body = ErrorBody),
    ))]
async fn get_file(
    State(state): State<Arc<AppState>>,
    Path((user, path)): Path<(String, String)>,
) -> ApiResult {
    let st = &*state;
    let (user, slot) = transfer_slot(&state, &user)?;
    let cancel = st.all_calls.child_token();
    let download = st
        .executor
        .download(&user, &path, &cancel)
        .await
        .map_err(|e| counted(st, e))?;
    let size = download.size;
    let until = tokio::time::sleep(st.executor.transfer_timeout());
    let stream = tokio_util::io::ReaderStream::with_capacity(
        tokio::io::AsyncReadExt::take(download.file, size),
        64 * 1024,
    )
    .take_until(until)
    .map(move |piece| {
        // The slot goes when the body does (sent, or dropped by a client that went away).
        let _held = &slot;
        piece
    });
    let name = match path.trim_end_matches('/').rsplit('/').next() {
        Some(n) if !n.is_empty() && n != "." && n != ".." => n,
        _ => "file",
    };
    let headers = [
        (header::CONTENT_TYPE, content_type(name).to_owned()),
        (header::CONTENT_LENGTH, size.to_string()),
        (header::CONTENT_DISPOSITION, attachment(name)),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        (header::CONTENT_SECURITY_POLICY, "sandbox".to_owned()),
    ];
    Ok((headers, axum::body::Body::from_stream(stream)).into_response())
}

/// A content type guessed from a file name's extension; bytes of unknown kind otherwise.
fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" | "md" | "py" | "sh" | "rs" | "c" | "h" | "toml" | "yaml" | "yml" | "ini" => {
            "text/plain"
        }
        "csv" => "text/csv",
        "tsv" => "text/tab-separated-values",
        // HTML, SVG and XML can carry script: never served as such (a proxy that drops the
        // attachment and CSP headers must not turn a tenant's file into a page on our origin).
        "json" => "application/json",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "tar" => "application/x-tar",
        "parquet" => "application/vnd.apache.parquet",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        _ => "application/octet-stream",
    }
}

/// `Content-Disposition: attachment` with the file's name, percent-encoded (RFC 8187) so that no
/// byte of a tenant's file name can end the header or add a parameter.
fn attachment(name: &str) -> String {
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename*=UTF-8''{encoded}")
}

/// `DELETE /v1/users/{user}/calls/{call_id}`.
#[utoipa::path(delete, path = "/v1/users/{user}/calls/{call_id}", tag = "tools",
    params(UserPath, ("call_id" = String, Path, description = "The call's `call_id`")),
    summary = "Cancel a call in flight: every process it started is killed",
    responses(
        (status = 202, description = "Cancelled; the call answers `cancelled: true`",
            body = Cancelled),
        (status = 400, description = "A bad user id", body = ErrorBody),
        (status = 404, description = "The user has no such call in flight (`unknown_call`), \
            nor did one start within a moment", body = ErrorBody),
    ))]
async fn cancel_call(
    State(state): State<Arc<AppState>>,
    Path((user, call_id)): Path<(String, String)>,
) -> ApiResult {
    let user = UserId::parse(&user).map_err(|e| counted(&state, e))?;
    // A call sent just before its cancel may not be registered yet: wait a moment for it (no
    // call can have an id that breaks the rule, so those are not waited for).
    let cancel = if valid_call_id(&call_id) {
        state.calls.find(&user, &call_id, CANCEL_WAIT).await
    } else {
        None
    };
    match cancel {
        Some(cancel) => {
            cancel.cancel();
            tracing::info!(call_id = %call_id, user = %user, "call cancelled through the API");
            Ok((StatusCode::ACCEPTED, Json(Cancelled { cancelled: call_id })).into_response())
        }
        None => Err(counted(
            &state,
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_call",
                format!(
                    "user {user} has no call {call_id} in flight, nor did one arrive within {} \
                     (it may have ended already)",
                    humantime::format_duration(CANCEL_WAIT)
                ),
            ),
        )),
    }
}

/// The old global cancel route: call ids are per user now, so it cannot say whose call it means.
async fn cancel_call_moved(State(state): State<Arc<AppState>>) -> ApiResult {
    Err(counted(
        &state,
        ApiError::new(
            StatusCode::GONE,
            "route_moved",
            "call ids belong to their user: cancel with DELETE /v1/users/{user}/calls/{call_id}",
        ),
    ))
}

/// `GET /v1/users/{user}/sessions`.
#[utoipa::path(get, path = "/v1/users/{user}/sessions", tag = "sessions", params(UserPath),
    summary = "The user's Python sessions",
    responses(
        (status = 200, body = Sessions),
        (status = 400, description = "A bad user id", body = ErrorBody),
    ))]
async fn list_sessions(State(state): State<Arc<AppState>>, Path(user): Path<String>) -> ApiResult {
    let user = UserId::parse(&user).map_err(|e| counted(&state, e))?;
    let sessions = state.executor.sessions(&user).await;
    Ok(Json(Sessions { sessions }).into_response())
}

/// `DELETE /v1/users/{user}/sessions/{name}`.
#[utoipa::path(delete, path = "/v1/users/{user}/sessions/{name}", tag = "sessions",
    params(UserPath, ("name" = String, Path, description = "The session's name",
        pattern = "^[a-z0-9_-]{1,32}$")),
    summary = "End a session: its interpreter and every process it started are killed",
    responses(
        (status = 200, body = Ended),
        (status = 400, description = "A bad user id or session name", body = ErrorBody),
        (status = 404, description = "No such session (`no_such_session`)", body = ErrorBody),
    ))]
async fn end_session(
    State(state): State<Arc<AppState>>,
    Path((user, name)): Path<(String, String)>,
) -> ApiResult {
    let user = UserId::parse(&user).map_err(|e| counted(&state, e))?;
    state
        .executor
        .end_session(&user, &name)
        .await
        .map_err(|e| counted(&state, e))?;
    tracing::info!(user = %user, session = %name, "Python session ended through the API");
    Ok(Json(Ended { ended: name }).into_response())
}

/// The pool of a daemon whose egress mode has per-user lists, or `egress_off`.
fn allowlist_pool(state: &AppState) -> Result<&crate::pool::SandboxPool, ApiError> {
    let mode = state.executor_config().egress;
    match state.executor.pool() {
        Some(pool) if mode == crate::config::Egress::Allowlist => Ok(pool),
        _ => Err(counted(
            state,
            crate::error::Error::EgressOff {
                mode: mode.as_str(),
            },
        )),
    }
}

fn egress_view(pool: &crate::pool::SandboxPool, user: &UserId) -> Response {
    let text = |l: Vec<crate::config::Pattern>| l.iter().map(ToString::to_string).collect();
    let traffic = pool
        .egress_proxy()
        .map(|p| p.traffic(user.as_str()))
        .unwrap_or_default();
    Json(EgressPolicy {
        user: user.to_string(),
        allow: text(pool.egress_allow(user)),
        pool: text(pool.config().egress_allow.clone()),
        narrowed: pool.egress_narrowed(user),
        connections: EgressConnections {
            allowed: traffic.allowed,
            refused: traffic.refused,
        },
        bytes: EgressBytes {
            up: traffic.up,
            down: traffic.down,
        },
    })
    .into_response()
}

/// `GET /v1/users/{user}/egress`.
#[utoipa::path(get, path = "/v1/users/{user}/egress", tag = "egress", params(UserPath),
    summary = "The hosts a user's sandbox may reach (allowlist mode), and its traffic",
    responses(
        (status = 200, body = EgressPolicy),
        (status = 400, description = "A bad user id", body = ErrorBody),
        (status = 409, description = "The pool's egress mode is not allowlist (`egress_off`)", body = ErrorBody),
    ))]
async fn get_egress(State(state): State<Arc<AppState>>, Path(user): Path<String>) -> ApiResult {
    let user = UserId::parse(&user).map_err(|e| counted(&state, e))?;
    let pool = allowlist_pool(&state)?;
    Ok(egress_view(pool, &user))
}

/// `PUT /v1/users/{user}/egress`.
#[utoipa::path(put, path = "/v1/users/{user}/egress", tag = "egress", params(UserPath),
    summary = "Narrow the hosts a user's sandbox may reach (within the pool's list)",
    request_body = EgressSet,
    responses(
        (status = 200, body = EgressPolicy),
        (status = 400, description = "A bad user id, body or pattern (`bad_json`, \
            `bad_pattern`), or a pattern outside the pool's list (`egress_not_subset`)", body = ErrorBody),
        (status = 409, description = "The pool's egress mode is not allowlist (`egress_off`)", body = ErrorBody),
    ))]
async fn set_egress(
    State(state): State<Arc<AppState>>,
    Path(user): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let user = UserId::parse(&user).map_err(|e| counted(&state, e))?;
    let pool = allowlist_pool(&state)?;
    let bad = |kind: &'static str, message: String| {
        counted(
            &state,
            ApiError::new(StatusCode::BAD_REQUEST, kind, message),
        )
    };
    let body = body.map_err(|r| {
        bad(
            "bad_body",
            format!("the body could not be read: {}", r.body_text()),
        )
    })?;
    let set: EgressSet = serde_json::from_slice(&body).map_err(|e| {
        bad(
            "bad_json",
            format!("the body must be {{\"allow\": [\"host pattern\", ...]}}: {e}"),
        )
    })?;
    if set.allow.len() > 256 {
        return Err(bad("bad_pattern", "at most 256 patterns".to_owned()));
    }
    let allow = set
        .allow
        .iter()
        .map(|p| {
            p.parse::<crate::config::Pattern>().map_err(|e| {
                let shown: String = p.chars().take(200).collect();
                bad("bad_pattern", format!("{shown:?}: {e}"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    pool.set_egress(&user, Some(allow))
        .await
        .map_err(|e| counted(&state, e))?;
    tracing::info!(user = %user, allow = ?set.allow, "egress list narrowed through the API");
    Ok(egress_view(pool, &user))
}

/// `DELETE /v1/users/{user}/egress`.
#[utoipa::path(delete, path = "/v1/users/{user}/egress", tag = "egress", params(UserPath),
    summary = "Give a user the pool's list again",
    responses(
        (status = 200, body = EgressPolicy),
        (status = 400, description = "A bad user id", body = ErrorBody),
        (status = 409, description = "The pool's egress mode is not allowlist (`egress_off`)", body = ErrorBody),
    ))]
async fn reset_egress(State(state): State<Arc<AppState>>, Path(user): Path<String>) -> ApiResult {
    let user = UserId::parse(&user).map_err(|e| counted(&state, e))?;
    let pool = allowlist_pool(&state)?;
    pool.set_egress(&user, None)
        .await
        .map_err(|e| counted(&state, e))?;
    tracing::info!(user = %user, "egress list back to the pool's through the API");
    Ok(egress_view(pool, &user))
}

/// `GET /v1/sandboxes`.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    summary = "The pool's containers: users' sandboxes and warm spares",
    responses((status = 200, body = Vec<SandboxStatus>)))]
async fn list_sandboxes(State(state): State<Arc<AppState>>) -> ApiResult {
    let Some(pool) = state.executor.pool() else {
        return Ok(Json(json!([])).into_response());
    };
    let list = pool.list().await.map_err(|e| counted(&state, e))?;
    Ok(Json(list).into_response())
}

/// `GET /v1/users/{user}/sandbox`.
#[utoipa::path(get, path = "/v1/users/{user}/sandbox", tag = "sandboxes", params(UserPath),
    summary = "One user's sandbox",
    responses(
        (status = 200, body = SandboxStatus),
        (status = 400, description = "A bad user id", body = ErrorBody),
        (status = 404, description = "The user has no sandbox (`no_sandbox`)", body = ErrorBody),
    ))]
async fn get_sandbox(State(state): State<Arc<AppState>>, Path(user): Path<String>) -> ApiResult {
    let user = UserId::parse(&user).map_err(|e| counted(&state, e))?;
    let no_sandbox = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_sandbox",
            format!("user {user} has no sandbox"),
        )
    };
    let Some(pool) = state.executor.pool() else {
        return Err(counted(&state, no_sandbox()));
    };
    let list = pool.list().await.map_err(|e| counted(&state, e))?;
    match list.into_iter().find(|s| s.user == user.as_str()) {
        Some(s) => Ok(Json(s).into_response()),
        None => Err(counted(&state, no_sandbox())),
    }
}

/// `DELETE /v1/users/{user}/sandbox`.
#[utoipa::path(delete, path = "/v1/users/{user}/sandbox", tag = "sandboxes", params(UserPath),
    summary = "Remove a user's sandbox now (its folder stays)",
    responses(
        (status = 200, body = Removed),
        (status = 400, description = "A bad user id", body = ErrorBody),
        (status = 404, description = "The user has no sandbox (`no_sandbox`)", body = ErrorBody),
    ))]
async fn remove_sandbox(State(state): State<Arc<AppState>>, Path(user): Path<String>) -> ApiResult {
    let user = UserId::parse(&user).map_err(|e| counted(&state, e))?;
    let Some(pool) = state.executor.pool() else {
        return Err(counted(
            &state,
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_sandbox",
                "the host backend has no sandboxes",
            ),
        ));
    };
    if pool.remove(&user).await.map_err(|e| counted(&state, e))? {
        tracing::info!(user = %user, "sandbox removed through the API");
        Ok(Json(Removed {
            removed: pool.container_name(&user),
        })
        .into_response())
    } else {
        Err(counted(
            &state,
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_sandbox",
                format!("user {user} has no sandbox"),
            ),
        ))
    }
}

/// `POST /v1/reap`.
#[utoipa::path(post, path = "/v1/reap", tag = "sandboxes",
    summary = "Remove the sandboxes idle for ZCBOT_SANDBOX_IDLE now",
    responses((status = 200, body = Reaped)))]
async fn reap(State(state): State<Arc<AppState>>) -> ApiResult {
    let Some(pool) = state.executor.pool() else {
        return Ok(Json(Reaped { reaped: Vec::new() }).into_response());
    };
    let reaped = pool
        .reap_idle(pool.config().idle)
        .await
        .map_err(|e| counted(&state, e))?;
    Ok(Json(Reaped { reaped }).into_response())
}

/// `GET /healthz`.
#[utoipa::path(get, path = "/healthz", tag = "service", summary = "The process answers",
    responses((status = 200, body = Health)))]
async fn healthz() -> Response {
    Json(Health { status: "ok" }).into_response()
}

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "service",
    summary = "This API's OpenAPI 3.1 document",
    responses((status = 200, description = "The document", content_type = "application/json",
        body = Object)))]
async fn openapi_json(State(state): State<Arc<AppState>>) -> Response {
    static WITH_TOKEN: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    static WITHOUT: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    let token = state.token_hash.is_some();
    let cell = if token { &WITH_TOKEN } else { &WITHOUT };
    let body = cell.get_or_init(|| {
        serde_json::to_vec(&document(token))
            .unwrap_or_default()
            .into()
    });
    ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response()
}

/// Which shape `GET /v1/tools` answers in.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ToolsQuery {
    /// `openai` (the default: Chat Completions' `tools`), `anthropic` (Messages' `tools`) or
    /// `mcp` (MCP's `tools/list`).
    #[param(inline)]
    format: Option<ToolFormat>,
}

#[derive(serde::Deserialize, utoipa::ToSchema, Clone, Copy, Default)]
#[serde(rename_all = "lowercase")]
enum ToolFormat {
    #[default]
    Openai,
    Anthropic,
    Mcp,
}

/// `GET /v1/tools`: the tools with a JSON Schema of their arguments, ready to hand to a model.
#[utoipa::path(get, path = "/v1/tools", tag = "tools", params(ToolsQuery),
    summary = "The tools and their arguments' JSON Schemas, in a model API's shape",
    responses(
        (status = 200, body = Tools),
        (status = 400, description = "An unknown `format` (`bad_query`)", body = ErrorBody),
    ))]
async fn list_tools(State(state): State<Arc<AppState>>, RawQuery(query): RawQuery) -> ApiResult {
    let q: ToolsQuery =
        serde_urlencoded::from_str(query.as_deref().unwrap_or("")).map_err(|e| {
            counted(
                &state,
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_query",
                    format!("{e}: format is openai, anthropic or mcp"),
                ),
            )
        })?;
    let tools = crate::exec::catalog::tools(state.executor_config())
        .into_iter()
        .map(|t| match q.format.unwrap_or_default() {
            ToolFormat::Openai => json!({"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters}}),
            ToolFormat::Anthropic => json!({
                "name": t.name, "description": t.description, "input_schema": t.parameters}),
            ToolFormat::Mcp => json!({
                "name": t.name, "description": t.description, "inputSchema": t.parameters}),
        })
        .collect();
    Ok(Json(Tools { tools }).into_response())
}

/// Ready: Docker answers, the image is present, the network is there and internal, the host
/// firewall (from its cache: no iptables here), the users root, the self-check, the reaper runs.
/// Each check is reported; 503 exactly when one of them failed (a protection not enforced by
/// choice is reported, not failing).
#[utoipa::path(get, path = "/readyz", tag = "service",
    summary = "Whether the daemon can serve, check by check",
    responses(
        (status = 200, description = "Every check is ok or degraded", body = Readiness),
        (status = 503, description = "A check failed", body = Readiness),
    ))]
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let mut checks: BTreeMap<&str, Check> = BTreeMap::new();
    if let Some(pool) = state.executor.pool() {
        let engine = pool.engine();
        let ok = |r: crate::Result<()>| {
            r.map_or_else(|e| Check::failed(e.to_string()), |_| Check::ok(""))
        };
        checks.insert("docker", ok(engine.ping().await.map_err(Into::into)));
        let image = &pool.config().image;
        checks.insert(
            "image",
            match engine.image_id(image).await {
                Ok(Some(_)) => Check::ok(""),
                Ok(None) => Check::failed(
                    crate::Error::ImageMissing {
                        image: image.clone(),
                    }
                    .to_string(),
                ),
                Err(e) => Check::failed(e.to_string()),
            },
        );
        let runtime = pool.config().runtime.as_str();
        checks.insert(
            "runtime",
            match engine.runtimes().await {
                Ok(r) if r.names.iter().any(|n| n == runtime) => Check::ok(runtime),
                Ok(registered) => Check::failed(
                    crate::Error::RuntimeMissing {
                        runtime,
                        registered: registered.names,
                    }
                    .to_string(),
                ),
                Err(e) => Check::failed(e.to_string()),
            },
        );
        let net = &pool.network().name;
        // The public egress policy runs on a network with a way out; the others on an internal one.
        let internal = pool.config().egress != crate::config::Egress::Public;
        checks.insert(
            "network",
            match engine.networks_named(net).await {
                Ok(n) if n.first().is_some_and(|n| n.internal == internal) => Check::ok(""),
                Ok(n) if n.is_empty() => Check::failed(format!("network {net} is gone")),
                Ok(_) if internal => Check::failed(format!("network {net} is no longer internal")),
                Ok(_) => Check::failed(format!(
                    "network {net} is internal: the public egress policy has no way out"
                )),
                Err(e) => Check::failed(e.to_string()),
            },
        );
        // Not enforced is reported, not failing (the daemon said so loudly at startup).
        checks.insert("host_firewall", pool.firewall().status());
        checks.insert("container_rules", Check::ok(pool.rules_mode().to_string()));
        let users = pool.clone();
        match tokio::task::spawn_blocking(move || users.users_root().checks()).await {
            Ok(found) => checks.extend(found),
            Err(e) => {
                checks.insert(
                    "users_root",
                    Check::failed(format!("the check failed: {e}")),
                );
            }
        }
        checks.insert(
            "self_check",
            state
                .self_check
                .clone()
                .unwrap_or_else(|| Check::degraded("disabled by ZCBOT_SELF_CHECK=0")),
        );
        let alive = state.reaper.lock().as_ref().is_some_and(|r| r.is_alive());
        checks.insert(
            "reaper",
            if alive {
                Check::ok("")
            } else {
                Check::failed("the reaper task is not running")
            },
        );
    }
    let ready = !checks.values().any(Check::is_failed);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let backend = state.executor.backend();
    let states: BTreeMap<&str, &str> = checks.iter().map(|(k, c)| (*k, c.state())).collect();
    let checks: BTreeMap<&str, String> = checks.iter().map(|(k, c)| (*k, c.to_string())).collect();
    (
        status,
        Json(Readiness {
            ready,
            backend,
            checks,
            states,
        }),
    )
        .into_response()
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", tag = "service",
    summary = "Prometheus metrics (OpenMetrics when Accept asks for it)",
    responses((status = 200, description = "The exposition", content(
        (String = "text/plain"), (String = "application/openmetrics-text")))))]
async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(pool) = state.executor.pool() {
        pool.observe_containers().await;
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match state.metrics.exposition(accept) {
        Ok((content_type, body)) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        // Encoding into a String fails only if a label cannot be written: a bug, not a state.
        Err(e) => {
            tracing::error!(error = %e, "could not encode the metrics");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics",
                "the metrics could not be encoded (a bug in the daemon: please report it)",
            )
            .into_response()
        }
    }
}
