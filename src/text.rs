//! Bytes and ids as text: what every layer shows in JSON (call results, file contents) and
//! names things with (call ids, temporary files). Below every other module, so the file tools
//! and the executors share one of each.

use base64::Engine;

/// Text for the JSON result: the bytes as UTF-8, and when they are not valid UTF-8 also the exact
/// bytes in base64 (the text then has U+FFFD in place of each invalid sequence). Lossless either way.
pub fn to_text(bytes: &[u8]) -> (String, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_owned(), None),
        Err(_) => (
            String::from_utf8_lossy(bytes).into_owned(),
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

/// An error and its causes as one line, each cause once: a library error whose own text hides its
/// cause (hyper's "client error (Connect)") would otherwise lose the errno that says what to fix,
/// and one whose text already includes it would print it twice.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let more = e.to_string();
        if !more.is_empty() && !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}

/// A random id: 16 hex digits from the kernel's random source (call ids, channel ids, the
/// names of temporary files).
pub fn random_id() -> String {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        bytes = (nanos ^ u64::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The last `max` bytes of `s` (fewer, to start on a character boundary): the end of a log,
/// where an entry says why it failed.
pub fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut cut = s.len() - max;
    while !s.is_char_boundary(cut) {
        cut += 1;
    }
    s[cut..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_is_returned_losslessly() {
        let (text, b64) = to_text(&[0xff, b'a', 0x00]);
        assert_eq!(text, "\u{fffd}a\u{0}");
        assert_eq!(b64.as_deref(), Some("/2EA"));
        assert_eq!(to_text(b"ok"), ("ok".to_owned(), None));
    }

    #[test]
    fn ids_are_sixteen_hex_digits_and_differ() {
        let (a, b) = (random_id(), random_id());
        assert!(
            a.len() == 16 && a.bytes().all(|c| c.is_ascii_hexdigit()),
            "{a}"
        );
        assert_ne!(a, b);
    }

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);
    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn an_error_chain_shows_each_cause_once() {
        // A cause the outer text hides is shown; one it already says is not repeated.
        let hidden = Layer(
            "client error (Connect)",
            Some(Box::new(Layer("Permission denied (os error 13)", None))),
        );
        assert_eq!(
            error_chain(&hidden),
            "client error (Connect): Permission denied (os error 13)"
        );
        let repeated = Layer(
            "listen: Address already in use (os error 98)",
            Some(Box::new(Layer(
                "Address already in use (os error 98)",
                None,
            ))),
        );
        assert_eq!(
            error_chain(&repeated),
            "listen: Address already in use (os error 98)"
        );
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ééé", 3), "é");
        assert_eq!(tail("ab", 3), "ab");
    }
}
