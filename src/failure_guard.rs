//! Telling a broken mailbox from a broken deployment.
//!
//! A permanent failure of one mailbox (its grant revoked, Gmail disabled for it) parks that
//! mailbox until someone re-authorizes it. But when most mailboxes fail the same way within
//! minutes (a wrong scope, a missing delegation grant, a proxy answering HTML), parking them all
//! would silently disable the whole deployment for a configuration error. So a permanent failure
//! is not acted on at once: [`FailureGuard::judge`] returns a [`Verdict`].
//!
//! - The first sighting of a mailbox's failure is **deferred** for the settle time
//!   (`GMAIL_SYNC_FAILURE_SETTLE_SECS`): its notification is retried, not acked.
//! - If, within the window, at least [`TRIP_MIN_MAILBOXES`] mailboxes fail with the same cause
//!   and they are more than [`TRIP_FRACTION`] of the mailboxes seen, the guard **trips**: every
//!   such failure is **held** (retried, then nacked: cursors and notifications are kept), the
//!   worker reports not-ready, and one error line names the cause.
//! - A failure whose cause is the deployment's by nature (a misconfigured credential) trips the
//!   guard at once.
//! - Otherwise, once the settle time has passed, the mailbox is **marked**.
//!
//! Pure logic: callers pass the time. [`SharedGuard`] wraps it for the sync and scheduler paths.

use crate::mailbox::Mailbox;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How far back outcomes count. Long enough to see a mass failure build up across mailboxes
/// that are notified minutes apart, short enough that a fixed configuration clears it soon.
pub(crate) const WINDOW: Duration = Duration::from_secs(10 * 60);
/// Fewest distinct mailboxes failing alike that can be a mass failure: below it, a small
/// deployment's few broken mailboxes are treated one by one.
pub(crate) const TRIP_MIN_MAILBOXES: usize = 5;
/// "Most mailboxes": the failing share of the mailboxes seen in the window above which the
/// failure is the deployment's.
pub(crate) const TRIP_FRACTION: f64 = 0.5;
/// Mailboxes remembered at most: at ~100 bytes each, 1 MiB. Beyond it, successes are not
/// recorded (there is evidence enough that the deployment works); failures always are.
const CAPACITY: usize = 10_000;
/// How long a held failure waits before it is retried (the cause is not going to go away in
/// seconds, and each retry costs a Gmail call).
pub(crate) const HOLD_RETRY: Duration = Duration::from_secs(60);

/// Whose failure it is, as far as the caller knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Blame {
    /// Might be this mailbox's (revoked grant, Gmail disabled, 403 for this user...).
    Mailbox,
    /// The deployment's by nature (misconfigured credentials).
    Deployment,
}

/// What to do with a permanent failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Park the mailbox (its own fault: others are fine).
    Mark,
    /// Not yet: retry after this long; the failure may turn out to be everyone's.
    Defer { retry_after: Duration },
    /// A mass failure is under way: keep the notification (retry later, then nack).
    Hold { retry_after: Duration },
}

#[derive(Clone, Debug)]
enum Seen {
    Ok {
        at: Instant,
    },
    Failed {
        cause: String,
        first: Instant,
        last: Instant,
    },
}

impl Seen {
    fn last(&self) -> Instant {
        match self {
            Seen::Ok { at } => *at,
            Seen::Failed { last, .. } => *last,
        }
    }
}

/// The trip, while it lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Trip {
    pub cause: String,
    pub failing: usize,
    pub seen: usize,
}

/// A change worth one log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    Tripped(Trip),
    Cleared { cause: String },
}

pub(crate) struct FailureGuard {
    settle: Duration,
    seen: HashMap<Mailbox, Seen>,
    trip: Option<Trip>,
    /// A deployment-blamed cause trips until this instant, whatever the counts say.
    deployment_trip_until: Option<Instant>,
}

impl FailureGuard {
    pub fn new(settle: Duration) -> FailureGuard {
        FailureGuard {
            settle,
            seen: HashMap::new(),
            trip: None,
            deployment_trip_until: None,
        }
    }

    /// A Gmail call for `mailbox` succeeded.
    pub fn succeeded(&mut self, mailbox: &Mailbox, now: Instant) {
        // Most calls find their mailbox already seen: updated in place, the address is not
        // copied again (this runs once per sync).
        if let Some(seen) = self.seen.get_mut(mailbox) {
            *seen = Seen::Ok { at: now };
            return;
        }
        if self.seen.len() >= CAPACITY {
            self.prune(now);
            if self.seen.len() >= CAPACITY {
                return;
            }
        }
        self.seen.insert(mailbox.clone(), Seen::Ok { at: now });
    }

    /// A permanent failure of `mailbox` with `cause` (a short stable name, e.g.
    /// `403 insufficientPermissions`): what to do, and any change of the trip to log.
    pub fn judge(
        &mut self,
        mailbox: &Mailbox,
        cause: &str,
        blame: Blame,
        now: Instant,
    ) -> (Verdict, Option<Transition>) {
        self.prune(now);
        let first = match self.seen.get(mailbox) {
            Some(Seen::Failed {
                cause: c, first, ..
            }) if c == cause => *first,
            _ => now,
        };
        self.seen.insert(
            mailbox.clone(),
            Seen::Failed {
                cause: cause.to_string(),
                first,
                last: now,
            },
        );
        if blame == Blame::Deployment {
            self.deployment_trip_until = Some(now + WINDOW);
        }
        let transition = self.reassess(now, Some(cause));
        let verdict = if self.trip.is_some() {
            Verdict::Hold {
                retry_after: HOLD_RETRY,
            }
        } else if now.duration_since(first) >= self.settle {
            Verdict::Mark
        } else {
            Verdict::Defer {
                retry_after: self.settle - now.duration_since(first),
            }
        };
        (verdict, transition)
    }

    /// The trip as of `now` (for readiness), and any change to log.
    pub fn state(&mut self, now: Instant) -> (Option<Trip>, Option<Transition>) {
        self.prune(now);
        let transition = self.reassess(now, None);
        (self.trip.clone(), transition)
    }

    fn reassess(&mut self, now: Instant, latest_cause: Option<&str>) -> Option<Transition> {
        let next = self.evaluate(now, latest_cause);
        let transition = match (&self.trip, &next) {
            (None, Some(t)) => Some(Transition::Tripped(t.clone())),
            (Some(old), None) => Some(Transition::Cleared {
                cause: old.cause.clone(),
            }),
            _ => None,
        };
        self.trip = next;
        transition
    }

    /// The most common failure cause in the window, if it makes a mass failure.
    fn evaluate(&self, now: Instant, latest_cause: Option<&str>) -> Option<Trip> {
        let mut failing: HashMap<&str, usize> = HashMap::new();
        for s in self.seen.values() {
            if let Seen::Failed { cause, .. } = s {
                *failing.entry(cause.as_str()).or_default() += 1;
            }
        }
        let seen = self.seen.len();
        let deployment = self.deployment_trip_until.is_some_and(|until| now < until);
        let (cause, count) = failing
            .into_iter()
            .max_by_key(|(cause, count)| (*count, Some(*cause) == latest_cause))?;
        let mass = count >= TRIP_MIN_MAILBOXES && (count as f64) > TRIP_FRACTION * seen as f64;
        (mass || deployment).then(|| Trip {
            cause: cause.to_string(),
            failing: count,
            seen,
        })
    }

    fn prune(&mut self, now: Instant) {
        self.seen
            .retain(|_, s| now.duration_since(s.last()) < WINDOW);
        if self.deployment_trip_until.is_some_and(|until| now >= until) {
            self.deployment_trip_until = None;
        }
    }
}

/// The guard shared by every sync and renewal of the process. The lock is held for a map
/// update, never across an await.
#[derive(Clone)]
pub(crate) struct SharedGuard(Arc<Mutex<FailureGuard>>);

impl SharedGuard {
    pub fn new(settle: Duration) -> SharedGuard {
        SharedGuard(Arc::new(Mutex::new(FailureGuard::new(settle))))
    }

    pub fn succeeded(&self, mailbox: &Mailbox) {
        self.0
            .lock()
            .expect("failure guard lock")
            .succeeded(mailbox, Instant::now());
    }

    pub fn judge(&self, mailbox: &Mailbox, cause: &str, blame: Blame) -> Verdict {
        let (verdict, transition) =
            self.0
                .lock()
                .expect("failure guard lock")
                .judge(mailbox, cause, blame, Instant::now());
        log_transition(transition);
        verdict
    }

    /// The current trip, if any (the health task turns it into not-ready).
    pub fn tripped(&self) -> Option<Trip> {
        let (trip, transition) = self
            .0
            .lock()
            .expect("failure guard lock")
            .state(Instant::now());
        log_transition(transition);
        trip
    }
}

fn log_transition(transition: Option<Transition>) {
    match transition {
        Some(Transition::Tripped(trip)) => tracing::error!(
            cause = %trip.cause,
            failing_mailboxes = trip.failing,
            mailboxes_seen = trip.seen,
            "most mailboxes fail the same way: this is a configuration problem (credentials, \
             scopes, delegation grant, a proxy), not the mailboxes'. No mailbox is being marked; \
             notifications are kept (nacked) and cursors untouched; the worker reports not ready \
             until it clears. Fix the cause shown here; `gmail-sync check-config` tests the \
             credentials."
        ),
        Some(Transition::Cleared { cause }) => tracing::warn!(
            cause = %cause,
            "the mass failure has cleared; mailboxes are judged one by one again"
        ),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_secs(120);

    fn m(i: usize) -> Mailbox {
        Mailbox::parse(&format!("u{i}@x.com")).unwrap()
    }

    #[test]
    fn one_failing_mailbox_among_healthy_ones_is_marked_after_the_settle_time() {
        let t0 = Instant::now();
        let mut g = FailureGuard::new(SETTLE);
        for i in 1..20 {
            g.succeeded(&m(i), t0);
        }
        let (v, tr) = g.judge(&m(0), "invalid_grant", Blame::Mailbox, t0);
        assert_eq!(
            v,
            Verdict::Defer {
                retry_after: SETTLE
            }
        );
        assert_eq!(tr, None);
        let (v, _) = g.judge(&m(0), "invalid_grant", Blame::Mailbox, t0 + SETTLE / 2);
        assert_eq!(
            v,
            Verdict::Defer {
                retry_after: SETTLE / 2
            }
        );
        let (v, _) = g.judge(&m(0), "invalid_grant", Blame::Mailbox, t0 + SETTLE);
        assert_eq!(v, Verdict::Mark);
    }

    #[test]
    fn most_mailboxes_failing_alike_trip_and_nothing_is_marked() {
        let t0 = Instant::now();
        let mut g = FailureGuard::new(SETTLE);
        g.succeeded(&m(100), t0);
        let mut trips = 0;
        for round in 0..3u32 {
            let now = t0 + SETTLE * round;
            for i in 0..10 {
                let (v, tr) = g.judge(&m(i), "403 insufficientPermissions", Blame::Mailbox, now);
                assert_ne!(v, Verdict::Mark, "round {round} mailbox {i}");
                if matches!(tr, Some(Transition::Tripped(_))) {
                    trips += 1;
                }
            }
        }
        assert_eq!(trips, 1, "one log line for the trip");
        let (trip, _) = g.state(t0 + SETTLE * 2);
        assert_eq!(trip.unwrap().cause, "403 insufficientPermissions");
        // Nothing fails any more: the window empties and the trip clears.
        let (trip, tr) = g.state(t0 + SETTLE * 2 + WINDOW);
        assert_eq!(trip, None);
        assert!(matches!(tr, Some(Transition::Cleared { .. })));
    }

    #[test]
    fn a_few_failures_in_a_healthy_fleet_do_not_trip() {
        let t0 = Instant::now();
        let mut g = FailureGuard::new(SETTLE);
        for i in 0..100 {
            g.succeeded(&m(i), t0);
        }
        for i in 0..10 {
            g.judge(&m(i), "invalid_grant", Blame::Mailbox, t0);
        }
        let (v, _) = g.judge(&m(0), "invalid_grant", Blame::Mailbox, t0 + SETTLE);
        assert_eq!(v, Verdict::Mark);
        assert_eq!(g.state(t0 + SETTLE).0, None);
    }

    #[test]
    fn a_deployment_failure_trips_at_once() {
        let t0 = Instant::now();
        let mut g = FailureGuard::new(SETTLE);
        for i in 0..100 {
            g.succeeded(&m(i), t0);
        }
        let (v, tr) = g.judge(&m(0), "misconfigured", Blame::Deployment, t0);
        assert!(matches!(v, Verdict::Hold { .. }));
        assert!(matches!(tr, Some(Transition::Tripped(_))));
    }

    #[test]
    fn memory_is_bounded() {
        let t0 = Instant::now();
        let mut g = FailureGuard::new(SETTLE);
        for i in 0..(CAPACITY + 500) {
            g.succeeded(&m(i), t0);
        }
        assert!(g.seen.len() <= CAPACITY);
    }
}
