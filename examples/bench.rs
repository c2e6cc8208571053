//! The benchmark: a fixed workload through one worker process, measured.
//!
//! ```sh
//! cargo run --release --example bench    # BENCH_MAILBOXES=1000 BENCH_RATE=1000 BENCH_SECONDS=15
//!                                         # BENCH_ENRICHMENT=off|minimal|metadata
//! ```
//! Two phases, each with a fresh worker process on a fresh subscription (so every figure
//! belongs to one phase):
//! - **steady**: `BENCH_RATE` changes/s spread over all mailboxes, one notification each;
//! - **bursts**: the same rate, as bursts of 5 changes per mailbox, each change with its own
//!   notification (published by the driver, as Gmail's at-most-1/s would spread them over 5 s
//!   and redeliveries would repeat them): coalescing should need far less than one
//!   `history.list` per notification.
//!
//! Printed per phase: notifications/s handled, worker CPU-µs per notification (user+system of
//! the worker process only, from /proc; the simulator, the emulator and the traffic driver run
//! elsewhere), `history.list` calls and Gmail quota units per notification (from the
//! simulator's ledger), publish→ack latency p50/p99 (measured by the worker from the Pub/Sub
//! publish time to its ack; it includes the emulator's delivery), receive→ack p50/p99 (the part
//! spent in the worker), and the worker's peak RSS.

#[path = "support/mod.rs"]
mod support;

use gmail_sync_testbed::gmail::{Endpoint, SimConfig};
use gmail_sync_testbed::pubsub;
use std::time::{Duration, Instant};
use support::{Bed, cpu_and_peak_rss, env_or, final_summary, stop_worker};

fn main() -> anyhow::Result<()> {
    support::main(bench)
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Steady,
    Bursts,
}

async fn bench() -> anyhow::Result<()> {
    let n_mailboxes: usize = env_or("BENCH_MAILBOXES", 1000);
    let rate: usize = env_or("BENCH_RATE", 1000);
    let seconds: u64 = env_or("BENCH_SECONDS", 15);
    // Passed to the worker as GMAIL_SYNC_ENRICHMENT (`off`, `minimal`, `metadata`).
    let enrichment: String = env_or("BENCH_ENRICHMENT", "metadata".to_string());
    // Every change notifies: the workload controls the notification pattern exactly.
    let sim = SimConfig {
        notify_min_interval: Duration::ZERO,
        ..SimConfig::default()
    };
    let mut bed = Bed::start("bench", sim).await?;
    let emails: Vec<String> = (0..n_mailboxes)
        .map(|i| format!("b{i:05}@bench.example"))
        .collect();
    println!(
        "gmail-sync benchmark: {n_mailboxes} mailboxes, {rate} notifications/s offered, {seconds} s per phase, enrichment {enrichment}"
    );
    println!();
    println!(
        "{:<7} {:>7} {:>9} {:>12} {:>14} {:>11} {:>16} {:>16} {:>8}",
        "phase",
        "notifs",
        "notifs/s",
        "CPU µs/notif",
        "history.list/n",
        "quota/notif",
        "pub→ack p50/p99",
        "recv→ack p50/99",
        "RSS MiB"
    );
    for phase in [Phase::Steady, Phase::Bursts] {
        // A fresh subscription per phase; watch moves every mailbox to it (cursors are kept).
        // The notification each watch sends is dropped so the window holds only the workload.
        bed.fresh_topic().await?;
        bed.sim.set_notify_drop_probability(1.0);
        bed.add_mailboxes(&emails).await?;
        bed.sim.set_notify_drop_probability(0.0);
        let worker = bed
            .spawn_worker(
                if phase == Phase::Steady {
                    "steady"
                } else {
                    "bursts"
                },
                &[("GMAIL_SYNC_ENRICHMENT", enrichment.as_str())],
            )
            .await?;
        wait_caught_up(&bed).await?;
        let ledger_before = bed.sim.ledger();
        let calls_before = ledger_before.calls().len();
        let (cpu_before, _) = cpu_and_peak_rss(worker.pid()).unwrap_or_default();

        let started = Instant::now();
        drive(&bed, &emails, phase, rate, Duration::from_secs(seconds)).await?;
        wait_caught_up(&bed).await?;
        // Not a wait on a visible condition: notifications still in flight when the cursors
        // caught up (duplicates of covered changes, published by the driver) are acked without
        // work within this second, so the worker's final summary counts them. The worker is a
        // separate process whose counters we only read from its log at exit.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let elapsed = started.elapsed();
        let (cpu_after, rss_kib) = cpu_and_peak_rss(worker.pid()).unwrap_or_default();
        let ledger = bed.sim.ledger();
        let phase_calls = &ledger.calls()[calls_before..];
        let history_calls = phase_calls
            .iter()
            .filter(|c| c.endpoint == Endpoint::HistoryList)
            .count() as f64;
        let quota: u64 = phase_calls.iter().map(|c| c.cost).sum();
        let code = stop_worker(&worker).await;
        let summary = final_summary(&worker).unwrap_or_default();
        let received = summary["received"].as_u64().unwrap_or(0) as f64;
        let cpu_us = (cpu_after.saturating_sub(cpu_before)).as_secs_f64() * 1e6;
        let ms = |k: &str| summary[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<7} {:>7} {:>9.0} {:>12.1} {:>14.3} {:>11.2} {:>7.1} /{:>7.1} {:>7.1} /{:>7.1} {:>8.1}",
            if phase == Phase::Steady {
                "steady"
            } else {
                "bursts"
            },
            received,
            received / elapsed.as_secs_f64(),
            cpu_us / received.max(1.0),
            history_calls / received.max(1.0),
            quota as f64 / received.max(1.0),
            ms("ack_latency_p50_ms"),
            ms("ack_latency_p99_ms"),
            ms("handling_latency_p50_ms"),
            ms("handling_latency_p99_ms"),
            rss_kib as f64 / 1024.0,
        );
        if code != Some(0) {
            println!(
                "  (worker exit code {code:?}; log: {})",
                worker.log_path().display()
            );
        }
    }
    let check = bed.check_against_ledger().await;
    println!();
    match check {
        Ok(n) => println!("ledger check: MATCH ({n} entries, every change exactly once, in order)"),
        Err(e) => println!("ledger check: MISMATCH: {e}"),
    }
    println!(
        "(pub→ack: Pub/Sub publish time to the worker's ack call, emulator delivery included; recv→ack: the worker's own part; ms)"
    );
    Ok(())
}

async fn wait_caught_up(bed: &Bed) -> anyhow::Result<()> {
    bed.wait_caught_up(Duration::from_secs(120))
        .await
        .map_err(|e| anyhow::anyhow!("the worker did not catch up: {e}"))
}

/// Offers `rate` notifications/s for `duration`, in 10 ms ticks.
async fn drive(
    bed: &Bed,
    emails: &[String],
    phase: Phase,
    rate: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    let publisher = pubsub::publisher(&bed.emulator.endpoint(), &bed.topic.topic).await?;
    if phase == Phase::Bursts {
        // The driver publishes one notification per change itself.
        bed.sim.set_notify_drop_probability(1.0);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let per_tick = (rate / 100).max(1);
    let started = Instant::now();
    let mut next = 0usize;
    let mut carry = 0usize;
    let mut pending = Vec::new();
    while started.elapsed() < duration {
        tick.tick().await;
        match phase {
            Phase::Steady => {
                for _ in 0..per_tick {
                    bed.sim.deliver(&emails[next % emails.len()], &["INBOX"]);
                    next += 1;
                }
            }
            Phase::Bursts => {
                carry += per_tick;
                while carry >= 5 {
                    let email = &emails[next % emails.len()];
                    for _ in 0..5 {
                        bed.sim.deliver(email, &["INBOX"]);
                        let h = bed.sim.current_history_id(email);
                        let payload = format!(r#"{{"emailAddress":"{email}","historyId":"{h}"}}"#);
                        let msg = google_cloud_pubsub::model::Message::new()
                            .set_data(payload.into_bytes());
                        pending.push(publisher.publish(msg));
                    }
                    next += 1;
                    carry -= 5;
                }
            }
        }
    }
    for p in pending {
        p.await?;
    }
    bed.sim.set_notify_drop_probability(0.0);
    Ok(())
}
