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
//! claim of a user is never released: a uid a tenant has had is never reused.
//!
//! A warm spare holds a uid of its own until a claim: `by-uid/<uid> -> spare:<pool>.<token>` and
//! `by-spare/<pool>.<token> -> <uid>` (a name no user can have: user ids hold no `:` or `.`). The
//! spare's exec channel helper is started as that uid in advance; a brand-new user that claims
//! the spare is given the uid (its `by-uid` link is replaced by one naming the user, atomically),
//! so the helper is already the user's. A reservation no user took is released when its spare
//! is gone: no tenant code ever ran as that uid (only the idle helper did, which cannot write
//! anywhere that outlives the container), so it may serve again.

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
        for sub in ["by-uid", "by-user", "by-spare"] {
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
    /// already owned by (from a lost map, say): it is claimed for this user if nobody else holds
    /// it. `offer` is the tag of a spare being claimed: a user without a uid (and without a
    /// usable hint) is given that spare's reserved uid.
    pub fn uid_of(&self, user: &UserId, hint: Option<u32>, offer: Option<&str>) -> Result<u32> {
        if let Some(uid) = self.cache.get(user) {
            return Ok(*uid);
        }
        let _one = self.alloc.lock();
        if let Some(uid) = self.recorded(user)? {
            self.cache.insert(user.clone(), uid);
            return Ok(uid);
        }
        if let Some(h) = hint.filter(|h| self.range.contains(*h)) {
            if self.claim(h, user)? {
                return self.record_user(user, h);
            }
        }
        if let Some(tag) = offer {
            if let Some(uid) = self.take_reserved(tag, user)? {
                // Its by-user link is written already (before the rename).
                return self.remember(user, uid);
            }
        }
        for uid in self.probe_order(user.as_str()) {
            if self.claim(uid, user)? {
                return self.record_user(user, uid);
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

    /// Every uid of the range, from a point a hash of `key` picks: the same order each time, so
    /// an allocation cut short by a crash meets its own claim first when it runs again.
    fn probe_order(&self, key: &str) -> impl Iterator<Item = u32> {
        let h = Sha256::digest(key.as_bytes());
        let start = u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) % self.range.len();
        let (first, len) = (self.range.first, self.range.len());
        (0..len).map(move |i| first + ((start + i) % len) as u32)
    }

    /// Writes `by-user/<user> -> uid` (its `by-uid` claim is made) and caches it.
    fn record_user(&self, user: &UserId, uid: u32) -> Result<u32> {
        let link = self.dir.join("by-user").join(user.as_str());
        replace_link(&uid.to_string(), &link).map_err(|e| Error::io("record a uid", &link, e))?;
        self.remember(user, uid)
    }

    /// Syncs a user's new record and caches it.
    fn remember(&self, user: &UserId, uid: u32) -> Result<u32> {
        sync_dir(&self.dir.join("by-uid"));
        sync_dir(&self.dir.join("by-user"));
        tracing::info!(user = %user, uid, "allocated a host uid for the user");
        self.cache.insert(user.clone(), uid);
        Ok(uid)
    }

    /// Reserves a uid for the spare `tag` (`<pool>.<token>`), or finds its reservation again.
    pub fn reserve(&self, tag: &str) -> Result<u32> {
        check_tag(tag)?;
        let _one = self.alloc.lock();
        if let Some(uid) = self.reserved(tag)? {
            return Ok(uid);
        }
        let _all = self.lock_across()?;
        let holder = spare_holder(tag);
        let link = self.dir.join("by-spare").join(tag);
        for uid in self.probe_order(tag) {
            if self.by_uid(uid).symlink_metadata().is_ok() {
                continue;
            }
            // The spare's link first, then the claim: a crash between the two leaves a link
            // that the sweep finds (and drops), never a claim nothing names.
            replace_link(&uid.to_string(), &link)
                .map_err(|e| Error::io("record a spare's uid", &link, e))?;
            if self.claim_for(uid, &holder)? {
                sync_dir(&self.dir.join("by-spare"));
                sync_dir(&self.dir.join("by-uid"));
                return Ok(uid);
            }
        }
        let _ = std::fs::remove_file(&link);
        Err(Error::Config {
            var: "ZCBOT_SANDBOX_UID_RANGE",
            value: self.range.to_string(),
            reason: "every uid of the range is taken (by users and warm spares): give a larger \
                     range"
                .into(),
        })
    }

    /// The uid reserved for the spare `tag`, if its reservation is whole (both links agree; a
    /// reservation a user took names that user in `by-uid`).
    pub fn reserved(&self, tag: &str) -> Result<Option<u32>> {
        // One from an earlier range is not handed to a new user (the host's accounts were
        // checked against this range only): its spare is not adopted, and it is released.
        Ok(self
            .reservation(tag)?
            .filter(|uid| self.range.contains(*uid)))
    }

    /// [`UidMap::reserved`], whatever the range.
    fn reservation(&self, tag: &str) -> Result<Option<u32>> {
        check_tag(tag)?;
        let Some(target) = read_link(&self.dir.join("by-spare").join(tag))? else {
            return Ok(None);
        };
        let Some(uid) = target.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            return Ok(None);
        };
        let back = read_link(&self.dir.join("by-uid").join(uid.to_string()))?;
        Ok((back.as_deref() == Some(spare_holder(tag).as_ref())).then_some(uid))
    }

    /// Gives the spare `tag`'s reserved uid to `user`: the `by-uid` link is replaced in one
    /// rename, so the uid is the spare's or the user's at every instant, never free.
    ///
    /// The user's `by-user` link is written first: a crash before the rename leaves a record
    /// that is not whole (the uid still the spare's), which the user's next allocation replaces.
    fn take_reserved(&self, tag: &str, user: &UserId) -> Result<Option<u32>> {
        let _all = self.lock_across()?;
        let Some(uid) = self.reserved(tag)? else {
            return Ok(None);
        };
        let mine = self.dir.join("by-user").join(user.as_str());
        replace_link(&uid.to_string(), &mine).map_err(|e| Error::io("record a uid", &mine, e))?;
        let tmp = self.dir.join("by-uid").join(format!(".{uid}.taking"));
        let link = self.by_uid(uid);
        replace_link(user.as_str(), &tmp).map_err(|e| Error::io("give a spare's uid", &tmp, e))?;
        std::fs::rename(&tmp, &link).map_err(|e| Error::io("give a spare's uid", &link, e))?;
        let _ = std::fs::remove_file(self.dir.join("by-spare").join(tag));
        Ok(Some(uid))
    }

    /// `by-uid/<uid>`.
    fn by_uid(&self, uid: u32) -> PathBuf {
        self.dir.join("by-uid").join(uid.to_string())
    }

    /// Holds the map against other processes (a one-shot CLI command beside the daemon) while
    /// a spare's uid is reserved, taken or released: the steps that replace or remove a claim
    /// must not interleave (a release that read "the spare's" before a take renamed it to a
    /// user's would then remove the user's claim).
    fn lock_across(&self) -> Result<nix::fcntl::Flock<std::fs::File>> {
        let file = std::fs::File::open(&self.dir)
            .map_err(|e| Error::io("lock the uid map", &self.dir, e))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::io("lock the uid map", &self.dir, e.into()))
    }

    /// Lets go of the spare `tag`'s uid, unless a user took it (then only the spare's own link
    /// goes). For a spare that is gone.
    pub fn release(&self, tag: &str) -> Result<()> {
        check_tag(tag)?;
        let _one = self.alloc.lock();
        let _all = self.lock_across()?;
        if let Some(uid) = self.reservation(tag)? {
            let link = self.dir.join("by-uid").join(uid.to_string());
            match std::fs::remove_file(&link) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("release a spare's uid", &link, e)),
            }
        }
        let link = self.dir.join("by-spare").join(tag);
        match std::fs::remove_file(&link) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("release a spare's uid", &link, e)),
        }
    }

    /// The tags of spares of pool `pool` holding a reservation (for the sweep).
    pub fn reservations(&self, pool: &str) -> Vec<String> {
        let prefix = format!("{pool}.");
        std::fs::read_dir(self.dir.join("by-spare"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix) && check_tag(n).is_ok())
            .collect()
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
        self.claim_for(uid, user.as_str())
    }

    /// Claims `uid` for `holder` (a user id, or a spare's `spare:<tag>`).
    fn claim_for(&self, uid: u32, holder: &str) -> Result<bool> {
        let link = self.dir.join("by-uid").join(uid.to_string());
        match std::os::unix::fs::symlink(holder, &link) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok(read_link(&link)?.as_deref() == Some(holder.as_ref()))
            }
            Err(e) => Err(Error::io("claim a uid", &link, e)),
        }
    }
}

/// What a spare's `by-uid` link names.
fn spare_holder(tag: &str) -> String {
    format!("spare:{tag}")
}

/// A spare's tag is `<pool>.<token>`: a pool id and 32 lowercase hex digits, nothing that could
/// name another path.
fn check_tag(tag: &str) -> Result<()> {
    let ok = tag.split_once('.').is_some_and(|(pool, token)| {
        !pool.is_empty()
            && pool.len() <= 32
            && pool
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && token.len() == 32
            && token
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(Error::io(
            "name a spare's uid",
            tag,
            std::io::Error::other("not a spare's tag (<pool>.<32 hex digits>)"),
        ))
    }
}

/// Points `link` at `target`, replacing whatever link was there.
fn replace_link(target: &str, link: &Path) -> std::io::Result<()> {
    match std::os::unix::fs::symlink(target, link) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(link)?;
            std::os::unix::fs::symlink(target, link)
        }
        other => other,
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
        let uids: Vec<u32> = users
            .iter()
            .map(|u| m.uid_of(u, None, None).unwrap())
            .collect();
        let mut distinct = uids.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 10, "ten users, ten uids: {uids:?}");
        assert!(uids.iter().all(|u| (300_000..=300_009).contains(u)));
        // The range is full now.
        let err = m
            .uid_of(&UserId::parse("late").unwrap(), None, None)
            .unwrap_err();
        assert!(err.to_string().contains("every uid of the range is taken"));
        // A new process (empty cache) reads the same answers.
        let again = map(&dir, 300_000, 300_009);
        for (u, uid) in users.iter().zip(&uids) {
            assert_eq!(again.uid_of(u, None, None).unwrap(), *uid);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_half_written_record_is_finished_and_a_claimed_uid_is_never_given_away() {
        let dir = tempdir("uids-crash");
        let m = map(&dir, 400_000, 400_001);
        let a = UserId::parse("alice").unwrap();
        let b = UserId::parse("bob").unwrap();
        let ua = m.uid_of(&a, None, None).unwrap();
        // A crash after the claim, before the by-user link: alice's claim stands.
        std::fs::remove_file(dir.join("uids/by-user/alice")).unwrap();
        let m = map(&dir, 400_000, 400_001);
        // Bob asks for alice's uid as a hint: refused, he gets the other one.
        let ub = m.uid_of(&b, Some(ua), None).unwrap();
        assert_ne!(ua, ub);
        assert_eq!(
            m.uid_of(&a, None, None).unwrap(),
            ua,
            "alice finds her claim again"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_spare_uid_goes_to_a_brand_new_user_only_and_is_released_if_nobody_took_it() {
        let dir = tempdir("uids-spare");
        let m = map(&dir, 500_000, 500_002);
        let (t1, t2) = (
            format!("p.{}", "a".repeat(32)),
            format!("p.{}", "b".repeat(32)),
        );
        let r1 = m.reserve(&t1).unwrap();
        assert_eq!(m.reserve(&t1).unwrap(), r1, "a reservation is found again");
        let r2 = m.reserve(&t2).unwrap();
        assert_ne!(r1, r2);
        // A user with a uid keeps it: the offer is not taken.
        let old = UserId::parse("old").unwrap();
        let u_old = m.uid_of(&old, None, None).unwrap();
        assert!(![r1, r2].contains(&u_old));
        assert_eq!(m.uid_of(&old, None, Some(&t1)).unwrap(), u_old);
        assert_eq!(m.reserved(&t1).unwrap(), Some(r1));
        // A brand-new user takes the offered uid; the reservation is gone, and a new process
        // reads the user's record.
        let new = UserId::parse("new").unwrap();
        assert_eq!(m.uid_of(&new, None, Some(&t1)).unwrap(), r1);
        assert_eq!(m.reserved(&t1).unwrap(), None);
        assert_eq!(
            map(&dir, 500_000, 500_002)
                .uid_of(&new, None, None)
                .unwrap(),
            r1
        );
        // Releasing a taken reservation leaves the user's uid alone.
        m.release(&t1).unwrap();
        assert_eq!(
            map(&dir, 500_000, 500_002)
                .uid_of(&new, None, None)
                .unwrap(),
            r1
        );
        // The range is full (old, new, spare 2): nobody else gets a uid until spare 2 lets go.
        let late = UserId::parse("late").unwrap();
        assert!(m.uid_of(&late, None, None).is_err());
        assert_eq!(m.reservations("p"), vec![t2.clone()]);
        assert!(m.reservations("other").is_empty());
        m.release(&t2).unwrap();
        assert!(m.reservations("p").is_empty());
        assert_eq!(m.uid_of(&late, None, None).unwrap(), r2);
        // Tags are checked before they name a path.
        for bad in [
            "../x",
            "p.abc",
            "p/../x.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "",
        ] {
            assert!(m.reserve(bad).is_err(), "{bad:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cut_take_keeps_the_uid_the_spares_and_an_old_ranges_reservation_is_never_offered() {
        let dir = tempdir("uids-spare-crash");
        let m = map(&dir, 600_000, 600_009);
        let tag = format!("p.{}", "c".repeat(32));
        let r = m.reserve(&tag).unwrap();
        // A crash after the user's by-user link, before the rename.
        std::os::unix::fs::symlink(r.to_string(), dir.join("uids/by-user/cut")).unwrap();
        let m = map(&dir, 600_000, 600_009);
        let cut = UserId::parse("cut").unwrap();
        let u = m.uid_of(&cut, None, None).unwrap();
        assert_ne!(
            u, r,
            "the user's record was not whole: it gets a uid of its own"
        );
        assert_eq!(
            m.reserved(&tag).unwrap(),
            Some(r),
            "the spare keeps its uid"
        );
        // The range moved: the old reservation is neither offered nor adopted, and is released.
        let m = map(&dir, 700_000, 700_009);
        assert_eq!(m.reserved(&tag).unwrap(), None);
        let new = UserId::parse("new").unwrap();
        let got = m.uid_of(&new, None, Some(&tag)).unwrap();
        assert!((700_000..=700_009).contains(&got), "{got}");
        m.release(&tag).unwrap();
        assert!(dir
            .join(format!("uids/by-uid/{r}"))
            .symlink_metadata()
            .is_err());
        assert!(m.reservations("p").is_empty());
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
