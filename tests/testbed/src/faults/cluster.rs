//! The Redis Cluster scenarios: a master's replica promoted mid-run, on a cluster of three
//! masters with one replica each ([`RedisChoice::ReplicatedCluster`], which
//! [`Scenario::redis`] asks for).
//!
//! - [`Scenario::RedisFailover`]: `CLUSTER FAILOVER` at the replica of the master serving a
//!   shard's hash tag. The master pauses its clients, the replica catches up with its
//!   replication offset and takes the slots over, the old master becomes its replica and
//!   answers `MOVED`: no acknowledged write is lost, so P1–P6 must hold.
//! - [`Scenario::RedisMasterKill`]: SIGKILL of that master; the cluster elects the replica
//!   after the node timeout (meanwhile the cluster refuses commands: `CLUSTERDOWN`, every slot
//!   must be covered), and the killed node starts again later with its `nodes.conf` and no
//!   data, and rejoins as the new master's replica. Replication is asynchronous: writes the
//!   master acknowledged but had not sent yet are lost, which README "Deploying / 3. Redis"
//!   ("Persistence") describes: cursors move back (P3), and changes committed again are
//!   appended again if the stream entry survived where the cursor did not (P2). A lost change
//!   (P1) is a bug, never the expected outcome.
//! - [`Scenario::RedisLossyKill`]: the same SIGKILL, but first the master's replica is held
//!   behind for a few hundred ms ([`RedisCluster::hold_replica_behind`]: its link cut, its
//!   reconnects refused), so every commit the master acknowledged in that window is lost on
//!   purpose. On loopback the plain kill never loses one (the replica trails by microseconds);
//!   this one must, and shows what the loss does. The driver reads every cursor just before
//!   the kill and again once the replica took over: each one lower is a lost write
//!   (`writes_lost`), and so is a regression the P3 monitor sees within [`LOSS_SEEN_WITHIN`] of
//!   the promotion (not a P3 violation). The next sync of such a mailbox reads the changes
//!   again and appends them once (the entries were lost with the cursor: one script, one
//!   replicated unit), so P1 and P2 still hold.
//!
//! The failover is aimed at a shard (its stream key's slot) rather than at a node, so every
//! failover moves slots the workers write to, and the same seed aims at the same shard
//! whichever node serves it by then.
//!
//! The waits poll the cluster with short blocking checks (a few ms of loopback each, under
//! `block_in_place`) between async sleeps: the driver's traffic and cursor monitor run in the
//! same `join!` and must keep going through the seconds a forced failover takes.

use super::monitor::Regression;
use super::{Fault, Scenario};
use crate::bed::{Redis, Testbed, cursor_on};
use crate::redis_server::{
    self, ClusterView, FAILOVER_TIMEOUT, Failover, Promotion, RedisCluster, SYNC_TIMEOUT,
};
use anyhow::{Result, anyhow, bail};
use rand::Rng;
use rand::rngs::StdRng;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::task::block_in_place;

/// Shards a failover is aimed at are drawn from `0..SHARD_DRAW` and taken modulo the bed's
/// shard count (the schedule does not know it; 16 is the examples' count).
const SHARD_DRAW: u32 = 16;
/// How long a killed master stays down after its replica took over (that master has no
/// replica meanwhile), ms.
const DOWN_MS: (u64, u64) = (2_000, 4_000);
/// Pause between two looks at the cluster while waiting.
const POLL: Duration = Duration::from_millis(50);
/// How long the replica is held behind before the kill, ms: long enough for several commits
/// to its master at the suite's rates (20–30 changes/s over three masters), short against the
/// election's limit on a replica's data age (10 × the node timeout).
const BEHIND_MS: (u64, u64) = (500, 1_000);
/// A cursor regression the monitor sees from the start of the hold until this long after the
/// promotion is the kill's lost write: the monitor needs a round or two once the new master
/// answers.
pub const LOSS_SEEN_WITHIN: Duration = Duration::from_secs(3);

/// True for the scenarios that need a cluster with replicas.
pub fn on_cluster(scenario: Scenario) -> bool {
    matches!(
        scenario,
        Scenario::RedisFailover | Scenario::RedisMasterKill | Scenario::RedisLossyKill
    )
}

/// One fault of a cluster scenario.
pub(super) fn draw(scenario: Scenario, rng: &mut StdRng) -> Fault {
    let shard = rng.random_range(0..SHARD_DRAW);
    match scenario {
        Scenario::RedisMasterKill => Fault::RedisMasterKill {
            shard,
            down_ms: rng.random_range(DOWN_MS.0..=DOWN_MS.1),
        },
        Scenario::RedisLossyKill => Fault::RedisLossyKill {
            shard,
            down_ms: rng.random_range(DOWN_MS.0..=DOWN_MS.1),
            behind_ms: rng.random_range(BEHIND_MS.0..=BEHIND_MS.1),
        },
        _ => Fault::RedisFailover { shard },
    }
}

/// The bed's cluster; an error on a single Redis.
fn cluster_of(tb: &Testbed) -> Result<&RedisCluster> {
    match &tb.redis {
        Redis::Cluster(c) => Ok(c),
        _ => Err(anyhow!(
            "a failover needs a Redis Cluster with replicas (RedisChoice::ReplicatedCluster)"
        )),
    }
}

/// Promotes the replica of the master that serves shard `shard % shards` (`how`: graceful or
/// SIGKILL) and waits (≤ [`FAILOVER_TIMEOUT`]) until every live node agrees on it.
pub(super) async fn fail_over(tb: &Testbed, shard: u32, how: Failover) -> Result<Promotion> {
    promote(tb, shard, how.into()).await
}

/// What a lossy kill did.
pub(super) struct LossyKill {
    pub promotion: Promotion,
    /// Each cursor lower after the promotion than just before the kill.
    pub lost: Vec<Regression>,
}

/// The same SIGKILL, after holding the replica `behind` (see the module docs).
pub(super) async fn fail_over_unreplicated(
    tb: &Testbed,
    shard: u32,
    behind: Duration,
    mailboxes: &[String],
) -> Result<LossyKill> {
    let mut lost = Vec::new();
    let promotion = promote(
        tb,
        shard,
        Promote::Unreplicated(Lossy {
            behind,
            mailboxes,
            lost: &mut lost,
        }),
    )
    .await?;
    Ok(LossyKill { promotion, lost })
}

/// How [`promote`] goes about it: [`Failover`], with what the lossy kill needs.
enum Promote<'a> {
    Plain(Failover),
    Unreplicated(Lossy<'a>),
}

struct Lossy<'a> {
    behind: Duration,
    mailboxes: &'a [String],
    lost: &'a mut Vec<Regression>,
}

impl From<Failover> for Promote<'_> {
    fn from(how: Failover) -> Self {
        Promote::Plain(how)
    }
}

/// Every mailbox's cursor now (one connection; a mailbox that cannot be read is left out).
async fn cursors(tb: &Testbed, mailboxes: &[String]) -> Result<BTreeMap<String, u64>> {
    let mut con = tb.connect().await?;
    let keys = tb.keys();
    let mut out = BTreeMap::new();
    for m in mailboxes {
        if let Ok(Some(c)) = cursor_on(&mut con, &keys, m).await {
            out.insert(m.clone(), c);
        }
    }
    Ok(out)
}

async fn promote(tb: &Testbed, shard: u32, how: Promote<'_>) -> Result<Promotion> {
    let cluster = cluster_of(tb)?;
    let key = tb.keys().stream(shard % tb.shards.max(1));
    let view = settle(cluster, "the cluster before a failover", |_| true).await?;
    let slot = block_in_place(|| cluster.slot_of(&key))?;
    let master = redis_server::serving(&view, slot)
        .ok_or_else(|| anyhow!("no master serves slot {slot} of {key}: {view:?}"))?;
    if let Some(replica) = view.values().find(|n| n.replica_of == Some(master)) {
        wait_in_sync(cluster, replica.port).await?;
    }
    let view = settle(cluster, "the cluster before a failover", |_| true).await?;
    let (failover, mut lossy) = match how {
        Promote::Plain(how) => (how, None),
        Promote::Unreplicated(lossy) => (Failover::Unreplicated, Some(lossy)),
    };
    // The lossy kill: hold the replica behind, let the workers commit to the master (the
    // traffic and the monitor go on during the sleep), read the cursors, then kill.
    let mut held = None;
    let mut before = BTreeMap::new();
    if let Some(l) = &lossy {
        let replica = view
            .values()
            .find(|n| n.replica_of == Some(master))
            .map(|n| n.port)
            .ok_or_else(|| anyhow!("master 127.0.0.1:{master} has no replica: {view:?}"))?;
        let masterauth = block_in_place(|| cluster.hold_replica_behind(master, replica))?;
        held = Some((replica, masterauth));
        tokio::time::sleep(l.behind).await;
        // Not fatal (the kill and the restore must still happen): no reading, no count.
        before = cursors(tb, l.mailboxes).await.unwrap_or_default();
    }
    let killed = async {
        let under_way = block_in_place(|| cluster.begin_failover(&view, master, failover))?;
        settle(cluster, &under_way.to_string(), |v| under_way.is_done(v)).await?;
        anyhow::Ok(under_way)
    }
    .await;
    // The promoted replica gets its masterauth back whatever happened (it may be a replica
    // again after a later failover).
    if let Some((replica, masterauth)) = &held {
        block_in_place(|| cluster.let_replica_catch_up(*replica, masterauth))?;
    }
    let under_way = killed?;
    let promotion = under_way.promotion();
    if let Some(l) = &mut lossy {
        for (m, after) in cursors(tb, l.mailboxes).await.unwrap_or_default() {
            if let Some(b) = before.get(&m)
                && after < *b
            {
                l.lost.push(Regression {
                    at: Instant::now(),
                    mailbox: m,
                    before: *b,
                    after,
                });
            }
        }
        eprintln!(
            "faults: replica of 127.0.0.1:{master} held {} ms behind, then promoted: {} \
             cursors moved back",
            l.behind.as_millis(),
            l.lost.len()
        );
    }
    eprintln!(
        "faults: {under_way} (shard {}) done in {:.2} s",
        shard % tb.shards.max(1),
        promotion.took.as_secs_f64()
    );
    Ok(promotion)
}

/// Starts the killed node at `port` again and waits until it is a replica in sync.
pub(super) async fn restart_node(tb: &Testbed, port: u16) -> Result<()> {
    let cluster = cluster_of(tb)?;
    let started = Instant::now();
    block_in_place(|| cluster.respawn_node(port))?;
    settle(cluster, &format!("127.0.0.1:{port} rejoining"), |v| {
        redis_server::rejoined(v, port)
    })
    .await?;
    wait_in_sync(cluster, port).await?;
    eprintln!(
        "faults: 127.0.0.1:{port} back as a replica in sync in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Polls [`RedisCluster::settled_view`] (≤ [`FAILOVER_TIMEOUT`]) until `want` accepts it.
async fn settle(
    cluster: &RedisCluster,
    what: &str,
    want: impl Fn(&ClusterView) -> bool,
) -> Result<ClusterView> {
    let deadline = Instant::now() + FAILOVER_TIMEOUT;
    loop {
        let last = match block_in_place(|| cluster.settled_view()) {
            Ok(view) if want(&view) => return Ok(view),
            Ok(view) => format!("settled, but not as wanted: {view:?}"),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            bail!(
                "{what}: not settled within {FAILOVER_TIMEOUT:?}: {last}; logs:\n{}",
                cluster.log_tail(15)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls [`RedisCluster::in_sync`] (≤ [`SYNC_TIMEOUT`]) for the replica at `port`.
async fn wait_in_sync(cluster: &RedisCluster, port: u16) -> Result<()> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let last = match block_in_place(|| cluster.in_sync(port)) {
            Ok(true) => return Ok(()),
            Ok(false) => "link not up".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("replica 127.0.0.1:{port} not in sync within {SYNC_TIMEOUT:?}: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bed::RedisChoice;
    use crate::faults::Schedule;

    #[test]
    fn cluster_scenarios_need_a_replicated_cluster_and_stay_out_of_the_mix() {
        for s in Scenario::SINGLE {
            let want = if on_cluster(s) {
                RedisChoice::ReplicatedCluster
            } else {
                RedisChoice::Own
            };
            assert_eq!(s.redis(), want, "{s:?}");
        }
        let mixed = Schedule::generate(Scenario::Mixed, 3, Duration::from_secs(600), 2);
        assert!(mixed.events.iter().all(|(_, f)| !matches!(
            f,
            Fault::RedisFailover { .. }
                | Fault::RedisMasterKill { .. }
                | Fault::RedisLossyKill { .. }
        )));
    }

    #[test]
    fn a_forced_failover_restarts_its_node_before_the_next_kill() {
        let d = Duration::from_secs(120);
        let sched = Schedule::generate(Scenario::RedisMasterKill, 5, d, 2);
        let times: Vec<Duration> = sched.events.iter().map(|(t, _)| *t).collect();
        for (pair, (_, fault)) in times.windows(2).zip(&sched.events) {
            let Fault::RedisMasterKill { down_ms, .. } = fault else {
                panic!("{fault:?}");
            };
            assert!(pair[1] - pair[0] > Duration::from_millis(*down_ms) * 2);
        }
    }
}
