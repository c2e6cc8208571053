//! The mailbox lifecycle against the real parts: watch renewal by N replicas, claims that
//! outlive a killed replica, watch conflicts, fallback sync of dropped notifications,
//! permanent renewal failures, removal, and the admin commands' JSON.

use crate::harness::{Bed, BedOptions, emails, eventually};
use gmail_sync::mailbox::Mailbox;
use gmail_sync::store::KeyLayout;
use gmail_sync_testbed::check;
use gmail_sync_testbed::gmail::{Endpoint, FaultAction, FaultRule, SimConfig};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Scheduler settings that make a test's lifecycle take seconds: fast ticks, no fallback sync
/// unless a test asks for it, no renewal again once renewed.
const FAST: &[(&str, &str)] = &[
    ("GMAIL_SYNC_SCHEDULER_TICK_MS", "100"),
    ("GMAIL_SYNC_FALLBACK_SILENCE_SECS", "3600"),
    ("GMAIL_SYNC_RENEWALS_PER_MINUTE", "100000"),
    ("GMAIL_SYNC_CLAIM_TIMEOUT_SECS", "30"),
];

fn with(
    base: &[(&'static str, &'static str)],
    extra: &[(&'static str, &'static str)],
) -> Vec<(&'static str, &'static str)> {
    let mut all: BTreeMap<&str, &str> = base.iter().copied().collect();
    all.extend(extra.iter().copied());
    all.into_iter().collect()
}

/// Makes the renewal of `mailboxes` due now, as if a day had passed.
async fn make_renewal_due(bed: &Bed, mailboxes: &[String]) {
    let keys = KeyLayout::new(&bed.prefix, bed.shards);
    let mut con = bed.redis().await;
    let now_s = now_ms() / 1000;
    for email in mailboxes {
        let m = Mailbox::parse(email).unwrap();
        let _: () = redis::cmd("HSET")
            .arg(keys.state(&m))
            .arg("renew")
            .arg(now_s - 1)
            .query_async(&mut con)
            .await
            .unwrap();
    }
    look_now(bed, mailboxes).await;
}

/// Moves the scheduler's next look at `mailboxes` to now (renewal times unchanged).
async fn look_now(bed: &Bed, mailboxes: &[String]) {
    let keys = KeyLayout::new(&bed.prefix, bed.shards);
    let mut con = bed.redis().await;
    for email in mailboxes {
        let m = Mailbox::parse(email).unwrap();
        let _: () = redis::cmd("ZADD")
            .arg(keys.schedule_of(&m))
            .arg(now_ms())
            .arg(m.as_str())
            .query_async(&mut con)
            .await
            .unwrap();
    }
}

fn expirations(bed: &Bed, mailboxes: &[String]) -> BTreeMap<String, u64> {
    mailboxes
        .iter()
        .map(|m| (m.clone(), bed.sim.watch_expiration(m).unwrap_or(0)))
        .collect()
}

/// Waits until every mailbox's watch expiration moved past `before`.
async fn wait_renewed(
    bed: &Bed,
    before: &BTreeMap<String, u64>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let stale: Vec<&String> = before
            .iter()
            .filter(|(m, old)| bed.sim.watch_expiration(m).unwrap_or(0) <= **old)
            .map(|(m, _)| m)
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} watches not renewed, e.g. {:?}",
                stale.len(),
                &stale[..stale.len().min(3)]
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three worker processes, 1,000 mailboxes whose renewals are all due: exactly 1,000 watch
/// calls, none concurrent for one mailbox, every expiration moved forward, cursors untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_renew_each_due_mailbox_exactly_once() {
    let mut bed = Bed::with(
        "renew3",
        BedOptions {
            shards: 8,
            ..BedOptions::default()
        },
    )
    .await;
    let mailboxes = emails("renew3", 1000);
    bed.add_mailboxes(&mailboxes).await;
    let store = bed.store().await;
    let mut cursors = BTreeMap::new();
    for m in &mailboxes {
        let mb = Mailbox::parse(m).unwrap();
        cursors.insert(m.clone(), store.cursor(&mb).await.unwrap());
    }
    // Watches take a moment in Gmail: overlapping calls would show in the ledger.
    bed.sim.set_watch_processing(Duration::from_millis(5));
    // Expirations are in ms; make sure a renewal can move them.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = expirations(&bed, &mailboxes);
    let watches_before = bed.calls_to(Endpoint::Watch);
    make_renewal_due(&bed, &mailboxes).await;
    let workers: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| bed.spawn_worker_process(&format!("renew3-{n}"), FAST))
        .collect();
    if let Err(e) = wait_renewed(&bed, &before, Duration::from_secs(120)).await {
        panic!("{e}\n{}", workers[0].log_tail(20));
    }
    // Let any stray (double) renewal land before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ledger = bed.sim.ledger();
    let watch_calls = ledger.calls_to(Endpoint::Watch).len() - watches_before;
    assert_eq!(watch_calls, 1000, "exactly one renewal per due mailbox");
    let overlapping = ledger.overlapping_calls(Endpoint::Watch);
    assert!(
        overlapping.is_empty(),
        "concurrent watches for one mailbox: {:?}",
        &overlapping[..overlapping.len().min(2)]
    );
    for m in &mailboxes {
        let mb = Mailbox::parse(m).unwrap();
        assert_eq!(
            store.cursor(&mb).await.unwrap(),
            cursors[m],
            "renewal never moves the cursor"
        );
        let s = store.status(&mb).await.unwrap().unwrap();
        assert!(
            s.watch_expiration_s.unwrap() * 1000 + 1000 > before[m],
            "stored expiration moved"
        );
        assert!(
            s.next_renewal_s.unwrap() > now_ms() / 1000,
            "next renewal is in the future"
        );
    }
    for w in &workers {
        w.stop();
    }
}

/// A replica SIGKILLed while it holds renewal claims: another replica renews those mailboxes
/// once the claims run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_of_a_killed_replica_are_taken_over() {
    let mut bed = Bed::start("claimkill").await;
    let mailboxes = emails("claimkill", 40);
    bed.add_mailboxes(&mailboxes).await;
    // Slow watches: the victim is killed while it holds claims on most mailboxes.
    bed.sim.set_watch_processing(Duration::from_millis(1500));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = expirations(&bed, &mailboxes);
    make_renewal_due(&bed, &mailboxes).await;
    let fast = with(
        FAST,
        &[
            ("GMAIL_SYNC_CLAIM_TIMEOUT_SECS", "6"),
            ("RUST_LOG", "info,gmail_sync=debug"),
        ],
    );
    let victim = bed.spawn_worker_process("claimkill-victim", &fast);
    let keys = KeyLayout::new(&bed.prefix, bed.shards);
    let claims = || async {
        let mut con = bed.redis().await;
        let mut n = 0;
        for m in &mailboxes {
            let exists: bool = redis::cmd("EXISTS")
                .arg(keys.claim(&Mailbox::parse(m).unwrap()))
                .query_async(&mut con)
                .await
                .unwrap();
            n += exists as usize;
        }
        n
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    // Shards are worked one after another: a shard's batch (about a quarter) is claimed at once.
    while claims().await < 5 {
        assert!(
            Instant::now() < deadline,
            "the victim never claimed: {}",
            victim.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    victim.kill();
    let survivor = bed.spawn_worker_process("claimkill-survivor", &fast);
    if let Err(e) = wait_renewed(&bed, &before, Duration::from_secs(90)).await {
        panic!("{e}\n{}", survivor.log_tail(30));
    }
    assert!(
        bed.sim
            .ledger()
            .overlapping_calls(Endpoint::Watch)
            .is_empty()
    );
    survivor.stop();
}

/// Gmail answers "Only one user push notification client allowed": stop, then watch again,
/// once; a permanent renewal failure marks only its mailbox, writes a lifecycle entry and
/// stops its renewals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_conflict_is_resolved_and_a_revoked_mailbox_is_isolated() {
    let mut bed = Bed::start("conflict").await;
    let mailboxes = emails("conflict", 4);
    bed.add_mailboxes(&mailboxes).await;
    let (conflicted, revoked) = (&mailboxes[0], &mailboxes[1]);
    bed.sim.inject(
        FaultRule::new(Some(Endpoint::Watch), FaultAction::watch_conflict())
            .for_mailbox(conflicted)
            .times(1),
    );
    bed.sim.inject(
        FaultRule::new(
            Some(Endpoint::Watch),
            FaultAction::mail_service_not_enabled(),
        )
        .for_mailbox(revoked),
    );
    let mark = bed.sim.ledger_len();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = expirations(&bed, &mailboxes);
    make_renewal_due(&bed, &mailboxes).await;
    let worker = bed.start_worker_with(FAST).await;
    let healthy: BTreeMap<String, u64> = before
        .iter()
        .filter(|(m, _)| *m != revoked)
        .map(|(m, e)| (m.clone(), *e))
        .collect();
    wait_renewed(&bed, &healthy, Duration::from_secs(60))
        .await
        .unwrap();
    let store = bed.store().await;
    let rm = Mailbox::parse(revoked).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || worker
            .snapshot()
            .attention_marked
            >= 1)
        .await,
        "{:?}",
        worker.snapshot()
    );
    // A few more ticks: no more renewals for the marked mailbox.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls: Vec<_> = bed
        .sim
        .ledger_since(mark)
        .into_iter()
        .filter_map(|e| match e {
            gmail_sync_testbed::gmail::LedgerEntry::Call(c)
                if c.mailbox.as_deref() == Some(conflicted.as_str())
                    && matches!(c.endpoint, Endpoint::Watch | Endpoint::Stop) =>
            {
                Some((c.endpoint, c.status))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        calls,
        vec![
            (Endpoint::Watch, 400),
            (Endpoint::Stop, 204),
            (Endpoint::Watch, 200)
        ],
        "conflict answered with stop + watch, once"
    );
    let revoked_watches = bed.sim.ledger_since(mark).into_iter().filter(|e| matches!(e, gmail_sync_testbed::gmail::LedgerEntry::Call(c) if c.endpoint == Endpoint::Watch && c.mailbox.as_deref() == Some(revoked.as_str()))).count();
    assert_eq!(
        revoked_watches, 1,
        "renewals stop after a permanent failure"
    );
    let status = store.status(&rm).await.unwrap().unwrap();
    assert!(
        status
            .attention
            .as_deref()
            .unwrap_or("")
            .contains("Mail service not enabled"),
        "{status:?}"
    );
    assert_eq!(status.next_look_ms, None, "parked");
    let entries: Vec<_> = bed.entries().await.into_iter().map(|e| e.fields).collect();
    let lifecycle = check::lifecycle_entries(&entries, revoked);
    assert_eq!(lifecycle.len(), 1, "{lifecycle:?}");
    assert_eq!(lifecycle[0].0, "mailbox_attention");
    // The others are unaffected: still renewing, no attention, no lifecycle entry.
    for m in mailboxes.iter().filter(|m| *m != revoked) {
        let s = store
            .status(&Mailbox::parse(m).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert!(s.attention.is_none(), "{m}: {s:?}");
        assert!(check::lifecycle_entries(&entries, m).is_empty());
    }
    worker.stop().await.unwrap();
}

/// 30% of notifications dropped: the fallback sync of silent mailboxes still brings every
/// change to the output, exactly once (ledger match).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_notifications_are_caught_by_the_fallback_sync() {
    let sim = SimConfig {
        notify_min_interval: Duration::ZERO,
        ..SimConfig::default()
    };
    let mut bed = Bed::with(
        "fallback",
        BedOptions {
            sim,
            ..BedOptions::default()
        },
    )
    .await;
    let mailboxes = emails("fallback", 6);
    bed.add_mailboxes(&mailboxes).await;
    // Registration scheduled the first look with the default silence (15 min): look now, so
    // the worker's 2 s silence applies from the start.
    look_now(&bed, &mailboxes).await;
    let worker = bed
        .start_worker_with(&with(
            FAST,
            &[
                ("GMAIL_SYNC_FALLBACK_SILENCE_SECS", "2"),
                ("GMAIL_SYNC_FALLBACK_JITTER_SECS", "0"),
            ],
        ))
        .await;
    bed.sim.set_notify_drop_probability(0.3);
    for round in 0..5 {
        for m in &mailboxes {
            bed.sim.deliver(m, &["INBOX"]);
        }
        if round == 2 {
            bed.sim.burst(&mailboxes[0], 4);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Within the silence period plus one sync (and a scheduler tick).
    if let Err(e) = bed.wait_caught_up(Duration::from_secs(30)).await {
        let store = bed.store().await;
        let status = store.status(&Mailbox::parse(&mailboxes[3]).unwrap()).await;
        panic!("{e}\n{:?}\n{status:?} now {}", worker.snapshot(), now_ms());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    bed.check_against_ledger().await.unwrap();
    let dropped = bed.sim.ledger().entries.iter().filter(|e| matches!(e, gmail_sync_testbed::gmail::LedgerEntry::Notification(n) if matches!(n.outcome, gmail_sync_testbed::gmail::NotificationOutcome::Dropped))).count();
    assert!(dropped > 0, "the simulator dropped notifications");
    let s = worker.snapshot();
    assert!(s.fallback_syncs > 0, "{s:?}");
    worker.stop().await.unwrap();
}

fn cli(bed: &Bed, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gmail-sync"))
        .args(args)
        .envs(bed.env())
        .output()
        .unwrap()
}

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Every mailbox subcommand's `--json` parses and carries its documented fields; import skips
/// what is done; remove calls users.stop, its later notifications are acked as unknown and it
/// is no longer scheduled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_speak_json_and_remove_stops_the_mailbox() {
    let bed = Bed::start("admin").await;
    let all = emails("admin", 4);
    for m in &all {
        bed.sim.add_mailbox(m);
    }
    // add
    let out = cli(&bed, &["mailbox", "add", "--json", &all[0]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let added = &json_lines(&out)[0];
    for field in [
        "mailbox",
        "created",
        "cursor",
        "watch_expiration_ms",
        "next_renewal_s",
    ] {
        assert!(added.get(field).is_some(), "add lacks {field}: {added}");
    }
    // import: one done already, two new, one bad line; then a re-run skips what is done.
    let file = std::env::temp_dir().join(format!("{}-import.txt", bed.prefix));
    std::fs::write(
        &file,
        format!(
            "# mailboxes\n{}\n{}\n\nnot-an-address\n{}\n",
            all[0], all[1], all[2]
        ),
    )
    .unwrap();
    let file = file.display().to_string();
    let out = cli(&bed, &["mailbox", "import", "--json", &file]);
    assert_eq!(out.status.code(), Some(1), "a failed line fails the run");
    let summary = &json_lines(&out)[0];
    assert_eq!(summary["total"], 4);
    assert_eq!(summary["added"], 2);
    assert_eq!(summary["skipped"], 1);
    assert_eq!(summary["failed"][0]["line"], 5);
    assert!(
        summary["failed"][0]["reason"]
            .as_str()
            .unwrap()
            .contains('@'),
        "{summary}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).is_empty(),
        "progress on stderr"
    );
    let out = cli(&bed, &["mailbox", "import", "--json", &file]);
    let summary = &json_lines(&out)[0];
    assert_eq!(
        (summary["added"].as_u64(), summary["skipped"].as_u64()),
        (Some(0), Some(3)),
        "{summary}"
    );
    // status
    let out = cli(&bed, &["mailbox", "status", "--json", &all[1]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = &json_lines(&out)[0];
    for field in [
        "mailbox",
        "status",
        "cursor",
        "watch_expiration_s",
        "last_sync_s",
        "next_renewal_s",
        "next_fallback_sync_s",
        "attention",
        "lease_holder",
        "claim_holder",
    ] {
        assert!(
            status.get(field).is_some(),
            "status lacks {field}: {status}"
        );
    }
    assert_eq!(status["status"], "ok");
    let out = cli(&bed, &["mailbox", "status", &all[3]]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("mailbox add"),
        "says what to do next"
    );
    // list, two pages
    let out = cli(&bed, &["mailbox", "list", "--json", "--limit", "2"]);
    let page1 = &json_lines(&out)[0];
    let mut seen: Vec<String> = page1["mailboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mailbox"].as_str().unwrap().to_string())
        .collect();
    let mut cursor = page1["next_cursor"].as_str().map(String::from);
    let mut pages = 1;
    while let Some(c) = cursor {
        let out = cli(
            &bed,
            &["mailbox", "list", "--json", "--limit", "2", "--cursor", &c],
        );
        let page = &json_lines(&out)[0];
        seen.extend(
            page["mailboxes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["mailbox"].as_str().unwrap().to_string()),
        );
        cursor = page["next_cursor"].as_str().map(String::from);
        pages += 1;
        assert!(pages < 20, "list terminates");
    }
    seen.sort();
    assert_eq!(seen, all[..3].to_vec(), "every registered mailbox once");
    let out = cli(
        &bed,
        &["mailbox", "list", "--json", "--status", "attention"],
    );
    assert!(
        json_lines(&out)[0]["mailboxes"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // resync
    let out = cli(&bed, &["mailbox", "resync", "--json", &all[1]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resync = &json_lines(&out)[0];
    assert!(
        resync.get("entries_written").is_some() && resync.get("cursor").is_some(),
        "{resync}"
    );
    // remove: users.stop, state gone, later notifications acked as unknown, not scheduled.
    let worker = bed.start_worker_with(FAST).await;
    let out = cli(&bed, &["mailbox", "remove", "--json", &all[2]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let removed = &json_lines(&out)[0];
    assert_eq!(removed["was_registered"], true);
    assert_eq!(removed["stopped"], true);
    assert_eq!(
        bed.sim.ledger().calls_to_for(Endpoint::Stop, &all[2]).len(),
        1
    );
    let keys = KeyLayout::new(&bed.prefix, bed.shards);
    let m2 = Mailbox::parse(&all[2]).unwrap();
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(keys.schedule_of(&m2))
        .arg(m2.as_str())
        .query_async(&mut bed.redis().await)
        .await
        .unwrap();
    assert_eq!(score, None, "no longer scheduled");
    let unknown_before = worker.snapshot().unknown_mailbox;
    bed.publish(format!(r#"{{"emailAddress":"{}","historyId":"999999999"}}"#, all[2]).as_bytes())
        .await;
    assert!(
        eventually(Duration::from_secs(20), || worker
            .snapshot()
            .unknown_mailbox
            > unknown_before)
        .await,
        "acked as unknown: {:?}",
        worker.snapshot()
    );
    let entries: Vec<_> = bed.entries().await.into_iter().map(|e| e.fields).collect();
    assert_eq!(
        check::lifecycle_entries(&entries, &all[2]),
        vec![("mailbox_removed".to_string(), String::new())]
    );
    worker.stop().await.unwrap();
    let _ = std::fs::remove_file(&file);
}
