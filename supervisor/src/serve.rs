//! `--serve`: the in-container end of the persistent channel (see `zcbot_supervise::proto`).
//!
//! The daemon starts this once per container as one long-lived `docker exec -i` and multiplexes
//! every call of that user over its stdin/stdout. For each START the server forks a per-call
//! supervisor (the same code as `--call-id ...`, without an exec; `ps` shows it as
//! `zcbot-call`), so a call over the channel gets exactly what a per-call exec gets: its own session, a subreaper that kills the whole subtree on
//! timeout or cancel, the minimal environment, the confined workdir. The server:
//! - reads each call's output in chunks of at most `proto::CHUNK`, round-robin over ready pipes,
//!   so a flooding call never holds back another call's frames;
//! - applies the output cap here, in the container: the head is forwarded as it comes, the tail is
//!   kept in a ring and sent at the end, the middle is only counted. A flood of gigabytes costs
//!   the channel and the daemon about the cap;
//! - is single-threaded (one poll loop), so forking is safe, and marks itself non-dumpable, so
//!   the sandbox user (same uid, no capabilities) cannot ptrace it or open its descriptors;
//! - gives every supervisor a parent-death signal: if the server dies, every call is killed;
//! - on end of input (the daemon closed the channel or died) or SIGTERM: stops every call, waits
//!   for their supervisors, exits.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use zcbot_supervise::proto::{self, Decoder, FromHelper, Start, ToHelper};

use crate::{
    child_check, pipe_cloexec, signal_pipe, sweep, write_all, Args, LAST_SIGNAL, SIG_PIPE_W,
};

/// One output stream of one call.
struct Stream {
    fd: libc::c_int,
    open: bool,
    head_left: usize,
    tail: VecDeque<u8>,
    tail_cap: usize,
    skipped: u64,
}

impl Stream {
    fn new(fd: libc::c_int, cap: usize) -> Self {
        Stream {
            fd,
            open: true,
            head_left: cap / 2,
            tail: VecDeque::new(),
            tail_cap: cap - cap / 2,
            skipped: 0,
        }
    }

    /// Forwards what still fits the head; keeps the rest in the tail ring, counting what falls out.
    fn take(&mut self, data: &[u8], id: u64, no: proto::Stream, out: &mut Vec<u8>) {
        let h = data.len().min(self.head_left);
        if h > 0 {
            output_frame(out, id, no, &data[..h]);
            self.head_left -= h;
        }
        let rest = &data[h..];
        if rest.len() >= self.tail_cap {
            self.skipped += (self.tail.len() + rest.len() - self.tail_cap) as u64;
            self.tail.clear();
            self.tail.extend(&rest[rest.len() - self.tail_cap..]);
        } else {
            let overflow = (self.tail.len() + rest.len()).saturating_sub(self.tail_cap);
            self.tail.drain(..overflow);
            self.skipped += overflow as u64;
            self.tail.extend(rest);
        }
    }

    /// Sends the count of dropped bytes and the kept tail.
    fn finish(&mut self, id: u64, no: proto::Stream, out: &mut Vec<u8>) {
        if self.skipped > 0 {
            FromHelper::Skipped {
                stream: no,
                n: self.skipped,
            }
            .encode(id, out);
        }
        let tail: Vec<u8> = self.tail.drain(..).collect();
        for chunk in tail.chunks(proto::CHUNK) {
            output_frame(out, id, no, chunk);
        }
    }
}

/// A call's or run's cap as a stream takes it: [`proto::NO_CAP`] forwards everything (its head
/// never fills), any other cap is bounded to 1 GiB.
fn stream_cap(cap: u64) -> usize {
    if cap == proto::NO_CAP {
        usize::MAX
    } else {
        cap.min(1 << 30) as usize
    }
}

fn output_frame(out: &mut Vec<u8>, id: u64, stream: proto::Stream, bytes: &[u8]) {
    FromHelper::Output {
        stream,
        bytes: bytes.to_vec(),
    }
    .encode(id, out);
}

/// One running call: its supervisor and its two output pipes.
struct Call {
    pid: libc::pid_t,
    streams: [Stream; 2],
    /// (status, killed by a signal) once the supervisor was reaped.
    status: Option<(i32, bool)>,
    /// Set for a Python session: its output pipes then belong to the run in progress.
    session: Option<Box<Session>>,
}

/// A Python session's interpreter as the helper sees it: the pipe it reads requests from
/// (descriptor 3 in the interpreter), the pipe it replies on (4), and the run in progress.
///
/// Requests and replies are `u32 big-endian length | bytes`. The interpreter's first reply is its
/// pid (4 bytes), to interrupt it; every later one ends the run in progress with its JSON. The
/// interpreter runs the tenant's code, so everything it writes is bounded and anything malformed
/// ends the session, never the helper.
struct Session {
    req: libc::c_int,
    rep: libc::c_int,
    rep_open: bool,
    /// Request bytes not yet written (the pipe is non-blocking: a program of megabytes must not
    /// stop the poll loop).
    to_write: Vec<u8>,
    written: usize,
    /// Reply bytes read and not yet taken.
    reply: Vec<u8>,
    /// The interpreter's pid, once it said it.
    kernel: Option<libc::pid_t>,
    run: Option<SessionRun>,
    /// The helper is killing it (an interrupt was not obeyed, or its reply was malformed).
    ending: bool,
}

/// One run of code in a session.
struct SessionRun {
    id: u64,
    /// The run's caps (their descriptors are unused: the session's pipes feed them).
    streams: [Stream; 2],
    grace: Duration,
    /// When an interrupt not obeyed by then ends the session.
    kill_at: Option<std::time::Instant>,
}

impl Session {
    /// Routes bytes the interpreter printed to the run in progress; between runs (a thread left
    /// printing) they are dropped.
    fn output(&mut self, k: usize, data: &[u8], out: &mut Vec<u8>) {
        if let Some(run) = &mut self.run {
            run.streams[k].take(data, run.id, proto::Stream::BOTH[k], out);
        }
    }

    /// The next complete message on the reply pipe, or why the interpreter is not speaking the
    /// protocol.
    fn next_reply(&mut self) -> Result<Option<Vec<u8>>, String> {
        let Some(prefix) = self.reply.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > proto::MAX_REPLY {
            return Err(format!(
                "its reply of {len} bytes is above the bound of {}",
                proto::MAX_REPLY
            ));
        }
        if self.reply.len() < 4 + len {
            return Ok(None);
        }
        let msg = self.reply[4..4 + len].to_vec();
        self.reply.drain(..4 + len);
        Ok(Some(msg))
    }
}

/// Makes `fd` non-blocking: the poll loop must never sit in one read while other calls wait.
fn set_nonblocking(fd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: fcntl with integer arguments only; at worst it fails with EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Runs the server until the daemon closes the channel; returns the exit status.
///
/// Whatever the guarantees rest on is checked before the greeting: without it the helper exits
/// 125 saying what failed, and the daemon, getting no greeting, serves this container by per-call
/// exec (whose supervisor checks what it rests on in turn).
pub fn serve() -> i32 {
    // Non-dumpable: no ptrace, no /proc/PID/fd for the sandbox user; executed supervisors become
    // dumpable again, as any process.
    crate::prctl_or_die(libc::PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE 0");
    // The helper carries the filter too (see filter.rs): whatever it forks inherits it.
    if let Err(e) = crate::filter::install() {
        crate::die(
            crate::EXIT_SETUP,
            &format!("installing the seccomp filter: {e}"),
        );
    }
    // Every call's supervisor is forked with only fds 0-2 left open (close_range, Linux 5.9):
    // closing the range [LAST_FD, LAST_FD] touches nothing and tells whether the kernel has it.
    if let Err(e) = close_range_from(LAST_FD) {
        crate::die(
            crate::EXIT_SETUP,
            &format!(
                "close_range is unavailable ({e}): this kernel cannot serve calls over the channel"
            ),
        );
    }
    // SAFETY: getpid has no preconditions and cannot fail.
    let me = unsafe { libc::getpid() };

    // A vanished daemon gives EPIPE instead of killing the server.
    let sig = signal_pipe();
    if let Err(e) = set_nonblocking(0) {
        crate::die(
            crate::EXIT_SETUP,
            &format!("making the channel's input non-blocking: {e}"),
        );
    }

    let mut out = Vec::new();
    FromHelper::Hello {
        version: proto::VERSION,
        pid: me as u32,
    }
    .encode(0, &mut out);

    let mut decoder = Decoder::new(proto::MAX_TO_HELPER);
    let mut calls: HashMap<u64, Call> = HashMap::new();
    let mut by_pid: HashMap<libc::pid_t, u64> = HashMap::new();
    // Sessions ended (CANCEL) before their OPEN_SESSION arrived: the last 64.
    let mut cancelled_early: VecDeque<u64> = VecDeque::new();
    let mut input_open = true;
    let mut daemon_gone = false;
    let mut inbuf = vec![0u8; 256 << 10];
    let mut chunk = vec![0u8; proto::CHUNK];
    loop {
        if !out.is_empty() {
            if !daemon_gone && !write_all(1, &out) {
                daemon_gone = true;
                input_open = false;
                stop_all(&calls);
            }
            out.clear();
        }
        if !input_open && calls.is_empty() {
            return 0;
        }

        let mut fds = vec![libc::pollfd {
            fd: sig[0],
            events: libc::POLLIN,
            revents: 0,
        }];
        // Whether fds[1] is stdin: input_open may change below, the layout of fds may not.
        let stdin_polled = input_open;
        if stdin_polled {
            fds.push(libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // (call, what): 0 and 1 its output pipes, 2 a session's reply pipe, 3 its request pipe.
        let mut owners = Vec::new();
        for (id, call) in &calls {
            for (k, s) in call.streams.iter().enumerate() {
                if s.open {
                    fds.push(libc::pollfd {
                        fd: s.fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    owners.push((*id, k));
                }
            }
            if let Some(session) = &call.session {
                if session.rep_open {
                    fds.push(libc::pollfd {
                        fd: session.rep,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    owners.push((*id, 2));
                }
                if session.written < session.to_write.len() {
                    fds.push(libc::pollfd {
                        fd: session.req,
                        events: libc::POLLOUT,
                        revents: 0,
                    });
                    owners.push((*id, 3));
                }
            }
        }
        // Wake for the nearest interrupt deadline of a session run.
        let now = std::time::Instant::now();
        let wait_ms = calls
            .values()
            .filter_map(|c| c.session.as_ref()?.run.as_ref()?.kill_at)
            .map(|at| at.saturating_duration_since(now).as_millis() as i32 + 1)
            .fold(1000, i32::min);
        // SAFETY: fds is a valid array of pollfd.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };

        let mut drain = [0u8; 64];
        // SAFETY: draining our own non-blocking signal pipe.
        while unsafe { libc::read(sig[0], drain.as_mut_ptr().cast(), drain.len()) } > 0 {}
        if LAST_SIGNAL.swap(0, Ordering::SeqCst) != 0 && input_open {
            input_open = false;
            stop_all(&calls);
        }

        let base = if stdin_polled { 2 } else { 1 };
        if input_open && stdin_polled && fds[1].revents != 0 {
            loop {
                // SAFETY: reading into a buffer we own.
                let n = unsafe { libc::read(0, inbuf.as_mut_ptr().cast(), inbuf.len()) };
                if n > 0 {
                    decoder.push(&inbuf[..n as usize]);
                    continue;
                }
                match (n, errno()) {
                    (0, _) => input_open = false,
                    (_, libc::EINTR) => continue,
                    (_, libc::EAGAIN) => {}
                    _ => input_open = false,
                }
                break;
            }
            loop {
                let f = match decoder.next_frame() {
                    Ok(None) => break,
                    Ok(Some(f)) => f,
                    Err(_) => {
                        // Not our daemon speaking: stop serving.
                        input_open = false;
                        break;
                    }
                };
                let (kind, id) = (f.kind, f.id);
                let opened = match ToHelper::decode(f) {
                    Ok((id, ToHelper::Start(s))) => {
                        Some((id, start_call(id, &s, me, &calls, false)))
                    }
                    Ok((id, ToHelper::OpenSession(s))) => {
                        if cancelled_early.contains(&id) {
                            cancelled_early.retain(|c| *c != id);
                            Some((
                                id,
                                Err("the session was ended before it started".to_owned()),
                            ))
                        } else {
                            Some((id, start_call(id, &s, me, &calls, true)))
                        }
                    }
                    Ok((id, ToHelper::Run(run))) => {
                        let session = run.session;
                        match start_run(id, run, &mut calls, &mut out) {
                            // Most code fits the pipe at once: no poll round for it.
                            Ok(()) => session_request(calls.get_mut(&session).expect("checked")),
                            Err(reason) => FromHelper::Failed { reason }.encode(id, &mut out),
                        }
                        None
                    }
                    Ok((id, ToHelper::Cancel)) => {
                        match calls.get(&id) {
                            Some(call) if call.status.is_none() => stop(call.pid),
                            Some(_) => {}
                            None if running(&calls, id).is_some() => interrupt_run(id, &mut calls),
                            // A session ended before its OPEN_SESSION arrived (the daemon's
                            // writes can cross): it must not start afterwards.
                            None => {
                                if cancelled_early.len() == 64 {
                                    cancelled_early.pop_front();
                                }
                                cancelled_early.push_back(id);
                            }
                        }
                        None
                    }
                    // A start whose payload cannot be read fails that call only, as it always
                    // did: the daemon learns why.
                    Err(e)
                        if matches!(kind, proto::START | proto::OPEN_SESSION | proto::RUN)
                            && id != 0 =>
                    {
                        FromHelper::Failed {
                            reason: format!("the request is malformed: {e}"),
                        }
                        .encode(id, &mut out);
                        None
                    }
                    Err(_) => {
                        input_open = false;
                        break;
                    }
                };
                match opened {
                    Some((id, Ok(call))) => {
                        by_pid.insert(call.pid, id);
                        FromHelper::Started {
                            pid: call.pid as u32,
                        }
                        .encode(id, &mut out);
                        calls.insert(id, call);
                    }
                    Some((id, Err(reason))) => FromHelper::Failed { reason }.encode(id, &mut out),
                    None => {}
                }
            }
            if !input_open {
                stop_all(&calls);
            }
        }

        for (k, (id, s)) in owners.iter().enumerate() {
            if fds[base + k].revents == 0 {
                continue;
            }
            let Some(call) = calls.get_mut(id) else {
                continue;
            };
            match *s {
                2 => session_replies(call, &mut chunk, &mut out),
                3 => session_request(call),
                k => {
                    let stream = &mut call.streams[k];
                    // SAFETY: reading into a buffer we own.
                    let n =
                        unsafe { libc::read(stream.fd, chunk.as_mut_ptr().cast(), chunk.len()) };
                    if n > 0 {
                        let data = &chunk[..n as usize];
                        match &mut call.session {
                            Some(session) => session.output(k, data, &mut out),
                            None => stream.take(data, *id, proto::Stream::BOTH[k], &mut out),
                        }
                    } else if n == 0 || !matches!(errno(), libc::EAGAIN | libc::EINTR) {
                        stream.open = false;
                        // SAFETY: closing our own read end.
                        unsafe { libc::close(stream.fd) };
                    }
                }
            }
        }

        // A session run whose interrupt was not obeyed in its grace: the session is killed.
        let now = std::time::Instant::now();
        for call in calls.values_mut() {
            let pid = call.pid;
            if let Some(session) = &mut call.session {
                let due = session
                    .run
                    .as_ref()
                    .and_then(|r| r.kill_at)
                    .is_some_and(|at| at <= now);
                if due && !session.ending && call.status.is_none() {
                    end_session(pid, session);
                }
            }
        }

        loop {
            let mut ws = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut ws, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if let Some(call) = by_pid.remove(&pid).and_then(|id| calls.get_mut(&id)) {
                call.status = Some(if libc::WIFEXITED(ws) {
                    (libc::WEXITSTATUS(ws), false)
                } else {
                    (128 + libc::WTERMSIG(ws), true)
                });
            }
        }

        // A session ends with its supervisor: if that was killed, its interpreter (orphaned, and
        // writing straight to our pipes) is killed here rather than waited for.
        let done: Vec<u64> = calls
            .iter()
            .filter(|(_, c)| {
                c.status.is_some() && (c.session.is_some() || c.streams.iter().all(|s| !s.open))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let mut call = calls.remove(&id).expect("listed above");
            let (status, signaled) = call.status.expect("checked above");
            if let Some(session) = &call.session {
                if let Some(pid) = session.kernel.filter(|p| *p > 1) {
                    // SAFETY: kill(2) on a process group of our uid; at worst ESRCH.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                for s in call.streams.iter_mut().filter(|s| s.open) {
                    s.open = false;
                    // SAFETY: closing our own read end.
                    unsafe { libc::close(s.fd) };
                }
            }
            if signaled {
                // The supervisor itself was killed (the sandbox user can): its processes are now
                // orphans of PID 1, which every live call's processes are not. Kill exactly those.
                sweep();
            }
            for (s, no) in call.streams.iter_mut().zip(proto::Stream::BOTH) {
                s.finish(id, no, &mut out);
            }
            FromHelper::Exit { status, signaled }.encode(id, &mut out);
            if let Some(mut session) = call.session.take() {
                // SAFETY: closing the session's pipe ends, which only it held.
                unsafe {
                    libc::close(session.req);
                    if session.rep_open {
                        libc::close(session.rep);
                    }
                }
                // The session's end first, so the daemon knows it is gone when the run ends.
                if let Some(mut run) = session.run.take() {
                    for (s, no) in run.streams.iter_mut().zip(proto::Stream::BOTH) {
                        s.finish(run.id, no, &mut out);
                    }
                    FromHelper::Exit {
                        status,
                        signaled: false,
                    }
                    .encode(run.id, &mut out);
                }
            }
        }
    }
}

/// Starts a run in its session: queues the code on the session's request pipe.
fn start_run(
    id: u64,
    run: proto::Run,
    calls: &mut HashMap<u64, Call>,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    if calls.contains_key(&id) || running(calls, id).is_some() {
        return Err(format!("call {id:016x} is already running"));
    }
    let call = calls
        .get_mut(&run.session)
        .filter(|c| c.status.is_none())
        .ok_or("the session is not running (it ended)")?;
    let session = call
        .session
        .as_mut()
        .filter(|s| !s.ending)
        .ok_or("the session is not running (it ended)")?;
    if session.run.is_some() {
        return Err("the session is running other code".into());
    }
    let code_len = u32::try_from(run.code.len()).map_err(|_| "the code is too large")?;
    session.to_write.clear();
    session.to_write.extend_from_slice(&code_len.to_be_bytes());
    session.to_write.extend_from_slice(&run.code);
    session.written = 0;
    let cap = stream_cap(run.cap);
    session.run = Some(SessionRun {
        id,
        streams: [Stream::new(-1, cap), Stream::new(-1, cap)],
        grace: Duration::from_millis(run.grace_ms),
        kill_at: None,
    });
    FromHelper::Started {
        pid: session.kernel.unwrap_or(call.pid) as u32,
    }
    .encode(id, out);
    Ok(())
}

/// The session whose run in progress is `id`.
fn running(calls: &HashMap<u64, Call>, id: u64) -> Option<u64> {
    calls.iter().find_map(|(sid, c)| {
        c.session
            .as_ref()
            .and_then(|s| s.run.as_ref())
            .filter(|r| r.id == id)
            .map(|_| *sid)
    })
}

/// Interrupts the run `id` (CANCEL): SIGINT to the interpreter's process group, as Ctrl-C in a
/// terminal (its code gets KeyboardInterrupt and the session keeps its state); if the run has
/// not ended within its grace, the session is killed (see the loop).
fn interrupt_run(id: u64, calls: &mut HashMap<u64, Call>) {
    let Some(sid) = running(calls, id) else {
        return;
    };
    let Some(session) = calls.get_mut(&sid).and_then(|c| c.session.as_mut()) else {
        return;
    };
    let kernel = session.kernel;
    let Some(run) = session.run.as_mut() else {
        return;
    };
    if run.kill_at.is_some() {
        return;
    }
    run.kill_at = Some(std::time::Instant::now() + run.grace);
    if let Some(pid) = kernel.filter(|p| *p > 1) {
        // SAFETY: kill(2) on a process group of our uid; at worst ESRCH.
        unsafe { libc::kill(-pid, libc::SIGINT) };
    }
}

/// Kills a session: SIGKILL to the interpreter's process group, SIGTERM to its supervisor (which
/// kills whatever else it started). Its end is reported when the supervisor is reaped.
fn end_session(supervisor: libc::pid_t, session: &mut Session) {
    session.ending = true;
    if let Some(pid) = session.kernel.filter(|p| *p > 1) {
        // SAFETY: kill(2) on a process group of our uid; at worst ESRCH.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    stop(supervisor);
}

/// Reads what the session's interpreter replied: its pid first, then one reply per run, which
/// ends that run (output first, then the reply, then EXIT 0). Malformed replies end the session.
fn session_replies(call: &mut Call, chunk: &mut [u8], out: &mut Vec<u8>) {
    let pid = call.pid;
    let Some(session) = call.session.as_mut() else {
        return;
    };
    // SAFETY: reading into a buffer we own.
    let n = unsafe { libc::read(session.rep, chunk.as_mut_ptr().cast(), chunk.len()) };
    if n > 0 {
        session.reply.extend_from_slice(&chunk[..n as usize]);
    } else if n == 0 || !matches!(errno(), libc::EAGAIN | libc::EINTR) {
        session.rep_open = false;
        // SAFETY: closing our own read end.
        unsafe { libc::close(session.rep) };
        return;
    }
    loop {
        let msg = match session.next_reply() {
            Ok(Some(msg)) => msg,
            Ok(None) => return,
            Err(_) => {
                session.reply.clear();
                if !session.ending && call.status.is_none() {
                    end_session(pid, session);
                }
                return;
            }
        };
        if session.kernel.is_none() {
            match msg.as_slice().try_into().map(i32::from_be_bytes) {
                Ok(kernel) if kernel > 1 => session.kernel = Some(kernel),
                _ if call.status.is_none() => end_session(pid, session),
                _ => {}
            }
            continue;
        }
        if session.ending {
            // Being killed: its run ends with the session, whatever it wrote.
            continue;
        }
        let Some(mut run) = session.run.take() else {
            // A reply nobody asked for (the tenant's code writing on the pipe): dropped.
            continue;
        };
        // Everything the interpreter printed before replying is in its pipes now: take exactly
        // that much (a child still writing must not keep this loop reading).
        for (k, stream) in call.streams.iter().enumerate().filter(|(_, s)| s.open) {
            let mut left: libc::c_int = 0;
            // SAFETY: FIONREAD writes the pipe's byte count into a live int.
            if unsafe { libc::ioctl(stream.fd, libc::FIONREAD, &mut left) } != 0 {
                continue;
            }
            let mut left = left.max(0) as usize;
            while left > 0 {
                let want = left.min(chunk.len());
                // SAFETY: reading into a buffer we own (the pipe is non-blocking).
                let n = unsafe { libc::read(stream.fd, chunk.as_mut_ptr().cast(), want) };
                if n <= 0 {
                    break;
                }
                left -= n as usize;
                run.streams[k].take(&chunk[..n as usize], run.id, proto::Stream::BOTH[k], out);
            }
        }
        for (s, no) in run.streams.iter_mut().zip(proto::Stream::BOTH) {
            s.finish(run.id, no, out);
        }
        for piece in msg.chunks(proto::CHUNK) {
            FromHelper::Reply {
                bytes: piece.to_vec(),
            }
            .encode(run.id, out);
        }
        FromHelper::Exit {
            status: 0,
            signaled: false,
        }
        .encode(run.id, out);
    }
}

/// Writes what the pipe takes of the session's pending request.
fn session_request(call: &mut Call) {
    let Some(session) = call.session.as_mut() else {
        return;
    };
    let rest = &session.to_write[session.written..];
    // SAFETY: writing from a slice we own to a non-blocking pipe.
    let n = unsafe { libc::write(session.req, rest.as_ptr().cast(), rest.len()) };
    if n > 0 {
        session.written += n as usize;
    } else if n < 0 && !matches!(errno(), libc::EAGAIN | libc::EINTR) {
        // The interpreter is gone: its supervisor's end reports it.
        session.written = session.to_write.len();
    }
    if session.written == session.to_write.len() {
        session.to_write = Vec::new();
        session.written = 0;
    }
}

/// Takes ownership of what a call returning a descriptor or -1 returned.
fn owned(fd: libc::c_int) -> std::io::Result<OwnedFd> {
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by a successful call that created it; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A close-on-exec pipe, each end owned: an error path closes what it opened.
fn owned_pipe() -> Result<[OwnedFd; 2], String> {
    let [r, w] = pipe_cloexec().map_err(|e| format!("cannot start the call: pipe: {e}"))?;
    // SAFETY: both were just created by pipe2 and are owned by nothing else.
    Ok(unsafe { [OwnedFd::from_raw_fd(r), OwnedFd::from_raw_fd(w)] })
}

/// The highest descriptor `close_range` is asked to close. Linux takes any value (it clamps to
/// the table's size); gVisor refuses a `last` above INT_MAX with EINVAL, and no descriptor can be
/// higher anyway.
const LAST_FD: libc::c_uint = libc::c_int::MAX as libc::c_uint;

/// Closes every descriptor from `first` up (close_range(2), Linux 5.9). Async-signal-safe: a
/// single system call.
fn close_range_from(first: libc::c_uint) -> std::io::Result<()> {
    // SAFETY: close_range takes three unsigned ints (passed as such) and touches no memory.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, LAST_FD, 0 as libc::c_uint) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// SIGTERM to a call's supervisor (SIGCONT first, in case it was stopped): it kills its subtree.
fn stop(pid: libc::pid_t) {
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(pid, libc::SIGCONT);
        libc::kill(pid, libc::SIGTERM);
    }
}

fn stop_all(calls: &HashMap<u64, Call>) {
    for call in calls.values() {
        if call.status.is_none() {
            stop(call.pid);
        }
    }
}

/// Forks and executes the call's supervisor. Everything is prepared before the fork; the child
/// only calls async-signal-safe functions.
fn start_call(
    id: u64,
    start: &Start,
    me: libc::pid_t,
    calls: &HashMap<u64, Call>,
    session: bool,
) -> Result<Call, String> {
    if calls.contains_key(&id) || running(calls, id).is_some() {
        return Err(format!("call {id:016x} is already running"));
    }
    if start.argv.is_empty() {
        return Err("no command given".into());
    }
    if start.argv.iter().chain(&start.env).any(|a| a.contains(&0)) {
        return Err("the command or the environment contains a NUL byte".into());
    }
    let workdir = match &start.workdir {
        w if w.is_empty() => None,
        w => Some(String::from_utf8(w.clone()).map_err(|_| "the workdir is not UTF-8")?),
    };
    let args = Args {
        call_id: format!("{id:016x}"),
        timeout: Duration::from_millis(start.timeout_ms),
        grace: Duration::from_millis(start.grace_ms),
        workdir,
        stdin_program: start.program.is_some(),
        session,
        argv: start
            .argv
            .iter()
            .map(|a| OsString::from_vec(a.clone()))
            .collect(),
    };
    let env: Vec<(OsString, OsString)> = start
        .env
        .iter()
        .filter_map(|e| {
            let eq = e.iter().position(|b| *b == b'=')?;
            Some((
                OsString::from_vec(e[..eq].to_vec()),
                OsString::from_vec(e[eq + 1..].to_vec()),
            ))
        })
        .collect();

    // The call's stdin: the program in a memfd (read by the supervisor, never a file), or nothing.
    let stdin_fd = match &start.program {
        Some(program) => {
            // SAFETY: a valid NUL-terminated name and plain flags; returns a new fd or -1.
            let fd = unsafe { libc::memfd_create(c"zcbot-program".as_ptr(), libc::MFD_CLOEXEC) };
            let fd = owned(fd).map_err(|e| format!("memfd_create: {e}"))?;
            if !write_all(fd.as_raw_fd(), program) {
                return Err("could not hold the program in memory".into());
            }
            // SAFETY: lseek on a descriptor we own, with integer arguments.
            if unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_SET) } != 0 {
                return Err(format!(
                    "rewinding the program: {}",
                    std::io::Error::last_os_error()
                ));
            }
            fd
        }
        None => {
            // SAFETY: a valid NUL-terminated path and plain flags; returns a new fd or -1.
            let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            owned(fd).map_err(|e| format!("opening /dev/null: {e}"))?
        }
    };
    let [out_r, out_w] = owned_pipe()?;
    let [err_r, err_w] = owned_pipe()?;
    // Before the fork, so nothing can fail after it that would leave a call nobody reads.
    for fd in [&out_r, &err_r] {
        set_nonblocking(fd.as_raw_fd()).map_err(|e| format!("preparing the output pipes: {e}"))?;
    }
    let (stdin_raw, out_raw, err_raw) =
        (stdin_fd.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd());
    // A session's request and reply pipes, the interpreter's ends above 4 so that moving them to
    // 3 and 4 in the child cannot overwrite one with the other.
    let session_pipes = if session {
        let [req_r, req_w] = owned_pipe()?;
        let [rep_r, rep_w] = owned_pipe()?;
        for fd in [&req_w, &rep_r] {
            set_nonblocking(fd.as_raw_fd())
                .map_err(|e| format!("preparing the session's pipes: {e}"))?;
        }
        let high = |fd: &OwnedFd| {
            // SAFETY: F_DUPFD_CLOEXEC with an integer minimum returns a new descriptor or -1.
            owned(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 5) })
                .map_err(|e| format!("preparing the session's pipes: {e}"))
        };
        Some((high(&req_r)?, req_w, rep_r, high(&rep_w)?))
    } else {
        None
    };
    let (req_child, rep_child) = session_pipes
        .as_ref()
        .map_or((-1, -1), |(r, _, _, w)| (r.as_raw_fd(), w.as_raw_fd()));

    // Fork without exec: the child is the call's supervisor (an exec of this binary would cost
    // another pass through the container's file system).
    // SAFETY: the server is single-threaded, so no lock or allocator state can be held by a
    // thread that does not exist in the child; until its descriptors are in place the child makes
    // only async-signal-safe calls, and it never returns into the server's loop (_exit below).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: child side of the fork: signal, dup2, syscall(close_range), prctl, getppid are
        // async-signal-safe and take integers or pointers to static C strings; child_check
        // writes and _exits.
        unsafe {
            for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
                child_check(
                    libc::signal(s, libc::SIG_DFL) != libc::SIG_ERR,
                    b"resetting a signal handler",
                );
            }
            // Descriptors first, so a failure below is reported on the call's own stderr.
            child_check(libc::dup2(stdin_raw, 0) == 0, b"dup2 of the call's stdin");
            child_check(libc::dup2(out_raw, 1) == 1, b"dup2 of the call's stdout");
            child_check(libc::dup2(err_raw, 2) == 2, b"dup2 of the call's stderr");
            // A session's interpreter reads requests on 3 and replies on 4 (dup2 clears
            // close-on-exec, so they reach it).
            if req_child >= 0 {
                child_check(
                    libc::dup2(req_child, 3) == 3,
                    b"dup2 of the session's requests",
                );
                child_check(
                    libc::dup2(rep_child, 4) == 4,
                    b"dup2 of the session's replies",
                );
            }
            // Nothing of the server's (the channel, other calls' pipes) stays open in the call.
            let first = if req_child >= 0 { 5 } else { 3 };
            child_check(close_range_from(first).is_ok(), b"close_range");
            // If the server dies, every call is stopped (SIGTERM: the supervisor kills its tree).
            child_check(
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) == 0,
                b"prctl PR_SET_PDEATHSIG",
            );
            // The server died before the line above: nobody would stop or read this call.
            if libc::getppid() != me {
                libc::_exit(crate::EXIT_SETUP);
            }
            // Only the name in `ps`: a failure changes nothing that matters.
            libc::prctl(libc::PR_SET_NAME, c"zcbot-call".as_ptr(), 0, 0, 0);
        }
        SIG_PIPE_W.store(-1, Ordering::SeqCst);
        LAST_SIGNAL.store(0, Ordering::SeqCst);
        for (k, _) in std::env::vars_os() {
            std::env::remove_var(k);
        }
        for (k, v) in env {
            std::env::set_var(k, v);
        }
        let status = crate::supervise(args);
        // SAFETY: _exit leaves without running anything inherited from the server (its buffers,
        // atexit handlers); it cannot fail.
        unsafe { libc::_exit(status) };
    }
    let fork_error = std::io::Error::last_os_error();
    // Our copies of the child's ends: the pipes must end when the call's last writer is gone.
    drop((stdin_fd, out_w, err_w));
    if pid < 0 {
        let hint = if fork_error.raw_os_error() == Some(libc::EAGAIN) {
            " (the sandbox's process limit, ZCBOT_SANDBOX_PIDS, is probably reached)"
        } else {
            ""
        };
        return Err(format!("cannot start the call: fork: {fork_error}{hint}"));
    }
    let session = session_pipes.map(|(req_r, req_w, rep_r, rep_w)| {
        // The interpreter's ends are its own now: its death must end the reply pipe.
        drop((req_r, rep_w));
        Box::new(Session {
            req: req_w.into_raw_fd(),
            rep: rep_r.into_raw_fd(),
            rep_open: true,
            to_write: Vec::new(),
            written: 0,
            reply: Vec::new(),
            kernel: None,
            run: None,
            ending: false,
        })
    });
    let cap = stream_cap(start.cap);
    Ok(Call {
        pid,
        streams: [
            Stream::new(out_r.into_raw_fd(), cap),
            Stream::new(err_r.into_raw_fd(), cap),
        ],
        status: None,
        session,
    })
}
