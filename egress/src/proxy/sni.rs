//! Reading the first TLS record of a CONNECT tunnel and taking the server name from the
//! ClientHello.
//!
//! Why: a CONNECT to an allowed name must not carry TLS for another name (domain fronting
//! through a shared front end, or a tunnel to anything the allowed host's address serves). The
//! proxy never terminates TLS; it reads the plaintext ClientHello, requires its SNI to equal the
//! CONNECT host, and forwards the bytes unchanged.
//!
//! Only the first record is read (at most 5 + 16384 bytes). A ClientHello whose handshake
//! message continues into a second record (huge hellos, e.g. some post-quantum key shares with
//! many extensions) is refused as `no_sni`: following fragments across records is more parser
//! than this check is worth.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest TLS plaintext record payload.
pub const MAX_RECORD: usize = 16_384;
const HEADER: usize = 5;

/// Why no server name could be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniError {
    /// The bytes are not a TLS handshake record holding a ClientHello.
    NotTls,
    /// The ClientHello is malformed or truncated.
    Malformed,
    /// The ClientHello continues past the first record.
    Fragmented,
    /// A well-formed ClientHello without a host_name server_name.
    Missing,
    /// The client closed or failed before the record was complete.
    Closed,
}

/// Check the 5-byte record header; the record's payload length.
fn record_len(h: &[u8]) -> Result<usize, SniError> {
    if h[0] != 22 || h[1] != 3 || h[2] > 4 {
        return Err(SniError::NotTls);
    }
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if len == 0 || len > MAX_RECORD {
        return Err(SniError::NotTls);
    }
    Ok(len)
}

/// Read from `r` (after the bytes already in `buf`) until `buf` holds the whole first record.
/// Bytes beyond it stay in `buf`. No timeout here: the caller wraps it.
pub async fn read_first_record<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(), SniError> {
    let mut need = HEADER;
    let mut chunk = [0u8; 4096];
    loop {
        if buf.len() >= HEADER && need == HEADER {
            need = HEADER + record_len(&buf[..HEADER])?;
        }
        if buf.len() >= need && need > HEADER {
            return Ok(());
        }
        // `buf.len() < need` here, so at least one byte is wanted; never read past the record.
        let want = (need - buf.len()).min(chunk.len());
        match r.read(&mut chunk[..want]).await {
            Ok(0) | Err(_) => return Err(SniError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A bounds-checked reader over a byte slice.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SniError> {
        if self.b.len() < n {
            return Err(SniError::Malformed);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<usize, SniError> {
        Ok(usize::from(self.take(1)?[0]))
    }
    fn u16(&mut self) -> Result<usize, SniError> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Result<usize, SniError> {
        let b = self.take(3)?;
        Ok((usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
    fn vec8(&mut self) -> Result<&'a [u8], SniError> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], SniError> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The server name of the ClientHello at the start of `data` (a whole first record, possibly
/// followed by more bytes). The name is returned as sent (ASCII), not normalised.
pub fn client_hello_sni(data: &[u8]) -> Result<String, SniError> {
    if data.len() < HEADER {
        return Err(SniError::Closed);
    }
    let len = record_len(&data[..HEADER])?;
    let payload = data.get(HEADER..HEADER + len).ok_or(SniError::Closed)?;
    let mut c = Cursor { b: payload };
    if c.u8()? != 1 {
        return Err(SniError::NotTls);
    }
    let hs_len = c.u24()?;
    if hs_len > c.b.len() {
        return Err(SniError::Fragmented);
    }
    let mut c = Cursor { b: c.take(hs_len)? };
    c.take(2)?; // legacy_version
    c.take(32)?; // random
    let session = c.vec8()?;
    if session.len() > 32 {
        return Err(SniError::Malformed);
    }
    let suites = c.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed);
    }
    if c.vec8()?.is_empty() {
        return Err(SniError::Malformed);
    }
    if c.b.is_empty() {
        return Err(SniError::Missing);
    }
    let mut exts = Cursor { b: c.vec16()? };
    if !c.b.is_empty() {
        return Err(SniError::Malformed);
    }
    let mut found: Option<String> = None;
    while !exts.b.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        if ty != 0 {
            continue;
        }
        if found.is_some() {
            return Err(SniError::Malformed);
        }
        let mut list = Cursor { b: data };
        let mut names = Cursor { b: list.vec16()? };
        if !list.b.is_empty() {
            return Err(SniError::Malformed);
        }
        while !names.b.is_empty() {
            let name_type = names.u8()?;
            let name = names.vec16()?;
            if name_type != 0 {
                continue;
            }
            if found.is_some() || name.is_empty() || !name.is_ascii() {
                return Err(SniError::Malformed);
            }
            // ASCII was just checked.
            found = Some(String::from_utf8_lossy(name).into_owned());
        }
    }
    found.ok_or(SniError::Missing)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn u16b(n: usize) -> [u8; 2] {
        (n as u16).to_be_bytes()
    }

    /// A ClientHello as a TLS 1.3 client sends it: record header, handshake header, version,
    /// random, session id, cipher suites, compression, extensions (server_name first, then
    /// supported_versions, key_share-ish padding).
    pub(crate) fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let mut entry = vec![0u8];
            entry.extend_from_slice(&u16b(name.len()));
            entry.extend_from_slice(name.as_bytes());
            let mut list = u16b(entry.len()).to_vec();
            list.extend_from_slice(&entry);
            exts.extend_from_slice(&[0, 0]);
            exts.extend_from_slice(&u16b(list.len()));
            exts.extend_from_slice(&list);
        }
        // supported_versions: TLS 1.3, 1.2
        exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x05, 0x04, 0x03, 0x04, 0x03, 0x03]);
        // supported_groups: x25519
        exts.extend_from_slice(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]);
        // key_share: x25519 with a 32-byte key
        exts.extend_from_slice(&[0x00, 0x33, 0x00, 0x26, 0x00, 0x24, 0x00, 0x1d, 0x00, 0x20]);
        exts.extend_from_slice(&[0x42; 32]);

        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0x11; 32]); // random
        body.push(32);
        body.extend_from_slice(&[0x22; 32]); // session id
        body.extend_from_slice(&[0x00, 0x06, 0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f]);
        body.extend_from_slice(&[0x01, 0x00]); // compression: null
        body.extend_from_slice(&u16b(exts.len()));
        body.extend_from_slice(&exts);

        let mut hs = vec![1u8];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);

        let mut rec = vec![22u8, 3, 1];
        rec.extend_from_slice(&u16b(hs.len()));
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn takes_the_server_name() {
        let hello = client_hello(Some("PyPI.org"));
        assert_eq!(client_hello_sni(&hello).unwrap(), "PyPI.org");
        let mut more = hello.clone();
        more.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        assert_eq!(client_hello_sni(&more).unwrap(), "PyPI.org");
        assert_eq!(
            client_hello_sni(&client_hello(None)),
            Err(SniError::Missing)
        );
    }

    #[test]
    fn refuses_non_tls_and_fragments() {
        assert_eq!(
            client_hello_sni(b"GET / HTTP/1.1\r\n\r\n"),
            Err(SniError::NotTls)
        );
        let mut hello = client_hello(Some("a.org"));
        // Claim a handshake longer than the record.
        hello[6..9].copy_from_slice(&[0x00, 0xff, 0xff]);
        assert_eq!(client_hello_sni(&hello), Err(SniError::Fragmented));
        // Application data record.
        let mut hello = client_hello(Some("a.org"));
        hello[0] = 23;
        assert_eq!(client_hello_sni(&hello), Err(SniError::NotTls));
    }

    #[test]
    fn truncations_and_garbage_never_panic() {
        let hello = client_hello(Some("files.pythonhosted.org"));
        for n in 0..hello.len() {
            assert!(client_hello_sni(&hello[..n]).is_err(), "prefix {n}");
        }
        // Flip every byte in turn: any answer is fine, a panic is not.
        for i in 0..hello.len() {
            for v in [0u8, 0xff, 0x01, 0x80] {
                let mut h = hello.clone();
                h[i] = v;
                let _ = client_hello_sni(&h);
            }
        }
        // Pseudo-random garbage with a plausible record header.
        let mut x: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let mut g = vec![22u8, 3, 1, 0, 200];
            for _ in 0..200 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                g.push(x as u8);
            }
            let _ = client_hello_sni(&g);
        }
    }

    #[tokio::test]
    async fn reads_exactly_the_record() {
        let hello = client_hello(Some("a.org"));
        let mut wire = hello.clone();
        wire.extend_from_slice(b"after");
        let mut buf = hello[..3].to_vec();
        let mut src = &wire[3..];
        read_first_record(&mut src, &mut buf).await.unwrap();
        assert_eq!(buf, hello);
        assert_eq!(src, b"after");
        let mut buf = Vec::new();
        let mut src = &hello[..hello.len() - 1];
        assert_eq!(
            read_first_record(&mut src, &mut buf).await,
            Err(SniError::Closed)
        );
        let mut buf = Vec::new();
        let mut src: &[u8] = b"\x16\x03\x01\xff\xff";
        assert_eq!(
            read_first_record(&mut src, &mut buf).await,
            Err(SniError::NotTls)
        );
    }
}
