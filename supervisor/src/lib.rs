//! The parts of the in-container supervisor that the daemon shares: the channel protocol.
//! The binary (`src/main.rs`) is the supervisor itself.

pub mod proto;
