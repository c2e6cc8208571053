//! Real `redis-server` instances for tests: a single server on a free loopback port that a test
//! can kill and restart on the same port, a shared server per test binary, and a Redis Cluster
//! of three masters, with or without a replica each (then a master can fail over to its
//! replica, gracefully or by a SIGKILL, and a killed node rejoin). Either can be secured ([`Security`]): TLS only, with a CA made for it at
//! start ([`crate::pki`]), and a password for an ACL user.
//!
//! The server methods are synchronous and block for at most a few seconds (process start and
//! PING); they take `&self`, so a server can sit in an `Arc` or a static. From async code that
//! must not block its runtime thread, call them through `tokio::task::spawn_blocking`.

use crate::pki::TestPki;
use crate::process::{ChildGuard, find_executable, free_port, free_ports, fresh_dir};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a started server may take to answer PING.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new cluster may take to reach `cluster_state:ok` on every node.
pub const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts on a fresh port when a server fails to start (the free port was taken meanwhile).
const START_ATTEMPTS: usize = 3;

/// Path of `redis-server`: `$REDIS_SERVER_BIN`, else `redis-server` on `PATH`.
pub fn redis_server_bin() -> Result<PathBuf> {
    find_executable("REDIS_SERVER_BIN", "redis-server").ok_or_else(|| {
        anyhow!(
            "redis-server not found: install the Debian package redis-server \
             (sudo apt-get install -y redis-server) or set REDIS_SERVER_BIN"
        )
    })
}

/// Path of `redis-cli`: `$REDIS_CLI_BIN`, else `redis-cli` on `PATH`.
pub fn redis_cli_bin() -> Result<PathBuf> {
    find_executable("REDIS_CLI_BIN", "redis-cli").ok_or_else(|| {
        anyhow!(
            "redis-cli not found: install the Debian package redis-server \
             (sudo apt-get install -y redis-server, it brings redis-tools) or set REDIS_CLI_BIN"
        )
    })
}

/// What a test asks of a server's (or cluster's) security. `Default`: plain TCP, no password.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Security {
    /// TLS only (`--port 0 --tls-port P`; a cluster's bus too, `--tls-cluster yes`) with a
    /// server certificate signed by a CA made for this server; clients need no certificate.
    pub tls: bool,
    /// Logins required: the ACL user [`LOGIN_USER`] with a random password (also written to a
    /// file, for `GMAIL_SYNC_REDIS_PASSWORD_FILE`); the default user gets another random
    /// password (`requirepass`) that no client is given, so a client without a login is refused.
    pub login: bool,
}

/// The ACL user of a server with [`Security::login`].
pub const LOGIN_USER: &str = "gmail-sync";

/// A user and its password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    pub username: String,
    pub password: String,
    /// The password, written to a file (no trailing newline).
    pub password_file: PathBuf,
}

/// A server's security, made real: its certificates and login (shared by all nodes of a
/// cluster). Also how the test bed itself connects (as the login's user, trusting the CA).
#[derive(Clone, Debug, Default)]
pub struct Secured {
    pub pki: Option<TestPki>,
    pub login: Option<Login>,
    /// The default user's password (`requirepass`), given to no client.
    default_password: Option<String>,
}

fn random_password() -> String {
    format!("pw-{:032x}", rand::random::<u128>())
}

impl Secured {
    /// Makes the certificates and passwords `security` asks for, in `dir`.
    pub fn new(security: Security, dir: &Path) -> Result<Secured> {
        let pki = if security.tls {
            Some(TestPki::generate(dir, "redis")?)
        } else {
            None
        };
        let (login, default_password) = if security.login {
            let password = random_password();
            let password_file = dir.join("redis-password");
            std::fs::write(&password_file, &password)
                .with_context(|| format!("writing {password_file:?}"))?;
            let login = Login {
                username: LOGIN_USER.to_string(),
                password,
                password_file,
            };
            (Some(login), Some(random_password()))
        } else {
            (None, None)
        };
        Ok(Secured {
            pki,
            login,
            default_password,
        })
    }

    pub fn tls(&self) -> bool {
        self.pki.is_some()
    }

    /// `redis://127.0.0.1:PORT/`, or `rediss://` with TLS; never a password.
    pub fn url(&self, port: u16) -> String {
        let scheme = if self.tls() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{port}/")
    }

    /// The `redis-server` arguments: the port (plain, or TLS only) and the security settings.
    fn server_args(&self, port: u16) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        match &self.pki {
            None => args.extend(["--port".into(), port.to_string()]),
            Some(pki) => {
                args.extend([
                    "--port".into(),
                    "0".into(),
                    "--tls-port".into(),
                    port.to_string(),
                ]);
                for (flag, file) in [
                    ("--tls-cert-file", &pki.cert_file),
                    ("--tls-key-file", &pki.key_file),
                    ("--tls-ca-cert-file", &pki.ca_file),
                ] {
                    args.extend([flag.to_string(), file.display().to_string()]);
                }
                args.extend(["--tls-auth-clients".into(), "no".into()]);
            }
        }
        if let (Some(login), Some(default_password)) = (&self.login, &self.default_password) {
            args.extend(["--requirepass".into(), default_password.clone()]);
            // One config line, `user NAME on >PASSWORD ~* &* +@all`, split into arguments.
            args.extend(
                [
                    "--user",
                    login.username.as_str(),
                    "on",
                    &format!(">{}", login.password),
                    "~*",
                    "&*",
                    "+@all",
                ]
                .map(String::from),
            );
        }
        args
    }

    /// The extra `redis-server` arguments of a cluster node (TLS on the cluster bus too).
    fn cluster_args(&self) -> Vec<String> {
        if self.tls() {
            vec!["--tls-cluster".into(), "yes".into()]
        } else {
            Vec::new()
        }
    }

    /// The `redis-cli` arguments to reach a node: TLS with the CA, the login.
    fn cli_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(pki) = &self.pki {
            args.extend([
                "--tls".into(),
                "--cacert".into(),
                pki.ca_file.display().to_string(),
            ]);
        }
        if let Some(login) = &self.login {
            args.extend([
                "--user".into(),
                login.username.clone(),
                "--pass".into(),
                login.password.clone(),
                "--no-auth-warning".into(),
            ]);
        }
        args
    }

    /// gmail-sync's variables for this security besides the URL: `GMAIL_SYNC_REDIS_CA_FILE`,
    /// `GMAIL_SYNC_REDIS_USERNAME` and `GMAIL_SYNC_REDIS_PASSWORD_FILE`, as set.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(pki) = &self.pki {
            env.push((
                "GMAIL_SYNC_REDIS_CA_FILE".into(),
                pki.ca_file.display().to_string(),
            ));
        }
        if let Some(login) = &self.login {
            env.push(("GMAIL_SYNC_REDIS_USERNAME".into(), login.username.clone()));
            env.push((
                "GMAIL_SYNC_REDIS_PASSWORD_FILE".into(),
                login.password_file.display().to_string(),
            ));
        }
        env
    }

    /// The test bed's own client of the node at `port`: TLS trusting the CA, logged in.
    pub fn client(&self, port: u16) -> Result<redis::Client> {
        let info = redis::IntoConnectionInfo::into_connection_info(self.url(port))?;
        let info = match &self.login {
            Some(login) => {
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_username(&login.username)
                    .set_password(&login.password);
                info.set_redis_settings(settings)
            }
            None => info,
        };
        match self.certificates() {
            Some(certificates) => Ok(redis::Client::build_with_tls(info, certificates)?),
            None => Ok(redis::Client::open(info)?),
        }
    }

    /// A cluster client builder for `nodes` (from [`Self::url`]), TLS trusting the CA, logged in.
    pub fn cluster_builder(&self, nodes: Vec<String>) -> redis::cluster::ClusterClientBuilder {
        let mut builder = redis::cluster::ClusterClientBuilder::new(nodes);
        if let Some(login) = &self.login {
            builder = builder.username(&login.username).password(&login.password);
        }
        if let Some(certificates) = self.certificates() {
            builder = builder.certs(certificates);
        }
        builder
    }

    fn certificates(&self) -> Option<redis::TlsCertificates> {
        let pki = self.pki.as_ref()?;
        // As gmail-sync does (`store::install_crypto_provider`): rustls's process default.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pki.ca_pem.clone().into_bytes()),
        })
    }
}

/// Sends one command on a fresh synchronous connection (bounded by `timeout`).
fn query_string(secured: &Secured, port: u16, args: &[&str], timeout: Duration) -> Result<String> {
    let client = secured.client(port)?;
    let mut con = client.get_connection_with_timeout(timeout)?;
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    Ok(cmd.query::<String>(&mut con)?)
}

/// One `redis-server` process (helper shared by [`RedisServer`] and [`RedisCluster`]).
fn spawn_server(
    bin: &Path,
    dir: &Path,
    port: u16,
    secured: &Secured,
    extra: &[String],
    name: &str,
) -> Result<ChildGuard> {
    let mut cmd = Command::new(bin);
    cmd.current_dir(dir)
        .args(secured.server_args(port))
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("no")
        .arg("--dir")
        .arg(dir)
        .arg("--daemonize")
        .arg("no")
        .arg("--logfile")
        .arg("")
        .args(extra);
    let child = ChildGuard::spawn(name, cmd, dir)?;
    wait_ready(&child, port, secured)?;
    Ok(child)
}

/// Waits (bounded by [`READY_TIMEOUT`]) until the server answers PING and reports our child's
/// PID (not some other server that took the port); fails early with the log tail if the
/// process exits.
fn wait_ready(child: &ChildGuard, port: u16, secured: &Secured) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_status() {
            bail!(
                "{} on port {port} exited during start ({status}); log:\n{}",
                child.name(),
                child.log_tail(30)
            );
        }
        match query_string(secured, port, &["PING"], Duration::from_millis(500)) {
            Ok(pong) if pong == "PONG" => {
                let info =
                    query_string(secured, port, &["INFO", "server"], Duration::from_secs(1))?;
                let want = format!("process_id:{}", child.pid());
                if info.lines().any(|l| l.trim() == want) {
                    return Ok(());
                }
                bail!(
                    "port {port} is served by another redis-server, not {} (pid {})",
                    child.name(),
                    child.pid()
                );
            }
            Ok(_) | Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(other) => bail!(
                "{} on port {port} answered PING with {other:?}",
                child.name()
            ),
            Err(e) => bail!(
                "{} on port {port} did not answer PING within {READY_TIMEOUT:?}: {e}; log:\n{}",
                child.name(),
                child.log_tail(30)
            ),
        }
    }
}

/// A `redis-server` on a free loopback port, without persistence, in its own temp dir.
/// Dropping it kills the server.
#[derive(Debug)]
pub struct RedisServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    secured: Secured,
    /// More `redis-server` arguments, kept for [`Self::restart`].
    extra: Vec<String>,
    child: Mutex<ChildGuard>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING (≤ 10 s). Blocking.
    pub fn start() -> Result<RedisServer> {
        RedisServer::start_with(Security::default())
    }

    /// [`Self::start`], secured as `security` asks (TLS only, logins). Blocking.
    pub fn start_with(security: Security) -> Result<RedisServer> {
        RedisServer::start_with_args(security, &[])
    }

    /// [`Self::start_with`], with more `redis-server` arguments (e.g. `--maxmemory-policy
    /// allkeys-lru`), given again on every [`Self::restart`]. Blocking.
    pub fn start_with_args(security: Security, extra: &[&str]) -> Result<RedisServer> {
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let bin = redis_server_bin()?;
        let dir = fresh_dir("redis")?;
        let secured = Secured::new(security, &dir)?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match spawn_server(&bin, &dir, port, &secured, &extra, "redis-server") {
                Ok(child) => {
                    return Ok(RedisServer {
                        bin,
                        dir,
                        port,
                        secured,
                        extra,
                        child: Mutex::new(child),
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err
            .expect("at least one attempt")
            .context("starting redis-server"))
    }

    fn child(&self) -> MutexGuard<'_, ChildGuard> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `redis://127.0.0.1:PORT/` (`rediss://` with TLS); never a password.
    pub fn url(&self) -> String {
        self.secured.url(self.port)
    }

    /// The server's certificates and login.
    pub fn secured(&self) -> &Secured {
        &self.secured
    }

    /// A client of the test bed's own: TLS trusting the server's CA, logged in.
    pub fn client(&self) -> Result<redis::Client> {
        self.secured.client(self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// PID of the current server process (changes on [`restart`](Self::restart)).
    pub fn pid(&self) -> u32 {
        self.child().pid()
    }

    /// The server's own directory (working dir and `--dir`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_running(&self) -> bool {
        self.child().is_running()
    }

    /// SIGKILL (a crash, as far as clients can tell).
    pub fn kill(&self) {
        self.child().kill();
    }

    /// SIGTERM (graceful shutdown; no data is saved), SIGKILL after 5 s.
    pub fn stop(&self) {
        self.child().stop();
    }

    /// Starts the server again on the SAME port (killing it first if it still runs) and waits
    /// until it answers PING. The data is gone (no persistence). Blocking.
    pub fn restart(&self) -> Result<()> {
        let mut child = self.child();
        child.kill();
        // The port was ours a moment ago; redis-server sets SO_REUSEADDR, but give a client
        // that is reconnecting in a tight loop a few chances not to matter.
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            match spawn_server(
                &self.bin,
                &self.dir,
                self.port,
                &self.secured,
                &self.extra,
                "redis-server",
            ) {
                Ok(new) => {
                    *child = new;
                    return Ok(());
                }
                Err(e) => {
                    last_err = Some(e);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Err(last_err
            .expect("at least one attempt")
            .context(format!("restarting redis-server on port {}", self.port)))
    }

    /// The last `n` lines of the server log (all runs of this server).
    pub fn log_tail(&self, n: usize) -> String {
        self.child().log_tail(n)
    }
}

/// One `redis-server` per test binary, started on first use, never dropped (the reaper kills
/// it when the test binary exits). For tests that never kill Redis: give every test its own
/// key prefix. A start failure is cached, so every test fails fast with the same message.
pub async fn shared() -> Result<&'static RedisServer> {
    static SHARED: Mutex<Option<Result<&'static RedisServer, String>>> = Mutex::new(None);
    tokio::task::spawn_blocking(|| {
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        let entry = slot.get_or_insert_with(|| {
            RedisServer::start()
                .map(|s| &*Box::leak(Box::new(s)))
                .map_err(|e| format!("{e:#}"))
        });
        match entry {
            Ok(s) => Ok(*s),
            Err(e) => Err(anyhow!("shared redis-server: {e}")),
        }
    })
    .await
    .context("shared redis-server: start task failed")?
}

/// How many replicas each of a cluster's three masters has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Replicas {
    /// Three masters, nothing else (`--cluster-replicas 0`).
    #[default]
    None,
    /// Three masters with one replica each, six nodes (`--cluster-replicas 1`): what a
    /// failover needs.
    OnePerMaster,
}

impl Replicas {
    fn per_master(self) -> usize {
        match self {
            Replicas::None => 0,
            Replicas::OnePerMaster => 1,
        }
    }
}

/// How a [`RedisCluster::failover`] promotes a master's replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failover {
    /// `CLUSTER FAILOVER` sent to the replica: the master stops its clients, the replica
    /// catches up with the master's replication offset, then takes the slots over; no write
    /// the master acknowledged is lost. The old master becomes the new one's replica.
    Graceful,
    /// SIGKILL of the master: the others flag it failing after the node timeout
    /// ([`NODE_TIMEOUT_MS`]) and elect its replica. Replication is asynchronous, so writes the
    /// master acknowledged but had not yet sent to its replica are lost. The killed node stays
    /// down until [`RedisCluster::restart_node`], which brings it back as a replica.
    Forced,
    /// The same SIGKILL, of a master whose replica the caller holds behind
    /// ([`RedisCluster::hold_replica_behind`]), so the replica need not be in sync: what the
    /// master acknowledged since is lost with it, on purpose.
    Unreplicated,
}

/// What a failover did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promotion {
    pub old_master: u16,
    pub new_master: u16,
    /// From the command (or the SIGKILL) until every live node agreed on the new master.
    pub took: Duration,
}

/// A failover [`RedisCluster::begin_failover`] started.
#[derive(Clone, Debug)]
pub struct FailoverUnderWay {
    pub how: Failover,
    pub old_master: u16,
    pub new_master: u16,
    /// The old master's slots, which the new master must serve.
    slots: Vec<(u16, u16)>,
    started: Instant,
}

impl FailoverUnderWay {
    /// True once `view` (a settled one) shows the replica serving the old master's slots and
    /// the old master demoted: its replica (graceful) or flagged failed with no slots (forced).
    pub fn is_done(&self, view: &ClusterView) -> bool {
        let promoted = view
            .get(&self.new_master)
            .is_some_and(|n| n.replica_of.is_none() && n.slots == self.slots);
        let demoted = view.get(&self.old_master).is_some_and(|n| match self.how {
            Failover::Graceful => n.replica_of == Some(self.new_master),
            Failover::Forced | Failover::Unreplicated => n.failed && n.slots.is_empty(),
        });
        promoted && demoted
    }

    /// The promotion, timed until now (call it when [`Self::is_done`]).
    pub fn promotion(&self) -> Promotion {
        Promotion {
            old_master: self.old_master,
            new_master: self.new_master,
            took: self.started.elapsed(),
        }
    }
}

impl std::fmt::Display for FailoverUnderWay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} failover of 127.0.0.1:{} to 127.0.0.1:{}",
            self.how, self.old_master, self.new_master
        )
    }
}

/// True if `view` (a settled one) shows the node at `port` back as a live replica.
pub fn rejoined(view: &ClusterView, port: u16) -> bool {
    view.get(&port)
        .is_some_and(|n| n.replica_of.is_some() && !n.failed)
}

/// One node as one node of the cluster sees it (a line of `CLUSTER NODES`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub port: u16,
    /// `None` for a master, the port of its master for a replica.
    pub replica_of: Option<u16>,
    /// Flagged `fail` (the cluster agreed it is down; a mere `fail?` does not count).
    pub failed: bool,
    /// Slot ranges it serves (inclusive; none for a replica).
    pub slots: Vec<(u16, u16)>,
}

/// A node's whole view of the cluster, by port.
pub type ClusterView = BTreeMap<u16, NodeView>;

/// Masters of every cluster the test bed starts.
const MASTERS: usize = 3;
/// `cluster-node-timeout`, ms: a master unreachable this long is flagged failing and its
/// replica elected. Short, so a forced failover takes seconds (measured: ~4 s from the
/// SIGKILL to a promoted replica), long enough that a loaded CI machine does not flag a
/// healthy node.
pub const NODE_TIMEOUT_MS: u64 = 2_000;
/// How long a failover may take until every live node agrees on the promoted replica: a
/// forced one's detection and election are about twice [`NODE_TIMEOUT_MS`]; a wide margin for
/// a loaded machine.
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replica may take to have its replication link up (a full sync of a test's
/// data takes milliseconds; the nodes start with no diskless-sync delay).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(20);
/// Poll interval of the cluster's waits.
const CLUSTER_POLL: Duration = Duration::from_millis(50);
/// Timeout of one admin command to a node (an answer is instant; a dead node refuses).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(1);
/// The `masterauth` that keeps a replica from syncing ([`RedisCluster::hold_replica_behind`]).
const WRONG_MASTERAUTH: &str = "not-the-masters-password";

/// One node process of a cluster, with what it takes to start it again.
#[derive(Debug)]
struct Node {
    name: String,
    port: u16,
    dir: PathBuf,
    /// The cluster arguments (`--cluster-config-file` etc.), given again on a restart.
    extra: Vec<String>,
    child: Mutex<ChildGuard>,
}

impl Node {
    fn child(&self) -> MutexGuard<'_, ChildGuard> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A Redis Cluster of three masters on free loopback ports, with or without one replica per
/// master ([`Replicas`]), created with `redis-cli --cluster create`. Its nodes can fail over
/// ([`Self::failover`]) and be started again ([`Self::restart_node`]). Dropping it kills every
/// node.
#[derive(Debug)]
pub struct RedisCluster {
    bin: PathBuf,
    nodes: Vec<Node>,
    secured: Secured,
    replicas: Replicas,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, joins them with `redis-cli --cluster create`, and
    /// waits until every node reports `cluster_state:ok` (≤ 30 s). Blocking.
    pub fn start() -> Result<RedisCluster> {
        RedisCluster::start_with(Security::default())
    }

    /// [`Self::start`], every node (and the cluster bus) secured as `security` asks, with one
    /// CA, certificate and login for all. Blocking.
    pub fn start_with(security: Security) -> Result<RedisCluster> {
        RedisCluster::start_layout(security, Replicas::None)
    }

    /// Three masters with one replica each (six nodes), plain. Blocking.
    pub fn start_replicated() -> Result<RedisCluster> {
        RedisCluster::start_layout(Security::default(), Replicas::OnePerMaster)
    }

    /// Starts `3 × (1 + replicas)` nodes secured as `security` asks, creates the cluster, and
    /// waits until every node reports `cluster_state:ok` and the same view of the cluster
    /// (three masters covering every slot, each with its replicas), and every replica's link
    /// to its master is up. Blocking.
    pub fn start_layout(security: Security, replicas: Replicas) -> Result<RedisCluster> {
        let bin = redis_server_bin()?;
        let cli = redis_cli_bin()?;
        let secured = Secured::new(security, &fresh_dir("redis-cluster-security")?)?;
        let count = MASTERS * (1 + replicas.per_master());
        let mut nodes = Vec::new();
        for i in 0..count {
            nodes.push(start_node(&bin, &secured, i)?);
        }
        let cluster = RedisCluster {
            bin,
            nodes,
            secured,
            replicas,
        };
        cluster.create(&cli)?;
        cluster.wait_formed()?;
        Ok(cluster)
    }

    fn create(&self, cli: &Path) -> Result<()> {
        let dir = fresh_dir("redis-cluster-create")?;
        let mut cmd = Command::new(cli);
        cmd.args(self.secured.cli_args())
            .arg("--cluster")
            .arg("create");
        for n in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        cmd.arg("--cluster-replicas")
            .arg(self.replicas.per_master().to_string())
            .arg("--cluster-yes")
            .stdin(Stdio::null());
        let child = ChildGuard::spawn("redis-cli-cluster-create", cmd, &dir)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_status() {
                if status.success() {
                    return Ok(());
                }
                bail!(
                    "redis-cli --cluster create failed ({status}):\n{}",
                    child.log_tail(40)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "redis-cli --cluster create did not finish within 60 s:\n{}",
                    child.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (≤ [`CLUSTER_READY_TIMEOUT`]) for the created cluster's shape on every node, then
    /// (≤ [`SYNC_TIMEOUT`]) for every replica's link.
    fn wait_formed(&self) -> Result<()> {
        let want_replicas = self.replicas.per_master();
        let view = self.wait_settled(CLUSTER_READY_TIMEOUT, "the new cluster", |view| {
            let masters: Vec<&NodeView> = view
                .values()
                .filter(|n| n.replica_of.is_none() && !n.slots.is_empty())
                .collect();
            masters.len() == MASTERS
                && view.len() == self.nodes.len()
                && masters.iter().all(|m| {
                    view.values()
                        .filter(|n| n.replica_of == Some(m.port))
                        .count()
                        == want_replicas
                })
        })?;
        for replica in view.values().filter(|n| n.replica_of.is_some()) {
            self.wait_in_sync(replica.port)?;
        }
        Ok(())
    }

    fn node(&self, port: u16) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .ok_or_else(|| anyhow!("no cluster node on port {port}"))
    }

    /// The view of the node at `port` (`CLUSTER NODES`).
    pub fn view_of(&self, port: u16) -> Result<ClusterView> {
        let text = query_string(&self.secured, port, &["CLUSTER", "NODES"], ADMIN_TIMEOUT)?;
        parse_cluster_nodes(&text)
    }

    /// The view every running node shares, if they do and each reports `cluster_state:ok`;
    /// otherwise what is not settled yet.
    pub fn settled_view(&self) -> std::result::Result<ClusterView, String> {
        let mut agreed: Option<(u16, ClusterView)> = None;
        for node in self.nodes.iter().filter(|n| n.child().is_running()) {
            let port = node.port;
            let info = query_string(&self.secured, port, &["CLUSTER", "INFO"], ADMIN_TIMEOUT)
                .map_err(|e| format!("node {port}: CLUSTER INFO: {e:#}"))?;
            if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                return Err(format!("node {port}: not cluster_state:ok"));
            }
            let view = self
                .view_of(port)
                .map_err(|e| format!("node {port}: CLUSTER NODES: {e:#}"))?;
            match &agreed {
                None => agreed = Some((port, view)),
                Some((first, seen)) if *seen != view => {
                    return Err(format!(
                        "nodes {first} and {port} disagree: {seen:?} vs {view:?}"
                    ));
                }
                Some(_) => {}
            }
        }
        agreed
            .map(|(_, view)| view)
            .ok_or_else(|| "no cluster node is running".to_string())
    }

    /// Polls [`Self::settled_view`] (bounded by `timeout`) until it holds and `want` accepts
    /// it; the error says `what` was awaited, the last state seen and the nodes' log tails.
    fn wait_settled(
        &self,
        timeout: Duration,
        what: &str,
        want: impl Fn(&ClusterView) -> bool,
    ) -> Result<ClusterView> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.settled_view() {
                Ok(view) if want(&view) => return Ok(view),
                Ok(view) => format!("settled, but not as wanted: {view:?}"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                bail!(
                    "{what}: not settled within {timeout:?}: {last}; logs:\n{}",
                    self.log_tail(15)
                );
            }
            std::thread::sleep(CLUSTER_POLL);
        }
    }

    /// True if the replica at `port` has its replication link to its master up and no sync in
    /// progress (its own `INFO replication`).
    pub fn in_sync(&self, port: u16) -> Result<bool> {
        let info = query_string(&self.secured, port, &["INFO", "replication"], ADMIN_TIMEOUT)?;
        let has = |want: &str| info.lines().any(|l| l.trim() == want);
        Ok(has("role:slave") && has("master_link_status:up") && has("master_sync_in_progress:0"))
    }

    /// Waits (≤ [`SYNC_TIMEOUT`]) until [`Self::in_sync`] holds for the replica at `port`.
    pub fn wait_in_sync(&self, port: u16) -> Result<()> {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            let last = match self.in_sync(port) {
                Ok(true) => return Ok(()),
                Ok(false) => "link not up".to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "replica 127.0.0.1:{port} not in sync within {SYNC_TIMEOUT:?}: {last}; \
                     log:\n{}",
                    self.node(port)?.child().log_tail(20)
                );
            }
            std::thread::sleep(CLUSTER_POLL);
        }
    }

    /// The slot of `key` (`CLUSTER KEYSLOT` at a running node).
    pub fn slot_of(&self, key: &str) -> Result<u16> {
        let mut last = None;
        for node in self.nodes.iter().filter(|n| n.child().is_running()) {
            let client = self.secured.client(node.port)?;
            match client.get_connection_with_timeout(ADMIN_TIMEOUT) {
                Ok(mut con) => {
                    con.set_read_timeout(Some(ADMIN_TIMEOUT))?;
                    return Ok(redis::cmd("CLUSTER")
                        .arg("KEYSLOT")
                        .arg(key)
                        .query::<u16>(&mut con)?);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(anyhow!(
            "no cluster node answered CLUSTER KEYSLOT: {last:?}"
        ))
    }

    /// Starts promoting the replica of the master at `master` (a master serving slots in
    /// `view`, the settled view of now, whose replica is [`Self::in_sync`]; else an error):
    /// `how` says whether the master hands over ([`Failover::Graceful`]: `CLUSTER FAILOVER` at
    /// the replica) or is SIGKILLed ([`Failover::Forced`]). Returns at once; the failover is
    /// over when [`FailoverUnderWay::is_done`] accepts a settled view. Blocking for one
    /// command.
    /// Keeps `replica` from receiving what `master` acknowledges from now on, until
    /// [`RedisCluster::let_replica_catch_up`]: the replica is given a wrong `masterauth`, so
    /// its reconnects fail their handshake (`Unable to AUTH to MASTER`), and the master drops
    /// its replica links (`CLIENT KILL TYPE replica`). Returns the replica's own `masterauth`
    /// (empty if none) for the restore.
    pub fn hold_replica_behind(&self, master: u16, replica: u16) -> Result<String> {
        let client = self.secured.client(replica)?;
        let mut con = client.get_connection_with_timeout(ADMIN_TIMEOUT)?;
        con.set_read_timeout(Some(ADMIN_TIMEOUT))?;
        let got: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("masterauth")
            .query(&mut con)?;
        let original = got.get(1).cloned().unwrap_or_default();
        self.let_replica_catch_up(replica, WRONG_MASTERAUTH)?;
        let cut = query_string(
            &self.secured,
            master,
            &["CLIENT", "KILL", "TYPE", "replica"],
            ADMIN_TIMEOUT,
        );
        if !matches!(cut.as_deref(), Ok(n) if n != "0") {
            // Nothing held behind: the replica gets its own masterauth back at once.
            self.let_replica_catch_up(replica, &original)?;
            bail!("127.0.0.1:{master} had no replica link to cut: {cut:?}");
        }
        Ok(original)
    }

    /// Sets the `masterauth` of the node at `port` (its own back, after
    /// [`Self::hold_replica_behind`]).
    pub fn let_replica_catch_up(&self, port: u16, masterauth: &str) -> Result<()> {
        let ok = query_string(
            &self.secured,
            port,
            &["CONFIG", "SET", "masterauth", masterauth],
            ADMIN_TIMEOUT,
        )?;
        if ok != "OK" {
            bail!("CONFIG SET masterauth at 127.0.0.1:{port} answered {ok:?}");
        }
        Ok(())
    }

    pub fn begin_failover(
        &self,
        view: &ClusterView,
        master: u16,
        how: Failover,
    ) -> Result<FailoverUnderWay> {
        let old = view
            .get(&master)
            .filter(|n| n.replica_of.is_none() && !n.slots.is_empty() && !n.failed)
            .ok_or_else(|| anyhow!("127.0.0.1:{master} is not a serving master: {view:?}"))?;
        let replica = view
            .values()
            .find(|n| n.replica_of == Some(master) && !n.failed)
            .map(|n| n.port)
            .ok_or_else(|| anyhow!("master 127.0.0.1:{master} has no live replica: {view:?}"))?;
        if how != Failover::Unreplicated && !self.in_sync(replica)? {
            bail!("replica 127.0.0.1:{replica} of 127.0.0.1:{master} is not in sync");
        }
        let started = Instant::now();
        match how {
            Failover::Graceful => {
                let ok = query_string(
                    &self.secured,
                    replica,
                    &["CLUSTER", "FAILOVER"],
                    ADMIN_TIMEOUT,
                )?;
                if ok != "OK" {
                    bail!("CLUSTER FAILOVER at 127.0.0.1:{replica} answered {ok:?}");
                }
            }
            Failover::Forced | Failover::Unreplicated => self.node(master)?.child().kill(),
        }
        Ok(FailoverUnderWay {
            how,
            old_master: master,
            new_master: replica,
            slots: old.slots.clone(),
            started,
        })
    }

    /// Promotes the replica of the master at `master`: waits for a settled cluster and the
    /// replica in sync, [`Self::begin_failover`], then waits until every live node agrees that
    /// the replica serves the old master's slots (each wait ≤ [`FAILOVER_TIMEOUT`]). Blocking.
    pub fn failover(&self, master: u16, how: Failover) -> Result<Promotion> {
        let view = self.wait_settled(FAILOVER_TIMEOUT, "before the failover", |_| true)?;
        if let Some(replica) = view.values().find(|n| n.replica_of == Some(master)) {
            self.wait_in_sync(replica.port)?;
        }
        let under_way = self.begin_failover(&view, master, how)?;
        self.wait_settled(FAILOVER_TIMEOUT, &under_way.to_string(), |v| {
            under_way.is_done(v)
        })?;
        Ok(under_way.promotion())
    }

    /// Starts the stopped node at `port` again on its port with its `nodes.conf` (and no data:
    /// no persistence) and waits until it answers PING; it then learns that its slots moved to
    /// a newer master and rejoins as that master's replica ([`rejoined`] on a settled view,
    /// then [`Self::in_sync`]). Blocking (≤ [`READY_TIMEOUT`]).
    pub fn respawn_node(&self, port: u16) -> Result<()> {
        let node = self.node(port)?;
        let mut child = node.child();
        if child.is_running() {
            bail!("cluster node 127.0.0.1:{port} is running");
        }
        *child = spawn_server(
            &self.bin,
            &node.dir,
            port,
            &self.secured,
            &node.extra,
            &node.name,
        )
        .with_context(|| format!("restarting cluster node 127.0.0.1:{port}"))?;
        Ok(())
    }

    /// [`Self::respawn_node`], then waits until every node agrees it is a replica again and its
    /// link is up (≤ [`FAILOVER_TIMEOUT`] + [`SYNC_TIMEOUT`]). Blocking.
    pub fn restart_node(&self, port: u16) -> Result<()> {
        self.respawn_node(port)?;
        self.wait_settled(
            FAILOVER_TIMEOUT,
            &format!("127.0.0.1:{port} rejoining"),
            |view| rejoined(view, port),
        )?;
        self.wait_in_sync(port)
    }

    /// `redis://127.0.0.1:PORT/` (`rediss://` with TLS) of every node, masters and replicas
    /// (seed nodes for `ClusterClient`); never a password.
    pub fn nodes(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| self.secured.url(n.port))
            .collect()
    }

    /// The nodes' certificates and login (one for all).
    pub fn secured(&self) -> &Secured {
        &self.secured
    }

    /// Every node's port, in start order (not role order: a failover changes roles).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Every node's current PID (a restart changes it).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.child().pid()).collect()
    }

    /// The last `n` lines of every node's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.nodes
            .iter()
            .map(|node| {
                format!(
                    "--- node 127.0.0.1:{}\n{}",
                    node.port,
                    node.child().log_tail(n)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Starts cluster node `i` on free ports (a fresh `nodes.conf`), retrying on other ports.
fn start_node(bin: &Path, secured: &Secured, i: usize) -> Result<Node> {
    let dir = fresh_dir(&format!("redis-cluster-{i}"))?;
    let name = format!("redis-cluster-{i}");
    let mut last_err = None;
    for _ in 0..START_ATTEMPTS {
        // Redis ≥ 7 lets us pick the cluster bus port; the default (port + 10000) could be
        // taken or beyond 65535 for an ephemeral port.
        let [port, bus] = free_ports(2)[..] else {
            unreachable!("two ports")
        };
        let mut extra = vec![
            "--cluster-enabled".to_owned(),
            "yes".to_owned(),
            "--cluster-config-file".to_owned(),
            dir.join("nodes.conf").display().to_string(),
            "--cluster-node-timeout".to_owned(),
            NODE_TIMEOUT_MS.to_string(),
            "--cluster-port".to_owned(),
            bus.to_string(),
            // A replica's full sync starts at once instead of after the default 5 s (waiting
            // for more replicas to share one transfer, which a test does not have).
            "--repl-diskless-sync-delay".to_owned(),
            "0".to_owned(),
        ];
        extra.extend(secured.cluster_args());
        let _ = std::fs::remove_file(dir.join("nodes.conf"));
        match spawn_server(bin, &dir, port, secured, &extra, &name) {
            Ok(child) => {
                return Ok(Node {
                    name,
                    port,
                    dir,
                    extra,
                    child: Mutex::new(child),
                });
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err
        .expect("at least one attempt")
        .context(format!("starting cluster node {i}")))
}

/// The master serving `slot` in `view`.
pub fn serving(view: &ClusterView, slot: u16) -> Option<u16> {
    view.values()
        .find(|n| n.replica_of.is_none() && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
        .map(|n| n.port)
}

/// Parses `CLUSTER NODES`: one line per node, `id ip:port@bus[,host] flags master-id ping pong
/// epoch link slot...`. Nodes in handshake or without an address are left out (they are not
/// members yet); slots being migrated (`[slot->-id]`) are ignored.
pub fn parse_cluster_nodes(text: &str) -> Result<ClusterView> {
    struct Line {
        id: String,
        port: u16,
        master_id: Option<String>,
        failed: bool,
        slots: Vec<(u16, u16)>,
    }
    let mut lines = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            bail!("CLUSTER NODES line with {} fields: {line:?}", f.len());
        }
        let flags: Vec<&str> = f[2].split(',').collect();
        if flags.iter().any(|f| *f == "handshake" || *f == "noaddr") {
            continue;
        }
        let host_port = f[1].split('@').next().unwrap_or_default();
        let port: u16 = host_port
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("the port in {line:?}"))?;
        let mut slots = Vec::new();
        for s in f[8..].iter().filter(|s| !s.starts_with('[')) {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let range = (a.parse()?, b.parse()?);
            slots.push(range);
        }
        lines.push(Line {
            id: f[0].to_string(),
            port,
            master_id: (f[3] != "-").then(|| f[3].to_string()),
            failed: flags.contains(&"fail"),
            slots,
        });
    }
    let port_of: BTreeMap<&str, u16> = lines.iter().map(|l| (l.id.as_str(), l.port)).collect();
    let mut view = ClusterView::new();
    for l in &lines {
        let replica_of = match &l.master_id {
            None => None,
            Some(id) => Some(
                *port_of
                    .get(id.as_str())
                    .ok_or_else(|| anyhow!("node {} replicates unknown node {id}", l.port))?,
            ),
        };
        view.insert(
            l.port,
            NodeView {
                port: l.port,
                replica_of,
                failed: l.failed,
                slots: l.slots.clone(),
            },
        );
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_parse_into_roles_slots_and_failures() {
        let text = "\
f6f1 127.0.0.1:27100@27200 myself,slave 2bcc 0 1796287510084 7 connected
2bcc 127.0.0.1:27104@27204 master - 0 1796287510490 7 connected 0-5460
b8ad 127.0.0.1:27101@27201 master - 0 1796287505090 2 connected 5461-10921 10922 [10923->-f33a]
f33a 127.0.0.1:27102@27202 master,fail - 0 1796287505090 3 disconnected
9999 127.0.0.1:0@0 handshake,noaddr - 0 0 0 disconnected
";
        let view = parse_cluster_nodes(text).unwrap();
        assert_eq!(view.len(), 4);
        assert_eq!(view[&27100].replica_of, Some(27104));
        assert!(view[&27100].slots.is_empty());
        assert_eq!(view[&27104].slots, vec![(0, 5460)]);
        assert_eq!(view[&27101].slots, vec![(5461, 10921), (10922, 10922)]);
        assert!(view[&27102].failed && !view[&27104].failed);
        assert_eq!(serving(&view, 10922), Some(27101));
        assert_eq!(serving(&view, 16000), None);
        assert!(parse_cluster_nodes("abc 127.0.0.1:1@2 master").is_err());
    }
}
