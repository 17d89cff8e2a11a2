//! Server-Sent Events: a call's or a job's output as it is produced.
//!
//! One answer is `started`, then `stdout`/`stderr` events (`{"text": ...}`, with `"base64"` when
//! the bytes are not UTF-8 and `"missed": N` when a slow follower of a job lost N bytes to its
//! ring), then one last event (`result`, or `error` when the call could not run). The body
//! drives the call's future itself: a client that goes away drops it, which stops the call as a
//! dropped request does. A comment every [`KEEP_ALIVE`] makes a vanished client show up even
//! while the call prints nothing.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use futures_util::stream::{self, Stream as FutStream};
use serde_json::{json, Value};

use super::ApiError;
use crate::exec::live::{Cursor, LiveOutput, Stream};

/// How often an idle stream sends a comment.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// The most bytes one output event carries.
const EVENT_BYTES: usize = 32 << 10;

/// Whether the request asks for an event stream: `stream=true` (or `1`) in the query, or, without
/// `stream`, `Accept: text/event-stream`; `stream=false` (or `0`) answers JSON whatever `Accept`
/// says. Any other value of `stream` is refused, so a typo does not quietly answer the other way.
pub(super) fn wanted(headers: &HeaderMap, query: Option<&str>) -> Result<bool, ApiError> {
    let accept = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/event-stream"));
    let mut asked = None;
    for kv in query.unwrap_or("").split('&') {
        let Some(value) = kv.strip_prefix("stream=") else {
            continue;
        };
        asked = match value {
            "1" | "true" => Some(true),
            "0" | "false" => Some(false),
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_query",
                    "stream is true or false (1 or 0)",
                ))
            }
        };
    }
    Ok(asked.unwrap_or(accept))
}

/// One event of a stream, as the document describes it: its name and its JSON as text.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct StreamEvent {
    /// `started`, `stdout`, `stderr`, then `result` or `error`.
    #[schema(pattern = "^(started|stdout|stderr|result|error)$")]
    pub(super) event: String,
    /// The event's JSON: `{call_id, tool}` or `{job_id, tool}`; `{text, base64?, missed?}`; the
    /// result (a tool result, or the job); `{error: {kind, message}, status}` (the status the
    /// same error has outside a stream).
    pub(super) data: String,
}

/// An event named `name` carrying `data` as JSON.
pub(super) fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// Follows `live` from its start: `first`, the output as it comes, and the event `end` gives
/// once it resolves (after the output printed before it). `hold` lives as long as the body.
///
/// Events are made one at a time, as the client takes them: a slow client holds one event, never
/// a queue (the ring holds the rest, and a reader that falls behind it is told what it missed),
/// and a fast producer cannot keep the follower from yielding.
pub(super) fn follow<H: Send + 'static>(
    live: Arc<LiveOutput>,
    first: Event,
    end: BoxFuture<'static, Event>,
    hold: H,
) -> Response {
    let state = Follow {
        changed: live.watch(),
        live,
        cursor: Cursor::default(),
        carry: [Vec::new(), Vec::new()],
        turn: 1,
        first: Some(first),
        end: Some(end),
        last: None,
        _hold: hold,
    };
    let events = stream::unfold(state, |mut st| async move {
        let ev = st.next().await?;
        Some((Ok::<_, Infallible>(ev), st))
    });
    sse(events)
}

fn sse(events: impl FutStream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    let mut resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Proxies that buffer (nginx) pass events on at once with this.
    resp.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    resp
}

struct Follow<H> {
    live: Arc<LiveOutput>,
    changed: tokio::sync::watch::Receiver<u64>,
    cursor: Cursor,
    /// The start of a character cut at the end of the last read, per stream.
    carry: [Vec<u8>; 2],
    /// The stream read first next time (they alternate).
    turn: usize,
    first: Option<Event>,
    /// What ends the stream; None once it has resolved into `last`.
    end: Option<BoxFuture<'static, Event>>,
    last: Option<Event>,
    _hold: H,
}

impl<H> Follow<H> {
    /// The next event; None after the last.
    async fn next(&mut self) -> Option<Event> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        loop {
            // What the rings hold goes first, even when the end has come (it was printed before).
            if let Some((stream, bytes, missed)) = self.read_one() {
                return Some(output_event(stream, &bytes, missed));
            }
            if let Some(last) = self.last.take() {
                return Some(last);
            }
            let end = self.end.as_mut()?;
            tokio::select! {
                biased;
                _ = self.changed.changed() => {}
                last = end => {
                    self.end = None;
                    self.last = Some(last);
                }
            }
        }
    }

    /// What the rings hold past the cursor, for one event (the streams take turns, so a flood on
    /// one never starves the other): the stream, its bytes
    /// (a character cut at their end held back until its rest comes; once the end has come, sent
    /// as it is) and how many bytes were missed before them.
    fn read_one(&mut self) -> Option<(Stream, Vec<u8>, u64)> {
        self.changed.borrow_and_update();
        let ended = self.end.is_none();
        self.turn ^= 1;
        for i in [self.turn, self.turn ^ 1] {
            let stream = [Stream::Stdout, Stream::Stderr][i];
            let piece = self.live.read(&mut self.cursor, stream, EVENT_BYTES);
            let mut missed = piece.missed;
            let mut bytes = if missed > 0 {
                // The held-back start lost its end, and the bytes may start mid-character.
                missed += std::mem::take(&mut self.carry[i]).len() as u64;
                let split = crate::exec::output::utf8_continuations(&piece.bytes);
                missed += split as u64;
                piece.bytes[split..].to_vec()
            } else {
                let mut b = std::mem::take(&mut self.carry[i]);
                b.extend_from_slice(&piece.bytes);
                b
            };
            if !(ended && piece.bytes.is_empty()) {
                let cut = crate::exec::output::utf8_cut_back(&bytes);
                self.carry[i] = bytes.split_off(cut);
            }
            if !bytes.is_empty() || missed > 0 {
                return Some((stream, bytes, missed));
            }
        }
        None
    }
}

/// A `stdout`/`stderr` event.
fn output_event(stream: Stream, bytes: &[u8], missed: u64) -> Event {
    let (text, b64) = crate::text::to_text(bytes);
    let mut data = json!({ "text": text });
    if let Some(b64) = b64 {
        data["base64"] = json!(b64);
    }
    if missed > 0 {
        data["missed"] = json!(missed);
    }
    event(stream.name(), &data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follower(live: &Arc<LiveOutput>, ended: bool) -> Follow<()> {
        Follow {
            changed: live.watch(),
            live: live.clone(),
            cursor: Cursor::default(),
            carry: [Vec::new(), Vec::new()],
            turn: 1,
            first: None,
            end: (!ended).then(|| Box::pin(std::future::pending()) as BoxFuture<'static, Event>),
            last: None,
            _hold: (),
        }
    }

    #[test]
    fn a_split_character_is_held_back_until_its_rest_comes() {
        let live = LiveOutput::new(64);
        let mut f = follower(&live, false);
        let e = "é".as_bytes();
        live.push(Stream::Stdout, &[b'a', e[0]]);
        assert_eq!(f.read_one(), Some((Stream::Stdout, b"a".to_vec(), 0)));
        assert_eq!(f.read_one(), None, "half a character is not sent");
        live.push(Stream::Stdout, &[e[1], b'b']);
        assert_eq!(f.read_one(), Some((Stream::Stdout, "éb".into(), 0)));
        // At the end, what is held back goes as it is.
        live.push(Stream::Stderr, &[0xff]);
        assert_eq!(f.read_one(), None);
        f.end = None;
        assert_eq!(f.read_one(), Some((Stream::Stderr, vec![0xff], 0)));
        assert_eq!(f.read_one(), None);
    }

    #[test]
    fn a_reader_behind_the_ring_is_told_what_it_missed_and_reads_whole_characters() {
        let live = LiveOutput::new(5);
        let mut f = follower(&live, true);
        live.push(Stream::Stdout, "xxéabcd".as_bytes()); // 8 bytes: the ring keeps "\xa9abcd"
                                                         // 3 fell out of the ring, and the cut character's last byte is not shown.
        assert_eq!(f.read_one(), Some((Stream::Stdout, b"abcd".to_vec(), 4)));
    }

    #[test]
    fn a_flood_on_one_stream_does_not_starve_the_other() {
        let live = LiveOutput::new(1 << 20);
        let mut f = follower(&live, true);
        live.push(Stream::Stdout, &vec![b'y'; 200_000]);
        live.push(Stream::Stderr, b"err");
        let first = f.read_one().unwrap();
        let second = f.read_one().unwrap();
        assert_eq!(first.0, Stream::Stdout);
        assert_eq!(
            (second.0, second.1.as_slice()),
            (Stream::Stderr, &b"err"[..])
        );
    }

    #[test]
    fn one_read_is_one_bounded_event() {
        let live = LiveOutput::new(1 << 20);
        let mut f = follower(&live, true);
        live.push(Stream::Stdout, &vec![b'y'; 100_000]);
        let (_, bytes, _) = f.read_one().unwrap();
        assert_eq!(bytes.len(), EVENT_BYTES);
    }

    #[test]
    fn the_header_or_the_query_asks_for_a_stream() {
        let mut h = HeaderMap::new();
        let wanted = |h: &HeaderMap, q| wanted(h, q).unwrap();
        assert!(!wanted(&h, None));
        assert!(wanted(&h, Some("a=1&stream=1")));
        assert!(wanted(&h, Some("stream=true")));
        assert!(!wanted(&h, Some("stream=0")));
        assert!(!wanted(&h, Some("stream=false")));
        h.insert(
            axum::http::header::ACCEPT,
            "application/json, Text/Event-Stream".parse().unwrap(),
        );
        assert!(wanted(&h, None));
        assert!(
            !wanted(&h, Some("stream=false")),
            "an explicit no wins over Accept"
        );
    }

    #[test]
    fn a_stream_value_that_is_neither_yes_nor_no_is_refused() {
        let h = HeaderMap::new();
        for q in [
            "stream=yes",
            "stream=",
            "stream=null&stream=null",
            "a=1&stream=2",
        ] {
            let e = wanted(&h, Some(q)).unwrap_err();
            assert_eq!(e.kind, "bad_query", "{q}");
        }
    }
}
