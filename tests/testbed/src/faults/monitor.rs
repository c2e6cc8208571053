//! P3, sampled continuously: every mailbox's cursor read every [`SAMPLE_EVERY`]; a cursor that
//! is ever lower than one read before is a regression.
//!
//! One pipeline of `HGET`s per shard and round (a cluster pipeline must stay in one slot, and
//! a shard's keys share one) on its own connection, single server or cluster (the driver's
//! other Redis calls never queue behind it). A round that fails (Redis restarting, refusing, paused) is counted
//! and skipped: the monitor sees the cursor again when Redis answers, and a regression across
//! the gap still shows, because the last value read is kept.

use crate::bed::{Keys, RawConnection, Testbed};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the monitor reads every cursor (the issue asks for ~100 ms).
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// A connection attempt after a failed round waits this long (Redis may be down for seconds).
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// A cursor read lower than one read before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Regression {
    /// When the lower value was read.
    pub at: Instant,
    pub mailbox: String,
    pub before: u64,
    pub after: u64,
}

impl std::fmt::Display for Regression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.mailbox, self.before, self.after)
    }
}

/// What the monitor saw.
#[derive(Debug, Default, Clone)]
pub struct CursorSamples {
    /// Rounds that read every cursor.
    pub rounds: u64,
    /// Rounds that failed (Redis unavailable).
    pub failed_rounds: u64,
    /// Every regression seen.
    pub regressions: Vec<Regression>,
    /// The last cursor read per mailbox.
    pub last: BTreeMap<String, u64>,
    /// Every cursor value read per mailbox: each one a committed cursor, the witnesses of
    /// [`crate::check::resync`] (what was synced before a resync must stay).
    pub seen: BTreeMap<String, BTreeSet<u64>>,
}

/// Samples until `stop`; the shared record is read by the driver at the end.
pub async fn run(
    tb: &Testbed,
    mailboxes: Vec<String>,
    record: Arc<Mutex<CursorSamples>>,
    stop: CancellationToken,
) {
    let keys: Keys = tb.keys();
    // The mailboxes by shard, each group one pipeline.
    let mut by_shard: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for m in mailboxes {
        by_shard.entry(keys.shard_of(&m)).or_default().push(m);
    }
    let mut con = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
        if con.is_none() {
            match tb.connect().await {
                Ok(c) => con = Some(c),
                Err(_) => {
                    lock(&record).failed_rounds += 1;
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            }
        }
        let c = con.as_mut().expect("connected above");
        let read = read_round(c, &keys, &by_shard).await;
        let mut rec = lock(&record);
        match read {
            Ok(values) => {
                rec.rounds += 1;
                for (m, v) in values {
                    let Some(now) = v.and_then(|v| v.parse::<u64>().ok()) else {
                        continue;
                    };
                    rec.seen.entry(m.clone()).or_default().insert(now);
                    if let Some(before) = rec.last.insert(m.clone(), now)
                        && now < before
                    {
                        rec.regressions.push(Regression {
                            at: Instant::now(),
                            mailbox: m.clone(),
                            before,
                            after: now,
                        });
                    }
                }
            }
            Err(_) => {
                rec.failed_rounds += 1;
                // A fresh connection next round (the old one may be broken for good).
                con = None;
            }
        }
    }
}

/// Every mailbox's cursor, one pipeline per shard; the first error fails the round.
async fn read_round<'a>(
    con: &mut RawConnection,
    keys: &Keys,
    by_shard: &'a BTreeMap<u32, Vec<String>>,
) -> redis::RedisResult<Vec<(&'a String, Option<String>)>> {
    let mut out = Vec::new();
    for mailboxes in by_shard.values() {
        let mut pipe = redis::pipe();
        for m in mailboxes {
            pipe.cmd("HGET").arg(keys.state(m)).arg("cursor");
        }
        let values: Vec<Option<String>> = pipe.query_async(con).await?;
        out.extend(mailboxes.iter().zip(values));
    }
    Ok(out)
}

fn lock(m: &Mutex<CursorSamples>) -> std::sync::MutexGuard<'_, CursorSamples> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
