//! The calls in flight, by user and call id, so that a cancel can find its call.
//!
//! A client that sends a call and then its cancel on another connection cannot know which one the
//! daemon reads first: a cancel that finds nothing waits [`CANCEL_WAIT`] for a call of that id to
//! arrive before it answers 404, so the sequence RUN.md shows works as pasted.

use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::user::UserId;

/// How long a cancel waits for the call it names to arrive.
pub(super) const CANCEL_WAIT: Duration = Duration::from_secs(2);

/// Calls in flight: ids are per user, so one user can neither find nor cancel another's call, and
/// two users may use the same id at once.
#[derive(Default)]
pub(super) struct Calls {
    map: DashMap<(UserId, String), CancellationToken>,
    /// Woken at each new call, for the cancels waiting for theirs.
    started: Notify,
}

impl Calls {
    /// Registers a call; false if the user has one of that id in flight already.
    pub(super) fn insert(&self, user: &UserId, id: &str, cancel: CancellationToken) -> bool {
        match self.map.entry((user.clone(), id.to_owned())) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(v) => {
                v.insert(cancel);
                self.started.notify_waiters();
                true
            }
        }
    }

    /// Forgets a call that ended.
    pub(super) fn remove(&self, user: &UserId, id: &str) {
        self.map.remove(&(user.clone(), id.to_owned()));
    }

    /// The call's token: at once if it is in flight, else as soon as it arrives within `wait`.
    pub(super) async fn find(
        &self,
        user: &UserId,
        id: &str,
        wait: Duration,
    ) -> Option<CancellationToken> {
        let key = (user.clone(), id.to_owned());
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Armed before the look, so a call registered in between still wakes this cancel.
            let started = self.started.notified();
            tokio::pin!(started);
            started.as_mut().enable();
            if let Some(token) = self.map.get(&key) {
                return Some(token.clone());
            }
            if tokio::time::timeout_at(deadline, started).await.is_err() {
                return None;
            }
        }
    }

    /// How many calls are in flight.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is.
    pub(super) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancel_sent_before_its_call_finds_it_when_it_arrives() {
        let calls = std::sync::Arc::new(Calls::default());
        let alice = UserId::parse("alice").unwrap();
        let waiting = {
            let calls = calls.clone();
            let alice = alice.clone();
            tokio::spawn(async move { calls.find(&alice, "c1", Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let token = CancellationToken::new();
        assert!(calls.insert(&alice, "c1", token.clone()));
        let found = waiting.await.unwrap().expect("the late call is found");
        found.cancel();
        assert!(token.is_cancelled());
        // An id in use is refused; another user's same id is not.
        assert!(!calls.insert(&alice, "c1", CancellationToken::new()));
        let bob = UserId::parse("bob").unwrap();
        assert!(calls.insert(&bob, "c1", CancellationToken::new()));
        assert_eq!(calls.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_for_no_call_gives_up_after_the_wait() {
        let calls = Calls::default();
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        // Another user's call of that id wakes the wait but is not the one it is for.
        calls.insert(&bob, "c1", CancellationToken::new());
        let started = tokio::time::Instant::now();
        assert!(calls.find(&alice, "c1", CANCEL_WAIT).await.is_none());
        assert!(started.elapsed() >= CANCEL_WAIT);
        calls.remove(&bob, "c1");
        assert!(calls.is_empty());
    }
}
