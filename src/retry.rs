//! The two backoff policies, side by side so their budgets can be read together (see
//! ARCHITECTURE.md, "Retries and errors").
//!
//! - [`gmail_call`]: between attempts of one Gmail HTTP call inside a sync (429, 403 rate
//!   limits, 5xx, timeouts): full-jitter exponential, never shorter than what Gmail asked for;
//! - [`not_yet_visible`]: between syncs of one mailbox whose notification is ahead of what
//!   `history.list` shows yet (Gmail's history can lag its notification): plain exponential,
//!   because the wait is for Gmail's own consistency, not for a shared resource.

use rand::Rng;
use std::time::Duration;

/// First step of the Gmail call backoff.
const GMAIL_CALL_BASE: Duration = Duration::from_millis(250);
/// Cap of the jittered Gmail call backoff: longer waits belong to the mailbox-level retry,
/// which holds no concurrency slot while it waits.
const GMAIL_CALL_CAP: Duration = Duration::from_secs(32);
/// Floor of a jittered wait, so a retry storm never turns into a busy loop.
const GMAIL_CALL_FLOOR: Duration = Duration::from_millis(50);
/// The longest server-requested wait honoured (a Retry-After of an hour would outlast the
/// message's lease; the mailbox-level retry or Pub/Sub redelivery takes over instead).
const SERVER_ASKED_CAP: Duration = Duration::from_secs(300);
/// Cap of the not-yet-visible delay: Gmail's history catches up within seconds.
const NOT_YET_VISIBLE_CAP: Duration = Duration::from_secs(16);

/// Full-jitter exponential backoff for attempt `attempt` (1-based) of a Gmail call: uniform in
/// 0..=min(250 ms × 2^(attempt-1), 32 s), never shorter than what the server asked for (capped
/// at 5 minutes).
pub(crate) fn gmail_call(attempt: u32, server_asked: Option<Duration>) -> Duration {
    let cap = GMAIL_CALL_BASE
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(7))
        .min(GMAIL_CALL_CAP);
    let jittered = rand::rng().random_range(Duration::ZERO..=cap);
    match server_asked {
        Some(asked) => jittered.max(asked.min(SERVER_ASKED_CAP)),
        None => jittered.max(GMAIL_CALL_FLOOR),
    }
}

/// base × 2^(attempt-1), capped at 16 s: the wait before re-reading history that did not yet
/// show a notification's change.
pub(crate) fn not_yet_visible(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1 << attempt.saturating_sub(1).min(5))
        .min(NOT_YET_VISIBLE_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gmail_call_backoff_honours_server_and_caps() {
        for attempt in 1..20 {
            let d = gmail_call(attempt, None);
            assert!(d <= GMAIL_CALL_CAP);
            assert!(d >= GMAIL_CALL_FLOOR);
            assert!(gmail_call(attempt, Some(Duration::from_secs(40))) >= Duration::from_secs(40));
        }
        assert_eq!(
            gmail_call(1, Some(Duration::from_secs(3600))),
            SERVER_ASKED_CAP
        );
    }

    #[test]
    fn not_yet_visible_doubles_then_caps() {
        let base = Duration::from_millis(500);
        assert_eq!(not_yet_visible(base, 1), base);
        assert_eq!(not_yet_visible(base, 2), base * 2);
        assert_eq!(not_yet_visible(base, 6), NOT_YET_VISIBLE_CAP);
        assert_eq!(not_yet_visible(base, 60), NOT_YET_VISIBLE_CAP);
    }
}
