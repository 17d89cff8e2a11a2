//! The allowlist egress (`ZCBOT_SANDBOX_EGRESS=allowlist`) against a small internet made for
//! each test: a non-internal Docker network (the proxy's outbound side, `ZCBOT_EGRESS_NETWORK`)
//! with three site containers of the sandbox image on it: `site-a` and `site-b` (plain HTTP on
//! 80 and 8080) and `tls-site` (TLS on 443, the self-signed certificate of
//! tests/fixtures/egress), named for the proxy through `ZCBOT_EGRESS_RESOLVE`. Sandboxes are
//! driven through the daemon binary (the per-user policy and the metrics are the daemon's), with
//! tests/fixtures/egress/probe.py as the agent's code; each site's own log
//! (tests/fixtures/egress/site.py) is the witness of what reached it.
//!
//! Every site answers every request with 10 KiB of `NAME:0123456789abcdef\n`, so a body that
//! arrives proves which site it came from, whole.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{docker, docker_try, Daemon, TestPool};
use serde_json::{json, Value};
use zcbot_sandbox::UserId;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/egress");
const SITE_PY: &str = include_str!("fixtures/egress/site.py");
const PROBE_PY: &str = include_str!("fixtures/egress/probe.py");

/// The pool's list in every test: two plain names (one on 8080 only), the TLS site, and a
/// wildcard whose subdomain (`x.wild.test`) and apex (`wild.test`) both resolve to site A.
const POOL_ALLOW: &str = "site-a.test,site-b.test:8080,tls-site.test,*.wild.test";

/// The error kind of a PUT with an unparsable pattern, as the brief of this feature gives it.
/// (The routes being written say `bad_pattern`: whichever is settled on, change it here.)
const BAD_PATTERN_KIND: &str = "bad_pattern";

const CONNECTIONS: &str = "zcbot_egress_connections_total";
const BYTES: &str = "zcbot_egress_bytes_total";

/// Fails loudly when the proxy's image is missing, as `require_docker` does for the sandbox's.
fn require_egress_image() {
    let image =
        std::env::var("ZCBOT_EGRESS_IMAGE").unwrap_or_else(|_| "zcbot-egress:latest".into());
    assert!(
        docker_try(&["image", "inspect", &image]).0,
        "image {image} is missing: run scripts/build-image.sh (it builds the egress proxy's \
         image beside the sandbox image)"
    );
}

/// The 10 KiB every request to `site` gets.
fn body_of(site: &str) -> String {
    format!("{site}:0123456789abcdef\n").repeat(1024)[..10240].to_owned()
}

/// The sha256 of the TLS site's certificate (DER), as the probe prints the peer's.
fn fixture_cert_sha256() -> String {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let pem = std::fs::read_to_string(format!("{FIXTURES}/cert.pem")).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    Sha256::digest(&der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A probe result for an assertion message: long strings (the 10 KiB bodies) cut short.
fn brief(v: &Value) -> String {
    let cut = |v: &Value| match v {
        Value::String(s) if s.chars().count() > 300 => Value::String(format!(
            "{}... ({} bytes)",
            s.chars().take(300).collect::<String>(),
            s.len()
        )),
        other => other.clone(),
    };
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), cut(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(cut).collect()),
        other => other.clone(),
    }
    .to_string()
}

/// The body of a raw HTTP answer (what follows the head).
fn body_of_answer(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// The entries of one kind in a site's log, without the kind: `REQ` gives `80 GET / HTTP/1.1`.
fn entries<'a>(log: &'a str, kind: &str) -> Vec<&'a str> {
    log.lines()
        .filter_map(|l| l.strip_prefix(kind).and_then(|r| r.strip_prefix(' ')))
        .collect()
}

/// The sum of the samples of `family` whose labels include all of `labels` (0 when none).
fn sample(metrics: &str, family: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, set) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = name == family
                && labels.iter().all(|(k, v)| {
                    let want = format!("{k}=\"{v}\"");
                    set.split(',').any(|p| p == want)
                });
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The egress lines of an exposition, for assertion messages.
fn egress_lines(metrics: &str) -> String {
    metrics
        .lines()
        .filter(|l| l.contains("zcbot_egress"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The IPv4 address of `container` on `network` (the docker CLI as the witness).
fn ip_on(container: &str, network: &str) -> String {
    let format = "{{with index .NetworkSettings.Networks \"".to_owned()
        + network
        + "\"}}{{.IPAddress}}{{end}}";
    docker(&["inspect", "-f", &format, container])
}

/// The IPv4 gateway of a Docker network (the host's address on its bridge).
fn gateway_of(network: &str) -> String {
    docker(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
        network,
    ])
    .split_whitespace()
    .find(|g| g.contains('.'))
    .unwrap_or_else(|| panic!("network {network} has no IPv4 gateway"))
    .to_owned()
}

/// The names of the networks a container is on.
fn networks_of(container: &str) -> Vec<String> {
    let mut v: Vec<String> = docker(&[
        "inspect",
        "-f",
        "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
        container,
    ])
    .split_whitespace()
    .map(str::to_owned)
    .collect();
    v.sort();
    v
}

async fn settle() {
    // What a site logs arrives within milliseconds; absence is only believed after a pause.
    tokio::time::sleep(Duration::from_millis(1000)).await;
}

struct Site {
    name: &'static str,
    container: String,
    ip: String,
}

/// The test's internet: a non-internal network with the three sites on it. Dropping it removes
/// the proxy container (which is on this network too), the sites and the network, even when the
/// test panicked.
struct Internet {
    network: String,
    /// The host's address on this network.
    gateway: String,
    /// The pool's proxy container (`zcbot-egress-<pool id>`).
    proxy: String,
    sites: Vec<Site>,
}

impl Internet {
    fn new(t: &TestPool) -> Internet {
        let mut net = Internet {
            network: format!("zcbe-{}", t.pool_id),
            gateway: String::new(),
            proxy: format!("zcbot-egress-{}", t.pool_id),
            sites: Vec::new(),
        };
        docker(&[
            "network",
            "create",
            "--label",
            "io.zcbot.test=1",
            &net.network,
        ]);
        net.gateway = gateway_of(&net.network);
        let image = t
            .vars
            .get("ZCBOT_SANDBOX_IMAGE")
            .cloned()
            .unwrap_or_else(|| "zcbot-sandbox:latest".into());
        let certs = format!("{FIXTURES}:/certs:ro");
        for (name, mode, ports) in [
            ("site-a", "http", &["80", "8080"][..]),
            ("site-b", "http", &["80", "8080"][..]),
            ("tls-site", "tls", &["443"][..]),
        ] {
            let container = format!("zcbe-{}-{name}", t.pool_id);
            net.sites.push(Site {
                name,
                container: container.clone(),
                ip: String::new(),
            });
            let mut args = vec![
                "run",
                "-d",
                "--name",
                &container,
                "--label",
                "io.zcbot.test=1",
                "--network",
                &net.network,
                "--user",
                "0:0",
                "--entrypoint",
                "python3",
                "-v",
                &certs,
                &image,
                "-c",
                SITE_PY,
                name,
                mode,
            ];
            args.extend_from_slice(ports);
            docker(&args);
        }
        for site in &mut net.sites {
            let until = Instant::now() + Duration::from_secs(30);
            loop {
                let (ok, log, _) = docker_try(&["exec", &site.container, "cat", "/tmp/site.log"]);
                if ok && log.contains("READY") {
                    break;
                }
                if Instant::now() > until {
                    let (_, out, err) = docker_try(&["logs", &site.container]);
                    panic!("site {} never got ready: {log}\n{out}\n{err}", site.name);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            site.ip = ip_on(&site.container, &net.network);
            assert!(!site.ip.is_empty(), "site {} has no address", site.name);
        }
        net
    }

    fn site(&self, name: &str) -> &Site {
        self.sites.iter().find(|s| s.name == name).unwrap()
    }

    fn ip(&self, name: &str) -> &str {
        &self.site(name).ip
    }

    /// Everything that reached `site` so far.
    fn log(&self, name: &str) -> String {
        docker(&["exec", &self.site(name).container, "cat", "/tmp/site.log"])
    }

    /// The names the proxy is told (`ZCBOT_EGRESS_RESOLVE`): the listed ones, and names off the
    /// list that point at real sites (so a list that failed to refuse would show at a site).
    fn resolve(&self) -> String {
        let (a, b, tls) = (self.ip("site-a"), self.ip("site-b"), self.ip("tls-site"));
        format!(
            "site-a.test={a},site-b.test={b},tls-site.test={tls},x.wild.test={a},wild.test={a},\
             blocked-site.test={b},blocked-tls.test={tls}"
        )
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let mut rm = vec!["rm".to_owned(), "-f".to_owned(), self.proxy.clone()];
        rm.extend(self.sites.iter().map(|s| s.container.clone()));
        let rm: Vec<&str> = rm.iter().map(String::as_str).collect();
        docker_try(&rm);
        // Anything still attached (a proxy under another name) would keep the network.
        let (_, attached, _) = docker_try(&[
            "network",
            "inspect",
            "-f",
            "{{range .Containers}}{{.Name}} {{end}}",
            &self.network,
        ]);
        for c in attached.split_whitespace() {
            docker_try(&["network", "disconnect", "-f", &self.network, c]);
        }
        docker_try(&["network", "rm", &self.network]);
    }
}

/// One test's world: a daemon on an allowlist pool whose proxy goes out to the test's internet.
/// Field order is drop order: the daemon stops, then the internet (and the proxy) go, then the
/// pool's sandboxes and network.
struct Lab {
    d: Option<Daemon>,
    net: Internet,
    t: TestPool,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        Lab::with(tag, |_, _| {})
    }

    /// Like [`Lab::new`], with `more` changing the pool's settings before the daemon starts.
    fn with(tag: &str, more: impl FnOnce(&mut TestPool, &Internet)) -> Lab {
        let mut t = TestPool::new(tag);
        require_egress_image();
        let net = Internet::new(&t);
        t.extra_containers.push(net.proxy.clone());
        t.set("ZCBOT_SANDBOX_EGRESS", "allowlist")
            .set("ZCBOT_EGRESS_NETWORK", &net.network)
            .set("ZCBOT_EGRESS_ALLOW", POOL_ALLOW)
            .set("ZCBOT_EGRESS_RESOLVE", &net.resolve());
        if let Ok(image) = std::env::var("ZCBOT_EGRESS_IMAGE") {
            t.set("ZCBOT_EGRESS_IMAGE", &image);
        }
        more(&mut t, &net);
        let d = Daemon::start(&mut t);
        Lab { d: Some(d), net, t }
    }

    fn d(&self) -> &Daemon {
        self.d.as_ref().unwrap()
    }

    /// Stops the daemon (SIGTERM, waited for) and starts another on the same pool.
    fn restart(&mut self) {
        self.d = None;
        self.d = Some(Daemon::start(&mut self.t));
    }

    /// The proxy's address on `network` (the sandbox network or the test's internet).
    fn proxy_ip(&self, network: &str) -> String {
        let ip = ip_on(&self.net.proxy, network);
        assert!(
            !ip.is_empty(),
            "the proxy {} is not on {network}: on {:?}",
            self.net.proxy,
            networks_of(&self.net.proxy)
        );
        ip
    }

    /// Runs tests/fixtures/egress/probe.py in `user`'s sandbox with `ops` and returns one result
    /// per operation.
    async fn ops(&self, user: &UserId, ops: Value) -> Vec<Value> {
        let want = ops.as_array().unwrap().len();
        let code = PROBE_PY.replace("@OPS@", &ops.to_string());
        let (status, r) = self
            .d()
            .tool(user, "run_python", json!({"code": code, "timeout": 120}))
            .await;
        assert_eq!(status, 200, "the probe call failed: {r}");
        let stdout = r["stdout"].as_str().unwrap_or_default();
        let parsed: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("the probe printed no JSON ({e}): {}", brief(&r)));
        let out = parsed.as_array().cloned().unwrap_or_default();
        assert_eq!(out.len(), want, "the probe stopped early: {}", brief(&r));
        out
    }

    /// One urllib fetch through the proxy variables: `{"status", "body"}` or `{"status": 0,
    /// "error"}`.
    async fn fetch(&self, user: &UserId, url: &str) -> Value {
        self.ops(user, json!([{"op": "fetch", "url": url}]))
            .await
            .remove(0)
    }

    async fn metrics(&self) -> String {
        common::http(&self.d().addr, "GET", "/metrics", None)
            .await
            .2
    }

    /// Polls `/metrics` until `value(metrics)` reaches `at_least` (the proxy's reports reach the
    /// daemon asynchronously) or 10 s pass; returns the last value and exposition.
    async fn wait_metric(&self, value: impl Fn(&str) -> f64, at_least: f64) -> (f64, String) {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.metrics().await;
            let v = value(&m);
            if v >= at_least || Instant::now() > until {
                return (v, m);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The per-user policy API: `method` on `/v1/users/{user}/egress`.
    async fn egress(&self, method: &str, user: &UserId, body: Option<Value>) -> (u16, Value) {
        let (status, _, text) = common::http(
            &self.d().addr,
            method,
            &format!("/v1/users/{user}/egress"),
            body.map(|b| b.to_string()),
        )
        .await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

fn refused_by_proxy(r: &Value) -> bool {
    r["status"] == 403
        && r["body"]
            .as_str()
            .is_some_and(|b| b.starts_with("zcbot egress:"))
}

fn fetched(r: &Value, site: &str) -> bool {
    r["status"] == 200 && r["body"].as_str() == Some(body_of(site).as_str())
}

/// An agent fetching an allowed name over plain HTTP gets the site's page, whole; the site sees
/// one ordinary origin-form request with the Host the agent asked for, coming from the proxy's
/// outbound address (never from the sandbox). The sandbox's environment is what points clients
/// at the proxy, and the sandbox itself stays on the internal network. The positive control of
/// every refusal in this file.
#[tokio::test]
async fn an_allowed_name_over_http_reaches_the_site_in_origin_form_from_the_proxy() {
    let lab = Lab::new("egrhttp");
    let u = lab.t.user("u");
    let (status, r) = lab
        .d()
        .tool(
            &u,
            "shell",
            json!({"command": "env | grep -i proxy | sort"}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let stdout = r["stdout"].as_str().unwrap_or_default().to_owned();
    let env: HashMap<&str, &str> = stdout.lines().filter_map(|l| l.split_once('=')).collect();
    let proxy = format!("http://{}:3128", lab.proxy_ip(&lab.t.network));
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "PIP_PROXY",
    ] {
        assert_eq!(
            env.get(var).copied(),
            Some(proxy.as_str()),
            "{var} in the sandbox (the proxy is {proxy}): {stdout}"
        );
    }
    for var in ["NO_PROXY", "no_proxy"] {
        assert_eq!(
            env.get(var).copied(),
            Some("localhost,127.0.0.1,::1"),
            "{var} in the sandbox: {stdout}"
        );
    }
    let sandbox = lab.t.container_name(&u);
    assert_eq!(
        networks_of(&sandbox),
        vec![lab.t.network.clone()],
        "the sandbox must be on the internal sandbox network only"
    );
    assert_eq!(
        docker(&["network", "inspect", "-f", "{{.Internal}}", &lab.t.network]),
        "true",
        "the sandbox network is no longer internal"
    );
    let proxy_nets = networks_of(&lab.net.proxy);
    for n in [&lab.t.network, &lab.net.network] {
        assert!(
            proxy_nets.contains(n),
            "the proxy is not on {n}: {proxy_nets:?}"
        );
    }

    let r = lab.fetch(&u, "http://site-a.test/one?x=1").await;
    assert!(
        fetched(&r, "site-a"),
        "an allowed name over HTTP: {}",
        brief(&r)
    );
    let log = lab.net.log("site-a");
    assert_eq!(
        entries(&log, "REQ"),
        vec!["80 GET /one?x=1 HTTP/1.1"],
        "the site should see exactly the agent's request, in origin form:\n{log}"
    );
    assert!(
        entries(&log, "HDR").contains(&"80 Host: site-a.test"),
        "the site did not get the agent's Host:\n{log}"
    );
    let outbound = lab.proxy_ip(&lab.net.network);
    assert_eq!(
        entries(&log, "CONN"),
        vec![format!("80 {outbound}").as_str()],
        "the site should see one connection, from the proxy's outbound address:\n{log}"
    );
}

/// An agent fetching an allowed name over HTTPS gets the page through a CONNECT tunnel, and the
/// TLS session is end to end: the certificate the agent sees is the site's own, and the site
/// sees the SNI the agent sent.
#[tokio::test]
async fn an_allowed_name_over_tls_is_tunnelled_end_to_end() {
    let lab = Lab::new("egrtls");
    let u = lab.t.user("u");
    let r = lab
        .ops(
            &u,
            json!([
                {"op": "fetch", "url": "https://tls-site.test/secure"},
                {"op": "tunnel", "target": "tls-site.test:443", "sni": "tls-site.test"},
            ]),
        )
        .await;
    assert!(
        fetched(&r[0], "tls-site"),
        "an allowed name over HTTPS (urllib): {}",
        brief(&r[0])
    );
    assert_eq!(r[1]["connect"], 200, "{}", brief(&r[1]));
    assert_eq!(r[1]["tls"], "ok", "{}", brief(&r[1]));
    assert_eq!(
        r[1]["cert_sha256"],
        fixture_cert_sha256(),
        "the certificate in the tunnel is not the site's (intercepted?): {}",
        brief(&r[1])
    );
    assert!(
        r[1]["answer"]
            .as_str()
            .is_some_and(|a| body_of_answer(a) == body_of("tls-site")),
        "{}",
        brief(&r[1])
    );
    let log = lab.net.log("tls-site");
    assert_eq!(
        entries(&log, "SNI"),
        vec!["443 tls-site.test", "443 tls-site.test"],
        "the site should see the agent's SNI on both connections:\n{log}"
    );
    assert_eq!(
        entries(&log, "REQ"),
        vec!["443 GET /secure HTTP/1.1", "443 GET /tunnelled HTTP/1.1"],
        "{log}"
    );
    let outbound = lab.proxy_ip(&lab.net.network);
    assert!(
        entries(&log, "CONN")
            .iter()
            .all(|c| *c == format!("443 {outbound}")),
        "a connection to the site came from elsewhere than the proxy ({outbound}):\n{log}"
    );
}

/// A name off the list, a wildcard's apex, and a listed name on a port its pattern does not
/// allow all get the proxy's 403 (`zcbot egress: ...`), over HTTP and CONNECT alike; so do a
/// request whose Host is not its URL's, an origin-form request to the proxy, and a request
/// pipelined behind an allowed one. Though every refused name resolves to a real site, no site
/// sees any of them. The wildcard's subdomain and the port-limited name on its port work.
#[tokio::test]
async fn names_and_ports_off_the_list_get_403_and_no_site_sees_them() {
    let lab = Lab::new("egrlist");
    let u = lab.t.user("u");
    let r = lab
        .ops(
            &u,
            json!([
                {"op": "fetch", "url": "http://blocked-site.test/off-list"},
                {"op": "tunnel", "target": "blocked-tls.test:443", "sni": "blocked-tls.test"},
                {"op": "fetch", "url": "https://blocked-tls.test/off-list-tls"},
                {"op": "fetch", "url": "http://wild.test/apex"},
                {"op": "fetch", "url": "http://site-a.test:8080/port"},
                {"op": "fetch", "url": "http://site-b.test/port80"},
                {"op": "raw", "data": "GET http://site-a.test/mismatch HTTP/1.1\r\nHost: blocked-site.test\r\nConnection: close\r\n\r\n"},
                {"op": "raw", "data": "GET /origin HTTP/1.1\r\nHost: site-a.test\r\nConnection: close\r\n\r\n"},
                {"op": "raw", "data": "GET http://site-a.test/first HTTP/1.1\r\nHost: site-a.test\r\n\r\nGET http://blocked-site.test/second HTTP/1.1\r\nHost: blocked-site.test\r\n\r\n"},
                {"op": "fetch", "url": "http://x.wild.test/sub"},
                {"op": "fetch", "url": "http://site-b.test:8080/ok"},
            ]),
        )
        .await;
    for (i, what) in [
        (0, "a name off the list"),
        (3, "a wildcard's apex"),
        (4, "a listed name on a port it does not allow"),
        (5, "a port-limited name on another port"),
    ] {
        assert!(refused_by_proxy(&r[i]), "{what}: {}", brief(&r[i]));
    }
    assert_eq!(
        r[1]["connect"],
        403,
        "CONNECT to a name off the list: {}",
        brief(&r[1])
    );
    assert!(
        r[1]["answer"]
            .as_str()
            .is_some_and(|a| a.starts_with("zcbot egress:")),
        "{}",
        brief(&r[1])
    );
    assert!(
        r[2]["status"] == 0 && r[2]["error"].as_str().is_some_and(|e| e.contains("403")),
        "urllib over HTTPS to a name off the list should fail with the tunnel's 403: {}",
        brief(&r[2])
    );
    for (i, what) in [
        (6, "a Host that is not the URL's"),
        (7, "an origin-form request to the proxy"),
    ] {
        let status = r[i]["status"].as_u64().unwrap_or(0);
        assert!(
            (400..500).contains(&status)
                && r[i]["answer"]
                    .as_str()
                    .is_some_and(|a| body_of_answer(a).starts_with("zcbot egress:")),
            "{what} should be refused by the proxy: {}",
            brief(&r[i])
        );
    }
    assert!(
        fetched(&r[9], "site-a"),
        "control: a wildcard's subdomain: {}",
        brief(&r[9])
    );
    assert!(
        fetched(&r[10], "site-b"),
        "control: a port-limited name on its port: {}",
        brief(&r[10])
    );

    settle().await;
    let a = lab.net.log("site-a");
    let reqs = entries(&a, "REQ");
    assert!(
        reqs.contains(&"80 GET /sub HTTP/1.1")
            && entries(&a, "HDR").contains(&"80 Host: x.wild.test"),
        "control: the wildcard's subdomain reached site A:\n{a}"
    );
    for path in ["/apex", "/port", "/mismatch", "/origin", "/second"] {
        assert!(
            !reqs.iter().any(|r| r.contains(path)),
            "{path} reached site A:\n{a}"
        );
    }
    // The pipelined request's first half may be served or refused; it must never carry the
    // second.
    assert!(
        reqs.iter()
            .all(|r| ["80 GET /sub HTTP/1.1", "80 GET /first HTTP/1.1"].contains(r)),
        "site A saw more than the allowed requests:\n{a}"
    );
    let b = lab.net.log("site-b");
    assert_eq!(
        entries(&b, "REQ"),
        vec!["8080 GET /ok HTTP/1.1"],
        "site B (where the refused names point) saw more than the control:\n{b}"
    );
    assert_eq!(entries(&b, "CONN").len(), 1, "{b}");
    let tls = lab.net.log("tls-site");
    assert!(
        entries(&tls, "CONN").is_empty(),
        "the TLS site (where blocked-tls.test points) was reached:\n{tls}"
    );
}

/// A tunnel opened for an allowed name whose TLS then names another host (even another allowed
/// one) or no host at all is closed after the 200, before a byte reaches the site: a client
/// cannot reach a host through an allowed name's tunnel. The same tunnel with the right SNI
/// works.
#[tokio::test]
async fn a_tunnel_whose_tls_names_another_host_or_none_is_closed_before_the_site() {
    let lab = Lab::new("egrsni");
    let u = lab.t.user("u");
    let reason =
        |m: &str, r: &str| sample(m, CONNECTIONS, &[("verdict", "refused"), ("reason", r)]);
    lab.ops(&u, json!([])).await;
    let before = lab.metrics().await;
    let r = lab
        .ops(
            &u,
            json!([
                {"op": "tunnel", "target": "tls-site.test:443", "sni": "other.test"},
                {"op": "tunnel", "target": "tls-site.test:443", "sni": "site-a.test"},
                {"op": "tunnel", "target": "tls-site.test:443", "sni": null},
                {"op": "tunnel", "target": "tls-site.test:443", "sni": "tls-site.test"},
            ]),
        )
        .await;
    for (i, what) in [
        (0, "an SNI off the list"),
        (1, "another allowed name's SNI"),
        (2, "no SNI"),
    ] {
        assert_eq!(
            r[i]["connect"],
            200,
            "{what}: the CONNECT itself is allowed: {}",
            brief(&r[i])
        );
        assert!(
            r[i]["tls"]
                .as_str()
                .is_some_and(|t| t.starts_with("failed")),
            "{what}: the TLS session went through: {}",
            brief(&r[i])
        );
    }
    assert_eq!(
        r[3]["tls"],
        "ok",
        "control: the right SNI in the same tunnel: {}",
        brief(&r[3])
    );
    settle().await;
    let log = lab.net.log("tls-site");
    assert_eq!(
        entries(&log, "CONN").len(),
        1,
        "the site saw connections for the refused tunnels (only the control's should arrive):\n{log}"
    );
    assert_eq!(entries(&log, "SNI"), vec!["443 tls-site.test"], "{log}");

    let (mismatch, m) = lab
        .wait_metric(
            |m| reason(m, "sni_mismatch") - reason(&before, "sni_mismatch"),
            2.0,
        )
        .await;
    assert_eq!(
        mismatch,
        2.0,
        "sni_mismatch refusals:\n{}",
        egress_lines(&m)
    );
    let no_sni = reason(&m, "no_sni") - reason(&before, "no_sni");
    assert_eq!(no_sni, 1.0, "no_sni refusals:\n{}", egress_lines(&m));
}

/// IP literals never leave through the proxy: `http://<site's address>/`, the same with a port,
/// `CONNECT <address>:443` and its IPv4-mapped IPv6 spelling are refused, and the sites see
/// nothing, while the same site by its listed name works.
#[tokio::test]
async fn ip_literals_are_refused_over_http_and_connect() {
    let lab = Lab::new("egrip");
    let u = lab.t.user("u");
    let (a, tls) = (lab.net.ip("site-a"), lab.net.ip("tls-site"));
    lab.ops(&u, json!([])).await;
    let before = lab.metrics().await;
    let r = lab
        .ops(
            &u,
            json!([
                {"op": "fetch", "url": format!("http://{a}/ip")},
                {"op": "raw", "data": format!("GET http://{a}:8080/ip8080 HTTP/1.1\r\nHost: {a}:8080\r\nConnection: close\r\n\r\n")},
                {"op": "tunnel", "target": format!("{tls}:443"), "sni": "tls-site.test"},
                {"op": "tunnel", "target": format!("[::ffff:{tls}]:443"), "sni": "tls-site.test"},
                {"op": "fetch", "url": "http://site-a.test/control"},
            ]),
        )
        .await;
    assert!(
        refused_by_proxy(&r[0]),
        "http://{a}/ through the proxy: {}",
        brief(&r[0])
    );
    assert_eq!(
        r[1]["status"],
        403,
        "http://{a}:8080/ through the proxy: {}",
        brief(&r[1])
    );
    assert_eq!(r[2]["connect"], 403, "CONNECT {tls}:443: {}", brief(&r[2]));
    assert!(
        r[3]["connect"] != 200 && r[3]["tls"] != "ok",
        "CONNECT [::ffff:{tls}]:443: {}",
        brief(&r[3])
    );
    assert!(fetched(&r[4], "site-a"), "control: {}", brief(&r[4]));
    settle().await;
    let log = lab.net.log("site-a");
    assert_eq!(
        entries(&log, "REQ"),
        vec!["80 GET /control HTTP/1.1"],
        "site A saw a request by address:\n{log}"
    );
    let log = lab.net.log("tls-site");
    assert!(
        entries(&log, "CONN").is_empty(),
        "the TLS site was reached by address:\n{log}"
    );
    let literal = |m: &str| {
        sample(
            m,
            CONNECTIONS,
            &[("verdict", "refused"), ("reason", "ip_literal")],
        )
    };
    let (n, m) = lab
        .wait_metric(|m| literal(m) - literal(&before), 3.0)
        .await;
    assert!(n >= 3.0, "ip_literal refusals: {n}\n{}", egress_lines(&m));
}

/// Names on the list that resolve, through real DNS (Docker's embedded resolver, which answers
/// container names on the proxy's networks), to a private address, to loopback or to another
/// user's sandbox are refused by the address check, not the list: the site behind its
/// container name, over HTTP and CONNECT; `localhost`; another user's sandbox by its container
/// name, whose server sees nothing from the other user. The same site by its static test name
/// works (static resolutions skip the private-range check; DNS answers never do).
#[tokio::test]
async fn listed_names_resolving_to_private_loopback_or_sandbox_addresses_are_refused() {
    let lab = Lab::with("egraddr", |t, net| {
        let other = t.container_name(&t.user("b"));
        let allow = format!(
            "{POOL_ALLOW},{},{},localhost,{other}:8080",
            net.site("site-a").container,
            net.site("tls-site").container
        );
        t.set("ZCBOT_EGRESS_ALLOW", &allow);
    });
    let (a, b) = (lab.t.user("a"), lab.t.user("b"));
    let site_a = lab.net.site("site-a").container.clone();
    let tls = lab.net.site("tls-site").container.clone();
    let other = lab.t.container_name(&b);
    let blocked = |m: &str| {
        sample(
            m,
            CONNECTIONS,
            &[("verdict", "refused"), ("reason", "blocked_address")],
        )
    };
    let unreachable = |m: &str| {
        blocked(m)
            + sample(
                m,
                CONNECTIONS,
                &[("verdict", "refused"), ("reason", "resolve_failed")],
            )
    };
    lab.ops(&b, json!([])).await;
    lab.ops(&a, json!([])).await;

    // The site by its container name: a private address, through DNS.
    let before = lab.metrics().await;
    let r = lab
        .ops(
            &a,
            json!([
                {"op": "raw", "data": format!("GET http://{site_a}/by-container HTTP/1.1\r\nHost: {site_a}\r\nConnection: close\r\n\r\n")},
                {"op": "tunnel", "target": format!("{tls}:443"), "sni": tls},
                {"op": "fetch", "url": "http://site-a.test/by-static"},
            ]),
        )
        .await;
    assert!(
        r[0]["status"] != 200
            && r[0]["answer"]
                .as_str()
                .is_some_and(|a| body_of_answer(a).starts_with("zcbot egress:")),
        "the site by its container name ({site_a}, a private address through DNS): {}",
        brief(&r[0])
    );
    assert_ne!(
        r[1]["tls"],
        "ok",
        "the TLS site by its container name: {}",
        brief(&r[1])
    );
    assert!(
        fetched(&r[2], "site-a"),
        "control: the same site by its static name: {}",
        brief(&r[2])
    );
    let (n, m) = lab
        .wait_metric(|m| blocked(m) - blocked(&before), 2.0)
        .await;
    assert!(
        n >= 2.0,
        "the container names should be refused as blocked_address: {n}\n{}",
        egress_lines(&m)
    );
    settle().await;
    let log = lab.net.log("site-a");
    assert_eq!(
        entries(&log, "REQ"),
        vec!["80 GET /by-static HTTP/1.1"],
        "{log}"
    );
    let log = lab.net.log("tls-site");
    assert!(entries(&log, "CONN").is_empty(), "{log}");

    // localhost: the proxy's own loopback.
    let before = lab.metrics().await;
    let r = lab
        .ops(
            &a,
            json!([{"op": "raw", "data": "GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"}]),
        )
        .await;
    assert_ne!(r[0]["status"], 200, "localhost: {}", brief(&r[0]));
    let (n, m) = lab
        .wait_metric(|m| unreachable(m) - unreachable(&before), 1.0)
        .await;
    assert!(
        n >= 1.0,
        "localhost should be refused by its address: {}\n{}",
        brief(&r[0]),
        egress_lines(&m)
    );

    // Another user's sandbox by its container name, with a server listening in it.
    let before = lab.metrics().await;
    let server = lab.d().tool(
        &b,
        "shell",
        json!({"command": "cd /tmp && timeout 15 python3 -m http.server 8080 --bind 0.0.0.0 2>&1; true", "timeout": 60}),
    );
    let probes = async {
        // B's server is listening once B itself gets an answer from it.
        let until = Instant::now() + Duration::from_secs(10);
        let own = loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let own = lab.fetch(&b, "http://127.0.0.1:8080/own").await;
            if own["status"] == 404 || Instant::now() > until {
                break own;
            }
        };
        let from_a = lab
            .ops(
                &a,
                json!([{"op": "raw", "data": format!("GET http://{other}:8080/from-a HTTP/1.1\r\nHost: {other}:8080\r\nConnection: close\r\n\r\n")}]),
            )
            .await
            .remove(0);
        (own, from_a)
    };
    let ((status, served), (own, from_a)) = tokio::join!(server, probes);
    assert_eq!(status, 200, "{served}");
    assert_eq!(
        own["status"],
        404,
        "control: B's server answers B directly, so it is listening: {}",
        brief(&own)
    );
    assert_ne!(
        from_a["status"],
        200,
        "A reached B's sandbox through the proxy: {}",
        brief(&from_a)
    );
    let served = served["stdout"].as_str().unwrap_or_default();
    assert!(served.contains("/own"), "control: {served}");
    assert!(
        !served.contains("/from-a"),
        "B's server saw A's request: {served}"
    );
    let (n, m) = lab
        .wait_metric(|m| unreachable(m) - unreachable(&before), 1.0)
        .await;
    assert!(
        n >= 1.0,
        "another user's sandbox should be refused by its address: {}\n{}",
        brief(&from_a),
        egress_lines(&m)
    );
}

/// Nothing leaves a sandbox but through the proxy's port: TCP straight to a site's address (on
/// either port), to the proxy's address on other ports, to the proxy's outbound address and to
/// the internet's gateway all fail, while the proxy's port answers and the same site through the
/// proxy works. The site sees only the proxied connection.
#[tokio::test]
async fn a_sandbox_reaches_nothing_directly_but_the_proxys_port() {
    let lab = Lab::new("egrdirect");
    let u = lab.t.user("u");
    lab.ops(&u, json!([])).await;
    let proxy = lab.proxy_ip(&lab.t.network);
    let outbound = lab.proxy_ip(&lab.net.network);
    let (a, tls) = (lab.net.ip("site-a"), lab.net.ip("tls-site"));
    let targets = [
        (a.to_owned(), 80),
        (a.to_owned(), 8080),
        (tls.to_owned(), 443),
        (proxy.clone(), 80),
        (proxy.clone(), 443),
        (proxy.clone(), 22),
        (outbound.clone(), 3128),
        (lab.net.gateway.clone(), 80),
    ];
    let mut ops: Vec<Value> = targets
        .iter()
        .map(|(host, port)| json!({"op": "direct", "host": host, "port": port}))
        .collect();
    ops.push(json!({"op": "direct", "host": proxy, "port": 3128}));
    ops.push(json!({"op": "fetch", "url": "http://site-a.test/via-proxy"}));
    let r = lab.ops(&u, Value::Array(ops)).await;
    for (i, (host, port)) in targets.iter().enumerate() {
        assert!(
            r[i].as_str().is_some_and(|s| s.starts_with("blocked")),
            "the sandbox reached {host}:{port} directly: {}",
            r[i]
        );
    }
    assert_eq!(
        r[targets.len()],
        "CONNECTED",
        "control: the proxy's port {proxy}:3128"
    );
    assert!(
        fetched(&r[targets.len() + 1], "site-a"),
        "control: the site through the proxy: {}",
        brief(&r[targets.len() + 1])
    );
    settle().await;
    let log = lab.net.log("site-a");
    assert_eq!(
        entries(&log, "CONN"),
        vec![format!("80 {outbound}").as_str()],
        "site A saw more than the proxied connection:\n{log}"
    );
    let log = lab.net.log("tls-site");
    assert!(entries(&log, "CONN").is_empty(), "{log}");
}

/// DNS from an allowlist sandbox answers nothing, as in mode none: neither the test names the
/// proxy knows, nor a public name, nor container names on either side, and the embedded
/// resolver's port is rejected. Only local names work, and the proxy still reaches the sites by
/// name for the sandbox.
#[tokio::test]
async fn dns_from_an_allowlist_sandbox_answers_nothing() {
    let lab = Lab::new("egrdns");
    let u = lab.t.user("u");
    lab.ops(&u, json!([])).await;
    let proxy = lab.proxy_ip(&lab.t.network);
    let names = [
        "tls-site.test".to_owned(),
        "site-a.test".to_owned(),
        "example.com".to_owned(),
        lab.net.site("site-a").container.clone(),
        lab.net.proxy.clone(),
    ];
    let mut ops: Vec<Value> = names
        .iter()
        .map(|n| json!({"op": "resolve", "name": n}))
        .collect();
    ops.push(json!({"op": "resolve", "name": "localhost"}));
    ops.push(json!({"op": "udp", "host": "127.0.0.11", "port": 53}));
    ops.push(json!({"op": "udp", "host": proxy, "port": 53}));
    ops.push(json!({"op": "fetch", "url": "http://site-a.test/named"}));
    let r = lab.ops(&u, Value::Array(ops)).await;
    for (i, name) in names.iter().enumerate() {
        assert!(
            r[i].as_str().is_some_and(|s| s.starts_with("failed")),
            "{name} resolved in the sandbox: {}",
            r[i]
        );
    }
    let n = names.len();
    assert_eq!(
        r[n], "resolved 127.0.0.1",
        "control: local names still resolve"
    );
    assert!(
        r[n + 1].as_str().is_some_and(|s| s.starts_with("blocked")),
        "the embedded resolver answered: {}",
        r[n + 1]
    );
    assert!(
        r[n + 2].as_str().is_some_and(|s| s.starts_with("blocked")),
        "the proxy answered DNS: {}",
        r[n + 2]
    );
    assert!(
        fetched(&r[n + 3], "site-a"),
        "control: the proxy resolves for the sandbox: {}",
        brief(&r[n + 3])
    );
}

/// One user's narrowed policy holds for that user only: B narrowed to site A gets the proxy's
/// 403 for site B while A still reaches site B; B's GET shows the narrowing and B's own counts;
/// the policy survives a daemon restart; a pattern outside the pool's list (a name, a port, a
/// wildcard's apex) is refused with `egress_not_subset` naming it and an unparsable one with
/// `bad_request`, both leaving the policy as it was; a wildcard's subdomain is a subset; DELETE
/// gives B the pool's list back.
#[tokio::test]
async fn a_users_narrowed_policy_holds_for_them_only_survives_a_restart_and_delete_restores_it() {
    let mut lab = Lab::new("egrpolicy");
    let (a, b) = (lab.t.user("a"), lab.t.user("b"));

    let (s, got) = lab.egress("GET", &b, None).await;
    assert_eq!(s, 200, "{got}");
    assert_eq!(got["user"], b.to_string(), "{got}");
    assert_eq!(got["narrowed"], false, "never narrowed: {got}");
    assert_eq!(got["allow"], got["pool"], "never narrowed: {got}");
    let pool = got["pool"].clone();
    for p in POOL_ALLOW.split(',') {
        assert!(
            pool.as_array().is_some_and(|l| l.iter().any(|x| x == p)),
            "{p} missing from the pool's list: {got}"
        );
    }

    let (s, got) = lab
        .egress("PUT", &b, Some(json!({"allow": ["site-a.test"]})))
        .await;
    assert_eq!(s, 200, "{got}");
    assert_eq!(got["user"], b.to_string(), "{got}");
    assert_eq!(got["narrowed"], true, "{got}");
    assert_eq!(got["allow"], json!(["site-a.test"]), "{got}");
    assert_eq!(got["pool"], pool, "{got}");
    for field in [
        &got["connections"]["allowed"],
        &got["connections"]["refused"],
        &got["bytes"]["up"],
        &got["bytes"]["down"],
    ] {
        assert!(field.is_u64(), "the counts are numbers: {got}");
    }

    let rb = lab
        .ops(
            &b,
            json!([
                {"op": "fetch", "url": "http://site-a.test/b-to-a"},
                {"op": "fetch", "url": "http://site-b.test:8080/b-to-b"},
            ]),
        )
        .await;
    assert!(
        fetched(&rb[0], "site-a"),
        "control: B still reaches what B's policy allows: {}",
        brief(&rb[0])
    );
    assert!(
        refused_by_proxy(&rb[1]),
        "B reached site B outside B's narrowed policy: {}",
        brief(&rb[1])
    );
    let ra = lab.fetch(&a, "http://site-b.test:8080/a-to-b").await;
    assert!(
        fetched(&ra, "site-b"),
        "B's policy narrowed A's too: {}",
        brief(&ra)
    );
    settle().await;
    let log = lab.net.log("site-b");
    assert_eq!(
        entries(&log, "REQ"),
        vec!["8080 GET /a-to-b HTTP/1.1"],
        "site B should have seen A's request only:\n{log}"
    );

    // B's own counts, as the proxy reported them.
    let until = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let (s, got) = lab.egress("GET", &b, None).await;
        assert_eq!(s, 200, "{got}");
        let counted = got["connections"]["allowed"].as_u64().unwrap_or(0) >= 1
            && got["connections"]["refused"].as_u64().unwrap_or(0) >= 1
            && got["bytes"]["down"].as_u64().unwrap_or(0) >= 10240;
        if counted || Instant::now() > until {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(got["narrowed"], true, "{got}");
    assert_eq!(got["allow"], json!(["site-a.test"]), "{got}");
    assert!(
        got["connections"]["allowed"].as_u64().unwrap_or(0) >= 1
            && got["connections"]["refused"].as_u64().unwrap_or(0) >= 1,
        "B's connections (one allowed, one refused) are not counted: {got}"
    );
    assert!(
        got["bytes"]["down"].as_u64().unwrap_or(0) >= 10240
            && got["bytes"]["up"].as_u64().unwrap_or(0) > 0,
        "B's bytes (a 10 KiB page down) are not counted: {got}"
    );

    // The policy is kept with B's record: a new daemon (and its proxy) applies it.
    lab.restart();
    let (s, got) = lab.egress("GET", &b, None).await;
    assert_eq!(s, 200, "{got}");
    assert_eq!(
        (&got["narrowed"], &got["allow"]),
        (&json!(true), &json!(["site-a.test"])),
        "B's policy after a restart: {got}"
    );
    let rb = lab
        .ops(
            &b,
            json!([
                {"op": "fetch", "url": "http://site-b.test:8080/b-after-restart"},
                {"op": "fetch", "url": "http://site-a.test/b-a-after-restart"},
            ]),
        )
        .await;
    assert!(
        refused_by_proxy(&rb[0]),
        "after a restart B reached site B: {}",
        brief(&rb[0])
    );
    assert!(fetched(&rb[1], "site-a"), "control: {}", brief(&rb[1]));

    // Refusals leave the policy as it was.
    for (allow, named) in [
        (json!(["evil.test"]), "evil.test"),
        // The pool allows site B on 8080 only; without a port a pattern means 80 and 443.
        (json!(["site-a.test", "site-b.test"]), "site-b.test"),
        // The pool's *.wild.test covers subdomains, not the apex.
        (json!(["wild.test"]), "wild.test"),
    ] {
        let (s, got) = lab.egress("PUT", &b, Some(json!({ "allow": allow }))).await;
        assert_eq!(s, 400, "{allow} is outside the pool's list: {got}");
        assert_eq!(got["error"]["kind"], "egress_not_subset", "{allow}: {got}");
        assert!(
            got["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(named)),
            "the refusal should name {named}: {got}"
        );
    }
    for bad in ["http://site-a.test/", "site-a.test:port", "site a.test"] {
        let (s, got) = lab.egress("PUT", &b, Some(json!({ "allow": [bad] }))).await;
        assert_eq!(s, 400, "{bad:?} is no pattern: {got}");
        assert_eq!(got["error"]["kind"], BAD_PATTERN_KIND, "{bad:?}: {got}");
    }
    let (_, got) = lab.egress("GET", &b, None).await;
    assert_eq!(
        got["allow"],
        json!(["site-a.test"]),
        "a refused PUT changed B's policy: {got}"
    );

    // A wildcard's subdomain is inside the pool's list.
    let (s, got) = lab
        .egress("PUT", &a, Some(json!({"allow": ["x.wild.test"]})))
        .await;
    assert_eq!(s, 200, "a subdomain of the pool's *.wild.test: {got}");
    let ra = lab
        .ops(
            &a,
            json!([
                {"op": "fetch", "url": "http://x.wild.test/a-sub"},
                {"op": "fetch", "url": "http://site-b.test:8080/a-narrowed"},
            ]),
        )
        .await;
    assert!(fetched(&ra[0], "site-a"), "{}", brief(&ra[0]));
    assert!(refused_by_proxy(&ra[1]), "{}", brief(&ra[1]));

    // DELETE: back to the pool's list.
    let (s, got) = lab.egress("DELETE", &b, None).await;
    assert_eq!(s, 200, "{got}");
    assert_eq!(got["narrowed"], false, "{got}");
    assert_eq!(got["allow"], pool, "{got}");
    let (_, got) = lab.egress("GET", &b, None).await;
    assert_eq!(
        (&got["narrowed"], &got["allow"]),
        (&json!(false), &pool),
        "{got}"
    );
    let rb = lab.fetch(&b, "http://site-b.test:8080/b-restored").await;
    assert!(
        fetched(&rb, "site-b"),
        "after DELETE B still cannot reach site B: {}",
        brief(&rb)
    );
}

/// The per-user policy exists only where the pool's egress is an allowlist: elsewhere a PUT says
/// `egress_off` (409) rather than pretending to narrow anything.
#[tokio::test]
async fn the_policy_api_says_egress_off_outside_allowlist_mode() {
    let mut t = TestPool::new("egroff");
    let d = Daemon::start(&mut t);
    let u = t.user("u");
    let (status, _, body) = common::http(
        &d.addr,
        "PUT",
        &format!("/v1/users/{u}/egress"),
        Some(json!({"allow": ["site-a.test"]}).to_string()),
    )
    .await;
    let got: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    assert_eq!(status, 409, "{got}");
    assert_eq!(got["error"]["kind"], "egress_off", "{got}");
}

/// `/metrics` counts each connection once with its verdict and reason, and the bytes each way:
/// one allowed fetch of a 10 KiB page and one refused name give exactly one `allowed`/`ok`, one
/// `refused`/`not_allowed`, at least 10 KiB down and some bytes up.
#[tokio::test]
async fn metrics_count_allowed_and_refused_connections_and_bytes() {
    let lab = Lab::new("egrmetrics");
    let u = lab.t.user("u");
    lab.ops(&u, json!([])).await;
    let count = |m: &str, verdict: &str, reason: &str| {
        sample(m, CONNECTIONS, &[("verdict", verdict), ("reason", reason)])
    };
    let bytes = |m: &str, direction: &str| sample(m, BYTES, &[("direction", direction)]);
    let before = lab.metrics().await;
    let r = lab
        .ops(
            &u,
            json!([
                {"op": "fetch", "url": "http://site-a.test/counted"},
                {"op": "fetch", "url": "http://blocked-site.test/refused"},
            ]),
        )
        .await;
    assert!(fetched(&r[0], "site-a"), "{}", brief(&r[0]));
    assert!(refused_by_proxy(&r[1]), "{}", brief(&r[1]));
    let delta = |m: &str| {
        (
            count(m, "allowed", "ok") - count(&before, "allowed", "ok"),
            count(m, "refused", "not_allowed") - count(&before, "refused", "not_allowed"),
            bytes(m, "down") - bytes(&before, "down"),
            bytes(m, "up") - bytes(&before, "up"),
        )
    };
    lab.wait_metric(
        |m| {
            let (allowed, refused, down, _) = delta(m);
            if allowed >= 1.0 && refused >= 1.0 && down >= 10240.0 {
                1.0
            } else {
                0.0
            }
        },
        1.0,
    )
    .await;
    // Nothing else may arrive late and be counted twice.
    settle().await;
    let m = lab.metrics().await;
    let (allowed, refused, down, up) = delta(&m);
    let seen = egress_lines(&m);
    assert_eq!(allowed, 1.0, "allowed/ok for one fetch:\n{seen}");
    assert_eq!(
        refused, 1.0,
        "refused/not_allowed for one name off the list:\n{seen}"
    );
    assert!(
        down >= 10240.0,
        "bytes down for a 10 KiB page: {down}\n{seen}"
    );
    assert!(up > 0.0, "bytes up for a request: {up}\n{seen}");
}

/// The attack suite's key escape still fails with an allowlist: the host, at the sandbox
/// network's gateway, at its primary address and at the internet's gateway (the proxy's side),
/// is reached neither directly (TCP or UDP) nor through the proxy by address, and its listeners
/// see nothing.
#[tokio::test]
async fn the_host_stays_unreachable_from_an_allowlist_sandbox_directly_and_through_the_proxy() {
    let lab = Lab::new("egrhost");
    let u = lab.t.user("u");
    lab.ops(&u, json!([])).await;
    let mut targets: Vec<IpAddr> = vec![
        gateway_of(&lab.t.network).parse().unwrap(),
        lab.net.gateway.parse().unwrap(),
    ];
    targets.extend(zcbot_sandbox::smoke::primary_address());
    for ip in targets {
        let (port, hits, task) = common::host_listener(ip).await;
        let hostport = SocketAddr::new(ip, port).to_string();
        let udp = tokio::net::UdpSocket::bind(SocketAddr::new(ip, 0))
            .await
            .unwrap();
        let uport = udp.local_addr().unwrap().port();
        let r = lab
            .ops(
                &u,
                json!([
                    {"op": "direct", "host": ip.to_string(), "port": port},
                    {"op": "tunnel", "target": hostport, "sni": "tls-site.test"},
                    {"op": "raw", "data": format!("GET http://{hostport}/ HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n")},
                    {"op": "udp", "host": ip.to_string(), "port": uport},
                ]),
            )
            .await;
        assert!(
            r[0].as_str().is_some_and(|s| s.starts_with("blocked")),
            "TCP to the host at {hostport}: {}",
            r[0]
        );
        assert_ne!(
            r[1]["connect"],
            200,
            "CONNECT to the host at {hostport}: {}",
            brief(&r[1])
        );
        assert!(
            r[2]["status"] != 200
                && r[2]["answer"]
                    .as_str()
                    .is_some_and(|a| body_of_answer(a).starts_with("zcbot egress:")),
            "GET through the proxy to the host at {hostport}: {}",
            brief(&r[2])
        );
        let mut buf = [0u8; 64];
        let got = tokio::time::timeout(Duration::from_millis(500), udp.recv_from(&mut buf)).await;
        assert!(
            got.is_err(),
            "UDP from the sandbox reached the host at {ip} ({})",
            r[3]
        );
        assert_eq!(
            hits.load(Ordering::SeqCst),
            0,
            "the host's listener at {hostport} was reached"
        );
        task.abort();
    }
}

/// An operator's CLI command beside the daemon (`ps`, `exec`, ...) opens the pool as a guest: it
/// uses the daemon's proxy as it is. It must not replace it (a new address for every sandbox)
/// or clear its table (every tenant refused as unknown), and its own calls still get out.
#[tokio::test]
async fn a_cli_command_beside_the_daemon_leaves_the_daemons_proxy_and_table_alone() {
    let lab = Lab::new("egrguest");
    let (a, b) = (lab.t.user("a"), lab.t.user("b"));
    let r = lab.fetch(&a, "http://site-a.test/before").await;
    assert!(fetched(&r, "site-a"), "the control fetch failed: {r}");
    let proxy_id = common::docker(&["inspect", "-f", "{{.Id}}", &lab.net.proxy]);

    let mut cfg = lab.t.config();
    cfg.backend = zcbot_sandbox::config::Backend::Docker;
    let guest = zcbot_sandbox::exec::Executor::guest(cfg).await.unwrap();
    let pool = guest.pool().unwrap();
    assert!(!pool.list().await.unwrap().is_empty(), "ps saw nothing");
    let code = "import urllib.request\nprint(urllib.request.urlopen('http://site-a.test/guest', timeout=30).status)";
    let r = guest
        .run_argv(
            &b,
            vec!["python3".into(), "-c".into(), code.into()],
            None,
            None,
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        r.stdout.trim(),
        "200",
        "the guest's own call got no way out: {r:?}"
    );
    drop(guest);

    assert_eq!(
        common::docker(&["inspect", "-f", "{{.Id}}", &lab.net.proxy]),
        proxy_id,
        "the CLI replaced the daemon's proxy"
    );
    let r = lab.fetch(&a, "http://site-a.test/after").await;
    assert!(
        fetched(&r, "site-a"),
        "the daemon's tenant lost its way out after a CLI command: {r}"
    );
}

/// A sandbox container that is started again under its id (here restarted behind the pool's
/// back) may come back at another address: its next call registers that address, instead of
/// going out as nobody (or as whoever had that address before).
#[tokio::test]
async fn a_sandbox_restarted_at_another_address_is_registered_again() {
    let lab = Lab::new("egrrestart");
    let a = lab.t.user("a");
    let r = lab.fetch(&a, "http://site-a.test/before").await;
    assert!(fetched(&r, "site-a"), "the control fetch failed: {r}");
    let sandbox = lab.t.container_name(&a);
    let before = ip_on(&sandbox, &lab.t.network);
    // Docker hands out addresses in turn: a placeholder takes the freed one, so the restarted
    // sandbox gets another.
    common::docker(&["stop", "-t", "0", &sandbox]);
    let placeholder = format!("{}-placeholder", lab.t.pool_id);
    let image = lab.t.config().image;
    common::docker(&[
        "run",
        "-d",
        "--name",
        &placeholder,
        "--network",
        &lab.t.network,
        "--entrypoint",
        "sleep",
        &image,
        "60",
    ]);
    common::docker(&["start", &sandbox]);
    let after = ip_on(&sandbox, &lab.t.network);
    common::docker(&["rm", "-f", &placeholder]);
    assert_ne!(
        before, after,
        "the restarted sandbox kept its address: nothing is tested"
    );
    let r = lab.fetch(&a, "http://site-a.test/after").await;
    assert!(
        fetched(&r, "site-a"),
        "the sandbox at its new address {after} was not registered: {r}"
    );
}

/// The startup self-check's probe sandbox is an allowlist sandbox too, and its escapes (the host
/// through the gateway and its own address, the metadata address) must fail for the daemon to
/// start: it starts, and says the check passed.
#[tokio::test]
async fn the_startup_self_check_passes_in_allowlist_mode() {
    let mut t = TestPool::new("egrself");
    require_egress_image();
    t.set("ZCBOT_SANDBOX_EGRESS", "allowlist")
        .set("ZCBOT_EGRESS_ALLOW", "example.org")
        .set("ZCBOT_SANDBOX_BACKEND", "docker")
        .set("ZCBOT_LISTEN", "127.0.0.1:0")
        .set("ZCBOT_SELF_CHECK", "1");
    let (child, addr) = common::spawn_daemon(t.env());
    let d = Daemon { child, addr };
    let (status, _, body) = common::http(&d.addr, "GET", "/readyz", None).await;
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["states"]["self_check"], "ok", "{body}");
}
