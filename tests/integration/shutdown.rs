//! Shutdown: syncs in flight finish within the timeout; what cannot finish is cancelled and its
//! notification given back, and `run` still returns Ok.

use crate::harness::{Bed, eventually, settle};
use gmail_sync_testbed::gmail::{Endpoint, FaultAction, FaultRule};
use std::time::Duration;

/// Shutdown: a sync in flight finishes within the shutdown timeout and its notification is
/// acked before `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_syncs_in_flight_finish() {
    let (bed, mailbox) = Bed::with_one_mailbox("drain").await;
    let worker = bed
        .start_worker_with(&[("GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS", "5")])
        .await;
    settle(&worker).await;
    let before = worker.snapshot();
    bed.sim.inject(
        FaultRule::new(
            Some(Endpoint::HistoryList),
            FaultAction::Latency { millis: 1500 },
        )
        .times(1),
    );
    bed.sim.deliver(&mailbox, &["INBOX"]);
    assert!(eventually(Duration::from_secs(20), || bed.sim.in_flight(&mailbox) > 0).await);
    let counters = worker.counters.clone();
    worker.stop().await.unwrap();
    let s = counters.snapshot();
    assert_eq!(s.acked_after_sync, before.acked_after_sync + 1, "{s:?}");
    assert_eq!(s.nacked, 0);
    assert_eq!(bed.check_against_ledger().await.unwrap(), 1);
}

/// Shutdown: a sync that cannot finish (Gmail hangs) is cancelled at the timeout, its
/// notification nacked, its lease released, nothing written, and `run` still returns Ok
/// (exit code 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_what_does_not_finish_in_time() {
    let (bed, mailbox) = Bed::with_one_mailbox("cutoff").await;
    let worker = bed
        .start_worker_with(&[("GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS", "1")])
        .await;
    bed.sim
        .inject(FaultRule::new(Some(Endpoint::HistoryList), FaultAction::Hang).times(1));
    bed.sim.deliver(&mailbox, &["INBOX"]);
    assert!(eventually(Duration::from_secs(30), || bed.sim.in_flight(&mailbox) > 0).await);
    let counters = worker.counters.clone();
    worker.stop().await.unwrap();
    assert!(counters.snapshot().nacked >= 1, "{:?}", counters.snapshot());
    let leases = bed.lease_keys().await;
    assert!(leases.is_empty(), "{leases:?}");
    assert!(
        bed.entries().await.is_empty(),
        "the cancelled sync wrote something"
    );
}
