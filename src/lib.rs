//! gmail-sync keeps Gmail mailboxes in sync through Gmail push notifications:
//! Pub/Sub StreamingPull → history sync → atomic commit in Redis → ack.
//! See ARCHITECTURE.md for the map and the invariants.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod gmail;
pub mod health;
pub mod history_id;
pub mod mailbox;
pub mod notification;
pub mod registry;
pub mod store;
pub mod sync;
pub mod telemetry;
