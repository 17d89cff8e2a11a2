//! Resolving destination names and checking the addresses, then connecting.
//!
//! Why this shape: an allowed name can point anywhere (the daemon's host, the sandboxes'
//! network, cloud metadata), and DNS answers can change between a check and a connect. So the
//! proxy resolves once per connection, refuses if ANY answer is blocked, and connects only to the
//! addresses it checked. Hickory's answer cache is off (size 0), so no answer outlives the
//! connection that asked for it. Names are queried fully qualified (no search domains), and
//! `/etc/hosts` is not consulted: the container's own names must not resolve.
//!
//! Operator overrides (`resolve` in the config) replace DNS for a name and skip the check.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, ResolveHosts};
use hickory_resolver::TokioResolver;
use ipnet::IpNet;
use tokio::net::TcpStream;

use crate::protocol::{ProxyConfig, Reason};

/// Most addresses tried for one connection.
const MAX_ADDRS: usize = 16;

/// Name → checked addresses, and connecting.
pub struct Resolver {
    overrides: HashMap<String, Vec<IpAddr>>,
    blocked: Vec<IpNet>,
    host_addrs: Vec<IpAddr>,
    dns: Option<TokioResolver>,
    dns_timeout: Duration,
    connect_timeout: Duration,
}

/// Why no connection to the destination was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// DNS gave no usable answer (or there is no DNS).
    Failed,
    /// An answer is in a blocked range or a host address.
    Blocked(IpAddr),
    /// No address accepted a connection in time.
    Connect,
}

impl ResolveError {
    /// The reason reported for it.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Failed => Reason::ResolveFailed,
            Self::Blocked(_) => Reason::BlockedAddress,
            Self::Connect => Reason::ConnectFailed,
        }
    }
}

/// Build hickory's resolver from `/etc/resolv.conf`, cache off, hosts file ignored.
pub fn system_dns(timeout: Duration) -> Result<TokioResolver, String> {
    let mut builder = TokioResolver::builder_tokio()
        .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?;
    let opts = builder.options_mut();
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.timeout = timeout;
    opts.attempts = 1;
    builder
        .build()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

impl Resolver {
    /// From the config; `dns` None means only the overrides resolve.
    pub fn new(config: &ProxyConfig, dns: Option<TokioResolver>) -> Self {
        let mut overrides: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for entry in &config.resolve {
            // Validated with the config; an invalid one simply never matches.
            if let Ok(name) = crate::pattern::normalize_host(&entry.name) {
                overrides.entry(name).or_default().push(entry.ip);
            }
        }
        Self {
            overrides,
            blocked: config.blocked.clone(),
            host_addrs: config.host_addrs.iter().map(|a| a.to_canonical()).collect(),
            dns,
            dns_timeout: Duration::from_millis(config.dns_timeout_ms),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
        }
    }

    /// Is `ip` one a DNS answer may not point to? Unspecified addresses (`0.0.0.0/8`, `::`)
    /// always are; IPv4-mapped IPv6 addresses are checked as the IPv4 address too.
    pub fn address_blocked(&self, ip: IpAddr) -> bool {
        let canon = ip.to_canonical();
        [ip, canon].iter().any(|a| {
            let always = match a {
                IpAddr::V4(v4) => v4.octets()[0] == 0,
                IpAddr::V6(v6) => *v6 == Ipv6Addr::UNSPECIFIED,
            };
            always || self.host_addrs.contains(a) || self.blocked.iter().any(|net| net.contains(a))
        })
    }

    /// The addresses to try for `host` (normalised), all checked. Overrides skip the check.
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        if let Some(addrs) = self.overrides.get(host) {
            return Ok(addrs.clone());
        }
        let dns = self.dns.as_ref().ok_or(ResolveError::Failed)?;
        let fqdn = format!("{host}.");
        let answer = tokio::time::timeout(self.dns_timeout, dns.lookup_ip(fqdn.as_str()))
            .await
            .map_err(|_| ResolveError::Failed)?
            .map_err(|_| ResolveError::Failed)?;
        let addrs: Vec<IpAddr> = answer.iter().collect();
        self.check(addrs)
    }

    /// Refuse the whole answer if any address is blocked; IPv4 first, at most 16.
    pub fn check(&self, mut addrs: Vec<IpAddr>) -> Result<Vec<IpAddr>, ResolveError> {
        if addrs.is_empty() {
            return Err(ResolveError::Failed);
        }
        if let Some(bad) = addrs.iter().find(|a| self.address_blocked(**a)) {
            return Err(ResolveError::Blocked(*bad));
        }
        addrs.sort_by_key(|a| !a.is_ipv4());
        addrs.dedup();
        addrs.truncate(MAX_ADDRS);
        Ok(addrs)
    }

    /// Resolve `host`, then connect to its checked addresses in turn, all within the connect
    /// timeout.
    pub async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, ResolveError> {
        let addrs = self.resolve(host).await?;
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        for ip in addrs {
            let addr = SocketAddr::new(ip, port);
            match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(_)) => continue,
                Err(_) => break,
            }
        }
        Err(ResolveError::Connect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::StaticAddr;

    fn resolver() -> Resolver {
        let cfg = ProxyConfig {
            resolve: vec![StaticAddr {
                name: "Allowed.test".into(),
                ip: "127.0.0.1".parse().unwrap(),
            }],
            blocked: vec![
                "127.0.0.0/8".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
                "fc00::/7".parse().unwrap(),
            ],
            host_addrs: vec!["172.17.0.1".parse().unwrap()],
            ..ProxyConfig::default()
        };
        Resolver::new(&cfg, None)
    }

    #[test]
    fn blocked_addresses() {
        let r = resolver();
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.17.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:172.17.0.1",
            "fd00::1",
        ] {
            assert!(r.address_blocked(bad.parse().unwrap()), "{bad}");
        }
        for good in [
            "93.184.216.34",
            "172.17.0.2",
            "2001:db8::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(!r.address_blocked(good.parse().unwrap()), "{good}");
        }
    }

    #[test]
    fn any_blocked_answer_refuses_all() {
        let r = resolver();
        let ips = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse().unwrap())
                .collect::<Vec<IpAddr>>()
        };
        assert_eq!(
            r.check(ips(&["93.184.216.34", "127.0.0.1"])),
            Err(ResolveError::Blocked("127.0.0.1".parse().unwrap()))
        );
        assert_eq!(r.check(vec![]), Err(ResolveError::Failed));
        assert_eq!(
            r.check(ips(&["2001:db8::1", "93.184.216.34"])).unwrap(),
            ips(&["93.184.216.34", "2001:db8::1"])
        );
    }

    #[tokio::test]
    async fn overrides_skip_the_check_and_dns_is_optional() {
        let r = resolver();
        assert_eq!(
            r.resolve("allowed.test").await.unwrap(),
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(r.resolve("other.test").await, Err(ResolveError::Failed));
    }
}
