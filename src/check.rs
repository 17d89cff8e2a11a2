//! The verdict of one readiness or smoke check, typed, so `/readyz`, the users root and the smoke
//! decide on the verdict rather than on how its text happens to start.
//!
//! Below every layer (it knows nothing of the pool): the users root, the host firewall, the
//! self-check and the routes all produce or read it.

use std::fmt;

use serde::Serialize;

/// How one check came out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum Check {
    /// In force; the detail says what was seen (may be empty).
    Ok(String),
    /// The daemon runs without this protection by choice or for lack of privilege (it said so at
    /// startup): reported, not failing readiness. The detail says why it is not enforced.
    Degraded(String),
    /// Something that should hold does not: readiness fails. The detail says what was seen and,
    /// where there is one, what to do.
    Failed(String),
}

impl Check {
    /// In force, with what was seen.
    pub fn ok(detail: impl Into<String>) -> Self {
        Check::Ok(detail.into())
    }

    /// Not enforced, and why.
    pub fn degraded(why: impl Into<String>) -> Self {
        Check::Degraded(why.into())
    }

    /// Failed, with what was seen.
    pub fn failed(detail: impl Into<String>) -> Self {
        Check::Failed(detail.into())
    }

    /// True only for [`Check::Failed`]: what makes `/readyz` answer 503.
    pub fn is_failed(&self) -> bool {
        matches!(self, Check::Failed(_))
    }

    /// True only for [`Check::Ok`]: what the smoke, which is strict, counts as a pass.
    pub fn is_ok(&self) -> bool {
        matches!(self, Check::Ok(_))
    }

    /// `ok`, `degraded` or `failed`: the verdict as a stable word for JSON and logs.
    pub fn state(&self) -> &'static str {
        match self {
            Check::Ok(_) => "ok",
            Check::Degraded(_) => "degraded",
            Check::Failed(_) => "failed",
        }
    }

    /// What was seen (or why not enforced).
    pub fn detail(&self) -> &str {
        match self {
            Check::Ok(d) | Check::Degraded(d) | Check::Failed(d) => d,
        }
    }
}

/// The one-line text `/readyz` has always shown per check: `ok`, `ok (detail)`,
/// `ok (not enforced: why)`, or the failure itself.
impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Ok(d) if d.is_empty() => f.write_str("ok"),
            Check::Ok(d) => write!(f, "ok ({d})"),
            Check::Degraded(d) => write!(f, "ok (not enforced: {d})"),
            Check::Failed(d) => f.write_str(d),
        }
    }
}

/// A check with its name, as the smoke and the self-check list them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamedCheck {
    /// A short name.
    pub name: &'static str,
    /// Its verdict.
    #[serde(flatten)]
    pub check: Check,
}

impl NamedCheck {
    /// `check` under `name`.
    pub fn new(name: &'static str, check: Check) -> Self {
        NamedCheck { name, check }
    }

    /// Pass or fail from a condition: the smoke's checks are all-or-nothing.
    pub fn pass_if(name: &'static str, pass: bool, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        let check = if pass {
            Check::Ok(detail)
        } else {
            Check::Failed(detail)
        };
        NamedCheck { name, check }
    }

    /// Whether it passed, strictly: a protection not enforced is not a pass.
    pub fn passed(&self) -> bool {
        self.check.is_ok()
    }
}

/// The smoke's line: `PASS name: detail`, or `FAIL name: ...` for anything not in force.
impl fmt::Display for NamedCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.check {
            Check::Ok(d) => write!(f, "PASS {}: {d}", self.name),
            Check::Degraded(d) => write!(f, "FAIL {}: not enforced: {d}", self.name),
            Check::Failed(d) => write!(f, "FAIL {}: {d}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_text_keeps_its_old_shape_and_only_failed_fails() {
        assert_eq!(Check::ok("").to_string(), "ok");
        assert_eq!(
            Check::ok("a uid per tenant").to_string(),
            "ok (a uid per tenant)"
        );
        assert_eq!(
            Check::degraded("the daemon is not root").to_string(),
            "ok (not enforced: the daemon is not root)"
        );
        // A failure's text is its own: it may even start with "ok" without passing.
        let failed = Check::failed("ok-looking text that failed");
        assert_eq!(failed.to_string(), "ok-looking text that failed");
        assert!(failed.is_failed());
        assert!(!Check::degraded("x").is_failed() && !Check::ok("").is_failed());
    }

    #[test]
    fn the_smoke_passes_only_what_is_in_force() {
        let line = |c: Check| {
            let n = NamedCheck::new("disk_quota", c);
            (n.passed(), n.to_string())
        };
        assert_eq!(
            line(Check::ok("1 GiB per user")),
            (true, "PASS disk_quota: 1 GiB per user".to_owned())
        );
        assert_eq!(
            line(Check::degraded("not btrfs")),
            (false, "FAIL disk_quota: not enforced: not btrfs".to_owned())
        );
        assert_eq!(
            line(Check::failed("gone")),
            (false, "FAIL disk_quota: gone".to_owned())
        );
    }

    #[test]
    fn serializes_with_its_state_and_detail() {
        let v = serde_json::to_value(NamedCheck::new("reaper", Check::degraded("off"))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"name": "reaper", "state": "degraded", "detail": "off"})
        );
    }
}
