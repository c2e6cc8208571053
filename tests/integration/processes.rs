//! The real binary: several worker processes on one subscription, SIGTERM, startup errors, and
//! what its logs may contain.

use crate::harness::{Bed, BedOptions, DEV_TOKEN, emails};
use gmail_sync_testbed::gmail::{Endpoint, FaultAction, FaultRule, SimConfig};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a worker may take to exit after SIGTERM.
const EXIT: Duration = Duration::from_secs(30);

/// The process's sockets in LISTEN state (TCP and UDP-bound, v4 and v6), from /proc: the
/// inodes of its socket fds matched against the kernel's socket tables.
pub(crate) fn listening_sockets(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    assert!(
        !inodes.is_empty(),
        "a running worker has sockets (Pub/Sub, Redis, Gmail)"
    );
    let mut found = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // TCP state 0A = LISTEN; any UDP socket of ours would be a bound receiver.
            let listening = table.starts_with("udp") || cols.get(3) == Some(&"0A");
            if listening && cols.get(9).is_some_and(|i| inodes.iter().any(|n| n == i)) {
                found.push(format!("{table}: {}", cols[1]));
            }
        }
    }
    found
}

/// stdout and stderr of a finished command, as text.
fn combined(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Two worker processes on one subscription, bursts on shared mailboxes: the change streams
/// are exactly the ledger (no loss, no duplicate), then SIGTERM stops both with exit code 0 and
/// no lease left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_with_bursts_produce_exactly_the_ledger() {
    // Every change notifies at once (no 1/s folding): real bursts of notifications.
    let sim = SimConfig {
        notify_min_interval: Duration::ZERO,
        ..SimConfig::default()
    };
    let mut bed = Bed::with(
        "twoproc",
        BedOptions {
            sim,
            ..BedOptions::default()
        },
    )
    .await;
    let mailboxes = emails("twoproc", 10);
    bed.add_mailboxes(&mailboxes).await;
    let a = bed.spawn_worker_process("worker-a", &[]);
    let b = bed.spawn_worker_process("worker-b", &[]);
    // Both must be attached before we publish (emulator quirk: see reference/emulator.md).
    bed.wait_ready(&[&a, &b]).await;
    for round in 0..5 {
        for m in &mailboxes {
            bed.sim.burst(m, 6);
        }
        if round % 2 == 0 {
            bed.sim.deliver(&mailboxes[0], &["INBOX"]);
        }
        // Traffic pacing (five bursts spread over a second), not a wait for anything.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Err(e) = bed.wait_caught_up(Duration::from_secs(90)).await {
        panic!(
            "{e}\n--- a ---\n{}\n--- b ---\n{}",
            a.log_tail(30),
            b.log_tail(30)
        );
    }
    let n = bed.check_against_ledger().await.unwrap();
    assert!(n >= 300, "{n}");

    a.sigterm();
    b.sigterm();
    for w in [&a, &b] {
        let status = w.wait_exit(EXIT).await.expect("worker exits after SIGTERM");
        assert_eq!(status.code(), Some(0), "{}", w.log_tail(20));
        let log = std::fs::read_to_string(w.log_path()).unwrap();
        assert!(log.contains("final summary"), "{}", w.log_tail(20));
    }
    let leases = bed.lease_keys().await;
    assert!(leases.is_empty(), "leases left behind: {leases:?}");
    // Once both have exited nothing can write any more: a late duplicate (the bug this test
    // hunts) would show here.
    assert_eq!(bed.check_against_ledger().await.unwrap(), n);
}

/// I7: at trace level, with 401s (token refresh path) and 429s, the token never reaches the logs.
/// I8: the worker process has no listening socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs_and_no_port_is_open() {
    let mut bed = Bed::start("secrets").await;
    let mailboxes = emails("secrets", 2);
    bed.add_mailboxes(&mailboxes).await;
    // One expired token per mailbox: each sync refreshes once and succeeds (two 401s in a
    // row for one mailbox would be a permanent auth failure, by design).
    for m in &mailboxes {
        bed.sim.inject(
            FaultRule::new(Some(Endpoint::HistoryList), FaultAction::ExpiredToken)
                .for_mailbox(m)
                .times(1),
        );
    }
    bed.sim.inject(
        FaultRule::new(
            Some(Endpoint::HistoryList),
            FaultAction::Status {
                status: 429,
                reason: Some("rateLimitExceeded".into()),
                message: None,
                domain: None,
                retry_after: Some(1),
            },
        )
        .times(1),
    );
    let w = bed.spawn_worker_process(
        "trace",
        &[("RUST_LOG", "trace"), ("GMAIL_SYNC_LOG_MAILBOX", "plain")],
    );
    bed.wait_ready(&[&w]).await;
    for m in &mailboxes {
        bed.sim.deliver(m, &["INBOX"]);
    }
    bed.wait_caught_up(Duration::from_secs(60)).await.unwrap();
    // I8: the busy worker listens on nothing. (The detector does see listeners: this test
    // process serves the Gmail simulator.)
    assert!(!listening_sockets(std::process::id()).is_empty());
    let listening = listening_sockets(w.pid());
    assert!(listening.is_empty(), "the worker listens: {listening:?}");
    w.sigterm();
    assert_eq!(w.wait_exit(EXIT).await.and_then(|s| s.code()), Some(0));
    let log = std::fs::read(w.log_path()).unwrap();
    let text = String::from_utf8_lossy(&log);
    assert!(text.len() > 10_000, "trace logging produced little output");
    assert!(text.contains("\"severity\""), "JSON lines with severity");
    for needle in [DEV_TOKEN, "Bearer "] {
        assert!(!text.contains(needle), "found {needle:?} in the logs");
    }
    // Every stdout line is a JSON object with the fields Cloud Logging reads.
    for line in text.lines().filter(|l| l.starts_with('{')).take(200) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            v.get("severity").is_some() && v.get("time").is_some() && v.get("message").is_some(),
            "{line}"
        );
    }
}

/// Bad configuration stops startup with the variable's name; an unusable subscription fails
/// fast and clearly instead of retrying in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_fails_clearly_on_bad_configuration() {
    let bed = Bed::start("startup").await;
    let bin = env!("CARGO_BIN_EXE_gmail-sync");
    let out = Command::new(bin)
        .arg("run")
        .envs(bed.env())
        .env("GMAIL_SYNC_SHARDS", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("GMAIL_SYNC_SHARDS") && stderr.contains("integer"),
        "{stderr}"
    );

    let out = Command::new(bin)
        .arg("run")
        .envs(bed.env())
        .env_remove("GMAIL_SYNC_SUBSCRIPTION")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let all = combined(&out);
    assert!(all.contains("GMAIL_SYNC_SUBSCRIPTION"), "{all}");

    let missing = bed
        .topic
        .subscription
        .replace("subscriptions/", "subscriptions/does-not-exist-");
    let started = Instant::now();
    let out = Command::new(bin)
        .arg("run")
        .envs(bed.env())
        .env("GMAIL_SYNC_SUBSCRIPTION", &missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let all = combined(&out);
    assert!(
        all.contains("not usable") && all.contains("does-not-exist-"),
        "{all}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "startup check must not hang"
    );

    let out = Command::new(bin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for v in gmail_sync::config::variables() {
        assert!(help.contains(v.name), "--help lacks {}", v.name);
    }
}

/// `gmail-sync mailbox add` watches the mailbox on the configured topic and stores its
/// baseline; adding it again keeps the cursor (idempotent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_add_is_idempotent_and_keeps_the_cursor() {
    let bed = Bed::start("cliadd").await;
    let email = "cli.user@example.com";
    bed.sim.add_mailbox(email);
    let bin = env!("CARGO_BIN_EXE_gmail-sync");
    let add = || {
        Command::new(bin)
            .args(["mailbox", "add", "--json", email])
            .envs(bed.env())
            .output()
            .unwrap()
    };
    let first = add();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let r1: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(r1["created"], true);
    assert_eq!(
        bed.sim.watch_topic(email).as_deref(),
        Some(bed.topic.topic.as_str())
    );
    bed.sim.deliver(email, &["INBOX"]);
    let second = add();
    assert!(second.status.success());
    let r2: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(r2["created"], false);
    assert_eq!(
        r2["cursor"], r1["cursor"],
        "the stored cursor must not move"
    );
    assert_ne!(r2["watch_history_id"], r1["watch_history_id"]);

    let bad = Command::new(bin)
        .args(["mailbox", "add", "not-an-address"])
        .envs(bed.env())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not-an-address"));
}

/// I4 with a stale lease holder: a worker paused (SIGSTOP) in the middle of a sync loses its
/// lease; another sync takes over and commits; when the paused worker resumes, its commit is
/// refused, so nothing is written twice, and it then acks without work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_that_lost_its_lease_cannot_write() {
    use gmail_sync::history_id::HistoryId;
    use gmail_sync::mailbox::Mailbox;
    use gmail_sync::sync::{SyncOutcome, Syncer};
    use gmail_sync::telemetry::Counters;
    use std::sync::Arc;

    let (bed, email) = Bed::with_one_mailbox("stale").await;
    let a = bed.spawn_worker_process("worker-a", &[("GMAIL_SYNC_MAILBOX_LEASE_MS", "2000")]);
    bed.wait_ready(&[&a]).await;
    bed.sim.inject(
        FaultRule::new(
            Some(Endpoint::HistoryList),
            FaultAction::Latency { millis: 1500 },
        )
        .times(1),
    );
    bed.sim.deliver(&email, &["INBOX"]);
    assert!(
        crate::harness::eventually(Duration::from_secs(20), || bed.sim.in_flight(&email) > 0).await
    );
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .arg(sig)
                .arg(a.pid().to_string())
                .status()
                .unwrap()
                .success()
        )
    };
    signal("-STOP");
    // Past the lease TTL (the paused worker cannot renew it, so the key expires), another sync
    // (acting as a second worker) takes over and commits.
    let lease_key = bed.keys().lease(&email);
    let mut con = bed.redis().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&lease_key)
            .query_async(&mut con)
            .await
            .unwrap();
        if !exists {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the paused worker's lease did not expire"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = bed.config();
    let counters = Arc::new(Counters::default());
    let store = bed.store().await;
    let syncer = Syncer::new(
        gmail_sync::app::gmail_client(&config, &store, counters.clone()).unwrap(),
        store,
        config.sync.clone(),
        counters,
        config.log_mailbox,
    );
    let m = Mailbox::parse(&email).unwrap();
    let target = HistoryId(bed.sim.current_history_id(&email));
    let outcome = syncer
        .sync(&m, target, &tokio_util::sync::CancellationToken::new())
        .await;
    assert!(
        matches!(outcome, SyncOutcome::Synced { changes: 1, .. }),
        "{outcome:?}"
    );
    signal("-CONT");
    // The resumed worker's commit is refused ("mailbox lease lost" in its log); it retries,
    // finds the cursor covered, acks. Bounded wait for the log line; the assertions follow.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline
        && !std::fs::read_to_string(a.log_path())
            .unwrap_or_default()
            .contains("lease lost")
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        bed.check_against_ledger().await.unwrap(),
        1,
        "{}",
        a.log_tail(20)
    );
    a.sigterm();
    assert_eq!(a.wait_exit(EXIT).await.and_then(|s| s.code()), Some(0));
    // The worker has exited: nothing can write any more.
    assert_eq!(
        bed.check_against_ledger().await.unwrap(),
        1,
        "{}",
        a.log_tail(20)
    );
    let log = std::fs::read_to_string(a.log_path()).unwrap();
    assert!(
        log.contains("lease"),
        "the paused worker reports its lost lease:\n{}",
        a.log_tail(20)
    );
}

/// I1/I2 under a crash: the worker syncing a mailbox is killed with SIGKILL while it waits for
/// Gmail. Its lease expires; its unacked notification comes back (the emulator redelivers a
/// killed subscriber's messages after a long delay, see reference/emulator.md) to the other
/// worker, which syncs; the change streams end exactly equal to the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_sync_loses_nothing_and_duplicates_nothing() {
    let (bed, email) = Bed::with_one_mailbox("crash").await;
    let a = bed.spawn_worker_process("worker-a", &[]);
    let b = bed.spawn_worker_process("worker-b", &[]);
    bed.wait_ready(&[&a, &b]).await;
    bed.sim.inject(
        FaultRule::new(
            Some(Endpoint::HistoryList),
            FaultAction::Latency { millis: 3000 },
        )
        .times(1),
    );
    bed.sim.deliver(&email, &["INBOX"]);
    assert!(
        crate::harness::eventually(Duration::from_secs(20), || bed.sim.in_flight(&email) > 0).await
    );
    // The lease value names the holder: HOST:PID:RANDOM.
    let mut con = bed.redis().await;
    let key = bed
        .store()
        .await
        .keys()
        .lease(&gmail_sync::mailbox::Mailbox::parse(&email).unwrap())
        .to_string();
    let holder: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    let pid: u32 = holder.split(':').nth(1).unwrap().parse().unwrap();
    let (victim, survivor) = if pid == a.pid() { (&a, &b) } else { (&b, &a) };
    assert_eq!(victim.pid(), pid, "the lease holder is one of our workers");
    victim.kill();
    bed.sim.deliver(&email, &["INBOX", "UNREAD"]);
    if let Err(e) = bed.wait_caught_up(Duration::from_secs(200)).await {
        panic!("{e}\n{}", survivor.log_tail(20));
    }
    assert_eq!(bed.check_against_ledger().await.unwrap(), 2);
    survivor.sigterm();
    assert_eq!(
        survivor.wait_exit(EXIT).await.and_then(|s| s.code()),
        Some(0)
    );
    // Both workers are gone: nothing can write any more.
    assert_eq!(bed.check_against_ledger().await.unwrap(), 2);
}
