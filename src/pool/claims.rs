//! The durable record of claimed spares: which user a warm spare became, one small file per
//! container under `<state_dir>/<pool_id>/claims/<container id>` holding the user id.
//!
//! Docker cannot change a container's labels, so a claimed spare still carries a spare's labels;
//! this record (with the container's new name) is what says whose it is after a restart. It is
//! written before the user's folder is mounted into the spare, so a crash half way through a
//! claim leaves a record whose container does not have the user's name yet: the next reconcile
//! removes that container rather than adopt it as a spare.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::user::UserId;

/// The folder of one pool's claim records.
#[derive(Debug, Clone)]
pub struct ClaimLog {
    dir: PathBuf,
}

/// Whether `id` is a container id as the engine gives them (64 lowercase hex digits): checked
/// before it names a path.
fn valid_id(id: &str) -> bool {
    super::is_lower_hex(id, ID_LEN)
}

/// The length of a container id.
const ID_LEN: usize = 64;

impl ClaimLog {
    /// Opens (creating if needed) the claims folder of pool `pool_id` under `state_dir`.
    pub fn open(state_dir: &Path, pool_id: &str) -> Result<Self> {
        let dir = state_dir.join(pool_id).join("claims");
        fs::create_dir_all(&dir).map_err(|e| Error::io("create state folder", &dir, e))?;
        Ok(ClaimLog { dir })
    }

    /// Records that container `id` is `user`'s, durably (synced) before it returns.
    pub fn record(&self, id: &str, user: &UserId) -> Result<()> {
        if !valid_id(id) {
            return Err(Error::io(
                "record a claim",
                id,
                std::io::Error::other("not a container id"),
            ));
        }
        let path = self.dir.join(id);
        let mut file =
            fs::File::create(&path).map_err(|e| Error::io("record a claim", &path, e))?;
        file.write_all(user.as_str().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("record a claim", &path, e))
    }

    /// The user container `id` was claimed for, if a valid record says so.
    pub fn user_of(&self, id: &str) -> Option<UserId> {
        if !valid_id(id) {
            return None;
        }
        let text = fs::read(self.dir.join(id)).ok()?;
        // A user id is short: a longer file is not ours.
        if text.len() > 256 {
            return None;
        }
        UserId::parse(std::str::from_utf8(&text).ok()?).ok()
    }

    /// Forgets container `id`'s record (its container is gone, or the claim failed).
    pub fn forget(&self, id: &str) {
        if valid_id(id) {
            let _ = fs::remove_file(self.dir.join(id));
        }
    }

    /// The container ids with a record.
    pub fn ids(&self) -> Vec<String> {
        super::hex_names_in(&self.dir, ID_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_bad_ids_name_no_path() {
        let dir = std::env::temp_dir().join(format!("zcbot-claims-{}", std::process::id()));
        let id = "a".repeat(64);
        let user = UserId::parse("alice").unwrap();
        ClaimLog::open(&dir, "p")
            .unwrap()
            .record(&id, &user)
            .unwrap();
        let again = ClaimLog::open(&dir, "p").unwrap();
        assert_eq!(again.user_of(&id), Some(user.clone()));
        assert_eq!(again.ids(), vec![id.clone()]);
        assert!(again.record("../../x", &user).is_err());
        assert_eq!(again.user_of("../activity/alice"), None);
        again.forget(&id);
        assert_eq!(again.user_of(&id), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
