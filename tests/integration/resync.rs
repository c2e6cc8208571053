//! I5 no lost change across a full resync (Gmail answers 404 for an expired cursor).

use crate::harness::{Bed, CATCH_UP, eventually, settle};
use gmail_sync_testbed::gmail::{Endpoint, FaultAction, FaultRule};
use std::time::Duration;

/// I5: Gmail answers 404 for an expired cursor → a resync entry, the listing, the cursor at the
/// profile historyId read first, and changes made during the listing still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_history_triggers_a_resync_that_loses_nothing() {
    let (bed, mailbox) = Bed::with_one_mailbox("resync").await;
    let worker = bed.start_worker().await;
    for _ in 0..3 {
        bed.sim.deliver(&mailbox, &["INBOX"]);
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    let before_expiry = bed.entries().await.len();
    assert_eq!(before_expiry, 3);

    // The listing is slow; a message delivered during it must come through history afterwards.
    bed.sim.inject(
        FaultRule::new(
            Some(Endpoint::MessagesList),
            FaultAction::Latency { millis: 1500 },
        )
        .times(1),
    );
    // A change, then Gmail forgets all history up to it before the worker could read it: the
    // worker's cursor is now older than the horizon and history.list answers 404.
    let listed_before = bed.sim.deliver(&mailbox, &["INBOX"]);
    bed.sim.expire_history(&mailbox);
    assert!(
        eventually(Duration::from_secs(30), || bed
            .calls_to(Endpoint::GetProfile)
            > 0)
        .await,
        "no resync started"
    );
    let during = bed.sim.deliver(&mailbox, &["INBOX", "IMPORTANT"]);
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;

    let entries = bed.entries().await;
    let resync_at = entries
        .iter()
        .position(|e| e.get("kind") == "resync")
        .expect("a resync entry");
    assert_eq!(
        resync_at, before_expiry,
        "entries before the resync are the old ones"
    );
    let resync = &entries[resync_at];
    let listed: Vec<&str> = entries[resync_at + 1..]
        .iter()
        .take_while(|e| e.get("kind") == "message_listed")
        .map(|e| e.get("message_id"))
        .collect();
    assert_eq!(resync.get("listed"), listed.len().to_string());
    assert!(
        listed.contains(&listed_before.as_str()),
        "the message delivered before the resync is listed"
    );
    let live = bed.sim.messages(&mailbox);
    for id in &listed {
        assert!(
            live.contains_key(*id),
            "listed a message that does not exist: {id}"
        );
    }
    // Every live message is either listed or arrives as an entry after the resync.
    let after: Vec<&str> = entries[resync_at + 1 + listed.len()..]
        .iter()
        .filter(|e| e.get("kind") == "message_added")
        .map(|e| e.get("message_id"))
        .collect();
    for id in live.keys() {
        assert!(
            listed.contains(&id.as_str()) || after.contains(&id.as_str()),
            "lost message {id}"
        );
    }
    assert!(listed.contains(&during.as_str()) || after.contains(&during.as_str()));
    let h0: u64 = resync.get("history_id").parse().unwrap();
    assert!(h0 < bed.sim.current_history_id(&mailbox) || after.is_empty());
    assert_eq!(worker.snapshot().resyncs, 1);
    worker.stop().await.unwrap();
}
