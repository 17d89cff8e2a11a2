//! Capped capture of one output stream: the head and the tail are kept (errors live at the end),
//! the middle is counted and dropped, so a call that prints gigabytes never grows the daemon's
//! memory past the cap.

use std::collections::VecDeque;

use super::live::{Stream, Tap};

/// One stream being captured.
#[derive(Debug)]
pub struct Capture {
    cap: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    total: u64,
    /// Where the bytes also go as they arrive, and as which stream.
    tap: Option<(Tap, Stream)>,
}

/// A finished stream, ready for the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// The kept bytes (head, marker, tail when truncated).
    pub bytes: Vec<u8>,
    /// Whether bytes were left out.
    pub truncated: bool,
    /// How many bytes the stream carried in all.
    pub total: u64,
}

impl Capture {
    /// A capture keeping at most `cap` bytes of content (half head, half tail).
    pub fn new(cap: usize) -> Self {
        Capture {
            cap,
            head: Vec::new(),
            tail: VecDeque::new(),
            total: 0,
            tap: None,
        }
    }

    /// A capture that also hands its bytes to `tap` as they arrive: the head it keeps, or every
    /// byte (a job: its tap keeps the latest output, and the capture itself keeps nothing).
    pub fn tapped(cap: usize, tap: Option<&Tap>, stream: Stream) -> Self {
        let cap = if tap.is_some_and(|t| t.all) { 0 } else { cap };
        Capture {
            tap: tap.map(|t| (t.clone(), stream)),
            ..Capture::new(cap)
        }
    }

    /// Adds bytes as they arrive.
    pub fn push(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if let Some((tap, stream)) = self.tap.as_ref().filter(|(t, _)| t.all) {
            tap.output.push(*stream, data);
        }
        let head_cap = self.cap / 2;
        if self.head.len() < head_cap {
            let take = data.len().min(head_cap - self.head.len());
            self.head.extend_from_slice(&data[..take]);
            if let Some((tap, stream)) = self.tap.as_ref().filter(|(t, _)| !t.all) {
                tap.output.push(*stream, &data[..take]);
            }
            data = &data[take..];
        }
        let tail_cap = self.cap - head_cap;
        if data.len() >= tail_cap {
            self.tail.clear();
            self.tail.extend(&data[data.len() - tail_cap..]);
        } else {
            let overflow = (self.tail.len() + data.len()).saturating_sub(tail_cap);
            self.tail.drain(..overflow);
            self.tail.extend(data);
        }
    }

    /// Counts `n` bytes that were dropped before they reached us: the channel's helper applies
    /// the cap inside the container and sends only the head, this count, then the tail.
    pub fn skip(&mut self, n: u64) {
        self.total += n;
        self.tail.clear();
    }

    /// The kept bytes: everything when it fit, else head + a marker + tail, cut on UTF-8
    /// character boundaries when the text is UTF-8.
    pub fn finish(self) -> Captured {
        let kept = (self.head.len() + self.tail.len()) as u64;
        let mut head = self.head;
        let mut tail: Vec<u8> = self.tail.into();
        if kept == self.total {
            head.extend_from_slice(&tail);
            return Captured {
                bytes: head,
                truncated: false,
                total: self.total,
            };
        }
        // Move a split character out of the head's end and the tail's start.
        let mut omitted = self.total - kept;
        let head_cut = utf8_cut_back(&head);
        omitted += (head.len() - head_cut) as u64;
        head.truncate(head_cut);
        let tail_start = utf8_continuations(&tail);
        omitted += tail_start as u64;
        tail.drain(..tail_start);
        head.extend_from_slice(format!("\n[... {omitted} bytes omitted ...]\n").as_bytes());
        head.extend_from_slice(&tail);
        Captured {
            bytes: head,
            truncated: true,
            total: self.total,
        }
    }
}

/// How many bytes at the start of `b` continue a character that began before it (at most 3).
pub(crate) fn utf8_continuations(b: &[u8]) -> usize {
    b.iter()
        .take(3)
        .take_while(|b| (**b & 0xC0) == 0x80)
        .count()
}

/// The length of `b` without a trailing incomplete UTF-8 character.
pub(crate) fn utf8_cut_back(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let byte = b[b.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // continuation byte: keep looking for the lead
        }
        let need = match byte {
            0x00..=0x7F => 1,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            _ => 4,
        };
        return if need > back { b.len() - back } else { b.len() };
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything_under_the_cap() {
        let mut c = Capture::new(100);
        c.push(b"hello ");
        c.push(b"world");
        let out = c.finish();
        assert_eq!(out.bytes, b"hello world");
        assert!(!out.truncated);
    }

    #[test]
    fn keeps_head_and_tail_with_a_count() {
        let mut c = Capture::new(10);
        for chunk in [&b"0123456789"[..], b"abcdefghij", b"KLMNOPQRST"] {
            c.push(chunk);
        }
        let out = c.finish();
        assert!(out.truncated);
        assert_eq!(out.total, 30);
        assert_eq!(
            String::from_utf8(out.bytes).unwrap(),
            "01234\n[... 20 bytes omitted ...]\nPQRST"
        );
    }

    #[test]
    fn a_count_skipped_in_the_container_reads_like_the_same_flood_here() {
        // The helper sends the head, the count it dropped, then the tail.
        let mut c = Capture::new(10);
        c.push(b"01234");
        c.skip(20);
        c.push(b"PQRST");
        assert_eq!(
            String::from_utf8(c.finish().bytes).unwrap(),
            "01234\n[... 20 bytes omitted ...]\nPQRST"
        );
    }

    #[test]
    fn memory_stays_bounded_under_a_flood() {
        let mut c = Capture::new(1024);
        let chunk = vec![b'y'; 65536];
        for _ in 0..1000 {
            c.push(&chunk);
        }
        assert!(c.head.len() + c.tail.len() <= 1024);
        assert_eq!(c.total, 65_536_000);
    }

    #[test]
    fn cuts_on_character_boundaries() {
        let mut c = Capture::new(8);
        c.push("ééééééééé".as_bytes()); // 18 bytes of 2-byte characters
        let out = c.finish();
        let text = String::from_utf8(out.bytes).expect("still valid UTF-8");
        assert!(
            text.starts_with("éé\n[...") && text.ends_with("\néé"),
            "{text}"
        );
    }
}
