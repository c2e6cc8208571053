//! The mailbox lease: which worker may call Gmail for a mailbox and write its changes.
//!
//! Not to be confused with Pub/Sub's *message* lease (the ack deadline the client extends):
//! this one is a Redis key per mailbox, `SET NX PX` with a random token, renewed while a sync
//! runs and checked again by the commit script.

use std::sync::LazyLock;
use std::time::Duration;

/// A mailbox lease this worker holds (or tries to take): a random token and its TTL.
#[derive(Clone, Debug)]
pub struct Lease {
    pub(crate) token: String,
    pub(crate) ttl: Duration,
}

impl Lease {
    /// A fresh token: `HOST:PID:RANDOM`. 128 random bits make it unique per attempt; host (the
    /// pod name in Kubernetes) and pid tell an operator who holds a mailbox.
    pub fn new(ttl: Duration) -> Lease {
        Lease {
            token: format!("{}:{:032x}", holder_identity(), rand::random::<u128>()),
            ttl,
        }
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    pub(super) fn ttl_ms(&self) -> u64 {
        (self.ttl.as_millis() as u64).max(1)
    }
}

/// `HOST:PID` of this process, computed once.
pub(crate) fn holder_identity() -> &'static str {
    static IDENTITY: LazyLock<String> = LazyLock::new(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-._".contains(*c))
            .take(64)
            .collect();
        format!(
            "{}:{}",
            if host.is_empty() { "unknown" } else { &host },
            std::process::id()
        )
    });
    &IDENTITY
}
