//! Local test bed for gmail-sync (test support only, never linked into the product binary).
//!
//! - [`process`]: child processes stopped by PID (on drop, on panic, and at process exit).
//! - [`redis_server`]: real `redis-server` instances (single and a three-master cluster, with
//!   or without a replica per master and failovers), plain or secured (TLS only, logins).
//! - [`pki`]: a CA and a server certificate made at test time (for TLS Redis).
//! - [`pubsub`]: Google's Pub/Sub emulator, unique topics and subscriptions per test.
//! - [`gmail`]: the Gmail API simulator with its ledger (the oracle for every invariant test).
//! - [`check`]: compares gmail-sync's change streams with the ledger.
//! - [`otlp`]: a loopback OTLP/HTTP metrics receiver (a collector's stand-in).
//! - [`faults`]: the fault suite (scenarios, seeded schedules, the driver and injector, the
//!   stream-cut proxy, the cursor monitor, the P1–P6 report).
//! - [`bed`]: the façade over all of them that gmail-sync's integration tests and examples
//!   share (`Testbed`: environment, worker processes and their ready files, change streams,
//!   ledger check, catch-up wait).

pub mod bed;
pub mod check;
pub mod faults;
pub mod gmail;
pub mod keys;
pub mod otlp;
pub mod pki;
pub mod process;
pub mod pubsub;
pub mod redis_server;
