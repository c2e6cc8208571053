//! The consumer: receives notifications, lets the [`Dispatcher`] decide, runs syncs and
//! carries out acks.
//!
//! Tasks (all on the app's one `TaskTracker`):
//! - the **reader** (`stream`, the Pub/Sub adapter) owns the `MessageStream` and only moves
//!   deliveries into a bounded channel. `MessageStream::next` takes `&mut self`, so one reader;
//!   the bounded channel plus the client's flow control (`max_outstanding_messages`) bound what
//!   is held in memory;
//! - the **dispatcher loop** ([`Consumer::run`]) owns the [`Dispatcher`], so no lock is needed.
//!   Each `select!` arm makes one [`Event`] and one `handle` call; the loop only carries out
//!   the returned [`Effect`]s and never decides anything itself;
//! - one **sync task** per mailbox sync, limited by a semaphore (`GMAIL_SYNC_MAX_CONCURRENT_SYNCS`)
//!   acquired inside the task, so notifications waiting for a sync hold no permit and the loop
//!   never blocks; it reports back on a channel, exactly once (a panic reports `Aborted`);
//! - one short **quarantine task** per rejected message (XADD of its bounded copy, then ack):
//!   malformed, or ahead of Gmail's history for longer than GMAIL_SYNC_HISTORY_LAG_SECS.
//!
//! Shutdown ([`ShutdownMode`]): on cancellation the reader stops pulling, waiters not in a sync
//! are given back at once, syncs in flight get the grace period to finish (their waiters are
//! acked if covered), then the rest are cancelled; their handles are dropped, which nacks them.

mod coalescer;
mod delivery;
mod dispatcher;
pub(crate) mod stream;
pub(crate) mod subscription;

pub use delivery::{Ack, Deliveries, Delivery};

use crate::config::ConsumerSettings;
use crate::history_id::HistoryId;
use crate::mailbox::Mailbox;
use crate::store::{Quarantined, Store, StoreError};
use crate::sync::{SyncError, SyncOutcome, Syncer};
use crate::telemetry::Counters;
use coalescer::{AckReason, CoalescerSettings, SyncReport, Waiter};
use dispatcher::{Dispatcher, Effect, Event, QuarantineReason};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::time::DelayQueue;

/// How often the loop turns even when idle, bumping the heartbeat the liveness file follows
/// (well inside `health::MAX_HEARTBEAT_AGE`).
const HEARTBEAT_PERIOD: Duration = Duration::from_secs(5);

/// What happens to work in progress when the process is asked to stop (SIGTERM, SIGINT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Let syncs in flight finish for up to `timeout`, then cancel them.
    Graceful { timeout: Duration },
    /// Cancel syncs in flight at once (`GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS=0`).
    NackImmediately,
}

impl ShutdownMode {
    pub fn from_timeout(timeout: Duration) -> ShutdownMode {
        if timeout.is_zero() {
            ShutdownMode::NackImmediately
        } else {
            ShutdownMode::Graceful { timeout }
        }
    }
}

/// Runs one mailbox sync. The production one is [`Syncer`]; tests use fakes.
pub trait SyncRunner: Send + Sync + 'static {
    /// Brings `mailbox` to at least `target` if it can; stops at its next await point once
    /// `cancel` fires.
    fn sync(
        &self,
        mailbox: &Mailbox,
        target: HistoryId,
        cancel: &CancellationToken,
    ) -> impl Future<Output = SyncReport> + Send;
}

/// Where rejected messages are copied (bounded: [`Quarantined`]) before they are acked. The
/// production one is [`Store`].
pub trait QuarantineSink: Send + Sync + 'static {
    fn quarantine(
        &self,
        entry: Quarantined<'_>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

impl SyncRunner for Syncer {
    async fn sync(
        &self,
        mailbox: &Mailbox,
        target: HistoryId,
        cancel: &CancellationToken,
    ) -> SyncReport {
        report_of(Syncer::sync(self, mailbox, target, cancel).await)
    }
}

impl QuarantineSink for Store {
    async fn quarantine(&self, entry: Quarantined<'_>) -> Result<(), StoreError> {
        Store::quarantine(self, &entry).await
    }
}

pub struct Consumer<S, Q> {
    pub syncs: Arc<S>,
    pub quarantine: Arc<Q>,
    pub settings: ConsumerSettings,
    pub counters: Arc<Counters>,
    pub tracker: TaskTracker,
    /// Bumped on every loop turn (at least every [`HEARTBEAT_PERIOD`]): proof of life for the
    /// health file.
    pub heartbeat: Arc<AtomicU64>,
}

type SyncDone = (Mailbox, SyncReport);

impl<S: SyncRunner, Q: QuarantineSink> Consumer<S, Q> {
    /// Consumes `deliveries` until `shutdown` is cancelled or the reader ends, then drains.
    pub async fn run<A: Ack>(self, mut deliveries: Deliveries<A>, shutdown: CancellationToken) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<SyncDone>();
        let cancel_syncs = CancellationToken::new();
        let permits = Arc::new(Semaphore::new(self.settings.max_concurrent_syncs));
        let mut dispatcher: Dispatcher<A> = Dispatcher::new(
            CoalescerSettings {
                max_retries: self.settings.sync_retries,
                history_lag: self.settings.history_lag,
                window: self.settings.coalesce_window,
                ..CoalescerSettings::default()
            },
            ShutdownMode::from_timeout(self.settings.shutdown_timeout),
        );
        let mut retries: DelayQueue<Mailbox> = DelayQueue::new();
        let mut effects: Vec<Effect<A>> = Vec::new();
        // The drain deadline is a timer, i.e. IO: it lives here, armed only by an effect.
        let mut drain_deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut heartbeat = tokio::time::interval(HEARTBEAT_PERIOD);

        loop {
            self.heartbeat
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let event = tokio::select! {
                // Completions first: they free capacity and ack messages.
                biased;
                Some((mailbox, report)) = done_rx.recv() => Event::SyncDone(mailbox, report),
                Some(expired) = std::future::poll_fn(|cx| retries.poll_expired(cx)), if !retries.is_empty() => {
                    Event::RetryDue(expired.into_inner())
                }
                delivery = deliveries.receiver.recv(), if dispatcher.wants_deliveries() => match delivery {
                    Some(delivery) => {
                        Counters::inc(&self.counters.received);
                        Event::Delivery(delivery)
                    }
                    None => Event::ReaderEnded,
                },
                _ = shutdown.cancelled(), if dispatcher.is_running() => {
                    tracing::info!("shutting down: stopped pulling, waiting for syncs in flight");
                    Event::ShutdownRequested
                }
                _ = async { drain_deadline.as_mut().expect("guarded").await }, if drain_deadline.is_some() => {
                    drain_deadline = None;
                    tracing::warn!("shutdown timeout: cancelling syncs in flight; their messages are nacked");
                    Event::GraceExpired
                }
                _ = heartbeat.tick() => continue,
            };
            dispatcher.handle(event, &mut effects);
            let mut finished = false;
            for effect in effects.drain(..) {
                match effect {
                    Effect::StartSync { mailbox, target } => {
                        self.spawn_sync(mailbox, target, &permits, &done_tx, &cancel_syncs)
                    }
                    Effect::RetryLater { mailbox, after } => {
                        retries.insert(mailbox, after);
                    }
                    Effect::Ack(waiters, reason) => self.ack(waiters, reason),
                    Effect::Nack(waiters) => {
                        Counters::add(&self.counters.nacked, waiters.len() as u64);
                        drop(waiters);
                    }
                    Effect::Quarantine { delivery, reason } => {
                        self.spawn_quarantine(delivery, reason)
                    }
                    Effect::StopReading => deliveries.stop_reading.cancel(),
                    Effect::ArmDrainDeadline(grace) => {
                        drain_deadline = Some(Box::pin(tokio::time::sleep(grace)));
                    }
                    Effect::CancelSyncs => cancel_syncs.cancel(),
                    Effect::Finished => finished = true,
                }
            }
            if finished {
                return;
            }
        }
    }

    fn spawn_sync(
        &self,
        mailbox: Mailbox,
        target: HistoryId,
        permits: &Arc<Semaphore>,
        done: &mpsc::UnboundedSender<SyncDone>,
        cancel: &CancellationToken,
    ) {
        let syncs = self.syncs.clone();
        let permits = permits.clone();
        let cancel = cancel.clone();
        // Reports exactly once, even if the sync panics: the dispatcher keeps the mailbox's
        // entry until it hears back, and would otherwise wait for it forever at shutdown.
        let mut reporter = Reporter {
            mailbox,
            done: Some(done.clone()),
        };
        self.tracker.spawn(async move {
            let report = tokio::select! {
                permit = permits.acquire_owned() => {
                    let _permit = permit.expect("the semaphore is never closed");
                    syncs.sync(&reporter.mailbox, target, &cancel).await
                }
                _ = cancel.cancelled() => SyncReport::Aborted,
            };
            reporter.send(report);
        });
    }

    fn spawn_quarantine<A: Ack>(&self, delivery: Delivery<A>, reason: QuarantineReason) {
        let sink = self.quarantine.clone();
        let counters = self.counters.clone();
        self.tracker.spawn(async move {
            let publish_time = delivery
                .publish_time
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()))
                .unwrap_or_default();
            let text = reason.to_string();
            // Bounded: the payload's first bytes only, and every other field cut too.
            let entry = Quarantined::new(&text, &delivery.data, &delivery.message_id, &publish_time);
            let (shown_reason, shown_id) = (entry.reason().to_string(), entry.message_id().to_string());
            let data_len = entry.data_len();
            match sink.quarantine(entry).await {
                Ok(()) => {
                    Counters::inc(&counters.quarantined);
                    if let QuarantineReason::HistoryNotReached { .. } = reason {
                        Counters::inc(&counters.quarantined_history_ahead);
                        tracing::warn!(message_id = %shown_id, reason = %shown_reason, "notification ahead of Gmail's history quarantined");
                    } else {
                        tracing::warn!(message_id = %shown_id, reason = %shown_reason, data_len, "malformed notification quarantined");
                    }
                    delivery.ack.ack();
                }
                Err(e) => {
                    // Not recorded, so not acked: Pub/Sub redelivers it (I6).
                    tracing::warn!(error = %e, "could not quarantine a malformed notification; nacking it");
                    Counters::inc(&counters.nacked);
                    drop(delivery);
                }
            }
        });
    }

    fn ack<A: Ack>(&self, waiters: Vec<Waiter<A>>, reason: AckReason) {
        let counter = match reason {
            AckReason::AlreadyCovered => &self.counters.acked_without_work,
            AckReason::Synced => &self.counters.acked_after_sync,
            AckReason::UnknownMailbox => &self.counters.unknown_mailbox,
            AckReason::NeedsAttention => &self.counters.attention_mailbox,
        };
        Counters::add(counter, waiters.len() as u64);
        let now = SystemTime::now();
        for w in waiters {
            if let Some(latency) = w
                .delivery
                .publish_time
                .and_then(|p| now.duration_since(p).ok())
            {
                self.counters.ack_latency.record(latency);
                // The report of the commit covering it just arrived: its ack is that commit.
                if reason == AckReason::Synced {
                    self.counters.committed_after(latency);
                }
            }
            self.counters.handling_latency.record(w.received.elapsed());
            w.delivery.ack.ack();
        }
    }
}

/// Sends a sync's report to the dispatcher; if dropped unsent (the sync panicked), reports
/// `Aborted`, so its waiters are nacked and the dispatcher's bookkeeping stays right.
struct Reporter {
    mailbox: Mailbox,
    done: Option<mpsc::UnboundedSender<SyncDone>>,
}

impl Reporter {
    fn send(&mut self, report: SyncReport) {
        if let Some(done) = self.done.take() {
            // The loop outlives every sync task (it finishes only once each has reported).
            let _ = done.send((self.mailbox.clone(), report));
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.send(SyncReport::Aborted);
    }
}

fn report_of(outcome: SyncOutcome) -> SyncReport {
    match outcome {
        SyncOutcome::UpToDate { cursor } => SyncReport::Covered {
            cursor,
            called_gmail: false,
        },
        SyncOutcome::Synced { cursor, .. } => SyncReport::Covered {
            cursor,
            called_gmail: true,
        },
        SyncOutcome::Unknown => SyncReport::Unknown,
        SyncOutcome::NeedsAttention { .. } => SyncReport::NeedsAttention,
        SyncOutcome::Busy { cursor } => SyncReport::Busy { cursor },
        SyncOutcome::Failed(SyncError::Cancelled) => SyncReport::Aborted,
        SyncOutcome::Deferred(d) => SyncReport::Deferred { after: d.after },
        // Not marked (yet): keep the notification, try again later.
        SyncOutcome::Held { retry_after, .. } => SyncReport::Retryable {
            retry_after: Some(retry_after),
        },
        SyncOutcome::Failed(e) if e.is_retryable() => SyncReport::Retryable {
            retry_after: e.retry_after(),
        },
        // Permanent: the sync marked the mailbox as needing attention.
        SyncOutcome::Failed(_) => SyncReport::NeedsAttention,
    }
}

#[cfg(test)]
mod tests;
