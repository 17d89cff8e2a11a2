//! zcbot-supervise: the per-call supervisor that runs inside a sandbox container.
//!
//! The daemon starts every tool call as `docker exec -u <sandbox uid> zcbot-supervise ... -- ARGV`,
//! or, over the channel, has the `--serve` helper fork this same code for it. The supervisor:
//! - makes itself a child subreaper, so descendants that escape with setsid or a double fork
//!   re-parent to it instead of to the container's init (under gVisor, which refuses that to
//!   anything but init, it finds them as the tenant's orphans started since the call began);
//! - runs ARGV in a new session with stdin on /dev/null (or a program read from stdin into a
//!   memfd, for run_python: no file is ever written), stdout and stderr on pipes it forwards, so
//!   the exec stream ends when the supervisor ends, whatever a background child still holds;
//! - when the main process exits, on SIGTERM/SIGINT/SIGHUP (timeout or cancel from the daemon), or
//!   at its own backstop deadline, kills its whole subtree: SIGTERM, a grace period, then rounds of
//!   SIGSTOP + SIGKILL until no descendant is left;
//! - exits with the main process's status (128+N when killed by signal N).
//!
//! `--serve` runs the channel server (see `serve.rs`): one long-lived exec per container that
//! starts a supervisor like this one for every call the daemon sends over it.
//!
//! Two helper modes run as separate execs of the same binary:
//! - `--signal CALL_ID`: sends SIGTERM to the supervisor of that call (the daemon's cancel path
//!   when it cannot signal by host PID).
//! - `--sweep`: kills every process of this uid whose parent is PID 1, with its subtree. Every
//!   call's processes descend from a live supervisor (whose parent is outside the container), so
//!   such processes are orphans of a supervisor that was killed: nothing else is touched.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsString};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

mod bpf;
mod filter;
mod serve;
mod surface;

/// The most program text `--stdin-program` accepts.
const MAX_PROGRAM: usize = 16 << 20;

/// Exit status when the supervisor could not set the call up (a system call it depends on
/// failed): the command never ran. Distinct from 126 (the working directory cannot be entered)
/// and 127 (the command cannot be executed), as with `docker run`.
pub(crate) const EXIT_SETUP: i32 = 125;

static SIG_PIPE_W: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig != libc::SIGCHLD {
        LAST_SIGNAL.store(sig, Ordering::SeqCst);
    }
    let fd = SIG_PIPE_W.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the pipe is non-blocking, a full pipe is fine.
        unsafe { libc::write(fd, b"s".as_ptr().cast(), 1) };
    }
}

/// Routes SIGTERM/SIGINT/SIGHUP (noted in LAST_SIGNAL) and SIGCHLD to a non-blocking pipe that
/// a poll loop watches, and ignores SIGPIPE (a vanished reader gives EPIPE). Returns the pipe.
/// Exits (status 125) if any of it fails: a supervisor deaf to SIGTERM could not stop its call.
pub(crate) fn signal_pipe() -> [libc::c_int; 2] {
    let sig = pipe_cloexec().unwrap_or_else(|e| die(EXIT_SETUP, &format!("signal pipe: {e}")));
    for fd in sig {
        // SAFETY: fcntl with integer arguments on a descriptor we just created.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
            die_errno("making the signal pipe non-blocking");
        }
    }
    SIG_PIPE_W.store(sig[1], Ordering::SeqCst);
    for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
        // SAFETY: sigaction is plain data, valid when zeroed (empty mask, no flags); the handler
        // does only async-signal-safe work (atomics and write(2)).
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: sa is a valid, initialised sigaction living across the call; no old action
        // is asked for.
        if unsafe { libc::sigaction(s, &sa, std::ptr::null_mut()) } != 0 {
            die_errno("installing a signal handler");
        }
    }
    // SAFETY: setting SIGPIPE's disposition to SIG_IGN involves no handler code at all.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) } == libc::SIG_ERR {
        die_errno("ignoring SIGPIPE");
    }
    sig
}

fn die(code: i32, msg: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "zcbot-supervise: {msg}");
    std::process::exit(code)
}

/// Exits 125 naming what failed and the OS error (errno) it failed with.
fn die_errno(what: &str) -> ! {
    die(
        EXIT_SETUP,
        &format!("{what}: {}", std::io::Error::last_os_error()),
    )
}

/// prctl(option, value) or exit 125: the guarantees this process gives depend on it (see
/// DESIGN.md: a supervisor that cannot make itself non-dumpable or a subreaper refuses to run
/// rather than run a call it could not contain).
pub(crate) fn prctl_or_die(option: libc::c_int, value: libc::c_ulong, what: &str) {
    // SAFETY: the option passed here (DUMPABLE) takes an integer and no pointer; prctl touches
    // no memory of ours.
    if unsafe { libc::prctl(option, value, 0, 0, 0) } != 0 {
        die_errno(&format!("prctl {what} (refusing to run without it)"));
    }
}

/// `n` in decimal, written into the end of `buf` (no allocation: safe in a forked child).
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// In a forked child before exec: writes `prefix`, then what the current errno means (its words
/// in `reasons`, else "errno N"), and a newline to stderr. Only write(2), no allocation.
pub(crate) fn child_say(prefix: &[u8], reasons: &[(i32, &[u8])]) {
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's life.
    let errno = unsafe { *libc::__errno_location() };
    let mut digits = [0u8; 10];
    let (reason, number): (&[u8], &[u8]) = match reasons.iter().find(|(e, _)| *e == errno) {
        Some((_, words)) => (words, b""),
        None => (b"errno ", decimal(errno.unsigned_abs(), &mut digits)),
    };
    for part in [prefix, reason, number, b"\n"] {
        // SAFETY: write(2) from live memory is async-signal-safe; a short write loses only text.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
}

/// In a forked child before exec: unless `ok`, writes "zcbot-supervise: WHAT failed (errno N)"
/// to stderr and leaves with [`EXIT_SETUP`]. Only async-signal-safe calls (write, _exit) and no
/// allocation: the child of a fork may not take a lock another thread held.
pub(crate) fn child_check(ok: bool, what: &[u8]) {
    if ok {
        return;
    }
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's life.
    let errno = unsafe { *libc::__errno_location() };
    let mut msg = [0u8; 160];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(msg.len() - len);
        msg[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"zcbot-supervise: ");
    put(what);
    put(b" failed (errno ");
    let mut digits = [0u8; 10];
    put(decimal(errno.unsigned_abs(), &mut digits));
    put(b")\n");
    // SAFETY: write(2) from a live stack buffer and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::_exit(EXIT_SETUP);
    }
}

/// One call to supervise (from the command line, or from a channel START).
pub(crate) struct Args {
    pub(crate) call_id: String,
    pub(crate) timeout: Duration,
    pub(crate) grace: Duration,
    pub(crate) workdir: Option<String>,
    pub(crate) stdin_program: bool,
    /// A Python session's supervisor (forked by `--serve` only): the command inherits the
    /// supervisor's stdout and stderr (the helper's pipes) instead of pipes of its own, so what
    /// it prints reaches the helper before the reply it writes afterwards on descriptor 4, and it
    /// keeps descriptors 3 and 4 (its request and reply pipes), which the supervisor closes.
    pub(crate) session: bool,
    pub(crate) argv: Vec<OsString>,
}

fn main() {
    let mut raw = std::env::args_os().skip(1);
    let mut args = Args {
        call_id: String::new(),
        timeout: Duration::from_secs(3600),
        grace: Duration::from_millis(500),
        workdir: None,
        stdin_program: false,
        session: false,
        argv: Vec::new(),
    };
    while let Some(a) = raw.next() {
        let mut value = |name: &str| {
            raw.next()
                .and_then(|v| v.into_string().ok())
                .unwrap_or_else(|| die(EXIT_SETUP, &format!("{name} needs a value")))
        };
        match a.to_str() {
            Some("--call-id") => args.call_id = value("--call-id"),
            Some("--timeout-ms") => {
                args.timeout = Duration::from_millis(millis(&value("--timeout-ms")))
            }
            Some("--grace-ms") => args.grace = Duration::from_millis(millis(&value("--grace-ms"))),
            Some("--workdir") => args.workdir = Some(value("--workdir")),
            Some("--stdin-program") => args.stdin_program = true,
            Some("--signal") => std::process::exit(signal_call(&value("--signal"))),
            Some("--sweep") => std::process::exit(sweep()),
            // The channel id only names the server in `ps` and for the daemon's PID checks.
            Some("--serve") => {
                let _channel_id = raw.next();
                std::process::exit(serve::serve())
            }
            Some("--") => {
                args.argv = raw.by_ref().collect();
                break;
            }
            _ => die(EXIT_SETUP, &format!("unknown argument {a:?}")),
        }
    }
    if args.argv.is_empty() {
        die(EXIT_SETUP, "no command given after --");
    }
    std::process::exit(supervise(args))
}

fn millis(v: &str) -> u64 {
    v.parse().unwrap_or_else(|_| {
        die(
            EXIT_SETUP,
            &format!("{v:?} is not a number of milliseconds"),
        )
    })
}

fn cstr(s: impl AsRef<[u8]>) -> CString {
    CString::new(s.as_ref()).unwrap_or_else(|_| die(EXIT_SETUP, "an argument contains a NUL byte"))
}

/// A pipe whose ends close on exec (the caller owns both).
pub(crate) fn pipe_cloexec() -> std::io::Result<[libc::c_int; 2]> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two ints into fds, a live array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fds)
}

/// Runs one call to its end and returns its exit status. Refuses (exit 125, saying what failed)
/// when anything its guarantees rest on cannot be set up.
pub(crate) fn supervise(args: Args) -> i32 {
    // Descendants that escape with setsid or a double fork re-parent here, not to init (or,
    // under gVisor, are found as orphans: see Tracking).
    let tracking = become_subreaper();
    // Non-dumpable: the call's own code (same uid) can neither ptrace this supervisor nor open
    // its /proc/PID/mem to rewrite the code that stops it; the command it executes becomes
    // dumpable again, as any program.
    prctl_or_die(libc::PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE 0");
    // Everything the call runs inherits it: no nested btrfs subvolume escapes the disk quota.
    if let Err(e) = filter::install() {
        die(EXIT_SETUP, &format!("installing the seccomp filter: {e}"));
    }

    let mut argv: Vec<CString> = args.argv.iter().map(|a| cstr(a.as_bytes())).collect();
    let mut program_fd = -1;
    if args.stdin_program {
        let mut code = Vec::new();
        let n = std::io::stdin()
            .take(MAX_PROGRAM as u64 + 1)
            .read_to_end(&mut code)
            .unwrap_or_else(|e| die(EXIT_SETUP, &format!("reading the program from stdin: {e}")));
        if n > MAX_PROGRAM {
            die(EXIT_SETUP, "the program is larger than 16 MiB");
        }
        // SAFETY: a valid NUL-terminated name; flags 0 (no CLOEXEC: the child must inherit it).
        program_fd = unsafe { libc::memfd_create(c"zcbot-program".as_ptr(), 0) };
        if program_fd < 0 {
            die_errno("memfd_create for the program");
        }
        // A program cut short would run as a different program: refuse instead.
        if !write_all(program_fd, &code) {
            die_errno("writing the program into its memfd");
        }
        argv.push(cstr(format!("/proc/self/fd/{program_fd}")));
    }

    let sig = signal_pipe();

    // A session's command writes straight to the helper (see Args::session): it gets the
    // supervisor's own descriptors 1 and 2, which no pipe of the supervisor's stands between.
    let (out, err) = if args.session {
        ([-1, 1], [-1, 2])
    } else {
        (
            pipe_cloexec().unwrap_or_else(|e| die(EXIT_SETUP, &format!("stdout pipe: {e}"))),
            pipe_cloexec().unwrap_or_else(|e| die(EXIT_SETUP, &format!("stderr pipe: {e}"))),
        )
    };
    let workdir = args.workdir.as_deref().map(cstr);
    // What the child says when the workdir or the command fails it, made here: after the fork
    // it may only write. Each names what failed, and a bare command name the PATH it was
    // looked for on (the call's `env` may have replaced it).
    let chdir_prefix = [
        &b"zcbot-supervise: cannot enter the working directory "[..],
        args.workdir.as_deref().unwrap_or_default().as_bytes(),
        b": ",
    ]
    .concat();
    let exec_prefix = [
        &b"zcbot-supervise: cannot run "[..],
        args.argv[0].as_bytes(),
        b": ",
    ]
    .concat();
    let not_found = if args.argv[0].as_bytes().contains(&b'/') {
        b"no such file (or its #! interpreter is missing)".to_vec()
    } else {
        match std::env::var_os("PATH") {
            Some(path) => [
                &b"not found on the call's PATH ("[..],
                path.as_bytes(),
                b")",
            ]
            .concat(),
            None => b"not found: the call has no PATH".to_vec(),
        }
    };
    let chdir_reasons: [(i32, &[u8]); 4] = [
        (libc::ENOENT, b"no such folder"),
        (libc::ENOTDIR, b"not a folder"),
        (libc::EACCES, b"permission denied"),
        (libc::ELOOP, b"too many levels of symbolic links"),
    ];
    let exec_reasons: [(i32, &[u8]); 4] = [
        (libc::ENOENT, &not_found),
        (
            libc::EACCES,
            b"permission denied (not executable, or a folder on the way is not searchable)",
        ),
        (libc::ENOEXEC, b"not an executable format"),
        (libc::ENOTDIR, b"a component of its path is not a folder"),
    ];
    let devnull = c"/dev/null";
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());

    // SAFETY: the supervisor is single-threaded, and after fork the child only calls
    // async-signal-safe functions (on memory prepared above) before execvp or _exit.
    let child = unsafe { libc::fork() };
    if child < 0 {
        die_errno("fork");
    }
    if child == 0 {
        // SAFETY: child side of fork: signal, setsid, open, dup2, chdir, write, execvp and _exit
        // are async-signal-safe; every pointer is to a C string or array built before the fork.
        unsafe {
            for s in [
                libc::SIGTERM,
                libc::SIGINT,
                libc::SIGHUP,
                libc::SIGCHLD,
                libc::SIGPIPE,
            ] {
                child_check(
                    libc::signal(s, libc::SIG_DFL) != libc::SIG_ERR,
                    b"resetting a signal handler",
                );
            }
            child_check(libc::setsid() >= 0, b"setsid");
            let null = libc::open(devnull.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            child_check(null >= 0, b"opening /dev/null");
            // The output pipes first: a failure after them is reported on the call's stderr.
            if out[0] >= 0 {
                child_check(libc::dup2(err[1], 2) == 2, b"dup2 of the command's stderr");
                child_check(libc::dup2(out[1], 1) == 1, b"dup2 of the command's stdout");
            }
            child_check(libc::dup2(null, 0) == 0, b"dup2 of the command's stdin");
            if let Some(dir) = &workdir {
                if libc::chdir(dir.as_ptr()) != 0 {
                    child_say(&chdir_prefix, &chdir_reasons);
                    libc::_exit(126);
                }
            }
            libc::execvp(ptrs[0], ptrs.as_ptr());
            child_say(&exec_prefix, &exec_reasons);
            libc::_exit(127);
        }
    }
    // SAFETY: closing our copies of the child's ends and the program memfd; a session's request
    // and reply pipes are the command's alone (its death must end the reply pipe).
    unsafe {
        if out[0] >= 0 {
            libc::close(out[1]);
            libc::close(err[1]);
        }
        if program_fd >= 0 {
            libc::close(program_fd);
        }
        if args.session {
            libc::close(3);
            libc::close(4);
        }
    }

    let started = Instant::now();
    let mut streams = [(out[0], 1, out[0] >= 0), (err[0], 2, err[0] >= 0)];
    let mut status: Option<i32> = None;
    let mut kill_phase: Option<(Instant, bool)> = None; // (SIGKILL at, why: true = stop request)
    let mut exit_override: Option<i32> = None;
    let mut buf = vec![0u8; 64 * 1024];
    // As a subreaper, every descendant has a chain of live parents up to us: with no child left
    // (ECHILD) there is no descendant, and the /proc walk can be skipped (the common case).
    // Tracking orphans, escaped processes are not our children: always walk.
    let mut children_left = true;
    let descendants_now = |children_left: bool| match tracking {
        Tracking::Subreaper if !children_left => Vec::new(),
        _ => descendants(tracking),
    };
    loop {
        // Reap everything that exited; note the main child's status.
        loop {
            let mut ws = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut ws, libc::WNOHANG) };
            if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                children_left = false;
            }
            if pid <= 0 {
                break;
            }
            if pid == child {
                status = Some(if libc::WIFEXITED(ws) {
                    libc::WEXITSTATUS(ws)
                } else {
                    128 + libc::WTERMSIG(ws)
                });
            }
        }
        let requested = LAST_SIGNAL.swap(0, Ordering::SeqCst);
        let now = Instant::now();
        if kill_phase.is_none() {
            let reason = if requested != 0 {
                exit_override = Some(128 + requested);
                Some(true)
            } else if now.duration_since(started) >= args.timeout {
                exit_override = Some(124);
                Some(true)
            } else if status.is_some() {
                Some(false)
            } else {
                None
            };
            if let Some(why) = reason {
                signal_all(
                    &descendants_now(children_left),
                    &[libc::SIGCONT, libc::SIGTERM],
                );
                kill_phase = Some((now + args.grace, why));
            }
        }
        if let Some((kill_at, _)) = kill_phase {
            if now >= kill_at && (children_left || matches!(tracking, Tracking::Orphans { .. })) {
                kill_everything(tracking);
            }
            let open = streams.iter().any(|s| s.2);
            if descendants_now(children_left).is_empty() && !open {
                break;
            }
        }
        let open: Vec<usize> = (0..2).filter(|i| streams[*i].2).collect();
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|i| libc::pollfd {
                fd: streams[*i].0,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        fds.push(libc::pollfd {
            fd: sig[0],
            events: libc::POLLIN,
            revents: 0,
        });
        let wait_ms = match kill_phase {
            Some(_) => 10,
            None => args
                .timeout
                .saturating_sub(now.duration_since(started))
                .as_millis()
                .min(1000) as i32,
        };
        // SAFETY: fds is a valid array of pollfd.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms.max(1)) };
        for (k, i) in open.iter().enumerate() {
            if fds[k].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0 {
                continue;
            }
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::read(streams[*i].0, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                write_all(streams[*i].1, &buf[..n as usize]);
            } else if n == 0 {
                streams[*i].2 = false;
            }
        }
        let mut drain = [0u8; 64];
        // SAFETY: draining our own non-blocking signal pipe.
        while unsafe { libc::read(sig[0], drain.as_mut_ptr().cast(), drain.len()) } > 0 {}
        if kill_phase.is_some()
            && status.is_some()
            && streams.iter().all(|s| !s.2)
            && descendants_now(children_left).is_empty()
        {
            break;
        }
    }
    exit_override
        .filter(|_| kill_phase.is_some_and(|(_, why)| why))
        .or(status)
        .unwrap_or(EXIT_SETUP)
}

/// Writes everything (blocking); false when the reader is gone (the caller drops the output and
/// keeps supervising).
pub(crate) fn write_all(fd: libc::c_int, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        // SAFETY: writing from a slice we own.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        data = &data[n as usize..];
    }
    true
}

/// One process as /proc shows it.
#[derive(Debug, Clone, Copy)]
struct Proc {
    pid: i32,
    ppid: i32,
    uid: u32,
    /// When it started, in clock ticks since boot (`/proc/PID/stat` field 22).
    start: u64,
}

/// Every process we can see.
fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Some((ppid, start)) = stat_of(pid) else {
            continue;
        };
        let uid = std::fs::metadata(entry.path())
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap_or(0);
        out.push(Proc {
            pid,
            ppid,
            uid,
            start,
        });
    }
    out
}

/// (parent pid, start time) of `pid`.
fn stat_of(pid: i32) -> Option<(i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state, ppid, ... starttime is the 20th.
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// How a supervisor finds every process of its call, escaped ones included.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Tracking {
    /// It is a child subreaper: a descendant that escapes with setsid or a double fork
    /// re-parents to it, so its subtree is the whole call.
    Subreaper,
    /// Under gVisor, whose kernel lets only a namespace's init be a subreaper: escaped
    /// descendants re-parent to PID 1, so the call is the subtree plus the tenant's orphans
    /// (parent PID 1, same uid) started since the supervisor started. An orphan of another call
    /// of the same user that started after this one counts too (DESIGN.md: runsc).
    Orphans {
        /// This supervisor's start time (clock ticks since boot).
        since: u64,
    },
}

/// Makes this process a child subreaper, or, where the kernel is gVisor's (which refuses it to
/// anything but init), falls back to [`Tracking::Orphans`]. Exits 125 otherwise: a supervisor
/// that could lose track of its call's processes refuses to run it.
pub(crate) fn become_subreaper() -> Tracking {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer and no pointer; prctl touches no memory
    // of ours.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } == 0 {
        return Tracking::Subreaper;
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EINVAL) && filter::under_gvisor() {
        if let Some((_, since)) = stat_of(std::process::id() as i32) {
            return Tracking::Orphans { since };
        }
    }
    die(
        EXIT_SETUP,
        &format!("prctl PR_SET_CHILD_SUBREAPER 1 (refusing to run without it): {err}"),
    )
}

/// Every live process of this supervisor's call (see [`Tracking`]).
fn descendants(tracking: Tracking) -> Vec<i32> {
    let procs = processes();
    let me = std::process::id() as i32;
    let mut out = subtree_of(&[me], &procs, false);
    if let Tracking::Orphans { since } = tracking {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        let orphans: Vec<i32> = procs
            .iter()
            .filter(|p| p.ppid == 1 && p.pid != 1 && p.uid == uid && p.start >= since)
            .map(|p| p.pid)
            .collect();
        let known: HashSet<i32> = out.iter().copied().collect();
        out.extend(
            subtree_of(&orphans, &procs, true)
                .into_iter()
                .filter(|p| !known.contains(p)),
        );
    }
    out
}

fn subtree_of(roots: &[i32], procs: &[Proc], include_roots: bool) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut seen: HashSet<i32> = HashSet::new();
    let mut stack: Vec<i32> = roots.to_vec();
    let mut out = Vec::new();
    if include_roots {
        out.extend_from_slice(roots);
    }
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if seen.insert(c) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

fn signal_all(pids: &[i32], signals: &[libc::c_int]) {
    for &pid in pids {
        for &s in signals {
            // SAFETY: kill(2) on a pid; at worst ESRCH.
            unsafe { libc::kill(pid, s) };
        }
    }
}

/// Freezes, then kills, every descendant, round after round, until none is left. Freezing first
/// stops a fork bomb from outrunning the kills; the pids limit bounds the rounds.
fn kill_everything(tracking: Tracking) {
    for _ in 0..1000 {
        let pids = descendants(tracking);
        if pids.is_empty() {
            return;
        }
        signal_all(&pids, &[libc::SIGSTOP]);
        signal_all(&descendants(tracking), &[libc::SIGSTOP]);
        signal_all(&descendants(tracking), &[libc::SIGKILL]);
        loop {
            let mut ws = 0;
            // SAFETY: waitpid only writes the status through a pointer to a live local int.
            if unsafe { libc::waitpid(-1, &mut ws, libc::WNOHANG) } <= 0 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `--signal CALL_ID`: SIGTERM to the supervisor whose command line names that call.
fn signal_call(call_id: &str) -> i32 {
    let me = std::process::id() as i32;
    let mut found = 1;
    for Proc { pid, .. } in processes() {
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_ours = args
            .first()
            .is_some_and(|a| a.ends_with(b"zcbot-supervise"))
            && args
                .windows(2)
                .any(|w| w[0] == b"--call-id" && w[1] == call_id.as_bytes());
        if is_ours {
            signal_all(&[pid], &[libc::SIGCONT, libc::SIGTERM]);
            found = 0;
        }
    }
    found
}

/// `--sweep`: kills orphans of killed supervisors (processes of this uid whose parent is PID 1).
pub(crate) fn sweep() -> i32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    for _ in 0..1000 {
        let procs = processes();
        let orphans: Vec<i32> = procs
            .iter()
            .filter(|p| p.ppid == 1 && p.uid == uid && p.pid != 1)
            .map(|p| p.pid)
            .collect();
        if orphans.is_empty() {
            return 0;
        }
        let all = subtree_of(&orphans, &procs, true);
        signal_all(&all, &[libc::SIGSTOP]);
        signal_all(&all, &[libc::SIGKILL]);
        std::thread::sleep(Duration::from_millis(5));
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the call's child says when its workdir or command fails it: the prefix, the words
    /// for a known errno, else the errno's number.
    #[test]
    fn a_child_names_what_failed_and_why() {
        let said = |errno: i32| {
            let (out, _) = in_child(|| {
                // SAFETY: errno set through this thread's own slot.
                unsafe { *libc::__errno_location() = errno };
                child_say(
                    b"cannot enter /workspace/x: ",
                    &[(libc::ENOENT, b"no such folder")],
                );
            });
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            said(libc::ENOENT),
            "cannot enter /workspace/x: no such folder\n"
        );
        assert_eq!(
            said(libc::EIO),
            format!("cannot enter /workspace/x: errno {}\n", libc::EIO)
        );
    }

    /// Runs `f` in a forked child whose stderr is a pipe (then `_exit(0)`, if `f` returns): what
    /// it wrote there and its wait status. `f` may make async-signal-safe calls only.
    fn in_child(f: impl FnOnce()) -> (Vec<u8>, libc::c_int) {
        let [r, w] = pipe_cloexec().unwrap();
        // SAFETY: fork; the child only makes async-signal-safe calls and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: dup2 with integers.
            unsafe { libc::dup2(w, 2) };
            f();
            // SAFETY: leaves without destructors, as a forked child must.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: closing our copy of the write end, so the read below ends with the child.
        unsafe { libc::close(w) };
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: reading into a live buffer of the length given.
            let n = unsafe { libc::read(r, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a pointer to a live int; closing our read end.
        unsafe {
            libc::waitpid(pid, &mut status, 0);
            libc::close(r);
        }
        (out, status)
    }

    /// What a forked child says and exits with when a call before exec fails: the step and the
    /// errno on its stderr, status 125; a step that worked changes nothing.
    #[test]
    fn a_failed_step_before_exec_is_reported_and_exits_125() {
        let (said, status) = in_child(|| {
            // SAFETY: close(-1) fails with EBADF, setting errno.
            unsafe { libc::close(-1) };
            child_check(true, b"a step that worked");
            child_check(false, b"dup2 of the test's stdout");
        });
        assert_eq!(
            String::from_utf8_lossy(&said),
            format!(
                "zcbot-supervise: dup2 of the test's stdout failed (errno {})\n",
                libc::EBADF
            )
        );
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == EXIT_SETUP);
    }
}
