//! The sandbox's own seccomp profile: an allowlist written for what a sandbox runs (sh,
//! coreutils, python, pip, compilers and interpreters a tenant installs), applied inline to every
//! sandbox container.
//!
//! A sandbox's code talks straight to the host kernel (under runc), so every system call it may
//! make is attack surface that no capability drop or network rule covers. The engine's default
//! profile on Docker 20.10 still allows `io_uring_*`, `memfd_secret` and `landlock_*`, every socket
//! family the kernel has and every ioctl. This profile allows the calls below and nothing else;
//! each group says why it is needed. Everything not allowed fails with `EPERM` (the engine's
//! `SCMP_ACT_ERRNO` default), not a kill, so a program fails clearly; only a call through another
//! architecture's entry (x32, `int 0x80`) is killed (SIGSYS), as libseccomp does with a foreign
//! architecture. Calls newer than the
//! profile's newest known call get `ENOSYS` from runc, so libraries fall back as on an old kernel.
//!
//! Calls allowed only with some arguments (an argument filter, checked by the kernel):
//! - `clone` without namespace flags; `unshare` without namespace flags; `clone3` gets `ENOSYS`
//!   (its flags sit in memory, where seccomp cannot look), so glibc falls back to `clone`. Under
//!   gVisor `clone3` is allowed: gVisor ignores a rule's errno (EPERM would break every thread)
//!   and serves the call in its own kernel.
//! - `socket` for Unix, IPv4 and IPv6 streams (TCP) and datagrams (UDP, ping) and route netlink only
//!   (plus netfilter netlink when the container's entry installs its own rules); `socketpair` for
//!   Unix only.
//! - `ptrace` for tracing one's own children (`PTRACE_TRACEME` and the requests a tracer sends
//!   its tracee): `PTRACE_ATTACH`/`PTRACE_SEIZE` of another process are refused.
//! - `personality` for Linux and the query only.
//!
//! DESIGN.md ("The seccomp profile") has the table of what is refused and why.

use serde_json::{json, Value};

use crate::config::Runtime;

/// A group of calls allowed without condition, with the reason a sandbox needs them.
pub struct Group {
    /// What the group is for (goes into the profile's `comment`, shown by `docker inspect`).
    pub why: &'static str,
    /// The calls, by their kernel names.
    pub names: &'static [&'static str],
}

/// The calls allowed without condition, on every architecture.
pub const ALLOWED: &[Group] = &[
    Group {
        why: "read, write and manage open descriptors: every program",
        names: &[
            "read",
            "write",
            "readv",
            "writev",
            "pread64",
            "pwrite64",
            "preadv",
            "pwritev",
            "preadv2",
            "pwritev2",
            "close",
            "close_range",
            "dup",
            "dup3",
            "fcntl",
            "flock",
            "lseek",
            "pipe2",
            "sendfile",
            "splice",
            "tee",
            "vmsplice",
            "copy_file_range",
        ],
    },
    Group {
        why: "device and file controls (terminals, FIONREAD, file flags, FICLONE); the btrfs \
              subvolume ioctls are refused by the supervisor's own stacked filter",
        names: &["ioctl"],
    },
    Group {
        why: "open, create, inspect and change files and folders (the workspace, /tmp)",
        names: &[
            "openat",
            "openat2",
            "newfstatat",
            "fstat",
            "statx",
            "statfs",
            "fstatfs",
            "faccessat",
            "faccessat2",
            "getdents64",
            "getcwd",
            "chdir",
            "fchdir",
            "renameat",
            "renameat2",
            "mkdirat",
            "unlinkat",
            "linkat",
            "symlinkat",
            "readlinkat",
            "fchmod",
            "fchmodat",
            "fchmodat2",
            "fchown",
            "fchownat",
            "umask",
            "utimensat",
            "mknodat",
            "truncate",
            "ftruncate",
            "fallocate",
            "fadvise64",
            "readahead",
            "fsync",
            "fdatasync",
            "sync_file_range",
            "getxattr",
            "lgetxattr",
            "fgetxattr",
            "setxattr",
            "lsetxattr",
            "fsetxattr",
            "listxattr",
            "llistxattr",
            "flistxattr",
            "removexattr",
            "lremovexattr",
            "fremovexattr",
        ],
    },
    Group {
        why: "wait for descriptors, timers and signals as descriptors (event loops: asyncio, node)",
        names: &[
            "ppoll",
            "pselect6",
            "epoll_create1",
            "epoll_ctl",
            "epoll_pwait",
            "epoll_pwait2",
            "eventfd2",
            "signalfd4",
            "timerfd_create",
            "timerfd_settime",
            "timerfd_gettime",
            "inotify_init1",
            "inotify_add_watch",
            "inotify_rm_watch",
        ],
    },
    Group {
        why: "memory: allocators, loaders, JITs and shared memory inside the sandbox",
        names: &[
            "brk",
            "mmap",
            "munmap",
            "mremap",
            "mprotect",
            "madvise",
            "mincore",
            "msync",
            "mlock",
            "mlock2",
            "munlock",
            "mlockall",
            "munlockall",
            "membarrier",
            "memfd_create",
            "pkey_alloc",
            "pkey_free",
            "pkey_mprotect",
            "get_mempolicy",
            "map_shadow_stack",
            "mseal",
        ],
    },
    Group {
        why: "run programs and threads, wait for them, exit",
        names: &[
            "execve",
            "execveat",
            "exit",
            "exit_group",
            "wait4",
            "waitid",
            "set_tid_address",
            "set_robust_list",
            "get_robust_list",
            "futex",
            "futex_waitv",
            "futex_wake",
            "futex_wait",
            "futex_requeue",
            "rseq",
            "prctl",
            "seccomp",
            "restart_syscall",
        ],
    },
    Group {
        why: "identities and sessions: the supervisor's own session, shells' job control, \
              programs dropping privileges they never had",
        names: &[
            "getpid",
            "getppid",
            "gettid",
            "getpgid",
            "setpgid",
            "getsid",
            "setsid",
            "getuid",
            "geteuid",
            "getgid",
            "getegid",
            "getresuid",
            "getresgid",
            "getgroups",
            "setuid",
            "setgid",
            "setreuid",
            "setregid",
            "setresuid",
            "setresgid",
            "setgroups",
            "setfsuid",
            "setfsgid",
            "capget",
            "capset",
        ],
    },
    Group {
        why: "signals: timeouts and cancels stop whole process trees with them",
        names: &[
            "kill",
            "tkill",
            "tgkill",
            "rt_sigaction",
            "rt_sigprocmask",
            "rt_sigreturn",
            "rt_sigpending",
            "rt_sigsuspend",
            "rt_sigtimedwait",
            "rt_sigqueueinfo",
            "rt_tgsigqueueinfo",
            "sigaltstack",
            "pidfd_open",
            "pidfd_send_signal",
        ],
    },
    Group {
        why: "time and sleeping (reading clocks only; setting them is refused)",
        names: &[
            "clock_gettime",
            "clock_getres",
            "clock_nanosleep",
            "nanosleep",
            "gettimeofday",
            "getitimer",
            "setitimer",
            "timer_create",
            "timer_settime",
            "timer_gettime",
            "timer_getoverrun",
            "timer_delete",
        ],
    },
    Group {
        why: "scheduling, limits and facts about the machine (nproc, ulimit, uname, os.cpu_count)",
        names: &[
            "sched_yield",
            "sched_getaffinity",
            "sched_setaffinity",
            "sched_getparam",
            "sched_setparam",
            "sched_getscheduler",
            "sched_setscheduler",
            "sched_get_priority_max",
            "sched_get_priority_min",
            "sched_rr_get_interval",
            "sched_getattr",
            "sched_setattr",
            "getpriority",
            "setpriority",
            "ioprio_get",
            "ioprio_set",
            "getrlimit",
            "setrlimit",
            "prlimit64",
            "getrusage",
            "times",
            "sysinfo",
            "uname",
            "getcpu",
            "getrandom",
        ],
    },
    Group {
        why: "sockets once made (which sockets may be made is filtered below)",
        names: &[
            "bind",
            "listen",
            "accept",
            "accept4",
            "connect",
            "getsockname",
            "getpeername",
            "sendto",
            "recvfrom",
            "sendmsg",
            "recvmsg",
            "sendmmsg",
            "recvmmsg",
            "setsockopt",
            "getsockopt",
            "shutdown",
        ],
    },
    Group {
        why: "System V and POSIX IPC, in the sandbox's private IPC namespace (multiprocessing)",
        names: &[
            "shmget",
            "shmat",
            "shmdt",
            "shmctl",
            "semget",
            "semop",
            "semtimedop",
            "semctl",
            "msgget",
            "msgsnd",
            "msgrcv",
            "msgctl",
            "mq_open",
            "mq_unlink",
            "mq_timedsend",
            "mq_timedreceive",
            "mq_notify",
            "mq_getsetattr",
        ],
    },
    Group {
        why: "the kernel's asynchronous I/O (not io_uring): databases and some Python wheels",
        names: &[
            "io_setup",
            "io_destroy",
            "io_submit",
            "io_cancel",
            "io_getevents",
            "io_pgetevents",
        ],
    },
];

/// The x86_64 calls that newer architectures dropped (their `*at` forms are above); glibc and
/// static binaries still use them there.
#[cfg(target_arch = "x86_64")]
pub const ALLOWED_ARCH: &[Group] = &[Group {
    why: "x86_64's older forms of the calls above",
    names: &[
        "open",
        "creat",
        "stat",
        "lstat",
        "access",
        "pipe",
        "dup2",
        "poll",
        "select",
        "epoll_create",
        "epoll_wait",
        "eventfd",
        "signalfd",
        "inotify_init",
        "getdents",
        "rename",
        "mkdir",
        "rmdir",
        "link",
        "unlink",
        "symlink",
        "readlink",
        "chmod",
        "chown",
        "lchown",
        "utime",
        "utimes",
        "futimesat",
        "mknod",
        "fork",
        "vfork",
        "getpgrp",
        "alarm",
        "pause",
        "time",
        "arch_prctl",
    ],
}];

/// The calls that newer architectures dropped (none on this one).
#[cfg(not(target_arch = "x86_64"))]
pub const ALLOWED_ARCH: &[Group] = &[];

/// The calls this profile refuses that the engine's default profile (Docker 20.10) allows, and
/// the ones the issue of record names; a test checks none of them is allowed, and the attack
/// suite tries the first ones from inside a sandbox.
pub const REFUSED: &[&str] = &[
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "memfd_secret",
    "landlock_create_ruleset",
    "landlock_add_rule",
    "landlock_restrict_self",
    "userfaultfd",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "open_by_handle_at",
    "name_to_handle_at",
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "open_tree",
    "mount_setattr",
    "setns",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "kcmp",
    "syslog",
    "sync",
    "syncfs",
    "chroot",
    "quotactl",
    "quotactl_fd",
    "fanotify_init",
    "modify_ldt",
    "iopl",
    "ioperm",
    "acct",
    "swapon",
    "swapoff",
    "reboot",
    "sethostname",
    "setdomainname",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "mbind",
    "set_mempolicy",
    "migrate_pages",
    "move_pages",
    "process_madvise",
    "cachestat",
    "lookup_dcookie",
    "vhangup",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "get_thread_area",
    "set_thread_area",
    "remap_file_pages",
    "statmount",
    "listmount",
];

// Namespace flags: CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER |
// CLONE_NEWPID | CLONE_NEWNET. `unshare` also checks CLONE_NEWTIME (0x80), which in `clone`'s
// flags is part of the exit signal and cannot be asked for there.
const CLONE_NAMESPACES: u64 = 0x7E02_0000;
const UNSHARE_NAMESPACES: u64 = CLONE_NAMESPACES | 0x80;

const AF_UNIX: u64 = 1;
const AF_INET: u64 = 2;
const AF_INET6: u64 = 10;
const AF_NETLINK: u64 = 16;
const NETLINK_ROUTE: u64 = 0;
const NETLINK_NETFILTER: u64 = 12;
const SOCK_STREAM: u64 = 1;
const SOCK_DGRAM: u64 = 2;
/// The type bits of `socket`'s second argument (the rest are SOCK_NONBLOCK and SOCK_CLOEXEC).
const SOCK_TYPE_MASK: u64 = 0xf;
const IPPROTO_DEFAULT: u64 = 0;
const IPPROTO_ICMP: u64 = 1;
const IPPROTO_TCP: u64 = 6;
const IPPROTO_UDP: u64 = 17;
const IPPROTO_ICMPV6: u64 = 58;

/// `ptrace` requests a tracer sends the child that asked to be traced (`PTRACE_TRACEME`, 0):
/// peek/poke, continue, kill, single-step, registers, detach, syscall stops, options, event
/// messages, siginfo, regsets, interrupt/listen, peeksiginfo, signal masks, syscall info. Not
/// `PTRACE_ATTACH` (16) or `PTRACE_SEIZE` (0x4206), which trace another process.
const PTRACE_REQUESTS: &[u64] = &[
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 17, 24, 0x4200, 0x4201, 0x4202, 0x4203, 0x4204,
    0x4205, 0x4207, 0x4208, 0x4209, 0x420a, 0x420b, 0x420e,
];

/// `personality` values: `PER_LINUX` and the query (`0xffffffff`), nothing that changes how the
/// kernel lays out or reads the process.
const PERSONALITIES: &[u64] = &[0, 0xffff_ffff];

/// Whether the profile lets the container's entry install its own firewall rules (the entry
/// mode of `ZCBOT_CONTAINER_RULES`: iptables-nft needs a netfilter netlink socket; the entry
/// alone holds the capability that makes it useful).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Netfilter {
    /// The host installs the rules: no netfilter socket in the sandbox.
    Refused,
    /// The entry installs them.
    ForEntry,
}

fn arg(index: u32, op: &str, value: u64, value_two: u64) -> Value {
    json!({"index": index, "op": op, "value": value, "valueTwo": value_two})
}

fn allow(names: &[&str], why: &str, args: Vec<Value>) -> Value {
    json!({"names": names, "action": "SCMP_ACT_ALLOW", "args": args, "comment": why})
}

/// `name` allowed when its first argument is one of `values`: a rule each (one condition per
/// argument and rule, so the runtime cannot turn them into an OR of something wider).
fn allow_first_arg_in(name: &str, why: &str, values: &[u64]) -> Vec<Value> {
    values
        .iter()
        .map(|&v| allow(&[name], why, vec![arg(0, "SCMP_CMP_EQ", v, 0)]))
        .collect()
}

/// The architectures the profile names: the native one only. 32-bit system calls on a 64-bit
/// host (x86's `int 0x80`, the x32 ABI) are a second, older entry into the kernel that no
/// sandbox program needs; leaving their architectures out refuses them all.
fn architectures() -> Vec<&'static str> {
    if cfg!(target_arch = "x86_64") {
        vec!["SCMP_ARCH_X86_64"]
    } else if cfg!(target_arch = "aarch64") {
        vec!["SCMP_ARCH_AARCH64"]
    } else {
        Vec::new()
    }
}

/// The profile as the engine takes it (Docker's seccomp JSON), for `seccomp=<json>` in the
/// container's security options.
pub fn profile(netfilter: Netfilter, runtime: Runtime) -> Value {
    let mut rules: Vec<Value> = ALLOWED
        .iter()
        .chain(ALLOWED_ARCH)
        .map(|g| allow(g.names, g.why, Vec::new()))
        .collect();

    let why = "new processes and threads, never in new namespaces";
    rules.push(allow(
        &["clone"],
        why,
        vec![arg(0, "SCMP_CMP_MASKED_EQ", CLONE_NAMESPACES, 0)],
    ));
    rules.push(allow(
        &["unshare"],
        why,
        vec![arg(0, "SCMP_CMP_MASKED_EQ", UNSHARE_NAMESPACES, 0)],
    ));
    rules.push(match runtime {
        Runtime::Runc => json!({
            "names": ["clone3"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 38,
            "comment": "ENOSYS: its flags are out of seccomp's sight; glibc falls back to clone",
        }),
        // gVisor applies `SCMP_ACT_ERRNO` rules with EPERM whatever their errnoRet, and glibc
        // falls back to clone only on ENOSYS: threads would fail. gVisor's own kernel serves the
        // call (this host never sees it); the one on Debian 12 answers ENOSYS itself.
        Runtime::Runsc => allow(
            &["clone3"],
            "gVisor's kernel serves it (and answers ENOSYS); glibc falls back to clone",
            Vec::new(),
        ),
    });

    let why = "sockets: Unix, TCP/UDP/ICMP over IPv4 and IPv6, route netlink (getaddrinfo)";
    // (family, type, protocol); type None: any. The type is compared without SOCK_NONBLOCK and
    // SOCK_CLOEXEC, and is part of the rule because protocol 0 means "the family's first for this
    // type": SOCK_SEQPACKET would be SCTP, SOCK_DCCP DCCP.
    let mut sockets: Vec<(u64, Option<u64>, u64)> = vec![
        (AF_UNIX, None, IPPROTO_DEFAULT),
        (AF_NETLINK, None, NETLINK_ROUTE),
    ];
    for family in [AF_INET, AF_INET6] {
        sockets.push((family, Some(SOCK_STREAM), IPPROTO_DEFAULT));
        sockets.push((family, Some(SOCK_STREAM), IPPROTO_TCP));
        sockets.push((family, Some(SOCK_DGRAM), IPPROTO_DEFAULT));
        sockets.push((family, Some(SOCK_DGRAM), IPPROTO_UDP));
    }
    // Unprivileged ping sockets.
    sockets.push((AF_INET, Some(SOCK_DGRAM), IPPROTO_ICMP));
    sockets.push((AF_INET6, Some(SOCK_DGRAM), IPPROTO_ICMPV6));
    if netfilter == Netfilter::ForEntry {
        sockets.push((AF_NETLINK, None, NETLINK_NETFILTER));
    }
    for (family, kind, proto) in sockets {
        let mut args = vec![arg(0, "SCMP_CMP_EQ", family, 0)];
        if let Some(kind) = kind {
            args.push(arg(1, "SCMP_CMP_MASKED_EQ", SOCK_TYPE_MASK, kind));
        }
        args.push(arg(2, "SCMP_CMP_EQ", proto, 0));
        rules.push(allow(&["socket"], why, args));
    }
    rules.extend(allow_first_arg_in("socketpair", why, &[AF_UNIX]));
    rules.extend(allow_first_arg_in(
        "ptrace",
        "tracing one's own children only (strace, debuggers launching a program)",
        PTRACE_REQUESTS,
    ));
    rules.extend(allow_first_arg_in(
        "personality",
        "personality: Linux, and the query",
        PERSONALITIES,
    ));

    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": architectures(),
        "syscalls": rules,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn allowed_names(p: &Value) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        for rule in p["syscalls"].as_array().unwrap() {
            let conditional = rule["args"].as_array().is_some_and(|a| !a.is_empty());
            if rule["action"] != "SCMP_ACT_ALLOW" {
                continue;
            }
            for n in rule["names"].as_array().unwrap() {
                out.push((n.as_str().unwrap().to_owned(), conditional));
            }
        }
        out
    }

    #[test]
    fn refused_calls_are_never_allowed() {
        for (netfilter, runtime) in [
            (Netfilter::Refused, Runtime::Runc),
            (Netfilter::ForEntry, Runtime::Runc),
            (Netfilter::Refused, Runtime::Runsc),
        ] {
            let p = profile(netfilter, runtime);
            let allowed: HashSet<String> = allowed_names(&p).into_iter().map(|(n, _)| n).collect();
            for name in REFUSED {
                assert!(!allowed.contains(*name), "{name} is allowed");
            }
            assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
        }
    }

    #[test]
    fn each_call_is_allowed_in_one_place_only() {
        let mut seen = HashSet::new();
        for g in ALLOWED.iter().chain(ALLOWED_ARCH) {
            for n in g.names {
                assert!(seen.insert(*n), "{n} is listed twice");
            }
        }
        // The filtered calls are never also allowed without condition.
        for n in [
            "clone",
            "clone3",
            "unshare",
            "socket",
            "socketpair",
            "ptrace",
            "personality",
        ] {
            assert!(!seen.contains(n), "{n} is allowed without its filter");
        }
    }

    #[test]
    fn namespace_flags_are_refused_for_clone_and_unshare() {
        let masked = |flags: u64, mask: u64| flags & mask == 0;
        // fork() as glibc makes it: CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD.
        assert!(masked(0x0120_0011, CLONE_NAMESPACES));
        // pthread_create's flags.
        assert!(masked(0x003D_0F00, CLONE_NAMESPACES));
        for ns in [
            0x2_0000u64,
            0x0200_0000,
            0x0400_0000,
            0x0800_0000,
            0x1000_0000,
            0x2000_0000,
            0x4000_0000,
        ] {
            assert!(!masked(ns, CLONE_NAMESPACES) && !masked(ns, UNSHARE_NAMESPACES));
        }
        assert!(!masked(0x80, UNSHARE_NAMESPACES), "CLONE_NEWTIME");
    }

    #[test]
    fn inet_sockets_are_streams_and_datagrams_only() {
        // SOCK_SEQPACKET (5) with protocol 0 would be SCTP, SOCK_DCCP (6) DCCP.
        let p = profile(Netfilter::Refused, Runtime::Runc);
        for rule in p["syscalls"].as_array().unwrap() {
            if rule["names"][0] != "socket" {
                continue;
            }
            let family = rule["args"][0]["value"].as_u64().unwrap();
            if family == AF_INET || family == AF_INET6 {
                assert_eq!(rule["args"][1]["value"], SOCK_TYPE_MASK, "{rule}");
                let kind = rule["args"][1]["valueTwo"].as_u64().unwrap();
                assert!(kind == SOCK_STREAM || kind == SOCK_DGRAM, "{rule}");
            }
        }
    }

    #[test]
    fn netfilter_sockets_only_for_the_entry() {
        let has_netfilter = |p: &Value| {
            p["syscalls"].as_array().unwrap().iter().any(|r| {
                r["names"][0] == "socket"
                    && r["args"][0]["value"] == AF_NETLINK
                    && r["args"].as_array().unwrap().last().unwrap()["value"] == NETLINK_NETFILTER
            })
        };
        assert!(!has_netfilter(&profile(Netfilter::Refused, Runtime::Runc)));
        assert!(has_netfilter(&profile(Netfilter::ForEntry, Runtime::Runc)));
    }
}
