//! The users root: the host folder that holds one folder per user, and what the host enforces on
//! it for every tenant.
//!
//! - **Reach**: the users root is mode 0700 (root only), so no host account can reach a tenant's
//!   files, or run what a tenant planted there; RUN.md's prepared root is also mounted
//!   `nosuid,nodev`. Both are checked at startup and reported (`/readyz`, `smoke`).
//! - **Disk quota**: with btrfs quotas enabled, each user folder is a subvolume whose qgroup is
//!   limited to `ZCBOT_SANDBOX_DISK` ([`crate::quota`]). Elsewhere the daemon warns loudly, or
//!   refuses to start with `ZCBOT_REQUIRE_DISK_QUOTA=1`.
//! - **Owner**: a root daemon gives each user folder to the tenant's own uid
//!   ([`crate::uids`]); a folder owned by another uid (the single uid of earlier releases) is
//!   migrated on first use, its root last, so an interrupted migration is finished by the next.
//!
//! Everything here blocks (file system calls): call it off the async workers.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dashmap::{DashMap, DashSet};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, Mode, SFlag};

use crate::check::Check;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::files::Budget;
use crate::quota;
use crate::uids::UidMap;
use crate::user::UserId;

/// Name of the subvolume the startup probe creates and removes (user ids never start with '.').
const PROBE: &std::ffi::CStr = c".zcbot-quota-probe";
/// The deepest folder a migration reaches (one open descriptor per level).
const MIGRATE_DEPTH: usize = 1024;
/// How long migrating one folder to its tenant's uid may take before the call fails (the next
/// call walks again; what is done already is only looked at).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A user's folder, ready: where it is and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFolder {
    /// The folder on the host.
    pub path: PathBuf,
    /// The uid the tenant runs as and that owns the folder.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
}

/// Whether per-user disk quotas are enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaMode {
    /// Every user folder is a btrfs subvolume limited to this many bytes.
    Enforced(u64),
    /// Not enforced, and why.
    NotEnforced(String),
}

/// Who owns user folders and runs tenants' processes.
enum Owners {
    /// A uid per tenant from the range.
    PerTenant(UidMap),
    /// One uid for everyone (a daemon that is not root cannot give files away), and why.
    Shared { uid: u32, gid: u32, reason: String },
}

/// The users root of a pool. See the module docs.
pub struct UsersRoot {
    path: PathBuf,
    quota: QuotaMode,
    require_quota: bool,
    owners: Owners,
    prepared: DashMap<UserId, UserFolder>,
    /// One preparation per user at a time (a first call and its concurrent siblings wait for one
    /// migration instead of each walking the tree).
    preparing: DashMap<UserId, Arc<parking_lot::Mutex<()>>>,
    /// Users whose folder predates the quota (a plain folder on a quota root), warned once.
    unquoted: DashSet<UserId>,
}

impl UsersRoot {
    /// Opens the users root of `config`: creates it (mode 0700), probes quota support, opens the
    /// uid map. Fails when `ZCBOT_REQUIRE_DISK_QUOTA=1` and quotas cannot be enforced, or when a
    /// host account holds a uid of `ZCBOT_SANDBOX_UID_RANGE`.
    pub fn open(config: &Config) -> Result<Self> {
        let path = config.users_root.clone();
        std::fs::create_dir_all(&path).map_err(|e| Error::io("create users root", &path, e))?;
        let root = open_dir(&path)?;
        let is_root = nix::unistd::geteuid().is_root();
        if is_root {
            nix::sys::stat::fchmod(root.as_raw_fd(), Mode::from_bits_truncate(0o700))
                .map_err(|e| Error::io("restrict the users root to root", &path, e.into()))?;
        }
        let shown = path.display().to_string();
        let quota = match quota::probe(&root, &shown, PROBE) {
            quota::Support::Btrfs => QuotaMode::Enforced(config.disk_bytes),
            quota::Support::Unavailable(reason) if config.require_disk_quota => {
                return Err(Error::DiskQuota { reason })
            }
            quota::Support::Unavailable(reason) => {
                tracing::warn!(%reason, "DISK QUOTA NOT ENFORCED: a tenant can fill the host's disk through its folder; set ZCBOT_REQUIRE_DISK_QUOTA=1 to refuse to start like this (RUN.md: preparing a users root)");
                QuotaMode::NotEnforced(reason)
            }
        };
        let owners = if is_root {
            let taken = crate::uids::host_ids_in(config.uid_range);
            if !taken.is_empty() {
                return Err(Error::Config {
                    var: "ZCBOT_SANDBOX_UID_RANGE",
                    value: config.uid_range.to_string(),
                    reason: format!(
                        "host accounts or subordinate id ranges use ids of this range ({}): \
                         choose a range that nothing on the host uses",
                        taken.join(", ")
                    ),
                });
            }
            Owners::PerTenant(UidMap::open(&config.state_dir, config.uid_range)?)
        } else {
            let reason =
                "the daemon is not root, so it cannot give each tenant's files to a uid of its own"
                    .to_owned();
            tracing::warn!(uid = config.uid, %reason, "ONE UID FOR EVERY TENANT: tenants share per-uid kernel limits; run the daemon as root");
            Owners::Shared {
                uid: config.uid,
                gid: config.gid,
                reason,
            }
        };
        Ok(UsersRoot {
            path,
            quota,
            require_quota: config.require_disk_quota,
            owners,
            prepared: DashMap::new(),
            preparing: DashMap::new(),
            unquoted: DashSet::new(),
        })
    }

    /// The `uid:gid` a warm spare `tag` (`<pool>.<token>`) runs its helper as: a uid reserved for
    /// it (see [`crate::uids`]), or the one uid every tenant shares.
    pub fn spare_ids(&self, tag: &str) -> Result<(u32, u32)> {
        match &self.owners {
            Owners::PerTenant(map) => map.reserve(tag).map(|uid| (uid, uid)),
            Owners::Shared { uid, gid, .. } => Ok((*uid, *gid)),
        }
    }

    /// The `uid:gid` still reserved for the spare `tag` (None: a user took it, or it is gone).
    pub fn spare_ids_held(&self, tag: &str) -> Result<Option<(u32, u32)>> {
        match &self.owners {
            Owners::PerTenant(map) => Ok(map.reserved(tag)?.map(|uid| (uid, uid))),
            Owners::Shared { uid, gid, .. } => Ok(Some((*uid, *gid))),
        }
    }

    /// Lets go of the spare `tag`'s uid (its container is gone), unless a user took it.
    pub fn release_spare_ids(&self, tag: &str) -> Result<()> {
        match &self.owners {
            Owners::PerTenant(map) => map.release(tag),
            Owners::Shared { .. } => Ok(()),
        }
    }

    /// The tags of pool `pool`'s spares that hold a uid.
    pub fn spare_reservations(&self, pool: &str) -> Vec<String> {
        match &self.owners {
            Owners::PerTenant(map) => map.reservations(pool),
            Owners::Shared { .. } => Vec::new(),
        }
    }

    /// The folder of `user` (which may not exist yet).
    pub fn folder_path(&self, user: &UserId) -> PathBuf {
        self.path.join(user.as_str())
    }

    /// Makes `user`'s folder ready: created (a quota-limited subvolume where quotas are
    /// enforced), owned by the tenant's uid (migrating an older owner's files), mode 0700.
    /// Cached: the work is done once per user and process.
    pub fn prepare(&self, user: &UserId) -> Result<UserFolder> {
        self.prepare_offered(user, None)
    }

    /// [`UsersRoot::prepare`] for a user claiming the warm spare `offer` (its tag): a user
    /// without a uid is given the spare's, so the helper already running in it is the user's.
    pub fn prepare_offered(&self, user: &UserId, offer: Option<&str>) -> Result<UserFolder> {
        if let Some(f) = self.prepared.get(user) {
            return Ok(f.clone());
        }
        let lock = self.preparing.entry(user.clone()).or_default().clone();
        let done = {
            let _one = lock.lock();
            match self.prepared.get(user) {
                Some(f) => Ok(f.clone()),
                None => self.prepare_now(user, offer),
            }
        };
        drop(lock);
        self.preparing
            .remove_if(user, |_, l| Arc::strong_count(l) == 1);
        done
    }

    fn prepare_now(&self, user: &UserId, offer: Option<&str>) -> Result<UserFolder> {
        let path = self.folder_path(user);
        let root = open_dir(&self.path)?;
        let name = CString::new(user.as_str()).expect("user ids hold no NUL");
        let st = match fstatat(
            Some(root.as_raw_fd()),
            name.as_c_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => Some(st),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(Error::io("inspect user folder", &path, e.into())),
        };
        match st {
            Some(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR => {
                return Err(Error::io(
                    "use user folder",
                    &path,
                    std::io::Error::other(
                        "it is not a plain folder (a symlink or a file); refusing to use it",
                    ),
                ))
            }
            Some(_) => {}
            None => {
                let made = match self.quota {
                    QuotaMode::Enforced(_) => quota::create_subvolume(&root, &name),
                    QuotaMode::NotEnforced(_) => mkdirat(
                        Some(root.as_raw_fd()),
                        name.as_c_str(),
                        Mode::from_bits_truncate(0o700),
                    ),
                };
                match made {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(Error::io("create user folder", &path, e.into())),
                }
            }
        }
        let fd = openat(
            Some(root.as_raw_fd()),
            name.as_c_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(crate::files::own)
        .map_err(|e| Error::io("open user folder", &path, e.into()))?;
        if let QuotaMode::Enforced(bytes) = self.quota {
            if quota::is_subvolume(&fd) {
                quota::set_limit(&fd, bytes).map_err(|e| {
                    Error::io("limit the user folder (btrfs qgroup)", &path, e.into())
                })?;
            } else if self.require_quota {
                return Err(Error::DiskQuota {
                    reason: format!(
                        "the folder of user {user} predates the quota (a plain folder, not a btrfs \
                         subvolume); convert it as RUN.md says"
                    ),
                });
            } else if self.unquoted.insert(user.clone()) {
                tracing::warn!(user = %user, path = %path.display(), "this user's folder predates the disk quota (a plain folder, not a subvolume): it has NO quota until converted (RUN.md)");
            }
        }
        let (uid, gid) = self.give(user, &fd, &path, offer)?;
        nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o700))
            .map_err(|e| Error::io("restrict the user folder", &path, e.into()))?;
        let folder = UserFolder { path, uid, gid };
        self.prepared.insert(user.clone(), folder.clone());
        Ok(folder)
    }

    /// Gives the folder open at `fd` to the tenant's uid, migrating what an earlier owner left.
    fn give(
        &self,
        user: &UserId,
        fd: &OwnedFd,
        path: &Path,
        offer: Option<&str>,
    ) -> Result<(u32, u32)> {
        let st =
            fstat(fd.as_raw_fd()).map_err(|e| Error::io("inspect user folder", path, e.into()))?;
        let (uid, gid) = match &self.owners {
            Owners::Shared { uid, gid, .. } => (*uid, *gid),
            Owners::PerTenant(map) => {
                let hint = map.range().contains(st.st_uid).then_some(st.st_uid);
                let uid = map.uid_of(user, hint, offer)?;
                (uid, uid)
            }
        };
        if (st.st_uid, st.st_gid) == (uid, gid) {
            return Ok((uid, gid));
        }
        if matches!(self.owners, Owners::PerTenant(_)) && st.st_uid != 0 {
            // Everything the old owner left becomes the tenant's; the folder itself last.
            let from = (st.st_uid, st.st_gid);
            let mut budget = Budget::new(MIGRATE_TIMEOUT, u64::MAX);
            match crate::files::walk::chown_tree(fd, from, (uid, gid), MIGRATE_DEPTH, &mut budget) {
                Ok(n) => {
                    tracing::info!(user = %user, from = from.0, to = uid, entries = n, "migrated the user's folder to its own uid")
                }
                Err(crate::files::walk::RemoveError::TooDeep(n)) => {
                    tracing::warn!(user = %user, entries = n, "migrated the user's folder to its own uid, except what lies deeper than {MIGRATE_DEPTH} levels")
                }
                Err(crate::files::walk::RemoveError::Stopped(n)) => {
                    return Err(Error::io(
                        "migrate the user folder to the tenant's uid",
                        path,
                        std::io::Error::other(format!(
                            "{n} entries done in {}; the next call goes on",
                            humantime::format_duration(MIGRATE_TIMEOUT)
                        )),
                    ))
                }
                Err(crate::files::walk::RemoveError::Errno(e, _)) => {
                    return Err(Error::io(
                        "migrate the user folder to the tenant's uid",
                        path,
                        e.into(),
                    ))
                }
            }
        }
        nix::unistd::fchown(
            fd.as_raw_fd(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|e| {
            Error::io(
                "give the user folder to the tenant's uid (run the daemon as root, or set \
                 ZCBOT_SANDBOX_UID to the folder's owner)",
                path,
                e.into(),
            )
        })?;
        Ok((uid, gid))
    }

    /// Removes `user`'s folder and everything in it (for the daemon's own probe users).
    pub fn remove_folder(&self, user: &UserId) -> Result<()> {
        self.prepared.remove(user);
        let path = self.folder_path(user);
        let root = open_dir(&self.path)?;
        let name = CString::new(user.as_str()).expect("user ids hold no NUL");
        if let Ok(fd) = openat(
            Some(root.as_raw_fd()),
            name.as_c_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(crate::files::own)
        {
            if quota::is_subvolume(&fd) && quota::destroy_subvolume(&root, &name).is_ok() {
                return Ok(());
            }
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove user folder", &path, e)),
        }
    }

    /// The users root's checks, for `/readyz`, `ps` and `smoke`: [`Check::Ok`] when enforced,
    /// [`Check::Degraded`] when the daemon runs without it by choice or for lack of privilege,
    /// [`Check::Failed`] when something that was in force is not any more.
    pub fn checks(&self) -> Vec<(&'static str, Check)> {
        let mut out = Vec::new();
        let shown = self.path.display();
        out.push((
            "users_root",
            match std::fs::metadata(&self.path) {
                Err(e) => Check::failed(format!("cannot inspect {shown}: {e}")),
                Ok(meta) => {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = meta.permissions().mode() & 0o7777;
                    let flags = nix::sys::statvfs::statvfs(&self.path).map(|s| s.flags());
                    let nosuid_nodev = flags.as_ref().is_ok_and(|f| {
                        f.contains(nix::sys::statvfs::FsFlags::ST_NOSUID)
                            && f.contains(nix::sys::statvfs::FsFlags::ST_NODEV)
                    });
                    if mode & 0o077 != 0 {
                        if nix::unistd::geteuid().is_root() {
                            Check::failed(format!("{shown} is mode {mode:o}: other host accounts can reach tenants' files (chmod 700 it; the daemon sets it at startup)"))
                        } else {
                            Check::degraded(format!(
                                "{shown} is mode {mode:o} and the daemon is not root"
                            ))
                        }
                    } else if !nosuid_nodev {
                        Check::degraded(format!(
                            "{shown} is 0700, root only, but not mounted nosuid,nodev, see RUN.md"
                        ))
                    } else {
                        Check::ok("0700, root only, mounted nosuid,nodev")
                    }
                }
            },
        ));
        out.push((
            "disk_quota",
            match &self.quota {
                QuotaMode::Enforced(bytes) => {
                    let n = self.unquoted.len();
                    let extra = if n == 0 {
                        String::new()
                    } else {
                        format!("; {n} older folders have none until converted, see RUN.md")
                    };
                    Check::ok(format!(
                        "{} per user, btrfs qgroups{extra}",
                        crate::config::format_bytes(*bytes)
                    ))
                }
                QuotaMode::NotEnforced(reason) => Check::degraded(reason.clone()),
            },
        ));
        out.push((
            "tenant_uids",
            match &self.owners {
                Owners::PerTenant(map) => {
                    Check::ok(format!("a uid per tenant from {}", map.range()))
                }
                Owners::Shared { uid, reason, .. } => {
                    Check::degraded(format!("every tenant runs as uid {uid}; {reason}"))
                }
            },
        ));
        out
    }
}

fn open_dir(path: &Path) -> Result<OwnedFd> {
    openat(
        None,
        path.as_os_str().as_bytes(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(crate::files::own)
    .map_err(|e| Error::io("open the users root", path, e.into()))
}
