//! The StreamingPull consumer: receives notifications, feeds the [`Coalescer`], runs syncs and
//! carries out acks.
//!
//! Tasks (all on the app's one `TaskTracker`):
//! - the **reader** owns the `MessageStream` and only moves `(Message, Handler)` pairs into a
//!   bounded channel. `MessageStream::next` takes `&mut self`, so one reader; the bounded channel
//!   plus the client's flow control (`max_outstanding_messages`) bound what is held in memory;
//! - the **dispatcher** (this module's `select!` loop) owns the coalescer. Only it touches the
//!   state machine, so no lock is needed; it never awaits IO itself;
//! - one **sync task** per mailbox sync, limited by a semaphore (`GMAIL_SYNC_MAX_CONCURRENT_SYNCS`);
//!   it reports back on a channel. Notifications waiting for a sync hold no permit;
//! - one short **quarantine task** per malformed message (XADD, then ack).
//!
//! Shutdown ([`ShutdownMode`]): on cancellation the reader stops pulling, waiters not in a sync
//! are given back at once, syncs in flight get `shutdown_timeout` to finish (their waiters are
//! acked if covered), then the rest are cancelled; their handlers are dropped, which nacks them.

pub mod coalescer;
pub mod subscription;

use crate::config::ConsumerSettings;
use crate::history_id::HistoryId;
use crate::mailbox::Mailbox;
use crate::notification;
use crate::store::Quarantined;
use crate::sync::{SyncError, SyncOutcome, Syncer};
use crate::telemetry::Counters;
use coalescer::{AckReason, Coalescer, CoalescerSettings, Effect, SyncReport, Waiter};
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::MessageStream;
use google_cloud_pubsub::subscriber::handler::Handler;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::time::DelayQueue;

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

    fn grace(self) -> Duration {
        match self {
            ShutdownMode::Graceful { timeout } => timeout,
            ShutdownMode::NackImmediately => Duration::ZERO,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The subscription stream ended with a permanent error (e.g. subscription deleted,
    /// permission revoked). The process exits non-zero after a graceful drain.
    #[error("the Pub/Sub stream failed permanently: {0}")]
    Stream(#[source] google_cloud_pubsub::Error),
}

pub struct Consumer {
    pub syncer: Arc<Syncer>,
    pub settings: ConsumerSettings,
    pub counters: Arc<Counters>,
    pub tracker: TaskTracker,
    /// Bumped on every dispatcher turn and heartbeat tick: proof of life for the health file.
    pub heartbeat: Arc<AtomicU64>,
}

type Delivery = (Message, Handler);

impl Consumer {
    /// Consumes `stream` until `shutdown` is cancelled or the stream fails for good.
    pub async fn run(
        self,
        stream: MessageStream,
        shutdown: CancellationToken,
    ) -> Result<(), ConsumerError> {
        let (msg_tx, mut msg_rx) = mpsc::channel::<Delivery>(256);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Mailbox, SyncReport)>();
        let stop_reading = shutdown.child_token();
        let cancel_syncs = CancellationToken::new();
        let reader = self
            .tracker
            .spawn(read_stream(stream, msg_tx, stop_reading.clone()));

        let permits = Arc::new(Semaphore::new(self.settings.max_concurrent_syncs));
        let mut coalescer: Coalescer<Handler> = Coalescer::new(CoalescerSettings {
            max_retries: self.settings.sync_retries,
            ..CoalescerSettings::default()
        });
        let mut retries: DelayQueue<Mailbox> = DelayQueue::new();
        let mut effects: Vec<Effect<Handler>> = Vec::new();
        let mut in_flight = 0usize;
        let mut draining = false;
        let mut reader_done = false;
        let grace = ShutdownMode::from_timeout(self.settings.shutdown_timeout).grace();
        let drain_deadline = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(drain_deadline);
        let mut heartbeat = tokio::time::interval(Duration::from_secs(5));

        loop {
            self.heartbeat
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::select! {
                // Completions first: they free capacity and ack messages.
                biased;
                Some((mailbox, report)) = done_rx.recv() => {
                    in_flight -= 1;
                    coalescer.on_sync_done(&mailbox, report, &mut effects);
                }
                Some(expired) = std::future::poll_fn(|cx| retries.poll_expired(cx)), if !retries.is_empty() => {
                    coalescer.on_retry_due(expired.get_ref(), &mut effects);
                }
                delivery = msg_rx.recv(), if !reader_done => match delivery {
                    Some((message, handler)) => self.on_message(message, handler, &mut coalescer, &mut effects),
                    // The reader stopped (shutdown, or the stream ended): drain.
                    None => reader_done = true,
                },
                _ = shutdown.cancelled(), if !draining => {
                    draining = true;
                    tracing::info!(in_flight, "shutting down: stopped pulling, waiting for syncs in flight");
                    drain_deadline.as_mut().reset(tokio::time::Instant::now() + grace);
                },
                _ = &mut drain_deadline, if draining && !cancel_syncs.is_cancelled() => {
                    tracing::warn!(in_flight, "shutdown timeout: cancelling syncs in flight; their messages are nacked");
                    cancel_syncs.cancel();
                }
                _ = heartbeat.tick() => {}
            }
            if reader_done && !draining {
                // The stream ended without a shutdown request (permanent failure): drain too.
                draining = true;
                drain_deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + grace);
            }
            if draining && !stop_reading.is_cancelled() {
                stop_reading.cancel();
                coalescer.start_draining(&mut effects);
                retries.clear();
            }
            for effect in effects.drain(..) {
                match effect {
                    Effect::StartSync { mailbox, target } => {
                        in_flight += 1;
                        self.spawn_sync(mailbox, target, &permits, &done_tx, &cancel_syncs);
                    }
                    Effect::RetryLater { mailbox, after } => {
                        retries.insert(mailbox, after);
                    }
                    Effect::Ack(waiters, reason) => self.ack(waiters, reason),
                    Effect::Nack(waiters) => {
                        Counters::add(&self.counters.nacked, waiters.len() as u64);
                        drop(waiters);
                    }
                }
            }
            if draining && reader_done && in_flight == 0 && coalescer.is_empty() {
                break;
            }
        }
        // Messages still buffered in the channel are dropped here: nacked.
        drop(msg_rx);
        let stream_result = reader.await.unwrap_or(Ok(None));
        match stream_result {
            Ok(Some(stream)) => {
                // Every handler is consumed by now, so WaitForProcessing only flushes acks.
                let token = stream.shutdown_token();
                drop(stream);
                if tokio::time::timeout(Duration::from_secs(10), token.shutdown())
                    .await
                    .is_err()
                {
                    tracing::warn!("the Pub/Sub stream did not shut down within 10 s");
                }
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn on_message(
        &self,
        message: Message,
        handler: Handler,
        coalescer: &mut Coalescer<Handler>,
        effects: &mut Vec<Effect<Handler>>,
    ) {
        Counters::inc(&self.counters.received);
        match notification::decode(&message.data) {
            Ok(n) => {
                let published = message
                    .publish_time
                    .and_then(|t| SystemTime::try_from(t).ok());
                coalescer.on_notification(
                    n.mailbox,
                    Waiter::new(n.history_id, handler, published),
                    effects,
                );
            }
            Err(reason) => {
                let store = self.syncer.store().clone();
                let counters = self.counters.clone();
                self.tracker.spawn(async move {
                    let publish_time = message
                        .publish_time
                        .map(|t| format!("{}.{:09}", t.seconds(), t.nanos()))
                        .unwrap_or_default();
                    let reason = reason.to_string();
                    let q = Quarantined {
                        reason: &reason,
                        data: &message.data,
                        message_id: &message.message_id,
                        publish_time: &publish_time,
                    };
                    match store.quarantine(&q).await {
                        Ok(()) => {
                            tracing::warn!(message_id = %message.message_id, reason = %reason, "malformed notification quarantined");
                            Counters::inc(&counters.quarantined);
                            handler.ack();
                        }
                        Err(e) => {
                            // Not recorded, so not acked: Pub/Sub redelivers it (I6).
                            tracing::warn!(error = %e, "could not quarantine a malformed notification; nacking it");
                            Counters::inc(&counters.nacked);
                            drop(handler);
                        }
                    }
                });
            }
        }
    }

    fn spawn_sync(
        &self,
        mailbox: Mailbox,
        target: HistoryId,
        permits: &Arc<Semaphore>,
        done: &mpsc::UnboundedSender<(Mailbox, SyncReport)>,
        cancel: &CancellationToken,
    ) {
        let syncer = self.syncer.clone();
        let permits = permits.clone();
        let done = done.clone();
        let cancel = cancel.clone();
        self.tracker.spawn(async move {
            // Reports exactly once, even if the sync panics: the dispatcher counts syncs in
            // flight and would otherwise wait for this one forever at shutdown.
            let mut reporter = Reporter(Some((mailbox, done)));
            let mailbox = &reporter.0.as_ref().expect("set above").0;
            let report = tokio::select! {
                permit = permits.acquire_owned() => {
                    let _permit = permit.expect("the semaphore is never closed");
                    report_of(syncer.sync(mailbox, target, &cancel).await)
                }
                _ = cancel.cancelled() => SyncReport::Aborted,
            };
            reporter.send(report);
        });
    }

    fn ack(&self, waiters: Vec<Waiter<Handler>>, reason: AckReason) {
        let counter = match reason {
            AckReason::AlreadyCovered => &self.counters.acked_without_work,
            AckReason::Synced => &self.counters.acked_after_sync,
            AckReason::UnknownMailbox => &self.counters.unknown_mailbox,
            AckReason::Disabled => &self.counters.disabled_mailbox,
        };
        Counters::add(counter, waiters.len() as u64);
        let now = SystemTime::now();
        for w in waiters {
            if let Some(latency) = w.published.and_then(|p| now.duration_since(p).ok()) {
                self.counters.ack_latency.record(latency);
            }
            self.counters.handling_latency.record(w.received.elapsed());
            w.ack.ack();
        }
    }
}

/// Sends a sync's report to the dispatcher; if dropped unsent (the sync panicked), reports
/// `Aborted`, so its waiters are nacked and the dispatcher's count stays right.
struct Reporter(Option<(Mailbox, mpsc::UnboundedSender<(Mailbox, SyncReport)>)>);

impl Reporter {
    fn send(&mut self, report: SyncReport) {
        if let Some((mailbox, done)) = self.0.take() {
            // The dispatcher outlives every sync task (it waits for in_flight == 0).
            let _ = done.send((mailbox, report));
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
        SyncOutcome::Disabled { .. } => SyncReport::Disabled,
        SyncOutcome::Busy { cursor } => SyncReport::Busy { cursor },
        SyncOutcome::Failed(SyncError::Cancelled) => SyncReport::Aborted,
        SyncOutcome::Failed(e) if e.is_retryable() => SyncReport::Retryable {
            retry_after: e.retry_after(),
        },
        // Permanent: the sync marked the mailbox as needing attention.
        SyncOutcome::Failed(_) => SyncReport::Disabled,
    }
}

/// Moves deliveries from the stream into the dispatcher's channel until told to stop or the
/// stream ends. Returns the stream (for a clean shutdown) or its permanent error.
async fn read_stream(
    mut stream: MessageStream,
    tx: mpsc::Sender<Delivery>,
    stop: CancellationToken,
) -> Result<Option<MessageStream>, ConsumerError> {
    loop {
        let item = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(Some(stream)),
            item = stream.next() => item,
        };
        match item {
            Some(Ok(delivery)) => {
                // Waiting here is the backpressure: the dispatcher is behind.
                let sent = tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(Some(stream)),
                    sent = tx.send(delivery) => sent,
                };
                if sent.is_err() {
                    return Ok(Some(stream));
                }
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "the Pub/Sub stream failed permanently");
                return Err(ConsumerError::Stream(e));
            }
            None => return Ok(None),
        }
    }
}
