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
//! | `{P:sN}:quota:EMAIL` | hash | the user's quota window: bucket number (epoch s) → units charged in that second, `b` = blocked until (epoch ms) after a per-user rate limit; expires a minute after the last charge (`quota`) |
//! | `{P:sN}:inflight:EMAIL` | zset | slot tokens of the user's syncs and renewals in flight, scored by expiry (epoch ms) |
//! | `{P:quota}:minute`, `{P:quota}:day` | hash | the project's quota windows (second buckets of the last minute, hour buckets of the last 24 h), `b` = blocked until |
//! | `{P}:quarantine` | stream | rejected notifications (malformed, or ahead of Gmail's history for too long), every field bounded (see [`quarantine`]): `reason`, `data` (the payload's first 256 bytes), `data_len`, `message_id`, `publish_time`, `received_at` |

mod connection;
mod credential;
mod keys;
mod lease;
mod lifecycle;
pub mod quarantine;
mod quota;
mod schema;
mod script;

pub use connection::{RedisConnection, install_crypto_provider, single_client};
pub use credential::{CredentialPage, Replaced};
pub use keys::{Key, KeyLayout};
pub use lease::Lease;
pub use lifecycle::{
    AttentionKind, AttentionSource, Claim, ClaimAction, Claimed, FinishOutcome, ListCursor,
    MailboxStatus, WatchPlan,
};
pub use quarantine::Quarantined;
pub use quota::{ChargeMode, ChargeReply, QuotaKey, SlotRequest, WindowCharge};
pub use schema::{ChangeEntry, ChangeKind, ResyncReason, SCHEMA_VERSION};

use crate::config::{RedisTarget, StoreSettings};
use crate::history_id::HistoryId;
use crate::mailbox::Mailbox;
use connection::{IDEMPOTENT_ATTEMPTS, RETRY_STEP, is_transient};
use redis::Script;
use script::ScriptCall;
use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

static BEGIN: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("begin.lua")));
static COMMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("commit.lua")));
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lease.lua")));
/// How many keys `begin.lua` takes.
const BEGIN_KEYS: usize = 2;

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
    /// Connecting failed because nothing accepts connections at the address (Redis not up
    /// yet, restarting, failing over), as opposed to a login, TLS or address problem.
    pub fn is_refused(&self) -> bool {
        match self {
            StoreError::Connect { source, .. } | StoreError::Redis(source) => {
                source.is_connection_refusal()
            }
            _ => false,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Redis(_) | StoreError::LeaseLost | StoreError::Conflict(_)
        )
    }
}

/// What a `maxmemory-policy` may evict of gmail-sync's keys; `None` for `noeviction`.
pub(crate) fn eviction_risk(policy: &str) -> Option<&'static str> {
    let policy = policy.trim().to_ascii_lowercase();
    if policy == "noeviction" {
        None
    } else if policy.starts_with("allkeys-") {
        Some(
            "any key, including mailbox cursors, the schedule, stored credentials and the \
             change streams (state gmail-sync cannot rebuild)",
        )
    } else if policy.starts_with("volatile-") {
        Some(
            "keys with a TTL: the mailbox leases and scheduler claims that keep two workers \
             off one mailbox",
        )
    } else {
        Some("keys by a policy gmail-sync does not know")
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

/// Pause between two attempts of [`Store::connect_and_ping`] while Redis refuses connections.
const REFUSED_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

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

    /// Connects and PINGs. With `wait_while_refused`, a Redis that refuses the connection
    /// (not up yet, restarting, failing over) is asked again every `REFUSED_RETRY` (500 ms)
    /// until that instant; any other failure returns at once. The caller bounds the whole.
    pub async fn connect_and_ping(
        target: &RedisTarget,
        settings: &StoreSettings,
        wait_while_refused: Option<tokio::time::Instant>,
    ) -> Result<Store, StoreError> {
        let mut said = false;
        loop {
            let attempt = async {
                let store = Store::connect(target, settings).await?;
                store.ping().await?;
                Ok::<_, StoreError>(store)
            };
            match (attempt.await, wait_while_refused) {
                (Err(e), Some(until))
                    if e.is_refused() && tokio::time::Instant::now() + REFUSED_RETRY < until =>
                {
                    if !said {
                        tracing::warn!(error = %e, "Redis refuses connections; trying again");
                        said = true;
                    }
                    tokio::time::sleep(REFUSED_RETRY).await;
                }
                (done, _) => return done,
            }
        }
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

    /// Warns (one line) when Redis's `maxmemory-policy` may evict gmail-sync's keys, on the
    /// node or on any master of a cluster; `at` names the configured Redis. Where `CONFIG GET`
    /// is refused (managed Redis such as Memorystore) it says so at debug level and moves on.
    pub async fn warn_if_keys_may_be_evicted(&self, at: &str) {
        const NOT_CHECKED: &str =
            "cannot read Redis's maxmemory-policy (CONFIG GET refused?); not checked";
        let policies = match self.conn.maxmemory_policies().await {
            Ok(policies) => policies,
            Err(e) => {
                tracing::debug!(error = %e, redis = at, "{NOT_CHECKED}");
                return;
            }
        };
        let mut evicting = Vec::new();
        let mut worst = None;
        for (node, policy) in policies {
            let node = node.unwrap_or_else(|| at.to_string());
            match policy {
                Ok(policy) => {
                    if let Some(what) = eviction_risk(&policy) {
                        evicting.push(format!("{node}: {policy}"));
                        worst.get_or_insert((policy, what));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, redis = %node, "{NOT_CHECKED}")
                }
            }
        }
        if let Some((policy, what)) = worst {
            tracing::warn!(
                redis = at,
                maxmemory_policy = %evicting.join(", "),
                "Redis's maxmemory-policy is {policy}: when Redis reaches maxmemory it evicts \
                 {what}. Set maxmemory-policy to noeviction (redis.conf, CONFIG SET maxmemory-policy \
                 noeviction, or the managed instance's maxmemory-policy setting): a full Redis \
                 then refuses writes, which gmail-sync retries without acking, instead of \
                 dropping its state"
            );
        }
    }

    /// Reads the cursor and, if it is behind `target`, takes the mailbox lease with `token`.
    pub async fn begin(
        &self,
        mailbox: &Mailbox,
        target: HistoryId,
        lease: &Lease,
    ) -> Result<Begin, StoreError> {
        let mut call = ScriptCall::new(&BEGIN, BEGIN_KEYS);
        self.begin_keys(&mut call, mailbox);
        Self::begin_args(&mut call, target, lease);
        let (outcome, cursor): (String, String) = self
            .conn
            .retrying(|mut c| {
                let call = &call;
                async move { call.invoke(&mut c).await }
            })
            .await?;
        begin_reply(&outcome, &cursor)
    }

    /// `begin.lua`'s keys ([`BEGIN_KEYS`] of them), added to `call` (alone, or first in
    /// `begin_admit`).
    fn begin_keys(&self, call: &mut ScriptCall<'_>, mailbox: &Mailbox) {
        call.key(self.keys.state(mailbox))
            .key(self.keys.lease(mailbox));
    }

    /// `begin.lua`'s arguments, added to `call` after every key.
    fn begin_args(call: &mut ScriptCall<'_>, target: HistoryId, lease: &Lease) {
        call.arg(target.get()).arg(&lease.token).arg(lease.ttl_ms());
    }

    /// Appends `entries` and moves the cursor from `from` to `to` in one script, if the lease is
    /// still ours and the cursor is still `from`; `lease_after` says whether the same step drops
    /// the lease or renews its TTL. A step that drops the lease also removes the sync's quota
    /// in-flight slot `slot` (its token), if given, so ending a sync is one round trip.
    #[allow(clippy::too_many_arguments)] // one per script argument group; a struct would only rename them
    pub async fn commit(
        &self,
        mailbox: &Mailbox,
        lease: &Lease,
        from: HistoryId,
        to: HistoryId,
        entries: &[ChangeEntry],
        lease_after: LeaseAfterCommit,
        slot: Option<&str>,
    ) -> Result<HistoryId, StoreError> {
        let now_s = now_ms() / 1000;
        // Built once: every attempt sends the same command.
        let mut call = ScriptCall::new(&COMMIT, 4);
        call.key(self.keys.state(mailbox))
            .key(self.keys.lease(mailbox))
            .key(self.keys.stream_of(mailbox))
            .key(self.keys.in_flight(mailbox))
            .arg(&lease.token)
            .arg(from.get())
            .arg(to.get())
            .arg(lease.ttl_ms())
            .arg(self.stream_maxlen)
            .arg(mailbox.as_str())
            .arg(match lease_after {
                LeaseAfterCommit::Release => "1",
                LeaseAfterCommit::Keep => "0",
            })
            .arg(now_s)
            .arg(match lease_after {
                LeaseAfterCommit::Release => slot.unwrap_or(""),
                LeaseAfterCommit::Keep => "",
            });
        for e in entries {
            call.arg(4 + 2 * e.fields.len())
                .arg("kind")
                .arg(e.kind.as_str())
                .arg("history_id")
                .arg(e.history_id.get());
            for (f, v) in &e.fields {
                call.arg(f.as_ref()).arg(v.as_str());
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut c = self.conn.clone();
            let reply: Result<(String, String), _> = call.invoke(&mut c).await;
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
        let mut call = ScriptCall::new(&LEASE, 1);
        call.key(self.keys.lease(mailbox)).arg(token).arg(ttl_ms);
        let ours: i64 = self
            .conn
            .retrying(|mut c| {
                let call = &call;
                async move { call.invoke(&mut c).await }
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
                    cmd.arg(key)
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

/// `begin.lua`'s reply as a [`Begin`].
fn begin_reply(outcome: &str, cursor: &str) -> Result<Begin, StoreError> {
    let cursor = || parse_cursor(cursor);
    Ok(match outcome {
        "unknown" => Begin::Unknown,
        "attention" => Begin::NeedsAttention { cursor: cursor()? },
        "up_to_date" => Begin::UpToDate { cursor: cursor()? },
        "leased" => Begin::Leased { cursor: cursor()? },
        "busy" => Begin::Busy { cursor: cursor()? },
        other => return Err(StoreError::Protocol(format!("begin: {other}"))),
    })
}

fn parse_cursor(raw: &str) -> Result<HistoryId, StoreError> {
    raw.parse()
        .map_err(|_| StoreError::Protocol(format!("stored cursor is not a historyId: {raw:?}")))
}

#[cfg(test)]
mod tests {
    use super::eviction_risk;

    #[test]
    fn only_noeviction_keeps_every_key() {
        assert_eq!(eviction_risk("noeviction"), None);
        assert_eq!(eviction_risk(" NoEviction "), None);
        for policy in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
            "something-new",
        ] {
            assert!(eviction_risk(policy).is_some(), "{policy}");
        }
        assert!(eviction_risk("allkeys-lru").unwrap().contains("cursors"));
        assert!(eviction_risk("volatile-ttl").unwrap().contains("leases"));
    }
}
