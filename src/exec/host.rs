//! The host backend, for development: processes run on the host as the daemon's own user, in
//! `<users_root>/<user>`. **It isolates nothing**: a call can read and write whatever the daemon's
//! user can, and reach any network. It keeps the guarantees that do not need a container: a
//! clean environment, its own session, a process-group kill on timeout and cancel, output caps,
//! and the same confined file tools.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::file_calls::FileRunner;
use super::live::Stream;
use super::output::Capture;
use super::stop::drive;
use super::{ProcessOutcome, ProcessSpec, BASE_ENV};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::files::{self, Workspace};
use crate::user::UserId;

/// Runs process calls on the host. Cheap to clone: clones share everything.
#[derive(Clone)]
pub struct HostExecutor {
    config: std::sync::Arc<Config>,
    files: std::sync::Arc<FileRunner>,
    tasks: TaskTracker,
}

impl HostExecutor {
    /// An executor with `config`'s users folder, timeouts and caps.
    pub fn new(config: Config) -> Self {
        HostExecutor {
            files: std::sync::Arc::new(FileRunner::new(
                config.file_workers,
                config.file_timeout,
                config.file_max_entries,
            )),
            config: std::sync::Arc::new(config),
            tasks: TaskTracker::new(),
        }
    }

    /// Its background tasks (a program being fed to a call, a call's output being read).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Its configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where its file calls run.
    pub fn files(&self) -> &FileRunner {
        &self.files
    }

    /// The user's folder (created if missing, owned by the daemon's user) as a workspace. Blocks.
    pub fn workspace(&self, user: &UserId) -> Result<Workspace> {
        let root = &self.config.users_root;
        std::fs::create_dir_all(root).map_err(|e| Error::io("create users root", root, e))?;
        let path = root.join(user.as_str());
        files::prepare_user_folder(&path, None)?;
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        Ok(Workspace::new(path, uid, gid))
    }

    pub(crate) async fn run(
        &self,
        user: &UserId,
        spec: ProcessSpec,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome> {
        let dir = {
            let this = self.clone();
            let user = user.clone();
            let workdir = spec.workdir.clone();
            crate::pool::blocking(move || {
                let ws = this.workspace(&user)?;
                let mut dir = ws.root().to_path_buf();
                if !workdir.is_empty() {
                    // Confined resolution: the folder must exist beneath the workspace.
                    let rel = workdir.join("/");
                    ws.open_folder(&rel)?;
                    dir = dir.join(rel);
                }
                Ok(dir)
            })
            .await?
        };
        let mut argv = spec.argv.clone();
        if spec.program.is_some() {
            argv.push("-".into()); // python3 reads the program from stdin
        }
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(BASE_ENV.iter().copied())
            .env("HOME", self.config.users_root.join(user.as_str()))
            .envs(&spec.env)
            .current_dir(&dir)
            .stdin(if spec.program.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                // Like a shell: command not found is exit 127, with the reason on stderr; a bare
                // name says which PATH it was looked for on (the call's `env` may have set it),
                // as the supervisor does in a sandbox.
                let reason = if e.kind() == std::io::ErrorKind::NotFound && !argv[0].contains('/') {
                    let path = spec.env.get("PATH").map(String::as_str).unwrap_or_else(|| {
                        BASE_ENV
                            .iter()
                            .find(|(k, _)| *k == "PATH")
                            .map_or("", |(_, v)| *v)
                    });
                    format!("not found on the call's PATH ({path})")
                } else {
                    e.to_string()
                };
                let mut stderr = Capture::new(self.config.output_cap);
                stderr
                    .push(format!("zcbot-sandbox: cannot run {}: {reason}\n", argv[0]).as_bytes());
                return Ok(ProcessOutcome {
                    exit_code: Some(127),
                    stdout: Capture::new(0).finish(),
                    stderr: stderr.finish(),
                    timed_out: false,
                    cancelled: false,
                });
            }
        };
        let pgid = Pid::from_raw(child.id().map_or(0, |p| p as i32));
        let _group = GroupGuard(pgid);
        if let (Some(program), Some(mut stdin)) = (spec.program.clone(), child.stdin.take()) {
            self.tasks.spawn(async move {
                let _ = stdin.write_all(&program).await;
            });
        }
        let cap = self.config.output_cap;
        let tap = spec.tap.as_ref();
        let out = self.tasks.spawn(capture(
            child.stdout.take(),
            Capture::tapped(cap, tap, Stream::Stdout),
        ));
        let err = self.tasks.spawn(capture(
            child.stderr.take(),
            Capture::tapped(cap, tap, Stream::Stderr),
        ));

        let grace = self.config.kill_grace;
        let ended = drive(child.wait(), spec.timeout, cancel, grace, || {
            stop_group(pgid, grace)
        })
        .await;
        // The call's processes end with the call: background leftovers too.
        stop_group(pgid, grace).await;
        let status = match ended.value {
            Some(s) => s.ok(),
            None => child.wait().await.ok(),
        };
        let (timed_out, cancelled) = (ended.timed_out, ended.cancelled);
        // An escaped (setsid) descendant may still hold a pipe: bound the wait for the output.
        let grace = self.config.kill_grace + Duration::from_millis(500);
        let stdout = tokio::time::timeout(grace, out)
            .await
            .ok()
            .and_then(|r| r.ok());
        let stderr = tokio::time::timeout(grace, err)
            .await
            .ok()
            .and_then(|r| r.ok());
        let exit_code = status.and_then(|s| {
            use std::os::unix::process::ExitStatusExt;
            s.code().or_else(|| s.signal().map(|n| 128 + n))
        });
        Ok(ProcessOutcome {
            exit_code,
            stdout: stdout.unwrap_or_else(|| Capture::new(0)).finish(),
            stderr: stderr.unwrap_or_else(|| Capture::new(0)).finish(),
            timed_out,
            cancelled,
        })
    }
}

async fn capture(stream: Option<impl AsyncRead + Unpin>, mut c: Capture) -> Capture {
    let Some(mut stream) = stream else { return c };
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        c.push(&buf[..n]);
    }
    c
}

/// SIGTERM to the group, then SIGKILL after `grace` if any member is left.
async fn stop_group(pgid: Pid, grace: Duration) {
    if pgid.as_raw() <= 0 || killpg(pgid, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        // Signal 0 probes whether any member of the group is left.
        if killpg(pgid, None).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = killpg(pgid, Signal::SIGKILL);
}

/// Kills the call's process group if the future running it is dropped.
struct GroupGuard(Pid);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.0.as_raw() > 0 {
            let _ = killpg(self.0, Signal::SIGKILL);
        }
    }
}
