//! Message metadata in the change stream (GMAIL_SYNC_ENRICHMENT): every new message's entry
//! carries the simulator's headers for it, fetched through the batch endpoint before the
//! commit; deleted messages are `gone`; failed parts are retried alone; `off` costs nothing.

use crate::harness::{Bed, CATCH_UP, emails, eventually, settle};
use gmail_sync_testbed::gmail::{CallEntry, Endpoint, FaultAction, FaultRule};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

/// GMAIL_SYNC_ENRICHMENT_HEADERS' default.
const DEFAULT_HEADERS: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
];

/// The parts of each batch for `email`, in batch order: batch number → the parts' statuses.
fn batches_of(bed: &Bed, email: &str) -> BTreeMap<u64, Vec<u16>> {
    let mut out: BTreeMap<u64, Vec<u16>> = BTreeMap::new();
    for c in bed.sim.ledger().calls_to_for(Endpoint::MessagesGet, email) {
        let batch = c.batch.expect("messages.get only in batches");
        out.entry(batch).or_default().push(c.status);
    }
    out
}

fn successful(calls: &[&CallEntry]) -> usize {
    calls.iter().filter(|c| c.status == 200).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_new_message_carries_the_simulators_metadata() {
    let mut bed = Bed::start("meta").await;
    let mailboxes = emails("meta", 3);
    bed.add_mailboxes(&mailboxes).await;
    // Before the worker starts: its first sync of mailbox 0 reads these 60 in one page, and
    // fetches them in more than one batch.
    for _ in 0..60 {
        bed.sim.deliver(&mailboxes[0], &["INBOX"]);
    }
    let worker = bed.start_worker().await;
    let mut delivered = 60;
    for round in 0..3 {
        for m in &mailboxes {
            let root = bed.sim.deliver(m, &["INBOX", "UNREAD"]);
            bed.sim.reply(m, &root, &["INBOX"]);
            bed.sim.add_labels(m, &root, &["STARRED"]);
            delivered += 2;
            if round == 1 {
                bed.sim.delete(m, &root);
            }
        }
        // Traffic pacing across the simulator's 1 s notification folding (several syncs).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    bed.check_against_ledger().await.unwrap();
    let found = bed.check_metadata(DEFAULT_HEADERS).await.unwrap();
    // Every delivery has its entry: with metadata, or `gone` when its deletion came first.
    assert_eq!(found.enriched + found.gone, delivered, "{found:?}");

    let entries = bed.entries().await;
    let added: Vec<_> = entries
        .iter()
        .filter(|e| e.get("kind") == "message_added" && e.get("gone").is_empty())
        .collect();
    assert!(
        added
            .iter()
            .any(|e| !e.get("header_in_reply_to").is_empty())
    );
    assert!(added.iter().any(|e| !e.fields.contains_key("header_cc")));
    assert!(
        added
            .iter()
            .all(|e| !e.fields.contains_key("header_received"))
    );
    // One successful messages.get per new message the sync saw alive, never two; batches of at
    // most 50.
    let ledger = bed.sim.ledger();
    for m in &mailboxes {
        let gets = ledger.calls_to_for(Endpoint::MessagesGet, m);
        let alive = entries
            .iter()
            .filter(|e| {
                e.get("mailbox") == m.as_str()
                    && e.get("kind") == "message_added"
                    && e.get("gone").is_empty()
            })
            .count();
        assert_eq!(successful(&gets), alive, "{m}");
        assert!(batches_of(&bed, m).values().all(|parts| parts.len() <= 50));
    }
    // The first sync of mailbox 0 had at least the 60 to fetch (and whatever round 0 added
    // meanwhile): a full batch of 50 first, the rest after.
    let first = batches_of(&bed, &mailboxes[0]);
    let sizes: Vec<usize> = first.values().map(Vec::len).collect();
    assert_eq!(sizes[0], 50, "{sizes:?}");
    assert!(sizes[1] >= 10, "{sizes:?}");
    worker.stop().await.unwrap();
}

/// A message deleted after `history.list` listed it and before its part was answered: written
/// `gone`, then its deletion; nothing lost, nothing retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_deleted_before_its_fetch_is_written_gone() {
    let (bed, mailbox) = Bed::with_one_mailbox("gone").await;
    let worker = bed.start_worker().await;
    bed.sim.inject(
        FaultRule::new(
            Some(Endpoint::MessagesGet),
            FaultAction::latency(Duration::from_millis(1500)),
        )
        .for_mailbox(&mailbox)
        .times(1),
    );
    let delivered_at = SystemTime::now();
    let id = bed.sim.deliver(&mailbox, &["INBOX"]);
    // history.list has answered (after the delivery) and the part is being held by its latency.
    let listed = || {
        bed.sim
            .ledger()
            .calls_to_for(Endpoint::HistoryList, &mailbox)
            .iter()
            .any(|c| c.status == 200 && c.started >= delivered_at)
    };
    assert!(
        eventually(Duration::from_secs(30), || listed()
            && bed.sim.in_flight(&mailbox) > 0)
        .await,
        "the part never came"
    );
    bed.sim.delete(&mailbox, &id);
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    bed.check_against_ledger().await.unwrap();
    let found = bed.check_metadata(DEFAULT_HEADERS).await.unwrap();
    assert_eq!((found.enriched, found.gone), (0, 1));
    let kinds: Vec<(String, String)> = bed
        .entries()
        .await
        .iter()
        .map(|e| (e.get("kind").to_string(), e.get("gone").to_string()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("message_added".to_string(), "1".to_string()),
            ("message_deleted".to_string(), String::new())
        ]
    );
    let gets = bed
        .sim
        .ledger()
        .calls_to_for(Endpoint::MessagesGet, &mailbox)
        .len();
    assert_eq!(gets, 1, "a 404 part is not retried");
    worker.stop().await.unwrap();
}

/// Parts answered 429 and 500 are re-sent alone; the others are not fetched twice. (With the
/// quota governor off: on, a rate-limited part defers the whole sync instead of sleeping inside
/// it, and the page's part is fetched again then; see `quota`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_parts_are_retried_alone() {
    let (bed, mailbox) = Bed::with_one_mailbox("parts").await;
    // Delivered before the worker starts: one sync reads all five, one batch of five parts.
    for _ in 0..5 {
        bed.sim.deliver(&mailbox, &["INBOX"]);
    }
    for (status, times) in [(429, 2), (500, 1)] {
        bed.sim.inject(
            FaultRule::new(Some(Endpoint::MessagesGet), FaultAction::status(status))
                .for_mailbox(&mailbox)
                .times(times),
        );
    }
    let worker = bed
        .start_worker_with(&[("GMAIL_SYNC_QUOTA_GOVERNOR", "off")])
        .await;
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    bed.check_against_ledger().await.unwrap();
    let found = bed.check_metadata(DEFAULT_HEADERS).await.unwrap();
    assert_eq!((found.enriched, found.gone), (5, 0));
    let batches: Vec<Vec<u16>> = batches_of(&bed, &mailbox).into_values().collect();
    assert_eq!(
        batches,
        [vec![429, 429, 500, 200, 200], vec![200, 200, 200]],
        "the second batch re-sends the three failed parts only"
    );
    let s = worker.snapshot();
    assert_eq!(s.sync_errors_retryable, 0, "retried inside the sync: {s:?}");
    worker.stop().await.unwrap();
}

/// `off`: ids and labels only, and not a single messages.get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrichment_off_makes_no_messages_get() {
    let (bed, mailbox) = Bed::with_one_mailbox("enroff").await;
    let worker = bed
        .start_worker_with(&[("GMAIL_SYNC_ENRICHMENT", "off")])
        .await;
    for _ in 0..3 {
        bed.sim.deliver(&mailbox, &["INBOX"]);
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    bed.check_against_ledger().await.unwrap();
    assert_eq!(bed.calls_to(Endpoint::MessagesGet), 0);
    assert_eq!(bed.calls_to(Endpoint::Batch), 0);
    let entries = bed.entries().await;
    assert!(
        entries
            .iter()
            .all(|e| e.fields.keys().all(|k| !k.starts_with("header")
                && !["snippet", "size_estimate", "internal_date", "gone"].contains(&k.as_str())))
    );
    worker.stop().await.unwrap();
}

/// `minimal`: snippet, size and date without headers, for the resync listing too (within its
/// bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimal_enriches_a_resync_listing_without_headers() {
    let (bed, mailbox) = Bed::with_one_mailbox("minimal").await;
    let worker = bed
        .start_worker_with(&[
            ("GMAIL_SYNC_ENRICHMENT", "minimal"),
            ("GMAIL_SYNC_RESYNC_MAX_MESSAGES", "3"),
        ])
        .await;
    for _ in 0..4 {
        bed.sim.deliver(&mailbox, &["INBOX"]);
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    let gets_before = bed.calls_to(Endpoint::MessagesGet);
    bed.sim.deliver(&mailbox, &["INBOX"]);
    bed.sim.expire_history(&mailbox);
    bed.sim.touch(&mailbox);
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    let found = bed.check_metadata(&[]).await.unwrap();
    let entries = bed.entries().await;
    let listed = entries
        .iter()
        .filter(|e| e.get("kind") == "message_listed")
        .count();
    assert_eq!(listed, 3, "the listing's bound");
    assert_eq!(found.enriched, 4 + listed);
    assert_eq!(
        bed.calls_to(Endpoint::MessagesGet) - gets_before,
        listed,
        "one fetch per listed message, within the listing's bound"
    );
    worker.stop().await.unwrap();
}
