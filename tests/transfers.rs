//! Binary files through `PUT`/`GET /v1/users/{user}/files/{path}` and `write_file`'s
//! `content_base64`, against a real daemon on the docker backend: a 100 MiB round trip that the
//! sandbox sees byte for byte while the daemon's memory stays flat, and the hostile uploads:
//! escapes, too large (announced or not), broken off, past the disk quota, a FIFO to download.

mod common;

use std::time::Duration;

use common::{Daemon, TestPool};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// `n` bytes that do not compress and do not repeat, the same each time (xorshift).
fn bytes_of(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Sends a PUT with `body` in 256 KiB writes, announced by length or chunked; returns the
/// status and the JSON answer.
async fn put(addr: &str, path: &str, body: &[u8], chunked: bool) -> (u16, Value) {
    put_with(addr, path, body, chunked, "").await
}

/// [`put`] with extra header lines (each ending in CRLF). The answer is read while the body is
/// sent, so an early refusal (413) is seen even when the daemon closes before the body's end.
async fn put_with(addr: &str, path: &str, body: &[u8], chunked: bool, extra: &str) -> (u16, Value) {
    let (mut r, mut s) = TcpStream::connect(addr).await.unwrap().into_split();
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = r.read_to_end(&mut out).await;
        out
    });
    let length = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {}", body.len())
    };
    s.write_all(
        format!("PUT {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}{length}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    for piece in body.chunks(256 << 10) {
        let sent = if chunked {
            let mut framed = format!("{:x}\r\n", piece.len()).into_bytes();
            framed.extend_from_slice(piece);
            framed.extend_from_slice(b"\r\n");
            s.write_all(&framed).await
        } else {
            s.write_all(piece).await
        };
        // The daemon may answer (413) and close before the body is all sent.
        if sent.is_err() {
            break;
        }
    }
    if chunked {
        let _ = s.write_all(b"0\r\n\r\n").await;
    }
    let out = reader.await.unwrap();
    let text = String::from_utf8_lossy(&out);
    // The interim answer to `Expect: 100-continue` comes first.
    let text = text.trim_start_matches("HTTP/1.1 100 Continue\r\n\r\n");
    let (head, json) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        serde_json::from_str(json).unwrap_or(Value::String(json.to_owned())),
    )
}

/// Starts a PUT of keep.txt announcing 512 KiB and sends 100 KiB of it.
async fn part_of_an_upload(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head =
        "PUT /v1/users/u/files/keep.txt HTTP/1.1\r\nHost: localhost\r\nContent-Length: 524288\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b'z'; 100 << 10]).await.unwrap();
    s
}

/// GETs a file, hashing the body as it arrives (never held whole); returns the status, the
/// headers, the body's length and its sha256 (hex).
async fn get(addr: &str, path: &str) -> (u16, String, u64, String) {
    let mut s = BufReader::new(TcpStream::connect(addr).await.unwrap());
    s.get_mut()
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if s.read_line(&mut line).await.unwrap() == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        len += n as u64;
    }
    (status, head, len, hex(&hash.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha256(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

#[tokio::test]
async fn a_100_mib_binary_file_goes_in_and_out_whole_and_the_sandbox_sees_the_same_bytes() {
    let mut t = TestPool::new("tbig");
    let d = Daemon::start(&mut t);
    let big = bytes_of(7, 100 << 20);
    let want = sha256(&big);
    // The daemon's memory before: its peak must not grow by anything like the file.
    let (s, _) = d.tool("u", "shell", json!({"command": "true"})).await;
    assert_eq!(s, 200);
    let before = d.peak_rss_kib();

    let (s, r) = put(&d.addr, "/v1/users/u/files/data/big.bin", &big, false).await;
    assert_eq!((s, &r["bytes_written"]), (200, &json!(100 << 20)), "{r}");
    // The sandbox sees the same bytes at /workspace.
    let (s, r) = d
        .tool(
            "u",
            "shell",
            json!({"command": "sha256sum /workspace/data/big.bin"}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    assert!(r["stdout"].as_str().unwrap().starts_with(&want), "{r}");
    // And back, streamed, with its length and a content type.
    let (s, head, len, got) = get(&d.addr, "/v1/users/u/files/data/big.bin").await;
    assert_eq!((s, len), (200, 100 << 20), "{head}");
    assert_eq!(got, want);
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("content-type: application/octet-stream"),
        "{head}"
    );
    assert!(head.contains("content-length: 104857600"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(head.contains("content-security-policy: sandbox"), "{head}");
    assert!(
        head.contains("content-disposition: attachment; filename*=utf-8''big.bin"),
        "{head}"
    );
    // A file the sandbox made comes out too, typed by its name.
    let (s, _) = d
        .tool(
            "u",
            "shell",
            json!({"command": "printf 'a,b\\n1,2\\n' > t.csv"}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, head, len, got) = get(&d.addr, "/v1/users/u/files/t.csv").await;
    assert_eq!((s, len, got), (200, 8, sha256(b"a,b\n1,2\n")));
    assert!(
        head.to_ascii_lowercase().contains("content-type: text/csv"),
        "{head}"
    );

    // 100 MiB moved twice; the daemon held a piece at a time, not the file.
    let grew = d.peak_rss_kib().saturating_sub(before);
    assert!(
        grew < 40 << 10,
        "the daemon's peak memory grew by {grew} KiB"
    );

    // A name that would end the header or add a parameter stays inside its quotes-free encoding;
    // a page is never served as one.
    let (s, _) = put(
        &d.addr,
        "/v1/users/u/files/a%0D%0AX-Evil:%201%22.html",
        b"<script>",
        false,
    )
    .await;
    assert_eq!(s, 200);
    let (s, head, _, _) = get(&d.addr, "/v1/users/u/files/a%0D%0AX-Evil:%201%22.html").await;
    let head = head.to_ascii_lowercase();
    assert_eq!(s, 200, "{head}");
    assert!(!head.lines().any(|l| l.starts_with("x-evil")), "{head}");
    assert!(
        head.contains("filename*=utf-8''a%0d%0ax-evil%3a%201%22.html"),
        "{head}"
    );
    assert!(
        head.contains("content-type: application/octet-stream"),
        "{head}"
    );
    // With `Expect: 100-continue` (curl -T sends it) the upload waits for the daemon's go.
    let (s, r) = put_with(
        &d.addr,
        "/v1/users/u/files/expect.bin",
        &bytes_of(5, 2 << 20),
        false,
        "Expect: 100-continue\r\n",
    )
    .await;
    assert_eq!((s, &r["bytes_written"]), (200, &json!(2 << 20)), "{r}");
    // Chunked (no length announced) works the same.
    let small = bytes_of(9, 3 << 20);
    let (s, r) = put(&d.addr, "/v1/users/u/files/chunked.bin", &small, true).await;
    assert_eq!((s, &r["bytes_written"]), (200, &json!(3 << 20)), "{r}");
    let (_, _, _, got) = get(&d.addr, "/v1/users/u/files/chunked.bin").await;
    assert_eq!(got, sha256(&small));
}

#[tokio::test]
async fn hostile_uploads_and_downloads_are_refused_and_change_nothing() {
    let mut t = TestPool::new("thostile");
    t.set("ZCBOT_MAX_FILE", "1MiB")
        .set("ZCBOT_HTTP_BODY_TIMEOUT", "2s");
    let d = Daemon::start(&mut t);
    let home = std::path::PathBuf::from(&t.vars["ZCBOT_USERS_ROOT"]).join("u");
    let user_dir = |p: &str| home.join(p);
    let (s, r) = d
        .tool(
            "u",
            "shell",
            json!({"command": "echo original > keep.txt; ln -s / out; mkfifo pipe; mkdir dir"}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let keep = || std::fs::read_to_string(user_dir("keep.txt")).unwrap();
    let no_temp = || {
        std::fs::read_dir(&home).unwrap().all(|e| {
            !e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".zcbot-write")
        })
    };

    // Out of the folder: by `..`, by an absolute path, through the tenant's symlink.
    for path in [
        "/v1/users/u/files/../v/x",
        "/v1/users/u/files/%2E%2E/escaped",
        "/v1/users/u/files/out/tmp/zcbot-escape",
    ] {
        let (s, r) = put(&d.addr, path, b"x", false).await;
        assert_eq!(
            (s, r["error"]["kind"].as_str()),
            (403, Some("path_refused")),
            "{path}: {r}"
        );
    }
    assert!(!std::path::Path::new("/tmp/zcbot-escape").exists());
    // Too large, announced (refused before a byte is written) or not (chunked: stopped when it
    // passes the limit); the old file whole either way.
    for chunked in [false, true] {
        let (s, r) = put(
            &d.addr,
            "/v1/users/u/files/keep.txt",
            &vec![b'y'; 2 << 20],
            chunked,
        )
        .await;
        assert_eq!(
            (s, r["error"]["kind"].as_str()),
            (413, Some("file_too_large")),
            "chunked {chunked}: {r}"
        );
    }
    assert_eq!(keep(), "original\n");
    // Broken off: the client announces 512 KiB, sends 100 KiB and goes away.
    drop(part_of_an_upload(&d.addr).await);
    // Stalled: the same, then waits past ZCBOT_HTTP_BODY_TIMEOUT.
    let mut stalled = part_of_an_upload(&d.addr).await;
    let mut answer = Vec::new();
    let waited =
        tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut answer)).await;
    assert!(waited.is_ok(), "a stalled upload was never cut");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("bad_body"),
        "{answer}"
    );
    assert_eq!(keep(), "original\n");
    // Give the broken-off upload's clean-up a moment, then: no temporary file is left.
    let mut clean = false;
    for _ in 0..50 {
        if no_temp() {
            clean = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(clean, "an upload that broke off left its temporary file");

    // Downloads: a FIFO, a folder, a missing file, one over the limit; none hangs the daemon.
    for (path, status) in [
        ("/v1/users/u/files/pipe", 403),
        ("/v1/users/u/files/dir", 400),
        ("/v1/users/u/files/missing", 404),
        ("/v1/users/u/files/out/etc/passwd", 403),
    ] {
        let got = tokio::time::timeout(Duration::from_secs(10), get(&d.addr, path)).await;
        let (s, head, _, _) = got.unwrap_or_else(|_| panic!("{path}: the download hung"));
        assert_eq!(s, status, "{path}: {head}");
    }
    let (s, _) = d
        .tool(
            "u",
            "shell",
            json!({"command": "head -c 2097152 /dev/zero > two"}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, head, _, _) = get(&d.addr, "/v1/users/u/files/two").await;
    assert_eq!(s, 413, "{head}");

    // The positive control: a good upload through the same route works and replaces the file.
    let (s, r) = put(&d.addr, "/v1/users/u/files/keep.txt", b"replaced", false).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(keep(), "replaced");
    assert!(no_temp());
}

#[tokio::test]
async fn write_file_takes_base64_for_any_bytes_and_refuses_bad_base64() {
    let mut t = TestPool::new("tb64");
    let d = Daemon::start(&mut t);
    let bin: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, 0x00]).collect();
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bin);
    let (s, r) = d
        .tool(
            "u",
            "write_file",
            json!({"path": "b.bin", "content_base64": b64}),
        )
        .await;
    assert_eq!((s, &r["data"]["bytes_written"]), (200, &json!(259)), "{r}");
    let (_, _, _, got) = get(&d.addr, "/v1/users/u/files/b.bin").await;
    assert_eq!(got, sha256(&bin));
    // Bad base64, or both contents: refused, nothing written.
    for args in [
        json!({"path": "c.bin", "content_base64": "not base64!"}),
        json!({"path": "c.bin", "content": "x", "content_base64": "eA=="}),
    ] {
        let (s, r) = d.tool("u", "write_file", args).await;
        assert_eq!(
            (s, r["error"]["kind"].as_str()),
            (400, Some("bad_call")),
            "{r}"
        );
    }
    let users = std::path::PathBuf::from(&t.vars["ZCBOT_USERS_ROOT"]);
    assert!(!users.join("u").join("c.bin").exists());
    // Refused before anything is touched: a new user's bad call makes no folder.
    let (s, _) = d
        .tool(
            "fresh",
            "write_file",
            json!({"path": "c.bin", "content_base64": "%%"}),
        )
        .await;
    assert_eq!(s, 400);
    assert!(!users.join("fresh").exists());
    // Line-wrapped base64 (as the base64 tool prints it) is taken.
    let (s, r) = d
        .tool(
            "u",
            "write_file",
            json!({"path": "w.bin", "content_base64": "AAEC\n/w==\n"}),
        )
        .await;
    assert_eq!((s, &r["data"]["bytes_written"]), (200, &json!(4)), "{r}");
}

#[tokio::test]
async fn an_upload_past_the_disk_quota_fails_whole_and_leaves_the_old_file() {
    let mut t = TestPool::with_quota("tquota", 512);
    t.set("ZCBOT_SANDBOX_DISK", "64MiB");
    let d = Daemon::start(&mut t);
    let (s, r) = put(&d.addr, "/v1/users/u/files/keep.bin", b"original", false).await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = put(
        &d.addr,
        "/v1/users/u/files/keep.bin",
        &bytes_of(3, 100 << 20),
        false,
    )
    .await;
    assert_eq!(
        (s, r["error"]["kind"].as_str()),
        (507, Some("disk_full")),
        "{r}"
    );
    let (_, _, _, got) = get(&d.addr, "/v1/users/u/files/keep.bin").await;
    assert_eq!(got, sha256(b"original"));
    // The space the failed upload took is given back: a smaller one fits.
    let mut ok = false;
    for _ in 0..50 {
        let (s, _) = put(
            &d.addr,
            "/v1/users/u/files/fits.bin",
            &bytes_of(4, 16 << 20),
            false,
        )
        .await;
        if s == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "the failed upload's space never came back");
}

#[tokio::test]
async fn the_image_runs_a_data_task_and_its_plot_comes_back_as_a_png() {
    let mut t = TestPool::new("tdata");
    let d = Daemon::start(&mut t);
    let code = "import numpy as np, pandas as pd, matplotlib.pyplot as plt\n\
                df = pd.DataFrame({'k': ['a', 'b', 'a'], 'v': np.array([1, 2, 3])})\n\
                print(df.groupby('k').v.sum().to_dict())\n\
                df.plot(x='k', y='v'); plt.savefig('plot.png')\n";
    let (s, r) = d
        .tool("u", "run_python", json!({"code": code, "timeout": 60}))
        .await;
    assert_eq!((s, &r["exit_code"]), (200, &json!(0)), "{r}");
    assert_eq!(r["stdout"], "{'a': 4, 'b': 2}\n", "{r}");
    let mut s = BufReader::new(TcpStream::connect(&d.addr).await.unwrap());
    s.get_mut()
        .write_all(
            b"GET /v1/users/u/files/plot.png HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&all[..split]).to_ascii_lowercase();
    assert!(
        head.contains("200 ok") && head.contains("content-type: image/png"),
        "{head}"
    );
    assert_eq!(&all[split + 4..split + 12], b"\x89PNG\r\n\x1a\n");
}
