//! The channel protocol between the daemon and `zcbot-supervise --serve`.
//!
//! One long-lived `docker exec -i` per container carries every call of that user. Both directions
//! are a stream of frames, never lines, so user output can hold any byte:
//!
//! ```text
//! u32 big-endian length of what follows | u8 kind | u64 big-endian call id | payload
//! ```
//!
//! Each direction has one typed message enum, [`ToHelper`] and [`FromHelper`], with one `encode`
//! and one `decode`: the [`Decoder`] cuts the stream into bounded [`Frame`]s, and `decode` turns a
//! frame into a message or refuses it (unknown kind, short or long payload, bad stream number,
//! bad flag, misplaced call id). Nothing else reads payload bytes, so a rule is checked once, the
//! same way on both sides.
//!
//! The daemon treats everything the helper sends as untrusted (the sandbox user runs as the same
//! uid and may replace it): any error is final, after which the channel is dead. This module is
//! plain std so both sides share one definition.

use std::fmt;

/// Protocol version the helper announces in its hello. Bump it with any change to the wire.
pub const VERSION: u32 = 3;
/// Bytes before the payload: length, kind, call id.
pub const HEADER: usize = 4 + 1 + 8;
/// Largest frame the daemon accepts from the helper: one output chunk and its header.
pub const MAX_FROM_HELPER: usize = CHUNK + 64;
/// Largest frame the helper accepts from the daemon: a start with a program of up to 16 MiB and
/// a command and environment of up to 1 MiB each.
pub const MAX_TO_HELPER: usize = 18 << 20;
/// The most output bytes one frame carries.
pub const CHUNK: usize = 32 << 10;
/// The most characters of a FAILED reason kept: it ends up in an error message.
pub const MAX_REASON: usize = 512;
/// A cap that keeps nothing back: every byte is forwarded as it comes (a background job, whose
/// daemon keeps the latest output itself). Version 3 gave it this meaning.
pub const NO_CAP: u64 = u64::MAX;
/// The largest reply a Python session may give for one run (its value, error and rich results,
/// as JSON): the helper refuses a larger one, the daemon never holds more.
pub const MAX_REPLY: usize = 8 << 20;

/// Daemon to helper: run a call (payload: [`Start`]).
pub const START: u8 = 1;
/// Daemon to helper: stop a call (SIGTERM to its supervisor). No payload. For a session run:
/// interrupt it (SIGINT to the interpreter), and end the session if it does not stop in grace.
pub const CANCEL: u8 = 2;
/// Daemon to helper: start a Python session (payload: [`Start`]; the frame's id names the
/// session from then on). Version 2.
pub const OPEN_SESSION: u8 = 3;
/// Daemon to helper: run code in a session (payload: [`Run`]). Version 2.
pub const RUN: u8 = 4;
/// Helper to daemon, call id 0: the helper is up (payload: u32 version, u32 pid).
pub const HELLO: u8 = 16;
/// Helper to daemon: the call's supervisor was forked (payload: u32 pid in the container).
pub const STARTED: u8 = 17;
/// Helper to daemon: output (payload: u8 stream 1|2, then the bytes).
pub const OUTPUT: u8 = 18;
/// Helper to daemon: this many bytes of a stream were dropped inside the container to keep the
/// cap (payload: u8 stream, u64 count); the tail follows as OUTPUT.
pub const SKIPPED: u8 = 19;
/// Helper to daemon: the call ended (payload: i32 status, u8 1 when its supervisor was killed by
/// a signal). Last frame of a call.
pub const EXIT: u8 = 20;
/// Helper to daemon: the call could not start (payload: UTF-8 reason). Last frame of a call.
pub const FAILED: u8 = 21;
/// Helper to daemon: a piece of a session run's reply (JSON, at most [`CHUNK`] bytes a frame,
/// [`MAX_REPLY`] in all), before the run's EXIT. Version 2.
pub const REPLY: u8 = 22;

/// A frame kind's name, for messages.
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        START => "START",
        CANCEL => "CANCEL",
        OPEN_SESSION => "OPEN_SESSION",
        RUN => "RUN",
        HELLO => "HELLO",
        STARTED => "STARTED",
        OUTPUT => "OUTPUT",
        SKIPPED => "SKIPPED",
        EXIT => "EXIT",
        FAILED => "FAILED",
        REPLY => "REPLY",
        _ => "unknown",
    }
}

/// Why a byte stream is not a valid frame sequence. Typed so the daemon can tell an old or newer
/// helper ([`ProtoError::Version`]: rebuild the image) from a broken or hostile one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// The length prefix is smaller than the kind and call id it must cover.
    ShortFrame {
        /// The announced length (after the prefix).
        len: usize,
    },
    /// The frame is larger than this direction allows.
    LongFrame {
        /// The whole frame's size, prefix included.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A kind this direction does not carry.
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// The payload ends before its fields do.
    Truncated {
        /// The frame's kind.
        kind: u8,
    },
    /// Bytes after the last field.
    Trailing {
        /// The frame's kind.
        kind: u8,
    },
    /// An output stream other than 1 (stdout) or 2 (stderr).
    BadStream {
        /// The frame's kind.
        kind: u8,
        /// The stream byte.
        stream: u8,
    },
    /// A field outside what the protocol defines (a flag not 0 or 1, a list count larger than
    /// the payload, an output chunk above [`CHUNK`]).
    BadField {
        /// The frame's kind.
        kind: u8,
        /// Which field.
        field: &'static str,
    },
    /// A call frame with call id 0, or a hello with one.
    BadCallId {
        /// The frame's kind.
        kind: u8,
        /// The id it carried.
        id: u64,
    },
    /// The helper greets with another protocol version: the image and the daemon disagree.
    Version {
        /// The version the helper announced.
        helper: u32,
    },
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |k: &u8| format!("{} frame (kind {k})", kind_name(*k));
        match self {
            ProtoError::ShortFrame { len } => {
                write!(
                    f,
                    "frame length {len} is below the {}-byte header",
                    HEADER - 4
                )
            }
            ProtoError::LongFrame { len, max } => {
                write!(f, "frame of {len} bytes is above the bound of {max}")
            }
            ProtoError::UnknownKind { kind } => {
                write!(f, "frame kind {kind} is not one this side accepts")
            }
            ProtoError::Truncated { kind } => write!(f, "{}: payload is truncated", name(kind)),
            ProtoError::Trailing { kind } => {
                write!(f, "{}: payload has trailing bytes", name(kind))
            }
            ProtoError::BadStream { kind, stream } => {
                write!(f, "{}: stream {stream} is neither 1 nor 2", name(kind))
            }
            ProtoError::BadField { kind, field } => {
                write!(f, "{}: {field} is out of range", name(kind))
            }
            ProtoError::BadCallId { kind, id } => {
                write!(f, "{}: call id {id:#x} is not allowed here", name(kind))
            }
            ProtoError::Version { helper } => write!(
                f,
                "the helper speaks protocol {helper}, this daemon {VERSION}: rebuild the image \
                 (scripts/build-image.sh) so both come from the same source"
            ),
        }
    }
}

impl std::error::Error for ProtoError {}

/// One frame as cut from the stream: kind, call id, payload not yet read. Turn it into a message
/// with [`FromHelper::decode`] or [`ToHelper::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame is (the constants above).
    pub kind: u8,
    /// The call it concerns (0 for HELLO).
    pub id: u64,
    /// Kind-specific bytes.
    pub payload: Vec<u8>,
}

/// Appends one frame to `out`: the framing under the typed `encode`s.
fn encode(out: &mut Vec<u8>, kind: u8, id: u64, payload: &[u8]) {
    let len = (1 + 8 + payload.len()) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Reassembles frames from arbitrary chunks, refusing any frame longer than its bound.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    at: usize,
    max: usize,
}

impl Decoder {
    /// A decoder accepting frames of at most `max` bytes (header included).
    pub fn new(max: usize) -> Self {
        Decoder {
            buf: Vec::new(),
            at: 0,
            max,
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.at > 0 && self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        } else if self.at > 64 << 10 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as frames.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.at
    }

    /// The next complete frame, None when more bytes are needed, or why the stream is malformed.
    /// Errors are final: the peer is not speaking this protocol.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        let rest = &self.buf[self.at..];
        let Some(prefix) = rest.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len < HEADER - 4 {
            return Err(ProtoError::ShortFrame { len });
        }
        if len + 4 > self.max {
            return Err(ProtoError::LongFrame {
                len: len + 4,
                max: self.max,
            });
        }
        if rest.len() < len + 4 {
            return Ok(None);
        }
        let mut r = Reader::new(&rest[4..4 + len], 0);
        let kind = r.u8()?;
        let id = r.u64()?;
        let payload = r.rest().to_vec();
        self.at += 4 + len;
        Ok(Some(Frame { kind, id, payload }))
    }
}

/// An output stream of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output (1 on the wire).
    Stdout,
    /// Standard error (2 on the wire).
    Stderr,
}

impl Stream {
    /// Both streams, in wire order.
    pub const BOTH: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

    fn byte(self) -> u8 {
        match self {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        }
    }

    fn from_byte(kind: u8, stream: u8) -> Result<Stream, ProtoError> {
        match stream {
            1 => Ok(Stream::Stdout),
            2 => Ok(Stream::Stderr),
            _ => Err(ProtoError::BadStream { kind, stream }),
        }
    }
}

/// A message from the helper to the daemon. Every variant but `Hello` concerns one call (its id
/// travels beside it, never 0); `Exit` and `Failed` are a call's last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromHelper {
    /// The helper is up (call id 0, first frame).
    Hello {
        /// Protocol version; decode refuses any but [`VERSION`].
        version: u32,
        /// The helper's pid in the container.
        pid: u32,
    },
    /// The call's supervisor was forked.
    Started {
        /// Its pid in the container.
        pid: u32,
    },
    /// Output of the call, at most [`CHUNK`] bytes.
    Output {
        /// Which stream.
        stream: Stream,
        /// The bytes, as written.
        bytes: Vec<u8>,
    },
    /// Bytes of a stream dropped inside the container to keep the cap.
    Skipped {
        /// Which stream.
        stream: Stream,
        /// How many bytes.
        n: u64,
    },
    /// The call ended.
    Exit {
        /// Its exit status (128+N when killed by signal N).
        status: i32,
        /// Whether its supervisor itself was killed by a signal.
        signaled: bool,
    },
    /// The call could not start.
    Failed {
        /// Why, at most [`MAX_REASON`] characters (longer ones are cut, bad UTF-8 replaced).
        reason: String,
    },
    /// A piece of a session run's reply, at most [`CHUNK`] bytes.
    Reply {
        /// The bytes, in order.
        bytes: Vec<u8>,
    },
}

impl FromHelper {
    /// The wire kind of this message.
    pub fn kind(&self) -> u8 {
        match self {
            FromHelper::Hello { .. } => HELLO,
            FromHelper::Started { .. } => STARTED,
            FromHelper::Output { .. } => OUTPUT,
            FromHelper::Skipped { .. } => SKIPPED,
            FromHelper::Exit { .. } => EXIT,
            FromHelper::Failed { .. } => FAILED,
            FromHelper::Reply { .. } => REPLY,
        }
    }

    /// Appends this message as a frame for call `id` (0 for `Hello`) to `out`.
    pub fn encode(&self, id: u64, out: &mut Vec<u8>) {
        let mut p = Vec::new();
        match self {
            FromHelper::Hello { version, pid } => {
                p.extend_from_slice(&version.to_be_bytes());
                p.extend_from_slice(&pid.to_be_bytes());
            }
            FromHelper::Started { pid } => p.extend_from_slice(&pid.to_be_bytes()),
            FromHelper::Output { stream, bytes } => {
                p.reserve(1 + bytes.len());
                p.push(stream.byte());
                p.extend_from_slice(bytes);
            }
            FromHelper::Skipped { stream, n } => {
                p.push(stream.byte());
                p.extend_from_slice(&n.to_be_bytes());
            }
            FromHelper::Exit { status, signaled } => {
                p.extend_from_slice(&status.to_be_bytes());
                p.push(u8::from(*signaled));
            }
            FromHelper::Failed { reason } => p.extend_from_slice(cut(reason).as_bytes()),
            FromHelper::Reply { bytes } => p.extend_from_slice(bytes),
        }
        encode(out, self.kind(), id, &p);
    }

    /// The message in `frame` and the call id it concerns, or why the frame is not one the
    /// helper may send.
    pub fn decode(frame: Frame) -> Result<(u64, FromHelper), ProtoError> {
        let Frame { kind, id, payload } = frame;
        let id_fits = match kind {
            HELLO => id == 0,
            STARTED..=REPLY => id != 0,
            _ => true,
        };
        if !id_fits {
            return Err(ProtoError::BadCallId { kind, id });
        }
        let mut r = Reader::new(&payload, kind);
        let msg = match kind {
            HELLO => {
                // The version first, whatever follows: another version may lay out the rest
                // differently, and saying so beats a length complaint.
                let version = r.u32()?;
                if version != VERSION {
                    return Err(ProtoError::Version { helper: version });
                }
                FromHelper::Hello {
                    version,
                    pid: r.u32()?,
                }
            }
            STARTED => FromHelper::Started { pid: r.u32()? },
            OUTPUT => {
                let stream = Stream::from_byte(kind, r.u8()?)?;
                let bytes = r.rest();
                if bytes.len() > CHUNK {
                    return Err(ProtoError::BadField {
                        kind,
                        field: "the output chunk's size",
                    });
                }
                FromHelper::Output {
                    stream,
                    bytes: bytes.to_vec(),
                }
            }
            SKIPPED => FromHelper::Skipped {
                stream: Stream::from_byte(kind, r.u8()?)?,
                n: r.u64()?,
            },
            EXIT => FromHelper::Exit {
                status: r.i32()?,
                signaled: r.flag("the signaled flag")?,
            },
            FAILED => FromHelper::Failed {
                reason: cut(&String::from_utf8_lossy(r.rest())).to_owned(),
            },
            REPLY => {
                let bytes = r.rest();
                if bytes.len() > CHUNK {
                    return Err(ProtoError::BadField {
                        kind,
                        field: "the reply chunk's size",
                    });
                }
                FromHelper::Reply {
                    bytes: bytes.to_vec(),
                }
            }
            _ => return Err(ProtoError::UnknownKind { kind }),
        };
        r.end()?;
        Ok((id, msg))
    }
}

/// A message from the daemon to the helper, for one call (id never 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToHelper {
    /// Run a call.
    Start(Start),
    /// Stop a call (SIGTERM to its supervisor, which kills its subtree); interrupt a session
    /// run; end a session.
    Cancel,
    /// Start a Python session: a supervised interpreter that serves [`ToHelper::Run`]s.
    OpenSession(Start),
    /// Run code in a session.
    Run(Run),
}

impl ToHelper {
    /// The wire kind of this message.
    pub fn kind(&self) -> u8 {
        match self {
            ToHelper::Start(_) => START,
            ToHelper::Cancel => CANCEL,
            ToHelper::OpenSession(_) => OPEN_SESSION,
            ToHelper::Run(_) => RUN,
        }
    }

    /// Appends this message as a frame for call `id` to `out`.
    pub fn encode(&self, id: u64, out: &mut Vec<u8>) {
        match self {
            ToHelper::Start(s) => encode(out, START, id, &s.encode()),
            ToHelper::Cancel => encode(out, CANCEL, id, &[]),
            ToHelper::OpenSession(s) => encode(out, OPEN_SESSION, id, &s.encode()),
            ToHelper::Run(run) => encode(out, RUN, id, &run.encode()),
        }
    }

    /// The message in `frame` and the call id it concerns, or why the frame is not one the
    /// daemon may send.
    pub fn decode(frame: Frame) -> Result<(u64, ToHelper), ProtoError> {
        let Frame { kind, id, payload } = frame;
        if matches!(kind, START | CANCEL | OPEN_SESSION | RUN) && id == 0 {
            return Err(ProtoError::BadCallId { kind, id });
        }
        let mut r = Reader::new(&payload, kind);
        let msg = match kind {
            START => ToHelper::Start(Start::read(&mut r)?),
            CANCEL => ToHelper::Cancel,
            OPEN_SESSION => ToHelper::OpenSession(Start::read(&mut r)?),
            RUN => ToHelper::Run(Run::read(&mut r)?),
            _ => return Err(ProtoError::UnknownKind { kind }),
        };
        r.end()?;
        Ok((id, msg))
    }
}

/// At most [`MAX_REASON`] characters of `reason`.
fn cut(reason: &str) -> &str {
    match reason.char_indices().nth(MAX_REASON) {
        Some((at, _)) => &reason[..at],
        None => reason,
    }
}

/// What a START frame asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Start {
    /// The supervisor's own deadline (the daemon's timeout plus a backstop).
    pub timeout_ms: u64,
    /// Time between SIGTERM and SIGKILL for the call's processes.
    pub grace_ms: u64,
    /// Output cap per stream: the helper keeps the first half and the last half, counts the rest;
    /// [`NO_CAP`]: forwards everything.
    pub cap: u64,
    /// Absolute working directory; empty: /workspace.
    pub workdir: Vec<u8>,
    /// The argument vector.
    pub argv: Vec<Vec<u8>>,
    /// The whole environment, `KEY=VALUE` each.
    pub env: Vec<Vec<u8>>,
    /// A program fed to argv on stdin (run_python); None: stdin is /dev/null.
    pub program: Option<Vec<u8>>,
}

/// What a RUN frame asks for: code for one session's interpreter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Run {
    /// The session (the id its OPEN_SESSION frame carried).
    pub session: u64,
    /// After an interrupt (CANCEL), how long the code has to stop before the session is killed.
    pub grace_ms: u64,
    /// Output cap per stream for this run, as for a call.
    pub cap: u64,
    /// The code (UTF-8 Python source).
    pub code: Vec<u8>,
}

impl Run {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(28 + self.code.len());
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&self.grace_ms.to_be_bytes());
        out.extend_from_slice(&self.cap.to_be_bytes());
        put_bytes(&mut out, &self.code);
        out
    }

    fn read(r: &mut Reader<'_>) -> Result<Run, ProtoError> {
        let run = Run {
            session: r.u64()?,
            grace_ms: r.u64()?,
            cap: r.u64()?,
            code: r.bytes()?.to_vec(),
        };
        if run.session == 0 {
            return Err(ProtoError::BadField {
                kind: RUN,
                field: "the session id",
            });
        }
        Ok(run)
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_list(out: &mut Vec<u8>, list: &[Vec<u8>]) {
    out.extend_from_slice(&(list.len() as u32).to_be_bytes());
    for item in list {
        put_bytes(out, item);
    }
}

/// Reads fields off one frame's payload, failing on truncation. Private: payloads are read only
/// by the `decode`s here.
struct Reader<'a> {
    rest: &'a [u8],
    kind: u8,
}

impl<'a> Reader<'a> {
    fn new(payload: &'a [u8], kind: u8) -> Self {
        Reader {
            rest: payload,
            kind,
        }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(ProtoError::Truncated { kind: self.kind })?;
        self.rest = tail;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take::<1>()?[0])
    }

    fn flag(&mut self, field: &'static str) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtoError::BadField {
                kind: self.kind,
                field,
            }),
        }
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        self.take().map(u32::from_be_bytes)
    }

    fn i32(&mut self) -> Result<i32, ProtoError> {
        self.take().map(i32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        self.take().map(u64::from_be_bytes)
    }

    /// Length-prefixed bytes.
    fn bytes(&mut self) -> Result<&'a [u8], ProtoError> {
        let n = self.u32()? as usize;
        if self.rest.len() < n {
            return Err(ProtoError::Truncated { kind: self.kind });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// A count-prefixed list of length-prefixed byte strings.
    fn list(&mut self, field: &'static str) -> Result<Vec<Vec<u8>>, ProtoError> {
        let n = self.u32()? as usize;
        // Each item costs at least its 4-byte length: a larger count is a lie, refused before
        // anything is allocated for it.
        if n > self.rest.len() / 4 {
            return Err(ProtoError::BadField {
                kind: self.kind,
                field,
            });
        }
        (0..n).map(|_| self.bytes().map(<[u8]>::to_vec)).collect()
    }

    /// What is left.
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Fails unless everything was read.
    fn end(&self) -> Result<(), ProtoError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Trailing { kind: self.kind })
        }
    }
}

impl Start {
    /// The START payload (without the frame around it: see [`ToHelper::encode`]).
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            64 + self.program.as_ref().map_or(0, Vec::len)
                + self
                    .argv
                    .iter()
                    .chain(&self.env)
                    .map(|a| a.len() + 4)
                    .sum::<usize>(),
        );
        out.extend_from_slice(&self.timeout_ms.to_be_bytes());
        out.extend_from_slice(&self.grace_ms.to_be_bytes());
        out.extend_from_slice(&self.cap.to_be_bytes());
        put_bytes(&mut out, &self.workdir);
        put_list(&mut out, &self.argv);
        put_list(&mut out, &self.env);
        match &self.program {
            None => out.push(0),
            Some(p) => {
                out.push(1);
                put_bytes(&mut out, p);
            }
        }
        out
    }

    fn read(r: &mut Reader<'_>) -> Result<Start, ProtoError> {
        Ok(Start {
            timeout_ms: r.u64()?,
            grace_ms: r.u64()?,
            cap: r.u64()?,
            workdir: r.bytes()?.to_vec(),
            argv: r.list("the argument count")?,
            env: r.list("the environment count")?,
            program: match r.flag("the program flag")? {
                false => None,
                true => Some(r.bytes()?.to_vec()),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> Start {
        Start {
            timeout_ms: 5000,
            grace_ms: 500,
            cap: 1 << 20,
            workdir: b"/workspace/a".to_vec(),
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo \n\0x".to_vec()],
            env: vec![b"A=1".to_vec()],
            program: Some(b"print(1)".to_vec()),
        }
    }

    /// Every message the helper can send, with the call id it travels with.
    fn from_helper_messages() -> Vec<(u64, FromHelper)> {
        vec![
            (
                0,
                FromHelper::Hello {
                    version: VERSION,
                    pid: 4242,
                },
            ),
            (7, FromHelper::Started { pid: u32::MAX }),
            (
                7,
                FromHelper::Output {
                    stream: Stream::Stdout,
                    bytes: b"a\0\xffb\n".to_vec(),
                },
            ),
            (
                7,
                FromHelper::Output {
                    stream: Stream::Stderr,
                    bytes: vec![0xAB; CHUNK],
                },
            ),
            (
                7,
                FromHelper::Output {
                    stream: Stream::Stdout,
                    bytes: Vec::new(),
                },
            ),
            (
                u64::MAX,
                FromHelper::Skipped {
                    stream: Stream::Stderr,
                    n: u64::MAX,
                },
            ),
            (
                7,
                FromHelper::Exit {
                    status: -1,
                    signaled: true,
                },
            ),
            (
                7,
                FromHelper::Exit {
                    status: 0,
                    signaled: false,
                },
            ),
            (
                7,
                FromHelper::Failed {
                    reason: "fork: résource temporarily unavailable".into(),
                },
            ),
            (
                7,
                FromHelper::Reply {
                    bytes: br#"{"value":"1"}"#.to_vec(),
                },
            ),
            (
                7,
                FromHelper::Reply {
                    bytes: vec![b'x'; CHUNK],
                },
            ),
        ]
    }

    fn run() -> Run {
        Run {
            session: 11,
            grace_ms: 500,
            cap: 1 << 20,
            code: b"x = 1\nx".to_vec(),
        }
    }

    /// Cuts `wire` into frames with the bound of the given direction.
    fn frames(wire: &[u8], max: usize) -> Result<Vec<Frame>, ProtoError> {
        let mut d = Decoder::new(max);
        d.push(wire);
        let mut got = Vec::new();
        while let Some(f) = d.next_frame()? {
            got.push(f);
        }
        assert_eq!(d.pending(), 0, "a whole number of frames");
        Ok(got)
    }

    fn one(kind: u8, id: u64, payload: &[u8]) -> Frame {
        Frame {
            kind,
            id,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn every_message_survives_the_wire_in_both_directions() {
        for (id, msg) in from_helper_messages() {
            let mut wire = Vec::new();
            msg.encode(id, &mut wire);
            let f = frames(&wire, MAX_FROM_HELPER).unwrap();
            assert_eq!(f.len(), 1);
            assert_eq!(f[0].kind, msg.kind());
            assert_eq!(FromHelper::decode(f[0].clone()).unwrap(), (id, msg));
        }
        let no_program = Start {
            program: None,
            ..start()
        };
        for msg in [
            ToHelper::Start(start()),
            ToHelper::Start(no_program),
            ToHelper::Start(Start::default()),
            ToHelper::Cancel,
            ToHelper::OpenSession(start()),
            ToHelper::Run(run()),
            ToHelper::Run(Run {
                code: Vec::new(),
                ..run()
            }),
        ] {
            let mut wire = Vec::new();
            msg.encode(9, &mut wire);
            let f = frames(&wire, MAX_TO_HELPER).unwrap();
            assert_eq!(f[0].kind, msg.kind());
            assert_eq!(ToHelper::decode(f[0].clone()).unwrap(), (9, msg));
        }
    }

    /// The frames version 1 defined keep their bytes (version 2 only added kinds, version 3 only
    /// gave the cap [`NO_CAP`] its meaning), and the new kinds have the layout written here: a
    /// change to either must bump [`VERSION`].
    #[test]
    fn the_wire_format_is_version_3() {
        let mut wire = Vec::new();
        FromHelper::Hello { version: 1, pid: 5 }.encode(0, &mut wire);
        FromHelper::Output {
            stream: Stream::Stderr,
            bytes: b"hi".to_vec(),
        }
        .encode(3, &mut wire);
        FromHelper::Exit {
            status: 137,
            signaled: true,
        }
        .encode(3, &mut wire);
        ToHelper::Cancel.encode(3, &mut wire);
        ToHelper::Run(Run {
            session: 4,
            grace_ms: 5,
            cap: 6,
            code: b"x".to_vec(),
        })
        .encode(3, &mut wire);
        FromHelper::Reply {
            bytes: b"{}".to_vec(),
        }
        .encode(3, &mut wire);
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0, 0, 0, 17, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5,
            0, 0, 0, 12, 18, 0, 0, 0, 0, 0, 0, 0, 3, 2, b'h', b'i',
            0, 0, 0, 14, 20, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 137, 1,
            0, 0, 0, 9, 2, 0, 0, 0, 0, 0, 0, 0, 3,
            0, 0, 0, 38, 4, 0, 0, 0, 0, 0, 0, 0, 3,
            0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 6,
            0, 0, 0, 1, b'x',
            0, 0, 0, 11, 22, 0, 0, 0, 0, 0, 0, 0, 3, b'{', b'}',
        ];
        assert_eq!(wire, expected);
        assert_eq!(VERSION, 3);
    }

    #[test]
    fn frames_survive_any_split() {
        let mut wire = Vec::new();
        ToHelper::Start(start()).encode(7, &mut wire);
        ToHelper::Cancel.encode(7, &mut wire);
        for split in 0..wire.len() {
            let mut d = Decoder::new(MAX_TO_HELPER);
            d.push(&wire[..split]);
            let mut got = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                got.push(ToHelper::decode(f).unwrap());
            }
            d.push(&wire[split..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(ToHelper::decode(f).unwrap());
            }
            assert_eq!(
                got,
                [(7, ToHelper::Start(start())), (7, ToHelper::Cancel)],
                "split at {split}"
            );
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn the_decoder_refuses_frames_outside_their_bounds() {
        let mut d = Decoder::new(MAX_FROM_HELPER);
        d.push(&u32::MAX.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(ProtoError::LongFrame {
                len: u32::MAX as usize + 4,
                max: MAX_FROM_HELPER
            }),
            "refused from the length alone, before the bytes arrive"
        );
        let mut d = Decoder::new(MAX_FROM_HELPER);
        d.push(&[0, 0, 0, 3, 1, 2, 3]);
        assert_eq!(d.next_frame(), Err(ProtoError::ShortFrame { len: 3 }));
        // An output chunk fits the daemon's bound; a start with a program does not.
        let mut wire = Vec::new();
        FromHelper::Output {
            stream: Stream::Stdout,
            bytes: vec![1; CHUNK],
        }
        .encode(1, &mut wire);
        assert!(frames(&wire, MAX_FROM_HELPER).is_ok());
        let mut wire = Vec::new();
        ToHelper::Start(Start {
            program: Some(vec![b'#'; CHUNK]),
            ..start()
        })
        .encode(1, &mut wire);
        assert!(matches!(
            frames(&wire, MAX_FROM_HELPER),
            Err(ProtoError::LongFrame { .. })
        ));
    }

    #[test]
    fn malformed_messages_from_the_helper_are_refused() {
        use ProtoError::*;
        let bad = |kind, id, payload: &[u8]| FromHelper::decode(one(kind, id, payload));
        // Kinds it does not send (the daemon's own included), and unknown ones.
        for kind in [0, START, CANCEL, OPEN_SESSION, RUN, 15, 23, 255] {
            assert_eq!(bad(kind, 1, &[]), Err(UnknownKind { kind }));
        }
        // Each fixed-size payload one byte short and one byte long.
        for (id, msg) in from_helper_messages() {
            let mut wire = Vec::new();
            msg.encode(id, &mut wire);
            let payload = &wire[HEADER..];
            let kind = msg.kind();
            if matches!(kind, OUTPUT | FAILED | REPLY) {
                continue;
            }
            assert_eq!(
                bad(kind, id, &payload[..payload.len() - 1]),
                Err(Truncated { kind })
            );
            let mut long = payload.to_vec();
            long.push(0);
            assert_eq!(bad(kind, id, &long), Err(Trailing { kind }));
        }
        assert_eq!(bad(OUTPUT, 1, &[]), Err(Truncated { kind: OUTPUT }));
        for stream in [0, 3, 255] {
            assert_eq!(
                bad(OUTPUT, 1, &[stream, b'x']),
                Err(BadStream {
                    kind: OUTPUT,
                    stream
                })
            );
            let mut skip = vec![stream];
            skip.extend_from_slice(&5u64.to_be_bytes());
            assert_eq!(
                bad(SKIPPED, 1, &skip),
                Err(BadStream {
                    kind: SKIPPED,
                    stream
                })
            );
        }
        let mut over = vec![1];
        over.extend_from_slice(&[b'x'; CHUNK + 1]);
        assert!(matches!(
            bad(OUTPUT, 1, &over),
            Err(BadField { kind: OUTPUT, .. })
        ));
        assert!(matches!(
            bad(EXIT, 1, &[0, 0, 0, 0, 2]),
            Err(BadField { kind: EXIT, .. })
        ));
        // A hello carries no call id; a call frame always does.
        let hello = [0, 0, 0, 1, 0, 0, 0, 9];
        assert_eq!(bad(HELLO, 3, &hello), Err(BadCallId { kind: HELLO, id: 3 }));
        let mut over = vec![b'x'; CHUNK + 1];
        assert!(matches!(
            bad(REPLY, 1, &over),
            Err(BadField { kind: REPLY, .. })
        ));
        over.truncate(CHUNK);
        assert!(bad(REPLY, 1, &over).is_ok());
        for kind in STARTED..=REPLY {
            assert_eq!(bad(kind, 0, &[]), Err(BadCallId { kind, id: 0 }));
        }
        // Another version is named as such, whatever its payload looks like.
        assert_eq!(
            bad(HELLO, 0, &[0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0]),
            Err(Version { helper: 1 })
        );
        assert_eq!(
            bad(HELLO, 0, &[0, 0, 0, 4, 0, 0, 0, 9, 0, 0, 0, 0]),
            Err(Version { helper: 4 })
        );
        assert_eq!(bad(HELLO, 0, &[0, 0, 0, 0]), Err(Version { helper: 0 }));
        // A reason is text for a message: cut and repaired, never refused.
        let (_, msg) = bad(FAILED, 1, &[b'r'; 4000]).unwrap();
        assert_eq!(
            msg,
            FromHelper::Failed {
                reason: "r".repeat(MAX_REASON)
            }
        );
        let (_, msg) = bad(FAILED, 1, b"no\xffway").unwrap();
        assert_eq!(
            msg,
            FromHelper::Failed {
                reason: "no\u{fffd}way".into()
            }
        );
    }

    #[test]
    fn malformed_messages_from_the_daemon_are_refused() {
        use ProtoError::*;
        let bad = |kind, id, payload: &[u8]| ToHelper::decode(one(kind, id, payload));
        for kind in [0, 5, HELLO, OUTPUT, EXIT, REPLY, 255] {
            assert_eq!(bad(kind, 1, &[]), Err(UnknownKind { kind }));
        }
        assert_eq!(bad(CANCEL, 1, &[0]), Err(Trailing { kind: CANCEL }));
        assert_eq!(
            bad(CANCEL, 0, &[]),
            Err(BadCallId {
                kind: CANCEL,
                id: 0
            })
        );
        let payload = start().encode();
        assert_eq!(
            bad(START, 0, &payload),
            Err(BadCallId { kind: START, id: 0 })
        );
        // Cut anywhere, a start is refused, never half-read.
        for at in 0..payload.len() {
            assert!(bad(START, 1, &payload[..at]).is_err(), "cut at {at}");
        }
        let mut long = payload.clone();
        long.push(0);
        assert_eq!(bad(START, 1, &long), Err(Trailing { kind: START }));
        let mut flag = Start {
            program: None,
            ..start()
        }
        .encode();
        *flag.last_mut().unwrap() = 2;
        assert!(matches!(
            bad(START, 1, &flag),
            Err(BadField { kind: START, .. })
        ));
        // A run names a session, and its code is length-prefixed like every byte string.
        let payload = run().encode();
        for at in 0..payload.len() {
            assert!(bad(RUN, 1, &payload[..at]).is_err(), "cut at {at}");
        }
        assert_eq!(bad(RUN, 0, &payload), Err(BadCallId { kind: RUN, id: 0 }));
        let no_session = Run {
            session: 0,
            ..run()
        }
        .encode();
        assert!(matches!(
            bad(RUN, 1, &no_session),
            Err(BadField { kind: RUN, .. })
        ));
        assert_eq!(
            bad(OPEN_SESSION, 0, &start().encode()),
            Err(BadCallId {
                kind: OPEN_SESSION,
                id: 0
            })
        );
        // An argument count far above what the payload could hold: refused before allocating.
        let mut lying = vec![0; 24];
        lying.extend_from_slice(&0u32.to_be_bytes());
        lying.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            bad(START, 1, &lying),
            Err(BadField { kind: START, .. })
        ));
    }

    /// Random and mutated streams never panic either decoder, and whatever decodes re-encodes
    /// to the very bytes it came from (one spelling per message: nothing is silently ignored).
    #[test]
    fn random_bytes_never_panic_and_accepted_frames_are_canonical() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut valid = Vec::new();
        for (id, msg) in from_helper_messages() {
            // The full chunk would only soak up the mutations.
            if !matches!(&msg, FromHelper::Output { bytes, .. } | FromHelper::Reply { bytes } if bytes.len() == CHUNK)
            {
                msg.encode(id, &mut valid);
            }
        }
        ToHelper::Start(start()).encode(5, &mut valid);
        ToHelper::Cancel.encode(5, &mut valid);
        ToHelper::Run(run()).encode(5, &mut valid);
        let mut accepted = 0;
        for round in 0..20_000 {
            let wire: Vec<u8> = if round % 2 == 0 {
                // Mutations of valid frames reach the payload checks.
                let mut w = valid.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % w.len();
                    w[at] = next() as u8;
                }
                let keep = (next() as usize) % (w.len() + 1);
                w.truncate(keep);
                w
            } else {
                // A plausible header over random bytes.
                let n = (next() % 48) as usize;
                let mut w = ((9 + n) as u32).to_be_bytes().to_vec();
                w.push(
                    [
                        HELLO,
                        STARTED,
                        OUTPUT,
                        SKIPPED,
                        EXIT,
                        FAILED,
                        REPLY,
                        START,
                        CANCEL,
                        OPEN_SESSION,
                        RUN,
                        99,
                    ][(next() % 12) as usize],
                );
                w.extend_from_slice(&(next() % 3).to_be_bytes());
                w.extend((0..n).map(|_| next() as u8));
                w
            };
            for max in [MAX_FROM_HELPER, MAX_TO_HELPER] {
                let mut d = Decoder::new(max);
                for piece in wire.chunks(1 + (next() % 64) as usize) {
                    d.push(piece);
                }
                while let Ok(Some(f)) = d.next_frame() {
                    let mut raw = Vec::new();
                    encode(&mut raw, f.kind, f.id, &f.payload);
                    let mut again = Vec::new();
                    if let Ok((id, msg)) = FromHelper::decode(f.clone()) {
                        if matches!(msg, FromHelper::Failed { .. }) {
                            continue;
                        }
                        msg.encode(id, &mut again);
                    } else if let Ok((id, msg)) = ToHelper::decode(f) {
                        msg.encode(id, &mut again);
                    } else {
                        continue;
                    }
                    assert_eq!(again, raw);
                    accepted += 1;
                }
            }
        }
        assert!(
            accepted > 5000,
            "the fuzzing reached the decoders: {accepted}"
        );
    }
}
