//! The file tools, run on the host against one user's folder, confined to it.
//!
//! The sandbox user owns that folder and can plant symlinks in it at any moment, so no path is
//! trusted as a string. Every operation resolves from a descriptor of the user's folder:
//! `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` (the kernel refuses `..`, absolute
//! symlinks and any symlink that would leave the folder, at every component), and, where the
//! kernel lacks `openat2`, a component-by-component walk with `O_NOFOLLOW` that refuses every
//! symlink. Creation and deletion act on a parent descriptor with `O_NOFOLLOW` on the last
//! component, so a symlink swapped in between two calls is never followed.
//!
//! Every input is the tenant's: the path (bounded in bytes and components) and the tree it
//! names (built from inside the sandbox, any depth and width). Nothing here recurses: walks keep
//! an explicit stack bounded by [`Limits::max_depth`], and every entry visited is charged to a
//! [`Budget`] (entries, deadline, cancel), so a call ends with a clear error or a partial,
//! consistent result, never a crash. These functions block: run them off the async workers.

pub(crate) mod walk;

use std::collections::BinaryHeap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fchown, unlinkat, Gid, Uid, UnlinkatFlags};
use serde::{Deserialize, Serialize};

use crate::error::file::shorten;
use crate::error::{Error, Result};
pub use crate::error::{FileError, Problem, Refusal};
use crate::text::to_text;
pub use walk::{Budget, Stop};

/// Bounds on what one file call may ask of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest path a call may name, in bytes (the kernel's PATH_MAX).
    pub max_path_bytes: usize,
    /// The most components a path may have; also the deepest folder a walk descends to.
    pub max_depth: usize,
    /// Entries `list_dir` returns at most (the first ones by name).
    pub list_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_path_bytes: 4096,
            max_depth: 256,
            list_entries: 10_000,
        }
    }
}

/// One user's folder on the host, as the file tools see it.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
    uid: u32,
    gid: u32,
    force_fallback: bool,
    limits: Limits,
}

/// What `list_dir` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// The entries, sorted by name (bytewise).
    pub entries: Vec<DirEntry>,
    /// True when the folder holds more than was listed: the listing stopped at
    /// [`Limits::list_entries`], at the entry budget or at the deadline.
    pub truncated: bool,
}

/// What `read_file` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileRead {
    /// The bytes read, as UTF-8 text (U+FFFD for invalid sequences).
    pub content: String,
    /// The exact bytes in base64, present only when they are not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub content_base64: Option<String>,
    /// The file's size in bytes.
    pub size: u64,
    /// Where the read started.
    pub offset: u64,
    /// How many bytes were read.
    pub bytes_read: u64,
    /// Whether the read reached the end of the file.
    pub eof: bool,
}

/// One entry of `list_dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DirEntry {
    /// The entry's name (lossy UTF-8).
    pub name: String,
    /// file, dir, symlink or other. Symlinks are reported, never followed.
    pub kind: String,
    /// Size in bytes (of the link itself for a symlink).
    pub size: u64,
}

fn limit_error(path: &str, limit: &'static str, detail: String) -> Error {
    Error::FileLimit {
        path: shorten(path),
        limit,
        detail,
    }
}

fn errno_error(path: &str, e: Errno) -> Error {
    FileError::errno(path, e).into()
}

fn refused(path: &str, why: Refusal) -> Error {
    FileError::refused(path, why).into()
}

pub(crate) fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: fd was just returned by a successful open and is owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

impl Workspace {
    /// The workspace of the folder `root` (which must exist), owned by `uid:gid`.
    pub fn new(root: PathBuf, uid: u32, gid: u32) -> Self {
        Workspace {
            root,
            uid,
            gid,
            force_fallback: false,
            limits: Limits::default(),
        }
    }

    /// The same workspace under other limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Uses the `O_NOFOLLOW` walk even where `openat2` exists (tests of the fallback).
    pub fn with_fallback(mut self) -> Self {
        self.force_fallback = true;
        self
    }

    /// The folder on the host.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path's components, within the limits.
    fn parts<'p>(&self, path: &'p str) -> Result<Vec<&'p OsStr>> {
        if path.len() > self.limits.max_path_bytes {
            return Err(limit_error(
                path,
                "path length",
                format!(
                    "the path is {} bytes long; at most {} are accepted",
                    path.len(),
                    self.limits.max_path_bytes
                ),
            ));
        }
        let parts = normalize(path)?;
        if parts.len() > self.limits.max_depth {
            return Err(limit_error(
                path,
                "path depth",
                format!(
                    "the path has {} components; at most {} are accepted",
                    parts.len(),
                    self.limits.max_depth
                ),
            ));
        }
        Ok(parts)
    }

    fn open_root(&self) -> Result<OwnedFd> {
        openat(
            None,
            &self.root,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(own)
        .map_err(|e| Error::io("open the user folder", &self.root, e.into()))
    }

    /// Opens `parts` (already normalized) beneath `dir`.
    fn open_beneath(
        &self,
        dir: &OwnedFd,
        parts: &[&OsStr],
        flags: OFlag,
        shown: &str,
    ) -> Result<OwnedFd> {
        let flags = flags | OFlag::O_CLOEXEC;
        if parts.is_empty() {
            return openat(Some(dir.as_raw_fd()), ".", flags, Mode::empty())
                .map(own)
                .map_err(|e| errno_error(shown, e));
        }
        if !self.force_fallback {
            let joined: PathBuf = parts.iter().collect();
            let how = OpenHow::new()
                .flags(flags)
                .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            match openat2(dir.as_raw_fd(), &joined, how) {
                Ok(fd) => return Ok(own(fd)),
                Err(Errno::ENOSYS) => {}
                Err(e) => return Err(errno_error(shown, e)),
            }
        }
        // No openat2: walk one component at a time and refuse every symlink.
        let mut cur = openat(
            Some(dir.as_raw_fd()),
            ".",
            OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(own)
        .map_err(|e| errno_error(shown, e))?;
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let f = if last {
                flags | OFlag::O_NOFOLLOW
            } else {
                OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
            };
            cur = match openat(Some(cur.as_raw_fd()), *part, f, Mode::empty()) {
                Ok(fd) => own(fd),
                // O_DIRECTORY|O_NOFOLLOW on a symlink answers ENOTDIR: a refusal, not a file.
                Err(Errno::ENOTDIR) if is_symlink_at(&cur, part) => {
                    return Err(refused(shown, Refusal::Escape))
                }
                Err(e) => return Err(errno_error(shown, e)),
            };
        }
        Ok(cur)
    }

    /// Checks that `path` is a folder beneath the workspace (a call's working directory).
    pub fn open_folder(&self, path: &str) -> Result<()> {
        let parts = self.parts(path)?;
        let root = self.open_root()?;
        self.open_beneath(&root, &parts, OFlag::O_RDONLY | OFlag::O_DIRECTORY, path)
            .map(drop)
    }

    /// Reads up to `limit` bytes from `offset` of a regular file.
    pub fn read_file(&self, path: &str, offset: u64, limit: usize) -> Result<FileRead> {
        let (fd, size) = self.open_file(path)?;
        let want = limit.min(size.saturating_sub(offset) as usize);
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match nix::sys::uio::pread(&fd, &mut buf[got..], (offset + got as u64) as i64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(errno_error(path, e)),
            }
        }
        buf.truncate(got);
        let (content, content_base64) = to_text(&buf);
        Ok(FileRead {
            content,
            content_base64,
            size,
            offset,
            bytes_read: got as u64,
            eof: offset + got as u64 >= size,
        })
    }

    /// Opens a regular file for reading as a whole (a download): the open file and its size.
    pub fn open_file(&self, path: &str) -> Result<(std::fs::File, u64)> {
        let parts = self.parts(path)?;
        let root = self.open_root()?;
        let fd = self.open_beneath(&root, &parts, OFlag::O_RDONLY | OFlag::O_NONBLOCK, path)?;
        let size = regular_file_size(&fd, path)?;
        Ok((std::fs::File::from(fd), size))
    }

    /// Writes `content` to a file, creating it and any missing parent folders (owned by the
    /// sandbox user); replaces the contents unless `append`. Returns the bytes written.
    ///
    /// A replacement is written to a new file beside the target and renamed over it, so a write
    /// that fails (the disk quota, say) leaves the old contents whole; an append that fails is cut
    /// back to the old size. The mode of a replaced file is kept.
    pub fn write_file(&self, path: &str, content: &[u8], append: bool) -> Result<u64> {
        let target = self.target(path)?;
        if append && target.existing.is_some() {
            let fd = openat(
                Some(target.dir.as_raw_fd()),
                target.name.as_os_str(),
                OFlag::O_WRONLY
                    | OFlag::O_APPEND
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC
                    | OFlag::O_NONBLOCK,
                Mode::empty(),
            )
            .map(own)
            .map_err(|e| errno_error(path, e))?;
            let before = regular_file_size(&fd, path)?;
            if let Err(e) = write_all(&fd, content) {
                // Whole or nothing: cut back what part of the content went in.
                let _ = nix::unistd::ftruncate(&fd, before as i64);
                return Err(errno_error(path, e));
            }
            return Ok(content.len() as u64);
        }
        let mut pending = self.replace(target, path)?;
        pending.write(content)?;
        pending.commit()
    }

    /// Starts replacing (or creating) a file whose contents arrive in pieces (an upload): the
    /// same guarantees as [`Workspace::write_file`], the old contents whole until
    /// [`PendingWrite::commit`].
    pub fn begin_write(&self, path: &str) -> Result<PendingWrite> {
        let target = self.target(path)?;
        self.replace(target, path)
    }

    /// The folder a write goes to (missing parents created and given to the sandbox user), the
    /// name in it, and what is there now (a regular file, or nothing).
    fn target(&self, path: &str) -> Result<Target> {
        let parts = self.parts(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(refused(path, Refusal::Workspace));
        };
        let root = self.open_root()?;
        let mut dir = self.open_beneath(&root, &[], OFlag::O_DIRECTORY, path)?;
        for part in parents {
            match self.open_beneath(&dir, &[part], OFlag::O_DIRECTORY, path) {
                Ok(next) => dir = next,
                Err(_) if !exists_at(&dir, part) => {
                    match mkdirat(
                        Some(dir.as_raw_fd()),
                        *part,
                        Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(errno_error(path, e)),
                    }
                    let next = self.open_beneath(&dir, &[part], OFlag::O_DIRECTORY, path)?;
                    self.give(&next);
                    dir = next;
                }
                Err(e) => return Err(e),
            }
        }
        let existing = match fstatat(
            Some(dir.as_raw_fd()),
            *name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => {
                match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
                    SFlag::S_IFREG => {}
                    SFlag::S_IFDIR => return Err(FileError::new(path, Problem::IsAFolder).into()),
                    SFlag::S_IFLNK => return Err(refused(path, Refusal::Symlink)),
                    _ => return Err(refused(path, Refusal::Special)),
                }
                Some(st.st_mode)
            }
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(errno_error(path, e)),
        };
        Ok(Target {
            dir,
            name: name.to_os_string(),
            existing,
        })
    }

    /// A new file beside `target` (its mode kept, set-id bits dropped), given to the sandbox user.
    fn replace(&self, target: Target, path: &str) -> Result<PendingWrite> {
        let temp = OsString::from(format!(".zcbot-write-{}", crate::text::random_id()));
        let fd = openat(
            Some(target.dir.as_raw_fd()),
            temp.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map(own)
        .map_err(|e| errno_error(path, e))?;
        let pending = PendingWrite {
            dir: target.dir,
            temp,
            name: target.name,
            fd,
            path: path.to_owned(),
            written: 0,
            done: false,
        };
        self.give(&pending.fd);
        if let Some(mode) = target.existing {
            let _ = nix::sys::stat::fchmod(
                pending.fd.as_raw_fd(),
                Mode::from_bits_truncate(mode & 0o7777 & !0o6000),
            );
        }
        Ok(pending)
    }

    /// Lists a folder (symlinks are reported as such, never followed), sorted by name: the first
    /// [`Limits::list_entries`] names, with `truncated` set when there are more or the budget ran
    /// out first.
    pub fn list_dir(&self, path: &str, budget: &mut Budget) -> Result<Listing> {
        let parts = self.parts(path)?;
        let root = self.open_root()?;
        let fd = self.open_beneath(&root, &parts, OFlag::O_RDONLY | OFlag::O_DIRECTORY, path)?;
        let keep = self.limits.list_entries;
        // The smallest `keep` names seen: a max-heap whose top is the first to give up.
        let mut names: BinaryHeap<OsString> = BinaryHeap::new();
        let mut truncated = false;
        let mut dir = walk::DirStream::open(&fd).map_err(|e| errno_error(path, e))?;
        loop {
            if let Err(stop) = budget.tick() {
                match stop {
                    Stop::Cancelled => return Err(budget.stopped(path, "listed nothing")),
                    Stop::Deadline | Stop::Entries => {
                        truncated = true;
                        break;
                    }
                }
            }
            let Some(name) = dir.next_name().map_err(|e| errno_error(path, e))? else {
                break;
            };
            names.push(name);
            if names.len() > keep {
                names.pop();
                truncated = true;
            }
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names.into_sorted_vec() {
            let st = match fstatat(
                Some(fd.as_raw_fd()),
                name.as_os_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue, // removed meanwhile
                Err(e) => return Err(errno_error(path, e)),
            };
            let kind = match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
                SFlag::S_IFREG => "file",
                SFlag::S_IFDIR => "dir",
                SFlag::S_IFLNK => "symlink",
                _ => "other",
            };
            out.push(DirEntry {
                name: name.to_string_lossy().into_owned(),
                kind: kind.to_owned(),
                size: st.st_size as u64,
            });
        }
        Ok(Listing {
            entries: out,
            truncated,
        })
    }

    /// Deletes a file, a symlink (not its target) or a folder with everything in it, charging
    /// every entry to `budget`; returns how many entries were removed. A folder deeper than
    /// [`Limits::max_depth`] is refused when the walk reaches the limit; what was removed before
    /// any stop stays removed, and the rest stays whole.
    pub fn delete_path(&self, path: &str, budget: &mut Budget) -> Result<u64> {
        let parts = self.parts(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(refused(path, Refusal::Workspace));
        };
        let root = self.open_root()?;
        let parent =
            self.open_beneath(&root, parents, OFlag::O_RDONLY | OFlag::O_DIRECTORY, path)?;
        walk::remove_tree(&parent, name, self.limits.max_depth, budget).map_err(|e| match e {
            walk::RemoveError::Errno(e, n) => FileError {
                deleted_before: n,
                ..FileError::errno(path, e)
            }
            .into(),
            walk::RemoveError::TooDeep(n) => limit_error(
                path,
                "folder depth",
                format!(
                    "the tree is deeper than {} levels ({n} entries were deleted before that); \
                     delete its deepest part from inside the sandbox (shell: rm -rf)",
                    self.limits.max_depth
                ),
            ),
            walk::RemoveError::Stopped(n) => budget.stopped(
                path,
                &format!("{n} entries deleted, the rest is still there"),
            ),
        })
    }

    /// Gives a file or folder the daemon created to the sandbox user, so it can change it.
    fn give(&self, fd: &OwnedFd) {
        let _ = fchown(
            fd.as_raw_fd(),
            Some(Uid::from_raw(self.uid)),
            Some(Gid::from_raw(self.gid)),
        );
    }
}

/// Where a write goes: the open parent folder, the name in it, and the mode of the regular file
/// there now, if any.
struct Target {
    dir: OwnedFd,
    name: OsString,
    existing: Option<nix::libc::mode_t>,
}

/// A file being written beside its target, renamed over it by [`PendingWrite::commit`]; dropped
/// before that (an error, a client gone, a stop), it is removed and the target stays as it was.
#[derive(Debug)]
pub struct PendingWrite {
    dir: OwnedFd,
    temp: OsString,
    name: OsString,
    fd: OwnedFd,
    path: String,
    written: u64,
    done: bool,
}

impl PendingWrite {
    /// Appends `bytes` (a full disk or quota fails here, with the target untouched).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        write_all(&self.fd, bytes).map_err(|e| errno_error(&self.path, e))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Puts the new file in the target's place; returns its size.
    pub fn commit(mut self) -> Result<u64> {
        nix::fcntl::renameat(
            Some(self.dir.as_raw_fd()),
            self.temp.as_os_str(),
            Some(self.dir.as_raw_fd()),
            self.name.as_os_str(),
        )
        .map_err(|e| errno_error(&self.path, e))?;
        self.done = true;
        Ok(self.written)
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if !self.done {
            let _ = unlinkat(
                Some(self.dir.as_raw_fd()),
                self.temp.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// Creates a user's host folder if missing and, with `owner`, gives it to that uid:gid. A symlink
/// or a non-folder in its place is refused: a bind mount or a file tool would follow it.
pub fn prepare_user_folder(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match std::fs::DirBuilder::new().mode(0o750).create(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("create user folder", path, e)),
            }
            std::fs::symlink_metadata(path)
                .map_err(|e| Error::io("inspect user folder", path, e))?
        }
        Err(e) => return Err(Error::io("inspect user folder", path, e)),
    };
    if !meta.file_type().is_dir() {
        return Err(Error::io(
            "use user folder",
            path,
            std::io::Error::other(
                "it is not a plain folder (a symlink or a file); refusing to use it",
            ),
        ));
    }
    if let Some((uid, gid)) = owner {
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| {
                Error::io(
                    "give the user folder to ZCBOT_SANDBOX_UID (run as root, or set ZCBOT_SANDBOX_UID to the folder's owner)",
                    path,
                    e,
                )
            })?;
        }
    }
    Ok(())
}

/// The size of the open file, or an error if it is not a regular file (a FIFO or a device must
/// never block or surprise the daemon).
fn regular_file_size(fd: &OwnedFd, path: &str) -> Result<u64> {
    let st = fstat(fd.as_raw_fd()).map_err(|e| errno_error(path, e))?;
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => Ok(st.st_size as u64),
        SFlag::S_IFDIR => Err(FileError::new(path, Problem::IsAFolder).into()),
        _ => Err(refused(path, Refusal::Special)),
    }
}

fn is_symlink_at(dir: &OwnedFd, name: &OsStr) -> bool {
    fstatat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
}

fn exists_at(dir: &OwnedFd, name: &OsStr) -> bool {
    fstatat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .is_ok()
}

fn write_all(fd: &OwnedFd, content: &[u8]) -> nix::Result<()> {
    let mut written = 0;
    while written < content.len() {
        match nix::unistd::write(fd, &content[written..]) {
            Ok(n) => written += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Turns a tool's path into components under the workspace: relative paths, or absolute ones
/// under `/workspace` (the agent sees that path in the container). `.` is dropped; `..` is
/// applied lexically and refused if it would climb above the workspace; NUL is refused.
pub fn normalize(path: &str) -> Result<Vec<&OsStr>> {
    if path.contains('\0') {
        return Err(FileError::new(path, Problem::Nul).into());
    }
    let rel = if let Some(rest) = path.strip_prefix("/workspace") {
        if !(rest.is_empty() || rest.starts_with('/')) {
            return Err(refused(path, Refusal::Absolute));
        }
        rest.trim_start_matches('/')
    } else if path.starts_with('/') {
        return Err(refused(path, Refusal::Absolute));
    } else {
        path
    };
    let mut parts: Vec<&OsStr> = Vec::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(refused(path, Refusal::Escape));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(path, Refusal::Absolute))
            }
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_container_and_relative_paths() {
        let n = |p| {
            normalize(p)
                .unwrap()
                .iter()
                .map(|s| s.to_str().unwrap())
                .collect::<Vec<_>>()
                .join("/")
        };
        assert_eq!(n("a/b.txt"), "a/b.txt");
        assert_eq!(n("/workspace/a/./b"), "a/b");
        assert_eq!(n("/workspace"), "");
        assert_eq!(n("a/../b"), "b");
        assert_eq!(n("."), "");
        for bad in ["../x", "/etc/passwd", "/workspacex/a", "a/../../x"] {
            assert_eq!(
                normalize(bad).unwrap_err().kind(),
                "path_refused",
                "{bad:?}"
            );
        }
        assert_eq!(normalize("a\0b").unwrap_err().kind(), "file");
    }
}
