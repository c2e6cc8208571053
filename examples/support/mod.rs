//! Shared by the demo and the benchmark: the local test bed (Redis, Google's Pub/Sub emulator,
//! the Gmail simulator) and worker processes.
//!
//! Workers are real processes: the example binary re-executes itself with `--worker`, which runs
//! exactly what `gmail-sync run` runs. So the worker's CPU and memory can be measured alone, and
//! several workers share one subscription as replicas would.

#![allow(dead_code)] // each example uses a different part

use gmail_sync::mailbox::Mailbox;
use gmail_sync_testbed::check;
use gmail_sync_testbed::gmail::{GmailSim, SimConfig};
use gmail_sync_testbed::process::ChildGuard;
use gmail_sync_testbed::pubsub::{self, Emulator, TestTopic};
use gmail_sync_testbed::redis_server::RedisServer;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

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

/// If this process was started as a worker, run it and exit; otherwise return.
fn run_worker_if_asked() {
    if std::env::args().nth(1).as_deref() != Some("--worker") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cli = <gmail_sync::cli::Cli as clap::Parser>::parse_from(["gmail-sync", "run"]);
    let code = runtime.block_on(gmail_sync::cli::execute(cli));
    std::process::exit(code);
}

pub struct Testbed {
    pub redis: RedisServer,
    pub emulator: Emulator,
    pub sim: GmailSim,
    pub topic: TestTopic,
    pub prefix: String,
    pub shards: u32,
    pub baselines: BTreeMap<String, u64>,
    pub dir: PathBuf,
}

impl Testbed {
    pub async fn start(label: &str, mut sim: SimConfig) -> anyhow::Result<Testbed> {
        let redis = RedisServer::start()?;
        let emulator = Emulator::start().await?;
        let topic = pubsub::unique_topic(&emulator, label, 10).await?;
        sim.pubsub_endpoint = Some(emulator.endpoint());
        sim.static_tokens.push(DEV_TOKEN.to_string());
        let sim = GmailSim::start(sim).await?;
        let dir = gmail_sync_testbed::process::fresh_dir(label)?;
        Ok(Testbed {
            redis,
            emulator,
            sim,
            topic,
            prefix: label.to_string(),
            shards: 16,
            baselines: BTreeMap::new(),
            dir,
        })
    }

    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("GMAIL_SYNC_SUBSCRIPTION", self.topic.subscription.clone()),
            ("GMAIL_SYNC_TOPIC", self.topic.topic.clone()),
            ("GMAIL_SYNC_REDIS_URL", self.redis.url()),
            ("GMAIL_SYNC_KEY_PREFIX", self.prefix.clone()),
            ("GMAIL_SYNC_SHARDS", self.shards.to_string()),
            ("GMAIL_SYNC_GMAIL_API_URL", self.sim.base_url()),
            ("GMAIL_SYNC_DEV_ACCESS_TOKEN", DEV_TOKEN.to_string()),
            ("PUBSUB_EMULATOR_HOST", self.emulator.host_port()),
            ("GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS", "10".to_string()),
            ("GMAIL_SYNC_SUMMARY_INTERVAL_SECS", "0".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn config(&self) -> gmail_sync::config::Config {
        let env: BTreeMap<String, String> = self.env().into_iter().collect();
        gmail_sync::config::Config::from_lookup(|k| env.get(k).cloned()).expect("valid config")
    }

    /// Creates the mailboxes in the simulator and registers them through the product, as
    /// `gmail-sync mailbox add` does (users.watch on the topic + baseline cursor).
    pub async fn add_mailboxes(&mut self, emails: &[String]) -> anyhow::Result<()> {
        let config = self.config();
        let registry = gmail_sync::registry::Registry::from_config(&config).await?;
        for email in emails {
            if !self.baselines.contains_key(email) {
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

    /// Starts a worker process (this example binary with `--worker`), waits until it is ready.
    pub async fn spawn_worker(
        &self,
        name: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<ChildGuard> {
        let health = self.dir.join(format!("{name}-health"));
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.arg("--worker")
            .envs(self.env())
            .env("GMAIL_SYNC_HEALTH_DIR", &health);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let guard = ChildGuard::spawn(name, cmd, &self.dir)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !health.join("ready").exists() {
            if !guard.is_running() || Instant::now() > deadline {
                anyhow::bail!("worker {name} did not start:\n{}", guard.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(guard)
    }

    /// Mailboxes whose cursor is behind the simulator's current historyId.
    pub async fn behind(&self, store: &gmail_sync::store::Store) -> usize {
        let mut n = 0;
        for email in self.baselines.keys() {
            let m = Mailbox::parse(email).unwrap();
            let cursor = store
                .cursor(&m)
                .await
                .ok()
                .flatten()
                .unwrap_or_default()
                .get();
            if cursor < self.sim.current_history_id(email) {
                n += 1;
            }
        }
        n
    }

    pub async fn entries(&self) -> anyhow::Result<Vec<check::StreamEntry>> {
        let config = self.config();
        let mut con = gmail_sync::store::RedisConnection::connect(&config.redis).await?;
        let streams = gmail_sync::store::KeyLayout::new(&self.prefix, self.shards).streams();
        Ok(check::read_streams(&mut con, &streams).await?)
    }

    /// Entries in all change streams (XLEN), cheap enough for a progress line.
    pub async fn entry_count(&self) -> anyhow::Result<u64> {
        let config = self.config();
        let mut con = gmail_sync::store::RedisConnection::connect(&config.redis).await?;
        let mut n = 0u64;
        for stream in gmail_sync::store::KeyLayout::new(&self.prefix, self.shards).streams() {
            let len: u64 = redis::cmd("XLEN").arg(stream).query_async(&mut con).await?;
            n += len;
        }
        Ok(n)
    }

    pub async fn check(&self) -> anyhow::Result<Result<usize, String>> {
        let entries = self.entries().await?;
        Ok(check::compare(
            &self.sim.ledger(),
            &entries,
            &self.baselines,
        ))
    }
}

/// SIGTERM, then wait (bounded) for the exit; returns the exit code.
pub async fn stop_worker(w: &ChildGuard) -> Option<i32> {
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(w.pid().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(s) = w.try_status() {
            return s.code();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.kill();
    None
}

/// The counters of the worker's last summary line (logged at exit).
pub fn final_summary(w: &ChildGuard) -> Option<serde_json::Value> {
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
