//! I6 bad input: malformed notifications are quarantined (bounded copies) and acked; unknown
//! mailboxes are acked and counted; the quarantine stream stays under its byte cap; a historyId
//! Gmail's history never reaches is quarantined after GMAIL_SYNC_HISTORY_LAG_SECS and costs no
//! Gmail call after that, while one that history reaches within the lag syncs.

use crate::harness::{Bed, emails, eventually, settle};
use gmail_sync::store::quarantine::{
    QUARANTINE_DATA_BYTES, QUARANTINE_ENTRY_MEMORY, quarantine_memory_cap,
};
use gmail_sync_testbed::gmail::Endpoint;
use gmail_sync_testbed::pubsub;
use std::time::{Duration, Instant};

/// Every entry of the quarantine stream, as field maps.
async fn quarantine_entries(bed: &Bed) -> Vec<std::collections::HashMap<String, redis::Value>> {
    let mut con = bed.redis().await;
    let key = bed.store().await.keys().quarantine().to_string();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await
        .unwrap();
    reply.ids.into_iter().map(|id| id.map).collect()
}

fn field<T: redis::FromRedisValue>(
    entry: &std::collections::HashMap<String, redis::Value>,
    name: &str,
) -> T {
    redis::from_redis_value(entry[name].clone()).unwrap()
}

/// I6: malformed messages are acked and quarantined with their bytes (an oversize one with its
/// first bytes only, and its length) and a reason; a notification for an unknown mailbox is
/// acked and counted; none comes back.
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

    let entries = quarantine_entries(&bed).await;
    assert_eq!(entries.len(), bad.len());
    let mut stored: Vec<(Vec<u8>, usize)> = Vec::new();
    for e in &entries {
        let reason: String = field(e, "reason");
        assert!(!reason.is_empty());
        let message_id: String = field(e, "message_id");
        assert!(!message_id.is_empty());
        let data: Vec<u8> = field(e, "data");
        let data_len: usize = field(e, "data_len");
        if data_len > QUARANTINE_DATA_BYTES {
            assert!(reason.contains("exceeds 4096"), "{reason}");
        }
        stored.push((data, data_len));
    }
    // Short payloads are kept whole; the oversize one keeps its first 256 bytes and its length.
    let mut expected: Vec<(Vec<u8>, usize)> = bad
        .iter()
        .map(|p| (p[..p.len().min(QUARANTINE_DATA_BYTES)].to_vec(), p.len()))
        .collect();
    expected.sort();
    stored.sort();
    assert_eq!(stored, expected, "the first bytes and the length are kept");
    assert!(
        stored
            .iter()
            .any(|(d, n)| *n > 5000 && d.len() == QUARANTINE_DATA_BYTES)
    );
    assert!(bed.entries().await.is_empty());
    worker.stop().await.unwrap();
}

/// A flood of large and malformed payloads: every one is acked and quarantined, and the stream,
/// trimmed to GMAIL_SYNC_QUARANTINE_MAXLEN entries of bounded size, stays under the stated
/// memory cap (`MEMORY USAGE`), far below what the payloads themselves weigh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_payloads_keeps_the_quarantine_stream_under_its_byte_cap() {
    const MAXLEN: u64 = 100;
    const FLOOD: usize = 400;
    let bed = Bed::start("flood").await;
    let maxlen = MAXLEN.to_string();
    let worker = bed
        .start_worker_with(&[("GMAIL_SYNC_QUARANTINE_MAXLEN", &maxlen)])
        .await;
    let publisher = pubsub::publisher(&bed.emulator.endpoint(), &bed.topic.topic)
        .await
        .unwrap();
    let mut published_bytes = 0;
    for i in 0..FLOOD {
        // Worst cases for each bounded field: a large payload, a reason quoting a bad value,
        // multi-byte characters at the cuts.
        let payload = match i % 3 {
            0 => format!("{i}{}", "é".repeat(8 * 1024)).into_bytes(),
            1 => format!(
                r#"{{"emailAddress":"a@example.com","historyId":"{}"}}"#,
                "9".repeat(3000)
            )
            .into_bytes(),
            _ => format!(
                r#"{{"emailAddress":"{}","historyId":"1"}}"#,
                "ü".repeat(1500)
            )
            .into_bytes(),
        };
        published_bytes += payload.len();
        pubsub::publish_raw(&publisher, &payload).await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(60), || worker.snapshot().quarantined
            == FLOOD as u64)
        .await,
        "{:?}",
        worker.snapshot()
    );
    settle(&worker).await;
    let s = worker.snapshot();
    assert_eq!((s.received, s.nacked), (FLOOD as u64, 0), "{s:?}");

    let mut con = bed.redis().await;
    let key = bed.store().await.keys().quarantine().to_string();
    let len: u64 = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!((MAXLEN..=MAXLEN + 100).contains(&len), "XLEN {len}");
    let memory: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&key)
        .arg("SAMPLES")
        .arg(0)
        .query_async(&mut con)
        .await
        .unwrap();
    let cap = quarantine_memory_cap(MAXLEN);
    eprintln!(
        "quarantine stream: {len} entries, {memory} B ({} B per entry); cap {cap} B; \
         {published_bytes} B published",
        memory / len
    );
    assert!(memory <= cap, "{memory} B > cap {cap} B");
    assert!(
        memory * 10 < published_bytes as u64,
        "{memory} B is not bounded"
    );
    for e in quarantine_entries(&bed).await {
        let size: usize = e
            .iter()
            .map(|(k, v)| {
                k.len()
                    + match v {
                        redis::Value::BulkString(b) => b.len(),
                        _ => 0,
                    }
            })
            .sum();
        assert!(
            size as u64 <= QUARANTINE_ENTRY_MEMORY,
            "an entry of {size} bytes"
        );
    }
    worker.stop().await.unwrap();
}

/// A historyId Gmail never reaches (forged) is re-read for GMAIL_SYNC_HISTORY_LAG_SECS from its
/// publish time, then quarantined with the reason and acked; after that it costs no Gmail call
/// and does not come back. A notification that history reaches within the lag (history lagging
/// the notification) is synced and acked as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_history_id_is_quarantined_after_the_lag_and_costs_nothing_more() {
    const LAG: Duration = Duration::from_secs(3);
    let mut bed = Bed::start("ahead").await;
    let mailboxes = emails("ahead", 2);
    bed.add_mailboxes(&mailboxes).await;
    let (forged_for, genuine_for) = (&mailboxes[0], &mailboxes[1]);
    let lag = LAG.as_secs().to_string();
    let worker = bed
        .start_worker_with(&[("GMAIL_SYNC_HISTORY_LAG_SECS", &lag)])
        .await;
    settle(&worker).await;
    let before = worker.snapshot();

    // Genuine: the notification is ahead of history (the next change's historyId), and the
    // change shows up in history a second later, within the lag.
    let next = bed.sim.current_history_id(genuine_for) + 1;
    bed.publish(format!(r#"{{"emailAddress":"{genuine_for}","historyId":"{next}"}}"#).as_bytes())
        .await;
    // Forged: far ahead of anything the mailbox will reach.
    let forged = bed.sim.current_history_id(forged_for) + 1_000_000_000;
    let payload = format!(r#"{{"emailAddress":"{forged_for}","historyId":"{forged}"}}"#);
    let published = Instant::now();
    bed.publish(payload.as_bytes()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    bed.sim.deliver(genuine_for, &["INBOX"]);

    assert!(
        eventually(Duration::from_secs(30), || worker
            .snapshot()
            .quarantined_history_ahead
            == 1)
        .await,
        "{:?}",
        worker.snapshot()
    );
    let waited = published.elapsed();
    assert!(
        waited >= LAG,
        "quarantined after {waited:?}, before the lag"
    );
    let history_calls = |email: &str| {
        bed.sim
            .ledger()
            .calls_to_for(Endpoint::HistoryList, email)
            .len()
    };
    let calls_then = history_calls(forged_for);
    assert!(
        calls_then >= 2,
        "history was re-read within the lag: {calls_then}"
    );

    bed.wait_caught_up(Duration::from_secs(30)).await.unwrap();
    settle(&worker).await;
    // Well past the lag and several backoff steps: no Gmail call for the forged notification.
    tokio::time::sleep(LAG * 3).await;
    assert_eq!(
        history_calls(forged_for),
        calls_then,
        "Gmail was called again for it"
    );
    let s = worker.snapshot();
    assert_eq!(s.quarantined - before.quarantined, 1, "{s:?}");
    assert_eq!(s.nacked, before.nacked, "nothing nacked: {s:?}");
    // The forged one did not come back; the genuine one and the simulator's own notification
    // for the delivery were acked after the sync.
    assert!(
        s.acked_after_sync + s.acked_without_work
            >= before.acked_after_sync + before.acked_without_work + 2,
        "{s:?}"
    );
    assert_eq!(s.received, before.received + 3, "{s:?}");

    let entries = quarantine_entries(&bed).await;
    assert_eq!(entries.len(), 1);
    let reason: String = field(&entries[0], "reason");
    assert!(
        reason.starts_with(&format!("historyId {forged} never reached")),
        "{reason}"
    );
    let data: Vec<u8> = field(&entries[0], "data");
    assert_eq!(data, payload.as_bytes());
    bed.check_against_ledger().await.unwrap();
    worker.stop().await.unwrap();
}
