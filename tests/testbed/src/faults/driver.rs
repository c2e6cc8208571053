//! Runs one scenario: a fleet of worker processes behind the cut proxy, seeded traffic, the
//! schedule's faults applied one by one (`apply`, the injector), then the drain and the checks.
//!
//! Concurrency: the traffic, the cursor monitor and the fault sequence are three futures of
//! one `join!` on the caller's task (no spawned task can outlive the run, and they can borrow
//! the bed). The fault sequence owns the fleet; it cancels the other two when it is done.
//! Blocking steps (a Redis restart) run under `block_in_place`, so the caller must be on a
//! multi-threaded runtime.

mod pinned;

use super::acks::{AckSummary, AckTap};
use super::cluster;
use super::monitor::{self, CursorSamples, Regression};
use super::proxy::{CutProxy, LaneId};
use super::{Fault, GmailFault, Row, Scenario, Schedule, Violations};
use crate::bed::{READY_TIMEOUT, Testbed, WorkerProcess};
use crate::check::{self, StreamEntry};
use crate::gmail::{Endpoint, FaultAction, FaultId, FaultRule, NotificationOutcome};
use crate::pubsub;
use crate::redis_server::Failover;
use anyhow::{Context, Result, anyhow};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The suite's mailbox lease TTL (`GMAIL_SYNC_MAILBOX_LEASE_MS`): short, so a SIGSTOP outlives
/// it in seconds.
pub const LEASE_MS: u64 = 3_000;
/// `GMAIL_SYNC_FALLBACK_SILENCE_SECS` of the suite's workers. A SIGKILLed worker's or a cut
/// stream's messages can be stranded in the emulator for minutes; the fallback sync brings
/// every mailbox up to date within about this long anyway, so the drain bound does not depend
/// on the emulator's redelivery.
const FALLBACK_SILENCE_SECS: &str = "10";
/// `GMAIL_SYNC_CLAIM_TIMEOUT_SECS` of the suite's workers (default 120). A SIGKILLed worker's
/// scheduler claims keep their mailboxes from every other replica's fallback sync until they
/// lapse; with the default, a mailbox whose last notification the emulator stranded waited up
/// to two minutes for its fallback sync (a 2-minute kill run drained in 57 s, 10.6 s with
/// this), so the drain bound would hang on the claim timeout instead of the fallback silence.
const CLAIM_TIMEOUT_SECS: &str = "10";
/// How long after a SIGTERM a worker may take to exit (its drain timeout is 10 s, below).
pub const EXIT_BOUND: Duration = Duration::from_secs(30);
/// The drain bound: fallback silence + jitter + a sync, with a wide margin for a loaded CI
/// machine. The emulator's stranding (up to ~5 min) is *not* waited for: the fallback sync
/// covers it; what the workers received is reported next to it.
pub const DRAIN_BOUND: Duration = Duration::from_secs(120);
/// After the drain, how long live workers are given to ack what they still hold: nothing is
/// left to sync, so an ack waits at most for a retry timer the consumer armed before the drain
/// (its backoff is capped well below this) and for the client's ack batching.
const ACK_SETTLE: Duration = Duration::from_secs(30);
/// How often the settle loop looks.
const ACK_POLL: Duration = Duration::from_millis(100);
/// P4 violations described in the details, at most (the count is complete).
const DESCRIBED: usize = 10;
/// The traffic's tick; each tick makes `rate / TICKS_PER_SEC` changes.
const TICK: Duration = Duration::from_millis(100);
const TICKS_PER_SEC: u32 = 10;
/// How long a kill or SIGTERM "in flight" waits for a slowed sync to hold a lease.
const FIND_SYNC: Duration = Duration::from_secs(4);
/// The slowed history.list of [`Fault::KillSyncing`] / [`Fault::TermSyncing`]: long enough
/// to find the sync and signal its worker while it waits.
const SLOW_SYNC: Duration = Duration::from_millis(2_500);
/// How much slower than the Gmail timeout ([`GMAIL_TIMEOUT_SECS`]) a [`GmailFault::Timeout`]
/// answers.
const BEYOND_TIMEOUT: Duration = Duration::from_secs(4);
const GMAIL_TIMEOUT_SECS: &str = "3";
/// The first mailbox of every [`BIG_EVERY`] starts this close below 2^53, so its historyIds
/// cross 2^53 with its first changes (I3: Lua numbers would lose precision there).
const BIG_START: u64 = (1 << 53) - 3;
const BIG_EVERY: usize = 4;

/// How to start a worker: the product binary with `run`, or an example re-executing itself.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub exe: PathBuf,
    pub args: Vec<String>,
}

/// One run's shape.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub scenario: Scenario,
    pub seed: u64,
    pub traffic: Duration,
    pub workers: usize,
    /// Changes per second, over all mailboxes.
    pub rate: u32,
}

/// The mailbox names of a run; create them with [`create_mailboxes`], then register them.
pub fn mailbox_names(label: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{label}{i}@faults.example"))
        .collect()
}

/// The suite's worker settings (the proxy's address is added per run).
fn suite_env() -> Vec<(String, String)> {
    [
        ("GMAIL_SYNC_MAILBOX_LEASE_MS", LEASE_MS.to_string()),
        (
            "GMAIL_SYNC_FALLBACK_SILENCE_SECS",
            FALLBACK_SILENCE_SECS.into(),
        ),
        ("GMAIL_SYNC_CLAIM_TIMEOUT_SECS", CLAIM_TIMEOUT_SECS.into()),
        ("GMAIL_SYNC_FALLBACK_JITTER_SECS", "2".into()),
        ("GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS", "10".into()),
        ("GMAIL_SYNC_GMAIL_TIMEOUT_SECS", GMAIL_TIMEOUT_SECS.into()),
        // A summary line a second: a SIGKILLed worker's received count is at most 1 s old.
        ("GMAIL_SYNC_SUMMARY_INTERVAL_SECS", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Prepares a bed for [`run`] before its mailboxes are registered: the suite's worker settings
/// go into the bed's environment (registration schedules each mailbox's first fallback look
/// with the *registering* configuration's silence, so it must be the suite's, not the 15 min
/// default), and the mailboxes are created in the simulator ([`create_mailboxes`]).
pub fn prepare(tb: &mut Testbed, names: &[String]) {
    tb.worker_env.extend(suite_env());
    create_mailboxes(tb, names);
}

/// Creates the mailboxes in the simulator: every [`BIG_EVERY`]th starts just below 2^53.
pub fn create_mailboxes(tb: &Testbed, names: &[String]) {
    for (i, m) in names.iter().enumerate() {
        if tb.sim.has_mailbox(m) {
            continue;
        }
        if i % BIG_EVERY == 0 {
            tb.sim.add_mailbox_at(m, BIG_START);
        } else {
            tb.sim.add_mailbox(m);
        }
    }
}

/// A worker that is gone: what it said it received.
struct Gone {
    received: u64,
}

/// The running workers and the record of every one that ran.
struct Fleet<'a> {
    tb: &'a Testbed,
    cmd: &'a WorkerCommand,
    env: Vec<(String, String)>,
    /// Every worker reaches the emulator through a lane of its own (see [`CutProxy`]).
    proxy: &'a CutProxy,
    /// The lane of each live worker, by PID.
    lanes: HashMap<u32, LaneId>,
    live: Vec<WorkerProcess>,
    gone: Vec<Gone>,
    started: usize,
    /// Workers SIGTERMed that did not exit 0 in time: `name: status`.
    bad_exits: Vec<String>,
}

impl<'a> Fleet<'a> {
    fn overrides(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// Starts `n` workers at once, each on a proxy lane of its own, then waits until each is
    /// ready.
    async fn grow(&mut self, n: usize) -> Result<()> {
        let mut new = Vec::new();
        for _ in 0..n {
            self.started += 1;
            let name = format!("w{}", self.started);
            let args: Vec<&str> = self.cmd.args.iter().map(String::as_str).collect();
            let (lane, host_port) = self.proxy.open_lane().await?;
            let mut overrides = self.overrides();
            overrides.push(("PUBSUB_EMULATOR_HOST", &host_port));
            let spawned = self
                .tb
                .spawn_worker(&self.cmd.exe, &args, &name, &overrides);
            let worker = match spawned {
                Ok(w) => w,
                Err(e) => {
                    self.proxy.close_lane(lane);
                    return Err(e);
                }
            };
            self.lanes.insert(worker.pid(), lane);
            new.push(worker);
        }
        for w in &new {
            w.wait_ready(READY_TIMEOUT).await?;
        }
        self.live.extend(new);
        Ok(())
    }

    fn take(&mut self, index: usize) -> WorkerProcess {
        self.live.remove(index)
    }

    fn lane_of(&self, index: usize) -> Result<LaneId> {
        let pid = self.live[index].pid();
        self.lanes
            .get(&pid)
            .copied()
            .ok_or_else(|| anyhow!("worker {pid} has no proxy lane"))
    }

    /// Closes a gone worker's lane: whatever the proxy still held for it is never sent.
    fn close_lane(&mut self, pid: u32) {
        if let Some(lane) = self.lanes.remove(&pid) {
            self.proxy.close_lane(lane);
        }
    }

    fn index_of_pid(&self, pid: u32) -> Option<usize> {
        self.live.iter().position(|w| w.pid() == pid)
    }

    fn kill(&mut self, index: usize) {
        let w = self.take(index);
        w.kill();
        self.close_lane(w.pid());
        self.gone.push(Gone {
            received: received(&w),
        });
    }

    /// SIGTERM; P6 wants exit code 0 within [`EXIT_BOUND`].
    async fn terminate(&mut self, index: usize) {
        let w = self.take(index);
        let status = w.terminate(EXIT_BOUND).await;
        self.close_lane(w.pid());
        if status.and_then(|s| s.code()) != Some(0) {
            self.bad_exits.push(format!(
                "{}: {status:?}; log tail:\n{}",
                w.name(),
                w.log_tail(15)
            ));
        }
        self.gone.push(Gone {
            received: received(&w),
        });
    }
}

/// The `received` counter of the worker's last summary line (0 if none yet).
fn received(w: &WorkerProcess) -> u64 {
    let log = std::fs::read_to_string(w.log_path()).unwrap_or_default();
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("received").and_then(serde_json::Value::as_u64))
        .unwrap_or(0)
}

/// Runs `opts.scenario` on `tb`, whose `mailboxes` are created ([`create_mailboxes`]) and
/// registered. The bed must have the Redis [`Scenario::redis`] names: a server of its own
/// for the Redis scenarios, a cluster with replicas for the failovers.
pub async fn run(
    tb: &Testbed,
    mailboxes: &[String],
    cmd: &WorkerCommand,
    opts: &RunOptions,
) -> Result<Row> {
    let schedule = Schedule::generate(opts.scenario, opts.seed, opts.traffic, opts.workers);
    let upstream: SocketAddr = tb
        .emulator
        .host_port()
        .parse()
        .context("the emulator's address")?;
    let tap = Arc::new(AckTap::new(tb.keys(), tb.connector()?));
    let proxy = CutProxy::start_tapped(upstream, tap.clone()).await?;
    let mut env: Vec<(String, String)> = suite_env();
    env.push(("PUBSUB_EMULATOR_HOST".into(), proxy.host_port()));
    let mut fleet = Fleet {
        tb,
        cmd,
        env,
        proxy: &proxy,
        lanes: HashMap::new(),
        live: Vec::new(),
        gone: Vec::new(),
        started: 0,
        bad_exits: Vec::new(),
    };
    let ledger_start = tb.sim.ledger_len();
    if let Err(e) = fleet.grow(opts.workers).await {
        // Every started process is stopped by its guard as `fleet` drops.
        return Err(e.context("starting the workers"));
    }

    let stop = CancellationToken::new();
    let samples = Arc::new(Mutex::new(CursorSamples::default()));
    let traffic_rng = StdRng::seed_from_u64(opts.seed ^ TRAFFIC_SEED_SALT);
    let (_, (), outcome) = tokio::join!(
        traffic(
            tb,
            mailboxes,
            opts.rate,
            traffic_rng,
            stop.clone(),
            opts.traffic
        ),
        monitor::run(tb, mailboxes.to_vec(), samples.clone(), stop.clone()),
        async {
            let out = sequence(&mut fleet, &schedule, mailboxes, opts, &tap).await;
            stop.cancel();
            out
        }
    );
    let sequenced = outcome;
    // Final SIGTERM of every worker (P6), also when the sequence failed.
    while !fleet.live.is_empty() {
        fleet.terminate(0).await;
    }
    proxy.shutdown().await;
    let Sequenced {
        faults,
        extra_messages,
        drain_secs,
        acks,
        mut details,
        observed,
    } = sequenced?;
    let mut witnessed = observed.cursors;

    let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (m, seen) in &samples.seen {
        witnessed.entry(m.clone()).or_default().extend(seen);
    }
    let ledger = tb.sim.ledger_since(ledger_start);
    let changes = ledger
        .iter()
        .filter(|e| matches!(e, crate::gmail::LedgerEntry::Change(c) if c.has_record()))
        .count();
    let notifications = ledger
        .iter()
        .filter(|e| {
            matches!(e, crate::gmail::LedgerEntry::Notification(n)
                if matches!(n.outcome, NotificationOutcome::Published(_)))
        })
        .count();
    let streams = compare_streams(tb, &witnessed).await?;
    details.extend(streams.details);
    let (in_loss_windows, regressions): (Vec<&Regression>, Vec<&Regression>) =
        samples.regressions.iter().partition(|r| {
            observed
                .loss_windows
                .iter()
                .any(|(from, to)| *from <= r.at && r.at <= *to)
        });
    details.extend(regressions.iter().map(|r| format!("P3 {r}")));
    // The lossy kills' lost writes: the driver's reads around each kill see them, the monitor
    // (inside the window) usually too. Counted by mailbox over the run.
    let mut lost: Vec<&Regression> = observed.lost_writes.iter().chain(in_loss_windows).collect();
    // A loss both saw alike is described once.
    lost.sort_by_key(|r| (&r.mailbox, r.before, r.after));
    lost.dedup_by_key(|r| (&r.mailbox, r.before, r.after));
    let lost_mailboxes: BTreeSet<&str> = lost.iter().map(|r| r.mailbox.as_str()).collect();
    details.extend(
        lost.iter()
            .map(|r| format!("lost write (a lossy kill, expected): {r}")),
    );
    // An ack the tap judged after such a loss, of a notification the lost commit had covered,
    // followed its commit: Redis acknowledged the commit, then lost it. Not P4.
    let (acks_of_lost_commits, early_acks): (Vec<_>, Vec<_>) = acks.early.iter().partition(|e| {
        lost.iter().any(|l| {
            e.mailbox.as_deref() == Some(l.mailbox.as_str())
                && e.history_id.is_some_and(|h| h <= l.before)
                && l.after <= e.cursor
        })
    });
    let early_beyond_kept = acks.early_acks - acks.early.len() as u64;
    details.extend(early_acks.iter().take(DESCRIBED).map(|e| format!("P4 {e}")));
    details.extend(
        acks_of_lost_commits
            .iter()
            .map(|e| format!("ack of a lost commit (a lossy kill, expected): {e}")),
    );
    details.extend(fleet.bad_exits.iter().map(|b| format!("P6 {b}")));
    details.extend(acks.details.iter().cloned());
    if acks.unjudged + acks.undecoded + acks.unknown_acks > 0 {
        details.push(format!(
            "ack tap: {} acks passed unjudged (Redis away), {} gRPC reads undecoded, {} acks \
             of ack ids never delivered",
            acks.unjudged, acks.undecoded, acks.unknown_acks
        ));
    }
    let violations = Violations {
        p1_lost: streams.lost,
        p2_duplicate: streams.duplicate,
        p3_cursor_regressed: regressions.len() as u64,
        p4_ack_before_commit: early_acks.len() as u64 + early_beyond_kept,
        p5_not_drained: u64::from(drain_secs.is_none()) + acks.held_by_live,
        p6_bad_exit: fleet.bad_exits.len() as u64,
    };
    Ok(Row {
        scenario: opts.scenario,
        seed: opts.seed,
        traffic_secs: opts.traffic.as_secs(),
        workers: opts.workers,
        mailboxes: mailboxes.len(),
        changes,
        notifications,
        extra_messages,
        faults,
        violations,
        drain_secs,
        received_by_workers: fleet.gone.iter().map(|g| g.received).sum(),
        writes_lost: lost_mailboxes.len() as u64,
        worker_processes: fleet.started,
        resyncs: streams.resyncs,
        listed: streams.listed,
        cursor_rounds: samples.rounds,
        cursor_rounds_failed: samples.failed_rounds,
        acks,
        details,
    })
}

/// Keeps the traffic's random stream apart from the schedule's (same seed, other numbers).
const TRAFFIC_SEED_SALT: u64 = 0x7261_6666_6963;

/// Seeded changes until `stop` or the end of the traffic window: mostly single deliveries to
/// a random mailbox, some bursts of three.
async fn traffic(
    tb: &Testbed,
    mailboxes: &[String],
    rate: u32,
    mut rng: StdRng,
    stop: CancellationToken,
    length: Duration,
) {
    let end = Instant::now() + length;
    let per_tick = (rate / TICKS_PER_SEC).max(1);
    while Instant::now() < end {
        for _ in 0..per_tick {
            let m = &mailboxes[rng.random_range(0..mailboxes.len())];
            if rng.random_bool(0.1) {
                tb.sim.burst(m, 3);
            } else {
                tb.sim.deliver(m, &["INBOX", "UNREAD"]);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

/// What the fault sequence hands back.
struct Sequenced {
    faults: BTreeMap<String, u64>,
    extra_messages: u64,
    drain_secs: Option<f64>,
    /// The ack tap's record, taken after the acks settled.
    acks: AckSummary,
    details: Vec<String>,
    observed: Observed,
}

/// Committed cursor values read during a run, per mailbox.
type Witnessed = BTreeMap<String, BTreeSet<u64>>;

/// What the injector noted for the checks.
#[derive(Default)]
struct Observed {
    /// Cursors read at the history faults, per mailbox (see [`crate::check::resync`]).
    cursors: Witnessed,
    /// From the start of each lossy kill until [`cluster::LOSS_SEEN_WITHIN`] after its
    /// promotion: a cursor regression inside is that kill's lost write, not a P3 violation.
    loss_windows: Vec<(Instant, Instant)>,
    /// Each cursor a lossy kill moved back (read just before the kill and after the
    /// promotion).
    lost_writes: Vec<Regression>,
}

/// Something a timed fault must undo later.
enum Undo {
    Resume(u32),
    RedisMemory,
    NotifyDrop,
    HistoryLag,
    /// Start the killed cluster node on this port again.
    RestartNode(u16),
    /// The mailbox's history retention back to the simulator's default.
    Retention(String),
}

/// Applies the schedule, undoes what is timed, waits for the traffic to end, brings the fleet
/// back to its size, and measures the drain.
async fn sequence(
    fleet: &mut Fleet<'_>,
    schedule: &Schedule,
    mailboxes: &[String],
    opts: &RunOptions,
    tap: &AckTap,
) -> Result<Sequenced> {
    let tb = fleet.tb;
    let start = Instant::now();
    let mut faults = BTreeMap::new();
    let mut pending: Vec<(Instant, Undo)> = Vec::new();
    let mut extra = 0u64;
    let mut details = Vec::new();
    let mut observed = Observed::default();
    let publisher = pubsub::publisher(&tb.emulator.endpoint(), &tb.topic.topic).await?;
    for (at, fault) in &schedule.events {
        wait_until(start + *at, &mut pending, fleet).await?;
        let applied = apply(
            fleet,
            fault,
            &publisher,
            &mut pending,
            mailboxes,
            &mut observed,
        );
        match applied.await {
            Ok(n) => {
                extra += n;
                *faults.entry(fault.label()).or_insert(0) += 1;
            }
            Err(e) => details.push(format!("could not inject {}: {e:#}", fault.label())),
        }
    }
    wait_until(start + opts.traffic, &mut pending, fleet).await?;
    let traffic_end = Instant::now();
    // Undo whatever is still on, and leave no Gmail rule behind.
    for (_, undo) in pending.drain(..) {
        undo_now(fleet, undo).await?;
    }
    tb.sim.clear_faults();
    // The fleet back to its size (kills and scale-downs may have left it short).
    while fleet.live.len() > opts.workers {
        let last = fleet.live.len() - 1;
        fleet.terminate(last).await;
    }
    if fleet.live.len() < opts.workers {
        let n = opts.workers - fleet.live.len();
        fleet.grow(n).await?;
    }
    let drain_secs = match tb.wait_caught_up(DRAIN_BOUND).await {
        Ok(()) => Some(traffic_end.elapsed().as_secs_f64()),
        Err(behind) => {
            details.push(format!("P5 not drained within {DRAIN_BOUND:?}: {behind}"));
            None
        }
    };
    // With the backlog drained, every delivery a live worker holds must be acked soon (P5);
    // without a drain, what is held is expected and P5 already counts.
    let acks = if drain_secs.is_some() {
        settle_acks(tap, fleet.proxy).await
    } else {
        tap.summary(&fleet.proxy.open_lanes())
    };
    Ok(Sequenced {
        faults,
        extra_messages: extra,
        drain_secs,
        acks,
        details,
        observed,
    })
}

/// Sleeps until `when`, undoing timed faults as they come due.
async fn wait_until(
    when: Instant,
    pending: &mut Vec<(Instant, Undo)>,
    fleet: &mut Fleet<'_>,
) -> Result<()> {
    loop {
        let now = Instant::now();
        pending.sort_by_key(|(t, _)| *t);
        if let Some((due, _)) = pending.first()
            && *due <= now
        {
            let (_, undo) = pending.remove(0);
            undo_now(fleet, undo).await?;
            continue;
        }
        if now >= when {
            return Ok(());
        }
        let next = pending.first().map_or(when, |(t, _)| (*t).min(when));
        tokio::time::sleep(next - now).await;
    }
}

async fn undo_now(fleet: &mut Fleet<'_>, undo: Undo) -> Result<()> {
    let tb = fleet.tb;
    match undo {
        Undo::Resume(pid) => {
            if let Some(i) = fleet.index_of_pid(pid) {
                fleet.live[i].resume();
            }
        }
        Undo::RedisMemory => {
            let mut con = tb.connect_single().await?;
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg("0")
                .query_async(&mut con)
                .await?;
        }
        Undo::NotifyDrop => tb.sim.set_notify_drop_probability(0.0),
        Undo::HistoryLag => tb.sim.set_history_lag(Duration::ZERO),
        Undo::RestartNode(port) => cluster::restart_node(tb, port).await?,
        Undo::Retention(mailbox) => tb.sim.set_history_retention(&mailbox, None),
    }
    Ok(())
}

/// The injector: applies one fault; returns how many messages it published itself.
async fn apply(
    fleet: &mut Fleet<'_>,
    fault: &Fault,
    publisher: &google_cloud_pubsub::client::Publisher,
    pending: &mut Vec<(Instant, Undo)>,
    mailboxes: &[String],
    observed: &mut Observed,
) -> Result<u64> {
    let tb = fleet.tb;
    let pick = |fleet: &Fleet<'_>| -> Result<usize> {
        if fleet.live.is_empty() {
            return Err(anyhow!("no worker is running"));
        }
        Ok(rand::random_range(0..fleet.live.len()))
    };
    match fault {
        Fault::KillSyncing => {
            let (rule, holder) = slow_sync_holder(fleet).await;
            let index = match holder {
                Some(i) => i,
                None => pick(fleet)?,
            };
            fleet.kill(index);
            tb.sim.remove_fault(rule);
            fleet.grow(1).await?;
        }
        Fault::KillRandom => {
            let i = pick(fleet)?;
            fleet.kill(i);
            fleet.grow(1).await?;
        }
        Fault::KillAfterCommit => {
            let i = pick(fleet)?;
            pinned::kill_after_commit(fleet, i).await?;
            fleet.grow(1).await?;
        }
        Fault::Pause { millis } => {
            let i = pick(fleet)?;
            fleet.live[i].pause();
            let pid = fleet.live[i].pid();
            pending.push((
                Instant::now() + Duration::from_millis(*millis),
                Undo::Resume(pid),
            ));
        }
        Fault::TermSyncing => {
            let (rule, holder) = slow_sync_holder(fleet).await;
            let index = match holder {
                Some(i) => i,
                None => pick(fleet)?,
            };
            fleet.terminate(index).await;
            tb.sim.remove_fault(rule);
            fleet.grow(1).await?;
        }
        Fault::ScaleTo { workers } => {
            if *workers > fleet.live.len() {
                let n = workers - fleet.live.len();
                fleet.grow(n).await?;
            }
            while fleet.live.len() > *workers {
                let last = fleet.live.len() - 1;
                fleet.terminate(last).await;
            }
        }
        Fault::RedisRestart => {
            let server = tb
                .redis
                .server()
                .ok_or_else(|| anyhow!("redis-restart needs a single Redis server"))?;
            let mut admin = tb.connect_single().await?;
            // SHUTDOWN SAVE writes dump.rdb; the restart on the same port loads it. The call
            // itself fails (the server closes the connection): that is the expected answer.
            let _ = redis::cmd("SHUTDOWN")
                .arg("SAVE")
                .query_async::<()>(&mut admin)
                .await;
            tokio::task::block_in_place(|| server.restart())?;
        }
        Fault::RedisOom { millis } => {
            let mut con = tb.connect_single().await?;
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory-policy")
                .arg("noeviction")
                .query_async(&mut con)
                .await?;
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg("1")
                .query_async(&mut con)
                .await?;
            pending.push((
                Instant::now() + Duration::from_millis(*millis),
                Undo::RedisMemory,
            ));
        }
        Fault::RedisPause { millis } => {
            let mut con = tb.connect_single().await?;
            let _: () = redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(*millis)
                .arg("ALL")
                .query_async(&mut con)
                .await?;
        }
        Fault::Duplicates { n } | Fault::Reorder { n } => {
            let mut payloads = recent_payloads(tb, *n);
            if matches!(fault, Fault::Reorder { .. }) {
                payloads.reverse();
            }
            for p in &payloads {
                pubsub::publish_raw(publisher, p.as_bytes()).await?;
            }
            return Ok(payloads.len() as u64);
        }
        Fault::Storm { copies } => {
            let Some(p) = recent_payloads(tb, 1).pop() else {
                return Ok(0);
            };
            for _ in 0..*copies {
                pubsub::publish_raw(publisher, p.as_bytes()).await?;
            }
            return Ok(*copies as u64);
        }
        Fault::Poison => {
            let big = "x".repeat(5_000);
            let poison: [&[u8]; 4] = [
                b"not json at all",
                br#"{"emailAddress": 17, "historyId": "x"}"#,
                big.as_bytes(),
                br#"{"emailAddress":"nobody@unregistered.example","historyId":"5"}"#,
            ];
            for p in poison {
                pubsub::publish_raw(publisher, p).await?;
            }
            return Ok(poison.len() as u64);
        }
        Fault::Gmail { kind, calls } => {
            let action = match kind {
                GmailFault::TooManyRequests => FaultAction::too_many_requests(1),
                GmailFault::RateLimit403 => {
                    FaultAction::rate_limit_403("userRateLimitExceeded", Some(1))
                }
                GmailFault::ServerError => FaultAction::status(503),
                GmailFault::Hang => FaultAction::Hang,
                GmailFault::Timeout => FaultAction::latency(BEYOND_TIMEOUT),
            };
            tb.sim
                .inject(FaultRule::new(Some(Endpoint::HistoryList), action).times(*calls));
        }
        Fault::DropNotifications { percent, millis } => {
            tb.sim
                .set_notify_drop_probability(f64::from(*percent) / 100.0);
            pending.push((
                Instant::now() + Duration::from_millis(*millis),
                Undo::NotifyDrop,
            ));
        }
        Fault::HistoryLag { lag_ms, millis } => {
            tb.sim.set_history_lag(Duration::from_millis(*lag_ms));
            pending.push((
                Instant::now() + Duration::from_millis(*millis),
                Undo::HistoryLag,
            ));
        }
        Fault::StreamCut => fleet.proxy.cut().await,
        Fault::RedisFailover { shard } => {
            cluster::fail_over(tb, *shard, Failover::Graceful).await?;
        }
        Fault::RedisMasterKill { shard, down_ms } => {
            let promotion = cluster::fail_over(tb, *shard, Failover::Forced).await?;
            pending.push((
                Instant::now() + Duration::from_millis(*down_ms),
                Undo::RestartNode(promotion.old_master),
            ));
        }
        Fault::RedisLossyKill {
            shard,
            down_ms,
            behind_ms,
        } => {
            let from = Instant::now();
            let behind = Duration::from_millis(*behind_ms);
            let kill = cluster::fail_over_unreplicated(tb, *shard, behind, mailboxes).await?;
            observed
                .loss_windows
                .push((from, Instant::now() + cluster::LOSS_SEEN_WITHIN));
            observed.lost_writes.extend(kill.lost);
            pending.push((
                Instant::now() + Duration::from_millis(*down_ms),
                Undo::RestartNode(kill.promotion.old_master),
            ));
        }
        Fault::ExpireHistory { mailbox } => {
            let m = history_mailbox(mailboxes, *mailbox)?;
            witness_cursor(tb, m, &mut observed.cursors).await;
            tb.sim.deliver_and_expire(m, &["INBOX", "UNREAD"]);
        }
        Fault::ShortRetention {
            mailbox,
            retention_ms,
            millis,
        } => {
            let m = history_mailbox(mailboxes, *mailbox)?;
            witness_cursor(tb, m, &mut observed.cursors).await;
            tb.sim
                .set_history_retention(m, Some(Duration::from_millis(*retention_ms)));
            pending.push((
                Instant::now() + Duration::from_millis(*millis),
                Undo::Retention(m.clone()),
            ));
        }
    }
    Ok(0)
}

/// Slows history.list, then waits (≤ [`FIND_SYNC`]) for a mailbox lease held by one of the
/// fleet's workers: the index of that worker (in the middle of a sync, before its commit).
/// The slowing rule stays until the caller removes it.
async fn slow_sync_holder(fleet: &Fleet<'_>) -> (FaultId, Option<usize>) {
    let tb = fleet.tb;
    let rule = tb.sim.inject(FaultRule::new(
        Some(Endpoint::HistoryList),
        FaultAction::latency(SLOW_SYNC),
    ));
    let deadline = Instant::now() + FIND_SYNC;
    while Instant::now() < deadline {
        if let Some(i) = lease_holder(fleet).await {
            return (rule, Some(i));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (rule, None)
}

/// A worker of the fleet that holds a mailbox lease now (the value is `HOST:PID:RANDOM`).
async fn lease_holder(fleet: &Fleet<'_>) -> Option<usize> {
    let tb = fleet.tb;
    let keys = tb.lease_keys().await.ok()?;
    let mut con = tb.connect().await.ok()?;
    for key in keys {
        let holder: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut con)
            .await
            .ok()?;
        let pid = holder.and_then(|h| h.split(':').nth(1)?.parse::<u32>().ok());
        if let Some(i) = pid.and_then(|p| fleet.index_of_pid(p)) {
            return Some(i);
        }
    }
    None
}

/// The payloads of the last `n` notifications the simulator published.
fn recent_payloads(tb: &Testbed, n: usize) -> Vec<String> {
    let ledger = tb.sim.ledger();
    let mut out: Vec<String> = ledger
        .notifications()
        .into_iter()
        .rev()
        .filter(|e| matches!(e.outcome, NotificationOutcome::Published(_)))
        .take(n)
        .map(|e| e.payload.clone())
        .collect();
    out.reverse();
    out
}

/// Waits (≤ [`ACK_SETTLE`]) until no live worker holds a delivery unacked; the tap's record
/// then.
async fn settle_acks(tap: &AckTap, proxy: &CutProxy) -> AckSummary {
    let deadline = Instant::now() + ACK_SETTLE;
    loop {
        let summary = tap.summary(&proxy.open_lanes());
        if summary.held_by_live == 0 || Instant::now() >= deadline {
            return summary;
        }
        tokio::time::sleep(ACK_POLL).await;
    }
}

/// The mailbox a history fault targets: `nth` modulo the run's mailboxes.
fn history_mailbox(mailboxes: &[String], nth: usize) -> Result<&String> {
    if mailboxes.is_empty() {
        return Err(anyhow!("no mailboxes"));
    }
    Ok(&mailboxes[nth % mailboxes.len()])
}

/// Records the mailbox's committed cursor as a witness (everything up to it was synced and
/// must stay). Redis away (a mixed run) only means one witness less.
async fn witness_cursor(tb: &Testbed, mailbox: &str, witnessed: &mut Witnessed) {
    if let Ok(Some(c)) = tb.cursor(mailbox).await {
        witnessed.entry(mailbox.to_string()).or_default().insert(c);
    }
}

/// P1 and P2: the change streams against the ledger by [`check::resync::compare`] (exact
/// below each mailbox's committed cursor, resyncs accepted where Gmail answered 404, and what
/// was synced before one kept; `witnessed` holds the cursors read during the run).
async fn compare_streams(tb: &Testbed, witnessed: &Witnessed) -> Result<check::resync::Verdict> {
    let entries: Vec<StreamEntry> = tb.entries().await?.into_iter().map(|e| e.fields).collect();
    let mut con = tb.connect().await?;
    let mut cursors = BTreeMap::new();
    for email in tb.baselines.keys() {
        // Changes beyond the cursor are not lost but not synced yet: P5 counts those.
        let cursor: Option<u64> = redis::cmd("HGET")
            .arg(tb.keys().state(email))
            .arg("cursor")
            .query_async::<Option<String>>(&mut con)
            .await?
            .and_then(|c| c.parse().ok());
        if let Some(c) = cursor {
            cursors.insert(email.clone(), c);
        }
    }
    Ok(check::resync::compare(
        &tb.sim.ledger(),
        &entries,
        &tb.baselines,
        &cursors,
        witnessed,
    ))
}
