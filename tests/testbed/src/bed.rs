//! The test bed as one façade, shared by gmail-sync's integration tests and its examples.
//!
//! A [`Testbed`] is Redis (shared, its own, or a three-master cluster), Google's Pub/Sub
//! emulator (shared or its own), a Gmail simulator, a fresh topic and subscription, a key
//! prefix and shard count, and the baseline cursor of every registered mailbox. It builds the
//! worker's environment ([`Testbed::env`]), spawns worker processes from any executable
//! ([`Testbed::spawn_worker`]) and waits for their ready file ([`WorkerProcess::wait_ready`]),
//! reads the change streams, compares them with the simulator's ledger, and waits until every
//! mailbox is caught up.
//!
//! This crate must not depend on gmail-sync (gmail-sync dev-depends on it; a cycle would give
//! two copies of every type), so the façade speaks the worker's language from the outside:
//! environment variables, raw Redis commands, and the health directory's `ready` file. What
//! needs the product's types (a `Config`, `mailbox add` through the registry, in-process
//! workers through `app::run`) is a thin layer in `tests/integration/harness.rs` and
//! `examples/support/mod.rs` on top of this.
//!
//! # Files
//! Everything of one bed lives under [`Testbed::dir`] (inside the per-test-process directory
//! of [`crate::process`], removed by the reaper): one sub-directory per worker process with
//! its `<name>.log` and its own `health/` directory, and fresh health directories for
//! in-process workers ([`Testbed::fresh_health_dir`]).

use crate::check::{self, StreamEntry};
use crate::gmail::{GmailSim, SimConfig};
use crate::process::{ChildGuard, fresh_dir};
use crate::pubsub::{self, Emulator, TestTopic};
use crate::redis_server::{self, RedisCluster, RedisServer, Secured, Security};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a worker may take from spawn to its ready file (Redis and Pub/Sub startup checks
/// have a 20 s deadline of their own; a busy 2-core CI machine builds clients slowly).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The Redis of a bed.
#[derive(Debug)]
pub enum Redis {
    /// The test binary's shared `redis-server` ([`redis_server::shared`]); give each bed its
    /// own key prefix.
    Shared(&'static RedisServer),
    /// A `redis-server` of the bed's own (tests that kill, restart or reconfigure Redis).
    Own(RedisServer),
    /// A Redis Cluster of three masters of the bed's own (with or without replicas).
    Cluster(RedisCluster),
}

impl Redis {
    /// The single server (shared or own); `None` for a cluster.
    pub fn server(&self) -> Option<&RedisServer> {
        match self {
            Redis::Shared(s) => Some(s),
            Redis::Own(s) => Some(s),
            Redis::Cluster(_) => None,
        }
    }

    /// `redis://127.0.0.1:PORT/` (`rediss://` with TLS) of the single server; `None` for a
    /// cluster.
    pub fn url(&self) -> Option<String> {
        self.server().map(RedisServer::url)
    }

    /// Certificates and login of the server or cluster (none for a plain one).
    pub fn secured(&self) -> &Secured {
        match self {
            Redis::Shared(s) => s.secured(),
            Redis::Own(s) => s.secured(),
            Redis::Cluster(c) => c.secured(),
        }
    }

    /// gmail-sync's Redis variables: the URL or cluster nodes, then the CA file, user and
    /// password file of a secured Redis.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = match (self.url(), self.cluster_nodes()) {
            (Some(url), _) => vec![("GMAIL_SYNC_REDIS_URL".to_string(), url)],
            (None, Some(nodes)) => vec![(
                "GMAIL_SYNC_REDIS_CLUSTER_NODES".to_string(),
                nodes.join(","),
            )],
            (None, None) => Vec::new(),
        };
        env.extend(self.secured().env());
        env
    }

    /// Seed node URLs of the cluster; `None` for a single server.
    pub fn cluster_nodes(&self) -> Option<Vec<String>> {
        match self {
            Redis::Cluster(c) => Some(c.nodes()),
            _ => None,
        }
    }
}

/// Which Redis [`Testbed::start`] uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RedisChoice {
    #[default]
    Shared,
    Own,
    Cluster,
    /// A server of the bed's own, TLS only and with a login ([`Security`]): the worker gets
    /// `rediss://`, `GMAIL_SYNC_REDIS_CA_FILE` and the user and password file.
    Secured,
    /// A cluster of the bed's own, secured the same way (TLS on the cluster bus too).
    SecuredCluster,
    /// A cluster of the bed's own, three masters with one replica each (failovers).
    ReplicatedCluster,
}

/// TLS and a login: what [`RedisChoice::Secured`] and [`RedisChoice::SecuredCluster`] ask for.
const SECURED: Security = Security {
    tls: true,
    login: true,
};

/// A process-wide shared instance or one of our own (dropped, and so stopped, with the bed).
#[derive(Debug)]
pub enum Held<T: 'static> {
    Shared(&'static T),
    Own(T),
}

impl<T> Deref for Held<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Held::Shared(t) => t,
            Held::Own(t) => t,
        }
    }
}

/// What differs between the beds of the tests and of the examples.
#[derive(Debug, Clone)]
pub struct Options {
    pub redis: RedisChoice,
    /// Start an emulator of our own instead of the test binary's shared one.
    pub own_emulator: bool,
    /// The simulator's configuration; `pubsub_endpoint` is set to the bed's emulator and
    /// `dev_token` is added to `static_tokens`.
    pub sim: SimConfig,
    /// Ack deadline of the bed's subscription (10–600 s).
    pub ack_deadline_secs: i32,
    /// `GMAIL_SYNC_SHARDS`.
    pub shards: u32,
    /// `GMAIL_SYNC_DEV_ACCESS_TOKEN`, accepted by the simulator for every mailbox.
    pub dev_token: String,
    /// `GMAIL_SYNC_KEY_PREFIX`; `None`: `t<label>-<random>` (unique on a shared Redis).
    pub prefix: Option<String>,
    /// More worker variables (or overrides of the bed's), in every [`Testbed::env`].
    pub worker_env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            redis: RedisChoice::Shared,
            own_emulator: false,
            sim: SimConfig::default(),
            ack_deadline_secs: 10,
            shards: 4,
            dev_token: "testbed-dev-token".into(),
            prefix: None,
            worker_env: Vec::new(),
        }
    }
}

/// gmail-sync's Redis key names, from the prefix and the shard count.
///
/// A copy of the formula of `gmail_sync::store::KeyLayout` (src/store/mod.rs), because this
/// crate cannot depend on gmail-sync: shard = FNV-1a 64 of the normalized address (trimmed,
/// lower-cased) modulo the shard count, hash tag `{PREFIX:sN}`. The integration test
/// `store::testbed_key_names_match_the_product_key_layout` keeps the two in step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    shards: u32,
}

impl Keys {
    pub fn new(prefix: &str, shards: u32) -> Keys {
        Keys {
            prefix: prefix.to_string(),
            shards: shards.max(1),
        }
    }

    /// The address as the product stores it (`Mailbox::parse`: trimmed, lower-cased).
    pub fn normalize(email: &str) -> String {
        email.trim().to_lowercase()
    }

    /// FNV-1a 64 of the normalized address (`Mailbox::stable_hash`).
    pub fn stable_hash(email: &str) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in Self::normalize(email).bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    pub fn shard_of(&self, email: &str) -> u32 {
        (Self::stable_hash(email) % u64::from(self.shards)) as u32
    }

    fn tag(&self, shard: u32) -> String {
        format!("{{{}:s{}}}", self.prefix, shard)
    }

    /// The mailbox's state hash (`cursor`, `synced_at`, `attention`).
    pub fn state(&self, email: &str) -> String {
        let tag = self.tag(self.shard_of(email));
        format!("{tag}:mb:{}", Self::normalize(email))
    }

    /// The mailbox's lease (a string holding `HOST:PID:RANDOM`).
    pub fn lease(&self, email: &str) -> String {
        let tag = self.tag(self.shard_of(email));
        format!("{tag}:lease:{}", Self::normalize(email))
    }

    /// A `KEYS` pattern matching every lease of this prefix.
    pub fn lease_pattern(&self) -> String {
        format!("{{{}:*}}:lease:*", self.prefix)
    }

    pub fn stream(&self, shard: u32) -> String {
        format!("{}:changes", self.tag(shard))
    }

    /// Every shard's change stream.
    pub fn streams(&self) -> Vec<String> {
        (0..self.shards).map(|s| self.stream(s)).collect()
    }

    pub fn quarantine(&self) -> String {
        format!("{{{}}}:quarantine", self.prefix)
    }
}

/// One change-stream entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub fields: StreamEntry,
}

impl Entry {
    /// The field's value, `""` if absent.
    pub fn get(&self, field: &str) -> &str {
        self.fields.get(field).map(String::as_str).unwrap_or("")
    }
}

/// A raw connection to the bed's Redis, single server or cluster.
pub enum RawConnection {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for RawConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RawConnection::Single(c) => c.req_packed_command(cmd),
            RawConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RawConnection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RawConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RawConnection::Single(c) => c.get_db(),
            RawConnection::Cluster(c) => c.get_db(),
        }
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Cursors read per pipeline by [`Testbed::behind_of`] on a single Redis (a scale run polls
/// 10^5 of them).
const CURSOR_PIPELINE: usize = 1000;

/// A plain multiplexed connection to `url` with bounded connect and response times.
pub async fn connect_single(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    connect_client(redis::Client::open(url)?, url).await
}

/// A way to connect to the bed's Redis (see [`Testbed::connector`]).
#[derive(Clone)]
pub enum Connector {
    Single { client: redis::Client, url: String },
    Cluster(redis::cluster::ClusterClient),
}

impl Connector {
    pub async fn connect(&self) -> Result<RawConnection> {
        match self {
            Connector::Single { client, url } => Ok(RawConnection::Single(
                connect_client(client.clone(), url).await?,
            )),
            Connector::Cluster(client) => Ok(RawConnection::Cluster(
                client
                    .get_async_connection()
                    .await
                    .context("connecting to the cluster")?,
            )),
        }
    }
}

/// A multiplexed connection of `client` (at `url`, for the error) with bounded connect and
/// response times.
pub async fn connect_client(
    client: redis::Client,
    url: &str,
) -> Result<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// Waits (bounded by `timeout`) until `<health_dir>/ready` exists, polling every 20 ms.
/// `exited` is asked on every round whether the worker is gone (`Some(why)`), so a worker that
/// failed at startup is reported at once rather than at the timeout.
///
/// The worker writes `ready` once its reader pulls from the message stream and Pub/Sub
/// answered since (a subscription check), Redis answered a PING, and nothing else holds it
/// back (gmail-sync's `health` module). The stream opens the StreamingPull RPC on its first
/// pull and says nothing when it has attached, so it may attach to the emulator a moment
/// after the file appears. On the fresh
/// subscription of a bed that is enough to publish right away: messages published before the
/// first stream attaches wait in the subscription (the stranding the emulator notes describe
/// comes after a stream was *cancelled*). Measured while writing this (in-process workers, 75
/// runs: publish right after `ready`, received 50 ms later each time, the poll interval; two
/// worker processes, 18 runs of 20 publishes right after both were ready: every message
/// handled, both workers received some in every run), so no settle delay follows it.
pub async fn wait_ready_file(
    health_dir: &Path,
    timeout: Duration,
    mut exited: impl FnMut() -> Option<String>,
) -> std::result::Result<(), String> {
    let ready = health_dir.join("ready");
    let deadline = Instant::now() + timeout;
    loop {
        if ready.exists() {
            return Ok(());
        }
        if let Some(why) = exited() {
            return Err(format!("{why} before writing {}", ready.display()));
        }
        if Instant::now() >= deadline {
            return Err(format!("no {} within {timeout:?}", ready.display()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A worker process of a bed: its [`ChildGuard`] (killed on drop) and its health directory.
#[derive(Debug)]
pub struct WorkerProcess {
    guard: ChildGuard,
    health_dir: PathBuf,
}

impl Deref for WorkerProcess {
    type Target = ChildGuard;
    fn deref(&self) -> &ChildGuard {
        &self.guard
    }
}

impl WorkerProcess {
    /// The worker's `GMAIL_SYNC_HEALTH_DIR` (its own; no other worker writes there).
    pub fn health_dir(&self) -> &Path {
        &self.health_dir
    }

    /// True while the worker's ready file exists (connected, and not shutting down).
    pub fn is_ready(&self) -> bool {
        self.health_dir.join("ready").exists()
    }

    /// Waits until the worker wrote its ready file (its Pub/Sub stream is open; see
    /// [`wait_ready_file`]). The error names the worker and carries its log tail; it comes at
    /// once if the worker exits first.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        wait_ready_file(&self.health_dir, timeout, || {
            self.guard
                .try_status()
                .map(|status| format!("exited ({status})"))
        })
        .await
        .map_err(|e| {
            anyhow!(
                "worker {} (pid {}) not ready: {e}; log tail:\n{}",
                self.guard.name(),
                self.guard.pid(),
                self.guard.log_tail(30)
            )
        })
    }

    /// Sends SIGTERM (a graceful stop). Does nothing if the worker has exited.
    pub fn sigterm(&self) {
        if self.guard.is_running() {
            // SAFETY: kill(2) on our own child, which is not reaped yet (`is_running` said so),
            // so its PID cannot have been reused.
            unsafe { libc::kill(self.guard.pid() as libc::pid_t, libc::SIGTERM) };
        }
    }

    /// SIGSTOP: the whole process freezes (every loop, every timer) until [`Self::resume`],
    /// as a process stuck for good would look from outside. Does nothing if it has exited.
    pub fn pause(&self) {
        if self.guard.is_running() {
            // SAFETY: as in `sigterm`.
            unsafe { libc::kill(self.guard.pid() as libc::pid_t, libc::SIGSTOP) };
        }
    }

    /// SIGCONT after [`Self::pause`]. Does nothing if the worker has exited.
    pub fn resume(&self) {
        if self.guard.is_running() {
            // SAFETY: as in `sigterm`.
            unsafe { libc::kill(self.guard.pid() as libc::pid_t, libc::SIGCONT) };
        }
    }

    /// Waits (bounded, polling every 20 ms) for the worker to exit; `None` if it still runs.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.guard.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit; SIGKILL if it did not exit (then
    /// `None`).
    pub async fn terminate(&self, timeout: Duration) -> Option<ExitStatus> {
        self.sigterm();
        let status = self.wait_exit(timeout).await;
        if status.is_none() {
            self.guard.kill();
        }
        status
    }
}

/// The test bed; see the module docs.
#[derive(Debug)]
pub struct Testbed {
    pub label: String,
    pub emulator: Held<Emulator>,
    pub redis: Redis,
    pub sim: GmailSim,
    pub topic: TestTopic,
    pub prefix: String,
    pub shards: u32,
    pub ack_deadline_secs: i32,
    pub dev_token: String,
    /// Baseline cursor of every registered mailbox (normalized address → historyId): the
    /// change streams must hold exactly the ledger's changes after it.
    pub baselines: BTreeMap<String, u64>,
    /// The bed's directory (worker logs and health directories).
    pub dir: PathBuf,
    /// Extra worker variables from [`Options::worker_env`].
    pub worker_env: Vec<(String, String)>,
}

impl Testbed {
    /// Starts (or borrows) everything; the simulator publishes to the bed's emulator.
    pub async fn start(label: &str, opts: Options) -> Result<Testbed> {
        let emulator = if opts.own_emulator {
            Held::Own(Emulator::start().await?)
        } else {
            Held::Shared(pubsub::shared().await?)
        };
        let redis = match opts.redis {
            RedisChoice::Shared => Redis::Shared(redis_server::shared().await?),
            RedisChoice::Own => Redis::Own(blocking(RedisServer::start).await?),
            RedisChoice::Cluster => Redis::Cluster(blocking(RedisCluster::start).await?),
            RedisChoice::Secured => {
                Redis::Own(blocking(|| RedisServer::start_with(SECURED)).await?)
            }
            RedisChoice::SecuredCluster => {
                Redis::Cluster(blocking(|| RedisCluster::start_with(SECURED)).await?)
            }
            RedisChoice::ReplicatedCluster => {
                Redis::Cluster(blocking(RedisCluster::start_replicated).await?)
            }
        };
        let topic = pubsub::unique_topic(&emulator, label, opts.ack_deadline_secs)
            .await
            .context("topic and subscription")?;
        let mut sim = opts.sim;
        sim.pubsub_endpoint = Some(emulator.endpoint());
        if !sim.static_tokens.contains(&opts.dev_token) {
            sim.static_tokens.push(opts.dev_token.clone());
        }
        let sim = GmailSim::start(sim).await.context("gmail simulator")?;
        let prefix = opts
            .prefix
            .unwrap_or_else(|| format!("t{label}-{}", rand::random::<u32>()));
        let dir = fresh_dir(&prefix)?;
        Ok(Testbed {
            label: label.to_string(),
            emulator,
            redis,
            sim,
            topic,
            prefix,
            shards: opts.shards,
            ack_deadline_secs: opts.ack_deadline_secs,
            dev_token: opts.dev_token,
            baselines: BTreeMap::new(),
            dir,
            worker_env: opts.worker_env,
        })
    }

    /// The bed's key names.
    pub fn keys(&self) -> Keys {
        Keys::new(&self.prefix, self.shards)
    }

    /// The worker's environment for this bed: subscription, topic, Redis, prefix, shards,
    /// the simulator's URL, the development token, the emulator, a health directory shared by
    /// non-worker commands, then [`Options::worker_env`] (later entries replace earlier ones).
    /// Each worker gets its own `GMAIL_SYNC_HEALTH_DIR` on top (see [`Self::spawn_worker`]).
    pub fn env(&self) -> Vec<(String, String)> {
        self.env_with(&[])
    }

    /// [`Self::env`] with `overrides` applied last.
    pub fn env_with(&self, overrides: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("GMAIL_SYNC_SUBSCRIPTION", self.topic.subscription.clone()),
            ("GMAIL_SYNC_TOPIC", self.topic.topic.clone()),
            ("GMAIL_SYNC_KEY_PREFIX", self.prefix.clone()),
            ("GMAIL_SYNC_SHARDS", self.shards.to_string()),
            ("GMAIL_SYNC_GMAIL_API_URL", self.sim.base_url()),
            ("GMAIL_SYNC_DEV_ACCESS_TOKEN", self.dev_token.clone()),
            // Used only when a test configures real credentials (delegation, refresh tokens).
            ("GMAIL_SYNC_TOKEN_URL", self.sim.token_url()),
            ("GMAIL_SYNC_IAM_CREDENTIALS_URL", self.sim.base_url()),
            ("PUBSUB_EMULATOR_HOST", self.emulator.host_port()),
            (
                "GMAIL_SYNC_HEALTH_DIR",
                self.dir.join("health").display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        env.extend(self.redis.env());
        let extra = self
            .worker_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(overrides.iter().copied());
        for (k, v) in extra {
            match env.iter_mut().find(|(name, _)| name == k) {
                Some(slot) => slot.1 = v.to_string(),
                None => env.push((k.to_string(), v.to_string())),
            }
        }
        env
    }

    /// A fresh, not yet existing health directory for one worker (`<dir>/<name>-health-N`).
    pub fn fresh_health_dir(&self, name: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{name}-health-{n}"))
    }

    /// Spawns a worker process: `exe args...` with [`Self::env_with`]`(overrides)` and a health
    /// directory of its own (unless `overrides` sets `GMAIL_SYNC_HEALTH_DIR`), logging to
    /// `<dir>/<name>-N/<name>.log`. Does not wait: see [`WorkerProcess::wait_ready`] and
    /// [`Self::start_worker`].
    pub fn spawn_worker(
        &self,
        exe: &Path,
        args: &[&str],
        name: &str,
        overrides: &[(&str, &str)],
    ) -> Result<WorkerProcess> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("{name}-{n}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir:?}"))?;
        let own_health = dir.join("health").display().to_string();
        let mut all: Vec<(&str, &str)> = vec![("GMAIL_SYNC_HEALTH_DIR", own_health.as_str())];
        all.extend_from_slice(overrides);
        let env = self.env_with(&all);
        let health_dir = env
            .iter()
            .find(|(k, _)| k == "GMAIL_SYNC_HEALTH_DIR")
            .map(|(_, v)| PathBuf::from(v))
            .expect("env has GMAIL_SYNC_HEALTH_DIR");
        let mut cmd = Command::new(exe);
        cmd.args(args).envs(env);
        let guard = ChildGuard::spawn(name, cmd, &dir)?;
        Ok(WorkerProcess { guard, health_dir })
    }

    /// [`Self::spawn_worker`], then [`WorkerProcess::wait_ready`] (≤ [`READY_TIMEOUT`]).
    pub async fn start_worker(
        &self,
        exe: &Path,
        args: &[&str],
        name: &str,
        overrides: &[(&str, &str)],
    ) -> Result<WorkerProcess> {
        let worker = self.spawn_worker(exe, args, name, overrides)?;
        worker.wait_ready(READY_TIMEOUT).await?;
        Ok(worker)
    }

    /// A fresh topic and subscription for the bed (same label and ack deadline). Mailboxes
    /// must be registered again (`users.watch` on the new topic) to notify there.
    pub async fn fresh_topic(&mut self) -> Result<()> {
        self.topic = pubsub::unique_topic(&self.emulator, &self.label, self.ack_deadline_secs)
            .await
            .context("topic and subscription")?;
        Ok(())
    }

    /// A plain connection to the bed's single Redis (admin commands such as CONFIG SET or
    /// SHUTDOWN); an error for a cluster bed.
    pub async fn connect_single(&self) -> Result<redis::aio::MultiplexedConnection> {
        let server = self
            .redis
            .server()
            .ok_or_else(|| anyhow!("the bed runs a Redis Cluster, not a single server"))?;
        connect_client(server.client()?, &server.url()).await
    }

    /// A connection to the bed's Redis, single server or cluster.
    pub async fn connect(&self) -> Result<RawConnection> {
        self.connector()?.connect().await
    }

    /// What [`Testbed::connect`] connects with, owned: for tasks that outlive a borrow of the
    /// bed and connect again after Redis restarts (the fault suite's ack judge).
    pub fn connector(&self) -> Result<Connector> {
        if let Some(nodes) = self.redis.cluster_nodes() {
            let client = self
                .redis
                .secured()
                .cluster_builder(nodes)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .build()?;
            return Ok(Connector::Cluster(client));
        }
        let server = self
            .redis
            .server()
            .ok_or_else(|| anyhow!("the bed has neither a Redis server nor a cluster"))?;
        Ok(Connector::Single {
            client: server.client()?,
            url: server.url(),
        })
    }

    /// Every entry of every change stream, in stream order per shard.
    pub async fn entries(&self) -> Result<Vec<Entry>> {
        let mut con = self.connect().await?;
        let entries = check::read_streams(&mut con, &self.keys().streams()).await?;
        Ok(entries.into_iter().map(|fields| Entry { fields }).collect())
    }

    /// Entries in all change streams (XLEN), cheap enough for a progress line.
    pub async fn entry_count(&self) -> Result<u64> {
        let mut con = self.connect().await?;
        let mut n = 0u64;
        for stream in self.keys().streams() {
            let len: u64 = redis::cmd("XLEN").arg(stream).query_async(&mut con).await?;
            n += len;
        }
        Ok(n)
    }

    /// The mailbox's stored cursor (`HGET state cursor`), `None` if not registered.
    pub async fn cursor(&self, email: &str) -> Result<Option<u64>> {
        let mut con = self.connect().await?;
        cursor_on(&mut con, &self.keys(), email).await
    }

    /// Lease keys that exist right now (none once every worker stopped cleanly).
    pub async fn lease_keys(&self) -> Result<Vec<String>> {
        let mut con = self.connect().await?;
        Ok(redis::cmd("KEYS")
            .arg(self.keys().lease_pattern())
            .query_async(&mut con)
            .await?)
    }

    /// `email: cursor < current` for every mailbox of `emails` whose cursor is behind the
    /// simulator's current historyId.
    pub async fn behind_of<'a>(
        &self,
        emails: impl IntoIterator<Item = &'a String>,
    ) -> Result<Vec<String>> {
        let mut con = self.connect().await?;
        let keys = self.keys();
        let emails: Vec<&String> = emails.into_iter().collect();
        let mut behind = Vec::new();
        let mut check = |email: &str, cursor: u64| {
            let current = self.sim.current_history_id(email);
            if cursor < current {
                behind.push(format!("{email}: {cursor} < {current}"));
            }
        };
        if let RawConnection::Single(single) = &mut con {
            // Pipelined in chunks: a scale run polls 10^5 cursors.
            for chunk in emails.chunks(CURSOR_PIPELINE) {
                let mut pipe = redis::pipe();
                for email in chunk {
                    pipe.cmd("HGET").arg(keys.state(email)).arg("cursor");
                }
                let raw: Vec<Option<String>> = pipe.query_async(single).await?;
                for (email, r) in chunk.iter().zip(raw) {
                    let cursor = match r {
                        None => 0,
                        Some(r) => r.parse().map_err(|_| {
                            anyhow!("cursor of {email} is not a decimal u64: {r:?}")
                        })?,
                    };
                    check(email, cursor);
                }
            }
        } else {
            for email in emails {
                let cursor = cursor_on(&mut con, &keys, email).await?.unwrap_or(0);
                check(email, cursor);
            }
        }
        Ok(behind)
    }

    /// [`Self::behind_of`] every registered mailbox.
    pub async fn behind(&self) -> Result<Vec<String>> {
        self.behind_of(self.baselines.keys()).await
    }

    /// Waits (polling every 100 ms, bounded by `timeout`) until every mailbox of `emails` has a
    /// cursor at the simulator's current historyId. A Redis error (e.g. while it restarts)
    /// counts as "not yet".
    pub async fn wait_caught_up_of(
        &self,
        emails: &[String],
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.behind_of(emails).await {
                Ok(behind) if behind.is_empty() => return Ok(()),
                Ok(behind) => format!(
                    "{} mailboxes behind: {:?}",
                    behind.len(),
                    &behind[..behind.len().min(5)]
                ),
                Err(e) => format!("reading cursors: {e:#}"),
            };
            if Instant::now() > deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// [`Self::wait_caught_up_of`] every registered mailbox.
    pub async fn wait_caught_up(&self, timeout: Duration) -> std::result::Result<(), String> {
        let emails: Vec<String> = self.baselines.keys().cloned().collect();
        self.wait_caught_up_of(&emails, timeout).await
    }

    /// The change streams compared with the simulator's ledger (see [`check::compare`]):
    /// the number of entries checked, or what differs (or why the streams could not be read).
    pub async fn check_against_ledger(&self) -> std::result::Result<usize, String> {
        let entries = self
            .entries()
            .await
            .map_err(|e| format!("reading the change streams: {e:#}"))?;
        let fields: Vec<StreamEntry> = entries.into_iter().map(|e| e.fields).collect();
        check::compare(&self.sim.ledger(), &fields, &self.baselines)
    }

    /// [`check::compare_metadata`] on the bed's streams: every new message's entry carries the
    /// simulator's metadata for it (`headers` as configured; empty for `minimal`), or `gone`.
    pub async fn check_metadata(
        &self,
        headers: &[&str],
    ) -> std::result::Result<check::MetadataCheck, String> {
        let entries = self
            .entries()
            .await
            .map_err(|e| format!("reading the change streams: {e:#}"))?;
        let fields: Vec<StreamEntry> = entries.into_iter().map(|e| e.fields).collect();
        check::compare_metadata(&self.sim.ledger(), &fields, &self.baselines, headers)
    }

    /// A notification as Gmail would publish it, straight onto the bed's topic.
    pub async fn publish(&self, payload: &[u8]) -> Result<()> {
        let publisher = pubsub::publisher(&self.emulator.endpoint(), &self.topic.topic).await?;
        pubsub::publish_raw(&publisher, payload).await?;
        Ok(())
    }
}

/// The mailbox's stored cursor on `con` (`HGET state cursor`), `None` if not registered.
pub async fn cursor_on(con: &mut RawConnection, keys: &Keys, email: &str) -> Result<Option<u64>> {
    let raw: Option<String> = redis::cmd("HGET")
        .arg(keys.state(email))
        .arg("cursor")
        .query_async(con)
        .await?;
    match raw {
        None => Ok(None),
        Some(r) => match r.parse() {
            Ok(c) => Ok(Some(c)),
            Err(_) => bail!("cursor of {email} is not a decimal u64: {r:?}"),
        },
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("blocking start task")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_follow_the_documented_layout() {
        // The FNV-1a 64 value of "a" that gmail-sync's own unit test pins.
        assert_eq!(Keys::stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(Keys::stable_hash(" A "), Keys::stable_hash("a"));
        let k = Keys::new("p", 1);
        assert_eq!(k.state("Bob@X.com"), "{p:s0}:mb:bob@x.com");
        assert_eq!(k.lease("bob@x.com"), "{p:s0}:lease:bob@x.com");
        assert_eq!(k.streams(), vec!["{p:s0}:changes".to_string()]);
        assert_eq!(k.quarantine(), "{p}:quarantine");
        assert_eq!(Keys::new("p", 0), Keys::new("p", 1), "0 shards means 1");
    }
}
