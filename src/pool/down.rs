//! `zcbot-sandbox down`: one teardown of everything a pool made on the host. Its containers
//! (any state), the workspace slots of its spares, its network if the pool made it (the
//! `io.zcbot.pool` label says so), and the host firewall chains of a network that is gone.
//!
//! It talks to the engine directly rather than through [`super::SandboxPool::connect`], which
//! would first check the image and create the network and the firewall it is about to remove.

use crate::config::Config;
use crate::engine::{DockerEngine, Engine, Filter};
use crate::error::Result;
use crate::pool::mounts::WorkspaceSlots;
use crate::pool::network::bridge_name;
use crate::pool::removals::{RemovalLog, Remover};
use crate::pool::spec::{LABEL_MANAGED_BY, LABEL_POOL, MANAGED_BY};

/// What `down` did, one line each for the operator.
#[derive(Debug, Default)]
pub struct Teardown {
    /// The containers removed.
    pub containers: usize,
    /// Each network looked at, with what became of it and of its host firewall.
    pub lines: Vec<String>,
}

/// Removes the pool's containers, its network(s) and their host firewall chains. A network
/// another pool made, or one that other containers still use, is left, and says why; so are its
/// chains (they guard it while it exists).
pub async fn down(config: &Config) -> Result<Teardown> {
    let engine = DockerEngine::connect(config).await?;
    let mut report = Teardown::default();
    let ours = Filter::Labels(vec![
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_POOL.to_owned(), config.pool_id.clone()),
    ]);
    let removals = RemovalLog::open(&config.state_dir, &config.pool_id)?;
    let proxy = Filter::Labels(vec![
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (
            crate::pool::egress::LABEL_EGRESS.to_owned(),
            config.pool_id.clone(),
        ),
    ]);
    let mut containers = engine.list(&ours).await?;
    containers.extend(engine.list(&proxy).await?);
    for c in containers {
        // A daemon's call in one of them then says who removed it.
        removals.record(&c.id, Remover::Everything);
        if engine.remove(&c.id).await?.existed() {
            report.containers += 1;
        }
    }
    // The spares' slots hold user folders mounted; nothing uses them now.
    WorkspaceSlots::existing(&config.state_dir, &config.pool_id).release_all();
    // Every egress policy's network: a pool may have run under each (the allowlist's outbound
    // network only if the pool made it, which its label says).
    for name in [
        config.network.clone(),
        format!("{}-public", config.network),
        config.egress_network.clone(),
    ] {
        let bridge = bridge_name(&name);
        let mut gone = true;
        let found = engine.networks_named(&name).await?;
        let existed = !found.is_empty();
        for n in found {
            let made_by = n.labels.get(LABEL_POOL);
            let zcbot = n.labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY);
            // A network made before networks carried the pool's label has none: the engine
            // refuses to remove it while any container still uses it.
            if !zcbot || made_by.is_some_and(|p| *p != config.pool_id) {
                gone = false;
                report.lines.push(format!(
                    "network {name}: left, {}",
                    match made_by {
                        Some(p) if zcbot => format!("made by pool {p}"),
                        _ => "not made by zcbot-sandbox".to_owned(),
                    }
                ));
                continue;
            }
            match engine.remove_network(&n.id).await {
                Ok(_) => report.lines.push(format!("network {name}: removed")),
                Err(e) => {
                    gone = false;
                    report.lines.push(format!("network {name}: left, {e}"));
                }
            }
        }
        if gone {
            let fw = match crate::firewall::remove(&bridge) {
                Ok(()) if existed => Some("removed".to_owned()),
                // Never made: nothing to say.
                Ok(()) | Err(crate::firewall::FirewallError::NotRoot) if !existed => None,
                Ok(()) => None,
                Err(e) => Some(format!("not removed: {e}")),
            };
            if let Some(fw) = fw {
                report
                    .lines
                    .push(format!("host firewall of {name} ({bridge}): {fw}"));
            }
        }
    }
    Ok(report)
}
