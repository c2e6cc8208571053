//! The scheduler: watch renewal and fallback sync, one task per worker process next to the
//! consumer, safe with N replicas.
//!
//! Every tick it asks each shard's schedule zset for mailboxes whose score is due (one Redis
//! call per shard when nothing is), then claims them in one script (`claim.lua`): the claim
//! key names this replica and the score moves to the end of the claim, so exactly one replica
//! works on a mailbox, and a replica that dies mid-claim loses it after
//! `GMAIL_SYNC_CLAIM_TIMEOUT_SECS`. Mailboxes that were synced since they were scheduled are
//! just given a later score: the notification path never writes the schedule.
//!
//! Work under a claim (bounded by [`SchedulePolicy::work_timeout`], below the claim):
//! - **renewal**: `users.watch` on the configured topic with the stored label filter. Gmail's
//!   400 "Only one user push notification client allowed" is answered with `users.stop` and
//!   one more `watch` (`GmailClient::watch_taking_over`). The new expiration is stored, the cursor never moves. A transient
//!   failure backs off (count kept in Redis); a permanent one marks the mailbox as needing
//!   attention, parks its schedule and writes a `mailbox_attention` entry;
//! - **fallback sync**: the ordinary sync (lease, `history.list`, atomic commit) up to the
//!   mailbox's latest history, so a dropped notification delays a change but never loses it.
//!
//! Work items run as tasks on the app's tracker, a few at a time ([`CONCURRENT_WORK`]), and
//! the tick waits for its batch: claims never pile up faster than they are worked.

mod policy;

pub use policy::SchedulePolicy;

use crate::failure_guard::Verdict;
use crate::gmail::{GmailClient, GmailError, LabelFilter, Method, Takeover, Watch};
use crate::mailbox::MailboxLogStyle;
use crate::quota::{self, Admission, Deferral, Priority};
use crate::store::{
    AttentionSource, Claim, ClaimAction, Claimed, FinishOutcome, Store, StoreError, now_ms,
};
use crate::sync::{PermanentFailure, SyncOutcome, Syncer};
use crate::telemetry::Counters;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Mailboxes taken from one shard per tick: bounds a claim batch (and so how long its claims
/// must last) while a backlog drains over a few ticks.
const BATCH_PER_SHARD: usize = 100;
/// Renewals and fallback syncs of one replica running at once: enough to renew 1,000 due
/// mailboxes in seconds, few enough not to crowd out notification-driven syncs.
const CONCURRENT_WORK: usize = 16;
/// How often the "watches expiring soon" check runs (one pipelined call per shard).
const EXPIRY_CHECK_PERIOD: Duration = Duration::from_secs(60);

pub struct Scheduler {
    pub store: Store,
    pub gmail: GmailClient,
    pub syncer: Arc<Syncer>,
    pub topic: String,
    pub policy: SchedulePolicy,
    pub counters: Arc<Counters>,
    pub tracker: TaskTracker,
    pub log_style: MailboxLogStyle,
    /// Bumped every tick: proof of life for the health file.
    pub heartbeat: Arc<AtomicU64>,
}

impl Scheduler {
    /// Runs until `stop`; Redis or Gmail outages are logged and retried on the next tick,
    /// never returned (they must not stop the consumer).
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(CONCURRENT_WORK));
        let mut tick = tokio::time::interval(this.policy.settings().tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_expiry_check: Option<Instant> = None;
        tracing::info!(
            renew_interval_s = this.policy.settings().renew_interval.as_secs(),
            silence_s = this.policy.settings().fallback_silence.as_secs(),
            "scheduler started"
        );
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            this.heartbeat.fetch_add(1, Relaxed);
            Counters::inc(&this.counters.scheduler_ticks);
            for shard in 0..this.store.keys().shards() {
                if stop.is_cancelled() {
                    return Ok(());
                }
                if let Err(e) = this.clone().tick_shard(shard, &permits, &stop).await {
                    tracing::warn!(shard, error = %e, "scheduler tick failed; retrying next tick");
                }
            }
            if last_expiry_check.is_none_or(|t| t.elapsed() >= EXPIRY_CHECK_PERIOD) {
                last_expiry_check = Some(Instant::now());
                this.check_expiring().await;
            }
        }
    }

    async fn tick_shard(
        self: Arc<Self>,
        shard: u32,
        permits: &Arc<Semaphore>,
        stop: &CancellationToken,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let due = self.store.due(shard, now, BATCH_PER_SHARD).await?;
        if due.is_empty() {
            return Ok(());
        }
        let jitters: Vec<u64> = due
            .iter()
            .map(|_| self.policy.fallback_jitter_ms())
            .collect();
        let claim = Claim::new(self.policy.settings().claim_timeout);
        let claimed = self
            .store
            .claim(
                shard,
                &due,
                &jitters,
                &claim,
                now,
                self.policy.settings().fallback_silence,
                self.policy.renewals_per_shard(),
                self.policy.budget_window_end_ms(now),
            )
            .await?;
        let claim = Arc::new(claim);
        let mut handles = Vec::with_capacity(claimed.len());
        for item in claimed {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                // Unstarted claims run out by themselves; another replica takes them then.
                _ = stop.cancelled() => break,
            };
            let (this, claim, stop) = (self.clone(), claim.clone(), stop.clone());
            handles.push(self.tracker.spawn(async move {
                let _permit = permit;
                let timeout = this.policy.work_timeout();
                tokio::select! {
                    _ = stop.cancelled() => {}
                    done = tokio::time::timeout(timeout, this.work(&item, &claim, &stop)) => {
                        if done.is_err() {
                            tracing::warn!(
                                mailbox = %item.mailbox.for_log(this.log_style),
                                timeout_s = timeout.as_secs(),
                                "scheduled work timed out; its claim runs out and it is retried"
                            );
                        }
                    }
                }
            }));
        }
        for handle in handles {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "a scheduled work task failed");
            }
        }
        Ok(())
    }

    /// Renews and/or fallback-syncs one claimed mailbox, then records the outcome.
    async fn work(&self, item: &Claimed, claim: &Claim, stop: &CancellationToken) {
        let mailbox = &item.mailbox;
        let shown = mailbox.for_log(self.log_style);
        let mut outcome = FinishOutcome::Synced;
        if matches!(
            item.action,
            ClaimAction::Renew | ClaimAction::RenewAndFallbackSync
        ) {
            // A renewal draws from the same budgets as the syncs, at a lower priority; one
            // that must wait gives its claim back with a new look time (no failure counted).
            let cost = self.gmail.quota_units(Method::Watch);
            let permit = match self
                .gmail
                .governor()
                .admit(mailbox, Priority::Renewal, cost)
                .await
            {
                Ok(Admission::Granted(permit)) => Some(permit),
                Ok(Admission::Wait(d)) => {
                    self.defer(item, claim, d).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(mailbox = %shown, error = %e, "quota governor unavailable; renewal retried later");
                    None
                }
            };
            let renewed = match &permit {
                Some(_) => quota::within(Priority::Renewal, cost, self.renew(item)).await,
                None => Err(GmailError::Transient {
                    detail: "quota governor unavailable".into(),
                    retry_after: None,
                }),
            };
            match renewed {
                Ok(watch) => {
                    Counters::inc(&self.counters.renewals);
                    self.syncer.guard().succeeded(mailbox);
                    tracing::debug!(mailbox = %shown, expiration_ms = watch.expiration_ms, "watch renewed");
                    outcome = FinishOutcome::Renewed {
                        expiration_ms: watch.expiration_ms,
                        renew_at_s: self.policy.next_renewal_s(now_ms()),
                    };
                }
                Err(GmailError::Deferred(d)) => {
                    self.defer(item, claim, d).await;
                    return;
                }
                Err(e) if e.is_retryable() => {
                    Counters::inc(&self.counters.renewal_failures);
                    tracing::warn!(mailbox = %shown, error = %e, "watch renewal failed; will retry");
                    outcome = FinishOutcome::RenewFailed {
                        retry_base: self.policy.renew_retry_base(),
                        retry_cap: self.policy.renew_retry_cap(),
                    };
                }
                Err(e) => {
                    Counters::inc(&self.counters.renewal_failures);
                    let failure = PermanentFailure::of_gmail(&e);
                    match self
                        .syncer
                        .guard()
                        .judge(mailbox, &failure.cause, failure.blame)
                    {
                        Verdict::Mark => {
                            Counters::inc(&self.counters.attention_marked);
                            tracing::error!(
                                mailbox = %shown,
                                error = %e,
                                attention = failure.kind.as_str(),
                                "watch renewal failed permanently; mailbox marked as needing attention"
                            );
                            if let Err(mark) = self
                                .store
                                .mark_attention(
                                    mailbox,
                                    failure.kind,
                                    &e.to_string(),
                                    AttentionSource::Renewal,
                                )
                                .await
                            {
                                tracing::warn!(mailbox = %shown, error = %mark, "could not mark the mailbox");
                            }
                            // Parked by the same script (claim dropped): no finish.
                            return;
                        }
                        Verdict::Defer { .. } | Verdict::Hold { .. } => {
                            tracing::warn!(
                                mailbox = %shown,
                                error = %e,
                                "watch renewal failed permanently; not marking the mailbox yet \
                                 (telling a broken mailbox from a broken deployment)"
                            );
                            outcome = FinishOutcome::RenewFailed {
                                retry_base: self.policy.renew_retry_base(),
                                retry_cap: self.policy.renew_retry_cap(),
                            };
                        }
                    }
                }
            }
        }
        if matches!(
            item.action,
            ClaimAction::FallbackSync | ClaimAction::RenewAndFallbackSync
        ) {
            Counters::inc(&self.counters.fallback_syncs);
            match self.syncer.sync_latest(mailbox, stop).await {
                SyncOutcome::Synced { changes, .. } if changes > 0 => {
                    Counters::add(&self.counters.fallback_changes, changes);
                    tracing::info!(mailbox = %shown, changes, "fallback sync found changes");
                }
                SyncOutcome::Failed(e) => {
                    tracing::debug!(mailbox = %shown, error = %e, "fallback sync failed")
                }
                // Only when nothing else happened under the claim: a renewal just recorded
                // must be finished as such (the fallback then comes back at the next tick).
                SyncOutcome::Deferred(d) if outcome == FinishOutcome::Synced => {
                    self.defer(item, claim, d).await;
                    return;
                }
                _ => {}
            }
        }
        let jitter = self.policy.fallback_jitter_ms();
        match self
            .store
            .finish(
                mailbox,
                claim,
                outcome,
                self.policy.settings().fallback_silence,
                jitter,
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                mailbox = %shown,
                "the claim ran out before the work was recorded; another replica may redo it"
            ),
            Err(e) => {
                tracing::warn!(mailbox = %shown, error = %e, "could not record scheduled work; its claim runs out and it is retried")
            }
        }
    }

    /// Gives the claim back with the governor's wait as the next look (nothing else recorded).
    async fn defer(&self, item: &Claimed, claim: &Claim, d: Deferral) {
        tracing::debug!(
            mailbox = %item.mailbox.for_log(self.log_style),
            reason = d.reason.as_str(),
            after_ms = d.after.as_millis() as u64,
            "scheduled work deferred by the quota governor"
        );
        let outcome = FinishOutcome::Deferred { after: d.after };
        let silence = self.policy.settings().fallback_silence;
        if let Err(e) = self
            .store
            .finish(&item.mailbox, claim, outcome, silence, 0)
            .await
        {
            tracing::warn!(error = %e, "could not record a deferral; the claim runs out and the work is retried");
        }
    }

    /// `users.watch` with the stored label filter, taking over from a conflicting client.
    async fn renew(&self, item: &Claimed) -> Result<Watch, GmailError> {
        let filter = item.labels.as_deref().and_then(LabelFilter::decode);
        let (watch, takeover) = self
            .gmail
            .watch_taking_over(&item.mailbox, &self.topic, filter.as_ref())
            .await?;
        if takeover == Takeover::StoppedOther {
            Counters::inc(&self.counters.watch_conflicts);
            tracing::warn!(
                mailbox = %item.mailbox.for_log(self.log_style),
                "another push client held this mailbox's watch: stopped it and watched again"
            );
        }
        Ok(watch)
    }

    /// Logs (and counts) watches that expire within the warn horizon while their renewal fails,
    /// and counts the mailboxes needing attention.
    async fn check_expiring(&self) {
        let horizon = now_ms() + self.policy.settings().warn_horizon.as_millis() as u64;
        match self.store.expiring(horizon).await {
            Ok((count, soonest)) => {
                self.counters.watches_expiring_soon.store(count, Relaxed);
                self.counters
                    .soonest_watch_expiry_ms
                    .store(soonest.unwrap_or(0), Relaxed);
                if count > 0 {
                    let soonest_in_s = soonest.map(|s| (s as i64 - now_ms() as i64) / 1000);
                    tracing::warn!(
                        count,
                        soonest_expiry_ms = soonest,
                        soonest_in_s,
                        horizon_s = self.policy.settings().warn_horizon.as_secs(),
                        "watches expire soon and their renewal keeps failing; mailboxes will go silent"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not check for expiring watches"),
        }
        // The attention gauge, on the same period: one ZCOUNT per shard.
        match self.store.attention_count().await {
            Ok(n) => self.counters.mailboxes_attention.store(n, Relaxed),
            Err(e) => tracing::warn!(error = %e, "could not count the mailboxes needing attention"),
        }
    }
}
