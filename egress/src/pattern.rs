//! Destination patterns of an egress allowlist: `example.org`, `*.example.org`, each with an
//! optional `:PORT`.
//!
//! Why a pattern language this small: the allowlist is written by operators and users, checked
//! by the daemon (which must be able to say whether one list is within another: `covers`) and
//! enforced by the proxy against names sent by hostile code. Every form that could be read two
//! ways (IP literals, wildcards in the middle, odd characters) is refused at parse time, with a
//! message that says what form is expected.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Longest DNS name, in characters, without the trailing dot.
pub const MAX_NAME_LEN: usize = 253;
/// Longest DNS label.
pub const MAX_LABEL_LEN: usize = 63;
/// Most labels in one name.
pub const MAX_LABELS: usize = 127;
/// Most patterns in one list (`parse_list`).
pub const MAX_PATTERNS: usize = 256;
/// The ports a pattern without an explicit `:PORT` stands for.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

const EXPECTED: &str = "expected `name.example`, `*.name.example`, optionally with `:PORT`";

/// Why a pattern, a host name or a list was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternError {
    /// Nothing at all.
    Empty,
    /// An IP address (v4, v6, bracketed v6, or a name whose last label is all digits).
    IpLiteral(String),
    /// `*` somewhere else than as the whole first label, or `*` alone.
    BadWildcard(String),
    /// An empty label (`a..b`, `.a`).
    EmptyLabel(String),
    /// A label with a character outside `[a-z0-9-]`.
    BadCharacter {
        /// The whole text.
        name: String,
        /// The offending character.
        ch: char,
    },
    /// A label starting or ending with `-`.
    BadHyphen(String),
    /// A label of more than 63 characters.
    LabelTooLong(String),
    /// A name of more than 253 characters.
    NameTooLong(usize),
    /// A name of more than 127 labels.
    TooManyLabels(usize),
    /// A port that is not a decimal number in 1..=65535.
    BadPort(String),
}

fn clip(s: &str) -> String {
    truncate_chars(s, 80)
}

/// `s` cut to at most `max` characters (on a character boundary).
pub fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "empty name; {EXPECTED}"),
            Self::IpLiteral(s) => write!(
                f,
                "`{}` is an IP address; only host names are allowed ({EXPECTED})",
                clip(s)
            ),
            Self::BadWildcard(s) => write!(
                f,
                "`{}`: `*` may only be the whole first label followed by a name, as in `*.example.org`",
                clip(s)
            ),
            Self::EmptyLabel(s) => write!(f, "`{}` has an empty label; {EXPECTED}", clip(s)),
            Self::BadCharacter { name, ch } => write!(
                f,
                "`{}` contains {ch:?}; labels may only hold a-z, 0-9 and `-`",
                clip(name)
            ),
            Self::BadHyphen(s) => write!(
                f,
                "`{}` has a label starting or ending with `-`",
                clip(s)
            ),
            Self::LabelTooLong(s) => write!(
                f,
                "`{}` has a label longer than {MAX_LABEL_LEN} characters",
                clip(s)
            ),
            Self::NameTooLong(n) => write!(
                f,
                "name of {n} characters; at most {MAX_NAME_LEN} are allowed"
            ),
            Self::TooManyLabels(n) => {
                write!(f, "name of {n} labels; at most {MAX_LABELS} are allowed")
            }
            Self::BadPort(s) => write!(
                f,
                "port `{}` is not a number in 1..=65535; {EXPECTED}",
                clip(s)
            ),
        }
    }
}

impl std::error::Error for PatternError {}

/// Why a comma-separated list was refused; each case names the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListError {
    /// An empty item (`a.org,,b.org`, a trailing comma, or an empty list item).
    EmptyItem {
        /// 1-based position in the list.
        position: usize,
    },
    /// More than [`MAX_PATTERNS`] items.
    TooMany(usize),
    /// One item is not a valid pattern.
    Item {
        /// 1-based position in the list.
        position: usize,
        /// The item as written (clipped).
        item: String,
        /// What is wrong with it.
        error: PatternError,
    },
}

impl fmt::Display for ListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EmptyItem { position } => write!(
                f,
                "item {position} of the list is empty; write patterns separated by commas"
            ),
            Self::TooMany(n) => write!(
                f,
                "{n} patterns in the list; at most {MAX_PATTERNS} are allowed"
            ),
            Self::Item {
                position,
                item,
                error,
            } => write!(f, "item {position} `{}`: {error}", clip(item)),
        }
    }
}

impl std::error::Error for ListError {}

/// One allowlist entry: a host name or a wildcard over a domain, and the ports it allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    wildcard: bool,
    /// Lowercase, no trailing dot, without the `*.`.
    domain: String,
    port: Option<u16>,
}

/// Lowercase `s`, strip one trailing dot, and check it is a DNS host name (not an IP
/// address, no wildcard). Used on every host a client asks for.
///
/// An IP literal (`1.2.3.4`, `::1`, `[::1]`, or any name whose last label is all digits, such
/// as `127.1`) is refused with [`PatternError::IpLiteral`], so the proxy can tell it apart.
pub fn normalize_host(s: &str) -> Result<String, PatternError> {
    if s.is_empty() {
        return Err(PatternError::Empty);
    }
    if looks_like_ip(s) {
        return Err(PatternError::IpLiteral(s.to_string()));
    }
    let lower = s.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    check_name(name, s)?;
    Ok(name.to_string())
}

/// Is this an IP literal in any form a resolver or a client library could read as one?
fn looks_like_ip(s: &str) -> bool {
    if s.starts_with('[') || s.contains(':') {
        return true;
    }
    let t = s.strip_suffix('.').unwrap_or(s);
    if t.parse::<IpAddr>().is_ok() {
        return true;
    }
    // `127.1`, `2130706433`: inet_aton forms. No TLD is all digits.
    match t.rsplit('.').next() {
        Some(last) => !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

/// Check a lowercase name without trailing dot; `orig` is the text for the messages.
fn check_name(name: &str, orig: &str) -> Result<(), PatternError> {
    if name.is_empty() {
        return Err(PatternError::Empty);
    }
    let labels = name.split('.').count();
    if labels > MAX_LABELS {
        return Err(PatternError::TooManyLabels(labels));
    }
    let chars = name.chars().count();
    if chars > MAX_NAME_LEN {
        return Err(PatternError::NameTooLong(chars));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(PatternError::EmptyLabel(orig.to_string()));
        }
        if let Some(ch) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            if ch == '*' {
                return Err(PatternError::BadWildcard(orig.to_string()));
            }
            return Err(PatternError::BadCharacter {
                name: orig.to_string(),
                ch,
            });
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(PatternError::LabelTooLong(orig.to_string()));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(PatternError::BadHyphen(orig.to_string()));
        }
    }
    Ok(())
}

fn parse_port(s: &str) -> Result<u16, PatternError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PatternError::BadPort(s.to_string()));
    }
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(PatternError::BadPort(s.to_string())),
    }
}

impl Pattern {
    /// Parse one pattern (no surrounding whitespace allowed; `parse_list` trims).
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s.starts_with('[') || s.matches(':').count() > 1 {
            return Err(PatternError::IpLiteral(s.to_string()));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(parse_port(p)?)),
            None => (s, None),
        };
        if host.is_empty() {
            return Err(PatternError::Empty);
        }
        let lower = host.to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        let (wildcard, domain) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None if lower == "*" => return Err(PatternError::BadWildcard(s.to_string())),
            None => (false, lower),
        };
        if domain.contains('*') {
            return Err(PatternError::BadWildcard(s.to_string()));
        }
        if domain.is_empty() {
            return Err(PatternError::BadWildcard(s.to_string()));
        }
        if looks_like_ip(domain) {
            return Err(PatternError::IpLiteral(s.to_string()));
        }
        check_name(domain, s)?;
        Ok(Self {
            wildcard,
            domain: domain.to_string(),
            port,
        })
    }

    /// Does this pattern allow `host:port`? `host` must already be normalised
    /// ([`normalize_host`]): lowercase, no trailing dot.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        self.port_allowed(port) && self.host_matches(host)
    }

    fn port_allowed(&self, port: u16) -> bool {
        match self.port {
            Some(p) => p == port,
            None => DEFAULT_PORTS.contains(&port),
        }
    }

    fn host_matches(&self, host: &str) -> bool {
        if self.wildcard {
            is_strictly_under(host, &self.domain)
        } else {
            host == self.domain
        }
    }

    /// Does every `(host, port)` that `other` matches also match `self`?
    pub fn covers(&self, other: &Pattern) -> bool {
        let ports = match (self.port, other.port) {
            (None, None) => true,
            (None, Some(q)) => DEFAULT_PORTS.contains(&q),
            (Some(_), None) => false,
            (Some(p), Some(q)) => p == q,
        };
        if !ports {
            return false;
        }
        match (self.wildcard, other.wildcard) {
            (false, false) => self.domain == other.domain,
            (false, true) => false,
            (true, false) => is_strictly_under(&other.domain, &self.domain),
            (true, true) => {
                other.domain == self.domain || is_strictly_under(&other.domain, &self.domain)
            }
        }
    }

    /// Is this a `*.domain` pattern?
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The name (for a wildcard, the domain after `*.`), lowercase.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The explicit port, if one was written.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
}

/// `host` has one or more labels before `.domain`.
fn is_strictly_under(host: &str, domain: &str) -> bool {
    host.len() > domain.len() + 1
        && host.ends_with(domain)
        && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.domain)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl FromStr for Pattern {
    type Err = PatternError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Parse a comma-separated list of patterns. Whitespace around items is trimmed; empty items
/// and more than [`MAX_PATTERNS`] items are refused. An empty or all-blank string is the
/// empty list.
pub fn parse_list(s: &str) -> Result<Vec<Pattern>, ListError> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let items: Vec<&str> = s.split(',').collect();
    if items.len() > MAX_PATTERNS {
        return Err(ListError::TooMany(items.len()));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let item = raw.trim();
            if item.is_empty() {
                return Err(ListError::EmptyItem { position: i + 1 });
            }
            Pattern::parse(item).map_err(|error| ListError::Item {
                position: i + 1,
                item: item.to_string(),
                error,
            })
        })
        .collect()
}

/// Does any pattern of `list` allow `host:port`? `host` must be normalised.
pub fn allowed(list: &[Pattern], host: &str, port: u16) -> bool {
    list.iter().any(|p| p.matches(host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_and_displays_canonically() {
        assert_eq!(p("Example.ORG").to_string(), "example.org");
        assert_eq!(p("example.org.").to_string(), "example.org");
        assert_eq!(p("*.Example.org:8443").to_string(), "*.example.org:8443");
        assert_eq!(p("*.io").to_string(), "*.io");
        assert_eq!(p("a-b.c0").to_string(), "a-b.c0");
        assert_eq!(p("localhost").to_string(), "localhost");
        assert_eq!(p("x.org.:443").port(), Some(443));
        assert!(p("*.x.org").is_wildcard());
        assert_eq!(p("*.x.org").domain(), "x.org");
    }

    #[test]
    fn refusals() {
        use PatternError as E;
        type Check = fn(&E) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, E::Empty)),
            (":443", |e| matches!(e, E::Empty)),
            ("1.2.3.4", |e| matches!(e, E::IpLiteral(_))),
            ("1.2.3.4:80", |e| matches!(e, E::IpLiteral(_))),
            ("127.1", |e| matches!(e, E::IpLiteral(_))),
            ("::1", |e| matches!(e, E::IpLiteral(_))),
            ("[::1]", |e| matches!(e, E::IpLiteral(_))),
            ("[::1]:443", |e| matches!(e, E::IpLiteral(_))),
            ("*.1.2.3", |e| matches!(e, E::IpLiteral(_))),
            ("*", |e| matches!(e, E::BadWildcard(_))),
            ("*.", |e| matches!(e, E::BadWildcard(_))),
            ("a*.b", |e| matches!(e, E::BadWildcard(_))),
            ("a.*.b", |e| matches!(e, E::BadWildcard(_))),
            ("*.*.b", |e| matches!(e, E::BadWildcard(_))),
            ("**.b", |e| matches!(e, E::BadWildcard(_))),
            ("a..b", |e| matches!(e, E::EmptyLabel(_))),
            (".a", |e| matches!(e, E::EmptyLabel(_))),
            ("a.b..", |e| matches!(e, E::EmptyLabel(_))),
            ("a_b.c", |e| matches!(e, E::BadCharacter { ch: '_', .. })),
            ("a b.c", |e| matches!(e, E::BadCharacter { .. })),
            ("é.c", |e| matches!(e, E::BadCharacter { .. })),
            ("-a.c", |e| matches!(e, E::BadHyphen(_))),
            ("a-.c", |e| matches!(e, E::BadHyphen(_))),
            ("a:0", |e| matches!(e, E::BadPort(_))),
            ("a:65536", |e| matches!(e, E::BadPort(_))),
            ("a:http", |e| matches!(e, E::BadPort(_))),
            ("a:", |e| matches!(e, E::BadPort(_))),
            ("a:+1", |e| matches!(e, E::BadPort(_))),
            ("a:000080", |e| matches!(e, E::BadPort(_))),
        ];
        for (text, ok) in cases {
            match Pattern::parse(text) {
                Ok(pat) => panic!("{text:?} was accepted as {pat}"),
                Err(e) => {
                    assert!(ok(&e), "{text:?}: unexpected error {e:?}");
                    assert!(!e.to_string().is_empty());
                }
            }
        }
        let long_label = format!("{}.org", "a".repeat(64));
        assert!(matches!(
            Pattern::parse(&long_label),
            Err(E::LabelTooLong(_))
        ));
        assert!(Pattern::parse(&format!("{}.org", "a".repeat(63))).is_ok());
        let long_name = format!("{}org", "abcdefghi.".repeat(26));
        assert!(matches!(Pattern::parse(&long_name), Err(E::NameTooLong(_))));
        let many = format!("{}org", "a.".repeat(127));
        assert!(matches!(Pattern::parse(&many), Err(E::TooManyLabels(128))));
    }

    #[test]
    fn messages_say_what_is_expected() {
        let e = Pattern::parse("a.*.b").unwrap_err().to_string();
        assert!(e.contains("*.example.org"), "{e}");
        let e = Pattern::parse("10.0.0.1").unwrap_err().to_string();
        assert!(e.contains("IP address"), "{e}");
    }

    #[test]
    fn matching() {
        let exact = p("example.org");
        assert!(exact.matches("example.org", 443));
        assert!(exact.matches("example.org", 80));
        assert!(!exact.matches("example.org", 8080));
        assert!(!exact.matches("www.example.org", 443));
        assert!(!exact.matches("xexample.org", 443));

        let wild = p("*.example.org");
        assert!(wild.matches("a.example.org", 443));
        assert!(wild.matches("a.b.example.org", 80));
        assert!(!wild.matches("example.org", 443));
        assert!(!wild.matches("aexample.org", 443));
        assert!(!wild.matches(".example.org", 443));
        assert!(!wild.matches("a.example.org", 22));

        let port = p("*.example.org:8443");
        assert!(port.matches("a.example.org", 8443));
        assert!(!port.matches("a.example.org", 443));

        let tld = p("*.io");
        assert!(tld.matches("crates.io", 443));
        assert!(!tld.matches("io", 443));

        let list = parse_list("pypi.org, *.pythonhosted.org").unwrap();
        assert!(allowed(&list, "pypi.org", 443));
        assert!(allowed(&list, "files.pythonhosted.org", 443));
        assert!(!allowed(&list, "pythonhosted.org", 443));
        assert!(!allowed(&[], "pypi.org", 443));
    }

    #[test]
    fn covering() {
        assert!(p("a.b").covers(&p("a.b")));
        assert!(p("a.b").covers(&p("a.b:443")));
        assert!(!p("a.b").covers(&p("a.b:8080")));
        assert!(!p("a.b:443").covers(&p("a.b")));
        assert!(p("a.b:443").covers(&p("a.b:443")));
        assert!(!p("a.b").covers(&p("*.a.b")));
        assert!(!p("a.b").covers(&p("x.a.b")));
        assert!(p("*.a.b").covers(&p("x.a.b")));
        assert!(p("*.a.b").covers(&p("*.x.a.b")));
        assert!(p("*.a.b").covers(&p("*.a.b")));
        assert!(p("*.a.b").covers(&p("y.x.a.b:80")));
        assert!(!p("*.a.b").covers(&p("a.b")));
        assert!(!p("*.a.b").covers(&p("*.b")));
        assert!(!p("*.a.b").covers(&p("xa.b")));
        assert!(!p("*.a.b:443").covers(&p("x.a.b")));
    }

    #[test]
    fn normalizing_hosts() {
        assert_eq!(normalize_host("PyPI.org.").unwrap(), "pypi.org");
        assert_eq!(normalize_host("localhost").unwrap(), "localhost");
        for ip in ["1.2.3.4", "::1", "[::1]", "127.1", "2130706433", "1.2.3.4."] {
            assert!(
                matches!(normalize_host(ip), Err(PatternError::IpLiteral(_))),
                "{ip}"
            );
        }
        assert!(matches!(
            normalize_host("*.a.org"),
            Err(PatternError::BadWildcard(_))
        ));
        assert!(normalize_host("a..org").is_err());
        assert!(normalize_host("a.org..").is_err());
        assert!(normalize_host("").is_err());
        assert!(normalize_host("a\0.org").is_err());
        assert!(normalize_host(&"a.".repeat(200)).is_err());
    }

    #[test]
    fn lists() {
        let l = parse_list(" a.org ,*.b.org:8080,c.org ").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[1].to_string(), "*.b.org:8080");
        assert_eq!(parse_list("  ").unwrap(), Vec::<Pattern>::new());
        assert_eq!(
            parse_list("a.org,,b.org"),
            Err(ListError::EmptyItem { position: 2 })
        );
        assert_eq!(
            parse_list("a.org,"),
            Err(ListError::EmptyItem { position: 2 })
        );
        match parse_list("a.org, 1.2.3.4") {
            Err(e @ ListError::Item { position: 2, .. }) => {
                assert!(e.to_string().contains("1.2.3.4"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        let many = vec!["a.org"; 257].join(",");
        assert_eq!(parse_list(&many), Err(ListError::TooMany(257)));
        assert_eq!(
            parse_list(&vec!["a.org"; 256].join(",")).unwrap().len(),
            256
        );
    }

    #[test]
    fn serde_as_string() {
        let v: Vec<Pattern> = serde_json::from_str(r#"["A.org", "*.b.org:8443"]"#).unwrap();
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"["a.org","*.b.org:8443"]"#
        );
        let e = serde_json::from_str::<Pattern>(r#""a.*.b""#).unwrap_err();
        assert!(e.to_string().contains("*.example.org"), "{e}");
    }
}
