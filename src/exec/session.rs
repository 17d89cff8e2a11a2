//! Python sessions: what `run_python` with `"session": NAME` adds to a call's result, the
//! interpreter program the sandbox runs for a session (`kernel.py`), and how its replies are read.
//!
//! A session is one long-lived `python3` per user and name, started by the channel helper under a
//! supervisor of its own (see `supervisor/src/serve.rs`), as the tenant's uid, inside the sandbox.
//! Its state (variables, imports, open files, the working directory) persists between calls. The
//! daemon side lives with the channel ([`super::channel`]): a session dies with its channel.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The interpreter a session runs, sent as its program (nothing of it is in the image).
pub(crate) const KERNEL: &str = include_str!("kernel.py");

/// The environment a session's interpreter gets over the base: a non-interactive matplotlib
/// backend (figures come back as rich results).
pub(crate) const KERNEL_ENV: &[(&str, &str)] = &[("MPLBACKEND", "Agg")];

/// The rich result types a session may return; anything else from the interpreter is dropped.
const MIMES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/svg+xml",
    "text/html",
    "text/markdown",
];

/// Checks a session name: 1 to 32 characters of `a-z`, `0-9`, `_` and `-`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadCall {
            tool: "run_python".into(),
            reason: format!(
                "session {:?} is not 1 to 32 characters of a-z, 0-9, _ and -",
                name.chars().take(40).collect::<String>()
            ),
        })
    }
}

/// An exception a session's code raised (its traceback is in `stderr`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PythonError {
    /// The exception's class name, e.g. `ZeroDivisionError`; `KeyboardInterrupt` after a timeout
    /// or cancel.
    pub name: String,
    /// Its text (`str(exc)`), at most 4 KiB.
    pub value: String,
}

/// One rich result: a figure, or a form an object offers (`_repr_png_`, `_repr_html_`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RichResult {
    /// `image/png`, `image/jpeg`, `image/svg+xml`, `text/html` or `text/markdown`.
    pub mime: String,
    /// Base64 for images other than SVG; the text itself otherwise.
    pub data: String,
}

/// What a session call adds to its [`super::ToolResult`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionOutcome {
    /// The `repr` of the code's final expression, when it is one whose value is not None (at
    /// most 64 KiB of it).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub value: Option<String>,
    /// The exception the code raised.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<PythonError>,
    /// Figures left open or shown, and rich forms of the final value: at most 16 and 4 MiB.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub results: Vec<RichResult>,
    /// Rich results dropped to keep those bounds (a note says so in `stderr`).
    #[serde(skip_serializing_if = "is_zero", default)]
    pub results_dropped: u32,
    /// This call started the session's interpreter: nothing of an earlier one is in it.
    #[schema(required = false)]
    pub session_started: bool,
    /// The session's interpreter died during this call (its code did not stop within the grace
    /// after a timeout or cancel and was killed, or it exited): its state is lost, and the next
    /// call starts a new one.
    #[schema(required = false)]
    pub session_restarted: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One reply of the interpreter, as it writes it (see `kernel.py`).
#[derive(Debug, Default, Deserialize)]
struct Reply {
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    error: Option<PythonError>,
    #[serde(default)]
    results: Vec<RichResult>,
    #[serde(default)]
    results_dropped: u32,
    #[serde(default)]
    rss: u64,
}

impl SessionOutcome {
    /// Reads an interpreter's reply (untrusted: the tenant's code shares its process) into the
    /// outcome, with the interpreter's memory. A reply that is not the expected JSON is reported
    /// as an error of the call, not trusted in part.
    pub(crate) fn read_reply(&mut self, reply: &[u8]) -> u64 {
        match serde_json::from_slice::<Reply>(reply) {
            Ok(r) => {
                self.value = r.value;
                self.error = r.error;
                let before = r.results.len();
                self.results = r
                    .results
                    .into_iter()
                    .filter(|x| MIMES.contains(&x.mime.as_str()))
                    .collect();
                self.results_dropped = r
                    .results_dropped
                    .saturating_add((before - self.results.len()) as u32);
                r.rss
            }
            Err(e) => {
                self.error = Some(PythonError {
                    name: "ZcbotReplyError".into(),
                    value: format!("the session's interpreter replied with something that is not its JSON ({e}); was it overwritten by the code?"),
                });
                0
            }
        }
    }
}

/// A session as `GET /v1/users/{user}/sessions` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionInfo {
    /// Its name.
    pub name: String,
    /// When its interpreter started (RFC 3339, UTC).
    pub started: String,
    /// When it last ran code (RFC 3339, UTC).
    pub last_used: String,
    /// The interpreter's resident memory in bytes, as of its last call.
    pub memory_bytes: u64,
    /// Whether it is running code now.
    pub running: bool,
}

/// RFC 3339 in UTC, to the second.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "main", "x_1-b", &"z".repeat(32)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "A", "a b", "a/b", "é", "..", &"z".repeat(33), "a\0"] {
            assert_eq!(check_name(bad).unwrap_err().kind(), "bad_call", "{bad:?}");
        }
    }

    #[test]
    fn replies_are_read_and_bounded_to_known_types() {
        let mut o = SessionOutcome::default();
        let rss = o.read_reply(
            br#"{"value": "3", "results": [{"mime": "image/png", "data": "iVBO"},
                 {"mime": "application/x-evil", "data": "x"}], "results_dropped": 2, "rss": 77}"#,
        );
        assert_eq!(rss, 77);
        assert_eq!(o.value.as_deref(), Some("3"));
        assert_eq!(o.results.len(), 1);
        assert_eq!(o.results_dropped, 3);
        let mut o = SessionOutcome::default();
        assert_eq!(o.read_reply(b"not json"), 0);
        assert_eq!(o.error.unwrap().name, "ZcbotReplyError");
        let mut o = SessionOutcome::default();
        o.read_reply(br#"{"error": {"name": "ValueError", "value": "bad"}}"#);
        assert_eq!(o.error.unwrap().name, "ValueError");
    }
}
