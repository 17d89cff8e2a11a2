//! zcbot-sandbox: one long-lived, hardened Docker container per chat-agent user.
//!
//! Layers, each importing only from its own or lower ones (`tests/layers.rs` checks it):
//! config, error, user, text, check, seccomp < [`engine`] (the container engine behind one trait) <
//! firewall, files, quota, uids, users_root (the host side) < [`SandboxPool`] (per-user
//! containers on any engine, reaper, reconcile) < [`exec`] (the executors and their transports),
//! selfcheck < the HTTP server, the CLI and the smoke checks.

pub mod check;
pub mod config;
pub mod engine;
pub mod error;
pub mod exec;
pub mod files;
pub mod firewall;
pub mod pool;
pub mod quota;
pub mod seccomp;
pub mod selfcheck;
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
