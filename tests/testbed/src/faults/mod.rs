//! The fault suite's machinery (issue 10, item 1): N worker processes on one subscription,
//! faults injected from a seeded schedule, and after each scenario the properties P1–P6
//! checked against the simulator's ledger, Redis and the workers' own records.
//!
//! - [`Scenario`]: what a run injects (each alone, or `Mixed`).
//! - [`Schedule`]: the seeded list of timed [`Fault`]s of a run; the same seed, scenario and
//!   duration give the same schedule (the traffic is seeded too; what the processes do with it
//!   still depends on timing).
//! - [`driver`]: runs a schedule against a [`crate::bed::Testbed`] (the `Injector` of the
//!   issue: one `apply` per fault), with a [`proxy::CutProxy`] in front of the emulator and a
//!   [`monitor`] sampling every cursor, and returns a [`Row`].
//! - [`Row`] / [`table`]: the per-scenario report, serde-serializable for `--json`.
//! - [`cluster`]: the Redis Cluster failovers (their scenarios run on a cluster with replicas,
//!   [`Scenario::redis`]).
//!
//! Used by `examples/faults.rs` (the long runs) and `tests/integration/faults.rs` (a reduced
//! set in CI).

pub mod acks;
pub mod cluster;
pub mod driver;
pub mod monitor;
pub mod proxy;

use crate::bed::RedisChoice;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// What a run injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// SIGKILL loops: the worker holding a mailbox lease in the middle of a (slowed) sync, i.e.
    /// before its commit; a worker pinned between a commit and its ack (the proxy holds its
    /// acks and modacks while it commits: [`Fault::KillAfterCommit`]); and random workers at
    /// random moments. A replacement starts after each kill.
    Kill,
    /// SIGSTOP of a worker for longer than the mailbox lease TTL, then SIGCONT.
    Stop,
    /// SIGTERM of a worker while syncs are in flight (slowed history.list); it must exit 0; a
    /// replacement starts.
    Term,
    /// 2 → 6 → 2 workers mid-run (scale-down by SIGTERM, exit 0).
    Scale,
    /// Redis shuts down (saving) and starts again on the same port.
    RedisRestart,
    /// Redis refuses writes (`maxmemory` 1 byte, `noeviction`) for a few seconds.
    RedisOom,
    /// Redis stalls every client (`CLIENT PAUSE`) for up to 2.5 s.
    RedisLatency,
    /// Pub/Sub: duplicates of published notifications, the same ones in reverse order, a
    /// redelivery storm (one notification ×50), poison messages.
    Pubsub,
    /// Gmail: 429, 403 rate reasons, 5xx, hangs and answers slower than the client timeout.
    Gmail,
    /// Gmail forgets history (HTTP 404 on `history.list` → full resync): all of a mailbox's
    /// history at once, or a retention window short enough to overtake a lagging cursor. P1 and
    /// P2 are then judged by [`crate::check::resync`].
    #[serde(rename = "gmail-404")]
    Gmail404,
    /// Dropped notifications and history lag (a change visible in `history.list` only seconds
    /// after its notification).
    Notify,
    /// The gRPC stream cut: the proxy resets every worker ↔ emulator connection.
    StreamCut,
    /// Redis Cluster (three masters, a replica each): `CLUSTER FAILOVER` at the replica of
    /// the master serving a shard (graceful: no acknowledged write lost).
    RedisFailover,
    /// Redis Cluster: SIGKILL of the master serving a shard; its replica is elected after the
    /// node timeout; the killed node starts again seconds later and rejoins as a replica.
    /// Writes the master acknowledged but had not replicated yet are lost (asynchronous
    /// replication): cursors may move back, changes be appended twice.
    RedisMasterKill,
    /// Redis Cluster: the same kill, of a master whose replica was kept 0.3–1 s behind
    /// (its links cut again and again), so the commits of that window are lost on purpose;
    /// their cursors moving back are counted as `writes_lost`, and P1/P2 must still hold.
    RedisLossyKill,
    /// All of the above, drawn at random, but scale and the cluster scenarios (the mixed run
    /// has one single Redis server, which the Redis faults above need).
    Mixed,
}

impl Scenario {
    /// Every single scenario (not `Mixed`), in the order `all` runs them.
    pub const SINGLE: [Scenario; 15] = [
        Scenario::Kill,
        Scenario::Stop,
        Scenario::Term,
        Scenario::Scale,
        Scenario::RedisRestart,
        Scenario::RedisOom,
        Scenario::RedisLatency,
        Scenario::Pubsub,
        Scenario::Gmail,
        Scenario::Gmail404,
        Scenario::Notify,
        Scenario::StreamCut,
        Scenario::RedisFailover,
        Scenario::RedisMasterKill,
        Scenario::RedisLossyKill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Kill => "kill",
            Scenario::Stop => "stop",
            Scenario::Term => "term",
            Scenario::Scale => "scale",
            Scenario::RedisRestart => "redis-restart",
            Scenario::RedisOom => "redis-oom",
            Scenario::RedisLatency => "redis-latency",
            Scenario::Pubsub => "pubsub",
            Scenario::Gmail => "gmail",
            Scenario::Gmail404 => "gmail-404",
            Scenario::Notify => "notify",
            Scenario::StreamCut => "stream-cut",
            Scenario::RedisFailover => "redis-failover",
            Scenario::RedisMasterKill => "redis-master-kill",
            Scenario::RedisLossyKill => "redis-lossy-kill",
            Scenario::Mixed => "mixed",
        }
    }

    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::SINGLE
            .into_iter()
            .chain([Scenario::Mixed])
            .find(|s| s.name() == name)
    }

    /// The Redis a run of this scenario needs: a cluster with replicas for the failovers, a
    /// server of the bed's own for the rest (restarts, `CONFIG SET`, `CLIENT PAUSE`).
    pub fn redis(self) -> RedisChoice {
        if cluster::on_cluster(self) {
            RedisChoice::ReplicatedCluster
        } else {
            RedisChoice::Own
        }
    }

    /// True if a run of this scenario SIGKILLs workers or cuts their streams: the emulator
    /// may then strand messages for minutes (see shared/reference/emulator.md), so the drain
    /// leans on the fallback sync, and the row says how much the workers received.
    pub fn strands(self) -> bool {
        matches!(
            self,
            Scenario::Kill
                | Scenario::Term
                | Scenario::Scale
                | Scenario::StreamCut
                | Scenario::Mixed
        )
    }
}

/// Which Gmail failure a [`Fault::Gmail`] injects on `users.history.list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GmailFault {
    TooManyRequests,
    RateLimit403,
    ServerError,
    Hang,
    /// Slower than the worker's Gmail timeout (a client-side timeout).
    Timeout,
}

/// One injected fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "fault")]
pub enum Fault {
    /// SIGKILL the lease holder of a slowed sync (before its commit), then a replacement.
    KillSyncing,
    /// SIGKILL a random worker now, then a replacement.
    KillRandom,
    /// SIGKILL a worker right after a commit it made while the proxy held everything it sent
    /// to the emulator (so the acks of that commit never arrive), then a replacement: the kill
    /// lands between commit and ack by construction, with no hook in the worker.
    KillAfterCommit,
    /// SIGSTOP a random worker for `millis` (past the lease TTL), then SIGCONT.
    Pause {
        millis: u64,
    },
    /// SIGTERM a worker while syncs are in flight; exit code 0 expected; then a replacement.
    TermSyncing,
    /// Start or stop (SIGTERM) workers until `workers` run.
    ScaleTo {
        workers: usize,
    },
    RedisRestart,
    /// Redis refuses writes for `millis`.
    RedisOom {
        millis: u64,
    },
    /// `CLIENT PAUSE millis ALL`.
    RedisPause {
        millis: u64,
    },
    /// Publish `n` recently published notifications again.
    Duplicates {
        n: usize,
    },
    /// Publish `n` recently published notifications again, newest first.
    Reorder {
        n: usize,
    },
    /// Publish one recent notification `copies` times.
    Storm {
        copies: usize,
    },
    /// Malformed payloads and a notification for an unknown mailbox.
    Poison,
    /// `calls` history.list calls answer with `kind`.
    Gmail {
        kind: GmailFault,
        calls: u32,
    },
    /// The simulator drops each notification with `percent`% for `millis`.
    DropNotifications {
        percent: u32,
        millis: u64,
    },
    /// history.list shows changes `lag_ms` after their notification, for `millis`.
    HistoryLag {
        lag_ms: u64,
        millis: u64,
    },
    /// Reset every worker ↔ emulator connection.
    StreamCut,
    /// Graceful failover of the cluster master serving shard `shard` (modulo the bed's
    /// shard count).
    RedisFailover {
        shard: u32,
    },
    /// SIGKILL of the cluster master serving shard `shard` (modulo the bed's shard count);
    /// started again `down_ms` after its replica took over.
    RedisMasterKill {
        shard: u32,
        down_ms: u64,
    },
    /// The same, after keeping the master's replica `behind_ms` behind (its links cut): the
    /// commits of that window are lost.
    RedisLossyKill {
        shard: u32,
        down_ms: u64,
        behind_ms: u64,
    },
    /// The simulator forgets all history of one mailbox just after a new message in it, so the
    /// mailbox's next `history.list` answers 404. `mailbox` indexes the run's mailboxes (modulo
    /// their number).
    ExpireHistory {
        mailbox: usize,
    },
    /// One mailbox keeps history only `retention_ms` for `millis`: Gmail's time-based horizon
    /// overtakes a cursor that lags (a 404 whenever the oldest unread record is older).
    ShortRetention {
        mailbox: usize,
        retention_ms: u64,
        millis: u64,
    },
}

impl Fault {
    /// The label the report counts this fault under.
    pub fn label(&self) -> String {
        match self {
            Fault::KillSyncing => "kill-before-commit".into(),
            Fault::KillRandom => "kill-random".into(),
            Fault::KillAfterCommit => "kill-after-commit".into(),
            Fault::Pause { .. } => "sigstop".into(),
            Fault::TermSyncing => "sigterm-in-flight".into(),
            Fault::ScaleTo { workers } => format!("scale-to-{workers}"),
            Fault::RedisRestart => "redis-restart".into(),
            Fault::RedisOom { .. } => "redis-oom".into(),
            Fault::RedisPause { .. } => "redis-pause".into(),
            Fault::Duplicates { .. } => "duplicates".into(),
            Fault::Reorder { .. } => "reorder".into(),
            Fault::Storm { .. } => "storm-x50".into(),
            Fault::Poison => "poison".into(),
            Fault::Gmail { kind, .. } => format!("gmail-{}", gmail_name(*kind)),
            Fault::DropNotifications { .. } => "drop-notifications".into(),
            Fault::HistoryLag { .. } => "history-lag".into(),
            Fault::StreamCut => "stream-cut".into(),
            Fault::RedisFailover { .. } => "redis-failover".into(),
            Fault::RedisMasterKill { .. } => "redis-master-kill".into(),
            Fault::RedisLossyKill { .. } => "redis-lossy-kill".into(),
            Fault::ExpireHistory { .. } => "history-expired".into(),
            Fault::ShortRetention { .. } => "history-retention".into(),
        }
    }
}

fn gmail_name(kind: GmailFault) -> &'static str {
    match kind {
        GmailFault::TooManyRequests => "429",
        GmailFault::RateLimit403 => "403-rate",
        GmailFault::ServerError => "5xx",
        GmailFault::Hang => "hang",
        GmailFault::Timeout => "timeout",
    }
}

/// The first fault comes this long after the traffic starts (every worker is attached and
/// busy by then).
pub const FAULTS_FROM: Duration = Duration::from_secs(4);
/// No fault starts in the last stretch of the traffic, so every timed fault has ended (and
/// been undone) before the drain is measured.
pub const FAULTS_UNTIL_END: Duration = Duration::from_secs(6);
/// Longest SIGSTOP: past the suite's lease TTL ([`driver::LEASE_MS`]) with a margin.
const PAUSE_MS: (u64, u64) = (driver::LEASE_MS + 1_000, driver::LEASE_MS + 3_000);

/// A history fault's mailbox is drawn from `0..MAILBOX_PICKS` and taken modulo the run's
/// mailbox count (the schedule does not know it); any bound far above a run's mailboxes will do.
const MAILBOX_PICKS: usize = 1 << 20;
/// The short retention of [`Fault::ShortRetention`]: around the age of a mailbox's oldest
/// unread record under the suite's traffic (a notification a second per mailbox at most, a
/// 200 ms coalescing window), so from most syncs of the mailbox finding their cursor overtaken
/// (100 ms) to a few (800 ms).
const RETENTION_MS: (u64, u64) = (100, 800);

/// A run's faults at their offsets from the start of the traffic, in order.
#[derive(Clone, Debug, Serialize)]
pub struct Schedule {
    pub seed: u64,
    pub events: Vec<(Duration, Fault)>,
}

impl Schedule {
    /// The schedule of `scenario` for traffic lasting `duration`, from `seed`.
    pub fn generate(scenario: Scenario, seed: u64, duration: Duration, workers: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut events = Vec::new();
        let end = duration.saturating_sub(FAULTS_UNTIL_END);
        if scenario == Scenario::Scale {
            // One cycle per run: up at a third, down at two thirds.
            events.push((duration / 3, Fault::ScaleTo { workers: 6 }));
            events.push((
                duration * 2 / 3,
                Fault::ScaleTo {
                    workers: workers.max(1),
                },
            ));
            return Schedule { seed, events };
        }
        let (min_gap, max_gap) = gaps(scenario);
        let mut at = FAULTS_FROM;
        while at < end {
            let fault = draw(scenario, &mut rng, workers);
            events.push((at, fault));
            at += Duration::from_millis(rng.random_range(min_gap..=max_gap));
        }
        Schedule { seed, events }
    }
}

/// Milliseconds between two faults of a scenario: kills and restarts need the fleet to
/// recover (a replacement worker takes seconds to get ready); Pub/Sub and Gmail faults are
/// cheap and can come often.
fn gaps(scenario: Scenario) -> (u64, u64) {
    match scenario {
        Scenario::Kill | Scenario::Term | Scenario::Stop => (5_000, 9_000),
        Scenario::RedisRestart | Scenario::RedisOom => (6_000, 10_000),
        // A graceful failover takes tens of ms; a few seconds let the fleet work on the new
        // master before the next one.
        Scenario::RedisFailover => (4_000, 7_000),
        // A forced one: ~4 s until the replica is elected, 2–4 s until the killed node
        // restarts, a moment for it to sync; the next kill needs that replica in sync.
        Scenario::RedisMasterKill => (10_000, 13_000),
        // The same, plus up to 1 s of keeping the replica behind.
        Scenario::RedisLossyKill => (11_000, 14_000),
        Scenario::Mixed => (3_000, 6_000),
        _ => (2_000, 5_000),
    }
}

fn draw(scenario: Scenario, rng: &mut StdRng, workers: usize) -> Fault {
    match scenario {
        Scenario::Kill => match rng.random_range(0..3) {
            0 => Fault::KillSyncing,
            1 => Fault::KillAfterCommit,
            _ => Fault::KillRandom,
        },
        Scenario::Stop => Fault::Pause {
            millis: rng.random_range(PAUSE_MS.0..=PAUSE_MS.1),
        },
        Scenario::Term => Fault::TermSyncing,
        Scenario::Scale => Fault::ScaleTo { workers },
        Scenario::RedisRestart => Fault::RedisRestart,
        Scenario::RedisOom => Fault::RedisOom {
            millis: rng.random_range(1_000..=4_000),
        },
        Scenario::RedisLatency => Fault::RedisPause {
            millis: rng.random_range(200..=2_500),
        },
        Scenario::Pubsub => match rng.random_range(0..4) {
            0 => Fault::Duplicates { n: 20 },
            1 => Fault::Reorder { n: 20 },
            2 => Fault::Storm { copies: 50 },
            _ => Fault::Poison,
        },
        Scenario::Gmail => Fault::Gmail {
            kind: match rng.random_range(0..5) {
                0 => GmailFault::TooManyRequests,
                1 => GmailFault::RateLimit403,
                2 => GmailFault::ServerError,
                3 => GmailFault::Hang,
                _ => GmailFault::Timeout,
            },
            calls: rng.random_range(2..=6),
        },
        Scenario::Gmail404 => {
            let mailbox = rng.random_range(0..MAILBOX_PICKS);
            if rng.random_bool(0.5) {
                Fault::ExpireHistory { mailbox }
            } else {
                Fault::ShortRetention {
                    mailbox,
                    retention_ms: rng.random_range(RETENTION_MS.0..=RETENTION_MS.1),
                    millis: rng.random_range(2_000..=5_000),
                }
            }
        }
        Scenario::Notify => {
            if rng.random_bool(0.5) {
                Fault::DropNotifications {
                    percent: rng.random_range(20..=60),
                    millis: rng.random_range(2_000..=5_000),
                }
            } else {
                Fault::HistoryLag {
                    lag_ms: rng.random_range(1_000..=3_000),
                    millis: rng.random_range(2_000..=5_000),
                }
            }
        }
        Scenario::StreamCut => Fault::StreamCut,
        Scenario::RedisFailover | Scenario::RedisMasterKill | Scenario::RedisLossyKill => {
            cluster::draw(scenario, rng)
        }
        Scenario::Mixed => {
            // Scale is left out of the mix: it is a fleet shape, not an event. So are the
            // cluster failovers: the mix runs on one Redis server (its other Redis faults
            // need one).
            let menu: Vec<Scenario> = Scenario::SINGLE
                .into_iter()
                .filter(|s| *s != Scenario::Scale && s.redis() == Scenario::Mixed.redis())
                .collect();
            let pick = menu[rng.random_range(0..menu.len())];
            draw(pick, rng, workers)
        }
    }
}

/// Violations of each property found by one run (0 everywhere = the run passed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Violations {
    /// Ledger changes missing from the change streams (or streams out of ledger order).
    pub p1_lost: u64,
    /// Change entries written more than once, or not in the ledger at all.
    pub p2_duplicate: u64,
    /// Cursor regressions the monitor saw.
    pub p3_cursor_regressed: u64,
    /// Acks the tap saw leave a worker while the mailbox's cursor did not cover them and the
    /// message was not quarantined ([`acks`]).
    pub p4_ack_before_commit: u64,
    /// 1 if the mailboxes did not catch up within the drain bound, plus each message a live
    /// worker still held unacked after it.
    pub p5_not_drained: u64,
    /// Workers that did not exit 0 within the bound after a SIGTERM.
    pub p6_bad_exit: u64,
}

impl Violations {
    pub fn total(&self) -> u64 {
        self.p1_lost
            + self.p2_duplicate
            + self.p3_cursor_regressed
            + self.p4_ack_before_commit
            + self.p5_not_drained
            + self.p6_bad_exit
    }
}

/// One scenario's result.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub scenario: Scenario,
    pub seed: u64,
    /// Traffic duration (faults are injected during it), seconds.
    pub traffic_secs: u64,
    pub workers: usize,
    pub mailboxes: usize,
    /// Changes the simulator made (ledger entries after the baselines).
    pub changes: usize,
    /// Notifications the simulator published (dropped ones not counted).
    pub notifications: usize,
    /// Messages the driver published itself (duplicates, reorders, storms, poison).
    pub extra_messages: u64,
    /// Faults injected, by label.
    pub faults: BTreeMap<String, u64>,
    pub violations: Violations,
    /// From the end of the traffic until every cursor reached the simulator's historyId.
    pub drain_secs: Option<f64>,
    /// Messages the workers said they received (their last summary line; a SIGKILLed worker's
    /// last periodic one, up to a second old). Compared with what was published it tells
    /// emulator stranding (not received) from a worker holding messages (received).
    pub received_by_workers: u64,
    /// Cursors the monitor saw move back inside a lossy kill's window
    /// ([`Scenario::RedisLossyKill`]): commits Redis acknowledged and then lost, as its
    /// asynchronous replication allows. Not violations: P1/P2 judge what came of them.
    pub writes_lost: u64,
    /// Worker processes started in all (replacements included).
    pub worker_processes: usize,
    /// `resync` entries in the change streams (each one answered a 404: see
    /// [`crate::check::resync`]) and the `message_listed` entries of their listings.
    pub resyncs: u64,
    pub listed: u64,
    /// Cursor sampling rounds (P3) that read every cursor / that failed (Redis away).
    pub cursor_rounds: u64,
    pub cursor_rounds_failed: u64,
    /// What the ack tap saw: deliveries, acks judged, messages left with gone workers.
    pub acks: acks::AckSummary,
    /// What each violation was, for the post-mortem.
    pub details: Vec<String>,
}

impl Row {
    pub fn faults_total(&self) -> u64 {
        self.faults.values().sum()
    }
}

/// The rows as a fixed-width text table. Besides the properties: `received` is what the
/// workers said they received, `acks` the acks the tap saw leave them, `dead` the messages
/// last delivered to a worker that is gone and never acked (with the emulator: see
/// [`acks::AckSummary::with_dead_workers`]), `lost` [`Row::writes_lost`].
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<17} {:>6} {:>8} {:>7} {:>6} {:>6} {:>3} {:>3} {:>3} {:>3} {:>3} {:>3} {:>8} {:>9} {:>6} {:>5} {:>5}\n",
        "scenario",
        "seed",
        "changes",
        "notifs",
        "extra",
        "faults",
        "P1",
        "P2",
        "P3",
        "P4",
        "P5",
        "P6",
        "drain_s",
        "received",
        "acks",
        "dead",
        "lost"
    );
    for r in rows {
        let v = &r.violations;
        out.push_str(&format!(
            "{:<17} {:>6} {:>8} {:>7} {:>6} {:>6} {:>3} {:>3} {:>3} {:>3} {:>3} {:>3} {:>8} {:>9} {:>6} {:>5} {:>5}\n",
            r.scenario.name(),
            r.seed,
            r.changes,
            r.notifications,
            r.extra_messages,
            r.faults_total(),
            v.p1_lost,
            v.p2_duplicate,
            v.p3_cursor_regressed,
            v.p4_ack_before_commit,
            v.p5_not_drained,
            v.p6_bad_exit,
            r.drain_secs
                .map_or("-".to_string(), |s| format!("{s:.1}")),
            r.received_by_workers,
            r.acks.acks,
            r.acks.with_dead_workers,
            r.writes_lost
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_reproduces_its_schedule_and_another_seed_differs() {
        let d = Duration::from_secs(120);
        let a = Schedule::generate(Scenario::Mixed, 7, d, 2);
        let b = Schedule::generate(Scenario::Mixed, 7, d, 2);
        let c = Schedule::generate(Scenario::Mixed, 8, d, 2);
        assert_eq!(a.events, b.events);
        assert_ne!(a.events, c.events);
        assert!(!a.events.is_empty());
    }

    #[test]
    fn faults_stay_inside_the_traffic_window() {
        for s in Scenario::SINGLE.into_iter().chain([Scenario::Mixed]) {
            let d = Duration::from_secs(40);
            let sched = Schedule::generate(s, 1, d, 2);
            assert!(!sched.events.is_empty(), "{s:?} injects nothing");
            for (at, _) in &sched.events {
                assert!(*at >= FAULTS_FROM.min(d / 3) && *at < d, "{s:?} at {at:?}");
            }
        }
    }

    #[test]
    fn scenario_names_round_trip() {
        for s in Scenario::SINGLE.into_iter().chain([Scenario::Mixed]) {
            assert_eq!(Scenario::parse(s.name()), Some(s));
        }
        assert_eq!(Scenario::parse("nope"), None);
    }
}
