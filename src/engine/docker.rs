//! [`DockerEngine`]: the [`Engine`] facade over bollard.
//!
//! bollard's own timeout covers only response headers, and a hung daemon must never hang the
//! pool, so every call goes through [`DockerEngine::call`], which adds the deadline and turns the
//! outcome into an [`EngineError`] naming the operation and its target. The status codes a caller
//! branches on (404 gone, 409 conflict, Docker 20.10's 403 for a duplicate bridge name) become
//! typed results here.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, SystemTime};

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerStateStatusEnum, ContainerSummaryStateEnum, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, ListContainersOptions, ListNetworksOptions, LogsOptions,
    RemoveContainerOptions,
};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};

use super::{
    Attached, Chunk, Container, ContainerSpec, Created, DeathStream, Engine, EngineError,
    EngineResult, ExecSpec, ExecStart, ExecState, Filter, Listed, LogStream, Network, NetworkSpec,
    Op, Removed, Renamed, Run, Runtimes, State,
};
use crate::config::Config;

/// A cheaply cloned handle on a Docker Engine, with the deadline every call gets.
#[derive(Clone, Debug)]
pub struct DockerEngine {
    inner: bollard::Docker,
    host: String,
    timeout: Duration,
}

/// How a failed call is told apart.
enum Answer {
    NotFound,
    Conflict,
    Other,
}

impl DockerEngine {
    /// Connects to `DOCKER_HOST` (or the local socket) and negotiates the API version down to what
    /// the engine speaks (1.41 on Debian bookworm's engine). Fails with
    /// [`EngineError::Unreachable`] or [`EngineError::Timeout`] when no engine answers.
    pub async fn connect(config: &Config) -> EngineResult<Self> {
        let host = config.docker_host_display();
        // bollard's own timeout only backs ours up: a second longer, so ours normally fires first.
        let backstop = Duration::from_secs(config.docker_timeout.as_secs() + 1);
        let client = match &config.docker_host {
            Some(h) => bollard::Docker::connect_with_host(h),
            None => bollard::Docker::connect_with_local_defaults(),
        }
        .map_err(|e| EngineError::Unreachable {
            host: host.clone(),
            detail: crate::text::error_chain(&e),
        })?
        .with_timeout(backstop);
        let mut engine = DockerEngine {
            inner: client.clone(),
            host: host.clone(),
            timeout: config.docker_timeout,
        };
        engine.inner = engine
            .call(Op::Handshake, &host, client.negotiate_version())
            .await
            .map_err(|(e, _)| e)?;
        tracing::debug!(host = %engine.host, api = %engine.api_version(), "connected to Docker");
        Ok(engine)
    }

    /// Runs one call with the deadline. A failure comes with how the engine answered, for the
    /// typed results.
    async fn call<T, F>(
        &self,
        op: Op,
        target: &str,
        fut: F,
    ) -> std::result::Result<T, (EngineError, Answer)>
    where
        F: Future<Output = std::result::Result<T, bollard::errors::Error>>,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err((
                EngineError::Timeout {
                    op,
                    target: target.to_owned(),
                    after: self.timeout,
                },
                Answer::Other,
            )),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.classify(op, target, e)),
        }
    }

    /// Like `call`, for calls whose failures are all plain errors.
    async fn plain<T, F>(&self, op: Op, target: &str, fut: F) -> EngineResult<T>
    where
        F: Future<Output = std::result::Result<T, bollard::errors::Error>>,
    {
        self.call(op, target, fut).await.map_err(|(e, _)| e)
    }

    /// Transport failures mean the engine is unreachable; an answer with a status is a failure.
    fn classify(&self, op: Op, target: &str, e: bollard::errors::Error) -> (EngineError, Answer) {
        use bollard::errors::Error as B;
        match e {
            B::IOError { .. }
            | B::HyperLegacyError { .. }
            | B::SocketNotFoundError(_)
            | B::HttpClientError { .. } => (
                EngineError::Unreachable {
                    host: self.host.clone(),
                    detail: crate::text::error_chain(&e),
                },
                Answer::Other,
            ),
            B::RequestTimeoutError => (
                EngineError::Timeout {
                    op,
                    target: target.to_owned(),
                    after: self.timeout,
                },
                Answer::Other,
            ),
            B::DockerResponseServerError {
                status_code,
                message,
            } => {
                let answer = match status_code {
                    404 => Answer::NotFound,
                    409 => Answer::Conflict,
                    // Docker 20.10 refuses a second network with our bridge name this way.
                    403 if message.contains("same bridge name") => Answer::Conflict,
                    _ => Answer::Other,
                };
                (
                    EngineError::Failed {
                        op,
                        target: target.to_owned(),
                        status: Some(status_code),
                        message,
                    },
                    answer,
                )
            }
            other => (
                EngineError::Failed {
                    op,
                    target: target.to_owned(),
                    status: None,
                    message: crate::text::error_chain(&other),
                },
                Answer::Other,
            ),
        }
    }

    fn stream_error(&self, op: Op, target: &str, e: bollard::errors::Error) -> EngineError {
        self.classify(op, target, e).0
    }
}

/// A failed create: a conflict means the name is taken.
fn created(failed: (EngineError, Answer)) -> EngineResult<Created> {
    match failed {
        (_, Answer::Conflict) => Ok(Created::NameTaken),
        (e, _) => Err(e),
    }
}

/// A failed removal: not found means gone; a conflict, "removal already in progress".
fn removed(failed: (EngineError, Answer)) -> EngineResult<Removed> {
    match failed {
        (_, Answer::NotFound) => Ok(Removed::Gone),
        (_, Answer::Conflict) => Ok(Removed::InProgress),
        (e, _) => Err(e),
    }
}

fn time(s: Option<&str>) -> Option<SystemTime> {
    s.and_then(|s| humantime::parse_rfc3339_weak(s).ok())
        .filter(|t| *t > SystemTime::UNIX_EPOCH)
}

fn container_state(s: Option<ContainerStateStatusEnum>) -> State {
    use ContainerStateStatusEnum as S;
    match s {
        Some(S::CREATED) => State::Created,
        Some(S::RUNNING) => State::Running,
        Some(S::PAUSED) => State::Paused,
        Some(S::RESTARTING) => State::Restarting,
        Some(S::REMOVING) => State::Removing,
        Some(S::EXITED) => State::Exited,
        Some(S::DEAD) => State::Dead,
        _ => State::Unknown,
    }
}

fn summary_state(s: Option<ContainerSummaryStateEnum>) -> State {
    use ContainerSummaryStateEnum as S;
    match s {
        Some(S::CREATED) => State::Created,
        Some(S::RUNNING) => State::Running,
        Some(S::PAUSED) => State::Paused,
        Some(S::RESTARTING) => State::Restarting,
        Some(S::REMOVING) => State::Removing,
        Some(S::EXITED) => State::Exited,
        Some(S::DEAD) => State::Dead,
        _ => State::Unknown,
    }
}

fn network(n: bollard::models::Network) -> Network {
    Network {
        id: n.id.unwrap_or_default(),
        name: n.name.unwrap_or_default(),
        driver: n.driver.unwrap_or_default(),
        internal: n.internal == Some(true),
        options: n.options.unwrap_or_default(),
        subnets: n
            .ipam
            .and_then(|i| i.config)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| Some((c.subnet?, c.gateway)))
            .collect(),
        created: time(n.created.as_deref()),
        labels: n.labels.unwrap_or_default(),
    }
}

impl Engine for DockerEngine {
    fn host(&self) -> &str {
        &self.host
    }

    fn api_version(&self) -> String {
        self.inner.client_version().to_string()
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn ping(&self) -> BoxFuture<'_, EngineResult<()>> {
        async move {
            self.plain(Op::Ping, &self.host, self.inner.ping())
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn runtimes(&self) -> BoxFuture<'_, EngineResult<Runtimes>> {
        async move {
            let info = self.plain(Op::Info, &self.host, self.inner.info()).await?;
            let mut names: Vec<String> = info.runtimes.unwrap_or_default().into_keys().collect();
            names.sort();
            Ok(Runtimes {
                names,
                default: info.default_runtime,
            })
        }
        .boxed()
    }

    fn image_id<'a>(&'a self, image: &'a str) -> BoxFuture<'a, EngineResult<Option<String>>> {
        async move {
            match self
                .call(Op::InspectImage, image, self.inner.inspect_image(image))
                .await
            {
                Ok(img) => Ok(Some(img.id.unwrap_or_default())),
                Err((_, Answer::NotFound)) => Ok(None),
                Err((e, _)) => Err(e),
            }
        }
        .boxed()
    }

    fn networks_named<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<Vec<Network>>> {
        async move {
            let list = self
                .plain(
                    Op::ListNetworks,
                    name,
                    self.inner.list_networks(Some(ListNetworksOptions {
                        filters: Some(HashMap::from([("name".to_owned(), vec![name.to_owned()])])),
                    })),
                )
                .await?;
            // The name filter matches substrings: keep exact matches, oldest first.
            let mut exact: Vec<Network> = list
                .into_iter()
                .map(network)
                .filter(|n| n.name == name)
                .collect();
            exact.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
            Ok(exact)
        }
        .boxed()
    }

    fn create_network<'a>(&'a self, spec: &'a NetworkSpec) -> BoxFuture<'a, EngineResult<Created>> {
        async move {
            let request = NetworkCreateRequest {
                name: spec.name.clone(),
                driver: Some("bridge".to_owned()),
                internal: Some(spec.internal),
                attachable: Some(false),
                enable_ipv6: Some(false),
                options: Some(spec.options.clone()),
                labels: Some(spec.labels.clone()),
                ..Default::default()
            };
            match self
                .call(
                    Op::CreateNetwork,
                    &spec.name,
                    self.inner.create_network(request),
                )
                .await
            {
                Ok(resp) => Ok(Created::Created(resp.id)),
                Err(failed) => created(failed),
            }
        }
        .boxed()
    }

    fn remove_network<'a>(&'a self, id: &'a str) -> BoxFuture<'a, EngineResult<Removed>> {
        async move {
            match self
                .call(Op::RemoveNetwork, id, self.inner.remove_network(id))
                .await
            {
                Ok(()) => Ok(Removed::Removed),
                Err(failed) => removed(failed),
            }
        }
        .boxed()
    }

    fn inspect<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<Option<Container>>> {
        async move {
            let found = match self
                .call(
                    Op::Inspect,
                    container,
                    self.inner.inspect_container(container, None),
                )
                .await
            {
                Ok(c) => c,
                Err((_, Answer::NotFound)) => return Ok(None),
                Err((e, _)) => return Err(e),
            };
            let st = found.state.unwrap_or_default();
            let state = container_state(st.status);
            let run = (state == State::Running).then(|| Run {
                started_at: time(st.started_at.as_deref()).unwrap_or(SystemTime::UNIX_EPOCH),
                // Docker reports 0001-01-01 for a container that never stopped: None.
                previous_end: time(st.finished_at.as_deref()),
                pid: st.pid.unwrap_or(0) as i32,
            });
            Ok(Some(Container {
                id: found.id.unwrap_or_default(),
                name: found
                    .name
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_owned(),
                labels: found.config.and_then(|c| c.labels).unwrap_or_default(),
                state,
                run,
                exit_code: st.exit_code,
                error: st.error.filter(|e| !e.is_empty()),
                oom_killed: st.oom_killed.unwrap_or(false),
                addresses: found
                    .network_settings
                    .and_then(|n| n.networks)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(name, e)| Some((name, e.ip_address?.parse().ok()?)))
                    .collect(),
            }))
        }
        .boxed()
    }

    fn create<'a>(
        &'a self,
        name: &'a str,
        spec: &'a ContainerSpec,
    ) -> BoxFuture<'a, EngineResult<Created>> {
        async move {
            match self
                .call(
                    Op::Create,
                    name,
                    self.inner.create_container(
                        Some(CreateContainerOptions {
                            name: Some(name.to_owned()),
                            ..Default::default()
                        }),
                        spec.clone(),
                    ),
                )
                .await
            {
                Ok(c) => Ok(Created::Created(c.id)),
                Err(failed) => created(failed),
            }
        }
        .boxed()
    }

    fn start<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<bool>> {
        async move {
            match self
                .call(
                    Op::Start,
                    container,
                    self.inner.start_container(container, None),
                )
                .await
            {
                Ok(()) => Ok(true),
                Err((_, Answer::NotFound)) => Ok(false),
                Err((e, _)) => Err(e),
            }
        }
        .boxed()
    }

    fn pause<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<bool>> {
        async move {
            match self
                .call(Op::Pause, container, self.inner.pause_container(container))
                .await
            {
                // A conflict: already paused (or not running, which the next lease finds out).
                Ok(()) | Err((_, Answer::Conflict)) => Ok(true),
                Err((_, Answer::NotFound)) => Ok(false),
                Err((e, _)) => Err(e),
            }
        }
        .boxed()
    }

    fn unpause<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<bool>> {
        async move {
            match self
                .call(
                    Op::Unpause,
                    container,
                    self.inner.unpause_container(container),
                )
                .await
            {
                Ok(()) | Err((_, Answer::Conflict)) => Ok(true),
                Err((_, Answer::NotFound)) => Ok(false),
                // 20.10 answers 500 "Container ... is not paused" for a running container.
                Err((EngineError::Failed { message, .. }, _))
                    if message.contains("is not paused") =>
                {
                    Ok(true)
                }
                Err((e, _)) => Err(e),
            }
        }
        .boxed()
    }

    fn rename<'a>(
        &'a self,
        container: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, EngineResult<Renamed>> {
        async move {
            let options = bollard::query_parameters::RenameContainerOptions {
                name: name.to_owned(),
            };
            match self
                .call(
                    Op::Rename,
                    container,
                    self.inner.rename_container(container, options),
                )
                .await
            {
                Ok(()) => Ok(Renamed::Renamed),
                Err((_, Answer::Conflict)) => Ok(Renamed::NameTaken),
                Err((_, Answer::NotFound)) => Ok(Renamed::Gone),
                Err((e, _)) => Err(e),
            }
        }
        .boxed()
    }

    fn remove<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<Removed>> {
        async move {
            match self
                .call(
                    Op::Remove,
                    container,
                    self.inner.remove_container(
                        container,
                        Some(RemoveContainerOptions {
                            force: true,
                            v: true,
                            ..Default::default()
                        }),
                    ),
                )
                .await
            {
                Ok(()) => Ok(Removed::Removed),
                Err(failed) => removed(failed),
            }
        }
        .boxed()
    }

    fn list<'a>(&'a self, filter: &'a Filter) -> BoxFuture<'a, EngineResult<Vec<Listed>>> {
        async move {
            let (target, filters) = match filter {
                Filter::Labels(labels) => (
                    "with labels",
                    HashMap::from([(
                        "label".to_owned(),
                        labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                    )]),
                ),
                Filter::NameContains(s) => (
                    "by name",
                    HashMap::from([("name".to_owned(), vec![s.clone()])]),
                ),
            };
            let listed = self
                .plain(
                    Op::List,
                    target,
                    self.inner.list_containers(Some(ListContainersOptions {
                        all: true,
                        filters: Some(filters),
                        ..Default::default()
                    })),
                )
                .await?;
            Ok(listed
                .into_iter()
                .filter_map(|c| {
                    Some(Listed {
                        name: c
                            .names
                            .as_ref()?
                            .first()?
                            .trim_start_matches('/')
                            .to_owned(),
                        id: c.id.unwrap_or_default(),
                        labels: c.labels.unwrap_or_default(),
                        state: summary_state(c.state),
                    })
                })
                .collect())
        }
        .boxed()
    }

    fn log_tail<'a>(
        &'a self,
        container: &'a str,
        lines: usize,
        max_bytes: usize,
    ) -> BoxFuture<'a, EngineResult<String>> {
        async move {
            let mut stream = self.inner.logs(
                container,
                Some(LogsOptions {
                    stdout: true,
                    stderr: true,
                    tail: lines.to_string(),
                    ..Default::default()
                }),
            );
            let mut out = String::new();
            let read = tokio::time::timeout(self.timeout, async {
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| self.stream_error(Op::ReadLog, container, e))?;
                    out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
                    if out.len() > 2 * max_bytes {
                        out = crate::text::tail(&out, max_bytes);
                    }
                }
                Ok::<(), EngineError>(())
            })
            .await;
            match read {
                Ok(Ok(())) => Ok(crate::text::tail(&out, max_bytes)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(EngineError::Timeout {
                    op: Op::ReadLog,
                    target: container.to_owned(),
                    after: self.timeout,
                }),
            }
        }
        .boxed()
    }

    fn follow_log(&self, container: &str, since: SystemTime) -> LogStream {
        let since = since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()) as i32;
        let target = container.to_owned();
        let this = self.clone();
        self.inner
            .logs(
                container,
                Some(LogsOptions {
                    follow: true,
                    stdout: true,
                    stderr: true,
                    timestamps: true,
                    since,
                    ..Default::default()
                }),
            )
            .map(move |item| {
                item.map(|c| c.into_bytes().to_vec())
                    .map_err(|e| this.stream_error(Op::ReadLog, &target, e))
            })
            .boxed()
    }

    fn deaths(&self, label: &str, value: &str) -> DeathStream {
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("event".to_owned(), vec!["die".to_owned()]),
            ("label".to_owned(), vec![format!("{label}={value}")]),
        ]);
        let this = self.clone();
        let target = format!("{label}={value}");
        self.inner
            .events(Some(EventsOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .filter_map(move |item| {
                let out = match item {
                    Ok(event) => event.actor.and_then(|a| a.id).map(Ok),
                    Err(e) => Some(Err(this.stream_error(Op::Events, &target, e))),
                };
                futures_util::future::ready(out)
            })
            .boxed()
    }

    fn exec<'a>(
        &'a self,
        container: &'a str,
        spec: ExecSpec,
    ) -> BoxFuture<'a, EngineResult<ExecStart>> {
        async move {
            let created = match self
                .call(
                    Op::CreateExec,
                    container,
                    self.inner.create_exec(
                        container,
                        CreateExecOptions {
                            cmd: Some(spec.cmd),
                            user: Some(spec.user),
                            env: Some(spec.env),
                            working_dir: Some(spec.workdir),
                            attach_stdin: Some(spec.stdin),
                            attach_stdout: Some(true),
                            attach_stderr: Some(true),
                            ..Default::default()
                        },
                    ),
                )
                .await
            {
                Ok(c) => c,
                // Not there (404), or not running (409): nothing started.
                Err((_, Answer::NotFound | Answer::Conflict)) => {
                    return Ok(ExecStart::ContainerGone)
                }
                Err((e, _)) => return Err(e),
            };
            let started = match self
                .call(
                    Op::StartExec,
                    container,
                    self.inner.start_exec(&created.id, None),
                )
                .await
            {
                Ok(s) => s,
                Err((_, Answer::NotFound | Answer::Conflict)) => {
                    return Ok(ExecStart::ContainerGone)
                }
                Err((e, _)) => return Err(e),
            };
            let StartExecResults::Attached { output, input } = started else {
                return Err(EngineError::Failed {
                    op: Op::StartExec,
                    target: container.to_owned(),
                    status: None,
                    message: "the engine started the exec detached".to_owned(),
                });
            };
            let this = self.clone();
            let target = container.to_owned();
            let output = output
                .map(move |item| match item {
                    Ok(LogOutput::StdErr { message }) => Ok(Chunk::Stderr(message.to_vec())),
                    Ok(other) => Ok(Chunk::Stdout(other.into_bytes().to_vec())),
                    Err(e) => Err(this.stream_error(Op::ReadExec, &target, e)),
                })
                .boxed();
            Ok(ExecStart::Attached(Attached {
                id: created.id,
                output,
                input,
            }))
        }
        .boxed()
    }

    fn exec_state<'a>(
        &'a self,
        exec_id: &'a str,
    ) -> BoxFuture<'a, EngineResult<Option<ExecState>>> {
        async move {
            match self
                .call(Op::InspectExec, exec_id, self.inner.inspect_exec(exec_id))
                .await
            {
                Ok(i) => Ok(Some(ExecState {
                    running: i.running == Some(true),
                    exit_code: i.exit_code,
                    pid: i.pid,
                })),
                Err((_, Answer::NotFound)) => Ok(None),
                Err((e, _)) => Err(e),
            }
        }
        .boxed()
    }

    fn connect_network<'a>(
        &'a self,
        network: &'a str,
        container: &'a str,
    ) -> BoxFuture<'a, EngineResult<bool>> {
        async move {
            let request = bollard::models::NetworkConnectRequest {
                container: container.to_owned(),
                endpoint_config: None,
            };
            match self
                .call(
                    Op::ConnectNetwork,
                    container,
                    self.inner.connect_network(network, request),
                )
                .await
            {
                Ok(()) => Ok(true),
                Err((_, Answer::NotFound)) => Ok(false),
                // 20.10 answers 403 "already exists in network" for a second connect.
                Err((EngineError::Failed { message, .. }, _))
                    if message.contains("already exists in network") =>
                {
                    Ok(true)
                }
                Err((e, _)) => Err(e),
            }
        }
        .boxed()
    }

    fn attach<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<Option<Attached>>> {
        async move {
            let options = bollard::query_parameters::AttachContainerOptions {
                stdin: true,
                stdout: true,
                stderr: true,
                stream: true,
                logs: false,
                ..Default::default()
            };
            let attached = match self
                .call(
                    Op::Attach,
                    container,
                    self.inner.attach_container(container, Some(options)),
                )
                .await
            {
                Ok(a) => a,
                Err((_, Answer::NotFound | Answer::Conflict)) => return Ok(None),
                Err((e, _)) => return Err(e),
            };
            let this = self.clone();
            let target = container.to_owned();
            let output = attached
                .output
                .map(move |item| match item {
                    Ok(LogOutput::StdErr { message }) => Ok(Chunk::Stderr(message.to_vec())),
                    Ok(other) => Ok(Chunk::Stdout(other.into_bytes().to_vec())),
                    Err(e) => Err(this.stream_error(Op::Attach, &target, e)),
                })
                .boxed();
            Ok(Some(Attached {
                id: container.to_owned(),
                output,
                input: attached.input,
            }))
        }
        .boxed()
    }
}
