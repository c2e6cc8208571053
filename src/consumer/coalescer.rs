//! The coalescer: a small synchronous state machine deciding, per mailbox, when to sync and
//! which notifications to ack, retry or give back. It does no IO; the dispatcher feeds it
//! events and carries out the [`Effect`]s it returns, which keeps every ack decision testable
//! without Pub/Sub.
//!
//! Rules (ARCHITECTURE.md, "Invariants and where they are kept"):
//! - at most one sync per mailbox at a time in this process; notifications that arrive meanwhile
//!   wait for it;
//! - the coalescing window (GMAIL_SYNC_COALESCE_WINDOW_MS): a sync starts `window` after the
//!   oldest notification that no sync has seen yet arrived, not at once, so the notifications
//!   of a mailbox that arrive within the window (and the changes Gmail records meanwhile) share
//!   one `history.list`; those that arrive while a sync runs share one follow-up sync, which
//!   waits for the rest of their window. A notification the committed cursor already covers
//!   (known from this process's own syncs) is acked at once, never held for a window: the
//!   window only ever delays a Gmail read, never an ack past its commit;
//! - a notification is acked only when a committed cursor ≥ its historyId is known (I1);
//! - waiters that arrived during a sync and are not covered by it get a new sync at once;
//!   waiters the sync already saw and still not covered (Gmail delivered the notification before
//!   history showed the change) are retried after a growing delay until they are
//!   `history_lag` old (counted from their publish time, so a redelivery does not restart the
//!   clock); then Gmail's history never reached them (a forged or far-ahead historyId) and they
//!   are quarantined with the reason, then acked — never nacked to come back and cost Gmail
//!   quota again. Nothing is lost by that: a later sync of the mailbox (the next notification,
//!   or the scheduler's fallback sync) reads everything after the cursor anyway;
//! - another worker holding the lease: poll the cursor again shortly (it will usually pass the
//!   waiters' historyIds), bounded, then nack;
//! - retryable failures back off; permanent ones were recorded on the mailbox, whose
//!   notifications are then acked (its cursor is kept, nothing is lost).

use super::delivery::{Ack, Delivery};
use super::dispatcher::{Effect, QuarantineReason};
use crate::history_id::HistoryId;
use crate::mailbox::Mailbox;
use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The shortest wait before re-reading history for waiters close to their `history_lag`: a
/// retry is never a busy loop.
const MIN_NOT_VISIBLE_WAIT: Duration = Duration::from_millis(100);

/// How many mailboxes' committed cursors the coalescer remembers (to ack notifications they
/// already cover without a sync): about 100 bytes each, so at most ~1.6 MiB, and a deployment's
/// active mailboxes fit. When full it forgets them all (a notification then only waits for
/// its window and a `begin` that finds it covered, as without the memory).
const MAX_KNOWN_CURSORS: usize = 16_384;

/// A notification waiting for a committed cursor.
pub struct Waiter<A> {
    pub history_id: HistoryId,
    /// The message: its ack handle (`delivery.ack`), its publish time (for the publish → ack
    /// latency and its age) and what a quarantine entry copies.
    pub delivery: Delivery<A>,
    /// When this process received it, for the receive → ack latency (the worker's own part).
    pub received: Instant,
    /// A sync started after this waiter arrived (so its result speaks for it).
    seen_by_sync: bool,
}

impl<A> Waiter<A> {
    pub fn new(history_id: HistoryId, delivery: Delivery<A>) -> Waiter<A> {
        Waiter {
            history_id,
            delivery,
            received: Instant::now(),
            seen_by_sync: false,
        }
    }

    /// Time since Pub/Sub accepted the notification (or since this process received it, if that
    /// is longer, e.g. without a publish time): redeliveries keep their age.
    fn age(&self) -> Duration {
        let since_published = self
            .delivery
            .publish_time
            .and_then(|p| SystemTime::now().duration_since(p).ok())
            .unwrap_or_default();
        self.received.elapsed().max(since_published)
    }
}

/// Why waiters are acked (for the counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckReason {
    /// The cursor already covered them; no Gmail call was needed for them.
    AlreadyCovered,
    /// A sync of this process committed past them.
    Synced,
    UnknownMailbox,
    /// The mailbox needs attention (permanent error); its cursor is kept.
    NeedsAttention,
}

/// What a finished sync attempt means for the waiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncReport {
    /// The committed cursor is `cursor`; `called_gmail` says whether Gmail was read.
    Covered {
        cursor: HistoryId,
        called_gmail: bool,
    },
    Busy {
        cursor: HistoryId,
    },
    Unknown,
    NeedsAttention,
    Retryable {
        retry_after: Option<Duration>,
    },
    /// The quota governor said wait (nothing held meanwhile: the sync gave its slot and lease
    /// back): ask again after `after`. Not a failure: it uses no retry and is never nacked for.
    Deferred {
        after: Duration,
    },
    /// Shutdown cut the sync short.
    Aborted,
}

#[derive(Clone, Debug)]
pub struct CoalescerSettings {
    /// Retries of retryable sync failures before waiters are nacked.
    pub max_retries: u32,
    /// How old (from publish) a waiter that history does not reach yet may get before it is
    /// quarantined (GMAIL_SYNC_HISTORY_LAG_SECS).
    pub history_lag: Duration,
    /// Lease-busy polls before waiters are nacked.
    pub max_busy_polls: u32,
    pub busy_poll: Duration,
    pub not_visible_base: Duration,
    /// How long a sync waits after the first notification it will cover arrived
    /// (GMAIL_SYNC_COALESCE_WINDOW_MS); zero: it starts at once.
    pub window: Duration,
}

impl Default for CoalescerSettings {
    fn default() -> Self {
        CoalescerSettings {
            max_retries: 8,
            history_lag: Duration::from_secs(45),
            max_busy_polls: 120,
            busy_poll: Duration::from_millis(250),
            not_visible_base: Duration::from_millis(500),
            window: Duration::ZERO,
        }
    }
}

struct MailboxState<A> {
    waiters: Vec<Waiter<A>>,
    phase: Phase,
    /// Retryable failures in a row.
    retries: u32,
    /// Syncs in a row that did not reach a waiter they saw (for the not-yet-visible backoff).
    not_visible: u32,
    busy_polls: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The coalescing window is open: no sync yet, its start is due (`RetryLater`).
    Window,
    Syncing,
    RetryScheduled,
}

/// What a mailbox with waiters left after a sync does next.
enum Next {
    SyncNow,
    /// The follow-up sync, when the window of its first waiter is over.
    Window(Duration),
    /// A retry (failure, busy lease, history not showing the change yet).
    Retry(Duration),
}

/// What shutdown does with mailboxes whose coalescing window is still open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenWindows {
    /// Start their syncs now (a graceful drain: they may still finish within the grace).
    SyncNow,
    /// Give their notifications back (a drain that cancels syncs at once).
    GiveBack,
}

pub struct Coalescer<A> {
    mailboxes: HashMap<Mailbox, MailboxState<A>>,
    /// The highest cursor this process's syncs saw committed, per mailbox (bounded by
    /// [`MAX_KNOWN_CURSORS`]): a notification at or below it is covered already.
    known_cursors: HashMap<Mailbox, HistoryId>,
    settings: CoalescerSettings,
    draining: bool,
}

impl<A: Ack> Coalescer<A> {
    pub fn new(settings: CoalescerSettings) -> Coalescer<A> {
        Coalescer {
            mailboxes: HashMap::new(),
            known_cursors: HashMap::new(),
            settings,
            draining: false,
        }
    }

    /// No mailbox has waiters or a sync in flight (every sync in flight keeps its mailbox's
    /// entry until it reports, so this is also "no sync in flight").
    pub fn is_empty(&self) -> bool {
        self.mailboxes.is_empty()
    }

    pub fn on_notification(
        &mut self,
        mailbox: Mailbox,
        mut waiter: Waiter<A>,
        out: &mut Vec<Effect<A>>,
    ) {
        if self.draining {
            out.push(Effect::Nack(vec![waiter]));
            return;
        }
        if self
            .known_cursors
            .get(&mailbox)
            .is_some_and(|&cursor| waiter.history_id <= cursor)
        {
            out.push(Effect::Ack(vec![waiter], AckReason::AlreadyCovered));
            return;
        }
        match self.mailboxes.entry(mailbox) {
            MapEntry::Occupied(mut e) => e.get_mut().waiters.push(waiter),
            MapEntry::Vacant(e) if self.settings.window.is_zero() => {
                let target = waiter.history_id;
                waiter.seen_by_sync = true;
                let mailbox = e.key().clone();
                e.insert(MailboxState::new(waiter, Phase::Syncing));
                out.push(Effect::StartSync { mailbox, target });
            }
            MapEntry::Vacant(e) => {
                let mailbox = e.key().clone();
                e.insert(MailboxState::new(waiter, Phase::Window));
                out.push(Effect::RetryLater {
                    mailbox,
                    after: self.settings.window,
                });
            }
        }
    }

    /// Remembers a cursor a sync found committed (cursors only move forward).
    fn note_cursor(&mut self, mailbox: &Mailbox, cursor: HistoryId) {
        if let Some(known) = self.known_cursors.get_mut(mailbox) {
            *known = (*known).max(cursor);
            return;
        }
        if self.known_cursors.len() >= MAX_KNOWN_CURSORS {
            self.known_cursors.clear();
        }
        self.known_cursors.insert(mailbox.clone(), cursor);
    }

    pub fn on_sync_done(
        &mut self,
        mailbox: &Mailbox,
        report: SyncReport,
        out: &mut Vec<Effect<A>>,
    ) {
        let Some(mut state) = self.mailboxes.remove(mailbox) else {
            debug_assert!(
                false,
                "sync finished for a mailbox the coalescer does not track"
            );
            return;
        };
        debug_assert_eq!(state.phase, Phase::Syncing);
        let next = match report {
            SyncReport::Unknown => {
                self.known_cursors.remove(mailbox);
                out.push(Effect::Ack(state.waiters, AckReason::UnknownMailbox));
                return;
            }
            SyncReport::NeedsAttention => {
                self.known_cursors.remove(mailbox);
                out.push(Effect::Ack(state.waiters, AckReason::NeedsAttention));
                return;
            }
            SyncReport::Aborted => {
                out.push(Effect::Nack(state.waiters));
                return;
            }
            SyncReport::Covered {
                cursor,
                called_gmail,
            } => {
                self.note_cursor(mailbox, cursor);
                let reason = if called_gmail {
                    AckReason::Synced
                } else {
                    AckReason::AlreadyCovered
                };
                ack_covered(&mut state.waiters, cursor, reason, out);
                let lag = self.settings.history_lag;
                quarantine_unreached(&mut state.waiters, cursor, lag, out);
                if state.waiters.is_empty() {
                    return;
                }
                let seen_left = state
                    .waiters
                    .iter()
                    .filter(|w| w.seen_by_sync)
                    .map(|w| lag.saturating_sub(w.age()))
                    .min();
                match seen_left {
                    // The sync saw these and history did not reach them yet: read again later,
                    // at the latest when the first of them runs out of time.
                    Some(left) => {
                        state.not_visible += 1;
                        let wait = crate::retry::not_yet_visible(
                            self.settings.not_visible_base,
                            state.not_visible,
                        );
                        Next::Retry(wait.min(left.max(MIN_NOT_VISIBLE_WAIT)))
                    }
                    // All arrived during the sync: one follow-up sync for them all, once the
                    // window of the first of them is over.
                    None => {
                        state.retries = 0;
                        state.not_visible = 0;
                        self.window_left(&state.waiters)
                            .map_or(Next::SyncNow, Next::Window)
                    }
                }
            }
            SyncReport::Busy { cursor } => {
                self.note_cursor(mailbox, cursor);
                ack_covered(&mut state.waiters, cursor, AckReason::AlreadyCovered, out);
                if state.waiters.is_empty() {
                    return;
                }
                state.busy_polls += 1;
                if state.busy_polls > self.settings.max_busy_polls {
                    out.push(Effect::Nack(state.waiters));
                    return;
                }
                Next::Retry(self.settings.busy_poll)
            }
            // The waiters stay (the client keeps extending their message leases) and the sync
            // is asked again when the governor said: never a nack loop, never dropped. A wait
            // longer than the message lease lets Pub/Sub redeliver them, which is no loss.
            SyncReport::Deferred { after } => Next::Retry(after),
            SyncReport::Retryable { retry_after } => {
                state.retries += 1;
                if state.retries > self.settings.max_retries {
                    out.push(Effect::Nack(state.waiters));
                    return;
                }
                let backoff = crate::retry::gmail_call(state.retries, None);
                Next::Retry(retry_after.map_or(backoff, |r| r.max(backoff)))
            }
        };
        if self.draining {
            out.push(Effect::Nack(state.waiters));
            return;
        }
        let (phase, after) = match next {
            Next::SyncNow => {
                out.push(start_sync(mailbox, &mut state));
                self.mailboxes.insert(mailbox.clone(), state);
                return;
            }
            Next::Window(after) => (Phase::Window, after),
            Next::Retry(after) => (Phase::RetryScheduled, after),
        };
        state.phase = phase;
        out.push(Effect::RetryLater {
            mailbox: mailbox.clone(),
            after,
        });
        self.mailboxes.insert(mailbox.clone(), state);
    }

    /// A `RetryLater` delay is over: a retry, or the end of a coalescing window. (A delay left
    /// over from a window that shutdown closed early finds the mailbox syncing or gone.)
    pub fn on_retry_due(&mut self, mailbox: &Mailbox, out: &mut Vec<Effect<A>>) {
        if let Some(state) = self.mailboxes.get_mut(mailbox)
            && matches!(state.phase, Phase::RetryScheduled | Phase::Window)
        {
            out.push(start_sync(mailbox, state));
        }
    }

    /// How long until the window of the oldest waiter no sync has seen is over; `None` if it
    /// is over (or the window is off): sync now.
    fn window_left(&self, waiters: &[Waiter<A>]) -> Option<Duration> {
        let oldest = waiters
            .iter()
            .filter(|w| !w.seen_by_sync)
            .map(|w| w.received)
            .min()?;
        let left = self.settings.window.saturating_sub(oldest.elapsed());
        (!left.is_zero()).then_some(left)
    }

    /// Shutdown: no new syncs, except for open coalescing windows when `windows` says so
    /// (their notifications arrived before the shutdown and may still be covered in the
    /// grace). Waiters of mailboxes waiting for a retry are given back now; those of syncs in
    /// flight are acked or given back when their sync ends.
    pub fn start_draining(&mut self, windows: OpenWindows, out: &mut Vec<Effect<A>>) {
        self.draining = true;
        let waiting: Vec<(Mailbox, Phase)> = self
            .mailboxes
            .iter()
            .filter(|(_, s)| s.phase != Phase::Syncing)
            .map(|(m, s)| (m.clone(), s.phase))
            .collect();
        for (m, phase) in waiting {
            if phase == Phase::Window && windows == OpenWindows::SyncNow {
                let state = self.mailboxes.get_mut(&m).expect("listed above");
                out.push(start_sync(&m, state));
            } else if let Some(state) = self.mailboxes.remove(&m) {
                out.push(Effect::Nack(state.waiters));
            }
        }
    }
}

impl<A> MailboxState<A> {
    fn new(first: Waiter<A>, phase: Phase) -> MailboxState<A> {
        MailboxState {
            waiters: vec![first],
            phase,
            retries: 0,
            not_visible: 0,
            busy_polls: 0,
        }
    }
}

fn start_sync<A>(mailbox: &Mailbox, state: &mut MailboxState<A>) -> Effect<A> {
    state.phase = Phase::Syncing;
    let mut target = HistoryId(0);
    for w in &mut state.waiters {
        w.seen_by_sync = true;
        target = target.max(w.history_id);
    }
    Effect::StartSync {
        mailbox: mailbox.clone(),
        target,
    }
}

/// Waiters a sync saw, still above the cursor Gmail's history reached, and older than `lag`:
/// quarantined (then acked by the shell) with the reason.
fn quarantine_unreached<A>(
    waiters: &mut Vec<Waiter<A>>,
    cursor: HistoryId,
    lag: Duration,
    out: &mut Vec<Effect<A>>,
) {
    let (unreached, rest): (Vec<_>, Vec<_>) = std::mem::take(waiters)
        .into_iter()
        .partition(|w| w.seen_by_sync && w.history_id > cursor && w.age() >= lag);
    *waiters = rest;
    for w in unreached {
        out.push(Effect::Quarantine {
            reason: QuarantineReason::HistoryNotReached {
                history_id: w.history_id,
                cursor,
                waited: w.age(),
            },
            delivery: w.delivery,
        });
    }
}

fn ack_covered<A>(
    waiters: &mut Vec<Waiter<A>>,
    cursor: HistoryId,
    reason: AckReason,
    out: &mut Vec<Effect<A>>,
) {
    // The usual case: the commit covers every waiter, and the list itself becomes the ack
    // batch (partitioning it built a new list per sync).
    if waiters.iter().all(|w| w.history_id <= cursor) {
        if !waiters.is_empty() {
            out.push(Effect::Ack(std::mem::take(waiters), reason));
        }
        return;
    }
    let (covered, rest): (Vec<_>, Vec<_>) = std::mem::take(waiters)
        .into_iter()
        .partition(|w| w.history_id <= cursor);
    *waiters = rest;
    if !covered.is_empty() {
        out.push(Effect::Ack(covered, reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::delivery::Probe;
    use std::sync::{Arc, Mutex};

    struct Bed {
        c: Coalescer<Probe>,
        log: Arc<Mutex<Vec<String>>>,
        out: Vec<Effect<Probe>>,
    }

    impl Bed {
        fn new() -> Bed {
            Bed::with(CoalescerSettings::default())
        }
        fn with(settings: CoalescerSettings) -> Bed {
            Bed {
                c: Coalescer::new(settings),
                log: Arc::default(),
                out: Vec::new(),
            }
        }
        fn notify(&mut self, m: &str, h: u64) {
            self.notify_published(m, h, None);
        }
        fn notify_published(&mut self, m: &str, h: u64, published: Option<SystemTime>) {
            let delivery = Delivery {
                data: bytes::Bytes::from(format!(r#"{{"emailAddress":"{m}","historyId":"{h}"}}"#)),
                message_id: h.to_string(),
                publish_time: published,
                ack: Probe::new(h, &self.log),
            };
            self.c.on_notification(
                Mailbox::parse(m).unwrap(),
                Waiter::new(HistoryId(h), delivery),
                &mut self.out,
            );
        }
        fn done(&mut self, m: &str, r: SyncReport) {
            self.c
                .on_sync_done(&Mailbox::parse(m).unwrap(), r, &mut self.out);
        }
        /// Carries out the effects as the dispatcher would; returns a summary of syncs/retries.
        fn apply(&mut self) -> Vec<String> {
            let mut summary = Vec::new();
            for e in self.out.drain(..) {
                match e {
                    Effect::StartSync { target, .. } => summary.push(format!("sync:{}", target.0)),
                    Effect::RetryLater { .. } => summary.push("retry".into()),
                    Effect::Ack(ws, _) => ws.into_iter().for_each(|w| w.delivery.ack.ack()),
                    Effect::Nack(ws) => drop(ws),
                    // The shell acks a quarantined message once its copy is stored.
                    Effect::Quarantine { delivery, reason } => {
                        summary.push(format!("quarantine:{}", delivery.message_id));
                        assert!(
                            matches!(reason, QuarantineReason::HistoryNotReached { .. }),
                            "{reason}"
                        );
                        delivery.ack.ack();
                    }
                    _ => unreachable!(
                        "the coalescer emits only StartSync, RetryLater, Ack, Nack, Quarantine"
                    ),
                }
            }
            summary
        }
        fn log(&self) -> Vec<String> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }
    }

    fn covered(c: u64) -> SyncReport {
        SyncReport::Covered {
            cursor: HistoryId(c),
            called_gmail: true,
        }
    }

    #[test]
    fn one_sync_per_mailbox_and_waiters_acked_together() {
        let mut b = Bed::new();
        b.notify("a@x.com", 10);
        assert_eq!(b.apply(), vec!["sync:10"]);
        b.notify("a@x.com", 12);
        b.notify("a@x.com", 11);
        assert!(b.apply().is_empty(), "no second sync while one runs");
        b.done("a@x.com", covered(12));
        assert!(b.apply().is_empty());
        assert_eq!(b.log(), vec!["ack:10", "ack:12", "ack:11"]);
        assert!(b.c.is_empty());
    }

    #[test]
    fn late_arrivals_get_an_immediate_new_sync() {
        let mut b = Bed::new();
        b.notify("a@x.com", 10);
        b.apply();
        b.notify("a@x.com", 20);
        b.done("a@x.com", covered(15));
        assert_eq!(b.apply(), vec!["sync:20"]);
        assert_eq!(b.log(), vec!["ack:10"]);
    }

    /// The delays of the `RetryLater` effects waiting in `out`.
    fn retry_delays(out: &[Effect<Probe>]) -> Vec<Duration> {
        out.iter()
            .filter_map(|e| match e {
                Effect::RetryLater { after, .. } => Some(*after),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn not_yet_visible_is_retried_within_the_lag_then_quarantined_never_nacked() {
        let lag = Duration::from_millis(300);
        let mut b = Bed::with(CoalescerSettings {
            history_lag: lag,
            max_retries: 1,
            ..CoalescerSettings::default()
        });
        let m = Mailbox::parse("a@x.com").unwrap();
        b.notify_published("a@x.com", 50, Some(SystemTime::now()));
        assert_eq!(b.apply(), vec!["sync:50"]);
        // More retries than max_retries: that budget is for failures, not for Gmail's lag.
        for _ in 0..3 {
            b.done("a@x.com", covered(40));
            let delays = retry_delays(&b.out);
            assert_eq!(delays.len(), 1);
            assert!(delays[0] <= lag, "never waits past the lag: {delays:?}");
            assert_eq!(b.apply(), vec!["retry"]);
            b.c.on_retry_due(&m, &mut b.out);
            assert_eq!(b.apply(), vec!["sync:50"]);
        }
        assert!(
            b.log().is_empty(),
            "neither acked nor nacked while within the lag"
        );
        std::thread::sleep(lag);
        b.done("a@x.com", covered(40));
        assert_eq!(b.apply(), vec!["quarantine:50"]);
        assert_eq!(
            b.log(),
            vec!["ack:50"],
            "acked after its quarantine record, not nacked"
        );
        assert!(b.c.is_empty(), "no further sync for it");
    }

    #[test]
    fn a_genuine_notification_within_the_lag_is_acked_when_history_catches_up() {
        let mut b = Bed::new();
        let m = Mailbox::parse("a@x.com").unwrap();
        b.notify_published("a@x.com", 50, Some(SystemTime::now()));
        b.apply();
        b.done("a@x.com", covered(40));
        assert_eq!(b.apply(), vec!["retry"]);
        b.c.on_retry_due(&m, &mut b.out);
        assert_eq!(b.apply(), vec!["sync:50"]);
        b.done("a@x.com", covered(55));
        assert!(b.apply().is_empty());
        assert_eq!(b.log(), vec!["ack:50"]);
    }

    #[test]
    fn the_lag_counts_from_publish_so_an_old_redelivery_is_quarantined_at_its_first_miss() {
        let mut b = Bed::new();
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        b.notify_published("a@x.com", 50, Some(an_hour_ago));
        b.notify_published("b@x.com", 7, Some(an_hour_ago));
        b.apply();
        // Arrived during the sync: not yet seen by one, so not judged by its result.
        b.notify_published("a@x.com", 60, Some(an_hour_ago));
        b.notify_published("a@x.com", 45, Some(an_hour_ago));
        b.done("a@x.com", covered(48));
        assert_eq!(b.apply(), vec!["quarantine:50", "sync:60"]);
        assert_eq!(b.log(), vec!["ack:45", "ack:50"]);
        b.done("a@x.com", covered(48));
        assert_eq!(b.apply(), vec!["quarantine:60"]);
        // An old backlog that history covers is acked as usual.
        b.done("b@x.com", covered(9));
        b.apply();
        assert_eq!(b.log(), vec!["ack:60", "ack:7"]);
        assert!(b.c.is_empty());
    }

    #[test]
    fn busy_lease_polls_and_acks_when_the_other_worker_commits() {
        let mut b = Bed::new();
        let m = Mailbox::parse("a@x.com").unwrap();
        b.notify("a@x.com", 30);
        b.apply();
        b.done(
            "a@x.com",
            SyncReport::Busy {
                cursor: HistoryId(20),
            },
        );
        assert_eq!(b.apply(), vec!["retry"]);
        assert!(
            b.log().is_empty(),
            "nothing acked while the cursor is behind"
        );
        b.c.on_retry_due(&m, &mut b.out);
        assert_eq!(b.apply(), vec!["sync:30"]);
        b.done(
            "a@x.com",
            SyncReport::Covered {
                cursor: HistoryId(35),
                called_gmail: false,
            },
        );
        b.apply();
        assert_eq!(b.log(), vec!["ack:30"]);
    }

    #[test]
    fn unknown_and_attention_mailboxes_are_acked_failures_back_off() {
        let mut b = Bed::new();
        b.notify("u@x.com", 1);
        b.notify("d@x.com", 2);
        b.notify("f@x.com", 3);
        b.apply();
        b.done("u@x.com", SyncReport::Unknown);
        b.done("d@x.com", SyncReport::NeedsAttention);
        b.done(
            "f@x.com",
            SyncReport::Retryable {
                retry_after: Some(Duration::from_secs(3)),
            },
        );
        let effects: Vec<_> = b
            .out
            .iter()
            .filter_map(|e| match e {
                Effect::RetryLater { after, .. } => Some(*after),
                _ => None,
            })
            .collect();
        assert_eq!(effects.len(), 1);
        assert!(effects[0] >= Duration::from_secs(3), "Retry-After honoured");
        b.apply();
        assert_eq!(b.log(), vec!["ack:1", "ack:2"]);
    }

    #[test]
    fn quota_deferrals_are_waited_out_never_nacked_and_use_no_retry() {
        let mut b = Bed::with(CoalescerSettings {
            max_retries: 0,
            ..CoalescerSettings::default()
        });
        let m = Mailbox::parse("q@x.com").unwrap();
        b.notify("q@x.com", 5);
        assert_eq!(b.apply(), vec!["sync:5"]);
        for _ in 0..20 {
            b.notify("q@x.com", 6);
            b.done(
                "q@x.com",
                SyncReport::Deferred {
                    after: Duration::from_secs(7),
                },
            );
            assert_eq!(retry_delays(&b.out), vec![Duration::from_secs(7)]);
            assert_eq!(b.apply(), vec!["retry"]);
            assert!(
                b.log().is_empty(),
                "neither acked nor nacked while deferred"
            );
            b.c.on_retry_due(&m, &mut b.out);
            assert_eq!(b.apply(), vec!["sync:6"]);
        }
        // A real failure after the deferrals still has its (zero) retries: nacked.
        b.done("q@x.com", SyncReport::Retryable { retry_after: None });
        b.apply();
        assert_eq!(b.log().len(), 21);
        assert!(b.c.is_empty());
    }

    fn windowed() -> Bed {
        Bed::with(CoalescerSettings {
            window: Duration::from_millis(300),
            ..CoalescerSettings::default()
        })
    }

    #[test]
    fn a_window_delays_the_first_sync_and_gathers_what_arrives_in_it() {
        let mut b = windowed();
        let m = Mailbox::parse("a@x.com").unwrap();
        b.notify("a@x.com", 10);
        assert_eq!(retry_delays(&b.out), vec![Duration::from_millis(300)]);
        assert_eq!(b.apply(), vec!["retry"]);
        b.notify("a@x.com", 14);
        b.notify("a@x.com", 12);
        assert!(b.apply().is_empty(), "no sync while the window is open");
        b.c.on_retry_due(&m, &mut b.out);
        assert_eq!(b.apply(), vec!["sync:14"]);
        b.done("a@x.com", covered(15));
        assert!(b.apply().is_empty());
        assert_eq!(b.log(), vec!["ack:10", "ack:14", "ack:12"]);
        // Known to be covered now: acked without a window or a sync.
        b.notify("a@x.com", 13);
        assert!(b.apply().is_empty());
        assert_eq!(b.log(), vec!["ack:13"]);
        assert!(b.c.is_empty());
    }

    #[test]
    fn arrivals_during_a_sync_wait_for_the_rest_of_their_window_then_share_one_sync() {
        let mut b = windowed();
        let m = Mailbox::parse("a@x.com").unwrap();
        b.notify("a@x.com", 10);
        b.apply();
        b.c.on_retry_due(&m, &mut b.out);
        assert_eq!(b.apply(), vec!["sync:10"]);
        b.notify("a@x.com", 20);
        b.notify("a@x.com", 21);
        b.done("a@x.com", covered(15));
        let delays = retry_delays(&b.out);
        assert_eq!(delays.len(), 1, "one follow-up");
        assert!(delays[0] <= Duration::from_millis(300), "{delays:?}");
        assert_eq!(b.apply(), vec!["retry"]);
        b.c.on_retry_due(&m, &mut b.out);
        assert_eq!(b.apply(), vec!["sync:21"]);
    }

    #[test]
    fn draining_syncs_open_windows_or_gives_them_back() {
        for (windows, effects, log) in [
            (OpenWindows::SyncNow, vec!["sync:5"], vec!["ack:5"]),
            (OpenWindows::GiveBack, vec![], vec!["nack:5"]),
        ] {
            let mut b = windowed();
            let m = Mailbox::parse("a@x.com").unwrap();
            b.notify("a@x.com", 5);
            b.apply();
            b.c.start_draining(windows, &mut b.out);
            assert_eq!(b.apply(), effects, "{windows:?}");
            // The window's own delay, left over, changes nothing.
            b.c.on_retry_due(&m, &mut b.out);
            assert!(b.apply().is_empty());
            if windows == OpenWindows::SyncNow {
                b.done("a@x.com", covered(5));
                b.apply();
            }
            assert_eq!(b.log(), log, "{windows:?}");
            assert!(b.c.is_empty());
        }
    }

    #[test]
    fn draining_gives_back_waiting_and_uncovered_waiters() {
        let mut b = Bed::new();
        let m = Mailbox::parse("r@x.com").unwrap();
        b.notify("r@x.com", 5);
        b.notify("s@x.com", 7);
        b.apply();
        b.done("r@x.com", SyncReport::Retryable { retry_after: None });
        b.apply();
        b.notify("s@x.com", 9);
        b.c.start_draining(OpenWindows::SyncNow, &mut b.out);
        b.apply();
        assert_eq!(b.log(), vec!["nack:5"]);
        b.done("s@x.com", covered(7));
        b.apply();
        assert_eq!(b.log(), vec!["ack:7", "nack:9"]);
        b.c.on_retry_due(&m, &mut b.out);
        assert!(b.apply().is_empty());
        b.notify("t@x.com", 1);
        b.apply();
        assert_eq!(b.log(), vec!["nack:1"]);
        assert!(b.c.is_empty());
    }
}
