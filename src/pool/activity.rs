//! The durable last-activity record: one empty file per user whose modification time is the
//! user's last activity, under `<state_dir>/<pool_id>/activity/`.
//!
//! Docker cannot update a container's labels, and the record must survive a restart of the process
//! that owns the pool, so it lives on the host. An mtime costs one small syscall to write and
//! needs no parsing to read; a crash loses nothing already written. Writes are throttled per user
//! by the pool (at most one a second), so a burst of calls costs one write.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::user::UserId;

/// The folder of one pool's activity files.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    dir: PathBuf,
}

impl ActivityLog {
    /// Opens (creating if needed) the activity folder of pool `pool_id` under `state_dir`.
    pub fn open(state_dir: &Path, pool_id: &str) -> Result<Self> {
        let dir = state_dir.join(pool_id).join("activity");
        fs::create_dir_all(&dir).map_err(|e| Error::io("create state folder", &dir, e))?;
        Ok(ActivityLog { dir })
    }

    fn path(&self, user: &UserId) -> PathBuf {
        // A UserId is one plain path component by construction.
        self.dir.join(user.as_str())
    }

    /// Records `at` as the user's last activity.
    pub fn record(&self, user: &UserId, at: SystemTime) -> Result<()> {
        let path = self.path(user);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open activity record", &path, e))?;
        file.set_modified(at)
            .map_err(|e| Error::io("write activity record", &path, e))
    }

    /// The user's last recorded activity, if any.
    pub fn last(&self, user: &UserId) -> Option<SystemTime> {
        fs::metadata(self.path(user))
            .and_then(|m| m.modified())
            .ok()
    }

    /// Forgets the user (its container is gone).
    pub fn forget(&self, user: &UserId) {
        let _ = fs::remove_file(self.path(user));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn survives_a_reopen() {
        let dir = std::env::temp_dir().join(format!("zcbot-activity-{}", std::process::id()));
        let user = UserId::parse("alice").unwrap();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        ActivityLog::open(&dir, "p")
            .unwrap()
            .record(&user, at)
            .unwrap();
        let again = ActivityLog::open(&dir, "p").unwrap();
        assert_eq!(again.last(&user), Some(at));
        again.forget(&user);
        assert_eq!(again.last(&user), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
