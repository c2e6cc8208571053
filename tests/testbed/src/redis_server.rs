//! Real `redis-server` instances for tests: a single server on a free loopback port that a test
//! can kill and restart on the same port, a shared server per test binary, and a Redis Cluster
//! of three masters. Either can be secured ([`Security`]): TLS only, with a CA made for it at
//! start ([`crate::pki`]), and a password for an ACL user.
//!
//! The server methods are synchronous and block for at most a few seconds (process start and
//! PING); they take `&self`, so a server can sit in an `Arc` or a static. From async code that
//! must not block its runtime thread, call them through `tokio::task::spawn_blocking`.

use crate::pki::TestPki;
use crate::process::{ChildGuard, find_executable, free_port, free_ports, fresh_dir};
use anyhow::{Context, Result, anyhow, bail};
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

/// A Redis Cluster of three masters (no replicas) on free loopback ports, created with
/// `redis-cli --cluster create`. Dropping it kills all three servers.
#[derive(Debug)]
pub struct RedisCluster {
    ports: Vec<u16>,
    nodes: Vec<ChildGuard>,
    secured: Secured,
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
        let bin = redis_server_bin()?;
        let cli = redis_cli_bin()?;
        let secured = Secured::new(security, &fresh_dir("redis-cluster-security")?)?;
        let mut ports = Vec::new();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let dir = fresh_dir(&format!("redis-cluster-{i}"))?;
            let mut started = None;
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
                    "2000".to_owned(),
                    "--cluster-port".to_owned(),
                    bus.to_string(),
                ];
                extra.extend(secured.cluster_args());
                let _ = std::fs::remove_file(dir.join("nodes.conf"));
                let name = format!("redis-cluster-{i}");
                match spawn_server(&bin, &dir, port, &secured, &extra, &name) {
                    Ok(child) => {
                        started = Some((port, child));
                        break;
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            let (port, child) = match started {
                Some(s) => s,
                None => {
                    return Err(last_err
                        .expect("at least one attempt")
                        .context(format!("starting cluster node {i}")));
                }
            };
            ports.push(port);
            nodes.push(child);
        }
        let cluster = RedisCluster {
            ports,
            nodes,
            secured,
        };
        cluster.create(&cli)?;
        cluster.wait_ok()?;
        Ok(cluster)
    }

    fn create(&self, cli: &Path) -> Result<()> {
        let dir = fresh_dir("redis-cluster-create")?;
        let mut cmd = Command::new(cli);
        cmd.args(self.secured.cli_args())
            .arg("--cluster")
            .arg("create");
        for p in &self.ports {
            cmd.arg(format!("127.0.0.1:{p}"));
        }
        cmd.arg("--cluster-replicas")
            .arg("0")
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

    fn wait_ok(&self) -> Result<()> {
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        'nodes: for (port, node) in self.ports.iter().zip(&self.nodes) {
            loop {
                let info = query_string(
                    &self.secured,
                    *port,
                    &["CLUSTER", "INFO"],
                    Duration::from_secs(1),
                );
                if let Ok(info) = &info
                    && info.lines().any(|l| l.trim() == "cluster_state:ok")
                {
                    continue 'nodes;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "cluster node 127.0.0.1:{port} not cluster_state:ok within \
                         {CLUSTER_READY_TIMEOUT:?}: {info:?}; log:\n{}",
                        node.log_tail(30)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// `redis://127.0.0.1:PORT/` (`rediss://` with TLS) of the three masters (seed nodes for
    /// `ClusterClient`); never a password.
    pub fn nodes(&self) -> Vec<String> {
        self.ports.iter().map(|p| self.secured.url(*p)).collect()
    }

    /// The nodes' certificates and login (one for all).
    pub fn secured(&self) -> &Secured {
        &self.secured
    }

    pub fn ports(&self) -> Vec<u16> {
        self.ports.clone()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(ChildGuard::pid).collect()
    }

    /// The last `n` lines of every node's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.nodes
            .iter()
            .zip(&self.ports)
            .map(|(c, p)| format!("--- node 127.0.0.1:{p}\n{}", c.log_tail(n)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
