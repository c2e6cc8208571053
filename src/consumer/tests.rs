//! The consumer's timing, with paused time: the real `Consumer::run` loop, a fake reader, fake
//! syncs and a fake quarantine. (The emulator tests in tests/integration stay the end-to-end
//! proofs; these pin down what happens at which moment.)

use super::delivery::Probe;
use super::*;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::time::Instant;

/// What the next sync call does.
#[derive(Clone, Debug)]
enum Step {
    /// Takes `after`, then reports the cursor as `cursor`.
    Covered {
        after: Duration,
        cursor: u64,
    },
    /// Never finishes unless cancelled.
    Hang,
    Retryable {
        retry_after: Option<Duration>,
    },
    /// The quota governor said wait this long.
    Deferred(Duration),
    Panic,
}

#[derive(Default)]
struct FakeSyncs {
    script: Mutex<VecDeque<Step>>,
    /// When each sync started (after its permit), with its target.
    started: Mutex<Vec<(Instant, u64)>>,
}

impl SyncRunner for FakeSyncs {
    async fn sync(
        &self,
        _mailbox: &Mailbox,
        target: HistoryId,
        cancel: &CancellationToken,
    ) -> SyncReport {
        self.started
            .lock()
            .unwrap()
            .push((Instant::now(), target.get()));
        let step = self.script.lock().unwrap().pop_front();
        let step = step.unwrap_or(Step::Covered {
            after: Duration::ZERO,
            cursor: target.get(),
        });
        let work = async {
            match step {
                Step::Covered { after, cursor } => {
                    tokio::time::sleep(after).await;
                    SyncReport::Covered {
                        cursor: HistoryId(cursor),
                        called_gmail: true,
                    }
                }
                Step::Hang => std::future::pending().await,
                Step::Retryable { retry_after } => SyncReport::Retryable { retry_after },
                Step::Deferred(after) => SyncReport::Deferred { after },
                Step::Panic => panic!("a sync panicked (on purpose, in a test)"),
            }
        };
        tokio::select! {
            report = work => report,
            _ = cancel.cancelled() => SyncReport::Aborted,
        }
    }
}

#[derive(Default)]
struct FakeQuarantine(Mutex<Vec<String>>);

impl QuarantineSink for FakeQuarantine {
    async fn quarantine(&self, entry: Quarantined<'_>) -> Result<(), StoreError> {
        self.0.lock().unwrap().push(format!(
            "{} [{} of {} bytes]",
            entry.reason(),
            entry.data().len(),
            entry.data_len()
        ));
        Ok(())
    }
}

struct Bed {
    syncs: Arc<FakeSyncs>,
    quarantine: Arc<FakeQuarantine>,
    log: Arc<Mutex<Vec<String>>>,
    /// Feeds the fake reader; dropping it ends the reader (as a stream ending would).
    feed: Option<mpsc::UnboundedSender<Delivery<Probe>>>,
    shutdown: CancellationToken,
    consumer: Option<tokio::task::JoinHandle<()>>,
    started_at: Instant,
}

fn settings(shutdown_timeout: Duration) -> ConsumerSettings {
    ConsumerSettings {
        max_concurrent_syncs: 4,
        max_outstanding_messages: 100,
        max_outstanding_bytes: 1 << 20,
        ack_extension: Duration::from_secs(60),
        max_lease: Duration::from_secs(600),
        shutdown_timeout,
        sync_retries: 8,
        history_lag: HISTORY_LAG,
        coalesce_window: Duration::ZERO,
    }
}

impl Bed {
    /// Starts `Consumer::run` with a fake reader that forwards what `send` feeds it and stops
    /// (closing the channel) when told to stop reading, as the Pub/Sub reader does.
    fn start(shutdown_timeout: Duration, script: Vec<Step>) -> Bed {
        Bed::start_with(settings(shutdown_timeout), script)
    }

    /// [`Bed::start`] with a coalescing window.
    fn windowed(shutdown_timeout: Duration, window: Duration, script: Vec<Step>) -> Bed {
        Bed::start_with(
            ConsumerSettings {
                coalesce_window: window,
                ..settings(shutdown_timeout)
            },
            script,
        )
    }

    fn start_with(settings: ConsumerSettings, script: Vec<Step>) -> Bed {
        let syncs = Arc::new(FakeSyncs {
            script: Mutex::new(script.into()),
            ..FakeSyncs::default()
        });
        let quarantine = Arc::new(FakeQuarantine::default());
        let (feed, mut fed) = mpsc::unbounded_channel::<Delivery<Probe>>();
        let (tx, receiver) = mpsc::channel(8);
        let stop_reading = CancellationToken::new();
        let stop = stop_reading.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    d = fed.recv() => match d {
                        Some(d) => { let _ = tx.send(d).await; }
                        None => return,
                    },
                }
            }
        });
        let consumer = Consumer {
            syncs: syncs.clone(),
            quarantine: quarantine.clone(),
            settings,
            counters: Arc::default(),
            tracker: TaskTracker::new(),
            heartbeat: Arc::default(),
        };
        let shutdown = CancellationToken::new();
        let run = consumer.run(
            Deliveries {
                receiver,
                stop_reading,
            },
            shutdown.clone(),
        );
        Bed {
            syncs,
            quarantine,
            log: Arc::default(),
            feed: Some(feed),
            shutdown,
            consumer: Some(tokio::spawn(run)),
            started_at: Instant::now(),
        }
    }

    fn send(&self, id: &str, payload: &str) {
        let delivery = Delivery {
            data: bytes::Bytes::from(payload.to_string()),
            message_id: id.to_string(),
            publish_time: None,
            ack: Probe::new(id, &self.log),
        };
        self.feed
            .as_ref()
            .expect("reader still open")
            .send(delivery)
            .unwrap();
    }

    fn notify(&self, id: &str, email: &str, history_id: u64) {
        self.send(
            id,
            &format!(r#"{{"emailAddress":"{email}","historyId":"{history_id}"}}"#),
        );
    }

    /// Waits for the consumer to return (bounded in virtual time, so a hang fails the test).
    async fn finished(&mut self) -> Duration {
        let run = self.consumer.take().expect("awaited once");
        tokio::time::timeout(Duration::from_secs(3600), run)
            .await
            .expect("the consumer returns")
            .expect("the consumer does not panic");
        self.started_at.elapsed()
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn sync_starts(&self) -> Vec<(Duration, u64)> {
        self.syncs
            .started
            .lock()
            .unwrap()
            .iter()
            .map(|(at, target)| (at.duration_since(self.started_at), *target))
            .collect()
    }
}

const GRACE: Duration = Duration::from_secs(30);
const HISTORY_LAG: Duration = Duration::from_secs(20);

#[tokio::test(start_paused = true)]
async fn a_sync_in_flight_at_shutdown_finishes_and_is_acked() {
    let mut bed = Bed::start(
        GRACE,
        vec![Step::Covered {
            after: Duration::from_secs(2),
            cursor: 5,
        }],
    );
    bed.notify("1", "a@x.com", 5);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bed.sync_starts().len(), 1, "the sync started");
    bed.shutdown.cancel();
    let took = bed.finished().await;
    assert_eq!(bed.log(), vec!["ack:1"]);
    assert!(
        took >= Duration::from_secs(2),
        "waited for the sync: {took:?}"
    );
    assert!(took < GRACE, "did not wait for the grace period: {took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_sync_is_cancelled_at_the_grace_and_nacked() {
    let mut bed = Bed::start(GRACE, vec![Step::Hang]);
    bed.notify("1", "a@x.com", 5);
    tokio::time::sleep(Duration::from_millis(100)).await;
    bed.shutdown.cancel();
    let took = bed.finished().await;
    assert_eq!(bed.log(), vec!["nack:1"]);
    assert!(took >= GRACE, "cancelled only at the grace: {took:?}");
    assert!(took < GRACE + Duration::from_secs(1), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn nack_immediately_cancels_syncs_without_waiting() {
    let mut bed = Bed::start(Duration::ZERO, vec![Step::Hang]);
    bed.notify("1", "a@x.com", 5);
    tokio::time::sleep(Duration::from_millis(100)).await;
    bed.shutdown.cancel();
    let took = bed.finished().await;
    assert_eq!(bed.log(), vec!["nack:1"]);
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn the_reader_ending_drains_everything() {
    let step = Step::Covered {
        after: Duration::from_secs(1),
        cursor: 9,
    };
    let mut bed = Bed::start(GRACE, vec![step.clone(), step]);
    bed.notify("1", "a@x.com", 5);
    bed.notify("2", "b@x.com", 7);
    bed.notify("3", "a@x.com", 9);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The stream ends without a shutdown request (e.g. a permanent stream error).
    bed.feed = None;
    bed.finished().await;
    let mut log = bed.log();
    log.sort();
    assert_eq!(log, vec!["ack:1", "ack:2", "ack:3"]);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_is_honoured() {
    let retry_after = Duration::from_secs(30);
    let mut bed = Bed::start(
        GRACE,
        vec![Step::Retryable {
            retry_after: Some(retry_after),
        }],
    );
    bed.notify("1", "a@x.com", 5);
    // Long enough for the retry to run (virtual time).
    tokio::time::sleep(Duration::from_secs(120)).await;
    let starts = bed.sync_starts();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert!(
        starts[1].0 - starts[0].0 >= retry_after,
        "retried too early: {starts:?}"
    );
    assert_eq!(bed.log(), vec!["ack:1"]);
    bed.shutdown.cancel();
    bed.finished().await;
}

/// A deferred sync is asked again exactly when the governor said, as many times as it says,
/// without using the failure retries (here: none) and without a nack; the notifications that
/// arrive meanwhile share the sync that finally runs.
#[tokio::test(start_paused = true)]
async fn quota_deferrals_wait_as_told_and_never_nack() {
    let wait = Duration::from_secs(20);
    let mut bed = Bed::start_with(
        ConsumerSettings {
            sync_retries: 0,
            ..settings(GRACE)
        },
        vec![Step::Deferred(wait); 12],
    );
    bed.notify("1", "a@x.com", 5);
    tokio::time::sleep(Duration::from_secs(30)).await;
    bed.notify("2", "a@x.com", 7);
    // 12 deferrals of 20 s: 240 s, far beyond what the failure retries would allow.
    tokio::time::sleep(Duration::from_secs(300)).await;
    let starts = bed.sync_starts();
    assert_eq!(starts.len(), 13, "{starts:?}");
    for pair in starts.windows(2) {
        assert!(
            pair[1].0 - pair[0].0 >= wait,
            "asked again too early: {starts:?}"
        );
    }
    assert_eq!(starts[12].1, 7, "the last sync covers both notifications");
    let mut log = bed.log();
    log.sort();
    assert_eq!(log, vec!["ack:1", "ack:2"], "acked, never nacked");
    bed.shutdown.cancel();
    bed.finished().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_sync_reports_back_and_its_message_is_nacked() {
    let mut bed = Bed::start(GRACE, vec![Step::Panic]);
    bed.notify("1", "a@x.com", 5);
    tokio::time::sleep(Duration::from_millis(100)).await;
    bed.shutdown.cancel();
    let took = bed.finished().await;
    assert_eq!(bed.log(), vec!["nack:1"]);
    assert!(
        took < GRACE,
        "shutdown did not wait for the dead sync: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn malformed_messages_are_quarantined_then_acked() {
    let mut bed = Bed::start(GRACE, vec![]);
    bed.send("bad", "not json at all");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bed.log(), vec!["ack:bad"]);
    let reasons = bed.quarantine.0.lock().unwrap().clone();
    assert_eq!(reasons.len(), 1);
    assert!(
        reasons[0].contains("not a JSON notification"),
        "{reasons:?}"
    );
    assert!(bed.sync_starts().is_empty());
    bed.shutdown.cancel();
    bed.finished().await;
}

#[tokio::test(start_paused = true)]
async fn an_oversize_payload_is_quarantined_with_its_first_bytes_only() {
    let mut bed = Bed::start(GRACE, vec![]);
    let big = "x".repeat(1_000_000);
    bed.send("big", &big);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bed.log(), vec!["ack:big"]);
    let reasons = bed.quarantine.0.lock().unwrap().clone();
    assert_eq!(
        reasons,
        vec!["payload of 1000000 bytes exceeds 4096 [256 of 1000000 bytes]".to_string()]
    );
    bed.shutdown.cancel();
    bed.finished().await;
}

/// A historyId Gmail's history never reaches: re-read with backoff for GMAIL_SYNC_HISTORY_LAG_SECS,
/// then quarantined and acked; no sync runs for it after that.
#[tokio::test(start_paused = true)]
async fn a_notification_history_never_reaches_is_quarantined_after_the_lag() {
    let behind = Step::Covered {
        after: Duration::from_millis(10),
        cursor: 40,
    };
    let mut bed = Bed::start(GRACE, vec![behind; 100]);
    bed.notify("ahead", "a@x.com", 1_000_000);
    tokio::time::sleep(HISTORY_LAG + Duration::from_secs(5)).await;
    let starts = bed.sync_starts();
    assert_eq!(bed.log(), vec!["ack:ahead"]);
    let reasons = bed.quarantine.0.lock().unwrap().clone();
    assert_eq!(reasons.len(), 1);
    assert!(
        reasons[0].starts_with("historyId 1000000 never reached"),
        "{reasons:?}"
    );
    // 0, 0.5, 1.5, 3.5, 7.5, 15.5 s, then at the lag (20 s): seven reads of history in all.
    assert_eq!(starts.len(), 7, "{starts:?}");
    let last = starts.last().unwrap().0;
    assert!(
        last >= HISTORY_LAG && last < HISTORY_LAG + Duration::from_secs(1),
        "{starts:?}"
    );
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(bed.sync_starts().len(), 7, "nothing more for it");
    bed.shutdown.cancel();
    bed.finished().await;
}

const WINDOW: Duration = Duration::from_millis(300);

#[tokio::test(start_paused = true)]
async fn notifications_within_the_window_share_one_sync_that_starts_when_it_closes() {
    let mut bed = Bed::windowed(GRACE, WINDOW, vec![]);
    bed.notify("1", "a@x.com", 5);
    tokio::time::sleep(Duration::from_millis(100)).await;
    bed.notify("2", "a@x.com", 7);
    tokio::time::sleep(Duration::from_millis(100)).await;
    bed.notify("3", "a@x.com", 6);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(bed.sync_starts().is_empty(), "the window is still open");
    assert!(bed.log().is_empty());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let starts = bed.sync_starts();
    assert_eq!(starts.len(), 1, "one sync for the three: {starts:?}");
    assert_eq!(starts[0].1, 7, "it covers the highest historyId");
    assert!(
        starts[0].0 >= WINDOW && starts[0].0 < WINDOW + Duration::from_millis(50),
        "it starts when the first notification's window closes: {starts:?}"
    );
    assert_eq!(bed.log(), vec!["ack:1", "ack:2", "ack:3"]);
    bed.shutdown.cancel();
    bed.finished().await;
}

#[tokio::test(start_paused = true)]
async fn a_notification_the_committed_cursor_covers_is_acked_without_a_window() {
    let mut bed = Bed::windowed(GRACE, WINDOW, vec![]);
    bed.notify("1", "a@x.com", 9);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(bed.log(), vec!["ack:1"]);
    // A redelivery, or the notification of a change the sync already read.
    bed.notify("2", "a@x.com", 8);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(bed.log(), vec!["ack:1", "ack:2"], "acked at once");
    assert_eq!(bed.sync_starts().len(), 1, "no sync for it");
    bed.shutdown.cancel();
    bed.finished().await;
}

#[tokio::test(start_paused = true)]
async fn notifications_during_a_sync_share_one_follow_up() {
    let slow = |cursor| Step::Covered {
        after: Duration::from_millis(500),
        cursor,
    };
    let mut bed = Bed::windowed(GRACE, WINDOW, vec![slow(5), slow(11)]);
    bed.notify("1", "a@x.com", 5);
    // The first sync runs from 300 to 800 ms; these arrive during it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for (i, h) in [(2, 9), (3, 11), (4, 10)] {
        bed.notify(&i.to_string(), "a@x.com", h);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let starts = bed.sync_starts();
    assert_eq!(starts.len(), 2, "one follow-up for the three: {starts:?}");
    assert_eq!(starts[1].1, 11);
    // Their window (from 400 ms) closed before the first sync ended: no further wait.
    assert!(starts[1].0 < Duration::from_millis(850), "{starts:?}");
    assert_eq!(bed.log(), vec!["ack:1", "ack:2", "ack:3", "ack:4"]);
    bed.shutdown.cancel();
    bed.finished().await;
}

#[tokio::test(start_paused = true)]
async fn a_graceful_shutdown_starts_the_sync_of_an_open_window() {
    let mut bed = Bed::windowed(GRACE, Duration::from_secs(5), vec![]);
    bed.notify("1", "a@x.com", 5);
    tokio::time::sleep(Duration::from_millis(100)).await;
    bed.shutdown.cancel();
    let took = bed.finished().await;
    assert_eq!(bed.sync_starts().len(), 1, "synced at the shutdown");
    assert_eq!(bed.log(), vec!["ack:1"]);
    assert!(
        took < Duration::from_secs(1),
        "did not wait for the window: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn nack_immediately_gives_back_an_open_window() {
    let mut bed = Bed::windowed(Duration::ZERO, Duration::from_secs(5), vec![]);
    bed.notify("1", "a@x.com", 5);
    tokio::time::sleep(Duration::from_millis(100)).await;
    bed.shutdown.cancel();
    let took = bed.finished().await;
    assert!(bed.sync_starts().is_empty());
    assert_eq!(bed.log(), vec!["nack:1"]);
    assert!(took < Duration::from_secs(1), "{took:?}");
}

/// The window does not move the history-lag rule: a historyId Gmail's history never reaches
/// is still quarantined at GMAIL_SYNC_HISTORY_LAG_SECS from its arrival.
#[tokio::test(start_paused = true)]
async fn with_a_window_a_far_ahead_notification_is_still_quarantined_at_the_lag() {
    let behind = Step::Covered {
        after: Duration::from_millis(10),
        cursor: 40,
    };
    let mut bed = Bed::windowed(GRACE, WINDOW, vec![behind; 100]);
    bed.notify("ahead", "a@x.com", 1_000_000);
    tokio::time::sleep(HISTORY_LAG + Duration::from_secs(5)).await;
    assert_eq!(bed.log(), vec!["ack:ahead"]);
    assert_eq!(bed.quarantine.0.lock().unwrap().len(), 1);
    let starts = bed.sync_starts();
    let last = starts.last().unwrap().0;
    assert!(
        last >= HISTORY_LAG && last < HISTORY_LAG + Duration::from_secs(1),
        "{starts:?}"
    );
    bed.shutdown.cancel();
    bed.finished().await;
}
