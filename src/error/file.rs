//! Why a file call failed, from the errno or the path rule that stopped it. Typed, because a
//! caller branches on the class (create what is missing, never retry a refusal, make room when
//! the folder is full, report an I/O error) and the API answers each class with its own status.

use nix::errno::Errno;

/// A file tool's failure on one path. What the call did before it stands (a delete says how
/// much); nothing else changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}{}", deleted_note(*deleted_before))]
pub struct FileError {
    /// The path as the caller gave it (at most 256 bytes of it).
    pub path: String,
    /// What went wrong.
    pub problem: Problem,
    /// Entries a `delete_path` removed before it failed (0: none).
    pub deleted_before: u64,
}

fn deleted_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} entries were deleted before that)")
    }
}

/// The class of a file failure; [`Problem::kind`] is the API's `error.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// Nothing at the path (`ENOENT`).
    #[error("no such file or folder")]
    NotFound,
    /// The path may not be used: it leaves the workspace, or names what the tools never touch.
    #[error("{0}; refused")]
    Refused(Refusal),
    /// The user's folder (its quota) or the disk is full (`EDQUOT`, `ENOSPC`).
    #[error("the user's folder is full (its disk quota, ZCBOT_SANDBOX_DISK, is used up, or the disk is full); nothing was written: delete files to make room")]
    DiskFull,
    /// A component before the last is a file (`ENOTDIR`).
    #[error("a component of the path is not a folder")]
    NotAFolder,
    /// The call wants a file and the path is a folder (`EISDIR`, or found so).
    #[error("it is a folder")]
    IsAFolder,
    /// The path contains a NUL byte.
    #[error("the path contains a NUL byte")]
    Nul,
    /// A name in the path is longer than the file system allows (`ENAMETOOLONG`).
    #[error("a name in the path is longer than 255 bytes")]
    NameTooLong,
    /// Something appeared there meanwhile (`EEXIST`): the sandbox changes the tree as the call
    /// runs. Running the call again may succeed.
    #[error("it already exists (created meanwhile); run the call again")]
    Exists,
    /// A folder being deleted gained entries meanwhile (`ENOTEMPTY`).
    #[error("the folder is not empty (entries were added meanwhile); run the call again")]
    NotEmpty,
    /// Any other I/O error on the host: not the caller's doing.
    #[error("{} (an error on the host; try again, or tell the operator if it persists)", .0.desc())]
    Io(Errno),
}

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `..` above the workspace, or a symlink that leaves it (`EXDEV`, `ELOOP` from the
    /// confined resolution; the fallback refuses every symlink).
    #[error("it leads outside the workspace (through '..' or a symlink)")]
    Escape,
    /// An absolute path not under `/workspace`.
    #[error("absolute paths must be under /workspace")]
    Absolute,
    /// A write whose last component is a symlink: never written through.
    #[error("it is a symlink, which a write never follows")]
    Symlink,
    /// A device, FIFO or socket: the tools read and write regular files only (a FIFO could
    /// block the daemon, a device reach the host).
    #[error("it is not a regular file (a device, a FIFO or a socket)")]
    Special,
    /// The workspace folder itself cannot be written as a file or deleted.
    #[error("that is the workspace folder itself")]
    Workspace,
    /// The host refused access (`EACCES`, `EPERM`).
    #[error("permission denied on the host")]
    Permission,
}

impl Problem {
    /// The class of an errno from a file operation.
    pub fn from_errno(e: Errno) -> Self {
        match e {
            Errno::ENOENT => Problem::NotFound,
            Errno::EXDEV | Errno::ELOOP => Problem::Refused(Refusal::Escape),
            Errno::EDQUOT | Errno::ENOSPC => Problem::DiskFull,
            Errno::ENOTDIR => Problem::NotAFolder,
            Errno::EISDIR => Problem::IsAFolder,
            Errno::ENAMETOOLONG => Problem::NameTooLong,
            Errno::EEXIST => Problem::Exists,
            Errno::ENOTEMPTY => Problem::NotEmpty,
            Errno::EACCES | Errno::EPERM => Problem::Refused(Refusal::Permission),
            // open(2) of a socket, or of a FIFO/device with no one at the other end.
            Errno::ENXIO | Errno::ENODEV => Problem::Refused(Refusal::Special),
            other => Problem::Io(other),
        }
    }

    /// The API's `error.kind`: `not_found` (404), `path_refused` (403), `disk_full` (507),
    /// `file_conflict` (409), `io` (500), and `file` (400) for a path the call cannot act on.
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::NotFound => "not_found",
            Problem::Refused(_) => "path_refused",
            Problem::DiskFull => "disk_full",
            Problem::Exists | Problem::NotEmpty => "file_conflict",
            Problem::Io(_) => "io",
            Problem::NotAFolder | Problem::IsAFolder | Problem::Nul | Problem::NameTooLong => {
                "file"
            }
        }
    }
}

impl FileError {
    /// `problem` on `path` (shortened for messages).
    pub fn new(path: &str, problem: Problem) -> Self {
        FileError {
            path: shorten(path),
            problem,
            deleted_before: 0,
        }
    }

    /// `path` refused for `why`.
    pub fn refused(path: &str, why: Refusal) -> Self {
        FileError::new(path, Problem::Refused(why))
    }

    /// The errno `e` on `path`.
    pub fn errno(path: &str, e: Errno) -> Self {
        FileError::new(path, Problem::from_errno(e))
    }

    /// The API's `error.kind` (see [`Problem::kind`]).
    pub fn kind(&self) -> &'static str {
        self.problem.kind()
    }
}

/// A tenant's path as shown in errors: at most 256 bytes of it.
pub(crate) fn shorten(path: &str) -> String {
    if path.len() <= 256 {
        return path.to_owned();
    }
    let mut cut = 256;
    while !path.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}... ({} bytes)", &path[..cut], path.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_errno_class_has_its_kind() {
        for (errno, kind) in [
            (Errno::ENOENT, "not_found"),
            (Errno::EXDEV, "path_refused"),
            (Errno::ELOOP, "path_refused"),
            (Errno::EACCES, "path_refused"),
            (Errno::EPERM, "path_refused"),
            (Errno::ENXIO, "path_refused"),
            (Errno::EDQUOT, "disk_full"),
            (Errno::ENOSPC, "disk_full"),
            (Errno::ENOTDIR, "file"),
            (Errno::EISDIR, "file"),
            (Errno::ENAMETOOLONG, "file"),
            (Errno::EEXIST, "file_conflict"),
            (Errno::ENOTEMPTY, "file_conflict"),
            (Errno::EIO, "io"),
            (Errno::EMFILE, "io"),
            (Errno::EROFS, "io"),
        ] {
            assert_eq!(FileError::errno("p", errno).kind(), kind, "{errno}");
        }
    }

    #[test]
    fn messages_name_the_path_the_class_and_what_to_do() {
        let e = FileError::errno("a/b", Errno::EDQUOT);
        assert!(
            e.to_string().starts_with("a/b: the user's folder is full")
                && e.to_string().contains("delete files to make room"),
            "{e}"
        );
        let e = FileError::errno("x", Errno::EXDEV);
        assert_eq!(
            e.to_string(),
            "x: it leads outside the workspace (through '..' or a symlink); refused"
        );
        let e = FileError::errno("x", Errno::EIO);
        assert!(e.to_string().contains("tell the operator"), "{e}");
        let mut e = FileError::errno("t", Errno::ENOTEMPTY);
        e.deleted_before = 7;
        assert!(
            e.to_string()
                .ends_with("(7 entries were deleted before that)"),
            "{e}"
        );
    }

    #[test]
    fn a_long_path_is_shortened_at_a_character_boundary() {
        let long = "é".repeat(300);
        let e = FileError::errno(&long, Errno::ENOENT);
        assert!(
            e.path.len() < 300 && e.path.ends_with("(600 bytes)"),
            "{}",
            e.path
        );
    }
}
