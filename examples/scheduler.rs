//! The scheduler's costs at scale, measured.
//!
//! ```sh
//! cargo run --release --example scheduler   # SCHED_MAILBOXES=100000 SCHED_DUE=1000
//! ```
//! A Redis of its own and the Gmail simulator (no Pub/Sub: the scheduler never touches it).
//! Mailboxes are registered through the product's own `Store::register`, exactly as
//! `mailbox add` stores them, then:
//! 1. **Redis bytes per mailbox**: `used_memory` before and after registering them all (state
//!    hash + schedule entry, the idle shape);
//! 2. **an idle tick**: the real `Scheduler::run` with nothing due, for a few seconds — this
//!    process's CPU per tick (nothing else runs in it meanwhile) and Redis commands per tick
//!    (from `INFO commandstats`, script-internal commands included);
//! 3. **a due batch**: `SCHED_DUE` renewals made due at once — wall time until every one of
//!    them is renewed (claim, `users.watch`, record), with the simulator answering at once;
//! 4. **Gmail units per idle mailbox per day**: a time-compressed run (renewal every 20 s,
//!    fallback after 5 s of silence) on `SCHED_IDLE` mailboxes; units from the simulator's
//!    ledger per mailbox-second, compared with the expected rate and scaled to the defaults
//!    (renewal daily, silence 15 min).

#[path = "support/mod.rs"]
mod support;

use gmail_sync::config::Config;
use gmail_sync::mailbox::Mailbox;
use gmail_sync::scheduler::{SchedulePolicy, Scheduler};
use gmail_sync::store::{Store, WatchPlan};
use gmail_sync::sync::Syncer;
use gmail_sync::telemetry::Counters;
use gmail_sync_testbed::gmail::{GmailSim, SimConfig};
use gmail_sync_testbed::redis_server::RedisServer;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{cpu_and_peak_rss, env_or};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const DEV_TOKEN: &str = "scheduler-bench-token";
const SHARDS: u32 = 16;
/// Long enough for /proc's 10 ms CPU resolution to give a per-tick figure.
const IDLE_PHASE: Duration = Duration::from_secs(20);
/// How long the time-compressed units phase runs.
const UNITS_PHASE: Duration = Duration::from_secs(60);
/// The compressed periods of the units phase.
const FAST_RENEW_S: u64 = 20;
const FAST_SILENCE_S: u64 = 5;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn main() -> anyhow::Result<()> {
    support::main(run)
}

fn config(redis: &RedisServer, sim: &GmailSim, prefix: &str, extra: &[(&str, &str)]) -> Config {
    let mut env: HashMap<String, String> = [
        ("GMAIL_SYNC_REDIS_URL", redis.url()),
        ("GMAIL_SYNC_KEY_PREFIX", prefix.to_string()),
        ("GMAIL_SYNC_SHARDS", SHARDS.to_string()),
        ("GMAIL_SYNC_GMAIL_API_URL", sim.base_url()),
        ("GMAIL_SYNC_DEV_ACCESS_TOKEN", DEV_TOKEN.to_string()),
        (
            "GMAIL_SYNC_TOPIC",
            "projects/bench/topics/gmail".to_string(),
        ),
        ("GMAIL_SYNC_RENEWALS_PER_MINUTE", "1000000".to_string()),
        ("GMAIL_SYNC_SCHEDULER_TICK_MS", "100".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    Config::from_lookup(|k| env.get(k).cloned()).expect("a valid bench configuration")
}

fn scheduler(config: &Config, store: &Store, counters: &Arc<Counters>) -> Scheduler {
    let gmail =
        gmail_sync::app::gmail_client(config, store, counters.clone()).expect("gmail client");
    let syncer = Arc::new(Syncer::new(
        gmail.clone(),
        store.clone(),
        config.sync.clone(),
        counters.clone(),
        config.log_mailbox,
    ));
    Scheduler {
        store: store.clone(),
        gmail,
        syncer,
        topic: config.topic.clone().expect("topic set above"),
        policy: SchedulePolicy::new(config.scheduler.clone(), config.store.shards),
        counters: counters.clone(),
        tracker: TaskTracker::new(),
        log_style: config.log_mailbox,
        heartbeat: Arc::default(),
    }
}

async fn redis_info(store_url: &str, section: &str) -> anyhow::Result<String> {
    let mut con = redis::Client::open(store_url)?
        .get_multiplexed_async_connection()
        .await?;
    Ok(redis::cmd("INFO")
        .arg(section)
        .query_async(&mut con)
        .await?)
}

async fn used_memory(url: &str) -> anyhow::Result<u64> {
    let info = redis_info(url, "memory").await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no used_memory in INFO"))
}

/// Calls of every command so far, from `INFO commandstats` (INFO itself excluded).
async fn commands(url: &str) -> anyhow::Result<u64> {
    let info = redis_info(url, "commandstats").await?;
    Ok(info
        .lines()
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum())
}

fn cpu_of_self() -> Duration {
    cpu_and_peak_rss(std::process::id()).map_or(Duration::ZERO, |(cpu, _)| cpu)
}

/// Runs `scheduler` until `done()` or `limit`; returns the time taken.
async fn run_until(
    scheduler: Scheduler,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<Duration> {
    let stop = CancellationToken::new();
    let task = tokio::spawn(scheduler.run(stop.clone()));
    let started = Instant::now();
    while !done() && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    stop.cancel();
    task.await??;
    Ok(took)
}

async fn register(store: &Store, mailbox: &Mailbox, plan: &WatchPlan) -> anyhow::Result<()> {
    store
        .register(mailbox, gmail_sync::history_id::HistoryId(1_000_000), plan)
        .await?;
    Ok(())
}

async fn run() -> anyhow::Result<()> {
    let mailboxes: usize = env_or("SCHED_MAILBOXES", 100_000);
    let due: usize = env_or("SCHED_DUE", 1000).min(mailboxes);
    let idle: usize = env_or("SCHED_IDLE", 100);
    let redis = RedisServer::start()?;
    let mut sim_config = SimConfig::default();
    sim_config.static_tokens.push(DEV_TOKEN.to_string());
    let sim = GmailSim::start(sim_config).await?;
    println!(
        "gmail-sync scheduler benchmark: {mailboxes} registered mailboxes, {SHARDS} shards, \
         {due} due at once, Redis {}",
        redis.url()
    );

    // 1. Memory: every mailbox idle (renewal and first look a day away).
    let base = config(&redis, &sim, "sched", &[]);
    let store = Store::connect(&base.redis, &base.store).await?;
    let far = WatchPlan {
        expiration_ms: now_ms() + 7 * 86_400_000,
        renew_at_s: now_ms() / 1000 + 86_400,
        first_look_ms: now_ms() + 86_400_000,
        labels: None,
    };
    let before = used_memory(&redis.url()).await?;
    let started = Instant::now();
    for i in 0..mailboxes {
        let m = Mailbox::parse(&format!("user{i}@example.com"))?;
        register(&store, &m, &far).await?;
    }
    let after = used_memory(&redis.url()).await?;
    println!(
        "redis bytes per idle mailbox: {} (state hash + schedule entry; registered in {:.1} s)",
        (after - before) / mailboxes.max(1) as u64,
        started.elapsed().as_secs_f64()
    );

    // 2. An idle tick.
    let counters = Arc::new(Counters::default());
    let calls_before = commands(&redis.url()).await?;
    let cpu_before = cpu_of_self();
    run_until(scheduler(&base, &store, &counters), IDLE_PHASE, || false).await?;
    let cpu = cpu_of_self() - cpu_before;
    let calls = commands(&redis.url()).await? - calls_before;
    let ticks = counters.snapshot().scheduler_ticks.max(1);
    println!(
        "idle tick: {ticks} ticks in {} s, {:.0} µs CPU per tick (whole process), {:.1} Redis \
         commands per tick ({SHARDS} shards)",
        IDLE_PHASE.as_secs(),
        cpu.as_micros() as f64 / ticks as f64,
        calls as f64 / ticks as f64
    );

    // 3. A due batch.
    let now = now_ms();
    let due_plan = WatchPlan {
        renew_at_s: now / 1000 - 1,
        first_look_ms: now - 1,
        ..far.clone()
    };
    let due_mailboxes: Vec<Mailbox> = (0..due)
        .map(|i| Mailbox::parse(&format!("user{i}@example.com")))
        .collect::<Result<_, _>>()?;
    for m in &due_mailboxes {
        sim.add_mailbox(m.as_str());
        register(&store, m, &due_plan).await?;
    }
    let watch_calls = || {
        sim.ledger()
            .calls_to(gmail_sync_testbed::gmail::Endpoint::Watch)
            .len()
    };
    let counters = Arc::new(Counters::default());
    let renewed = counters.clone();
    let took = run_until(
        scheduler(&base, &store, &counters),
        Duration::from_secs(300),
        || renewed.snapshot().renewals >= due as u64,
    )
    .await?;
    println!(
        "due batch: {} of {due} renewed in {:.2} s ({} watch calls; {:.0} renewals/s)",
        counters.snapshot().renewals,
        took.as_secs_f64(),
        watch_calls(),
        counters.snapshot().renewals as f64 / took.as_secs_f64()
    );

    // 4. Units per idle mailbox per day, time-compressed.
    let fast = config(
        &redis,
        &sim,
        "units",
        &[
            ("GMAIL_SYNC_RENEW_INTERVAL_SECS", &FAST_RENEW_S.to_string()),
            ("GMAIL_SYNC_RENEW_JITTER_SECS", "2"),
            (
                "GMAIL_SYNC_FALLBACK_SILENCE_SECS",
                &FAST_SILENCE_S.to_string(),
            ),
            ("GMAIL_SYNC_FALLBACK_JITTER_SECS", "0"),
        ],
    );
    let fast_store = Store::connect(&fast.redis, &fast.store).await?;
    let policy = SchedulePolicy::new(fast.scheduler.clone(), SHARDS);
    for i in 0..idle {
        let m = Mailbox::parse(&format!("idle{i}@example.com"))?;
        sim.add_mailbox(m.as_str());
        let now = now_ms();
        let renew_at_s = policy.next_renewal_s(now);
        let plan = WatchPlan {
            expiration_ms: now + 7 * 86_400_000,
            renew_at_s,
            first_look_ms: policy.first_look_ms(now, renew_at_s),
            labels: None,
        };
        register(&fast_store, &m, &plan).await?;
    }
    let ledger_mark = sim.ledger_len();
    let counters = Arc::new(Counters::default());
    run_until(
        scheduler(&fast, &fast_store, &counters),
        UNITS_PHASE,
        || false,
    )
    .await?;
    let ledger = sim.ledger();
    let units: u64 = ledger.entries[ledger_mark..]
        .iter()
        .filter_map(|e| match e {
            gmail_sync_testbed::gmail::LedgerEntry::Call(c)
                if c.mailbox.as_deref().is_some_and(|m| m.starts_with("idle")) =>
            {
                Some(c.endpoint.cost())
            }
            _ => None,
        })
        .sum();
    let per_mailbox_s = units as f64 / idle as f64 / UNITS_PHASE.as_secs_f64();
    let expected_per_s = 100.0 / FAST_RENEW_S as f64 + 2.0 / FAST_SILENCE_S as f64;
    let daily_default = 100.0 + 2.0 * (86_400.0 / 900.0);
    println!(
        "units per idle mailbox: {:.2}/s measured at renewal {FAST_RENEW_S} s + silence \
         {FAST_SILENCE_S} s (expected {:.2}/s: ratio {:.2}); at the defaults (daily, 15 min) \
         that is {:.0} units per mailbox per day ({} renewals, {} fallback syncs)",
        per_mailbox_s,
        expected_per_s,
        per_mailbox_s / expected_per_s,
        daily_default * per_mailbox_s / expected_per_s,
        counters.snapshot().renewals,
        counters.snapshot().fallback_syncs,
    );
    Ok(())
}
