//! gmail-sync keeps Gmail mailboxes in sync through Gmail push notifications:
//! Pub/Sub StreamingPull → history sync → atomic commit in Redis → ack.
//! See ARCHITECTURE.md for the map and the invariants.

pub mod app;
pub(crate) mod auth;
pub mod cli;
pub mod config;
pub(crate) mod consumer;
pub(crate) mod failure_guard;
pub(crate) mod gmail;
pub(crate) mod health;
pub mod history_id;
pub mod mailbox;
pub(crate) mod notification;
pub mod quota;
pub mod registry;
mod retry;
pub mod scheduler;
pub mod store;
mod supervisor;
pub mod sync;
pub mod telemetry;
pub mod vault;
