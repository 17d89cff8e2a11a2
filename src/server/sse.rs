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

use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use futures_util::stream::{self, Stream as FutStream};
use serde_json::{json, Value};

use crate::exec::live::{Cursor, LiveOutput, Stream};

/// How often an idle stream sends a comment.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// The most bytes one output event carries.
const EVENT_BYTES: usize = 32 << 10;

/// Whether the request asks for an event stream: `Accept: text/event-stream`, or `stream=1`
/// (or `true`) in the query.
pub(super) fn wanted(headers: &HeaderMap, query: Option<&str>) -> bool {
    let accept = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/event-stream"));
    let asked = query.is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "stream=1" | "stream=true"))
    });
    accept || asked
}

/// An event named `name` carrying `data` as JSON.
pub(super) fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// Follows `live` from its start: `first`, the output as it comes, and the event `end` gives
/// once it resolves (after the output printed before it). `hold` lives as long as the body.
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
        queue: std::collections::VecDeque::from([first]),
        end: Some(end),
        _hold: hold,
    };
    let events = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(ev), st));
            }
            let end = st.end.as_mut()?;
            tokio::select! {
                biased;
                changed = st.changed.changed() => {
                    if changed.is_ok() {
                        st.drain(false);
                    }
                }
                last = end => {
                    st.end = None;
                    st.drain(true);
                    st.queue.push_back(last);
                }
            }
        }
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
    queue: std::collections::VecDeque<Event>,
    end: Option<BoxFuture<'static, Event>>,
    _hold: H,
}

impl<H> Follow<H> {
    /// Queues what the streams hold past the cursor; `last`: flush cut characters too.
    fn drain(&mut self, last: bool) {
        self.changed.borrow_and_update();
        for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            loop {
                let piece = self.live.read(&mut self.cursor, stream, EVENT_BYTES);
                if piece.bytes.is_empty() && piece.missed == 0 {
                    break;
                }
                let mut bytes = if piece.missed > 0 {
                    std::mem::take(&mut self.carry[i]); // its character's end was lost
                    piece.bytes
                } else {
                    let mut b = std::mem::take(&mut self.carry[i]);
                    b.extend_from_slice(&piece.bytes);
                    b
                };
                let cut = crate::exec::output::utf8_cut_back(&bytes);
                self.carry[i] = bytes.split_off(cut);
                self.push(stream, &bytes, piece.missed);
            }
            if last {
                let rest = std::mem::take(&mut self.carry[i]);
                self.push(stream, &rest, 0);
            }
        }
    }

    fn push(&mut self, stream: Stream, bytes: &[u8], missed: u64) {
        if bytes.is_empty() && missed == 0 {
            return;
        }
        let (text, b64) = crate::text::to_text(bytes);
        let mut data = json!({ "text": text });
        if let Some(b64) = b64 {
            data["base64"] = json!(b64);
        }
        if missed > 0 {
            data["missed"] = json!(missed);
        }
        self.queue.push_back(event(stream.name(), &data));
    }
}
