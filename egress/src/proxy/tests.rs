//! End-to-end tests of the proxy on 127.0.0.1, with a tiny local server behind it.
//! `allowed.test` resolves to 127.0.0.1 through a static override (which skips the blocked
//! check, although 127.0.0.0/8 is blocked); DNS is off.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::sni::tests::client_hello;
use super::{Dns, Proxy, ReportSink};
use crate::pattern::Pattern;
use crate::protocol::{Command, ConnReport, ProxyConfig, Reason, Report, StaticAddr, Verdict};

const T: Duration = Duration::from_secs(5);

struct Harness {
    proxy: Proxy,
    addr: SocketAddr,
    rx: mpsc::Receiver<Report>,
    server: TcpListener,
    sport: u16,
}

async fn start(tweak: impl FnOnce(&mut ProxyConfig)) -> Harness {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sport = server.local_addr().unwrap().port();
    let mut cfg = ProxyConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        resolve: vec![StaticAddr {
            name: "allowed.test".into(),
            ip: "127.0.0.1".parse().unwrap(),
        }],
        blocked: vec!["127.0.0.0/8".parse().unwrap()],
        header_timeout_ms: 3000,
        idle_timeout_ms: 3000,
        ..ProxyConfig::default()
    };
    tweak(&mut cfg);
    let (sink, rx) = ReportSink::channel(64);
    let proxy = Proxy::new(cfg, sink, Dns::Off).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p = proxy.clone();
    tokio::spawn(async move { p.serve(listener).await });
    proxy.apply(&Command::Set {
        seq: 1,
        ip: "127.0.0.1".parse().unwrap(),
        user: "u".into(),
        allow: vec![
            Pattern::parse(&format!("allowed.test:{sport}")).unwrap(),
            Pattern::parse("nodns.test").unwrap(),
        ],
    });
    Harness {
        proxy,
        addr,
        rx,
        server,
        sport,
    }
}

async fn next_conn(rx: &mut mpsc::Receiver<Report>) -> ConnReport {
    loop {
        match tokio::time::timeout(T, rx.recv()).await {
            Ok(Some(Report::Conn(c))) => return c,
            Ok(Some(_)) => continue,
            other => panic!("no conn report: {other:?}"),
        }
    }
}

/// Send `req`, read until the proxy closes.
async fn exchange(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Accept connections; for each, read a head, answer `response`, collect anything more
/// that arrives in the next 300 ms, close. Sends what each connection received.
fn http_server(
    server: TcpListener,
    response: &'static [u8],
) -> (mpsc::UnboundedReceiver<Vec<u8>>, Arc<AtomicUsize>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = server.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tokio::time::timeout(Duration::from_millis(300), async {
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                })
                .await;
                let _ = s.write_all(response).await;
                let _ = tx.send(got);
            });
        }
    });
    (rx, accepted)
}

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi";

#[tokio::test]
async fn plain_get_is_forwarded_in_origin_form() {
    let mut h = start(|_| {}).await;
    let (mut got, _) = http_server(h.server, RESPONSE);
    let p = h.sport;
    let req = format!(
        "GET http://Allowed.test:{p}/path?q=1 HTTP/1.1\r\nHost: allowed.test:{p}\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n"
    );
    let resp = exchange(h.addr, req.as_bytes()).await;
    assert_eq!(resp.as_bytes(), RESPONSE);
    let seen = String::from_utf8(got.recv().await.unwrap()).unwrap();
    let expected =
        format!("GET /path?q=1 HTTP/1.1\r\nHost: allowed.test:{p}\r\nAccept: */*\r\nConnection: close\r\n\r\n");
    assert_eq!(seen, expected);
    let r = next_conn(&mut h.rx).await;
    assert_eq!(r.verdict, Verdict::Allowed);
    assert_eq!(r.reason, Reason::Ok);
    assert_eq!(r.user.as_deref(), Some("u"));
    assert_eq!(r.host.as_deref(), Some("allowed.test"));
    assert_eq!(r.port, Some(p));
    assert_eq!(r.method.as_deref(), Some("GET"));
    assert_eq!(r.up, expected.len() as u64);
    assert_eq!(r.down, RESPONSE.len() as u64);
}

#[tokio::test]
async fn pipelined_request_and_extra_body_never_reach_the_server() {
    let mut h = start(|_| {}).await;
    let (mut got, accepted) = http_server(h.server, RESPONSE);
    let p = h.sport;
    let req = format!(
        "POST http://allowed.test:{p}/a HTTP/1.1\r\nHost: allowed.test:{p}\r\nContent-Length: 5\r\n\r\nhelloGET http://allowed.test:{p}/b HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n"
    );
    let resp = exchange(h.addr, req.as_bytes()).await;
    assert_eq!(resp.as_bytes(), RESPONSE);
    let seen = String::from_utf8(got.recv().await.unwrap()).unwrap();
    assert!(seen.ends_with("Connection: close\r\n\r\nhello"), "{seen:?}");
    assert!(!seen.contains("/b"), "{seen:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(next_conn(&mut h.rx).await.reason, Reason::Ok);
}

#[tokio::test]
async fn body_sent_later_is_forwarded_exactly() {
    let mut h = start(|_| {}).await;
    let (mut got, _) = http_server(h.server, RESPONSE);
    let p = h.sport;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "PUT http://allowed.test:{p}/x HTTP/1.1\r\nHost: allowed.test:{p}\r\nContent-Length: 10\r\n\r\n01234"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"56789EXTRA").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, RESPONSE);
    let seen = got.recv().await.unwrap();
    assert!(seen.ends_with(b"\r\n\r\n0123456789"), "{seen:?}");
    let r = next_conn(&mut h.rx).await;
    assert_eq!(r.method.as_deref(), Some("PUT"));
}

#[tokio::test]
async fn refusals_answer_with_a_reason() {
    let mut h = start(|_| {}).await;
    let (_got, accepted) = http_server(h.server, RESPONSE);
    let p = h.sport;

    let resp = exchange(
        h.addr,
        b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{resp}");
    assert!(resp.contains("Content-Type: text/plain"), "{resp}");
    assert!(resp.contains("Connection: close"), "{resp}");
    assert!(
        resp.ends_with(&format!(
            "zcbot egress: evil.test:80 is not on this sandbox's allowlist (allowed: allowed.test:{p}, nodns.test)\n"
        )),
        "{resp}"
    );
    let r = next_conn(&mut h.rx).await;
    assert_eq!(
        (r.verdict, r.reason),
        (Verdict::Refused, Reason::NotAllowed)
    );
    assert_eq!(r.host.as_deref(), Some("evil.test"));

    // Right host, wrong port.
    let resp = exchange(
        h.addr,
        format!(
            "CONNECT allowed.test:{} HTTP/1.1\r\n\r\n",
            p.wrapping_add(1)
        )
        .as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert_eq!(next_conn(&mut h.rx).await.reason, Reason::NotAllowed);

    let resp = exchange(
        h.addr,
        format!("CONNECT 127.0.0.1:{p} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("IP address"), "{resp}");
    assert_eq!(next_conn(&mut h.rx).await.reason, Reason::IpLiteral);

    let resp = exchange(h.addr, b"GET /local HTTP/1.1\r\nHost: x.org\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("absolute URL expected"), "{resp}");
    let r = next_conn(&mut h.rx).await;
    assert_eq!(r.reason, Reason::BadRequest);

    let resp = exchange(
        h.addr,
        format!("GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: other.test\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(next_conn(&mut h.rx).await.reason, Reason::BadRequest);

    let resp = exchange(
        h.addr,
        format!("POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 411"), "{resp}");
    assert_eq!(next_conn(&mut h.rx).await.reason, Reason::BadRequest);

    let big = format!(
        "GET http://allowed.test/ HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let resp = exchange(h.addr, big.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert_eq!(next_conn(&mut h.rx).await.reason, Reason::BadRequest);

    // Allowed, but no DNS here.
    let resp = exchange(
        h.addr,
        b"GET http://nodns.test/ HTTP/1.1\r\nHost: nodns.test\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    assert_eq!(next_conn(&mut h.rx).await.reason, Reason::ResolveFailed);

    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn connect_failure_is_reported() {
    let mut h = start(|_| {}).await;
    let p = h.sport;
    drop(h.server); // nothing listens on the allowed port any more
    let resp = exchange(
        h.addr,
        format!("GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    assert_eq!(next_conn(&mut h.rx).await.reason, Reason::ConnectFailed);
}

#[tokio::test]
async fn unknown_client_is_refused() {
    let mut h = start(|_| {}).await;
    h.proxy.apply(&Command::Reset { seq: 2 });
    let resp = exchange(
        h.addr,
        b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{resp}");
    assert!(
        resp.ends_with("zcbot egress: this address is not a known sandbox\n"),
        "{resp}"
    );
    let r = next_conn(&mut h.rx).await;
    assert_eq!(r.reason, Reason::UnknownClient);
    assert_eq!(r.user, None);
    assert_eq!(r.host, None);
}

async fn connect_tunnel(addr: SocketAddr, p: u16) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("CONNECT allowed.test:{p} HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let expected = b"HTTP/1.1 200 Connection Established\r\n\r\n";
    let mut got = vec![0u8; expected.len()];
    tokio::time::timeout(T, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, expected);
    s
}

#[tokio::test]
async fn connect_with_matching_sni_relays() {
    let mut h = start(|_| {}).await;
    let hello = client_hello(Some("Allowed.Test"));
    let n = hello.len();
    let server = h.server;
    let srv = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        let mut got = vec![0u8; n];
        s.read_exact(&mut got).await.unwrap();
        s.write_all(b"pong").await.unwrap();
        let mut ping = [0u8; 4];
        s.read_exact(&mut ping).await.unwrap();
        assert_eq!(&ping, b"ping");
        // Nothing else arrives before the client closes.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        (got, rest)
    });
    let mut s = connect_tunnel(h.addr, h.sport).await;
    // The hello in two writes.
    s.write_all(&hello[..7]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.write_all(&hello[7..]).await.unwrap();
    let mut pong = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut pong))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&pong, b"pong");
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let (got, after) = srv.await.unwrap();
    assert_eq!(got, hello);
    assert!(after.is_empty());
    let r = next_conn(&mut h.rx).await;
    assert_eq!((r.verdict, r.reason), (Verdict::Allowed, Reason::Ok));
    assert_eq!(r.method.as_deref(), Some("CONNECT"));
    assert_eq!(r.up, n as u64 + 4);
    assert_eq!(r.down, 4);
}

#[tokio::test]
async fn connect_with_bad_sni_is_closed_before_any_connection() {
    let mut h = start(|_| {}).await;
    let (_got, accepted) = http_server(h.server, RESPONSE);
    let cases: [(Vec<u8>, Reason); 3] = [
        (client_hello(Some("evil.test")), Reason::SniMismatch),
        (client_hello(None), Reason::NoSni),
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), Reason::NoSni),
    ];
    for (bytes, reason) in cases {
        let mut s = connect_tunnel(h.addr, h.sport).await;
        s.write_all(&bytes).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(T, s.read_to_end(&mut rest)).await;
        assert!(rest.is_empty());
        let r = next_conn(&mut h.rx).await;
        assert_eq!((r.verdict, r.reason), (Verdict::Refused, reason));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn per_user_connection_cap() {
    let mut h = start(|c| c.max_conns_per_user = 2).await;
    let (_got, _) = http_server(h.server, RESPONSE);
    let a = TcpStream::connect(h.addr).await.unwrap();
    let b = TcpStream::connect(h.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let p = h.sport;
    let req = format!("GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n");
    let resp = exchange(h.addr, req.as_bytes()).await;
    assert!(
        resp.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
        "{resp}"
    );
    assert_eq!(
        next_conn(&mut h.rx).await.reason,
        Reason::TooManyConnections
    );
    drop((a, b));
    // The two idle ones end (client closed before a head): their slots are free again.
    for _ in 0..2 {
        assert_eq!(next_conn(&mut h.rx).await.reason, Reason::BadRequest);
    }
    let resp = exchange(h.addr, req.as_bytes()).await;
    assert_eq!(resp.as_bytes(), RESPONSE);
    assert_eq!(next_conn(&mut h.rx).await.reason, Reason::Ok);
}

#[tokio::test]
async fn header_timeout_answers_408() {
    let mut h = start(|c| c.header_timeout_ms = 200).await;
    let resp = exchange(h.addr, b"GET http://allowed.test/ HTTP/1.1\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert_eq!(next_conn(&mut h.rx).await.reason, Reason::BadRequest);
}

#[tokio::test]
async fn control_lines_are_acked_in_order() {
    let (sink, mut rx) = ReportSink::channel(64);
    let proxy = Proxy::new(ProxyConfig::default(), sink, Dns::Off).unwrap();
    let mut input = Vec::new();
    input.extend_from_slice(
        br#"{"seq":1,"op":"set","ip":"10.0.0.5","user":"alice","allow":["pypi.org"]}"#,
    );
    input.extend_from_slice(b"\nnot json\n");
    input.extend_from_slice(
        br#"{"seq":2,"op":"set","ip":"10.0.0.6","user":"bob","allow":["a.*.b"]}"#,
    );
    input.extend_from_slice(b"\n\n");
    input.extend_from_slice(&vec![b'x'; 300_000]);
    input.extend_from_slice(b"\r\n");
    input.extend_from_slice(br#"{"seq":3,"op":"drop","ip":"10.0.0.7"}"#);
    input.extend_from_slice(b"\r\n");
    input.extend_from_slice(br#"{"seq":4,"op":"reset"}"#);
    proxy.control(&input[..]).await;
    let mut got = Vec::new();
    while let Ok(r) = rx.try_recv() {
        got.push(r);
    }
    assert_eq!(got.len(), 6, "{got:?}");
    assert_eq!(got[0], Report::Ack { seq: 1 });
    assert!(matches!(got[1], Report::Error { seq: None, .. }));
    assert!(matches!(got[2], Report::Error { seq: Some(2), .. }));
    assert!(
        matches!(&got[3], Report::Error { seq: None, message } if message.contains("longer")),
        "{:?}",
        got[3]
    );
    assert_eq!(got[4], Report::Ack { seq: 3 });
    assert_eq!(got[5], Report::Ack { seq: 4 });
    assert!(proxy.shared.lookup("10.0.0.5".parse().unwrap()).is_none());
}

#[tokio::test]
async fn slow_report_reader_drops_and_counts() {
    let (sink, mut rx) = ReportSink::channel(2);
    for _ in 0..5 {
        sink.report(Report::Ack { seq: 0 });
    }
    assert_eq!(rx.recv().await, Some(Report::Ack { seq: 0 }));
    assert_eq!(rx.recv().await, Some(Report::Ack { seq: 0 }));
    sink.report(Report::Ack { seq: 9 });
    assert_eq!(rx.recv().await, Some(Report::Dropped { count: 3 }));
    assert_eq!(rx.recv().await, Some(Report::Ack { seq: 9 }));
}
