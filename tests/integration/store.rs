//! The commit script's guarantees, exercised directly against a real Redis (I2, I3, I4).

use crate::harness::Bed;
use gmail_sync::history_id::HistoryId;
use gmail_sync::mailbox::Mailbox;
use gmail_sync::store::{
    AttentionKind, AttentionSource, Begin, ChangeEntry, ChangeKind, ChargeMode, ChargeReply, Lease,
    LeaseAfterCommit, QuotaKey, SlotRequest, StoreError, WatchPlan, WindowCharge,
};
use std::time::Duration;

/// A schedule far in the future: these tests exercise the sync scripts only.
fn idle_plan() -> WatchPlan {
    WatchPlan {
        expiration_ms: 4_000_000_000_000,
        renew_at_s: 4_000_000_000,
        first_look_ms: 4_000_000_000_000,
        labels: None,
    }
}

fn entry(h: u64) -> ChangeEntry {
    ChangeEntry::message(
        ChangeKind::MessageAdded,
        HistoryId(h),
        &format!("m{h}"),
        "t",
        &["INBOX".to_string()],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_is_compare_and_advance_and_never_moves_back_beyond_2_pow_53() {
    let bed = Bed::start("store").await;
    let store = bed.store().await;
    let m = Mailbox::parse("cas@example.com").unwrap();
    let base = (1u64 << 53) + 1; // 2^53 + 1 is not representable as a double
    assert_eq!(
        store
            .register(&m, HistoryId(base), &idle_plan())
            .await
            .unwrap(),
        (true, HistoryId(base))
    );
    // Registering again keeps the cursor (idempotent, never backwards).
    assert_eq!(
        store
            .register(&m, HistoryId(base + 100), &idle_plan())
            .await
            .unwrap(),
        (false, HistoryId(base))
    );

    let lease = Lease::new(Duration::from_secs(10));
    assert_eq!(
        store.begin(&m, HistoryId(base + 5), &lease).await.unwrap(),
        Begin::Leased {
            cursor: HistoryId(base)
        }
    );
    let other = Lease::new(Duration::from_secs(10));
    assert_eq!(
        store.begin(&m, HistoryId(base + 5), &other).await.unwrap(),
        Begin::Busy {
            cursor: HistoryId(base)
        }
    );

    // 2^53 equals 2^53 + 1 as a double: only an exact comparison refuses it.
    let back = store
        .commit(
            &m,
            &lease,
            HistoryId(base),
            HistoryId(base - 1),
            &[entry(base - 1)],
            LeaseAfterCommit::Keep,
            None,
        )
        .await;
    assert!(matches!(back, Err(StoreError::Backwards(_))), "{back:?}");
    let stale = store
        .commit(
            &m,
            &lease,
            HistoryId(base - 7),
            HistoryId(base + 2),
            &[entry(base + 2)],
            LeaseAfterCommit::Keep,
            None,
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict(c)) if c == HistoryId(base)),
        "{stale:?}"
    );
    let foreign = store
        .commit(
            &m,
            &other,
            HistoryId(base),
            HistoryId(base + 2),
            &[entry(base + 2)],
            LeaseAfterCommit::Keep,
            None,
        )
        .await;
    assert!(matches!(foreign, Err(StoreError::LeaseLost)), "{foreign:?}");
    assert_eq!(
        bed.entries().await.len(),
        0,
        "refused commits write nothing"
    );

    let to = store
        .commit(
            &m,
            &lease,
            HistoryId(base),
            HistoryId(base + 2),
            &[entry(base + 1), entry(base + 2)],
            LeaseAfterCommit::Release,
            None,
        )
        .await
        .unwrap();
    assert_eq!(to, HistoryId(base + 2));
    assert_eq!(store.cursor(&m).await.unwrap(), Some(HistoryId(base + 2)));
    // The same commit replayed (a redelivery racing) writes nothing twice.
    let replay = store
        .commit(
            &m,
            &lease,
            HistoryId(base),
            HistoryId(base + 2),
            &[entry(base + 1), entry(base + 2)],
            LeaseAfterCommit::Keep,
            None,
        )
        .await;
    assert!(replay.is_err());
    let entries = bed.entries().await;
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1].get("history_id"), (base + 2).to_string());
    assert_eq!(entries[0].get("v"), "1");
    // The final commit released the lease: a new sync can take it.
    assert!(matches!(
        store.begin(&m, HistoryId(base + 9), &other).await.unwrap(),
        Begin::Leased { .. }
    ));
    // Near u64::MAX the decimal comparison still holds.
    let top = Mailbox::parse("top@example.com").unwrap();
    store
        .register(&top, HistoryId(u64::MAX - 10), &idle_plan())
        .await
        .unwrap();
    let l = Lease::new(Duration::from_secs(10));
    assert!(matches!(
        store.begin(&top, HistoryId(u64::MAX), &l).await.unwrap(),
        Begin::Leased { .. }
    ));
    store
        .commit(
            &top,
            &l,
            HistoryId(u64::MAX - 10),
            HistoryId(u64::MAX),
            &[],
            LeaseAfterCommit::Release,
            None,
        )
        .await
        .unwrap();
    assert_eq!(store.cursor(&top).await.unwrap(), Some(HistoryId(u64::MAX)));
    assert!(matches!(
        store
            .begin(&top, HistoryId(u64::MAX - 1), &l)
            .await
            .unwrap(),
        Begin::UpToDate { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_attention_mailboxes_are_reported_by_begin() {
    let bed = Bed::start("store2").await;
    let store = bed.store().await;
    let lease = Lease::new(Duration::from_secs(5));
    let m = Mailbox::parse("nobody@example.com").unwrap();
    assert_eq!(
        store.begin(&m, HistoryId(5), &lease).await.unwrap(),
        Begin::Unknown
    );
    // Marking an unknown mailbox must not create it.
    store
        .mark_attention(&m, AttentionKind::Failed, "x", AttentionSource::Sync)
        .await
        .unwrap();
    assert_eq!(store.cursor(&m).await.unwrap(), None);
    let d = Mailbox::parse("revoked@example.com").unwrap();
    store
        .register(&d, HistoryId(10), &idle_plan())
        .await
        .unwrap();
    store
        .mark_attention(
            &d,
            AttentionKind::NeedsReauthorization,
            "invalid_grant",
            AttentionSource::Sync,
        )
        .await
        .unwrap();
    assert_eq!(
        store.begin(&d, HistoryId(50), &lease).await.unwrap(),
        Begin::NeedsAttention {
            cursor: HistoryId(10)
        }
    );
    // `mailbox add` re-enables and keeps the cursor.
    assert_eq!(
        store
            .register(&d, HistoryId(99), &idle_plan())
            .await
            .unwrap(),
        (false, HistoryId(10))
    );
    assert!(matches!(
        store.begin(&d, HistoryId(50), &lease).await.unwrap(),
        Begin::Leased { .. }
    ));
}

/// The test bed's façade reads Redis from the outside with its own copy of the key names
/// (the testbed crate cannot depend on gmail-sync): they must equal the product's.
#[test]
fn testbed_key_names_match_the_product_key_layout() {
    use gmail_sync::store::KeyLayout;
    use gmail_sync_testbed::bed::Keys;
    for (prefix, shards) in [("p", 1), ("t-e2e-42", 4), ("demo", 16), ("x:y", 0)] {
        let ours = Keys::new(prefix, shards);
        let theirs = KeyLayout::new(prefix, shards);
        assert_eq!(ours.streams(), theirs.streams(), "{prefix}/{shards}");
        assert_eq!(ours.quarantine(), theirs.quarantine().to_string());
        for email in [
            "a@example.com",
            "Mixed.Case@Example.COM",
            " padded@example.com ",
            "user0042@demo.example",
            "ünï@例え.jp",
        ] {
            let m = Mailbox::parse(email).unwrap();
            assert_eq!(ours.shard_of(email), theirs.shard_of(&m), "{email}");
            assert_eq!(ours.state(email), theirs.state(&m).to_string(), "{email}");
            assert_eq!(ours.lease(email), theirs.lease(&m).to_string(), "{email}");
            assert_eq!(Keys::normalize(email), m.to_string());
        }
    }
}

/// Fuzzing (issue 10): the scripts compare historyIds as canonical decimal strings (Lua numbers
/// are doubles); every script's `gt` must agree with `u64`'s `>` on every pair, above 2^53
/// and at the digit-count boundaries above all. Each script's own `gt` text is evaluated in a
/// real Redis on a batch of generated pairs.
#[test]
fn fuzz_lua_history_id_comparison_agrees_with_u64() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let scripts = [
        ("begin.lua", include_str!("../../src/store/begin.lua")),
        ("commit.lua", include_str!("../../src/store/commit.lua")),
    ];
    // Values where doubles, digit counts or the byte comparison could go wrong.
    let near =
        |centre: u64| (0u64..2000).prop_map(move |d| centre.wrapping_add(d).wrapping_sub(1000));
    let edgy = prop_oneof![
        any::<u64>(),
        near(1 << 53),
        near(u64::MAX),
        (1u32..20).prop_flat_map(|digits| near(10u64.pow(digits))),
        0u64..1000,
    ];
    let pairs = proptest::collection::vec((edgy.clone(), edgy), 1..400);
    let cases: usize = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(256)
        .div_ceil(16);
    let server = gmail_sync_testbed::redis_server::RedisServer::start().unwrap();
    let mut con = server.client().unwrap().get_connection().unwrap();
    let mut runner = TestRunner::deterministic();
    for (name, source) in scripts {
        let gt = lua_function(source, "gt").unwrap_or_else(|| panic!("{name} has no gt"));
        let batch = format!(
            "{gt}\nlocal out = {{}}\nfor i = 1, #ARGV, 2 do out[#out + 1] = gt(ARGV[i], ARGV[i + 1]) and 1 or 0 end\nreturn out"
        );
        for _ in 0..cases {
            let pairs = pairs.new_tree(&mut runner).unwrap().current();
            let argv: Vec<String> = pairs
                .iter()
                .flat_map(|(a, b)| [a.to_string(), b.to_string()])
                .collect();
            let answers: Vec<i64> = redis::cmd("EVAL")
                .arg(&batch)
                .arg(0)
                .arg(&argv)
                .query(&mut con)
                .unwrap();
            for ((a, b), lua) in pairs.iter().zip(answers) {
                assert_eq!(lua == 1, a > b, "{name}: gt({a}, {b}) answered {lua}");
            }
        }
    }
    server.stop();
}

/// The text of `local function NAME(...) ... end` in a script (its first line with `end` at
/// the start of a line closes it).
fn lua_function(source: &str, name: &str) -> Option<String> {
    let start = source.find(&format!("local function {name}("))?;
    let rest = &source[start..];
    let end = rest.find("\nend")? + "\nend".len();
    Some(rest[..end].to_string())
}

/// A sync's quota in-flight slot is given back by the commit that drops its lease (the same
/// script: ending a sync is one round trip), not by one that keeps the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_commit_gives_the_in_flight_slot_back() {
    let bed = Bed::start("store-slot").await;
    let store = bed.store().await;
    let m = Mailbox::parse("slot@example.com").unwrap();
    store
        .register(&m, HistoryId(100), &idle_plan())
        .await
        .unwrap();
    let mut con = bed.redis().await;
    let in_flight = store.keys().in_flight(&m);
    let slots = |con: &mut redis::aio::MultiplexedConnection| {
        let key = in_flight;
        let mut con = con.clone();
        async move {
            redis::cmd("ZCARD")
                .arg(key)
                .query_async::<u64>(&mut con)
                .await
                .unwrap()
        }
    };
    let take = |token: &'static str| {
        let store = &store;
        let m = &m;
        async move {
            let slot = SlotRequest {
                mailbox: m,
                token,
                cap: 2,
                ttl: Duration::from_secs(60),
            };
            store
                .quota_charge(0, &[], Some(slot), ChargeMode::Admit)
                .await
                .unwrap()
        }
    };
    assert_eq!(take("first").await, ChargeReply::Charged);
    assert_eq!(take("other").await, ChargeReply::Charged);
    assert_eq!(slots(&mut con).await, 2);

    let lease = Lease::new(Duration::from_secs(10));
    assert!(matches!(
        store.begin(&m, HistoryId(105), &lease).await.unwrap(),
        Begin::Leased { .. }
    ));
    store
        .commit(
            &m,
            &lease,
            HistoryId(100),
            HistoryId(102),
            &[entry(102)],
            LeaseAfterCommit::Keep,
            Some("first"),
        )
        .await
        .unwrap();
    assert_eq!(
        slots(&mut con).await,
        2,
        "a commit that keeps the lease keeps the slot"
    );
    store
        .commit(
            &m,
            &lease,
            HistoryId(102),
            HistoryId(105),
            &[entry(105)],
            LeaseAfterCommit::Release,
            Some("first"),
        )
        .await
        .unwrap();
    let left: Vec<String> = redis::cmd("ZRANGE")
        .arg(in_flight)
        .arg(0)
        .arg(-1)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(
        left,
        ["other"],
        "the final commit removed its own slot, only that one"
    );
}

/// `begin_admit` (begin and the quota admission in one script, single Redis): nothing is
/// charged unless the lease is taken; a charge that fits takes the slot and keeps the lease; a
/// refused one gives the lease back in the same step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_admit_charges_only_a_lease_taken_and_gives_it_back_when_refused() {
    let bed = Bed::start("store-begin-admit").await;
    let store = bed.store().await;
    assert!(store.can_begin_admit());
    let m = Mailbox::parse("admit@example.com").unwrap();
    store
        .register(&m, HistoryId(100), &idle_plan())
        .await
        .unwrap();
    let mut con = bed.redis().await;
    let user_window = |limit| WindowCharge {
        key: QuotaKey::User(&m),
        limit,
        span: Duration::from_secs(60),
        bucket: Duration::from_secs(1),
    };
    let slot = |token| SlotRequest {
        mailbox: &m,
        token,
        cap: 1,
        ttl: Duration::from_secs(60),
    };
    let charged = |con: &mut redis::aio::MultiplexedConnection| {
        let key = store.keys().quota_user(&m);
        let mut con = con.clone();
        async move {
            let fields: Vec<(String, u64)> = redis::cmd("HGETALL")
                .arg(key)
                .query_async(&mut con)
                .await
                .unwrap();
            fields
                .iter()
                .filter(|(f, _)| f != "b")
                .map(|(_, v)| v)
                .sum::<u64>()
        }
    };

    // Covered target: not leased, nothing charged.
    let lease = Lease::new(Duration::from_secs(10));
    let (begin, reply) = store
        .begin_admit(&m, HistoryId(100), &lease, 2, &[user_window(10)], slot("a"))
        .await
        .unwrap();
    assert_eq!(
        begin,
        Begin::UpToDate {
            cursor: HistoryId(100)
        }
    );
    assert_eq!(reply, None);
    assert_eq!(charged(&mut con).await, 0);

    // Behind: leased and charged, slot taken.
    let (begin, reply) = store
        .begin_admit(&m, HistoryId(105), &lease, 2, &[user_window(10)], slot("a"))
        .await
        .unwrap();
    assert_eq!(
        begin,
        Begin::Leased {
            cursor: HistoryId(100)
        }
    );
    assert_eq!(reply, Some(ChargeReply::Charged));
    assert_eq!(charged(&mut con).await, 2);

    // Another sync while the lease is held: busy, nothing charged.
    let other = Lease::new(Duration::from_secs(10));
    let (begin, reply) = store
        .begin_admit(&m, HistoryId(105), &other, 2, &[user_window(10)], slot("b"))
        .await
        .unwrap();
    assert_eq!(
        begin,
        Begin::Busy {
            cursor: HistoryId(100)
        }
    );
    assert_eq!(reply, None);
    assert_eq!(charged(&mut con).await, 2);

    // The first sync ends (lease and slot given back); a charge that does not fit is refused
    // and the lease it took is given back at once.
    store
        .commit(
            &m,
            &lease,
            HistoryId(100),
            HistoryId(105),
            &[entry(105)],
            LeaseAfterCommit::Release,
            Some("a"),
        )
        .await
        .unwrap();
    let (begin, reply) = store
        .begin_admit(
            &m,
            HistoryId(109),
            &other,
            20,
            &[user_window(10)],
            slot("b"),
        )
        .await
        .unwrap();
    assert_eq!(
        begin,
        Begin::Leased {
            cursor: HistoryId(105)
        }
    );
    assert!(
        matches!(reply, Some(ChargeReply::Spent { index: 0, .. })),
        "{reply:?}"
    );
    assert_eq!(
        charged(&mut con).await,
        2,
        "a refused charge writes nothing"
    );
    let third = Lease::new(Duration::from_secs(10));
    assert!(
        matches!(
            store.begin(&m, HistoryId(109), &third).await.unwrap(),
            Begin::Leased { .. }
        ),
        "the refused admission gave its lease back"
    );
}
