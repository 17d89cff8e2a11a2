//! Relaying bytes between client and server, counting them, with an idle timeout.
//!
//! Why not `tokio::io::copy_bidirectional`: it has no idle timeout, does not count bytes per
//! direction while running, and cannot stop the upload after exactly `Content-Length` bytes
//! (which is how a pipelined second plain-HTTP request is kept from the server).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

const BUF: usize = 16 * 1024;

/// How much of the client's stream goes to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    /// Everything until the client's EOF, then half-close towards the server (CONNECT). The
    /// relay ends when both directions have ended.
    Stream,
    /// Exactly this many bytes, then stop reading the client (plain HTTP body). The relay ends
    /// when the server's response has ended.
    Exactly(u64),
}

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Client → server.
    pub up: u64,
    /// Server → client.
    pub down: u64,
}

struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }
    async fn idle(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.start + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Copy `r` to `w`, at most `limit` bytes; `Ok` when `r` ended or `limit` was reached.
async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    limit: Option<u64>,
    count: &AtomicU64,
    act: &Activity,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![0u8; BUF];
    let mut left = limit;
    loop {
        let want = match left {
            Some(0) => return Ok(()),
            Some(n) => usize::try_from(n).unwrap_or(BUF).min(BUF),
            None => BUF,
        };
        let n = r.read(&mut buf[..want]).await?;
        if n == 0 {
            return Ok(());
        }
        act.touch();
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        act.touch();
        count.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(l) = left.as_mut() {
            *l -= n as u64;
        }
    }
}

/// Relay between the client halves and the server halves until done, an error, or `idle`
/// without a byte in either direction. Returns the bytes moved (errors end the relay; the
/// counts so far are still returned).
pub async fn relay<CR, CW, SR, SW>(
    client_r: &mut CR,
    client_w: &mut CW,
    server_r: &mut SR,
    server_w: &mut SW,
    upload: Upload,
    idle: Duration,
) -> Counts
where
    CR: AsyncRead + Unpin + ?Sized,
    CW: AsyncWrite + Unpin + ?Sized,
    SR: AsyncRead + Unpin + ?Sized,
    SW: AsyncWrite + Unpin + ?Sized,
{
    let act = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let limit = match upload {
        Upload::Stream => None,
        Upload::Exactly(n) => Some(n),
    };
    {
        let up_fut = async {
            let r = pump(client_r, server_w, limit, &up, &act).await;
            if r.is_ok() && upload == Upload::Stream {
                let _ = server_w.shutdown().await;
            }
            r
        };
        let down_fut = async {
            let r = pump(server_r, client_w, None, &down, &act).await;
            if r.is_ok() {
                let _ = client_w.shutdown().await;
            }
            r
        };
        tokio::pin!(up_fut, down_fut);
        let mut up_done = false;
        let mut down_done = false;
        loop {
            tokio::select! {
                r = &mut up_fut, if !up_done => {
                    up_done = true;
                    if r.is_err() { break; }
                }
                r = &mut down_fut, if !down_done => {
                    down_done = true;
                    if r.is_err() { break; }
                    if matches!(upload, Upload::Exactly(_)) { break; }
                }
                _ = act.idle(idle) => break,
            }
            if up_done && down_done {
                break;
            }
        }
    }
    Counts {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn exact_upload_stops_after_the_body() {
        let (mut client, proxy_c) = duplex(1 << 16);
        let (proxy_s, mut server) = duplex(1 << 16);
        let (mut cr, mut cw) = tokio::io::split(proxy_c);
        let (mut sr, mut sw) = tokio::io::split(proxy_s);
        client.write_all(b"BODYnext request").await.unwrap();
        let server_task = tokio::spawn(async move {
            let mut got = [0u8; 4];
            server.read_exact(&mut got).await.unwrap();
            server.write_all(b"response").await.unwrap();
            drop(server);
            got
        });
        let counts = relay(
            &mut cr,
            &mut cw,
            &mut sr,
            &mut sw,
            Upload::Exactly(4),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(&server_task.await.unwrap(), b"BODY");
        assert_eq!(counts, Counts { up: 4, down: 8 });
        let mut resp = Vec::new();
        client.read_to_end(&mut resp).await.unwrap();
        assert_eq!(resp, b"response");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_the_relay() {
        let (_client, proxy_c) = duplex(1024);
        let (proxy_s, _server) = duplex(1024);
        let (mut cr, mut cw) = tokio::io::split(proxy_c);
        let (mut sr, mut sw) = tokio::io::split(proxy_s);
        let counts = relay(
            &mut cr,
            &mut cw,
            &mut sr,
            &mut sw,
            Upload::Stream,
            Duration::from_secs(300),
        )
        .await;
        assert_eq!(counts, Counts::default());
    }
}
