//! The benchmark: fixed workloads through one worker process, measured.
//!
//! ```sh
//! cargo run --release --example bench    # BENCH_MAILBOXES=1000 BENCH_RATE=1000 BENCH_SECONDS=15
//! BENCH_PHASES=realistic,low cargo run --release --example bench   # only these phases
//!                                         # BENCH_ENRICHMENT=off|minimal|metadata
//! ```
//! Phases (the table in [`PHASES`]), each with a fresh worker process on a fresh subscription
//! (so every figure belongs to one phase), selected with `BENCH_PHASES` (comma-separated; all
//! by default):
//! - **steady**: `BENCH_RATE` changes/s spread over all `BENCH_MAILBOXES` mailboxes in turn,
//!   one notification each;
//! - **bursts**: the same rate, as bursts of 5 changes per mailbox, each change with its own
//!   notification (published by the driver, as Gmail's at-most-1/s would spread them over 5 s
//!   and redeliveries would repeat them): coalescing should need far less than one
//!   `history.list` per notification;
//! - **realistic**: 200 mailboxes, 2 changes/s each (400/s), each change its own notification
//!   (the simulator's `notify_min_interval` is zero, so every `deliver` notifies), the mailbox of
//!   each change drawn at random (seeded), so a mailbox's changes arrive irregularly, as people's
//!   mail does;
//! - **low**: the same 200 mailboxes at 50 changes/s in all;
//! - **lagged**: realistic, with the simulator's history lagging its notifications by
//!   `BENCH_HISTORY_LAG_MS` (100 ms): a sync that reads too early finds nothing and reads again
//!   ("not yet visible" re-reads show as extra `history.list` per notification).
//!
//! Printed per phase: notifications handled and per second, worker CPU-µs per notification
//! (user+system of the worker process only, from /proc; the simulator, the emulator and the
//! traffic driver run elsewhere), `history.list` calls and Gmail quota units per notification
//! (from the simulator's ledger), publish→ack latency p50/p99 (measured by the worker from the
//! Pub/Sub publish time to its ack; it includes the emulator's delivery; an ack follows the
//! commit that covers it, so this is an upper bound of publish→commit), receive→ack p50/p99
//! (the part spent in the worker), the worker's peak RSS, and its threads' context switches per
//! notification (how often they slept and were woken; threads that exited are not counted).
//! `BENCH_WORKER_THREADS=N` runs the worker on a multi-threaded runtime of N workers instead of
//! gmail-sync's own (to compare runtime shapes).
//!
//! `BENCH_COUNT_ALLOCS=1` also prints the worker's allocation calls per notification over the
//! same window (`support::alloc_count`: the examples' allocator counts calls; the worker
//! publishes the counts to a file every 100 ms, which the driver reads at the window's idle
//! ends). Far steadier than CPU time from run to run: the figure to watch for hot-path work.
//!
//! `BENCH_OTLP=1` starts a loopback OTLP/HTTP receiver in the driver (`testbed::otlp`, a
//! collector's stand-in) and points the worker's metrics export at it
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`), exporting every `BENCH_OTLP_INTERVAL_MS` (1000; the
//! default of a deployment is 60 s, so this is 60 times the export work); run it with and
//! without to compare CPU and RSS. Each phase then also prints what the receiver got.
//! Quota: the simulator enforces Gmail's published limits of `BENCH_QUOTA_TABLE` (`classic`:
//! 15,000 units per user per minute, `2026`: 6,000 and `messages.get` at 20 units; the worker
//! gets the same `GMAIL_SYNC_QUOTA_TABLE`), and `BENCH_GOVERNOR=on|off` sets the worker's
//! `GMAIL_SYNC_QUOTA_GOVERNOR`. The phase **hot** (5 mailboxes, 30 changes/s each) asks for more
//! than a user's minute allows; the column `429s` counts the calls Gmail refused for quota.

#[path = "support/mod.rs"]
mod support;

use gmail_sync_testbed::gmail::{Endpoint, QuotaConfig, SimConfig};
use gmail_sync_testbed::otlp::OtlpReceiver;
use gmail_sync_testbed::pubsub;
use std::time::{Duration, Instant};
use support::{
    Bed, Rng, alloc_count, context_switches, cpu_and_peak_rss, env_or, final_summary, stop_worker,
};

fn main() -> anyhow::Result<()> {
    support::main(bench)
}

/// How the driver spreads a phase's changes over its mailboxes.
#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    /// Each mailbox in turn, one change (and its notification) at a time.
    RoundRobin,
    /// 5 changes per mailbox in a row, each with its own notification published by the driver.
    Bursts,
    /// Each change to a mailbox drawn at random (seeded): irregular arrivals per mailbox.
    Random,
}

/// How many mailboxes and changes/s a phase uses.
#[derive(Clone, Copy)]
enum Size {
    /// `BENCH_MAILBOXES` and `BENCH_RATE`.
    FromEnv,
    Fixed {
        mailboxes: usize,
        rate: usize,
    },
}

/// Whether the simulator's history lags its notifications during the phase.
#[derive(Clone, Copy, PartialEq)]
enum Lag {
    None,
    /// `BENCH_HISTORY_LAG_MS`.
    FromEnv,
}

struct PhaseSpec {
    name: &'static str,
    size: Size,
    pattern: Pattern,
    lag: Lag,
}

/// The issue's workload: 200 mailboxes, 2 notifications/s each, one change per notification.
const REALISTIC: Size = Size::Fixed {
    mailboxes: 200,
    rate: 400,
};
/// A quiet deployment: the same mailboxes, 50 notifications/s in all.
const LOW: Size = Size::Fixed {
    mailboxes: 200,
    rate: 50,
};

const PHASES: &[PhaseSpec] = &[
    PhaseSpec {
        name: "steady",
        size: Size::FromEnv,
        pattern: Pattern::RoundRobin,
        lag: Lag::None,
    },
    PhaseSpec {
        name: "bursts",
        size: Size::FromEnv,
        pattern: Pattern::Bursts,
        lag: Lag::None,
    },
    PhaseSpec {
        name: "realistic",
        size: REALISTIC,
        pattern: Pattern::Random,
        lag: Lag::None,
    },
    PhaseSpec {
        name: "low",
        size: LOW,
        pattern: Pattern::Random,
        lag: Lag::None,
    },
    PhaseSpec {
        name: "lagged",
        size: REALISTIC,
        pattern: Pattern::Random,
        lag: Lag::FromEnv,
    },
    PhaseSpec {
        name: "hot",
        size: HOT,
        pattern: Pattern::Random,
        lag: Lag::None,
    },
];

/// A few very busy mailboxes: with metadata, more units than a user's minute holds.
const HOT: Size = Size::Fixed {
    mailboxes: 5,
    rate: 150,
};

/// The driver's clock: changes are offered in ticks of this length.
const TICK: Duration = Duration::from_millis(10);

async fn bench() -> anyhow::Result<()> {
    let env_mailboxes: usize = env_or("BENCH_MAILBOXES", 1000);
    let env_rate: usize = env_or("BENCH_RATE", 1000);
    let seconds: u64 = env_or("BENCH_SECONDS", 15);
    let history_lag = Duration::from_millis(env_or("BENCH_HISTORY_LAG_MS", 100));
    let selected: Vec<String> = std::env::var("BENCH_PHASES")
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_else(|_| PHASES.iter().map(|p| p.name.to_string()).collect());
    if let Some(unknown) = selected
        .iter()
        .find(|s| !PHASES.iter().any(|p| p.name == s.as_str()))
    {
        anyhow::bail!(
            "BENCH_PHASES: unknown phase {unknown:?} (phases: {})",
            PHASES.iter().map(|p| p.name).collect::<Vec<_>>().join(",")
        );
    }
    let phases: Vec<&PhaseSpec> = PHASES
        .iter()
        .filter(|p| selected.iter().any(|s| s == p.name))
        .collect();
    let size_of = |s: Size| match s {
        Size::FromEnv => (env_mailboxes, env_rate),
        Size::Fixed { mailboxes, rate } => (mailboxes, rate),
    };
    let most_mailboxes = phases.iter().map(|p| size_of(p.size).0).max().unwrap_or(0);
    // Passed to the worker as GMAIL_SYNC_ENRICHMENT (`off`, `minimal`, `metadata`).
    let enrichment: String = env_or("BENCH_ENRICHMENT", "metadata".to_string());
    let governor: String = env_or("BENCH_GOVERNOR", "on".to_string());
    let table: String = env_or("BENCH_QUOTA_TABLE", "classic".to_string());
    let quota = match table.as_str() {
        "classic" => QuotaConfig::gmail(),
        "2026" => QuotaConfig::gmail_2026(),
        other => anyhow::bail!("BENCH_QUOTA_TABLE: {other:?} (classic or 2026)"),
    };
    // Every change notifies: the workload controls the notification pattern exactly.
    let sim = SimConfig {
        notify_min_interval: Duration::ZERO,
        quota,
        ..SimConfig::default()
    };
    let mut bed = Bed::start("bench", sim).await?;
    let count_allocs = env_or("BENCH_COUNT_ALLOCS", 0u8) == 1;
    let otlp_interval_ms: u64 = env_or("BENCH_OTLP_INTERVAL_MS", 1000);
    let receiver = match env_or("BENCH_OTLP", 0u8) {
        1 => Some(OtlpReceiver::start().await?),
        _ => None,
    };
    let otlp_env: Vec<(String, String)> = match &receiver {
        Some(r) => vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), r.endpoint()),
            (
                "OTEL_METRIC_EXPORT_INTERVAL".into(),
                otlp_interval_ms.to_string(),
            ),
        ],
        None => Vec::new(),
    };
    let emails: Vec<String> = (0..most_mailboxes)
        .map(|i| format!("b{i:05}@bench.example"))
        .collect();
    println!(
        "gmail-sync benchmark: {seconds} s per phase; steady and bursts: {env_mailboxes} mailboxes, \
         {env_rate} notifications/s offered; lagged: history {} ms behind; enrichment {enrichment}; \
         quota table {table}, governor {governor}; metrics export {}",
        history_lag.as_millis(),
        match &receiver {
            Some(_) => format!("on (OTLP/HTTP to a loopback receiver every {otlp_interval_ms} ms)"),
            None => "off".to_string(),
        }
    );
    println!();
    println!(
        "{:<9} {:>5} {:>5} {:>7} {:>9} {:>12} {:>14} {:>11} {:>16} {:>16} {:>8} {:>8} {:>6}",
        "phase",
        "mbox",
        "rate",
        "notifs",
        "notifs/s",
        "CPU µs/notif",
        "history.list/n",
        "quota/notif",
        "pub→ack p50/p99",
        "recv→ack p50/99",
        "RSS MiB",
        "ctxsw/n",
        "429s"
    );
    for phase in phases {
        let (n_mailboxes, rate) = size_of(phase.size);
        let emails = &emails[..n_mailboxes];
        // A fresh subscription per phase; watch moves every mailbox to it (cursors are kept).
        // The notification each watch sends is dropped so the window holds only the workload.
        bed.fresh_topic().await?;
        bed.sim.set_notify_drop_probability(1.0);
        bed.add_mailboxes(emails).await?;
        bed.sim.set_notify_drop_probability(0.0);
        bed.sim.set_history_lag(match phase.lag {
            Lag::None => Duration::ZERO,
            Lag::FromEnv => history_lag,
        });
        let mut worker_env = vec![
            ("GMAIL_SYNC_ENRICHMENT", enrichment.as_str()),
            ("GMAIL_SYNC_QUOTA_GOVERNOR", governor.as_str()),
            ("GMAIL_SYNC_QUOTA_TABLE", table.as_str()),
        ];
        worker_env.extend(otlp_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let alloc_file = std::env::temp_dir().join(format!(
            "gmail-sync-bench-{}-{}.allocs",
            std::process::id(),
            phase.name
        ));
        let alloc_file_text = alloc_file.display().to_string();
        if count_allocs {
            worker_env.push((alloc_count::FILE_VAR, alloc_file_text.as_str()));
        }
        let worker = bed.spawn_worker(phase.name, &worker_env).await?;
        let exports_before = receiver
            .as_ref()
            .map_or((0, 0), |r| (r.requests(), r.bytes()));
        wait_caught_up(&bed).await?;
        let ledger_before = bed.sim.ledger();
        let calls_before = ledger_before.calls().len();
        let (cpu_before, _) = cpu_and_peak_rss(worker.pid()).unwrap_or_default();
        let switches_before = context_switches(worker.pid()).unwrap_or_default();
        let allocs_before = alloc_count::read(&alloc_file);

        let started = Instant::now();
        drive(
            &bed,
            emails,
            phase.pattern,
            rate,
            Duration::from_secs(seconds),
        )
        .await?;
        wait_caught_up(&bed).await?;
        // Not a wait on a visible condition: notifications still in flight when the cursors
        // caught up (duplicates of covered changes, published by the driver) are acked without
        // work within this second, so the worker's final summary counts them. The worker is a
        // separate process whose counters we only read from its log at exit.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let elapsed = started.elapsed();
        let (cpu_after, rss_kib) = cpu_and_peak_rss(worker.pid()).unwrap_or_default();
        let switches = context_switches(worker.pid())
            .unwrap_or_default()
            .saturating_sub(switches_before);
        let allocs = allocs_before
            .zip(alloc_count::read(&alloc_file))
            .map(|(before, after)| after.since(before));
        let _ = std::fs::remove_file(&alloc_file);
        let ledger = bed.sim.ledger();
        let phase_calls = &ledger.calls()[calls_before..];
        let history_calls = phase_calls
            .iter()
            .filter(|c| c.endpoint == Endpoint::HistoryList)
            .count() as f64;
        let quota: u64 = phase_calls.iter().map(|c| c.cost).sum();
        // Refused for quota: 429s and 403 rate limits (the concurrency 429 included).
        let refused = phase_calls
            .iter()
            .filter(|c| {
                matches!(c.status, 429 | 403)
                    && c.error_reason.as_deref().is_some_and(|r| {
                        matches!(
                            r,
                            "rateLimitExceeded" | "userRateLimitExceeded" | "dailyLimitExceeded"
                        )
                    })
            })
            .count();
        let code = stop_worker(&worker).await;
        let summary = final_summary(&worker).unwrap_or_default();
        let received = summary["received"].as_u64().unwrap_or(0) as f64;
        let cpu_us = (cpu_after.saturating_sub(cpu_before)).as_secs_f64() * 1e6;
        let ms = |k: &str| summary[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<9} {:>5} {:>5} {:>7} {:>9.0} {:>12.1} {:>14.3} {:>11.2} {:>7.1} /{:>7.1} {:>7.1} /{:>7.1} {:>8.1} {:>8.2} {:>6}",
            phase.name,
            n_mailboxes,
            rate,
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
            switches as f64 / received.max(1.0),
            refused,
        );
        if count_allocs {
            match allocs {
                Some(a) => println!(
                    "  allocations: {:.1} allocs + {:.1} reallocs per notification ({} + {} \
                     during the traffic and the idle second after it)",
                    a.allocs as f64 / received.max(1.0),
                    a.reallocs as f64 / received.max(1.0),
                    a.allocs,
                    a.reallocs
                ),
                None => println!("  allocations: the worker published no counts"),
            }
        }
        if let Some(r) = &receiver {
            println!(
                "  OTLP: {} exports, {:.1} KiB of protobuf; last changes.written {} (the worker \
                 counted {})",
                r.requests() - exports_before.0,
                (r.bytes() - exports_before.1) as f64 / 1024.0,
                r.value("gmail_sync.changes.written", &[])
                    .unwrap_or(f64::NAN),
                summary["changes_written"].as_u64().unwrap_or(0),
            );
        }
        if code != Some(0) {
            println!(
                "  (worker exit code {code:?}; log: {})",
                worker.log_path().display()
            );
        }
    }
    bed.sim.set_history_lag(Duration::ZERO);
    let check = bed.check_against_ledger().await;
    println!();
    match check {
        Ok(n) => println!("ledger check: MATCH ({n} entries, every change exactly once, in order)"),
        Err(e) => println!("ledger check: MISMATCH: {e}"),
    }
    println!(
        "(pub→ack: Pub/Sub publish time to the worker's ack call, emulator delivery included; an \
         ack follows its commit, so publish→commit ≤ pub→ack; recv→ack: the worker's own part; ms)"
    );
    Ok(())
}

async fn wait_caught_up(bed: &Bed) -> anyhow::Result<()> {
    bed.wait_caught_up(Duration::from_secs(120))
        .await
        .map_err(|e| anyhow::anyhow!("the worker did not catch up: {e}"))
}

/// The seed of the random pattern.
const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// Offers `rate` notifications/s for `duration`, in [`TICK`]s (a rate below one per tick is
/// spread over several ticks).
async fn drive(
    bed: &Bed,
    emails: &[String],
    pattern: Pattern,
    rate: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    let publisher = pubsub::publisher(&bed.emulator.endpoint(), &bed.topic.topic).await?;
    if pattern == Pattern::Bursts {
        // The driver publishes one notification per change itself.
        bed.sim.set_notify_drop_probability(1.0);
    }
    let mut tick = tokio::time::interval(TICK);
    let ticks_per_second = (Duration::from_secs(1).as_micros() / TICK.as_micros()) as usize;
    let started = Instant::now();
    let mut rng = Rng(SEED);
    let mut ticks = 0usize;
    let mut offered = 0usize;
    let mut next = 0usize;
    let mut carry = 0usize;
    let mut pending = Vec::new();
    while started.elapsed() < duration {
        tick.tick().await;
        ticks += 1;
        let due = rate * ticks / ticks_per_second - offered;
        offered += due;
        match pattern {
            Pattern::RoundRobin => {
                for _ in 0..due {
                    bed.sim.deliver(&emails[next % emails.len()], &["INBOX"]);
                    next += 1;
                }
            }
            Pattern::Random => {
                for _ in 0..due {
                    bed.sim
                        .deliver(&emails[rng.below(emails.len())], &["INBOX"]);
                }
            }
            Pattern::Bursts => {
                carry += due;
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
