//! Integration tests of gmail-sync against the real parts: Redis, Google's Pub/Sub emulator, and
//! the Gmail simulator (whose ledger is the truth). One binary, so the emulator is shared.

mod harness;
mod invariants;
mod lifecycle;
mod processes;
mod store;
