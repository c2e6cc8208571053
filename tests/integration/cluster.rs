//! Redis Cluster: the same pipeline on three masters.

use crate::harness::{Bed, BedOptions, CATCH_UP, emails, settle};
use gmail_sync_testbed::bed::RedisChoice;

/// Redis Cluster: same pipeline, keys of one mailbox in one slot, exact ledger match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_a_three_master_redis_cluster() {
    let mut bed = Bed::with(
        "cluster",
        BedOptions {
            redis: RedisChoice::Cluster,
            ..BedOptions::default()
        },
    )
    .await;
    let mailboxes = emails("cluster", 8);
    bed.add_mailboxes(&mailboxes).await;
    let worker = bed.start_worker().await;
    for m in &mailboxes {
        bed.sim.deliver(m, &["INBOX"]);
        bed.sim.burst(m, 3);
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    assert_eq!(bed.check_against_ledger().await.unwrap(), 32);
    worker.stop().await.unwrap();
}
