//! The small harness every integration test uses: a `Bed` is Redis, the shared Pub/Sub
//! emulator, a Gmail simulator, a fresh topic and subscription and a random key prefix; with
//! helpers to run workers (in-process through `app::run`, exactly as `main` does, or as real
//! processes), read the change streams, and compare them with the simulator's ledger.

use gmail_sync::config::Config;
use gmail_sync::history_id::HistoryId;
use gmail_sync::mailbox::Mailbox;
use gmail_sync::store::Store;
use gmail_sync::telemetry::{Counters, CountersSnapshot};
use gmail_sync_testbed::check;
use gmail_sync_testbed::gmail::{GmailSim, SimConfig};
use gmail_sync_testbed::process::ChildGuard;
use gmail_sync_testbed::pubsub::{self, Emulator, TestTopic};
use gmail_sync_testbed::redis_server::RedisServer;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const DEV_TOKEN: &str = "dev-token-7f3a9c-never-log-me";

pub struct BedOptions {
    /// Start a Redis of our own (tests that kill or reconfigure Redis).
    pub own_redis: bool,
    pub sim: SimConfig,
    pub ack_deadline_secs: i32,
    pub shards: u32,
}

impl Default for BedOptions {
    fn default() -> Self {
        BedOptions {
            own_redis: false,
            sim: SimConfig::default(),
            ack_deadline_secs: 10,
            shards: 4,
        }
    }
}

pub struct Bed {
    pub emulator: &'static Emulator,
    /// Kept alive for the bed's lifetime (stopped on drop).
    pub own_redis: Option<RedisServer>,
    pub redis_url: String,
    /// Set to run against a Redis Cluster instead of `redis_url`.
    pub cluster_nodes: Option<String>,
    pub sim: GmailSim,
    pub topic: TestTopic,
    pub prefix: String,
    pub shards: u32,
    /// Baseline cursor of every mailbox registered through the bed.
    pub baselines: BTreeMap<String, u64>,
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

    /// A plain connection to the bed's (single) Redis, for checks and admin commands.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Mailbox lease keys that exist right now (none once every worker stopped cleanly).
    pub async fn lease_keys(&self) -> Vec<String> {
        redis::cmd("KEYS")
            .arg(format!("{{{}:*}}:lease:*", self.prefix))
            .query_async(&mut self.redis().await)
            .await
            .unwrap()
    }

    /// Calls the simulator answered on `endpoint` so far.
    pub fn calls_to(&self, endpoint: gmail_sync_testbed::gmail::Endpoint) -> usize {
        self.sim.ledger().calls_to(endpoint).len()
    }

    pub async fn with(label: &str, opts: BedOptions) -> Bed {
        let emulator = pubsub::shared().await.expect("Pub/Sub emulator");
        let (own_redis, redis_url) = if opts.own_redis {
            let r = RedisServer::start().expect("redis-server");
            let url = r.url();
            (Some(r), url)
        } else {
            (
                None,
                gmail_sync_testbed::redis_server::shared()
                    .await
                    .expect("redis-server")
                    .url(),
            )
        };
        let topic = pubsub::unique_topic(emulator, label, opts.ack_deadline_secs)
            .await
            .expect("topic and subscription");
        let mut sim_config = opts.sim;
        sim_config.pubsub_endpoint = Some(emulator.endpoint());
        if !sim_config.static_tokens.iter().any(|t| t == DEV_TOKEN) {
            sim_config.static_tokens.push(DEV_TOKEN.to_string());
        }
        let sim = GmailSim::start(sim_config).await.expect("gmail simulator");
        Bed {
            emulator,
            own_redis,
            redis_url,
            cluster_nodes: None,
            sim,
            topic,
            prefix: format!("t{}-{}", label, rand::random::<u32>()),
            shards: opts.shards,
            baselines: BTreeMap::new(),
        }
    }

    /// The worker's environment for this bed (also used for child processes).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("GMAIL_SYNC_SUBSCRIPTION", self.topic.subscription.clone()),
            ("GMAIL_SYNC_TOPIC", self.topic.topic.clone()),
            ("GMAIL_SYNC_REDIS_URL", self.redis_url.clone()),
            ("GMAIL_SYNC_KEY_PREFIX", self.prefix.clone()),
            ("GMAIL_SYNC_SHARDS", self.shards.to_string()),
            ("GMAIL_SYNC_GMAIL_API_URL", self.sim.base_url()),
            ("GMAIL_SYNC_DEV_ACCESS_TOKEN", DEV_TOKEN.to_string()),
            ("PUBSUB_EMULATOR_HOST", self.emulator.host_port()),
            ("GMAIL_SYNC_ACK_EXTENSION_SECS", "10".to_string()),
            ("GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS", "5".to_string()),
            ("GMAIL_SYNC_SUMMARY_INTERVAL_SECS", "0".to_string()),
            ("GMAIL_SYNC_MAILBOX_LEASE_MS", "5000".to_string()),
            ("GMAIL_SYNC_GMAIL_TIMEOUT_SECS", "5".to_string()),
            (
                "GMAIL_SYNC_HEALTH_DIR",
                std::env::temp_dir()
                    .join(format!("gmail-sync-it-{}", self.prefix))
                    .display()
                    .to_string(),
            ),
        ]
        .into_iter()
        .chain(
            self.cluster_nodes
                .clone()
                .map(|n| ("GMAIL_SYNC_REDIS_CLUSTER_NODES", n)),
        )
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn config_with(&self, overrides: &[(&str, &str)]) -> Config {
        let mut env: HashMap<String, String> = self.env().into_iter().collect();
        for (k, v) in overrides {
            env.insert(k.to_string(), v.to_string());
        }
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
            self.sim.add_mailbox(email);
            let m = Mailbox::parse(email).unwrap();
            let r = registry.add(&m, None).await.expect("mailbox add");
            self.baselines.insert(m.to_string(), r.cursor.get());
        }
    }

    /// A worker as a real `gmail-sync run` process (stdout + stderr in its log file).
    pub fn spawn_worker_process(&self, name: &str, overrides: &[(&str, &str)]) -> ChildGuard {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gmail-sync"));
        cmd.arg("run");
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        for (k, v) in overrides {
            cmd.env(k, v);
        }
        let dir =
            gmail_sync_testbed::process::fresh_dir(&format!("{}-{name}", self.prefix)).unwrap();
        ChildGuard::spawn(name, cmd, &dir).expect("spawn gmail-sync")
    }

    pub fn start_worker(&self) -> Worker {
        self.start_worker_with(&[])
    }

    /// A worker inside this test process, started exactly as `main` starts one.
    pub fn start_worker_with(&self, overrides: &[(&str, &str)]) -> Worker {
        let config = self.config_with(overrides);
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
        Worker {
            shutdown,
            counters,
            task: Some(task),
        }
    }

    /// Every entry of every change stream, in stream order per shard.
    pub async fn entries(&self) -> Vec<Entry> {
        let config = self.config();
        let mut con = gmail_sync::store::RedisConnection::connect(&config.redis)
            .await
            .unwrap();
        let streams = self.store().await.keys().streams();
        check::read_streams(&mut con, &streams)
            .await
            .unwrap()
            .into_iter()
            .map(|fields| Entry { fields })
            .collect()
    }

    /// Waits until every registered mailbox's cursor reached the simulator's current historyId.
    pub async fn wait_caught_up(&self, timeout: Duration) -> Result<(), String> {
        let store = self.store().await;
        let deadline = Instant::now() + timeout;
        loop {
            let mut behind = Vec::new();
            for email in self.baselines.keys() {
                let m = Mailbox::parse(email).unwrap();
                let cursor = store.cursor(&m).await.unwrap().unwrap_or_default();
                let current = HistoryId(self.sim.current_history_id(email));
                if cursor < current {
                    behind.push(format!("{email}: {cursor} < {current}"));
                }
            }
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} mailboxes behind: {:?}",
                    behind.len(),
                    &behind[..behind.len().min(5)]
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The change streams compared with the simulator's ledger (see `check::compare`).
    pub async fn check_against_ledger(&self) -> Result<usize, String> {
        let entries: Vec<_> = self.entries().await.into_iter().map(|e| e.fields).collect();
        check::compare(&self.sim.ledger(), &entries, &self.baselines)
    }

    /// A notification as Gmail would publish it, straight onto the topic.
    pub async fn publish(&self, payload: &[u8]) {
        let publisher = pubsub::publisher(&self.emulator.endpoint(), &self.topic.topic)
            .await
            .unwrap();
        pubsub::publish_raw(&publisher, payload).await.unwrap();
    }
}

pub struct Entry {
    pub fields: BTreeMap<String, String>,
}

impl Entry {
    pub fn get(&self, field: &str) -> &str {
        self.fields.get(field).map(String::as_str).unwrap_or("")
    }
}

pub struct Worker {
    pub shutdown: CancellationToken,
    pub counters: Arc<Counters>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Worker {
    pub fn snapshot(&self) -> CountersSnapshot {
        self.counters.snapshot()
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
