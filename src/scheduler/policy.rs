//! The scheduler's arithmetic, pure and unit-tested: when to renew, when to look again, how
//! the renewal budget is split.

use crate::config::SchedulerSettings;
use rand::Rng;
use std::time::Duration;

/// Length of a renewal budget window: `GMAIL_SYNC_RENEWALS_PER_MINUTE` is per minute.
pub(crate) const BUDGET_WINDOW: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct SchedulePolicy {
    settings: SchedulerSettings,
    shards: u32,
}

impl SchedulePolicy {
    pub fn new(settings: SchedulerSettings, shards: u32) -> SchedulePolicy {
        SchedulePolicy {
            settings,
            shards: shards.max(1),
        }
    }

    pub fn settings(&self) -> &SchedulerSettings {
        &self.settings
    }

    /// When to renew a watch made at `now_ms`: the interval, moved uniformly within ± the
    /// jitter. Random rather than derived from the mailbox, so a mass import's first
    /// renewals spread over the whole jitter window and successive renewals never drift.
    pub fn next_renewal_s(&self, now_ms: u64) -> u64 {
        let interval = self.settings.renew_interval.as_millis() as i64;
        let jitter = self.settings.renew_jitter.as_millis() as i64;
        let offset = if jitter == 0 {
            0
        } else {
            rand::rng().random_range(-jitter..=jitter)
        };
        (now_ms as i64 + interval + offset).max(now_ms as i64) as u64 / 1000
    }

    /// A random spread added to a silent mailbox's next fallback look.
    pub fn fallback_jitter_ms(&self) -> u64 {
        let jitter = self.settings.fallback_jitter.as_millis() as u64;
        if jitter == 0 {
            0
        } else {
            rand::rng().random_range(0..=jitter)
        }
    }

    /// The first schedule score of a freshly watched mailbox: its renewal or its first
    /// fallback sync, whichever comes first.
    pub fn first_look_ms(&self, now_ms: u64, renew_at_s: u64) -> u64 {
        let fallback =
            now_ms + self.settings.fallback_silence.as_millis() as u64 + self.fallback_jitter_ms();
        fallback.min(renew_at_s * 1000)
    }

    /// Renewals one shard may claim per budget window: the deployment's cap split evenly
    /// (mailboxes are spread evenly over shards by hash), at least one.
    pub fn renewals_per_shard(&self) -> u32 {
        self.settings
            .renewals_per_minute
            .div_ceil(self.shards)
            .max(1)
    }

    /// The end of the budget window holding `now_ms` (epoch ms).
    pub fn budget_window_end_ms(&self, now_ms: u64) -> u64 {
        let window = BUDGET_WINDOW.as_millis() as u64;
        (now_ms / window + 1) * window
    }

    /// First retry delay after a failed renewal: a fraction of the interval (so tests with
    /// short intervals retry quickly), at most a minute.
    pub fn renew_retry_base(&self) -> Duration {
        (self.settings.renew_interval / 96).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Longest retry delay: a quarter of the interval (6 h when renewing daily), so a failing
    /// renewal is tried many times in the 6 days before the watch runs out.
    pub fn renew_retry_cap(&self) -> Duration {
        (self.settings.renew_interval / 4).max(self.renew_retry_base())
    }

    /// How long the work under one claim may take before it is abandoned: three quarters of
    /// the claim, so a slow replica gives up before another one may take the mailbox over.
    pub fn work_timeout(&self) -> Duration {
        self.settings.claim_timeout * 3 / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(interval: u64, jitter: u64, per_minute: u32, shards: u32) -> SchedulePolicy {
        SchedulePolicy::new(
            SchedulerSettings {
                renew_interval: Duration::from_secs(interval),
                renew_jitter: Duration::from_secs(jitter),
                renewals_per_minute: per_minute,
                claim_timeout: Duration::from_secs(120),
                fallback_silence: Duration::from_secs(900),
                fallback_jitter: Duration::from_secs(120),
                tick: Duration::from_secs(1),
                warn_horizon: Duration::from_secs(172_800),
            },
            shards,
        )
    }

    #[test]
    fn renewals_spread_within_the_jitter_and_never_before_now() {
        let p = policy(86_400, 43_200, 600, 16);
        let now_ms = 1_800_000_000_000;
        let (mut lo, mut hi) = (u64::MAX, 0);
        for _ in 0..2000 {
            let at = p.next_renewal_s(now_ms);
            lo = lo.min(at);
            hi = hi.max(at);
        }
        let now_s = now_ms / 1000;
        assert!(lo >= now_s + 86_400 - 43_200 && hi <= now_s + 86_400 + 43_200);
        // Spread over most of the window, not bunched.
        assert!(hi - lo > 80_000, "{lo}..{hi}");
        let exact = policy(100, 0, 600, 16);
        assert_eq!(exact.next_renewal_s(now_ms), now_s + 100);
    }

    #[test]
    fn first_look_is_the_earlier_of_renewal_and_fallback() {
        let p = policy(86_400, 0, 600, 16);
        let now_ms = 1_000_000;
        let renew = p.next_renewal_s(now_ms);
        let look = p.first_look_ms(now_ms, renew);
        assert!(
            (now_ms + 900_000..=now_ms + 1_020_000).contains(&look),
            "{look}"
        );
        assert_eq!(p.first_look_ms(now_ms, 5), 5_000, "renewal first");
    }

    #[test]
    fn budget_is_split_over_shards_and_windows_end_on_the_minute() {
        assert_eq!(policy(86_400, 0, 600, 16).renewals_per_shard(), 38);
        assert_eq!(policy(86_400, 0, 5, 16).renewals_per_shard(), 1);
        let p = policy(86_400, 0, 600, 16);
        assert_eq!(p.budget_window_end_ms(120_001), 180_000);
        assert_eq!(p.budget_window_end_ms(119_999), 120_000);
    }

    #[test]
    fn renewal_retries_fit_well_inside_a_watch() {
        let daily = policy(86_400, 0, 600, 16);
        assert_eq!(daily.renew_retry_base(), Duration::from_secs(60));
        assert_eq!(daily.renew_retry_cap(), Duration::from_secs(21_600));
        let fast = policy(10, 0, 600, 16);
        assert_eq!(fast.renew_retry_base(), Duration::from_secs(1));
        assert_eq!(fast.renew_retry_cap(), Duration::from_millis(2500));
        assert!(daily.work_timeout() < Duration::from_secs(120));
    }
}
