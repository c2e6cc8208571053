//! The fault suite's reduced set (README "Fault suite"): a few scenarios, fixed seeds, about
//! half a minute of traffic each, every property P1–P6 held. The long runs are
//! `cargo run --release --example faults`.

use crate::harness::{Bed, BedOptions};
use gmail_sync_testbed::faults::driver::{self, RunOptions, WorkerCommand};
use gmail_sync_testbed::faults::{self, Row, Scenario};
use std::time::Duration;

/// Traffic per scenario: long enough for several faults of each kind (the first comes 4 s in,
/// the last stops 6 s before the end).
const TRAFFIC: Duration = Duration::from_secs(24);

async fn run(scenario: Scenario, seed: u64) -> Row {
    let label = format!("f{}", scenario.name());
    let mut bed = Bed::with(
        &label,
        BedOptions {
            // Redis restarts and CONFIG SET need a server of the bed's own, failovers a
            // cluster with replicas.
            redis: scenario.redis(),
            ..BedOptions::default()
        },
    )
    .await;
    let names = driver::mailbox_names(&format!("{label}-"), 12);
    driver::prepare(&mut bed, &names);
    bed.add_mailboxes(&names).await;
    let cmd = WorkerCommand {
        exe: env!("CARGO_BIN_EXE_gmail-sync").into(),
        args: vec!["run".into()],
    };
    let opts = RunOptions {
        scenario,
        seed,
        traffic: TRAFFIC,
        workers: 2,
        rate: 20,
    };
    let row = driver::run(&bed, &names, &cmd, &opts).await.unwrap();
    let table = faults::table(std::slice::from_ref(&row));
    assert!(row.faults_total() > 0, "nothing injected:\n{table}");
    assert!(row.changes > 100, "too little traffic:\n{table}");
    assert_eq!(row.violations.total(), 0, "\n{table}{:#?}", row.details);
    // The tap read the workers' traffic: otherwise P4 would hold for want of acks.
    assert!(
        row.acks.judged > 0,
        "the ack tap judged no ack: {:#?}",
        row.acks
    );
    assert_eq!(row.acks.undecoded, 0, "{:#?}", row.acks);
    row
}

/// How often `row` counts the fault `label` as injected.
fn injected(row: &Row, label: &str) -> u64 {
    row.faults.get(label).copied().unwrap_or(0)
}

/// SIGKILL of the worker syncing a mailbox (before its commit), of a worker between a commit
/// and its ack (its acks held by the proxy), and of random workers. The seed's schedule has
/// one of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_loops_hold_p1_to_p6() {
    let row = run(Scenario::Kill, KILL_SEED).await;
    for label in ["kill-before-commit", "kill-after-commit", "kill-random"] {
        assert!(
            injected(&row, label) > 0,
            "no {label}: {:?}\n{:#?}",
            row.faults,
            row.details
        );
    }
}

/// A seed whose 24 s kill schedule draws every kind of kill.
const KILL_SEED: u64 = 10;

/// Gmail forgets history mid-run (a mailbox's all at once, or a retention window that
/// overtakes lagging cursors): full resyncs, judged by `check::resync` (every live message
/// listed or arriving later, history entries exact and once, what was synced before kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_expiry_holds_p1_to_p6() {
    let row = run(Scenario::Gmail404, GMAIL_404_SEED).await;
    for label in ["history-expired", "history-retention"] {
        assert!(injected(&row, label) > 0, "no {label}: {:?}", row.faults);
    }
    assert!(
        row.resyncs >= injected(&row, "history-expired"),
        "{} resyncs for {:?}",
        row.resyncs,
        row.faults
    );
    assert!(row.listed > 0, "the resyncs listed nothing");
}

/// A seed whose 24 s gmail-404 schedule draws both kinds of history fault.
const GMAIL_404_SEED: u64 = 2;

/// Redis restarts (saving), in the middle of the traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarts_hold_p1_to_p6() {
    run(Scenario::RedisRestart, 12).await;
}

/// Duplicates, reordered and stormed notifications, poison messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_faults_hold_p1_to_p6() {
    run(Scenario::Pubsub, 13).await;
}

/// The stream cut: the proxy resets every worker ↔ emulator connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_cuts_hold_p1_to_p6() {
    run(Scenario::StreamCut, 14).await;
}

/// Graceful Redis Cluster failovers (three masters with a replica each): the replica of the
/// master serving a shard takes over mid-traffic; the workers follow the MOVED redirections
/// without a restart and lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_failovers_hold_p1_to_p6() {
    run(Scenario::RedisFailover, 15).await;
}

/// Masters killed while their replica was held behind: the commits of that window are lost
/// (the driver sees cursors move back across the kill), and the next syncs append those
/// changes again, once (P1, P2 hold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_lost_in_a_failover_are_synced_again_once() {
    let row = run(Scenario::RedisLossyKill, 16).await;
    assert!(injected(&row, "redis-lossy-kill") > 0, "{:?}", row.faults);
    assert!(
        row.writes_lost > 0,
        "no write was lost: the scenario did not test what it is for\n{:#?}",
        row.details
    );
}

/// The ack tap against the real client's wire format: a plain subscriber (Google's client,
/// through the tapped proxy) acks four messages the moment they arrive, the way a worker that
/// acked before committing would. The tap must see every delivery and ack, pass the ones a
/// worker may send (cursor covers it, unknown mailbox, quarantined) and count the two that
/// nothing covers as P4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_tap_counts_an_ack_nothing_covers_as_p4() {
    use gmail_sync_testbed::faults::acks::AckTap;
    use gmail_sync_testbed::faults::proxy::CutProxy;
    use gmail_sync_testbed::pubsub;
    use std::sync::Arc;

    let (bed, mailbox) = Bed::with_one_mailbox("acktap").await;
    let cursor = bed.cursor(&mailbox).await.unwrap().expect("registered");

    let tap = Arc::new(AckTap::new(bed.keys(), bed.connector().unwrap()));
    let upstream = bed.emulator.host_port().parse().unwrap();
    let proxy = CutProxy::start_tapped(upstream, tap.clone()).await.unwrap();
    let publisher = pubsub::publisher(&bed.emulator.endpoint(), &bed.topic.topic)
        .await
        .unwrap();
    let note = |email: &str, id: u64| format!(r#"{{"emailAddress":"{email}","historyId":{id}}}"#);
    // Covered by the cursor; ahead of it (P4); for no registered mailbox; poison, quarantined
    // first; poison, not quarantined (P4).
    for data in [
        note(&mailbox, cursor),
        note(&mailbox, cursor + 1_000),
        note("nobody@faults.example", 1),
    ] {
        pubsub::publish_raw(&publisher, data.as_bytes())
            .await
            .unwrap();
    }
    let quarantined = pubsub::publish_raw(&publisher, b"not json").await.unwrap();
    let mut con = bed.connect().await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg(bed.keys().quarantine())
        .arg("*")
        .arg("message_id")
        .arg(&quarantined)
        .query_async(&mut con)
        .await
        .unwrap();
    pubsub::publish_raw(&publisher, b"also not json")
        .await
        .unwrap();

    let endpoint = format!("http://{}", proxy.host_port());
    let got = pubsub::drain(
        &endpoint,
        &bed.topic.subscription,
        Duration::from_secs(3),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    // The five, and whatever the simulator published for the mailbox when it was registered
    // (covered by the baseline cursor).
    assert!(got.len() >= 5, "the subscriber got {got:?}");
    let n = got.len() as u64;
    // The subscriber's shutdown flushed its acks through the proxy before `drain` returned.
    let s = tap.summary(&proxy.open_lanes());
    proxy.shutdown().await;
    assert_eq!((s.deliveries, s.messages), (n, n), "{s:#?}");
    assert_eq!((s.acks, s.judged), (n, n), "{s:#?}");
    assert_eq!(s.early_acks, 2, "{s:#?}");
    assert_eq!(s.unknown_acks + s.undecoded + s.unjudged, 0, "{s:#?}");
    assert_eq!(s.held_by_live, 0, "{s:#?}");
    assert!(
        s.early
            .iter()
            .any(|e| e.history_id == Some(cursor + 1_000) && e.cursor == cursor),
        "{:#?}",
        s.early
    );
}
