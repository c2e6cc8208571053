//! The dispatcher: the consumer's whole decision logic as a synchronous state machine.
//!
//! The consumer's `select!` loop turns what happens into one closed [`Event`], calls
//! [`Dispatcher::handle`] once, and carries out the [`Effect`]s it returns. Per-mailbox rules
//! (when to sync, which waiters to ack) live in the [`Coalescer`]; this layer adds decoding,
//! quarantine, and the lifecycle of the whole consumer: running → draining → finished.
//!
//! Because it does no IO and never awaits, every rule here is unit-tested without Pub/Sub,
//! Redis or Gmail, and the consumer's timing is tested with paused time (see `consumer::tests`).

use super::ShutdownMode;
use super::coalescer::{AckReason, Coalescer, CoalescerSettings, OpenWindows, SyncReport, Waiter};
use super::delivery::{Ack, Delivery};
use crate::history_id::HistoryId;
use crate::mailbox::Mailbox;
use crate::notification::{self, Malformed};
use std::fmt;
use std::time::Duration;

/// Everything the dispatcher reacts to.
pub enum Event<A> {
    /// A message arrived.
    Delivery(Delivery<A>),
    /// A sync task finished (exactly once per `StartSync`).
    SyncDone(Mailbox, SyncReport),
    /// A `RetryLater` delay elapsed.
    RetryDue(Mailbox),
    /// SIGTERM/SIGINT, or the supervisor stopping the process.
    ShutdownRequested,
    /// The reader stopped and the delivery channel is empty and closed.
    ReaderEnded,
    /// The drain deadline armed by `ArmDrainDeadline` passed.
    GraceExpired,
}

/// Everything the dispatcher asks the IO shell to do.
pub enum Effect<A> {
    StartSync {
        mailbox: Mailbox,
        target: HistoryId,
    },
    RetryLater {
        mailbox: Mailbox,
        after: Duration,
    },
    Ack(Vec<Waiter<A>>, AckReason),
    Nack(Vec<Waiter<A>>),
    /// Copy the message (its first bytes) to the quarantine stream, then ack it (nack if the
    /// copy fails): the one ack that is not `Ack`, because it follows a write of its own (I6),
    /// not a cursor.
    Quarantine {
        delivery: Delivery<A>,
        reason: QuarantineReason,
    },
    /// Tell the reader to stop pulling.
    StopReading,
    /// Send `GraceExpired` after this long.
    ArmDrainDeadline(Duration),
    /// Cancel every sync in flight at its next await point (committed pages stay).
    CancelSyncs,
    /// Nothing is left: the loop ends.
    Finished,
}

/// Why a message goes to the quarantine stream instead of being synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuarantineReason {
    /// Not a notification at all.
    Malformed(Malformed),
    /// A sync read Gmail's history up to `cursor` and the notification's historyId was still
    /// ahead after `waited` (more than GMAIL_SYNC_HISTORY_LAG_SECS since it was published):
    /// forged, or far ahead of the mailbox's real history.
    HistoryNotReached {
        history_id: HistoryId,
        cursor: HistoryId,
        waited: Duration,
    },
}

impl fmt::Display for QuarantineReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuarantineReason::Malformed(m) => m.fmt(f),
            QuarantineReason::HistoryNotReached {
                history_id,
                cursor,
                waited,
            } => write!(
                f,
                "historyId {history_id} never reached: Gmail's history stayed at {cursor} for {}s \
                 after publish (GMAIL_SYNC_HISTORY_LAG_SECS)",
                waited.as_secs()
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Running,
    /// No new work; syncs in flight finish or are cancelled.
    Draining {
        syncs_cancelled: bool,
    },
    Finished,
}

pub struct Dispatcher<A> {
    coalescer: Coalescer<A>,
    shutdown_mode: ShutdownMode,
    stage: Stage,
    reader_ended: bool,
}

impl<A: Ack> Dispatcher<A> {
    pub fn new(settings: CoalescerSettings, shutdown_mode: ShutdownMode) -> Dispatcher<A> {
        Dispatcher {
            coalescer: Coalescer::new(settings),
            shutdown_mode,
            stage: Stage::Running,
            reader_ended: false,
        }
    }

    /// Whether the shell should still read the delivery channel.
    pub fn wants_deliveries(&self) -> bool {
        !self.reader_ended
    }

    /// Whether a shutdown request would still change anything.
    pub fn is_running(&self) -> bool {
        self.stage == Stage::Running
    }

    pub fn handle(&mut self, event: Event<A>, out: &mut Vec<Effect<A>>) {
        match event {
            Event::Delivery(delivery) => self.on_delivery(delivery, out),
            Event::SyncDone(mailbox, report) => self.coalescer.on_sync_done(&mailbox, report, out),
            Event::RetryDue(mailbox) => self.coalescer.on_retry_due(&mailbox, out),
            Event::ShutdownRequested => self.drain(out),
            Event::ReaderEnded => {
                self.reader_ended = true;
                // Without a shutdown request the stream failed for good: drain all the same.
                self.drain(out);
            }
            Event::GraceExpired => {
                if let Stage::Draining {
                    syncs_cancelled: false,
                } = self.stage
                {
                    self.stage = Stage::Draining {
                        syncs_cancelled: true,
                    };
                    out.push(Effect::CancelSyncs);
                }
            }
        }
        self.finish_if_done(out);
    }

    fn on_delivery(&mut self, delivery: Delivery<A>, out: &mut Vec<Effect<A>>) {
        match notification::decode(&delivery.data) {
            Ok(n) => {
                self.coalescer
                    .on_notification(n.mailbox, Waiter::new(n.history_id, delivery), out)
            }
            Err(reason) => out.push(Effect::Quarantine {
                delivery,
                reason: QuarantineReason::Malformed(reason),
            }),
        }
    }

    fn drain(&mut self, out: &mut Vec<Effect<A>>) {
        if self.stage != Stage::Running {
            return;
        }
        if !self.reader_ended {
            out.push(Effect::StopReading);
        }
        let windows = match self.shutdown_mode {
            ShutdownMode::Graceful { .. } => OpenWindows::SyncNow,
            ShutdownMode::NackImmediately => OpenWindows::GiveBack,
        };
        self.coalescer.start_draining(windows, out);
        match self.shutdown_mode {
            ShutdownMode::Graceful { timeout } => {
                self.stage = Stage::Draining {
                    syncs_cancelled: false,
                };
                out.push(Effect::ArmDrainDeadline(timeout));
            }
            ShutdownMode::NackImmediately => {
                self.stage = Stage::Draining {
                    syncs_cancelled: true,
                };
                out.push(Effect::CancelSyncs);
            }
        }
    }

    fn finish_if_done(&mut self, out: &mut Vec<Effect<A>>) {
        if matches!(self.stage, Stage::Draining { .. })
            && self.reader_ended
            && self.coalescer.is_empty()
        {
            self.stage = Stage::Finished;
            out.push(Effect::Finished);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::delivery::Probe;
    use std::sync::{Arc, Mutex};

    struct Bed {
        d: Dispatcher<Probe>,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Bed {
        fn new(mode: ShutdownMode) -> Bed {
            Bed {
                d: Dispatcher::new(CoalescerSettings::default(), mode),
                log: Arc::default(),
            }
        }

        fn delivery(&self, id: &str, data: &str) -> Event<Probe> {
            Event::Delivery(Delivery {
                data: bytes::Bytes::from(data.to_string()),
                message_id: id.into(),
                publish_time: None,
                ack: Probe::new(id, &self.log),
            })
        }

        /// Handles `event`, carries out acks and nacks, and names the other effects.
        fn step(&mut self, event: Event<Probe>) -> Vec<String> {
            let mut out = Vec::new();
            self.d.handle(event, &mut out);
            let mut names = Vec::new();
            for e in out {
                names.push(match e {
                    Effect::StartSync { target, .. } => format!("sync:{target}"),
                    Effect::RetryLater { .. } => "retry".into(),
                    Effect::Ack(ws, _) => {
                        ws.into_iter().for_each(|w| w.delivery.ack.ack());
                        continue;
                    }
                    Effect::Nack(ws) => {
                        drop(ws);
                        continue;
                    }
                    Effect::Quarantine { delivery, .. } => {
                        delivery.ack.ack();
                        "quarantine".into()
                    }
                    Effect::StopReading => "stop_reading".into(),
                    Effect::ArmDrainDeadline(d) => format!("deadline:{}s", d.as_secs()),
                    Effect::CancelSyncs => "cancel_syncs".into(),
                    Effect::Finished => "finished".into(),
                });
            }
            names
        }

        fn log(&self) -> Vec<String> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }
    }

    fn note(email: &str, h: u64) -> String {
        format!(r#"{{"emailAddress":"{email}","historyId":"{h}"}}"#)
    }

    fn mailbox(email: &str) -> Mailbox {
        Mailbox::parse(email).unwrap()
    }

    const GRACE: ShutdownMode = ShutdownMode::Graceful {
        timeout: Duration::from_secs(30),
    };

    #[test]
    fn graceful_shutdown_waits_for_syncs_then_finishes() {
        let mut b = Bed::new(GRACE);
        let e = b.delivery("1", &note("a@x.com", 5));
        assert_eq!(b.step(e), vec!["sync:5"]);
        assert_eq!(
            b.step(Event::ShutdownRequested),
            vec!["stop_reading", "deadline:30s"]
        );
        assert!(!b.d.is_running());
        assert!(b.step(Event::ShutdownRequested).is_empty(), "once only");
        // A buffered delivery that arrives while draining is given back.
        let e = b.delivery("2", &note("b@x.com", 1));
        assert!(b.step(e).is_empty());
        assert_eq!(b.log(), vec!["nack:2"]);
        assert!(
            b.step(Event::ReaderEnded).is_empty(),
            "a sync is still in flight"
        );
        assert!(!b.d.wants_deliveries());
        let done = Event::SyncDone(
            mailbox("a@x.com"),
            SyncReport::Covered {
                cursor: HistoryId(5),
                called_gmail: true,
            },
        );
        assert_eq!(b.step(done), vec!["finished"]);
        assert_eq!(b.log(), vec!["ack:1"]);
    }

    #[test]
    fn grace_expiry_cancels_syncs_once() {
        let mut b = Bed::new(GRACE);
        let e = b.delivery("1", &note("a@x.com", 5));
        b.step(e);
        b.step(Event::ShutdownRequested);
        b.step(Event::ReaderEnded);
        assert_eq!(b.step(Event::GraceExpired), vec!["cancel_syncs"]);
        assert!(b.step(Event::GraceExpired).is_empty());
        let aborted = Event::SyncDone(mailbox("a@x.com"), SyncReport::Aborted);
        assert_eq!(b.step(aborted), vec!["finished"]);
        assert_eq!(b.log(), vec!["nack:1"]);
    }

    #[test]
    fn nack_immediately_cancels_syncs_at_once() {
        let mut b = Bed::new(ShutdownMode::NackImmediately);
        let e = b.delivery("1", &note("a@x.com", 5));
        b.step(e);
        assert_eq!(
            b.step(Event::ShutdownRequested),
            vec!["stop_reading", "cancel_syncs"]
        );
        assert!(b.step(Event::GraceExpired).is_empty());
    }

    #[test]
    fn reader_ending_on_its_own_drains_too() {
        let mut b = Bed::new(GRACE);
        assert_eq!(
            b.step(Event::ReaderEnded),
            vec!["deadline:30s", "finished"],
            "nothing in flight: done at once, and no StopReading for a reader already gone"
        );
    }

    #[test]
    fn malformed_input_is_quarantined_not_coalesced() {
        let mut b = Bed::new(GRACE);
        let e = b.delivery("bad", "not json");
        assert_eq!(b.step(e), vec!["quarantine"]);
        assert_eq!(b.log(), vec!["ack:bad"]);
        let e = b.delivery("bad2", &note("a@x.com", 5).replace("historyId", "h"));
        assert_eq!(b.step(e), vec!["quarantine"]);
    }
}
