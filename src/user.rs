//! `UserId`: the one validated form of a user id, checked before anything touches Docker or disk.
//!
//! The rule: 1 to 63 characters from `a-z`, `0-9`, `_` and `-`, starting with a letter or digit.
//! So `zcbot-sandbox-<user>` is always a valid container name, `<users_root>/<user>` is always one
//! plain path component (no `/`, no `.`, no `..`, no NUL, never hidden, never an option to a tool),
//! and two ids that differ only in case cannot exist (no collision on a case-folding file system).

use std::fmt;

use crate::error::{Error, Result};

/// The longest accepted user id. 63 keeps `zcbot-sandbox-<pool>.<user>` well under Docker's limits
/// and matches a DNS label.
pub const MAX_USER_LEN: usize = 63;

/// A user id that passed validation. The only way to make one is [`UserId::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    /// Validates `input` against the user id rule (see the module docs).
    pub fn parse(input: &str) -> Result<Self> {
        let bad = |reason| {
            Err(Error::InvalidUser {
                input: input.chars().take(80).collect(),
                reason,
            })
        };
        if input.is_empty() {
            return bad("it is empty");
        }
        if input.len() > MAX_USER_LEN {
            return bad("it is longer than 63 characters");
        }
        let first = input.as_bytes()[0];
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return bad("it must start with a lowercase letter or a digit");
        }
        if !input
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return bad("only lowercase letters, digits, '_' and '-' are allowed");
        }
        Ok(UserId(input.to_owned()))
    }

    /// An id for the daemon's own use (the self-check's probe sandbox), deliberately outside the
    /// rule above (a leading `_`) so no real user can ever have it.
    pub(crate) fn internal(name: &'static str) -> Self {
        debug_assert!(name.starts_with('_') && UserId::parse(name).is_err());
        UserId(name.to_owned())
    }

    /// Whether this is one of the daemon's own ids (not a user's): kept out of the metrics.
    pub fn is_internal(&self) -> bool {
        self.0.starts_with('_')
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for UserId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        UserId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids() {
        for ok in ["a", "alice", "user_42", "0abc", "a-b-c", &"x".repeat(63)] {
            assert_eq!(UserId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_everything_that_could_escape_or_collide() {
        let long = "x".repeat(64);
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "/abs",
            "a\0b",
            "-rf",
            "_x",
            ".hidden",
            "a.b",
            "Alice",
            "a b",
            "é",
            long.as_str(),
        ] {
            let err = UserId::parse(bad).unwrap_err();
            assert_eq!(err.kind(), "invalid_user", "{bad:?} was accepted");
        }
    }

    #[test]
    fn error_names_the_rule() {
        let msg = UserId::parse("../etc").unwrap_err().to_string();
        assert!(
            msg.contains("../etc") && msg.contains("start with"),
            "{msg}"
        );
    }
}
