//! Under gVisor only: a seccomp filter that refuses (EPERM) the system calls the sandbox's own
//! profile refuses most pointedly, for everything a call runs.
//!
//! Why: the daemon applies its profile (`src/seccomp.rs`) to the container, and runc enforces it
//! on every process, execs included. Debian's runsc binds it to the container's first process
//! only; every call is an exec, so there the tenant's code would reach gVisor's kernel without
//! it. This filter, stacked by the supervisor and the channel's helper (whose children inherit
//! it), carries the refusals into every call: io_uring, new namespaces (`clone`/`unshare` flags,
//! `setns`), the mount API, `bpf`, `userfaultfd`, keyrings, module and kexec calls, handles,
//! `process_vm_*`, `ptrace` attach, `personality` beyond the safe values, `syslog`, landlock,
//! `memfd_secret`. Under runc it is not installed: the container's profile already does more,
//! and `ZCBOT_SECCOMP=default` must keep the engine's profile alone.

use crate::bpf::{Asm, RET_ALLOW, RET_EPERM};

#[cfg(target_arch = "x86_64")]
mod nr {
    pub const ARCH: u32 = 0xC000_003E;
    /// x32 system calls carry this bit; gVisor has no x32 ABI: refuse them all.
    pub const X32_BIT: Option<u32> = Some(0x4000_0000);
    pub const CLONE: u32 = 56;
    pub const UNSHARE: u32 = 272;
    pub const PTRACE: u32 = 101;
    pub const PERSONALITY: u32 = 135;
    /// userfaultfd, bpf, perf_event_open, keyctl, add_key, request_key, kexec_load,
    /// kexec_file_load, init_module, finit_module, delete_module, open_by_handle_at,
    /// name_to_handle_at, mount, umount2, pivot_root, setns, process_vm_readv,
    /// process_vm_writev, syslog, kcmp.
    pub const ARCH_REFUSED: &[u32] = &[
        323, 321, 298, 250, 248, 249, 246, 320, 175, 313, 176, 304, 303, 165, 166, 155, 308, 310,
        311, 103, 312,
    ];
}

#[cfg(target_arch = "aarch64")]
mod nr {
    pub const ARCH: u32 = 0xC000_00B7;
    pub const X32_BIT: Option<u32> = None;
    pub const CLONE: u32 = 220;
    pub const UNSHARE: u32 = 97;
    pub const PTRACE: u32 = 117;
    pub const PERSONALITY: u32 = 92;
    /// The same calls as on x86_64, in the same order.
    pub const ARCH_REFUSED: &[u32] = &[
        282, 280, 241, 219, 217, 218, 104, 294, 105, 273, 106, 265, 264, 40, 39, 41, 268, 270, 271,
        116, 272,
    ];
}

/// Numbered alike on every architecture (the unified table, Linux 5.1 on): io_uring_setup,
/// io_uring_enter, io_uring_register, open_tree, move_mount, fsopen, fsconfig, fsmount, fspick,
/// pidfd_getfd, mount_setattr, landlock_create_ruleset, landlock_add_rule,
/// landlock_restrict_self, memfd_secret.
const COMMON_REFUSED: &[u32] = &[
    425, 426, 427, 428, 429, 430, 431, 432, 433, 438, 442, 444, 445, 446, 447,
];

/// CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID |
/// CLONE_NEWNET; `unshare` adds CLONE_NEWTIME.
const CLONE_NAMESPACES: u32 = 0x7E02_0000;
const UNSHARE_NAMESPACES: u32 = CLONE_NAMESPACES | 0x80;
const PTRACE_ATTACH: u32 = 16;
const PTRACE_SEIZE: u32 = 0x4206;

/// The filter program.
pub fn program() -> Vec<libc::sock_filter> {
    let mut a = Asm::default();
    let (deny, allow) = (a.label(), a.label());
    let (clone, unshare, ptrace, personality) = (a.label(), a.label(), a.label(), a.label());
    a.load_arch();
    // Another architecture (32-bit entry on a 64-bit host): gVisor has none; refuse.
    a.jeq(nr::ARCH, None, Some(deny));
    a.load_nr();
    if let Some(bit) = nr::X32_BIT {
        a.jset(bit, Some(deny), None);
    }
    for &n in COMMON_REFUSED.iter().chain(nr::ARCH_REFUSED) {
        a.jeq(n, Some(deny), None);
    }
    a.jeq(nr::CLONE, Some(clone), None);
    a.jeq(nr::UNSHARE, Some(unshare), None);
    a.jeq(nr::PTRACE, Some(ptrace), None);
    a.jeq(nr::PERSONALITY, Some(personality), None);
    a.ret(RET_ALLOW);

    a.bind(clone);
    a.load_arg_lo(0);
    a.jset(CLONE_NAMESPACES, Some(deny), Some(allow));
    a.bind(unshare);
    a.load_arg_lo(0);
    a.jset(UNSHARE_NAMESPACES, Some(deny), Some(allow));
    a.bind(ptrace);
    a.load_arg_lo(0);
    a.jeq(PTRACE_ATTACH, Some(deny), None);
    a.jeq(PTRACE_SEIZE, Some(deny), Some(allow));
    a.bind(personality);
    // The kernel reads an unsigned int: the low half is all that counts.
    a.load_arg_lo(0);
    a.jeq(0, Some(allow), None);
    a.jeq(0xFFFF_FFFF, Some(allow), Some(deny));

    a.bind(allow);
    a.ret(RET_ALLOW);
    a.bind(deny);
    a.ret(RET_EPERM);
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno_of(rc: libc::c_long) -> i32 {
        if rc >= 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        }
    }

    /// In a forked child (a filter cannot be removed): the refused calls answer EPERM, the
    /// allowed forms of the filtered ones do not; the same calls before the filter are the
    /// positive control.
    #[test]
    fn refused_calls_answer_eperm_and_their_safe_forms_pass() {
        let prog = program();
        // No allocation in here: the forked child calls it, and the test runs threaded.
        // Harmless if let through: the test runs as root on the host, so nothing here may do
        // anything real unfiltered (ptrace targets a pid that cannot exist, 2^30 + 1 > pid_max).
        let probe = || -> [i32; 7] {
            // SAFETY: system calls with integer arguments (and null pointers the kernel checks);
            // none writes our memory.
            unsafe {
                [
                    errno_of(libc::syscall(libc::SYS_unshare, 0x1000_0000)),
                    errno_of(libc::syscall(libc::SYS_unshare, 0)),
                    errno_of(libc::syscall(libc::SYS_io_uring_setup, 0, 0)),
                    errno_of(libc::syscall(libc::SYS_personality, 0xFFFF_FFFFu32)),
                    errno_of(libc::syscall(
                        libc::SYS_ptrace,
                        PTRACE_ATTACH,
                        (1 << 30) + 1,
                        0,
                        0,
                    )),
                    errno_of(libc::syscall(libc::SYS_setns, -1, 0)),
                    errno_of(libc::syscall(libc::SYS_personality, 8)),
                ]
            }
        };
        crate::filter::assert_in_child(|| {
            // The positive control, unfiltered: the kernel's own answers, not EPERM
            // (io_uring_setup(0, NULL): EINVAL or EFAULT; ptrace of no process: ESRCH; setns(-1):
            // EBADF).
            // SAFETY: as in probe.
            let before = unsafe {
                [
                    errno_of(libc::syscall(libc::SYS_io_uring_setup, 0, 0)),
                    errno_of(libc::syscall(
                        libc::SYS_ptrace,
                        PTRACE_ATTACH,
                        (1 << 30) + 1,
                        0,
                        0,
                    )),
                    errno_of(libc::syscall(libc::SYS_setns, -1, 0)),
                ]
            };
            let loaded = crate::filter::load(&prog).is_ok();
            let after = probe();
            let eperm = libc::EPERM;
            loaded
                && before[0] != eperm
                && before[1] == libc::ESRCH
                && before[2] == libc::EBADF
                && after[0] == eperm // unshare(CLONE_NEWUSER)
                && after[1] == 0 // unshare(0)
                && after[2] == eperm // io_uring_setup
                && after[3] != eperm // personality(query)
                && after[4] == eperm // ptrace(PTRACE_ATTACH)
                && after[5] == eperm // setns
                && after[6] == eperm // personality(PER_LINUX32)
        });
    }
}
