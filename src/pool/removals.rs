//! Who removed a sandbox, for the call its removal ends: one small file per container under
//! `<state_dir>/<pool_id>/removed/<container id>` holding the remover's words, written just
//! before the removal and read (and deleted) by the call that the container's death ends.
//!
//! On disk, not in memory, because the remover is often another process: `zcbot-sandbox rm`
//! beside the daemon whose call it ends. A note nobody reads (no call was running) is pruned
//! once older than [`KEEP`].

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};

/// How long an unread note is kept: a call learns of its container's death within seconds.
const KEEP: Duration = Duration::from_secs(600);

/// The length of a container id.
const ID_LEN: usize = 64;

/// Who removed a sandbox, in the words the ended call's error gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remover {
    /// A request to remove the user's sandbox: the API's `DELETE /v1/users/{user}/sandbox`.
    Request,
    /// An operator on the host: `zcbot-sandbox rm --user`.
    Operator,
    /// Every sandbox of the pool at once: `zcbot-sandbox rm --all`, `down`, or a daemon's
    /// `--remove-on-exit`.
    Everything,
    /// The idle reaper (a `zcbot-sandbox reap` beside a daemon cannot see the daemon's calls).
    Reaper,
}

impl Remover {
    /// Completes "the sandbox was removed ...".
    pub fn words(self) -> &'static str {
        match self {
            Remover::Request => "through the API (DELETE /v1/users/USER/sandbox)",
            Remover::Operator => "by an operator (zcbot-sandbox rm)",
            Remover::Everything => {
                "with every sandbox of the pool (zcbot-sandbox rm --all or down, or a daemon's \
                 --remove-on-exit)"
            }
            Remover::Reaper => {
                "by the idle reaper (a zcbot-sandbox reap beside the daemon cannot see its calls)"
            }
        }
    }
}

/// The folder of one pool's removal notes.
#[derive(Debug, Clone)]
pub struct RemovalLog {
    dir: PathBuf,
}

impl RemovalLog {
    /// Opens (creating if needed) the notes folder of pool `pool_id` under `state_dir`.
    pub fn open(state_dir: &Path, pool_id: &str) -> Result<Self> {
        let dir = state_dir.join(pool_id).join("removed");
        fs::create_dir_all(&dir).map_err(|e| Error::io("create state folder", &dir, e))?;
        Ok(RemovalLog { dir })
    }

    /// Notes that container `id` is being removed by `by`. Best effort: a removal never fails
    /// for its note (the call then says only that its sandbox went away). Prunes old notes.
    pub fn record(&self, id: &str, by: Remover) {
        if !super::is_lower_hex(id, ID_LEN) {
            return;
        }
        let now = SystemTime::now();
        for old in super::hex_names_in(&self.dir, ID_LEN) {
            let path = self.dir.join(&old);
            let stale = fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > KEEP);
            if stale {
                let _ = fs::remove_file(path);
            }
        }
        if let Err(e) = fs::write(self.dir.join(id), by.words()) {
            tracing::debug!(error = %e, "could not note who removed a sandbox");
        }
    }

    /// Whether a note says container `id` was removed (it stays for [`RemovalLog::take`]).
    pub fn noted(&self, id: &str) -> bool {
        super::is_lower_hex(id, ID_LEN) && self.dir.join(id).exists()
    }

    /// Who removed container `id`, if a note says so; the note is deleted.
    pub fn take(&self, id: &str) -> Option<String> {
        if !super::is_lower_hex(id, ID_LEN) {
            return None;
        }
        let path = self.dir.join(id);
        let text = fs::read(&path).ok()?;
        let _ = fs::remove_file(&path);
        // Our notes are short: anything else is not one.
        (text.len() <= 256)
            .then(|| String::from_utf8(text).ok())
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_is_read_once_by_id_and_old_ones_are_pruned() {
        let root = std::env::temp_dir().join(format!("zcbot-removals-{}", std::process::id()));
        let log = RemovalLog::open(&root, "p").unwrap();
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        log.record(&a, Remover::Operator);
        assert!(log.noted(&a) && !log.noted(&b), "a look leaves the note");
        assert_eq!(log.take(&b), None);
        assert_eq!(log.take(&a).as_deref(), Some(Remover::Operator.words()));
        assert_eq!(log.take(&a), None, "read once");
        assert!(!log.noted(&a));
        // Not a container id: never a path.
        log.record("../x", Remover::Request);
        assert_eq!(log.take("../x"), None);
        assert!(!log.noted("../x"));
        // An unread note older than KEEP goes with the next record.
        log.record(&a, Remover::Reaper);
        let old = SystemTime::now() - KEEP - Duration::from_secs(1);
        fs::File::options()
            .write(true)
            .open(root.join("p/removed").join(&a))
            .unwrap()
            .set_modified(old)
            .unwrap();
        log.record(&b, Remover::Request);
        assert_eq!(log.take(&a), None);
        assert_eq!(log.take(&b).as_deref(), Some(Remover::Request.words()));
        let _ = fs::remove_dir_all(root);
    }
}
