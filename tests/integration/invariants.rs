//! End-to-end invariant tests: a worker started exactly as `main` starts one, against the real
//! emulator and Redis and the Gmail simulator, checked against the simulator's ledger.

use crate::harness::{Bed, BedOptions, emails, eventually};
use gmail_sync_testbed::gmail::{Endpoint, FaultAction, FaultRule, SimConfig};
use std::time::Duration;

const CATCH_UP: Duration = Duration::from_secs(60);

/// Waits until the worker has handled every delivery it received (acked or nacked) and nothing
/// new arrived for a while.
async fn settle(worker: &crate::harness::Worker) {
    let mut last = u64::MAX;
    let mut stable_rounds = 0;
    for _ in 0..400 {
        let s = worker.snapshot();
        let handled = s.acked_without_work
            + s.acked_after_sync
            + s.nacked
            + s.quarantined
            + s.unknown_mailbox
            + s.attention_mailbox;
        if s.received == handled && s.received == last {
            stable_rounds += 1;
            if stable_rounds >= 15 {
                return;
            }
        } else {
            stable_rounds = 0;
        }
        last = s.received;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_flows_end_to_end_and_matches_the_ledger_exactly() {
    let mut bed = Bed::start("e2e").await;
    let mailboxes = emails("e2e", 6);
    bed.add_mailboxes(&mailboxes).await;
    let worker = bed.start_worker();
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

/// I1: Redis refuses the commit (out of memory) while a sync is in flight: nothing is acked and
/// nothing written; once Redis accepts writes again the retry writes everything exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_only_after_commit_when_redis_refuses_the_commit() {
    let mut bed = Bed::with(
        "ackafter",
        BedOptions {
            own_redis: true,
            ..BedOptions::default()
        },
    )
    .await;
    let mailbox = emails("ackafter", 1).remove(0);
    bed.add_mailboxes(std::slice::from_ref(&mailbox)).await;
    let worker = bed.start_worker();
    // Let the watch's own notification settle first.
    settle(&worker).await;
    let before = worker.snapshot();
    // Slow history.list gives us time to make Redis refuse writes before the commit.
    bed.sim.inject(
        FaultRule::new(
            Some(Endpoint::HistoryList),
            FaultAction::Latency { millis: 1500 },
        )
        .times(1),
    );
    bed.sim.deliver(&mailbox, &["INBOX"]);
    let mut admin = bed.redis().await;
    // The sync holds the lease and waits for the slow history.list.
    assert!(eventually(Duration::from_secs(20), || bed.sim.in_flight(&mailbox) > 0).await);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut admin)
        .await
        .unwrap();
    // The commit fails; the sync is retried with backoff; nothing may be acked meanwhile.
    assert!(
        eventually(Duration::from_secs(20), || worker
            .snapshot()
            .sync_errors_retryable
            > before.sync_errors_retryable)
        .await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = worker.snapshot();
    assert_eq!(
        during.acked_after_sync, before.acked_after_sync,
        "acked while the commit failed: {during:?}"
    );
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        bed.entries().await.len(),
        0,
        "a refused commit wrote something"
    );
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    assert_eq!(bed.check_against_ledger().await.unwrap(), 1);
    assert!(worker.snapshot().acked_after_sync > before.acked_after_sync);
    worker.stop().await.unwrap();
}

/// I1 + I4: duplicates, redeliveries and out-of-order notifications write nothing twice and,
/// when the cursor already covers them, are acked without calling Gmail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_out_of_order_notifications_write_nothing_twice() {
    let (bed, mailbox) = Bed::with_one_mailbox("dups").await;
    let worker = bed.start_worker();
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

/// I5: Gmail answers 404 for an expired cursor → a resync entry, the listing, the cursor at the
/// profile historyId read first, and changes made during the listing still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_history_triggers_a_resync_that_loses_nothing() {
    let (bed, mailbox) = Bed::with_one_mailbox("resync").await;
    let worker = bed.start_worker();
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

/// I6: malformed messages are acked and quarantined with their bytes and a reason; a
/// notification for an unknown mailbox is acked and counted; none comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unknown_notifications_are_acked_and_recorded() {
    let bed = Bed::start("poison").await;
    let worker = bed.start_worker();
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
    let worker = bed.start_worker();
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

/// Gmail faults (429 with Retry-After, 403 rate limit, 5xx, an expired token) are retried and
/// nothing is lost or duplicated; a permanent 403 marks the mailbox and keeps the stream moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gmail_errors_are_retried_or_isolated() {
    let mut bed = Bed::start("faults").await;
    let mailboxes = emails("faults", 4);
    bed.add_mailboxes(&mailboxes).await;
    let worker = bed.start_worker();
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
    let healthy = BedSubset {
        bed: &bed,
        skip: &mailboxes[3],
    };
    healthy.wait().await;
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

struct BedSubset<'a> {
    bed: &'a Bed,
    skip: &'a str,
}

impl BedSubset<'_> {
    async fn wait(&self) {
        let store = self.bed.store().await;
        for _ in 0..600 {
            let mut all = true;
            for email in self
                .bed
                .baselines
                .keys()
                .filter(|e| e.as_str() != self.skip)
            {
                let m = gmail_sync::mailbox::Mailbox::parse(email).unwrap();
                let cursor = store.cursor(&m).await.unwrap().unwrap_or_default().get();
                all &= cursor >= self.bed.sim.current_history_id(email);
            }
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("mailboxes did not catch up");
    }
}

/// Redis Cluster: same pipeline, keys of one mailbox in one slot, exact ledger match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_a_three_master_redis_cluster() {
    let cluster = gmail_sync_testbed::redis_server::RedisCluster::start().expect("redis cluster");
    let mut bed = Bed::start("cluster").await;
    bed.redis_url = String::new();
    let nodes = cluster.nodes().join(",");
    bed.cluster_nodes = Some(nodes);
    let mailboxes = emails("cluster", 8);
    bed.add_mailboxes(&mailboxes).await;
    let worker = bed.start_worker();
    for m in &mailboxes {
        bed.sim.deliver(m, &["INBOX"]);
        bed.sim.burst(m, 3);
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    assert_eq!(bed.check_against_ledger().await.unwrap(), 32);
    worker.stop().await.unwrap();
}

/// I1: a notification whose change history does not show yet (Gmail may notify before
/// history.list catches up) is not acked; it is retried and acked once the cursor passes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_ahead_of_history_waits_for_it() {
    let (bed, mailbox) = Bed::with_one_mailbox("ahead").await;
    let worker = bed.start_worker();
    settle(&worker).await;
    let before = worker.snapshot();
    let ahead = bed.sim.current_history_id(&mailbox) + 30;
    bed.publish(format!(r#"{{"emailAddress":"{mailbox}","historyId":"{ahead}"}}"#).as_bytes())
        .await;
    // The worker syncs, finds history behind the notification, and keeps it unacked.
    assert!(
        eventually(Duration::from_secs(20), || worker.snapshot().received
            > before.received)
        .await
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = worker.snapshot();
    assert_eq!(
        s.acked_after_sync + s.acked_without_work,
        before.acked_after_sync + before.acked_without_work,
        "acked too early: {s:?}"
    );
    // History catches up (simulated changes raise the historyId past the notification's).
    while bed.sim.current_history_id(&mailbox) < ahead {
        bed.sim.deliver(&mailbox, &["INBOX"]);
    }
    bed.wait_caught_up(CATCH_UP).await.unwrap();
    settle(&worker).await;
    let s = worker.snapshot();
    assert_eq!(s.nacked, 0, "{s:?}");
    assert!(
        s.acked_after_sync + s.acked_without_work
            > before.acked_after_sync + before.acked_without_work
    );
    bed.check_against_ledger().await.unwrap();
    worker.stop().await.unwrap();
}

/// Shutdown: a sync in flight finishes within the shutdown timeout and its notification is
/// acked before `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_syncs_in_flight_finish() {
    let (bed, mailbox) = Bed::with_one_mailbox("drain").await;
    let worker = bed.start_worker_with(&[("GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS", "5")]);
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
    let worker = bed.start_worker_with(&[("GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS", "1")]);
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

/// Redis goes away in the middle of a sync (it shuts down, saving its data, and comes back on
/// the same port): nothing is acked while it is gone, the worker reconnects by itself, and the
/// change streams end exactly equal to the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_sync_loses_nothing() {
    let mut bed = Bed::with(
        "rrestart",
        BedOptions {
            own_redis: true,
            ..BedOptions::default()
        },
    )
    .await;
    let mailboxes = emails("rrestart", 3);
    bed.add_mailboxes(&mailboxes).await;
    let worker = bed.start_worker();
    settle(&worker).await;
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
    tokio::time::sleep(Duration::from_secs(2)).await;
    let redis = bed.own_redis.as_ref().unwrap();
    tokio::task::block_in_place(|| redis.restart()).unwrap();
    bed.wait_caught_up(Duration::from_secs(90)).await.unwrap();
    settle(&worker).await;
    assert_eq!(bed.check_against_ledger().await.unwrap(), 4);
    worker.stop().await.unwrap();
}
