//! Per-user disk quotas, enforced by the kernel through btrfs subvolumes and qgroups.
//!
//! This kernel has no `CONFIG_QUOTA` (ext4 and XFS quotas are refused at mount), but btrfs
//! qgroups work: each user folder is a subvolume, and its qgroup (`0/<subvolume id>`) carries a
//! limit on referenced bytes. The kernel refuses a write past it (`EDQUOT`), whoever writes: code
//! in the sandbox through the bind mount, or the host's file tools. Everything here is an ioctl
//! on a descriptor; nothing shells out to `btrfs`.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;

const BTRFS_IOCTL_MAGIC: u8 = 0x94;
const BTRFS_PATH_NAME_MAX: usize = 4087;
/// `statfs` magic of btrfs.
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
/// The inode number of every subvolume's root directory.
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;
const BTRFS_QGROUP_LIMIT_MAX_RFER: u64 = 1;

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; BTRFS_PATH_NAME_MAX + 1],
}

#[repr(C)]
#[derive(Default)]
struct QgroupLimit {
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

#[repr(C)]
#[derive(Default)]
struct QgroupLimitArgs {
    qgroupid: u64,
    lim: QgroupLimit,
}

nix::ioctl_write_ptr!(subvol_create, BTRFS_IOCTL_MAGIC, 14, VolArgs);
nix::ioctl_write_ptr!(snap_destroy, BTRFS_IOCTL_MAGIC, 15, VolArgs);
// The kernel declares this one _IOR although it reads the argument.
nix::ioctl_read!(qgroup_limit, BTRFS_IOCTL_MAGIC, 43, QgroupLimitArgs);

fn vol_args(name: &CStr) -> Result<Box<VolArgs>, Errno> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes.len() > BTRFS_PATH_NAME_MAX || bytes.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    let mut args = Box::new(VolArgs {
        fd: 0,
        name: [0; BTRFS_PATH_NAME_MAX + 1],
    });
    args.name[..bytes.len()].copy_from_slice(bytes);
    Ok(args)
}

/// Whether the folder open at `dir` lies on btrfs.
pub fn is_btrfs(dir: &OwnedFd) -> bool {
    nix::sys::statfs::fstatfs(dir).is_ok_and(|s| s.filesystem_type().0 == BTRFS_SUPER_MAGIC)
}

/// Whether the folder open at `dir` is the root of a btrfs subvolume.
pub fn is_subvolume(dir: &OwnedFd) -> bool {
    is_btrfs(dir)
        && nix::sys::stat::fstat(dir.as_raw_fd())
            .is_ok_and(|st| st.st_ino == BTRFS_FIRST_FREE_OBJECTID)
}

/// Creates the subvolume `name` in the folder open at `parent` (like `mkdir`, owned by root,
/// mode 0755: the caller gives it to its user).
pub fn create_subvolume(parent: &OwnedFd, name: &CStr) -> Result<(), Errno> {
    let args = vol_args(name)?;
    // SAFETY: parent is an open descriptor; args points to a fully initialised VolArgs that
    // outlives the call, with a NUL-terminated name as the kernel expects.
    unsafe { subvol_create(parent.as_raw_fd(), &*args) }.map(drop)
}

/// Deletes the (empty or not) subvolume `name` in the folder open at `parent`.
pub fn destroy_subvolume(parent: &OwnedFd, name: &CStr) -> Result<(), Errno> {
    let args = vol_args(name)?;
    // SAFETY: as in create_subvolume.
    unsafe { snap_destroy(parent.as_raw_fd(), &*args) }.map(drop)
}

/// Limits the bytes the subvolume open at `subvolume` may reference (its own qgroup). `ENOTCONN`
/// means quotas are not enabled on that file system.
pub fn set_limit(subvolume: &OwnedFd, bytes: u64) -> Result<(), Errno> {
    let mut args = QgroupLimitArgs {
        qgroupid: 0, // 0: the qgroup of the subvolume the descriptor is in
        lim: QgroupLimit {
            flags: BTRFS_QGROUP_LIMIT_MAX_RFER,
            max_rfer: bytes,
            ..Default::default()
        },
    };
    // SAFETY: subvolume is an open descriptor; args is a valid, initialised struct of the size
    // the request encodes, living across the call.
    unsafe { qgroup_limit(subvolume.as_raw_fd(), &mut args) }.map(drop)
}

/// What the probe found: can this folder hold per-user quotas?
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// btrfs with quotas enabled: a subvolume per user, with a qgroup limit.
    Btrfs,
    /// Not possible here, and why (in words for an operator).
    Unavailable(String),
}

/// Tries, on the folder open at `root` (named `shown` in messages), exactly what a user folder
/// needs: a subvolume with a qgroup limit. The probe subvolume `probe_name` is removed afterwards.
pub fn probe(root: &OwnedFd, shown: &str, probe_name: &CStr) -> Support {
    if !is_btrfs(root) {
        let fs = nix::sys::statfs::fstatfs(root)
            .map(|s| format!("{:#x}", s.filesystem_type().0))
            .unwrap_or_else(|_| "unknown".into());
        return Support::Unavailable(format!(
            "{shown} is not on btrfs (file system magic {fs}); this kernel enforces per-user \
             quotas only with btrfs qgroups: see RUN.md to prepare a users root"
        ));
    }
    // A leftover probe of a crashed run is removed first.
    let _ = destroy_subvolume(root, probe_name);
    if let Err(e) = create_subvolume(root, probe_name) {
        return Support::Unavailable(format!(
            "could not create a btrfs subvolume in {shown}: {} (the daemon must run as root)",
            e.desc()
        ));
    }
    let limited = nix::fcntl::openat(
        Some(root.as_raw_fd()),
        probe_name,
        nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map(|fd| {
        // SAFETY: fd was just returned by a successful open and is owned by no one else.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    })
    .and_then(|fd| set_limit(&fd, 1 << 30));
    let _ = destroy_subvolume(root, probe_name);
    match limited {
        Ok(()) => Support::Btrfs,
        Err(Errno::ENOTCONN) => Support::Unavailable(format!(
            "btrfs quotas are not enabled on the file system of {shown} (btrfs quota enable <mount point>)"
        )),
        Err(e) => Support::Unavailable(format!(
            "could not set a qgroup limit in {shown}: {}",
            e.desc()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // The values of BTRFS_IOC_SUBVOL_CREATE, BTRFS_IOC_SNAP_DESTROY and BTRFS_IOC_QGROUP_LIMIT
        // as the kernel's headers define them.
        assert_eq!(
            nix::request_code_write!(BTRFS_IOCTL_MAGIC, 14, std::mem::size_of::<VolArgs>()),
            0x5000_940e
        );
        assert_eq!(
            nix::request_code_write!(BTRFS_IOCTL_MAGIC, 15, std::mem::size_of::<VolArgs>()),
            0x5000_940f
        );
        assert_eq!(
            nix::request_code_read!(
                BTRFS_IOCTL_MAGIC,
                43,
                std::mem::size_of::<QgroupLimitArgs>()
            ),
            0x8030_942b
        );
    }

    #[test]
    fn names_with_a_slash_or_empty_are_refused() {
        assert_eq!(vol_args(c"a/b").err(), Some(Errno::EINVAL));
        assert_eq!(vol_args(c"").err(), Some(Errno::EINVAL));
        assert!(vol_args(c"alice").is_ok());
    }
}
