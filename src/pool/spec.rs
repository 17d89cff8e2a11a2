//! The container spec of one user's sandbox, its labels, and the config hash that detects drift.
//!
//! The hash covers everything that shapes the container (image id, limits, mounts, network, egress
//! rules): a container whose recorded hash differs from today's is stale and gets recreated.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, HostConfigCgroupnsModeEnum,
    HostConfigLogConfig, Mount, MountBindOptions, MountBindOptionsPropagationEnum, MountType,
    NetworkingConfig,
};
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::config::{Config, Runtime, Seccomp};
use crate::seccomp::Netfilter;
use crate::user::UserId;
use crate::users_root::UserFolder;

/// Label that marks a container as made by zcbot-sandbox.
pub const LABEL_MANAGED_BY: &str = "io.zcbot.managed-by";
/// The value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "zcbot-sandbox";
/// Label with the pool id (`ZCBOT_POOL_ID`): a pool only touches containers with its own id.
pub const LABEL_POOL: &str = "io.zcbot.pool";
/// Label with the user id the container belongs to.
pub const LABEL_USER: &str = "io.zcbot.user";
/// Label with the config hash the container was created with.
pub const LABEL_CONFIG_HASH: &str = "io.zcbot.config-hash";
/// Label with the tenant's `uid:gid` (in the hash: a new uid means a new container).
pub const LABEL_UID: &str = "io.zcbot.uid";
/// Label of a warm spare (a sandbox made before its user is known), with the name of its
/// workspace slot (see [`super::mounts`]). It stays after a claim: labels cannot change.
pub const LABEL_SPARE: &str = "io.zcbot.spare";
/// Prefix of a warm spare's name before its claim: not [`NAME_PREFIX`], so no spare name can
/// ever be a user's.
pub const SPARE_NAME_PREFIX: &str = "zcbot-spare-";
/// Label with the creation time (RFC 3339, UTC).
pub const LABEL_CREATED_AT: &str = "io.zcbot.created-at";
/// Prefix of every sandbox container's name.
pub const NAME_PREFIX: &str = "zcbot-sandbox-";
/// Where the user's folder is mounted inside the container.
pub const WORKSPACE: &str = "/workspace";
/// The line the container's entry prints once its egress rules are in place.
pub const READY_MARKER: &str = "zcbot-entry: ready";

/// Ranges a sandbox must never reach, whatever the egress policy: private, loopback, link-local
/// (including the cloud metadata address), CGNAT, documentation, benchmarking, multicast and
/// reserved ranges for IPv4 and IPv6, and the IPv6 forms that can carry IPv4 (mapped, NAT64, 6to4).
pub const DEFAULT_BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/23",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// The container name of `user` in pool `pool_id`. The default pool uses `zcbot-sandbox-<user>`;
/// another pool uses `zcbot-sandbox-<pool>.<user>`, which cannot collide because neither ids
/// may contain a '.'.
pub fn container_name(pool_id: &str, user: &UserId) -> String {
    if pool_id == "default" {
        format!("{NAME_PREFIX}{user}")
    } else {
        format!("{NAME_PREFIX}{pool_id}.{user}")
    }
}

/// The name of pool `pool_id`'s spare in workspace slot `token` until its claim.
pub fn spare_name(pool_id: &str, token: &str) -> String {
    format!("{SPARE_NAME_PREFIX}{pool_id}.{token}")
}

/// What stands for a spare's slot path in its config hash: every spare of a config has one hash.
const SLOT_IN_HASH: &str = "<workspace slot>";

/// The full blocklist: the defaults, the host's own addresses not already covered, then
/// `ZCBOT_PG_IPS` and `ZCBOT_SANDBOX_BLOCK_CIDRS`. Sorted and without duplicates, so the config
/// hash stays the same while the inputs do.
pub fn blocklist(config: &Config, host_addrs: &[IpAddr]) -> Vec<IpNet> {
    let defaults: Vec<IpNet> = DEFAULT_BLOCKED
        .iter()
        .map(|s| s.parse().expect("built-in CIDR"))
        .collect();
    let mut out: BTreeSet<IpNet> = defaults.iter().copied().collect();
    let extra = host_addrs
        .iter()
        .map(|a| IpNet::from(*a))
        .chain(config.pg_ips.iter().copied())
        .chain(config.block_cidrs.iter().copied());
    for net in extra {
        if !defaults.iter().any(|d| d.contains(&net)) {
            out.insert(net);
        }
    }
    out.into_iter().collect()
}

/// The addresses of this host's interfaces (the pool blocks them so a sandbox cannot reach host
/// services through the host's primary address).
pub fn host_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        tracing::warn!("could not list the host's addresses; only the built-in ranges are blocked");
        return Vec::new();
    };
    let mut out = BTreeSet::new();
    for ifa in addrs {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.insert(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.insert(IpAddr::V6(v6.ip()));
        }
    }
    out.into_iter().collect()
}

/// Everything that goes into one user's container, computed once per pool.
#[derive(Debug, Clone)]
pub struct SpecTemplate {
    /// The image id (not the tag), so the container runs exactly the image in its hash.
    pub image_id: String,
    /// The ranges the entry rejects.
    pub blocked: Vec<IpNet>,
    /// Who installs the container's own rules.
    pub rules: RulesMode,
    /// The seccomp profile (JSON) applied inline, or `None` for the engine's default profile.
    pub seccomp: Option<String>,
    /// Allowlist mode: the egress proxy's address, the one a sandbox may reach (in the hash: a
    /// proxy at a new address means new sandboxes).
    pub proxy: Option<std::net::SocketAddr>,
}

/// Who installs a container's own egress rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RulesMode {
    /// The daemon, from the host, inside the container's network namespace: the container holds
    /// no capability at all.
    Host,
    /// The container's entry, which therefore keeps NET_ADMIN (an unprivileged daemon's fallback).
    Entry,
}

impl std::fmt::Display for RulesMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RulesMode::Host => "installed from the host (containers hold no capability)",
            RulesMode::Entry => "installed by each container's entry (containers keep NET_ADMIN)",
        })
    }
}

impl SpecTemplate {
    /// The seccomp profile a pool with `config` and `rules` applies (`None`: the engine's).
    pub fn seccomp_profile(config: &Config, rules: RulesMode) -> Option<String> {
        let netfilter = match rules {
            RulesMode::Host => Netfilter::Refused,
            RulesMode::Entry => Netfilter::ForEntry,
        };
        match config.seccomp {
            Seccomp::Zcbot => Some(crate::seccomp::profile(netfilter, config.runtime).to_string()),
            Seccomp::Default => None,
        }
    }

    /// The create body for `user` and its config hash. `folder` is the user's host folder and
    /// the uid that owns it.
    pub fn build(
        &self,
        config: &Config,
        user: &UserId,
        folder: &UserFolder,
    ) -> (ContainerCreateBody, String) {
        let labels = HashMap::from([
            (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (LABEL_POOL.to_owned(), config.pool_id.clone()),
            (LABEL_USER.to_owned(), user.to_string()),
            (
                LABEL_UID.to_owned(),
                format!("{}:{}", folder.uid, folder.gid),
            ),
        ]);
        let body = self.body(config, labels, workspace_mount(&folder.path, None));
        let hash = config_hash(&body);
        (body, hash)
    }

    /// The config hash every spare of this config has (and keeps once claimed).
    pub fn spare_hash(&self, config: &Config) -> String {
        self.build_spare(config, std::path::Path::new(SLOT_IN_HASH), "")
            .1
    }

    /// The create body of a warm spare whose `/workspace` is the host folder `slot`, received
    /// `rslave`: a user folder the host later binds onto the slot appears inside, and nothing
    /// mounted inside reaches the host. Its hash leaves out the slot and the token, so all
    /// spares of a config share it.
    pub fn build_spare(
        &self,
        config: &Config,
        slot: &std::path::Path,
        token: &str,
    ) -> (ContainerCreateBody, String) {
        let labels = HashMap::from([
            (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (LABEL_POOL.to_owned(), config.pool_id.clone()),
        ]);
        let propagation = Some(MountBindOptionsPropagationEnum::RSLAVE);
        let mut body = self.body(
            config,
            labels,
            workspace_mount(std::path::Path::new(SLOT_IN_HASH), propagation),
        );
        let hash = config_hash(&body);
        if let Some(hc) = body.host_config.as_mut() {
            hc.mounts = Some(vec![workspace_mount(slot, propagation)]);
        }
        if let Some(labels) = body.labels.as_mut() {
            labels.insert(LABEL_SPARE.to_owned(), token.to_owned());
        }
        (body, hash)
    }

    fn body(
        &self,
        config: &Config,
        labels: HashMap<String, String>,
        workspace: Mount,
    ) -> ContainerCreateBody {
        let mut cmd = vec!["--egress".to_owned(), config.egress.as_str().to_owned()];
        if self.rules == RulesMode::Host {
            cmd.push("--rules-by-host".to_owned());
        }
        if let Some(proxy) = self.proxy {
            cmd.push("--proxy".to_owned());
            cmd.push(proxy.to_string());
        }
        for net in &self.blocked {
            cmd.push("--block".to_owned());
            cmd.push(net.to_string());
        }
        let host_config = HostConfig {
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_owned(),
                format!("rw,nosuid,nodev,size={},mode=1777", config.tmpfs_bytes),
            )])),
            mounts: Some(vec![workspace]),
            // No capability when the host installs the rules; otherwise only NET_ADMIN, which the
            // entry (root) needs. Every exec names the unprivileged user, whose sets are empty.
            cap_drop: Some(vec!["ALL".to_owned()]),
            cap_add: match self.rules {
                RulesMode::Host => None,
                RulesMode::Entry => Some(vec!["NET_ADMIN".to_owned()]),
            },
            security_opt: Some(security_opt(self.seccomp.as_deref())),
            runtime: Some(config.runtime.as_str().to_owned()),
            pids_limit: Some(host_pids_limit(config)),
            memory: Some(config.memory_bytes),
            memory_swap: Some(config.memory_bytes),
            nano_cpus: Some((config.cpus * 1e9).round() as i64),
            network_mode: Some(config.network_name()),
            ipc_mode: Some("private".to_owned()),
            // Docker 20.10 on cgroup v1 shares the host's cgroup namespace by default, which
            // shows host cgroup paths (and other containers' ids) inside.
            cgroupns_mode: Some(HostConfigCgroupnsModeEnum::PRIVATE),
            privileged: Some(false),
            // The sandbox, not the host, is what the kernel kills first under memory pressure.
            oom_score_adj: Some(500),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".to_owned()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), "1m".to_owned()),
                    ("max-file".to_owned(), "1".to_owned()),
                ])),
            }),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(self.image_id.clone()),
            cmd: Some(cmd),
            hostname: Some("sandbox".to_owned()),
            working_dir: Some(WORKSPACE.to_owned()),
            labels: Some(labels),
            host_config: Some(host_config),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    config.network_name(),
                    EndpointSettings::default(),
                )])),
            }),
            ..Default::default()
        }
    }
}

/// The security options of every container the pool runs (sandboxes and the egress proxy):
/// no-new-privileges, and the seccomp profile inline (`None`: the engine's).
pub(crate) fn security_opt(seccomp: Option<&str>) -> Vec<String> {
    std::iter::once("no-new-privileges:true".to_owned())
        .chain(seccomp.map(|p| format!("seccomp={p}")))
        .collect()
}

/// The `/workspace` bind mount of `source`.
fn workspace_mount(
    source: &std::path::Path,
    propagation: Option<MountBindOptionsPropagationEnum>,
) -> Mount {
    Mount {
        target: Some(WORKSPACE.to_owned()),
        source: Some(source.display().to_string()),
        typ: Some(MountType::BIND),
        read_only: Some(false),
        bind_options: propagation.map(|p| MountBindOptions {
            propagation: Some(p),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Host tasks per process inside gVisor (ptrace platform): a stub process and its threads on the
/// host for every process inside, and the kernel's own threads for those that run at once.
/// Measured here: 160 sleeping processes took 1320 host tasks (8.25 each) over the 38 of an idle
/// sandbox; 64 concurrent calls (about 200 running processes) reached 2368.
const RUNSC_TASKS_PER_PROCESS: i64 = 12;
/// Host tasks of an idle gVisor sandbox (its kernel's and its file proxy's threads), rounded up.
const RUNSC_BASE_TASKS: i64 = 64;

/// The container's pids limit. Under runc it is `ZCBOT_SANDBOX_PIDS` itself; under runsc the
/// pids cgroup counts gVisor's host threads, not the tenant's processes, and a limit reached
/// there crashes the sandbox's kernel: the limit is scaled so that about `ZCBOT_SANDBOX_PIDS`
/// processes fit inside.
pub fn host_pids_limit(config: &Config) -> i64 {
    match config.runtime {
        Runtime::Runc => config.pids,
        Runtime::Runsc => config
            .pids
            .saturating_mul(RUNSC_TASKS_PER_PROCESS)
            .saturating_add(RUNSC_BASE_TASKS),
    }
}

/// sha256 over the canonical JSON of the create body (serde_json sorts object keys), which holds
/// the image id, limits, mounts, network and rules: any change to them changes the hash.
pub fn config_hash(body: &ContainerCreateBody) -> String {
    let value = serde_json::to_value(body).expect("a create body always serializes");
    let digest = Sha256::digest(value.to_string().as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::from_lookup(|_| None).unwrap()
    }

    fn folder(path: &str, uid: u32) -> UserFolder {
        UserFolder {
            path: path.into(),
            uid,
            gid: uid,
        }
    }

    fn template() -> SpecTemplate {
        SpecTemplate {
            image_id: "sha256:abc".into(),
            blocked: blocklist(&cfg(), &[]),
            rules: RulesMode::Entry,
            seccomp: SpecTemplate::seccomp_profile(&cfg(), RulesMode::Entry),
            proxy: None,
        }
    }

    #[test]
    fn names_never_collide_across_pools() {
        let u = UserId::parse("a-b").unwrap();
        assert_eq!(container_name("default", &u), "zcbot-sandbox-a-b");
        assert_eq!(container_name("p1", &u), "zcbot-sandbox-p1.a-b");
    }

    #[test]
    fn hash_is_stable_and_tracks_what_matters() {
        let c = cfg();
        let u = UserId::parse("alice").unwrap();
        let ws = &folder("/srv/users/alice", 200_001);
        let (_, h1) = template().build(&c, &u, ws);
        let (_, h2) = template().build(&c, &u, ws);
        assert_eq!(h1, h2, "same inputs, same hash");

        let mut c2 = c.clone();
        c2.memory_bytes *= 2;
        assert_ne!(h1, template().build(&c2, &u, ws).1, "memory limit");
        let mut t = template();
        t.image_id = "sha256:def".into();
        assert_ne!(h1, t.build(&c, &u, ws).1, "image id");
        assert_ne!(
            h1,
            template().build(&c, &u, &folder("/elsewhere", 200_001)).1,
            "mount"
        );
        assert_ne!(
            h1,
            template()
                .build(&c, &u, &folder("/srv/users/alice", 200_002))
                .1,
            "uid"
        );
        let mut t = template();
        t.blocked.push("8.8.8.8/32".parse().unwrap());
        assert_ne!(h1, t.build(&c, &u, ws).1, "rules");
        let mut c2 = c.clone();
        c2.runtime = Runtime::Runsc;
        assert_ne!(h1, template().build(&c2, &u, ws).1, "runtime");
        let mut t = template();
        t.seccomp = None;
        assert_ne!(h1, t.build(&c, &u, ws).1, "seccomp profile");
    }

    #[test]
    fn blocklist_adds_only_uncovered_host_addresses() {
        let mut c = cfg();
        c.pg_ips = vec![
            "10.9.9.9/32".parse().unwrap(),
            "8.8.4.4/32".parse().unwrap(),
        ];
        let host: Vec<IpAddr> = vec![
            "172.17.0.1".parse().unwrap(),
            "198.100.1.1".parse().unwrap(),
        ];
        let list = blocklist(&c, &host);
        assert!(list.contains(&"198.100.1.1/32".parse().unwrap()));
        assert!(list.contains(&"8.8.4.4/32".parse().unwrap()));
        assert!(!list.contains(&"172.17.0.1/32".parse().unwrap()));
        assert!(!list.contains(&"10.9.9.9/32".parse().unwrap()));
        assert!(list.contains(&"169.254.0.0/16".parse().unwrap()));
    }

    #[test]
    fn spec_is_hardened() {
        let (body, _) = template().build(
            &cfg(),
            &UserId::parse("bob").unwrap(),
            &folder("/srv/bob", 200_003),
        );
        let hc = body.host_config.unwrap();
        assert_eq!(hc.readonly_rootfs, Some(true));
        assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(hc.cap_add, Some(vec!["NET_ADMIN".to_owned()]));
        assert_eq!(hc.memory, hc.memory_swap);
        assert!(hc.binds.is_none());
        assert!(hc.pid_mode.is_none() && hc.userns_mode.is_none());
        assert_eq!(hc.cgroupns_mode, Some(HostConfigCgroupnsModeEnum::PRIVATE));
        assert!(hc.tmpfs.unwrap()["/tmp"].contains("nosuid"));
        let opts = hc.security_opt.unwrap();
        assert!(opts.contains(&"no-new-privileges:true".to_owned()));
        let profile = opts
            .iter()
            .find_map(|o| o.strip_prefix("seccomp="))
            .unwrap();
        let profile: serde_json::Value = serde_json::from_str(profile).unwrap();
        assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(hc.runtime.as_deref(), Some("runc"));
    }
}
