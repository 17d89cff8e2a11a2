//! File tool calls run on the host, against trees a tenant built: each on tokio's blocking pool,
//! never on an async worker, at most `ZCBOT_FILE_WORKERS` at once and at most
//! [`PER_USER`] per user, under a deadline (`ZCBOT_FILE_TIMEOUT`) and an entry budget that the
//! work checks at every entry, and that cancel (or dropping the call) stops. So a tenant's file
//! calls cannot delay another tenant's calls, `/healthz`, or the runtime itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::files::Budget;
use crate::user::UserId;

/// File calls one user may have running at once; more wait for their turn (within their deadline).
pub const PER_USER: usize = 2;
/// How long a stopped call's work may take to notice the stop before the call returns anyway
/// (the work then finishes in the background, still holding its worker).
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Runs file calls off the async workers, bounded in all and per user.
pub struct FileRunner {
    workers: Arc<Semaphore>,
    per_user: DashMap<UserId, Arc<Semaphore>>,
    timeout: Duration,
    max_entries: u64,
}

/// How much lower a file call's thread runs than the daemon's own: under a flood of file calls
/// the CPU goes to the async workers (every other call, `/healthz`) first.
const NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority while alive, and restores it after (the
/// blocking pool's threads are reused by other work).
struct Niced(Option<i32>);

impl Niced {
    fn lower(by: i32) -> Self {
        // SAFETY: gettid and getpriority/setpriority on this thread only, with plain integers.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            *libc::__errno_location() = 0;
            let old = libc::getpriority(libc::PRIO_PROCESS, tid);
            if *libc::__errno_location() != 0 {
                return Niced(None);
            }
            if libc::setpriority(libc::PRIO_PROCESS, tid, (old + by).min(19)) != 0 {
                return Niced(None);
            }
            Niced(Some(old))
        }
    }
}

impl Drop for Niced {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            // SAFETY: as in `lower`. Raising it back needs CAP_SYS_NICE (a root daemon has it);
            // without it the thread stays lower, which only slows later blocking work.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, old);
            }
        }
    }
}

/// Forgets a user's semaphore when a call ends and no other holds it.
struct ForgetIdle<'a>(&'a FileRunner, &'a UserId);

impl Drop for ForgetIdle<'_> {
    fn drop(&mut self) {
        self.0.forget_idle(self.1);
    }
}

/// Sets the cancel flag when the call's future ends early (dropped: the client went away).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl FileRunner {
    /// A runner with `workers` blocking workers for all users, each call given `timeout` and
    /// `max_entries`.
    pub fn new(workers: usize, timeout: Duration, max_entries: u64) -> Self {
        FileRunner {
            workers: Arc::new(Semaphore::new(workers)),
            per_user: DashMap::new(),
            timeout,
            max_entries,
        }
    }

    /// Runs `work` for `user` on the blocking pool with a fresh budget. A call that is cancelled
    /// or out of time ends with [`Error::FileStopped`] (what the work did stands).
    pub async fn run<T: Send + 'static>(
        &self,
        user: &UserId,
        path: &str,
        cancel: &CancellationToken,
        work: impl FnOnce(&mut Budget) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let mut budget = Budget::new(self.timeout, self.max_entries);
        let flag = budget.cancel_flag();
        let _stop_on_drop = StopOnDrop(flag.clone());
        let deadline = tokio::time::Instant::now() + self.timeout;
        let stopped = |cancelled: bool, progress: &str| Error::FileStopped {
            path: path.chars().take(256).collect(),
            cancelled,
            after: self.timeout,
            progress: progress.to_owned(),
        };
        // Declared before `mine`, so it runs after `mine` is dropped, however the call ends.
        let _forget = ForgetIdle(self, user);
        let mine = self
            .per_user
            .entry(user.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(PER_USER)))
            .clone();
        let permits = tokio::select! {
            p = async {
                let a = mine.clone().acquire_owned().await;
                let b = self.workers.clone().acquire_owned().await;
                (a, b)
            } => p,
            _ = cancel.cancelled() => return Err(stopped(true, "it was waiting for a file worker")),
            _ = tokio::time::sleep_until(deadline) => {
                return Err(stopped(false, "it was waiting for a file worker"))
            }
        };
        drop(mine);
        let task = tokio::task::spawn_blocking(move || {
            let _permits = permits;
            let _nice = Niced::lower(NICE);
            work(&mut budget)
        });
        tokio::pin!(task);
        let joined = tokio::select! {
            r = &mut task => Some(r),
            _ = cancel.cancelled() => None,
            _ = tokio::time::sleep_until(deadline + STOP_WAIT) => None,
        };
        let joined = match joined {
            Some(r) => r,
            None => {
                flag.store(true, Ordering::Relaxed);
                match tokio::time::timeout(STOP_WAIT, &mut task).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(user = %user, "a file call did not notice its stop in time; it finishes in the background");
                        return Err(stopped(cancel.is_cancelled(), "it was still working"));
                    }
                }
            }
        };
        joined.unwrap_or_else(|e| {
            Err(Error::io(
                "run a file call",
                "-",
                std::io::Error::other(format!("the file call's worker failed: {e}")),
            ))
        })
    }

    /// Drops a user's semaphore once no call holds it, so the map does not grow with every user
    /// ever seen.
    fn forget_idle(&self, user: &UserId) {
        self.per_user
            .remove_if(user, |_, s| Arc::strong_count(s) == 1);
    }
}
