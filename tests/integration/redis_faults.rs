//! Redis going away under a running worker.

use crate::harness::{Bed, BedOptions, emails, eventually, settle};
use gmail_sync_testbed::bed::RedisChoice;
use gmail_sync_testbed::gmail::{Endpoint, FaultAction, FaultRule};
use std::time::Duration;

/// Redis goes away in the middle of a sync (it shuts down, saving its data, and comes back on
/// the same port): nothing is acked while it is gone, the worker reconnects by itself, and the
/// change streams end exactly equal to the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_sync_loses_nothing() {
    let mut bed = Bed::with(
        "rrestart",
        BedOptions {
            redis: RedisChoice::Own,
            ..BedOptions::default()
        },
    )
    .await;
    let mailboxes = emails("rrestart", 3);
    bed.add_mailboxes(&mailboxes).await;
    let worker = bed.start_worker().await;
    settle(&worker).await;
    let before = worker.snapshot();
    bed.sim.inject(
        FaultRule::new(
            Some(Endpoint::HistoryList),
            FaultAction::Latency { millis: 1500 },
        )
        .for_mailbox(&mailboxes[0])
        .times(1),
    );
    bed.sim.deliver(&mailboxes[0], &["INBOX"]);
    assert!(
        eventually(Duration::from_secs(20), || bed.sim.in_flight(&mailboxes[0])
            > 0)
        .await
    );
    // SHUTDOWN SAVE writes dump.rdb even without save points; the restart loads it.
    let mut admin = bed.redis().await;
    let _ = redis::cmd("SHUTDOWN")
        .arg("SAVE")
        .query_async::<()>(&mut admin)
        .await;
    for m in &mailboxes {
        bed.sim.deliver(m, &["INBOX"]);
    }
    // Redis stays away until the worker has run into the outage: the sync in flight cannot
    // commit, so it ends with a retryable error.
    assert!(
        eventually(Duration::from_secs(30), || worker
            .snapshot()
            .sync_errors_retryable
            > before.sync_errors_retryable)
        .await,
        "the worker did not notice Redis was gone: {:?}",
        worker.snapshot()
    );
    let acked = worker.snapshot();
    assert_eq!(
        acked.acked_after_sync, before.acked_after_sync,
        "acked while Redis was gone: {acked:?}"
    );
    let redis = bed.redis.server().expect("the bed's own redis-server");
    tokio::task::block_in_place(|| redis.restart()).unwrap();
    bed.wait_caught_up(Duration::from_secs(90)).await.unwrap();
    settle(&worker).await;
    assert_eq!(bed.check_against_ledger().await.unwrap(), 4);
    worker.stop().await.unwrap();
}
