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

/// The pool's watch over its containers' deaths. Dropping it stops the watch.
pub(crate) struct DeathWatch {
    tokens: Arc<DashMap<String, CancellationToken>>,
    task: tokio::task::AbortHandle,
}

impl DeathWatch {
    /// Follows the `die` events of pool `pool_id`'s containers, reconnecting when the stream
    /// ends. Not on the pool's task tracker: it owns no clean-up, and shutdown need not wait
    /// for it (dropping the watch aborts it).
    pub(crate) fn start(engine: SharedEngine, pool_id: String) -> Self {
        let tokens: Arc<DashMap<String, CancellationToken>> = Arc::default();
        let watched = Arc::downgrade(&tokens);
        let task = tokio::spawn(async move {
            loop {
                let mut deaths = engine.deaths(LABEL_POOL, &pool_id);
                while let Some(item) = deaths.next().await {
                    let Some(tokens) = watched.upgrade() else {
                        return;
                    };
                    match item {
                        Ok(id) => {
                            if let Some((_, died)) = tokens.remove(&id) {
                                died.cancel();
                            }
                        }
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
        DeathWatch { tokens, task }
    }

    /// A token cancelled when container `id` dies (from the moment of this call on).
    pub(crate) fn of(&self, id: &str) -> CancellationToken {
        self.tokens.entry(id.to_owned()).or_default().clone()
    }

    /// Forgets containers that are not in `live` (removed without dying while watched).
    pub(crate) fn retain(&self, live: impl Fn(&str) -> bool) {
        self.tokens.retain(|id, _| live(id));
    }
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
