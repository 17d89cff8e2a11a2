//! zcbot-sandbox: one long-lived, hardened Docker container per chat-agent user.
//!
//! Data flows one way: [`Config`] (from the environment) -> [`SandboxPool`] (Docker client,
//! network, per-user containers, reaper, reconcile) -> executors -> the HTTP server and the CLI.
//! Nothing below knows about what is above it.

pub mod config;
pub mod engine;
pub mod error;
pub mod exec;
pub mod files;
pub mod firewall;
pub mod pool;
pub mod quota;
pub mod server;
pub mod smoke;
pub mod text;
pub mod uids;
pub mod user;
pub mod users_root;

pub use config::Config;
pub use error::{Error, Result};
pub use pool::reaper::{ReconcileReport, SandboxStatus};
pub use pool::{Lease, PoolStats, Sandbox, SandboxPool};
pub use user::UserId;
