//! The channel protocol between the daemon and `zcbot-supervise --serve`.
//!
//! One long-lived `docker exec -i` per container carries every call of that user. Both directions
//! are a stream of frames, never lines, so user output can hold any byte:
//!
//! ```text
//! u32 big-endian length of what follows | u8 kind | u64 big-endian call id | payload
//! ```
//!
//! The daemon treats everything the helper sends as untrusted (the sandbox user runs as the same
//! uid and may replace it): the decoder bounds every frame and reports a malformed one as an error,
//! after which the channel is dead. This module is plain std so both sides share one definition.

use std::fmt;

/// Protocol version the helper announces in its hello.
pub const VERSION: u32 = 1;
/// Bytes before the payload: length, kind, call id.
pub const HEADER: usize = 4 + 1 + 8;
/// Largest frame the daemon accepts from the helper: one output chunk and its header.
pub const MAX_FROM_HELPER: usize = CHUNK + 64;
/// Largest frame the helper accepts from the daemon: a start with a program of up to 16 MiB and
/// a command and environment of up to 1 MiB each.
pub const MAX_TO_HELPER: usize = 18 << 20;
/// The most output bytes one frame carries.
pub const CHUNK: usize = 32 << 10;

/// Daemon to helper: run a call (payload: [`Start`]).
pub const START: u8 = 1;
/// Daemon to helper: stop a call (SIGTERM to its supervisor). No payload.
pub const CANCEL: u8 = 2;
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

/// Why a byte stream is not a valid frame sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError(pub String);

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtoError {}

/// One frame: kind, call id, payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame is (the constants above).
    pub kind: u8,
    /// The call it concerns (0 for HELLO).
    pub id: u64,
    /// Kind-specific bytes.
    pub payload: Vec<u8>,
}

/// Appends one frame to `out`.
pub fn encode(out: &mut Vec<u8>, kind: u8, id: u64, payload: &[u8]) {
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
        if rest.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 9 {
            return Err(ProtoError(format!(
                "frame length {len} is below the header"
            )));
        }
        if len + 4 > self.max {
            return Err(ProtoError(format!(
                "frame of {} bytes is above the bound of {}",
                len + 4,
                self.max
            )));
        }
        if rest.len() < len + 4 {
            return Ok(None);
        }
        let kind = rest[4];
        let id = u64::from_be_bytes(rest[5..13].try_into().expect("8 bytes"));
        let payload = rest[13..4 + len].to_vec();
        self.at += 4 + len;
        Ok(Some(Frame { kind, id, payload }))
    }
}

/// What a START frame asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Start {
    /// The supervisor's own deadline (the daemon's timeout plus a backstop).
    pub timeout_ms: u64,
    /// Time between SIGTERM and SIGKILL for the call's processes.
    pub grace_ms: u64,
    /// Output cap per stream: the helper keeps the first half and the last half, counts the rest.
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

/// Reads fields off a payload, failing on truncation.
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `payload`.
    pub fn new(payload: &'a [u8]) -> Self {
        Reader { rest: payload }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.rest.len() < n {
            return Err(ProtoError("payload is truncated".into()));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }

    /// A big-endian i32.
    pub fn i32(&mut self) -> Result<i32, ProtoError> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }

    /// Length-prefixed bytes.
    pub fn bytes(&mut self) -> Result<&'a [u8], ProtoError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// A count-prefixed list of length-prefixed byte strings.
    pub fn list(&mut self) -> Result<Vec<Vec<u8>>, ProtoError> {
        let n = self.u32()? as usize;
        if n > self.rest.len() / 4 {
            return Err(ProtoError("list count exceeds the payload".into()));
        }
        (0..n).map(|_| self.bytes().map(<[u8]>::to_vec)).collect()
    }

    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Fails unless everything was read.
    pub fn end(&self) -> Result<(), ProtoError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ProtoError("payload has trailing bytes".into()))
        }
    }
}

impl Start {
    /// The START payload.
    pub fn encode(&self) -> Vec<u8> {
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

    /// Parses a START payload.
    pub fn decode(payload: &[u8]) -> Result<Start, ProtoError> {
        let mut r = Reader::new(payload);
        let mut s = Start {
            timeout_ms: r.u64()?,
            grace_ms: r.u64()?,
            cap: r.u64()?,
            workdir: r.bytes()?.to_vec(),
            argv: r.list()?,
            env: r.list()?,
            program: None,
        };
        s.program = match r.u8()? {
            0 => None,
            1 => Some(r.bytes()?.to_vec()),
            other => return Err(ProtoError(format!("program flag {other} is not 0 or 1"))),
        };
        r.end()?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_split_and_bad_ones_are_refused() {
        let start = Start {
            timeout_ms: 5000,
            grace_ms: 500,
            cap: 1 << 20,
            workdir: b"/workspace/a".to_vec(),
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo \n\0x".to_vec()],
            env: vec![b"A=1".to_vec()],
            program: Some(b"print(1)".to_vec()),
        };
        let mut wire = Vec::new();
        encode(&mut wire, START, 7, &start.encode());
        encode(&mut wire, CANCEL, 7, &[]);
        for split in 0..wire.len() {
            let mut d = Decoder::new(MAX_TO_HELPER);
            d.push(&wire[..split]);
            let mut got = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            d.push(&wire[split..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got.len(), 2, "split at {split}");
            assert_eq!(got[0].id, 7);
            assert_eq!(Start::decode(&got[0].payload).unwrap(), start);
            assert_eq!(got[1].kind, CANCEL);
            assert_eq!(d.pending(), 0);
        }

        let mut d = Decoder::new(MAX_FROM_HELPER);
        d.push(&u32::MAX.to_be_bytes());
        assert!(
            d.next_frame().is_err(),
            "an oversized frame is refused early"
        );
        let mut d = Decoder::new(MAX_FROM_HELPER);
        d.push(&[0, 0, 0, 3, 1, 2, 3]);
        assert!(d.next_frame().is_err(), "a frame shorter than its header");
        assert!(Start::decode(&[1, 2, 3]).is_err());
        let mut p = start.encode();
        p.push(0);
        assert!(Start::decode(&p).is_err(), "trailing bytes");
        let mut r = Reader::new(&[0, 0, 0, 200, 0]);
        assert!(r.list().is_err(), "a count larger than the payload");
    }
}
