//! [`FakeEngine`]: an in-memory [`Engine`] for tests of everything above the engine (admission,
//! the pool's state machine, the executor's retry policy, the routes) without dockerd.
//!
//! Containers are records: `start` marks one running and logs the line the test gave as the
//! entry's, `exec` answers through a handler the test sets. Faults are injected by name: a
//! failing operation, a container that vanishes behind the pool's back, an entry that never
//! reports ready. Every call is counted, so a test can show that bad input reached no engine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use parking_lot::Mutex;

use super::{
    Attached, Chunk, Container, ContainerSpec, Created, DeathStream, Engine, EngineError,
    EngineResult, ExecSpec, ExecStart, ExecState, Filter, Listed, LogStream, Network, NetworkSpec,
    Op, Removed, Renamed, Run, Runtimes, State,
};

/// What a fake exec does: given its spec, its exit status and output.
pub type ExecHandler = Arc<dyn Fn(&ExecSpec) -> (i64, Vec<u8>, Vec<u8>) + Send + Sync>;

/// An in-memory engine. Cheap to clone: clones share the same state.
#[derive(Clone)]
pub struct FakeEngine {
    state: Arc<Mutex<World>>,
    calls: Arc<AtomicU64>,
}

struct Record {
    id: String,
    name: String,
    labels: HashMap<String, String>,
    state: State,
    run: Option<Run>,
    /// When it last stopped.
    finished: Option<SystemTime>,
    /// Its log lines, stamped.
    log: Vec<(SystemTime, String)>,
}

#[derive(Default)]
struct World {
    images: HashMap<String, String>,
    /// Runtimes registered besides `runc`.
    runtimes: Vec<String>,
    networks: Vec<Network>,
    containers: Vec<Record>,
    execs: HashMap<String, ExecState>,
    next_id: u64,
    failing: Vec<Op>,
    entry_line: Option<String>,
    handler: Option<ExecHandler>,
    created: u64,
    removed: u64,
}

impl World {
    fn id(&mut self) -> String {
        self.next_id += 1;
        format!("{:064x}", self.next_id)
    }

    fn find(&self, key: &str) -> Option<usize> {
        self.containers
            .iter()
            .position(|c| c.name == key || c.id == key)
    }

    fn fail(&self, op: Op, target: &str) -> EngineResult<()> {
        if self.failing.contains(&op) {
            return Err(EngineError::Failed {
                op,
                target: target.to_owned(),
                status: Some(500),
                message: "injected by the fake engine".to_owned(),
            });
        }
        Ok(())
    }
}

impl Default for FakeEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeEngine {
    /// An empty engine with no images, networks or containers.
    pub fn new() -> Self {
        FakeEngine {
            state: Arc::new(Mutex::new(World::default())),
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Makes `image` present.
    pub fn add_image(&self, image: &str) {
        let mut w = self.state.lock();
        let id = format!("sha256:{}", w.id());
        w.images.insert(image.to_owned(), id);
    }

    /// Registers the runtime `name` (the engine always has `runc`).
    pub fn add_runtime(&self, name: &str) {
        self.state.lock().runtimes.push(name.to_owned());
    }

    /// Makes every call of `op` fail (until [`FakeEngine::heal`]).
    pub fn fail(&self, op: Op) {
        self.state.lock().failing.push(op);
    }

    /// Ends every injected failure.
    pub fn heal(&self) {
        self.state.lock().failing.clear();
    }

    /// What a container's entry prints when it starts (None: nothing, an entry that never
    /// reports ready).
    pub fn entry_line(&self, line: Option<&str>) {
        self.state.lock().entry_line = line.map(str::to_owned);
    }

    /// Sets what execs do (default: exit 0, no output).
    pub fn on_exec(&self, handler: ExecHandler) {
        self.state.lock().handler = Some(handler);
    }

    /// Removes a container behind the pool's back.
    pub fn vanish(&self, name: &str) {
        let mut w = self.state.lock();
        if let Some(i) = w.find(name) {
            w.containers.remove(i);
        }
    }

    /// Stops a container behind the pool's back (its entry exits).
    pub fn stop(&self, name: &str) {
        let mut w = self.state.lock();
        if let Some(i) = w.find(name) {
            let c = &mut w.containers[i];
            c.state = State::Exited;
            c.run = None;
            c.finished = Some(SystemTime::now());
        }
    }

    /// The names of the containers that exist, and whether each runs.
    pub fn containers(&self) -> Vec<(String, bool)> {
        let w = self.state.lock();
        let mut v: Vec<_> = w
            .containers
            .iter()
            .map(|c| (c.name.clone(), c.state == State::Running))
            .collect();
        v.sort();
        v
    }

    /// How many containers were created and removed since the start.
    pub fn churn(&self) -> (u64, u64) {
        let w = self.state.lock();
        (w.created, w.removed)
    }

    /// How many calls reached the engine.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn enter(&self) -> parking_lot::MutexGuard<'_, World> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.state.lock()
    }

    /// Pause or unpause: a container in state `from` goes to `to`; one in `to` stays.
    fn freeze(&self, op: Op, container: &str, from: State, to: State) -> EngineResult<bool> {
        let mut w = self.enter();
        w.fail(op, container)?;
        Ok(match w.find(container) {
            Some(i) => {
                let c = &mut w.containers[i];
                if c.state == from {
                    c.state = to;
                }
                true
            }
            None => false,
        })
    }
}

fn ready(f: impl FnOnce() -> EngineResult<()>) -> BoxFuture<'static, EngineResult<()>> {
    futures_util::future::ready(f()).boxed()
}

impl Engine for FakeEngine {
    fn host(&self) -> &str {
        "fake://engine"
    }

    fn api_version(&self) -> String {
        "1.41".to_owned()
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(5)
    }

    fn ping(&self) -> BoxFuture<'_, EngineResult<()>> {
        let w = self.enter();
        let r = w.fail(Op::Ping, "fake");
        ready(|| r)
    }

    fn deaths(&self, _label: &str, _value: &str) -> DeathStream {
        // The fake's containers die only when a test says so, and its tests do not follow them.
        futures_util::stream::pending().boxed()
    }

    fn runtimes(&self) -> BoxFuture<'_, EngineResult<Runtimes>> {
        let w = self.enter();
        let r = w.fail(Op::Info, "fake").map(|()| {
            let mut names = w.runtimes.clone();
            names.push("runc".to_owned());
            names.sort();
            Runtimes {
                names,
                default: Some("runc".to_owned()),
            }
        });
        futures_util::future::ready(r).boxed()
    }

    fn image_id<'a>(&'a self, image: &'a str) -> BoxFuture<'a, EngineResult<Option<String>>> {
        let w = self.enter();
        let r = w
            .fail(Op::InspectImage, image)
            .map(|()| w.images.get(image).cloned());
        futures_util::future::ready(r).boxed()
    }

    fn networks_named<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<Vec<Network>>> {
        let w = self.enter();
        let r = w.fail(Op::ListNetworks, name).map(|()| {
            w.networks
                .iter()
                .filter(|n| n.name == name)
                .cloned()
                .collect()
        });
        futures_util::future::ready(r).boxed()
    }

    fn create_network<'a>(&'a self, spec: &'a NetworkSpec) -> BoxFuture<'a, EngineResult<Created>> {
        let mut w = self.enter();
        let r = w.fail(Op::CreateNetwork, &spec.name).map(|()| {
            if w.networks.iter().any(|n| n.name == spec.name) {
                return Created::NameTaken;
            }
            let id = w.id();
            w.networks.push(Network {
                id: id.clone(),
                name: spec.name.clone(),
                driver: "bridge".to_owned(),
                internal: spec.internal,
                options: spec.options.clone(),
                subnets: vec![("172.31.0.0/16".to_owned(), Some("172.31.0.1".to_owned()))],
                created: Some(SystemTime::now()),
                labels: spec.labels.clone(),
            });
            Created::Created(id)
        });
        futures_util::future::ready(r).boxed()
    }

    fn remove_network<'a>(&'a self, id: &'a str) -> BoxFuture<'a, EngineResult<Removed>> {
        let mut w = self.enter();
        let r = w.fail(Op::RemoveNetwork, id).map(|()| {
            let before = w.networks.len();
            w.networks.retain(|n| n.id != id);
            if w.networks.len() < before {
                Removed::Removed
            } else {
                Removed::Gone
            }
        });
        futures_util::future::ready(r).boxed()
    }

    fn inspect<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<Option<Container>>> {
        let w = self.enter();
        let r = w.fail(Op::Inspect, container).map(|()| {
            w.find(container).map(|i| {
                let c = &w.containers[i];
                Container {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    labels: c.labels.clone(),
                    state: c.state,
                    run: c.run.clone(),
                    exit_code: (c.state == State::Exited).then_some(0),
                    error: None,
                    oom_killed: false,
                    addresses: HashMap::new(),
                }
            })
        });
        futures_util::future::ready(r).boxed()
    }

    fn create<'a>(
        &'a self,
        name: &'a str,
        spec: &'a ContainerSpec,
    ) -> BoxFuture<'a, EngineResult<Created>> {
        let mut w = self.enter();
        let r = w.fail(Op::Create, name).map(|()| {
            if w.find(name).is_some() {
                return Created::NameTaken;
            }
            let id = w.id();
            w.created += 1;
            w.containers.push(Record {
                id: id.clone(),
                name: name.to_owned(),
                labels: spec.labels.clone().unwrap_or_default(),
                state: State::Created,
                run: None,
                finished: None,
                log: Vec::new(),
            });
            Created::Created(id)
        });
        futures_util::future::ready(r).boxed()
    }

    fn start<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<bool>> {
        let mut w = self.enter();
        let line = w.entry_line.clone();
        let r = w.fail(Op::Start, container).map(|()| {
            let Some(i) = w.find(container) else {
                return false;
            };
            let c = &mut w.containers[i];
            if c.state != State::Running {
                let now = SystemTime::now();
                c.state = State::Running;
                c.run = Some(Run {
                    started_at: now,
                    previous_end: c.finished,
                    pid: 0,
                });
                if let Some(line) = line {
                    c.log.push((now, line));
                }
            }
            true
        });
        futures_util::future::ready(r).boxed()
    }

    fn pause<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<bool>> {
        futures_util::future::ready(self.freeze(
            Op::Pause,
            container,
            State::Running,
            State::Paused,
        ))
        .boxed()
    }

    fn unpause<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<bool>> {
        futures_util::future::ready(self.freeze(
            Op::Unpause,
            container,
            State::Paused,
            State::Running,
        ))
        .boxed()
    }

    fn rename<'a>(
        &'a self,
        container: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, EngineResult<Renamed>> {
        let mut w = self.enter();
        let r = w.fail(Op::Rename, container).map(|()| {
            if w.containers.iter().any(|c| c.name == name) {
                return Renamed::NameTaken;
            }
            match w.find(container) {
                Some(i) => {
                    w.containers[i].name = name.to_owned();
                    Renamed::Renamed
                }
                None => Renamed::Gone,
            }
        });
        futures_util::future::ready(r).boxed()
    }

    fn remove<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<Removed>> {
        let mut w = self.enter();
        let r = w
            .fail(Op::Remove, container)
            .map(|()| match w.find(container) {
                Some(i) => {
                    w.containers.remove(i);
                    w.removed += 1;
                    Removed::Removed
                }
                None => Removed::Gone,
            });
        futures_util::future::ready(r).boxed()
    }

    fn list<'a>(&'a self, filter: &'a Filter) -> BoxFuture<'a, EngineResult<Vec<Listed>>> {
        let w = self.enter();
        let r = w.fail(Op::List, "fake").map(|()| {
            w.containers
                .iter()
                .filter(|c| match filter {
                    Filter::Labels(l) => l.iter().all(|(k, v)| c.labels.get(k) == Some(v)),
                    Filter::NameContains(s) => c.name.contains(s.as_str()),
                })
                .map(|c| Listed {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    labels: c.labels.clone(),
                    state: c.state,
                })
                .collect()
        });
        futures_util::future::ready(r).boxed()
    }

    fn log_tail<'a>(
        &'a self,
        container: &'a str,
        lines: usize,
        max_bytes: usize,
    ) -> BoxFuture<'a, EngineResult<String>> {
        let w = self.enter();
        let r = w.fail(Op::ReadLog, container).map(|()| {
            let log: String = w
                .find(container)
                .map(|i| {
                    let l = &w.containers[i].log;
                    l[l.len().saturating_sub(lines)..]
                        .iter()
                        .map(|(_, s)| format!("{s}\n"))
                        .collect()
                })
                .unwrap_or_default();
            crate::text::tail(&log, max_bytes)
        });
        futures_util::future::ready(r).boxed()
    }

    fn follow_log(&self, container: &str, since: SystemTime) -> LogStream {
        let w = self.enter();
        if let Err(e) = w.fail(Op::ReadLog, container) {
            return futures_util::stream::iter([Err(e)]).boxed();
        }
        let (lines, running) = match w.find(container) {
            None => (Vec::new(), false),
            Some(i) => {
                let c = &w.containers[i];
                let since = since - Duration::from_secs(1);
                let lines: Vec<EngineResult<Vec<u8>>> = c
                    .log
                    .iter()
                    .filter(|(t, _)| *t >= since)
                    .map(|(t, s)| {
                        Ok(format!("{} {s}\n", humantime::format_rfc3339_nanos(*t)).into_bytes())
                    })
                    .collect();
                (lines, c.state == State::Running)
            }
        };
        let stream = futures_util::stream::iter(lines);
        if running {
            // Followed: a running container's log stays open.
            stream.chain(futures_util::stream::pending()).boxed()
        } else {
            stream.boxed()
        }
    }

    fn exec<'a>(
        &'a self,
        container: &'a str,
        spec: ExecSpec,
    ) -> BoxFuture<'a, EngineResult<ExecStart>> {
        let mut w = self.enter();
        let r = w.fail(Op::CreateExec, container).map(|()| {
            let running = w
                .find(container)
                .is_some_and(|i| w.containers[i].state == State::Running);
            if !running {
                return ExecStart::ContainerGone;
            }
            let (code, out, err) = match &w.handler {
                Some(h) => h(&spec),
                None => (0, Vec::new(), Vec::new()),
            };
            let id = w.id();
            w.execs.insert(
                id.clone(),
                ExecState {
                    running: false,
                    exit_code: Some(code),
                    pid: None,
                },
            );
            let mut chunks = Vec::new();
            if !out.is_empty() {
                chunks.push(Ok(Chunk::Stdout(out)));
            }
            if !err.is_empty() {
                chunks.push(Ok(Chunk::Stderr(err)));
            }
            ExecStart::Attached(Attached {
                id,
                output: futures_util::stream::iter(chunks).boxed(),
                input: Box::pin(tokio::io::sink()),
            })
        });
        futures_util::future::ready(r).boxed()
    }

    fn exec_state<'a>(
        &'a self,
        exec_id: &'a str,
    ) -> BoxFuture<'a, EngineResult<Option<ExecState>>> {
        let w = self.enter();
        let r = w
            .fail(Op::InspectExec, exec_id)
            .map(|()| w.execs.get(exec_id).copied());
        futures_util::future::ready(r).boxed()
    }

    fn connect_network<'a>(
        &'a self,
        network: &'a str,
        container: &'a str,
    ) -> BoxFuture<'a, EngineResult<bool>> {
        let w = self.enter();
        let r = w
            .fail(Op::ConnectNetwork, network)
            .map(|()| w.find(container).is_some());
        futures_util::future::ready(r).boxed()
    }

    /// The fake has no processes to talk to: attaching finds nothing.
    fn attach<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<Option<Attached>>> {
        let w = self.enter();
        let r = w.fail(Op::Attach, container).map(|()| None);
        futures_util::future::ready(r).boxed()
    }
}
