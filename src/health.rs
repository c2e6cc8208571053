//! Liveness and readiness without a port: the worker keeps files in `GMAIL_SYNC_HEALTH_DIR`,
//! and `gmail-sync health --live|--ready` (a Kubernetes exec probe) checks them.
//!
//! - `live`: the epoch second of the last heartbeat. The health task rewrites it (at most
//!   every [`ROUND`]) only while the worker's loops keep turning: the dispatcher loop bumps a
//!   shared counter on every turn and at least every 5 s when idle, the scheduler on every
//!   tick. The dispatcher loop never waits for Redis or Gmail (syncs run in their own tasks),
//!   so an outage of either slows work down but never stops the heartbeat: liveness fails
//!   only when the process itself is stuck, and never restarts every pod at once because a
//!   dependency is down. The probe fails when the heartbeat is older than its
//!   `--max-heartbeat-age` ([`MAX_HEARTBEAT_AGE`] by default).
//! - `ready`: present while all of these hold, re-judged every [`ROUND`] ([`judge`]):
//!   - the Pub/Sub stream is open: the reader is pulling from it, and Pub/Sub answered since
//!     it opened and within [`PUBSUB_STALE_AFTER`] (a delivered message, or the periodic
//!     subscription check: see [`PubSubLink`] for why this is the nearest observable signal);
//!   - Redis answered a PING within [`REDIS_STALE_AFTER`];
//!   - the failure guard sees no mass failure (a configuration problem: see `failure_guard`);
//!   - shutdown has not begun ([`Health::mark_not_ready`], called at the first moment of the
//!     stop, so probes see it before the drain).
//! - `not-ready`: while `ready` is absent, why (one line), for the probe's message.
//!
//! All files are removed when `run` starts ([`Health::reset`]): files left by a crashed or
//! killed process must not make the restarted container look live or ready while it is still
//! connecting.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A heartbeat older than this fails the probes (the default of `--max-heartbeat-age`): six
/// idle periods of the dispatcher loop (5 s), so a slow scheduling round or a busy node never
/// fails it, while a stuck process is caught within half a minute.
pub const MAX_HEARTBEAT_AGE: Duration = Duration::from_secs(30);
/// The smallest `--max-heartbeat-age` the probe accepts: two idle periods of the dispatcher
/// loop. Below it a healthy idle worker would fail its liveness probe between two beats.
pub const MIN_HEARTBEAT_AGE: Duration = Duration::from_secs(10);
/// How often the health task rewrites `live` (if the heartbeat advanced) and re-judges
/// readiness: the files follow the worker within a second.
const ROUND: Duration = Duration::from_secs(1);
/// How often the health task PINGs Redis. Cheap (one round trip on the multiplexed connection
/// every worker already holds), frequent enough that readiness follows an outage in seconds.
const REDIS_PING_PERIOD: Duration = Duration::from_secs(5);
/// A PING without an answer after this long counts as failed (the store's own response
/// timeout is 5 s; a Redis that takes longer than this to answer PING is not serving us).
const REDIS_PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Not ready once Redis has not answered for this long: three PING periods, so one slow or
/// lost answer does not flap readiness, while an outage shows within 15–20 s.
pub(crate) const REDIS_STALE_AFTER: Duration = Duration::from_secs(15);
/// How often Pub/Sub must answer while no message arrives: the subscription check (one
/// `GetSubscription` call, same endpoint and credentials as the stream) runs when the last
/// answer is this old. A busy stream proves itself with its messages and is never checked.
const PUBSUB_CHECK_PERIOD: Duration = Duration::from_secs(30);
/// A subscription check without an answer after this long counts as failed.
const PUBSUB_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed check, the next one comes this much later (not a whole period: readiness
/// should come back soon after Pub/Sub does, e.g. right after startup).
const PUBSUB_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Not ready once Pub/Sub has not answered for this long: more than two check periods plus a
/// timeout, so a quiet stream whose check is slow or lost once never flaps readiness, while
/// an outage shows within about a minute and a quarter.
pub(crate) const PUBSUB_STALE_AFTER: Duration = Duration::from_secs(75);

const LIVE: &str = "live";
const LIVE_TMP: &str = "live.tmp";
const READY: &str = "ready";
const NOT_READY: &str = "not-ready";
const NOT_READY_TMP: &str = "not-ready.tmp";

/// When something last happened (monotonic), shared between the task that sees it and the
/// health task.
#[derive(Clone, Debug, Default)]
pub(crate) struct Moment(Arc<Mutex<Option<Instant>>>);

impl Moment {
    fn set(&self, at: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }

    pub(crate) fn mark(&self) {
        self.set(Some(Instant::now()));
    }

    pub(crate) fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the Pub/Sub side tells the health task: whether the reader is pulling from an open
/// stream, and when Pub/Sub last answered.
///
/// Why not the stream's own connection state: google-cloud-pubsub's `MessageStream` does not
/// expose one. It opens the StreamingPull RPC lazily on the first `next()`, retries transient
/// failures to open or resume it internally (forever, with backoff), and swallows the
/// server's heartbeats (empty responses); `next()` only ever yields a message or a permanent
/// error. So the nearest observable facts are used: the reader has called `next()` on the
/// stream and it has not ended or failed ([`Self::opened`] / [`Self::closed`]), and since then
/// Pub/Sub answered, either with a message ([`Self::answered`], by the reader) or to the
/// subscription check the health task makes when no message came for
/// [`PUBSUB_CHECK_PERIOD`] (same endpoint, same credentials, same subscription).
#[derive(Clone, Debug, Default)]
pub struct PubSubLink {
    opened: Moment,
    answered: Moment,
}

impl PubSubLink {
    /// The reader starts pulling from the stream.
    pub(crate) fn opened(&self) {
        self.opened.mark();
    }

    /// The reader stopped pulling (the stream ended, failed, or shutdown began).
    pub(crate) fn closed(&self) {
        self.opened.set(None);
    }

    /// Pub/Sub answered: a message was delivered, or the subscription check passed.
    pub(crate) fn answered(&self) {
        self.answered.mark();
    }
}

/// Why the worker is not ready; the text is what the probe prints.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotReady {
    #[error("shutting down")]
    Stopping,
    #[error("the Pub/Sub stream is not open")]
    StreamNotOpen,
    #[error("Pub/Sub has not answered since the stream opened")]
    PubSubNotYet,
    #[error("Pub/Sub has not answered for {} s", PUBSUB_STALE_AFTER.as_secs())]
    PubSubSilent,
    #[error("Redis has not answered a PING yet")]
    RedisNotYet,
    #[error("Redis has not answered a PING for {} s", REDIS_STALE_AFTER.as_secs())]
    RedisSilent,
    #[error("{0}")]
    MassFailure(String),
}

/// What readiness is judged on, read once per round.
#[derive(Clone, Debug)]
pub(crate) struct Signals {
    pub now: Instant,
    /// When the reader started pulling from the current stream; `None` while it is not.
    pub stream_opened: Option<Instant>,
    /// When Pub/Sub last answered (a message or the subscription check).
    pub pubsub_answered: Option<Instant>,
    /// When Redis last answered a PING.
    pub redis_answered: Option<Instant>,
    /// The failure guard's trip, in words; `None` if not tripped.
    pub mass_failure: Option<String>,
}

fn fresh(now: Instant, at: Instant, bound: Duration) -> bool {
    now.saturating_duration_since(at) <= bound
}

/// Ready, or the first reason not to be (in the order an operator should look at them).
pub(crate) fn judge(s: &Signals) -> Result<(), NotReady> {
    let Some(opened) = s.stream_opened else {
        return Err(NotReady::StreamNotOpen);
    };
    match s.pubsub_answered {
        Some(at) if at < opened => return Err(NotReady::PubSubNotYet),
        None => return Err(NotReady::PubSubNotYet),
        Some(at) if !fresh(s.now, at, PUBSUB_STALE_AFTER) => return Err(NotReady::PubSubSilent),
        Some(_) => {}
    }
    match s.redis_answered {
        None => return Err(NotReady::RedisNotYet),
        Some(at) if !fresh(s.now, at, REDIS_STALE_AFTER) => return Err(NotReady::RedisSilent),
        Some(_) => {}
    }
    match &s.mass_failure {
        Some(why) => Err(NotReady::MassFailure(why.clone())),
        None => Ok(()),
    }
}

/// Whether the subscription check should run now: only while the reader pulls, and when
/// Pub/Sub has not answered since the stream opened or for [`PUBSUB_CHECK_PERIOD`].
pub(crate) fn pubsub_check_due(
    now: Instant,
    stream_opened: Option<Instant>,
    answered: Option<Instant>,
) -> bool {
    match (stream_opened, answered) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(opened), Some(at)) => at < opened || !fresh(now, at, PUBSUB_CHECK_PERIOD),
    }
}

/// One check of a dependency: Ok if it answered.
pub(crate) type Check =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// What the health task asks and reads besides the heartbeat.
pub(crate) struct Checks {
    /// One PING to Redis.
    pub redis: Check,
    /// One subscription check (`GetSubscription`).
    pub pubsub: Check,
    /// The failure guard's trip, in words; `None` if not tripped.
    pub mass_failure: Box<dyn Fn() -> Option<String> + Send + Sync>,
    /// What the Pub/Sub reader reports.
    pub link: PubSubLink,
}

impl Checks {
    /// The production checks: PING through the worker's store, the subscription check
    /// through the startup check's client, the failure guard's trip.
    pub(crate) fn new(
        store: crate::store::Store,
        checker: crate::consumer::subscription::Checker,
        guard: crate::failure_guard::SharedGuard,
        link: PubSubLink,
    ) -> Checks {
        Checks {
            redis: Box::new(move || {
                let store = store.clone();
                Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
            }),
            pubsub: Box::new(move || {
                let checker = checker.clone();
                Box::pin(async move {
                    checker
                        .check(PUBSUB_CHECK_TIMEOUT)
                        .await
                        .map_err(|e| e.to_string())
                })
            }),
            mass_failure: Box::new(move || {
                guard.tripped().map(|trip| {
                    format!(
                        "{} of {} mailboxes seen fail with {:?}: a configuration problem",
                        trip.failing, trip.seen, trip.cause
                    )
                })
            }),
            link,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Health {
    dir: PathBuf,
    /// Set for good when shutdown begins: a later round must not bring the file back.
    stopping: Arc<AtomicBool>,
}

impl Health {
    pub fn new(dir: &Path) -> Health {
        Health {
            dir: dir.to_path_buf(),
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Removes every health file a previous process left (a crash or SIGKILL leaves `live` and
    /// `ready` behind) and records that the worker is starting: not live, not ready, until
    /// the health task has seen the loops turn and the dependencies answer.
    pub fn reset(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| anyhow::anyhow!("GMAIL_SYNC_HEALTH_DIR {}: {e}", self.dir.display()))?;
        for name in [READY, LIVE, LIVE_TMP, NOT_READY, NOT_READY_TMP] {
            match std::fs::remove_file(self.file(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(anyhow::anyhow!(
                        "cannot remove the stale health file {}: {e} (GMAIL_SYNC_HEALTH_DIR must \
                         be writable)",
                        self.file(name).display()
                    ));
                }
            }
        }
        self.write_reason("starting: connecting to Redis and Pub/Sub, checking credentials")?;
        Ok(())
    }

    /// Not ready, for good: shutdown has begun.
    pub fn mark_not_ready(&self) {
        self.stopping.store(true, SeqCst);
        let _ = std::fs::remove_file(self.file(READY));
        let _ = self.write_reason(&NotReady::Stopping.to_string());
    }

    fn write_reason(&self, why: &str) -> std::io::Result<()> {
        // Write then rename: a probe never reads a half-written file.
        let tmp = self.file(NOT_READY_TMP);
        std::fs::write(&tmp, format!("{why}\n"))?;
        std::fs::rename(tmp, self.file(NOT_READY))
    }

    fn beat(&self) -> std::io::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let tmp = self.file(LIVE_TMP);
        std::fs::write(&tmp, format!("{now}\n"))?;
        std::fs::rename(tmp, self.file(LIVE))
    }

    /// Makes the files say `verdict` (never `ready` once shutdown began); logs changes.
    fn follow(&self, verdict: Result<(), NotReady>, state: &mut FollowState) {
        let verdict = if self.stopping.load(SeqCst) {
            Err(NotReady::Stopping)
        } else {
            verdict
        };
        let changed = state.last.as_ref() != Some(&verdict);
        match &verdict {
            Ok(()) => {
                if changed || !self.file(READY).exists() {
                    if let Err(e) = std::fs::write(self.file(READY), b"ready\n") {
                        tracing::warn!(error = %e, "cannot write the readiness file");
                        return;
                    }
                    // Shutdown may have begun (and removed the file) while it was written.
                    if self.stopping.load(SeqCst) {
                        let _ = std::fs::remove_file(self.file(READY));
                        return;
                    }
                    let _ = std::fs::remove_file(self.file(NOT_READY));
                }
                if changed {
                    tracing::info!("ready");
                    state.ever_ready = true;
                }
            }
            Err(why) => {
                if changed {
                    let _ = std::fs::remove_file(self.file(READY));
                    if let Err(e) = self.write_reason(&why.to_string()) {
                        tracing::warn!(error = %e, "cannot write the not-ready file");
                    }
                    match why {
                        // Logged by the supervisor and the failure guard themselves.
                        NotReady::Stopping | NotReady::MassFailure(_) => {}
                        _ if state.ever_ready => tracing::warn!(why = %why, "not ready"),
                        _ => tracing::info!(why = %why, "not ready yet"),
                    }
                }
            }
        }
        state.last = Some(verdict);
    }

    /// The health task: rewrites `live` while `heartbeat` advances and keeps `ready` in step
    /// with the [`Checks`], every [`ROUND`]; PINGs Redis every [`REDIS_PING_PERIOD`] and checks
    /// the subscription when due, each bounded by its own timeout so neither ever delays the
    /// files.
    pub(crate) async fn keep_alive(
        self,
        heartbeat: Arc<AtomicU64>,
        checks: Checks,
        stop: CancellationToken,
    ) {
        let redis_answered = Moment::default();
        let files = async {
            let mut state = FollowState::default();
            let mut last_beat = 0;
            let mut round = tokio::time::interval(ROUND);
            round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = round.tick() => {}
                }
                // 0: the loops have not turned yet.
                let beat = heartbeat.load(Relaxed);
                if beat != last_beat {
                    last_beat = beat;
                    if let Err(e) = self.beat() {
                        tracing::warn!(error = %e, "cannot write the liveness file");
                    }
                }
                let signals = Signals {
                    now: Instant::now(),
                    stream_opened: checks.link.opened.get(),
                    pubsub_answered: checks.link.answered.get(),
                    redis_answered: redis_answered.get(),
                    mass_failure: (checks.mass_failure)(),
                };
                self.follow(judge(&signals), &mut state);
            }
        };
        let redis = async {
            let mut every = tokio::time::interval(REDIS_PING_PERIOD);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => {}
                }
                let answer = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = tokio::time::timeout(REDIS_PING_TIMEOUT, (checks.redis)()) => a,
                };
                match answer {
                    Ok(Ok(())) => {
                        redis_answered.mark();
                        if failing {
                            tracing::info!("Redis answers again");
                        }
                        failing = false;
                    }
                    Ok(Err(e)) if !failing => {
                        tracing::warn!(error = %e, "Redis does not answer PING");
                        failing = true;
                    }
                    Err(_) if !failing => {
                        tracing::warn!(
                            timeout_s = REDIS_PING_TIMEOUT.as_secs(),
                            "Redis does not answer PING in time"
                        );
                        failing = true;
                    }
                    _ => {}
                }
            }
        };
        let pubsub = async {
            let mut round = tokio::time::interval(ROUND);
            round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = round.tick() => {}
                }
                if !pubsub_check_due(
                    Instant::now(),
                    checks.link.opened.get(),
                    checks.link.answered.get(),
                ) {
                    continue;
                }
                let answer = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = tokio::time::timeout(PUBSUB_CHECK_TIMEOUT, (checks.pubsub)()) => a,
                };
                match answer {
                    Ok(Ok(())) => {
                        checks.link.answered();
                        if failing {
                            tracing::info!("Pub/Sub answers again");
                        }
                        failing = false;
                    }
                    Ok(Err(e)) => {
                        if !failing {
                            tracing::warn!(error = %e, "the Pub/Sub subscription check failed");
                        }
                        failing = true;
                        wait_or_stop(PUBSUB_RETRY_AFTER, &stop).await;
                    }
                    Err(_) => {
                        if !failing {
                            tracing::warn!(
                                timeout_s = PUBSUB_CHECK_TIMEOUT.as_secs(),
                                "the Pub/Sub subscription check got no answer in time"
                            );
                        }
                        failing = true;
                        wait_or_stop(PUBSUB_RETRY_AFTER, &stop).await;
                    }
                }
            }
        };
        tokio::join!(files, redis, pubsub);
    }

    /// The probe: Ok if the heartbeat is at most `max_age` old and, for readiness, the ready
    /// file exists. The error says why (the `not-ready` reason while not ready).
    pub fn probe(&self, ready: bool, max_age: Duration) -> Result<(), String> {
        if ready && !self.file(READY).exists() {
            let why = std::fs::read_to_string(self.file(NOT_READY))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "starting or stopped".into());
            return Err(format!("not ready: {why}"));
        }
        let live = self.file(LIVE);
        let raw = std::fs::read_to_string(&live).map_err(|e| {
            format!(
                "no heartbeat in {} ({e}): starting, or not running",
                live.display()
            )
        })?;
        let at: u64 = raw
            .trim()
            .parse()
            .map_err(|_| "heartbeat file is corrupt".to_string())?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let age = now.saturating_sub(at);
        if age > max_age.as_secs() {
            return Err(format!(
                "last heartbeat {age} s ago (more than {} s): the worker is stuck or stopped",
                max_age.as_secs()
            ));
        }
        Ok(())
    }
}

/// What [`Health::follow`] remembers between rounds.
#[derive(Default)]
struct FollowState {
    last: Option<Result<(), NotReady>>,
    ever_ready: bool,
}

async fn wait_or_stop(d: Duration, stop: &CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("gmail-sync-health-{name}-{}", std::process::id()))
    }

    fn all_good(now: Instant) -> Signals {
        Signals {
            now,
            stream_opened: Some(now - Duration::from_secs(100)),
            pubsub_answered: Some(now - Duration::from_secs(1)),
            redis_answered: Some(now - Duration::from_secs(1)),
            mass_failure: None,
        }
    }

    #[test]
    fn ready_needs_an_open_stream_answers_from_both_and_no_mass_failure() {
        let now = Instant::now() + Duration::from_secs(1000);
        assert_eq!(judge(&all_good(now)), Ok(()));

        let s = Signals {
            stream_opened: None,
            ..all_good(now)
        };
        assert_eq!(judge(&s), Err(NotReady::StreamNotOpen));

        // An answer from before the stream opened (the startup check) does not count.
        let s = Signals {
            stream_opened: Some(now - Duration::from_secs(1)),
            pubsub_answered: Some(now - Duration::from_secs(2)),
            ..all_good(now)
        };
        assert_eq!(judge(&s), Err(NotReady::PubSubNotYet));
        let s = Signals {
            pubsub_answered: None,
            ..all_good(now)
        };
        assert_eq!(judge(&s), Err(NotReady::PubSubNotYet));

        let s = Signals {
            pubsub_answered: Some(now - PUBSUB_STALE_AFTER),
            ..all_good(now)
        };
        assert_eq!(judge(&s), Ok(()), "the bound itself is still fresh");
        let s = Signals {
            pubsub_answered: Some(now - PUBSUB_STALE_AFTER - Duration::from_secs(1)),
            ..all_good(now)
        };
        assert_eq!(judge(&s), Err(NotReady::PubSubSilent));

        let s = Signals {
            redis_answered: None,
            ..all_good(now)
        };
        assert_eq!(judge(&s), Err(NotReady::RedisNotYet));
        let s = Signals {
            redis_answered: Some(now - REDIS_STALE_AFTER),
            ..all_good(now)
        };
        assert_eq!(judge(&s), Ok(()));
        let s = Signals {
            redis_answered: Some(now - REDIS_STALE_AFTER - Duration::from_millis(1)),
            ..all_good(now)
        };
        assert_eq!(judge(&s), Err(NotReady::RedisSilent));

        let s = Signals {
            mass_failure: Some("9 of 10 fail".into()),
            ..all_good(now)
        };
        assert_eq!(judge(&s), Err(NotReady::MassFailure("9 of 10 fail".into())));
    }

    #[test]
    fn the_stream_is_judged_before_redis() {
        let now = Instant::now() + Duration::from_secs(1000);
        let s = Signals {
            stream_opened: None,
            redis_answered: None,
            ..all_good(now)
        };
        assert_eq!(judge(&s), Err(NotReady::StreamNotOpen));
    }

    #[test]
    fn the_bounds_keep_their_reasons() {
        // Three PINGs may be missed before Redis counts as silent; two subscription checks.
        assert_eq!(REDIS_STALE_AFTER, REDIS_PING_PERIOD * 3);
        assert!(REDIS_PING_TIMEOUT < REDIS_PING_PERIOD);
        assert!(PUBSUB_STALE_AFTER > PUBSUB_CHECK_PERIOD * 2 + PUBSUB_CHECK_TIMEOUT);
        assert!(PUBSUB_CHECK_TIMEOUT < PUBSUB_CHECK_PERIOD);
        assert!(PUBSUB_RETRY_AFTER < PUBSUB_CHECK_PERIOD);
        // A healthy idle worker beats every 5 s (+ a round to write it).
        assert!(MIN_HEARTBEAT_AGE >= Duration::from_secs(5) * 2);
        assert!(MAX_HEARTBEAT_AGE >= MIN_HEARTBEAT_AGE);
    }

    #[test]
    fn the_subscription_is_checked_only_while_pulling_and_when_pubsub_was_quiet() {
        let now = Instant::now() + Duration::from_secs(1000);
        let ago = |s: u64| Some(now - Duration::from_secs(s));
        assert!(
            !pubsub_check_due(now, None, None),
            "not pulling: nothing to prove"
        );
        assert!(pubsub_check_due(now, ago(1), None));
        assert!(
            pubsub_check_due(now, ago(1), ago(2)),
            "answer older than the stream"
        );
        assert!(
            !pubsub_check_due(now, ago(100), ago(5)),
            "a message came recently"
        );
        assert!(pubsub_check_due(now, ago(100), ago(31)));
    }

    #[test]
    fn probe_follows_the_files() {
        let dir = temp_dir("probe");
        let _ = std::fs::remove_dir_all(&dir);
        let h = Health::new(&dir);
        assert!(h.probe(false, MAX_HEARTBEAT_AGE).is_err());
        h.reset().unwrap();
        let err = h.probe(true, MAX_HEARTBEAT_AGE).unwrap_err();
        assert!(err.contains("starting"), "{err}");
        assert!(
            h.probe(false, MAX_HEARTBEAT_AGE).is_err(),
            "no heartbeat yet"
        );

        let mut state = FollowState::default();
        h.beat().unwrap();
        assert!(h.probe(false, MAX_HEARTBEAT_AGE).is_ok());
        h.follow(Err(NotReady::RedisSilent), &mut state);
        let err = h.probe(true, MAX_HEARTBEAT_AGE).unwrap_err();
        assert!(err.contains("Redis has not answered"), "{err}");
        h.follow(Ok(()), &mut state);
        assert!(h.probe(true, MAX_HEARTBEAT_AGE).is_ok());
        assert!(!dir.join(NOT_READY).exists());

        h.mark_not_ready();
        let err = h.probe(true, MAX_HEARTBEAT_AGE).unwrap_err();
        assert!(err.contains("shutting down"), "{err}");
        h.follow(Ok(()), &mut state);
        assert!(
            h.probe(true, MAX_HEARTBEAT_AGE).is_err(),
            "never ready again"
        );
        assert!(
            h.probe(false, MAX_HEARTBEAT_AGE).is_ok(),
            "still live while draining"
        );

        let old = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 20;
        std::fs::write(dir.join(LIVE), format!("{old}\n")).unwrap();
        assert!(h.probe(false, MAX_HEARTBEAT_AGE).is_ok());
        let err = h.probe(false, MIN_HEARTBEAT_AGE).unwrap_err();
        assert!(err.contains("last heartbeat"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn reset_removes_what_a_killed_process_left() {
        let dir = temp_dir("reset");
        let _ = std::fs::remove_dir_all(&dir);
        let h = Health::new(&dir);
        h.reset().unwrap();
        h.beat().unwrap();
        h.follow(Ok(()), &mut FollowState::default());
        assert!(h.probe(true, MAX_HEARTBEAT_AGE).is_ok());
        // The process is killed here; the next one starts.
        let next = Health::new(&dir);
        next.reset().unwrap();
        assert!(next.probe(false, MAX_HEARTBEAT_AGE).is_err());
        assert!(next.probe(true, MAX_HEARTBEAT_AGE).is_err());
        assert!(!dir.join(LIVE).exists() && !dir.join(READY).exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn answering(ok: Arc<AtomicBool>, calls: Arc<AtomicU64>) -> Check {
        Box::new(move || {
            calls.fetch_add(1, Relaxed);
            let ok = ok.load(SeqCst);
            Box::pin(async move { if ok { Ok(()) } else { Err("down".into()) } })
        })
    }

    /// The real health task with paused time: ready once the stream opened and both answer,
    /// not ready within the staleness bound of a Redis outage while the heartbeat (advancing)
    /// keeps `live` fresh, ready again when Redis is back; the subscription checked only when
    /// Pub/Sub was quiet.
    #[tokio::test(start_paused = true)]
    async fn the_health_task_follows_its_signals() {
        let dir = temp_dir("task");
        let _ = std::fs::remove_dir_all(&dir);
        let h = Health::new(&dir);
        h.reset().unwrap();
        let redis_ok = Arc::new(AtomicBool::new(true));
        let (redis_calls, pubsub_calls) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let link = PubSubLink::default();
        let checks = Checks {
            redis: answering(redis_ok.clone(), redis_calls.clone()),
            pubsub: answering(Arc::new(AtomicBool::new(true)), pubsub_calls.clone()),
            mass_failure: Box::new(|| None),
            link: link.clone(),
        };
        let heartbeat = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            h.clone()
                .keep_alive(heartbeat.clone(), checks, stop.clone()),
        );
        let ready = || dir.join(READY).exists();
        let live_at = || std::fs::read_to_string(dir.join(LIVE)).ok();

        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!ready(), "the stream is not open yet");
        assert_eq!(
            pubsub_calls.load(Relaxed),
            0,
            "nothing to check before the stream opens"
        );
        assert_eq!(live_at(), None, "the loops have not turned");
        link.opened();
        heartbeat.fetch_add(1, Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(ready());
        assert_eq!(pubsub_calls.load(Relaxed), 1);
        assert!(live_at().is_some());

        // Redis goes away; the loops keep turning.
        redis_ok.store(false, SeqCst);
        for _ in 0..25 {
            heartbeat.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(!ready(), "not ready during the outage");
        let why = std::fs::read_to_string(dir.join(NOT_READY)).unwrap();
        assert!(why.contains("Redis"), "{why}");
        redis_ok.store(true, SeqCst);
        tokio::time::sleep(Duration::from_secs(REDIS_PING_PERIOD.as_secs() + 2)).await;
        assert!(ready(), "ready again once Redis answers");

        // Quiet Pub/Sub: a check per period, not per round.
        let before = pubsub_calls.load(Relaxed);
        tokio::time::sleep(PUBSUB_CHECK_PERIOD * 2).await;
        let checks_made = pubsub_calls.load(Relaxed) - before;
        assert!((1..=3).contains(&checks_made), "{checks_made}");
        // Messages prove the stream: no check while they come.
        let before = pubsub_calls.load(Relaxed);
        for _ in 0..60 {
            link.answered();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(pubsub_calls.load(Relaxed), before);

        // The reader stops pulling: not ready.
        link.closed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!ready());
        stop.cancel();
        task.await.unwrap();
        assert!(redis_calls.load(Relaxed) > 10);
        let _ = std::fs::remove_dir_all(dir);
    }
}
