//! Stopping a call, one way for every transport and backend.
//!
//! [`drive`] waits for a call to finish until its deadline or cancel, then asks it to stop and
//! gives it the grace to do so. [`StopGuard`] covers the other way a call ends: its future
//! dropped (the caller went away). It owns the call's lease, and on drop stops the call on the
//! pool's task tracker, waits until its processes are known gone, kills harder if they are not,
//! and only then lets the lease go: the sandbox is never reaped or evicted under a call's
//! processes, whichever transport ran it.

use std::future::Future;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pool::Lease;

/// How waiting for a call ended.
#[derive(Debug)]
pub(crate) struct Ended<T> {
    /// What the call's future gave; None when it did not finish within the stop grace.
    pub(crate) value: Option<T>,
    /// Its deadline passed.
    pub(crate) timed_out: bool,
    /// It was cancelled.
    pub(crate) cancelled: bool,
}

/// Waits for `finished` for up to `timeout` or until `cancel`; then runs `stop` once and gives the
/// call `grace` more to finish.
pub(crate) async fn drive<T, S, SF>(
    finished: impl Future<Output = T>,
    timeout: Duration,
    cancel: &CancellationToken,
    grace: Duration,
    stop: S,
) -> Ended<T>
where
    S: FnOnce() -> SF,
    SF: Future<Output = ()>,
{
    tokio::pin!(finished);
    let (mut timed_out, mut cancelled) = (false, false);
    tokio::select! {
        v = &mut finished => return Ended { value: Some(v), timed_out, cancelled },
        _ = tokio::time::sleep(timeout) => timed_out = true,
        _ = cancel.cancelled() => cancelled = true,
    }
    stop().await;
    let value = tokio::time::timeout(grace, finished).await.ok();
    Ended {
        value,
        timed_out,
        cancelled,
    }
}

/// What a transport knows of one running call, to stop it.
pub(crate) trait CallStop: Send + Sync + 'static {
    /// Asks the call's supervisor to stop the call (it kills the call's subtree after the grace).
    fn stop(&self) -> BoxFuture<'_, ()>;
    /// Resolves true once the call's processes are known gone, false at `until`.
    fn wait_gone(&self, until: Instant) -> BoxFuture<'_, bool>;
    /// The call would not stop: kill its supervisor and its orphans, or recycle the sandbox.
    fn force(&self) -> BoxFuture<'_, ()>;
}

/// Owns a running call and its lease; stops the call if dropped while armed.
pub(crate) struct StopGuard<C: CallStop> {
    armed: Option<(C, Lease)>,
    grace: Duration,
    tasks: TaskTracker,
}

impl<C: CallStop> StopGuard<C> {
    /// Arms a guard over `call`: `grace` is how long a stopped call may take before `force`.
    pub(crate) fn new(call: C, lease: Lease, grace: Duration, tasks: TaskTracker) -> Self {
        StopGuard {
            armed: Some((call, lease)),
            grace,
            tasks,
        }
    }

    /// The call.
    pub(crate) fn call(&self) -> &C {
        &self.armed.as_ref().expect("armed until disarmed").0
    }

    /// The call ended under the caller's eyes: the caller takes over the call and the lease.
    pub(crate) fn disarm(mut self) -> (C, Lease) {
        self.armed.take().expect("armed until disarmed")
    }
}

impl<C: CallStop> Drop for StopGuard<C> {
    fn drop(&mut self) {
        let Some((call, lease)) = self.armed.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            // No runtime (the process is ending): the supervisor's backstop ends the call.
            return;
        }
        let grace = self.grace;
        self.tasks.spawn(async move {
            call.stop().await;
            if !call.wait_gone(Instant::now() + grace).await {
                call.force().await;
            }
            drop(lease);
        });
    }
}

/// Sends `signals` to `pid` through a pidfd, after checking that its command line is our
/// supervisor with `flag id` (`--call-id` for a call, `--serve` for a channel's helper). The pidfd
/// pins the process, so the check and the signal concern the same one.
pub(crate) fn signal_verified(pid: i32, flag: &str, id: &str, signals: &[libc::c_int]) -> bool {
    // SAFETY: pidfd_open with a pid and no flags; returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return false;
    }
    // SAFETY: fd is a fresh descriptor we own.
    let pidfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    // The first two words: the binary, or an interpreter running a replacement of it (which must
    // be killable too: it is what the daemon started).
    let ours = args.iter().take(2).any(|a| a.ends_with(b"zcbot-supervise"))
        && args
            .windows(2)
            .any(|w| w[0] == flag.as_bytes() && w[1] == id.as_bytes());
    if !ours {
        return false;
    }
    let raw = std::os::fd::AsRawFd::as_raw_fd(&pidfd);
    signals.iter().all(|s| {
        // SAFETY: pidfd_send_signal on a descriptor we own, with no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                raw,
                *s,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            ) == 0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drive_returns_a_finished_call_untouched() {
        let cancel = CancellationToken::new();
        let mut stopped = false;
        let ended = drive(
            async { 7 },
            Duration::from_secs(5),
            &cancel,
            Duration::from_secs(1),
            || {
                stopped = true;
                async {}
            },
        )
        .await;
        assert_eq!(ended.value, Some(7));
        assert!(!ended.timed_out && !ended.cancelled && !stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn drive_stops_at_the_deadline_and_waits_the_grace() {
        let cancel = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut tx = Some(tx);
        // The call finishes once asked to stop.
        let ended = drive(
            rx,
            Duration::from_secs(2),
            &cancel,
            Duration::from_secs(1),
            || {
                tx.take().unwrap().send(()).unwrap();
                async {}
            },
        )
        .await;
        assert!(ended.timed_out && !ended.cancelled);
        assert!(ended.value.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn drive_gives_up_on_a_call_that_will_not_stop() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let ended = drive(
            std::future::pending::<()>(),
            Duration::from_secs(60),
            &cancel,
            Duration::from_secs(1),
            || async {},
        )
        .await;
        assert!(ended.cancelled && !ended.timed_out);
        assert!(ended.value.is_none());
    }
}
