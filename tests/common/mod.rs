//! Shared test support: the Docker gate, unique ids, isolated pools and the cleanup guard.
//!
//! Every test gets its own pool id, network and folders, so tests run in parallel and twice in a
//! row without seeing each other. The docker CLI is used here only as an independent witness and
//! for cleanup; the product never shells out to it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use zcbot_sandbox::{Config, SandboxPool, UserId};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short id unique across tests, processes and runs.
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{tag}{:x}{n:x}{:x}", std::process::id(), nanos & 0xfff)
}

/// Runs the docker CLI (as a witness) and returns stdout; panics with stderr when it fails.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI is needed by the tests as a witness");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Like [`docker`], but returns (success, stdout, stderr) instead of panicking.
pub fn docker_try(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("docker").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// Fails the test loudly when Docker or the image is missing: these tests never skip.
pub fn require_docker() {
    let (ok, _, err) = match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Ok(o) => (
            o.status.success(),
            String::new(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        ),
        Err(e) => (false, String::new(), e.to_string()),
    };
    assert!(
        ok,
        "Docker is required by the integration tests and is not reachable ({err}). \
         Start dockerd or set DOCKER_HOST; these tests fail rather than skip."
    );
    let image =
        std::env::var("ZCBOT_SANDBOX_IMAGE").unwrap_or_else(|_| "zcbot-sandbox:latest".into());
    let (ok, _, _) = docker_try(&["image", "inspect", &image]);
    assert!(
        ok,
        "image {image} is missing: run scripts/build-image.sh (scripts/test.sh does it)"
    );
}

/// One isolated pool for one test: its own pool id, network, users and state folders. Dropping
/// it removes every container of the pool, the network and the folders, even if the test panicked.
pub struct TestPool {
    pub pool_id: String,
    pub network: String,
    pub root: PathBuf,
    pub vars: HashMap<String, String>,
    /// Extra containers (by name) and images to remove at the end.
    pub extra_containers: Vec<String>,
    pub extra_images: Vec<String>,
    /// The loop-mounted users root of [`TestPool::with_quota`]; dropped (unmounted) after the
    /// containers that use it are gone.
    pub quota_fs: Option<QuotaFs>,
}

impl TestPool {
    pub fn new(tag: &str) -> Self {
        require_docker();
        let pool_id = unique(&format!("t{tag}"));
        let network = format!("zcbt-{pool_id}");
        let root = std::env::temp_dir().join(format!("zcbot-test-{pool_id}"));
        let mut vars = HashMap::new();
        vars.insert("ZCBOT_POOL_ID".into(), pool_id.clone());
        vars.insert("ZCBOT_SANDBOX_NETWORK".into(), network.clone());
        vars.insert(
            "ZCBOT_USERS_ROOT".into(),
            root.join("users").display().to_string(),
        );
        vars.insert(
            "ZCBOT_STATE_DIR".into(),
            root.join("state").display().to_string(),
        );
        vars.insert("ZCBOT_DOCKER_TIMEOUT".into(), "60s".into());
        // Warm spares only where a test asks for them (tests/spares.rs): they are containers
        // the other tests would have to wait for and count.
        vars.insert("ZCBOT_SPARES".into(), "0".into());
        vars.insert("ZCBOT_SANDBOX_START_TIMEOUT".into(), "60s".into());
        // scripts/test.sh runs the executor and attack tests a second time under gVisor, and the
        // attack suite under each egress mode.
        for var in [
            "ZCBOT_SANDBOX_IMAGE",
            "ZCBOT_SANDBOX_RUNTIME",
            "ZCBOT_SANDBOX_EGRESS",
            "ZCBOT_EGRESS_ALLOW",
            "ZCBOT_EGRESS_IMAGE",
        ] {
            if let Ok(value) = std::env::var(var) {
                vars.insert(var.into(), value);
            }
        }
        TestPool {
            pool_id,
            network,
            root,
            vars,
            extra_containers: Vec::new(),
            extra_images: Vec::new(),
            quota_fs: None,
        }
    }

    /// Like [`TestPool::new`], with the users root on a btrfs file system of `mib` MiB made for
    /// this test: loop-mounted `nosuid,nodev`, quotas on (what RUN.md tells operators to make).
    pub fn with_quota(tag: &str, mib: u64) -> Self {
        let mut t = TestPool::new(tag);
        let fs = QuotaFs::new(&t.pool_id, mib);
        t.set(
            "ZCBOT_USERS_ROOT",
            &fs.mount.join("users").display().to_string(),
        );
        t.quota_fs = Some(fs);
        t
    }

    /// Sets one more variable for the pools this test makes.
    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.vars.insert(key.into(), value.into());
        self
    }

    pub fn config(&self) -> Config {
        Config::from_lookup(|k| self.vars.get(k).cloned()).expect("test config is valid")
    }

    /// A pool on this test's settings (a second call is like a restart of the owning process).
    pub async fn pool(&self) -> SandboxPool {
        SandboxPool::connect(self.config())
            .await
            .expect("pool connects")
    }

    pub fn user(&self, name: &str) -> UserId {
        UserId::parse(&format!("{name}-{}", self.pool_id)).unwrap()
    }

    pub fn container_name(&self, user: &UserId) -> String {
        format!("zcbot-sandbox-{}.{user}", self.pool_id)
    }

    /// Names of this pool's containers, as the docker CLI sees them (any state).
    pub fn containers(&self) -> Vec<String> {
        let out = docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=io.zcbot.pool={}", self.pool_id),
            "--format",
            "{{.Names}}",
        ]);
        let mut v: Vec<String> = out.lines().map(str::to_owned).collect();
        v.sort();
        v
    }

    /// Environment for running the CLI binary on this test's pool.
    pub fn env(&self) -> Vec<(String, String)> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        let ids = docker_try(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=io.zcbot.pool={}", self.pool_id),
        ])
        .1;
        let mut rm: Vec<String> = ids.lines().map(str::to_owned).collect();
        // The egress proxy (allowlist mode) carries its own label.
        let proxy = docker_try(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=io.zcbot.egress={}", self.pool_id),
        ])
        .1;
        rm.extend(proxy.lines().map(str::to_owned));
        rm.extend(self.extra_containers.iter().cloned());
        if !rm.is_empty() {
            let mut args = vec!["rm".to_owned(), "-f".to_owned()];
            args.extend(rm);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            docker_try(&args);
        }
        // The pool's network for each egress policy, and the host rules of each.
        for network in [
            self.network.clone(),
            format!("{}-public", self.network),
            format!("{}-egress", self.network),
        ] {
            docker_try(&["network", "rm", &network]);
            let bridge = zcbot_sandbox::pool::network::bridge_name(&network);
            let _ = zcbot_sandbox::firewall::remove(&bridge);
        }
        for image in &self.extra_images {
            docker_try(&["rmi", "-f", image]);
        }
        // Spares' workspace slots hold user folders mounted: unmounted before anything is
        // deleted (and before a quota file system is unmounted).
        zcbot_sandbox::pool::mounts::WorkspaceSlots::existing(
            &self.root.join("state"),
            &self.pool_id,
        )
        .release_all();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A btrfs file system in a sparse image file, on a loop device, mounted `nosuid,nodev` with
/// quotas enabled; unmounted and deleted on drop. Needs root and btrfs-progs (scripts/test.sh
/// installs it).
pub struct QuotaFs {
    pub mount: PathBuf,
    pub image: PathBuf,
}

fn run_ok(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} is needed by this test (scripts/test.sh installs it): {e}")
    });
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl QuotaFs {
    pub fn new(tag: &str, mib: u64) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a file system: run the suite as root (scripts/test.sh)"
        );
        let base = std::env::temp_dir().join(format!("zcbot-qfs-{tag}"));
        let _ = std::fs::create_dir_all(&base);
        let image = base.join("fs.img");
        let mount = base.join("mnt");
        std::fs::create_dir_all(&mount).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        run_ok("mkfs.btrfs", &["-q", "-f", image.to_str().unwrap()]);
        run_ok(
            "mount",
            &[
                "-o",
                "loop,nosuid,nodev",
                image.to_str().unwrap(),
                mount.to_str().unwrap(),
            ],
        );
        run_ok("btrfs", &["quota", "enable", mount.to_str().unwrap()]);
        QuotaFs { mount, image }
    }
}

impl Drop for QuotaFs {
    fn drop(&mut self) {
        let m = self.mount.to_str().unwrap().to_owned();
        // A container that just went away may hold the mount for a moment.
        let mut unmounted = false;
        for _ in 0..50 {
            if Command::new("umount")
                .arg(&m)
                .status()
                .is_ok_and(|s| s.success())
            {
                unmounted = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if !unmounted {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        if let Some(base) = self.image.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

/// Runs a command in a container through the docker CLI (the witness), as `user`.
pub fn exec_as(container: &str, user: &str, script: &str) -> (bool, String, String) {
    docker_try(&["exec", "-u", user, container, "sh", "-c", script])
}

/// Runs a shell command on the host inside the container's network namespace (the witness for
/// the container's own rules, which nothing inside the container may read in host rules mode).
pub fn netns_exec(container: &str, script: &str) -> (bool, String, String) {
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", container]);
    let out = Command::new("nsenter")
        .args(["-t", &pid, "-n", "sh", "-c", script])
        .output()
        .expect("nsenter (util-linux) is needed by the tests");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// Builds a throwaway image FROM the sandbox image with `dockerfile_tail` appended (a broken or
/// permissive entry, say), tagged for this test and removed with it. Returns the tag.
pub fn build_test_image(t: &mut TestPool, dockerfile_tail: &str) -> String {
    use std::io::Write;
    let image = format!("zcbot-sandbox-test:{}", t.pool_id);
    t.extra_images.push(image.clone());
    let mut child = Command::new("docker")
        .args(["build", "-q", "-t", &image, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dockerfile = format!("FROM zcbot-sandbox:latest\n{dockerfile_tail}");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(dockerfile.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "building {image} failed");
    image
}

/// Starts the `zcbot-sandbox serve` binary with `env` (which must set `ZCBOT_LISTEN` to a TCP
/// address) and returns it with the `host:port` it printed. Its stdout keeps being drained, so a
/// daemon whose reader went away is never tested by accident.
pub fn spawn_daemon(env: Vec<(String, String)>) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_zcbot-sandbox"))
        .arg("serve")
        .envs(env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let addr = line
        .split("listening on ")
        .nth(1)
        .unwrap_or_else(|| panic!("the daemon did not say where it listens: {line:?}"))
        .split_whitespace()
        .next()
        .unwrap()
        .trim_start_matches("http://")
        .to_owned();
    (child, addr)
}

/// Prepares this test's folders for a daemon running as nobody and returns the docker group's
/// gid, with which such a daemon still reaches the engine (`setpriv --reuid=65534 --regid=GID`).
pub fn unprivileged(t: &TestPool) -> String {
    std::fs::create_dir_all(t.root.join("users")).unwrap();
    std::fs::create_dir_all(t.root.join("state")).unwrap();
    Command::new("chmod")
        .args(["-R", "777"])
        .arg(&t.root)
        .status()
        .unwrap();
    let group = Command::new("getent")
        .args(["group", "docker"])
        .output()
        .unwrap()
        .stdout;
    String::from_utf8(group)
        .unwrap()
        .split(':')
        .nth(2)
        .expect("a docker group")
        .to_owned()
}

/// The tenant's `uid:gid` that a sandbox's processes run as (its `io.zcbot.uid` label, read with
/// the docker CLI as the witness).
pub fn tenant(container: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        "{{index .Config.Labels \"io.zcbot.uid\"}}",
        container,
    ])
}

/// The uid half of [`tenant`].
pub fn tenant_uid(container: &str) -> String {
    tenant(container)
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// One request over a fresh connection (TCP `host:port` or `unix:/path`); returns status, head
/// and body.
pub async fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<String>,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or_default();
    req.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    let response = match addr.strip_prefix("unix:") {
        Some(path) => exchange(tokio::net::UnixStream::connect(path).await.unwrap(), &req).await,
        None => {
            exchange(
                tokio::net::TcpStream::connect(addr.trim_start_matches("http://"))
                    .await
                    .unwrap(),
                &req,
            )
            .await
        }
    };
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

async fn exchange(mut s: impl AsyncRead + AsyncWrite + Unpin, req: &str) -> String {
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// [`http_with`] without extra headers.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<String>,
) -> (u16, String, String) {
    http_with(addr, method, path, body, &[]).await
}

/// Whether a finished command succeeded, with its stdout and stderr together.
pub fn combined(out: std::process::Output) -> (bool, String) {
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The daemon binary, serving the docker backend of a test's pool on a free port; stopped
/// (SIGTERM, then waited for) when dropped.
pub struct Daemon {
    pub child: std::process::Child,
    pub addr: String,
}

impl Daemon {
    pub fn start(t: &mut TestPool) -> Daemon {
        t.set("ZCBOT_SANDBOX_BACKEND", "docker")
            .set("ZCBOT_LISTEN", "127.0.0.1:0")
            .set("ZCBOT_SELF_CHECK", "0");
        let (child, addr) = spawn_daemon(t.env());
        Daemon { child, addr }
    }

    /// Calls `tool` for `user` over HTTP: the status and the JSON answer.
    pub async fn tool(
        &self,
        user: &(impl std::fmt::Display + ?Sized),
        tool: &str,
        args: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let (status, _, body) = http(
            &self.addr,
            "POST",
            &format!("/v1/users/{user}/tools/{tool}"),
            Some(args.to_string()),
        )
        .await;
        (
            status,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
        )
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The daemon's peak resident memory so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// An executor on the test's pool with the docker backend.
pub async fn docker_executor(t: &TestPool) -> zcbot_sandbox::exec::Executor {
    let mut cfg = t.config();
    cfg.backend = zcbot_sandbox::config::Backend::Docker;
    zcbot_sandbox::exec::Executor::from_config(cfg)
        .await
        .expect("docker executor")
}

/// One call of `tool` with JSON `args` for `user`, which must not fail as a call.
pub async fn call(
    ex: &zcbot_sandbox::exec::Executor,
    user: &UserId,
    tool: &str,
    args: serde_json::Value,
) -> zcbot_sandbox::exec::ToolResult {
    let call = zcbot_sandbox::exec::ToolCall::parse(tool, args).unwrap();
    ex.run(user, call, &tokio_util::sync::CancellationToken::new())
        .await
        .unwrap()
}

/// A TCP listener on the host that counts what reaches it.
pub async fn host_listener(
    ip: std::net::IpAddr,
) -> (
    u16,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let l = tokio::net::TcpListener::bind(std::net::SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    let task = tokio::spawn(async move {
        while let Ok(_c) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    // The listener is real: the host itself reaches it.
    tokio::net::TcpStream::connect((ip, port))
        .await
        .expect("host reaches its own listener");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    hits.store(0, Ordering::SeqCst);
    (port, hits, task)
}
