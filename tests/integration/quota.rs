//! The quota governor against the simulator's per-user budget: two worker processes share one
//! budget through Redis and never draw a rate-limit answer, the same load without the governor
//! does, deferred work completes (ledger check), nothing is nacked in a loop, and renewals
//! yield to notification-driven syncs.

use crate::harness::{Bed, BedOptions, CATCH_UP, emails, eventually};
use gmail_sync_testbed::gmail::{CallEntry, Endpoint, QuotaConfig, SimConfig};
use std::time::{Duration, SystemTime};

/// Units per user per minute, in the simulator and (governor on) in the workers: a few syncs
/// a minute, so a short load spends it.
const USER_LIMIT: u64 = 40;

fn limited() -> QuotaConfig {
    QuotaConfig {
        per_user_per_minute: Some(USER_LIMIT),
        max_concurrent_per_user: Some(10),
        ..QuotaConfig::default()
    }
}

/// Registers `mailboxes` (a watch, 100 units, is more than [`USER_LIMIT`]: registered before
/// the limit applies), then limits the simulator and waits until the governor's minute, which
/// recorded the watches, is empty again.
async fn register_then_limit(bed: &mut Bed, mailboxes: &[String]) {
    bed.add_mailboxes(mailboxes).await;
    bed.sim.set_quota(limited());
    bed.sim.reset_quota();
    tokio::time::sleep(Duration::from_secs(62)).await;
}

/// Calls the simulator refused for quota (429 / 403 rate limits).
fn refused<'a>(calls: &[&'a CallEntry]) -> Vec<&'a CallEntry> {
    calls
        .iter()
        .copied()
        .filter(|c| {
            matches!(c.status, 429 | 403)
                && c.error_reason
                    .as_deref()
                    .is_some_and(|r| r.contains("RateLimit") || r.contains("rateLimit"))
        })
        .collect()
}

/// The most units any mailbox's calls asked for (charged or refused) within any 60 s: what
/// the workers tried to spend, which the governor must keep within the limit.
fn peak_minute_units(calls: &[&CallEntry], mailboxes: &[String]) -> u64 {
    let mut peak = 0;
    for m in mailboxes {
        let asked: Vec<(SystemTime, u64)> = calls
            .iter()
            .filter(|c| c.mailbox.as_deref() == Some(m.as_str()) && c.endpoint != Endpoint::Batch)
            .map(|c| (c.started, c.endpoint.cost()))
            .collect();
        for (i, (t0, _)) in asked.iter().enumerate() {
            let sum: u64 = asked[i..]
                .iter()
                .filter(|(t, _)| {
                    t.duration_since(*t0).unwrap_or_default() < Duration::from_secs(60)
                })
                .map(|(_, u)| u)
                .sum();
            peak = peak.max(sum);
        }
    }
    peak
}

/// A new message a second in each mailbox for `secs` seconds: 7 units a sync (history.list
/// and one messages.get), so 10 s ask for more than [`USER_LIMIT`], but not so much more that
/// the rest does not fit in the next minute.
async fn load(bed: &Bed, mailboxes: &[String], secs: u64) {
    for _ in 0..secs {
        for m in mailboxes {
            bed.sim.deliver(m, &["INBOX"]);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Two `gmail-sync run` processes, one shared budget: no rate-limit answer, at most the limit
/// asked per mailbox per minute, every change delivered exactly once after the deferrals, and
/// no nack loop. The same load without the governor draws rate limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_one_budget_and_gmail_never_refuses() {
    let limit = USER_LIMIT.to_string();
    let mut bed = Bed::with(
        "quota-on",
        BedOptions {
            worker_env: vec![
                ("GMAIL_SYNC_QUOTA_USER_PER_MINUTE".into(), limit.clone()),
                ("GMAIL_SYNC_ENRICHMENT".into(), "metadata".into()),
                ("GMAIL_SYNC_SUMMARY_INTERVAL_SECS".into(), "1".into()),
            ],
            ..BedOptions::default()
        },
    )
    .await;
    let mailboxes = emails("quota-on", 2);
    register_then_limit(&mut bed, &mailboxes).await;
    let calls_before = bed.sim.ledger().calls().len();
    let a = bed.spawn_worker_process("quota-a", &[]);
    let b = bed.spawn_worker_process("quota-b", &[]);
    bed.wait_ready(&[&a, &b]).await;
    load(&bed, &mailboxes, 10).await;
    // Deferred work is done once the first minute's units leave the window.
    if let Err(e) = bed.wait_caught_up(CATCH_UP + Duration::from_secs(60)).await {
        panic!(
            "{e}\n--- a ---\n{}\n--- b ---\n{}",
            a.log_tail(30),
            b.log_tail(30)
        );
    }
    let n = bed.check_against_ledger().await.unwrap();
    assert!(n >= 2 * 10, "{n}");
    let ledger = bed.sim.ledger();
    let calls = &ledger.calls()[calls_before..];
    assert!(
        refused(calls).is_empty(),
        "the governor let a call through that Gmail refused: {:?}",
        refused(calls)
    );
    let peak = peak_minute_units(calls, &mailboxes);
    assert!(
        peak <= USER_LIMIT,
        "asked {peak} units in a minute, limit {USER_LIMIT}"
    );
    a.sigterm();
    b.sigterm();
    let mut deferred = 0;
    for w in [&a, &b] {
        let status = w.wait_exit(Duration::from_secs(60)).await.expect("exits");
        assert_eq!(status.code(), Some(0), "{}", w.log_tail(20));
        let summary = final_summary(w);
        deferred += summary["quota_deferred"].as_u64().unwrap();
        // No nack loop: nothing was nacked while the worker ran (its last periodic summary
        // before SIGTERM). At the stop, deliveries still waiting are nacked by design
        // (ARCHITECTURE.md, "Tasks and shutdown"); how many depends on timing.
        let running = summary_before_sigterm(w);
        assert_eq!(running["nacked"].as_u64(), Some(0), "{}", w.log_tail(5));
        assert!(summary["nacked"].as_u64().unwrap() <= summary["received"].as_u64().unwrap());
    }
    assert!(
        deferred > 0,
        "the load asked for more than the budget: something waited"
    );
}

/// The same load, governor off: Gmail's rate limits are what stops the workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_governor_the_same_load_draws_rate_limits() {
    let mut bed = Bed::with(
        "quota-off",
        BedOptions {
            worker_env: vec![
                ("GMAIL_SYNC_QUOTA_GOVERNOR".into(), "off".into()),
                ("GMAIL_SYNC_ENRICHMENT".into(), "metadata".into()),
            ],
            ..BedOptions::default()
        },
    )
    .await;
    let mailboxes = emails("quota-off", 2);
    register_then_limit(&mut bed, &mailboxes).await;
    let calls_before = bed.sim.ledger().calls().len();
    let a = bed.spawn_worker_process("quota-off-a", &[]);
    let b = bed.spawn_worker_process("quota-off-b", &[]);
    bed.wait_ready(&[&a, &b]).await;
    load(&bed, &mailboxes, 10).await;
    let drew_limits = eventually(Duration::from_secs(30), || {
        !refused(&bed.sim.ledger().calls()[calls_before..]).is_empty()
    })
    .await;
    assert!(
        drew_limits,
        "the same load without the governor met no rate limit"
    );
    for w in [&a, &b] {
        w.sigterm();
        w.wait_exit(Duration::from_secs(60)).await.expect("exits");
    }
}

/// Renewals draw from the same budget at a lower priority: while notifications keep a mailbox's
/// minute more than a quarter spent, its due renewal waits and the notification syncs go on;
/// the renewal happens once the budget allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_yield_to_notification_syncs() {
    // A watch (100) fits a renewal's 75 % share of 200 only while at most 50 units are used.
    let limit = "200";
    let mut bed = Bed::with(
        "quota-renew",
        BedOptions {
            sim: SimConfig {
                quota: QuotaConfig {
                    per_user_per_minute: Some(200),
                    ..QuotaConfig::default()
                },
                ..SimConfig::default()
            },
            worker_env: vec![
                ("GMAIL_SYNC_QUOTA_USER_PER_MINUTE".into(), limit.into()),
                ("GMAIL_SYNC_ENRICHMENT".into(), "metadata".into()),
                // Due 75 s after `mailbox add`: about 10 s into the load below.
                ("GMAIL_SYNC_RENEW_INTERVAL_SECS".into(), "75".into()),
                ("GMAIL_SYNC_RENEW_JITTER_SECS".into(), "0".into()),
                ("GMAIL_SYNC_SCHEDULER_TICK_MS".into(), "200".into()),
            ],
            ..BedOptions::default()
        },
    )
    .await;
    let mailboxes = emails("quota-renew", 1);
    bed.add_mailboxes(&mailboxes).await;
    let m = &mailboxes[0];
    tokio::time::sleep(Duration::from_secs(62)).await;
    let worker = bed.start_worker().await;
    let watches_before = bed.sim.ledger().calls_to(Endpoint::Watch).len();
    // 7 units a notification (history.list + one messages.get), one a second: past 50 units
    // within 8 s, before the renewal falls due.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(14) {
        bed.sim.deliver(m, &["INBOX"]);
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let s = worker.snapshot();
    assert!(s.quota_deferred_renewal > 0, "the renewal waited: {s:?}");
    assert_eq!(
        s.quota_deferred_notification, 0,
        "notification syncs never waited: {s:?}"
    );
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    // The budget drains; the renewal goes through.
    let renewed = eventually(Duration::from_secs(90), || worker.snapshot().renewals > 0).await;
    assert!(
        renewed,
        "renewed once the budget allowed: {:?}",
        worker.snapshot()
    );
    let ledger = bed.sim.ledger();
    assert!(ledger.calls_to(Endpoint::Watch).len() > watches_before);
    assert!(refused(&ledger.calls()).is_empty(), "no rate limit drawn");
    bed.check_against_ledger().await.unwrap();
    worker.stop().await.unwrap();
}

fn final_summary(w: &crate::harness::WorkerProcess) -> serde_json::Value {
    let log = std::fs::read_to_string(w.log_path()).unwrap();
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "final summary")
        .unwrap_or_else(|| panic!("no final summary: {}", w.log_tail(10)))
}

/// The last periodic summary the worker logged before it received SIGTERM.
fn summary_before_sigterm(w: &crate::harness::WorkerProcess) -> serde_json::Value {
    let log = std::fs::read_to_string(w.log_path()).unwrap();
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .take_while(|v| v["message"] != "SIGTERM received")
        .filter(|v| v["message"] == "summary")
        .last()
        .unwrap_or_else(|| panic!("no summary before SIGTERM: {}", w.log_tail(10)))
}
