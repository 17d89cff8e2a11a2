//! Tool execution: one `Executor`, two backends, chosen once from `ZCBOT_SANDBOX_BACKEND`.
//!
//! `shell` and `run_python` run as processes: in the user's sandbox through the Docker exec API
//! ([`docker::DockerExecutor`]), or on the host for development ([`host::HostExecutor`], which
//! isolates nothing). The file tools run on the host against the user's folder in both backends,
//! confined by [`crate::files`]. Results have one serde shape, shared by the library, the HTTP API
//! and the CLI's `--json`.

pub mod catalog;
pub mod channel;
pub mod docker;
pub mod file_calls;
pub mod host;
pub mod jobs;
pub mod live;
pub mod metrics;
pub mod output;
mod per_call;
pub mod session;
mod stop;
pub mod transfer;
pub mod transport;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::{Backend, Config};
use crate::error::{Error, Result};
use crate::files::{self, DirEntry, FileRead, Workspace};
use crate::pool::SandboxPool;
/// A new call id (16 random hex digits).
pub use crate::text::random_id as new_call_id;
use crate::user::UserId;
use file_calls::FileRunner;
use live::{LiveOutput, Tap};

/// The environment every process starts from: nothing of the host's leaks in.
pub const BASE_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ("HOME", "/workspace"),
    ("LANG", "C.UTF-8"),
];

/// The whole environment of a call: the base with `extra` set over it, as `KEY=VALUE`.
pub(crate) fn base_env(extra: &BTreeMap<String, String>) -> Vec<String> {
    BASE_ENV
        .iter()
        .filter(|(k, _)| !extra.contains_key(*k))
        .map(|(k, v)| format!("{k}={v}"))
        .chain(extra.iter().map(|(k, v)| format!("{k}={v}")))
        .collect()
}

/// Makes a user's [`Workspace`] on the blocking pool.
type MakeWorkspace = Box<dyn FnOnce() -> Result<Workspace> + Send>;

/// What a stateless `run_python` runs: the program (the path of its memfd or `-`, appended by
/// the transport) under the name `<run_python>`, so a traceback names the caller's code.
const RUN_PYTHON: &str = include_str!("run_python.py");

/// The largest command (all arguments together) and the largest program a call may carry: what
/// fits a channel frame and the in-container supervisor's own bound.
const MAX_COMMAND_BYTES: usize = 1 << 20;
const MAX_PROGRAM_BYTES: usize = 16 << 20;

/// The most environment variables a call may set, and their total size.
const MAX_ENV: usize = 256;
const MAX_ENV_BYTES: usize = 64 * 1024;

/// A timeout as JSON gives it: seconds (`30`, `0.5`) or a duration string (`"90s"`, `"2m"`).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum TimeoutArg {
    /// Seconds.
    Secs(f64),
    /// A duration as `config::parse_duration` reads it.
    Text(String),
}

/// What a timeout is, for every message that refuses one.
const TIMEOUT_IS: &str = "a timeout is seconds (30, 0.5) or a duration string (\"90s\", \"2m\")";

/// By hand, not `untagged`: serde's message for another JSON type names this Rust type.
impl<'de> Deserialize<'de> for TimeoutArg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = TimeoutArg;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                // The bound's value is the executor's; its check names it once the type is right.
                write!(
                    f,
                    "the timeout as seconds (30, 0.5) or a duration string (\"90s\", \"2m\"), at \
                     most ZCBOT_EXEC_TIMEOUT_MAX (ZCBOT_JOB_TIMEOUT for a background job)"
                )
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<TimeoutArg, E> {
                Ok(TimeoutArg::Secs(v as f64))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<TimeoutArg, E> {
                Ok(TimeoutArg::Secs(v as f64))
            }
            fn visit_f64<E>(self, v: f64) -> std::result::Result<TimeoutArg, E> {
                Ok(TimeoutArg::Secs(v))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<TimeoutArg, E> {
                Ok(TimeoutArg::Text(v.to_owned()))
            }
        }
        d.deserialize_any(Visit)
    }
}

// `shell` and `run_python` repeat `timeout`, `workdir` and `env` on purpose: serde's `flatten`
// cannot be combined with `deny_unknown_fields`, and unknown fields must be refused.

/// Arguments of `shell`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShellArgs {
    /// Run as `sh -c command`.
    pub command: String,
    /// The call's timeout; default `ZCBOT_EXEC_TIMEOUT`, at most `ZCBOT_EXEC_TIMEOUT_MAX`.
    #[serde(default)]
    #[schema(inline)]
    pub timeout: Option<TimeoutArg>,
    /// Working directory under `/workspace` (relative, or absolute under `/workspace`).
    #[serde(default)]
    pub workdir: Option<String>,
    /// Variables set over the minimal base environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Start it as a background job and answer at once with its id (the daemon's API only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub background: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Arguments of `run_python`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PythonArgs {
    /// The program, run by python3 (fed through stdin; no file is written anywhere).
    pub code: String,
    /// As for `shell`.
    #[serde(default)]
    #[schema(inline)]
    pub timeout: Option<TimeoutArg>,
    /// As for `shell`.
    #[serde(default)]
    pub workdir: Option<String>,
    /// As for `shell`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run in this user's long-lived Python session of that name (1 to 32 of `a-z0-9_-`),
    /// started on first use: variables, imports and open files persist between calls. A session
    /// has its own working directory and environment (`os.chdir`, `os.environ`): `workdir` and
    /// `env` are refused with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z0-9_-]{1,32}$")]
    pub session: Option<String>,
    /// As for `shell` (not with `session`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub background: bool,
}

/// Arguments of `read_file`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    /// The file, relative to the workspace or absolute under `/workspace`.
    pub path: String,
    /// Byte offset to start at (default 0).
    #[serde(default)]
    pub offset: Option<u64>,
    /// Most bytes to read (default and maximum: the output cap).
    #[serde(default)]
    pub limit: Option<u64>,
}

/// Arguments of `write_file`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    /// The file; missing parent folders are created.
    pub path: String,
    /// The text to write (this or `content_base64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The bytes to write, in standard base64 (this or `content`): any binary content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
    /// Append instead of replacing.
    #[serde(default)]
    pub append: bool,
    /// `content_base64` decoded, by [`ToolCall::parse`]: bad base64 is refused before the call
    /// touches anything (not even the user's folder).
    #[serde(skip)]
    decoded: Option<Vec<u8>>,
}

impl WriteFileArgs {
    /// The bytes to write: the text, or the base64 that `parse` decoded.
    fn bytes(&self) -> Result<&[u8]> {
        match (&self.content, &self.decoded) {
            (Some(text), None) => Ok(text.as_bytes()),
            (None, Some(bytes)) => Ok(bytes),
            _ => Err(Error::BadCall {
                tool: "write_file".into(),
                reason: "give exactly one of content (text) and content_base64 (bytes)".into(),
            }),
        }
    }
}

/// Standard base64, line breaks and other ASCII white space ignored (as `base64` wraps it).
fn decode_base64(text: &str) -> std::result::Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine as _;
    let packed: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(packed)
}

/// Arguments of `list_dir` and `delete_path`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PathArgs {
    /// The folder or file.
    pub path: String,
}

/// One tool call, validated as to shape.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolCall {
    /// `shell`.
    Shell(ShellArgs),
    /// `run_python`.
    RunPython(PythonArgs),
    /// `read_file`.
    ReadFile(ReadFileArgs),
    /// `write_file`.
    WriteFile(WriteFileArgs),
    /// `list_dir`.
    ListDir(PathArgs),
    /// `delete_path`.
    DeletePath(PathArgs),
}

impl ToolCall {
    /// Parses a tool's name and JSON arguments. Unknown tools, unknown fields and wrong types are
    /// errors that name the problem; nothing runs.
    pub fn parse(tool: &str, args: serde_json::Value) -> Result<Self> {
        fn de<T: serde::de::DeserializeOwned>(tool: &str, args: serde_json::Value) -> Result<T> {
            serde_json::from_value(args).map_err(|e| Error::BadCall {
                tool: tool.to_owned(),
                reason: e.to_string(),
            })
        }
        Ok(match tool {
            "shell" => ToolCall::Shell(de(tool, args)?),
            "run_python" => {
                let a: PythonArgs = de(tool, args)?;
                if a.background && a.session.is_some() {
                    return Err(Error::BadCall {
                        tool: tool.to_owned(),
                        reason: "background and session cannot be combined: a session runs one call at a time under its caller"
                            .into(),
                    });
                }
                ToolCall::RunPython(a)
            }
            "read_file" => ToolCall::ReadFile(de(tool, args)?),
            "write_file" => {
                let mut a: WriteFileArgs = de(tool, args)?;
                if a.content.is_some() == a.content_base64.is_some() {
                    return Err(Error::BadCall {
                        tool: tool.to_owned(),
                        reason: "give exactly one of content (text) and content_base64 (bytes)"
                            .into(),
                    });
                }
                if let Some(b64) = &a.content_base64 {
                    a.decoded = Some(decode_base64(b64).map_err(|e| Error::BadCall {
                        tool: tool.to_owned(),
                        reason: format!("content_base64 is not standard base64: {e}"),
                    })?);
                }
                ToolCall::WriteFile(a)
            }
            "list_dir" => ToolCall::ListDir(de(tool, args)?),
            "delete_path" => ToolCall::DeletePath(de(tool, args)?),
            other => {
                return Err(Error::UnknownTool {
                    name: other.chars().take(64).collect(),
                })
            }
        })
    }

    /// Whether it asks to run as a background job.
    pub fn background(&self) -> bool {
        match self {
            ToolCall::Shell(a) => a.background,
            ToolCall::RunPython(a) => a.background,
            _ => false,
        }
    }

    /// The tool's name.
    pub fn tool(&self) -> &'static str {
        match self {
            ToolCall::Shell(_) => "shell",
            ToolCall::RunPython(_) => "run_python",
            ToolCall::ReadFile(_) => "read_file",
            ToolCall::WriteFile(_) => "write_file",
            ToolCall::ListDir(_) => "list_dir",
            ToolCall::DeletePath(_) => "delete_path",
        }
    }
}

/// Whether the tool of that name is a file tool: run on the host against the user's folder, in
/// both backends, never in the sandbox.
pub fn is_file_tool(name: &str) -> bool {
    matches!(
        name,
        "read_file" | "write_file" | "list_dir" | "delete_path"
    )
}

/// Which output streams lost bytes to the cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Truncated {
    /// Standard output.
    pub stdout: bool,
    /// Standard error.
    pub stderr: bool,
}

/// What a file tool returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ToolData {
    /// `read_file`.
    Read(FileRead),
    /// `write_file`.
    Written {
        /// Bytes written.
        bytes_written: u64,
    },
    /// `list_dir`.
    Listing {
        /// The entries, sorted by name (at most 10,000: the first ones).
        entries: Vec<DirEntry>,
        /// True when the folder holds more than was listed.
        truncated: bool,
    },
    /// `delete_path`.
    Deleted {
        /// The path removed.
        deleted: String,
        /// How many entries (files, links, folders) were removed.
        entries: u64,
    },
}

/// The result of one call. Stable JSON: the HTTP API and the CLI's `--json` print exactly this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ToolResult {
    /// The tool that ran.
    pub tool: String,
    /// The process's exit status (128+N when killed by signal N); null for file tools and for a
    /// call that timed out or was cancelled.
    pub exit_code: Option<i32>,
    /// Standard output (UTF-8; see `stdout_base64`).
    pub stdout: String,
    /// The exact bytes of `stdout` in base64, present only when they are not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stdout_base64: Option<String>,
    /// Standard error (UTF-8; see `stderr_base64`).
    pub stderr: String,
    /// The exact bytes of `stderr` in base64, present only when they are not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stderr_base64: Option<String>,
    /// The call hit its timeout; every process it started was killed.
    pub timed_out: bool,
    /// The call was cancelled; every process it started was killed.
    pub cancelled: bool,
    /// Which streams lost their middle to the cap.
    pub truncated: Truncated,
    /// Wall time of the call.
    pub duration_ms: u64,
    /// What a file tool returns.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub data: Option<ToolData>,
    /// What a call in a Python session adds: the final expression's value, the exception, rich
    /// results, whether the session started or was restarted.
    // The schema shows the fields with none required: a result outside a session has none.
    #[serde(flatten, skip_serializing_if = "Option::is_none", default)]
    #[schema(value_type = session::SessionOutcome)]
    pub session: Option<session::SessionOutcome>,
}

impl ToolResult {
    fn file(tool: &str, started: Instant, data: Option<ToolData>) -> Self {
        ToolResult {
            tool: tool.to_owned(),
            exit_code: None,
            stdout: String::new(),
            stdout_base64: None,
            stderr: String::new(),
            stderr_base64: None,
            timed_out: false,
            cancelled: false,
            truncated: Truncated::default(),
            duration_ms: started.elapsed().as_millis() as u64,
            data,
            session: None,
        }
    }
}

/// A process to run for a call: the backends' common input.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// The argument vector (no shell is added).
    pub argv: Vec<String>,
    /// A program for python3 to read (run_python); None: stdin is /dev/null.
    pub program: Option<Vec<u8>>,
    /// Resolved timeout.
    pub timeout: Duration,
    /// Path components under the workspace to run in.
    pub workdir: Vec<String>,
    /// Variables over the base environment.
    pub env: BTreeMap<String, String>,
    /// Where its output also goes as it arrives (a streamed call, a background job).
    pub tap: Option<live::Tap>,
}

/// The outcome of a process, before it becomes a [`ToolResult`].
#[derive(Debug)]
pub(crate) struct ProcessOutcome {
    pub(crate) exit_code: Option<i32>,
    pub(crate) stdout: output::Captured,
    pub(crate) stderr: output::Captured,
    pub(crate) timed_out: bool,
    pub(crate) cancelled: bool,
}

impl ProcessOutcome {
    fn into_result(self, tool: &str, started: Instant) -> ToolResult {
        let (stdout, stdout_base64) = crate::text::to_text(&self.stdout.bytes);
        let (stderr, stderr_base64) = crate::text::to_text(&self.stderr.bytes);
        ToolResult {
            tool: tool.to_owned(),
            exit_code: if self.timed_out || self.cancelled {
                None
            } else {
                self.exit_code
            },
            stdout,
            stdout_base64,
            stderr,
            stderr_base64,
            timed_out: self.timed_out,
            cancelled: self.cancelled,
            truncated: Truncated {
                stdout: self.stdout.truncated,
                stderr: self.stderr.truncated,
            },
            duration_ms: started.elapsed().as_millis() as u64,
            data: None,
            session: None,
        }
    }
}

/// A call validated by [`Executor::prepare`], ready to run.
#[derive(Debug)]
pub struct Prepared {
    tool: &'static str,
    job: bool,
    run: Run,
}

impl Prepared {
    /// The tool's name.
    pub fn tool(&self) -> &'static str {
        self.tool
    }
}

#[derive(Debug)]
enum Run {
    Process(ProcessSpec),
    Session(String, ProcessSpec),
    File(ToolCall),
}

/// Runs tool calls for users on the configured backend.
pub enum Executor {
    /// Processes on the host (development).
    Host(host::HostExecutor),
    /// Processes in each user's sandbox.
    Docker(docker::DockerExecutor),
}

impl Executor {
    /// The executor `config.backend` names. With `docker`, the pool must come up (daemon
    /// reachable, image present, network acceptable), or this fails with the reason: it never
    /// falls back to the host.
    pub async fn from_config(config: Config) -> Result<Self> {
        match config.backend {
            Backend::Host => Ok(Executor::Host(host::HostExecutor::new(config))),
            Backend::Docker => Ok(Executor::Docker(docker::DockerExecutor::new(
                SandboxPool::connect(config).await?,
            ))),
        }
    }

    /// Like [`Executor::from_config`], for a command run beside the daemon (the CLI): see
    /// [`SandboxPool::connect_guest`].
    pub async fn guest(config: Config) -> Result<Self> {
        match config.backend {
            Backend::Host => Ok(Executor::Host(host::HostExecutor::new(config))),
            Backend::Docker => Ok(Executor::Docker(docker::DockerExecutor::new(
                SandboxPool::connect_guest(config).await?,
            ))),
        }
    }

    /// Which backend runs the calls.
    pub fn backend(&self) -> Backend {
        match self {
            Executor::Host(_) => Backend::Host,
            Executor::Docker(_) => Backend::Docker,
        }
    }

    /// The pool behind the docker backend.
    pub fn pool(&self) -> Option<&SandboxPool> {
        match self {
            Executor::Host(_) => None,
            Executor::Docker(d) => Some(d.pool()),
        }
    }

    /// What the docker backend's transports did; None for the host backend.
    pub fn transport_stats(&self) -> Option<&metrics::TransportStats> {
        match self {
            Executor::Host(_) => None,
            Executor::Docker(d) => Some(d.stats()),
        }
    }

    /// Every background task of the executor (clean-up after dropped calls, dead channels, the
    /// reaper): shutdown closes the tracker and waits for them, bounded.
    pub fn tasks(&self) -> &tokio_util::task::TaskTracker {
        match self {
            Executor::Host(h) => h.tasks(),
            Executor::Docker(d) => d.pool().tasks(),
        }
    }

    /// Closes the docker backend's exec channels (their helpers stop their calls and exit).
    pub fn close_channels(&self) {
        if let Executor::Docker(d) = self {
            d.close_channels();
        }
    }

    fn config(&self) -> &Config {
        match self {
            Executor::Host(h) => h.config(),
            Executor::Docker(d) => d.pool().config(),
        }
    }

    fn files(&self) -> &FileRunner {
        match self {
            Executor::Host(h) => h.files(),
            Executor::Docker(d) => d.files(),
        }
    }

    /// Runs one call for `user`. `cancel` stops it (its processes killed, `cancelled` set);
    /// dropping the future stops it too.
    pub async fn run(
        &self,
        user: &UserId,
        call: ToolCall,
        cancel: &CancellationToken,
    ) -> Result<ToolResult> {
        let call = self.prepare(call)?;
        self.run_prepared(user, call, cancel, None).await
    }

    /// Validates a call as far as can be done before it runs (arguments, timeout, command, the
    /// environment): what the daemon does before it answers with a stream or a job id, so that a
    /// bad call is refused as one. A `background` call is prepared as a job: its timeout
    /// defaults to and is bounded by `ZCBOT_JOB_TIMEOUT`; the host backend refuses it
    /// (`jobs_unavailable`: its processes could outlive the daemon).
    pub fn prepare(&self, call: ToolCall) -> Result<Prepared> {
        let tool = call.tool();
        let job = call.background();
        if let (true, Executor::Host(_)) = (job, self) {
            return Err(Error::JobUnavailable {
                reason: "they need the docker backend (ZCBOT_SANDBOX_BACKEND=docker): on the \
                         host a job's processes could outlive the daemon"
                    .into(),
            });
        }
        let run = match call {
            ToolCall::Shell(a) => Run::Process(self.spec(
                tool,
                vec!["sh".into(), "-c".into(), a.command],
                None,
                a.timeout,
                a.workdir,
                a.env,
                job,
            )?),
            ToolCall::RunPython(PythonArgs {
                session: Some(name),
                code,
                timeout,
                workdir,
                env,
                background: _,
            }) => {
                session::check_name(&name)?;
                if workdir.is_some() || !env.is_empty() {
                    return Err(Error::BadCall {
                        tool: tool.into(),
                        reason: "workdir and env cannot be given with session: a session keeps \
                                 its own (change them with os.chdir and os.environ in it)"
                            .into(),
                    });
                }
                let spec = self.spec(
                    tool,
                    Vec::new(),
                    Some(code.into_bytes()),
                    timeout,
                    None,
                    BTreeMap::new(),
                    false,
                )?;
                Run::Session(name, spec)
            }
            ToolCall::RunPython(a) => Run::Process(self.spec(
                tool,
                vec!["python3".into(), "-c".into(), RUN_PYTHON.into()],
                Some(a.code.into_bytes()),
                a.timeout,
                a.workdir,
                a.env,
                job,
            )?),
            file_call => Run::File(file_call),
        };
        Ok(Prepared { tool, job, run })
    }

    /// [`run`](Self::run) for a prepared call, its output also going to `live` as it is
    /// produced: for a call, the head of each stream (what the cap keeps first; a streamed answer
    /// follows it, and the result is the same); for a `background` call (a job), every byte (the
    /// job's rings keep the latest), over the exec channel whatever the transport setting.
    pub async fn run_live(
        &self,
        user: &UserId,
        call: Prepared,
        cancel: &CancellationToken,
        live: Arc<LiveOutput>,
    ) -> Result<ToolResult> {
        let tap = Tap {
            output: live,
            all: call.job,
        };
        self.run_prepared(user, call, cancel, Some(tap)).await
    }

    /// [`run`](Self::run) for a prepared call.
    pub async fn run_prepared_call(
        &self,
        user: &UserId,
        call: Prepared,
        cancel: &CancellationToken,
    ) -> Result<ToolResult> {
        self.run_prepared(user, call, cancel, None).await
    }

    async fn run_prepared(
        &self,
        user: &UserId,
        call: Prepared,
        cancel: &CancellationToken,
        tap: Option<Tap>,
    ) -> Result<ToolResult> {
        let started = Instant::now();
        let Prepared { tool, job, run } = call;
        if job && tap.is_none() {
            return Err(Error::BadCall {
                tool: tool.into(),
                reason: "background: true starts a job, which only the daemon's API runs (POST \
                         the call to /v1/users/USER/tools/TOOL; it answers with the job's id)"
                    .into(),
            });
        }
        match run {
            Run::Process(mut spec) => {
                spec.tap = tap;
                let outcome = self.run_spec(user, spec, cancel).await?;
                Ok(outcome.into_result(tool, started))
            }
            Run::Session(name, mut spec) => {
                spec.tap = tap;
                self.run_session(user, &name, spec, cancel, started).await
            }
            Run::File(call) => self.run_file_tool(user, call, cancel, started).await,
        }
    }

    /// Runs a validated program in the user's Python session `name`.
    async fn run_session(
        &self,
        user: &UserId,
        name: &str,
        spec: ProcessSpec,
        cancel: &CancellationToken,
        started: Instant,
    ) -> Result<ToolResult> {
        let Executor::Docker(d) = self else {
            return Err(Error::SessionsUnavailable {
                reason: "they need the docker backend (ZCBOT_SANDBOX_BACKEND=docker); the host \
                         backend runs every call in a fresh process"
                    .into(),
            });
        };
        let code = String::from_utf8(spec.program.unwrap_or_default())
            .expect("the program came from a String");
        let (outcome, session) = d
            .run_session(user, name, &code, spec.timeout, spec.tap.as_ref(), cancel)
            .await?;
        let mut result = outcome.into_result("run_python", started);
        result.session = Some(session);
        Ok(result)
    }

    /// The user's Python sessions (none on the host backend).
    pub async fn sessions(&self, user: &UserId) -> Vec<session::SessionInfo> {
        match self {
            Executor::Host(_) => Vec::new(),
            Executor::Docker(d) => d.sessions(user).await,
        }
    }

    /// Ends the user's Python session `name` and every process it started.
    pub async fn end_session(&self, user: &UserId, name: &str) -> Result<()> {
        session::check_name(name)?;
        let ended = match self {
            Executor::Host(_) => false,
            Executor::Docker(d) => d.end_session(user, name).await,
        };
        if ended {
            Ok(())
        } else {
            Err(Error::NoSuchSession {
                user: user.to_string(),
                name: name.to_owned(),
            })
        }
    }

    /// Runs an argument vector as is (the CLI's `exec -- CMD ARGS`), with `shell`'s guarantees.
    pub async fn run_argv(
        &self,
        user: &UserId,
        argv: Vec<String>,
        timeout: Option<Duration>,
        workdir: Option<String>,
        cancel: &CancellationToken,
    ) -> Result<ToolResult> {
        let started = Instant::now();
        if argv.is_empty() {
            return Err(Error::BadCall {
                tool: "exec".into(),
                reason: "no command given".into(),
            });
        }
        let timeout = timeout.map(|d| TimeoutArg::Secs(d.as_secs_f64()));
        let spec = self.spec("exec", argv, None, timeout, workdir, BTreeMap::new(), false)?;
        Ok(self
            .run_spec(user, spec, cancel)
            .await?
            .into_result("exec", started))
    }

    async fn run_spec(
        &self,
        user: &UserId,
        spec: ProcessSpec,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome> {
        match self {
            Executor::Host(h) => h.run(user, spec, cancel).await,
            Executor::Docker(d) => d.run(user, spec, cancel).await,
        }
    }

    /// Validates a process call into its spec. A `job`'s timeout defaults to and is bounded by
    /// `ZCBOT_JOB_TIMEOUT` instead of the call timeouts.
    #[allow(clippy::too_many_arguments)]
    fn spec(
        &self,
        tool: &str,
        argv: Vec<String>,
        program: Option<Vec<u8>>,
        timeout: Option<TimeoutArg>,
        workdir: Option<String>,
        env: BTreeMap<String, String>,
        job: bool,
    ) -> Result<ProcessSpec> {
        let bad = |reason: String| Error::BadCall {
            tool: tool.to_owned(),
            reason,
        };
        let cfg = self.config();
        let (default, max, max_name) = if job {
            (cfg.job_timeout, cfg.job_timeout, "ZCBOT_JOB_TIMEOUT")
        } else {
            (
                cfg.exec_timeout,
                cfg.exec_timeout_max,
                "ZCBOT_EXEC_TIMEOUT_MAX",
            )
        };
        // A refused timeout says what one is and the bound, in a line: the value as given (a
        // long string cut, a huge number in exponent form), never 309 digits.
        let refuse = |got: String| {
            bad(format!(
                "timeout {got}: {TIMEOUT_IS}, longer than zero and at most {} ({max_name})",
                humantime::format_duration(max)
            ))
        };
        let timeout = match timeout {
            None => default,
            Some(TimeoutArg::Secs(s)) if s > 0.0 && s <= max.as_secs_f64() => {
                Duration::from_secs_f64(s)
            }
            Some(TimeoutArg::Secs(s)) if s.is_finite() && s.abs() < 1e9 => {
                return Err(refuse(s.to_string()))
            }
            Some(TimeoutArg::Secs(s)) => return Err(refuse(format!("{s:e}"))),
            Some(TimeoutArg::Text(t)) => {
                let shown = if t.chars().count() > 40 {
                    format!("{:?}...", t.chars().take(40).collect::<String>())
                } else {
                    format!("{t:?}")
                };
                match crate::config::parse_duration(&t) {
                    Ok(d) if !d.is_zero() && d <= max => d,
                    _ => return Err(refuse(shown)),
                }
            }
        };
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(bad("the command contains a NUL byte".into()));
        }
        if argv.iter().map(String::len).sum::<usize>() > MAX_COMMAND_BYTES {
            return Err(bad("the command is larger than 1 MiB".into()));
        }
        if program
            .as_ref()
            .is_some_and(|p| p.len() > MAX_PROGRAM_BYTES)
        {
            return Err(bad(
                "the program is larger than 16 MiB: write it to a file with write_file and run that"
                    .into(),
            ));
        }
        let workdir = match workdir {
            None => Vec::new(),
            Some(w) => files::normalize(&w)
                .map_err(|e| bad(format!("workdir: {e}")))?
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
        };
        if env.len() > MAX_ENV {
            return Err(bad(format!("more than {MAX_ENV} environment variables")));
        }
        let mut size = 0;
        for (k, v) in &env {
            let valid = !k.is_empty()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !k.as_bytes()[0].is_ascii_digit();
            if !valid {
                return Err(bad(format!(
                    "environment variable name {k:?} is not [A-Za-z_][A-Za-z0-9_]*"
                )));
            }
            if v.contains('\0') {
                return Err(bad(format!("environment variable {k} contains a NUL byte")));
            }
            size += k.len() + v.len() + 2;
        }
        if size > MAX_ENV_BYTES {
            return Err(bad("the environment is larger than 64 KiB".into()));
        }
        Ok(ProcessSpec {
            argv,
            program,
            timeout,
            workdir,
            env,
            tap: None,
        })
    }

    /// The user's workspace, to be made on the blocking pool: the docker backend's folder is
    /// prepared (and its activity marked) here, the host backend's in the returned closure.
    async fn workspace_maker(&self, user: &UserId) -> Result<MakeWorkspace> {
        Ok(match self {
            Executor::Docker(d) => {
                let folder = d.pool().prepare_workspace(user).await?;
                d.pool().mark_active(user);
                Box::new(move || Ok(Workspace::new(folder.path, folder.uid, folder.gid)))
            }
            Executor::Host(h) => {
                let (h, who) = (h.clone(), user.clone());
                Box::new(move || h.workspace(&who))
            }
        })
    }

    async fn run_file_tool(
        &self,
        user: &UserId,
        call: ToolCall,
        cancel: &CancellationToken,
        started: Instant,
    ) -> Result<ToolResult> {
        let cfg = self.config();
        let tool = call.tool();
        if let ToolCall::ReadFile(a) = &call {
            let cap = cfg.output_cap as u64;
            if a.limit.is_some_and(|l| l > cap) {
                return Err(Error::BadCall {
                    tool: tool.into(),
                    reason: format!(
                        "limit {} is above the output cap {cap} (ZCBOT_OUTPUT_CAP)",
                        a.limit.unwrap_or_default()
                    ),
                });
            }
        }
        let workspace = self.workspace_maker(user).await?;
        let cap = cfg.output_cap as u64;
        let path = match &call {
            ToolCall::ReadFile(a) => a.path.clone(),
            ToolCall::WriteFile(a) => a.path.clone(),
            ToolCall::ListDir(a) | ToolCall::DeletePath(a) => a.path.clone(),
            ToolCall::Shell(_) | ToolCall::RunPython(_) => {
                unreachable!("process tools are run above")
            }
        };
        let done = self
            .files()
            .run(user, &path, cancel, move |budget| {
                let ws = workspace()?;
                Ok(match call {
                    ToolCall::ReadFile(a) => ToolData::Read(ws.read_file(
                        &a.path,
                        a.offset.unwrap_or(0),
                        a.limit.unwrap_or(cap) as usize,
                    )?),
                    ToolCall::WriteFile(a) => ToolData::Written {
                        bytes_written: ws.write_file(&a.path, a.bytes()?, a.append)?,
                    },
                    ToolCall::ListDir(a) => {
                        let listing = ws.list_dir(&a.path, budget)?;
                        ToolData::Listing {
                            entries: listing.entries,
                            truncated: listing.truncated,
                        }
                    }
                    ToolCall::DeletePath(a) => {
                        let entries = ws.delete_path(&a.path, budget)?;
                        ToolData::Deleted {
                            deleted: a.path,
                            entries,
                        }
                    }
                    ToolCall::Shell(_) | ToolCall::RunPython(_) => {
                        unreachable!("process tools are run above")
                    }
                })
            })
            .await;
        match done {
            Ok(data) => Ok(ToolResult::file(tool, started, Some(data))),
            // Out of time or cancelled: reported like a process call that was stopped.
            Err(e @ Error::FileStopped { cancelled, .. }) => {
                let mut r = ToolResult::file(tool, started, None);
                r.timed_out = !cancelled;
                r.cancelled = cancelled;
                r.stderr = e.to_string();
                Ok(r)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_each_tool_and_refuses_bad_shapes() {
        assert!(matches!(
            ToolCall::parse("shell", json!({"command": "ls", "timeout": 5})).unwrap(),
            ToolCall::Shell(ShellArgs {
                timeout: Some(TimeoutArg::Secs(_)),
                ..
            })
        ));
        assert!(matches!(
            ToolCall::parse("run_python", json!({"code": "print(1)", "timeout": "2m"})).unwrap(),
            ToolCall::RunPython(_)
        ));
        assert!(matches!(
            ToolCall::parse("list_dir", json!({"path": "."})).unwrap(),
            ToolCall::ListDir(_)
        ));
        let unknown = ToolCall::parse("rm_rf", json!({})).unwrap_err();
        assert_eq!(unknown.kind(), "unknown_tool");
        for (tool, args) in [
            ("shell", json!({"command": 5})),
            ("shell", json!({"cmd": "ls"})),
            ("shell", json!({"command": "ls", "extra": 1})),
            ("write_file", json!({"path": "a"})),
            (
                "write_file",
                json!({"path": "a", "content": "x", "content_base64": "eA=="}),
            ),
            ("read_file", json!({"path": "a", "offset": -1})),
        ] {
            let err = ToolCall::parse(tool, args.clone()).unwrap_err();
            assert_eq!(err.kind(), "bad_call", "{tool} {args}");
        }
    }

    #[test]
    fn the_host_backend_refuses_jobs_before_anything_runs() {
        let config = Config::from_lookup(|_| None).unwrap();
        let host = Executor::Host(host::HostExecutor::new(config));
        let job = ToolCall::parse("shell", json!({"command": "true", "background": true}));
        let err = host.prepare(job.unwrap()).unwrap_err();
        assert_eq!(err.kind(), "jobs_unavailable");
        // Positive control: the same call in the foreground is prepared.
        let call = ToolCall::parse("shell", json!({"command": "true"})).unwrap();
        assert!(host.prepare(call).is_ok());
    }

    #[test]
    fn result_json_is_stable() {
        let r = ToolResult::file(
            "write_file",
            Instant::now(),
            Some(ToolData::Written { bytes_written: 3 }),
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["data"]["bytes_written"], 3);
        assert_eq!(v["truncated"], json!({"stdout": false, "stderr": false}));
        assert!(v.get("stdout_base64").is_none());
        for key in [
            "tool",
            "exit_code",
            "stdout",
            "stderr",
            "timed_out",
            "cancelled",
            "duration_ms",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
    }
}
