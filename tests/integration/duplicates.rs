//! I4 no duplicate: repeated, redelivered and out-of-order notifications.

use crate::harness::{Bed, CATCH_UP, eventually, settle};
use gmail_sync_testbed::gmail::Endpoint;
use std::time::Duration;

/// I1 + I4: duplicates, redeliveries and out-of-order notifications write nothing twice and,
/// when the cursor already covers them, are acked without calling Gmail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_out_of_order_notifications_write_nothing_twice() {
    let (bed, mailbox) = Bed::with_one_mailbox("dups").await;
    let worker = bed.start_worker().await;
    for _ in 0..4 {
        bed.sim.deliver(&mailbox, &["INBOX"]);
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    let calls = bed.calls_to(Endpoint::HistoryList);
    let before = worker.snapshot();
    let current = bed.sim.current_history_id(&mailbox);
    let baseline = bed.baselines[&mailbox];
    for payload in [
        format!(r#"{{"emailAddress":"{mailbox}","historyId":"{current}"}}"#),
        format!(r#"{{"emailAddress":"{mailbox}","historyId":{current}}}"#),
        format!(
            r#"{{"emailAddress":"{}","historyId":"{}"}}"#,
            mailbox.to_uppercase(),
            current - 1
        ),
        format!(r#"{{"emailAddress":"{mailbox}","historyId":"{baseline}"}}"#),
    ] {
        bed.publish(payload.as_bytes()).await;
    }
    assert!(
        eventually(Duration::from_secs(20), || worker
            .snapshot()
            .acked_without_work
            >= before.acked_without_work + 4)
        .await
    );
    settle(&worker).await;
    assert_eq!(
        bed.calls_to(Endpoint::HistoryList),
        calls,
        "covered notifications must not call Gmail"
    );
    bed.check_against_ledger().await.unwrap();
    worker.stop().await.unwrap();
}
