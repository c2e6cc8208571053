//! The scale run (issue 10): many registered mailboxes, a million notifications with
//! duplicates and bursts, several worker processes on one subscription; measured, then checked.
//!
//! ```sh
//! cargo run --release --example scale              # 100,000 mailboxes, 1,000,000 notifications, 4 workers
//! SCALE_MAILBOXES=10000 SCALE_NOTIFICATIONS=100000 cargo run --release --example scale   # a quick one
//! ```
//! Knobs: `SCALE_MAILBOXES` (100000), `SCALE_NOTIFICATIONS` (1000000, duplicates included),
//! `SCALE_WORKERS` (4), `SCALE_RATE` (notifications/s offered, 2500), `SCALE_DUPLICATES` (percent
//! of notifications that repeat an earlier one, 10), `SCALE_BURSTS` (percent of changes that
//! come as bursts of 5 to one mailbox, 20), `SCALE_SEED`.
//!
//! The driver makes each change in the simulator and publishes its notification itself (the
//! simulator's own are dropped), so the number of notifications is exact; a duplicate is an
//! earlier payload published again (so it also arrives out of order).
//!
//! Printed: Redis memory per registered mailbox (before any change) and per change entry,
//! worker CPU-µs per notification (user+system of the worker processes, from /proc), Gmail quota
//! units and `history.list` calls per notification (from the simulator's ledger), the workers'
//! publish→ack p50/p99 (publish→commit ≤ publish→ack: a message is acked after the commit that
//! covers it), and the checks: P1 no lost change and P2 no duplicate (the change streams against
//! the ledger), P3 no cursor moved back (a sample of cursors read every 500 ms), P5 the backlog
//! drained (and how long after the last publish), P6 every worker exited 0 on SIGTERM. P4 (no
//! ack before commit) needs the fault suite's records; it is not measured here.

#[path = "support/mod.rs"]
mod support;

use gmail_sync::mailbox::Mailbox;
use gmail_sync_testbed::gmail::{Endpoint, SimConfig};
use gmail_sync_testbed::pubsub;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::{Bed, Rng, cpu_and_peak_rss, env_or, final_summary, stop_worker};

fn main() -> anyhow::Result<()> {
    support::main(scale)
}

/// The driver's clock: notifications are offered in ticks of this length.
const TICK: Duration = Duration::from_millis(10);
/// Registrations in flight (each is a `users.watch` and a Redis script).
const REGISTRATION_CONCURRENCY: usize = 64;
/// Cursors read per P3 sample, and how often: enough to catch a cursor moving back in a run
/// of minutes without loading Redis.
const MONOTONIC_SAMPLE: usize = 2000;
const MONOTONIC_EVERY: Duration = Duration::from_millis(500);
/// How long the backlog may take to drain after the last publish. Sized for the emulator's
/// redelivery of messages stranded on a stream (shared/reference/emulator.md).
const DRAIN_BOUND: Duration = Duration::from_secs(900);
/// Changes in a burst to one mailbox, each with its own notification.
const BURST: usize = 5;

async fn scale() -> anyhow::Result<()> {
    let n_mailboxes: usize = env_or("SCALE_MAILBOXES", 100_000);
    let n_notifications: usize = env_or("SCALE_NOTIFICATIONS", 1_000_000);
    let n_workers: usize = env_or("SCALE_WORKERS", 4);
    let rate: usize = env_or("SCALE_RATE", 2500);
    let duplicates_pct: usize = env_or("SCALE_DUPLICATES", 10);
    let bursts_pct: usize = env_or("SCALE_BURSTS", 20);
    let seed: u64 = env_or("SCALE_SEED", 0x9E37_79B9_7F4A_7C15);
    anyhow::ensure!(
        n_mailboxes > 0 && n_workers > 0 && rate > 0,
        "SCALE_MAILBOXES, SCALE_WORKERS and SCALE_RATE must be at least 1"
    );
    println!(
        "gmail-sync scale run: {n_mailboxes} mailboxes, {n_notifications} notifications \
         ({duplicates_pct}% duplicates, {bursts_pct}% of changes in bursts of {BURST}), \
         {n_workers} workers, {rate}/s offered, seed {seed:#x}"
    );
    let sim = SimConfig {
        notify_min_interval: Duration::ZERO,
        ..SimConfig::default()
    };
    let mut bed = Bed::start("scale", sim).await?;
    let emails: Vec<String> = (0..n_mailboxes)
        .map(|i| format!("s{i:06}@scale.example"))
        .collect();

    // Registration, measured: Redis bytes per registered mailbox (state, schedule, indexes).
    let memory_empty = used_memory(&bed).await?;
    let started = Instant::now();
    bed.sim.set_notify_drop_probability(1.0);
    register_all(&mut bed, &emails).await?;
    let memory_registered = used_memory(&bed).await?;
    println!(
        "registered {n_mailboxes} mailboxes in {:.1} s; Redis {:.0} bytes per mailbox",
        started.elapsed().as_secs_f64(),
        (memory_registered.saturating_sub(memory_empty)) as f64 / n_mailboxes as f64
    );

    let mut workers = Vec::new();
    for i in 0..n_workers {
        workers.push(bed.spawn_worker(&format!("scale-{i}"), &[]).await?);
    }
    let cpu_before: Vec<Duration> = workers
        .iter()
        .map(|w| cpu_and_peak_rss(w.pid()).unwrap_or_default().0)
        .collect();
    let calls_before = bed.sim.ledger().calls().len();

    let stop_sampling = Arc::new(AtomicBool::new(false));
    let backwards = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn(sample_cursors(
        bed.connect().await?,
        bed.keys(),
        emails.clone(),
        seed,
        stop_sampling.clone(),
        backwards.clone(),
    ));

    let started = Instant::now();
    let published = drive(
        &bed,
        &emails,
        n_notifications,
        rate,
        duplicates_pct,
        bursts_pct,
        seed,
    )
    .await?;
    let published_in = started.elapsed();
    let drained = bed.wait_caught_up(DRAIN_BOUND).await;
    let drain_time = started.elapsed() - published_in;
    // Duplicates still in flight when the cursors caught up are acked without work within
    // this second (the workers' counters are read from their logs at exit).
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_sampling.store(true, Ordering::Relaxed);
    let samples = sampler.await??;

    let mut cpu = Duration::ZERO;
    let mut peak_rss_kib = 0;
    for (w, before) in workers.iter().zip(&cpu_before) {
        let (after, rss) = cpu_and_peak_rss(w.pid()).unwrap_or_default();
        cpu += after.saturating_sub(*before);
        peak_rss_kib = peak_rss_kib.max(rss);
    }
    let ledger = bed.sim.ledger();
    let calls = &ledger.calls()[calls_before..];
    let history_calls = calls
        .iter()
        .filter(|c| c.endpoint == Endpoint::HistoryList)
        .count();
    let quota: u64 = calls.iter().map(|c| c.cost).sum();
    let rate_limited = calls.iter().filter(|c| c.status == 429).count();
    let mut exit_codes = Vec::new();
    let mut received = 0u64;
    let mut latencies = Vec::new();
    for w in &workers {
        exit_codes.push(stop_worker(w).await);
        let summary = final_summary(w).unwrap_or_default();
        received += summary["received"].as_u64().unwrap_or(0);
        latencies.push((
            summary["ack_latency_p50_ms"].as_f64().unwrap_or(f64::NAN),
            summary["ack_latency_p99_ms"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    let memory_after = used_memory(&bed).await?;
    let check = bed.check_against_ledger().await;
    let changes = ledger.changes().len();

    let per = |x: f64| x / published.max(1) as f64;
    println!();
    println!(
        "published {published} notifications in {:.1} s ({:.0}/s); {changes} changes; workers received {received}",
        published_in.as_secs_f64(),
        published as f64 / published_in.as_secs_f64()
    );
    println!(
        "worker CPU {:.1} µs per notification ({:.1} s in all); peak RSS {:.1} MiB per worker",
        per(cpu.as_secs_f64() * 1e6),
        cpu.as_secs_f64(),
        peak_rss_kib as f64 / 1024.0
    );
    println!(
        "Gmail: {:.3} history.list and {:.2} quota units per notification; {rate_limited} answers 429",
        per(history_calls as f64),
        per(quota as f64)
    );
    for (i, (p50, p99)) in latencies.iter().enumerate() {
        println!("worker {i}: publish→ack p50 {p50:.0} ms, p99 {p99:.0} ms");
    }
    println!(
        "Redis: {:.0} bytes per change entry (streams at their caps included)",
        (memory_after.saturating_sub(memory_registered)) as f64 / changes.max(1) as f64
    );
    println!();
    let p1p2 = match &check {
        Ok(n) => format!("ok ({n} entries, every change exactly once, in order)"),
        Err(e) => format!("VIOLATED: {e}"),
    };
    println!("P1 no lost change, P2 no duplicate: {p1p2}");
    let moved_back = backwards.load(Ordering::Relaxed);
    println!(
        "P3 cursors monotonic: {} ({samples} samples of {MONOTONIC_SAMPLE} cursors)",
        if moved_back == 0 {
            "ok".to_string()
        } else {
            format!("VIOLATED {moved_back} times")
        }
    );
    println!(
        "P5 backlog drained: {}",
        match &drained {
            Ok(()) => format!(
                "ok, {:.1} s after the last publish",
                drain_time.as_secs_f64()
            ),
            Err(e) => format!("VIOLATED within {DRAIN_BOUND:?}: {e}"),
        }
    );
    let all_zero = exit_codes.iter().all(|c| *c == Some(0));
    println!(
        "P6 exit 0 on SIGTERM: {} {exit_codes:?}",
        if all_zero { "ok" } else { "VIOLATED" }
    );
    if check.is_err() || moved_back > 0 || drained.is_err() || !all_zero {
        anyhow::bail!("the scale run violated an invariant (see above)");
    }
    Ok(())
}

/// Registers every mailbox through the product (`users.watch` + baseline cursor), as
/// `gmail-sync mailbox import` does, [`REGISTRATION_CONCURRENCY`] at a time.
async fn register_all(bed: &mut Bed, emails: &[String]) -> anyhow::Result<()> {
    let registry = Arc::new(gmail_sync::registry::Registry::from_config(&bed.config()).await?);
    let limit = Arc::new(tokio::sync::Semaphore::new(REGISTRATION_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for email in emails {
        bed.sim.add_mailbox(email);
        let permit = limit.clone().acquire_owned().await?;
        let (registry, email) = (registry.clone(), email.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let m = Mailbox::parse(&email)?;
            let r = registry.add(&m, None).await?;
            anyhow::Ok((m.to_string(), r.cursor.get()))
        });
        while let Some(done) = tasks.try_join_next() {
            let (m, cursor) = done??;
            bed.baselines.entry(m).or_insert(cursor);
        }
    }
    while let Some(done) = tasks.join_next().await {
        let (m, cursor) = done??;
        bed.baselines.entry(m).or_insert(cursor);
    }
    Ok(())
}

/// Offers `total` notifications at `rate`/s: changes to random mailboxes (some in bursts),
/// each with its notification, and duplicates of earlier ones. Returns how many it published.
async fn drive(
    bed: &Bed,
    emails: &[String],
    total: usize,
    rate: usize,
    duplicates_pct: usize,
    bursts_pct: usize,
    seed: u64,
) -> anyhow::Result<usize> {
    let publisher = pubsub::publisher(&bed.emulator.endpoint(), &bed.topic.topic).await?;
    let mut rng = Rng(seed | 1);
    let mut tick = tokio::time::interval(TICK);
    let ticks_per_second = (Duration::from_secs(1).as_micros() / TICK.as_micros()) as usize;
    let mut ticks = 0usize;
    let mut published = 0usize;
    // Recent payloads, for duplicates (bounded: duplicates repeat the recent past, as
    // redeliveries do).
    let mut recent: Vec<String> = Vec::with_capacity(4096);
    let mut pending = Vec::new();
    let mut last_report = Instant::now();
    while published < total {
        tick.tick().await;
        ticks += 1;
        let due = (rate * ticks / ticks_per_second).min(total) - published;
        let mut sent = 0;
        while sent < due {
            let payload = if !recent.is_empty() && rng.below(100) < duplicates_pct {
                recent[rng.below(recent.len())].clone()
            } else {
                let email = &emails[rng.below(emails.len())];
                let changes = if rng.below(100) < bursts_pct {
                    BURST
                } else {
                    1
                };
                for _ in 1..changes.min(due - sent) {
                    pending.push(publisher.publish(message(&notify(bed, email))));
                    sent += 1;
                }
                notify(bed, email)
            };
            if recent.len() < recent.capacity() {
                recent.push(payload.clone());
            } else {
                let i = rng.below(recent.len());
                recent[i] = payload.clone();
            }
            pending.push(publisher.publish(message(&payload)));
            sent += 1;
        }
        published += sent;
        // Bounded memory: wait for the batch of publishes every few thousand.
        if pending.len() >= 5000 {
            for p in pending.drain(..) {
                p.await?;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let behind = bed.behind().await.map(|b| b.len()).unwrap_or(0);
            println!("  … {published} published, {behind} mailboxes behind");
        }
    }
    for p in pending {
        p.await?;
    }
    Ok(published)
}

/// One change to `email` in the simulator; the notification payload Gmail would send for it.
fn notify(bed: &Bed, email: &str) -> String {
    bed.sim.deliver(email, &["INBOX"]);
    let h = bed.sim.current_history_id(email);
    format!(r#"{{"emailAddress":"{email}","historyId":"{h}"}}"#)
}

fn message(payload: &str) -> google_cloud_pubsub::model::Message {
    google_cloud_pubsub::model::Message::new().set_data(payload.as_bytes().to_vec())
}

/// P3: reads a random sample of cursors every [`MONOTONIC_EVERY`] until told to stop, counting
/// every cursor seen lower than before. Returns the number of samples taken.
async fn sample_cursors(
    mut con: gmail_sync_testbed::bed::RawConnection,
    keys: gmail_sync_testbed::bed::Keys,
    emails: Vec<String>,
    seed: u64,
    stop: Arc<AtomicBool>,
    backwards: Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    let mut rng = Rng(seed.rotate_left(17) | 1);
    let sample: Vec<usize> = (0..MONOTONIC_SAMPLE.min(emails.len()))
        .map(|_| rng.below(emails.len()))
        .collect();
    let mut last = vec![0u64; sample.len()];
    let mut samples = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut pipe = redis::pipe();
        for &i in &sample {
            pipe.cmd("HGET").arg(keys.state(&emails[i])).arg("cursor");
        }
        // A failed read (none expected: Redis is not faulted here) skips one sample.
        if let Ok(cursors) = pipe.query_async::<Vec<Option<String>>>(&mut con).await {
            for (seen, cursor) in last.iter_mut().zip(cursors) {
                let c = cursor.and_then(|c| c.parse().ok()).unwrap_or(0);
                if c < *seen {
                    backwards.fetch_add(1, Ordering::Relaxed);
                }
                *seen = c;
            }
            samples += 1;
        }
        tokio::time::sleep(MONOTONIC_EVERY).await;
    }
    Ok(samples)
}

/// Redis `used_memory` in bytes (INFO memory).
async fn used_memory(bed: &Bed) -> anyhow::Result<u64> {
    let mut con = bed.connect_single().await?;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut con)
        .await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("INFO memory has no used_memory"))
}
