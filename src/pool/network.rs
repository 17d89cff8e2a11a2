//! The sandbox network: an internal bridge with inter-container traffic off and a stable bridge
//! interface name (the host firewall matches on it).
//!
//! Creation is idempotent and converges under races. API 1.41 only refuses a duplicate network
//! name when asked to (CheckDuplicate, which bollard's models no longer carry), but the engine
//! always refuses a second network with the same bridge interface name (403 "networks have same
//! bridge name"), and our bridge name is derived from the network name: so of two concurrent
//! creators one wins and the other is told so, and then uses the winner's network. As a second
//! line, after creating, the pool lists the networks of that name; if there are several (another
//! tool made one with another bridge name meanwhile), the oldest wins and the loser removes its own.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::engine::{Created, Engine, Network, NetworkSpec};
use crate::error::{Error, Result};
use crate::pool::spec::{LABEL_MANAGED_BY, LABEL_POOL, MANAGED_BY};

const OPT_ICC: &str = "com.docker.network.bridge.enable_icc";
const OPT_BRIDGE: &str = "com.docker.network.bridge.name";

/// What the pool knows of its network once it is ensured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNetwork {
    /// Docker's network id.
    pub id: String,
    /// The network's name.
    pub name: String,
    /// The host-side bridge interface name.
    pub bridge: String,
    /// The IPv4 subnet Docker chose, e.g. "172.18.0.0/16".
    pub subnet: Option<String>,
    /// The bridge's address on that subnet (the host as seen from a sandbox).
    pub gateway: Option<String>,
}

/// The bridge interface name for a network: "zcb-" and 10 hex digits of the name's sha256, so it
/// is stable across restarts, unique per network name, and within Linux's 15 characters.
pub fn bridge_name(network: &str) -> String {
    let digest = Sha256::digest(network.as_bytes());
    let hex: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("zcb-{hex}")
}

/// Makes sure the network `name` exists as a bridge with ICC off and our bridge name, internal
/// unless `internal` is false (the `public` egress policy). An existing network with other
/// settings is refused with [`Error::NetworkMismatch`]. One it creates carries the pool's label,
/// as its containers do, so that `zcbot-sandbox down` knows it is the pool's to remove.
pub async fn ensure_network(
    engine: &dyn Engine,
    name: &str,
    internal: bool,
    pool_id: &str,
) -> Result<SandboxNetwork> {
    if let Some(found) = engine.networks_named(name).await?.into_iter().next() {
        return verify(found, name, internal);
    }
    let spec = NetworkSpec {
        name: name.to_owned(),
        internal,
        options: HashMap::from([
            (OPT_ICC.to_owned(), "false".to_owned()),
            (OPT_BRIDGE.to_owned(), bridge_name(name)),
        ]),
        labels: HashMap::from([
            (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (LABEL_POOL.to_owned(), pool_id.to_owned()),
        ]),
    };
    // NameTaken: a concurrent creator won the race (the name, or our bridge name).
    let mine = match engine.create_network(&spec).await? {
        Created::Created(id) => Some(id),
        Created::NameTaken => None,
    };
    let winner = resolve_duplicates(engine, name, mine.as_deref()).await?;
    verify(winner, name, internal)
}

/// With several networks of one name, keeps the oldest and removes `mine` if it lost.
async fn resolve_duplicates(
    engine: &dyn Engine,
    name: &str,
    mine: Option<&str>,
) -> Result<Network> {
    let winner = engine
        .networks_named(name)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| Error::NetworkMismatch {
            name: name.to_owned(),
            reason: "vanished right after it was created (another process removed it)".to_owned(),
        })?;
    if let Some(mine) = mine {
        if winner.id != mine {
            tracing::info!(
                network = name,
                "another process created the network first; using theirs"
            );
            if let Err(e) = engine.remove_network(mine).await {
                tracing::warn!(network = name, error = %e, "could not remove our duplicate network");
            }
        }
    }
    Ok(winner)
}

fn verify(n: Network, name: &str, internal: bool) -> Result<SandboxNetwork> {
    let mismatch = |reason: String| Error::NetworkMismatch {
        name: name.to_owned(),
        reason,
    };
    if n.driver != "bridge" {
        return Err(mismatch(format!("uses driver {:?}, not bridge", n.driver)));
    }
    if internal && !n.internal {
        return Err(mismatch(
            "is not internal (sandboxes would reach outside)".to_owned(),
        ));
    }
    if !internal && n.internal {
        return Err(mismatch(
            "is internal, but the public egress policy needs a network with a way out".to_owned(),
        ));
    }
    let options = n.options;
    if options.get(OPT_ICC).map(String::as_str) != Some("false") {
        return Err(mismatch(
            "lets containers talk to each other (enable_icc is not false)".to_owned(),
        ));
    }
    let expected = bridge_name(name);
    let bridge = options.get(OPT_BRIDGE).cloned().unwrap_or_default();
    if bridge != expected {
        return Err(mismatch(format!(
            "has bridge interface {bridge:?}, not {expected:?}"
        )));
    }
    let v4 = n.subnets.iter().find(|(subnet, _)| !subnet.contains(':'));
    Ok(SandboxNetwork {
        id: n.id,
        name: name.to_owned(),
        bridge,
        subnet: v4.map(|(s, _)| s.clone()),
        gateway: v4.and_then(|(_, g)| g.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_are_stable_short_and_distinct() {
        let a = bridge_name("zcbot-sandbox-net");
        assert_eq!(a, bridge_name("zcbot-sandbox-net"));
        assert!(a.len() <= 15, "{a}");
        assert_ne!(a, bridge_name("zcbot-sandbox-net2"));
    }
}
