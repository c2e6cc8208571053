//! Quota accounting: units per user and per project in a sliding 60 s window (one bucket per
//! second), per project in a sliding 24 h window, and calls in flight per user.

use super::config::QuotaConfig;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

const WINDOW_SECS: u64 = 60;
const DAY_SECS: u64 = 86_400;

/// A sliding window of per-second buckets (`span` seconds: 60, or a day).
#[derive(Debug)]
struct Window {
    span: u64,
    buckets: VecDeque<(u64, u64)>,
    total: u64,
}

impl Default for Window {
    fn default() -> Self {
        Window::of(WINDOW_SECS)
    }
}

impl Window {
    fn of(span: u64) -> Window {
        Window {
            span,
            buckets: VecDeque::new(),
            total: 0,
        }
    }

    fn expire(&mut self, now_sec: u64) {
        while let Some(&(sec, units)) = self.buckets.front() {
            if sec + self.span > now_sec {
                break;
            }
            self.total -= units;
            self.buckets.pop_front();
        }
    }

    /// Seconds until `cost` more units fit under `limit` (≥ 1).
    fn retry_after(&self, now_sec: u64, cost: u64, limit: u64) -> u64 {
        let mut total = self.total;
        for &(sec, units) in &self.buckets {
            total -= units;
            if total + cost <= limit {
                return (sec + self.span).saturating_sub(now_sec).max(1);
            }
        }
        self.span
    }

    fn add(&mut self, now_sec: u64, units: u64) {
        match self.buckets.back_mut() {
            Some((sec, u)) if *sec == now_sec => *u += units,
            _ => self.buckets.push_back((now_sec, units)),
        }
        self.total += units;
    }
}

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QuotaRefusal {
    /// Per-user units; retry after n seconds.
    User(u64),
    /// Per-project units; retry after n seconds.
    Project(u64),
    /// Per-project units of the day; retry after n seconds.
    ProjectDay(u64),
    /// Too many concurrent requests for the user.
    Concurrency,
}

#[derive(Debug)]
pub(crate) struct Quota {
    cfg: QuotaConfig,
    epoch: Instant,
    users: HashMap<String, Window>,
    project: Window,
    project_day: Window,
    in_flight: HashMap<String, u32>,
}

impl Quota {
    pub fn new(cfg: QuotaConfig) -> Self {
        Quota {
            cfg,
            epoch: Instant::now(),
            users: HashMap::new(),
            project: Window::default(),
            project_day: Window::of(DAY_SECS),
            in_flight: HashMap::new(),
        }
    }

    /// Units one call of `endpoint` costs under the configured table.
    pub fn cost(&self, endpoint: super::Endpoint) -> u64 {
        self.cfg.cost(endpoint)
    }

    pub fn set_config(&mut self, cfg: QuotaConfig) {
        self.cfg = cfg;
    }

    /// Enters a call for `user` unless the concurrency limit is reached.
    pub fn enter(&mut self, user: &str) -> Result<(), QuotaRefusal> {
        let n = self.in_flight.entry(user.to_string()).or_insert(0);
        if let Some(max) = self.cfg.max_concurrent_per_user
            && *n >= max
        {
            return Err(QuotaRefusal::Concurrency);
        }
        *n += 1;
        Ok(())
    }

    pub fn leave(&mut self, user: &str) {
        if let Some(n) = self.in_flight.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(user);
            }
        }
    }

    pub fn in_flight(&self, user: &str) -> u32 {
        self.in_flight.get(user).copied().unwrap_or(0)
    }

    /// Charges `cost` units to `user` and the project, or refuses without charging.
    pub fn charge(&mut self, user: &str, cost: u64) -> Result<(), QuotaRefusal> {
        let now_sec = self.epoch.elapsed().as_secs();
        self.project.expire(now_sec);
        self.project_day.expire(now_sec);
        let window = self.users.entry(user.to_string()).or_default();
        window.expire(now_sec);
        if let Some(limit) = self.cfg.per_user_per_minute
            && window.total + cost > limit
        {
            return Err(QuotaRefusal::User(window.retry_after(now_sec, cost, limit)));
        }
        if let Some(limit) = self.cfg.per_project_per_minute
            && self.project.total + cost > limit
        {
            return Err(QuotaRefusal::Project(
                self.project.retry_after(now_sec, cost, limit),
            ));
        }
        if let Some(limit) = self.cfg.per_project_per_day
            && self.project_day.total + cost > limit
        {
            return Err(QuotaRefusal::ProjectDay(
                self.project_day.retry_after(now_sec, cost, limit),
            ));
        }
        window.add(now_sec, cost);
        self.project.add(now_sec, cost);
        self.project_day.add(now_sec, cost);
        Ok(())
    }

    /// Units used by `user` in the current window.
    pub fn used_by(&mut self, user: &str) -> u64 {
        let now_sec = self.epoch.elapsed().as_secs();
        self.users.get_mut(user).map_or(0, |w| {
            w.expire(now_sec);
            w.total
        })
    }

    /// Forgets all usage (windows restart empty).
    pub fn reset(&mut self) {
        self.users.clear();
        self.project = Window::default();
        self.project_day = Window::of(DAY_SECS);
    }
}
