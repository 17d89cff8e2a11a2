//! Background jobs: a `shell` or stateless `run_python` call started with `background: true`
//! runs on after the request that started it has been answered, and is found again by its id.
//!
//! The registry owns each job's task, its cancel token and its live output (a ring of the latest
//! bytes of each stream, see [`super::live`]); how the call itself runs is the executor's
//! ([`super::Executor::run_live`]). Records live in the daemon's memory only: a restart forgets
//! them, and the processes they ran die with the daemon's exec channels (DESIGN.md, "Background
//! jobs"). Memory is bounded: running jobs per user, and ended records by age, per user and in
//! all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::live::{LiveOutput, Stream};
use super::session::rfc3339;
use super::ToolResult;
use crate::error::{Error, Result};
use crate::user::UserId;

/// Ended jobs kept per user (the newest), in all, and for how long.
const KEEP_ENDED_PER_USER: usize = 8;
const KEEP_ENDED: usize = 256;
const KEEP_FOR: Duration = Duration::from_secs(3600);

/// How a job's state reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Its process is running.
    Running,
    /// Its process exited (see `exit_code`).
    Exited,
    /// It ran out of its timeout; everything it started was killed.
    TimedOut,
    /// It was killed (DELETE, or the daemon shutting down).
    Killed,
    /// It could not run (see `error`).
    Failed,
}

impl JobState {
    /// How a job whose call gave `result` ended.
    pub fn of(result: &Result<ToolResult>) -> Self {
        match result {
            Ok(r) if r.timed_out => JobState::TimedOut,
            Ok(r) if r.cancelled => JobState::Killed,
            Ok(_) => JobState::Exited,
            Err(_) => JobState::Failed,
        }
    }

    /// Its name in JSON and metrics.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Exited => "exited",
            JobState::TimedOut => "timed_out",
            JobState::Killed => "killed",
            JobState::Failed => "failed",
        }
    }
}

/// A job as the API shows it. `stdout`/`stderr` are present when one job is asked for (not in
/// the listing): the latest bytes of each stream, after `*_dropped` bytes that were not kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobView {
    /// Its id.
    pub job_id: String,
    /// The tool it runs.
    pub tool: String,
    /// Running or how it ended.
    pub state: JobState,
    /// The exit status of an exited job (128+N when killed by signal N).
    pub exit_code: Option<i32>,
    /// When it started (RFC 3339, UTC).
    pub started: String,
    /// When it ended.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ended: Option<String>,
    /// How long it ran (so far).
    pub duration_ms: u64,
    /// Why a failed job could not run: `{kind, message}` as the API's errors.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    #[schema(value_type = Option<Object>)]
    pub error: Option<serde_json::Value>,
    /// The latest standard output (UTF-8; see `stdout_base64`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stdout: Option<String>,
    /// Those bytes in base64, when they are not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stdout_base64: Option<String>,
    /// Bytes of standard output printed before those kept.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stdout_dropped: Option<u64>,
    /// The latest standard error (UTF-8; see `stderr_base64`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stderr: Option<String>,
    /// Those bytes in base64, when they are not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stderr_base64: Option<String>,
    /// Bytes of standard error printed before those kept.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stderr_dropped: Option<u64>,
}

#[derive(Debug)]
struct Ended {
    at: SystemTime,
    since: Instant,
    took: Duration,
    state: JobState,
    exit_code: Option<i32>,
    error: Option<serde_json::Value>,
}

/// One background job.
#[derive(Debug)]
pub struct Job {
    id: String,
    tool: &'static str,
    started: SystemTime,
    since: Instant,
    live: Arc<LiveOutput>,
    cancel: CancellationToken,
    /// Cancelled once the job has ended and its processes are gone.
    done: CancellationToken,
    ended: Mutex<Option<Ended>>,
}

impl Job {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The tool it runs.
    pub fn tool(&self) -> &'static str {
        self.tool
    }

    /// Its live output, for a follower.
    pub fn live(&self) -> &Arc<LiveOutput> {
        &self.live
    }

    /// Resolves once the job has ended.
    pub async fn ended(&self) {
        self.done.cancelled().await
    }

    /// Whether it still runs.
    pub fn running(&self) -> bool {
        self.ended.lock().is_none()
    }

    /// Its state; with `output`, the latest output too.
    pub fn view(&self, output: bool) -> JobView {
        let ended = self.ended.lock();
        let mut v = JobView {
            job_id: self.id.clone(),
            tool: self.tool.to_owned(),
            state: ended.as_ref().map_or(JobState::Running, |e| e.state),
            exit_code: ended.as_ref().and_then(|e| e.exit_code),
            started: rfc3339(self.started),
            ended: ended.as_ref().map(|e| rfc3339(e.at)),
            duration_ms: ended
                .as_ref()
                .map_or_else(|| self.since.elapsed(), |e| e.took)
                .as_millis() as u64,
            error: ended.as_ref().and_then(|e| e.error.clone()),
            stdout: None,
            stdout_base64: None,
            stdout_dropped: None,
            stderr: None,
            stderr_base64: None,
            stderr_dropped: None,
        };
        drop(ended);
        if output {
            let (text, b64, dropped) = self.kept(Stream::Stdout);
            (v.stdout, v.stdout_base64, v.stdout_dropped) = (Some(text), b64, Some(dropped));
            let (text, b64, dropped) = self.kept(Stream::Stderr);
            (v.stderr, v.stderr_base64, v.stderr_dropped) = (Some(text), b64, Some(dropped));
        }
        v
    }

    /// A stream's kept bytes as text, without a character the ring cut in half at its start or
    /// (while the job runs) one it is printing at its end.
    fn kept(&self, stream: Stream) -> (String, Option<String>, u64) {
        let mut kept = self.live.kept(stream);
        if self.running() {
            let cut = super::output::utf8_cut_back(&kept.bytes);
            kept.bytes.truncate(cut);
        }
        if kept.dropped > 0 {
            let split = super::output::utf8_continuations(&kept.bytes);
            kept.bytes.drain(..split);
            kept.dropped += split as u64;
        }
        let (text, b64) = crate::text::to_text(&kept.bytes);
        (text, b64, kept.dropped)
    }

    fn finish(&self, result: Result<ToolResult>) {
        let state = JobState::of(&result);
        let (exit_code, error) = match result {
            Ok(r) => (r.exit_code.filter(|_| state == JobState::Exited), None),
            Err(e) => (
                None,
                Some(serde_json::json!({"kind": e.kind(), "message": e.to_string()})),
            ),
        };
        *self.ended.lock() = Some(Ended {
            at: SystemTime::now(),
            since: Instant::now(),
            took: self.since.elapsed(),
            state,
            exit_code,
            error,
        });
        self.done.cancel();
    }
}

/// Runs a job's call: given its live output and cancel token, the call's result.
pub type JobRun = Box<
    dyn FnOnce(Arc<LiveOutput>, CancellationToken) -> BoxFuture<'static, Result<ToolResult>> + Send,
>;

/// Every user's jobs.
pub struct Jobs {
    by_user: Mutex<HashMap<UserId, Vec<Arc<Job>>>>,
    max_running: usize,
    ring: usize,
    /// Parent of every job's cancel token (the daemon's shutdown cancels them all).
    parent: CancellationToken,
    tasks: TaskTracker,
}

impl Jobs {
    /// A registry allowing `max_running` running jobs per user, keeping the latest `ring` bytes
    /// of each stream of each job; `parent` cancels them all.
    pub fn new(max_running: usize, ring: usize, parent: CancellationToken) -> Self {
        Jobs {
            by_user: Mutex::new(HashMap::new()),
            max_running,
            ring,
            parent,
            tasks: TaskTracker::new(),
        }
    }

    /// The jobs' tasks: shutdown closes the tracker and waits for them.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// How many jobs run now, all users together.
    pub fn running(&self) -> usize {
        let all = self.by_user.lock();
        all.values().flatten().filter(|j| j.running()).count()
    }

    /// Starts a job of `tool` for `user` with id `id`, refused when the user has the most
    /// running jobs or a job of that id.
    pub fn start(
        &self,
        user: &UserId,
        id: String,
        tool: &'static str,
        run: JobRun,
    ) -> Result<Arc<Job>> {
        let job = {
            let mut all = self.by_user.lock();
            prune(&mut all);
            let jobs = all.entry(user.clone()).or_default();
            if jobs.iter().filter(|j| j.running()).count() >= self.max_running {
                return Err(Error::TooManyJobs {
                    user: user.to_string(),
                    max: self.max_running,
                });
            }
            if jobs.iter().any(|j| j.id == id) {
                return Err(Error::JobIdInUse {
                    user: user.to_string(),
                    id,
                });
            }
            let job = Arc::new(Job {
                id,
                tool,
                started: SystemTime::now(),
                since: Instant::now(),
                live: LiveOutput::new(self.ring),
                cancel: self.parent.child_token(),
                done: CancellationToken::new(),
                ended: Mutex::new(None),
            });
            jobs.push(job.clone());
            job
        };
        let task = run(job.live.clone(), job.cancel.clone());
        let mut running = FinishOnDrop(Some(job.clone()));
        self.tasks.spawn(async move {
            let result = task.await;
            if let Some(job) = running.0.take() {
                job.finish(result);
            }
        });
        Ok(job)
    }

    /// The user's job `id`.
    pub fn get(&self, user: &UserId, id: &str) -> Result<Arc<Job>> {
        let mut all = self.by_user.lock();
        prune(&mut all);
        all.get(user)
            .and_then(|jobs| jobs.iter().find(|j| j.id == id).cloned())
            .ok_or_else(|| Error::NoSuchJob {
                user: user.to_string(),
                id: id.chars().take(64).collect(),
            })
    }

    /// The user's jobs, oldest first, without their output.
    pub fn list(&self, user: &UserId) -> Vec<JobView> {
        let mut all = self.by_user.lock();
        prune(&mut all);
        all.get(user)
            .map(|jobs| jobs.iter().map(|j| j.view(false)).collect())
            .unwrap_or_default()
    }

    /// Kills the user's running job `id` (its whole process tree) and waits until it has
    /// ended, at most `wait`; the record of a job that has ended is then forgotten (a DELETE
    /// deletes: what it answers is the last anyone sees of the job). The job as it was last seen,
    /// still `running` (and kept) if it did not end within `wait`.
    pub async fn kill(&self, user: &UserId, id: &str, wait: Duration) -> Result<JobView> {
        let job = self.get(user, id)?;
        if job.running() {
            job.cancel.cancel();
            let _ = tokio::time::timeout(wait, job.ended()).await;
            if job.running() {
                return Ok(job.view(true));
            }
        }
        let mut all = self.by_user.lock();
        if let Some(jobs) = all.get_mut(user) {
            jobs.retain(|j| !Arc::ptr_eq(j, &job));
            if jobs.is_empty() {
                all.remove(user);
            }
        }
        Ok(job.view(true))
    }
}

/// Ends a job whose task went away without a result (it panicked, or the runtime is ending), so
/// that its record never says `running` for ever.
struct FinishOnDrop(Option<Arc<Job>>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        if let Some(job) = self.0.take() {
            job.finish(Err(Error::JobUnavailable {
                reason: "the job's task ended without a result (see the daemon's log)".into(),
            }));
        }
    }
}

/// Drops ended records: older than [`KEEP_FOR`], past [`KEEP_ENDED_PER_USER`] per user, past
/// [`KEEP_ENDED`] in all (the oldest first).
fn prune(all: &mut HashMap<UserId, Vec<Arc<Job>>>) {
    let ended_since = |j: &Arc<Job>| j.ended.lock().as_ref().map(|e| e.since);
    let mut kept = Vec::new();
    for jobs in all.values_mut() {
        jobs.retain(|j| ended_since(j).is_none_or(|t| t.elapsed() < KEEP_FOR));
        let mut ended: Vec<Instant> = jobs.iter().filter_map(ended_since).collect();
        if ended.len() > KEEP_ENDED_PER_USER {
            ended.sort_unstable();
            let cut = ended[ended.len() - KEEP_ENDED_PER_USER];
            jobs.retain(|j| ended_since(j).is_none_or(|t| t >= cut));
        }
        kept.extend(jobs.iter().filter_map(ended_since));
    }
    if kept.len() > KEEP_ENDED {
        kept.sort_unstable();
        let cut = kept[kept.len() - KEEP_ENDED];
        for jobs in all.values_mut() {
            jobs.retain(|j| ended_since(j).is_none_or(|t| t >= cut));
        }
    }
    all.retain(|_, jobs| !jobs.is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn result(exit: Option<i32>, timed_out: bool, cancelled: bool) -> ToolResult {
        ToolResult {
            tool: "shell".into(),
            exit_code: exit,
            stdout: String::new(),
            stdout_base64: None,
            stderr: String::new(),
            stderr_base64: None,
            timed_out,
            cancelled,
            truncated: Default::default(),
            duration_ms: 0,
            data: None,
            session: None,
        }
    }

    /// A job that prints, then waits for its cancel (reported as killed) or ends with `exit`.
    fn job(exit: Option<i32>) -> JobRun {
        Box::new(move |live, cancel| {
            async move {
                live.push(Stream::Stdout, "héllo ".as_bytes());
                match exit {
                    Some(code) => Ok(result(Some(code), false, false)),
                    None => {
                        cancel.cancelled().await;
                        Ok(result(None, false, true))
                    }
                }
            }
            .boxed()
        })
    }

    #[tokio::test]
    async fn limits_running_jobs_and_kills_them() {
        let jobs = Jobs::new(2, 5, CancellationToken::new());
        let alice = UserId::parse("alice").unwrap();
        let a = jobs.start(&alice, "a".into(), "shell", job(None)).unwrap();
        jobs.start(&alice, "b".into(), "shell", job(None)).unwrap();
        let third = jobs.start(&alice, "c".into(), "shell", job(Some(0)));
        assert_eq!(third.unwrap_err().kind(), "too_many_jobs");
        // Another user is not limited by alice's jobs; a duplicate id is refused.
        let bob = UserId::parse("bob").unwrap();
        let b = jobs.start(&bob, "a".into(), "shell", job(Some(3))).unwrap();
        b.ended().await;
        assert_eq!(b.view(false).exit_code, Some(3));
        let dup = jobs.start(&bob, "a".into(), "shell", job(Some(0)));
        assert_eq!(dup.unwrap_err().kind(), "call_id_in_use");
        // Bob cannot see alice's job.
        assert_eq!(jobs.get(&bob, "b").unwrap_err().kind(), "no_such_job");

        let killed = jobs
            .kill(&alice, "a", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(killed.state, JobState::Killed);
        assert!(!a.running());
        // The ring kept the last 5 bytes: the cut 'é' is not shown half, and is counted.
        assert_eq!(killed.stdout.as_deref(), Some("llo "));
        assert_eq!(killed.stdout_dropped, Some(3));
        // A slot is free again, and the killed job is gone with its DELETE.
        assert_eq!(jobs.get(&alice, "a").unwrap_err().kind(), "no_such_job");
        jobs.start(&alice, "d".into(), "shell", job(Some(0)))
            .unwrap();
        assert_eq!(jobs.list(&alice).len(), 2);
        let again = jobs.kill(&alice, "a", Duration::from_secs(5)).await;
        assert_eq!(again.unwrap_err().kind(), "no_such_job");
    }

    #[tokio::test]
    async fn ended_records_are_bounded_per_user() {
        let jobs = Jobs::new(64, 16, CancellationToken::new());
        let alice = UserId::parse("alice").unwrap();
        for i in 0..20 {
            let j = jobs
                .start(&alice, format!("j{i}"), "shell", job(Some(0)))
                .unwrap();
            j.ended().await;
        }
        let listed = jobs.list(&alice);
        assert_eq!(listed.len(), KEEP_ENDED_PER_USER);
        assert_eq!(listed.last().unwrap().job_id, "j19");
    }

    #[tokio::test]
    async fn a_failed_job_says_why() {
        let jobs = Jobs::new(1, 16, CancellationToken::new());
        let alice = UserId::parse("alice").unwrap();
        let run: JobRun = Box::new(|_, _| {
            async {
                Err(Error::JobUnavailable {
                    reason: "test".into(),
                })
            }
            .boxed()
        });
        let j = jobs.start(&alice, "x".into(), "shell", run).unwrap();
        j.ended().await;
        let v = j.view(true);
        assert_eq!(v.state, JobState::Failed);
        assert_eq!(v.error.unwrap()["kind"], "jobs_unavailable");
    }
}
