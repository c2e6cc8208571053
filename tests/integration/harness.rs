//! The small harness every integration test uses: a `Bed` is the test bed's façade
//! (`gmail_sync_testbed::bed::Testbed`: Redis, the shared Pub/Sub emulator, a Gmail simulator,
//! a fresh topic and subscription, a random key prefix, worker processes, change streams,
//! ledger check) plus what needs the product's own types: a `Config` from the bed's
//! environment, `mailbox add` through the registry, and workers inside the test process
//! through `app::run`, exactly as `main` starts one.

use gmail_sync::config::Config;
use gmail_sync::mailbox::Mailbox;
use gmail_sync::store::Store;
use gmail_sync::telemetry::{Counters, CountersSnapshot};
use gmail_sync_testbed::bed::{self, Options, RedisChoice, Testbed};
use gmail_sync_testbed::gmail::SimConfig;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use gmail_sync_testbed::bed::{Entry, WorkerProcess};

pub const DEV_TOKEN: &str = "dev-token-7f3a9c-never-log-me";

pub struct BedOptions {
    /// Which Redis: the shared one, one of the bed's own (tests that kill or reconfigure
    /// Redis), or a three-master cluster.
    pub redis: RedisChoice,
    pub sim: SimConfig,
    pub ack_deadline_secs: i32,
    pub shards: u32,
    /// More worker variables, after (and over) `TEST_WORKER_ENV`.
    pub worker_env: Vec<(String, String)>,
}

impl Default for BedOptions {
    fn default() -> Self {
        BedOptions {
            redis: RedisChoice::Shared,
            sim: SimConfig::default(),
            ack_deadline_secs: 10,
            shards: 4,
            worker_env: Vec::new(),
        }
    }
}

/// Worker settings of every test bed: short timeouts so failures show quickly.
const TEST_WORKER_ENV: &[(&str, &str)] = &[
    ("GMAIL_SYNC_ACK_EXTENSION_SECS", "10"),
    ("GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS", "5"),
    ("GMAIL_SYNC_SUMMARY_INTERVAL_SECS", "0"),
    ("GMAIL_SYNC_MAILBOX_LEASE_MS", "5000"),
    ("GMAIL_SYNC_GMAIL_TIMEOUT_SECS", "5"),
    // A permanent failure marks its mailbox at once, as the tests of marking expect; the mass
    // failure test sets its own settle time.
    ("GMAIL_SYNC_FAILURE_SETTLE_SECS", "0"),
];

/// The façade (reachable through `Deref`: `bed.sim`, `bed.topic`, `bed.baselines`,
/// `bed.wait_caught_up(..)`, `bed.check_against_ledger()`, ...) and the product-specific layer.
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
    pub async fn start(label: &str) -> Bed {
        Bed::with(label, BedOptions::default()).await
    }

    /// A default bed with one registered mailbox, returned with its address.
    pub async fn with_one_mailbox(label: &str) -> (Bed, String) {
        let mut bed = Bed::start(label).await;
        let email = emails(label, 1).remove(0);
        bed.add_mailboxes(std::slice::from_ref(&email)).await;
        (bed, email)
    }

    pub async fn with(label: &str, opts: BedOptions) -> Bed {
        let options = Options {
            redis: opts.redis,
            own_emulator: false,
            sim: opts.sim,
            ack_deadline_secs: opts.ack_deadline_secs,
            shards: opts.shards,
            dev_token: DEV_TOKEN.to_string(),
            prefix: None,
            worker_env: TEST_WORKER_ENV
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .chain(opts.worker_env)
                .collect(),
        };
        let tb = Testbed::start(label, options)
            .await
            .unwrap_or_else(|e| panic!("test bed {label}: {e:#}"));
        Bed { tb }
    }

    /// A plain connection to the bed's (single) Redis, for checks and admin commands.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        self.tb.connect_single().await.expect("redis connection")
    }

    /// Mailbox lease keys that exist right now (none once every worker stopped cleanly).
    pub async fn lease_keys(&self) -> Vec<String> {
        self.tb.lease_keys().await.expect("KEYS")
    }

    /// Calls the simulator answered on `endpoint` so far.
    pub fn calls_to(&self, endpoint: gmail_sync_testbed::gmail::Endpoint) -> usize {
        self.sim.ledger().calls_to(endpoint).len()
    }

    pub fn config_with(&self, overrides: &[(&str, &str)]) -> Config {
        let env: HashMap<String, String> = self.env_with(overrides).into_iter().collect();
        Config::from_lookup(|k| env.get(k).cloned()).expect("valid test config")
    }

    pub fn config(&self) -> Config {
        self.config_with(&[])
    }

    pub async fn store(&self) -> Store {
        let c = self.config();
        Store::connect(&c.redis, &c.store).await.expect("store")
    }

    /// Creates mailboxes in the simulator and registers them through the product
    /// (users.watch + baseline cursor), as `gmail-sync mailbox add` does.
    pub async fn add_mailboxes(&mut self, emails: &[String]) {
        let config = self.config();
        let registry = gmail_sync::registry::Registry::from_config(&config)
            .await
            .expect("registry");
        for email in emails {
            if !self.sim.has_mailbox(email) {
                self.sim.add_mailbox(email);
            }
            let m = Mailbox::parse(email).unwrap();
            let r = registry.add(&m, None).await.expect("mailbox add");
            self.baselines
                .entry(m.to_string())
                .or_insert(r.cursor.get());
        }
    }

    /// A worker as a real `gmail-sync run` process (stdout + stderr in its log file, a health
    /// directory of its own). Not waited for: call `wait_ready` before publishing.
    pub fn spawn_worker_process(&self, name: &str, overrides: &[(&str, &str)]) -> WorkerProcess {
        self.tb
            .spawn_worker(
                env!("CARGO_BIN_EXE_gmail-sync").as_ref(),
                &["run"],
                name,
                overrides,
            )
            .expect("spawn gmail-sync")
    }

    /// Waits until every worker process wrote its ready file (panics with the log tail if not).
    pub async fn wait_ready(&self, workers: &[&WorkerProcess]) {
        for w in workers {
            w.wait_ready(bed::READY_TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("{e:#}"));
        }
    }

    pub async fn start_worker(&self) -> Worker {
        self.start_worker_with(&[]).await
    }

    /// A worker inside this test process, started exactly as `main` starts one, with a health
    /// directory of its own; returns once its ready file exists (its Pub/Sub stream is open).
    pub async fn start_worker_with(&self, overrides: &[(&str, &str)]) -> Worker {
        let health_dir = self.fresh_health_dir("in-process");
        let health = health_dir.display().to_string();
        let mut all = vec![("GMAIL_SYNC_HEALTH_DIR", health.as_str())];
        all.extend_from_slice(overrides);
        let config = self.config_with(&all);
        let health_dir = config.health_dir.clone();
        let shutdown = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn({
            let (shutdown, counters) = (shutdown.clone(), counters.clone());
            async move {
                gmail_sync::app::run(config, shutdown, counters)
                    .await
                    .map_err(anyhow::Error::from)
            }
        });
        let mut worker = Worker {
            shutdown,
            counters,
            health_dir,
            task: Some(task),
        };
        worker.wait_ready().await;
        worker
    }

    /// Every entry of every change stream, in stream order per shard.
    pub async fn entries(&self) -> Vec<Entry> {
        self.tb.entries().await.expect("reading the change streams")
    }

    /// A notification as Gmail would publish it, straight onto the topic.
    pub async fn publish(&self, payload: &[u8]) {
        self.tb.publish(payload).await.expect("publish");
    }
}

pub struct Worker {
    pub shutdown: CancellationToken,
    pub counters: Arc<Counters>,
    /// The worker's own `GMAIL_SYNC_HEALTH_DIR`.
    pub health_dir: PathBuf,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Worker {
    pub fn snapshot(&self) -> CountersSnapshot {
        self.counters.snapshot()
    }

    /// Waits for the worker's ready file; panics with `run`'s error if it ended first.
    async fn wait_ready(&mut self) {
        let task = self.task.as_ref().expect("running");
        let waited = bed::wait_ready_file(&self.health_dir, bed::READY_TIMEOUT, || {
            task.is_finished().then(|| "app::run returned".to_string())
        })
        .await;
        if let Err(e) = waited {
            let outcome = if task.is_finished() {
                match self.task.take().unwrap().await {
                    Ok(Ok(())) => "Ok(())".to_string(),
                    Ok(Err(e)) => format!("Err({e:#})"),
                    Err(e) => format!("panicked: {e}"),
                }
            } else {
                "still running".to_string()
            };
            panic!("in-process worker not ready: {e}; app::run: {outcome}");
        }
    }

    /// Graceful stop; returns what `run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("worker stops within 30 s")
            .expect("worker task not panicked")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `cond` every 50 ms until true or `timeout` (bounded loop).
pub async fn eventually<F: FnMut() -> bool>(timeout: Duration, mut cond: F) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn emails(label: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{label}{i}@example.com")).collect()
}

/// How long a test waits for the worker to catch up with the simulator.
pub const CATCH_UP: Duration = Duration::from_secs(60);

/// Waits until the worker has handled every delivery it received (acked or nacked) and nothing
/// new arrived for a while (15 rounds of 100 ms; bounded to 40 s).
pub async fn settle(worker: &Worker) {
    let mut last = u64::MAX;
    let mut stable_rounds = 0;
    for _ in 0..400 {
        let s = worker.snapshot();
        let handled = s.acked_without_work
            + s.acked_after_sync
            + s.nacked
            + s.quarantined
            + s.unknown_mailbox
            + s.attention_mailbox;
        if s.received == handled && s.received == last {
            stable_rounds += 1;
            if stable_rounds >= 15 {
                return;
            }
        } else {
            stable_rounds = 0;
        }
        last = s.received;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
