//! The governor's rules, pure and unit-tested: what each Gmail method costs, which limits
//! apply, how much of them each kind of work may use, what a rate-limit answer blocks and for
//! how long, and when deferred work is looked at again. No IO, no clock: the Redis side
//! (`store::quota`) keeps the windows, this module decides what to ask it.

use crate::gmail::Method;
use std::time::Duration;

/// Gmail's quota tables. Which one applies depends on the Google Cloud project (the operator
/// knows; Gmail does not say): `GMAIL_SYNC_QUOTA_TABLE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaTable {
    /// Projects that used the Gmail API before May 2026: 15,000 units per user per minute,
    /// 1,200,000 per project per minute, no daily threshold; `messages.get` 5 units.
    Classic,
    /// Projects created from May 2026: 6,000 units per user per minute, 80,000,000 per project
    /// per day; `messages.get` 20 units (`threads.get` 40, unused here).
    Y2026,
}

/// Units per call of each method gmail-sync uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CostTable {
    pub get_profile: u64,
    pub history_list: u64,
    pub messages_list: u64,
    pub messages_get: u64,
    pub watch: u64,
    pub stop: u64,
}

impl CostTable {
    /// The published costs of `table`. The 2026 table's `watch` and `stop` costs were not
    /// visible (shared/reference/apis.md): the classic ones are kept until they are.
    pub fn of(table: QuotaTable) -> CostTable {
        let classic = CostTable {
            get_profile: 1,
            history_list: 2,
            messages_list: 5,
            messages_get: 5,
            watch: 100,
            stop: 50,
        };
        match table {
            QuotaTable::Classic => classic,
            QuotaTable::Y2026 => CostTable {
                messages_get: 20,
                ..classic
            },
        }
    }

    pub(crate) fn units(&self, method: Method) -> u64 {
        match method {
            Method::GetProfile => self.get_profile,
            Method::HistoryList => self.history_list,
            Method::MessagesList => self.messages_list,
            Method::MessagesGet => self.messages_get,
            Method::Watch => self.watch,
            Method::Stop => self.stop,
        }
    }
}

/// The budgets shared by every replica (`None` / 0 = not limited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Units per user (mailbox) per sliding minute.
    pub user_per_minute: u64,
    /// Units per project per sliding minute; `None`: not governed.
    pub project_per_minute: Option<u64>,
    /// Units per project per sliding 24 h; `None`: no daily threshold.
    pub project_per_day: Option<u64>,
    /// Syncs and renewals of one user in flight at once, fleet-wide.
    pub user_in_flight: u32,
}

impl Limits {
    /// The limits of `table`, before the operator's overrides.
    pub fn of(table: QuotaTable) -> Limits {
        match table {
            QuotaTable::Classic => Limits {
                user_per_minute: 15_000,
                project_per_minute: Some(1_200_000),
                project_per_day: None,
                user_in_flight: DEFAULT_USER_IN_FLIGHT,
            },
            QuotaTable::Y2026 => Limits {
                user_per_minute: 6_000,
                project_per_minute: Some(1_200_000),
                project_per_day: Some(80_000_000),
                user_in_flight: DEFAULT_USER_IN_FLIGHT,
            },
        }
    }
}

/// Default cap on a user's work in flight: Gmail answers "Too many concurrent requests for
/// user" above about 10 requests; 8 leaves room for other clients of the same mailbox. One
/// sync sends one request at a time (the mailbox lease already allows one sync per mailbox in
/// the fleet), so this mostly bounds renewals and admin commands next to a sync.
pub const DEFAULT_USER_IN_FLIGHT: u32 = 8;

/// Who is asking, most urgent first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A sync a notification asked for (a person is waiting for the change), and admin
    /// commands (`mailbox resync`).
    Notification,
    /// A `users.watch` renewal: days of slack before the watch runs out.
    Renewal,
    /// The scheduler's sync of a silent mailbox: only matters if a notification was dropped.
    Fallback,
}

impl Priority {
    /// The share of each limit (percent) this priority may fill: lower priorities leave the
    /// rest as headroom, so a burst of notifications finds budget even while renewals and
    /// fallback syncs run. Notification work may use all of it.
    pub fn share_percent(self) -> u64 {
        match self {
            Priority::Notification => 100,
            Priority::Renewal => RENEWAL_SHARE_PERCENT,
            Priority::Fallback => FALLBACK_SHARE_PERCENT,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Notification => "notification",
            Priority::Renewal => "renewal",
            Priority::Fallback => "fallback",
        }
    }
}

/// Renewals may fill 75 % of a budget: a watch is 100 units, and renewals have days of slack.
const RENEWAL_SHARE_PERCENT: u64 = 75;
/// Fallback syncs may fill half of a budget: they only matter when a notification was lost.
const FALLBACK_SHARE_PERCENT: u64 = 50;

/// The limit `priority` is held to for a charge of `units`: its share of `limit`, but never
/// less than `units` itself, so a charge larger than the share (a renewal when the share is
/// below its cost, a big batch under a small limit) still goes through once the window is
/// empty instead of waiting forever.
pub fn limit_for(limit: u64, priority: Priority, units: u64) -> u64 {
    (limit * priority.share_percent() / 100).max(units)
}

/// The in-flight cap `priority` is held to (at least one).
pub fn in_flight_for(cap: u32, priority: Priority) -> u32 {
    ((u64::from(cap) * priority.share_percent() / 100) as u32).max(1)
}

/// Messages a sync fetches per commit under a user limit of `user_per_minute`: what fits in
/// half of it at `unit_cost` each (the other half for the history reads and other work), at
/// least 1, at most `ceiling`.
pub fn fetches_per_commit(user_per_minute: u64, unit_cost: u64, ceiling: usize) -> usize {
    let fit = user_per_minute / 2 / unit_cost.max(1);
    (fit as usize).clamp(1, ceiling.max(1))
}

/// Which budget a refusal or a rate-limit answer concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Budget {
    /// The user's units per minute.
    UserMinute,
    /// The user's requests in flight.
    UserInFlight,
    ProjectMinute,
    ProjectDay,
}

impl Budget {
    pub fn as_str(self) -> &'static str {
        match self {
            Budget::UserMinute => "user_minute",
            Budget::UserInFlight => "user_in_flight",
            Budget::ProjectMinute => "project_minute",
            Budget::ProjectDay => "project_day",
        }
    }

    /// Whether the budget is the whole project's (every mailbox waits) or one user's.
    pub fn is_project(self) -> bool {
        matches!(self, Budget::ProjectMinute | Budget::ProjectDay)
    }
}

/// Why work was told to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WaitReason {
    /// The budget is spent for now.
    Spent(Budget),
    /// Gmail answered a rate limit for this budget (fed back with its Retry-After): everyone
    /// waits until then.
    Blocked(Budget),
}

impl WaitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitReason::Spent(Budget::UserMinute) => "user_minute",
            WaitReason::Spent(Budget::UserInFlight) => "user_in_flight",
            WaitReason::Spent(Budget::ProjectMinute) => "project_minute",
            WaitReason::Spent(Budget::ProjectDay) => "project_day",
            WaitReason::Blocked(Budget::ProjectMinute | Budget::ProjectDay) => "blocked_project",
            WaitReason::Blocked(Budget::UserMinute | Budget::UserInFlight) => "blocked_user",
        }
    }
}

/// What a Gmail rate-limit answer says is exhausted, from its status, reason and message:
/// - "Too many concurrent requests for user" (429): the user's requests in flight;
/// - 403 `userRateLimitExceeded`, or a message "User-rate limit exceeded" (Gmail's 429 for the
///   per-user minute): the user's minute;
/// - 403 `dailyLimitExceeded`: the project's day;
/// - anything else (403 `rateLimitExceeded` / `quotaExceeded`, 429 "Quota exceeded for quota
///   metric ..."): the project's minute.
pub fn budget_of_rate_limit(status: u16, reason: &str, message: &str) -> Budget {
    if message.contains("Too many concurrent requests") {
        Budget::UserInFlight
    } else if reason == "userRateLimitExceeded" || message.contains("User-rate limit") {
        Budget::UserMinute
    } else if reason == "dailyLimitExceeded" {
        Budget::ProjectDay
    } else if status == 429 && reason.is_empty() {
        // A bare 429 without a body that says more: the narrower assumption.
        Budget::UserMinute
    } else {
        Budget::ProjectMinute
    }
}

/// How long a rate-limit answer blocks its budget: its Retry-After (header or "Retry after
/// <time>" in the message), else a default per budget, never more than [`MAX_BLOCK`].
pub fn block_for(budget: Budget, retry_after: Option<Duration>) -> Duration {
    retry_after
        .unwrap_or(match budget {
            Budget::UserInFlight => IN_FLIGHT_BLOCK,
            Budget::UserMinute | Budget::ProjectMinute => MINUTE_BLOCK,
            Budget::ProjectDay => DAY_BLOCK,
        })
        .clamp(MIN_WAIT, MAX_BLOCK)
}

/// Without a Retry-After, a concurrency refusal clears as soon as one request ends.
const IN_FLIGHT_BLOCK: Duration = Duration::from_secs(1);
/// Without a Retry-After, a minute budget frees units every second: 5 s lets some expire
/// without leaving the mailbox idle for long.
const MINUTE_BLOCK: Duration = Duration::from_secs(5);
/// Without a Retry-After, a daily threshold: look again in 10 minutes.
const DAY_BLOCK: Duration = Duration::from_secs(600);
/// A Retry-After beyond this (a wrong clock, a daily threshold) is looked at again then.
const MAX_BLOCK: Duration = Duration::from_secs(3600);

/// The shortest wait: a deferral is never a busy loop.
pub const MIN_WAIT: Duration = Duration::from_millis(50);
/// The longest a deferred sync waits before it asks again, however long the governor said:
/// under a daily threshold that is hours, and a notification's message lease
/// (GMAIL_SYNC_MAX_LEASE_SECS, at least 60 s) must see the work asked again meanwhile.
pub const MAX_DEFERRAL: Duration = Duration::from_secs(60);
/// How soon work refused for the in-flight cap asks again: slots free when a sync ends, which
/// the governor cannot announce.
pub const IN_FLIGHT_RECHECK: Duration = Duration::from_millis(200);

/// When deferred work asks again: the governor's wait, bounded to [`MIN_WAIT`] ..
/// [`MAX_DEFERRAL`], plus up to 10 % spread (`spread` in 0..1, random) so the mailboxes one
/// refill frees do not all come back in the same millisecond.
pub fn deferral(wait: Duration, spread: f64) -> Duration {
    let wait = wait.clamp(MIN_WAIT, MAX_DEFERRAL);
    wait + wait.mul_f64(spread.clamp(0.0, 1.0) / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_follow_the_reference() {
        let classic = CostTable::of(QuotaTable::Classic);
        assert_eq!(classic.units(Method::HistoryList), 2);
        assert_eq!(classic.units(Method::MessagesGet), 5);
        assert_eq!(classic.units(Method::Watch), 100);
        assert_eq!(classic.units(Method::Stop), 50);
        assert_eq!(classic.units(Method::GetProfile), 1);
        assert_eq!(classic.units(Method::MessagesList), 5);
        let new = CostTable::of(QuotaTable::Y2026);
        assert_eq!(new.units(Method::MessagesGet), 20);
        assert_eq!(new.units(Method::HistoryList), 2);
        assert_eq!(Limits::of(QuotaTable::Classic).user_per_minute, 15_000);
        assert_eq!(Limits::of(QuotaTable::Classic).project_per_day, None);
        assert_eq!(Limits::of(QuotaTable::Y2026).user_per_minute, 6_000);
        assert_eq!(
            Limits::of(QuotaTable::Y2026).project_per_day,
            Some(80_000_000)
        );
    }

    #[test]
    fn lower_priorities_leave_headroom_but_never_starve() {
        assert_eq!(limit_for(1000, Priority::Notification, 2), 1000);
        assert_eq!(limit_for(1000, Priority::Renewal, 100), 750);
        assert_eq!(limit_for(1000, Priority::Fallback, 2), 500);
        // A watch (100) under a share of 75: admitted when the window is empty.
        assert_eq!(limit_for(100, Priority::Renewal, 100), 100);
        assert_eq!(in_flight_for(8, Priority::Notification), 8);
        assert_eq!(in_flight_for(8, Priority::Renewal), 6);
        assert_eq!(in_flight_for(8, Priority::Fallback), 4);
        assert_eq!(in_flight_for(1, Priority::Fallback), 1);
        assert!(Priority::Notification < Priority::Renewal);
        assert!(Priority::Renewal < Priority::Fallback);
    }

    #[test]
    fn a_commit_fetches_what_half_a_minute_allows() {
        assert_eq!(fetches_per_commit(15_000, 5, 50), 50);
        assert_eq!(fetches_per_commit(6_000, 20, 50), 50);
        assert_eq!(fetches_per_commit(1_000, 20, 50), 25);
        assert_eq!(fetches_per_commit(40, 5, 50), 4);
        assert_eq!(fetches_per_commit(5, 20, 50), 1);
    }

    #[test]
    fn rate_limit_answers_name_their_budget() {
        let b = budget_of_rate_limit;
        assert_eq!(
            b(
                429,
                "rateLimitExceeded",
                "Too many concurrent requests for user"
            ),
            Budget::UserInFlight
        );
        assert_eq!(
            b(
                429,
                "rateLimitExceeded",
                "User-rate limit exceeded.  Retry after 2026-01-01T00:00:00Z"
            ),
            Budget::UserMinute
        );
        assert_eq!(
            b(403, "userRateLimitExceeded", "User-rate limit exceeded."),
            Budget::UserMinute
        );
        assert_eq!(b(403, "dailyLimitExceeded", ""), Budget::ProjectDay);
        assert_eq!(
            b(
                403,
                "rateLimitExceeded",
                "Quota exceeded for quota metric 'Queries'"
            ),
            Budget::ProjectMinute
        );
        assert_eq!(b(429, "", ""), Budget::UserMinute);
        assert!(Budget::ProjectDay.is_project() && !Budget::UserMinute.is_project());
    }

    #[test]
    fn blocks_honour_retry_after_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(block_for(Budget::UserMinute, Some(s(7))), s(7));
        assert_eq!(block_for(Budget::UserMinute, None), MINUTE_BLOCK);
        assert_eq!(block_for(Budget::UserInFlight, None), IN_FLIGHT_BLOCK);
        assert_eq!(block_for(Budget::ProjectDay, None), DAY_BLOCK);
        assert_eq!(block_for(Budget::ProjectDay, Some(s(86_400))), MAX_BLOCK);
        assert_eq!(
            block_for(Budget::UserMinute, Some(Duration::ZERO)),
            MIN_WAIT
        );
    }

    #[test]
    fn deferrals_are_bounded_and_spread() {
        let s = Duration::from_secs;
        assert_eq!(deferral(s(10), 0.0), s(10));
        assert_eq!(deferral(s(10), 1.0), s(11));
        assert_eq!(deferral(s(3600), 0.0), MAX_DEFERRAL);
        assert_eq!(deferral(Duration::ZERO, 0.0), MIN_WAIT);
        assert!(deferral(s(10), 0.5) > s(10) && deferral(s(10), 0.5) < s(11));
    }
}
