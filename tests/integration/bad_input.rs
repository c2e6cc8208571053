//! I6 bad input: malformed notifications are quarantined and acked; unknown mailboxes are acked
//! and counted.

use crate::harness::{Bed, eventually, settle};
use std::time::Duration;

/// I6: malformed messages are acked and quarantined with their bytes and a reason; a
/// notification for an unknown mailbox is acked and counted; none comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unknown_notifications_are_acked_and_recorded() {
    let bed = Bed::start("poison").await;
    let worker = bed.start_worker().await;
    let oversize = format!(
        r#"{{"emailAddress":"a@example.com","historyId":"1","pad":"{}"}}"#,
        "x".repeat(5000)
    );
    let bad: Vec<Vec<u8>> = vec![
        b"not json at all".to_vec(),
        br#"{"emailAddress":"a@example.com"}"#.to_vec(),
        br#"{"emailAddress":"not-an-address","historyId":"5"}"#.to_vec(),
        br#"{"emailAddress":"a@example.com","historyId":"-5"}"#.to_vec(),
        oversize.into_bytes(),
        vec![0xff, 0xfe, 0x00, 0x01],
    ];
    for payload in &bad {
        bed.publish(payload).await;
    }
    bed.publish(br#"{"emailAddress":"stranger@example.com","historyId":"77"}"#)
        .await;
    assert!(
        eventually(Duration::from_secs(20), || {
            let s = worker.snapshot();
            s.quarantined == bad.len() as u64 && s.unknown_mailbox == 1
        })
        .await,
        "{:?}",
        worker.snapshot()
    );
    settle(&worker).await;
    let s = worker.snapshot();
    assert_eq!(
        s.received,
        bad.len() as u64 + 1,
        "something was redelivered: {s:?}"
    );
    assert_eq!(s.nacked, 0);

    let mut con = bed.redis().await;
    let key = bed.store().await.keys().quarantine();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(reply.ids.len(), bad.len());
    let mut stored: Vec<Vec<u8>> = Vec::new();
    for id in &reply.ids {
        let reason: String = redis::from_redis_value(id.map["reason"].clone()).unwrap();
        assert!(!reason.is_empty());
        let message_id: String = redis::from_redis_value(id.map["message_id"].clone()).unwrap();
        assert!(!message_id.is_empty());
        stored.push(redis::from_redis_value(id.map["data"].clone()).unwrap());
    }
    let mut expected = bad.clone();
    expected.sort();
    stored.sort();
    assert_eq!(stored, expected, "the original bytes are kept");
    assert!(bed.entries().await.is_empty());
    worker.stop().await.unwrap();
}
