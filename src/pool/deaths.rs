//! Which of the pool's containers died, as the engine reports it, so a call running in one ends
//! at once instead of at its timeout.
//!
//! Under runc a container's death closes its exec streams, but under gVisor (runsc) a sandbox
//! killed whole (its memory limit reached: the host's OOM killer takes the sandbox kernel) leaves
//! the attached exec streams open. One `die` event stream per pool tells every call in a
//! container that it is gone.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::spec::LABEL_POOL;
use crate::engine::SharedEngine;

/// How long to wait before following the engine's events again after the stream ended.
const RECONNECT: Duration = Duration::from_secs(1);

struct Watched {
    tokens: DashMap<String, CancellationToken>,
    /// Every death, for whoever keeps per-container state above the pool (the channels).
    told: tokio::sync::broadcast::Sender<String>,
}

impl Watched {
    fn died(&self, id: String) {
        if let Some((_, died)) = self.tokens.remove(&id) {
            died.cancel();
        }
        // No listener is fine.
        let _ = self.told.send(id);
    }
}

/// The pool's watch over its containers' deaths. Dropping it stops the watch.
pub(crate) struct DeathWatch {
    watched: Arc<Watched>,
    task: tokio::task::AbortHandle,
}

impl DeathWatch {
    /// Follows the `die` events of pool `pool_id`'s containers, reconnecting when the stream
    /// ends. Not on the pool's task tracker: it owns no clean-up, and shutdown need not wait
    /// for it (dropping the watch aborts it).
    pub(crate) fn start(engine: SharedEngine, pool_id: String) -> Self {
        let shared = Arc::new(Watched {
            tokens: DashMap::new(),
            told: tokio::sync::broadcast::channel(256).0,
        });
        let watched = Arc::downgrade(&shared);
        let task = tokio::spawn(async move {
            loop {
                let mut deaths = engine.deaths(LABEL_POOL, &pool_id);
                while let Some(item) = deaths.next().await {
                    let Some(shared) = watched.upgrade() else {
                        return;
                    };
                    match item {
                        Ok(id) => shared.died(id),
                        Err(e) => {
                            tracing::warn!(error = %e, "following the engine's container events failed; following again");
                            break;
                        }
                    }
                }
                if watched.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(RECONNECT).await;
            }
        })
        .abort_handle();
        DeathWatch {
            watched: shared,
            task,
        }
    }

    /// A token cancelled when container `id` dies (from the moment of this call on: a container
    /// restarted keeps its id, so a death before it is not held against it).
    pub(crate) fn of(&self, id: &str) -> CancellationToken {
        self.watched
            .tokens
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    /// The ids of the pool's containers as they die, from now on (a listener that falls behind
    /// skips the oldest).
    pub(crate) fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.watched.told.subscribe()
    }

    /// Forgets the tokens of containers not in `live` once there are more than `bound`: each
    /// goes at its container's death, so only deaths missed while the stream reconnected pile up,
    /// and a call still waiting on a dropped token ends at its timeout as before.
    pub(crate) fn retain(&self, bound: usize, live: impl Fn(&str) -> bool) {
        if self.watched.tokens.len() > bound {
            self.watched.tokens.retain(|id, _| live(id));
        }
    }
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
