//! The mailbox lifecycle in Redis: registration, the scheduler's claims, attention, removal,
//! and the reads behind `mailbox status` / `mailbox list`.
//!
//! The schedule zset of a shard holds every registered mailbox, scored by when the scheduler
//! must next look at it: the earlier of its renewal time and its fallback-sync time (the last
//! sync plus the silence period). Looking is cheap and lazy: a mailbox that was synced
//! meanwhile (because notifications arrived) is just given a later score by `claim.lua`, so the
//! notification path never writes the schedule.

use super::script::ScriptCall;
use super::{Store, StoreError, now_ms, parse_cursor};
use crate::history_id::HistoryId;
use crate::mailbox::Mailbox;
use redis::Script;
use std::sync::LazyLock;
use std::time::Duration;

static REGISTER: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("register.lua")));
static ATTENTION: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("attention.lua")));
static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("claim.lua")));
static FINISH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("finish.lua")));
static REMOVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("remove.lua")));

/// Longest `attention` reason stored (the text of a Gmail error can be long).
const MAX_ATTENTION_REASON_CHARS: usize = 200;

/// What `register` stores about a fresh watch and when the scheduler first looks again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchPlan {
    /// The watch's expiration (epoch ms, as Gmail returned it).
    pub expiration_ms: u64,
    /// When to renew it (epoch s).
    pub renew_at_s: u64,
    /// The schedule score: the earlier of the renewal and the first fallback sync (epoch ms).
    pub first_look_ms: u64,
    /// The label filter the watch was made with (`include:ID,ID` / `exclude:ID,ID`), if any.
    pub labels: Option<String>,
}

/// A scheduler claim on mailboxes: who holds it and for how long.
#[derive(Clone, Debug)]
pub struct Claim {
    pub(crate) token: String,
    pub(crate) ttl: Duration,
}

impl Claim {
    /// `HOST:PID:RANDOM`, like a lease token: unique per claim, and it names the replica.
    pub fn new(ttl: Duration) -> Claim {
        Claim {
            token: format!(
                "{}:{:032x}",
                super::lease::holder_identity(),
                rand::random::<u128>()
            ),
            ttl,
        }
    }
}

/// What the scheduler must do for a claimed mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimAction {
    Renew,
    FallbackSync,
    RenewAndFallbackSync,
}

/// A mailbox the claim script handed to this replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub mailbox: Mailbox,
    pub action: ClaimAction,
    /// The stored label filter of its watch (`include:ID,ID` / `exclude:ID,ID`), if any.
    pub labels: Option<String>,
}

/// What the scheduler did under its claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishOutcome {
    Renewed {
        expiration_ms: u64,
        renew_at_s: u64,
    },
    /// Retry after base × 2^(failures − 1), capped (the count lives in Redis, so any replica
    /// continues the same backoff).
    RenewFailed {
        retry_base: Duration,
        retry_cap: Duration,
    },
    /// A fallback sync ran (whatever its result); only the schedule moves.
    Synced,
    /// The quota governor deferred the work: look again after this long, nothing else moves.
    Deferred {
        after: Duration,
    },
}

/// What failed for good, written with the lifecycle entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionSource {
    Sync,
    Renewal,
}

/// Why a mailbox needs attention: who can fix it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKind {
    /// Its authorization is gone (revoked grant, delegation withdrawn, Gmail disabled for
    /// the user, no credential): its owner or admin must re-authorize it, then `mailbox add`
    /// resumes it from its stored cursor.
    NeedsReauthorization,
    /// Any other permanent failure (see the reason).
    Failed,
}

impl AttentionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AttentionKind::NeedsReauthorization => "needs_reauthorization",
            AttentionKind::Failed => "failed",
        }
    }
}

impl AttentionSource {
    fn as_str(self) -> &'static str {
        match self {
            AttentionSource::Sync => "sync",
            AttentionSource::Renewal => "renewal",
        }
    }
}

/// Everything Redis knows about one mailbox (`mailbox status`, `mailbox list`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MailboxStatus {
    pub mailbox: String,
    pub cursor: HistoryId,
    /// Watch expiration (epoch s).
    pub watch_expiration_s: Option<u64>,
    /// Last commit of a sync (epoch s).
    pub last_sync_s: Option<u64>,
    /// Next renewal (epoch s); none while the mailbox needs attention.
    pub next_renewal_s: Option<u64>,
    /// When the scheduler next looks at it (epoch ms; none while it needs attention).
    pub next_look_ms: Option<u64>,
    pub attention: Option<String>,
    /// `needs_reauthorization` or `failed` while it needs attention.
    pub attention_kind: Option<String>,
    pub labels: Option<String>,
    pub failed_renewals: u32,
    /// Who syncs it right now (`HOST:PID:RANDOM`).
    pub lease_holder: Option<String>,
    /// Who renews or fallback-syncs it right now.
    pub claim_holder: Option<String>,
    /// Its sealed refresh token, if one is stored: `mailbox status` shows the key id from its
    /// header (`vault::sealed_key_id`), never the value.
    #[serde(skip)]
    pub credential: Option<Vec<u8>>,
}

/// Where `mailbox list` continues: shard, ZSCAN cursor, entries of that batch already shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ListCursor {
    pub shard: u32,
    pub scan: u64,
    pub skip: usize,
}

impl std::fmt::Display for ListCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.shard, self.scan, self.skip)
    }
}

impl std::str::FromStr for ListCursor {
    type Err = String;
    fn from_str(s: &str) -> Result<ListCursor, String> {
        let bad = || format!("not a list cursor (as printed by the previous page): {s:?}");
        let mut parts = s.split('-');
        let mut next = || parts.next().ok_or_else(bad);
        let cursor = ListCursor {
            shard: next()?.parse().map_err(|_| bad())?,
            scan: next()?.parse().map_err(|_| bad())?,
            skip: next()?.parse().map_err(|_| bad())?,
        };
        Ok(cursor)
    }
}

impl Store {
    /// Registers a mailbox with its baseline cursor and schedule (idempotent: an existing
    /// cursor is kept, an `attention` mark is cleared). Returns (created, stored cursor).
    pub async fn register(
        &self,
        mailbox: &Mailbox,
        baseline: HistoryId,
        plan: &WatchPlan,
    ) -> Result<(bool, HistoryId), StoreError> {
        let mut call = ScriptCall::new(&REGISTER, 3);
        call.key(self.keys.state(mailbox))
            .key(self.keys.schedule_of(mailbox))
            .key(self.keys.renewal_failing_of(mailbox))
            .arg(baseline.get())
            .arg(plan.expiration_ms / 1000)
            .arg(plan.renew_at_s)
            .arg(plan.first_look_ms)
            .arg(mailbox.as_str())
            .arg(plan.labels.as_deref().unwrap_or(""))
            .arg(now_ms() / 1000);
        let (created, cursor): (i64, String) = self
            .conn
            .retrying(|mut c| {
                let call = &call;
                async move { call.invoke(&mut c).await }
            })
            .await?;
        Ok((created == 1, parse_cursor(&cursor)?))
    }

    /// Whether the mailbox is registered and does not need attention (import skips those).
    pub async fn is_active(&self, mailbox: &Mailbox) -> Result<bool, StoreError> {
        let (cursor, attention): (Option<String>, Option<String>) = self
            .conn
            .retrying(|mut c| {
                let key = self.keys.state(mailbox);
                async move {
                    redis::cmd("HMGET")
                        .arg(key)
                        .arg("cursor")
                        .arg("attention")
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(cursor.is_some() && attention.is_none())
    }

    /// Up to `limit` mailboxes of `shard` whose schedule score is due at `now_ms`.
    pub async fn due(
        &self,
        shard: u32,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Mailbox>, StoreError> {
        let raw: Vec<String> = self
            .conn
            .retrying(|mut c| {
                let key = self.keys.schedule(shard);
                async move {
                    redis::cmd("ZRANGE")
                        .arg(key)
                        .arg("-inf")
                        .arg(now_ms)
                        .arg("BYSCORE")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(raw.iter().filter_map(|m| Mailbox::parse(m).ok()).collect())
    }

    /// Claims what is due among `mailboxes` (all of `shard`) in one script; the rest get a
    /// later score. `jitters_ms[i]` spreads mailbox i's next fallback look.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim(
        &self,
        shard: u32,
        mailboxes: &[Mailbox],
        jitters_ms: &[u64],
        claim: &Claim,
        now_ms: u64,
        silence: Duration,
        renewals_per_window: u32,
        window_end_ms: u64,
    ) -> Result<Vec<Claimed>, StoreError> {
        if mailboxes.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = ScriptCall::new(&CLAIM, 2 + 2 * mailboxes.len());
        call.key(self.keys.schedule(shard))
            .key(self.keys.renewal_budget(shard));
        for m in mailboxes {
            call.key(self.keys.state(m)).key(self.keys.claim(m));
        }
        call.arg(now_ms)
            .arg(claim.ttl.as_millis() as u64)
            .arg(&claim.token)
            .arg(silence.as_millis() as u64)
            .arg(renewals_per_window)
            .arg(window_end_ms);
        for (m, j) in mailboxes.iter().zip(jitters_ms) {
            call.arg(m.as_str()).arg(*j);
        }
        let raw: Vec<String> = self
            .conn
            .retrying(|mut c| {
                let call = &call;
                async move { call.invoke(&mut c).await }
            })
            .await?;
        let mut claimed = Vec::new();
        for triple in raw.chunks(3) {
            let [mailbox, action, labels] = triple else {
                return Err(StoreError::Protocol("claim: reply not in triples".into()));
            };
            let action = match action.as_str() {
                "renew" => ClaimAction::Renew,
                "fallback" => ClaimAction::FallbackSync,
                "renew_fallback" => ClaimAction::RenewAndFallbackSync,
                "later" | "throttled" | "claimed" | "attention" | "gone" => continue,
                other => return Err(StoreError::Protocol(format!("claim: {other}"))),
            };
            let mailbox =
                Mailbox::parse(mailbox).map_err(|e| StoreError::Protocol(format!("claim: {e}")))?;
            claimed.push(Claimed {
                mailbox,
                action,
                labels: (!labels.is_empty()).then(|| labels.clone()),
            });
        }
        Ok(claimed)
    }

    /// Records what the scheduler did under `claim` and reschedules the mailbox. False if the
    /// claim ran out first (nothing written: another replica may own the mailbox now).
    pub async fn finish(
        &self,
        mailbox: &Mailbox,
        claim: &Claim,
        outcome: FinishOutcome,
        silence: Duration,
        jitter_ms: u64,
    ) -> Result<bool, StoreError> {
        let (name, expiration_s, renew) = match outcome {
            FinishOutcome::Renewed {
                expiration_ms,
                renew_at_s,
            } => ("renewed", expiration_ms / 1000, (renew_at_s, 0)),
            FinishOutcome::RenewFailed {
                retry_base,
                retry_cap,
            } => (
                "renew_failed",
                0,
                (retry_base.as_millis() as u64, retry_cap.as_millis() as u64),
            ),
            FinishOutcome::Synced => ("done", 0, (0, 0)),
            FinishOutcome::Deferred { after } => ("deferred", 0, (after.as_millis() as u64, 0)),
        };
        let mut call = ScriptCall::new(&FINISH, 4);
        call.key(self.keys.state(mailbox))
            .key(self.keys.schedule_of(mailbox))
            .key(self.keys.claim(mailbox))
            .key(self.keys.renewal_failing_of(mailbox))
            .arg(&claim.token)
            .arg(mailbox.as_str())
            .arg(name)
            .arg(expiration_s)
            .arg(renew.0)
            .arg(silence.as_millis() as u64)
            .arg(jitter_ms)
            .arg(now_ms())
            .arg(renew.1);
        let reply: String = self
            .conn
            .retrying(|mut c| {
                let call = &call;
                async move { call.invoke(&mut c).await }
            })
            .await?;
        match reply.as_str() {
            "ok" | "gone" => Ok(true),
            "lost" => Ok(false),
            other => Err(StoreError::Protocol(format!("finish: {other}"))),
        }
    }

    /// Marks a mailbox as needing attention (permanent Gmail/auth error): its notifications
    /// are then acked without work, it is neither renewed nor fallback-synced, its cursor
    /// stays (so `mailbox add` later resumes from it), and a `mailbox_attention` entry is
    /// written to its change stream the first time.
    pub async fn mark_attention(
        &self,
        mailbox: &Mailbox,
        kind: AttentionKind,
        reason: &str,
        source: AttentionSource,
    ) -> Result<(), StoreError> {
        let reason: String = reason.chars().take(MAX_ATTENTION_REASON_CHARS).collect();
        let mut call = ScriptCall::new(&ATTENTION, 5);
        call.key(self.keys.state(mailbox))
            .key(self.keys.schedule_of(mailbox))
            .key(self.keys.renewal_failing_of(mailbox))
            .key(self.keys.claim(mailbox))
            .key(self.keys.stream_of(mailbox))
            .arg(&reason)
            .arg(mailbox.as_str())
            .arg(self.stream_maxlen)
            .arg(source.as_str())
            .arg(kind.as_str());
        let _: i64 = self
            .conn
            .retrying(|mut c| {
                let call = &call;
                async move { call.invoke(&mut c).await }
            })
            .await?;
        Ok(())
    }

    /// Deletes the mailbox's state, lease, claim, schedule entries and stored credential and
    /// writes a `mailbox_removed` entry. False if it was not registered.
    pub async fn remove(&self, mailbox: &Mailbox) -> Result<bool, StoreError> {
        let mut call = ScriptCall::new(&REMOVE, 7);
        call.key(self.keys.state(mailbox))
            .key(self.keys.lease(mailbox))
            .key(self.keys.claim(mailbox))
            .key(self.keys.schedule_of(mailbox))
            .key(self.keys.renewal_failing_of(mailbox))
            .key(self.keys.stream_of(mailbox))
            .key(self.keys.credentials_of(mailbox))
            .arg(mailbox.as_str())
            .arg(self.stream_maxlen);
        let removed: i64 = self
            .conn
            .retrying(|mut c| {
                let call = &call;
                async move { call.invoke(&mut c).await }
            })
            .await?;
        Ok(removed == 1)
    }

    /// Everything stored about `mailbox`, or None if it is not registered.
    pub async fn status(&self, mailbox: &Mailbox) -> Result<Option<MailboxStatus>, StoreError> {
        type Reply = (
            Vec<Option<String>>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<Vec<u8>>,
        );
        // One round trip: all five keys share the mailbox's hash tag (one node in a cluster).
        let (fields, lease, claim, score, credential): Reply = self
            .conn
            .retrying(|mut c| {
                let mut pipe = redis::pipe();
                pipe.cmd("HMGET")
                    .arg(self.keys.state(mailbox))
                    .arg(&STATUS_FIELDS[..])
                    .cmd("GET")
                    .arg(self.keys.lease(mailbox))
                    .cmd("GET")
                    .arg(self.keys.claim(mailbox))
                    .cmd("ZSCORE")
                    .arg(self.keys.schedule_of(mailbox))
                    .arg(mailbox.as_str())
                    .cmd("HGET")
                    .arg(self.keys.credentials_of(mailbox))
                    .arg(mailbox.as_str());
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        let status = status_of(mailbox.as_str(), &fields, lease, claim, score)?;
        Ok(status.map(|status| MailboxStatus {
            credential,
            ..status
        }))
    }

    /// One page of registered mailboxes, shard by shard; `None` as next cursor at the end.
    pub async fn list(
        &self,
        from: ListCursor,
        limit: usize,
    ) -> Result<(Vec<MailboxStatus>, Option<ListCursor>), StoreError> {
        let mut page = Vec::new();
        let mut at = from;
        while at.shard < self.keys.shards() && page.len() < limit {
            let (next_scan, batch): (u64, Vec<String>) = self
                .conn
                .retrying(|mut c| {
                    let key = self.keys.schedule(at.shard);
                    async move {
                        redis::cmd("ZSCAN")
                            .arg(key)
                            .arg(at.scan)
                            .arg("COUNT")
                            .arg(LIST_SCAN_COUNT)
                            .query_async(&mut c)
                            .await
                    }
                })
                .await?;
            // ZSCAN answers member, score, member, score...
            let members: Vec<&String> = batch.iter().step_by(2).collect();
            let mut taken = at.skip;
            for m in members.iter().skip(at.skip) {
                if page.len() >= limit {
                    break;
                }
                taken += 1;
                if let Ok(mailbox) = Mailbox::parse(m)
                    && let Some(status) = self.status(&mailbox).await?
                {
                    page.push(status);
                }
            }
            if taken < members.len() {
                // The page filled up inside this batch: resume here, past what was shown.
                at.skip = taken;
                return Ok((page, Some(at)));
            }
            at = if next_scan == 0 {
                ListCursor {
                    shard: at.shard + 1,
                    scan: 0,
                    skip: 0,
                }
            } else {
                ListCursor {
                    shard: at.shard,
                    scan: next_scan,
                    skip: 0,
                }
            };
        }
        let more = at.shard < self.keys.shards();
        Ok((page, more.then_some(at)))
    }

    /// Watches whose renewal is failing and that expire before `horizon_ms`: how many, and
    /// the soonest expiration (epoch ms).
    pub async fn expiring(&self, horizon_ms: u64) -> Result<(u64, Option<u64>), StoreError> {
        let mut count = 0;
        let mut soonest: Option<u64> = None;
        for shard in 0..self.keys.shards() {
            let (n, first): (u64, Vec<String>) = self
                .conn
                .retrying(|mut c| {
                    let key = self.keys.renewal_failing(shard);
                    let mut pipe = redis::pipe();
                    pipe.cmd("ZCOUNT")
                        .arg(key)
                        .arg("-inf")
                        .arg(horizon_ms)
                        .cmd("ZRANGE")
                        .arg(key)
                        .arg(0)
                        .arg(0)
                        .arg("WITHSCORES");
                    async move { pipe.query_async(&mut c).await }
                })
                .await?;
            count += n;
            if n > 0
                && let Some(score) = first.get(1).and_then(|s| s.parse::<f64>().ok())
            {
                let score = score as u64;
                soonest = Some(soonest.map_or(score, |s| s.min(score)));
            }
        }
        Ok((count, soonest))
    }

    /// Registered mailboxes needing attention, in all shards: a parked mailbox's schedule
    /// score is `+inf` (`attention.lua`, `claim.lua`, `finish.lua`), and only a parked one's, so
    /// this is one `ZCOUNT` per shard.
    pub async fn attention_count(&self) -> Result<u64, StoreError> {
        let mut count = 0;
        for shard in 0..self.keys.shards() {
            let n: u64 = self
                .conn
                .retrying(|mut c| {
                    let mut cmd = redis::cmd("ZCOUNT");
                    cmd.arg(self.keys.schedule(shard)).arg("+inf").arg("+inf");
                    async move { cmd.query_async(&mut c).await }
                })
                .await?;
            count += n;
        }
        Ok(count)
    }
}

/// ZSCAN's COUNT hint for `mailbox list` (a batch may be larger on small zsets).
const LIST_SCAN_COUNT: usize = 100;

const STATUS_FIELDS: [&str; 8] = [
    "cursor",
    "watch",
    "synced",
    "renew",
    "attention",
    "labels",
    "renew_fails",
    "attention_kind",
];

fn status_of(
    mailbox: &str,
    fields: &[Option<String>],
    lease: Option<String>,
    claim: Option<String>,
    score: Option<String>,
) -> Result<Option<MailboxStatus>, StoreError> {
    let field = |i: usize| fields.get(i).cloned().flatten();
    let Some(cursor) = field(0) else {
        return Ok(None);
    };
    let number = |i: usize| field(i).and_then(|v| v.parse::<u64>().ok());
    let attention = field(4);
    Ok(Some(MailboxStatus {
        mailbox: mailbox.to_string(),
        cursor: parse_cursor(&cursor)?,
        watch_expiration_s: number(1),
        last_sync_s: number(2),
        next_renewal_s: if attention.is_some() { None } else { number(3) },
        next_look_ms: score
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite())
            .map(|s| s as u64),
        // Marked before kinds existed: a plain failure.
        attention_kind: attention
            .as_ref()
            .map(|_| field(7).unwrap_or_else(|| AttentionKind::Failed.as_str().to_string())),
        attention,
        labels: field(5),
        failed_renewals: number(6).unwrap_or(0) as u32,
        lease_holder: lease,
        claim_holder: claim,
        credential: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_cursor_round_trips_and_rejects_garbage() {
        let c = ListCursor {
            shard: 3,
            scan: 1234,
            skip: 7,
        };
        assert_eq!(c.to_string().parse::<ListCursor>().unwrap(), c);
        assert!("3-x-1".parse::<ListCursor>().is_err());
        assert!("3-1".parse::<ListCursor>().is_err());
    }

    #[test]
    fn status_reads_fields_and_hides_renewal_while_parked() {
        let f = |v: &[Option<&str>]| v.iter().map(|o| o.map(String::from)).collect::<Vec<_>>();
        let s = status_of(
            "a@x.com",
            &f(&[
                Some("42"),
                Some("100"),
                Some("90"),
                Some("95"),
                None,
                None,
                None,
            ]),
            Some("pod:1:abc".into()),
            None,
            Some("95000".into()),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.cursor, HistoryId(42));
        assert_eq!(s.next_renewal_s, Some(95));
        assert_eq!(s.next_look_ms, Some(95000));
        assert_eq!(s.lease_holder.as_deref(), Some("pod:1:abc"));
        let parked = status_of(
            "a@x.com",
            &f(&[
                Some("42"),
                None,
                None,
                Some("95"),
                Some("revoked"),
                None,
                Some("2"),
            ]),
            None,
            None,
            Some("inf".into()),
        )
        .unwrap()
        .unwrap();
        assert_eq!(parked.next_renewal_s, None);
        assert_eq!(parked.next_look_ms, None);
        assert_eq!(parked.failed_renewals, 2);
        assert!(
            status_of("a@x.com", &f(&[None]), None, None, None)
                .unwrap()
                .is_none()
        );
    }
}
