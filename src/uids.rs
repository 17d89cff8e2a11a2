//! A host uid per tenant, allocated once from `ZCBOT_SANDBOX_UID_RANGE` and kept on disk.
//!
//! Per-uid kernel limits (inotify instances, user watches, the RLIMIT_NPROC count, keyrings) and
//! file ownership on the host follow the uid: with one uid per tenant they are per tenant, and a
//! file a tenant plants is owned by a uid that no host account has.
//!
//! The record is a pair of symlinks per allocation under `<state_dir>/uids/`:
//! `by-uid/<uid> -> <user>` and `by-user/<user> -> <uid>`. Creating a symlink is atomic and
//! exclusive, so the `by-uid` link *is* the claim: two users can never hold one uid, even across
//! a crash between the two links (the next allocation of that user finds its own claim again,
//! because candidates are probed in the same order each time: from a hash of the user id). A
//! claim is never released: a uid is never reused.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use dashmap::DashMap;
use sha2::{Digest, Sha256};

pub use crate::config::UidRange;
use crate::error::{Error, Result};
use crate::user::UserId;

/// The durable map from users to their uids. Blocking (file system calls): use it off the async
/// workers.
pub struct UidMap {
    dir: PathBuf,
    range: UidRange,
    cache: DashMap<UserId, u32>,
    /// Allocation is rare (once per new user) and short: one at a time in this process.
    alloc: parking_lot::Mutex<()>,
}

impl UidMap {
    /// Opens (creating) the map under `state_dir`.
    pub fn open(state_dir: &Path, range: UidRange) -> Result<Self> {
        let dir = state_dir.join("uids");
        for sub in ["by-uid", "by-user"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| Error::io("create the uid map", &p, e))?;
        }
        restrict(state_dir)?;
        Ok(UidMap {
            dir,
            range,
            cache: DashMap::new(),
            alloc: parking_lot::Mutex::new(()),
        })
    }

    /// The range new uids come from.
    pub fn range(&self) -> UidRange {
        self.range
    }

    /// The uid of `user`, allocating one if it has none. `hint` is a uid the user's folder is
    /// already owned by (from a lost map, say): it is claimed for this user if nobody else holds it.
    pub fn uid_of(&self, user: &UserId, hint: Option<u32>) -> Result<u32> {
        if let Some(uid) = self.cache.get(user) {
            return Ok(*uid);
        }
        let _one = self.alloc.lock();
        if let Some(uid) = self.recorded(user)? {
            self.cache.insert(user.clone(), uid);
            return Ok(uid);
        }
        let start = {
            let h = Sha256::digest(user.as_str().as_bytes());
            u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) % self.range.len()
        };
        let candidates = hint.filter(|h| self.range.contains(*h)).into_iter().chain(
            (0..self.range.len())
                .map(|i| self.range.first + ((start + i) % self.range.len()) as u32),
        );
        for uid in candidates {
            if self.claim(uid, user)? {
                let link = self.dir.join("by-user").join(user.as_str());
                match std::os::unix::fs::symlink(uid.to_string(), &link) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let _ = std::fs::remove_file(&link);
                        std::os::unix::fs::symlink(uid.to_string(), &link)
                            .map_err(|e| Error::io("record a uid", &link, e))?;
                    }
                    Err(e) => return Err(Error::io("record a uid", &link, e)),
                }
                sync_dir(&self.dir.join("by-uid"));
                sync_dir(&self.dir.join("by-user"));
                tracing::info!(user = %user, uid, "allocated a host uid for the user");
                self.cache.insert(user.clone(), uid);
                return Ok(uid);
            }
        }
        Err(Error::Config {
            var: "ZCBOT_SANDBOX_UID_RANGE",
            value: self.range.to_string(),
            reason: format!(
                "every uid of the range is taken ({} users have one): give a larger range",
                self.range.len()
            ),
        })
    }

    /// The uid recorded for `user`, if its record is whole (both links agree).
    fn recorded(&self, user: &UserId) -> Result<Option<u32>> {
        let link = self.dir.join("by-user").join(user.as_str());
        let Some(target) = read_link(&link)? else {
            return Ok(None);
        };
        let Some(uid) = target.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            return Ok(None);
        };
        let back = read_link(&self.dir.join("by-uid").join(uid.to_string()))?;
        if back.as_deref() != Some(user.as_str().as_ref()) {
            return Ok(None);
        }
        if !self.range.contains(uid) {
            tracing::warn!(user = %user, uid, range = %self.range, "the user keeps the uid it was given before ZCBOT_SANDBOX_UID_RANGE changed (a uid is never reassigned)");
        }
        Ok(Some(uid))
    }

    /// Claims `uid` for `user`: true if it is now (or already was) this user's.
    fn claim(&self, uid: u32, user: &UserId) -> Result<bool> {
        let link = self.dir.join("by-uid").join(uid.to_string());
        match std::os::unix::fs::symlink(user.as_str(), &link) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok(read_link(&link)?.as_deref() == Some(user.as_str().as_ref()))
            }
            Err(e) => Err(Error::io("claim a uid", &link, e)),
        }
    }
}

fn read_link(path: &Path) -> Result<Option<OsString>> {
    match std::fs::read_link(path) {
        Ok(t) => Ok(Some(OsString::from_vec(t.into_os_string().into_vec()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read the uid map", path, e)),
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// The state folder holds who-is-who: root only.
fn restrict(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("restrict the state folder", dir, e))
}

/// Host accounts (users and groups, from the name service) and subordinate id ranges
/// (`/etc/subuid`, `/etc/subgid`) that fall inside `range`, described for an error message.
/// Empty when the range is free.
pub fn host_ids_in(range: UidRange) -> Vec<String> {
    let mut found = Vec::new();
    // SAFETY: setpwent/getpwent/endpwent iterate the password database; the returned pointer is
    // valid until the next call, and we copy out what we need before it. Called from one thread
    // at startup (nothing else in the daemon uses the non-reentrant getpw* calls).
    unsafe {
        libc::setpwent();
        loop {
            let pw = libc::getpwent();
            if pw.is_null() {
                break;
            }
            let uid = (*pw).pw_uid;
            if range.contains(uid) {
                let name = std::ffi::CStr::from_ptr((*pw).pw_name).to_string_lossy();
                found.push(format!("user {name} (uid {uid})"));
            }
        }
        libc::endpwent();
        // SAFETY: as above, for the group database.
        libc::setgrent();
        loop {
            let gr = libc::getgrent();
            if gr.is_null() {
                break;
            }
            let gid = (*gr).gr_gid;
            if range.contains(gid) {
                let name = std::ffi::CStr::from_ptr((*gr).gr_name).to_string_lossy();
                found.push(format!("group {name} (gid {gid})"));
            }
        }
        libc::endgrent();
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines() {
            let mut f = line.split(':');
            let (Some(name), Some(start), Some(count)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let (Ok(start), Ok(count)) = (start.trim().parse::<u64>(), count.trim().parse::<u64>())
            else {
                continue;
            };
            let end = start + count.saturating_sub(1);
            if count > 0 && start <= u64::from(range.last) && end >= u64::from(range.first) {
                found.push(format!("{file}: {name} holds {start}-{end}"));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(dir: &Path, first: u32, last: u32) -> UidMap {
        UidMap::open(dir, UidRange { first, last }).unwrap()
    }

    #[test]
    fn users_get_distinct_uids_that_survive_a_restart() {
        let dir = tempdir("uids");
        let m = map(&dir, 300_000, 300_009);
        let users: Vec<UserId> = (0..10)
            .map(|i| UserId::parse(&format!("u{i}")).unwrap())
            .collect();
        let uids: Vec<u32> = users.iter().map(|u| m.uid_of(u, None).unwrap()).collect();
        let mut distinct = uids.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 10, "ten users, ten uids: {uids:?}");
        assert!(uids.iter().all(|u| (300_000..=300_009).contains(u)));
        // The range is full now.
        let err = m.uid_of(&UserId::parse("late").unwrap(), None).unwrap_err();
        assert!(err.to_string().contains("every uid of the range is taken"));
        // A new process (empty cache) reads the same answers.
        let again = map(&dir, 300_000, 300_009);
        for (u, uid) in users.iter().zip(&uids) {
            assert_eq!(again.uid_of(u, None).unwrap(), *uid);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_half_written_record_is_finished_and_a_claimed_uid_is_never_given_away() {
        let dir = tempdir("uids-crash");
        let m = map(&dir, 400_000, 400_001);
        let a = UserId::parse("alice").unwrap();
        let b = UserId::parse("bob").unwrap();
        let ua = m.uid_of(&a, None).unwrap();
        // A crash after the claim, before the by-user link: alice's claim stands.
        std::fs::remove_file(dir.join("uids/by-user/alice")).unwrap();
        let m = map(&dir, 400_000, 400_001);
        // Bob asks for alice's uid as a hint: refused, he gets the other one.
        let ub = m.uid_of(&b, Some(ua)).unwrap();
        assert_ne!(ua, ub);
        assert_eq!(
            m.uid_of(&a, None).unwrap(),
            ua,
            "alice finds her claim again"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "zcbot-{tag}-{}-{}",
            std::process::id(),
            crate::text::random_id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
