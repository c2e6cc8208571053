//! Redis: the only module that knows keys, scripts and the change-stream schema.
//!
//! - [`keys`]: every key name (`KeyLayout`), sharded by hash tag so one script touches one slot;
//! - [`schema`]: the change stream's schema v1 (`ChangeEntry`, `ChangeKind`);
//! - [`lease`]: the mailbox lease (`Lease`);
//! - [`connection`]: single node or cluster (`RedisConnection`), retries of idempotent calls;
//! - this file: the operations ([`Store`]), each one script or command, and their errors.
//!
//! # Key layout (works on a single Redis and on Redis Cluster)
//! | key | type | content |
//! |---|---|---|
//! | `{P:sN}:mb:EMAIL` | hash | `cursor` (historyId, decimal), `synced` (last commit, epoch s), `watch` (watch expiration, epoch s), `renew` (next renewal, epoch s); only when set: `attention` (reason), `labels` (watch label filter), `renew_fails` (consecutive failed renewals) |
//! | `{P:sN}:lease:EMAIL` | string | `HOST:PID:RANDOM` token of the worker syncing EMAIL (PX TTL) |
//! | `{P:sN}:claim:EMAIL` | string | `HOST:PID:RANDOM` of the replica renewing or fallback-syncing EMAIL (PX TTL) |
//! | `{P:sN}:changes` | stream | change entries of the shard's mailboxes (schema v1, see [`schema`]) |
//! | `{P:sN}:schedule` | zset | every registered EMAIL, scored by when the scheduler next looks at it (epoch ms; `+inf` while it needs attention) |
//! | `{P:sN}:renew-failing` | zset | EMAIL whose last renewal failed, scored by watch expiration (epoch ms) |
//! | `{P:sN}:renew-budget` | string | renewals claimed in the shard in the current minute |
//! | `{P:sN}:credentials` | hash | EMAIL → its refresh token sealed by `vault` (raw bytes, layout v1: version, key id, nonce, ciphertext + tag); only mailboxes added with a refresh token |
//!
//! Field names are short and times in seconds on purpose: an idle mailbox (state hash plus its
//! schedule entry) stays within 300 bytes of Redis memory (300 B measured by
//! `examples/scheduler.rs` with 100,000 mailboxes on Redis 7.0).
//! | `{P}:quarantine` | stream | rejected notifications (malformed, or ahead of Gmail's history for too long), every field bounded (see [`quarantine`]): `reason`, `data` (the payload's first 256 bytes), `data_len`, `message_id`, `publish_time`, `received_at` |

mod connection;
mod credential;
mod keys;
mod lease;
mod lifecycle;
pub mod quarantine;
mod schema;

pub use connection::{RedisConnection, install_crypto_provider, single_client};
pub use credential::{CredentialPage, Replaced};
pub use keys::KeyLayout;
pub use lease::Lease;
pub use lifecycle::{
    AttentionKind, AttentionSource, Claim, ClaimAction, Claimed, FinishOutcome, ListCursor,
    MailboxStatus, WatchPlan,
};
pub use quarantine::Quarantined;
pub use schema::{ChangeEntry, ChangeKind, ResyncReason, SCHEMA_VERSION};

use crate::config::{RedisTarget, StoreSettings};
use crate::history_id::HistoryId;
use crate::mailbox::Mailbox;
use connection::{IDEMPOTENT_ATTEMPTS, RETRY_STEP, is_transient};
use redis::Script;
use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

static BEGIN: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("begin.lua")));
static COMMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("commit.lua")));
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lease.lua")));

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis unreachable, timed out, or answered an error: retry later.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Connecting failed: what failed (TLS handshake, authentication, refused, ...), the
    /// client's own error, and which setting to check. Never contains a password.
    #[error("{failed} ({source}); {hint}")]
    Connect {
        failed: String,
        hint: String,
        source: redis::RedisError,
    },
    /// The mailbox lease expired or was taken over: stop, write nothing.
    #[error("mailbox lease lost")]
    LeaseLost,
    /// The cursor moved since the sync read it (another writer): stop, write nothing.
    #[error("cursor moved to {0} since the sync started")]
    Conflict(HistoryId),
    /// The new cursor would be behind the stored one.
    #[error("refusing to move the cursor back from {0}")]
    Backwards(HistoryId),
    #[error("mailbox is not registered")]
    Unknown,
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Redis(_) | StoreError::LeaseLost | StoreError::Conflict(_)
        )
    }
}

/// What a sync should do, decided by one script ([`Store::begin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The mailbox is not registered.
    Unknown,
    /// The mailbox needs attention (e.g. revoked grant); its cursor is kept.
    NeedsAttention { cursor: HistoryId },
    /// The cursor already covers the target: nothing to do.
    UpToDate { cursor: HistoryId },
    /// The lease is ours; sync from `cursor`.
    Leased { cursor: HistoryId },
    /// Another worker holds the lease.
    Busy { cursor: HistoryId },
}

/// What a commit does with the mailbox lease in the same step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseAfterCommit {
    /// More pages follow: renew the lease's TTL.
    Keep,
    /// The sync is done: drop the lease.
    Release,
}

#[derive(Clone)]
pub struct Store {
    conn: RedisConnection,
    keys: KeyLayout,
    stream_maxlen: u64,
    quarantine_maxlen: u64,
}

impl Store {
    pub async fn connect(
        target: &RedisTarget,
        settings: &StoreSettings,
    ) -> Result<Store, StoreError> {
        let conn = RedisConnection::connect(target).await?;
        Ok(Store::new(conn, settings))
    }

    pub fn new(conn: RedisConnection, settings: &StoreSettings) -> Store {
        Store {
            conn,
            keys: KeyLayout::new(&settings.key_prefix, settings.shards),
            stream_maxlen: settings.stream_maxlen,
            quarantine_maxlen: settings.quarantine_maxlen,
        }
    }

    pub fn keys(&self) -> &KeyLayout {
        &self.keys
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    /// Reads the cursor and, if it is behind `target`, takes the mailbox lease with `token`.
    pub async fn begin(
        &self,
        mailbox: &Mailbox,
        target: HistoryId,
        lease: &Lease,
    ) -> Result<Begin, StoreError> {
        let (outcome, cursor): (String, String) = self
            .conn
            .retrying(|mut c| {
                let mut inv = BEGIN.prepare_invoke();
                inv.key(self.keys.state(mailbox))
                    .key(self.keys.lease(mailbox))
                    .arg(target.to_string())
                    .arg(&lease.token)
                    .arg(lease.ttl_ms());
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let cursor = || parse_cursor(&cursor);
        Ok(match outcome.as_str() {
            "unknown" => Begin::Unknown,
            "attention" => Begin::NeedsAttention { cursor: cursor()? },
            "up_to_date" => Begin::UpToDate { cursor: cursor()? },
            "leased" => Begin::Leased { cursor: cursor()? },
            "busy" => Begin::Busy { cursor: cursor()? },
            other => return Err(StoreError::Protocol(format!("begin: {other}"))),
        })
    }

    /// Appends `entries` and moves the cursor from `from` to `to` in one script, if the lease is
    /// still ours and the cursor is still `from`; `lease_after` says whether the same step drops
    /// the lease or renews its TTL.
    pub async fn commit(
        &self,
        mailbox: &Mailbox,
        lease: &Lease,
        from: HistoryId,
        to: HistoryId,
        entries: &[ChangeEntry],
        lease_after: LeaseAfterCommit,
    ) -> Result<HistoryId, StoreError> {
        let now_s = now_ms() / 1000;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut inv = COMMIT.prepare_invoke();
            inv.key(self.keys.state(mailbox))
                .key(self.keys.lease(mailbox))
                .key(self.keys.stream_of(mailbox))
                .arg(&lease.token)
                .arg(from.to_string())
                .arg(to.to_string())
                .arg(lease.ttl_ms())
                .arg(self.stream_maxlen)
                .arg(mailbox.as_str())
                .arg(match lease_after {
                    LeaseAfterCommit::Release => "1",
                    LeaseAfterCommit::Keep => "0",
                })
                .arg(now_s);
            for e in entries {
                inv.arg(4 + 2 * e.fields.len())
                    .arg("kind")
                    .arg(e.kind.as_str())
                    .arg("history_id")
                    .arg(e.history_id.to_string());
                for (f, v) in &e.fields {
                    inv.arg(f.as_ref()).arg(v.as_str());
                }
            }
            let mut c = self.conn.clone();
            let reply: Result<(String, String), _> = inv.invoke_async(&mut c).await;
            let (outcome, cursor) = match reply {
                Ok(r) => r,
                Err(e) if attempt < IDEMPOTENT_ATTEMPTS && is_transient(&e) => {
                    tokio::time::sleep(RETRY_STEP * attempt).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            return match outcome.as_str() {
                "ok" => Ok(to),
                // A retry after a lost reply finds its own earlier commit applied: the cursor is
                // exactly `to` (and the lease may already be released). That is success.
                "lease_lost" | "conflict"
                    if attempt > 1 && self.cursor(mailbox).await? == Some(to) =>
                {
                    Ok(to)
                }
                "lease_lost" => Err(StoreError::LeaseLost),
                "conflict" => Err(StoreError::Conflict(parse_cursor(&cursor)?)),
                "backwards" => Err(StoreError::Backwards(parse_cursor(&cursor)?)),
                "unknown" => Err(StoreError::Unknown),
                other => Err(StoreError::Protocol(format!("commit: {other}"))),
            };
        }
    }

    /// Extends the lease if it is still ours; false if it was lost.
    pub async fn renew_lease(&self, mailbox: &Mailbox, lease: &Lease) -> Result<bool, StoreError> {
        self.lease_script(mailbox, &lease.token, lease.ttl_ms())
            .await
    }

    /// Drops the lease if it is still ours.
    pub async fn release_lease(
        &self,
        mailbox: &Mailbox,
        lease: &Lease,
    ) -> Result<bool, StoreError> {
        self.lease_script(mailbox, &lease.token, 0).await
    }

    async fn lease_script(
        &self,
        mailbox: &Mailbox,
        token: &str,
        ttl_ms: u64,
    ) -> Result<bool, StoreError> {
        let ours: i64 = self
            .conn
            .retrying(|mut c| {
                let mut inv = LEASE.prepare_invoke();
                inv.key(self.keys.lease(mailbox)).arg(token).arg(ttl_ms);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(ours == 1)
    }

    /// The stored cursor, or None if the mailbox is not registered.
    pub async fn cursor(&self, mailbox: &Mailbox) -> Result<Option<HistoryId>, StoreError> {
        let raw: Option<String> = self
            .conn
            .retrying(|mut c| {
                let key = self.keys.state(mailbox);
                async move {
                    redis::cmd("HGET")
                        .arg(key)
                        .arg("cursor")
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        raw.map(|r| parse_cursor(&r)).transpose()
    }

    /// Copies a rejected message to the quarantine stream (invariant I6). Every field of `q` is
    /// bounded, so one entry costs at most `quarantine::QUARANTINE_ENTRY_MEMORY`.
    pub async fn quarantine(&self, q: &Quarantined<'_>) -> Result<(), StoreError> {
        let now_ms = now_ms();
        let key = self.keys.quarantine();
        let _: String = self
            .conn
            .retrying(|mut c| {
                let cmd = {
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(&key)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(self.quarantine_maxlen)
                        .arg("*")
                        .arg("reason")
                        .arg(q.reason())
                        .arg("data")
                        .arg(q.data())
                        .arg("data_len")
                        .arg(q.data_len())
                        .arg("message_id")
                        .arg(q.message_id())
                        .arg("publish_time")
                        .arg(q.publish_time())
                        .arg("received_at")
                        .arg(now_ms);
                    cmd
                };
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        Ok(())
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn parse_cursor(raw: &str) -> Result<HistoryId, StoreError> {
    raw.parse()
        .map_err(|_| StoreError::Protocol(format!("stored cursor is not a historyId: {raw:?}")))
}
