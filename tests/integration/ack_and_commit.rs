//! I1 ack after write, I2 atomic commit: nothing is acked before the commit that covers it,
//! and a refused commit writes nothing.

use crate::harness::{Bed, BedOptions, CATCH_UP, emails, eventually, settle};
use gmail_sync_testbed::bed::RedisChoice;
use gmail_sync_testbed::gmail::{Endpoint, FaultAction, FaultRule};
use std::time::{Duration, Instant};

/// Writes Redis refused for lack of memory so far (`INFO errorstats`).
async fn oom_errors(con: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("errorstats")
        .query_async(con)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("errorstat_OOM:count="))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// I1: Redis refuses the commit (out of memory) while a sync is in flight: nothing is acked and
/// nothing written; once Redis accepts writes again the retry writes everything exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_only_after_commit_when_redis_refuses_the_commit() {
    let mut bed = Bed::with(
        "ackafter",
        BedOptions {
            redis: RedisChoice::Own,
            ..BedOptions::default()
        },
    )
    .await;
    let mailbox = emails("ackafter", 1).remove(0);
    bed.add_mailboxes(std::slice::from_ref(&mailbox)).await;
    let worker = bed.start_worker().await;
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
    let oom_before = oom_errors(&mut admin).await;
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
    // The retries, too, are refused (their begin script cannot take the lease): wait until
    // Redis refused the commit and two retries, then check that none of them acked.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let refused = oom_errors(&mut admin).await;
        if refused >= oom_before + 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis refused only {} writes: {:?}",
            refused - oom_before,
            worker.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = worker.snapshot();
    assert_eq!(
        during.acked_after_sync, before.acked_after_sync,
        "acked while the commit failed: {during:?}"
    );
    // The refused retries count as failed syncs too, though what failed was their begin.
    assert!(
        eventually(Duration::from_secs(20), || worker
            .snapshot()
            .sync_errors_retryable
            >= before.sync_errors_retryable + 3)
        .await,
        "refused begins were not counted: {:?}",
        worker.snapshot()
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

/// I1: a notification whose change history does not show yet (Gmail may notify before
/// history.list catches up) is not acked; it is retried and acked once the cursor passes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_ahead_of_history_waits_for_it() {
    let (bed, mailbox) = Bed::with_one_mailbox("ahead").await;
    let worker = bed.start_worker().await;
    settle(&worker).await;
    let before = worker.snapshot();
    let calls = bed.calls_to(Endpoint::HistoryList);
    let ahead = bed.sim.current_history_id(&mailbox) + 30;
    bed.publish(format!(r#"{{"emailAddress":"{mailbox}","historyId":"{ahead}"}}"#).as_bytes())
        .await;
    // The worker syncs, finds history behind the notification, keeps it unacked and syncs
    // again later: a second history.list means the first sync's outcome was a retry.
    assert!(
        eventually(Duration::from_secs(20), || worker.snapshot().received
            > before.received)
        .await
    );
    assert!(
        eventually(Duration::from_secs(20), || bed
            .calls_to(Endpoint::HistoryList)
            >= calls + 2)
        .await,
        "no retry of the sync: {:?}",
        worker.snapshot()
    );
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
