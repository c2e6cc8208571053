//! Tests of the test bed itself, against the real redis-server and the real Pub/Sub emulator.
//! Every test is bounded in time (an outer timeout) and none asserts a duration.

use gmail_sync_testbed::process::{self, ChildGuard};
use gmail_sync_testbed::pubsub;
use gmail_sync_testbed::redis_server::{self, RedisCluster, RedisServer};
use redis::AsyncCommands;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use std::process::Command;
use std::time::Duration;

const TEST_LIMIT: Duration = Duration::from_secs(120);

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_LIMIT, fut)
        .await
        .expect("test exceeded its time limit")
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn redis_start_kill_restart_same_port() {
    bounded(async {
        let server = std::sync::Arc::new(blocking(RedisServer::start).await.unwrap());
        let port = server.port();
        assert_eq!(server.url(), format!("redis://127.0.0.1:{port}/"));
        let first_pid = server.pid();

        let mut con = connect(&server.url()).await;
        let () = con.set("harness:k", "v1").await.unwrap();
        let v: String = con.get("harness:k").await.unwrap();
        assert_eq!(v, "v1");

        server.kill();
        assert!(!server.is_running());
        assert!(
            !process::pid_alive(first_pid),
            "killed redis-server still alive"
        );
        let refused = redis::Client::open(server.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(1));
        assert!(refused.is_err(), "port still answers after kill");

        let s = server.clone();
        blocking(move || s.restart()).await.unwrap();
        assert_eq!(server.port(), port, "restart must keep the port");
        assert_ne!(server.pid(), first_pid);
        let mut con = connect(&server.url()).await;
        let v: Option<String> = con.get("harness:k").await.unwrap();
        assert_eq!(v, None, "no persistence: the data is gone after a restart");
        let () = con.set("harness:k", "v2").await.unwrap();

        let pid = server.pid();
        drop(con);
        let s = server.clone();
        blocking(move || s.stop()).await;
        assert!(!process::pid_alive(pid));
        drop(server);
    })
    .await
}

#[tokio::test]
async fn redis_shared_is_one_server() {
    bounded(async {
        let a = redis_server::shared().await.unwrap();
        let b = redis_server::shared().await.unwrap();
        assert!(std::ptr::eq(a, b));
        let mut con = connect(&a.url()).await;
        let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
        assert_eq!(pong, "PONG");
    })
    .await
}

#[tokio::test]
async fn redis_cluster_reaches_ok_and_serves_hash_tags() {
    bounded(async {
        let cluster = blocking(RedisCluster::start).await.unwrap();
        let nodes = cluster.nodes();
        assert_eq!(nodes.len(), 3);
        let client = redis::cluster::ClusterClient::new(nodes.clone()).unwrap();
        let mut con = client.get_async_connection().await.unwrap();
        for i in 0..20 {
            let key = format!("{{mbx-{i}}}:state");
            let other = format!("{{mbx-{i}}}:cursor");
            let () = con.set(&key, i).await.unwrap();
            // Same hash tag → same slot: a MULTI/EXEC over both keys must work.
            let () = redis::pipe()
                .atomic()
                .set(&other, i * 2)
                .ignore()
                .query_async(&mut con)
                .await
                .unwrap();
            let v: i64 = con.get(&key).await.unwrap();
            let w: i64 = con.get(&other).await.unwrap();
            assert_eq!((v, w), (i, i * 2));
        }
        // Keys spread over more than one master.
        let mut masters_with_keys = 0;
        for n in &nodes {
            let mut c = connect(n).await;
            let size: i64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
            if size > 0 {
                masters_with_keys += 1;
            }
        }
        assert!(masters_with_keys >= 2, "all keys on one node");
        let pids = cluster.pids();
        drop(cluster);
        for pid in pids {
            assert!(!process::pid_alive(pid), "cluster node {pid} survived drop");
        }
    })
    .await
}

/// Writes `n` keys of distinct hash tags through `con`, each acknowledged by one replica
/// (`WAIT 1`), so a forced failover may not lose them either.
async fn write_replicated(con: &mut redis::cluster_async::ClusterConnection, label: &str, n: u32) {
    for i in 0..n {
        let key = format!("{{{label}-{i}}}:k");
        let () = con.set(&key, i).await.unwrap();
        // WAIT names no key: route it to the master of the key's slot.
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(
            &key,
            SlotAddr::Master,
        )));
        let mut wait = redis::cmd("WAIT");
        wait.arg(1).arg(5_000);
        let acked = con.route_command(wait, route).await.unwrap();
        assert_eq!(acked, redis::Value::Int(1), "{key} not replicated");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_with_replicas_fails_over_gracefully_and_by_sigkill() {
    use gmail_sync_testbed::redis_server::{Failover, rejoined, serving};
    bounded(async {
        let cluster = std::sync::Arc::new(blocking(RedisCluster::start_replicated).await.unwrap());
        assert_eq!(cluster.nodes().len(), 6);
        let c = cluster.clone();
        let view = blocking(move || c.settled_view()).await.unwrap();
        let masters: Vec<u16> = view
            .values()
            .filter(|n| n.replica_of.is_none())
            .map(|n| n.port)
            .collect();
        assert_eq!(masters.len(), 3, "{view:?}");
        for m in &masters {
            assert_eq!(
                view.values().filter(|n| n.replica_of == Some(*m)).count(),
                1,
                "{view:?}"
            );
        }
        let client = redis::cluster::ClusterClient::new(cluster.nodes()).unwrap();
        let mut con = client.get_async_connection().await.unwrap();
        write_replicated(&mut con, "before", 60).await;

        // Graceful: the replica of slot 0's master takes over, the old master follows it.
        let c = cluster.clone();
        let (old, promotion) = blocking(move || {
            let old = serving(&c.settled_view().unwrap(), 0).unwrap();
            (old, c.failover(old, Failover::Graceful))
        })
        .await;
        let promotion = promotion.unwrap();
        assert_eq!(promotion.old_master, old);
        let c = cluster.clone();
        let view = blocking(move || c.settled_view()).await.unwrap();
        assert_eq!(serving(&view, 0), Some(promotion.new_master));
        assert_eq!(view[&old].replica_of, Some(promotion.new_master));
        // The same connection follows the MOVED redirections; nothing was lost.
        for i in 0..60 {
            let v: u32 = con.get(format!("{{before-{i}}}:k")).await.unwrap();
            assert_eq!(v, i);
        }
        write_replicated(&mut con, "after", 60).await;

        // Forced: SIGKILL the master of the last slot; its replica is elected; the killed node
        // comes back as a replica.
        let c = cluster.clone();
        let killed = blocking(move || {
            let master = serving(&c.settled_view().unwrap(), 16383).unwrap();
            c.failover(master, Failover::Forced)
        })
        .await
        .unwrap();
        let c = cluster.clone();
        let view = blocking(move || c.settled_view()).await.unwrap();
        assert_eq!(serving(&view, 16383), Some(killed.new_master));
        assert!(view[&killed.old_master].failed, "{view:?}");
        for (label, n) in [("before", 60), ("after", 60)] {
            for i in 0..n {
                let v: u32 = con.get(format!("{{{label}-{i}}}:k")).await.unwrap();
                assert_eq!(v, i, "{label}-{i} (acknowledged by a replica) lost");
            }
        }
        let c = cluster.clone();
        let port = killed.old_master;
        blocking(move || c.restart_node(port)).await.unwrap();
        let c = cluster.clone();
        let view = blocking(move || c.settled_view()).await.unwrap();
        assert!(rejoined(&view, port), "{view:?}");
        assert_eq!(view[&port].replica_of, Some(killed.new_master));
        eprintln!(
            "graceful failover {:?}, forced failover {:?}",
            promotion.took, killed.took
        );

        let pids = cluster.pids();
        drop(con);
        drop(client);
        let cluster = std::sync::Arc::into_inner(cluster).expect("one owner left");
        drop(cluster);
        for pid in pids {
            assert!(!process::pid_alive(pid), "cluster node {pid} survived drop");
        }
    })
    .await
}

#[tokio::test]
async fn emulator_publish_three_drain_three() {
    bounded(async {
        let emulator = pubsub::shared().await.unwrap();
        assert!(emulator.is_running());
        assert_eq!(
            emulator.endpoint(),
            format!("http://{}", emulator.host_port())
        );
        let again = pubsub::shared().await.unwrap();
        assert!(std::ptr::eq(emulator, again));

        let t = pubsub::unique_topic(emulator, "harness", 10).await.unwrap();
        assert!(
            t.topic
                .starts_with("projects/gmail-sync-test/topics/harness-")
        );
        assert!(
            t.subscription
                .starts_with("projects/gmail-sync-test/subscriptions/harness-")
        );
        let publisher = pubsub::publisher(&emulator.endpoint(), &t.topic)
            .await
            .unwrap();
        let mut sent = Vec::new();
        for i in 0..3 {
            let payload = format!("message-{i}").into_bytes();
            let id = pubsub::publish_raw(&publisher, &payload).await.unwrap();
            assert!(!id.is_empty());
            sent.push(payload);
        }
        let mut got = pubsub::drain(
            &emulator.endpoint(),
            &t.subscription,
            Duration::from_secs(5),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        got.sort();
        assert_eq!(got, sent);
    })
    .await
}

#[tokio::test]
async fn emulator_admin_is_idempotent_and_separates_tests() {
    bounded(async {
        let emulator = pubsub::shared().await.unwrap();
        let endpoint = emulator.endpoint();
        let a = pubsub::unique_topic(emulator, "sep", 10).await.unwrap();
        let b = pubsub::unique_topic(emulator, "sep", 10).await.unwrap();
        assert_ne!(a, b);
        // Creating them again is fine.
        pubsub::create_topic(&endpoint, &a.topic).await.unwrap();
        pubsub::create_subscription(&endpoint, &a.topic, &a.subscription, 10)
            .await
            .unwrap();
        let p = pubsub::publisher(&endpoint, &a.topic).await.unwrap();
        pubsub::publish_raw(&p, b"only-a").await.unwrap();
        let got_b = pubsub::drain(
            &endpoint,
            &b.subscription,
            Duration::from_secs(3),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert!(got_b.is_empty(), "b received a's message");
        let got_a = pubsub::drain(
            &endpoint,
            &a.subscription,
            Duration::from_secs(5),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert_eq!(got_a, vec![b"only-a".to_vec()]);
    })
    .await
}

#[test]
fn child_guard_dropped_during_panic_leaves_no_process() {
    let dir = process::fresh_dir("harness-sleep").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let mut cmd = Command::new("sleep");
        cmd.arg("300");
        let guard = ChildGuard::spawn("sleep", cmd, &dir).unwrap();
        tx.send(guard.pid()).unwrap();
        assert!(guard.is_running());
        panic!("test panic with a live child");
    });
    assert!(result.is_err());
    let pid = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // The guard reaped it: no process, not even a zombie.
    assert!(!process::pid_exists(pid), "pid {pid} still exists");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn child_guard_stop_log_tail_and_free_port() {
    let dir = process::fresh_dir("harness-sh").unwrap();
    let mut cmd = Command::new("sh");
    // Ignores nothing: exits on SIGTERM. Prints lines first so the log has a tail.
    cmd.arg("-c")
        .arg("for i in 1 2 3 4 5; do echo line-$i; done; echo err >&2; exec sleep 300");
    let guard = ChildGuard::spawn("sh", cmd, &dir).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !guard.log_tail(10).contains("err") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let tail = guard.log_tail(2);
    assert!(tail.contains("line-5") && tail.contains("err"), "{tail}");
    assert!(!tail.contains("line-4"), "{tail}");
    let pid = guard.pid();
    guard.stop();
    assert!(!guard.is_running());
    assert!(!process::pid_exists(pid));

    let p = process::free_port();
    assert_ne!(p, 0);
    std::net::TcpListener::bind(("127.0.0.1", p)).expect("free_port gave a usable port");
}

/// The reaper kills registered processes once the test process is gone, even by SIGKILL
/// (no destructor runs). The "test process" is this test binary run again with only its
/// ignored `reap_helper` test, which spawns a child, leaks its guard (like a static) and sleeps;
/// we SIGKILL it and wait (bounded) for the reaper to kill the child.
#[test]
fn reaper_kills_shared_children_after_sigkill_of_the_test_process() {
    let exe = std::env::current_exe().unwrap();
    let dir = process::fresh_dir("harness-reaper").unwrap();
    let pidfile = dir.join("grandchild.pid");
    // The subprocess runs only `reap_helper` (below), which spawns a ChildGuard, leaks it
    // (like a static), writes its PID, and sleeps.
    let mut helper = Command::new(exe)
        .args(["--exact", "reap_helper", "--ignored", "--nocapture"])
        .env("HARNESS_REAP_HELPER_PIDFILE", &pidfile)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let grandchild: u32 = loop {
        if let Ok(s) = std::fs::read_to_string(&pidfile)
            && let Ok(p) = s.trim().parse()
        {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "helper did not start its child"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(process::pid_alive(grandchild));
    helper.kill().unwrap(); // SIGKILL: no destructors run in the helper
    helper.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while process::pid_alive(grandchild) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !process::pid_alive(grandchild),
        "the reaper did not kill pid {grandchild} after its test process died"
    );
}

#[test]
#[ignore = "helper for reaper_kills_shared_children_after_sigkill_of_the_test_process"]
fn reap_helper() {
    let Some(pidfile) = std::env::var_os("HARNESS_REAP_HELPER_PIDFILE") else {
        return;
    };
    let dir = process::fresh_dir("reap-helper").unwrap();
    let mut cmd = Command::new("sleep");
    cmd.arg("300");
    let guard = Box::leak(Box::new(ChildGuard::spawn("sleep", cmd, &dir).unwrap()));
    std::fs::write(pidfile, guard.pid().to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

/// The façade's worker processes: each has a health directory of its own, `wait_ready` returns
/// once the ready file exists, fails at once (with the log tail) when the worker exits first,
/// and fails at its timeout when the file never comes. Stand-in workers are `sh` scripts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bed_waits_for_each_workers_ready_file() {
    use gmail_sync_testbed::bed::{Options, Testbed};
    bounded(async {
        let bed = Testbed::start("facade", Options::default()).await.unwrap();
        let env: std::collections::HashMap<_, _> = bed.env().into_iter().collect();
        assert_eq!(env["GMAIL_SYNC_SUBSCRIPTION"], bed.topic.subscription);
        assert_eq!(env["GMAIL_SYNC_KEY_PREFIX"], bed.prefix);
        assert_eq!(env["PUBSUB_EMULATOR_HOST"], bed.emulator.host_port());
        assert!(env["GMAIL_SYNC_REDIS_URL"].starts_with("redis://127.0.0.1:"));
        let sh = std::path::Path::new("/bin/sh");
        let ready_later = "sleep 0.3; mkdir -p \"$GMAIL_SYNC_HEALTH_DIR\" && \
                           touch \"$GMAIL_SYNC_HEALTH_DIR/ready\"; exec sleep 60";
        let a = bed
            .spawn_worker(sh, &["-c", ready_later], "a", &[])
            .unwrap();
        let b = bed
            .spawn_worker(sh, &["-c", ready_later], "b", &[])
            .unwrap();
        assert_ne!(a.health_dir(), b.health_dir(), "each worker has its own");
        assert!(a.health_dir().starts_with(&bed.dir));
        assert!(!a.is_ready());
        a.wait_ready(Duration::from_secs(30)).await.unwrap();
        b.wait_ready(Duration::from_secs(30)).await.unwrap();
        assert!(a.is_ready() && b.is_ready());
        let status = a.terminate(Duration::from_secs(10)).await.expect("exits");
        assert!(!status.success());
        assert!(!a.is_running());

        let dies = bed
            .spawn_worker(sh, &["-c", "echo startup-went-wrong; exit 3"], "dies", &[])
            .unwrap();
        let err = dies
            .wait_ready(Duration::from_secs(30))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("exited") && err.contains("startup-went-wrong"),
            "{err}"
        );

        let own = bed.fresh_health_dir("override");
        let never = bed
            .spawn_worker(
                sh,
                &["-c", "exec sleep 60"],
                "never",
                &[("GMAIL_SYNC_HEALTH_DIR", own.to_str().unwrap())],
            )
            .unwrap();
        assert_eq!(
            never.health_dir(),
            own,
            "an override of the health dir is honoured"
        );
        let err = never
            .wait_ready(Duration::from_millis(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("within"), "{err}");
        drop(never); // SIGKILL by the guard
    })
    .await
}
