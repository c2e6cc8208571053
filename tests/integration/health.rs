//! Health against a running worker process: the real binary as the worker, the real
//! `gmail-sync health --live|--ready` as the probe (what the kubelet runs), real Redis and
//! Pub/Sub. Ready once connected; not ready at once on SIGTERM while it drains; not live when
//! its loops stop (SIGSTOP); not ready, but live, through a Redis outage; a restart with Redis
//! down is neither until Redis is back, and the files a killed worker left are cleared first;
//! a Redis whose maxmemory-policy may evict the worker's keys is named at startup.

use crate::harness::{Bed, BedOptions, WorkerProcess, emails};
use gmail_sync_testbed::bed::{READY_TIMEOUT, RedisChoice};
use gmail_sync_testbed::gmail::{Endpoint, FaultAction, FaultRule};
use gmail_sync_testbed::redis_server::{RedisServer, Security};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The smallest `--max-heartbeat-age` the probe accepts (`health::MIN_HEARTBEAT_AGE`): the
/// stuck-process test waits for it, and the outage test proves the heartbeat stays younger.
const SHORT_AGE: &str = "10";
/// How long a worker may take to exit after SIGTERM.
const EXIT: Duration = Duration::from_secs(30);

/// Runs `gmail-sync health ARGS` against `dir` as the kubelet would: Ok, or the probe's
/// complaint (its stderr).
fn probe(bed: &Bed, dir: &Path, args: &[&str]) -> Result<(), String> {
    let dir = dir.display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_gmail-sync"))
        .arg("health")
        .args(args)
        .envs(bed.env_with(&[("GMAIL_SYNC_HEALTH_DIR", dir.as_str())]))
        .output()
        .expect("run gmail-sync health");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match out.status.code() {
        Some(0) => Ok(()),
        Some(1) => Err(stderr),
        other => panic!("gmail-sync health {args:?} exited with {other:?}: {stderr}"),
    }
}

fn live(bed: &Bed, w: &WorkerProcess) -> Result<(), String> {
    probe(bed, w.health_dir(), &["--live"])
}

fn ready(bed: &Bed, w: &WorkerProcess) -> Result<(), String> {
    probe(bed, w.health_dir(), &["--ready"])
}

/// Polls `probe` every 200 ms until it says `want` (Ok = true) or `timeout`; the last answer.
async fn until(
    timeout: Duration,
    want: bool,
    mut probe: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = probe();
        if got.is_ok() == want || Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Resumes the worker when dropped, so a failed assertion never leaves a stopped one behind.
struct Resume<'a>(&'a WorkerProcess);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

async fn expect_clean_exit(w: &WorkerProcess) {
    let status = w.terminate(EXIT).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", w.log_tail(30));
}

/// Ready (and live) once connected; after SIGTERM, not ready at once, while the worker is
/// still draining a sync in flight and still live; then it exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_once_connected_and_not_ready_from_the_first_moment_of_sigterm() {
    let (bed, mailbox) = Bed::with_one_mailbox("hready").await;
    let w = bed.spawn_worker_process("hready", &[("GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS", "10")]);
    bed.wait_ready(&[&w]).await;
    ready(&bed, &w).unwrap();
    live(&bed, &w).unwrap();
    let log = std::fs::read_to_string(w.log_path()).unwrap();
    assert!(
        log.contains("\"message\":\"ready\""),
        "the worker logs when it becomes ready:\n{log}"
    );

    // A sync that cannot finish keeps the drain busy for the shutdown timeout.
    bed.sim
        .inject(FaultRule::new(Some(Endpoint::HistoryList), FaultAction::Hang).times(1));
    bed.sim.deliver(&mailbox, &["INBOX"]);
    let in_flight =
        crate::harness::eventually(Duration::from_secs(20), || bed.sim.in_flight(&mailbox) > 0)
            .await;
    assert!(in_flight, "{}", w.log_tail(20));

    w.sigterm();
    let why = until(Duration::from_secs(2), false, || ready(&bed, &w))
        .await
        .expect_err("still ready 2 s after SIGTERM");
    assert!(why.contains("shutting down"), "{why}");
    assert!(
        w.is_running(),
        "the drain is still waiting for the sync in flight"
    );
    live(&bed, &w).expect("live while draining");
    // It never comes back while the drain goes on.
    for _ in 0..10 {
        assert!(ready(&bed, &w).is_err());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = w.wait_exit(EXIT).await.expect("exits after the drain");
    assert_eq!(status.code(), Some(0), "{}", w.log_tail(30));
}

/// A process that stops making progress (SIGSTOP: every loop frozen) fails both probes once
/// its heartbeat is older than the probe's bound, and passes them again once it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_worker_is_not_live() {
    let bed = Bed::start("hstuck").await;
    let w = bed.spawn_worker_process("hstuck", &[]);
    bed.wait_ready(&[&w]).await;
    let short = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--max-heartbeat-age", SHORT_AGE]);
        probe(&bed, w.health_dir(), &all)
    };
    until(Duration::from_secs(10), true, || short(&["--live"]))
        .await
        .unwrap();

    w.pause();
    let resume = Resume(&w);
    let why = until(Duration::from_secs(20), false, || short(&["--live"]))
        .await
        .expect_err("still live 20 s after SIGSTOP");
    assert!(why.contains("last heartbeat"), "{why}");
    assert!(
        short(&["--ready"]).is_err(),
        "ready needs a fresh heartbeat too"
    );
    // The default bound (30 s) is not reached yet: only the bound decides.
    live(&bed, &w).unwrap();

    drop(resume);
    until(Duration::from_secs(20), true, || short(&["--live"]))
        .await
        .unwrap_or_else(|e| panic!("not live again after SIGCONT: {e}\n{}", w.log_tail(20)));
    until(Duration::from_secs(30), true, || short(&["--ready"]))
        .await
        .unwrap_or_else(|e| panic!("not ready again after SIGCONT: {e}\n{}", w.log_tail(20)));
    expect_clean_exit(&w).await;
}

/// Redis goes away under a running worker that has work to retry: not ready within the
/// staleness bound, but live throughout (a short heartbeat bound holds for the whole outage:
/// the loops keep turning); ready again once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_makes_the_worker_not_ready_but_never_not_live() {
    let mut bed = Bed::with(
        "houtage",
        BedOptions {
            redis: RedisChoice::Own,
            ..BedOptions::default()
        },
    )
    .await;
    let mailboxes = emails("houtage", 2);
    bed.add_mailboxes(&mailboxes).await;
    let w = bed.spawn_worker_process("houtage", &[]);
    bed.wait_ready(&[&w]).await;
    let live_short = || {
        probe(
            &bed,
            w.health_dir(),
            &["--live", "--max-heartbeat-age", SHORT_AGE],
        )
    };

    let redis = bed.redis.server().expect("the bed's own redis-server");
    tokio::task::block_in_place(|| redis.stop());
    let gone_at = Instant::now();
    // Syncs that fail on Redis and are retried: the loops are busy with the outage.
    for m in &mailboxes {
        bed.sim.deliver(m, &["INBOX"]);
    }
    let mut not_ready_after = None;
    // Past the staleness bound (15 s) and past the short heartbeat bound, probing as a
    // kubelet would.
    while gone_at.elapsed() < Duration::from_secs(30) {
        if let Err(e) = live_short() {
            panic!(
                "not live {:?} into a Redis outage: {e}\n{}",
                gone_at.elapsed(),
                w.log_tail(30)
            );
        }
        match ready(&bed, &w) {
            Err(why) if not_ready_after.is_none() => {
                assert!(why.contains("Redis"), "{why}");
                not_ready_after = Some(gone_at.elapsed());
            }
            Ok(()) => assert!(
                not_ready_after.is_none(),
                "ready again while Redis is still down"
            ),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = not_ready_after
        .unwrap_or_else(|| panic!("still ready 30 s into a Redis outage\n{}", w.log_tail(30)));
    assert!(
        after >= Duration::from_secs(10) && after <= Duration::from_secs(25),
        "not ready after {after:?}: the bound is 15 s of silence"
    );
    assert!(w.is_running(), "{}", w.log_tail(30));

    tokio::task::block_in_place(|| redis.restart()).unwrap();
    until(Duration::from_secs(20), true, || ready(&bed, &w))
        .await
        .unwrap_or_else(|e| panic!("not ready after Redis came back: {e}\n{}", w.log_tail(30)));
    expect_clean_exit(&w).await;
}

/// A worker killed outright (SIGKILL) leaves `live` and `ready` behind; the next worker in
/// that container clears them before anything else, so while Redis is down it is neither
/// live nor ready, and it becomes both once Redis is back and it connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_redis_down_is_not_ready_until_redis_is_back() {
    let bed = Bed::with(
        "hrestart",
        BedOptions {
            redis: RedisChoice::Own,
            ..BedOptions::default()
        },
    )
    .await;
    let first = bed.spawn_worker_process("hrestart-1", &[]);
    bed.wait_ready(&[&first]).await;
    let dir = first.health_dir().to_path_buf();
    first.kill();
    // What a crash leaves: the files still say live and ready.
    assert!(dir.join("ready").exists() && dir.join("live").exists());
    probe(&bed, &dir, &["--ready"]).expect("stale files look ready");

    let redis = bed.redis.server().expect("the bed's own redis-server");
    tokio::task::block_in_place(|| redis.stop());
    let health_dir = dir.display().to_string();
    let second = bed.spawn_worker_process(
        "hrestart-2",
        &[("GMAIL_SYNC_HEALTH_DIR", health_dir.as_str())],
    );
    let cleared = until(Duration::from_secs(10), false, || {
        probe(&bed, &dir, &["--live"])
    })
    .await;
    assert!(cleared.is_err(), "the stale heartbeat was not cleared");
    assert!(!dir.join("ready").exists());
    // While Redis stays down (the worker keeps asking, within its startup deadline).
    for _ in 0..10 {
        assert!(second.is_running(), "{}", second.log_tail(20));
        let why = probe(&bed, &dir, &["--ready"]).expect_err("ready while Redis is down");
        assert!(why.contains("starting"), "{why}");
        assert!(probe(&bed, &dir, &["--live"]).is_err());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let log = std::fs::read_to_string(second.log_path()).unwrap();
    assert!(log.contains("Redis refuses connections"), "{log}");

    tokio::task::block_in_place(|| redis.restart()).unwrap();
    second
        .wait_ready(READY_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    probe(&bed, &dir, &["--ready"]).unwrap();
    probe(&bed, &dir, &["--live"]).unwrap();
    expect_clean_exit(&second).await;
}

/// The worker's startup log line about Redis's eviction policy, if any.
fn eviction_warning(w: &WorkerProcess) -> Option<String> {
    std::fs::read_to_string(w.log_path())
        .unwrap()
        .lines()
        .find(|l| l.contains("maxmemory-policy is"))
        .map(str::to_string)
}

/// A Redis started with `--maxmemory-policy allkeys-lru` gets one warning line at startup
/// saying what to set; the default (noeviction) gets none; a Redis that refuses `CONFIG` (as
/// managed ones do) gets a debug line and the worker starts as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_is_named_at_startup() {
    let bed = Bed::start("hevict").await;
    let keeping = bed.spawn_worker_process("hevict-keep", &[]);
    let start = |args: &'static [&'static str]| {
        tokio::task::spawn_blocking(move || {
            RedisServer::start_with_args(Security::default(), args).expect("redis-server")
        })
    };
    let evicting_redis = start(&["--maxmemory-policy", "allkeys-lru"]).await.unwrap();
    let managed_redis = start(&["--rename-command", "CONFIG", ""]).await.unwrap();
    let url = evicting_redis.url();
    let evicting =
        bed.spawn_worker_process("hevict-lru", &[("GMAIL_SYNC_REDIS_URL", url.as_str())]);
    let url = managed_redis.url();
    let managed = bed.spawn_worker_process(
        "hevict-managed",
        &[
            ("GMAIL_SYNC_REDIS_URL", url.as_str()),
            ("RUST_LOG", "info,gmail_sync::store=debug"),
        ],
    );
    bed.wait_ready(&[&keeping, &evicting, &managed]).await;

    assert_eq!(eviction_warning(&keeping), None);
    let line = eviction_warning(&evicting).expect("no eviction warning");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["severity"], "WARNING", "{line}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("maxmemory-policy is allkeys-lru")
            && message.contains("Set maxmemory-policy to noeviction"),
        "{line}"
    );
    let log = std::fs::read_to_string(evicting.log_path()).unwrap();
    assert_eq!(log.matches("maxmemory-policy is").count(), 1, "one line");

    assert_eq!(eviction_warning(&managed), None);
    let log = std::fs::read_to_string(managed.log_path()).unwrap();
    let noted = log
        .lines()
        .find(|l| l.contains("cannot read Redis's maxmemory-policy"))
        .unwrap_or_else(|| panic!("no debug line about the refused CONFIG GET:\n{log}"));
    assert!(noted.contains("\"severity\":\"DEBUG\""), "{noted}");
    for w in [&keeping, &evicting, &managed] {
        expect_clean_exit(w).await;
    }
}

/// In a cluster every master is asked: one master with an evicting policy is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_cluster_master_is_named_at_startup() {
    let bed = Bed::with(
        "hevictc",
        BedOptions {
            redis: RedisChoice::Cluster,
            ..BedOptions::default()
        },
    )
    .await;
    let gmail_sync_testbed::bed::Redis::Cluster(cluster) = &bed.redis else {
        unreachable!("a cluster bed");
    };
    let port = cluster.ports()[1];
    let mut node = gmail_sync_testbed::bed::connect_single(&format!("redis://127.0.0.1:{port}/"))
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-lru")
        .query_async(&mut node)
        .await
        .unwrap();
    let w = bed.spawn_worker_process("hevictc", &[]);
    bed.wait_ready(&[&w]).await;
    let line = eviction_warning(&w).expect("no eviction warning");
    assert!(line.contains("maxmemory-policy is volatile-lru"), "{line}");
    assert!(line.contains(&format!(":{port}: volatile-lru")), "{line}");
    for other in [cluster.ports()[0], cluster.ports()[2]] {
        assert!(!line.contains(&format!(":{other}:")), "{line}");
    }
    expect_clean_exit(&w).await;
}
