//! Real `redis-server` instances for tests: a single server on a free loopback port that a test
//! can kill and restart on the same port, a shared server per test binary, and a Redis Cluster
//! of three masters.
//!
//! The server methods are synchronous and block for at most a few seconds (process start and
//! PING); they take `&self`, so a server can sit in an `Arc` or a static. From async code that
//! must not block its runtime thread, call them through `tokio::task::spawn_blocking`.

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

/// Sends one command on a fresh synchronous connection (bounded by `timeout`).
fn query_string(port: u16, args: &[&str], timeout: Duration) -> Result<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
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
    extra: &[String],
    name: &str,
) -> Result<ChildGuard> {
    let mut cmd = Command::new(bin);
    cmd.current_dir(dir)
        .arg("--port")
        .arg(port.to_string())
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
    wait_ready(&child, port)?;
    Ok(child)
}

/// Waits (bounded by [`READY_TIMEOUT`]) until the server answers PING and reports our child's
/// PID (not some other server that took the port); fails early with the log tail if the
/// process exits.
fn wait_ready(child: &ChildGuard, port: u16) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_status() {
            bail!(
                "{} on port {port} exited during start ({status}); log:\n{}",
                child.name(),
                child.log_tail(30)
            );
        }
        match query_string(port, &["PING"], Duration::from_millis(500)) {
            Ok(pong) if pong == "PONG" => {
                let info = query_string(port, &["INFO", "server"], Duration::from_secs(1))?;
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
    child: Mutex<ChildGuard>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING (≤ 10 s). Blocking.
    pub fn start() -> Result<RedisServer> {
        let bin = redis_server_bin()?;
        let dir = fresh_dir("redis")?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match spawn_server(&bin, &dir, port, &[], "redis-server") {
                Ok(child) => {
                    return Ok(RedisServer {
                        bin,
                        dir,
                        port,
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

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
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
            match spawn_server(&self.bin, &self.dir, self.port, &[], "redis-server") {
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
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, joins them with `redis-cli --cluster create`, and
    /// waits until every node reports `cluster_state:ok` (≤ 30 s). Blocking.
    pub fn start() -> Result<RedisCluster> {
        let bin = redis_server_bin()?;
        let cli = redis_cli_bin()?;
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
                let extra = [
                    "--cluster-enabled".to_owned(),
                    "yes".to_owned(),
                    "--cluster-config-file".to_owned(),
                    dir.join("nodes.conf").display().to_string(),
                    "--cluster-node-timeout".to_owned(),
                    "2000".to_owned(),
                    "--cluster-port".to_owned(),
                    bus.to_string(),
                ];
                let _ = std::fs::remove_file(dir.join("nodes.conf"));
                match spawn_server(&bin, &dir, port, &extra, &format!("redis-cluster-{i}")) {
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
        let cluster = RedisCluster { ports, nodes };
        cluster.create(&cli)?;
        cluster.wait_ok()?;
        Ok(cluster)
    }

    fn create(&self, cli: &Path) -> Result<()> {
        let dir = fresh_dir("redis-cluster-create")?;
        let mut cmd = Command::new(cli);
        cmd.arg("--cluster").arg("create");
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
                let info = query_string(*port, &["CLUSTER", "INFO"], Duration::from_secs(1));
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

    /// `redis://127.0.0.1:PORT/` of the three masters (seed nodes for `ClusterClient`).
    pub fn nodes(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
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
