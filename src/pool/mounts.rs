//! Workspace slots: how a warm spare, started before its user is known, gets that user's folder
//! at `/workspace` when it is claimed.
//!
//! A bind mount is fixed when a container is created, so a spare is created with an empty *slot*
//! folder of its own (`<state_dir>/<pool>/slots/<token>`) as `/workspace`, received with
//! `rslave` propagation. On the host the slot is a bind mount of itself in a peer group of its
//! own (`shared`), under a `private` parent, so mount events reach exactly two places: the slot
//! and the one container made on it. A claim binds the user's folder onto the slot; the mount
//! propagates into the running container, and nothing mounted inside can propagate back (a slave
//! receives only). Before a claim counts, the host checks through `/proc/<pid>/root` that the
//! container's `/workspace` is the user's folder (same device and inode); a check that fails
//! ends the claim, and the spare is removed. A slot is used for one container only and released
//! (unmounted, removed) once its container is gone.
//!
//! Everything here blocks (mount syscalls, file system calls): call it off the async workers.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::spec::WORKSPACE;
use crate::error::{Error, Result};

/// The folder of one pool's workspace slots.
#[derive(Debug, Clone)]
pub struct WorkspaceSlots {
    dir: PathBuf,
    /// Whether the folder is a private mount of itself yet: made so before its first slot (a
    /// pool that never makes a spare leaves no mount behind), once, under this lock.
    private: std::sync::Arc<parking_lot::Mutex<bool>>,
}

/// Most mounts one release takes off a slot (the user's folder, then the slot's own bind);
/// more would mean something else stacked there, which is unmounted as well.
const MAX_STACKED: usize = 8;

impl WorkspaceSlots {
    /// Opens (creating if needed) pool `pool_id`'s slot folder under `state_dir`. The path is
    /// made canonical: the mount table names mount points by it.
    pub fn open(state_dir: &Path, pool_id: &str) -> Result<Self> {
        let dir = state_dir.join(pool_id).join("slots");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io("create the workspace slots folder", &dir, e))?;
        let dir = fs::canonicalize(&dir)
            .map_err(|e| Error::io("resolve the workspace slots folder", &dir, e))?;
        Ok(WorkspaceSlots {
            dir,
            private: Default::default(),
        })
    }

    /// The slot folder of pool `pool_id` as it is, made or mounted by nothing (to release what
    /// is there).
    pub fn existing(state_dir: &Path, pool_id: &str) -> Self {
        let dir = state_dir.join(pool_id).join("slots");
        WorkspaceSlots {
            dir: fs::canonicalize(&dir).unwrap_or(dir),
            private: Default::default(),
        }
    }

    /// Makes the folder a private mount of itself, once (also across processes and restarts:
    /// an existing mount there is kept), so a slot's mounts never propagate to other mount
    /// namespaces.
    fn make_private(&self) -> Result<()> {
        let mut done = self.private.lock();
        if *done {
            return Ok(());
        }
        let dir = &self.dir;
        if mounts_at(dir) == 0 {
            mount_err(
                mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>),
                "bind the workspace slots folder on itself",
                dir,
            )?;
        }
        mount_err(
            mount(
                None::<&str>,
                dir,
                None::<&str>,
                MsFlags::MS_PRIVATE,
                None::<&str>,
            ),
            "make the workspace slots folder private",
            dir,
        )?;
        *done = true;
        Ok(())
    }

    /// The host path of slot `token`.
    pub fn path(&self, token: &str) -> PathBuf {
        self.dir.join(token)
    }

    /// Makes a fresh, empty slot named `token` ([`new_token`]): a folder no one but root may
    /// enter, bound on itself in a peer group of its own.
    pub fn create(&self, token: &str) -> Result<()> {
        self.make_private()?;
        let path = self.path(token);
        fs::DirBuilder::new()
            .mode(0o000)
            .create(&path)
            .map_err(|e| Error::io("create a workspace slot", &path, e))?;
        let made = mount_err(
            mount(
                Some(&path),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
            "bind a workspace slot on itself",
            &path,
        )
        .and_then(|()| {
            mount_err(
                mount(
                    None::<&str>,
                    &path,
                    None::<&str>,
                    MsFlags::MS_SHARED,
                    None::<&str>,
                ),
                "make a workspace slot shared",
                &path,
            )
        });
        if let Err(e) = made {
            self.release(token);
            return Err(e);
        }
        Ok(())
    }

    /// Binds the user's folder onto slot `token` (the claim's one mount).
    pub fn bind(&self, token: &str, folder: &Path) -> Result<()> {
        let path = self.path(token);
        mount_err(
            mount(
                Some(folder),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
            "bind a user folder onto a workspace slot",
            &path,
        )
    }

    /// Whether the container whose PID 1 is host pid `pid` sees `folder` at `/workspace`.
    pub fn shows(pid: i32, folder: &Path) -> bool {
        match (fs::metadata(inside(pid)), fs::metadata(folder)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    /// Whether slot `token` is as a spare left it: its own bind and nothing on it, empty, and
    /// what the container of PID 1 `pid` sees at `/workspace` (for adopting a spare after a
    /// restart).
    pub fn is_pristine(&self, token: &str, pid: i32) -> bool {
        let path = self.path(token);
        mounts_at(&path) == 1
            && fs::read_dir(&path).is_ok_and(|mut d| d.next().is_none())
            && Self::shows(pid, &path)
    }

    /// Unmounts everything on slot `token` and removes it. Detached (lazy) unmounts: a process
    /// still inside keeps what it has open, and nothing new can reach it.
    pub fn release(&self, token: &str) {
        if !valid_token(token) {
            return;
        }
        let path = self.path(token);
        unmount_all(&path);
        if let Err(e) = fs::remove_dir(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(slot = %path.display(), error = %e, "could not remove a workspace slot");
            }
        }
    }

    /// Releases every slot and the folder's own mount (for a test's clean-up, or an operator's
    /// after `rm --all`).
    pub fn release_all(&self) {
        for token in self.tokens() {
            self.release(&token);
        }
        unmount_all(&self.dir);
    }

    /// The tokens of every slot on disk.
    pub fn tokens(&self) -> Vec<String> {
        super::hex_names_in(&self.dir, TOKEN_LEN)
    }
}

/// Unmounts (detached) every mount stacked at `path`, up to [`MAX_STACKED`]: it stops at the
/// first refusal (`EINVAL` once nothing is mounted there).
fn unmount_all(path: &Path) {
    for _ in 0..MAX_STACKED {
        if umount2(path, MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

/// The length of a slot token (16 bytes in hex).
const TOKEN_LEN: usize = 32;

/// Whether `token` is one this module makes (32 lowercase hex digits): a label read back from
/// the engine is checked before it names a path.
pub fn valid_token(token: &str) -> bool {
    super::is_lower_hex(token, TOKEN_LEN)
}

/// `/workspace` as the container of PID 1 `pid` sees it, from the host.
fn inside(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root{WORKSPACE}"))
}

/// A fresh slot name: 16 random bytes in hex.
pub fn new_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("read random bytes", "/dev/urandom", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn mount_err(r: nix::Result<()>, what: &'static str, path: &Path) -> Result<()> {
    r.map_err(|e| Error::io(what, path, std::io::Error::from(e)))
}

/// How many mounts of this mount namespace have `path` as their mount point.
fn mounts_at(path: &Path) -> usize {
    let Ok(table) = fs::read_to_string("/proc/self/mountinfo") else {
        return 0;
    };
    let want = path.as_os_str().as_encoded_bytes();
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| unescape(point) == want)
        .count()
}

/// A mountinfo field with its octal escapes (`\040` for a space, ...) undone.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let d = &b[i + 1..i + 4];
            if d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3' {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_before_they_name_a_path() {
        assert!(valid_token(&"a".repeat(32)));
        assert!(!valid_token("../../etc"));
        assert!(!valid_token(&"A".repeat(32)));
        assert!(!valid_token(&"a".repeat(31)));
        let t = new_token().unwrap();
        assert!(valid_token(&t), "{t}");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), b"/a b");
        assert_eq!(unescape(r"/a\134"), b"/a\\");
        assert_eq!(unescape("/plain"), b"/plain");
        assert_eq!(unescape(r"/x\04"), b"/x\\04");
    }
}
