//! Redis: the only module that knows keys and scripts.
//!
//! # Key layout (works on a single Redis and on Redis Cluster)
//! Mailboxes are spread over `S` shards (`GMAIL_SYNC_SHARDS`) by a stable hash. Everything one
//! script touches shares the shard's hash tag `{PREFIX:sN}`, so it lives in one cluster slot:
//!
//! | key | type | content |
//! |---|---|---|
//! | `{P:sN}:mb:EMAIL` | hash | `cursor` (historyId, decimal), `synced_at` (epoch ms), `attention` (reason, only when set) |
//! | `{P:sN}:lease:EMAIL` | string | `HOST:PID:RANDOM` token of the worker syncing EMAIL (PX TTL) |
//! | `{P:sN}:changes` | stream | change entries of the shard's mailboxes (schema v1 below) |
//! | `{P:sN}:watch` | zset | EMAIL scored by watch expiration (epoch ms) |
//! | `{P}:quarantine` | stream | malformed notifications: `reason`, `data` (original bytes), `message_id`, `publish_time`, `received_at` |
//!
//! # Change stream schema, version 1
//! Every entry has `v` = `1`, `mailbox`, `kind`, `history_id`. By kind:
//! - `message_added`, `message_deleted`: `message_id`, `thread_id`, `label_ids` (comma-separated,
//!   the message's labels as Gmail reported them; may be empty);
//! - `labels_added`, `labels_removed`: `message_id`, `thread_id`, `label_ids` (the labels
//!   added/removed by this change);
//! - `resync`: Gmail no longer had history after the cursor; `history_id` is the profile's
//!   historyId the mailbox restarts from, `reason`, `listed` (messages listed after this entry),
//!   `truncated` (`1` if the listing stopped at GMAIL_SYNC_RESYNC_MAX_MESSAGES);
//! - `message_listed`: a message present at resync time: `message_id`, `thread_id`.
//!
//! Entries of one mailbox appear in history order; `history_id` is the Gmail history record's id.

use crate::config::{RedisTarget, StoreSettings};
use crate::history_id::HistoryId;
use crate::mailbox::Mailbox;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static BEGIN: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("begin.lua")));
static COMMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("commit.lua")));
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lease.lua")));
static REGISTER: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("register.lua")));

/// The schema version written in every change entry's `v` field (by commit.lua; a unit test
/// keeps the two in step).
pub const SCHEMA_VERSION: u32 = 1;

/// A single Redis or a cluster; both multiplex one connection per node, are cheap to clone and
/// safe to share between tasks, so no pool is needed.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl RedisConnection {
    pub async fn connect(target: &RedisTarget) -> Result<RedisConnection, StoreError> {
        match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                // Response timeout above the 500 ms default: a large commit script is still a
                // few ms, but a busy Redis should slow us down, not fail every sync.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(3)))
                    .set_response_timeout(Some(Duration::from_secs(5)))
                    .set_number_of_retries(3);
                Ok(RedisConnection::Single(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            RedisTarget::Cluster(nodes) => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(Duration::from_secs(3))
                    .response_timeout(Duration::from_secs(5))
                    .build()?;
                Ok(RedisConnection::Cluster(
                    client.get_async_connection().await?,
                ))
            }
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis unreachable, timed out, or answered an error: retry later.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
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
    Disabled { cursor: HistoryId },
    /// The cursor already covers the target: nothing to do.
    UpToDate { cursor: HistoryId },
    /// The lease is ours; sync from `cursor`.
    Leased { cursor: HistoryId },
    /// Another worker holds the lease.
    Busy { cursor: HistoryId },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    MessageAdded,
    MessageDeleted,
    LabelsAdded,
    LabelsRemoved,
    Resync,
    MessageListed,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::MessageAdded => "message_added",
            ChangeKind::MessageDeleted => "message_deleted",
            ChangeKind::LabelsAdded => "labels_added",
            ChangeKind::LabelsRemoved => "labels_removed",
            ChangeKind::Resync => "resync",
            ChangeKind::MessageListed => "message_listed",
        }
    }
}

/// One entry for the change stream (schema v1, see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEntry {
    pub kind: ChangeKind,
    pub history_id: HistoryId,
    /// Field/value pairs after `v`, `mailbox`, `kind`, `history_id`.
    pub fields: Vec<(&'static str, String)>,
}

impl ChangeEntry {
    pub fn message(
        kind: ChangeKind,
        history_id: HistoryId,
        message_id: &str,
        thread_id: &str,
        label_ids: &[String],
    ) -> ChangeEntry {
        ChangeEntry {
            kind,
            history_id,
            fields: vec![
                ("message_id", message_id.to_string()),
                ("thread_id", thread_id.to_string()),
                ("label_ids", label_ids.join(",")),
            ],
        }
    }
}

/// Derives every key name from the prefix and the shard count.
#[derive(Clone, Debug)]
pub struct KeyLayout {
    prefix: String,
    shards: u32,
}

impl KeyLayout {
    pub fn new(prefix: &str, shards: u32) -> KeyLayout {
        KeyLayout {
            prefix: prefix.to_string(),
            shards: shards.max(1),
        }
    }

    pub fn shard_of(&self, mailbox: &Mailbox) -> u32 {
        (mailbox.stable_hash() % u64::from(self.shards)) as u32
    }

    fn tag(&self, shard: u32) -> String {
        format!("{{{}:s{}}}", self.prefix, shard)
    }

    pub fn state(&self, mailbox: &Mailbox) -> String {
        format!("{}:mb:{}", self.tag(self.shard_of(mailbox)), mailbox)
    }

    pub fn lease(&self, mailbox: &Mailbox) -> String {
        format!("{}:lease:{}", self.tag(self.shard_of(mailbox)), mailbox)
    }

    pub fn stream_of(&self, mailbox: &Mailbox) -> String {
        self.stream(self.shard_of(mailbox))
    }

    pub fn stream(&self, shard: u32) -> String {
        format!("{}:changes", self.tag(shard))
    }

    pub fn watch_set(&self, mailbox: &Mailbox) -> String {
        format!("{}:watch", self.tag(self.shard_of(mailbox)))
    }

    /// All change streams, for consumers (one consumer group per stream).
    pub fn streams(&self) -> Vec<String> {
        (0..self.shards).map(|s| self.stream(s)).collect()
    }

    pub fn quarantine(&self) -> String {
        format!("{{{}}}:quarantine", self.prefix)
    }
}

/// A mailbox lease this worker holds (or tries to take): a random token and its TTL.
#[derive(Clone, Debug)]
pub struct Lease {
    pub token: String,
    pub ttl: Duration,
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

    fn ttl_ms(&self) -> u64 {
        (self.ttl.as_millis() as u64).max(1)
    }
}

/// `HOST:PID` of this process, computed once.
fn holder_identity() -> &'static str {
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

/// A malformed message on its way to the quarantine stream.
#[derive(Debug, Clone)]
pub struct Quarantined<'a> {
    pub reason: &'a str,
    pub data: &'a [u8],
    pub message_id: &'a str,
    pub publish_time: &'a str,
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
            "disabled" => Begin::Disabled { cursor: cursor()? },
            "up_to_date" => Begin::UpToDate { cursor: cursor()? },
            "leased" => Begin::Leased { cursor: cursor()? },
            "busy" => Begin::Busy { cursor: cursor()? },
            other => return Err(StoreError::Protocol(format!("begin: {other}"))),
        })
    }

    /// Appends `entries` and moves the cursor from `from` to `to` in one script, if the lease is
    /// still ours and the cursor is still `from`. `release` drops the lease in the same step,
    /// otherwise its TTL is renewed.
    pub async fn commit(
        &self,
        mailbox: &Mailbox,
        lease: &Lease,
        from: HistoryId,
        to: HistoryId,
        entries: &[ChangeEntry],
        release: bool,
    ) -> Result<HistoryId, StoreError> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
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
                .arg(if release { "1" } else { "0" })
                .arg(now_ms);
            for e in entries {
                inv.arg(4 + 2 * e.fields.len())
                    .arg("kind")
                    .arg(e.kind.as_str())
                    .arg("history_id")
                    .arg(e.history_id.to_string());
                for (f, v) in &e.fields {
                    inv.arg(*f).arg(v.as_str());
                }
            }
            let mut c = self.conn.clone();
            let reply: Result<(String, String), _> = inv.invoke_async(&mut c).await;
            let (outcome, cursor) = match reply {
                Ok(r) => r,
                Err(e) if attempt < 3 && is_transient(&e) => {
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
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

    /// Registers a mailbox with its baseline cursor (idempotent: an existing cursor is kept, and
    /// an `attention` mark is cleared). Returns (created, stored cursor).
    pub async fn register(
        &self,
        mailbox: &Mailbox,
        baseline: HistoryId,
        watch_expiration_ms: u64,
    ) -> Result<(bool, HistoryId), StoreError> {
        let (created, cursor): (i64, String) = self
            .retrying(|mut c| {
                let mut inv = REGISTER.prepare_invoke();
                inv.key(self.keys.state(mailbox))
                    .key(self.keys.watch_set(mailbox))
                    .arg(baseline.to_string())
                    .arg(watch_expiration_ms)
                    .arg(mailbox.as_str());
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok((created == 1, parse_cursor(&cursor)?))
    }

    /// Marks a mailbox as needing attention (permanent Gmail/auth error). Its notifications are
    /// then acked without work and its cursor stays, so `mailbox add` later resumes from it.
    pub async fn mark_attention(&self, mailbox: &Mailbox, reason: &str) -> Result<(), StoreError> {
        let key = self.keys.state(mailbox);
        let reason: String = reason.chars().take(200).collect();
        // HSET only if the mailbox still exists: never create a cursor-less state hash.
        let script = "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'attention', ARGV[1]) end return 1";
        let _: i64 = self
            .retrying(|mut c| {
                let (key, reason) = (key.clone(), reason.clone());
                async move {
                    redis::cmd("EVAL")
                        .arg(script)
                        .arg(1)
                        .arg(key)
                        .arg(reason)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(())
    }

    /// Copies a malformed message to the quarantine stream (invariant I6).
    pub async fn quarantine(&self, q: &Quarantined<'_>) -> Result<(), StoreError> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let key = self.keys.quarantine();
        let _: String = self
            .retrying(|mut c| {
                let cmd = {
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(&key)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(self.quarantine_maxlen)
                        .arg("*")
                        .arg("reason")
                        .arg(q.reason)
                        .arg("data")
                        .arg(q.data)
                        .arg("message_id")
                        .arg(q.message_id)
                        .arg("publish_time")
                        .arg(q.publish_time)
                        .arg("received_at")
                        .arg(now_ms);
                    cmd
                };
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        Ok(())
    }

    /// Runs an idempotent operation, retrying twice on connection-level errors (the connection
    /// manager reports a dropped connection once and reconnects in the background).
    async fn retrying<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(RedisConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match op(self.conn.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < 3 && is_transient(&e) => {
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn is_transient(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal()
}

fn parse_cursor(raw: &str) -> Result<HistoryId, StoreError> {
    raw.parse()
        .map_err(|_| StoreError::Protocol(format!("stored cursor is not a historyId: {raw:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_script_writes_the_schema_version() {
        let field = format!("'v', '{SCHEMA_VERSION}'");
        assert!(include_str!("commit.lua").contains(&field));
    }

    #[test]
    fn keys_of_one_mailbox_share_one_hash_tag() {
        let k = KeyLayout::new("gs", 16);
        let m = Mailbox::parse("alice@example.com").unwrap();
        let tag = format!("{{gs:s{}}}", k.shard_of(&m));
        for key in [k.state(&m), k.lease(&m), k.stream_of(&m), k.watch_set(&m)] {
            assert!(key.starts_with(&tag), "{key}");
        }
        assert_eq!(k.streams().len(), 16);
        assert_eq!(k.quarantine(), "{gs}:quarantine");
    }
}
