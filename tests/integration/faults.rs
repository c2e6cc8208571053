//! The fault suite's reduced set (README "Fault suite"): a few scenarios, fixed seeds, about
//! half a minute of traffic each, every property P1–P6 held. The long runs are
//! `cargo run --release --example faults`.

use crate::harness::{Bed, BedOptions};
use gmail_sync_testbed::faults::driver::{self, RunOptions, WorkerCommand};
use gmail_sync_testbed::faults::{self, Scenario};
use std::time::Duration;

/// Traffic per scenario: long enough for several faults of each kind (the first comes 4 s in,
/// the last stops 6 s before the end).
const TRAFFIC: Duration = Duration::from_secs(24);

async fn run(scenario: Scenario, seed: u64) {
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
}

/// SIGKILL of the worker syncing a mailbox (before its commit) and of random workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_loops_hold_p1_to_p6() {
    run(Scenario::Kill, 11).await;
}

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
