//! A seccomp filter stacked on the engine's profile for everything a call runs: it refuses
//! (EPERM) the btrfs ioctls that create a subvolume or a snapshot.
//!
//! Why: the user's folder is a btrfs subvolume whose qgroup carries the disk quota, and btrfs lets
//! any user create a subvolume in a folder it can write (and snapshot a subvolume it owns). A
//! nested subvolume gets a qgroup of its own, outside the user's limit: without this filter a
//! tenant could write past its quota (measured: 60 MiB into a nested subvolume of a 20 MiB one).
//! Stacked filters only tighten: the kernel runs every filter and the most restrictive answer
//! wins, so the engine's own profile stays in force underneath. Other btrfs ioctls (FICLONE for
//! `cp --reflink`, say) are left alone.

/// The ioctl requests refused: BTRFS_IOC_SNAP_CREATE, BTRFS_IOC_SUBVOL_CREATE,
/// BTRFS_IOC_SNAP_CREATE_V2, BTRFS_IOC_SUBVOL_CREATE_V2 (`_IOW(0x94, nr, 4096 bytes)`).
pub const REFUSED_IOCTLS: [u32; 4] = [0x5000_9401, 0x5000_940e, 0x5000_9417, 0x5000_9418];

#[cfg(target_arch = "x86_64")]
mod arch {
    /// AUDIT_ARCH_X86_64, with ioctl's numbers: native, and x32 (`__X32_SYSCALL_BIT | 514`).
    pub const NATIVE: u32 = 0xC000_003E;
    pub const NATIVE_IOCTL: &[u32] = &[16, 0x4000_0202];
    /// AUDIT_ARCH_I386 (int 0x80 from a 64-bit process), ioctl = 54.
    pub const COMPAT: u32 = 0x4000_0003;
    pub const COMPAT_IOCTL: u32 = 54;
}

#[cfg(target_arch = "aarch64")]
mod arch {
    /// AUDIT_ARCH_AARCH64, ioctl = 29.
    pub const NATIVE: u32 = 0xC000_00B7;
    pub const NATIVE_IOCTL: &[u32] = &[29];
    /// AUDIT_ARCH_ARM, ioctl = 54.
    pub const COMPAT: u32 = 0x4000_0028;
    pub const COMPAT_IOCTL: u32 = 54;
}

// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// The low 32 bits of args[1] (little-endian): an ioctl request is an unsigned int.
const OFF_ARG1_LO: u32 = 24;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// The filter program.
pub fn program() -> Vec<libc::sock_filter> {
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let mut p = Vec::new();
    // The request check, shared by every arch: jump here with the syscall known to be ioctl.
    let mut check = vec![stmt(ld, OFF_ARG1_LO)];
    for (i, req) in REFUSED_IOCTLS.iter().enumerate() {
        // Match: jump to DENY, which follows the ALLOW after the last comparison.
        let to_deny = (REFUSED_IOCTLS.len() - i) as u8;
        check.push(jeq(*req, to_deny, 0));
    }
    check.push(stmt(ret, RET_ALLOW));
    check.push(stmt(ret, RET_ERRNO | libc::EPERM as u32));

    // Which ioctl numbers count for the arch at hand.
    let native: Vec<u32> = arch::NATIVE_IOCTL.to_vec();
    // Layout: [0] ld arch; [1] jeq NATIVE -> [4]; [2] jeq COMPAT -> compat block; [3] allow;
    // [4] ld nr; one jeq per native ioctl number -> check; allow; compat block: ld nr; jeq -> check;
    // allow; then the check.
    let native_len = 1 + native.len() + 1;
    let compat_len = 3;
    // [0] ld arch
    p.push(stmt(ld, OFF_ARCH));
    // [1] jeq NATIVE -> [4], else [2]
    p.push(jeq(arch::NATIVE, 2, 0));
    // [2] jeq COMPAT -> [4 + native_len], else [3]
    p.push(jeq(arch::COMPAT, (1 + native_len) as u8, 0));
    // [3] other arch: allow
    p.push(stmt(ret, RET_ALLOW));
    // [4 ..] native: ld nr; jeq each -> check; allow
    p.push(stmt(ld, OFF_NR));
    for (i, nr) in native.iter().enumerate() {
        // From this jeq, check starts after: the remaining jeqs, the allow, and the compat block.
        let to_check = (native.len() - 1 - i) + 1 + compat_len;
        p.push(jeq(*nr, to_check as u8, 0));
    }
    p.push(stmt(ret, RET_ALLOW));
    // compat: ld nr; jeq 54 -> check; allow
    p.push(stmt(ld, OFF_NR));
    p.push(jeq(arch::COMPAT_IOCTL, 1, 0));
    p.push(stmt(ret, RET_ALLOW));
    p.extend(check);
    p
}

/// Installs the filter on the calling thread (inherited by every child from here on), and under
/// gVisor the surface filter too (see `surface.rs`). Sets
/// no_new_privs first, as the kernel requires of an unprivileged process (the engine has set it
/// already: `no-new-privileges`). Returns the OS error if the kernel refused.
pub fn install() -> std::io::Result<()> {
    load(&program())?;
    if under_gvisor() {
        load(&crate::surface::program())?;
    }
    Ok(())
}

/// Whether this process runs on gVisor's kernel: its procfs has this file, Linux's never does,
/// and the tenant cannot make one.
pub fn under_gvisor() -> bool {
    std::path::Path::new("/proc/sentry-meminfo").exists()
}

/// Installs `prog`: no allocation, so a forked child of a threaded process (the test) may call it.
pub(crate) fn load(prog: &[libc::sock_filter]) -> std::io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only; prctl touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fprog points to a valid program that outlives the call; the kernel copies it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `check` in a forked child (a filter cannot be removed, so tests load theirs there) and
/// asserts it held. `check` must not allocate or take a lock: the tests run threaded.
#[cfg(test)]
pub(crate) fn assert_in_child(check: impl FnOnce() -> bool) {
    // SAFETY: fork; the child only runs `check` (system calls on memory prepared before the fork,
    // no allocation, no lock another test thread could hold) and exits with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ok = check();
        // SAFETY: leaving the forked child without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a child process (the filter cannot be removed): a refused request answers EPERM
    /// before any file system sees it, other requests reach the kernel as before.
    #[test]
    fn refused_ioctls_answer_eperm_and_others_pass() {
        let fd = std::fs::File::open("/dev/null").unwrap();
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        // No allocation in here: the forked child below calls it, and the test runs threaded.
        let errno_of = |req: u32| {
            let mut buf = [0u8; 4096];
            // SAFETY: an ioctl on our own descriptor with a 4096-byte buffer that outlives it.
            let rc = unsafe { libc::ioctl(raw, req as _, buf.as_mut_ptr()) };
            if rc == 0 {
                0
            } else {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
            }
        };
        // The positive control: without the filter /dev/null says "not a tty"-like ENOTTY.
        assert_eq!(errno_of(REFUSED_IOCTLS[1]), libc::ENOTTY);
        let prog = program();
        assert_in_child(|| {
            load(&prog).is_ok()
                && REFUSED_IOCTLS.iter().all(|r| errno_of(*r) == libc::EPERM)
                && errno_of(0x5000_940f) == libc::ENOTTY // SNAP_DESTROY: not refused
                && errno_of(libc::FIONREAD as u32) != libc::EPERM
        });
    }
}
