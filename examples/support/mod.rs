//! Shared by the demo and the benchmark: the local test bed (the test-support crate's façade,
//! `gmail_sync_testbed::bed`: Redis, Google's Pub/Sub emulator, the Gmail simulator, worker
//! processes and their ready files, the ledger check) plus what needs the product's types.
//!
//! Workers are real processes: the example binary re-executes itself with `--worker`, which runs
//! exactly what `gmail-sync run` runs. So the worker's CPU and memory can be measured alone, and
//! several workers share one subscription as replicas would.

#![allow(dead_code)] // each example uses a different part

pub mod alloc_count;

use gmail_sync::mailbox::Mailbox;
use gmail_sync_testbed::bed::{Options, RedisChoice, Testbed, WorkerProcess};
use gmail_sync_testbed::gmail::SimConfig;
use std::collections::BTreeMap;
use std::time::Duration;

pub const DEV_TOKEN: &str = "demo-dev-token";

/// The examples' `main`: as a worker (`--worker`) run `gmail-sync run` and exit; otherwise run
/// `body` on a multi-threaded runtime.
pub fn main<F: std::future::Future<Output = anyhow::Result<()>>>(
    body: impl FnOnce() -> F,
) -> anyhow::Result<()> {
    run_worker_if_asked();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(body())
}

/// If this process was started as a worker, run it and exit; otherwise return. The worker's
/// runtime is the one `gmail-sync` runs on ([`gmail_sync::cli::RUNTIME_SHAPE`]) unless
/// `BENCH_WORKER_THREADS` asks for a multi-threaded one with that many workers (to compare
/// runtime shapes in one build).
fn run_worker_if_asked() {
    if std::env::args().nth(1).as_deref() != Some("--worker") {
        return;
    }
    let shape = match std::env::var("BENCH_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(n) => gmail_sync::cli::RuntimeShape::Workers(n),
        None => gmail_sync::cli::RUNTIME_SHAPE,
    };
    alloc_count::publish_if_asked();
    let runtime = gmail_sync::cli::runtime(shape).unwrap();
    let cli = <gmail_sync::cli::Cli as clap::Parser>::parse_from(["gmail-sync", "run"]);
    let code = runtime.block_on(gmail_sync::cli::execute(cli));
    std::process::exit(code);
}

/// The examples' test bed: the shared façade (`gmail_sync_testbed::bed::Testbed`, reachable
/// through `Deref`) with its own Redis and emulator, plus `mailbox add` through the product.
pub struct Bed {
    pub tb: Testbed,
}

impl std::ops::Deref for Bed {
    type Target = Testbed;
    fn deref(&self) -> &Testbed {
        &self.tb
    }
}

impl std::ops::DerefMut for Bed {
    fn deref_mut(&mut self) -> &mut Testbed {
        &mut self.tb
    }
}

impl Bed {
    /// Redis, the emulator and the simulator of this example's own (stopped by PID when the
    /// bed is dropped or the example exits), key prefix `label`, 16 shards.
    pub async fn start(label: &str, sim: SimConfig) -> anyhow::Result<Bed> {
        Bed::start_on(label, sim, RedisChoice::Own).await
    }

    /// [`Bed::start`] on the Redis `redis` asks for (a server or a cluster of the bed's own).
    pub async fn start_on(label: &str, sim: SimConfig, redis: RedisChoice) -> anyhow::Result<Bed> {
        let options = Options {
            redis,
            own_emulator: true,
            sim,
            ack_deadline_secs: 10,
            shards: 16,
            dev_token: DEV_TOKEN.to_string(),
            prefix: Some(label.to_string()),
            worker_env: vec![
                ("GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS".into(), "10".into()),
                ("GMAIL_SYNC_SUMMARY_INTERVAL_SECS".into(), "0".into()),
            ],
        };
        Ok(Bed {
            tb: Testbed::start(label, options).await?,
        })
    }

    pub fn config(&self) -> gmail_sync::config::Config {
        let env: BTreeMap<String, String> = self.env().into_iter().collect();
        gmail_sync::config::Config::from_lookup(|k| env.get(k).cloned()).expect("valid config")
    }

    /// Creates the mailboxes in the simulator and registers them through the product, as
    /// `gmail-sync mailbox add` does (users.watch on the topic + baseline cursor). Registering
    /// a mailbox again (on a new topic) keeps its cursor and its baseline.
    pub async fn add_mailboxes(&mut self, emails: &[String]) -> anyhow::Result<()> {
        let config = self.config();
        let registry = gmail_sync::registry::Registry::from_config(&config).await?;
        for email in emails {
            if !self.sim.has_mailbox(email) {
                self.sim.add_mailbox(email);
            }
            let m = Mailbox::parse(email)?;
            let r = registry.add(&m, None).await?;
            self.baselines
                .entry(m.to_string())
                .or_insert(r.cursor.get());
        }
        Ok(())
    }

    /// Starts a worker process (this example binary with `--worker`, a health directory of
    /// its own) and waits until its ready file exists.
    pub async fn spawn_worker(
        &self,
        name: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<WorkerProcess> {
        let exe = std::env::current_exe()?;
        self.tb.start_worker(&exe, &["--worker"], name, extra).await
    }
}

/// SIGTERM, then wait (bounded) for the exit; returns the exit code.
pub async fn stop_worker(w: &WorkerProcess) -> Option<i32> {
    w.terminate(Duration::from_secs(30)).await?.code()
}

/// The counters of the worker's last summary line (logged at exit).
pub fn final_summary(w: &WorkerProcess) -> Option<serde_json::Value> {
    let log = std::fs::read_to_string(w.log_path()).ok()?;
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "final summary")
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Context switches (voluntary and not) of all of a process's threads, from /proc: how often
/// its threads went to sleep and were woken.
pub fn context_switches(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
        total += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Some(total)
}

/// (user+system CPU time, peak RSS in KiB) of a process, from /proc.
pub fn cpu_and_peak_rss(pid: u32) -> Option<(Duration, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that closes the command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let tck = 100; // sysconf(_SC_CLK_TCK) is 100 on Linux x86_64/aarch64
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((Duration::from_millis(ticks * 1000 / tck), hwm))
}

/// A seeded xorshift64: the same workload in every run with the same seed (no dependency
/// needed). The seed must not be 0.
pub struct Rng(pub u64);

impl Rng {
    /// Uniform enough in `0..n` for workload shapes.
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}
