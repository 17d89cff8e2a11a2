//! Output of a running call as it is produced, for whoever follows it: a streaming HTTP answer
//! (Server-Sent Events) or a background job's record.
//!
//! Each stream is a ring of the latest bytes with absolute offsets, so a follower that joins late
//! or reads slowly learns exactly how much it missed instead of stalling the call: the producer
//! never waits for a reader, and memory is the rings' size whatever the call prints.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

/// One of a process's two output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// Its name in events and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The latest bytes of one stream.
#[derive(Debug)]
struct Ring {
    buf: VecDeque<u8>,
    /// Absolute offset of `buf[0]`: how many bytes fell out of the front.
    start: u64,
    cap: usize,
}

impl Ring {
    fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    fn push(&mut self, data: &[u8]) {
        if data.len() >= self.cap {
            self.start = self.end() + (data.len() - self.cap) as u64;
            self.buf.clear();
            self.buf.extend(&data[data.len() - self.cap..]);
            return;
        }
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.start += overflow as u64;
        self.buf.extend(data);
    }
}

/// What a follower reads: the bytes after its position, and how many it missed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Piece {
    /// Bytes that fell out of the ring before the follower read them.
    pub missed: u64,
    /// The bytes, at most the ring's size.
    pub bytes: Vec<u8>,
}

/// A follower's position in both streams.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cursor {
    pos: [u64; 2],
}

/// Everything a stream kept, for a job's record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kept {
    /// The ring's bytes (the latest output).
    pub bytes: Vec<u8>,
    /// Bytes before them that were not kept.
    pub dropped: u64,
}

#[derive(Debug)]
struct State {
    rings: [Ring; 2],
}

/// The live output of one call; shared by the call (which pushes) and its followers.
#[derive(Debug)]
pub struct LiveOutput {
    state: Mutex<State>,
    /// Bumped on every change; followers wait on it.
    changed: watch::Sender<u64>,
}

impl LiveOutput {
    /// Live output keeping the latest `cap` bytes of each stream.
    pub fn new(cap: usize) -> Arc<Self> {
        let ring = || Ring {
            buf: VecDeque::new(),
            start: 0,
            cap: cap.max(1),
        };
        Arc::new(LiveOutput {
            state: Mutex::new(State {
                rings: [ring(), ring()],
            }),
            changed: watch::Sender::new(0),
        })
    }

    /// Adds bytes the call printed.
    pub fn push(&self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.state.lock().rings[stream.index()].push(data);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees every change from now on (take it before reading, so that nothing
    /// pushed in between is missed).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// What `stream` holds past `cursor`, at most `max` bytes; moves the cursor.
    pub fn read(&self, cursor: &mut Cursor, stream: Stream, max: usize) -> Piece {
        let st = self.state.lock();
        let ring = &st.rings[stream.index()];
        let pos = &mut cursor.pos[stream.index()];
        let missed = ring.start.saturating_sub(*pos);
        let from = (*pos).max(ring.start);
        let skip = (from - ring.start) as usize;
        let take = (ring.buf.len() - skip).min(max);
        let bytes: Vec<u8> = ring.buf.range(skip..skip + take).copied().collect();
        *pos = from + take as u64;
        Piece { missed, bytes }
    }

    /// What `stream` keeps now.
    pub fn kept(&self, stream: Stream) -> Kept {
        let st = self.state.lock();
        let ring = &st.rings[stream.index()];
        Kept {
            bytes: ring.buf.iter().copied().collect(),
            dropped: ring.start,
        }
    }
}

/// Where a call's captured output also goes as it arrives.
#[derive(Debug, Clone)]
pub struct Tap {
    /// The live output.
    pub output: Arc<LiveOutput>,
    /// Every byte (a background job), or only what the output cap keeps at the head (a streamed
    /// call: its tail arrives in the result).
    pub all: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_reads_in_order_and_learns_what_it_missed() {
        let live = LiveOutput::new(8);
        let mut c = Cursor::default();
        live.push(Stream::Stdout, b"abc");
        assert_eq!(
            live.read(&mut c, Stream::Stdout, 100),
            Piece {
                missed: 0,
                bytes: b"abc".to_vec()
            }
        );
        live.push(Stream::Stdout, b"defghijklmn"); // 11 bytes: the ring keeps the last 8
        let p = live.read(&mut c, Stream::Stdout, 100);
        assert_eq!((p.missed, p.bytes.as_slice()), (3, &b"ghijklmn"[..]));
        assert_eq!(live.read(&mut c, Stream::Stdout, 100), Piece::default());
        assert_eq!(
            live.kept(Stream::Stdout),
            Kept {
                bytes: b"ghijklmn".to_vec(),
                dropped: 6
            }
        );
        assert_eq!(live.kept(Stream::Stderr), Kept::default());
    }

    #[test]
    fn reads_are_bounded_and_resume() {
        let live = LiveOutput::new(16);
        let mut c = Cursor::default();
        live.push(Stream::Stderr, b"0123456789");
        assert_eq!(live.read(&mut c, Stream::Stderr, 4).bytes, b"0123");
        assert_eq!(live.read(&mut c, Stream::Stderr, 100).bytes, b"456789");
    }

    #[test]
    fn memory_is_the_ring_whatever_is_pushed() {
        let live = LiveOutput::new(1024);
        let chunk = vec![b'y'; 65536];
        for _ in 0..100 {
            live.push(Stream::Stdout, &chunk);
        }
        let kept = live.kept(Stream::Stdout);
        assert_eq!(kept.bytes.len(), 1024);
        assert_eq!(kept.dropped, 100 * 65536 - 1024);
    }
}
