//! [`Fault::KillAfterCommit`](crate::faults::Fault::KillAfterCommit): a worker SIGKILLed between a
//! commit and its ack, with no hook in the worker.
//!
//! 1. The proxy holds the worker's lane: nothing it sends reaches the emulator any more (acks,
//!    modacks, pings), while deliveries still reach it, so it goes on syncing and committing.
//! 2. `history.list` is slowed ([`SLOW`]), so a sync holds its mailbox lease long enough to be
//!    seen; the driver polls the lease keys for one whose token (`HOST:PID:RANDOM`) names the
//!    worker, then that mailbox's lease and cursor every [`POLL`].
//! 3. When the cursor moves while the previous poll saw the worker's token, the worker made
//!    that commit (`commit.lua` refuses any other token): SIGKILL at once, then the lane is
//!    closed, so the acks the worker sent after the commit are dropped, never forwarded.
//!
//! The emulator then redelivers what the worker held (after the ack deadline, or minutes
//! later: see shared/reference/emulator.md on stale streams), and the worker that gets it must
//! ack it without writing it again (P2). A commit by another worker could be taken for the
//! held worker's only if, between two polls 10 ms apart, the held worker gave its lease up
//! without committing and another worker took it and committed.

use super::Fleet;
use crate::bed::{RawConnection, Testbed};
use crate::gmail::{Endpoint, FaultAction, FaultRule};
use anyhow::{Result, bail};
use std::time::{Duration, Instant};

/// How long the held worker is given to take a lease and commit under it (the traffic reaches
/// every worker several times a second).
const FIND_COMMIT: Duration = Duration::from_secs(6);
/// `history.list` answers this late while the driver looks: many polls see the lease before
/// the commit, and it stays well below the worker's Gmail timeout (3 s), so the sync succeeds.
const SLOW: Duration = Duration::from_millis(1_000);
/// Lease and cursor poll period: the kill follows the commit within about this.
const POLL: Duration = Duration::from_millis(10);

/// Holds worker `index`'s lane, waits for a commit of its own, SIGKILLs it. The replacement is
/// the caller's. An error (no commit in time) releases the lane and kills nothing.
pub(super) async fn kill_after_commit(fleet: &mut Fleet<'_>, index: usize) -> Result<()> {
    let tb = fleet.tb;
    let pid = fleet.live[index].pid();
    let lane = fleet.lane_of(index)?;
    fleet.proxy.hold(lane);
    let rule = tb.sim.inject(FaultRule::new(
        Some(Endpoint::HistoryList),
        FaultAction::latency(SLOW),
    ));
    let committed = commit_under_lease(tb, pid).await;
    if committed.is_ok() {
        fleet.kill(index);
    } else {
        fleet.proxy.release(lane);
    }
    tb.sim.remove_fault(rule);
    committed
}

/// Waits (≤ [`FIND_COMMIT`]) until worker `pid` commits under a mailbox lease it was seen
/// holding.
async fn commit_under_lease(tb: &Testbed, pid: u32) -> Result<()> {
    let deadline = Instant::now() + FIND_COMMIT;
    let mut con = tb.connect().await?;
    while Instant::now() < deadline {
        if let Some((mailbox, token)) = lease_of(&mut con, tb, pid).await
            && watch_commit(&mut con, tb, &mailbox, &token, deadline).await
        {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("worker {pid} committed nothing under its lease within {FIND_COMMIT:?}")
}

/// A mailbox whose lease worker `pid` holds now, and the lease's token.
async fn lease_of(con: &mut RawConnection, tb: &Testbed, pid: u32) -> Option<(String, String)> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(tb.keys().lease_pattern())
        .query_async(con)
        .await
        .ok()?;
    for key in keys {
        let token: Option<String> = redis::cmd("GET").arg(&key).query_async(con).await.ok()?;
        let Some(token) = token else { continue };
        let holder = token.split(':').nth(1).and_then(|p| p.parse::<u32>().ok());
        if holder == Some(pid)
            && let Some((_, mailbox)) = key.split_once("}:lease:")
        {
            return Some((mailbox.to_string(), token));
        }
    }
    None
}

/// The mailbox's lease token and cursor, read in one pipeline.
async fn snapshot(
    con: &mut RawConnection,
    tb: &Testbed,
    mailbox: &str,
) -> Option<(Option<String>, Option<String>)> {
    let keys = tb.keys();
    redis::pipe()
        .cmd("GET")
        .arg(keys.lease(mailbox))
        .cmd("HGET")
        .arg(keys.state(mailbox))
        .arg("cursor")
        .query_async(con)
        .await
        .ok()
}

/// True once the mailbox's cursor moves while the previous poll saw `token` hold its lease;
/// false if the lease went (released without a commit) or at the deadline.
async fn watch_commit(
    con: &mut RawConnection,
    tb: &Testbed,
    mailbox: &str,
    token: &str,
    deadline: Instant,
) -> bool {
    let Some((lease, cursor)) = snapshot(con, tb, mailbox).await else {
        return false;
    };
    if lease.as_deref() != Some(token) {
        return false;
    }
    while Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
        let Some((lease, now)) = snapshot(con, tb, mailbox).await else {
            return false;
        };
        if now != cursor {
            return true;
        }
        if lease.as_deref() != Some(token) {
            return false;
        }
    }
    false
}
