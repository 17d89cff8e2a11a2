//! Reading and strictly parsing a proxy request head.
//!
//! Why our own parser: the proxy is the only thing between hostile code and the network; every
//! ambiguity (obs-fold, bare CR or LF, duplicate `Host`, `Transfer-Encoding`, several
//! `Content-Length`) is a way to make the proxy and the server disagree about what was asked.
//! So anything unusual is refused rather than interpreted.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::pattern::{normalize_host, PatternError};

/// Largest request body the proxy forwards (plain HTTP, `Content-Length`).
pub const MAX_BODY: u64 = 1 << 30;
/// Most header lines in one head.
pub const MAX_HEADERS: usize = 128;

/// Headers never forwarded (hop-by-hop), lowercase.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The method token, as sent.
    pub method: String,
    /// The request target, as sent.
    pub target: String,
    /// The header lines in order, names as sent.
    pub headers: Vec<(String, String)>,
}

/// A refusal while reading or parsing a head: the status to answer and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadError {
    /// HTTP status code.
    pub status: u16,
    /// The client-facing explanation (no trailing newline).
    pub message: String,
    /// The refusal is an IP literal (reported as `ip_literal`, not `bad_request`).
    pub ip_literal: bool,
}

impl HeadError {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            ip_literal: false,
        }
    }
    fn status(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            ip_literal: false,
        }
    }
}

/// The outcome of reading a head.
#[derive(Debug)]
pub enum ReadHead {
    /// The head (up to and including the blank line) and the bytes read after it.
    Complete {
        /// The head bytes.
        head: Vec<u8>,
        /// Bytes after the head already read.
        rest: Vec<u8>,
    },
    /// More than `max` bytes without the end of the head.
    TooLarge,
    /// The client closed (or failed) before the head ended.
    Closed,
}

/// Read until `\r\n\r\n`, at most `max` bytes of head. No timeout here: the caller wraps it.
pub async fn read_head<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> ReadHead {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return ReadHead::Closed,
            Ok(n) => n,
        };
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = find(&buf[from..], b"\r\n\r\n") {
            let end = from + pos + 4;
            if end > max {
                return ReadHead::TooLarge;
            }
            let rest = buf.split_off(end);
            return ReadHead::Complete { head: buf, rest };
        }
        if buf.len() >= max {
            return ReadHead::TooLarge;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parse a complete head (ending in `\r\n\r\n`).
pub fn parse_head(raw: &[u8]) -> Result<Head, HeadError> {
    if raw.contains(&0) {
        return Err(HeadError::bad("NUL byte in the request head"));
    }
    let body = raw
        .strip_suffix(b"\r\n\r\n")
        .ok_or_else(|| HeadError::bad("request head does not end with an empty line"))?;
    // Every CR must start CRLF and every LF must end one.
    for (i, &b) in body.iter().enumerate() {
        let ok = match b {
            b'\r' => body.get(i + 1) == Some(&b'\n'),
            b'\n' => i > 0 && body[i - 1] == b'\r',
            _ => true,
        };
        if !ok {
            return Err(HeadError::bad(
                "bare CR or LF in the request head; lines end with CRLF",
            ));
        }
    }
    let text =
        std::str::from_utf8(body).map_err(|_| HeadError::bad("request head is not valid UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(HeadError::bad(
            "malformed request line; expected `METHOD TARGET HTTP/1.1`",
        ));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(HeadError::bad("malformed method in the request line"));
    }
    if target.is_empty() || !target.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(HeadError::bad("malformed request target"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HeadError::status(
            505,
            "only HTTP/1.0 and HTTP/1.1 are supported",
        ));
    }
    let mut headers = Vec::new();
    for line in lines {
        if line.starts_with(' ') || line.starts_with('\t') {
            return Err(HeadError::bad(
                "folded header line (obs-fold) is not accepted",
            ));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HeadError::bad("header line without a colon"));
        };
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(HeadError::bad("malformed header name"));
        }
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        if value.chars().any(|c| c.is_ascii_control() && c != '\t') {
            return Err(HeadError::bad("control character in a header value"));
        }
        if headers.len() >= MAX_HEADERS {
            return Err(HeadError::status(431, "too many header lines"));
        }
        headers.push((name.to_string(), value.to_string()));
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        headers,
    })
}

impl Head {
    /// Values of the headers named `name` (case-insensitive).
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `CONNECT host:port`.
    Connect {
        /// Normalised host.
        host: String,
        /// Port.
        port: u16,
    },
    /// A plain HTTP request in absolute form.
    Http {
        /// Normalised host.
        host: String,
        /// Port (80 unless given).
        port: u16,
        /// The head to send to the server (origin-form, hop-by-hop headers removed,
        /// `Connection: close`).
        forward: Vec<u8>,
        /// The body length to forward.
        content_length: u64,
    },
}

/// Best-effort host of a request target for the report of a refusal (not validated).
pub fn raw_host(head: &Head) -> Option<String> {
    let t = head.target.as_str();
    let authority = if head.method.eq_ignore_ascii_case("CONNECT") {
        t
    } else {
        let lower = t.to_ascii_lowercase();
        let skip = if lower.starts_with("http://") {
            7
        } else if lower.starts_with("https://") {
            8
        } else {
            return None;
        };
        let rest = &t[skip..];
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        &rest[..end]
    };
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    Some(host.to_string())
}

/// Split `host[:port]` (no userinfo). `None` port when absent or empty.
fn split_authority(a: &str) -> Result<(String, Option<u16>), HeadError> {
    if a.starts_with('[') {
        let ip = a.split(']').next().unwrap_or(a);
        return Err(ip_literal(ip.trim_start_matches('[')));
    }
    let (host, port) = match a.rsplit_once(':') {
        Some((h, "")) => (h, None),
        Some((h, p)) => {
            if p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::bad(format!("bad port in `{}`", clip(a))));
            }
            match p.parse::<u16>() {
                Ok(n) if n > 0 => (h, Some(n)),
                _ => return Err(HeadError::bad(format!("bad port in `{}`", clip(a)))),
            }
        }
        None => (a, None),
    };
    let host = normalize_host(host).map_err(|e| match e {
        PatternError::IpLiteral(s) => ip_literal(&s),
        e => HeadError::bad(format!("bad host name: {e}")),
    })?;
    Ok((host, port))
}

fn ip_literal(s: &str) -> HeadError {
    HeadError {
        status: 403,
        message: format!(
            "zcbot egress: {} is an IP address; this proxy only connects to host names on the allowlist",
            clip(s)
        ),
        ip_literal: true,
    }
}

fn clip(s: &str) -> String {
    crate::pattern::truncate_chars(s, 253)
}

/// Check a parsed head and turn it into a [`Request`].
pub fn classify(head: &Head) -> Result<Request, HeadError> {
    if head.method == "CONNECT" {
        let (host, port) = split_authority(&head.target)?;
        let port =
            port.ok_or_else(|| HeadError::bad("CONNECT needs `host:port` with an explicit port"))?;
        return Ok(Request::Connect { host, port });
    }
    let lower = head.target.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(HeadError::bad(
            "https:// URLs go through CONNECT; configure this as an HTTP proxy for https too",
        ));
    }
    if !lower.starts_with("http://") {
        return Err(HeadError::bad(
            "use this as a proxy: absolute URL expected (http://host/path)",
        ));
    }
    let rest = &head.target[7..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.contains('@') {
        return Err(HeadError::bad(
            "user information in the URL is not accepted",
        ));
    }
    let (host, port) = split_authority(authority)?;
    let port = port.unwrap_or(80);
    let mut path = rest[end..].split('#').next().unwrap_or("").to_string();
    if !path.starts_with('/') {
        path.insert(0, '/');
    }

    // Host: exactly one, naming the same authority.
    let hosts: Vec<&str> = head.values("host").collect();
    let [host_header] = hosts[..] else {
        return Err(HeadError::bad(
            "exactly one Host header is required in a proxied request",
        ));
    };
    match split_authority(host_header) {
        Ok((h, p)) if h == host && p.unwrap_or(80) == port => {}
        _ => {
            return Err(HeadError::bad(
                "the Host header does not name the host of the URL",
            ))
        }
    }
    if head.values("transfer-encoding").next().is_some() {
        return Err(HeadError::status(
            411,
            "Transfer-Encoding is not accepted; send the body with a Content-Length",
        ));
    }
    let lengths: Vec<&str> = head.values("content-length").collect();
    let content_length = match lengths[..] {
        [] => 0,
        [v] => {
            if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::bad(
                    "Content-Length is not a plain decimal number",
                ));
            }
            let n: u64 = v
                .parse()
                .map_err(|_| HeadError::bad("Content-Length is not a plain decimal number"))?;
            if n > MAX_BODY {
                return Err(HeadError::status(413, "request body larger than 1 GiB"));
            }
            n
        }
        _ => return Err(HeadError::bad("more than one Content-Length header")),
    };

    // Names listed in Connection are hop-by-hop too.
    let listed: Vec<String> = head
        .values("connection")
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    let mut forward = format!("{} {} HTTP/1.1\r\n", head.method, path);
    for (name, value) in &head.headers {
        let lname = name.to_ascii_lowercase();
        // Host and Content-Length frame the request: never dropped, even if listed.
        let framing = lname == "host" || lname == "content-length";
        if HOP_BY_HOP.contains(&lname.as_str()) || (listed.contains(&lname) && !framing) {
            continue;
        }
        forward.push_str(name);
        forward.push_str(": ");
        forward.push_str(value);
        forward.push_str("\r\n");
    }
    forward.push_str("Connection: close\r\n\r\n");
    Ok(Request::Http {
        host,
        port,
        forward: forward.into_bytes(),
        content_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, HeadError> {
        classify(&parse_head(s.as_bytes())?)
    }

    #[test]
    fn good_get_is_rewritten_to_origin_form() {
        let r = parse(
            "GET http://Example.org/a/b?q=1#frag HTTP/1.1\r\nHost: example.org\r\nUser-Agent: t\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nProxy-Authorization: x\r\nKeep-Alive: 5\r\n\r\n",
        )
        .unwrap();
        let Request::Http {
            host,
            port,
            forward,
            content_length,
        } = r
        else {
            panic!("not http")
        };
        assert_eq!(host, "example.org");
        assert_eq!(port, 80);
        assert_eq!(content_length, 0);
        assert_eq!(
            String::from_utf8(forward).unwrap(),
            "GET /a/b?q=1 HTTP/1.1\r\nHost: example.org\r\nUser-Agent: t\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn connection_cannot_strip_framing_headers() {
        let r = parse(
            "POST http://a.org/ HTTP/1.1\r\nHost: a.org\r\nContent-Length: 3\r\nConnection: host, content-length, x\r\nX: 1\r\n\r\n",
        )
        .unwrap();
        let Request::Http { forward, .. } = r else {
            panic!("not http")
        };
        assert_eq!(
            String::from_utf8(forward).unwrap(),
            "POST / HTTP/1.1\r\nHost: a.org\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn good_variants() {
        let r = parse(
            "POST http://a.org:8080 HTTP/1.0\r\nhost: A.ORG:8080\r\nContent-Length: 12\r\n\r\n",
        )
        .unwrap();
        match r {
            Request::Http {
                port,
                content_length,
                forward,
                ..
            } => {
                assert_eq!(port, 8080);
                assert_eq!(content_length, 12);
                assert!(forward.starts_with(b"POST / HTTP/1.1\r\n"));
            }
            other => panic!("{other:?}"),
        }
        let r = parse("GET http://a.org?x HTTP/1.1\r\nHost: a.org:80\r\n\r\n").unwrap();
        match r {
            Request::Http { forward, .. } => assert!(forward.starts_with(b"GET /?x HTTP/1.1")),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse("CONNECT Pypi.org.:443 HTTP/1.1\r\nHost: whatever\r\n\r\n").unwrap(),
            Request::Connect {
                host: "pypi.org".into(),
                port: 443
            }
        );
    }

    fn status(s: &str) -> u16 {
        match parse(s) {
            Ok(r) => panic!("accepted {s:?} as {r:?}"),
            Err(e) => e.status,
        }
    }

    #[test]
    fn refusals() {
        // obs-fold
        assert_eq!(
            status("GET http://a.org/ HTTP/1.1\r\nHost: a.org\r\nX: a\r\n b\r\n\r\n"),
            400
        );
        // duplicate Host, missing Host, mismatched Host
        assert_eq!(
            status("GET http://a.org/ HTTP/1.1\r\nHost: a.org\r\nHost: a.org\r\n\r\n"),
            400
        );
        assert_eq!(status("GET http://a.org/ HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            status("GET http://a.org/ HTTP/1.1\r\nHost: b.org\r\n\r\n"),
            400
        );
        assert_eq!(
            status("GET http://a.org/ HTTP/1.1\r\nHost: a.org:8080\r\n\r\n"),
            400
        );
        // Transfer-Encoding of any kind
        assert_eq!(
            status(
                "POST http://a.org/ HTTP/1.1\r\nHost: a.org\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            411
        );
        assert_eq!(
            status(
                "POST http://a.org/ HTTP/1.1\r\nHost: a.org\r\ntransfer-encoding: identity\r\n\r\n"
            ),
            411
        );
        // Content-Length: two, list, sign, huge
        assert_eq!(
            status("POST http://a.org/ HTTP/1.1\r\nHost: a.org\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST http://a.org/ HTTP/1.1\r\nHost: a.org\r\nContent-Length: 1, 1\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST http://a.org/ HTTP/1.1\r\nHost: a.org\r\nContent-Length: +1\r\n\r\n"),
            400
        );
        assert_eq!(
            status(
                "POST http://a.org/ HTTP/1.1\r\nHost: a.org\r\nContent-Length: 2147483648\r\n\r\n"
            ),
            413
        );
        // forms
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a.org\r\n\r\n"), 400);
        assert_eq!(
            status("GET https://a.org/ HTTP/1.1\r\nHost: a.org\r\n\r\n"),
            400
        );
        assert_eq!(
            status("GET ftp://a.org/ HTTP/1.1\r\nHost: a.org\r\n\r\n"),
            400
        );
        assert_eq!(
            status("GET http://u:p@a.org/ HTTP/1.1\r\nHost: a.org\r\n\r\n"),
            400
        );
        assert_eq!(status("CONNECT a.org HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("CONNECT a.org:0 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            status("GET http://a.org/ HTTP/2.0\r\nHost: a.org\r\n\r\n"),
            505
        );
        // ip literals
        for t in [
            "CONNECT 1.2.3.4:443 HTTP/1.1\r\n\r\n",
            "CONNECT [::1]:443 HTTP/1.1\r\n\r\n",
            "GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            "GET http://[::1]:80/ HTTP/1.1\r\nHost: [::1]\r\n\r\n",
        ] {
            let e = parse(t).unwrap_err();
            assert!(e.ip_literal, "{t:?}: {e:?}");
            assert_eq!(e.status, 403);
        }
    }

    #[test]
    fn lexical_refusals() {
        for raw in [
            &b"GET http://a.org/ HTTP/1.1\nHost: a.org\r\n\r\n"[..],
            b"GET http://a.org/ HTTP/1.1\r\nHost: a\rb.org\r\n\r\n",
            b"GET http://a.org/ HTTP/1.1\r\nHost: a.org\r\nX: \0\r\n\r\n",
            b"GET http://a.org/ HTTP/1.1\r\nHost a.org\r\n\r\n",
            b"GET  http://a.org/ HTTP/1.1\r\nHost: a.org\r\n\r\n",
            b"GET http://a.org/ HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET http://a.org/ HTTP/1.1\r\n: x\r\n\r\n",
            b"G\xc3\xa9T http://a.org/ HTTP/1.1\r\nHost: a.org\r\n\r\n",
            b"GET http://a.org/ HTTP/1.1\r\nHost: a.org\r\nX: \x01\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
            b"GET http://a.org/ HTTP/1.1\r\n",
        ] {
            assert!(
                parse_head(raw).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[tokio::test]
    async fn reading_heads() {
        let mut src: &[u8] = b"GET http://a.org/ HTTP/1.1\r\nHost: a.org\r\n\r\nBODY";
        match read_head(&mut src, 1024).await {
            ReadHead::Complete { head, rest } => {
                assert!(head.ends_with(b"\r\n\r\n"));
                assert_eq!(rest, b"BODY");
            }
            other => panic!("{other:?}"),
        }
        let big = format!(
            "GET http://a.org/ HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(5000)
        );
        let mut src = big.as_bytes();
        assert!(matches!(
            read_head(&mut src, 4096).await,
            ReadHead::TooLarge
        ));
        let mut src: &[u8] = b"GET http://a.org/ HTTP/1.1\r\n";
        assert!(matches!(read_head(&mut src, 4096).await, ReadHead::Closed));
    }
}
