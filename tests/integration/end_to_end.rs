//! The whole pipeline with a worker started exactly as `main` starts one, against the real
//! emulator and Redis and the Gmail simulator, checked against the simulator's ledger (I3 for
//! historyIds beyond 2^53).

use crate::harness::{Bed, BedOptions, CATCH_UP, emails, settle};
use gmail_sync_testbed::gmail::SimConfig;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_flows_end_to_end_and_matches_the_ledger_exactly() {
    let mut bed = Bed::start("e2e").await;
    let mailboxes = emails("e2e", 6);
    bed.add_mailboxes(&mailboxes).await;
    let worker = bed.start_worker().await;
    for round in 0..3 {
        for (i, m) in mailboxes.iter().enumerate() {
            let id = bed.sim.deliver(m, &["INBOX", "UNREAD"]);
            if (i + round) % 2 == 0 {
                bed.sim.remove_labels(m, &id, &["UNREAD"]);
                bed.sim.add_labels(m, &id, &["STARRED"]);
            }
            if i % 3 == 0 {
                bed.sim.delete(m, &id);
            }
        }
        bed.sim.burst(&mailboxes[0], 7);
        // Traffic pacing, not a wait for anything: spreads the rounds over the simulator's
        // 1 s notification folding, so the worker sees several notifications per mailbox.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    let written = bed.check_against_ledger().await.unwrap();
    assert!(written >= 60, "only {written} entries");
    let s = worker.snapshot();
    assert!(s.received > 0 && s.acked_after_sync > 0, "{s:?}");
    assert_eq!(s.quarantined + s.unknown_mailbox, 0, "{s:?}");
    worker.stop().await.unwrap();
}

/// I3 end to end with historyIds above 2^53 (and sent as JSON numbers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_ids_above_2_pow_53_sync_exactly() {
    let sim = SimConfig {
        initial_history_id: Some((1u64 << 53) + 1),
        notify_history_id_as_number: true,
        ..SimConfig::default()
    };
    let mut bed = Bed::with(
        "big",
        BedOptions {
            sim,
            ..BedOptions::default()
        },
    )
    .await;
    let mailboxes = emails("big", 3);
    bed.add_mailboxes(&mailboxes).await;
    assert!(bed.baselines.values().all(|b| *b > 1 << 53));
    let worker = bed.start_worker().await;
    for m in &mailboxes {
        for _ in 0..5 {
            bed.sim.deliver(m, &["INBOX"]);
        }
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    assert_eq!(bed.check_against_ledger().await.unwrap(), 15);
    worker.stop().await.unwrap();
}
