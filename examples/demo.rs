//! The demo: the whole product on the local test bed.
//!
//! ```sh
//! cargo run --release --example demo     # DEMO_SECONDS=20 DEMO_MAILBOXES=300 DEMO_WORKERS=2
//! ```
//! Starts Redis, Google's Pub/Sub emulator and the Gmail simulator on free loopback ports,
//! registers the mailboxes through the product (`users.watch` + baseline cursor), starts the
//! worker processes, sends mail for `DEMO_SECONDS` (or until Ctrl-C), waits for the workers to
//! catch up, stops them with SIGTERM and prints a summary, including whether the change streams
//! match the simulator's ledger exactly. Everything it starts is stopped by PID at the end.

#[path = "support/mod.rs"]
mod support;

use rand::Rng;
use rand::seq::IndexedRandom;
use std::time::{Duration, Instant};
use support::{Bed, env_or, final_summary, stop_worker};

fn main() -> anyhow::Result<()> {
    support::main(demo)
}

async fn demo() -> anyhow::Result<()> {
    let seconds: u64 = env_or("DEMO_SECONDS", 20);
    let n_mailboxes: usize = env_or("DEMO_MAILBOXES", 300);
    let n_workers: usize = env_or("DEMO_WORKERS", 2);
    let rate: usize = env_or("DEMO_CHANGES_PER_SEC", 200);

    println!(
        "gmail-sync demo: {n_mailboxes} mailboxes, {n_workers} workers, {seconds} s of mail at ~{rate} changes/s"
    );
    println!("starting Redis, the Pub/Sub emulator and the Gmail simulator ...");
    let mut bed = Bed::start("demo", Default::default()).await?;
    let emails: Vec<String> = (0..n_mailboxes)
        .map(|i| format!("user{i:04}@demo.example"))
        .collect();
    bed.add_mailboxes(&emails).await?;
    println!(
        "registered {} mailboxes (users.watch → topic {})",
        emails.len(),
        bed.topic.topic
    );
    let mut workers = Vec::new();
    for i in 0..n_workers {
        workers.push(bed.spawn_worker(&format!("worker-{i}"), &[]).await?);
    }
    println!(
        "{} workers ready (logs in {})",
        workers.len(),
        bed.dir.display()
    );

    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_report = Instant::now();
    let mut changes_made = 0u64;
    let mut stopped_early = false;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::select! {
            _ = &mut interrupted => { stopped_early = true; break; }
            _ = tick.tick() => {}
        }
        changes_made += make_mail(&bed, &emails, rate / 10);
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            report(&bed, started, changes_made).await;
        }
    }
    if stopped_early {
        println!("Ctrl-C: stopping the traffic");
    }
    println!("traffic stopped; waiting for the workers to catch up ...");
    let deadline = Instant::now() + Duration::from_secs(90);
    while behind(&bed).await > 0 && Instant::now() < deadline {
        report(&bed, started, changes_made).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Not a wait on a condition we can see: the simulator folds changes into one notification
    // per mailbox per second and sends the folded one when the second is over, after the
    // cursors caught up. Those late notifications are acked without work if the workers still
    // run, so the summary counts them instead of showing them as nacked by the stop. The
    // workers are separate processes whose counters we only read at exit, so a fixed grace of
    // the folding interval plus delivery time it is.
    tokio::time::sleep(bed.sim.config().notify_min_interval + Duration::from_secs(1)).await;

    let mut codes = Vec::new();
    for w in &workers {
        codes.push(stop_worker(w).await);
    }
    let mut totals = serde_json::Map::new();
    for w in &workers {
        if let Some(s) = final_summary(w) {
            for key in [
                "received",
                "acked_after_sync",
                "acked_without_work",
                "nacked",
                "syncs",
                "resyncs",
                "changes_written",
                "lease_busy",
                "gmail_calls",
                "gmail_quota_units",
            ] {
                let v = s[key].as_u64().unwrap_or(0)
                    + totals.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
                totals.insert(key.into(), v.into());
            }
        }
    }
    let t = |k: &str| totals.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let ledger = bed.sim.ledger();
    let history_calls = ledger
        .calls()
        .iter()
        .filter(|c| c.endpoint == gmail_sync_testbed::gmail::Endpoint::HistoryList)
        .count();
    let quota: u64 = ledger.calls().iter().map(|c| c.cost).sum();
    let check = bed.check_against_ledger().await;

    println!();
    println!("================ gmail-sync demo summary ================");
    println!("mailboxes                      {}", emails.len());
    println!("changes made in Gmail (sim)    {changes_made}");
    println!(
        "notifications sent by Gmail    {}",
        bed.sim.notifications_sent()
    );
    println!("notifications received         {}", t("received"));
    println!("  acked after a sync           {}", t("acked_after_sync"));
    println!("  acked without work           {}", t("acked_without_work"));
    println!("  nacked (redelivered later)   {}", t("nacked"));
    println!(
        "syncs / resyncs                {} / {}",
        t("syncs"),
        t("resyncs")
    );
    println!("changes synced to Redis        {}", t("changes_written"));
    println!(
        "Gmail calls (workers)          {} ({} quota units)",
        t("gmail_calls"),
        t("gmail_quota_units")
    );
    println!(
        "Gmail calls (simulator ledger) {} incl. {} history.list, {} quota units incl. registration",
        ledger.calls().len(),
        history_calls,
        quota
    );
    println!("worker exit codes              {codes:?}");
    match &check {
        Ok(n) => println!(
            "ledger check                   MATCH: {n} entries, every change exactly once, in order"
        ),
        Err(e) => println!("ledger check                   MISMATCH: {e}"),
    }
    println!("==========================================================");
    drop(workers);
    if check.is_err() || codes.iter().any(|c| *c != Some(0)) {
        std::process::exit(1);
    }
    Ok(())
}

/// Applies about `n` random changes: deliveries, label changes, deletions, and bursts.
fn make_mail(bed: &Bed, emails: &[String], n: usize) -> u64 {
    let mut rng = rand::rng();
    let mut made = 0;
    while made < n as u64 {
        let m = emails.choose(&mut rng).unwrap();
        let live: Vec<String> = bed.sim.messages(m).keys().cloned().collect();
        match (rng.random_range(0..100), live.choose(&mut rng)) {
            (0..5, _) => made += bed.sim.burst(m, 5).len() as u64,
            // Label changes that change nothing (already read, already starred) make no history.
            (5..20, Some(id)) => made += bed.sim.remove_labels(m, id, &["UNREAD"]).is_some() as u64,
            (20..30, Some(id)) => made += bed.sim.add_labels(m, id, &["STARRED"]).is_some() as u64,
            (30..38, Some(id)) => {
                bed.sim.delete(m, id);
                made += 1;
            }
            _ => {
                bed.sim.deliver(m, &["INBOX", "UNREAD"]);
                made += 1;
            }
        }
    }
    made
}

/// Mailboxes whose cursor is behind the simulator (all of them while Redis does not answer).
async fn behind(bed: &Bed) -> usize {
    bed.behind().await.map_or(bed.baselines.len(), |b| b.len())
}

async fn report(bed: &Bed, started: Instant, changes: u64) {
    let entries = bed.entry_count().await.unwrap_or(0);
    println!(
        "  t={:>3}s  changes made {:>6}  notifications {:>6}  entries in Redis {:>6}  mailboxes behind {:>4}",
        started.elapsed().as_secs(),
        changes,
        bed.sim.notifications_sent(),
        entries,
        behind(bed).await
    );
}
