//! Integration tests of gmail-sync against the real parts: Redis, Google's Pub/Sub emulator, and
//! the Gmail simulator (whose ledger is the truth). One binary, so the emulator is shared.
//!
//! Invariant tests (a worker started exactly as `main` starts one), one file per topic:
//! `end_to_end`, `ack_and_commit` (I1, I2), `duplicates` (I4), `resync` (I5), `bad_input` (I6),
//! `gmail_errors`, `enrichment` (message metadata), `shutdown`, `redis_faults`, `cluster`,
//! `redis_tls` (TLS and logins); the commit script directly: `store`; the real binary as
//! processes: `processes`, and its health probes: `health`; refresh tokens sealed at rest and key
//! rotation: `vault`; real Gmail credentials: `credentials`; metrics over OTLP to a loopback
//! receiver: `metrics`; the quota governor shared by worker processes: `quota`.

mod ack_and_commit;
mod bad_input;
mod cluster;
mod credentials;
mod duplicates;
mod end_to_end;
mod enrichment;
mod faults;
mod gmail_errors;
mod harness;
mod health;
mod lifecycle;
mod metrics;
mod processes;
mod quota;
mod redis_faults;
mod redis_tls;
mod resync;
mod shutdown;
mod store;
mod vault;
