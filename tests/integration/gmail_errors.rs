//! Gmail's errors: rate limits, 5xx and expired tokens are retried without loss or duplicate;
//! a permanent error isolates its mailbox.

use crate::harness::{Bed, CATCH_UP, emails, eventually, settle};
use gmail_sync_testbed::gmail::{Endpoint, FaultAction, FaultRule};
use std::time::Duration;

/// Gmail faults (429 with Retry-After, 403 rate limit, 5xx, an expired token) are retried and
/// nothing is lost or duplicated; a permanent 403 marks the mailbox and keeps the stream moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gmail_errors_are_retried_or_isolated() {
    let mut bed = Bed::start("faults").await;
    let mailboxes = emails("faults", 4);
    bed.add_mailboxes(&mailboxes).await;
    let worker = bed.start_worker().await;
    let status = |status: u16, reason: &str, retry_after: Option<u64>| FaultAction::Status {
        status,
        reason: Some(reason.to_string()),
        message: None,
        domain: None,
        retry_after,
    };
    bed.sim.inject(
        FaultRule::new(
            Some(Endpoint::HistoryList),
            status(429, "rateLimitExceeded", Some(1)),
        )
        .for_mailbox(&mailboxes[0])
        .times(2),
    );
    bed.sim.inject(
        FaultRule::new(
            Some(Endpoint::HistoryList),
            status(403, "userRateLimitExceeded", None),
        )
        .for_mailbox(&mailboxes[1])
        .times(2),
    );
    bed.sim.inject(
        FaultRule::new(
            Some(Endpoint::HistoryList),
            status(503, "backendError", None),
        )
        .for_mailbox(&mailboxes[2])
        .times(3),
    );
    bed.sim.inject(
        FaultRule::new(Some(Endpoint::HistoryList), FaultAction::ExpiredToken)
            .for_mailbox(&mailboxes[2])
            .times(1),
    );
    for m in &mailboxes[..3] {
        bed.sim.deliver(m, &["INBOX"]);
        bed.sim.deliver(m, &["INBOX"]);
    }
    // Mailbox 3: permanent failure.
    bed.sim.inject(
        FaultRule::new(
            Some(Endpoint::HistoryList),
            status(403, "domainPolicy", None),
        )
        .for_mailbox(&mailboxes[3]),
    );
    bed.sim.deliver(&mailboxes[3], &["INBOX"]);
    let store = bed.store().await;
    // The healthy mailboxes catch up.
    bed.wait_caught_up_of(&mailboxes[..3], CATCH_UP)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || worker
            .snapshot()
            .attention_mailbox
            >= 1)
        .await,
        "{:?}",
        worker.snapshot()
    );
    settle(&worker).await;
    let s = worker.snapshot();
    assert!(
        s.gmail_rate_limited >= 4 && s.gmail_transient_errors >= 3,
        "{s:?}"
    );
    assert_eq!(s.sync_errors_permanent, 1, "{s:?}");
    // The disabled mailbox kept its cursor and wrote nothing; the others match the ledger.
    let m3 = gmail_sync::mailbox::Mailbox::parse(&mailboxes[3]).unwrap();
    assert_eq!(
        store.cursor(&m3).await.unwrap().unwrap().get(),
        bed.baselines[&mailboxes[3]]
    );
    bed.baselines.remove(&mailboxes[3]);
    bed.check_against_ledger().await.unwrap();
    worker.stop().await.unwrap();
}
